//! Many locks on one connection (issue 4): one daemon owning 2,000 live deployments holds all
//! their advisory locks on its single lock-session connection.
//!
//! Its own test binary, and a machine-wide file lock besides: PostgreSQL's lock table is
//! server-wide, so tests that hold thousands of locks must not run at the same time.

use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use serde_json::json;
use turnd_harness::*;

const DEPLOYMENTS: usize = 2_000;

/// Held for the life of the test: one thousands-of-locks test at a time on this machine.
struct ManyLocksGuard {
    _file: std::fs::File,
}

fn many_locks_guard() -> ManyLocksGuard {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("turnd-tests-many-locks.lock"))
        .expect("open the many-locks lock file");
    // SAFETY: flock on an fd we own; released when the file is closed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
    ManyLocksGuard { _file: file }
}

/// `Client::wait_for` for thousands of ids: it re-checks every id against every event after
/// each delivery, which is quadratic; count first, then check with a set.
async fn wait_for_all(client: &mut Client, ids: &[String], within: Duration) {
    let deadline = Instant::now() + within;
    let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut need = ids.len();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        client.wait_until(left, &format!("{need} events"), |ev| ev.len() >= need).await;
        let got: HashSet<&str> =
            client.events.iter().map(Event::message_id).filter(|m| wanted.contains(m)).collect();
        if got.len() == wanted.len() {
            return;
        }
        need = client.events.len() + (wanted.len() - got.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_daemon_holds_two_thousand_locks_on_one_connection() {
    let _guard = many_locks_guard();
    let start = Instant::now();
    let mut cluster = Cluster::new().await;
    cluster.set("TURND_WORKER__MAX_WORKERS", "2500");
    cluster.set("TURND_WORKER__IDLE_TIMEOUT", "10m");
    // Far shorter than the spawn backlog of 2,000 deployments starting at once: a turn's
    // deadline must run from when its worker has it, not from its claim.
    cluster.set("TURND_TURN__DEADLINE", "5s");
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;

    let turns: Vec<_> =
        (0..DEPLOYMENTS).map(|i| turn("many", &format!("m-{i}"), json!({"text": i}))).collect();
    let ids: Vec<String> = turns.iter().map(mid).collect();
    let published = Instant::now();
    // Pipelined: every publish first, then every confirm.
    let mut confirms = Vec::with_capacity(turns.len());
    for t in &turns {
        let props = lapin::BasicProperties::default().with_delivery_mode(2);
        let exchange = format!("{}.turns", cluster.prefix);
        let body = t.to_string();
        confirms.push(
            client
                .publisher
                .basic_publish(
                    exchange.as_str().into(),
                    "turn.many".into(),
                    Default::default(),
                    body.as_bytes(),
                    props,
                )
                .await
                .expect("publish"),
        );
    }
    for c in confirms {
        assert!(c.await.expect("confirm").is_ack(), "broker nacked a turn");
    }
    eprintln!("published {DEPLOYMENTS} turns in {:?}", published.elapsed());
    wait_for_all(&mut client, &ids, Duration::from_secs(90)).await;
    eprintln!(
        "{DEPLOYMENTS} deployments answered in {:?} after publishing started",
        published.elapsed()
    );
    for id in &ids {
        let e = client.event(id).unwrap();
        assert_eq!(e.kind(), "reply", "{id} ended with {}: {}", e.code(), e.body["error"]);
    }

    // Every worker is alive (idle, keeping its deployment), each under the lock.
    let pids: Vec<i32> =
        turns.iter().map(|t| cluster.worker_pid(&deployment_of(t)).expect("pid file")).collect();
    let alive = pids.iter().filter(|p| process_alive(**p)).count();
    assert_eq!(alive, DEPLOYMENTS, "every deployment keeps its live worker");

    let lock_sessions: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'turnd-lock:d0' AND datname = current_database()",
    )
    .fetch_all(&cluster.pool)
    .await
    .unwrap();
    assert_eq!(lock_sessions.len(), 1, "one lock-session connection");
    let advisory: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1 AND granted",
    )
    .bind(lock_sessions[0])
    .fetch_one(&cluster.pool)
    .await
    .unwrap();
    assert_eq!(advisory, DEPLOYMENTS as i64, "the lock session holds every deployment's lock");
    let pooled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'turnd:d0' AND datname = current_database()",
    )
    .fetch_one(&cluster.pool)
    .await
    .unwrap();
    // database.max_connections (6 in the harness) plus the relay's LISTEN connection.
    eprintln!("d0's other connections: {pooled}");
    assert!(pooled <= 6 + 1, "the locks do not eat the pool: {pooled} other connections");
    let owned: i64 =
        sqlx::query_scalar("SELECT count(*) FROM turnd_deployments WHERE owner = 'd0'")
            .fetch_one(&cluster.pool)
            .await
            .unwrap();
    assert_eq!(owned, DEPLOYMENTS as i64);
    assert!(cluster.violations().is_empty());

    // SIGKILL: the workers go with the daemon, and PostgreSQL frees the locks with the session.
    cluster.daemons[0].kill();
    wait_for_async(Duration::from_secs(20), "the locks freed", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1",
        )
        .bind(lock_sessions[0])
        .fetch_one(&cluster.pool)
        .await
        .unwrap();
        n == 0
    })
    .await;
    wait_until(Duration::from_secs(20), "the workers gone with their daemon", || {
        pids.iter().all(|p| !process_alive(*p))
    })
    .await;
    eprintln!("whole test took {:?}", start.elapsed());
}
