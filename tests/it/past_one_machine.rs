//! Past one machine (issue 19): a three-node RabbitMQ cluster (`scripts/rabbit-cluster.sh`)
//! and a PostgreSQL primary with a streaming standby (`scripts/pg-pair.sh`), under load.
//!
//! - a node that a daemon is connected to stops; then a node that leads the inbox stops;
//! - the primary fails over to a synchronous standby (the daemons reach it through a proxy
//!   that moves, as a Service or a virtual IP would); then to an asynchronous one, where the
//!   loss window is measured, not asserted away.
//!
//! Each test brings its services up and tears them down (nothing is skipped: the scripts
//! install what is missing). The figures are printed (`--nocapture`) and quoted in README
//! "Running past one machine". The tests use different services and may run together; the
//! asynchronous standby's measurement is `#[ignore]`d (run it with `-- --ignored`).

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use serde_json::{Value, json};
use turnd_harness::*;

/// Publish → terminal event, for every turn published around a RabbitMQ node stop: the most a
/// producer waited. Measured 0.15–1.17 s (README); the bound leaves room for a loaded machine.
const BROKER_BOUND: Duration = Duration::from_secs(10);
/// The same around a PostgreSQL failover (stop + promote + the daemons' reconnection):
/// measured 1.67–3.02 s.
const FAILOVER_BOUND: Duration = Duration::from_secs(15);

