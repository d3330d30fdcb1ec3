//! Publish order across daemons (CONTRACT §4): the turns of one conversation that a producer
//! publishes on one channel, each after the previous one's confirm, are accepted (armed, in
//! `turnd_turns.seq`) in publish order whatever the number of daemons, and across the death
//! of the daemon whose intake is active.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use turnd_harness::*;

const T: Duration = Duration::from_secs(90);
const PRODUCERS: usize = 6;
const CONVERSATIONS_PER_PRODUCER: usize = 5;
const TURNS_PER_CONVERSATION: usize = 12;

/// Each producer's turns, in its publish order: its conversations interleaved round-robin.
/// Also every conversation's turns in publish order.
fn plan(tag: &str) -> (Vec<Vec<Value>>, Vec<Vec<Value>>) {
    let mut producers = Vec::new();
    let mut conversations = Vec::new();
    for p in 0..PRODUCERS {
        let convs: Vec<Vec<Value>> = (0..CONVERSATIONS_PER_PRODUCER)
            .map(|c| {
                let conv = format!("{tag}-p{p}-c{c}");
                (0..TURNS_PER_CONVERSATION)
                    .map(|i| {
                        let mut t = turn("ord", &conv, json!({"text": i}));
                        t["messageId"] = json!(format!("{conv}-{i:02}"));
                        t
                    })
                    .collect()
            })
            .collect();
        let mut order = Vec::new();
        for i in 0..TURNS_PER_CONVERSATION {
            for c in &convs {
                order.push(c[i].clone());
            }
        }
        producers.push(order);
        conversations.extend(convs);
    }
    (producers, conversations)
}

fn active_intakes(cluster: &Cluster) -> Vec<usize> {
    (0..cluster.daemons.len())
        .filter(|i| {
            cluster.daemon_log(*i).contains("intake active: this daemon receives the inbox")
        })
        .collect()
}

