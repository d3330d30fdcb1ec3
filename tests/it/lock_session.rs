//! The lock session against a real PostgreSQL: its statements run inside a transaction block
//! (so that thousands of held locks do not slow each one), which must change nothing another
//! session can see — locks are taken and released at once, the block is committed and
//! reopened by the probe, and a statement error inside it costs no lock and no session.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use turnd::lock::{LockError, LockSession};
use turnd_harness::{Cluster, wait_for_async};

const APP: &str = "turnd-lock:lock-session-test";

/// Whether another session could take `key` right now (it lets it go again at once).
async fn free_elsewhere(pool: &PgPool, key: i64) -> bool {
    let mut conn = pool.acquire().await.expect("pooled connection");
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(key)
        .fetch_one(&mut *conn)
        .await
        .expect("try the lock from another session");
    if got {
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(key)
            .execute(&mut *conn)
            .await
            .expect("unlock");
    }
    got
}

/// Seconds since the lock session's current transaction began (None: not connected).
async fn block_age(pool: &PgPool) -> Option<f64> {
    sqlx::query_scalar(
        "SELECT extract(epoch FROM now() - xact_start)::float8 FROM pg_stat_activity
         WHERE application_name = $1 AND datname = current_database()",
    )
    .bind(APP)
    .fetch_optional(pool)
    .await
    .expect("read pg_stat_activity")
    .flatten()
}

/// A lock session on the cluster's database as `app`, connected; its task and cancel token.
async fn connected(
    cluster: &Cluster,
    app: &str,
) -> (LockSession, CancellationToken, tokio::task::JoinHandle<turnd::supervise::ComponentResult>) {
    let options = turnd::store::connect_options(&cluster.db_url, app).expect("options");
    let cancel = CancellationToken::new();
    let (locks, task) = LockSession::start(options, cancel.clone());
    let task = tokio::spawn(task);
    tokio::time::timeout(Duration::from_secs(10), locks.wait_healthy())
        .await
        .expect("the lock session connects");
    (locks, cancel, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_in_the_block_are_seen_at_once_and_survive_a_failed_statement() {
    let cluster = Cluster::new().await;
    let (locks, cancel, task) = connected(&cluster, APP).await;
    let pool = &cluster.pool;

    // Taken inside the block, held for everyone at once; the same key again is refused here.
    let first = locks.try_acquire(1001).await.expect("session up").expect("lock free");
    assert!(!free_elsewhere(pool, 1001).await, "a lock taken in the block is held at once");
    assert_eq!(locks.try_acquire(1001).await.expect("session up"), None, "never stacked");

    // The probe commits the block and opens the next: it never grows old, and holds no
    // snapshot between statements.
    wait_for_async(Duration::from_secs(5), "the probe to renew the block", || async {
        block_age(pool).await.is_some_and(|age| age < 0.4)
    })
    .await;
    let xmin: Option<String> = sqlx::query_scalar(
        "SELECT backend_xmin::text FROM pg_stat_activity
         WHERE application_name = $1 AND datname = current_database()",
    )
    .bind(APP)
    .fetch_one(pool)
    .await
    .expect("read backend_xmin");
    assert_eq!(xmin, None, "the idle block holds back no vacuum horizon");
    assert!(!free_elsewhere(pool, 1001).await, "a commit of the block keeps the lock");

    // A statement error aborts the block. The lock it may have taken before failing (the key
    // comes before nextval in each row) is let go; the session and its other locks stay.
    let last: i64 = sqlx::query_scalar("SELECT last_value FROM turnd_epoch")
        .fetch_one(pool)
        .await
        .expect("read the epoch sequence");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER SEQUENCE turnd_epoch MINVALUE 0 MAXVALUE {last}"
    )))
    .execute(pool)
    .await
    .expect("cap the epoch sequence");
    let generation = first.generation;
    assert!(
        matches!(locks.try_acquire(1002).await, Err(LockError::Unavailable)),
        "the failed statement is an error for its askers"
    );
    assert!(free_elsewhere(pool, 1002).await, "no stray lock from the failed statement");
    sqlx::raw_sql("ALTER SEQUENCE turnd_epoch NO MAXVALUE")
        .execute(pool)
        .await
        .expect("uncap the epoch sequence");
    let second = locks.try_acquire(1002).await.expect("session up").expect("lock free");
    assert_eq!(second.generation, generation, "the same session, not a reconnect");
    assert!(second.epoch > first.epoch, "epochs follow the order locks were taken");
    assert!(!free_elsewhere(pool, 1001).await, "the first lock outlived the failed statement");

    // Released at once, and exactly once: one unlock frees it for everyone.
    locks.release_and_wait(second).await;
    assert!(free_elsewhere(pool, 1002).await, "released in the block, free at once");
    locks.release_and_wait(first).await;
    assert!(free_elsewhere(pool, 1001).await, "released in the block, free at once");
    assert_eq!(locks.held_count(), 0);

    cancel.cancel();
    let ended = task.await.expect("the lock session task ends");
    assert!(ended.is_ok(), "asked to stop, the lock session ends Ok: {ended:?}");
}

/// A session gone silent (no answer, no error: a partition) is lost within the probe's bound
/// even when a lock statement, not the probe, is the one left waiting: that statement had no
/// bound, no probe ran behind it, and the daemon's workers outlived their lock (the chaos
/// partition fault saw 25 s). The silence here: the session's backend is stopped (SIGSTOP),
/// its connection open, and a lock is asked for at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_statement_on_a_silent_session_is_noticed_as_a_loss() {
    const SILENT_APP: &str = "turnd-lock:silent-session-test";
    let cluster = Cluster::new().await;
    let (locks, cancel, task) = connected(&cluster, SILENT_APP).await;
    let held = locks.try_acquire(2001).await.expect("session up").expect("lock free");
    let backend: i32 = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()",
    )
    .bind(SILENT_APP)
    .fetch_one(&cluster.pool)
    .await
    .expect("the lock session's backend");
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &backend.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} {backend} (the tests run as root)");
    };
    signal("-STOP");
    let asked = std::time::Instant::now();
    let second = locks.try_acquire(2002);
    let lost = tokio::time::timeout(Duration::from_secs(8), locks.lost(held.generation)).await;
    let noticed = asked.elapsed();
    signal("-CONT");
    let _ =
        sqlx::query("SELECT pg_terminate_backend($1)").bind(backend).execute(&cluster.pool).await;
    assert!(lost.is_ok(), "the silent session was not noticed as lost within 8 s");
    assert!(noticed < Duration::from_secs(5), "noticed after {noticed:?}");
    assert!(second.await.is_err(), "the unanswered request fails rather than hanging");
    cancel.cancel();
    let _ = task.await;
}
