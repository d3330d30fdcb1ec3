//! The lock session: one dedicated PostgreSQL connection that holds every cross-pod
//! advisory lock of this daemon (a session can hold thousands), takes each lock together with
//! a fresh fencing epoch in one statement, and watches its own health.
//!
//! **Architecture invariant**: advisory locks are never taken on a pooled connection (lock and
//! unlock could land on different backends and leak). Locks are not re-entrant here: a key
//! this session holds is never tried again, and each is released exactly once.
//!
//! When the session is lost (probe fails, connection dropped, backend terminated) the server
//! has already freed every lock: `generation` moves on, every deployment holding a lock of an
//! older generation stops its worker at once, and the session reconnects with back-off.
//!
//! **Statements run inside a transaction block** that the probe commits and reopens every
//! [`PROBE_INTERVAL`]. PostgreSQL walks every lock a backend holds at each transaction end
//! (twice, taking each lock-table partition lock), so with 5,000 locks held an autocommit lock
//! statement cost a new conversation 2.5 ms more than with 50; inside a block it costs the
//! same at any count, and only the probe's commit pays the walk. Session-level advisory locks
//! do not care about the block: taken at once, released at once by `pg_advisory_unlock`, kept
//! through a rollback. The block never holds a snapshot between statements (READ COMMITTED);
//! a transaction id, when `nextval` needs one to log the sequence, lives until the next probe
//! commit at most. The epoch is durable before anyone relies on it: the owner's take-over
//! commits on another connection, and a commit flushes the WAL up to its own record, past the
//! sequence's.

use std::collections::HashSet;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::supervise::ComponentResult;

use crate::turn::Epoch;

/// How often the session proves it is alive; a lost session is noticed within
/// PROBE_INTERVAL + PROBE_TIMEOUT. Shorter costs one commit (a walk over the held locks) per interval.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// A session the server closed (pg_terminate_backend, a restart) fails its next probe at once,
/// so its daemon notices within PROBE_INTERVAL and kills its workers; this adds scheduling
/// margin. A daemon that takes a deployment another daemon did not release waits this long
/// before it spawns a worker, or both workers would live at once (the chaos run saw 9 ms of
/// that after a PostgreSQL restart). A partitioned session is freed by the server only after
/// its keepalives (~11 s), long after PROBE_INTERVAL + PROBE_TIMEOUT.
pub const LOSS_NOTICED_WITHIN: Duration = Duration::from_millis(800);
/// Server-side keepalives so PostgreSQL frees a vanished daemon's locks in ~10 s, not hours;
/// no idle-in-transaction or transaction timeout (PostgreSQL 17+) may end the session between
/// its probe commits, whatever the role or server default; then the first transaction block.
const SESSION_SETUP: &str = "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; \
     SET tcp_keepalives_count = 3; SET idle_in_transaction_session_timeout = 0; \
     SELECT set_config('transaction_timeout', '0', false) \
     WHERE current_setting('server_version_num')::int >= 170000; BEGIN";
/// The probe: proves the session alive and ends the block, so that it never grows old.
const PROBE: &str = "COMMIT; BEGIN";
const RECONNECT_MAX: Duration = Duration::from_secs(10);
/// Requests are taken in batches: many locks in one statement cost about as much as one.
const BATCH: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("the lock session is not connected")]
    Unavailable,
    #[error("the lock session task stopped")]
    Stopped,
}

/// A lock held by this daemon: the key, its fencing epoch, and the session generation it
/// belongs to (it is void once the generation moves on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub key: i64,
    pub epoch: Epoch,
    pub generation: u64,
}

/// Where the answer to a lock attempt goes.
type AcquireReply = oneshot::Sender<Result<Option<Held>, LockError>>;

enum Request {
    Acquire {
        key: i64,
        reply: AcquireReply,
    },
    /// `done` (if any) is told once the lock is free (or dropped when the session is gone,
    /// which freed it too).
    Release {
        held: Held,
        done: Option<oneshot::Sender<()>>,
    },
}

/// A handle on the lock session; cheap to clone.
#[derive(Debug, Clone)]
pub struct LockSession {
    requests: mpsc::UnboundedSender<Request>,
    generation: watch::Receiver<u64>,
    healthy: watch::Receiver<bool>,
    held: watch::Receiver<usize>,
}

impl LockSession {
    /// Starts the session task; it runs until `cancel`.
    pub fn start(
        options: PgConnectOptions,
        cancel: CancellationToken,
    ) -> (LockSession, impl Future<Output = ComponentResult>) {
        let (requests, rx) = mpsc::unbounded_channel();
        let (generation_tx, generation) = watch::channel(0);
        let (healthy_tx, healthy) = watch::channel(false);
        let (held_tx, held) = watch::channel(0);
        let task = Task {
            options,
            rx,
            generation: generation_tx,
            healthy: healthy_tx,
            held_count: held_tx,
            held: HashSet::new(),
        };
        (LockSession { requests, generation, healthy, held }, task.run(cancel))
    }

