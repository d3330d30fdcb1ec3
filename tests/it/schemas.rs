//! The JSON Schemas in docs/schemas/ (issue 20) against what turnd really accepts and emits:
//! generated turns (valid and invalid) against the turn parser, the events turnd builds, the
//! stdin lines it writes, and the stdout lines of the test and demo workers; last, a daemon's
//! stdin lines and published events of every kind. Where a schema cannot say what turnd checks
//! (lengths in bytes, duplicate keys, a runId spelled `1e3`), the case is listed here and in
//! the schema's description.

use std::sync::LazyLock;
use std::time::Duration;

use crate::support::schemas::{
    self, assert_valid, assert_worker_lines, errors, run_worker, turn_input, validator,
};
use crate::support::turns::{Field, TurnFields, turn_fields};
use jsonschema::Validator;
use proptest::prelude::*;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use turnd::event::{Outcome, TerminalEvent};
use turnd::intake::{envelope_of, envelope_of_invalid};
use turnd::otel::TraceContext;
use turnd::turn::{self, Epoch, ErrorCode};
use turnd::worker::protocol::{cancel_line, parse_line, turn_line};

const MAX: usize = 262_144;

static TURN: LazyLock<Validator> = LazyLock::new(|| validator("turn.schema.json"));
static EVENT: LazyLock<Validator> = LazyLock::new(|| validator("terminal-event.schema.json"));
static STDIN: LazyLock<Validator> = LazyLock::new(|| validator("worker-stdin.schema.json"));
static STDOUT: LazyLock<Validator> = LazyLock::new(|| validator("worker-stdout.schema.json"));

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn every_schema_is_2020_12_named_after_its_file_and_compiles() {
    let docs = schemas::documents();
    assert!(docs.len() >= 10, "{docs:?}");
    for (name, doc) in &docs {
        assert_eq!(doc["$schema"], "https://json-schema.org/draft/2020-12/schema", "{name}");
        let id = doc["$id"].as_str().unwrap_or_default();
        assert!(id.ends_with(&format!("/{name}")), "{name}: $id {id} names another file");
        assert!(jsonschema::meta::is_valid(doc), "{name} is not a valid schema");
        let _ = validator(name);
    }
}

/// Every string field of a turn longer than its limit in bytes but not in characters: the one
/// thing about lengths a schema cannot express.
fn longer_in_bytes_than_in_chars(fields: &TurnFields) -> bool {
    [
        (&fields.message_id, 255),
        (&fields.conversation_id, 256),
        (&fields.channel_id, 256),
        (&fields.user_id, 256),
        (&fields.platform, 256),
    ]
    .into_iter()
    .any(|(f, max)| f.str().is_some_and(|s| s.len() > max && s.chars().count() <= max))
}

