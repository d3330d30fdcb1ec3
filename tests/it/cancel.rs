//! Cancellation (issue 20 item 2): a queued turn ends with one TURN_CANCELLED; a running one's
//! worker gets the cancel line and either answers first or the turn ends TURN_CANCELLED at
//! the grace; the owner may be another daemon; a cancel racing the worker's reply still ends
//! the turn exactly once. Also the audit log it writes (issue 20 item 5).

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use turnd::store::{Actor, CancelResult};
use turnd_harness::*;

const T: Duration = Duration::from_secs(30);

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn wait_running(cluster: &Cluster, turn: &Value) {
    let (d, m) = (deployment_of(turn), mid(turn));
    wait_for_async(T, "the turn to run", || async {
        cluster.turn_state(&d, &m).await.as_deref() == Some("running")
    })
    .await;
}

/// Publishes `turn`, cancels it with the CLI once it runs, and waits for its event; returns
/// the time from the cancel to the event.
async fn cancel_once_running(cluster: &Cluster, client: &mut Client, turn: &Value) -> Duration {
    client.publish(turn).await;
    wait_running(cluster, turn).await;
    let asked = Instant::now();
    let out = cluster.cli(&["cancel", &mid(turn)]).await;
    assert!(stdout(&out).contains("cancelling"), "{}", stdout(&out));
    client.wait_for(&[mid(turn)], T).await;
    asked.elapsed()
}

