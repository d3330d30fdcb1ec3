//! No message stops intake (issue 15, CONTRACT §4): turns whose AMQP headers nest as deep as
//! the broker's frame_max allows, hold thousands of entries or every field type are answered
//! or parked like any other, and the daemon keeps serving. A delivery that keeps failing ends
//! parked by the inbox's delivery limit; an inbox declared without that limit does not stop
//! the daemon; the retry mover never acks a turn whose move came back unroutable.

use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString};
use lapin::{BasicProperties, Channel};
use serde_json::json;
use turnd_harness::*;

const T: Duration = Duration::from_secs(30);

fn body(message_id: &str) -> Vec<u8> {
    json!({"messageId": message_id, "agentId": "a1", "organizationId": "org1",
           "conversationId": format!("c-{message_id}"), "payload": {"text": "x"}})
    .to_string()
    .into_bytes()
}

fn header<'a>(headers: &'a FieldTable, key: &str) -> Option<&'a AMQPValue> {
    headers.inner().get(key)
}

fn header_str(headers: &FieldTable, key: &str) -> String {
    match header(headers, key) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("header {key}: {other:?}"),
    }
}

/// How many tables/arrays deep a decoded header value goes before it is something else.
fn decoded_depth(mut v: &AMQPValue) -> (usize, &AMQPValue) {
    let mut depth = 0;
    loop {
        let next = match v {
            AMQPValue::FieldArray(a) => a.as_slice().first(),
            AMQPValue::FieldTable(t) => t.inner().values().next(),
            _ => None,
        };
        match next {
            Some(n) => {
                depth += 1;
                v = n;
            }
            None => return (depth, v),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_nested_as_deep_as_a_frame_allows_are_answered_and_intake_keeps_serving() {
    let mut cluster = Cluster::new().await;
    cluster.start_daemon(&[]).await;
    let pid = cluster.daemons[0].pid().expect("pid") as i32;
    let mut client = cluster.client().await;
    let mut raw = RawPublisher::connect().await;
    let turns = format!("{}.turns", cluster.prefix);

    // The content header frame: class, weight, body size, flags (14), the content type
    // (1 + 16), the headers table (4 + key "deep" (5) + the value), delivery mode (1); the
    // frame's own 8 bytes come off frame_max. Each nested array costs 5 bytes, each table 7;
    // the innermost long string 11.
    let frame_max = raw.frame_max as usize;
    let room = frame_max - 8 - 14 - 17 - 1 - 4 - 5 - 11;
    let (max_arrays, max_tables) = (room / 5, room / 7);
    eprintln!("frame_max {frame_max}: up to {max_arrays} nested arrays or {max_tables} tables");
    let valid = [
        ("arrays-500", b'A', 500),
        ("arrays-2000", b'A', 2_000),
        ("arrays-10000", b'A', 10_000),
        ("tables-10000", b'F', 10_000),
        ("arrays-max", b'A', max_arrays),
        ("tables-max", b'F', max_tables),
    ];
    let mut ids = Vec::new();
    for (id, kind, depth) in valid {
        let headers = encoded_table(&[("deep", nested_value(kind, depth))]);
        let outcome = raw.publish(&turns, "turn.deep", &headers, &body(id)).await;
        assert_eq!(outcome, RawOutcome::Acked, "{id}: the broker takes it");
        ids.push(id.to_owned());
    }
    // RabbitMQ 3.10 takes a frame up to 8 bytes past frame_max (it compares the payload with
    // frame_max): such a content header reaches turnd as a frame larger than frame_max, and
    // grows further when the broker adds its own headers. Up to what the broker refuses:
    let mut largest = max_arrays;
    for extra in 1..=8 {
        let id = format!("arrays-max-plus-{extra}");
        let headers = encoded_table(&[("deep", nested_value(b'A', max_arrays + extra))]);
        match raw.publish(&turns, "turn.deep", &headers, &body(&id)).await {
            RawOutcome::Acked => {
                ids.push(id);
                largest = max_arrays + extra;
            }
            refused => {
                eprintln!("{} nested arrays: {refused:?}", max_arrays + extra);
                assert!(matches!(refused, RawOutcome::Closed(501, _)), "{refused:?}");
                raw = RawPublisher::connect().await;
                break;
            }
        }
    }
    eprintln!("the broker took up to {largest} nested arrays");
    // Bad bodies under deep headers are parked with their body: one whose headers leave room
    // for turnd's own, one whose headers fill the frame. A refused turn (runId, no
    // organization) whose headers fill the frame is dead-lettered with the broker's x-death on
    // top: too large to go round the delay queue, it is parked.
    let bad_small = b"{not json, deep headers".to_vec();
    let bad_full = b"{not json, headers filling the frame".to_vec();
    let headers = encoded_table(&[("deep", nested_value(b'F', 2_000))]);
    assert_eq!(raw.publish(&turns, "turn.deep", &headers, &bad_small).await, RawOutcome::Acked);
    let headers = encoded_table(&[("deep", nested_value(b'A', largest))]);
    assert_eq!(raw.publish(&turns, "turn.deep", &headers, &bad_full).await, RawOutcome::Acked);
    let refused_full = json!({"messageId": "refused-full", "agentId": "a1",
                              "conversationId": "c1", "runId": 7})
    .to_string()
    .into_bytes();
    let refused_headers = encoded_table(&[("deep", nested_value(b'A', largest - 2))]);
    let outcome = raw.publish(&turns, "turn.deep", &refused_headers, &refused_full).await;
    assert_eq!(outcome, RawOutcome::Acked);
    raw.close().await;

    client.wait_for(&ids, T).await;
    for id in &ids {
        assert_eq!(client.event(id).unwrap().kind(), "reply", "{id}");
    }
    client.wait_for(&["refused-full".into()], T).await;
    assert_eq!(client.event("refused-full").unwrap().code(), "MISSING_CONTEXT");

    let rows = wait_parked(&cluster, 3, T).await;
    assert_eq!(rows.len(), 3);
    for (b, (code, reason, ..)) in &rows {
        if *b == refused_full {
            assert_eq!(code, "MISSING_CONTEXT");
            assert!(reason.contains("no room to requeue"), "{reason}");
            continue;
        }
        assert!(*b == bad_small || *b == bad_full, "parked with its body");
        assert_eq!(code, "INVALID_TURN");
        assert!(reason.contains("not valid JSON"), "{reason}");
    }
    let headers_json: Vec<String> = sqlx::query_scalar("SELECT headers FROM turnd_parked")
        .fetch_all(&cluster.pool)
        .await
        .expect("parked headers");
    for h in &headers_json {
        assert!(h.len() < 70 * 1024, "the record's headers stay bounded: {} bytes", h.len());
        let v: serde_json::Value = serde_json::from_str(h).expect("headers are JSON");
        assert!(v.get("deep").is_some(), "the record names the original header");
    }
    let queued = read_parked_queue(&client, 3, T).await;
    for (b, headers) in &queued {
        if *b == refused_full {
            assert_eq!(header_str(headers, "x-turnd-code"), "MISSING_CONTEXT");
            continue;
        }
        assert_eq!(header_str(headers, "x-turnd-code"), "INVALID_TURN");
        if *b == bad_small {
            // Decoded as deep as the decoder goes; the rest kept whole as bytes.
            let (depth, below) = decoded_depth(header(headers, "deep").expect("deep kept"));
            assert_eq!(depth, lapin::types::parsing::MAX_NESTING_DEPTH - 1);
            assert!(matches!(below, AMQPValue::ByteArray(_)), "{below:?}");
        } else {
            assert_eq!(*b, bad_full, "parked with its body");
            assert!(header(headers, "deep").is_none());
            assert!(header_str(headers, "x-turnd-headers-dropped").contains("bytes encoded"));
        }
    }

    // Still serving, same process, never reconnected.
    let next = turn("a1", "after", json!({"text": "still here"}));
    client.publish(&next).await;
    client.wait_for(&[mid(&next)], T).await;
    assert_eq!(client.event(&mid(&next)).unwrap().kind(), "reply");
    assert!(process_alive(pid), "the daemon is alive");
    let log = cluster.daemon_log(0);
    assert!(!log.contains("reconnecting"), "the daemon's connection never failed:\n{log}");
    assert!(!log.contains("overflowed its stack"));
}

/// Every type a field table carries on the wire. No short string: RabbitMQ reads the spec's
/// short-string tag 's' as a signed 16-bit integer, so no client sends one.
fn every_type() -> Vec<(&'static str, AMQPValue)> {
    let mut table = FieldTable::default();
    table.insert("inner".into(), AMQPValue::LongString("x".into()));
    vec![
        ("bool", AMQPValue::Boolean(true)),
        ("i8", AMQPValue::ShortShortInt(-8)),
        ("u8", AMQPValue::ShortShortUInt(200)),
        ("i16", AMQPValue::ShortInt(-1_600)),
        ("u16", AMQPValue::ShortUInt(64_000)),
        ("i32", AMQPValue::LongInt(-320_000)),
        ("u32", AMQPValue::LongUInt(4_000_000_000)),
        ("i64", AMQPValue::LongLongInt(i64::MIN)),
        ("f32", AMQPValue::Float(1.5)),
        ("f64", AMQPValue::Double(-2.25e300)),
        ("decimal", AMQPValue::DecimalValue(DecimalValue { scale: 3, value: 123_456 })),
        ("long-string", AMQPValue::LongString(LongString::from(b"a\0b\xff".to_vec()))),
        ("bytes", AMQPValue::ByteArray(ByteArray::from(vec![0u8, 255, 1]))),
        ("timestamp", AMQPValue::Timestamp(1_700_000_000)),
        ("table", AMQPValue::FieldTable(table)),
        (
            "array",
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Void, AMQPValue::LongInt(1)])),
        ),
        ("void", AMQPValue::Void),
    ]
}