/// A runId with a fraction or exponent whose value is an integer (`1e3`): JSON Schema's
/// `integer` accepts it, turnd wants the digits of an integer.
fn run_id_spelled_as_a_float(fields: &TurnFields) -> bool {
    matches!(&fields.run_id, Field::Raw(r) if r.contains(['.', 'e', 'E'])
        && r.parse::<f64>().is_ok_and(|f| f.fract() == 0.0 && f >= 1.0))
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(512),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// The turn schema accepts every turn turnd accepts, and turnd accepts every turn the
    /// schema accepts but for the documented cases. Each valid turn's stdin line validates,
    /// and so does the event turnd would build for it; so does the error event of an invalid
    /// turn that can be addressed.
    #[test]
    fn the_turn_schema_agrees_with_the_parser(fields in turn_fields(), pretty in any::<bool>()) {
        let text = fields.json(pretty);
        let value = json(&text);
        let schema_errors = errors(&TURN, &value);
        match turn::parse(text.as_bytes(), MAX) {
            Ok(turn) => {
                prop_assert!(schema_errors.is_empty(), "turnd accepts {} but the schema says {:?}", text, schema_errors);
                let line = turn_line(Epoch::new(7), None, &turn.line);
                let line = json(std::str::from_utf8(&line).expect("UTF-8"));
                prop_assert!(STDIN.is_valid(&line), "{:?}", errors(&STDIN, &line));
                let cx = TraceContext::parse(
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                    Some("vendor=a,other=b"),
                );
                let traced = turn_line(Epoch::new(7), cx.as_ref(), &turn.line);
                let traced = json(std::str::from_utf8(&traced).expect("UTF-8"));
                prop_assert!(traced.get("traceparent").is_some(), "{}", traced);
                prop_assert!(STDIN.is_valid(&traced), "{:?}", errors(&STDIN, &traced));
                let cancel = cancel_line(&turn.message_id);
                let cancel = json(std::str::from_utf8(&cancel).expect("UTF-8"));
                prop_assert!(STDIN.is_valid(&cancel), "{:?}", errors(&STDIN, &cancel));
                for outcome in outcomes() {
                    let event = TerminalEvent::new(&envelope_of(&turn), &outcome);
                    let body = json(&event.body);
                    prop_assert!(EVENT.is_valid(&body), "{:?} {}", errors(&EVENT, &body), body);
                }
            }
            Err(invalid) => {
                let documented = longer_in_bytes_than_in_chars(&fields) || run_id_spelled_as_a_float(&fields);
                prop_assert!(
                    !schema_errors.is_empty() || documented,
                    "turnd refuses {} ({}) but the schema accepts it", text, invalid.reason
                );
                if let Some(envelope) = envelope_of_invalid(&invalid) {
                    let event = TerminalEvent::new(&envelope, &Outcome::error(ErrorCode::InvalidTurn, invalid.reason.clone()));
                    let body = json(&event.body);
                    prop_assert!(EVENT.is_valid(&body), "{:?} {}", errors(&EVENT, &body), body);
                }
            }
        }
    }
}

/// One outcome of each shape: replies with any JSON, errors with every code turnd emits.
fn outcomes() -> Vec<Outcome> {
    let mut all: Vec<Outcome> = [
        "null",
        "{\"text\":\"hi\",\"n\":123456789012345678901234567890,\"f\":1.10}",
        "\"x\"",
        "[1,2]",
    ]
    .into_iter()
    .map(|p| Outcome::Reply(RawValue::from_string(p.to_owned()).expect("JSON")))
    .collect();
    for code in [
        ErrorCode::WorkerDied,
        ErrorCode::WorkerStartFailed,
        ErrorCode::TurnTimeout,
        ErrorCode::WorkerStopped,
        ErrorCode::WorkerCrashLoop,
        ErrorCode::MissingContext,
        ErrorCode::InvalidTurn,
        ErrorCode::WorkerError,
        ErrorCode::Other("PROVIDER_QUOTA_EXHAUSTED".into()),
    ] {
        all.push(Outcome::error(code, "what happened\nover two lines"));
    }
    all
}

