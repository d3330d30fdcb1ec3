//! PostgreSQL: turn records (the obligations), the reply outbox, deployment epochs and
//! crash-loop records, the daemon registry, parked turns.
//!
//! **Architecture invariant**: only this module runs SQL (the lock session in `lock` aside),
//! and every guarantee that spans rows is one statement or one transaction here. The state
//! election — `UPDATE … SET state = 'done' WHERE state <> 'done'` — and the outbox insert that
//! follows from it always commit together, so a turn can end only once.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{Connection, PgConnection, PgPool, Postgres, Row, Transaction};

use crate::config::DatabaseConfig;
use crate::event::{Envelope, Outcome, TerminalEvent};
use crate::turn::{DeploymentName, Epoch, ErrorCode, MessageId, Turn};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    // The causes are in the message, not also a `source()`: a report that prints the chain
    // would otherwise say the same cause twice (or three times: sqlx's database error repeats
    // its own source).
    #[error("database error: {0}")]
    Db(sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(sqlx::migrate::MigrateError),
    #[error("invalid database.url: {0}")]
    Url(String),
    /// A first connection failed: names the server and the cause, once.
    #[error("cannot connect to PostgreSQL at {target}: {cause}")]
    Connect { target: String, cause: String },
}

/// Where `options` connects, for messages: `host:port, user U, database D` (never a password).
pub fn describe_target(options: &PgConnectOptions) -> String {
    let host = options.get_host();
    let place = if host.starts_with('/') {
        format!("socket {host}/.s.PGSQL.{}", options.get_port())
    } else {
        format!("{host}:{}", options.get_port())
    };
    format!(
        "{place} (user {}, database {})",
        options.get_username(),
        options.get_database().unwrap_or(options.get_username())
    )
}

/// Fails a fresh connection to a server in recovery (a standby, or an old primary that came
/// back as one): turnd writes on every path, and advisory locks taken on a standby would fence
/// nothing on the primary. `database.url` must reach the primary through a name or proxy that
/// follows failover (README "Running past one machine"); this check, one round trip per new
/// connection, turns a name that still points at the wrong server into a retried connection
/// error naming the cause, instead of failed writes (sqlx has no `target_session_attrs`).
pub async fn refuse_standby(conn: &mut PgConnection) -> std::result::Result<(), sqlx::Error> {
    let in_recovery: bool =
        sqlx::query_scalar("SELECT pg_is_in_recovery()").fetch_one(conn).await?;
    if in_recovery {
        return Err(sqlx::Error::Io(std::io::Error::other(
            "the server is a standby (in recovery), not the primary; database.url must reach the primary",
        )));
    }
    Ok(())
}

