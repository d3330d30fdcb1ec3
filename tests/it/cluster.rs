//! Many pods (issue 4): several `turnd run` processes sharing one database and one vhost.
//! Missing-context refusal on every pod, one worker per deployment across the cluster while a
//! daemon is killed, lock-session loss, fencing of stale epochs, and adoption.
//!
//! The test that holds thousands of advisory locks lives in `tests/it/many_locks.rs`.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use turnd_harness::*;

use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

/// The lines of a daemon's log that mention `needle` and the turn `message_id`.
fn log_lines_about(log: &str, needle: &str, message_id: &str) -> usize {
    let field = format!("message_id={message_id}");
    strip_ansi(log)
        .lines()
        .filter(|l| l.contains(needle))
        .filter(|l| l.split_whitespace().any(|w| w == field))
        .count()
}

/// Files in the test worker's log directory (one per deployment that ever had a worker).
fn worker_log_files(cluster: &Cluster) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(cluster.path("log"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn header_str(h: &FieldTable, k: &str) -> String {
    match h.inner().get(k) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(AMQPValue::ShortString(s)) => s.as_str().to_owned(),
        other => panic!("header {k} is not a string: {other:?}"),
    }
}

fn header_int(h: &FieldTable, k: &str) -> i64 {
    match h.inner().get(k) {
        Some(AMQPValue::LongLongInt(n)) => *n,
        Some(AMQPValue::LongInt(n)) => i64::from(*n),
        Some(AMQPValue::ShortInt(n)) => i64::from(*n),
        Some(AMQPValue::LongUInt(n)) => i64::from(*n),
        other => panic!("header {k} is not an integer: {other:?}"),
    }
}

/// Reads `n` messages from `<prefix>.parked`: (body as JSON, headers).
async fn read_parked(client: &Client, n: usize) -> Vec<(Value, FieldTable)> {
    read_parked_queue(client, n, T)
        .await
        .into_iter()
        .map(|(body, headers)| {
            (serde_json::from_slice(&body).expect("parked body is the original JSON"), headers)
        })
        .collect()
}

// ---- 1. missing context across two pods ----------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pods_refuse_a_snapshot_turn_without_context_then_park_it_once() {
    const MAX_ATTEMPTS: u32 = 3;
    let mut cluster = Cluster::new().await;
    cluster.set("TURND_INTAKE__MAX_ATTEMPTS", &MAX_ATTEMPTS.to_string());
    cluster.start_daemon(&[]).await;
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;

    // The delays the daemons' delay queues use, from the same configuration.
    let config = turnd::config::Config::load_from(
        Some(Path::new("/dev/null")),
        cluster
            .env
            .iter()
            .filter(|(k, _)| k.starts_with("TURND_INTAKE__") || k == "TURND_AMQP__PREFIX")
            .cloned(),
    )
    .expect("config");
    assert_eq!(config.intake.max_attempts, MAX_ATTEMPTS);
    let delays: Duration = (1..MAX_ATTEMPTS).map(|k| turnd::broker::retry_delay(&config, k)).sum();
    assert_eq!(delays, Duration::from_millis(600), "200 ms then 400 ms");

    let no_org = json!({"messageId": "snap-no-org", "agentId": "a1", "conversationId": "c-snap",
                        "runId": 7, "payload": {"text": "no org"}});
    let no_conv = json!({"messageId": "snap-no-conv", "agentId": "a1", "organizationId": "org1",
                         "userId": "u-snap", "runId": 8, "payload": {"text": "no conversation"}});
    let refused = [(&no_org, "organizationId"), (&no_conv, "conversationId")];
    let refused_ids: Vec<String> = refused.iter().map(|(t, _)| mid(t)).collect();
    let refused_deps: Vec<String> = refused.iter().map(|(t, _)| deployment_of(t)).collect();

    let published = Instant::now();
    client.publish(&no_org).await;
    client.publish(&no_conv).await;
    // A normal turn right behind them is not held up by their refusals.
    let normal = turn("a1", "c-normal", json!({"text": "normal"}));
    let normal_at = Instant::now();
    client.publish(&normal).await;
    client.wait_for(&[mid(&normal)], T).await;
    let normal_latency = normal_at.elapsed();
    eprintln!("normal turn answered in {normal_latency:?} while the refused ones cycle");
    assert!(
        normal_latency < Duration::from_secs(3),
        "refused turns must not block others: {normal_latency:?}"
    );
    assert_eq!(client.event(&mid(&normal)).unwrap().kind(), "reply");

    // Each refused turn ends with one MISSING_CONTEXT error reply, no sooner than its delays.
    for id in &refused_ids {
        let id2 = id.clone();
        client
            .wait_until(T, &format!("error reply for {id}"), move |ev| {
                ev.iter().any(|e| e.message_id() == id2)
            })
            .await;
        let waited = published.elapsed();
        eprintln!("{id}: error reply after {waited:?} (delays sum to {delays:?})");
        assert!(
            waited >= delays,
            "{id} was parked after {waited:?}, before its delays ({delays:?}) passed: hot redelivery"
        );
    }
    let parked = read_parked(&client, refused.len()).await;
    for (turn, field) in refused {
        let id = mid(turn);
        let (_, headers) = parked
            .iter()
            .find(|(body, _)| body["messageId"] == id.as_str())
            .unwrap_or_else(|| panic!("{id} is in {}.parked", cluster.prefix));
        assert_eq!(header_str(headers, "x-turnd-code"), "MISSING_CONTEXT");
        let reason = header_str(headers, "x-turnd-reason");
        assert!(reason.contains(field), "the reason for {id} names {field}: {reason}");
        assert_eq!(
            header_int(headers, "x-turnd-attempt"),
            i64::from(MAX_ATTEMPTS),
            "{id} parked on the last attempt"
        );
        let e = client.event(&id).unwrap();
        assert_eq!(e.kind(), "error");
        assert_eq!(e.code(), "MISSING_CONTEXT");
        assert!(e.body["error"]["message"].as_str().unwrap_or("").contains(field));
    }
    // The body in the parked queue is the original turn.
    assert!(parked.iter().any(|(b, _)| *b == no_org));

    // Refused on every attempt by whichever pod got it, never armed, never run anywhere.
    let logs: Vec<String> = (0..cluster.daemons.len()).map(|i| cluster.daemon_log(i)).collect();
    for id in &refused_ids {
        let per_daemon: Vec<usize> =
            logs.iter().map(|l| log_lines_about(l, "refused: missing context", id)).collect();
        eprintln!("{id}: refusals per daemon {per_daemon:?}");
        assert_eq!(
            per_daemon.iter().sum::<usize>(),
            (MAX_ATTEMPTS - 1) as usize,
            "{id} refused once per attempt before the last, cluster-wide (no hot loop)"
        );
        let rows: Vec<(String, Option<i64>, bool)> = sqlx::query_as(
            "SELECT state, epoch, started_at IS NOT NULL FROM turnd_turns WHERE message_id = $1",
        )
        .bind(id)
        .fetch_all(&cluster.pool)
        .await
        .unwrap();
        assert_eq!(
            rows,
            vec![("done".to_owned(), None, false)],
            "{id} only has its tombstone: never armed, never claimed"
        );
        let recorded: (String, i32) =
            sqlx::query_as("SELECT code, attempts FROM turnd_parked WHERE message_id = $1")
                .bind(id)
                .fetch_one(&cluster.pool)
                .await
                .expect("parked turn recorded once");
        assert_eq!(recorded, ("MISSING_CONTEXT".to_owned(), MAX_ATTEMPTS as i32));
    }
    let files = worker_log_files(&cluster);
    for dep in &refused_deps {
        assert!(
            !files.contains(&format!("{dep}.log")),
            "no worker ever started for {dep}: {files:?}"
        );
        assert!(cluster.worker_log(dep).is_empty());
        let owned: i64 =
            sqlx::query_scalar("SELECT count(*) FROM turnd_deployments WHERE deployment = $1")
                .bind(dep)
                .fetch_one(&cluster.pool)
                .await
                .unwrap();
        assert_eq!(owned, 0, "nobody took {dep}");
    }
    assert_eq!(
        files,
        vec![format!("{}.log", deployment_of(&normal))],
        "the only worker is the normal turn's"
    );

    // Nothing more arrives for them: one error reply each.
    client.drain_for(Duration::from_millis(1500)).await;
    client.assert_exactly_once(&refused_ids);

    // The same turns without runId are legacy turns: they run (with new messageIds).
    let mut legacy = Vec::new();
    for (t, _) in refused {
        let mut t = t.clone();
        t.as_object_mut().unwrap().remove("runId");
        t["messageId"] = json!(format!("{}-legacy", mid(&t)));
        client.publish(&t).await;
        legacy.push(t);
    }
    let legacy_ids: Vec<String> = legacy.iter().map(mid).collect();
    client.wait_for(&legacy_ids, T).await;
    for t in &legacy {
        let e = client.event(&mid(t)).unwrap();
        assert_eq!(e.kind(), "reply", "{} without runId runs: {:?}", mid(t), e.body);
        assert_eq!(e.body["payload"]["text"], t["payload"]["text"]);
    }
    assert_eq!(cluster.pending().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_file_session_store_a_run_id_turn_without_context_runs() {
    let mut cluster = Cluster::new().await;
    cluster.set("TURND_INTAKE__MAX_ATTEMPTS", "3");
    cluster.set("TURND_SESSION__STORE", "file");
    cluster.start_daemon(&[]).await;
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;
    let no_org = json!({"messageId": "file-no-org", "agentId": "a1", "conversationId": "c-file",
                        "runId": 7, "payload": {"text": "no org"}});
    let no_conv = json!({"messageId": "file-no-conv", "agentId": "a1", "organizationId": "org1",
                         "userId": "u-file", "runId": 8, "payload": {"text": "no conversation"}});
    let started = Instant::now();
    client.publish(&no_org).await;
    client.publish(&no_conv).await;
    let ids = vec![mid(&no_org), mid(&no_conv)];
    client.wait_for(&ids, T).await;
    eprintln!("file store: answered in {:?}", started.elapsed());
    for id in &ids {
        let e = client.event(id).unwrap();
        assert_eq!(e.kind(), "reply", "{id} runs with session.store = file: {:?}", e.body);
    }
    for l in (0..2).map(|i| cluster.daemon_log(i)) {
        assert!(!l.contains("refused: missing context"), "nothing is refused with the file store");
    }
    client.drain_for(Duration::from_millis(500)).await;
    client.assert_exactly_once(&ids);
}

/// The owner's one statement per answered turn: the commit and the claim of the next turn, in
/// accept order; a retried commit ends its turn once and claims no turn twice; a stale epoch
/// claims nothing with its commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_claims_the_next_turn_in_the_same_statement() {
    use turnd::event::Outcome;
    use turnd::store::Store;
    use turnd::turn::{Epoch, parse};

    let cluster = Cluster::new().await;
    let store = Store::from_pool(cluster.pool.clone());
    let turns: Vec<_> = (1..=5)
        .map(|i| {
            let body = json!({"messageId": format!("n-{i}"), "agentId": "a1",
                "organizationId": "o1", "conversationId": "next"});
            parse(body.to_string().as_bytes(), 1 << 20).unwrap()
        })
        .collect();
    let dep = turns[0].deployment.clone();
    let refs: Vec<_> = turns[..4].iter().collect();
    let seqs = store.arm(&refs, Duration::from_secs(60)).await.unwrap();
    let reply = |text: &str| {
        Outcome::Reply(serde_json::value::RawValue::from_string(json!(text).to_string()).unwrap())
    };
    let (epoch, deadline) = (Epoch::new(1), Duration::from_secs(60));
    store.take_over(&dep, epoch, "d").await.unwrap();

    let c1 = store.claim_next(&dep, epoch, deadline).await.unwrap().expect("n-1");
    assert_eq!((c1.envelope.message_id.as_str(), Some(c1.seq)), ("n-1", seqs[0]));

    // Commit n-1 and claim n-2 at once; then n-3 with n-2's commit.
    let r1 = store
        .commit_and_claim(&dep, Some((&c1.envelope, &reply("one"))), epoch, Some(deadline))
        .await
        .unwrap();
    assert!(r1.committed.is_some() && r1.looked);
    let c2 = r1.claimed.expect("n-2 claimed with n-1's commit");
    assert_eq!((c2.envelope.message_id.as_str(), Some(c2.seq)), ("n-2", seqs[1]));
    let r2 = store
        .commit_and_claim(&dep, Some((&c2.envelope, &reply("two"))), epoch, Some(deadline))
        .await
        .unwrap();
    let c3 = r2.claimed.expect("n-3 claimed with n-2's commit");
    assert_eq!(c3.envelope.message_id.as_str(), "n-3");

    // The same commit again (a retry after a lost answer): the turn ended once, and n-3 (now
    // running) is not claimed again: a turn goes to a worker once.
    let retry = store
        .commit_and_claim(&dep, Some((&c2.envelope, &reply("two"))), epoch, Some(deadline))
        .await
        .unwrap();
    assert!(retry.committed.is_none(), "a turn ends once");
    let c4 = retry.claimed.expect("the retry's claim takes the next queued turn");
    assert_eq!(c4.envelope.message_id.as_str(), "n-4");

    // A newer epoch takes over: n-3 and n-4 fail; the old epoch's commit+claim takes nothing.
    let newer = Epoch::new(2);
    let taken = store.take_over(&dep, newer, "other").await.unwrap();
    assert_eq!(taken.failed.len(), 2);
    let stale = store
        .commit_and_claim(&dep, Some((&c3.envelope, &reply("zombie"))), epoch, Some(deadline))
        .await
        .unwrap();
    assert!(stale.committed.is_none() && stale.claimed.is_none(), "fenced: {stale:?}");
    // Without a claim it only commits.
    let last = store.arm(&[&turns[4]], Duration::from_secs(60)).await.unwrap();
    assert!(last[0].is_some());
    let c5 = store.claim_next(&dep, newer, deadline).await.unwrap().expect("n-5");
    let done = store
        .commit_and_claim(&dep, Some((&c5.envelope, &reply("five"))), newer, None)
        .await
        .unwrap();
    assert!(done.committed.is_some() && done.claimed.is_none() && !done.looked);
    assert!(store.claim_next(&dep, newer, deadline).await.unwrap().is_none());
    let outbox: Vec<(String, String)> =
        sqlx::query_as("SELECT message_id, kind FROM turnd_outbox ORDER BY message_id")
            .fetch_all(&cluster.pool)
            .await
            .unwrap();
    let expected =
        [("n-1", "reply"), ("n-2", "reply"), ("n-3", "error"), ("n-4", "error"), ("n-5", "reply")];
    let expected: Vec<(String, String)> =
        expected.iter().map(|(m, k)| (m.to_string(), k.to_string())).collect();
    assert_eq!(outbox, expected, "each turn once");
}

// ---- 4. fencing: a stale epoch's reply is refused -------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_epoch_reply_is_refused_while_the_current_owner_commits() {
    use turnd::event::Outcome;
    use turnd::store::Store;
    use turnd::turn::{Epoch, parse};

    let cluster = Cluster::new().await;
    let store = Store::from_pool(cluster.pool.clone());
    let body = |id: &str| {
        json!({"messageId": id, "agentId": "a1", "organizationId": "o1", "conversationId": "fence"})
            .to_string()
    };
    let (t1, t2) = (
        parse(body("f-1").as_bytes(), 1 << 20).unwrap(),
        parse(body("f-2").as_bytes(), 1 << 20).unwrap(),
    );
    let dep = t1.deployment.clone();
    assert_eq!(dep, t2.deployment);
    let seqs = store.arm(&[&t1, &t2], Duration::from_secs(60)).await.unwrap();
    let [Some(s1), Some(s2)] = seqs[..] else { panic!("both armed: {seqs:?}") };
    assert!(s1 < s2, "seqs follow the given (accept) order");
    let again = store.arm(&[&t2], Duration::from_secs(60)).await.unwrap();
    assert_eq!(again, vec![None], "a duplicate arms nothing");
    let reply = |text: &str| {
        Outcome::Reply(
            serde_json::value::RawValue::from_string(json!({"text": text}).to_string()).unwrap(),
        )
    };
    let deadline = Duration::from_secs(60);
    let (old, new) = (Epoch::new(1), Epoch::new(2));

    // The old owner takes the deployment and starts f-1.
    let first = store.take_over(&dep, old, "old-daemon").await.unwrap();
    assert!(first.meta.is_some() && first.failed.is_empty() && first.backoff_ms.is_none());
    assert_eq!(first.previous_owner, None, "never owned before");
    let c1 = store.claim_next(&dep, old, deadline).await.unwrap().expect("old owner claims f-1");
    assert_eq!(c1.envelope.message_id.as_str(), "f-1");

    // A newer epoch takes over: f-1, still running under the old epoch, fails at once.
    let second = store.take_over(&dep, new, "new-daemon").await.unwrap();
    assert_eq!(second.failed.len(), 1, "the stale running turn is failed by the takeover");
    assert_eq!(second.previous_owner.as_deref(), Some("old-daemon"), "the owner before this one");
    let failed = &second.failed[0].event;
    assert_eq!(failed.message_id.as_str(), "f-1");
    assert_eq!(failed.kind, "error");
    assert_eq!(failed.code.as_deref(), Some("WORKER_DIED"));

    // The zombie's reply to f-1 is refused, and it can neither claim nor fail anything.
    assert!(
        store.commit(&c1.envelope, old, &reply("zombie")).await.unwrap().is_none(),
        "stale commit refused"
    );
    assert!(store.claim_next(&dep, old, deadline).await.unwrap().is_none(), "stale claim refused");
    let stale_fail = store
        .fail_pending(&dep, old, false, &|_| {
            Outcome::error(turnd::turn::ErrorCode::WorkerDied, "zombie")
        })
        .await
        .unwrap();
    assert!(stale_fail.is_empty(), "a stale owner cannot fail the new owner's turns");

    // The current owner claims f-2; a zombie reply to it under the old epoch is refused, the
    // owner's own commits.
    let c2 = store.claim_next(&dep, new, deadline).await.unwrap().expect("new owner claims f-2");
    assert_eq!(c2.envelope.message_id.as_str(), "f-2");
    assert!(
        store.commit(&c2.envelope, old, &reply("zombie")).await.unwrap().is_none(),
        "zombie reply to the successor's turn refused"
    );
    let committed = store
        .commit(&c2.envelope, new, &reply("owner"))
        .await
        .unwrap()
        .expect("current owner commits");
    assert_eq!(committed.event.kind, "reply");
    assert!(
        store.commit(&c2.envelope, new, &reply("again")).await.unwrap().is_none(),
        "a turn ends once"
    );

    let outbox: Vec<(String, String, Option<String>, String)> =
        sqlx::query_as("SELECT message_id, kind, code, body FROM turnd_outbox ORDER BY id")
            .fetch_all(&cluster.pool)
            .await
            .unwrap();
    assert_eq!(outbox.len(), 2, "{outbox:?}");
    assert_eq!(
        (outbox[0].0.as_str(), outbox[0].1.as_str(), outbox[0].2.as_deref()),
        ("f-1", "error", Some("WORKER_DIED"))
    );
    assert_eq!((outbox[1].0.as_str(), outbox[1].1.as_str()), ("f-2", "reply"));
    assert!(outbox[1].3.contains("owner") && !outbox.iter().any(|r| r.3.contains("zombie")));
    let epoch: i64 =
        sqlx::query_scalar("SELECT epoch FROM turnd_deployments WHERE deployment = $1")
            .bind(dep.as_str())
            .fetch_one(&cluster.pool)
            .await
            .unwrap();
    assert_eq!(epoch, 2);
    // An out-of-order takeover with an older epoch never moves the fence back.
    let late = store.take_over(&dep, old, "late").await.unwrap();
    assert!(late.failed.is_empty());
    let epoch: i64 =
        sqlx::query_scalar("SELECT epoch FROM turnd_deployments WHERE deployment = $1")
            .bind(dep.as_str())
            .fetch_one(&cluster.pool)
            .await
            .unwrap();
    assert_eq!(epoch, 2, "the epoch never goes back");
    let owner: Option<String> =
        sqlx::query_scalar("SELECT owner FROM turnd_deployments WHERE deployment = $1")
            .bind(dep.as_str())
            .fetch_one(&cluster.pool)
            .await
            .unwrap();
    assert_eq!(
        owner.as_deref(),
        Some("new-daemon"),
        "a late takeover does not steal the owner record"
    );
    assert!(store.claim_next(&dep, old, deadline).await.unwrap().is_none());
    assert_eq!(cluster.pending().await, 0);

    // A newer take-over with nothing running (the one-statement path) moves the fence and
    // reports the owner before it.
    let third = store.take_over(&dep, Epoch::new(3), "third-daemon").await.unwrap();
    assert!(third.meta.is_some() && third.failed.is_empty());
    assert_eq!(third.previous_owner.as_deref(), Some("new-daemon"));
    let (epoch, owner): (i64, Option<String>) =
        sqlx::query_as("SELECT epoch, owner FROM turnd_deployments WHERE deployment = $1")
            .bind(dep.as_str())
            .fetch_one(&cluster.pool)
            .await
            .unwrap();
    assert_eq!((epoch, owner.as_deref()), (3, Some("third-daemon")));
}

