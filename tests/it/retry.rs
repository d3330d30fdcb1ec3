//! Refused turns on any RabbitMQ from 3.10 to 4.x (CONTRACT §3a, §4): attempts are counted in
//! `x-turnd-attempt`, never from the broker's `x-death` (which 4.0+ ignores when a client
//! publishes it, and which a producer can forge); the delay rides on each message, so a
//! restart with other `intake.retry_delay`, `retry_max_delay` or `max_attempts` never makes a
//! declaration fail, and delay queues that an older turnd declared with a TTL still work.

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
use serde_json::{Value, json};
use turnd_harness::*;

const T: Duration = Duration::from_secs(60);

/// A snapshot turn (runId) without organizationId: refused, then parked MISSING_CONTEXT.
fn refused_turn(id: &str) -> Value {
    json!({"messageId": id, "agentId": "a1", "conversationId": format!("c-{id}"), "runId": 7,
           "payload": {"text": id}})
}

fn refusals_logged(cluster: &Cluster, id: &str) -> usize {
    (0..cluster.daemons.len())
        .map(|i| {
            strip_ansi(&cluster.daemon_log(i))
                .lines()
                .filter(|l| l.contains("refused: missing context") && l.contains(id))
                .count()
        })
        .sum()
}

async fn parked_attempts(cluster: &Cluster, id: &str) -> (String, i32) {
    let rows = wait_for_value(T, &format!("{id} parked"), || async {
        parked(cluster).await.into_iter().find(|(_, row)| row.2.as_deref() == Some(id))
    })
    .await;
    (rows.1.0, rows.1.4)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_with_other_delays_and_attempts_never_fail_a_declaration_and_still_park() {
    let mut cluster = Cluster::new().await;
    // First run: 5 attempts, a long first delay so the turn is still waiting at the restart.
    cluster.set("TURND_INTAKE__MAX_ATTEMPTS", "5");
    cluster.set("TURND_INTAKE__RETRY_DELAY", "3s");
    cluster.set("TURND_INTAKE__RETRY_MAX_DELAY", "10s");
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;
    client.publish(&refused_turn("r-across")).await;
    wait_until(T, "refused once", || refusals_logged(&cluster, "r-across") == 1).await;
    let probe = client.conn.create_channel().await.expect("channel");
    let delay1 = format!("{}.retry.1", cluster.prefix);
    wait_for_async(T, "waiting in retry.1", || async { queue_len(&probe, &delay1).await == 1 })
        .await;
    assert!(cluster.daemons[0].terminate(T).await.is_some_and(|s| s.success()));

    // Second run: other delays and fewer attempts. It starts (no PRECONDITION_FAILED), and
    // the waiting turn, back after its 3 s, is refused a second time: with max_attempts 2
    // that parks it.
    cluster
        .start_daemon(&[
            ("TURND_INTAKE__MAX_ATTEMPTS", "2"),
            ("TURND_INTAKE__RETRY_DELAY", "100ms"),
            ("TURND_INTAKE__RETRY_MAX_DELAY", "150ms"),
        ])
        .await;
    client.wait_for(&["r-across".into()], T).await;
    assert_eq!(client.event("r-across").unwrap().code(), "MISSING_CONTEXT");
    assert_eq!(parked_attempts(&cluster, "r-across").await, ("MISSING_CONTEXT".into(), 2));
    client.publish(&refused_turn("r-second")).await;
    client.wait_for(&["r-second".into()], T).await;
    assert_eq!(parked_attempts(&cluster, "r-second").await, ("MISSING_CONTEXT".into(), 2));
    assert!(cluster.daemons[1].terminate(T).await.is_some_and(|s| s.success()));

    // Third run: more attempts than before (new delay queues) and other delays again.
    cluster
        .start_daemon(&[
            ("TURND_INTAKE__MAX_ATTEMPTS", "4"),
            ("TURND_INTAKE__RETRY_DELAY", "50ms"),
            ("TURND_INTAKE__RETRY_MAX_DELAY", "80ms"),
        ])
        .await;
    client.publish(&refused_turn("r-third")).await;
    client.wait_for(&["r-third".into()], T).await;
    assert_eq!(parked_attempts(&cluster, "r-third").await, ("MISSING_CONTEXT".into(), 4));
    assert_eq!(refusals_logged(&cluster, "r-third"), 3, "refused 3 times, parked on the 4th");
    for i in 0..cluster.daemons.len() {
        let log = strip_ansi(&cluster.daemon_log(i));
        assert!(!log.contains("PRECONDITION_FAILED"), "d{i} had a declaration refused:\n{log}");
    }
    client.drain_for(Duration::from_millis(500)).await;
    for (id, events) in client.by_message() {
        assert_eq!(events.len(), 1, "{id}: one terminal event");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_queues_an_older_turnd_declared_with_a_ttl_are_used_with_one_warning() {
    let mut cluster = Cluster::new().await;
    cluster.set("TURND_INTAKE__MAX_ATTEMPTS", "3");
    // retry.1 and retry.2 as an older turnd declared them: a fixed TTL (longer than today's
    // delays) and the dead-letter exchange.
    {
        let conn = lapin::Connection::connect(AMQP, lapin::ConnectionProperties::default())
            .await
            .expect("connect");
        let ch = conn.create_channel().await.expect("channel");
        for (k, ttl) in [(1, 60_000i64), (2, 60_000)] {
            let mut args = FieldTable::default();
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
            args.insert(
                "x-dead-letter-exchange".into(),
                turnd::broker::long_string(&format!("{}.turns", cluster.prefix)),
            );
            ch.queue_declare(
                format!("{}.retry.{k}", cluster.prefix).as_str().into(),
                QueueDeclareOptions::durable(),
                args,
            )
            .await
            .expect("declare an old delay queue");
        }
        let _ = conn.close(200, "bye".into()).await;
    }
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;
    client.publish(&refused_turn("r-old-ttl")).await;
    // Today's delays (200 ms, 400 ms) are shorter than the old TTL: they decide.
    client.wait_for(&["r-old-ttl".into()], Duration::from_secs(20)).await;
    assert_eq!(parked_attempts(&cluster, "r-old-ttl").await, ("MISSING_CONTEXT".into(), 3));
    let log = strip_ansi(&cluster.daemon_log(0));
    assert_eq!(
        log.matches("a delay queue exists with other arguments").count(),
        1,
        "warned once:\n{log}"
    );
}

/// An `x-death` entry as RabbitMQ writes one.
fn death(queue: &str, reason: &str, count: i64) -> AMQPValue {
    let mut t = FieldTable::default();
    t.insert("queue".into(), AMQPValue::LongString(LongString::from(queue.as_bytes().to_vec())));
    t.insert("reason".into(), AMQPValue::LongString(LongString::from(reason.as_bytes().to_vec())));
    t.insert("count".into(), AMQPValue::LongLongInt(count));
    t.insert("exchange".into(), AMQPValue::LongString(LongString::from(b"".to_vec())));
    AMQPValue::FieldTable(t)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_x_death_headers_do_not_change_the_count_of_attempts() {
    const MAX_ATTEMPTS: i32 = 4;
    let mut cluster = Cluster::new().await;
    cluster.set("TURND_INTAKE__MAX_ATTEMPTS", &MAX_ATTEMPTS.to_string());
    cluster.start_daemon(&[]).await;
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;
    let inbox = format!("{}.inbox", cluster.prefix);
    // A producer (or a shovel from a 4.x broker that dropped the real ones) sends x-death
    // claiming 40 refusals by the inbox; another claims none at all but a foreign queue's.
    let mut many = FieldTable::default();
    many.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![death(&inbox, "rejected", 40)])),
    );
    many.insert("x-first-death-queue".into(), turnd::broker::long_string(&inbox));
    many.insert("x-first-death-reason".into(), turnd::broker::long_string("rejected"));
    let mut foreign = FieldTable::default();
    foreign.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![death("elsewhere", "expired", 3)])),
    );
    client.publish_with_headers(&refused_turn("forged-many"), many).await;
    client.publish_with_headers(&refused_turn("forged-foreign"), foreign).await;
    let ids = ["forged-many".to_owned(), "forged-foreign".to_owned()];
    client.wait_for(&ids, T).await;
    for id in &ids {
        assert_eq!(client.event(id).unwrap().code(), "MISSING_CONTEXT");
        assert_eq!(
            parked_attempts(&cluster, id).await,
            ("MISSING_CONTEXT".into(), MAX_ATTEMPTS),
            "{id}: parked on its {MAX_ATTEMPTS}th refusal, whatever x-death said"
        );
        assert_eq!(
            refusals_logged(&cluster, id),
            (MAX_ATTEMPTS - 1) as usize,
            "{id}: refused once per attempt before the last, across both daemons"
        );
    }
    // The parked copy carries turnd's own count.
    let parked_queue = read_parked_queue(&client, 2, T).await;
    for (_, headers) in &parked_queue {
        assert_eq!(
            headers.inner().get("x-turnd-attempt"),
            Some(&AMQPValue::LongLongInt(i64::from(MAX_ATTEMPTS)))
        );
    }
}

