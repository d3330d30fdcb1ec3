//! PostgreSQL: turn records (the obligations), the reply outbox, deployment epochs and
//! crash-loop records, the daemon registry, parked turns.
//!
//! **Architecture invariant**: only this module runs SQL (the lock session in `lock` aside),
//! and every guarantee that spans rows is one statement or one transaction here. The state
//! election — `UPDATE … SET state = 'done' WHERE state <> 'done'` — and the outbox insert that
//! follows from it always commit together, so a turn can end only once.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{Connection, PgConnection, PgPool, Postgres, Row, Transaction};

use crate::config::DatabaseConfig;
use crate::event::{Envelope, Outcome, TerminalEvent};
use crate::otel::TraceContext;
use crate::turn::{DeploymentName, Epoch, ErrorCode, MessageId, Seq, Turn};

/// turnd's migrations. Migrations newer than this binary, applied by a newer turnd, are
/// tolerated: an older binary must keep running on them — a rollback, or a pod of the old
/// release restarting in the middle of a rollout — so every migration keeps the release
/// before it working (README "Upgrading and rolling back turnd"). sqlx's default refuses
/// to start instead.
pub fn migrator() -> sqlx::migrate::Migrator {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.set_ignore_missing(true);
    migrator
}

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
    /// Its place in the accept order (doorbells name it).
    pub seq: Seq,
    pub line: String,
    pub envelope: Envelope,
    /// How long the turn had been accepted when it was claimed (for the latency histogram).
    pub waited: Duration,
    /// When the claiming statement was sent: its stored deadline counts from no earlier.
    pub sent: std::time::Instant,
}

/// What [`Store::owned_elsewhere`] found.
#[derive(Debug)]
pub struct OwnedElsewhere {
    /// The deployments another daemon owns.
    pub owned: Vec<String>,
    /// The other daemons alive.
    pub other_daemons: i64,
}

/// A turn [`Store::arm_and_hand`] armed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Armed {
    pub seq: Seq,
    /// Armed `running`: claimed for the idle owner it was handed to.
    pub running: bool,
}

/// What [`Store::commit_and_claim`] did.
#[derive(Debug)]
pub struct CommitAndClaim {
    /// The answered turn's event, when its commit won the election.
    pub committed: Option<Committed>,
    /// The next turn, when one was claimed.
    pub claimed: Option<Claimed>,
    /// Whether it looked for a next turn at all (`claimed` None then means none was queued).
    pub looked: bool,
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
    /// Events of this deployment committed before the take-over and not yet marked
    /// published (an earlier owner's relay may still hold them, e.g. across a broker outage
    /// of its own), in commit order: the new owner's relay publishes them before anything it
    /// commits, so replies keep commit order per deployment whichever daemon committed them.
    pub unpublished: Vec<Committed>,
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
    /// An operator asked to cancel it: whichever path ends it, it ends `TURN_CANCELLED`.
    cancelled: bool,
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
    /// What its relay span is parented on.
    pub trace: Option<TraceContext>,
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
        migrator().run(&self.pool).await?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

mod audit;
mod cancel;
mod fairness;
mod lifecycle;
mod parked;
mod views;

pub use audit::{Actor, AuditRow};
pub use cancel::CancelResult;

pub use views::*;