// ---- 2. one worker per deployment while a daemon is killed and restarted -------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_turns_over_three_pods_with_one_killed_get_one_event_each_and_one_worker_each() {
    let mut cluster = Cluster::new().await;
    cluster.set("TURND_TURN__DEADLINE", "2s");
    for _ in 0..3 {
        cluster.start_daemon(&[]).await;
    }
    let mut client = cluster.client().await;

    const CONVERSATIONS: usize = 20;
    const TURNS: usize = 200;
    let turns: Vec<Value> = (0..TURNS)
        .map(|i| {
            let mut t = turn(
                "ex",
                &format!("conv-{}", i % CONVERSATIONS),
                json!({"action": "sleep", "ms": 40, "text": format!("t{i}")}),
            );
            t["messageId"] = json!(format!("ex-{i:03}"));
            t
        })
        .collect();
    let ids: Vec<String> = turns.iter().map(mid).collect();
    let started = Instant::now();
    for t in &turns[..TURNS / 2] {
        client.publish(t).await;
    }
    // Mid-way: some answered, others running or queued on every pod.
    client.wait_until(T, "a third of the first half answered", |ev| ev.len() >= TURNS / 6).await;
    let owned_by_victim: i64 =
        sqlx::query_scalar("SELECT count(*) FROM turnd_deployments WHERE owner = 'd1'")
            .fetch_one(&cluster.pool)
            .await
            .unwrap();
    cluster.daemons[1].kill();
    let killed_at = client.events.len();
    eprintln!(
        "killed d1 (owner of {owned_by_victim} deployments) after {killed_at} events, {:?}",
        started.elapsed()
    );
    for t in &turns[TURNS / 2..] {
        client.publish(t).await;
    }
    client.wait_until(T, "progress while d1 is down", |ev| ev.len() >= killed_at + TURNS / 4).await;
    cluster.restart(1).await;
    eprintln!("restarted d1 after {} events, {:?}", client.events.len(), started.elapsed());
    client.wait_for(&ids, Duration::from_secs(60)).await;
    eprintln!("all {TURNS} answered in {:?}", started.elapsed());
    // Catch-up republishing (relay of another pod) would arrive within a few seconds.
    client.drain_for(Duration::from_millis(2500)).await;

    let events = client.assert_exactly_once(&ids);
    let mut codes: HashMap<String, usize> = HashMap::new();
    for e in events.values() {
        let label = if e.kind() == "reply" { "reply".to_owned() } else { e.code().to_owned() };
        *codes.entry(label).or_default() += 1;
    }
    eprintln!("outcomes: {codes:?}");
    for (label, n) in &codes {
        assert!(
            ["reply", "TURN_TIMEOUT", "WORKER_DIED"].contains(&label.as_str()),
            "{n} turns ended with {label}: only turns running on the killed daemon may fail"
        );
    }
    let failed = TURNS - codes.get("reply").copied().unwrap_or(0);
    assert!(
        failed <= CONVERSATIONS,
        "at most one running turn per conversation was lost with d1, {failed} failed"
    );
    for (id, e) in &events {
        if e.kind() == "reply" {
            let t = &turns[ids.iter().position(|i| i == id).unwrap()];
            assert_eq!(e.body["payload"]["text"], t["payload"]["text"]);
        }
    }

    // No two workers of one deployment ever lived at once, and no turn ran twice.
    let violations = cluster.violations();
    assert!(violations.is_empty(), "exclusivity violated:\n{violations}");
    let mut given: HashMap<String, usize> = HashMap::new();
    for first_of_conversation in &turns[..CONVERSATIONS] {
        let dep = deployment_of(first_of_conversation);
        for line in cluster.worker_log(&dep) {
            if line[0] == "turn" {
                *given.entry(line[3].clone()).or_default() += 1;
            }
        }
    }
    for (id, n) in &given {
        assert_eq!(*n, 1, "turn {id} was given to a worker {n} times");
    }
    assert!(given.len() >= TURNS - failed, "every answered turn ran: {} ran", given.len());

    assert_eq!(cluster.pending().await, 0, "no pending rows left");
    wait_for_async(T, "outbox published", || async { cluster.unpublished().await == 0 }).await;
}

