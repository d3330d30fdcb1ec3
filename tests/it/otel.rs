//! OpenTelemetry end to end (issue 20 item 1): a turn's trace context comes from the producer
//! (AMQP headers, else `platformMetadata`), reaches the worker and the terminal event, and
//! every stage's span arrives at an OTLP collector in one trace per turn, with the right
//! parents — also when the worker crashes and when another daemon adopts the turn.

use std::collections::HashMap;
use std::time::Duration;

use lapin::types::FieldTable;
use serde_json::{Value, json};
use turnd_harness::*;

const T: Duration = Duration::from_secs(30);

/// The six spans of a turn a worker answered.
const ANSWERED: &[&str] =
    &["turnd.intake", "turnd.arm", "turnd.claim", "turnd.worker", "turnd.commit", "turnd.relay"];

/// A producer's span: (trace id, span id, traceparent).
fn producer_context() -> (String, String, String) {
    let trace = uuid::Uuid::new_v4().simple().to_string();
    let span = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    let tp = format!("00-{trace}-{span}-01");
    (trace, span, tp)
}

fn trace_headers(traceparent: &str) -> FieldTable {
    let mut h = FieldTable::default();
    h.insert("traceparent".into(), turnd::broker::long_string(traceparent));
    h.insert("tracestate".into(), turnd::broker::long_string("vendor=abc"));
    h
}

/// A cluster whose daemons export to `receiver` promptly and log JSON.
async fn traced_cluster(receiver: &OtlpReceiver) -> Cluster {
    let mut cluster = Cluster::new().await;
    cluster.set("TURND_OTEL__ENDPOINT", &receiver.endpoint());
    // The SDK's batch delay (milliseconds), read from the standard variable: spans arrive
    // within a test's patience rather than the default 5 s.
    cluster.set("OTEL_BSP_SCHEDULE_DELAY", "100");
    cluster.set("TURND_LOG__FORMAT", "json");
    cluster
}

