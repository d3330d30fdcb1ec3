//! The SQL that carries the guarantees: arming, take-over, claim, commit and every fail path
//! (each one statement or one transaction), the sweep and adoption, retention, the outbox the
//! relay publishes from, and the daemon registry.

use super::*;

/// Which turns a heartbeat extends and how ([`Store::extend_deadlines`], also run when a
/// slow spawn restarts them): $1 deployment, $2 epoch, $3 the running turn's deadline and $4
/// the queued turns' wait, in milliseconds. A macro, so that `concat!` can extend it.
macro_rules! extend_deadlines_sql {
    () => {
        "UPDATE turnd_turns SET deadline = CASE
             WHEN state = 'running' THEN now() + $3::bigint * interval '1 millisecond'
             ELSE GREATEST(deadline, now() + $4::bigint * interval '1 millisecond') END
         WHERE deployment = $1 AND state <> 'done'
           AND (state = 'queued'
                OR (epoch = $2 AND provider_code IS NULL AND cancel_requested_at IS NULL))"
    };
}

impl Store {
    // ---- intake ----------------------------------------------------------------------------

    /// Arms turns in the order given (their accept order). Returns, per turn, its seq when it
    /// was armed now; None means the (deployment, messageId) record already exists — pending
    /// or answered — and the publish is a duplicate.
    pub async fn arm(&self, turns: &[&Turn], queue_timeout: Duration) -> Result<Vec<Option<Seq>>> {
        let armed = self.arm_and_hand(turns, queue_timeout, &[], Duration::ZERO).await?;
        Ok(armed.into_iter().map(|a| a.map(|a| a.seq)).collect())
    }