// ---- 3. the lock session is terminated -------------------------------------------------------

async fn lock_session_pids(cluster: &Cluster, daemon: &str) -> Vec<i32> {
    sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database() ORDER BY pid")
        .bind(format!("turnd-lock:{daemon}"))
        .fetch_all(&cluster.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_lock_session_stops_its_workers_and_another_pod_answers() {
    let mut cluster = Cluster::new().await;
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;

    // d0 owns five deployments, each running a long turn with two more queued behind it.
    const N: usize = 5;
    let mut long = Vec::new();
    let mut queued = Vec::new();
    for c in 0..N {
        let conv = format!("lk-{c}");
        let t = turn(
            "lk",
            &conv,
            json!({"action": "heartbeat", "interval_ms": 100, "duration_ms": 20000}),
        );
        client.publish(&t).await;
        long.push(t);
        for q in 0..2 {
            let t = turn("lk", &conv, json!({"text": format!("{conv}-{q}")}));
            client.publish(&t).await;
            queued.push(t);
        }
    }
    let deps: Vec<String> = long.iter().map(deployment_of).collect();
    wait_until(T, "every long turn running on d0", || {
        deps.iter().all(|d| cluster.worker_log(d).iter().any(|l| l[0] == "turn"))
    })
    .await;
    let pids: Vec<i32> = deps.iter().map(|d| cluster.worker_pid(d).expect("pid file")).collect();
    assert!(pids.iter().all(|p| process_alive(*p)));
    cluster.start_daemon(&[]).await;

    let lock_pids = lock_session_pids(&cluster, "d0").await;
    assert_eq!(lock_pids.len(), 1, "d0 has one lock session");
    let held: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1 AND granted",
    )
    .bind(lock_pids[0])
    .fetch_one(&cluster.pool)
    .await
    .unwrap();
    assert_eq!(held, N as i64, "d0's lock session holds its deployments' locks");
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(lock_pids[0])
        .fetch_one(&cluster.pool)
        .await
        .unwrap();
    assert!(terminated);
    let cut = Instant::now();

    // d0 notices and kills its workers at once.
    wait_until(
        Duration::from_secs(5),
        "d0's workers gone after its lock session was terminated",
        || pids.iter().all(|p| !process_alive(*p)),
    )
    .await;
    eprintln!("workers gone {:?} after pg_terminate_backend", cut.elapsed());

    // Every turn ends once: the running ones stopped, the queued ones answered by a pod.
    let mut ids: Vec<String> = long.iter().map(mid).collect();
    ids.extend(queued.iter().map(mid));
    client.wait_for(&ids, T).await;
    eprintln!("all turns ended {:?} after the cut", cut.elapsed());
    client.drain_for(Duration::from_millis(2500)).await;
    let events = client.assert_exactly_once(&ids);
    for t in &long {
        let e = &events[&mid(t)];
        assert_eq!(e.kind(), "error", "{} was running when the lock went", mid(t));
        assert!(
            ["WORKER_STOPPED", "WORKER_DIED"].contains(&e.code()),
            "running turn ended with {}",
            e.code()
        );
    }
    for t in &queued {
        let e = &events[&mid(t)];
        assert_eq!(e.kind(), "reply", "queued turn {} is answered: {:?}", mid(t), e.body);
        assert_eq!(e.body["payload"]["text"], t["payload"]["text"]);
        let pid = e.body["payload"]["pid"].as_i64().unwrap() as i32;
        assert!(!pids.contains(&pid), "answered by a new worker, not one that lost its lock");
    }
    // d0 reconnected its lock session (one connection, a new backend).
    wait_for_async(T, "d0's lock session back", || async {
        let now = lock_session_pids(&cluster, "d0").await;
        now.len() == 1 && now[0] != lock_pids[0]
    })
    .await;
    assert_eq!(cluster.pending().await, 0);
    wait_for_async(T, "outbox published", || async { cluster.unpublished().await == 0 }).await;
}

// ---- 6. adoption of a killed pod's deployment ----------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_pods_deployment_is_adopted_and_its_queue_answered_in_order() {
    let mut cluster = Cluster::new().await;
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;

    let first = turn("ad", "adopt-me", json!({"action": "hang"}));
    let rest: Vec<Value> =
        (0..5).map(|i| turn("ad", "adopt-me", json!({"text": format!("q{i}")}))).collect();
    let dep = deployment_of(&first);
    client.publish(&first).await;
    wait_until(T, "the first turn running on d0", || {
        cluster.worker_log(&dep).iter().any(|l| l[0] == "turn")
    })
    .await;
    let old_pid = cluster.worker_pid(&dep).unwrap();
    // A second pod; turns it takes in for d0's deployment ring d0's doorbell.
    cluster.start_daemon(&[]).await;
    for t in &rest {
        client.publish(t).await;
    }
    wait_for_async(T, "the rest queued behind the hung turn", || async {
        let queued: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM turnd_turns WHERE deployment = $1 AND state = 'queued'",
        )
        .bind(&dep)
        .fetch_one(&cluster.pool)
        .await
        .unwrap();
        queued == rest.len() as i64
    })
    .await;
    let owner: Option<String> =
        sqlx::query_scalar("SELECT owner FROM turnd_deployments WHERE deployment = $1")
            .bind(&dep)
            .fetch_one(&cluster.pool)
            .await
            .unwrap();
    assert_eq!(owner.as_deref(), Some("d0"));

    cluster.daemons[0].kill();
    let killed = Instant::now();
    let first_rest = mid(&rest[0]);
    client
        .wait_until(T, "the first queued turn answered by the adopter", |ev| {
            ev.iter().any(|e| e.message_id() == first_rest)
        })
        .await;
    let latency = killed.elapsed();
    // The harness's sweep settings: a queued turn is adopted once older than adoption_delay,
    // by the first sweep after that.
    let (delay, interval) = (Duration::from_secs(1), Duration::from_millis(300));
    eprintln!(
        "adoption latency (SIGKILL of the owner → first queued turn answered by the adopter): {latency:?}; \
         adoption_delay + sweep.interval = {:?}",
        delay + interval
    );
    assert!(latency <= delay + interval + Duration::from_millis(1500), "adopted in {latency:?}");

    let mut ids = vec![mid(&first)];
    ids.extend(rest.iter().map(mid));
    client.wait_for(&ids, T).await;
    client.drain_for(Duration::from_millis(2500)).await;
    let events = client.assert_exactly_once(&ids);
    let e = &events[&mid(&first)];
    assert!(
        ["WORKER_DIED", "TURN_TIMEOUT"].contains(&e.code()),
        "the hung turn died with its daemon: {:?}",
        e.body
    );
    // In order — the order they were accepted in (two pods took them in, so that need not be
    // publish order) — by one new worker under a newer epoch.
    let sent: Vec<String> = rest.iter().map(mid).collect();
    let accepted: Vec<String> =
        sqlx::query_scalar("SELECT message_id FROM turnd_turns WHERE deployment = $1 AND message_id = ANY($2) ORDER BY seq")
            .bind(&dep)
            .bind(&sent)
            .fetch_all(&cluster.pool)
            .await
            .unwrap();
    assert_eq!(accepted.len(), sent.len());
    if accepted != sent {
        eprintln!(
            "note: two pods accepted the confirmed publishes out of publish order: {accepted:?} vs {sent:?}"
        );
    }
    let log = cluster.worker_log(&dep);
    let adopted: Vec<&Vec<String>> =
        log.iter().filter(|l| l[0] == "turn" && l[1] != old_pid.to_string()).collect();
    let order: Vec<&str> = adopted.iter().map(|l| l[3].as_str()).collect();
    assert_eq!(order, accepted, "adopted turns given in accept order");
    let arrived: Vec<&str> = client
        .events
        .iter()
        .map(|e| e.message_id())
        .filter(|m| sent.iter().any(|s| s == m))
        .collect();
    assert_eq!(arrived, accepted, "replies in commit order");
    let new_pid = adopted[0][1].clone();
    assert!(adopted.iter().all(|l| l[1] == new_pid), "one worker answers the adopted queue");
    let old_epoch: i64 = log.iter().find(|l| l[0] == "start").unwrap()[2].parse().unwrap();
    let new_epoch: i64 = adopted[0][2].parse().unwrap();
    assert!(new_epoch > old_epoch, "the adopter holds a newer epoch");
    for t in &rest {
        assert_eq!(events[&mid(t)].kind(), "reply");
    }
    let owner: Option<String> =
        sqlx::query_scalar("SELECT owner FROM turnd_deployments WHERE deployment = $1")
            .bind(&dep)
            .fetch_one(&cluster.pool)
            .await
            .unwrap();
    assert_eq!(owner.as_deref(), Some("d1"), "d1 adopted it");
    assert!(cluster.violations().is_empty(), "{}", cluster.violations());
    assert_eq!(cluster.pending().await, 0);
}