/// Asserts the chain of an answered turn and returns its spans by name.
fn assert_answered_chain(spans: &HashMap<String, ReceivedSpan>, trace: &str, producer: &str) {
    for name in ANSWERED {
        assert_eq!(spans[*name].trace_id, trace, "{name} is in the producer's trace");
    }
    let parent = |child: &str, parent: &str| {
        assert_eq!(
            spans[child].parent_span_id, spans[parent].span_id,
            "{child}'s parent is {parent}: {spans:#?}"
        );
    };
    assert_eq!(spans["turnd.intake"].parent_span_id, producer, "intake hangs off the producer");
    parent("turnd.arm", "turnd.intake");
    parent("turnd.claim", "turnd.intake");
    parent("turnd.worker", "turnd.claim");
    parent("turnd.commit", "turnd.worker");
    parent("turnd.relay", "turnd.commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_is_one_trace_from_the_producer_through_the_worker_to_the_event() {
    let receiver = OtlpReceiver::start().await;
    let mut cluster = traced_cluster(&receiver).await;
    let port = free_port();
    cluster.start_daemon(&[("TURND_HTTP__LISTEN", &format!("127.0.0.1:{port}"))]).await;
    let mut client = cluster.client().await;

    // 1. Context in the AMQP headers.
    let (trace, producer, tp) = producer_context();
    let t = turn("ot", "headers", json!({"action": "echo"}));
    let id = mid(&t);
    client.publish_with_headers(&t, trace_headers(&tp)).await;
    client.wait_for(std::slice::from_ref(&id), T).await;
    let spans = receiver.wait_turn(&id, ANSWERED, T).await;
    assert_answered_chain(&spans, &trace, &producer);
    let dep = deployment_of(&t);
    for name in ["turnd.claim", "turnd.worker", "turnd.commit"] {
        let a = &spans[name].attributes;
        assert_eq!(a.get("deployment"), Some(&dep), "{name}: {a:?}");
        assert!(a.get("epoch").is_some_and(|e| e.parse::<i64>().unwrap() > 0), "{name}: {a:?}");
    }
    assert_eq!(spans["turnd.intake"].attributes.get("deployment"), Some(&dep));
    assert_eq!(spans["turnd.commit"].attributes.get("kind").map(String::as_str), Some("reply"));

    // The worker got its span's context (and the producer's tracestate) in the envelope.
    let event = client.event(&id).unwrap().clone();
    let line: Value =
        serde_json::from_str(event.body["payload"]["line"].as_str().unwrap()).unwrap();
    let worker = &spans["turnd.worker"];
    assert_eq!(
        line["traceparent"].as_str(),
        Some(format!("00-{trace}-{}-01", worker.span_id).as_str()),
        "the envelope: {line}"
    );
    assert_eq!(line["tracestate"], "vendor=abc");
    assert_eq!(line["turn"]["messageId"], id.as_str());
    // The event's headers carry the relay span's context.
    let relay = &spans["turnd.relay"];
    assert_eq!(event.traceparent, Some(format!("00-{trace}-{}-01", relay.span_id)));

    // JSON log lines inside the turn's spans carry its trace id.
    let log = cluster.daemon_log(0);
    let committed = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["message"] == "turn committed" && l["message_id"] == id.as_str())
        .unwrap_or_else(|| panic!("no JSON \"turn committed\" line for {id} in:\n{log}"));
    assert_eq!(committed["span"]["trace_id"], trace.as_str(), "{committed}");

    // 2. Context in platformMetadata only (where the replaced orchestrator puts it).
    let (trace2, producer2, tp2) = producer_context();
    let mut t2 = turn("ot", "metadata", json!({"action": "reply"}));
    t2["platformMetadata"] = json!({"traceparent": tp2, "channel": "x"});
    let id2 = mid(&t2);
    client.publish(&t2).await;
    client.wait_for(std::slice::from_ref(&id2), T).await;
    let spans2 = receiver.wait_turn(&id2, ANSWERED, T).await;
    assert_answered_chain(&spans2, &trace2, &producer2);

    // 3. Headers win over platformMetadata; 4. no context at all: turnd starts the trace.
    let (trace3, producer3, tp3) = producer_context();
    let (_, _, ignored) = producer_context();
    let mut t3 = turn("ot", "both", json!({"action": "reply"}));
    t3["platformMetadata"] = json!({"traceparent": ignored});
    let id3 = mid(&t3);
    client.publish_with_headers(&t3, trace_headers(&tp3)).await;
    let t4 = turn("ot", "none", json!({"action": "reply"}));
    let id4 = mid(&t4);
    client.publish(&t4).await;
    client.wait_for(&[id3.clone(), id4.clone()], T).await;
    assert_answered_chain(&receiver.wait_turn(&id3, ANSWERED, T).await, &trace3, &producer3);
    let spans4 = receiver.wait_turn(&id4, ANSWERED, T).await;
    let trace4 = spans4["turnd.intake"].trace_id.clone();
    assert_eq!(trace4.len(), 32);
    assert_answered_chain(&spans4, &trace4, "");

    // One trace per turn, and nothing else of the turn's outside it.
    for (id, trace) in [(&id, &trace), (&id2, &trace2), (&id3, &trace3), (&id4, &trace4)] {
        let of_turn = receiver.of_turn(id);
        assert!(of_turn.iter().all(|s| &s.trace_id == trace), "{id}: {of_turn:#?}");
        assert_eq!(of_turn.len(), ANSWERED.len(), "each stage once for {id}: {of_turn:#?}");
    }
    // Export is counted; nothing was dropped.
    let (status, metrics) = http_get(port, "/metrics").await.expect("metrics");
    assert_eq!(status, 200);
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in:\n{metrics}"))
    };
    assert!(value("turnd_otel_spans_exported_total") >= 24.0, "{metrics}");
    assert_eq!(value("turnd_otel_spans_dropped_total"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_crash_keeps_each_turn_in_its_own_trace() {
    let receiver = OtlpReceiver::start().await;
    let mut cluster = traced_cluster(&receiver).await;
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;

    let (trace1, producer1, tp1) = producer_context();
    let (trace2, producer2, tp2) = producer_context();
    let (trace3, producer3, tp3) = producer_context();
    let crash = turn("oc", "crashing", json!({"action": "crash"}));
    let queued = turn("oc", "crashing", json!({"action": "reply"}));
    let after = turn("oc", "crashing", json!({"action": "reply"}));
    let (id1, id2, id3) = (mid(&crash), mid(&queued), mid(&after));
    client.publish_with_headers(&crash, trace_headers(&tp1)).await;
    client.publish_with_headers(&queued, trace_headers(&tp2)).await;
    client.wait_for(&[id1.clone(), id2.clone()], T).await;
    // The crash fails every pending turn of the deployment (CONTRACT §6, WORKER_DIED)...
    assert_eq!(client.event(&id1).unwrap().code(), "WORKER_DIED");
    assert_eq!(client.event(&id2).unwrap().code(), "WORKER_DIED");
    // ...and the next turn gets a fresh worker.
    client.publish_with_headers(&after, trace_headers(&tp3)).await;
    client.wait_for(std::slice::from_ref(&id3), T).await;
    assert_eq!(client.event(&id3).unwrap().kind(), "reply");

    // The crashed turn: no commit span (nobody answered); its event's relay span hangs off
    // the context stored with the turn, its intake span.
    let failed: &[&str] =
        &["turnd.intake", "turnd.arm", "turnd.claim", "turnd.worker", "turnd.relay"];
    let spans1 = receiver.wait_turn(&id1, failed, T).await;
    for name in failed {
        assert_eq!(spans1[*name].trace_id, trace1, "{name}");
    }
    assert_eq!(spans1["turnd.intake"].parent_span_id, producer1);
    assert_eq!(spans1["turnd.claim"].parent_span_id, spans1["turnd.intake"].span_id);
    assert_eq!(spans1["turnd.worker"].parent_span_id, spans1["turnd.claim"].span_id);
    assert!(spans1["turnd.worker"].error, "the crashed worker's span is an error");
    assert_eq!(spans1["turnd.relay"].parent_span_id, spans1["turnd.intake"].span_id);
    let e1 = client.event(&id1).unwrap();
    assert_eq!(e1.traceparent, Some(format!("00-{trace1}-{}-01", spans1["turnd.relay"].span_id)));
    // The turn queued behind it never ran: intake, arm and relay, in its own trace.
    let spans2 = receiver.wait_turn(&id2, &["turnd.intake", "turnd.arm", "turnd.relay"], T).await;
    assert_eq!(spans2["turnd.intake"].parent_span_id, producer2);
    assert_eq!(spans2["turnd.relay"].trace_id, trace2);
    assert_eq!(spans2["turnd.relay"].parent_span_id, spans2["turnd.intake"].span_id);

    // The turn after the crash, answered by a fresh worker, is a whole chain in its own trace.
    let spans3 = receiver.wait_turn(&id3, ANSWERED, T).await;
    assert_answered_chain(&spans3, &trace3, &producer3);
    assert!(!spans3["turnd.worker"].error);
    for (id, trace, n) in [(&id1, &trace1, 5), (&id2, &trace2, 3), (&id3, &trace3, 6)] {
        let of_turn = receiver.of_turn(id);
        assert!(of_turn.iter().all(|s| &s.trace_id == trace), "{id}: {of_turn:#?}");
        assert_eq!(of_turn.len(), n, "{id}: {of_turn:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_turn_stays_in_its_trace() {
    let receiver = OtlpReceiver::start().await;
    let mut cluster = traced_cluster(&receiver).await;
    // The hung turn must still be running when d0 dies, however slow the second start is.
    cluster.set("TURND_TURN__DEADLINE", "120s");
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;

    let (trace1, _, tp1) = producer_context();
    let (trace2, producer2, tp2) = producer_context();
    let hung = turn("oa", "adopted", json!({"action": "hang"}));
    let queued = turn("oa", "adopted", json!({"action": "reply"}));
    let (id1, id2) = (mid(&hung), mid(&queued));
    let dep = deployment_of(&hung);
    client.publish_with_headers(&hung, trace_headers(&tp1)).await;
    wait_until(T, "the hung turn running on d0", || {
        cluster.worker_log(&dep).iter().any(|l| l[0] == "turn")
    })
    .await;
    cluster.start_daemon(&[]).await;
    client.publish_with_headers(&queued, trace_headers(&tp2)).await;
    // d0 took both in (its intake is the active one) and exported their intake spans.
    let before = receiver.wait_turn(&id2, &["turnd.intake", "turnd.arm"], T).await;
    assert_eq!(before["turnd.intake"].instance, "d0");
    receiver.wait_turn(&id1, &["turnd.intake", "turnd.claim"], T).await;

    cluster.daemons[0].kill();
    client.wait_for(&[id1.clone(), id2.clone()], T).await;
    assert!(["WORKER_DIED", "TURN_TIMEOUT"].contains(&client.event(&id1).unwrap().code()));
    assert_eq!(client.event(&id2).unwrap().kind(), "reply");

    // The queued turn was claimed, run, committed and relayed by d1, in the producer's trace,
    // under the intake span d0 stored with it.
    let spans2 = receiver.wait_turn(&id2, ANSWERED, T).await;
    assert_answered_chain(&spans2, &trace2, &producer2);
    for name in ["turnd.claim", "turnd.worker", "turnd.commit"] {
        assert_eq!(spans2[name].instance, "d1", "{name} ran on the adopter");
    }
    assert_eq!(spans2["turnd.intake"].span_id, before["turnd.intake"].span_id);
    // The turn that died with d0: its event, published by d1, continues its trace too.
    let spans1 = receiver.wait_turn(&id1, &["turnd.intake", "turnd.relay"], T).await;
    assert_eq!(spans1["turnd.relay"].trace_id, trace1);
    assert_eq!(spans1["turnd.relay"].parent_span_id, spans1["turnd.intake"].span_id);
    assert_eq!(spans1["turnd.relay"].instance, "d1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_contexts_still_travel() {
    let mut cluster = Cluster::new().await;
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;
    let (trace, producer, tp) = producer_context();
    let t = turn("on", "off", json!({"action": "echo"}));
    let id = mid(&t);
    client.publish_with_headers(&t, trace_headers(&tp)).await;
    client.wait_for(std::slice::from_ref(&id), T).await;
    let event = client.event(&id).unwrap().clone();
    let line: Value =
        serde_json::from_str(event.body["payload"]["line"].as_str().unwrap()).unwrap();
    let to_worker = line["traceparent"].as_str().unwrap();
    assert!(to_worker.starts_with(&format!("00-{trace}-")), "{line}");
    assert!(!to_worker.contains(&producer), "the worker gets turnd's span, not the producer's");
    let on_event = event.traceparent.expect("the event carries a traceparent");
    assert!(on_event.starts_with(&format!("00-{trace}-")), "{on_event}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_turns_error_event_continues_the_producers_trace() {
    let receiver = OtlpReceiver::start().await;
    let mut cluster = traced_cluster(&receiver).await;
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;
    let (trace, producer, tp) = producer_context();
    let mut bad = turn("op", "parked", json!({}));
    bad["runId"] = json!(0); // invalid, but identifiable: it gets an error event
    let id = mid(&bad);
    client.publish_with_headers(&bad, trace_headers(&tp)).await;
    client.wait_for(std::slice::from_ref(&id), T).await;
    let event = client.event(&id).unwrap().clone();
    assert_eq!(event.code(), "INVALID_TURN");
    let spans = receiver.wait_turn(&id, &["turnd.relay"], T).await;
    assert_eq!(spans["turnd.relay"].trace_id, trace);
    assert_eq!(spans["turnd.relay"].parent_span_id, producer);
    assert_eq!(event.traceparent, Some(format!("00-{trace}-{}-01", spans["turnd.relay"].span_id)));
}

/// The context travels through PostgreSQL: armed with the turn, handed to its claimer, kept
/// with its event for whichever daemon's catch-up publishes it, and dropped once done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_context_is_stored_with_the_turn_and_its_event() {
    use turnd::event::Outcome;
    use turnd::otel::TraceContext;
    use turnd::store::Store;
    use turnd::turn::{Epoch, ErrorCode, parse};

    let cluster = Cluster::new().await;
    let store = Store::from_pool(cluster.pool.clone());
    let (_, _, tp) = producer_context();
    let (_, _, committed_tp) = producer_context();
    let stored = TraceContext::parse(&tp, Some("vendor=abc")).unwrap();
    let committed = TraceContext::parse(&committed_tp, None).unwrap();
    let body = |id: &str| {
        json!({"messageId": id, "agentId": "a1", "organizationId": "o1", "conversationId": "db"})
            .to_string()
    };
    let mut t1 = parse(body("s-1").as_bytes(), 1 << 20).unwrap();
    let mut t2 = parse(body("s-2").as_bytes(), 1 << 20).unwrap();
    t1.trace = Some(stored.clone());
    t2.trace = Some(stored.clone());
    let dep = t1.deployment.clone();
    store.arm(&[&t1, &t2], Duration::from_secs(60)).await.unwrap();
    let epoch = Epoch::new(1);
    store.take_over(&dep, epoch, "d").await.unwrap();
    let mut c1 = store.claim_next(&dep, epoch, Duration::from_secs(60)).await.unwrap().unwrap();
    assert_eq!(c1.envelope.trace.as_ref(), Some(&stored), "the claimer gets the stored context");

    // A worker's answer: the event keeps the commit span's context.
    c1.envelope.trace = Some(committed.clone());
    let payload = serde_json::value::RawValue::from_string("1".into()).unwrap();
    store.commit(&c1.envelope, epoch, &Outcome::Reply(payload)).await.unwrap().unwrap();
    // A fail path: the event keeps the turn's stored context.
    let outcome = |_: &str| Outcome::error(ErrorCode::WorkerDied, "gone");
    let failed = store.fail_pending(&dep, epoch, false, &outcome).await.unwrap();
    assert_eq!(failed[0].event.trace.as_ref(), Some(&stored));

    // Another daemon's catch-up reads both contexts from the outbox.
    let (tx, rows) = store.lock_unpublished(Duration::ZERO, 10).await.unwrap();
    let by_id: HashMap<&str, Option<&TraceContext>> =
        rows.iter().map(|r| (r.message_id.as_str(), r.trace.as_ref())).collect();
    assert_eq!(by_id["s-1"], Some(&committed));
    assert_eq!(by_id["s-2"], Some(&stored));
    drop(tx);

    // Done turns keep no context (tombstones stay small).
    let left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM turnd_turns WHERE traceparent IS NOT NULL OR tracestate IS NOT NULL",
    )
    .fetch_one(&cluster.pool)
    .await
    .unwrap();
    assert_eq!(left, 0);
}

/// A collector that does not answer never slows a turn: export waits on the SDK's thread, and
/// what does not fit the bounded queue is dropped and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_collector_never_slows_a_turn_and_drops_are_counted() {
    let receiver = OtlpReceiver::stalled(Duration::from_secs(60)).await;
    let mut cluster = traced_cluster(&receiver).await;
    cluster.set("TURND_OTEL__QUEUE_SIZE", "4");
    let port = free_port();
    cluster.start_daemon(&[("TURND_HTTP__LISTEN", &format!("127.0.0.1:{port}"))]).await;
    let mut client = cluster.client().await;
    // Warm up: the worker is spawned and the first export is stuck in the collector.
    client.ask(&turn("os", "stalled", json!({})), T).await;
    let turns: Vec<Value> = (0..10).map(|_| turn("os", "stalled", json!({}))).collect();
    let ids: Vec<String> = turns.iter().map(mid).collect();
    let started = std::time::Instant::now();
    for t in &turns {
        client.publish(t).await;
    }
    client.wait_for(&ids, T).await;
    let took = started.elapsed();
    // An export waiting on the collector would hold each turn for the export timeout (5 s).
    assert!(took < Duration::from_secs(5), "10 turns took {took:?} with a stalled collector");
    let (_, metrics) = http_get(port, "/metrics").await.expect("metrics");
    let dropped = metrics
        .lines()
        .find_map(|l| l.strip_prefix("turnd_otel_spans_dropped_total")?.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no drop counter in:\n{metrics}"));
    assert!(dropped > 0.0, "66 spans through a queue of 4 with a stalled collector: {metrics}");
    eprintln!("10 turns in {took:?} with a stalled collector; {dropped} spans dropped");
}
