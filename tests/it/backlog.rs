//! A deep backlog costs each turn what a short one does (DESIGN: a producer may flood one
//! conversation; an outage leaves thousands of turns waiting; a conversation keeps its answered
//! turns for reply.retention). Measured in rows read, from PostgreSQL's own counters: no
//! timing.

use std::time::Duration;

use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use turnd::event::Outcome;
use turnd::store::Store;
use turnd::turn::{Epoch, ErrorCode, parse};
use turnd_harness::*;

/// Rows the statements on `pool`'s one connection have read from turnd_turns so far: index
/// entries, and rows of sequential scans. That backend's pending counters are flushed first
/// (`pg_stat_force_next_flush` takes effect once it is idle, before it reads the next query).
async fn rows_read(pool: &sqlx::PgPool) -> i64 {
    sqlx::query("SELECT pg_stat_force_next_flush()").execute(pool).await.expect("flush");
    sqlx::query("SELECT pg_stat_clear_snapshot()").execute(pool).await.expect("snapshot");
    sqlx::query_scalar(
        "SELECT ((SELECT coalesce(sum(idx_tup_read), 0) FROM pg_stat_user_indexes
                 WHERE relname = 'turnd_turns')
              + (SELECT coalesce(sum(seq_tup_read), 0) FROM pg_stat_user_tables
                 WHERE relname = 'turnd_turns'))::bigint",
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
/// say none do; the deep one is taken over (with 5,000 answered turns of its own still
/// retained) and 20 of its turns are committed and claimed the way an owner does (custom plans
/// first, then the generic one each connection settles on): each statement must read a
/// handful of rows, not thousands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_over_a_claim_and_a_commit_read_a_few_rows_whatever_the_backlog_and_the_statistics()
{
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

    let turn = |conversation: &str, i: usize| {
        let body = json!({"messageId": format!("{conversation}-{i}"), "agentId": "a1",
            "organizationId": "o1", "conversationId": conversation});
        parse(body.to_string().as_bytes(), 1 << 20).expect("valid turn")
    };
    let deep: Vec<_> = (0..2000).map(|i| turn("deep", i)).collect();
    let dep = deep[0].deployment.clone();
    // The deep conversation's own history: a take-over must not read it.
    sqlx::query(
        "INSERT INTO turnd_turns (deployment, message_id, state, organization_id, agent_id,
                                  conversation_key, deadline, done_at)
         SELECT $1, 'past-' || i, 'done', 'o1', 'a1', 'deep', now(), now()
         FROM generate_series(1, 5000) i",
    )
    .bind(dep.as_str())
    .execute(&pool)
    .await
    .expect("history");
    sqlx::query("ANALYZE turnd_turns").execute(&pool).await.expect("analyze");

    let others: Vec<_> = (0..1000).map(|i| turn(&format!("other{}", i % 50), i)).collect();
    let wait = Duration::from_secs(3600);
    for chunk in deep.chunks(500).chain(others.chunks(500)) {
        let refs: Vec<_> = chunk.iter().collect();
        store.arm(&refs, wait).await.expect("arm");
    }
    let epoch = Epoch::new(1);

    let before = rows_read(&pool).await;
    let taken = store.take_over(&dep, epoch, "d").await.expect("take over");
    assert_eq!(taken.meta.expect("identity").conversation_key, "deep");
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
    let read = rows_read(&pool).await - before;
    // Measured: 101 in all (failing 1,980 turns below: 4,962). Before migration 0006, 186,118 (about 8,900 per statement);
    // claiming by (deployment, messageId) instead of ctid, 41,911 (the claim scanned the
    // deployment's queued turns); the take-over's identity read ordered by newest, 13,000
    // more (a sequential scan of the table).
    assert!(read <= 22 * 25, "22 statements read {read} rows with 3,000 turns pending");

    // The crash fast path fails every pending turn of the deployment in one transaction: a
    // few rows read per turn failed, not the deployment's backlog per turn (a quadratic
    // crash).
    let before = rows_read(&pool).await;
    let failed = store
        .fail_pending(&dep, epoch, false, &|_| Outcome::error(ErrorCode::WorkerDied, "died"))
        .await
        .expect("fail pending");
    assert_eq!(failed.len(), 1980, "the running turn and the 1,979 queued behind it");
    let read = rows_read(&pool).await - before;
    assert!(read <= 1980 * 5, "failing 1,980 turns read {read} rows");
}