// ---- 7. a turn arriving while its owner stops, on another pod --------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_arriving_while_its_owner_stops_is_served_without_waiting_for_adoption() {
    let mut cluster = Cluster::new().await;
    cluster.set("TURND_WORKER__IDLE_TIMEOUT", "150ms");
    // Adoption would take 30 s: a turn left to it shows as slow.
    cluster.set("TURND_SWEEP__ADOPTION_DELAY", "30s");
    cluster.start_daemon(&[]).await;
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;

    const ROUNDS: usize = 20;
    let mut slowest = Duration::ZERO;
    let mut dep = String::new();
    for round in 0..ROUNDS {
        let t = turn("idle", "stop-and-go", json!({"text": format!("r{round}")}));
        dep = deployment_of(&t);
        let published = Instant::now();
        client.publish(&t).await;
        client.wait_for(&[mid(&t)], Duration::from_secs(10)).await;
        slowest = slowest.max(published.elapsed());
        // Publish the next one the moment the idle worker is gone: its owner is releasing the
        // deployment (on either pod) while the next turn is taken in (by either pod).
        let pid = client.event(&mid(&t)).unwrap().body["payload"]["pid"].as_i64().unwrap() as i32;
        wait_until(T, "the idle worker stopped", || !process_alive(pid)).await;
    }
    eprintln!("slowest of {ROUNDS} turns published as their owner stopped: {slowest:?}");
    assert!(slowest < Duration::from_secs(5), "a turn waited for adoption: {slowest:?}");
    let starts = cluster.worker_log(&dep).iter().filter(|l| l[0] == "start").count();
    assert_eq!(starts, ROUNDS, "a fresh worker per round (each stopped idle)");
    assert!(cluster.violations().is_empty(), "{}", cluster.violations());
    client.drain_for(Duration::from_millis(300)).await;
    let ids: Vec<String> = client.events.iter().map(|e| e.message_id().to_owned()).collect();
    assert_eq!(ids.len(), ROUNDS);
    client.assert_exactly_once(&ids);
}