/// The innermost cause of an error: what actually went wrong, said once (sqlx's own messages
/// repeat their source's text).
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    loop {
        if let Some(sqlx::Error::Database(db)) = cur.downcast_ref::<sqlx::Error>() {
            return db.message().to_owned();
        }
        match cur.source() {
            Some(next) => cur = next,
            None => break,
        }
    }
    // The server's own message, without its "at line N" (a line of PostgreSQL's C source).
    match cur.downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        Some(db) => db.message().to_owned(),
        None => cur.to_string(),
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> StoreError {
        StoreError::Db(e)
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> StoreError {
        StoreError::Migrate(e)
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The most rows any list query returns (parked turns, deployments, daemons, event buckets),
/// whatever limit a caller asks for: a list answers "what is there", never "give me all of
/// it", so one request cannot make a daemon read and render an unbounded result. Paging past
/// it is by filter (`code`, `q`, `since`), not by size.
pub const MAX_LIST_ROWS: i64 = 1000;

/// `asked` clamped to 1..=[`MAX_LIST_ROWS`].
pub fn list_limit(asked: i64) -> i64 {
    asked.clamp(1, MAX_LIST_ROWS)
}

/// Bounded batches keep each sweep transaction short: locks held for milliseconds, not seconds.
const FAIL_BATCH: i64 = 500;
/// Crash-loop guard: this many unrequested worker exits within the window start a back-off…
pub const CRASH_THRESHOLD: i32 = 5;
pub const CRASH_WINDOW: Duration = Duration::from_secs(60);
/// …that doubles from the base with every further death, up to the cap.
const CRASH_BACKOFF_BASE_MS: i64 = 5_000;
const CRASH_BACKOFF_MAX_MS: i64 = 300_000;

/// A terminal event committed to the outbox, with its row id for the relay.
#[derive(Debug, Clone)]
pub struct Committed {
    pub id: i64,
    pub event: TerminalEvent,
}

/// The turn an owner claimed: the line for its worker and what its events carry.
#[derive(Debug)]
pub struct Claimed {
    pub line: String,
    pub envelope: Envelope,
    /// How long the turn had been accepted when it was claimed (for the latency histogram).
    pub waited: Duration,
}

/// What a deployment's worker needs to know about it, read when a daemon takes it over.
#[derive(Debug, Clone)]
pub struct DeploymentMeta {
    pub organization_id: Option<String>,
    pub agent_id: String,
    pub conversation_key: String,
}

#[derive(Debug)]
pub struct Takeover {
    /// None when the deployment has no turn record at all (nothing to do).
    pub meta: Option<DeploymentMeta>,
    /// Turns left running under an older epoch: failed with WORKER_DIED.
    pub failed: Vec<Committed>,
    /// Set while the deployment's crash-loop back-off lasts (milliseconds left).
    pub backoff_ms: Option<i64>,
    /// The daemon recorded as owner before this takeover: None when it was released cleanly
    /// (or never owned).
    pub previous_owner: Option<String>,
}

/// A pending turn failed on some path, with what its event needs.
struct Pending {
    envelope: Envelope,
    state: String,
    provider_code: Option<String>,
}

/// The first key of the outbox catch-up's transaction-level advisory lock ("tdrc").
const CATCH_UP_LOCK_CLASS: i32 = 0x7464_7263;

/// An outbox row not yet published, for the relay's catch-up.
#[derive(Debug)]
pub struct Unpublished {
    pub id: i64,
    pub event_id: String,
    pub routing_key: String,
    pub message_id: String,
    pub body: String,
}

#[derive(Debug, Clone)]
pub struct ParkedRecord {
    pub code: String,
    pub reason: String,
    pub body: Vec<u8>,
    pub headers: String,
    pub routing_key: String,
    pub deployment: Option<String>,
    pub message_id: Option<String>,
    pub attempts: i32,
}

#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
}

/// How long a one-shot command waits for its first database connection: long enough for a
/// server across a slow link, short enough that a wrong host answers before the user gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

pub fn connect_options(url: &str, application_name: &str) -> Result<PgConnectOptions> {
    let options = PgConnectOptions::from_str(url).map_err(|e| StoreError::Url(e.to_string()))?;
    Ok(options.application_name(application_name))
}

impl Store {
    /// Opens the pool. Connections are made lazily, so a daemon starts while PostgreSQL is
    /// down and intake waits for it.
    pub fn connect(config: &DatabaseConfig, daemon_id: &str) -> Result<Store> {
        let options = connect_options(config.url.expose(), &format!("turnd:{daemon_id}"))?;
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(|conn, _| Box::pin(refuse_standby(conn)))
            .connect_lazy_with(options);
        Ok(Store { pool })
    }

    /// Opens the pool after one connection proved the server reachable: for the one-shot
    /// commands, whose user wants to hear at once which server failed and why (the pool alone
    /// only says it timed out).
    pub async fn connect_now(config: &DatabaseConfig, daemon_id: &str) -> Result<Store> {
        let options = connect_options(config.url.expose(), &format!("turnd:{daemon_id}"))?;
        let target = describe_target(&options);
        let attempt = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options));
        match attempt.await {
            Ok(Ok(mut conn)) => {
                let standby = refuse_standby(&mut conn).await;
                let _ = conn.close().await;
                if let Err(e) = standby {
                    return Err(StoreError::Connect { target, cause: root_cause(&e) });
                }
            }
            Ok(Err(e)) => return Err(StoreError::Connect { target, cause: root_cause(&e) }),
            Err(_) => {
                return Err(StoreError::Connect {
                    target,
                    cause: format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()),
                });
            }
        }
        Store::connect(config, daemon_id)
    }

    /// Why the database cannot be reached now, naming the server (for logs while waiting).
    pub async fn explain_unreachable(&self, e: &StoreError) -> String {
        match e {
            StoreError::Db(sqlx::Error::PoolTimedOut) => {
                let options = self.pool.connect_options();
                let target = describe_target(&options);
                match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&*options))
                    .await
                {
                    Ok(Ok(conn)) => {
                        let _ = conn.close().await;
                        format!("PostgreSQL at {target}: every pooled connection is busy")
                    }
                    Ok(Err(e)) => {
                        format!("cannot connect to PostgreSQL at {target}: {}", root_cause(&e))
                    }
                    Err(_) => format!(
                        "cannot connect to PostgreSQL at {target}: no answer within {}s",
                        CONNECT_TIMEOUT.as_secs()
                    ),
                }
            }
            other => other.to_string(),
        }
    }

    pub fn from_pool(pool: PgPool) -> Store {
        Store { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn migrate(&self) -> Result<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    // ---- intake ----------------------------------------------------------------------------

    /// Arms turns in the order given (their accept order). Returns, per turn, whether it was
    /// armed now; false means the (deployment, messageId) record already exists — pending or
    /// answered — and the publish is a duplicate.
    pub async fn arm(&self, turns: &[&Turn], queue_timeout: Duration) -> Result<Vec<bool>> {
        let mut deployments = Vec::with_capacity(turns.len());
        let mut message_ids = Vec::with_capacity(turns.len());
        let mut orgs = Vec::with_capacity(turns.len());
        let mut agents = Vec::with_capacity(turns.len());
        let mut keys = Vec::with_capacity(turns.len());
        let mut conversations = Vec::with_capacity(turns.len());
        let mut lines = Vec::with_capacity(turns.len());
        let mut routings = Vec::with_capacity(turns.len());
        for t in turns {
            deployments.push(t.deployment.as_str());
            message_ids.push(t.message_id.as_str());
            orgs.push(t.organization_id.as_ref().map(|o| o.as_str()));
            agents.push(t.agent_id.as_str());
            keys.push(t.conversation_key.as_str());
            conversations.push(t.conversation_id.as_deref());
            lines.push(t.line.as_str());
            routings.push(t.routing.as_str());
        }
        // ORDER BY ord makes nextval() follow the given order: the accept order.
        let armed: Vec<(String, String)> = sqlx::query_as(
            "INSERT INTO turnd_turns (deployment, message_id, seq, state, organization_id,
                 agent_id, conversation_key, conversation_id, turn, routing, deadline)
             SELECT d, m, nextval('turnd_accept_seq'), 'queued', o, a, k, c, l, r,
                    now() + $9::bigint * interval '1 millisecond'
             FROM (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],
                          $5::text[], $6::text[], $7::text[], $8::text[])
                          WITH ORDINALITY AS x(d, m, o, a, k, c, l, r, ord)
                   ORDER BY ord) x
             ON CONFLICT (deployment, message_id) DO NOTHING
             RETURNING deployment, message_id",
        )
        .bind(&deployments)
        .bind(&message_ids)
        .bind(&orgs)
        .bind(&agents)
        .bind(&keys)
        .bind(&conversations)
        .bind(&lines)
        .bind(&routings)
        .bind(millis(queue_timeout))
        .fetch_all(&self.pool)
        .await?;
        if armed.len() == turns.len() {
            return Ok(vec![true; turns.len()]);
        }
        // Some were duplicates (of an earlier publish, or of each other within the batch).
        let mut armed: std::collections::HashSet<(String, String)> = armed.into_iter().collect();
        Ok(turns
            .iter()
            .map(|t| {
                armed.remove(&(t.deployment.as_str().to_owned(), t.message_id.as_str().to_owned()))
            })
            .collect())
    }

    /// Which of these deployments another daemon owns, as its owner record says (set when it
    /// took the lock, cleared when it let go cleanly; left behind by a daemon that died).
    pub async fn owned_elsewhere(&self, names: &[&str], me: &str) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT deployment FROM turnd_deployments
             WHERE deployment = ANY($1) AND owner IS NOT NULL AND owner <> $2",
        )
        .bind(names)
        .bind(me)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Ends a turn that never ran (invalid or out of attempts) with its error event, once:
    /// the tombstone and the outbox row commit together, and a duplicate finds the tombstone.
    pub async fn finish_unarmed(
        &self,
        envelope: &Envelope,
        conversation_key: &str,
        outcome: &Outcome,
    ) -> Result<Option<Committed>> {
        let event = TerminalEvent::new(envelope, outcome);
        let id: Option<i64> = sqlx::query_scalar(
            "WITH tomb AS (
                 INSERT INTO turnd_turns (deployment, message_id, state, organization_id,
                     agent_id, conversation_key, conversation_id, deadline, done_at)
                 VALUES ($1, $2, 'done', $3, $4, $5, $6, now(), now())
                 ON CONFLICT (deployment, message_id) DO NOTHING
                 RETURNING 1)
             INSERT INTO turnd_outbox (deployment, message_id, event_id, routing_key, kind, code, body)
             SELECT $1, $2, $7, $8, $9, $10, $11 FROM tomb
             ON CONFLICT (deployment, message_id) DO NOTHING
             RETURNING id",
        )
        .bind(envelope.deployment.as_str())
        .bind(envelope.message_id.as_str())
        .bind(envelope.organization_id.as_deref())
        .bind(&envelope.agent_id)
        .bind(conversation_key)
        .bind(envelope.conversation_id.as_deref())
        .bind(&event.event_id)
        .bind(&event.routing_key)
        .bind(event.kind)
        .bind(event.code.as_deref())
        .bind(&event.body)
        .fetch_optional(&self.pool)
        .await?;
        Ok(id.map(|id| Committed { id, event }))
    }

    pub async fn record_parked(&self, p: &ParkedRecord) -> Result<i64> {
        let id = sqlx::query_scalar(
            "INSERT INTO turnd_parked (code, reason, body, headers, routing_key, deployment,
                 message_id, attempts)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
        )
        .bind(&p.code)
        .bind(&p.reason)
        .bind(&p.body)
        .bind(&p.headers)
        .bind(&p.routing_key)
        .bind(p.deployment.as_deref())
        .bind(p.message_id.as_deref())
        .bind(p.attempts)
        .fetch_one(&self.pool)
        .await?;
        Ok(id)
    }

    // ---- owner -----------------------------------------------------------------------------

    /// Records that `owner` now holds the deployment's lock under `epoch`, and in the same
    /// transaction fails every turn still running under an older epoch (its worker went with
    /// the old lock, CONTRACT §7). Also reports a crash-loop back-off in force.
    pub async fn take_over(
        &self,
        deployment: &DeploymentName,
        epoch: Epoch,
        owner: &str,
    ) -> Result<Takeover> {
        // Boxed, like fail_pending: a transaction's future is ~9 KB, and inline it would size
        // every deployment task that may await it, idle or not.
        Box::pin(async {
            // The common case in one round trip (a new conversation's path; the transaction
            // took five): nothing runs under an older epoch, so nothing needs failing.
            match take_over_statement(&self.pool, deployment, epoch, owner, false).await? {
                TakeoverRow::Stale => self.take_over_tx(deployment, epoch, owner).await,
                row => Ok(row.into_takeover(Vec::new())),
            }
        })
        .await
    }

    /// A take-over that finds turns still running under an older epoch fails them in the
    /// transaction that moves the epoch.
    async fn take_over_tx(
        &self,
        deployment: &DeploymentName,
        epoch: Epoch,
        owner: &str,
    ) -> Result<Takeover> {
        let mut tx = self.pool.begin().await?;
        let row = take_over_statement(&mut *tx, deployment, epoch, owner, true).await?;
        let stale = pending_rows(
            &mut tx,
            "WHERE deployment = $1 AND state = 'running' AND epoch < $2",
            deployment,
            epoch,
        )
        .await?;
        let failed = finish_pending(&mut tx, stale, &|_| {
            Outcome::error(ErrorCode::WorkerDied, "the worker went with its daemon's lock")
        })
        .await?;
        tx.commit().await?;
        Ok(row.into_takeover(failed))
    }

    /// Claims the oldest queued turn of the deployment for `epoch`, unless a newer epoch owns
    /// the deployment now (fencing).
    pub async fn claim_next(
        &self,
        deployment: &DeploymentName,
        epoch: Epoch,
        deadline: Duration,
    ) -> Result<Option<Claimed>> {
        let row: Option<PgRow> = sqlx::query(
            // The CTE is evaluated once: as a join subquery it could be rescanned per row and,
            // skipping rows this very statement already updated, claim several turns.
            "WITH next AS MATERIALIZED (
                 SELECT message_id FROM turnd_turns
                 WHERE deployment = $1 AND state = 'queued'
                 ORDER BY seq LIMIT 1 FOR UPDATE)
             UPDATE turnd_turns t SET state = 'running', epoch = $2, started_at = now(),
                    deadline = now() + $3::bigint * interval '1 millisecond'
             FROM next
             WHERE t.deployment = $1 AND t.message_id = next.message_id AND t.state = 'queued'
               AND EXISTS (SELECT 1 FROM turnd_deployments d
                           WHERE d.deployment = $1 AND d.epoch = $2)
             RETURNING t.message_id, t.turn, t.organization_id, t.agent_id,
                       t.conversation_id, t.routing,
                       EXTRACT(EPOCH FROM now() - t.accepted_at)::float8 AS waited",
        )
        .bind(deployment.as_str())
        .bind(epoch.get())
        .bind(millis(deadline))
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        Ok(Some(Claimed {
            line: row.try_get::<Option<String>, _>("turn")?.unwrap_or_default(),
            envelope: envelope_from_row(deployment, &row)?,
            waited: Duration::try_from_secs_f64(row.try_get("waited")?).unwrap_or_default(),
        }))
    }

    /// Commits the running turn's outcome under `epoch`. None when it lost the election: the
    /// turn already ended (sweep, takeover) or a newer epoch owns the deployment.
    pub async fn commit(
        &self,
        envelope: &Envelope,
        epoch: Epoch,
        outcome: &Outcome,
    ) -> Result<Option<Committed>> {
        let event = TerminalEvent::new(envelope, outcome);
        let id: Option<i64> = sqlx::query_scalar(
            "WITH done AS (
                 UPDATE turnd_turns SET state = 'done', turn = NULL, routing = NULL,
                        done_at = now()
                 WHERE deployment = $1 AND message_id = $2 AND state = 'running'
                   AND epoch = $3
                   AND EXISTS (SELECT 1 FROM turnd_deployments d
                               WHERE d.deployment = $1 AND d.epoch = $3)
                 RETURNING 1)
             INSERT INTO turnd_outbox (deployment, message_id, event_id, routing_key, kind, code, body)
             SELECT $1, $2, $4, $5, $6, $7, $8 FROM done
             ON CONFLICT (deployment, message_id) DO NOTHING
             RETURNING id",
        )
        .bind(envelope.deployment.as_str())
        .bind(envelope.message_id.as_str())
        .bind(epoch.get())
        .bind(&event.event_id)
        .bind(&event.routing_key)
        .bind(event.kind)
        .bind(event.code.as_deref())
        .bind(&event.body)
        .fetch_optional(&self.pool)
        .await?;
        Ok(id.map(|id| Committed { id, event }))
    }

    /// A heartbeat: the running turn's deadline moves to now + `deadline` (unless its provider
    /// failed), queued turns' waits are extended to at least now + `queue_timeout`.
    pub async fn extend_deadlines(
        &self,
        deployment: &DeploymentName,
        epoch: Epoch,
        deadline: Duration,
        queue_timeout: Duration,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE turnd_turns SET deadline = CASE
                 WHEN state = 'running' THEN now() + $3::bigint * interval '1 millisecond'
                 ELSE GREATEST(deadline, now() + $4::bigint * interval '1 millisecond') END
             WHERE deployment = $1 AND state <> 'done'
               AND (state = 'queued' OR (epoch = $2 AND provider_code IS NULL))",
        )
        .bind(deployment.as_str())
        .bind(epoch.get())
        .bind(millis(deadline))
        .bind(millis(queue_timeout))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// provider_failed (Some(code)) / provider_recovered (None) for the running turn.
    pub async fn set_provider_code(
        &self,
        deployment: &DeploymentName,
        epoch: Epoch,
        code: Option<&str>,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE turnd_turns SET provider_code = $3
             WHERE deployment = $1 AND state = 'running' AND epoch = $2",
        )
        .bind(deployment.as_str())
        .bind(epoch.get())
        .bind(code)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Fails pending turns of a deployment this daemon owns under `epoch`, in one transaction:
    /// every pending turn (`running_only = false`, the crash fast path) or just the running one.
    pub async fn fail_pending(
        &self,
        deployment: &DeploymentName,
        epoch: Epoch,
        running_only: bool,
        outcome: &(dyn Fn(&str) -> Outcome + Sync),
    ) -> Result<Vec<Committed>> {
        Box::pin(self.fail_pending_tx(deployment, epoch, running_only, outcome)).await
    }

    async fn fail_pending_tx(
        &self,
        deployment: &DeploymentName,
        epoch: Epoch,
        running_only: bool,
        outcome: &(dyn Fn(&str) -> Outcome + Sync),
    ) -> Result<Vec<Committed>> {
        let mut tx = self.pool.begin().await?;
        let owned: Option<i64> = sqlx::query_scalar(
            "SELECT epoch FROM turnd_deployments WHERE deployment = $1 AND epoch = $2 FOR SHARE",
        )
        .bind(deployment.as_str())
        .bind(epoch.get())
        .fetch_optional(&mut *tx)
        .await?;
        if owned.is_none() {
            return Ok(Vec::new()); // fenced: a newer owner answers for them now
        }
        let filter = if running_only {
            "WHERE deployment = $1 AND state = 'running' AND epoch = $2"
        } else {
            "WHERE deployment = $1 AND state <> 'done' AND (state = 'queued' OR epoch <= $2)"
        };
        let rows = pending_rows(&mut tx, filter, deployment, epoch).await?;
        let failed = finish_pending(&mut tx, rows, &|state| outcome(state)).await?;
        tx.commit().await?;
        Ok(failed)
    }

    pub async fn has_queued(&self, deployment: &DeploymentName) -> Result<bool> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM turnd_turns WHERE deployment = $1 AND state = 'queued')",
        )
        .bind(deployment.as_str())
        .fetch_one(&self.pool)
        .await?)
    }

    pub async fn set_worker(
        &self,
        deployment: &DeploymentName,
        epoch: Epoch,
        pid: Option<u32>,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE turnd_deployments SET worker_pid = $3,
                    worker_started_at = CASE WHEN $3 IS NULL THEN NULL ELSE now() END
             WHERE deployment = $1 AND epoch = $2",
        )
        .bind(deployment.as_str())
        .bind(epoch.get())
        .bind(pid.map(|p| p as i32))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Counts an unrequested worker exit against the deployment's crash window, shared by all
    /// daemons. Returns the back-off now in force, if any (milliseconds).
    pub async fn record_crash(&self, deployment: &DeploymentName) -> Result<Option<i64>> {
        let ms: Option<i64> = sqlx::query_scalar(
            "UPDATE turnd_deployments SET
                 crash_count = CASE WHEN crash_window_at > now() - $2::bigint * interval '1 millisecond'
                                    THEN crash_count + 1 ELSE 1 END,
                 crash_window_at = CASE WHEN crash_window_at > now() - $2::bigint * interval '1 millisecond'
                                    THEN crash_window_at ELSE now() END
             WHERE deployment = $1
             RETURNING CASE WHEN crash_count >= $3
                 THEN LEAST($4::bigint * (1::bigint << LEAST(crash_count - $3, 16)), $5::bigint)
                 END",
        )
        .bind(deployment.as_str())
        .bind(millis(CRASH_WINDOW))
        .bind(CRASH_THRESHOLD)
        .bind(CRASH_BACKOFF_BASE_MS)
        .bind(CRASH_BACKOFF_MAX_MS)
        .fetch_optional(&self.pool)
        .await?
        .flatten();
        if let Some(ms) = ms {
            sqlx::query(
                "UPDATE turnd_deployments
                 SET backoff_until = now() + $2::bigint * interval '1 millisecond'
                 WHERE deployment = $1",
            )
            .bind(deployment.as_str())
            .bind(ms)
            .execute(&self.pool)
            .await?;
        }
        Ok(ms)
    }

    /// The owner lets go (after its worker exited, before the advisory lock is released).
    pub async fn release_owner(&self, deployment: &DeploymentName, epoch: Epoch) -> Result<()> {
        sqlx::query(
            "UPDATE turnd_deployments SET owner = NULL, since = NULL, worker_pid = NULL,
                    worker_started_at = NULL, released_at = now()
             WHERE deployment = $1 AND epoch = $2",
        )
        .bind(deployment.as_str())
        .bind(epoch.get())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    // ---- sweep -----------------------------------------------------------------------------

    /// Fails one bounded batch of lapsed turns, exactly once across daemons (SKIP LOCKED).
    pub async fn sweep_lapsed(&self) -> Result<Vec<Committed>> {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<PgRow> = sqlx::query(
            "SELECT deployment, message_id, organization_id, agent_id, conversation_id, routing,
                    state, provider_code
             FROM turnd_turns WHERE state <> 'done' AND deadline < now()
             ORDER BY deadline LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(FAIL_BATCH)
        .fetch_all(&mut *tx)
        .await?;
        let pending = rows.iter().map(pending_from_row).collect::<Result<Vec<_>>>()?;
        let failed = finish_pending(&mut tx, pending, &timeout_outcome).await?;
        tx.commit().await?;
        Ok(failed)
    }

    /// Deployments with a queued turn older than `delay`: candidates for adoption (the lock
    /// tells whether anyone holds them).
    pub async fn adoption_candidates(&self, delay: Duration, limit: i64) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT deployment FROM turnd_turns
             WHERE state = 'queued' AND accepted_at < now() - $1::bigint * interval '1 millisecond'
             GROUP BY deployment ORDER BY min(seq) LIMIT $2",
        )
        .bind(millis(delay))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Deletes, in small batches, tombstones and published events older than `retention`, and
    /// the records of deployments and daemons gone for longer than that.
    pub async fn purge_retention(&self, retention: Duration) -> Result<u64> {
        let turns = sqlx::query(
            "DELETE FROM turnd_turns WHERE ctid = ANY (ARRAY(
                 SELECT ctid FROM turnd_turns WHERE state = 'done'
                   AND done_at < now() - $1::bigint * interval '1 millisecond' LIMIT 1000))",
        )
        .bind(millis(retention))
        .execute(&self.pool)
        .await?
        .rows_affected();
        let events = sqlx::query(
            "DELETE FROM turnd_outbox WHERE id = ANY (ARRAY(
                 SELECT id FROM turnd_outbox WHERE published_at IS NOT NULL
                   AND published_at < now() - $1::bigint * interval '1 millisecond' LIMIT 1000))",
        )
        .bind(millis(retention))
        .execute(&self.pool)
        .await?
        .rows_affected();
        // A daemon silent for longer than retention is gone: what it still owned (it was
        // killed with it) is let go as of its last heartbeat, then its row is deleted.
        let daemons = sqlx::query(
            "WITH gone AS (
                 SELECT id, coalesce(stopped_at, heartbeat_at) AS last_seen FROM turnd_daemons
                 WHERE coalesce(stopped_at, heartbeat_at)
                       < now() - $1::bigint * interval '1 millisecond'),
             let_go AS (
                 UPDATE turnd_deployments d SET owner = NULL, since = NULL, worker_pid = NULL,
                        worker_started_at = NULL, released_at = gone.last_seen
                 FROM gone WHERE d.owner = gone.id)
             DELETE FROM turnd_daemons WHERE id IN (SELECT id FROM gone)",
        )
        .bind(millis(retention))
        .execute(&self.pool)
        .await?
        .rows_affected();
        // A deployment is gone when nobody owns it, it has no turn row left (its last
        // tombstone outlived retention) and it was let go longer than retention ago. The
        // conditions are repeated on the DELETE itself so that a take-over racing with it is
        // re-checked and never loses its row (claims and commits need the owner's row).
        let deployments = sqlx::query(
            "DELETE FROM turnd_deployments d
             WHERE d.deployment = ANY (ARRAY(
                     SELECT x.deployment FROM turnd_deployments x
                     WHERE x.owner IS NULL
                       AND x.released_at < now() - $1::bigint * interval '1 millisecond'
                       AND NOT EXISTS (SELECT 1 FROM turnd_turns t
                                       WHERE t.deployment = x.deployment)
                     LIMIT 1000))
               AND d.owner IS NULL
               AND d.released_at < now() - $1::bigint * interval '1 millisecond'
               AND NOT EXISTS (SELECT 1 FROM turnd_turns t WHERE t.deployment = d.deployment)",
        )
        .bind(millis(retention))
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(turns + events + deployments + daemons)
    }

    pub async fn register_daemon(&self, id: &str, hostname: &str, pid: u32) -> Result<()> {
        sqlx::query(
            "INSERT INTO turnd_daemons (id, hostname, pid, version)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (id) DO UPDATE SET hostname = $2, pid = $3, version = $4,
                 started_at = now(), heartbeat_at = now(), stopped_at = NULL, ready = false",
        )
        .bind(id)
        .bind(hostname)
        .bind(pid as i32)
        .bind(env!("CARGO_PKG_VERSION"))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn daemon_heartbeat(&self, id: &str, ready: bool, live_workers: usize) -> Result<()> {
        sqlx::query(
            "UPDATE turnd_daemons SET heartbeat_at = now(), ready = $2, live_workers = $3
             WHERE id = $1",
        )
        .bind(id)
        .bind(ready)
        .bind(live_workers as i32)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn daemon_stopped(&self, id: &str) -> Result<()> {
        sqlx::query(
            "UPDATE turnd_daemons SET stopped_at = now(), ready = false, live_workers = 0
             WHERE id = $1",
        )
        .bind(id)
        .execute(&self.pool)
        .await?;
        sqlx::query(
            "UPDATE turnd_deployments SET owner = NULL, since = NULL, released_at = now()
             WHERE owner = $1",
        )
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// About how many locks the server's shared lock table holds.
    pub async fn lock_capacity(&self) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT current_setting('max_locks_per_transaction')::bigint *
                    (current_setting('max_connections')::bigint
                     + current_setting('max_prepared_transactions')::bigint)",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// Seconds since the oldest pending turn was accepted (0 when none is pending).
    pub async fn oldest_pending_age(&self) -> Result<f64> {
        Ok(sqlx::query_scalar(
            "SELECT COALESCE(EXTRACT(EPOCH FROM now() - min(accepted_at))::float8, 0)
             FROM turnd_turns WHERE state <> 'done'",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    pub async fn outbox_backlog(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM turnd_outbox WHERE published_at IS NULL")
            .fetch_one(&self.pool)
            .await?)
    }

    // ---- relay -----------------------------------------------------------------------------

    pub async fn mark_published(&self, ids: &[i64]) -> Result<()> {
        mark_published(&self.pool, ids).await
    }

    /// Locks a batch of unpublished events at least `min_age` old (younger ones are still in
    /// their committing daemon's hands) for the caller's transaction.
    pub async fn lock_unpublished(
        &self,
        min_age: Duration,
        limit: i64,
    ) -> Result<(Transaction<'static, Postgres>, Vec<Unpublished>)> {
        let mut tx = self.pool.begin().await?;
        // One catch-up at a time in the cluster (a transaction-level lock, released at commit
        // or rollback; the two-int key space is apart from the deployments' bigint keys): two
        // at once would each skip the rows the other locked and could publish a deployment's
        // later event before its earlier one.
        let ours: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1, 1)")
            .bind(CATCH_UP_LOCK_CLASS)
            .fetch_one(&mut *tx)
            .await?;
        if !ours {
            return Ok((tx, Vec::new()));
        }
        let rows: Vec<(i64, String, String, String, Option<String>)> = sqlx::query_as(
            "SELECT id, event_id, routing_key, message_id, body FROM turnd_outbox
             WHERE published_at IS NULL
               AND created_at < now() - $1::bigint * interval '1 millisecond'
             ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind(millis(min_age))
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let rows = rows
            .into_iter()
            .map(|(id, event_id, routing_key, message_id, body)| Unpublished {
                id,
                event_id,
                routing_key,
                message_id,
                body: body.unwrap_or_default(),
            })
            .collect();
        Ok((tx, rows))
    }

    pub async fn mark_published_in(
        tx: &mut Transaction<'static, Postgres>,
        ids: &[i64],
    ) -> Result<()> {
        mark_published(&mut **tx, ids).await
    }
}

/// Records events as published and drops their bodies (retention keeps key and time only).
async fn mark_published<'e>(executor: impl sqlx::PgExecutor<'e>, ids: &[i64]) -> Result<()> {
    sqlx::query(
        "UPDATE turnd_outbox SET published_at = now(), body = NULL
         WHERE id = ANY($1) AND published_at IS NULL",
    )
    .bind(ids)
    .execute(executor)
    .await?;
    Ok(())
}

fn timeout_outcome(state: &str) -> Outcome {
    if state == "queued" {
        Outcome::error(
            ErrorCode::TurnTimeout,
            "the turn waited longer than turn.queue_timeout for its worker",
        )
    } else {
        Outcome::error(ErrorCode::TurnTimeout, "no heartbeat or reply within turn.deadline")
    }
}

/// What the take-over statement found.
enum TakeoverRow {
    /// The deployment has no turn record at all (nothing to do).
    NoTurns,
    /// A turn runs under an older epoch and the statement was not forced: nothing written.
    Stale,
    Taken {
        meta: DeploymentMeta,
        previous_owner: Option<String>,
        backoff_ms: Option<i64>,
    },
}

impl TakeoverRow {
    fn into_takeover(self, failed: Vec<Committed>) -> Takeover {
        match self {
            TakeoverRow::Taken { meta, previous_owner, backoff_ms } => Takeover {
                meta: Some(meta),
                failed,
                backoff_ms: backoff_ms.filter(|ms| *ms > 0),
                previous_owner,
            },
            TakeoverRow::NoTurns | TakeoverRow::Stale => {
                Takeover { meta: None, failed, backoff_ms: None, previous_owner: None }
            }
        }
    }
}

/// Records `epoch` and `owner` for the deployment (never moving the epoch back) and reads what
/// the owner needs: the conversation's identity from its newest turn, the owner recorded
/// before (the statement's snapshot predates its own write), the crash-loop back-off left.
/// Unless `force`, writes nothing when a turn still runs under an older epoch.
async fn take_over_statement<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    deployment: &DeploymentName,
    epoch: Epoch,
    owner: &str,
    force: bool,
) -> Result<TakeoverRow> {
    type Row = (Option<String>, String, String, Option<String>, bool, Option<i64>);
    let row: Option<Row> = sqlx::query_as(
        "WITH meta AS (
             SELECT organization_id, agent_id, conversation_key FROM turnd_turns
             WHERE deployment = $1 ORDER BY state = 'done', seq DESC LIMIT 1),
         stale AS (
             SELECT EXISTS (SELECT 1 FROM turnd_turns
                            WHERE deployment = $1 AND state = 'running' AND epoch < $2) AS any),
         up AS (
             INSERT INTO turnd_deployments (deployment, organization_id, agent_id,
                 conversation_key, epoch, owner, since)
             SELECT $1, organization_id, agent_id, conversation_key, $2, $3, now()
             FROM meta, stale WHERE $4 OR NOT stale.any
             ON CONFLICT (deployment) DO UPDATE
                SET epoch = EXCLUDED.epoch,
                    owner = EXCLUDED.owner, since = now(), worker_pid = NULL,
                    worker_started_at = NULL
                -- A late takeover under an older epoch changes nothing: the fence never
                -- moves back and the current owner's record stays.
                WHERE turnd_deployments.epoch < EXCLUDED.epoch
             RETURNING (EXTRACT(EPOCH FROM (backoff_until - now())) * 1000)::bigint AS ms)
         SELECT meta.organization_id, meta.agent_id, meta.conversation_key,
                (SELECT owner FROM turnd_deployments WHERE deployment = $1),
                stale.any, (SELECT ms FROM up)
         FROM meta, stale",
    )
    .bind(deployment.as_str())
    .bind(epoch.get())
    .bind(owner)
    .bind(force)
    .fetch_optional(executor)
    .await?;
    Ok(match row {
        None => TakeoverRow::NoTurns,
        Some((.., true, _)) if !force => TakeoverRow::Stale,
        Some((organization_id, agent_id, conversation_key, previous_owner, _, backoff_ms)) => {
            TakeoverRow::Taken {
                meta: DeploymentMeta { organization_id, agent_id, conversation_key },
                previous_owner,
                backoff_ms,
            }
        }
    })
}

