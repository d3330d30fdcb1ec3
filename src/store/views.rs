//! Read-only views: `turnd status`, the console and `/api/v1/`, the metrics gauges, parked turns
//! as listed and shown. They read what the daemons record; nothing here takes a lock or
//! changes a turn.

use super::*;

impl Store {
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
pub(super) const PARKED_COLUMNS: &str =
    "id, code, reason, deployment, message_id, attempts, routing_key,
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

    /// The ids a bulk action by filter acts on, oldest first, at most `limit` (clamped to
    /// [`MAX_LIST_ROWS`]): those with `code`, in `deployment`, parked longer than `older_than`
    /// ago (each filter optional), and, with `not_replayed`, not replayed yet.
    pub async fn parked_ids_matching(
        &self,
        code: Option<&str>,
        deployment: Option<&str>,
        older_than: Option<Duration>,
        not_replayed: bool,
        limit: i64,
    ) -> Result<Vec<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM turnd_parked
             WHERE ($1::text IS NULL OR code = $1)
               AND ($2::text IS NULL OR deployment = $2)
               AND ($3::bigint IS NULL OR parked_at < now() - $3::bigint * interval '1 millisecond')
               AND (NOT $4 OR replayed_at IS NULL)
             ORDER BY id LIMIT $5",
        )
        .bind(code)
        .bind(deployment)
        .bind(older_than.map(millis))
        .bind(not_replayed)
        .bind(list_limit(limit))
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