/// An owner on the daemon whose intake is the active one listens on no thread queue: every
/// turn of its deployment comes in through that intake, which wakes it in memory. Once that
/// intake is no longer the active one, the owner declares its queue, and a turn armed by the
/// other daemon's intake reaches it there at once — not at the sweep (30 s here) or adoption.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_listens_on_its_thread_queue_once_its_daemons_intake_is_not_the_active_one() {
    let mut cluster = Cluster::new().await;
    cluster.set("TURND_SWEEP__INTERVAL", "30s");
    let a = format!("{}-a", cluster.prefix);
    cluster.start_daemon(&[("TURND_DAEMON__ID", &a)]).await;
    let mut client = cluster.client().await;
    let first = turn("tq", "c1", json!({}));
    let dep = deployment_of(&first);
    let queue = format!("{}.thread.{dep}", cluster.prefix);
    client.ask(&first, T).await;
    // A second turn: the first is long over, and the owner had every chance to declare it.
    client.ask(&turn("tq", "c1", json!({})), T).await;
    assert!(!queue_exists(&client.conn, &queue).await, "no thread queue while intake is here");
    let pid = cluster.worker_pid(&dep);

    // A second daemon subscribes behind A's intake; cutting A's broker connection makes it
    // the active one (A subscribes again behind it).
    cluster.start_daemon(&[]).await;
    assert!(close_broker_connections(&format!("turnd {a}")) >= 1);
    wait_for_async(T, "the owner's thread queue", || queue_exists(&client.conn, &queue)).await;
    let asked = Instant::now();
    let e = client.ask(&turn("tq", "c1", json!({})), T).await;
    assert_eq!(e.kind(), "reply", "{:?}", e.body);
    assert!(asked.elapsed() < Duration::from_secs(5), "{:?}", asked.elapsed());
    assert!(
        cluster.daemon_log(1).contains("intake active"),
        "the other daemon's intake took it in:\n{}",
        cluster.daemon_log(1)
    );
    assert_eq!(cluster.worker_pid(&dep), pid, "the same worker answered");
}