    /// Tries the deployment's lock without waiting. `Ok(None)`: another session holds it.
    ///
    /// The request is queued at once, before the returned future is first polled, so that
    /// many requests made together reach the session together and are taken in one
    /// statement (an `async fn` would send each only when awaited: one round trip per lock).
    pub fn try_acquire(
        &self,
        key: i64,
    ) -> impl Future<Output = Result<Option<Held>, LockError>> + use<> {
        let (reply, rx) = oneshot::channel();
        let sent = self.requests.send(Request::Acquire { key, reply });
        async move {
            sent.map_err(|_| LockError::Stopped)?;
            rx.await.map_err(|_| LockError::Stopped)?
        }
    }

    /// Releases a lock (once, after its worker has exited). A lock of a lost generation is
    /// already gone and is not touched.
    pub fn release(&self, held: Held) {
        let _ = self.requests.send(Request::Release { held, done: None });
    }

    /// [`release`](Self::release), then waits until the lock is free in PostgreSQL: a daemon
    /// that looks for work after this finds the lock takeable by anyone else.
    pub async fn release_and_wait(&self, held: Held) {
        let (done, rx) = oneshot::channel();
        if self.requests.send(Request::Release { held, done: Some(done) }).is_ok() {
            let _ = rx.await;
        }
    }

    /// Resolves when the generation `held` belongs to is over (its locks are gone).
    pub async fn lost(&self, generation: u64) {
        let mut rx = self.generation.clone();
        let _ = rx.wait_for(|g| *g != generation).await;
    }

    pub fn is_healthy(&self) -> bool {
        *self.healthy.borrow()
    }

    pub fn healthy(&self) -> watch::Receiver<bool> {
        self.healthy.clone()
    }

    pub fn held_count(&self) -> usize {
        *self.held.borrow()
    }

    /// Waits until the session is connected (for start-up readiness).
    pub async fn wait_healthy(&self) {
        let mut rx = self.healthy.clone();
        let _ = rx.wait_for(|h| *h).await;
    }
}

struct Task {
    options: PgConnectOptions,
    rx: mpsc::UnboundedReceiver<Request>,
    generation: watch::Sender<u64>,
    healthy: watch::Sender<bool>,
    held_count: watch::Sender<usize>,
    held: HashSet<i64>,
}

/// Why a session that did not answer within [`PROBE_TIMEOUT`] counts as lost.
fn silent() -> sqlx::Error {
    let message = format!("no answer within {} s", PROBE_TIMEOUT.as_secs());
    sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, message))
}