    /// [`Store::arm`], and in the same statement claims a turn for an idle owner: a turn with
    /// an epoch in `hand` (by position; missing means none) is armed `running` under that
    /// epoch, as a claim would take it (deadline `claim_deadline`), when that epoch still
    /// owns its deployment and no other turn of it is pending — so the accept order holds and
    /// one turn runs at a time — and `queued` otherwise. A turn is never claimed twice: a
    /// claim takes only `queued` rows.
    pub async fn arm_and_hand(
        &self,
        turns: &[&Turn],
        queue_timeout: Duration,
        hand: &[Option<Epoch>],
        claim_deadline: Duration,
    ) -> Result<Vec<Option<Armed>>> {
        let epochs: Vec<Option<i64>> =
            (0..turns.len()).map(|i| hand.get(i).copied().flatten().map(Epoch::get)).collect();
        let mut deployments = Vec::with_capacity(turns.len());
        let mut message_ids = Vec::with_capacity(turns.len());
        let mut orgs = Vec::with_capacity(turns.len());
        let mut agents = Vec::with_capacity(turns.len());
        let mut keys = Vec::with_capacity(turns.len());
        let mut conversations = Vec::with_capacity(turns.len());
        let mut lines = Vec::with_capacity(turns.len());
        let mut routings = Vec::with_capacity(turns.len());
        let mut parents = Vec::with_capacity(turns.len());
        let mut states = Vec::with_capacity(turns.len());
        for t in turns {
            parents.push(t.trace.as_ref().map(|c| c.traceparent.as_str()));
            states.push(t.trace.as_ref().and_then(|c| c.tracestate.as_deref()));
            deployments.push(t.deployment.as_str());
            message_ids.push(t.message_id.as_str());
            orgs.push(t.organization_id.as_ref().map(|o| o.as_str()));
            agents.push(t.agent_id.as_str());
            keys.push(t.conversation_key.as_str());
            conversations.push(t.conversation_id.as_deref());
            lines.push(t.line.as_str());
            routings.push(t.routing.as_str());
        }
        // ORDER BY ord makes nextval() follow the given order: the accept order. The checks
        // for a hand-off read the statement's snapshot: rows this statement inserts are not
        // in it, so only the first turn of a deployment in a batch may carry an epoch.
        let armed: Vec<(String, String, i64, bool)> = sqlx::query_as(
            "INSERT INTO turnd_turns (deployment, message_id, seq, state, organization_id,
                 agent_id, conversation_key, conversation_id, turn, routing, deadline,
                 traceparent, tracestate, epoch, started_at)
             SELECT d, m, nextval('turnd_accept_seq'),
                    CASE WHEN run THEN 'running' ELSE 'queued' END, o, a, k, c, l, r,
                    now() + CASE WHEN run THEN $13 ELSE $9 END::bigint * interval '1 millisecond',
                    tp, ts, CASE WHEN run THEN e END, CASE WHEN run THEN now() END
             FROM (SELECT x.*,
                          (x.e IS NOT NULL
                           AND EXISTS (SELECT 1 FROM turnd_deployments w
                                       WHERE w.deployment = x.d AND w.epoch = x.e)
                           AND NOT EXISTS (SELECT 1 FROM turnd_turns q
                                           WHERE q.deployment = x.d AND q.state <> 'done'))
                          AS run
                   FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],
                          $5::text[], $6::text[], $7::text[], $8::text[], $10::text[],
                          $11::text[], $12::bigint[])
                          WITH ORDINALITY AS x(d, m, o, a, k, c, l, r, tp, ts, e, ord)
                   ORDER BY ord) x
             ON CONFLICT (deployment, message_id) DO NOTHING
             RETURNING deployment, message_id, seq, state = 'running'",
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
        .bind(&parents)
        .bind(&states)
        .bind(&epochs)
        .bind(millis(claim_deadline))
        .fetch_all(&self.pool)
        .await?;
        let armed_of = |seq: i64, running: bool| Armed { seq: Seq::new(seq), running };
        if armed.len() == turns.len() {
            // RETURNING follows the insert order, which ORDER BY ord made the given order.
            return Ok(armed
                .into_iter()
                .map(|(_, _, seq, run)| Some(armed_of(seq, run)))
                .collect());
        }
        // Some were duplicates (of an earlier publish, or of each other within the batch).
        let mut armed: HashMap<(String, String), (i64, bool)> =
            armed.into_iter().map(|(d, m, seq, run)| ((d, m), (seq, run))).collect();
        Ok(turns
            .iter()
            .map(|t| {
                armed
                    .remove(&(t.deployment.as_str().to_owned(), t.message_id.as_str().to_owned()))
                    .map(|(seq, run)| armed_of(seq, run))
            })
            .collect())
    }

    /// Which of these deployments another daemon owns, as its owner record says (set when it
    /// took the lock, cleared when it let go cleanly; left behind by a daemon that died), and
    /// how many other daemons are alive (registered, not stopped, a heartbeat within `alive`).
    pub async fn owned_elsewhere(
        &self,
        names: &[&str],
        me: &str,
        alive: Duration,
    ) -> Result<OwnedElsewhere> {
        let (owned, other_daemons): (Vec<String>, i64) = sqlx::query_as(
            "SELECT ARRAY(SELECT deployment FROM turnd_deployments
                          WHERE deployment = ANY($1) AND owner IS NOT NULL AND owner <> $2),
                    (SELECT count(*) FROM turnd_daemons
                     WHERE id <> $2 AND stopped_at IS NULL
                       AND heartbeat_at > now() - $3::bigint * interval '1 millisecond')",
        )
        .bind(names)
        .bind(me)
        .bind(millis(alive))
        .fetch_one(&self.pool)
        .await?;
        Ok(OwnedElsewhere { owned, other_daemons })
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
            let mut takeover =
                match take_over_statement(&self.pool, deployment, epoch, owner, false).await? {
                    TakeoverRow::Stale => self.take_over_tx(deployment, epoch, owner).await?,
                    row => row.into_takeover(Vec::new()),
                };
            if takeover.meta.is_some() && takeover.has_unpublished {
                takeover.unpublished = self.unpublished_of(deployment).await?;
            }
            Ok(takeover.into())
        })
        .await
    }

    /// The deployment's events not yet marked published, in commit order. A few rows at
    /// most: the partial index holds only unpublished events, of every deployment.
    async fn unpublished_of(&self, deployment: &DeploymentName) -> Result<Vec<Committed>> {
        let rows: Vec<PgRow> = sqlx::query(
            "SELECT id, message_id, event_id, routing_key, kind, code, body, traceparent,
                    tracestate
             FROM turnd_outbox WHERE published_at IS NULL AND deployment = $1 ORDER BY id",
        )
        .bind(deployment.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let kind: String = row.try_get("kind")?;
                Ok(Committed {
                    id: row.try_get("id")?,
                    event: TerminalEvent {
                        deployment: deployment.clone(),
                        message_id: MessageId::from_trusted(row.try_get("message_id")?),
                        event_id: row.try_get("event_id")?,
                        routing_key: row.try_get("routing_key")?,
                        kind: if kind == "reply" { "reply" } else { "error" },
                        code: row.try_get("code")?,
                        body: row.try_get::<Option<String>, _>("body")?.unwrap_or_default(),
                        trace: trace_from_row(row)?,
                    },
                })
            })
            .collect()
    }

    /// A take-over that finds turns still running under an older epoch fails them in the
    /// transaction that moves the epoch.
    async fn take_over_tx(
        &self,
        deployment: &DeploymentName,
        epoch: Epoch,
        owner: &str,
    ) -> Result<TakenOver> {
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
        let next = self.commit_and_claim(deployment, None, epoch, Some(deadline)).await?;
        Ok(next.claimed)
    }

    /// Commits the running turn's outcome under `epoch`. None when it lost the election: the
    /// turn already ended (sweep, takeover) or a newer epoch owns the deployment.
    pub async fn commit(
        &self,
        envelope: &Envelope,
        epoch: Epoch,
        outcome: &Outcome,
    ) -> Result<Option<Committed>> {
        let done = Some((envelope, outcome));
        Ok(self.commit_and_claim(&envelope.deployment, done, epoch, None).await?.committed)
    }

    /// One statement, one round trip: commits the answered turn (`done`: the election and its
    /// outbox row, under `epoch`) and, with `claim` (the claimed turn's deadline), claims the
    /// deployment's next turn, the oldest queued one. Either part may be absent. The claim is fenced like
    /// the commit: nothing is claimed once a newer epoch owns the deployment, whatever became of
    /// the commit (a turn the sweep ended is no reason not to take the next).
    pub async fn commit_and_claim(
        &self,
        deployment: &DeploymentName,
        done: Option<(&Envelope, &Outcome)>,
        epoch: Epoch,
        claim: Option<Duration>,
    ) -> Result<CommitAndClaim> {
        let event = done.map(|(envelope, outcome)| TerminalEvent::new(envelope, outcome));
        let trace = event.as_ref().and_then(|e| e.trace.as_ref());
        let sent = std::time::Instant::now();
        // Each CTE runs once on the statement's snapshot: the answered row is 'running', so
        // `next` never sees it; MATERIALIZED keeps `next` from being rescanned per row (which,
        // skipping rows this very statement updated, could claim several turns). `claimed`
        // finds the row `next` locked by its ctid (stable while locked, within the statement):
        // by (deployment, message_id) the planner may range-scan the deployment's queued turns
        // instead, believing them few (tests/it/backlog.rs).
        let row: PgRow = sqlx::query(
            "WITH owner AS (
                 SELECT 1 FROM turnd_deployments d WHERE d.deployment = $1 AND d.epoch = $3),
             done AS (
                 UPDATE turnd_turns SET state = 'done', turn = NULL, routing = NULL,
                        done_at = now(), traceparent = NULL, tracestate = NULL
                 WHERE deployment = $1 AND message_id = $2 AND state = 'running'
                   AND epoch = $3 AND EXISTS (SELECT 1 FROM owner)
                 RETURNING 1),
             event AS (
                 INSERT INTO turnd_outbox (deployment, message_id, event_id, routing_key, kind,
                                           code, body, traceparent, tracestate)
                 SELECT $1, $2, $4, $5, $6, $7, $8, $9, $10 FROM done
                 ON CONFLICT (deployment, message_id) DO NOTHING
                 RETURNING id),
             next AS MATERIALIZED (
                 SELECT ctid FROM turnd_turns
                 WHERE deployment = $1 AND state = 'queued'
                 ORDER BY seq LIMIT $11 FOR UPDATE),
             claimed AS (
                 UPDATE turnd_turns t SET state = 'running', epoch = $3, started_at = now(),
                        deadline = now() + $12::bigint * interval '1 millisecond'
                 FROM next
                 WHERE t.ctid = next.ctid
                   AND t.state = 'queued' AND EXISTS (SELECT 1 FROM owner)
                 RETURNING t.message_id, t.seq, t.turn, t.organization_id, t.agent_id,
                           t.conversation_id, t.routing, t.traceparent, t.tracestate,
                           EXTRACT(EPOCH FROM now() - t.accepted_at)::float8 AS waited)
             SELECT (SELECT id FROM event) AS event_id, c.*
             FROM (SELECT 1) AS one LEFT JOIN claimed c ON true",
        )
        .bind(deployment.as_str())
        .bind(done.map(|(envelope, _)| envelope.message_id.as_str()))
        .bind(epoch.get())
        .bind(event.as_ref().map(|e| e.event_id.as_str()))
        .bind(event.as_ref().map(|e| e.routing_key.as_str()))
        .bind(event.as_ref().map(|e| e.kind))
        .bind(event.as_ref().and_then(|e| e.code.as_deref()))
        .bind(event.as_ref().map(|e| e.body.as_str()))
        .bind(trace.map(|c| c.traceparent.as_str()))
        .bind(trace.and_then(|c| c.tracestate.as_deref()))
        .bind(i64::from(claim.is_some()))
        .bind(claim.map_or(0, millis))
        .fetch_one(&self.pool)
        .await?;
        let committed = match (row.try_get::<Option<i64>, _>("event_id")?, event) {
            (Some(id), Some(event)) => Some(Committed { id, event }),
            _ => None,
        };
        let claimed = match row.try_get::<Option<String>, _>("message_id")? {
            None => None,
            Some(_) => Some(Claimed {
                seq: Seq::new(row.try_get("seq")?),
                line: row.try_get::<Option<String>, _>("turn")?.unwrap_or_default(),
                envelope: envelope_from_row(deployment, &row)?,
                waited: Duration::try_from_secs_f64(row.try_get("waited")?).unwrap_or_default(),
                sent,
            }),
        };
        Ok(CommitAndClaim { committed, claimed, looked: claim.is_some() })
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
        sqlx::query(extend_deadlines_sql!())
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

    /// Records a worker started for the turn claimed under `epoch` and, with `deadline`
    /// (the running turn's, and `queue_timeout` for the queued), restarts the deadlines from
    /// now as a heartbeat does (for a spawn slow enough to eat into them): one statement.
    pub async fn worker_started(
        &self,
        deployment: &DeploymentName,
        epoch: Epoch,
        pid: u32,
        deadline: Option<(Duration, Duration)>,
    ) -> Result<()> {
        // The heartbeat's statement, guarded by its deadline being given ($3).
        sqlx::query(concat!(
            "WITH worker AS (
                 UPDATE turnd_deployments SET worker_pid = $5, worker_started_at = now()
                 WHERE deployment = $1 AND epoch = $2) ",
            extend_deadlines_sql!(),
            " AND $3::bigint IS NOT NULL"
        ))
        .bind(deployment.as_str())
        .bind(epoch.get())
        .bind(deadline.map(|(d, _)| millis(d)))
        .bind(deadline.map(|(_, q)| millis(q)))
        .bind(pid as i32)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The worker of the deployment owned under `epoch` is gone.
    pub async fn worker_stopped(&self, deployment: &DeploymentName, epoch: Epoch) -> Result<()> {
        sqlx::query(
            "UPDATE turnd_deployments SET worker_pid = NULL, worker_started_at = NULL
             WHERE deployment = $1 AND epoch = $2",
        )
        .bind(deployment.as_str())
        .bind(epoch.get())
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
                    worker_started_at = NULL, worker_slot = false, released_at = now()
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
    /// `done_at IS NULL` (pending) rather than `state <> 'done'`: the deadline index's own
    /// predicate, which no turn-path statement implies (migration 0006).
    pub async fn sweep_lapsed(&self) -> Result<Vec<Committed>> {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<PgRow> = sqlx::query(
            "SELECT deployment, message_id, organization_id, agent_id, conversation_id, routing,
                    state, provider_code, cancel_requested_at IS NOT NULL AS cancelled,
                    traceparent, tracestate
             FROM turnd_turns WHERE done_at IS NULL AND deadline < now()
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
        // A daemon that comes back under the same id owns nothing yet: what its previous life
        // held must not count against an organization's cluster-wide cap.
        sqlx::query(
            "UPDATE turnd_deployments SET worker_slot = false WHERE owner = $1 AND worker_slot",
        )
        .bind(id)
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
        type Row = (i64, String, String, String, Option<String>, Option<String>, Option<String>);
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, event_id, routing_key, message_id, body, traceparent, tracestate
             FROM turnd_outbox
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
            .map(|(id, event_id, routing_key, message_id, body, tp, ts)| Unpublished {
                id,
                event_id,
                routing_key,
                message_id,
                body: body.unwrap_or_default(),
                trace: tp.and_then(|tp| TraceContext::parse(&tp, ts.as_deref())),
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
        "UPDATE turnd_outbox SET published_at = now(), body = NULL, traceparent = NULL,
                tracestate = NULL
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

/// A take-over before its unpublished events are read.
struct TakenOver {
    takeover: Takeover,
    has_unpublished: bool,
}

impl std::ops::Deref for TakenOver {
    type Target = Takeover;
    fn deref(&self) -> &Takeover {
        &self.takeover
    }
}

impl std::ops::DerefMut for TakenOver {
    fn deref_mut(&mut self) -> &mut Takeover {
        &mut self.takeover
    }
}

impl From<TakenOver> for Takeover {
    fn from(t: TakenOver) -> Takeover {
        t.takeover
    }
}

/// A cancelled turn's error, whatever path ended it: the lapse of its deadline is the end of
/// `turn.cancel_grace`; any other path (the worker died, shutdown) says so after the cancel.
pub(super) fn cancelled_outcome(path: &Outcome) -> Outcome {
    let message = match path {
        Outcome::Error { code: ErrorCode::TurnTimeout, .. } => {
            "cancelled by an operator; the worker did not answer within turn.cancel_grace"
                .to_owned()
        }
        Outcome::Error { code: ErrorCode::TurnCancelled, message } => message.clone(),
        Outcome::Error { message, .. } => format!("cancelled by an operator; then {message}"),
        Outcome::Reply(_) => "cancelled by an operator".to_owned(),
    };
    Outcome::error(ErrorCode::TurnCancelled, message)
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
        has_unpublished: bool,
    },
}

impl TakeoverRow {
    fn into_takeover(self, failed: Vec<Committed>) -> TakenOver {
        match self {
            TakeoverRow::Taken { meta, previous_owner, backoff_ms, has_unpublished } => TakenOver {
                takeover: Takeover {
                    meta: Some(meta),
                    failed,
                    unpublished: Vec::new(),
                    backoff_ms: backoff_ms.filter(|ms| *ms > 0),
                    previous_owner,
                },
                has_unpublished,
            },
            TakeoverRow::NoTurns | TakeoverRow::Stale => TakenOver {
                takeover: Takeover {
                    meta: None,
                    failed,
                    unpublished: Vec::new(),
                    backoff_ms: None,
                    previous_owner: None,
                },
                has_unpublished: false,
            },
        }
    }
}

/// Records `epoch` and `owner` for the deployment (never moving the epoch back) and reads what
/// the owner needs: the conversation's identity from one of its turns, the owner recorded
/// before (the statement's snapshot predates its own write), the crash-loop back-off left.
/// Unless `force`, writes nothing when a turn still runs under an older epoch.
async fn take_over_statement<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    deployment: &DeploymentName,
    epoch: Epoch,
    owner: &str,
    force: bool,
) -> Result<TakeoverRow> {
    type Row = (Option<String>, String, String, Option<String>, bool, Option<i64>, bool);
    let row: Option<Row> = sqlx::query_as(
        // Every turn of a deployment carries its identity (the name derives from it): a
        // pending one if any, else any tombstone. One index entry either way — not a read of
        // the conversation's whole history (reply.retention of tombstones) at each take-over.
        "WITH meta AS (
             (SELECT organization_id, agent_id, conversation_key FROM turnd_turns
              WHERE deployment = $1 AND state <> 'done' LIMIT 1)
             UNION ALL
             (SELECT organization_id, agent_id, conversation_key FROM turnd_turns
              WHERE deployment = $1 LIMIT 1)
             LIMIT 1),
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
                    worker_started_at = NULL, worker_slot = false
                -- A late takeover under an older epoch changes nothing: the fence never
                -- moves back and the current owner's record stays.
                WHERE turnd_deployments.epoch < EXCLUDED.epoch
             RETURNING (EXTRACT(EPOCH FROM (backoff_until - now())) * 1000)::bigint AS ms)
         SELECT meta.organization_id, meta.agent_id, meta.conversation_key,
                (SELECT owner FROM turnd_deployments WHERE deployment = $1),
                stale.any, (SELECT ms FROM up),
                EXISTS (SELECT 1 FROM turnd_outbox
                        WHERE published_at IS NULL AND deployment = $1)
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
        Some((.., true, _, _)) if !force => TakeoverRow::Stale,
        Some((
            organization_id,
            agent_id,
            conversation_key,
            previous_owner,
            _,
            backoff_ms,
            has_unpublished,
        )) => TakeoverRow::Taken {
            meta: DeploymentMeta { organization_id, agent_id, conversation_key },
            previous_owner,
            backoff_ms,
            has_unpublished,
        },
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
                state, provider_code, cancel_requested_at IS NOT NULL AS cancelled,
                traceparent, tracestate
         FROM turnd_turns {filter} ORDER BY seq FOR UPDATE"
    );
    let rows: Vec<PgRow> = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(deployment.as_str())
        .bind(epoch.get())
        .fetch_all(&mut **tx)
        .await?;
    rows.iter().map(pending_from_row).collect()
}

pub(super) fn pending_from_row(row: &PgRow) -> Result<Pending> {
    let deployment = DeploymentName::from_trusted(row.try_get("deployment")?);
    Ok(Pending {
        envelope: envelope_from_row(&deployment, row)?,
        state: row.try_get("state")?,
        provider_code: row.try_get("provider_code")?,
        cancelled: row.try_get("cancelled")?,
    })
}

/// A row's stored trace context (`traceparent`, `tracestate` columns of a turn or outbox row).
fn trace_from_row(row: &PgRow) -> Result<Option<TraceContext>> {
    let Some(tp) = row.try_get::<Option<String>, _>("traceparent")? else { return Ok(None) };
    Ok(TraceContext::parse(&tp, row.try_get::<Option<String>, _>("tracestate")?.as_deref()))
}

fn envelope_from_row(deployment: &DeploymentName, row: &PgRow) -> Result<Envelope> {
    Ok(Envelope {
        deployment: deployment.clone(),
        message_id: MessageId::from_trusted(row.try_get("message_id")?),
        organization_id: row.try_get("organization_id")?,
        agent_id: row.try_get("agent_id")?,
        conversation_id: row.try_get("conversation_id")?,
        routing: row.try_get("routing")?,
        trace: trace_from_row(row)?,
    })
}

/// The election for many turns at once: marks the given (locked) pending rows done and
/// inserts their error events, inside the caller's transaction.
pub(super) async fn finish_pending(
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
                // The operator's cancel names what ended it; the path says why it ended now.
                _ if p.cancelled => cancelled_outcome(&outcome(&p.state)),
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
        "UPDATE turnd_turns t SET state = 'done', turn = NULL, routing = NULL, done_at = now(),
                traceparent = NULL, tracestate = NULL
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
    let parents: Vec<Option<&str>> =
        events.iter().map(|e| e.trace.as_ref().map(|c| c.traceparent.as_str())).collect();
    let states: Vec<Option<&str>> =
        events.iter().map(|e| e.trace.as_ref().and_then(|c| c.tracestate.as_deref())).collect();
    let ids: Vec<(String, String, i64)> = sqlx::query_as(
        "INSERT INTO turnd_outbox (deployment, message_id, event_id, routing_key, kind, code, body,
                                   traceparent, tracestate)
         SELECT d, m, e, k, 'error', c, b, tp, ts
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::text[], $8::text[])
              WITH ORDINALITY AS x(d, m, e, k, c, b, tp, ts, ord)
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
    .bind(&parents)
    .bind(&states)
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