fn script(name: &str, args: &[&str]) -> String {
    let path = format!("{}/scripts/{name}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(&path).args(args).output().unwrap_or_else(|e| panic!("run {path}: {e}"));
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{path} {args:?} failed ({}): {text}", out.status);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Brings a service script's topology up, and down again however the test ends.
struct Services(&'static str);

impl Services {
    fn up(name: &'static str, args: &[&str]) -> Services {
        let _ = Command::new(format!("{}/scripts/{name}", env!("CARGO_MANIFEST_DIR")))
            .arg("down")
            .output();
        let guard = Services(name);
        script(name, args);
        guard
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        if std::env::var_os("TURND_TEST_KEEP").is_none() {
            let _ = Command::new(format!("{}/scripts/{}", env!("CARGO_MANIFEST_DIR"), self.0))
                .arg("down")
                .status();
        }
    }
}

fn node_url(n: u16) -> String {
    format!("amqp://guest:guest@127.0.0.1:{}/%2f", 5680 + n)
}

fn urls(order: &[u16]) -> String {
    order.iter().map(|n| node_url(*n)).collect::<Vec<_>>().join(",")
}

/// Which node leads each of this prefix's quorum queues, and each queue's members.
fn quorum_queues(prefix: &str) -> Vec<(String, String, usize)> {
    let out = Command::new("rabbitmqctl")
        .args([
            "-q",
            "-n",
            "turnd-r2@localhost",
            "list_queues",
            "name",
            "type",
            "leader",
            "members",
        ])
        .args(["--formatter", "json"])
        .output()
        .expect("rabbitmqctl list_queues");
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    rows.into_iter()
        .filter(|r| r["name"].as_str().is_some_and(|n| n.starts_with(&format!("{prefix}."))))
        .filter(|r| r["type"] == "quorum")
        .map(|r| {
            (
                r["name"].as_str().unwrap_or("").to_owned(),
                r["leader"].as_str().unwrap_or("").to_owned(),
                r["members"].as_array().map_or(0, Vec::len),
            )
        })
        .collect()
}

fn node_number(node: &str) -> u16 {
    node.strip_prefix("turnd-r")
        .and_then(|r| r.split('@').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A producer at a steady rate that republishes (same messageId) what the broker nacks or
/// fails to confirm, as a producer with publisher confirms does; and the arrival time of each
/// turn's first terminal event.
struct Load {
    client: Client,
    published: Vec<(String, Instant)>,
    arrived: HashMap<String, Instant>,
    seen: usize,
    republished: usize,
}

impl Load {
    fn new(client: Client) -> Load {
        Load { client, published: Vec::new(), arrived: HashMap::new(), seen: 0, republished: 0 }
    }

    async fn publish_one(&mut self, turn: &Value) {
        let body = turn.to_string();
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type(ShortString::from("application/json"));
            let sent = self
                .client
                .publisher
                .basic_publish(
                    format!("{}.turns", self.client.prefix).as_str().into(),
                    "turn.test".into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    props,
                )
                .await;
            let confirmed = match sent {
                Ok(confirm) => tokio::time::timeout(Duration::from_secs(10), confirm)
                    .await
                    .is_ok_and(|c| c.is_ok_and(|c| c.is_ack())),
                Err(_) => false,
            };
            if confirmed {
                return;
            }
            assert!(Instant::now() < until, "a turn was not confirmed within 60 s");
            self.republished += 1;
            self.collect(Duration::from_millis(100)).await;
        }
    }

    async fn collect(&mut self, d: Duration) {
        self.client.drain_for(d).await;
        let now = Instant::now();
        for e in &self.client.events[self.seen..] {
            self.arrived.entry(e.message_id().to_owned()).or_insert(now);
        }
        self.seen = self.client.events.len();
    }

    /// Publishes `n` turns over `conversations`, one every `every`, while `during` runs (a
    /// fault injected in the middle); returns when both are done.
    async fn run<F: std::future::Future<Output = Instant>>(
        &mut self,
        tag: &str,
        n: usize,
        conversations: usize,
        every: Duration,
        during: F,
    ) -> Instant {
        let mut during = std::pin::pin!(during);
        let mut fault_at = None;
        for i in 0..n {
            let t = turn(
                "ha",
                &format!("{tag}-c{}", i % conversations),
                json!({"action": "sleep", "ms": 20}),
            );
            let started = Instant::now();
            self.publish_one(&t).await;
            self.published.push((mid(&t), started));
            // The fault runs beside the load: poll it between publishes.
            if fault_at.is_none()
                && let Ok(at) = tokio::time::timeout(Duration::from_millis(1), &mut during).await
            {
                fault_at = Some(at);
            }
            self.collect(every).await;
        }
        match fault_at {
            Some(at) => at,
            None => during.await,
        }
    }

    async fn settle(&mut self, within: Duration) {
        let ids: Vec<String> = self.published.iter().map(|(id, _)| id.clone()).collect();
        self.client.wait_for(&ids, within).await;
        self.collect(Duration::from_millis(500)).await;
    }

    /// Publish → first event of every turn published in [from, to].
    fn latencies(&self, from: Instant, to: Instant) -> Vec<Duration> {
        let mut v: Vec<Duration> = self
            .published
            .iter()
            .filter(|(_, at)| *at >= from && *at <= to)
            .filter_map(|(id, at)| {
                self.arrived.get(id).map(|got| got.saturating_duration_since(*at))
            })
            .collect();
        v.sort();
        v
    }

    /// Turns with no event, and turns with more than one (after de-duplicating on message_id).
    fn lost_and_doubled(&self) -> (Vec<String>, Vec<String>) {
        let by = self.client.by_message();
        let mut lost = Vec::new();
        let mut doubled = Vec::new();
        for (id, _) in &self.published {
            match by.get(id).map_or(0, Vec::len) {
                0 => lost.push(id.clone()),
                1 => {}
                _ => doubled.push(id.clone()),
            }
        }
        (lost, doubled)
    }
}

fn pct(v: &[Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn summary(v: &[Duration]) -> String {
    format!(
        "{} turns, publish→event p50 {:?}, p99 {:?}, max {:?}",
        v.len(),
        pct(v, 0.5),
        pct(v, 0.99),
        v.last().copied().unwrap_or_default()
    )
}

/// Every turn exactly one event; nothing pending or unpublished; no two live workers.
async fn assert_exactly_once(cluster: &Cluster, load: &Load) {
    let (lost, doubled) = load.lost_and_doubled();
    assert!(lost.is_empty(), "turns without a terminal event: {lost:?}");
    assert!(doubled.is_empty(), "turns with two terminal events: {doubled:?}");
    wait_for_value(Duration::from_secs(30), "no pending turn, no unpublished event", || async {
        (cluster.pending().await == 0 && cluster.unpublished().await == 0).then_some(())
    })
    .await;
    assert_eq!(cluster.violations(), "", "two live workers of one deployment");
}

/// Runs `scripts/rabbit-cluster.sh stop N` beside the load; resolves to when it began.
async fn stop_node(n: u16, after: Duration) -> Instant {
    tokio::time::sleep(after).await;
    let at = Instant::now();
    tokio::task::spawn_blocking(move || script("rabbit-cluster.sh", &["stop", &n.to_string()]))
        .await
        .expect("stop node");
    eprintln!("node {n} stopped {:?} after the stop began", at.elapsed());
    at
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_cluster_loses_a_node_under_load_and_nothing_is_lost() {
    let _services = Services::up("rabbit-cluster.sh", &["up"]);

    // Phase 1: stop the node the active intake's daemon is connected to. d0 lists node 1
    // first and starts first (so it is the single active consumer); d1 prefers node 2; the
    // producer and reply consumer use node 3.
    {
        let mut cluster = Cluster::on(PG_ADMIN, &urls(&[1, 2, 3])).await;
        let config = config_for(&cluster.prefix);
        let client = Client::on(&node_url(3), &cluster.prefix, &config).await;
        let queues = quorum_queues(&cluster.prefix);
        eprintln!("quorum queues (name, leader, members): {queues:?}");
        assert!(
            queues.iter().any(|(n, _, m)| n.ends_with(".inbox") && *m == 3),
            "the inbox is a quorum queue on all three nodes: {queues:?}"
        );
        for q in ["owners", "retry", "parked"] {
            assert!(
                queues.iter().any(|(n, _, m)| *n == format!("{}.{q}", cluster.prefix) && *m == 3),
                "{q} is replicated on all three nodes: {queues:?}"
            );
        }
        cluster.start_daemon(&[]).await;
        cluster.start_daemon(&[("TURND_AMQP__URL", &urls(&[2, 3, 1]))]).await;
        let mut load = Load::new(client);
        let began = Instant::now();
        let fault = load
            .run("ns", 400, 20, Duration::from_millis(25), stop_node(1, Duration::from_secs(4)))
            .await;
        load.settle(Duration::from_secs(60)).await;
        let around =
            load.latencies(fault - Duration::from_secs(1), fault + Duration::from_secs(10));
        eprintln!(
            "node stop (the active intake's node): {}; whole run {}; republished {}",
            summary(&around),
            summary(&load.latencies(began, Instant::now())),
            load.republished
        );
        assert_exactly_once(&cluster, &load).await;
        let max = around.last().copied().unwrap_or_default();
        assert!(max <= BROKER_BOUND, "intake resumed after {max:?}, bound {BROKER_BOUND:?}");
        let log = strip_ansi(&cluster.daemon_log(0));
        assert!(
            log.lines().any(|l| l.contains("connected to RabbitMQ") && !l.contains(":5681")),
            "d0 moved on to another node:\n{log}"
        );
        // Every daemon ends cleanly.
        for d in &mut cluster.daemons {
            let status = d.terminate(Duration::from_secs(20)).await.expect("exits");
            assert!(status.success(), "{status:?}");
        }
    }
    script("rabbit-cluster.sh", &["start", "1"]);

    // Phase 2: stop the node that leads the inbox, with every daemon and the client on the
    // other two, so the fault is the leader's alone.
    {
        let placeholder = urls(&[1, 2, 3]);
        let mut cluster = Cluster::on(PG_ADMIN, &placeholder).await;
        let config = config_for(&cluster.prefix);
        // Declare the topology (the inbox gets its leader), then find it.
        let probe = Client::on(&node_url(1), &cluster.prefix, &config).await;
        drop(probe);
        let queues = quorum_queues(&cluster.prefix);
        let inbox = format!("{}.inbox", cluster.prefix);
        let leader = queues
            .iter()
            .find(|(n, _, _)| *n == inbox)
            .map(|(_, l, _)| node_number(l))
            .filter(|n| *n > 0)
            .unwrap_or_else(|| panic!("no leader for {inbox}: {queues:?}"));
        let others: Vec<u16> = [1, 2, 3].into_iter().filter(|n| *n != leader).collect();
        eprintln!("inbox leader: node {leader}; daemons and client on {others:?}");
        cluster.set("TURND_AMQP__URL", &urls(&others));
        let client = Client::on(&node_url(others[1]), &cluster.prefix, &config).await;
        cluster.start_daemon(&[]).await;
        cluster.start_daemon(&[("TURND_AMQP__URL", &urls(&[others[1], others[0]]))]).await;
        let mut load = Load::new(client);
        let fault = load
            .run(
                "ls",
                400,
                20,
                Duration::from_millis(25),
                stop_node(leader, Duration::from_secs(4)),
            )
            .await;
        load.settle(Duration::from_secs(60)).await;
        let around =
            load.latencies(fault - Duration::from_secs(1), fault + Duration::from_secs(10));
        let after = quorum_queues(&cluster.prefix);
        eprintln!(
            "leader stop (node {leader}): {}; republished {}; leaders after: {after:?}",
            summary(&around),
            load.republished
        );
        assert_exactly_once(&cluster, &load).await;
        let max = around.last().copied().unwrap_or_default();
        assert!(max <= BROKER_BOUND, "intake resumed after {max:?}, bound {BROKER_BOUND:?}");
        for d in &mut cluster.daemons {
            let status = d.terminate(Duration::from_secs(20)).await.expect("exits");
            assert!(status.success(), "{status:?}");
        }
    }
}

/// The largest epoch recorded for any deployment.
async fn max_epoch(cluster: &Cluster) -> i64 {
    sqlx::query_scalar("SELECT coalesce(max(epoch), 0) FROM turnd_deployments")
        .fetch_one(&cluster.pool)
        .await
        .expect("max epoch")
}

/// Advisory locks held by turnd lock sessions on the server `cluster.pool` reaches.
async fn advisory_locks(cluster: &Cluster) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
         WHERE l.locktype = 'advisory' AND l.granted AND a.application_name LIKE 'turnd-lock:%'",
    )
    .fetch_one(&cluster.pool)
    .await
    .expect("count advisory locks")
}

/// What one failover under load leaves to check.
struct Failover {
    /// Keeps the moved route alive for the checks.
    _proxy: Proxy,
    cluster: Cluster,
    load: Load,
    at: Instant,
    /// The largest epoch before the failover.
    epoch_before: i64,
}

/// One failover under load: two daemons, 20 conversations owned, 300 turns at ~30/s, the
/// primary stopped (immediate) and the standby promoted 4 s in.
/// `stall_ms` > 0: replication stalls that long before the crash (`pg-pair.sh failover MS`).
async fn failover_under_load(mode: &str, tag: &str, stall_ms: u64) -> Failover {
    // The daemons and the test reach PostgreSQL through one proxy that moves to the promoted
    // standby: a Kubernetes Service, a virtual IP, or HAProxy/PgBouncer in front of the pair.
    let proxy = Proxy::start(5441).await;
    let admin = format!("postgres://postgres@127.0.0.1:{}/postgres", proxy.port);
    let mut cluster = Cluster::on(&admin, AMQP).await;
    cluster.start_daemon(&[]).await;
    cluster.start_daemon(&[]).await;
    let client = cluster.client().await;
    let mut load = Load::new(client);
    // Warm up: every conversation owned before the fault.
    for c in 0..20 {
        let t = turn("ha", &format!("{tag}-c{c}"), json!({}));
        load.publish_one(&t).await;
        load.published.push((mid(&t), Instant::now()));
    }
    load.settle(Duration::from_secs(30)).await;
    let before = max_epoch(&cluster).await;
    let locks_before = advisory_locks(&cluster).await;
    let fault = async {
        // The replication lag under this load, sampled until the failover: the window an
        // asynchronous standby may lose.
        let mut worst = (0i64, Duration::ZERO);
        let sampling = Instant::now();
        while sampling.elapsed() < Duration::from_secs(4) {
            if let Some((bytes, lag)) = replication_lag(&cluster).await {
                worst = (worst.0.max(bytes), worst.1.max(lag));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!(
            "{mode}: replication lag under load, worst of ~70 samples: {} WAL bytes not flushed on the standby, flush_lag {:?}",
            worst.0, worst.1
        );
        let at = Instant::now();
        let stall = stall_ms.to_string();
        let port: u16 =
            tokio::task::spawn_blocking(move || script("pg-pair.sh", &["failover", &stall]))
                .await
                .expect("failover")
                .parse()
                .expect("the promoted port");
        proxy.retarget(port);
        eprintln!("{mode}: primary stopped and standby promoted in {:?}", at.elapsed());
        at
    };
    // The test's own pool goes through the proxy too: new connections reach the new primary.
    let at = load.run(tag, 300, 20, Duration::from_millis(25), fault).await;
    eprintln!("{mode}: advisory locks held before the failover: {locks_before}");
    Failover { _proxy: proxy, cluster, load, at, epoch_before: before }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_failover_to_a_synchronous_standby_keeps_exactly_once() {
    let _services = Services::up("pg-pair.sh", &["up", "sync"]);
    // A name that still points at the standby is refused with the reason, not written to.
    let out = Command::new(turnd_bin())
        .args(["status", "--config", "/dev/null"])
        .env("TURND_DATABASE__URL", "postgres://postgres@127.0.0.1:5442/postgres")
        .output()
        .expect("turnd status");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "turnd status on the standby succeeded: {err}");
    assert!(err.contains("127.0.0.1:5442") && err.contains("standby (in recovery)"), "{err}");
    let Failover { _proxy, cluster, mut load, at: fault, epoch_before: before } =
        failover_under_load("sync", "fs", 0).await;
    load.settle(Duration::from_secs(90)).await;
    let around = load.latencies(fault - Duration::from_secs(1), fault + Duration::from_secs(10));
    eprintln!("pg failover (sync standby): {}; republished {}", summary(&around), load.republished);
    assert_exactly_once(&cluster, &load).await;
    let after = max_epoch(&cluster).await;
    assert!(after > before, "epochs keep growing on the promoted server: {before} → {after}");
    let locks =
        wait_for_value(Duration::from_secs(30), "locks taken again on the new primary", || async {
            let n = advisory_locks(&cluster).await;
            (n > 0).then_some(n)
        })
        .await;
    eprintln!(
        "pg failover (sync): max epoch {before} → {after}; advisory locks on the new primary {locks}"
    );
    let max = around.last().copied().unwrap_or_default();
    assert!(
        max <= FAILOVER_BOUND,
        "turns answered {max:?} after the failover, bound {FAILOVER_BOUND:?}"
    );
}

/// The primary's replication lag right now: (WAL bytes the standby has not flushed, flush_lag).
async fn replication_lag(cluster: &Cluster) -> Option<(i64, Duration)> {
    let row: Option<(Option<i64>, Option<f64>)> = sqlx::query_as(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn)::bigint,
                extract(epoch FROM flush_lag)::float8
         FROM pg_stat_replication LIMIT 1",
    )
    .fetch_optional(&cluster.pool)
    .await
    .ok()?;
    let (bytes, lag) = row?;
    Some((bytes.unwrap_or(0), Duration::from_secs_f64(lag.unwrap_or(0.0).max(0.0))))
}

/// With an asynchronous standby a failover may lose the last commits: the loss window is
/// measured (rounds of the same run), not asserted away. Asserted: the promoted database is
/// consistent with itself (every turn it knows is answered and published) and no two workers
/// of one deployment ever ran at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement (~3 min, two pairs): cargo test --test it -- past_one_machine --ignored --nocapture"]
async fn postgres_failover_to_an_asynchronous_standby_has_a_measured_loss_window() {
    // One failover as a crash leaves it, one after replication stalled for a second (a
    // congested or partitioned link between the zones, then the crash).
    let stalls: Vec<u64> = std::env::var("TURND_ASYNC_STALLS")
        .unwrap_or_else(|_| "0,1000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let rounds = stalls.len();
    let mut totals = (0usize, 0usize, 0usize);
    for (round, stall_ms) in stalls.into_iter().enumerate() {
        let _services = Services::up("pg-pair.sh", &["up", "async"]);
        // Sample the lag while the load runs, until the primary is gone.
        let Failover { _proxy, cluster, mut load, at, epoch_before } =
            failover_under_load("async", &format!("fa{round}"), stall_ms).await;
        let until = Instant::now() + Duration::from_secs(60);
        let ids: Vec<String> = load.published.iter().map(|(id, _)| id.clone()).collect();
        while Instant::now() < until && !ids.iter().all(|id| load.arrived.contains_key(id)) {
            load.collect(Duration::from_millis(200)).await;
        }
        load.collect(Duration::from_secs(2)).await;
        let (lost, doubled) = load.lost_and_doubled();
        let around = load.latencies(at - Duration::from_secs(1), at + Duration::from_secs(10));
        let epoch_after = max_epoch(&cluster).await;
        eprintln!(
            "pg failover (async) round {round}, replication stalled {stall_ms} ms before the crash: {} turns, lost {} {lost:?}, answered twice {} {doubled:?}; {}; max epoch {epoch_before} → {epoch_after}",
            load.published.len(),
            lost.len(),
            doubled.len(),
            summary(&around)
        );
        totals = (totals.0 + load.published.len(), totals.1 + lost.len(), totals.2 + doubled.len());
        wait_for_value(
            Duration::from_secs(30),
            "no pending turn, no unpublished event",
            || async {
                (cluster.pending().await == 0 && cluster.unpublished().await == 0).then_some(())
            },
        )
        .await;
        assert_eq!(cluster.violations(), "", "two live workers of one deployment");
    }
    eprintln!(
        "pg failover (async), {rounds} rounds: {} turns, {} lost, {} answered twice",
        totals.0, totals.1, totals.2
    );
}

/// `amqp.url` lists nodes: a daemon skips one that refuses and one that accepts TCP but never
/// answers (5 s), and serves from the next. On the shared broker; no cluster needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_skips_broker_urls_that_do_not_answer() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a silent port");
    let silent_port = silent.local_addr().expect("addr").port();
    let refused_port = free_port();
    let list = format!(
        "amqp://guest:guest@127.0.0.1:{refused_port}/%2f,amqp://guest:guest@127.0.0.1:{silent_port}/%2f,{AMQP}"
    );
    let mut cluster = Cluster::new().await;
    let started = Instant::now();
    cluster.start_daemon(&[("TURND_AMQP__URL", &list)]).await;
    let took = started.elapsed();
    let mut client = cluster.client().await;
    let event = client.ask(&turn("ha", "skip", json!({})), Duration::from_secs(20)).await;
    assert_eq!(event.kind(), "reply");
    let log = strip_ansi(&cluster.daemon_log(0));
    let skipped: Vec<&str> =
        log.lines().filter(|l| l.contains("RabbitMQ node unavailable")).collect();
    assert!(
        skipped.iter().any(|l| l.contains(&format!(":{refused_port}")))
            && skipped.iter().any(
                |l| l.contains(&format!(":{silent_port}")) && l.contains("no answer within 5s")
            ),
        "both skipped nodes named: {skipped:#?}"
    );
    assert!(took >= Duration::from_secs(5), "the silent node was waited for 5 s: {took:?}");
    drop(silent);
}
