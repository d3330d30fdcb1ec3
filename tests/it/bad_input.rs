//! The bad-input corpus (issue 8): every kind of bad turn a producer can publish and every
//! kind of bad output a worker can write gets its documented answer (CONTRACT §2, §4, §5) —
//! parked with a reason naming the field, an error reply when the turn can be identified,
//! logged and ignored, `WORKER_DIED` — and the daemon keeps serving, with bounded memory.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};
use turnd_harness::*;

const T: Duration = Duration::from_secs(30);

fn base(message_id: &str) -> serde_json::Map<String, Value> {
    let v = json!({"messageId": message_id, "agentId": "a1", "organizationId": "org1", "conversationId": "c1", "payload": {"text": "x"}});
    v.as_object().cloned().expect("object")
}

fn with(message_id: &str, key: &str, value: Value) -> Vec<u8> {
    let mut m = base(message_id);
    m.insert(key.to_owned(), value);
    Value::Object(m).to_string().into_bytes()
}

fn without(message_id: &str, keys: &[&str]) -> Vec<u8> {
    let mut m = base(message_id);
    for k in keys {
        m.remove(*k);
    }
    Value::Object(m).to_string().into_bytes()
}

/// One bad turn: its body, a piece of the reason it must be parked with, and the messageId
/// its INVALID_TURN error reply is addressed to (None: it cannot be identified, no reply).
struct Case {
    name: &'static str,
    body: Vec<u8>,
    reason: &'static str,
    reply_to: Option<&'static str>,
}

