//! `turnd parked`: parked turns are recorded, listed, replayed once (with a fresh attempt
//! count) and purged.

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use turnd_harness::*;

const T: Duration = Duration::from_secs(30);

fn turnd(cluster: &Cluster, args: &[&str]) -> (i32, String) {
    let out = Command::new(turnd_bin())
        .args(args)
        .env_clear()
        .envs(cluster.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("TURND_LOG__LEVEL", "warn")
        .output()
        .expect("run turnd");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_turns_are_listed_replayed_once_and_purged() {
    let mut cluster = Cluster::new().await;
    cluster.set("TURND_INTAKE__MAX_ATTEMPTS", "2");
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;
    let t = json!({"messageId": "no-org", "agentId": "a1", "conversationId": "c1", "runId": 7, "payload": {}});
    client.publish(&t).await;
    client.wait_for(&["no-org".into()], T).await;
    assert_eq!(client.event("no-org").unwrap().code(), "MISSING_CONTEXT");

    let (code, out) = turnd(&cluster, &["parked", "list", "--json"]);
    assert_eq!(code, 0, "{out}");
    let list: Vec<Value> = serde_json::from_str(&out).expect("list JSON");
    assert_eq!(list.len(), 1);
    let p = &list[0];
    assert_eq!(p["code"], "MISSING_CONTEXT");
    assert_eq!(p["message_id"], "no-org");
    assert_eq!(p["attempts"], 2);
    assert!(p["reason"].as_str().unwrap().contains("organizationId"));
    let id = p["id"].as_i64().unwrap().to_string();
    let (code, out) = turnd(&cluster, &["parked", "show", &id]);
    assert_eq!(code, 0);
    assert!(out.contains("\"runId\":7") || out.contains("\"runId\": 7"), "{out}");

    // One command naming the id twice replays it once; it still lacks context, so it parks
    // again with a fresh attempt count and a new error event (its record was cleared).
    let (code, out) = turnd(&cluster, &["parked", "replay", &id, &id, "--by", "alice"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.matches("replayed").count(), 1, "{out}");
    client
        .wait_until(T, "a second MISSING_CONTEXT event after the replay", |ev| {
            ev.iter().filter(|e| e.message_id() == "no-org").count() == 2
        })
        .await;
    let (_, out) = turnd(&cluster, &["parked", "list", "--json"]);
    let list: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["attempts"], 2, "a fresh attempt count after replay");
    assert_eq!(list[1]["replayed_by"], "alice");
    // Replaying the same record again does nothing.
    let (code, out) = turnd(&cluster, &["parked", "replay", &id]);
    assert_eq!(code, 1);
    assert!(out.contains("already_replayed"), "{out}");
    client.drain_for(Duration::from_millis(800)).await;
    assert_eq!(client.events.iter().filter(|e| e.message_id() == "no-org").count(), 2);

    let (code, out) = turnd(&cluster, &["parked", "purge", "--code", "MISSING_CONTEXT"]);
    assert_eq!(code, 0);
    assert!(out.contains("purged 2"), "{out}");
    let (_, out) = turnd(&cluster, &["parked", "list", "--json"]);
    assert_eq!(serde_json::from_str::<Vec<Value>>(&out).unwrap().len(), 0);
}

/// A producer's bytes never reach the operator's terminal as control sequences.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_show_prints_no_control_sequences() {
    let mut cluster = Cluster::new().await;
    cluster.start_daemon(&[]).await;
    let client = cluster.client().await;
    // Not JSON, so parked INVALID_TURN with its bytes as published.
    client.publish_raw(b"\x1b]0;owned\x07\x1b[2J\x9b31m\r\xe2\x80\xaehello").await;
    let mut list = Vec::new();
    wait_until(T, "the turn to be parked", || {
        let (_, out) = turnd(&cluster, &["parked", "list", "--json"]);
        list = serde_json::from_str::<Vec<Value>>(&out).unwrap_or_default();
        !list.is_empty()
    })
    .await;
    let id = list[0]["id"].as_i64().unwrap().to_string();
    for args in [&["parked", "show", &id][..], &["parked", "list"][..]] {
        let (code, out) = turnd(&cluster, args);
        assert_eq!(code, 0, "{out}");
        assert!(
            !out.chars().any(|c| c.is_control() && c != '\n' && c != '\t'),
            "{args:?} printed a control character: {out:?}"
        );
        assert!(!out.contains('\u{202e}'), "{out:?}");
    }
    let (_, out) = turnd(&cluster, &["parked", "show", &id]);
    assert!(out.contains("\\u{1b}]0;owned"), "escaped, not dropped: {out}");
}