impl Task {
    async fn run(mut self, cancel: CancellationToken) -> ComponentResult {
        let mut backoff = Backoff::new(Duration::from_millis(100), RECONNECT_MAX);
        loop {
            let conn = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                conn = self.connect() => conn,
            };
            match conn {
                Ok(conn) => {
                    backoff.reset();
                    self.generation.send_modify(|g| *g += 1);
                    self.healthy.send_replace(true);
                    tracing::info!(
                        generation = *self.generation.borrow(),
                        "lock session connected"
                    );
                    let reason = self.serve(conn, &cancel).await;
                    self.healthy.send_replace(false);
                    self.held.clear();
                    self.held_count.send_replace(0);
                    // Every lock of this generation is gone with the connection.
                    self.generation.send_modify(|g| *g += 1);
                    match reason {
                        None => return Ok(()),
                        Some(e) => {
                            tracing::error!(error = %e, "lock session lost; its workers are stopped and it reconnects")
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff.peek(), "lock session cannot connect");
                    self.fail_waiting();
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    async fn connect(&self) -> Result<PgConnection, sqlx::Error> {
        let mut conn = PgConnection::connect_with(&self.options).await?;
        // Locks on a standby would fence nothing on the primary.
        crate::store::refuse_standby(&mut conn).await?;
        sqlx::raw_sql(SESSION_SETUP).execute(&mut conn).await?;
        Ok(conn)
    }

    /// Answers requests waiting while disconnected: nobody may believe it holds a lock.
    fn fail_waiting(&mut self) {
        while let Ok(req) = self.rx.try_recv() {
            if let Request::Acquire { reply, .. } = req {
                let _ = reply.send(Err(LockError::Unavailable));
            }
        }
    }

    /// Serves requests until the connection fails (Some(error)) or `cancel` (None).
    async fn serve(
        &mut self,
        mut conn: PgConnection,
        cancel: &CancellationToken,
    ) -> Option<sqlx::Error> {
        let mut probe = tokio::time::interval(PROBE_INTERVAL);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => {
                    let _ = conn.close().await;
                    return None;
                }
                n = self.rx.recv_many(&mut batch, BATCH) => {
                    if n == 0 {
                        return None;
                    }
                    // Bounded like the probe: on a connection gone silent (a partition: no
                    // answer, no error) a lock statement never returns, no probe runs while
                    // it hangs, and the loss went unnoticed — the chaos partition fault saw a
                    // daemon's workers live 25 s on, beside their successors.
                    match tokio::time::timeout(PROBE_TIMEOUT, self.handle(&mut conn, &mut batch)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Some(e),
                        Err(_) => {
                            batch.clear();
                            return Some(silent());
                        }
                    }
                }
                _ = probe.tick() => {
                    match tokio::time::timeout(PROBE_TIMEOUT, sqlx::raw_sql(PROBE).execute(&mut conn)).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Some(e),
                        Err(_) => return Some(silent()),
                    }
                }
            }
        }
    }

    /// Releases any of `keys` this backend holds without this session knowing it.
    async fn release_strays(
        &self,
        conn: &mut PgConnection,
        keys: &[i64],
    ) -> Result<(), sqlx::Error> {
        // A bigint advisory key shows in pg_locks as classid (high half), objid (low half).
        let held: Vec<i64> = sqlx::query_scalar(
            "SELECT (classid::bigint << 32) | objid::bigint FROM pg_locks
             WHERE locktype = 'advisory' AND objsubid = 1 AND granted AND pid = pg_backend_pid()",
        )
        .fetch_all(&mut *conn)
        .await?;
        let strays: Vec<i64> =
            keys.iter().copied().filter(|k| held.contains(k) && !self.held.contains(k)).collect();
        if !strays.is_empty() {
            sqlx::query("SELECT pg_advisory_unlock(k) FROM unnest($1::bigint[]) AS k")
                .bind(&strays)
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }

    async fn handle(
        &mut self,
        conn: &mut PgConnection,
        batch: &mut Vec<Request>,
    ) -> Result<(), sqlx::Error> {
        let generation = *self.generation.borrow();
        let mut acquire: Vec<(i64, AcquireReply)> = Vec::new();
        let mut release: Vec<i64> = Vec::new();
        let mut released: Vec<oneshot::Sender<()>> = Vec::new();
        for req in batch.drain(..) {
            match req {
                Request::Acquire { key, reply } => {
                    if self.held.contains(&key) || acquire.iter().any(|(k, _)| *k == key) {
                        // Never try a lock this session holds: PostgreSQL would stack it.
                        let _ = reply.send(Ok(None));
                    } else {
                        acquire.push((key, reply));
                    }
                }
                Request::Release { held, done } => {
                    if held.generation == generation && self.held.remove(&held.key) {
                        release.push(held.key);
                    }
                    released.extend(done);
                }
            }
        }
        if !release.is_empty() {
            sqlx::query("SELECT pg_advisory_unlock(k) FROM unnest($1::bigint[]) AS k")
                .bind(&release)
                .execute(&mut *conn)
                .await?;
        }
        for done in released {
            let _ = done.send(());
        }
        if !acquire.is_empty() {
            let keys: Vec<i64> = acquire.iter().map(|(k, _)| *k).collect();
            // The lock and its epoch in one statement: epochs follow the order locks were held.
            let rows: Result<Vec<(i64, bool, i64)>, sqlx::Error> = sqlx::query_as(
                "SELECT k, pg_try_advisory_lock(k), nextval('turnd_epoch')
                 FROM unnest($1::bigint[]) WITH ORDINALITY AS x(k, ord) ORDER BY ord",
            )
            .bind(&keys)
            .fetch_all(&mut *conn)
            .await;
            let rows = match rows {
                Ok(rows) => rows,
                Err(e) => {
                    // A statement error on a live session (the server's lock table is full:
                    // "out of shared memory") is not a lost session: the locks held stay held
                    // and their workers keep running. Only the locks this failed statement may
                    // have taken before failing are unknown: find and release them, and only
                    // then answer, so that a refused asker holds nothing.
                    let cleaned = if matches!(e, sqlx::Error::Database(_)) {
                        tracing::error!(error = %e, "the lock statement failed; see PostgreSQL's max_locks_per_transaction");
                        // The error aborted the block; the session's locks outlive it.
                        match sqlx::raw_sql("ROLLBACK; BEGIN").execute(&mut *conn).await {
                            Ok(_) => self.release_strays(conn, &keys).await,
                            Err(e) => Err(e),
                        }
                    } else {
                        Err(e)
                    };
                    for (_, reply) in acquire {
                        let _ = reply.send(Err(LockError::Unavailable));
                    }
                    return cleaned;
                }
            };
            for ((key, reply), (_, got, epoch)) in acquire.into_iter().zip(rows) {
                let held = got.then(|| {
                    self.held.insert(key);
                    Held { key, epoch: Epoch::new(epoch), generation }
                });
                if reply.send(Ok(held)).is_err()
                    && let Some(h) = held
                {
                    // The asker is gone: let the lock go again right away.
                    self.held.remove(&h.key);
                    sqlx::query("SELECT pg_advisory_unlock($1)")
                        .bind(h.key)
                        .execute(&mut *conn)
                        .await?;
                }
            }
        }
        self.held_count.send_replace(self.held.len());
        Ok(())
    }
}
