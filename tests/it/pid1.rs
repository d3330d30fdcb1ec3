//! turnd reaps every child it inherits (issue 18, DESIGN "PID 1 reaps everything"): as PID 1 of
//! its own PID namespace (`unshare --pid --fork --mount-proc`, what a container without an init
//! gives it) and, elsewhere, as a child subreaper. Workers that crash leave a grandchild behind
//! that holds their stdout and outlives them: each crash is still answered `WORKER_DIED` at
//! once (exit detection does not wait for the pipe or for the orphans), and no orphan stays a
//! zombie.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use turnd_harness::*;

const T: Duration = Duration::from_secs(30);
/// Workers that crash at once, each leaving an orphan.
const WORKERS: usize = 16;
/// How long each orphan outlives its worker (and holds the worker's stdout).
const ORPHAN_MS: u64 = 5000;

/// The pids whose parent is `pid` (from every thread's `children` list).
fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for t in tasks.flatten() {
        let text = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        out.extend(text.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// `R`, `S`, `Z`, … from /proc/<pid>/stat.
fn state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

fn unshare_works() -> Result<(), String> {
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .output()
        .map_err(|e| format!("unshare: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

async fn orphans_are_reaped(in_namespace: bool) {
    let mut cluster = Cluster::new().await;
    let port = free_port();
    cluster.set("TURND_HTTP__LISTEN", &format!("127.0.0.1:{port}"));
    if in_namespace {
        cluster.daemon_prefix = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
    }
    cluster.start_daemon(&[]).await;
    let started = cluster.daemons[0].pid().expect("started") as i32;
    // turnd itself: in a namespace, the one child of `unshare`.
    let turnd = if in_namespace {
        let kids = children_of(started);
        assert_eq!(kids.len(), 1, "unshare's children: {kids:?}");
        kids[0]
    } else {
        started
    };
    let log = strip_ansi(&cluster.daemon_log(0));
    assert_eq!(log.contains("running as PID 1"), in_namespace, "{log}");

    let mut client = cluster.client().await;
    let start = Instant::now();
    let mut ids = Vec::new();
    for i in 0..WORKERS {
        let t = turn("pid1", &format!("c{i}"), json!({"action": "orphan", "orphan_ms": ORPHAN_MS}));
        ids.push(mid(&t));
        client.publish(&t).await;
    }
    client.wait_for(&ids, T).await;
    let answered = start.elapsed();
    for id in &ids {
        let e = client.event(id).expect("an event");
        assert_eq!(e.code(), "WORKER_DIED", "{id}: {:?}", e.kind());
    }
    // Every crash was answered while its orphan still held the worker's stdout: detection
    // waited neither for EOF nor for the orphans.
    assert!(
        answered < Duration::from_millis(ORPHAN_MS),
        "{WORKERS} crashes answered in {answered:?}, not before the orphans exit"
    );
    // The orphans are turnd's children now (reparented to PID 1 / the subreaper), alive.
    let adopted = children_of(turnd);
    assert!(adopted.len() >= WORKERS, "turnd adopted {adopted:?}");
    assert!(adopted.iter().all(|&p| state(p) != Some('Z')), "zombies already: {adopted:?}");

    // Once they exit, none stays a zombie.
    wait_until(T, "every orphan reaped (no child of turnd left)", || children_of(turnd).is_empty())
        .await;
    wait_for_async(T, "turnd_orphans_reaped_total counts them", || async {
        let Some((_, text)) = http_get(port, "/metrics").await else { return false };
        text.lines()
            .find(|l| l.starts_with("turnd_orphans_reaped_total "))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .is_some_and(|n| n >= WORKERS as f64)
    })
    .await;

    // Still serving: a worker crashes after all that and is answered as fast.
    let t = turn("pid1", "after", json!({"action": "crash"}));
    let id = mid(&t);
    client.publish(&t).await;
    client.wait_for(std::slice::from_ref(&id), T).await;
    assert_eq!(client.event(&id).expect("event").code(), "WORKER_DIED");

    // SIGTERM to turnd (not to unshare): it drains and exits 0.
    // SAFETY: kill only sends a signal, to the turnd this test started.
    unsafe { libc::kill(turnd, libc::SIGTERM) };
    let status = wait_for_value(T, "turnd to exit", || {
        let s = cluster.daemons[0].child.as_mut().and_then(|c| c.try_wait().ok().flatten());
        async move { s }
    })
    .await;
    assert!(status.success(), "{status:?}: {}", cluster.daemon_log(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_pid_1_of_a_pid_namespace_every_orphan_is_reaped() {
    if let Err(why) = unshare_works() {
        eprintln!(
            "SKIPPED: cannot make a PID namespace here ({why}); needs root or user namespaces"
        );
        return;
    }
    orphans_are_reaped(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_a_child_subreaper_every_orphan_is_reaped() {
    orphans_are_reaped(false).await;
}