/// The arm statement claims a turn for an idle owner only under the epoch that owns the
/// deployment and only when nothing else of it is pending (order; one turn at a time), and
/// only the turn it was asked for; a duplicate is never claimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arm_hands_a_turn_to_an_idle_owner_only_in_order_and_under_its_epoch() {
    use turnd::store::{Armed, Store};
    use turnd::turn::{Epoch, parse};

    let cluster = Cluster::new().await;
    let store = Store::from_pool(cluster.pool.clone());
    let t = |i: usize| {
        let body = json!({"messageId": format!("h-{i}"), "agentId": "a1",
            "organizationId": "o1", "conversationId": "hand"});
        parse(body.to_string().as_bytes(), 1 << 20).unwrap()
    };
    let turns: Vec<_> = (0..6).map(t).collect();
    let dep = turns[0].deployment.clone();
    let (e1, e2, wait) = (Epoch::new(1), Epoch::new(2), Duration::from_secs(60));
    // A take-over records a deployment that has a turn: one, answered at once.
    store.arm(&[&turns[5]], wait).await.unwrap();
    store.take_over(&dep, e1, "d").await.unwrap();
    let done = |m: &'static str| {
        let pool = cluster.pool.clone();
        async move {
            sqlx::query(
                "UPDATE turnd_turns SET state = 'done', done_at = now() WHERE message_id = $1",
            )
            .bind(m)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    done("h-5").await;
    let state = |m: &'static str| {
        let pool = cluster.pool.clone();
        async move {
            sqlx::query_as::<_, (String, Option<i64>)>(
                "SELECT state, epoch FROM turnd_turns WHERE message_id = $1",
            )
            .bind(m)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let running = |a: &Option<Armed>| a.expect("armed").running;

    // Nothing pending: the first turn of the batch is claimed, the second stays queued.
    let armed = store.arm_and_hand(&[&turns[0], &turns[1]], wait, &[Some(e1)], wait).await.unwrap();
    assert!(running(&armed[0]) && !running(&armed[1]), "{armed:?}");
    assert_eq!(state("h-0").await, ("running".into(), Some(1)));
    assert_eq!(state("h-1").await.0, "queued");
    // Something pending: queued, whatever the epoch says.
    let armed = store.arm_and_hand(&[&turns[2]], wait, &[Some(e1)], wait).await.unwrap();
    assert!(!running(&armed[0]));
    // A duplicate is never armed again, let alone claimed.
    let again = store.arm_and_hand(&[&turns[0]], wait, &[Some(e1)], wait).await.unwrap();
    assert_eq!(again, vec![None]);
    // A newer epoch owns the deployment now (its take-over ends what ran under the old one):
    // a stale one claims nothing.
    done("h-0").await;
    store.take_over(&dep, e2, "d").await.unwrap();
    for m in ["h-1", "h-2"] {
        done(m).await;
    }
    let armed = store.arm_and_hand(&[&turns[3]], wait, &[Some(e1)], wait).await.unwrap();
    assert!(!running(&armed[0]), "a stale epoch claims nothing");
    assert_eq!(state("h-3").await, ("queued".into(), None));
    done("h-3").await;
    let armed = store.arm_and_hand(&[&turns[4]], wait, &[Some(e2)], wait).await.unwrap();
    assert!(running(&armed[0]));
    assert_eq!(state("h-4").await, ("running".into(), Some(2)));
}

/// An idle owner's next turn is claimed in the statement that arms it and handed over in
/// memory (its row's start is its accept: one transaction); a turn behind a running one is
/// claimed by that one's commit; order and one event per turn hold throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_owners_next_turn_is_claimed_as_it_is_armed() {
    let mut cluster = Cluster::new().await;
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;
    let first = turn("ho", "c1", json!({}));
    let dep = deployment_of(&first);
    client.ask(&first, T).await;
    let mut ids = vec![mid(&first)];
    for _ in 0..4 {
        let t = turn("ho", "c1", json!({}));
        ids.push(mid(&t));
        let e = client.ask(&t, T).await;
        assert_eq!(e.kind(), "reply");
    }
    // Two at once: the first handed over, the second claimed with the first's commit.
    let (a, b) =
        (turn("ho", "c1", json!({"action": "sleep", "ms": 200})), turn("ho", "c1", json!({})));
    client.publish(&a).await;
    client.publish(&b).await;
    ids.extend([mid(&a), mid(&b)]);
    client.wait_for(&ids, T).await;
    client.assert_exactly_once(&ids);
    let handed: Vec<(String, bool)> = sqlx::query_as(
        "SELECT message_id, started_at = accepted_at FROM turnd_turns
         WHERE deployment = $1 ORDER BY seq",
    )
    .bind(&dep)
    .fetch_all(&cluster.pool)
    .await
    .unwrap();
    let handed: Vec<bool> = handed.into_iter().map(|(_, h)| h).collect();
    assert_eq!(
        handed,
        vec![false, true, true, true, true, true, false],
        "the first waited for its owner"
    );
    let given: Vec<String> = cluster
        .worker_log(&dep)
        .into_iter()
        .filter(|l| l[0] == "turn")
        .map(|l| l[3].clone())
        .collect();
    assert_eq!(given, ids, "given in accept order, each once");
}