async fn pending_rows(
    tx: &mut Transaction<'_, Postgres>,
    filter: &str,
    deployment: &DeploymentName,
    epoch: Epoch,
) -> Result<Vec<Pending>> {
    let sql = format!(
        "SELECT deployment, message_id, organization_id, agent_id, conversation_id, routing,
                state, provider_code
         FROM turnd_turns {filter} ORDER BY seq FOR UPDATE"
    );
    let rows: Vec<PgRow> = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(deployment.as_str())
        .bind(epoch.get())
        .fetch_all(&mut **tx)
        .await?;
    rows.iter().map(pending_from_row).collect()
}

fn pending_from_row(row: &PgRow) -> Result<Pending> {
    let deployment = DeploymentName::from_trusted(row.try_get("deployment")?);
    Ok(Pending {
        envelope: envelope_from_row(&deployment, row)?,
        state: row.try_get("state")?,
        provider_code: row.try_get("provider_code")?,
    })
}

fn envelope_from_row(deployment: &DeploymentName, row: &PgRow) -> Result<Envelope> {
    Ok(Envelope {
        deployment: deployment.clone(),
        message_id: MessageId::from_trusted(row.try_get("message_id")?),
        organization_id: row.try_get("organization_id")?,
        agent_id: row.try_get("agent_id")?,
        conversation_id: row.try_get("conversation_id")?,
        routing: row.try_get("routing")?,
    })
}

