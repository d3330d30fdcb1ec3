//! Fairness between organizations (issue 20 item 3): round-robin admission at
//! `worker.max_workers`, the per-organization caps on live workers (per daemon and
//! cluster-wide) and the per-organization gauges. Every turn still ends exactly once, and a
//! turn held back by a cap waits queued instead of failing.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};
use turnd_harness::*;

const T: Duration = Duration::from_secs(30);

/// Seconds each turn of `org` waited between its acceptance and its claim.
async fn queue_waits(cluster: &Cluster, org: &str) -> HashMap<String, f64> {
    let rows: Vec<(String, f64)> = sqlx::query_as(
        "SELECT message_id, EXTRACT(EPOCH FROM started_at - accepted_at)::float8
         FROM turnd_turns WHERE organization_id = $1 AND started_at IS NOT NULL",
    )
    .bind(org)
    .fetch_all(&cluster.pool)
    .await
    .expect("queue waits");
    rows.into_iter().collect()
}

fn max(values: impl IntoIterator<Item = f64>) -> f64 {
    values.into_iter().fold(0.0, f64::max)
}

/// The value of one series in a /metrics text, if exported.
fn series(text: &str, name: &str, organization: &str) -> Option<i64> {
    let prefix = format!("{name}{{organization=\"{organization}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
}

fn deployments(turns: &[Value]) -> Vec<String> {
    let mut names: Vec<String> = turns.iter().map(deployment_of).collect();
    names.sort();
    names.dedup();
    names
}

/// One organization floods 1,000 turns over 200 conversations; another then sends 10, each in
/// a conversation of its own (its worst case: ten admissions to wait for, not one).
///
/// The bound. With M = `worker.max_workers` = 4 slots and admission round-robin across the
/// two organizations, the small one's k-th deployment gets at most the (2k)-th slot that frees
/// after it was queued; its 10th thus waits for at most 20 slot releases, ⌈20 / 4⌉ = 5 rounds
/// in which every slot is released once, plus the round already under way when it arrived:
/// wait ≤ (⌈2·10 / M⌉ + 1) · H, where H is the longest any flooding deployment held a slot
/// (its worker's start to exit in the worker log: spawn, its 5 turns of 20 ms, stop), plus
/// 1 s for the owner request's hop and the organization look-up. First-come admission would
/// have it wait behind all 200 flooding deployments (50 rounds); the test also checks that the
/// small organization waited less than a third of what the flood's last turn did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_organization_does_not_starve_a_small_one() {
    const M: usize = 4;
    const FLOOD_CONVERSATIONS: usize = 200;
    const TURNS_EACH: usize = 5;
    const SMALL: usize = 10;
    let mut cluster = Cluster::new().await;
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let max_workers = M.to_string();
    cluster
        .start_daemon(&[
            ("TURND_WORKER__MAX_WORKERS", &max_workers),
            ("TURND_HTTP__LISTEN", &listen),
            // Not the subject here, and a trace line per turn slows 1,000 of them down.
            ("TURND_LOG__LEVEL", "info"),
        ])
        .await;
    let mut client = cluster.client().await;

    let sleep = json!({"action": "sleep", "ms": 20});
    let mut flood = Vec::new();
    for _ in 0..TURNS_EACH {
        for c in 0..FLOOD_CONVERSATIONS {
            flood.push(org_turn("flood", "a1", &format!("f{c}"), sleep.clone()));
        }
    }
    for t in &flood {
        client.publish(t).await;
    }
    let small: Vec<Value> =
        (0..SMALL).map(|c| org_turn("small", "a1", &format!("s{c}"), sleep.clone())).collect();
    for t in &small {
        client.publish(t).await;
    }

    // The gauges while the flood waits: bounded labels, the flood's backlog visible.
    let port: u16 = port.parse().expect("port");
    let text = wait_for_value(T, "the flood's backlog in /metrics", || async move {
        let (_, text) = http_get(port, "/metrics").await?;
        (series(&text, "turnd_org_backlog", "flood").unwrap_or(0) > 0).then_some(text)
    })
    .await;
    let live = series(&text, "turnd_org_live_workers", "flood").unwrap_or(0);
    assert!(live <= M as i64, "{live} live workers of the flood at max_workers {M}:\n{text}");

    let small_ids: Vec<String> = small.iter().map(mid).collect();
    client.wait_for(&small_ids, Duration::from_secs(120)).await;
    let all: Vec<String> = flood.iter().chain(&small).map(mid).collect();
    client.wait_for(&all, Duration::from_secs(300)).await;
    let events = client.assert_exactly_once(&all);
    assert!(events.values().all(|e| e.kind() == "reply"), "every turn answered, none failed");

    let small_wait = max(queue_waits(&cluster, "small").await.into_values());
    let flood_wait = max(queue_waits(&cluster, "flood").await.into_values());
    // H: the longest a flooding deployment held a slot, from its worker's start to its exit.
    let mut held = 0.0f64;
    for dep in deployments(&flood) {
        let log = cluster.worker_log(&dep);
        let times = |kind: &str| -> Vec<f64> {
            log.iter()
                .filter(|l| l[0] == kind)
                .filter_map(|l| l.last()?.parse::<f64>().ok())
                .map(|ns| ns / 1e9)
                .collect()
        };
        for (start, exit) in times("start").into_iter().zip(times("exit")) {
            held = held.max(exit - start);
        }
    }
    let rounds = (2 * SMALL).div_ceil(M) + 1;
    let bound = rounds as f64 * held + 1.0;
    eprintln!(
        "small organization: longest queue wait {small_wait:.2} s (bound {bound:.2} s = {rounds} × \
         H {held:.2} s + 1 s); flooding organization: longest {flood_wait:.2} s"
    );
    assert!(small_wait <= bound, "small waited {small_wait:.2} s, bound {bound:.2} s");
    assert!(
        small_wait * 3.0 < flood_wait,
        "small waited {small_wait:.2} s, the flood's last turn {flood_wait:.2} s: not fair"
    );
    // An idle worker asked to stop for a waiting deployment may still be exiting while its
    // successor starts (`worker.max_workers` counts the slots given, not exits seen): at most
    // one stopping worker per slot.
    let most = cluster.max_live_workers(&deployments(&flood));
    eprintln!("flooding organization: at most {most} worker processes at once (max_workers {M})");
    assert!(most <= 2 * M, "{most} worker processes alive at once");
    assert_eq!(cluster.pending().await, 0);
}