/// Intake settles a batch with one multiple ack of its last accepted delivery, after nacking
/// its refusals one by one. A refusal between (and after) accepted turns of one batch must
/// still be refused — dead-lettered, retried, parked — and never swept up by that ack; every
/// accepted turn is answered once, and nothing stays unacknowledged in the inbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_inside_one_batch_are_refused_and_the_turns_around_them_answered_once() {
    let mut cluster = Cluster::new().await;
    cluster.set("TURND_INTAKE__MAX_ATTEMPTS", "2");
    cluster.set("TURND_INTAKE__RETRY_DELAY", "100ms");
    cluster.set("TURND_INTAKE__RETRY_MAX_DELAY", "150ms");
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;
    // Published while no daemon runs, so that intake's first batch holds them all, interleaved.
    assert!(cluster.daemons[0].terminate(T).await.is_some_and(|s| s.success()));
    let (mut accepted, mut refused) = (Vec::new(), Vec::new());
    for i in 0..12 {
        let t = turn("a1", &format!("c{}", i % 3), json!({"text": i}));
        accepted.push(mid(&t));
        client.publish(&t).await;
        if i % 4 == 1 || i == 11 {
            let id = format!("r{i}-in-a-batch");
            client.publish(&refused_turn(&id)).await;
            refused.push(id);
        }
    }
    let probe = client.conn.create_channel().await.expect("channel");
    let inbox = format!("{}.inbox", cluster.prefix);
    assert_eq!(queue_len(&probe, &inbox).await, 16, "all waiting for one batch");
    cluster.start_daemon(&[]).await;

    let all: Vec<String> = accepted.iter().chain(&refused).cloned().collect();
    client.wait_for(&all, T).await;
    for id in &accepted {
        assert_eq!(client.event(id).unwrap().kind(), "reply", "{id}");
    }
    for id in &refused {
        assert_eq!(client.event(id).unwrap().code(), "MISSING_CONTEXT", "{id}");
        assert_eq!(parked_attempts(&cluster, id).await, ("MISSING_CONTEXT".into(), 2), "{id}");
        assert_eq!(refusals_logged(&cluster, id), 1, "{id}: refused once, parked on the 2nd");
    }
    client.drain_for(Duration::from_millis(500)).await;
    for (id, events) in client.by_message() {
        assert_eq!(events.len(), 1, "{id}: one terminal event");
    }
    // A delivery never settled goes back to the inbox when its channel closes.
    assert!(cluster.daemons[1].terminate(T).await.is_some_and(|s| s.success()));
    assert_eq!(queue_len(&probe, &inbox).await, 0, "every delivery settled");
}