/// The election for many turns at once: marks the given (locked) pending rows done and
/// inserts their error events, inside the caller's transaction.
async fn finish_pending(
    tx: &mut Transaction<'_, Postgres>,
    pending: Vec<Pending>,
    outcome: &(dyn Fn(&str) -> Outcome + Sync),
) -> Result<Vec<Committed>> {
    if pending.is_empty() {
        return Ok(Vec::new());
    }
    let events: Vec<TerminalEvent> = pending
        .iter()
        .map(|p| {
            let outcome = match (&p.provider_code, p.state.as_str()) {
                // A provider outage outlived the deadline: the error says so.
                (Some(code), "running") => match outcome(&p.state) {
                    Outcome::Error { code: ErrorCode::TurnTimeout, message } => Outcome::Error {
                        code: ErrorCode::from_worker(Some(code)),
                        message: format!("{message} (provider failed: {code})"),
                    },
                    other => other,
                },
                _ => outcome(&p.state),
            };
            TerminalEvent::new(&p.envelope, &outcome)
        })
        .collect();
    let deployments: Vec<&str> = events.iter().map(|e| e.deployment.as_str()).collect();
    let message_ids: Vec<&str> = events.iter().map(|e| e.message_id.as_str()).collect();
    sqlx::query(
        "UPDATE turnd_turns t SET state = 'done', turn = NULL, routing = NULL, done_at = now()
         FROM unnest($1::text[], $2::text[]) AS x(d, m)
         WHERE t.deployment = x.d AND t.message_id = x.m AND t.state <> 'done'",
    )
    .bind(&deployments)
    .bind(&message_ids)
    .execute(&mut **tx)
    .await?;
    let event_ids: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
    let keys: Vec<&str> = events.iter().map(|e| e.routing_key.as_str()).collect();
    let codes: Vec<Option<&str>> = events.iter().map(|e| e.code.as_deref()).collect();
    let bodies: Vec<&str> = events.iter().map(|e| e.body.as_str()).collect();
    let ids: Vec<(String, String, i64)> = sqlx::query_as(
        "INSERT INTO turnd_outbox (deployment, message_id, event_id, routing_key, kind, code, body)
         SELECT d, m, e, k, 'error', c, b
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
              WITH ORDINALITY AS x(d, m, e, k, c, b, ord)
         ORDER BY ord
         ON CONFLICT (deployment, message_id) DO NOTHING
         RETURNING deployment, message_id, id",
    )
    .bind(&deployments)
    .bind(&message_ids)
    .bind(&event_ids)
    .bind(&keys)
    .bind(&codes)
    .bind(&bodies)
    .fetch_all(&mut **tx)
    .await?;
    Ok(events
        .into_iter()
        .filter_map(|event| {
            ids.iter()
                .find(|(d, m, _)| d == event.deployment.as_str() && m == event.message_id.as_str())
                .map(|(_, _, id)| Committed { id: *id, event })
        })
        .collect())
}

