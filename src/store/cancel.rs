//! Cancellation of one turn by an operator (`turnd cancel`, the API, the console), and what
//! owners and the sweep read to deliver it to the turn's worker.
//!
//! A queued turn ends at once: the election and its `TURN_CANCELLED` event in the request's own
//! transaction. A running one gets a cancel request on its row (when it was asked; heartbeats
//! no longer extend it) and whichever path ends it next wins the one election: the worker's own
//! answer, its owner at the end of the grace, any daemon's sweep once the request is older than
//! the grace, a take-over. Every failure path then says `TURN_CANCELLED`. The grace is the
//! daemons' `turn.cancel_grace`, never the requester's: a `turnd cancel` run with another
//! config changes nothing.

use super::audit::{Actor, append};
use super::lifecycle::{cancelled_outcome, finish_pending, pending_from_row};
use super::*;

/// The most candidates an ambiguous messageId lists.
const MAX_CANDIDATES: i64 = 20;

/// What one cancel request did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum CancelResult {
    /// It was queued: it ended now with `TURN_CANCELLED` (the event is in the outbox).
    Cancelled { deployment: String },
    /// It is running: its worker is told; it ends `TURN_CANCELLED` at the end of the daemons'
    /// `turn.cancel_grace` unless the worker answers first. `owner` is the daemon that runs it
    /// (None between owners).
    Cancelling { deployment: String, owner: Option<String> },
    /// Asked before and still within its grace.
    AlreadyCancelling { deployment: String },
    /// It had already ended; nothing changed. Its event's kind and code, when still recorded.
    AlreadyDone { deployment: String, kind: Option<String>, code: Option<String> },
    /// No turn with this messageId (in this deployment) is recorded: never accepted, or older
    /// than `reply.retention`.
    NotFound,
    /// The messageId names turns in several deployments; name one.
    Ambiguous { candidates: Vec<String> },
}

impl CancelResult {
    /// One word for the audit log and the CLI.
    pub fn word(&self) -> &'static str {
        match self {
            CancelResult::Cancelled { .. } => "cancelled",
            CancelResult::Cancelling { .. } => "cancelling",
            CancelResult::AlreadyCancelling { .. } => "already_cancelling",
            CancelResult::AlreadyDone { .. } => "already_done",
            CancelResult::NotFound => "not_found",
            CancelResult::Ambiguous { .. } => "ambiguous",
        }
    }
}

impl Store {
    /// Cancels the turn `message_id` (in `deployment`, when given), recording the request in
    /// the audit log in the same transaction. The committed event of a queued turn comes back
    /// for the relay.
    pub async fn cancel_turn(
        &self,
        message_id: &str,
        deployment: Option<&str>,
        actor: &Actor,
    ) -> Result<(CancelResult, Vec<Committed>)> {
        Box::pin(self.cancel_turn_tx(message_id, deployment, actor)).await
    }