/// `worker.max_workers_per_org = 2`: six conversations of one organization never have more
/// than two workers at once, and wait (queued, not failed); another organization's turn is
/// not held back by them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_organization_at_its_daemon_cap_waits_and_others_do_not() {
    let mut cluster = Cluster::new().await;
    cluster.start_daemon(&[("TURND_WORKER__MAX_WORKERS_PER_ORG", "2")]).await;
    let mut client = cluster.client().await;
    let slow = json!({"action": "sleep", "ms": 600});
    let capped: Vec<Value> =
        (0..6).map(|c| org_turn("capped", "a1", &format!("c{c}"), slow.clone())).collect();
    for t in &capped {
        client.publish(t).await;
    }
    let other = org_turn("other", "a1", "o1", json!({}));
    client.publish(&other).await;
    let ids: Vec<String> = capped.iter().chain([&other]).map(mid).collect();
    client.wait_for(&ids, T).await;
    let events = client.assert_exactly_once(&ids);
    assert!(events.values().all(|e| e.kind() == "reply"), "waiting turns are not failed");

    let most = cluster.max_live_workers(&deployments(&capped));
    eprintln!("capped organization: at most {most} workers at once (cap 2)");
    assert_eq!(most, 2, "the cap is reached and never exceeded");
    let waits = queue_waits(&cluster, "capped").await;
    // Six turns of 600 ms through two slots: the last ones waited for two rounds.
    assert!(max(waits.into_values()) >= 1.0, "some capped turns waited for a slot");
    let other_wait = max(queue_waits(&cluster, "other").await.into_values());
    assert!(other_wait < 0.5, "the other organization waited {other_wait:.2} s");
    assert_eq!(cluster.pending().await, 0);
}