/// The cluster as the database sees it, for `turnd status`.
#[derive(Debug, serde::Serialize)]
pub struct Status {
    /// At most [`MAX_LIST_ROWS`], by id.
    pub daemons: Vec<DaemonStatus>,
    /// Owned deployments by name, at most [`MAX_LIST_ROWS`] of them…
    pub deployments: Vec<DeploymentStatus>,
    /// …of this many.
    pub owned_deployments: i64,
    pub pending: PendingStatus,
    pub unpublished_events: i64,
}

#[derive(Debug, serde::Serialize, sqlx::FromRow)]
pub struct DaemonStatus {
    pub id: String,
    pub hostname: String,
    pub pid: i32,
    pub version: String,
    pub heartbeat_age_s: f64,
    pub ready: bool,
    pub live_workers: i32,
    pub owned_deployments: i64,
}

#[derive(Debug, serde::Serialize, sqlx::FromRow)]
pub struct DeploymentStatus {
    pub deployment: String,
    pub organization_id: Option<String>,
    pub agent_id: String,
    pub owner: String,
    pub epoch: i64,
    pub since_s: f64,
    pub worker_pid: Option<i32>,
    pub queued: i64,
    pub running: i64,
}

#[derive(Debug, serde::Serialize, sqlx::FromRow)]
pub struct PendingStatus {
    pub queued: i64,
    pub running: i64,
    pub oldest_age_s: Option<f64>,
}