fn corpus() -> Vec<Case> {
    let long = |n: usize| "x".repeat(n);
    let deep_payload = format!(
        r#"{{"messageId":"deep-payload","agentId":"a1","conversationId":"c1","payload":{}1{}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let case = |name, body: Vec<u8>, reason, reply_to| Case { name, body, reason, reply_to };
    vec![
        case("invalid UTF-8", b"{\"messageId\":\"utf8\",\"agentId\":\"a1\",\"conversationId\":\"c\xff\xfe\"}".to_vec(), "not valid UTF-8", None),
        case("lone surrogate bytes", b"{\"messageId\":\"\xed\xa0\x80\"}".to_vec(), "not valid UTF-8", None),
        case("100k '['", "[".repeat(100_000).into_bytes(), "not valid JSON", None),
        case("100k '[' in the payload", deep_payload.into_bytes(), "not valid JSON", None),
        case("empty body", Vec::new(), "not valid JSON", None),
        case("not an object", b"[1,2,3]".to_vec(), "must be a JSON object", None),
        case("raw control character in a string", b"{\"messageId\":\"m\x01\",\"agentId\":\"a1\",\"conversationId\":\"c1\"}".to_vec(), "not valid JSON", None),
        case(
            "duplicate messageId",
            br#"{"messageId":"dup-a","messageId":"dup-b","agentId":"a1","conversationId":"c1"}"#.to_vec(),
            "duplicate key \"messageId\"",
            None,
        ),
        case(
            "duplicate payload key",
            br#"{"messageId":"dup-payload","agentId":"a1","conversationId":"c1","payload":1,"payload":2}"#.to_vec(),
            "duplicate key \"payload\"",
            Some("dup-payload"),
        ),
        case(
            "duplicate nested key",
            br#"{"messageId":"dup-nested","agentId":"a1","conversationId":"c1","payload":{"a":{"b":1,"b":2}}}"#.to_vec(),
            "duplicate key \"b\" in a nested object",
            Some("dup-nested"),
        ),
        case("messageId missing", without("x", &["messageId"]), "messageId is required", None),
        case("messageId empty", with("", "messageId", json!("")), "messageId", None),
        case("messageId 256 bytes", with("", "messageId", json!(long(256))), "1-255 bytes", None),
        case("messageId control character", with("", "messageId", json!("m\u{1}")), "control characters", None),
        case("messageId not a string", with("", "messageId", json!(5)), "messageId must be a string", None),
        case("agentId missing", without("no-agent", &["agentId"]), "agentId is required", None),
        case("agentId with a space", with("agent-space", "agentId", json!("a b")), "agentId", None),
        case("agentId 65 bytes", with("agent-long", "agentId", json!(long(65))), "agentId", None),
        case("agentId empty", with("agent-empty", "agentId", json!("")), "agentId", None),
        case("agentId not a string", with("agent-num", "agentId", json!(["a"])), "agentId must be a string", None),
        case("organizationId _", with("org-underscore", "organizationId", json!("_")), "reserved", None),
        case("organizationId with a slash", with("org-slash", "organizationId", json!("o/1")), "organizationId", None),
        case("organizationId 65 bytes", with("org-long", "organizationId", json!(long(65))), "organizationId", None),
        case("conversationId 257 bytes", with("conv-long", "conversationId", json!(long(257))), "conversationId", None),
        case("conversationId control character", with("conv-ctl", "conversationId", json!("c\n1")), "control characters", None),
        case("no conversation key", without("no-key", &["conversationId"]), "no conversation key", None),
        case("only an empty conversationId", with("empty-key", "conversationId", json!("")), "no conversation key", None),
        case("channelId 257 bytes", with("channel-long", "channelId", json!(long(257))), "channelId", Some("channel-long")),
        case("userId 257 bytes", with("user-long", "userId", json!(long(257))), "userId", Some("user-long")),
        case("platform 257 bytes", with("platform-long", "platform", json!(long(257))), "platform", Some("platform-long")),
        case("platformMetadata not an object", with("meta-str", "platformMetadata", json!("x")), "platformMetadata", Some("meta-str")),
        case("runId 0", with("run-0", "runId", json!(0)), "runId", Some("run-0")),
        case("runId negative", with("run-neg", "runId", json!(-3)), "runId", Some("run-neg")),
        case("runId fractional", with("run-frac", "runId", json!(1.5)), "runId", Some("run-frac")),
        case("runId a string", with("run-str", "runId", json!("7")), "runId", Some("run-str")),
        case(
            "runId past i64",
            br#"{"messageId":"run-big","agentId":"a1","organizationId":"org1","conversationId":"c1","runId":9223372036854775808}"#.to_vec(),
            "too large",
            Some("run-big"),
        ),
        case(
            "runId of 30 digits",
            br#"{"messageId":"run-30","agentId":"a1","organizationId":"org1","conversationId":"c1","runId":123456789012345678901234567890}"#.to_vec(),
            "too large",
            Some("run-30"),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_turn_is_parked_with_its_reason_and_answered_when_identifiable() {
    let mut cluster = Cluster::new().await;
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;
    let cases = corpus();
    for c in &cases {
        client.publish_raw(&c.body).await;
    }
    // Valid turns with awkward content run normally, their digits and escapes kept.
    // The echo action replies with the stdin line exactly as the worker read it.
    let awkward = [
        (
            "digits",
            r#"{"action":"echo","n":123456789012345678901234567890,"m":-12345678901234567890123456789.50}"#,
        ),
        ("huge", r#"{"action":"echo","n":1e400,"m":1E-400,"k":-0.000000000000000000000000000001}"#),
        ("escapes", r#"{"action":"echo","s":"a\u0000b\u001bc\ud83d\ude00\"\\","t":"tab\there"}"#),
        ("unknown-fields", r#"{"action":"echo"},"zeta":[1,{"y":null}],"alpha":{"deep":[[[]]]}"#),
    ];
    for (id, payload) in &awkward {
        let body = format!(
            "{{\"messageId\": \"{id}\",\n \"agentId\":\"a1\",\"organizationId\":\"org1\", \"conversationId\":\"awkward\",\t\"payload\":{payload}}}"
        );
        client.publish_raw(body.as_bytes()).await;
    }

    let rows = wait_parked(&cluster, cases.len(), T).await;
    assert_eq!(rows.len(), cases.len(), "each bad turn parked once");
    let by_body: HashMap<&[u8], &ParkedRow> = rows.iter().map(|(b, r)| (b.as_slice(), r)).collect();
    for c in &cases {
        let (code, reason, message_id, deployment, attempts) = by_body
            .get(c.body.as_slice())
            .unwrap_or_else(|| panic!("{}: not parked (or its body changed)", c.name));
        assert_eq!(code, "INVALID_TURN", "{}", c.name);
        assert!(
            reason.contains(c.reason),
            "{}: reason {reason:?} should mention {:?}",
            c.name,
            c.reason
        );
        assert!(
            reason.len() < 400,
            "{}: the reason echoes bounded: {} bytes",
            c.name,
            reason.len()
        );
        assert_eq!(*attempts, 1, "{}", c.name);
        assert_eq!(message_id.as_deref(), c.reply_to, "{}: recorded messageId", c.name);
        assert_eq!(deployment.is_some(), c.reply_to.is_some(), "{}: recorded deployment", c.name);
    }

    let mut expected: Vec<String> =
        cases.iter().filter_map(|c| c.reply_to.map(str::to_owned)).collect();
    expected.extend(awkward.iter().map(|(id, _)| (*id).to_owned()));
    client.wait_for(&expected, T).await;
    for c in cases.iter().filter(|c| c.reply_to.is_some()) {
        let e = client.event(c.reply_to.unwrap()).unwrap();
        assert_eq!(e.kind(), "error", "{}", c.name);
        assert_eq!(e.code(), "INVALID_TURN", "{}", c.name);
        assert!(
            e.body["error"]["message"].as_str().unwrap_or("").contains(c.reason),
            "{}: {}",
            c.name,
            e.body
        );
        assert!(
            e.routing_key.starts_with("reply.") && e.routing_key.contains(".a1-"),
            "{}: {}",
            c.name,
            e.routing_key
        );
    }
    for (id, payload) in &awkward {
        let e = client.event(id).unwrap();
        assert_eq!(e.kind(), "reply", "{id}: {}", e.body);
        let line = e.body["payload"]["line"].as_str().unwrap_or_default();
        // The turn re-serialised on one line: whitespace gone, every byte of every value kept.
        let turn = format!(
            r#"{{"messageId":"{id}","agentId":"a1","organizationId":"org1","conversationId":"awkward","payload":{payload}}}"#
        );
        assert!(
            line.ends_with(&format!(",\"turn\":{turn}}}")),
            "{id}: the worker got the turn as written:\n{line}\n{turn}"
        );
    }

    // Still serving; and a re-publish of an identifiable bad turn is a duplicate: no new event.
    client.publish_raw(&cases.iter().find(|c| c.name == "runId 0").unwrap().body).await;
    let next = turn("a1", "after", json!({"text": "still here"}));
    client.publish(&next).await;
    client.wait_for(&[mid(&next)], T).await;
    assert_eq!(client.event(&mid(&next)).unwrap().kind(), "reply");
    client.drain_for(Duration::from_millis(500)).await;
    let by = client.by_message();
    for id in &expected {
        assert_eq!(by.get(id).map(Vec::len), Some(1), "exactly one event for {id}");
    }
    assert_eq!(
        by.len(),
        expected.len() + 1,
        "no events for unidentifiable turns: {:?}",
        by.keys().collect::<Vec<_>>()
    );
    assert_eq!(cluster.pending().await, 0);
    assert!(
        cluster.daemons[0].child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "daemon alive"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10_mb_turn_is_parked_as_too_large_without_being_parsed() {
    let mut cluster = Cluster::new().await;
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;
    // Identifiable if it were parsed; it must not be (intake.max_turn_bytes stays 256 KiB).
    let body = format!(
        r#"{{"messageId":"big","agentId":"a1","organizationId":"org1","conversationId":"c1","payload":{{"text":"{}"}}}}"#,
        "x".repeat(10 << 20)
    );
    let pid = cluster.daemons[0].pid().unwrap() as i32;
    client.publish_raw(body.as_bytes()).await;
    let rows = wait_parked(&cluster, 1, T).await;
    let (stored, (code, reason, message_id, deployment, _)) = &rows[0];
    assert_eq!(code, "INVALID_TURN");
    assert!(reason.contains("more than intake.max_turn_bytes (262144)"), "{reason}");
    assert!(message_id.is_none() && deployment.is_none(), "not parsed, so not identified");
    assert_eq!(stored.len(), body.len(), "the original body is kept for replay");
    let next = turn("a1", "c1", json!({"text": "next"}));
    client.publish(&next).await;
    client.wait_for(&[mid(&next)], T).await;
    client.drain_for(Duration::from_millis(500)).await;
    assert!(client.event("big").is_none(), "no error reply: the turn was never parsed");
    assert_eq!(client.events.len(), 1);
    assert!(process_alive(pid));
}

/// A turn for the test worker on its own conversation.
fn worker_turn(id: &str, conversation: &str, payload: Value) -> Value {
    json!({"messageId": id, "agentId": "a1", "organizationId": "org1", "conversationId": conversation, "payload": payload})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_worker_output_gets_its_documented_answer() {
    let mut cluster = Cluster::new().await;
    cluster.start_daemon(&[("TURND_WORKER__MAX_LINE_BYTES", "4096")]).await;
    let mut client = cluster.client().await;
    let turns = [
        // A reply split over three writes is one line.
        worker_turn(
            "partial",
            "c-partial",
            json!({"action": "garbage", "no_newline": true,
            "lines": ["{\"type\":\"reply\",\"messageId\":\"partial\",", "\"payload\":{\"partial\":true}}", "\n"]}),
        ),
        // The last line has no newline and the worker exits right after: it still counts.
        worker_turn(
            "last-line",
            "c-last",
            json!({"action": "garbage", "no_newline": true, "exit_after": true,
            "lines": ["{\"type\":\"reply\",\"messageId\":\"last-line\",\"payload\":{\"last\":true}}"]}),
        ),
        // Binary noise without newlines, then the real reply.
        worker_turn(
            "noise",
            "c-noise",
            json!({"action": "noise", "bytes": 3000, "seed": 7, "text": "after noise"}),
        ),
        // Noise with newlines (many short bad lines and one over max_line_bytes), then the reply.
        worker_turn(
            "noise-lines",
            "c-noise-lines",
            json!({"action": "noise", "bytes": 200000, "seed": 9, "newlines": true, "text": "after lines"}),
        ),
        // A half line and exit: nothing answered it, so WORKER_DIED.
        worker_turn(
            "half-exit",
            "c-half",
            json!({"action": "garbage", "no_newline": true, "exit_after": true,
            "lines": ["{\"type\":\"reply\",\"messageId\":\"half-exit\""]}),
        ),
        // Noise and exit.
        worker_turn(
            "noise-exit",
            "c-noise-exit",
            json!({"action": "noise", "bytes": 5000, "seed": 3, "exit_after": true}),
        ),
    ];
    for t in &turns {
        client.publish(t).await;
    }
    let ids: Vec<String> = turns.iter().map(mid).collect();
    client.wait_for(&ids, T).await;
    let outcome = |id: &str| {
        let e = client.event(id).unwrap();
        if e.kind() == "reply" {
            ("reply".to_owned(), e.body["payload"].clone())
        } else {
            (e.code().to_owned(), Value::Null)
        }
    };
    assert_eq!(outcome("partial"), ("reply".into(), json!({"partial": true})));
    assert_eq!(outcome("last-line"), ("reply".into(), json!({"last": true})));
    assert_eq!(outcome("noise").0, "reply");
    assert_eq!(outcome("noise").1["text"], "after noise");
    assert_eq!(outcome("noise-lines").1["text"], "after lines");
    assert_eq!(outcome("half-exit").0, "WORKER_DIED");
    assert_eq!(outcome("noise-exit").0, "WORKER_DIED");
    let log = cluster.daemon_log(0);
    assert!(log.contains("worker wrote a line that is not protocol"), "noise is logged");
    assert!(log.contains("exceeds worker.max_line_bytes (4096)"), "an over-long line is logged");

    // Every conversation keeps being served (a fresh worker where the last one exited).
    let again: Vec<Value> = turns
        .iter()
        .map(|t| turn("a1", t["conversationId"].as_str().unwrap(), json!({"text": "again"})))
        .collect();
    for t in &again {
        client.publish(t).await;
    }
    let again_ids: Vec<String> = again.iter().map(mid).collect();
    client.wait_for(&again_ids, T).await;
    for id in &again_ids {
        assert_eq!(client.event(id).unwrap().kind(), "reply", "{id}");
    }
    client.drain_for(Duration::from_millis(500)).await;
    let by = client.by_message();
    for id in ids.iter().chain(&again_ids) {
        assert_eq!(by.get(id).map(Vec::len), Some(1), "exactly one event for {id}");
    }
    assert_eq!(cluster.pending().await, 0);
    assert_eq!(cluster.violations(), "");
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_line_without_a_newline_keeps_the_daemon_memory_bounded() {
    let mut cluster = Cluster::new().await;
    cluster.start_daemon(&[("TURND_TURN__DEADLINE", "60s")]).await;
    let mut client = cluster.client().await;
    let pid = cluster.daemons[0].pid().unwrap();
    // Warm up (a worker spawned, the pools filled) before taking the baseline.
    let warm = turn("a1", "warm", json!({"text": "warm"}));
    client.publish(&warm).await;
    client.wait_for(&[mid(&warm)], T).await;
    let baseline = rss_kb(pid);

    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let (sampling, peak) = (sampling.clone(), peak.clone());
        std::thread::spawn(move || {
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(rss_kb(pid), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    // 100 MiB on one line, then a newline and the reply; then 100 MiB with no newline at all
    // before the worker exits.
    let flood = worker_turn(
        "flood",
        "c-flood",
        json!({"action": "flood", "bytes": 100 << 20, "text": "after the flood"}),
    );
    let flood_exit = worker_turn(
        "flood-exit",
        "c-flood-exit",
        json!({"action": "flood", "bytes": 100 << 20, "no_newline": true, "exit_after": true}),
    );
    client.publish(&flood).await;
    client.wait_for(&["flood".to_owned()], Duration::from_secs(90)).await;
    client.publish(&flood_exit).await;
    client.wait_for(&["flood-exit".to_owned()], Duration::from_secs(90)).await;
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);

    let e = client.event("flood").unwrap();
    assert_eq!(e.kind(), "reply", "{}", e.body);
    assert_eq!(e.body["payload"]["text"], "after the flood");
    assert_eq!(client.event("flood-exit").unwrap().code(), "WORKER_DIED");
    assert!(
        cluster.daemon_log(0).contains("exceeds worker.max_line_bytes"),
        "the long line is logged"
    );
    eprintln!(
        "daemon RSS: baseline {baseline} kB, peak {peak} kB during 2 × 100 MiB without newline"
    );
    assert!(peak < 64 * 1024, "daemon RSS peaked at {peak} kB: well below 100 MB is the promise");
    assert!(peak < baseline + 24 * 1024, "RSS grew from {baseline} kB to {peak} kB");

    let next = turn("a1", "c-flood", json!({"text": "next"}));
    client.publish(&next).await;
    client.wait_for(&[mid(&next)], T).await;
    assert_eq!(client.event(&mid(&next)).unwrap().kind(), "reply");
    assert!(process_alive(pid as i32));
}

/// A worker's stderr is a tenant's bytes: escape sequences reach the daemon's log escaped, and
/// a worker printing in a loop is held to a rate instead of flooding the host's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_stderr_is_escaped_and_rate_limited_in_the_daemon_log() {
    let mut cluster = Cluster::new().await;
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;
    let t = worker_turn(
        "loud",
        "c-loud",
        json!({"action": "stderr", "repeat": 5000,
               "lines": ["\u{1b}]0;owned\u{7}\u{1b}[2Jfake\r2026-01-01 ERROR forged line"]}),
    );
    client.publish(&t).await;
    client.wait_for(&["loud".into()], T).await;
    assert_eq!(client.event("loud").unwrap().kind(), "reply");
    let log = cluster.daemon_log(0);
    let shown = log.lines().filter(|l| l.contains("worker stderr: ")).count();
    assert!(shown >= 1, "some lines are logged");
    // 5,000 lines written in well under a few seconds: at most 100 a second get through.
    assert!(shown <= 400, "{shown} stderr lines logged of 5,000");
    assert!(log.contains("dropping lines until the next second"), "the drop is said");
    assert!(
        !log.contains('\u{1b}') && !log.contains('\r') && !log.contains('\u{7}'),
        "raw control bytes in the log"
    );
    assert!(log.contains("\\u{1b}]0;owned"), "escaped, not dropped");
}