    async fn cancel_turn_tx(
        &self,
        message_id: &str,
        deployment: Option<&str>,
        actor: &Actor,
    ) -> Result<(CancelResult, Vec<Committed>)> {
        let mut tx = self.pool.begin().await?;
        // Locked, so a claim, a commit or another cancel of the same turn waits for us (and we
        // for it): the state read here is the state acted on.
        let rows: Vec<PgRow> = sqlx::query(
            "SELECT deployment, message_id, organization_id, agent_id, conversation_id, routing,
                    state, provider_code, cancel_requested_at IS NOT NULL AS cancelled,
                    traceparent, tracestate
             FROM turnd_turns
             WHERE message_id = $1 AND ($2::text IS NULL OR deployment = $2)
             ORDER BY deployment LIMIT $3 FOR UPDATE",
        )
        .bind(message_id)
        .bind(deployment)
        .bind(MAX_CANDIDATES)
        .fetch_all(&mut *tx)
        .await?;
        let mut committed = Vec::new();
        let result = match rows.as_slice() {
            [] => CancelResult::NotFound,
            [row] => {
                let mut p = pending_from_row(row)?;
                let d = p.envelope.deployment.as_str().to_owned();
                match p.state.as_str() {
                    "queued" => {
                        p.cancelled = true;
                        committed = finish_pending(&mut tx, vec![p], &|_| {
                            cancelled_outcome(&Outcome::error(
                                ErrorCode::TurnCancelled,
                                "cancelled by an operator before it ran",
                            ))
                        })
                        .await?;
                        CancelResult::Cancelled { deployment: d }
                    }
                    "running" if p.cancelled => CancelResult::AlreadyCancelling { deployment: d },
                    "running" => {
                        let owner: Option<String> = sqlx::query_scalar(
                            "WITH up AS (
                                 UPDATE turnd_turns SET cancel_requested_at = now()
                                 WHERE deployment = $1 AND message_id = $2
                                 RETURNING epoch)
                             SELECT d.owner FROM up
                             LEFT JOIN turnd_deployments d ON d.deployment = $1 AND d.epoch = up.epoch",
                        )
                        .bind(&d)
                        .bind(message_id)
                        .fetch_one(&mut *tx)
                        .await?;
                        CancelResult::Cancelling { deployment: d, owner }
                    }
                    _ => {
                        let event: Option<(String, Option<String>)> = sqlx::query_as(
                            "SELECT kind, code FROM turnd_outbox WHERE deployment = $1 AND message_id = $2",
                        )
                        .bind(&d)
                        .bind(message_id)
                        .fetch_optional(&mut *tx)
                        .await?;
                        let (kind, code) = event.map_or((None, None), |(k, c)| (Some(k), c));
                        CancelResult::AlreadyDone { deployment: d, kind, code }
                    }
                }
            }
            many => CancelResult::Ambiguous {
                candidates: many
                    .iter()
                    .map(|r| r.try_get::<String, _>("deployment"))
                    .collect::<std::result::Result<_, _>>()?,
            },
        };
        let target = match (&result, deployment) {
            (
                CancelResult::Cancelled { deployment: d }
                | CancelResult::Cancelling { deployment: d, .. }
                | CancelResult::AlreadyCancelling { deployment: d }
                | CancelResult::AlreadyDone { deployment: d, .. },
                _,
            ) => format!("turn:{d}/{message_id}"),
            (_, Some(d)) => format!("turn:{d}/{message_id}"),
            (_, None) => format!("turn:{message_id}"),
        };
        append(&mut *tx, actor, "cancel", &target, result.word()).await?;
        tx.commit().await?;
        Ok((result, committed))
    }

    /// The owner's side: marks the cancel of its running turn delivered, cuts its stored
    /// deadline to the request + `grace` (never later than it was) and says how long is left
    /// (None: no cancel asked, already delivered, or not ours under `epoch`).
    pub async fn take_cancel(
        &self,
        deployment: &DeploymentName,
        message_id: &MessageId,
        epoch: Epoch,
        grace: Duration,
    ) -> Result<Option<Duration>> {
        let left: Option<f64> = sqlx::query_scalar(
            "UPDATE turnd_turns SET cancel_delivered_at = now(),
                    deadline = LEAST(deadline, cancel_requested_at + $4::bigint * interval '1 millisecond')
             WHERE deployment = $1 AND message_id = $2 AND state = 'running' AND epoch = $3
               AND cancel_requested_at IS NOT NULL AND cancel_delivered_at IS NULL
             RETURNING GREATEST(EXTRACT(EPOCH FROM deadline - now()), 0)::float8",
        )
        .bind(deployment.as_str())
        .bind(message_id.as_str())
        .bind(epoch.get())
        .bind(millis(grace))
        .fetch_optional(&self.pool)
        .await?;
        Ok(left.map(|s| Duration::try_from_secs_f64(s).unwrap_or_default()))
    }

    /// The sweep's reminder: deployments owned by `daemon` whose running turn has a cancel
    /// request its owner has not delivered yet (its doorbell was lost, or its thread-queue
    /// consumer had not started).
    pub async fn undelivered_cancels(&self, daemon: &str) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT t.deployment FROM turnd_turns t
             JOIN turnd_deployments d ON d.deployment = t.deployment AND d.epoch = t.epoch
             WHERE t.cancel_requested_at IS NOT NULL AND t.state = 'running'
               AND t.cancel_delivered_at IS NULL AND d.owner = $1
             LIMIT $2",
        )
        .bind(daemon)
        .bind(MAX_LIST_ROWS)
        .fetch_all(&self.pool)
        .await?)
    }
}

impl Store {
    /// The sweep's side, for an owner that died mid-cancel (or never heard): fails, once across
    /// daemons, a bounded batch of running turns whose cancel request is older than `grace`.
    pub async fn sweep_cancelled(&self, grace: Duration) -> Result<Vec<Committed>> {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<PgRow> = sqlx::query(
            "SELECT deployment, message_id, organization_id, agent_id, conversation_id, routing,
                    state, provider_code, true AS cancelled, traceparent, tracestate
             FROM turnd_turns
             WHERE cancel_requested_at < now() - $1::bigint * interval '1 millisecond'
               AND state = 'running'
             ORDER BY cancel_requested_at LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind(millis(grace))
        .bind(FAIL_BATCH)
        .fetch_all(&mut *tx)
        .await?;
        let pending = rows.iter().map(pending_from_row).collect::<Result<Vec<_>>>()?;
        let failed = finish_pending(&mut tx, pending, &|_| {
            Outcome::error(ErrorCode::TurnTimeout, "the grace lapsed")
        })
        .await?;
        tx.commit().await?;
        Ok(failed)
    }
}