impl Store {
    /// Live daemons are those not stopped whose heartbeat is younger than `live_within`.
    pub async fn status(&self, live_within: Duration) -> Result<Status> {
        let daemons = sqlx::query_as(
            "SELECT d.id, d.hostname, d.pid, d.version,
                    EXTRACT(EPOCH FROM now() - d.heartbeat_at)::float8 AS heartbeat_age_s,
                    d.ready, d.live_workers,
                    (SELECT count(*) FROM turnd_deployments x WHERE x.owner = d.id) AS owned_deployments
             FROM turnd_daemons d
             WHERE d.stopped_at IS NULL
               AND d.heartbeat_at > now() - $1::bigint * interval '1 millisecond'
             ORDER BY d.id LIMIT $2",
        )
        .bind(millis(live_within))
        .bind(MAX_LIST_ROWS)
        .fetch_all(&self.pool)
        .await?;
        let deployments = sqlx::query_as(
            "SELECT d.deployment, d.organization_id, d.agent_id, d.owner, d.epoch,
                    EXTRACT(EPOCH FROM now() - d.since)::float8 AS since_s, d.worker_pid,
                    count(*) FILTER (WHERE t.state = 'queued') AS queued,
                    count(*) FILTER (WHERE t.state = 'running') AS running
             FROM turnd_deployments d
             LEFT JOIN turnd_turns t ON t.deployment = d.deployment AND t.state <> 'done'
             WHERE d.owner IS NOT NULL
             GROUP BY d.deployment ORDER BY d.deployment LIMIT $1",
        )
        .bind(MAX_LIST_ROWS)
        .fetch_all(&self.pool)
        .await?;
        let owned_deployments =
            sqlx::query_scalar("SELECT count(*) FROM turnd_deployments WHERE owner IS NOT NULL")
                .fetch_one(&self.pool)
                .await?;
        let pending = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE state = 'queued') AS queued,
                    count(*) FILTER (WHERE state = 'running') AS running,
                    EXTRACT(EPOCH FROM now() - min(accepted_at))::float8 AS oldest_age_s
             FROM turnd_turns WHERE state <> 'done'",
        )
        .fetch_one(&self.pool)
        .await?;
        let unpublished_events =
            sqlx::query_scalar("SELECT count(*) FROM turnd_outbox WHERE published_at IS NULL")
                .fetch_one(&self.pool)
                .await?;
        Ok(Status { daemons, deployments, owned_deployments, pending, unpublished_events })
    }
}