async fn start_producers(
    cluster: &Cluster,
    producers: Vec<Vec<Value>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let conn = lapin::Connection::connect(AMQP, lapin::ConnectionProperties::default())
        .await
        .expect("connect RabbitMQ");
    let conn = std::sync::Arc::new(conn);
    producers
        .into_iter()
        .map(|turns| {
            let conn = conn.clone();
            let prefix = cluster.prefix.clone();
            tokio::spawn(async move { publish_confirmed_in_order(&conn, &prefix, &turns).await })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_daemons_accept_each_conversation_in_publish_order() {
    let mut cluster = Cluster::new().await;
    for _ in 0..3 {
        cluster.start_daemon(&[]).await;
    }
    let mut client = cluster.client().await;
    let (producers, conversations) = plan("o");
    let ids: Vec<String> = conversations.iter().flatten().map(mid).collect();
    let started = Instant::now();
    for p in start_producers(&cluster, producers).await {
        p.await.expect("producer");
    }
    client.wait_for(&ids, T).await;
    eprintln!(
        "{} turns over {} conversations answered in {:?}",
        ids.len(),
        conversations.len(),
        started.elapsed()
    );
    let (inversions, missing) = accept_inversions(&cluster.pool, &conversations).await;
    assert!(missing.is_empty(), "not armed: {missing:?}");
    assert!(inversions.is_empty(), "{} inversions: {inversions:#?}", inversions.len());
    for (id, events) in client.by_message() {
        assert_eq!(events.len(), 1, "{id}: {events:?}");
        assert_eq!(events[0].kind(), "reply", "{id}: {:?}", events[0].body);
    }
    // One intake received everything: the broker fed one subscription at a time.
    assert_eq!(active_intakes(&cluster).len(), 1, "one active intake");
    // Workers still spread over the daemons (only intake is single).
    let owners: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT owner FROM turnd_deployments WHERE owner IS NOT NULL")
            .fetch_all(&cluster.pool)
            .await
            .unwrap();
    eprintln!("deployments owned by {owners:?}");
    assert!(owners.len() >= 2, "workers run on more than one daemon: {owners:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_active_intakes_daemon_mid_stream_keeps_order_and_loses_nothing() {
    let mut cluster = Cluster::new().await;
    cluster.set("TURND_TURN__DEADLINE", "2s");
    for _ in 0..3 {
        cluster.start_daemon(&[]).await;
    }
    let mut client = cluster.client().await;
    let (producers, conversations) = plan("k");
    let total = conversations.iter().map(Vec::len).sum::<usize>();
    let ids: Vec<String> = conversations.iter().flatten().map(mid).collect();
    let running = start_producers(&cluster, producers).await;

    // Mid-stream: a third accepted, producers still publishing.
    let pool = cluster.pool.clone();
    wait_for_async(T, "a third of the turns accepted", || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM turnd_turns").fetch_one(&pool).await.unwrap();
        n as usize >= total / 3
    })
    .await;
    let active = active_intakes(&cluster);
    assert_eq!(active.len(), 1, "one active intake before the kill: {active:?}");
    let victim = active[0];
    cluster.daemons[victim].kill();
    // Microseconds since the epoch, on the database's clock (as accepted_at).
    let killed_at: i64 =
        sqlx::query_scalar("SELECT (EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::bigint")
            .fetch_one(&pool)
            .await
            .unwrap();
    let armed_before: i64 =
        sqlx::query_scalar("SELECT count(*) FROM turnd_turns").fetch_one(&pool).await.unwrap();
    eprintln!("killed d{victim} (the active intake) with {armed_before}/{total} turns accepted");
    for p in running {
        p.await.expect("producer");
    }
    client.wait_for(&ids, T).await;
    client.drain_for(Duration::from_millis(2500)).await;

    // Failover: from the kill to the first turn another daemon accepted.
    let first_after: Option<i64> = sqlx::query_scalar(
        "SELECT (EXTRACT(EPOCH FROM min(accepted_at)) * 1000000)::bigint FROM turnd_turns
         WHERE accepted_at > to_timestamp($1::bigint / 1000000.0)",
    )
    .bind(killed_at)
    .fetch_one(&pool)
    .await
    .unwrap();
    let first_after = first_after.expect("turns were accepted after the kill");
    let failover = Duration::from_micros(u64::try_from(first_after - killed_at).unwrap_or(0));
    eprintln!("INTAKE FAILOVER after SIGKILL of the active intake: {failover:?}");
    // The bound README and the contract state.
    assert!(failover < Duration::from_secs(1), "intake failed over in {failover:?}");
    let now_active: Vec<usize> =
        active_intakes(&cluster).into_iter().filter(|i| *i != victim).collect();
    assert_eq!(now_active.len(), 1, "one survivor took the intake over: {now_active:?}");

    let (inversions, missing) = accept_inversions(&cluster.pool, &conversations).await;
    assert!(missing.is_empty(), "lost: {missing:?}");
    assert!(inversions.is_empty(), "{} inversions: {inversions:#?}", inversions.len());
    let by = client.by_message();
    let mut failed = 0;
    for id in &ids {
        let events = by.get(id).unwrap_or_else(|| panic!("{id} unanswered"));
        assert_eq!(events.len(), 1, "{id}: {events:?}");
        if events[0].kind() != "reply" {
            failed += 1;
            assert!(
                ["WORKER_DIED", "TURN_TIMEOUT"].contains(&events[0].code()),
                "{id}: only a turn running on the killed daemon may fail: {:?}",
                events[0].body
            );
        }
    }
    assert!(failed <= conversations.len(), "{failed} failed");
    assert_eq!(cluster.pending().await, 0);
}

/// CONTRACT §6, commit order per deployment whichever daemon committed: events an earlier
/// owner committed and did not publish (its relay held them, e.g. through its own broker
/// outage) come with the take-over, in commit order, so the new owner's relay sends them
/// before anything it commits itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_over_hands_the_earlier_owners_unpublished_events_over_in_commit_order() {
    use turnd::event::Outcome;
    use turnd::store::Store;
    use turnd::turn::{Epoch, parse};

    let cluster = Cluster::new().await;
    let store = Store::from_pool(cluster.pool.clone());
    let turn = |id: &str| {
        let body = json!({"messageId": id, "agentId": "a1", "organizationId": "o1", "conversationId": "handover"});
        parse(body.to_string().as_bytes(), 1 << 20).unwrap()
    };
    let turns: Vec<_> = ["h-1", "h-2", "h-3"].into_iter().map(turn).collect();
    let dep = turns[0].deployment.clone();
    let refs: Vec<_> = turns.iter().collect();
    store.arm(&refs, Duration::from_secs(60)).await.unwrap();
    let reply = |text: &str| {
        Outcome::Reply(
            serde_json::value::RawValue::from_string(json!({"text": text}).to_string()).unwrap(),
        )
    };
    let deadline = Duration::from_secs(60);

    let first = store.take_over(&dep, Epoch::new(1), "old-daemon").await.unwrap();
    assert!(first.unpublished.is_empty(), "nothing committed yet");
    let mut ids = Vec::new();
    for expected in ["h-1", "h-2"] {
        let c = store.claim_next(&dep, Epoch::new(1), deadline).await.unwrap().unwrap();
        assert_eq!(c.envelope.message_id.as_str(), expected);
        let done = store.commit(&c.envelope, Epoch::new(1), &reply(expected)).await.unwrap();
        ids.push(done.expect("the owner's commit").id);
    }

    // The old owner's relay never published them: the next owner gets both, oldest first.
    let second = store.take_over(&dep, Epoch::new(2), "new-daemon").await.unwrap();
    let handed: Vec<(i64, &str)> =
        second.unpublished.iter().map(|c| (c.id, c.event.message_id.as_str())).collect();
    assert_eq!(handed, vec![(ids[0], "h-1"), (ids[1], "h-2")]);
    assert!(second.unpublished.iter().all(|c| c.event.kind == "reply" && !c.event.body.is_empty()));

    // Published ones are not handed over again; the new owner's own commit comes after.
    store.mark_published(&ids[..1]).await.unwrap();
    let c3 = store.claim_next(&dep, Epoch::new(2), deadline).await.unwrap().unwrap();
    let own = store.commit(&c3.envelope, Epoch::new(2), &reply("h-3")).await.unwrap().unwrap();
    assert!(own.id > ids[1], "commit order is outbox id order");
    let third = store.take_over(&dep, Epoch::new(3), "third-daemon").await.unwrap();
    let handed: Vec<&str> = third.unpublished.iter().map(|c| c.event.message_id.as_str()).collect();
    assert_eq!(handed, vec!["h-2", "h-3"]);
}
