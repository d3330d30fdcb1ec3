//! A deep backlog costs each turn what a short one does (DESIGN: a producer may flood one
//! conversation; an outage leaves thousands of turns waiting). Measured in index entries
//! read, from PostgreSQL's own counters: no timing.

use std::time::Duration;

use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use turnd::event::Outcome;
use turnd::store::Store;
use turnd::turn::{Epoch, parse};
use turnd_harness::*;

/// Index entries the statements on `pool`'s one connection have read from turnd_turns'
/// indexes so far. That backend's pending counters are flushed first
/// (`pg_stat_force_next_flush` takes effect once it is idle, before it reads the next query).
async fn index_entries_read(pool: &sqlx::PgPool) -> i64 {
    sqlx::query("SELECT pg_stat_force_next_flush()").execute(pool).await.expect("flush");
    sqlx::query("SELECT pg_stat_clear_snapshot()").execute(pool).await.expect("snapshot");
    sqlx::query_scalar(
        "SELECT coalesce(sum(idx_tup_read), 0)::bigint FROM pg_stat_user_indexes
         WHERE relname = 'turnd_turns'",
    )
    .fetch_one(pool)
    .await
    .expect("pg_stat_user_indexes")
}

/// PostgreSQL plans the turn path's statements from its statistics, and ANALYZE nearly always
/// sees a table of tombstones with nothing pending (it runs once a burst has drained). The
/// plans that look cheapest then — a scan of a partial index "known" to be empty — read every
/// pending turn once a backlog comes back: each claim and commit O(backlog), a drain
/// quadratic. Here 2,000 turns wait on one conversation and 1,000 on others, the statistics
/// say none do, and 20 turns are committed and claimed the way an owner does (custom plans
/// first, then the generic one each connection settles on): each must read a handful of
/// index entries, not thousands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_and_a_commit_read_a_few_index_entries_whatever_the_backlog_and_the_statistics() {
    let cluster = Cluster::new().await;
    // One connection: every statement below runs on the backend whose counters are read.
    let pool =
        PgPoolOptions::new().max_connections(1).connect(&cluster.db_url).await.expect("connect");
    let store = Store::from_pool(pool.clone());
    sqlx::query(
        "INSERT INTO turnd_turns (deployment, message_id, state, agent_id, conversation_key,
                                  deadline, done_at)
         SELECT 'old-' || (i % 100), 'old-' || i, 'done', 'a', 'k', now(), now()
         FROM generate_series(1, 5000) i",
    )
    .execute(&pool)
    .await
    .expect("tombstones");
    sqlx::query("ANALYZE turnd_turns").execute(&pool).await.expect("analyze");

    let turn = |conversation: &str, i: usize| {
        let body = json!({"messageId": format!("{conversation}-{i}"), "agentId": "a1",
            "organizationId": "o1", "conversationId": conversation});
        parse(body.to_string().as_bytes(), 1 << 20).expect("valid turn")
    };
    let deep: Vec<_> = (0..2000).map(|i| turn("deep", i)).collect();
    let others: Vec<_> = (0..1000).map(|i| turn(&format!("other{}", i % 50), i)).collect();
    let wait = Duration::from_secs(3600);
    for chunk in deep.chunks(500).chain(others.chunks(500)) {
        let refs: Vec<_> = chunk.iter().collect();
        store.arm(&refs, wait).await.expect("arm");
    }
    let dep = deep[0].deployment.clone();
    let epoch = Epoch::new(1);
    store.take_over(&dep, epoch, "d").await.expect("take over");

    let before = index_entries_read(&pool).await;
    let deadline = Duration::from_secs(600);
    let mut running = store.claim_next(&dep, epoch, deadline).await.expect("claim");
    for i in 0..20 {
        let claimed = running.take().expect("a queued turn to claim");
        assert_eq!(claimed.envelope.message_id.as_str(), format!("deep-{i}"), "in accept order");
        let reply = serde_json::value::to_raw_value(&json!({"text": "ok"})).expect("json");
        let next = store
            .commit_and_claim(
                &dep,
                Some((&claimed.envelope, &Outcome::Reply(reply))),
                epoch,
                Some(deadline),
            )
            .await
            .expect("commit and claim");
        assert!(next.committed.is_some(), "turn {i} committed");
        running = next.claimed;
    }
    let read = index_entries_read(&pool).await - before;
    // Measured: 102 in all. Before migration 0006: 186,118 (about 8,900 per statement).
    assert!(read <= 21 * 25, "21 statements read {read} index entries with 3,000 turns pending");
}