/// A parked turn as listed for operators: what it is and why, never its body or headers
/// (a body may be as large as `intake.max_turn_bytes`, or larger when it was parked for
/// that; a list of them must stay small). [`Store::parked_get`] gives those.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct Parked {
    pub id: i64,
    pub code: String,
    pub reason: String,
    pub deployment: Option<String>,
    pub message_id: Option<String>,
    pub attempts: i32,
    pub routing_key: String,
    pub age_s: f64,
    pub replayed_by: Option<String>,
    pub replayed_age_s: Option<f64>,
}

/// One parked turn whole: its record, the original body and the AMQP headers it was parked
/// with (as JSON).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ParkedTurn {
    #[sqlx(flatten)]
    pub parked: Parked,
    pub body: Vec<u8>,
    pub headers: String,
}

/// The columns of [`Parked`]: no body, no headers.
const PARKED_COLUMNS: &str = "id, code, reason, deployment, message_id, attempts, routing_key,
    EXTRACT(EPOCH FROM now() - parked_at)::float8 AS age_s, replayed_by,
    EXTRACT(EPOCH FROM now() - replayed_at)::float8 AS replayed_age_s";

impl Store {
    /// Parked turns, newest first; `code` filters, `since` keeps those parked within it; at
    /// most `limit` (clamped to [`MAX_LIST_ROWS`]). Bodies and headers are not read.
    pub async fn parked_list(
        &self,
        code: Option<&str>,
        since: Option<Duration>,
        limit: i64,
    ) -> Result<Vec<Parked>> {
        let sql = format!(
            "SELECT {PARKED_COLUMNS} FROM turnd_parked
             WHERE ($1::text IS NULL OR code = $1)
               AND ($2::bigint IS NULL OR parked_at > now() - $2::bigint * interval '1 millisecond')
             ORDER BY id DESC LIMIT $3"
        );
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(code)
            .bind(since.map(millis))
            .bind(list_limit(limit))
            .fetch_all(&self.pool)
            .await?)
    }

    /// The ids of the parked turns of `code` not yet replayed (parked within `since`), newest
    /// first: what `turnd parked replay --code` works through. Ids only, so not capped.
    pub async fn parked_replayable_ids(
        &self,
        code: &str,
        since: Option<Duration>,
    ) -> Result<Vec<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM turnd_parked
             WHERE code = $1 AND replayed_at IS NULL
               AND ($2::bigint IS NULL OR parked_at > now() - $2::bigint * interval '1 millisecond')
             ORDER BY id DESC",
        )
        .bind(code)
        .bind(since.map(millis))
        .fetch_all(&self.pool)
        .await?)
    }

    /// One parked turn with its body and headers: with [`Store::parked_claim_replay`], which
    /// republishes them, the only query that reads them.
    pub async fn parked_get(&self, id: i64) -> Result<Option<ParkedTurn>> {
        let sql = format!("SELECT {PARKED_COLUMNS}, body, headers FROM turnd_parked WHERE id = $1");
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(&self.pool).await?)
    }

    /// Whether a parked record with this id exists (without reading it).
    pub async fn parked_exists(&self, id: i64) -> Result<bool> {
        Ok(sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM turnd_parked WHERE id = $1)")
            .bind(id)
            .fetch_one(&self.pool)
            .await?)
    }

    /// Claims a parked turn for replay, once: marks it replayed by `who` and, in the same
    /// transaction, clears the turn's record (its tombstone and its published error event) so
    /// the republished turn is accepted again (CONTRACT §2). None if already replayed.
    pub async fn parked_claim_replay(&self, id: i64, who: &str) -> Result<Option<ParkedTurn>> {
        let mut tx = self.pool.begin().await?;
        let sql = format!(
            "UPDATE turnd_parked SET replayed_at = now(), replayed_by = $2
             WHERE id = $1 AND replayed_at IS NULL RETURNING {PARKED_COLUMNS}, body, headers"
        );
        let parked: Option<ParkedTurn> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .bind(who)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(p) = &parked
            && let (Some(d), Some(m)) = (&p.parked.deployment, &p.parked.message_id)
        {
            sqlx::query("DELETE FROM turnd_turns WHERE deployment = $1 AND message_id = $2 AND state = 'done'")
                    .bind(d)
                    .bind(m)
                    .execute(&mut *tx)
                    .await?;
            sqlx::query("DELETE FROM turnd_outbox WHERE deployment = $1 AND message_id = $2")
                .bind(d)
                .bind(m)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(parked)
    }

    /// Undoes a replay claim whose publish failed.
    pub async fn parked_unclaim_replay(&self, id: i64) -> Result<()> {
        sqlx::query("UPDATE turnd_parked SET replayed_at = NULL, replayed_by = NULL WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Deletes parked records by id, or by code and/or age. Returns how many.
    pub async fn parked_purge(
        &self,
        ids: &[i64],
        code: Option<&str>,
        older_than: Option<Duration>,
    ) -> Result<u64> {
        Ok(sqlx::query(
            "DELETE FROM turnd_parked
             WHERE (cardinality($1::bigint[]) = 0 OR id = ANY($1))
               AND ($2::text IS NULL OR code = $2)
               AND ($3::bigint IS NULL OR parked_at < now() - $3::bigint * interval '1 millisecond')",
        )
        .bind(ids)
        .bind(code)
        .bind(older_than.map(millis))
        .execute(&self.pool)
        .await?
        .rows_affected())
    }
}

// ---- console and API (src/http) ------------------------------------------------------------
// Read-only views for the operator console and `/api/v1/`. They read what the daemons already
// record; nothing here takes a lock or changes a turn.

/// A daemon as the console shows it: every daemon that did not stop cleanly and was heard from
/// within the last hour, `live` when its heartbeat is fresh (a stale one is a daemon that died).
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct ConsoleDaemon {
    pub id: String,
    pub hostname: String,
    pub pid: i32,
    pub version: String,
    pub uptime_s: f64,
    pub heartbeat_age_s: f64,
    pub live: bool,
    pub ready: bool,
    pub live_workers: i32,
    pub owned_deployments: i64,
}

/// A deployment that is owned or has pending turns (an unowned one with pending turns is
/// waiting for adoption: the first thing to look at).
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct ConsoleDeployment {
    pub deployment: String,
    pub organization_id: Option<String>,
    pub agent_id: String,
    pub conversation_key: String,
    pub owner: Option<String>,
    pub epoch: i64,
    pub since_s: Option<f64>,
    pub worker_pid: Option<i32>,
    pub worker_uptime_s: Option<f64>,
    /// Age of the owner daemon's last heartbeat.
    pub owner_heartbeat_age_s: Option<f64>,
    /// Age of the running turn's last sign of life (its claim or the worker's last heartbeat).
    pub turn_heartbeat_age_s: Option<f64>,
    pub queued: i64,
    pub running: i64,
    pub oldest_pending_age_s: Option<f64>,
    pub crash_count: i32,
    /// Seconds left of a crash-loop back-off, when one is in force.
    pub backoff_left_s: Option<f64>,
}

/// Pending turns in one state, with the oldest one.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct PendingByState {
    pub state: String,
    pub count: i64,
    pub oldest_age_s: Option<f64>,
    pub oldest_deployment: Option<String>,
    pub oldest_message_id: Option<String>,
}

/// Terminal events committed in one 5-minute bucket (0 = the last five minutes, 11 = 55 to 60
/// minutes ago), by kind and code ("" for replies).
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct EventBucket {
    pub bucket: i32,
    pub kind: String,
    pub code: String,
    pub count: i64,
}

/// Parked turns of one code.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct ParkedByCode {
    pub code: String,
    pub total: i64,
    pub not_replayed: i64,
    pub last_hour: i64,
    pub newest_age_s: f64,
}