/// `worker.max_workers_per_org_cluster = 3` with two daemons: the organization never has more
/// than three workers in the cluster, although each daemon alone would allow more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_organization_at_its_cluster_cap_waits_across_daemons() {
    let mut cluster = Cluster::new().await;
    let cap = [("TURND_WORKER__MAX_WORKERS_PER_ORG_CLUSTER", "3")];
    cluster.start_daemon(&cap).await;
    cluster.start_daemon(&cap).await;
    let mut client = cluster.client().await;
    let slow = json!({"action": "sleep", "ms": 600});
    let turns: Vec<Value> =
        (0..8).map(|c| org_turn("capped", "a1", &format!("c{c}"), slow.clone())).collect();
    for t in &turns {
        client.publish(t).await;
    }
    let ids: Vec<String> = turns.iter().map(mid).collect();
    client.wait_for(&ids, T).await;
    let events = client.assert_exactly_once(&ids);
    assert!(events.values().all(|e| e.kind() == "reply"), "waiting turns are not failed");

    let names = deployments(&turns);
    let most = cluster.max_live_workers(&names);
    eprintln!("capped organization: at most {most} workers at once in the cluster (cap 3)");
    assert!(most <= 3, "{most} workers at once over the cluster-wide cap of 3");
    assert!(most >= 2, "the cap still lets workers run side by side ({most})");
    assert_eq!(cluster.pending().await, 0);
}

/// A daemon that stops with deployments waiting for a slot offers them to the other daemons at
/// once: with `sweep.adoption_delay` far away, the waiting turn is answered by the other
/// daemon while the stopping one still finishes its running turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_daemon_hands_its_waiting_deployments_over() {
    let mut cluster = Cluster::new().await;
    cluster.set("TURND_SWEEP__ADOPTION_DELAY", "60s");
    cluster.set("TURND_TURN__DEADLINE", "30s");
    cluster
        .start_daemon(&[("TURND_WORKER__MAX_WORKERS", "1"), ("TURND_SHUTDOWN__GRACE", "30s")])
        .await;
    let mut client = cluster.client().await;
    // Ends at least 6 s after the stop began minus the little it ran before.
    let running = org_turn("o1", "a1", "c1", json!({"action": "sleep", "ms": 7000}));
    client.publish(&running).await;
    let dep = deployment_of(&running);
    wait_until(T, "the first turn runs", || cluster.worker_pid(&dep).is_some()).await;
    let waiting = org_turn("o2", "a1", "c2", json!({}));
    client.publish(&waiting).await;
    cluster.start_daemon(&[]).await;

    let stopping = std::time::Instant::now();
    cluster.daemons[0].signal(libc::SIGTERM);
    client.wait_for(&[mid(&waiting)], T).await;
    let took = stopping.elapsed();
    eprintln!("waiting turn answered {took:?} after its daemon was told to stop");
    assert!(took < Duration::from_secs(5), "not left to adoption (60 s): {took:?}");
    assert!(client.event(&mid(&running)).is_none(), "the running turn was still running");
    client.wait_for(&[mid(&running)], T).await;
    client.assert_exactly_once_and_nothing_else(&[mid(&running), mid(&waiting)]);
    for t in [&running, &waiting] {
        let e = client.event(&mid(t)).expect("event");
        assert_eq!(e.kind(), "reply", "{e:?}");
    }
}

/// A killed daemon's cluster-wide slots count only while its heartbeat is fresh (three sweeps,
/// at least 15 s: 15 s here): the organization's next turn waits that long, then runs on the
/// surviving daemon, instead of waiting forever for a slot nobody frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_daemons_organization_slots_stop_counting_once_it_is_silent() {
    let mut cluster = Cluster::new().await;
    let cap = [("TURND_WORKER__MAX_WORKERS_PER_ORG_CLUSTER", "1")];
    let d0 = cluster.start_daemon(&cap).await;
    let mut client = cluster.client().await;
    let hang = org_turn("o1", "a1", "c1", json!({"action": "hang"}));
    client.publish(&hang).await;
    let dep = deployment_of(&hang);
    wait_until(T, "the first turn runs", || cluster.worker_pid(&dep).is_some()).await;
    cluster.start_daemon(&cap).await;
    cluster.daemons[d0].kill();
    let killed = std::time::Instant::now();

    let next = org_turn("o1", "a1", "c2", json!({}));
    client.publish(&next).await;
    client.wait_for(&[mid(&next)], Duration::from_secs(40)).await;
    let took = killed.elapsed();
    eprintln!("next turn of the organization answered {took:?} after its slot holder was killed");
    assert_eq!(client.event(&mid(&next)).expect("event").kind(), "reply");
    assert!(took < Duration::from_secs(30), "{took:?}");
    // Until then the silent daemon may still be alive: its slot counted, the cap held.
    assert!(took > Duration::from_secs(10), "the cap of 1 held for {took:?} only");
    client.wait_for(&[mid(&hang)], T).await;
    client.assert_exactly_once_and_nothing_else(&[mid(&hang), mid(&next)]);
}