/// Fixed cases, the documented disagreements among them: (turn, schema accepts, turnd accepts).
#[test]
fn fixed_turns() {
    let long_e = "é".repeat(200); // 200 characters, 400 bytes
    let cases: Vec<(String, bool, bool)> = vec![
        (r#"{"messageId":"m","agentId":"a","conversationId":"c"}"#.into(), true, true),
        (r#"{"messageId":"m","agentId":"a","userId":"u","organizationId":null}"#.into(), true, true),
        (r#"{"messageId":"m","agentId":"a","conversationId":"","channelId":"ch"}"#.into(), true, true),
        (r#"{"messageId":"m","agentId":"a","conversationId":"c","runId":9223372036854775807,"platformMetadata":{"k":[1]},"extra":1}"#.into(), true, true),
        (r#"{"messageId":"m","agentId":"a","conversationId":""}"#.into(), false, false),
        (r#"{"messageId":"m","agentId":"a"}"#.into(), false, false),
        (r#"{"messageId":null,"agentId":"a","userId":"u"}"#.into(), false, false),
        (r#"{"messageId":"","agentId":"a","userId":"u"}"#.into(), false, false),
        (r#"{"messageId":"m\u0085","agentId":"a","userId":"u"}"#.into(), false, false),
        (r#"{"messageId":"m","agentId":"a b","userId":"u"}"#.into(), false, false),
        (r#"{"messageId":"m","agentId":"a","userId":"u","organizationId":"_"}"#.into(), false, false),
        (r#"{"messageId":"m","agentId":"a","userId":"u\n"}"#.into(), false, false),
        (r#"{"messageId":"m","agentId":"a","userId":"u","platformMetadata":[]}"#.into(), false, false),
        (r#"{"messageId":"m","agentId":"a","userId":"u","runId":0}"#.into(), false, false),
        (r#"{"messageId":"m","agentId":"a","userId":"u","runId":1.5}"#.into(), false, false),
        (r#"{"messageId":"m","agentId":"a","userId":"u","runId":9223372036854775808}"#.into(), false, false),
        (r#"{"messageId":"m","agentId":"a","userId":"u","runId":"7"}"#.into(), false, false),
        (r#"[{"messageId":"m","agentId":"a","userId":"u"}]"#.into(), false, false),
        // Every limit, at it and past it.
        (format!(r#"{{"messageId":"{}","agentId":"{}","organizationId":"{}","conversationId":"{}","channelId":"{}","userId":"{}","platform":"{}"}}"#,
            "m".repeat(255), "a".repeat(64), "o".repeat(64), "c".repeat(256), "h".repeat(256), "u".repeat(256), "p".repeat(256)), true, true),
        (format!(r#"{{"messageId":"{}","agentId":"a","userId":"u"}}"#, "m".repeat(256)), false, false),
        (format!(r#"{{"messageId":"m","agentId":"{}","userId":"u"}}"#, "a".repeat(65)), false, false),
        (format!(r#"{{"messageId":"m","agentId":"a","organizationId":"{}","userId":"u"}}"#, "o".repeat(65)), false, false),
        (format!(r#"{{"messageId":"m","agentId":"a","conversationId":"{}"}}"#, "c".repeat(257)), false, false),
        (format!(r#"{{"messageId":"m","agentId":"a","channelId":"{}"}}"#, "h".repeat(257)), false, false),
        (format!(r#"{{"messageId":"m","agentId":"a","userId":"{}"}}"#, "u".repeat(257)), false, false),
        (format!(r#"{{"messageId":"m","agentId":"a","userId":"u","platform":"{}"}}"#, "p".repeat(257)), false, false),
        // Documented: what a schema cannot say.
        (r#"{"messageId":"m","agentId":"a","userId":"u","runId":1e3}"#.into(), true, false),
        (r#"{"messageId":"m","agentId":"a","userId":"u","runId":2.0}"#.into(), true, false),
        (format!(r#"{{"messageId":"{long_e}","agentId":"a","userId":"u"}}"#), true, false),
        (format!(r#"{{"messageId":"m","agentId":"a","userId":"{long_e}"}}"#), true, false),
        (r#"{"messageId":"m","agentId":"a","userId":"u","userId":"v"}"#.into(), true, false),
    ];
    for (text, schema_ok, turnd_ok) in cases {
        let value = json(&text);
        assert_eq!(
            TURN.is_valid(&value),
            schema_ok,
            "schema on {text}: {:?}",
            errors(&TURN, &value)
        );
        assert_eq!(turn::parse(text.as_bytes(), MAX).is_ok(), turnd_ok, "turnd on {text}");
    }
}

#[test]
fn the_contracts_example_event_validates_and_broken_ones_do_not() {
    let reply = json!({
        "messageId": "m1", "deployment": "a1-0123456789abcdef", "organizationId": "o1",
        "agentId": "a1", "conversationId": "c1", "kind": "reply", "payload": {"text": "hi"},
        "error": null,
        "routing": {"userId": null, "channelId": null, "platform": null, "platformMetadata": null},
        "createdAt": "2026-11-24T10:00:00.123Z"
    });
    assert_valid(&EVENT, &reply, "CONTRACT §6's example");
    let mut error = reply.clone();
    error["kind"] = json!("error");
    error["payload"] = Value::Null;
    error["error"] = json!({"code": "TURN_TIMEOUT", "message": "lapsed"});
    assert_valid(&EVENT, &error, "an error event");
    for (field, value) in [
        ("kind", json!("done")),
        ("error", json!({"code": "lower", "message": "x"})),
        ("createdAt", json!("2026-11-24 10:00:00")),
        ("createdAt", json!("2026-11-24T10:00:00+01:00")),
        ("deployment", json!("a1-0123")),
        ("routing", json!({})),
    ] {
        let mut bad = reply.clone();
        bad[field] = value;
        assert!(!EVENT.is_valid(&bad), "{field}: {bad}");
    }
    let mut mixed = error.clone();
    mixed["kind"] = json!("reply");
    assert!(!EVENT.is_valid(&mixed), "a reply with an error");
    let mut mixed = error;
    mixed["payload"] = json!({});
    assert!(!EVENT.is_valid(&mixed), "an error with a payload");
}

/// Worker lines: what the schema accepts turnd takes as the same line type; what turnd
/// rejects the schema rejects. turnd is more lenient than the schema in the listed ways.
#[test]
fn worker_lines_schema_and_parser() {
    // (line, schema accepts, turnd accepts)
    let cases = [
        (r#"{"type":"reply","messageId":"m1","payload":{"n":1.10}}"#, true, true),
        (r#"{"type":"reply","messageId":"m1"}"#, true, true),
        (r#"{"type":"error","messageId":"m1","error":"boom","code":"RATE_LIMITED"}"#, true, true),
        (r#"{"type":"error","messageId":"m1","error":"boom"}"#, true, true),
        (r#"{"type":"heartbeat"}"#, true, true),
        (r#"{"type":"heartbeat","progress":0.5}"#, true, true),
        (
            r#"{"type":"provider_failed","code":"PROVIDER_QUOTA_EXHAUSTED","reason":"429"}"#,
            true,
            true,
        ),
        (r#"{"type":"provider_recovered"}"#, true, true),
        (r#"{}"#, false, false),
        (r#"{"type":1}"#, false, false),
        (r#"{"type":"x"}"#, false, false),
        (r#"{"type":"turn","epoch":1,"turn":{}}"#, false, false),
        (r#"{"type":"reply"}"#, false, false),
        (r#"{"type":"reply","messageId":""}"#, false, false),
        (r#"{"type":"error","error":"x"}"#, false, false),
        (r#"[]"#, false, false),
        // turnd's leniency: a missing or structured error text, an invalid code (replaced by
        // WORKER_ERROR / PROVIDER_FAILED), a provider_failed without a code.
        (r#"{"type":"error","messageId":"m1"}"#, false, true),
        (r#"{"type":"error","messageId":"m1","error":{"detail":1}}"#, false, true),
        (r#"{"type":"error","messageId":"m1","error":"x","code":"lower"}"#, false, true),
        (r#"{"type":"provider_failed"}"#, false, true),
    ];
    for (line, schema_ok, turnd_ok) in cases {
        let value = json(line);
        assert_eq!(
            STDOUT.is_valid(&value),
            schema_ok,
            "schema on {line}: {:?}",
            errors(&STDOUT, &value)
        );
        let parsed = parse_line(line.as_bytes());
        assert_eq!(parsed.is_ok(), turnd_ok, "turnd on {line}: {parsed:?}");
    }
}

#[test]
fn the_test_and_demo_workers_write_valid_lines() {
    let inputs = [
        turn_input("r1", json!({"text": "hi"})),
        turn_input("e1", json!({"action": "error", "error": "boom", "code": "TEST_CODE"})),
        turn_input("e2", json!({"action": "error"})),
        turn_input("h1", json!({"action": "heartbeat", "interval_ms": 1, "duration_ms": 5})),
        turn_input(
            "p1",
            json!({"action": "provider_failed", "code": "PROVIDER_QUOTA_EXHAUSTED",
                   "reason": "429", "interval_ms": 1, "recover_after_ms": 5}),
        ),
        turn_input("s1", json!({"action": "sleep", "ms": 1})),
        turn_input("x1", json!({"action": "echo"})),
        turn_input("u1", json!({"action": "no-such-action"})),
    ];
    let test_worker = [turnd_harness::test_worker().to_owned()];
    let out = run_worker(&test_worker, &inputs);
    assert_worker_lines(&test_worker[0], &out, inputs.len());
    for kind in ["reply", "error", "heartbeat", "provider_failed", "provider_recovered"] {
        assert!(
            out.iter().any(|l| json(l)["type"] == kind),
            "the test worker wrote no {kind} line: {out:?}"
        );
    }

    let demo = [env!("CARGO_BIN_EXE_turnd-demo-worker").to_owned()];
    let out = run_worker(
        &demo,
        &[turn_input("d1", json!({"text": "hi"})), turn_input("d2", json!([1, 2]))],
    );
    assert_worker_lines(&demo[0], &out, 2);
}

/// A daemon's own output: the stdin lines it writes (the test worker echoes each one back) and
/// the events it publishes, replies and errors of several origins, all validate.
#[tokio::test(flavor = "multi_thread")]
async fn a_daemons_stdin_lines_and_events_validate() {
    let mut cluster = turnd_harness::Cluster::new().await;
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;
    let echo =
        |conversation: &str| turnd_harness::turn("a1", conversation, json!({"action": "echo"}));
    let mut turns = vec![
        echo("c1"),
        // Every optional field, a runId with its snapshot context, digits that do not fit a
        // double, non-ASCII, an unknown field.
        {
            let mut t = echo("c2");
            t["organizationId"] = json!("org-1");
            t["runId"] = json!(9007199254740993_u64);
            t["userId"] = json!("ü");
            t["channelId"] = json!("ch");
            t["platform"] = json!("slack");
            t["platformMetadata"] = json!({"thread": "t1"});
            t["payload"]["n"] =
                serde_json::from_str("123456789012345678901234567890.10").expect("JSON");
            t["traceparent"] = json!("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
            t
        },
        turnd_harness::turn(
            "a1",
            "c3",
            json!({"action": "error", "error": "boom", "code": "MY_CODE"}),
        ),
        turnd_harness::turn("a1", "c4", json!({"action": "error"})),
        turnd_harness::turn("a1", "c5", json!({"action": "crash"})),
    ];
    for t in &turns {
        client.publish(t).await;
    }
    // An invalid turn that can still be answered: INVALID_TURN.
    let mut invalid = echo("c6");
    invalid["platformMetadata"] = json!("not an object");
    client.publish(&invalid).await;
    turns.push(invalid);

    let ids: Vec<String> = turns.iter().map(turnd_harness::mid).collect();
    client.wait_for(&ids, Duration::from_secs(30)).await;
    let mut codes = Vec::new();
    for event in &client.events {
        assert_valid(&EVENT, &event.body, &format!("the published event {}", event.body));
        codes.push(if event.kind() == "reply" {
            "reply".to_owned()
        } else {
            event.code().to_owned()
        });
        if event.kind() == "reply" {
            let line = event.body["payload"]["line"].as_str().expect("the echoed stdin line");
            assert_valid(&STDIN, &json(line), &format!("the stdin line {line}"));
        }
    }
    codes.sort();
    assert_eq!(codes, ["INVALID_TURN", "MY_CODE", "WORKER_DIED", "WORKER_ERROR", "reply", "reply"]);
}