/// The width of a bucket of [`Store::events_by_bucket`] and the window it covers.
pub const EVENT_BUCKET_SECONDS: i64 = 300;
pub const EVENT_WINDOW_SECONDS: i64 = 3600;

impl Store {
    /// Daemons not cleanly stopped and heard from within the hour; `live` = heartbeat younger
    /// than `live_within`.
    pub async fn console_daemons(&self, live_within: Duration) -> Result<Vec<ConsoleDaemon>> {
        Ok(sqlx::query_as(
            "SELECT d.id, d.hostname, d.pid, d.version,
                    EXTRACT(EPOCH FROM now() - d.started_at)::float8 AS uptime_s,
                    EXTRACT(EPOCH FROM now() - d.heartbeat_at)::float8 AS heartbeat_age_s,
                    d.heartbeat_at > now() - $1::bigint * interval '1 millisecond' AS live,
                    d.ready, d.live_workers,
                    (SELECT count(*) FROM turnd_deployments x WHERE x.owner = d.id) AS owned_deployments
             FROM turnd_daemons d
             WHERE d.stopped_at IS NULL AND d.heartbeat_at > now() - interval '1 hour'
             ORDER BY d.id LIMIT $2",
        )
        .bind(millis(live_within))
        .bind(MAX_LIST_ROWS)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Owned deployments and those with pending turns, the longest-waiting first. `q` keeps
    /// those whose organization, agent, conversation key or deployment name contains it
    /// (case-insensitive, no wildcards). `turn_deadline` (turn.deadline) turns a running turn's
    /// deadline back into the time of its last heartbeat. At most `limit` rows (clamped to
    /// [`MAX_LIST_ROWS`]).
    pub async fn console_deployments(
        &self,
        q: Option<&str>,
        turn_deadline: Duration,
        limit: i64,
    ) -> Result<Vec<ConsoleDeployment>> {
        Ok(sqlx::query_as(
            "WITH p AS (
                 SELECT deployment,
                        min(organization_id) AS organization_id, min(agent_id) AS agent_id,
                        min(conversation_key) AS conversation_key,
                        count(*) FILTER (WHERE state = 'queued') AS queued,
                        count(*) FILTER (WHERE state = 'running') AS running,
                        min(accepted_at) AS oldest,
                        max(deadline) FILTER (WHERE state = 'running') AS run_deadline
                 FROM turnd_turns WHERE state <> 'done' GROUP BY deployment
             )
             SELECT COALESCE(d.deployment, p.deployment) AS deployment,
                    COALESCE(d.organization_id, p.organization_id) AS organization_id,
                    COALESCE(d.agent_id, p.agent_id) AS agent_id,
                    COALESCE(d.conversation_key, p.conversation_key) AS conversation_key,
                    d.owner, COALESCE(d.epoch, 0) AS epoch,
                    CASE WHEN d.owner IS NOT NULL THEN EXTRACT(EPOCH FROM now() - d.since)::float8 END AS since_s,
                    d.worker_pid,
                    CASE WHEN d.worker_pid IS NOT NULL
                         THEN EXTRACT(EPOCH FROM now() - d.worker_started_at)::float8 END AS worker_uptime_s,
                    EXTRACT(EPOCH FROM now() - o.heartbeat_at)::float8 AS owner_heartbeat_age_s,
                    EXTRACT(EPOCH FROM now() - (p.run_deadline - $2::bigint * interval '1 millisecond'))::float8
                        AS turn_heartbeat_age_s,
                    COALESCE(p.queued, 0) AS queued, COALESCE(p.running, 0) AS running,
                    EXTRACT(EPOCH FROM now() - p.oldest)::float8 AS oldest_pending_age_s,
                    COALESCE(d.crash_count, 0) AS crash_count,
                    CASE WHEN d.backoff_until > now()
                         THEN EXTRACT(EPOCH FROM d.backoff_until - now())::float8 END AS backoff_left_s
             FROM turnd_deployments d
             FULL JOIN p ON p.deployment = d.deployment
             LEFT JOIN turnd_daemons o ON o.id = d.owner
             WHERE (d.owner IS NOT NULL OR p.deployment IS NOT NULL)
               AND ($1::text IS NULL OR strpos(lower(concat_ws(' ',
                        COALESCE(d.deployment, p.deployment),
                        COALESCE(d.organization_id, p.organization_id),
                        COALESCE(d.agent_id, p.agent_id),
                        COALESCE(d.conversation_key, p.conversation_key))), lower($1)) > 0)
             ORDER BY p.oldest ASC NULLS LAST, 1
             LIMIT $3",
        )
        .bind(q)
        .bind(millis(turn_deadline))
        .bind(list_limit(limit))
        .fetch_all(&self.pool)
        .await?)
    }

    /// Pending turns by state (only states that have some), each with its oldest turn.
    pub async fn pending_by_state(&self) -> Result<Vec<PendingByState>> {
        Ok(sqlx::query_as(
            "WITH c AS (
                 SELECT state, count(*) AS n, min(accepted_at) AS oldest
                 FROM turnd_turns WHERE state <> 'done' GROUP BY state
             ), o AS (
                 SELECT DISTINCT ON (state) state, deployment, message_id
                 FROM turnd_turns WHERE state <> 'done' ORDER BY state, accepted_at
             )
             SELECT c.state, c.n AS count,
                    EXTRACT(EPOCH FROM now() - c.oldest)::float8 AS oldest_age_s,
                    o.deployment AS oldest_deployment, o.message_id AS oldest_message_id
             FROM c LEFT JOIN o USING (state) ORDER BY c.state",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Terminal events of the last hour in 5-minute buckets by kind and code. Published rows
    /// are found through the `published_at` index and unpublished ones through the backlog
    /// index (an event is published within moments of its commit), so this does not scan
    /// the whole retention window of the outbox. Error codes come from workers, so their
    /// number is not bounded: at most [`MAX_LIST_ROWS`] rows, the most recent buckets first.
    pub async fn events_by_bucket(&self) -> Result<Vec<EventBucket>> {
        Ok(sqlx::query_as(
            "SELECT floor(EXTRACT(EPOCH FROM now() - created_at) / $1::bigint)::int AS bucket,
                    kind, COALESCE(code, '') AS code, count(*) AS count
             FROM turnd_outbox
             WHERE (published_at > now() - $2::bigint * interval '1 second' OR published_at IS NULL)
               AND created_at > now() - $2::bigint * interval '1 second'
             GROUP BY 1, 2, 3 ORDER BY 1, 2, 3 LIMIT $3",
        )
        .bind(EVENT_BUCKET_SECONDS)
        .bind(EVENT_WINDOW_SECONDS)
        .bind(MAX_LIST_ROWS)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Parked turns by code: how many, how many still waiting (not replayed), how many in
    /// the last hour, and the newest one's age.
    pub async fn parked_by_code(&self) -> Result<Vec<ParkedByCode>> {
        Ok(sqlx::query_as(
            "SELECT code, count(*) AS total,
                    count(*) FILTER (WHERE replayed_at IS NULL) AS not_replayed,
                    count(*) FILTER (WHERE parked_at > now() - interval '1 hour') AS last_hour,
                    EXTRACT(EPOCH FROM now() - max(parked_at))::float8 AS newest_age_s
             FROM turnd_parked GROUP BY code ORDER BY code LIMIT $1",
        )
        .bind(MAX_LIST_ROWS)
        .fetch_all(&self.pool)
        .await?)
    }
}
