//! Outages, not blips (issue 8): RabbitMQ stopped for 30 s, PostgreSQL unreachable. The
//! daemon stays up and says so on /readyz, reconnects with back-off, re-declares its
//! topology, pauses intake without acknowledging or counting anything, and loses nothing.
//!
//! These tests stop shared services (`rabbitmqctl stop_app`), so each runs alone
//! ([`Cluster::alone`]: no other test of the binary runs meanwhile). The
//! database outage goes through the harness's `Proxy`, so the shared PostgreSQL server keeps
//! serving every other test; the chaos run (`turnd-chaos`) restarts the real server.

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::{Value, json};
use turnd_harness::*;

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl").args(args).output().expect("run rabbitmqctl");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Starts RabbitMQ's app again however the test ends.
struct RabbitGuard;

impl Drop for RabbitGuard {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").arg("start_app").output();
        let _ = Command::new("rabbitmqctl").arg("await_startup").output();
    }
}

/// A durable queue bound to `<prefix>.replies`: terminal events published while the test's
/// own connection is gone wait in it.
async fn declare_reply_queue(prefix: &str) -> String {
    let conn = Connection::connect(AMQP, ConnectionProperties::default()).await.expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let q = format!("{prefix}.outage-replies");
    ch.queue_declare(q.as_str().into(), QueueDeclareOptions::durable(), FieldTable::default())
        .await
        .expect("declare");
    ch.queue_bind(
        q.as_str().into(),
        format!("{prefix}.replies").as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    let _ = conn.close(200, "declared".into()).await;
    q
}

/// Reads the reply queue until every id has an event; returns the events (de-duplicated on the
/// AMQP message_id) and how many distinct events each messageId got.
async fn collect_replies(queue: &str, ids: &[String], within: Duration) -> Vec<Value> {
    let conn = Connection::connect(AMQP, ConnectionProperties::default()).await.expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut seen = HashSet::new();
    let mut events: Vec<Value> = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    let done = |events: &[Value]| {
        ids.iter().all(|id| events.iter().any(|e| e["messageId"] == id.as_str()))
    };
    while !done(&events) {
        let d = tokio::time::timeout_at(deadline, consumer.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "timed out; have {:?}",
                    events.iter().map(|e| &e["messageId"]).collect::<Vec<_>>()
                )
            })
            .expect("consumer ended")
            .expect("delivery");
        let id = d.properties.message_id().as_ref().map(|s| s.to_string()).unwrap_or_default();
        if seen.insert(id) {
            events.push(serde_json::from_slice(&d.data).expect("JSON"));
        }
        d.ack(BasicAckOptions::default()).await.expect("ack");
    }
    // Anything more (a duplicate) would arrive right behind.
    while let Ok(Some(Ok(d))) =
        tokio::time::timeout(Duration::from_millis(700), consumer.next()).await
    {
        let id = d.properties.message_id().as_ref().map(|s| s.to_string()).unwrap_or_default();
        if seen.insert(id) {
            events.push(serde_json::from_slice(&d.data).expect("JSON"));
        }
        d.ack(BasicAckOptions::default()).await.expect("ack");
    }
    let _ = conn.close(200, "done".into()).await;
    events
}

/// Ready messages in a queue (passive declare).
async fn ready(queue: &str) -> u32 {
    let conn = Connection::connect(AMQP, ConnectionProperties::default()).await.expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let n = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .map(|q| q.message_count())
        .unwrap_or(0);
    let _ = conn.close(200, "counted".into()).await;
    n
}