/// (who, via, action, target, result), oldest first.
async fn audit(cluster: &Cluster) -> Vec<(String, String, String, String, String)> {
    sqlx::query_as("SELECT who, via, action, target, result FROM turnd_audit ORDER BY id")
        .fetch_all(&cluster.pool)
        .await
        .expect("read audit")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_turn_ends_with_one_turn_cancelled_and_never_reaches_its_worker() {
    let mut cluster = Cluster::new().await;
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;
    let running = turn("cq", "c1", json!({"action": "sleep", "ms": 1500}));
    let queued = turn("cq", "c1", json!({"text": "never"}));
    client.publish(&running).await;
    client.publish(&queued).await;
    wait_running(&cluster, &running).await;
    let out = cluster.cli(&["cancel", &mid(&queued)]).await;
    assert!(out.status.success(), "{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    assert!(stdout(&out).contains("cancelled (was queued"), "{}", stdout(&out));

    client.wait_for(&[mid(&queued), mid(&running)], T).await;
    let by = client.by_message();
    assert_eq!(by[&mid(&queued)].len(), 1);
    assert_eq!(by[&mid(&queued)][0].code(), "TURN_CANCELLED");
    assert_eq!(by[&mid(&running)][0].kind(), "reply", "the running turn is not touched");
    let log = cluster.worker_log(&deployment_of(&queued));
    assert!(
        !log.iter().any(|l| l[0] == "turn" && l.get(3) == Some(&mid(&queued))),
        "a cancelled queued turn never reaches the worker: {log:?}"
    );
    // A second cancel is a clear answer and changes nothing.
    let again = cluster.cli(&["cancel", &mid(&queued)]).await;
    assert_eq!(again.status.code(), Some(1));
    assert!(
        stdout(&again).contains("already answered") && stdout(&again).contains("TURN_CANCELLED")
    );
    let listed = cluster.cli(&["audit", "--json", "--action", "cancel"]).await;
    let listed: Value = serde_json::from_slice(&listed.stdout).expect("audit --json");
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
    assert_eq!(listed[0]["result"], "already_done", "newest first");
    let rows = audit(&cluster).await;
    let target = format!("turn:{}/{}", deployment_of(&queued), mid(&queued));
    assert_eq!(
        rows,
        vec![
            ("tester".into(), "cli".into(), "cancel".into(), target.clone(), "cancelled".into()),
            ("tester".into(), "cli".into(), "cancel".into(), target, "already_done".into()),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_turns_worker_gets_the_cancel_line_and_its_own_answer_wins() {
    let mut cluster = Cluster::new().await;
    cluster.set("TURND_TURN__CANCEL_GRACE", "4s");
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;
    let t = turn("cr", "c1", json!({"action": "wait_cancel", "code": "STOPPED_BY_USER"}));
    client.publish(&t).await;
    wait_running(&cluster, &t).await;
    let out = cluster.cli(&["cancel", &mid(&t), "--json"]).await;
    assert!(out.status.success(), "{}", stdout(&out));
    let v: Value = serde_json::from_slice(&out.stdout).expect("cancel --json");
    assert_eq!(v[0]["result"], "cancelling");
    assert_eq!(v[0]["owner"], "d0");
    client.wait_for(&[mid(&t)], T).await;
    let e = client.event(&mid(&t)).unwrap();
    assert_eq!(e.code(), "STOPPED_BY_USER", "the worker answered within the grace: {:?}", e.body);
    let log = cluster.worker_log(&deployment_of(&t));
    assert!(log.iter().any(|l| l[0] == "cancel" && l[2] == mid(&t)), "{log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_ignores_the_cancel_is_stopped_at_the_grace_and_the_turn_ends_cancelled() {
    let mut cluster = Cluster::new().await;
    cluster.set("TURND_TURN__CANCEL_GRACE", "1s");
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;
    // The CLI runs with another grace: the daemons' applies.
    cluster.set("TURND_TURN__CANCEL_GRACE", "60s");
    let t = turn("ci", "c1", json!({"action": "wait_cancel", "on_cancel": "ignore"}));
    // Heartbeat-free but well within turn.deadline (5 s): only the cancel can end it this soon.
    let took = cancel_once_running(&cluster, &mut client, &t).await;
    let e = client.event(&mid(&t)).unwrap().clone();
    assert_eq!(e.code(), "TURN_CANCELLED", "{:?}", e.body);
    assert!(
        e.body["error"]["message"].as_str().unwrap().contains("turn.cancel_grace"),
        "{:?}",
        e.body
    );
    // grace (1 s) + the sweep (300 ms) + slack for the CLI's own start.
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}\n{}",
        cluster.daemon_log(0)
    );
    // The worker that ignored it was stopped: the next turn gets a fresh one.
    let first_pid = cluster.worker_pid(&deployment_of(&t));
    let next = client.ask(&turn("ci", "c1", json!({})), T).await;
    assert_eq!(next.kind(), "reply");
    assert_ne!(next.body["payload"]["pid"].as_i64().map(|p| p as i32), first_pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_through_another_daemons_api_reaches_the_owner() {
    let mut cluster = Cluster::new().await;
    cluster.set("TURND_TURN__CANCEL_GRACE", "4s");
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;
    // The owner's first turn: its thread-queue consumer has not started yet, so the sweep
    // delivers the cancel; the second: the cancel doorbell does.
    let first = turn("co", "c1", json!({"action": "wait_cancel"}));
    let second = turn("co", "c1", json!({"action": "wait_cancel"}));
    client.publish(&first).await;
    wait_running(&cluster, &first).await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    cluster
        .start_daemon(&[
            ("TURND_HTTP__LISTEN", &listen),
            ("TURND_HTTP__ADMIN_TOKEN", "s3cret"),
            ("TURND_HTTP__ADMIN_TOKEN_NAME", "ops-team"),
        ])
        .await;
    let path = |t: &Value| format!("/api/v1/turns/{}/cancel", mid(t));
    let (status, _) = http_post(port, &path(&first), None).await.expect("API answers");
    assert_eq!(status, 403, "an action needs the admin token");
    let (status, body) = http_post(port, &path(&first), Some("s3cret")).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((v["result"].as_str(), v["owner"].as_str()), (Some("cancelling"), Some("d0")));
    client.wait_for(&[mid(&first)], T).await;
    assert_eq!(client.event(&mid(&first)).unwrap().code(), "CANCELLED_BY_WORKER");

    client.publish(&second).await;
    wait_running(&cluster, &second).await;
    let (status, body) = http_post(port, &path(&second), Some("s3cret")).await.unwrap();
    assert_eq!(status, 200, "{body}");
    client.wait_for(&[mid(&second)], T).await;
    assert_eq!(client.event(&mid(&second)).unwrap().code(), "CANCELLED_BY_WORKER");

    let (status, body) = http_get(port, "/api/v1/audit?action=cancel").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{body}");
    for r in rows {
        assert_eq!((r["who"].as_str(), r["via"].as_str()), (Some("ops-team"), Some("api")));
        assert_eq!(r["result"], "cancelling");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_that_dies_mid_cancel_still_ends_the_turn_cancelled_once() {
    let mut cluster = Cluster::new().await;
    cluster.set("TURND_TURN__CANCEL_GRACE", "2s");
    cluster.set("TURND_TURN__DEADLINE", "30s");
    cluster.start_daemon(&[]).await;
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;
    let t = turn("cd", "c1", json!({"action": "wait_cancel", "on_cancel": "ignore"}));
    client.publish(&t).await;
    wait_running(&cluster, &t).await;
    let owner: String =
        sqlx::query_scalar("SELECT owner FROM turnd_deployments WHERE deployment = $1")
            .bind(deployment_of(&t))
            .fetch_one(&cluster.pool)
            .await
            .unwrap();
    let asked = Instant::now();
    let out = cluster.cli(&["cancel", &mid(&t)]).await;
    assert!(stdout(&out).contains("cancelling"), "{}", stdout(&out));
    // The owner dies before the grace ends (its worker with it): the other daemon's sweep
    // ends the turn once the request is older than the grace, not at turn.deadline (30 s).
    let i = cluster.daemons.iter().position(|d| d.id == owner).expect("the owner is ours");
    cluster.daemons[i].kill();
    client.wait_for(&[mid(&t)], T).await;
    let took = asked.elapsed();
    let e = client.event(&mid(&t)).unwrap().clone();
    assert_eq!(e.code(), "TURN_CANCELLED", "{:?}", e.body);
    // grace (2 s) + sweep.interval (300 ms) + slack.
    assert!(took < Duration::from_secs(6), "{took:?}");
    wait_for_async(T, "the turn done", || async {
        cluster.turn_state(&deployment_of(&t), &mid(&t)).await.as_deref() == Some("done")
    })
    .await;
    client.drain_for(Duration::from_millis(500)).await;
    assert_eq!(client.by_message()[&mid(&t)].len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_unknown_and_ambiguous_turns_get_a_clear_answer_and_no_event() {
    let mut cluster = Cluster::new().await;
    let port = free_port();
    cluster.set("TURND_HTTP__LISTEN", &format!("127.0.0.1:{port}"));
    cluster.set("TURND_HTTP__ADMIN_TOKEN", "s3cret");
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;
    // One messageId in two conversations: two turns (CONTRACT §2).
    let a = turn("ca", "c1", json!({}));
    let mut b = turn("ca", "c2", json!({}));
    b["messageId"] = a["messageId"].clone();
    client.publish(&a).await;
    client.publish(&b).await;
    client
        .wait_until(T, "both answers", |ev| {
            ev.iter().filter(|e| e.message_id() == mid(&a)).count() >= 2
        })
        .await;

    let out = cluster.cli(&["cancel", &mid(&a)]).await;
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(
        text.contains("several deployments")
            && text.contains(&deployment_of(&a))
            && text.contains(&deployment_of(&b)),
        "{text}"
    );
    let out = cluster.cli(&["cancel", &mid(&a), "--deployment", &deployment_of(&b)]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("already answered") && stdout(&out).contains("(reply)"),
        "{}",
        stdout(&out)
    );
    let out = cluster.cli(&["cancel", "no-such-turn"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("no-such-turn: no such turn"), "{}", stdout(&out));

    let api = |m: &str| format!("/api/v1/turns/{m}/cancel");
    let (status, body) = http_post(port, &api(&mid(&a)), Some("s3cret")).await.unwrap();
    assert_eq!(status, 409, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["result"], "ambiguous");
    let (status, body) = http_post(port, &api("no%2Fsuch"), Some("s3cret")).await.unwrap();
    assert_eq!(status, 404, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["result"].as_str(), v["messageId"].as_str()),
        (Some("not_found"), Some("no/such"))
    );

    // Nothing was ended twice: one outbox row per turn, and nothing else on the wire.
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM turnd_outbox")
        .fetch_one(&cluster.pool)
        .await
        .unwrap();
    assert_eq!(events, 2);
    client.drain_for(Duration::from_millis(500)).await;
    assert_eq!(client.events.len(), 2, "{:?}", client.events);
    let results: Vec<String> = audit(&cluster).await.into_iter().map(|r| r.4).collect();
    assert_eq!(results, ["ambiguous", "already_done", "not_found", "ambiguous", "not_found"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_racing_replies_end_every_turn_exactly_once() {
    let mut cluster = Cluster::new().await;
    // No grace: a cancel ends a running turn as soon as its owner hears of it, so the worker's
    // reply and the cancel race for the one election.
    cluster.set("TURND_TURN__CANCEL_GRACE", "0s");
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;
    let env = vec![
        ("TURND_DATABASE__URL".to_owned(), cluster.db_url.clone()),
        ("TURND_AMQP__PREFIX".to_owned(), cluster.prefix.clone()),
        ("TURND_TURN__CANCEL_GRACE".to_owned(), "0s".to_owned()),
    ];
    let config = turnd::config::Config::load_from(Some(Path::new("/dev/null")), env).unwrap();
    let store = turnd::store::Store::connect(&config.database, "test").unwrap();
    let actor = Actor { who: "race".into(), via: "cli" };
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut outcomes: HashMap<String, CancelResult> = HashMap::new();
    let mut ids = Vec::new();
    for round in 0..4 {
        // 10 conversations × 5 turns: some queued, some running, some answered when the
        // cancels land, each turn sleeping 0–300 ms.
        let mut turns = Vec::new();
        for i in 0..50 {
            let ms = next(300);
            turns.push(turn(
                "race",
                &format!("r{round}c{}", i % 10),
                json!({"action": "sleep", "ms": ms}),
            ));
        }
        for t in &turns {
            client.publish(t).await;
        }
        for t in &turns {
            if next(3) == 0 {
                continue; // left to answer by itself
            }
            if next(4) == 0 {
                // Spreads the cancels over the turns' lives.
                tokio::time::sleep(Duration::from_millis(next(100))).await;
            }
            let reports = turnd::cancel::cancel(
                &config,
                &store,
                Some(&client.publisher),
                &[mid(t)],
                None,
                &actor,
            )
            .await
            .unwrap();
            outcomes.insert(mid(t), reports[0].result.clone());
        }
        ids.extend(turns.iter().map(mid));
    }
    client.wait_for(&ids, Duration::from_secs(60)).await;
    wait_for_async(T, "every turn done", || async { cluster.pending().await == 0 }).await;
    // Every turn is done, so no path can end one again: what was received is all there is.
    client.drain_for(Duration::from_millis(300)).await;
    let by = client.by_message();
    let mut tally: HashMap<(&str, String), usize> = HashMap::new();
    for id in &ids {
        let events = &by[id];
        assert_eq!(
            events.len(),
            1,
            "{id}: {:?}",
            events.iter().map(|e| &e.body).collect::<Vec<_>>()
        );
        let e = &events[0];
        let got = if e.kind() == "reply" { "reply".to_owned() } else { e.code().to_owned() };
        let asked = outcomes.get(id).map_or("none", |r| r.word());
        match asked {
            "cancelled" => assert_eq!(got, "TURN_CANCELLED", "{id}"),
            "already_done" | "not_found" | "none" => assert_eq!(got, "reply", "{id}"),
            "cancelling" => assert!(got == "reply" || got == "TURN_CANCELLED", "{id}: {got}"),
            other => panic!("{id}: unexpected cancel result {other}"),
        }
        *tally.entry((asked, got)).or_default() += 1;
    }
    eprintln!("cancel result → event: {tally:?}");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM turnd_outbox")
        .fetch_one(&cluster.pool)
        .await
        .unwrap();
    assert_eq!(rows as usize, ids.len());
    // The race was run: both a running turn's cancel and an already answered one were seen.
    assert!(tally.keys().any(|(a, _)| *a == "cancelling"), "{tally:?}");
    assert!(tally.keys().any(|(a, _)| *a == "cancelled"), "{tally:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_refuses_updates_and_deletes() {
    let cluster = Cluster::new().await;
    sqlx::query("INSERT INTO turnd_audit (who, via, action, target, result) VALUES ('a', 'cli', 'purge', 'parked:1', 'purged')")
        .execute(&cluster.pool)
        .await
        .unwrap();
    for sql in
        ["UPDATE turnd_audit SET who = 'b'", "DELETE FROM turnd_audit", "TRUNCATE turnd_audit"]
    {
        let e = sqlx::query(sql).execute(&cluster.pool).await.expect_err(sql);
        assert!(e.to_string().contains("append-only"), "{sql}: {e}");
    }
    assert_eq!(audit(&cluster).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_purge_by_filter_acts_only_on_the_confirmed_set_and_audits_each() {
    let mut cluster = Cluster::new().await;
    let port = free_port();
    cluster.set("TURND_HTTP__LISTEN", &format!("127.0.0.1:{port}"));
    cluster.set("TURND_HTTP__ADMIN_TOKEN", "s3cret");
    cluster.start_daemon(&[]).await;
    let client = cluster.client().await;
    for i in 0..3 {
        client.publish_raw(format!("not json {i}").as_bytes()).await;
    }
    wait_parked(&cluster, 3, T).await;
    let preview = "/api/v1/parked/bulk?action=purge&code=INVALID_TURN";
    let (status, body) = http_get(port, preview).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["count"], 3);
    let confirm = v["confirm"].as_str().unwrap().to_owned();
    let (status, _) = http_get(port, "/api/v1/parked/bulk?action=purge").await.unwrap();
    assert_eq!(status, 400, "a filter is required");

    // The set changes before the confirmation comes back: nothing is done, the new count is said.
    client.publish_raw(b"not json 3").await;
    wait_parked(&cluster, 4, T).await;
    let act = |c: &str| format!("{preview}&confirm={c}");
    let (status, body) = http_post(port, &act(&confirm), Some("s3cret")).await.unwrap();
    assert_eq!(status, 409, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["preview"]["count"], 4);
    assert_eq!(parked(&cluster).await.len(), 4);
    let confirm = v["preview"]["confirm"].as_str().unwrap().to_owned();
    let (status, body) = http_post(port, &act(&confirm), None).await.unwrap();
    assert_eq!(status, 403, "{body}");
    // As the console's script sends it.
    let auth = [("Authorization", "Bearer s3cret"), ("X-Turnd-Via", "console")];
    let r = http_request(port, "POST", &act(&confirm), &auth, b"").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(parked(&cluster).await.is_empty());
    let rows = audit(&cluster).await;
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert!(
        rows.iter()
            .all(|r| r.0 == "admin" && r.1 == "console" && r.2 == "purge" && r.4 == "purged"),
        "{rows:?}"
    );
    // The console shows them, and offers the cancel and bulk controls.
    let (status, page) = http_get(port, "/").await.unwrap();
    assert_eq!(status, 200);
    for needle in [
        "id=\"audit\"",
        "parked:",
        "purged",
        "data-action=\"cancel\"",
        "data-action=\"bulk-count\"",
    ] {
        assert!(page.contains(needle), "{needle} missing from the console");
    }
}

/// A daemon alone is the active intake: its owners listen on no thread queue (every turn comes
/// through that intake, in memory), so a cancel doorbell from another process finds none. A
/// turn running for a second makes its owner listen, and look once for a cancel: a cancel sent
/// at once reaches the worker about a second in — neither at the sweep (30 s here) nor at the
/// grace (20 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_from_the_cli_reaches_a_turn_on_the_active_intakes_daemon_without_the_sweep() {
    let mut cluster = Cluster::new().await;
    cluster.set("TURND_SWEEP__INTERVAL", "30s");
    cluster.set("TURND_TURN__CANCEL_GRACE", "20s");
    cluster.set("TURND_TURN__DEADLINE", "20s");
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;
    let t = turn("cl", "c1", json!({"action": "wait_cancel", "code": "STOPPED_BY_USER"}));
    let queue = format!("{}.thread.{}", cluster.prefix, deployment_of(&t));
    let took = cancel_once_running(&cluster, &mut client, &t).await;
    let e = client.event(&mid(&t)).unwrap();
    assert_eq!(e.code(), "STOPPED_BY_USER", "the worker answered the cancel: {:?}", e.body);
    assert!(took < Duration::from_secs(4), "{took:?}\n{}", cluster.daemon_log(0));
    assert!(queue_exists(&client.conn, &queue).await, "a turn that ran a second listens");
}
