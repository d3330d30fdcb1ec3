//! The core turn path (issue 2): one reply per turn with the contract's fields, duplicates,
//! order, tenant isolation, the worker's environment, invalid turns.

use std::time::Duration;

use lapin::types::AMQPValue;
use serde_json::json;
use turnd_harness::*;

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_gets_exactly_one_reply_and_duplicates_never_run_twice() {
    let mut cluster = Cluster::new().await;
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;

    let t = json!({
        "messageId": "m-1", "agentId": "a1", "organizationId": "o1", "conversationId": "c1",
        "userId": "u1", "platform": "slack", "platformMetadata": {"team": "T1"},
        "payload": {"text": "hi", "big": 12345678901234567890123u128},
        "extra": {"kept": true}
    });
    let dep = deployment_of(&t);
    client.publish(&t).await;
    client.wait_for(&["m-1".into()], T).await;
    let e = client.event("m-1").unwrap().clone();
    assert_eq!(e.correlation_id, "m-1");
    assert!(!e.event_id.is_empty());
    assert_eq!(e.routing_key, format!("reply.o1.{dep}"));
    let b = &e.body;
    assert_eq!(b["deployment"], dep.as_str());
    assert_eq!(b["organizationId"], "o1");
    assert_eq!(b["agentId"], "a1");
    assert_eq!(b["conversationId"], "c1");
    assert_eq!(b["kind"], "reply");
    assert_eq!(b["payload"]["text"], "hi");
    assert!(b["error"].is_null());
    assert_eq!(b["routing"]["userId"], "u1");
    assert_eq!(b["routing"]["platform"], "slack");
    assert_eq!(b["routing"]["platformMetadata"]["team"], "T1");
    assert!(b["routing"]["channelId"].is_null());
    let created = b["createdAt"].as_str().unwrap();
    assert!(created.ends_with('Z') && created.len() == 24, "createdAt {created}");

    // The same turn again after it was answered: no second run, no second event.
    client.publish(&t).await;
    // And a duplicate while pending: a slow turn published twice at once.
    let slow = turn("a1", "c1", json!({"action": "sleep", "ms": 400}));
    client.publish(&slow).await;
    client.publish(&slow).await;
    client.wait_for(&[mid(&slow)], T).await;
    client.drain_for(Duration::from_millis(1500)).await;
    let by = client.by_message();
    assert_eq!(by["m-1"].len(), 1, "one event for m-1");
    assert_eq!(by[&mid(&slow)].len(), 1, "one event for the pending duplicate");
    assert_eq!(client.events.len(), 2);
    let runs = |dep: &str, id: &str| {
        cluster.worker_log(dep).iter().filter(|l| l[0] == "turn" && l[3] == id).count()
    };
    assert_eq!(runs(&dep, "m-1"), 1);
    assert_eq!(runs(&deployment_of(&slow), &mid(&slow)), 1);
    assert_eq!(cluster.pending().await, 0);
    wait_for_async(T, "outbox published", || async { cluster.unpublished().await == 0 }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_per_conversation_in_order_and_tenants_apart() {
    let mut cluster = Cluster::new().await;
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;

    let turns: Vec<_> =
        (0..20).map(|i| turn("a1", "c1", json!({"text": format!("t{i}")}))).collect();
    for t in &turns {
        client.publish(t).await;
    }
    let other = turn("a1", "c2", json!({}));
    client.publish(&other).await;
    // Same agent and conversation in two organizations.
    let mut in_a = turn("shared", "conv", json!({}));
    in_a["organizationId"] = json!("orgA");
    let mut in_b = turn("shared", "conv", json!({}));
    in_b["organizationId"] = json!("orgB");
    client.publish(&in_a).await;
    client.publish(&in_b).await;

    let mut ids: Vec<String> = turns.iter().map(mid).collect();
    ids.extend([mid(&other), mid(&in_a), mid(&in_b)]);
    client.wait_for(&ids, T).await;

    let dep = deployment_of(&turns[0]);
    let log = cluster.worker_log(&dep);
    let seen: Vec<&str> = log.iter().filter(|l| l[0] == "turn").map(|l| l[3].as_str()).collect();
    let sent: Vec<&str> = turns.iter().map(|t| t["messageId"].as_str().unwrap()).collect();
    assert_eq!(seen, sent, "the worker saw the conversation's turns in publish order");
    let starts = log.iter().filter(|l| l[0] == "start").count();
    assert_eq!(starts, 1, "one long-lived worker for the conversation");
    for t in &turns {
        assert_eq!(client.event(&mid(t)).unwrap().body["payload"]["text"], t["payload"]["text"]);
    }

    let pid = |t| client.event(&mid(t)).unwrap().body["payload"]["pid"].as_i64().unwrap();
    assert_ne!(pid(&turns[0]), pid(&other), "two conversations, two workers");
    let (da, db) = (deployment_of(&in_a), deployment_of(&in_b));
    assert_ne!(da, db, "organizations never share a deployment");
    assert_ne!(pid(&in_a), pid(&in_b));
    assert_eq!(client.event(&mid(&in_a)).unwrap().routing_key, format!("reply.orgA.{da}"));
    use std::os::unix::fs::PermissionsExt;
    for org in ["orgA", "orgB"] {
        let ws = cluster.path("state").join("workspaces").join(org).join("shared");
        let mode = std::fs::metadata(&ws).expect("workspace exists").permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{ws:?} is private");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_environment_holds_only_the_contract_variables() {
    let mut cluster = Cluster::new().await;
    cluster.set("DATABASE_URL", "postgres://leak:secret@db/x");
    cluster.set("AWS_SECRET_ACCESS_KEY", "nope");
    cluster.set("TURND_WORKER_ENV_FOO", "bar");
    cluster.set("TURND_WORKER__ENV", "{ FROM_CONFIG = \"yes\" }");
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;
    let t = turn("envagent", "c1", json!({"action": "env"}));
    client.publish(&t).await;
    client.wait_for(&[mid(&t)], T).await;
    let env = client.event(&mid(&t)).unwrap().body["payload"].as_object().unwrap().clone();
    assert_eq!(env["FOO"], "bar");
    assert_eq!(env["FROM_CONFIG"], "yes");
    assert_eq!(env["TURND_AGENT_ID"], "envagent");
    assert_eq!(env["TURND_ORGANIZATION_ID"], "org1");
    assert_eq!(env["TURND_CONVERSATION_ID"], "c1");
    assert_eq!(env["TURND_PROTOCOL"], "1");
    assert_eq!(env["TURND_DEPLOYMENT"], deployment_of(&t).as_str());
    assert!(env["TURND_EPOCH"].as_str().unwrap().parse::<i64>().unwrap() > 0);
    assert_eq!(env["HOME"], env["TURND_WORKSPACE"]);
    let allowed = [
        "PATH",
        "HOME",
        "LANG",
        "FOO",
        "FROM_CONFIG",
        "TURND_DEPLOYMENT",
        "TURND_AGENT_ID",
        "TURND_ORGANIZATION_ID",
        "TURND_CONVERSATION_ID",
        "TURND_EPOCH",
        "TURND_WORKSPACE",
        "TURND_TURN_DEADLINE_MS",
        "TURND_PROTOCOL",
        "TEST_WORKER_LOG",
        "TEST_WORKER_EXCLUSIVE",
        "TEST_WORKER_PIDFILE_DIR",
    ];
    for k in env.keys() {
        assert!(allowed.contains(&k.as_str()), "unexpected variable {k} reached the worker");
    }
    assert!(!env.contains_key("DATABASE_URL"));
    assert!(!env.values().any(|v| v.as_str().is_some_and(|s| s.contains("secret"))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_turns_are_parked_with_a_reason_and_the_daemon_keeps_serving() {
    let mut cluster = Cluster::new().await;
    cluster.start_daemon(&[("TURND_INTAKE__MAX_TURN_BYTES", "4096")]).await;
    let mut client = cluster.client().await;

    let bad_agent = json!({"messageId": "bad-agent", "agentId": "../x", "conversationId": "c"});
    let semicolon = json!({"messageId": "semi", "agentId": "a;b", "conversationId": "c"});
    let bad_run = json!({"messageId": "bad-run", "agentId": "a1", "organizationId": "o1", "conversationId": "c", "runId": -3});
    client.publish_raw(b"{not json").await;
    client.publish(&json!({"agentId": "a1", "conversationId": "c"})).await;
    client.publish(&bad_agent).await;
    client.publish(&semicolon).await;
    client.publish(&bad_run).await;
    client.publish_raw(format!("{{\"messageId\":\"big\",\"agentId\":\"a1\",\"conversationId\":\"c\",\"payload\":\"{}\"}}", "x".repeat(5000)).as_bytes()).await;
    let good = turn("a1", "c", json!({"text": "still here"}));
    client.publish(&good).await;
    client.wait_for(&[mid(&good), "bad-run".into()], T).await;
    assert_eq!(client.event(&mid(&good)).unwrap().kind(), "reply");
    // An identifiable invalid turn gets an error reply so its client is not left waiting.
    let e = client.event("bad-run").unwrap();
    assert_eq!(e.code(), "INVALID_TURN");
    assert!(e.body["error"]["message"].as_str().unwrap().contains("runId"));

    // Six parked, each with code and a reason naming the field.
    let mut reasons = Vec::new();
    for (_, h) in read_parked_queue(&client, 6, T).await {
        let get = |k: &str| match h.inner().get(k) {
            Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
            other => panic!("header {k}: {other:?}"),
        };
        assert_eq!(get("x-turnd-code"), "INVALID_TURN");
        reasons.push(get("x-turnd-reason"));
    }
    let all = reasons.join("\n");
    for needle in ["JSON", "messageId", "agentId", "runId", "bytes"] {
        assert!(all.contains(needle), "some reason names {needle}: {all}");
    }
    // The record is written after the parked copy is confirmed: wait for it, then no more.
    let recorded = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM turnd_parked WHERE code = 'INVALID_TURN'",
        )
        .fetch_one(&cluster.pool)
        .await
        .unwrap()
    };
    wait_for_async(Duration::from_secs(10), "6 parked records", || async { recorded().await >= 6 })
        .await;
    client.drain_for(Duration::from_millis(500)).await;
    assert_eq!(
        client.events.len(),
        2,
        "only identifiable turns get an error reply: {:?}",
        client.events
    );
    assert_eq!(recorded().await, 6, "one record per parked turn");
}