async fn wait_readyz(port: u16, want: u16, within: Duration) {
    let start = Instant::now();
    loop {
        if http_status(port, "/readyz").await == Some(want) {
            return;
        }
        assert!(start.elapsed() < within, "/readyz did not turn {want} within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn scalar(cluster: &Cluster, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&cluster.pool)
        .await
        .expect(sql)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_stopped_for_30s_loses_nothing_and_the_daemon_reconnects() {
    let mut cluster = Cluster::alone().await;
    // After the cluster: dropped first, so RabbitMQ is back before the cluster's teardown and
    // before the other tests go on.
    let _guard = RabbitGuard;
    let port = free_port();
    cluster
        .start_daemon(&[
            ("TURND_HTTP__LISTEN", &format!("127.0.0.1:{port}")),
            ("TURND_TURN__DEADLINE", "60s"),
        ])
        .await;
    let pid = cluster.daemons[0].pid().unwrap() as i32;
    let queue = declare_reply_queue(&cluster.prefix).await;
    wait_readyz(port, 200, Duration::from_secs(10)).await;

    // Three conversations, three 4-second turns each: some running, the rest queued, when the
    // broker goes away; they finish during the outage.
    let mut ids = Vec::new();
    {
        let client = cluster.client().await;
        for c in 0..3 {
            for k in 0..3 {
                let t = turn(
                    "a1",
                    &format!("c{c}"),
                    json!({"action": "sleep", "ms": 4000, "text": format!("{c}.{k}")}),
                );
                ids.push(mid(&t));
                client.publish(&t).await;
            }
        }
        let _ = client.conn.close(200, "published".into()).await;
    }
    wait_for_async(T, "all nine turns accepted and three running", || async {
        scalar(&cluster, "SELECT count(*) FROM turnd_turns").await == 9
            && scalar(&cluster, "SELECT count(*) FROM turnd_turns WHERE state = 'running'").await
                == 3
    })
    .await;

    let log_before = cluster.daemon_log(0).len();
    rabbitmqctl(&["stop_app"]);
    let stopped = Instant::now();
    wait_readyz(port, 503, Duration::from_secs(10)).await;
    assert_eq!(http_status(port, "/healthz").await, Some(200), "alive while not ready");
    let body = http_get(port, "/readyz").await.unwrap().1;
    assert!(body.contains("broker down") && body.contains("database ok"), "{body}");
    while stopped.elapsed() < Duration::from_secs(30) {
        assert!(process_alive(pid), "the daemon rides the outage out");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The turns ran on: answered and committed while the broker was away, waiting to be
    // published.
    assert_eq!(cluster.pending().await, 0, "every accepted turn was answered during the outage");
    assert!(cluster.unpublished().await > 0, "their events wait in the outbox");

    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
    wait_readyz(port, 200, Duration::from_secs(30)).await;
    let events = collect_replies(&queue, &ids, T).await;
    for id in &ids {
        let mine: Vec<&Value> = events.iter().filter(|e| e["messageId"] == id.as_str()).collect();
        assert_eq!(mine.len(), 1, "exactly one event for {id}");
        assert_eq!(mine[0]["kind"], "reply", "{}", mine[0]);
    }

    let log = cluster.daemon_log(0)[log_before..].to_owned();
    assert!(log.contains("topology declared"), "topology declared again after the outage");
    let attempts: Vec<&str> =
        log.lines().filter(|l| l.contains("cannot connect to RabbitMQ")).collect();
    assert!(attempts.len() >= 3, "it kept trying: {attempts:#?}");
    assert!(
        attempts.len() <= 40,
        "with back-off, not a tight loop: {} attempts in 30 s",
        attempts.len()
    );
    let delays: Vec<String> = attempts
        .iter()
        .filter_map(|l| {
            Some(strip_ansi(l.split("retry_in").nth(1)?).trim_start_matches('=').to_owned())
        })
        .collect();
    assert!(delays.iter().collect::<HashSet<_>>().len() >= 3, "the delay grows: {delays:?}");
    assert!(delays.iter().any(|d| d == "10s"), "up to its cap: {delays:?}");

    // Intake consumes again: a turn published now is answered.
    let client = cluster.client().await;
    let after = turn("a1", "c0", json!({"text": "after"}));
    client.publish(&after).await;
    let _ = client.conn.close(200, "published".into()).await;
    let events = collect_replies(&queue, &[mid(&after)], T).await;
    assert_eq!(events.iter().filter(|e| e["messageId"] == mid(&after).as_str()).count(), 1);
    wait_for_async(T, "outbox drained", || async { cluster.unpublished().await == 0 }).await;
    assert!(process_alive(pid));
    assert_eq!(cluster.violations(), "");
}

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_postgresql_unreachable_intake_pauses_counts_nothing_and_resumes() {
    let mut cluster = Cluster::alone().await;
    let proxy = Proxy::start(5432).await;
    let url = format!("postgres://postgres@127.0.0.1:{}/{}", proxy.port, cluster.db_name);
    cluster.set("TURND_DATABASE__URL", &url);
    cluster.set("TURND_INTAKE__MAX_ATTEMPTS", "3");
    cluster.set("TURND_INTAKE__RETRY_DELAY", "1s");
    cluster.set("TURND_INTAKE__RETRY_MAX_DELAY", "1s");
    let port = free_port();
    cluster.start_daemon(&[("TURND_HTTP__LISTEN", &format!("127.0.0.1:{port}"))]).await;
    let pid = cluster.daemons[0].pid().unwrap() as i32;
    let config = turnd::config::Config::load_from(
        Some(std::path::Path::new("/dev/null")),
        cluster.env.clone(),
    )
    .expect("config");
    let mut client = Client::with_config(&cluster.prefix, &config).await;
    let first = turn("a1", "c1", json!({"text": "before"}));
    client.publish(&first).await;
    client.wait_for(&[mid(&first)], T).await;

    proxy.cut();
    wait_readyz(port, 503, Duration::from_secs(15)).await;
    let body = http_get(port, "/readyz").await.unwrap().1;
    assert!(body.contains("database down"), "{body}");
    // A normal turn, and a snapshot turn without its context (refused up to max_attempts
    // times, then parked): neither may be acknowledged nor refused while the database is away.
    let normal = turn("a1", "c1", json!({"text": "during"}));
    let refused = json!({"messageId": "no-context", "agentId": "a1", "conversationId": "c2", "runId": 5, "payload": {}});
    let p = &cluster.prefix;
    let queues: Vec<String> = [
        format!("{p}.retry"),
        format!("{p}.retry.1"),
        format!("{p}.retry.2"),
        format!("{p}.parked"),
    ]
    .into();
    // The refused turn alone first (a batch that would not touch the database by itself),
    // then the normal one.
    client.publish(&refused).await;
    let outage = Instant::now();
    let mut published_normal = false;
    while outage.elapsed() < Duration::from_secs(9) {
        if !published_normal && outage.elapsed() > Duration::from_secs(4) {
            client.publish(&normal).await;
            published_normal = true;
        }
        for q in &queues {
            assert_eq!(
                ready(q).await,
                0,
                "{q}: nothing refused or parked while PostgreSQL is away"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        ready(&format!("{p}.inbox")).await,
        2,
        "both turns wait in the inbox, not acknowledged"
    );
    client.drain_for(Duration::from_millis(100)).await;
    assert!(client.event(&mid(&normal)).is_none() && client.event("no-context").is_none());
    assert!(process_alive(pid), "the daemon rides the outage out");

    proxy.restore();
    let restored = Instant::now();
    client.wait_for(&[mid(&normal), "no-context".to_owned()], Duration::from_secs(60)).await;
    assert_eq!(client.event(&mid(&normal)).unwrap().kind(), "reply");
    let e = client.event("no-context").unwrap();
    assert_eq!(e.code(), "MISSING_CONTEXT", "{}", e.body);
    // Its refusals all came after the outage: two delays of 1 s before the third attempt parks it.
    let parked_after = client
        .events
        .iter()
        .position(|e| e.message_id() == "no-context")
        .map(|_| restored.elapsed())
        .unwrap();
    assert!(
        parked_after >= Duration::from_secs(2),
        "parked {parked_after:?} after the outage: attempts were counted during it"
    );
    let (attempts,): (i32,) =
        sqlx::query_as("SELECT attempts FROM turnd_parked WHERE message_id = 'no-context'")
            .fetch_one(&cluster.pool)
            .await
            .expect("one parked record");
    assert_eq!(attempts, 3);
    assert_eq!(ready(&format!("{p}.parked")).await, 1, "parked once, not once per redelivery");
    wait_readyz(port, 200, Duration::from_secs(15)).await;
    let after = turn("a1", "c1", json!({"text": "after"}));
    client.publish(&after).await;
    client.wait_for(&[mid(&after)], T).await;
    client.drain_for(Duration::from_millis(500)).await;
    let by = client.by_message();
    for id in [mid(&first), mid(&normal), "no-context".into(), mid(&after)] {
        assert_eq!(by.get(&id).map(Vec::len), Some(1), "exactly one event for {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_keep_commit_order_when_the_relays_broker_connection_is_cut_mid_stream() {
    let mut cluster = Cluster::alone().await;
    // The daemon reaches RabbitMQ through a proxy the test cuts: its connection (relay,
    // intake, everything) goes away while the worker keeps committing replies.
    let proxy = Proxy::start(5672).await;
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port);
    cluster.start_daemon(&[("TURND_AMQP__URL", &url)]).await;
    let queue = declare_reply_queue(&cluster.prefix).await;
    const N: usize = 14;
    let turns: Vec<Value> = (0..N)
        .map(|i| {
            let mut t = turn("a1", "ordered", json!({"action": "sleep", "ms": 250, "text": i}));
            t["messageId"] = json!(format!("ord-{i:02}"));
            t
        })
        .collect();
    let ids: Vec<String> = turns.iter().map(mid).collect();
    {
        let client = cluster.client().await;
        for t in &turns {
            client.publish(t).await;
        }
        let _ = client.conn.close(200, "published".into()).await;
    }
    wait_for_async(T, "all accepted, a few answered", || async {
        scalar(&cluster, "SELECT count(*) FROM turnd_turns").await == N as i64
            && scalar(&cluster, "SELECT count(*) FROM turnd_outbox").await >= 3
    })
    .await;
    proxy.cut();
    // Replies keep being committed with the broker out of reach; some of them were in the
    // relay's hands when the connection went.
    wait_for_async(T, "more replies committed during the cut", || async {
        scalar(&cluster, "SELECT count(*) FROM turnd_outbox WHERE published_at IS NULL").await >= 5
    })
    .await;
    proxy.restore();
    let events = collect_replies(&queue, &ids, T).await;
    let order: Vec<&str> = events.iter().filter_map(|e| e["messageId"].as_str()).collect();
    let committed: Vec<String> =
        sqlx::query_scalar("SELECT message_id FROM turnd_outbox ORDER BY id")
            .fetch_all(&cluster.pool)
            .await
            .unwrap();
    assert_eq!(committed, ids, "committed in turn order");
    assert_eq!(
        order,
        ids.iter().map(String::as_str).collect::<Vec<_>>(),
        "published in commit order"
    );
    wait_for_async(T, "outbox drained", || async { cluster.unpublished().await == 0 }).await;
}