async fn publish_with_headers(ch: &Channel, prefix: &str, headers: FieldTable, body: &[u8]) {
    let properties = BasicProperties::default().with_delivery_mode(2).with_headers(headers);
    let confirm = ch
        .basic_publish(
            format!("{prefix}.turns").as_str().into(),
            "turn.wide".into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .expect("publish");
    assert!(confirm.await.expect("confirm").is_ack());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_headers_and_every_field_type_are_answered_and_parked_intact() {
    let mut cluster = Cluster::new().await;
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;
    let mut headers = FieldTable::default();
    for i in 0..5_000 {
        headers.insert(format!("h{i}").into(), AMQPValue::LongString(format!("v{i}").into()));
    }
    for (key, value) in every_type() {
        headers.insert(key.into(), value);
    }
    publish_with_headers(&client.publisher, &cluster.prefix, headers.clone(), &body("wide")).await;
    let bad = b"[\"wide headers, not an object\"]".to_vec();
    publish_with_headers(&client.publisher, &cluster.prefix, headers.clone(), &bad).await;
    // Each type alone, on a valid turn.
    let mut ids = vec!["wide".to_owned()];
    for (key, value) in every_type() {
        let mut one = FieldTable::default();
        one.insert(key.into(), value);
        let id = format!("type-{key}");
        publish_with_headers(&client.publisher, &cluster.prefix, one, &body(&id)).await;
        ids.push(id);
    }
    client.wait_for(&ids, T).await;
    for id in &ids {
        assert_eq!(client.event(id).unwrap().kind(), "reply", "{id}");
    }

    let rows = wait_parked(&cluster, 1, T).await;
    assert_eq!(rows[0].0, bad);
    assert_eq!(rows[0].1.0, "INVALID_TURN");
    let json: String = sqlx::query_scalar("SELECT headers FROM turnd_parked")
        .fetch_one(&cluster.pool)
        .await
        .expect("parked headers");
    assert!(json.len() < 70 * 1024, "bounded: {} bytes", json.len());
    let json: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    // Keys in order: the typed ones before "h…" are shown, the budget elides the rest.
    assert_eq!(json["bool"], true);
    assert_eq!(json["array"], json!([null, 1]));
    assert_eq!(json["decimal"], "123456e-3");
    assert_eq!(json["f64"], -2.25e300);
    assert_eq!(json["h0"], "v0");
    assert!(json.get("…").is_some(), "past the budget the rest is elided: {json}");

    // The parked message keeps every header as the daemon received it.
    let (b, parked) = read_parked_queue(&client, 1, T).await.remove(0);
    assert_eq!(b, bad);
    for i in [0, 2_500, 4_999] {
        assert_eq!(header_str(&parked, &format!("h{i}")), format!("v{i}"));
    }
    for (key, value) in every_type() {
        let got = header(&parked, key).unwrap_or_else(|| panic!("{key} kept"));
        // RabbitMQ keeps each tag as published; a u32 ('i') comes back as RabbitMQ reads it.
        if let (AMQPValue::LongUInt(n), AMQPValue::LongLongInt(m)) = (&value, got) {
            assert_eq!(i64::from(*n), *m, "{key}");
        } else {
            assert_eq!(got, &value, "{key}");
        }
    }
    assert_eq!(header_str(&parked, "x-turnd-code"), "INVALID_TURN");
}

/// Publishes straight into the inbox (as if routed there) and returns every delivery of it
/// to the inbox, nack with requeue, until the inbox dead-letters `n` messages to
/// `<prefix>.retry` by its delivery limit. No daemon consumes meanwhile.
async fn drive_past_the_delivery_limit(client: &Client, bodies: &[Vec<u8>]) {
    let prefix = &client.prefix;
    let inbox = format!("{prefix}.inbox");
    for b in bodies {
        let confirm = client
            .publisher
            .basic_publish(
                "".into(),
                inbox.as_str().into(),
                BasicPublishOptions::default(),
                b,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish to the inbox");
        assert!(confirm.await.expect("confirm").is_ack());
    }
    let ch = client.conn.create_channel().await.expect("channel");
    ch.basic_qos(1, BasicQosOptions::default()).await.expect("qos");
    let mut consumer = ch
        .basic_consume(
            inbox.as_str().into(),
            "nacker".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume the inbox");
    let nacker = tokio::spawn(async move {
        let mut returns = 0u32;
        while let Some(Ok(d)) = consumer.next().await {
            returns += 1;
            if d.nack(BasicNackOptions { requeue: true, ..Default::default() }).await.is_err() {
                break;
            }
        }
        returns
    });
    let probe = client.conn.create_channel().await.expect("channel");
    let retry = format!("{prefix}.retry");
    let n = bodies.len() as u32;
    wait_for_async(T, "the inbox dead-letters by its delivery limit", || {
        let (probe, retry) = (&probe, &retry);
        async move { queue_len(probe, retry).await >= n }
    })
    .await;
    let _ = ch.close(200, "done".into()).await;
    let returns = nacker.await.expect("nacker");
    let limit = turnd::broker::INBOX_DELIVERY_LIMIT as u32;
    assert!(returns > limit * n, "{returns} returns for {n} messages, limit {limit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_past_the_delivery_limit_is_parked_invalid_and_answered_once() {
    let mut cluster = Cluster::new().await;
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;
    // "answered" was armed and answered before it came back; "fresh" never was.
    let answered = body("answered");
    client.publish_raw(&answered).await;
    client.wait_for(&["answered".into()], T).await;
    assert!(cluster.daemons[0].terminate(T).await.is_some_and(|s| s.success()));

    let fresh = body("fresh");
    drive_past_the_delivery_limit(&client, &[answered.clone(), fresh.clone()]).await;
    cluster.restart(0).await;

    let rows = wait_parked(&cluster, 2, T).await;
    assert_eq!(rows.len(), 2);
    for (b, (code, reason, message_id, deployment, attempts)) in &rows {
        assert!(*b == answered || *b == fresh, "parked with its body");
        assert_eq!(code, "INVALID_TURN");
        assert!(
            reason.contains("deliveries") && reason.contains("delivery limit"),
            "the reason says why: {reason}"
        );
        assert!(message_id.is_some() && deployment.is_some());
        assert!(
            *attempts as i64 >= turnd::broker::INBOX_DELIVERY_LIMIT,
            "attempts {attempts} count the deliveries"
        );
    }
    client.wait_for(&["fresh".into()], T).await;
    let e = client.event("fresh").unwrap();
    assert_eq!(e.kind(), "error");
    assert_eq!(e.code(), "INVALID_TURN");
    assert!(e.body["error"]["message"].as_str().unwrap_or("").contains("delivery limit"));
    // The turn that had its answer keeps its single terminal event.
    client.drain_for(Duration::from_millis(800)).await;
    let by = client.by_message();
    assert_eq!(by["answered"].len(), 1, "answered once: {:?}", by["answered"]);
    assert_eq!(by["answered"][0].kind(), "reply");
    assert_eq!(by["fresh"].len(), 1);
    let parked_queue = read_parked_queue(&client, 2, T).await;
    for (b, headers) in &parked_queue {
        assert!(*b == answered || *b == fresh);
        assert_eq!(header_str(headers, "x-turnd-code"), "INVALID_TURN");
    }
    let probe = client.conn.create_channel().await.expect("channel");
    assert_eq!(queue_len(&probe, &format!("{}.retry", cluster.prefix)).await, 0, "moved on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbox_declared_without_the_delivery_limit_is_used_with_one_warning() {
    let mut cluster = Cluster::new().await;
    // The inbox as an older turnd declared it: same arguments, no x-delivery-limit and no
    // single active consumer.
    {
        let conn = lapin::Connection::connect(AMQP, lapin::ConnectionProperties::default())
            .await
            .expect("connect");
        let ch = conn.create_channel().await.expect("channel");
        let names = turnd::broker::Names::new(&cluster.prefix);
        let mut args = FieldTable::default();
        for (k, v) in turnd::broker::inbox_arguments(&names).inner() {
            if !["x-delivery-limit", "x-single-active-consumer"].contains(&k.as_str()) {
                args.insert(k.clone(), v.clone());
            }
        }
        ch.queue_declare(names.inbox().as_str().into(), QueueDeclareOptions::durable(), args)
            .await
            .expect("declare the old inbox");
        let _ = conn.close(200, "bye".into()).await;
    }
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;
    let t = turn("a1", "old-inbox", json!({"text": "hi"}));
    client.publish(&t).await;
    client.wait_for(&[mid(&t)], T).await;
    assert_eq!(client.event(&mid(&t)).unwrap().kind(), "reply");
    let log = strip_ansi(&cluster.daemon_log(0));
    assert_eq!(log.matches("has no x-delivery-limit argument").count(), 1, "warned once:\n{log}");
    let advice = log
        .split("rabbitmqctl set_policy ")
        .nth(1)
        .and_then(|rest| rest.split(" --apply-to queues").next())
        .expect("the warning says what to do");

    // Following the advice (under a name of this test's own) gives the old inbox the limit.
    let (name, args) = advice.split_once(' ').expect("name and arguments");
    assert_eq!(name, "turnd-inbox-limit");
    let (pattern, definition) = args.split_once(' ').expect("pattern and definition");
    let policy = Policy(format!("{}-inbox-limit", cluster.prefix));
    let unquote = |s: &str| s.trim_matches('\'').replace("\\\\", "\\");
    let status = std::process::Command::new("rabbitmqctl")
        .args(["set_policy", &policy.0, &unquote(pattern), &unquote(definition)])
        .args(["--apply-to", "queues"])
        .output()
        .expect("rabbitmqctl");
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    assert!(cluster.daemons[0].terminate(T).await.is_some_and(|s| s.success()));
    drive_past_the_delivery_limit(&client, &[body("old-inbox-limited")]).await;
    cluster.restart(0).await;
    client.wait_for(&["old-inbox-limited".into()], T).await;
    assert_eq!(client.event("old-inbox-limited").unwrap().code(), "INVALID_TURN");
    assert!(log.contains("no x-single-active-consumer argument"), "the order caveat is told");

    // README "Upgrading the inbox": once drained, the old inbox is deleted; the running daemon
    // declares it again, with today's arguments (single active consumer included).
    let inbox = format!("{}.inbox", cluster.prefix);
    let ch = client.conn.create_channel().await.expect("channel");
    wait_for_async(T, "the old inbox drained", || async { queue_len(&ch, &inbox).await == 0 })
        .await;
    // (Quorum queues refuse `if-empty`: the operator checks the count, producers paused.)
    ch.queue_delete(inbox.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete the drained old inbox");
    wait_for_async(T, "the daemon declares the inbox again and consumes it", || async {
        let Ok(ch) = client.conn.create_channel().await else { return false };
        let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::durable() };
        let found = ch.queue_declare(inbox.as_str().into(), passive, FieldTable::default()).await;
        if ch.status().connected() {
            let _ = ch.close(200, "checked".into()).await;
        }
        // Consumed means declared and bound (the binding comes first).
        found.is_ok_and(|q| q.consumer_count() > 0)
    })
    .await;
    let ch = client.conn.create_channel().await.expect("channel");
    let names = turnd::broker::Names::new(&cluster.prefix);
    ch.queue_declare(
        inbox.as_str().into(),
        QueueDeclareOptions::durable(),
        turnd::broker::inbox_arguments(&names),
    )
    .await
    .expect("the inbox now has today's arguments");
    let t = turn("a1", "new-inbox", json!({"text": "after the upgrade"}));
    client.publish(&t).await;
    client.wait_for(&[mid(&t)], T).await;
    assert_eq!(client.event(&mid(&t)).unwrap().kind(), "reply");
}

/// A RabbitMQ policy a test set, cleared when the test ends (even by a panic).
struct Policy(String);

impl Drop for Policy {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl").args(["clear_policy", &self.0]).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_turn_whose_delay_queue_vanished_is_not_lost() {
    let mut cluster = Cluster::new().await;
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;
    // An operator deletes the first delay queue: the move comes back unroutable.
    let ch = client.conn.create_channel().await.expect("channel");
    ch.queue_delete(
        format!("{}.retry.1", cluster.prefix).as_str().into(),
        QueueDeleteOptions::default(),
    )
    .await
    .expect("delete retry.1");
    let t = json!({"messageId": "no-org", "agentId": "a1", "conversationId": "c1", "runId": 7, "payload": {}});
    client.publish(&t).await;
    // It goes round every attempt and is parked, not dropped after the first move.
    client.wait_for(&["no-org".into()], T).await;
    assert_eq!(client.event("no-org").unwrap().code(), "MISSING_CONTEXT");
    let rows = wait_parked(&cluster, 1, T).await;
    assert_eq!(rows[0].1.0, "MISSING_CONTEXT");
    assert!(strip_ansi(&cluster.daemon_log(0)).contains("publish returned unroutable"));
    assert!(queue_len(&ch, &format!("{}.retry.1", cluster.prefix)).await == 0, "declared again");
}
