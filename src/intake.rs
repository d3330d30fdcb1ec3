//! Intake: consumes `<prefix>.inbox`, validates each turn and decides — arm it, refuse it for
//! a delayed requeue (missing context), or park it — and acknowledges a delivery only after
//! that decision is committed. Also moves refused turns from `<prefix>.retry` to their delay
//! queue.
//!
//! Deliveries are handled in batches (whatever the prefetch has ready): one INSERT arms them
//! all, doorbells are published together and confirmed together. A batch keeps the order
//! deliveries arrived in, so one daemon accepts a conversation's turns in receive order.
//!
//! When PostgreSQL is unreachable the batch is not acknowledged: the channel is closed (the
//! broker takes the deliveries back, no attempt counted) and intake waits for the database
//! before consuming again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use futures_lite::future::poll_once;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Consumer};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::broker::{self, Broker, BrokerError, Names, Session, long_string};
use crate::config::{Config, SessionStore};
use crate::deployment::Deployments;
use crate::event::{Envelope, Outcome};
use crate::otel::{self, TraceContext};
use crate::store::{ParkedRecord, Store, StoreError};
use crate::supervise::{ComponentError, ComponentResult};
use crate::turn::{self, DeploymentName, ErrorCode, InvalidTurn, MessageId, Seq, Turn};

/// Intake's pause after a failed batch, doubling while batches keep failing at once. Short
/// enough that intake resumes promptly after an outage; growing, so that a database that
/// answers pings but fails every write does not return the same deliveries to the inbox twice
/// a second (each return counts towards `broker::INBOX_DELIVERY_LIMIT`).
const PAUSE_MIN: Duration = Duration::from_millis(500);
const PAUSE_MAX: Duration = Duration::from_secs(5);
/// Longest a batch may take (arm, doorbells, confirms, acks) before intake gives its
/// deliveries back and lets another daemon's intake become the active one. A batch takes
/// milliseconds; this only fires when this daemon's database or broker link hangs without
/// failing (a network partition), which would otherwise stop intake cluster-wide. Shorter
/// risks giving up on a merely slow database (each give-up counts towards the delivery limit);
/// longer holds every conversation's new turns that much longer.
const BATCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a database check may take before it counts as failed.
const PING_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
enum BatchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error(
        "RabbitMQ returned a publish to {0} as unroutable, even after declaring the topology again"
    )]
    Unroutable(String),
    #[error("a batch did not finish within {0:?} (database or broker not answering)")]
    Stuck(Duration),
}

/// What intake decided for one delivery.
enum Verdict {
    Arm(Box<Turn>),
    /// Missing context: nack without requeue (the inbox dead-letters it to the retry path).
    Refuse,
    Park {
        code: ErrorCode,
        reason: String,
        attempt: u32,
        ident: Option<Box<Ident>>,
    },
}

/// What an error event about a turn that never ran needs.
struct Ident {
    envelope: Envelope,
    conversation_key: String,
}

/// The hand-off slots of idle local owners reserved for one batch, at most one per deployment
/// (the first of its turns in the batch: the arm statement's checks cannot see the others).
/// Each is resolved after the arm statement; one left (the statement failed, or the batch was
/// abandoned at `BATCH_TIMEOUT`) goes back to open with a bell, so its owner looks for itself.
struct Reservations<'a> {
    deployments: &'a Deployments,
    /// Per turn: the epoch to claim it under.
    epochs: Vec<Option<turn::Epoch>>,
    /// The reserved deployments and their turn's position.
    reserved: Vec<(usize, DeploymentName)>,
}

impl<'a> Reservations<'a> {
    fn of(deployments: &'a Deployments, turns: &[&Turn]) -> Reservations<'a> {
        let mut r =
            Reservations { deployments, epochs: vec![None; turns.len()], reserved: Vec::new() };
        for (i, turn) in turns.iter().enumerate() {
            if r.reserved.iter().any(|(_, name)| *name == turn.deployment) {
                continue;
            }
            if let Some(epoch) = deployments.reserve(&turn.deployment) {
                r.epochs[i] = Some(epoch);
                r.reserved.push((i, turn.deployment.clone()));
            }
        }
        r
    }

    /// Hands each reserved owner the turn the statement claimed for it, if it did.
    fn resolve(mut self, turns: &[&Turn], armed: &[Option<crate::store::Armed>], sent: Instant) {
        for (i, name) in std::mem::take(&mut self.reserved) {
            let claimed = armed.get(i).copied().flatten().filter(|a| a.running).map(|a| {
                crate::store::Claimed {
                    seq: a.seq,
                    line: turns[i].line.clone(),
                    envelope: envelope_of(turns[i]),
                    waited: Duration::ZERO,
                    sent,
                }
            });
            self.deployments.hand_over(&name, claimed);
        }
    }
}

impl Drop for Reservations<'_> {
    fn drop(&mut self) {
        for (_, name) in self.reserved.drain(..) {
            self.deployments.hand_over(&name, None);
            self.deployments.nudge(&name, None);
        }
    }
}

#[derive(Debug, Clone)]
pub struct Intake {
    pub config: Arc<Config>,
    pub store: Store,
    pub broker: Broker,
    pub deployments: Deployments,
    /// When intake last asked for an owner of each deployment not owned here.
    pub requested: OwnerRequests,
}

/// How often intake asks, at most, for an owner of the same deployment. A deployment owned by
/// another daemon gets its doorbell there; asking again on each of its turns would make every
/// other daemon try a lock that is held (a lock statement each). Asking again after this long
/// covers an owner that went away with its thread queue still there. Longer saves lock
/// statements; shorter hands a stopped owner's new turns on sooner.
const OWNER_REQUEST_EVERY: Duration = Duration::from_secs(1);

/// Intake's memory of recent owner requests, bounded by pruning entries past
/// `OWNER_REQUEST_EVERY`.
#[derive(Debug, Clone, Default)]
pub struct OwnerRequests(Arc<std::sync::Mutex<HashMap<DeploymentName, Instant>>>);

impl OwnerRequests {
    /// The deployments among `names` to ask an owner for now (and notes the time).
    fn due(&self, names: Vec<DeploymentName>) -> Vec<DeploymentName> {
        let now = Instant::now();
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > 10_000 {
            map.retain(|_, at| now.duration_since(*at) < OWNER_REQUEST_EVERY);
        }
        names
            .into_iter()
            .filter(|name| {
                let due =
                    map.get(name).is_none_or(|at| now.duration_since(*at) >= OWNER_REQUEST_EVERY);
                if due {
                    map.insert(name.clone(), now);
                }
                due
            })
            .collect()
    }
}

impl Intake {
    pub async fn run(self, cancel: CancellationToken) -> ComponentResult {
        let names = Names::new(&self.config.amqp.prefix);
        let tag = format!("turnd-intake-{}", self.config.daemon.id);
        let mut pause = Backoff::new(PAUSE_MIN, PAUSE_MAX);
        loop {
            let session = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                s = self.broker.session() => s,
            };
            // None: the broker supervisor is gone, and with it every session.
            let Some(session) = session else { return Err(ComponentError::BrokerGone) };
            // Consume only while the database can take what we accept.
            if !self.wait_for_database(&cancel).await {
                return Ok(());
            }
            let (channel, consumer) = match session
                .consumer(&names.inbox(), self.config.amqp.prefetch, &tag)
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot consume the inbox; declaring the topology again and retrying");
                    // E.g. an operator deleted an old inbox to recreate it (README
                    // "Upgrading the inbox"): declare it again, with today's arguments.
                    if let Err(e) = session.redeclare(&self.config).await {
                        tracing::warn!(error = %e, "cannot declare the topology");
                    }
                    sleep_or_cancel(Duration::from_secs(1), &cancel).await;
                    continue;
                }
            };
            tracing::info!(queue = %names.inbox(), "intake subscribed (the broker feeds one daemon's intake at a time)");
            let mut progressed = false;
            let result = self.consume(&session, consumer, &cancel, &mut progressed).await;
            // Before the close: once it is done another daemon's intake may arm this daemon's
            // deployments' turns, and their owners must be listening on their thread queues.
            self.deployments.intake_here(false);
            // Closing the channel hands every unacknowledged delivery back to the broker and
            // removes the subscription in one step; only then does the broker make another
            // daemon's intake the active one, which receives the returned deliveries first.
            // No basic.cancel before it: a cancelled subscription keeps its unacknowledged
            // deliveries while the next one is already fed the turns behind them (an
            // inversion of publish order once they are returned).
            let _ = channel.close(200, "intake paused".into()).await;
            match result {
                Ok(()) => return Ok(()),
                Err(e) => {
                    // Each pause returns the deliveries in flight, and every return counts
                    // towards the inbox's delivery limit: back off while batches keep failing
                    // at once (a database that answers pings but fails writes).
                    if progressed {
                        pause.reset();
                    }
                    tracing::warn!(error = %e, retry_in = ?pause.peek(), "intake paused; deliveries go back to the inbox");
                    sleep_or_cancel(pause.next_delay(), &cancel).await;
                }
            }
        }
    }

    async fn wait_for_database(&self, cancel: &CancellationToken) -> bool {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            match tokio::time::timeout(PING_TIMEOUT, self.store.ping()).await {
                Ok(Ok(())) => return true,
                Ok(Err(e)) => tracing::warn!(error = %e, "intake waits for PostgreSQL"),
                Err(_) => {
                    tracing::warn!(timeout = ?PING_TIMEOUT, "intake waits for PostgreSQL: no answer")
                }
            }
            if !sleep_or_cancel(backoff.next_delay(), cancel).await {
                return false;
            }
        }
    }

    async fn consume(
        &self,
        session: &Arc<Session>,
        mut consumer: Consumer,
        cancel: &CancellationToken,
        progressed: &mut bool,
    ) -> Result<(), BatchError> {
        let max = usize::from(self.config.amqp.prefetch);
        let mut batch = Vec::with_capacity(max);
        let mut active = false;
        loop {
            let first = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                d = consumer.next() => d,
            };
            let Some(first) = first else {
                return Err(BatchError::Broker(BrokerError::Unavailable));
            };
            if !active {
                active = true;
                self.deployments.intake_here(true);
                tracing::info!("intake active: this daemon receives the inbox");
            }
            batch.push(first?);
            while batch.len() < max {
                match poll_once(consumer.next()).await {
                    Some(Some(Ok(d))) => batch.push(d),
                    Some(Some(Err(e))) => return Err(e.into()),
                    _ => break,
                }
            }
            // A batch that cannot finish (e.g. this daemon's PostgreSQL link went silent)
            // must not hold the cluster's only active intake: give its deliveries back.
            match tokio::time::timeout(BATCH_TIMEOUT, self.handle_batch(session, &mut batch)).await
            {
                Ok(r) => r?,
                Err(_) => return Err(BatchError::Stuck(BATCH_TIMEOUT)),
            }
            *progressed = true;
        }
    }

    async fn handle_batch(
        &self,
        session: &Session,
        batch: &mut Vec<Delivery>,
    ) -> Result<(), BatchError> {
        let config = &self.config;
        let mut verdicts: Vec<Verdict> = batch.iter().map(|d| self.judge(d)).collect();
        // A parked turn's error event continues the producer's trace (headers only: an
        // invalid body is not read for it).
        for (delivery, verdict) in batch.iter().zip(verdicts.iter_mut()) {
            if let Verdict::Park { ident: Some(ident), .. } = verdict {
                ident.envelope.trace = header_trace(delivery);
            }
        }
        // Each turn's intake and arm spans, open until its delivery is acked; the intake
        // span's context is stored with the turn.
        let spans: Vec<(tracing::Span, tracing::Span)> = batch
            .iter()
            .zip(verdicts.iter_mut())
            .filter_map(|(delivery, verdict)| match verdict {
                Verdict::Arm(turn) => Some(trace_turn(delivery, turn)),
                _ => None,
            })
            .collect();
        let turns: Vec<&Turn> = verdicts
            .iter()
            .filter_map(|v| match v {
                Verdict::Arm(t) => Some(&**t),
                _ => None,
            })
            .collect();
        let armed = if turns.is_empty() {
            // Refusing counts an attempt and parking needs its record: neither while
            // PostgreSQL is away (CONTRACT §4). Arming proves the database by itself; a batch
            // of refusals alone must ask, or it would be refused over and over in the outage.
            if !verdicts.is_empty() {
                self.store.ping().await?;
            }
            Vec::new()
        } else {
            // An idle owner here gets its next turn claimed in the arm statement and handed
            // over in memory: no claim of its own after the bell.
            let hand = Reservations::of(&self.deployments, &turns);
            let sent = Instant::now();
            let claim = crate::deployment::stored_deadline(config.turn.deadline);
            let armed = self
                .store
                .arm_and_hand(&turns, config.turn.queue_timeout, &hand.epochs, claim)
                .await?;
            hand.resolve(&turns, &armed, sent);
            armed.into_iter().map(|a| a.map(|a| a.seq)).collect()
        };
        for ((_, arm), armed) in spans.iter().zip(&armed) {
            arm.record("armed", armed.is_some());
        }
        // What was armed, one entry per deployment, with its newest turn (the seq a bell names:
        // an owner that already claimed it needs no look).
        let mut rung: Vec<(DeploymentName, Seq)> = Vec::new();
        for (turn, armed) in turns.iter().zip(&armed) {
            let Some(seq) = *armed else {
                // A duplicate: another intake may have armed it and lost its doorbell with its
                // channel (an owner here listens on no thread queue while this intake is
                // active). A local owner looks again; one elsewhere has its queue.
                self.deployments.nudge(&turn.deployment, None);
                continue;
            };
            match rung.iter_mut().find(|(name, _)| *name == turn.deployment) {
                Some((_, newest)) => *newest = seq.max(*newest),
                None => rung.push((turn.deployment.clone(), seq)),
            }
        }
        // Only now, after the commit, are owners sought: an owner on another daemon that is
        // letting go looks for queued turns once its lock is free (`Deployments::finish`), and
        // a lock refused before this commit could leave the turn to adoption. The seeking is
        // spread over the cluster: one daemon's intake receives every turn, so if it took each
        // lock itself, every worker would run here (see `run_owners`).
        //
        // A deployment owned here is woken in memory at once (its turn is committed: the owner
        // may claim it now) and gets no doorbell: its owner either claims after this commit or,
        // letting go, looks for queued turns once its lock is free (`Deployments::finish`).
        rung.retain(|(name, seq)| !self.deployments.nudge(name, Some(*seq)));
        let remote = self.owner_requests_due(&mut rung).await;
        let remote = self.take_here_when_alone(remote);
        self.finish_batch(session, batch, &verdicts, &armed, &rung, &remote).await
    }

    /// Of the deployments not owned here (`rung`), those to ask an owner for now: every one
    /// that no other daemon owns, and one owned elsewhere at most once per
    /// `OWNER_REQUEST_EVERY` (its owner may have died, leaving its record; each request costs
    /// the other daemons a try of a lock that is held, so not on every turn).
    ///
    /// Leaves in `rung` only the deployments to ring, those owned by another daemon. One owned
    /// nowhere needs no doorbell (its queue has no consumer, or none for long): whoever holds
    /// its lock without an owner record is taking it over, and claims after its take-over
    /// commits, or letting it go, and looks for queued turns once the lock is free — both
    /// after this read, so after this turn's commit.
    async fn owner_requests_due(&self, rung: &mut Vec<(DeploymentName, Seq)>) -> OwnersWanted {
        if rung.is_empty() {
            return OwnersWanted::default();
        }
        let remote: Vec<DeploymentName> = rung.iter().map(|(name, _)| name.clone()).collect();
        let names: Vec<&str> = remote.iter().map(DeploymentName::as_str).collect();
        // A daemon is alive to the others for three heartbeats (the sweep's).
        let alive = self.config.sweep.interval * 3;
        let seen = match self.store.owned_elsewhere(&names, &self.config.daemon.id, alive).await {
            Ok(seen) => seen,
            // Unknown: ring and ask for all of them (a held lock only costs a try).
            Err(_) => return OwnersWanted { elsewhere: remote, ..OwnersWanted::default() },
        };
        let owned = |n: &DeploymentName| seen.owned.iter().any(|o| o == n.as_str());
        rung.retain(|(name, _)| owned(name));
        let (elsewhere, nowhere): (Vec<_>, Vec<_>) = remote.into_iter().partition(owned);
        let alone = seen.other_daemons == 0;
        OwnersWanted { elsewhere: self.requested.due(elsewhere), nowhere, alone }
    }

    /// Takes the deployments owned nowhere here when no other daemon is alive, without the
    /// round trip through `<prefix>.owners` (on a new conversation's first turn); returns the
    /// deployments to ask the other daemons for. With others alive every one is offered, so
    /// the broker spreads workers. Decided on the same query's count, never a kept view: pods
    /// of a rollout start together, and a view a few hundred milliseconds old put every new
    /// deployment on the first one.
    fn take_here_when_alone(&self, wanted: OwnersWanted) -> Vec<DeploymentName> {
        let OwnersWanted { mut elsewhere, nowhere, alone } = wanted;
        if alone {
            if !nowhere.is_empty() {
                self.deployments.ensure_owners_soon(nowhere);
            }
        } else {
            elsewhere.extend(nowhere);
        }
        elsewhere
    }

    /// The rest of a batch once its turns are armed: a doorbell per deployment not owned here
    /// (for an owner on another daemon, or one still taking the lock), naming its newest
    /// turn, then owner requests, parking, and the acks.
    async fn finish_batch(
        &self,
        session: &Session,
        batch: &mut Vec<Delivery>,
        verdicts: &[Verdict],
        armed: &[Option<Seq>],
        rung: &[(DeploymentName, Seq)],
        remote: &[DeploymentName],
    ) -> Result<(), BatchError> {
        let mut confirms = Vec::with_capacity(rung.len() + remote.len());
        for (name, seq) in rung {
            let queue = session.names.thread(name);
            let properties = BasicProperties::default().with_delivery_mode(1);
            // Mandatory: a doorbell to a queue that is gone (no owner) comes back instead of
            // vanishing; the owner request below takes care of the ownerless.
            confirms.push(session.publish("", &queue, true, &seq.doorbell(), properties).await?);
        }
        // Deployments not owned here: whichever daemon's `run_owners` gets the request tries
        // the lock (a no-op where another daemon holds it). A lost request is adoption's.
        confirms.extend(session.request_owners(remote).await?);
        // Parked turns: the parked queue (confirmed), the record, the error event.
        for (delivery, verdict) in batch.iter().zip(verdicts) {
            if let Verdict::Park { code, reason, attempt, ident } = verdict {
                self.park(session, delivery, code, reason, *attempt, ident.as_deref()).await?;
            }
        }
        for c in confirms {
            Session::confirmed(c, "thread queue").await?;
        }
        let metrics = self.deployments.ctx().relay.metrics();
        let fresh = armed.iter().filter(|a| a.is_some()).count() as u64;
        metrics.received("armed", fresh);
        metrics.received("duplicate", armed.len() as u64 - fresh);
        metrics.received(
            "refused",
            verdicts.iter().filter(|v| matches!(v, Verdict::Refuse)).count() as u64,
        );
        metrics.received(
            "parked",
            verdicts.iter().filter(|v| matches!(v, Verdict::Park { .. })).count() as u64,
        );
        // Refusals one by one (rare), then one ack for the rest: a multiple ack of the batch's
        // last accepted delivery settles every delivery up to it on this channel, which has
        // no consumer but intake's, and each delivery before this batch is settled already.
        // One frame and one await instead of one per turn.
        let mut last = None;
        for (delivery, verdict) in batch.drain(..).zip(verdicts) {
            match verdict {
                Verdict::Refuse => {
                    delivery
                        .nack(BasicNackOptions { requeue: false, ..Default::default() })
                        .await?;
                }
                _ => last = Some(delivery),
            }
        }
        if let Some(delivery) = last {
            delivery.ack(BasicAckOptions { multiple: true }).await?;
        }
        Ok(())
    }

    fn judge(&self, delivery: &Delivery) -> Verdict {
        let config = &self.config;
        let turn = match turn::parse(&delivery.data, config.intake.max_turn_bytes) {
            Ok(t) => t,
            Err(invalid) => {
                return Verdict::Park {
                    code: ErrorCode::InvalidTurn,
                    reason: invalid.reason.clone(),
                    attempt: 1,
                    ident: ident_of_invalid(&invalid),
                };
            }
        };
        if config.session.store == SessionStore::Snapshot
            && let Some(field) = turn.missing_context()
        {
            let attempt = refusals(&delivery.properties).saturating_add(1);
            if attempt >= config.intake.max_attempts {
                let reason = format!(
                    "turn has runId but no {field}: a snapshot turn needs its organization and conversation (refused {attempt} times)"
                );
                let ident = Ident {
                    conversation_key: turn.conversation_key.clone(),
                    envelope: envelope_of(&turn),
                };
                return Verdict::Park {
                    code: ErrorCode::MissingContext,
                    reason,
                    attempt,
                    ident: Some(Box::new(ident)),
                };
            }
            tracing::debug!(message_id = %turn.message_id, field, attempt, "refused: missing context; requeued with delay");
            return Verdict::Refuse;
        }
        Verdict::Arm(Box::new(turn))
    }

    async fn park(
        &self,
        session: &Session,
        delivery: &Delivery,
        code: &ErrorCode,
        reason: &str,
        attempt: u32,
        ident: Option<&Ident>,
    ) -> Result<(), BatchError> {
        let names = &session.names;
        let original = delivery.properties.headers().clone().unwrap_or_default();
        let mut headers = original.clone();
        headers.insert("x-turnd-code".into(), long_string(code.as_str()));
        headers.insert("x-turnd-reason".into(), long_string(reason));
        headers.insert(ATTEMPT_KEY.into(), AMQPValue::LongLongInt(i64::from(attempt)));
        // The record shows the headers as parked, turnd's included (a replay leaves out every
        // `x-` header); its JSON is bounded however large they are.
        let recorded = headers_json(&headers);
        if !session.headers_fit(&headers) {
            // Headers that filled the frame leave no room for turnd's own: park the body with
            // turnd's headers only (the record keeps the originals, as JSON).
            let size = broker::encoded_len(&original);
            headers = FieldTable::default();
            headers.insert("x-turnd-code".into(), long_string(code.as_str()));
            headers.insert("x-turnd-reason".into(), long_string(reason));
            headers.insert(ATTEMPT_KEY.into(), AMQPValue::LongLongInt(i64::from(attempt)));
            headers.insert(
                "x-turnd-headers-dropped".into(),
                long_string(&format!(
                    "the original headers ({size} bytes encoded) left no room for turnd's; see the parked record"
                )),
            );
        }
        let properties = delivery.properties.clone().with_headers(headers).with_delivery_mode(2);
        self.publish_routed(session, &names.parked(), &delivery.data, properties).await?;
        tracing::warn!(code = code.as_str(), reason, "turn parked");
        self.store
            .record_parked(&ParkedRecord {
                code: code.as_str().to_owned(),
                reason: reason.to_owned(),
                body: delivery.data.clone(),
                headers: recorded,
                routing_key: original_routing_key(delivery),
                deployment: ident.map(|i| i.envelope.deployment.as_str().to_owned()),
                message_id: ident.map(|i| i.envelope.message_id.as_str().to_owned()),
                attempts: i32::try_from(attempt).unwrap_or(i32::MAX),
            })
            .await?;
        if let Some(ident) = ident {
            // Only a turn with no record is answered here: one already armed (e.g. a daemon
            // died after arming it, before the ack) keeps its single election.
            let outcome = Outcome::error(code.clone(), reason);
            if let Some(committed) = self
                .store
                .finish_unarmed(&ident.envelope, &ident.conversation_key, &outcome)
                .await?
            {
                self.deployments.ctx().relay.send(vec![committed]);
            }
        }
        Ok(())
    }

    /// Publishes to a queue (mandatory, confirmed). A publish that comes back unroutable means
    /// the queue is gone (deleted under us): declare the topology again and publish once more;
    /// still unroutable is an error, so the caller leaves its delivery unacknowledged.
    async fn publish_routed(
        &self,
        session: &Session,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BatchError> {
        let c = session.publish("", queue, true, body, properties.clone()).await?;
        if Session::confirmed(c, queue).await? {
            return Ok(());
        }
        tracing::warn!(queue, "publish returned unroutable; declaring the topology again");
        session.redeclare(&self.config).await?;
        let c = session.publish("", queue, true, body, properties).await?;
        if Session::confirmed(c, queue).await? {
            return Ok(());
        }
        Err(BatchError::Unroutable(queue.to_owned()))
    }

    /// Moves turns the inbox dead-lettered into the delay queue for their attempt (refusals):
    /// confirm the publish, then ack. The delay queue's TTL sends them back to `<prefix>.turns`.
    /// A turn dead-lettered by the inbox's delivery limit is parked instead (`INVALID_TURN`).
    pub async fn run_retry(self, cancel: CancellationToken) -> ComponentResult {
        let names = Names::new(&self.config.amqp.prefix);
        let tag = format!("turnd-retry-{}", self.config.daemon.id);
        loop {
            let session = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                s = self.broker.session() => s,
            };
            // None: the broker supervisor is gone, and with it every session.
            let Some(session) = session else { return Err(ComponentError::BrokerGone) };
            let (channel, mut consumer) = match session.consumer(&names.retry(), 16, &tag).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot consume the retry queue");
                    sleep_or_cancel(Duration::from_secs(1), &cancel).await;
                    continue;
                }
            };
            loop {
                let next = tokio::select! {
                    _ = cancel.cancelled() => None,
                    d = consumer.next() => d,
                };
                let Some(Ok(delivery)) = next else { break };
                if let Err(e) = self.retry_one(&session, &delivery).await {
                    tracing::warn!(error = %e, "cannot move a dead-lettered turn on; it stays in the retry queue");
                    // Back to the retry queue (also what closing the channel would do).
                    let _ = delivery
                        .nack(BasicNackOptions { requeue: true, ..Default::default() })
                        .await;
                    break;
                }
            }
            let _ = channel.close(200, "retry mover stopping".into()).await;
            if cancel.is_cancelled() {
                return Ok(());
            }
            sleep_or_cancel(Duration::from_millis(500), &cancel).await;
        }
    }

    /// Consumes `<prefix>.owners`, competing with every other daemon: each request names a
    /// deployment that has a queued turn and no owner on the daemon whose intake armed it.
    /// Tries its lock here (after the turn's commit, as intake did before); acknowledged once
    /// tried, so a daemon that stops hands its requests back to the others. The broker
    /// spreads requests over the daemons, so new deployments, and their workers, are spread
    /// too while one daemon's intake is the active one.
    pub async fn run_owners(self, cancel: CancellationToken) -> ComponentResult {
        /// Requests in flight per daemon: enough to keep lock batches full, few enough that a
        /// slow daemon does not hold many of them.
        const PREFETCH: u16 = 32;
        let names = Names::new(&self.config.amqp.prefix);
        let tag = format!("turnd-owners-{}", self.config.daemon.id);
        loop {
            let session = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                s = self.broker.session() => s,
            };
            // None: the broker supervisor is gone, and with it every session.
            let Some(session) = session else { return Err(ComponentError::BrokerGone) };
            let (channel, mut consumer) =
                match session.consumer(&names.owners(), PREFETCH, &tag).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot consume the owner requests");
                        if let Err(e) = session.redeclare(&self.config).await {
                            tracing::warn!(error = %e, "cannot declare the topology");
                        }
                        sleep_or_cancel(Duration::from_secs(1), &cancel).await;
                        continue;
                    }
                };
            let mut batch: Vec<Delivery> = Vec::new();
            loop {
                let next = tokio::select! {
                    _ = cancel.cancelled() => None,
                    d = consumer.next() => d,
                };
                let Some(Ok(first)) = next else { break };
                batch.push(first);
                while batch.len() < usize::from(PREFETCH) {
                    match poll_once(consumer.next()).await {
                        Some(Some(Ok(d))) => batch.push(d),
                        _ => break,
                    }
                }
                let wanted: Vec<DeploymentName> = batch
                    .iter()
                    .filter_map(|d| std::str::from_utf8(&d.data).ok())
                    .filter_map(|s| DeploymentName::parse(s).ok())
                    .collect();
                self.deployments.ensure_owners(wanted).await;
                if cancel.is_cancelled() {
                    // Stopping: what may not have been tried goes back to the others.
                    break;
                }
                // One multiple ack of the last request settles the batch (and nothing else:
                // this channel has no other consumer, and earlier batches are settled).
                let last = batch.pop();
                batch.clear();
                if let Some(d) = last
                    && d.ack(BasicAckOptions { multiple: true }).await.is_err()
                {
                    break;
                }
            }
            // Unacknowledged requests go back to the queue, for another daemon.
            let _ = channel.close(200, "owner requests stopped".into()).await;
            if cancel.is_cancelled() {
                return Ok(());
            }
            sleep_or_cancel(Duration::from_millis(500), &cancel).await;
        }
    }

    /// Who to answer about a dead-lettered delivery, when its body says.
    fn ident_of(&self, delivery: &Delivery) -> Option<Box<Ident>> {
        match turn::parse(&delivery.data, self.config.intake.max_turn_bytes) {
            Ok(turn) => Some(Box::new(Ident {
                conversation_key: turn.conversation_key.clone(),
                envelope: envelope_of(&turn),
            })),
            Err(invalid) => ident_of_invalid(&invalid),
        }
    }

    async fn retry_one(&self, session: &Session, delivery: &Delivery) -> Result<(), BatchError> {
        let names = &session.names;
        if let Some(deliveries) = delivery_limited(&delivery.properties, &names.inbox()) {
            let reason = format!(
                "the turn could not be handled after {deliveries} deliveries (the inbox's delivery limit): \
                 every daemon that received it failed before deciding on it"
            );
            let ident = self.ident_of(delivery);
            let attempt = u32::try_from(deliveries).unwrap_or(u32::MAX);
            self.park(
                session,
                delivery,
                &ErrorCode::InvalidTurn,
                &reason,
                attempt,
                ident.as_deref(),
            )
            .await?;
            self.deployments.ctx().relay.metrics().received("parked", 1);
            delivery.ack(BasicAckOptions::default()).await?;
            return Ok(());
        }
        // This is the (refused + 1)-th refusal: the header says how many came before, as
        // turnd set it on the previous move (0 on the first).
        let refused = refusals(&delivery.properties).saturating_add(1);
        let k = refused.clamp(1, self.config.intake.max_attempts.saturating_sub(1).max(1));
        let queue = names.retry_delay(k);
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        // The broker's dead-lettering bookkeeping is the broker's: it is not republished (a
        // 4.x broker ignores it anyway, and it would only grow with each round). The count
        // that matters travels in turnd's own header.
        headers = without_broker_headers(&headers);
        headers.insert(ATTEMPT_KEY.into(), AMQPValue::LongLongInt(i64::from(refused)));
        if !session.headers_fit(&headers) {
            // The broker's own headers (x-death) pushed a frame-filling header past what can
            // be published again: it cannot go round the delay queue, so it stops here.
            let reason = format!(
                "refused for missing context, and its headers ({} bytes encoded) leave no room to requeue it through the delay queue",
                broker::encoded_len(&headers)
            );
            let ident = self.ident_of(delivery);
            let code = ErrorCode::MissingContext;
            self.park(session, delivery, &code, &reason, refused.max(1), ident.as_deref()).await?;
            self.deployments.ctx().relay.metrics().received("parked", 1);
            delivery.ack(BasicAckOptions::default()).await?;
            return Ok(());
        }
        if !headers.contains_key(ORIGINAL_KEY) {
            let mut with_key = headers.clone();
            with_key.insert(ORIGINAL_KEY.into(), long_string(delivery.routing_key.as_str()));
            // Headers that fill the frame go on as they are (a replay then uses the delay
            // queue's key).
            if session.headers_fit(&with_key) {
                headers = with_key;
            }
        }
        // The delay rides on the message (`expiration`), never on the queue's arguments; the
        // broker drops it when the queue dead-letters the turn back to `<prefix>.turns`.
        let properties = delivery
            .properties
            .clone()
            .with_headers(headers)
            .with_expiration(broker::delay_expiration(&self.config, k));
        self.publish_routed(session, &queue, &delivery.data, properties).await?;
        delivery.ack(BasicAckOptions::default()).await?;
        Ok(())
    }
}

/// The header in which turnd counts a turn's refusals (CONTRACT §4): set by the retry mover on
/// each move to a delay queue, and on a parked copy.
pub const ATTEMPT_KEY: &str = "x-turnd-attempt";

/// Deployments with a turn armed and no owner here.
#[derive(Debug, Default)]
struct OwnersWanted {
    /// Owned by another daemon, its owner request due (it may have died, leaving its record).
    elsewhere: Vec<DeploymentName>,
    /// Owned by no daemon.
    nowhere: Vec<DeploymentName>,
    /// No other daemon is alive.
    alone: bool,
}

/// Headers without the broker's dead-letter bookkeeping (`x-death`, `x-first-death-*`,
/// `x-last-death-*`, `x-delivery-count`).
fn without_broker_headers(headers: &FieldTable) -> FieldTable {
    let mut out = FieldTable::default();
    for (key, value) in headers.inner() {
        let k = key.as_str();
        let broker_owned = k == "x-death"
            || k == "x-delivery-count"
            || k.starts_with("x-first-death-")
            || k.starts_with("x-last-death-");
        if !broker_owned {
            out.insert(key.clone(), value.clone());
        }
    }
    out
}

/// What every event about a valid turn carries (CONTRACT §6). Public for the schema tests.
pub fn envelope_of(turn: &Turn) -> Envelope {
    Envelope {
        deployment: turn.deployment.clone(),
        message_id: turn.message_id.clone(),
        organization_id: turn.organization_id.as_ref().map(|o| o.as_str().to_owned()),
        agent_id: turn.agent_id.as_str().to_owned(),
        conversation_id: turn.conversation_id.clone(),
        routing: Some(turn.routing.clone()),
        trace: turn.trace.clone(),
    }
}

fn ident_of_invalid(invalid: &InvalidTurn) -> Option<Box<Ident>> {
    let envelope = envelope_of_invalid(invalid)?;
    let conversation_key = envelope.deployment.as_str().to_owned();
    Some(Box::new(Ident { envelope, conversation_key }))
}

/// What the error event of an invalid turn carries, when it can be addressed at all (CONTRACT
/// §4). Public for the schema tests.
pub fn envelope_of_invalid(invalid: &InvalidTurn) -> Option<Envelope> {
    let (Some(deployment), Some(message_id), Some(agent_id)) =
        (&invalid.deployment, &invalid.message_id, &invalid.agent_id)
    else {
        return None;
    };
    Some(Envelope {
        deployment: deployment.clone(),
        message_id: MessageId::clone(message_id),
        organization_id: invalid.organization_id.as_ref().map(|o| o.as_str().to_owned()),
        agent_id: agent_id.as_str().to_owned(),
        conversation_id: invalid.conversation_id.clone(),
        routing: invalid.routing.clone(),
        trace: None,
    })
}

/// Header carrying a refused turn's routing key through its delay queue (whose dead-lettering
/// replaces the key with the queue's name), so a parked turn records and replays the
/// producer's key.
const ORIGINAL_KEY: &str = "x-turnd-routing-key";

fn original_routing_key(delivery: &Delivery) -> String {
    let headers = delivery.properties.headers().as_ref();
    match headers.and_then(|h| h.inner().get(ORIGINAL_KEY)) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        _ => delivery.routing_key.as_str().to_owned(),
    }
}

/// How many times intake has already refused this turn: the `x-turnd-attempt` header that the
/// retry mover sets on each move (0 without it). Never counted from `x-death`: RabbitMQ 4.0
/// and later (and 3.13.0–3.13.2) ignore an `x-death` that a client published, so a count kept
/// there would restart at every round and a refused turn would circulate forever. A value
/// that is not a non-negative integer counts as 0.
pub fn refusals(properties: &BasicProperties) -> u32 {
    let Some(headers) = properties.headers() else { return 0 };
    match headers.inner().get(ATTEMPT_KEY) {
        Some(AMQPValue::LongLongInt(n)) => u32::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongInt(n)) => u32::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongUInt(n)) => *n,
        Some(AMQPValue::ShortInt(n)) => u32::try_from(*n).unwrap_or(0),
        Some(AMQPValue::ShortUInt(n)) => u32::from(*n),
        Some(AMQPValue::ShortShortInt(n)) => u32::try_from(*n).unwrap_or(0),
        Some(AMQPValue::ShortShortUInt(n)) => u32::from(*n),
        _ => 0,
    }
}

/// Opens the intake and arm spans of a turn, parented on the producer's trace context (AMQP
/// headers `traceparent`/`tracestate`, else `platformMetadata.traceparent`/`.tracestate`), and
/// sets the context stored with the turn: the intake span's.
fn trace_turn(delivery: &Delivery, turn: &mut Turn) -> (tracing::Span, tracing::Span) {
    let producer = header_trace(delivery).or_else(|| {
        let (tp, ts) = turn.metadata_trace.as_ref()?;
        TraceContext::parse(tp, ts.as_deref())
    });
    let (deployment, message_id) = (turn.deployment.as_str(), turn.message_id.as_str());
    let intake = otel::intake_span(producer.as_ref(), deployment, message_id);
    let arm = otel::arm_span(&intake, deployment, message_id);
    turn.trace = otel::hand_on_root(&intake, producer.as_ref());
    (intake, arm)
}

/// The producer's trace context from the delivery's `traceparent`/`tracestate` headers.
fn header_trace(delivery: &Delivery) -> Option<TraceContext> {
    let h = delivery.properties.headers().as_ref()?;
    TraceContext::parse(field_str(h, "traceparent")?, field_str(h, "tracestate"))
}

fn field_str<'a>(table: &'a FieldTable, key: &str) -> Option<&'a str> {
    match table.inner().get(key) {
        Some(AMQPValue::LongString(s)) => std::str::from_utf8(s.as_bytes()).ok(),
        Some(AMQPValue::ShortString(s)) => Some(s.as_str()),
        _ => None,
    }
}

/// When the inbox dead-lettered this message because of its delivery limit (its latest death,
/// as the broker recorded it), how many deliveries it had. RabbitMQ 3.13+ names the latest
/// death in `x-last-death-*`; before that, `x-death` lists the most recent first. The count is
/// the broker's `x-delivery-count` when present, else the limit turnd declares. Checked on
/// 3.10.8: the dead letter carries `x-death` (reason `delivery_limit`, queue the inbox) and
/// `x-first-death-*`, but neither `x-last-death-*` nor `x-delivery-count`.
pub fn delivery_limited(properties: &BasicProperties, inbox: &str) -> Option<i64> {
    let headers = properties.headers().as_ref()?;
    let last =
        match (field_str(headers, "x-last-death-reason"), field_str(headers, "x-last-death-queue"))
        {
            (Some(reason), Some(queue)) => Some((reason, queue)),
            _ => match headers.inner().get("x-death") {
                Some(AMQPValue::FieldArray(deaths)) => match deaths.as_slice().first() {
                    Some(AMQPValue::FieldTable(t)) => {
                        field_str(t, "reason").zip(field_str(t, "queue"))
                    }
                    _ => None,
                },
                _ => None,
            },
        };
    if last != Some(("delivery_limit", inbox)) {
        return None;
    }
    let count = match headers.inner().get("x-delivery-count") {
        Some(AMQPValue::LongLongInt(n)) => Some(*n),
        Some(AMQPValue::LongInt(n)) => Some(i64::from(*n)),
        Some(AMQPValue::LongUInt(n)) => Some(i64::from(*n)),
        _ => None,
    };
    Some(count.filter(|n| *n > 0).unwrap_or(broker::INBOX_DELIVERY_LIMIT))
}

/// The key under which [`headers_json`] says that it left the rest of a table out.
pub const HEADERS_JSON_ELIDED_KEY: &str = "…";

/// How deep [`headers_json`] renders nested tables and arrays; deeper ones are named, not shown.
const HEADERS_JSON_DEPTH: usize = 16;
/// About how many bytes of JSON [`headers_json`] writes at most: an operator reads it, and a
/// frame full of tiny headers must not turn into megabytes in the parked record.
const HEADERS_JSON_BUDGET: usize = 64 * 1024;

/// AMQP headers as JSON for the parked record (operators read them; values best-effort),
/// bounded in depth and size: past the budget the rest is elided with a marker.
pub fn headers_json(headers: &FieldTable) -> String {
    use serde_json::Value as J;
    const ELIDED: &str = "…(elided: parked headers are shown up to 64 KiB)";
    fn text(s: &[u8], budget: &mut usize) -> J {
        let shown = &s[..s.len().min(*budget)];
        *budget -= shown.len();
        let mut t = String::from_utf8_lossy(shown).into_owned();
        if shown.len() < s.len() {
            t.push_str(ELIDED);
        }
        J::String(t)
    }
    fn entries<'a>(
        items: impl Iterator<Item = (Option<&'a str>, &'a AMQPValue)>,
        depth: usize,
        budget: &mut usize,
    ) -> (Vec<(Option<String>, J)>, bool) {
        let mut out = Vec::new();
        for (key, v) in items {
            // Every entry costs at least a few bytes of JSON, whatever it holds.
            let cost = 8 + key.map_or(0, str::len);
            if *budget < cost {
                return (out, true);
            }
            *budget -= cost;
            out.push((key.map(str::to_owned), value(v, depth, budget)));
        }
        (out, false)
    }
    fn value(v: &AMQPValue, depth: usize, budget: &mut usize) -> J {
        match v {
            AMQPValue::Boolean(b) => J::Bool(*b),
            AMQPValue::ShortShortInt(n) => J::from(*n),
            AMQPValue::ShortShortUInt(n) => J::from(*n),
            AMQPValue::ShortInt(n) => J::from(*n),
            AMQPValue::ShortUInt(n) => J::from(*n),
            AMQPValue::LongInt(n) => J::from(*n),
            AMQPValue::LongUInt(n) => J::from(*n),
            AMQPValue::LongLongInt(n) => J::from(*n),
            AMQPValue::Timestamp(n) => J::from(*n),
            AMQPValue::Float(f) => J::from(f64::from(*f)),
            AMQPValue::Double(f) => J::from(*f),
            AMQPValue::DecimalValue(d) => J::String(format!("{}e-{}", d.value, d.scale)),
            AMQPValue::ShortString(s) => text(s.as_str().as_bytes(), budget),
            AMQPValue::LongString(s) => text(s.as_bytes(), budget),
            AMQPValue::ByteArray(b) => {
                let shown = &b.as_slice()[..b.as_slice().len().min(*budget / 2)];
                *budget -= shown.len() * 2;
                let mut t = format!("bytes({}): {}", b.as_slice().len(), hex::encode(shown));
                if shown.len() < b.as_slice().len() {
                    t.push_str(ELIDED);
                }
                J::String(t)
            }
            AMQPValue::Void => J::Null,
            AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_) if depth >= HEADERS_JSON_DEPTH => {
                J::String(format!("(nested deeper than {HEADERS_JSON_DEPTH} levels: not shown)"))
            }
            AMQPValue::FieldArray(a) => {
                let (items, cut) =
                    entries(a.as_slice().iter().map(|v| (None, v)), depth + 1, budget);
                let mut items: Vec<J> = items.into_iter().map(|(_, v)| v).collect();
                if cut {
                    items.push(J::String(ELIDED.to_owned()));
                }
                J::Array(items)
            }
            AMQPValue::FieldTable(t) => object(t, depth + 1, budget),
        }
    }
    fn object(t: &FieldTable, depth: usize, budget: &mut usize) -> J {
        let (items, cut) =
            entries(t.inner().iter().map(|(k, v)| (Some(k.as_str()), v)), depth, budget);
        let mut map: serde_json::Map<String, J> =
            items.into_iter().map(|(k, v)| (k.unwrap_or_default(), v)).collect();
        if cut {
            map.insert(HEADERS_JSON_ELIDED_KEY.to_owned(), J::String(ELIDED.to_owned()));
        }
        J::Object(map)
    }
    let mut budget = HEADERS_JSON_BUDGET;
    object(headers, 1, &mut budget).to_string()
}

/// Sleeps unless cancelled first; false when cancelled.
pub async fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn death(queue: &str, reason: &str) -> AMQPValue {
        let mut t = FieldTable::default();
        t.insert("queue".into(), long_string(queue));
        t.insert("reason".into(), long_string(reason));
        t.insert("count".into(), AMQPValue::LongLongInt(1));
        AMQPValue::FieldTable(t)
    }

    fn with(entries: Vec<(&str, AMQPValue)>) -> BasicProperties {
        let mut h = FieldTable::default();
        for (k, v) in entries {
            h.insert(k.into(), v);
        }
        BasicProperties::default().with_headers(h)
    }

    #[test]
    fn a_delivery_limit_death_is_recognised_by_its_latest_death() {
        let deaths = |d: Vec<AMQPValue>| AMQPValue::FieldArray(d.into());
        // RabbitMQ 3.10: x-death, most recent first, and x-first-death-*.
        let limited = with(vec![
            ("x-death", deaths(vec![death("p.inbox", "delivery_limit")])),
            ("x-first-death-reason", long_string("delivery_limit")),
        ]);
        assert_eq!(delivery_limited(&limited, "p.inbox"), Some(broker::INBOX_DELIVERY_LIMIT));
        // Refused earlier, then limited: the latest death decides.
        let later = with(vec![(
            "x-death",
            deaths(vec![death("p.inbox", "delivery_limit"), death("p.inbox", "rejected")]),
        )]);
        assert!(delivery_limited(&later, "p.inbox").is_some());
        // Limited once, then replayed and refused: a refusal.
        let refused = with(vec![(
            "x-death",
            deaths(vec![death("p.inbox", "rejected"), death("p.inbox", "delivery_limit")]),
        )]);
        assert_eq!(delivery_limited(&refused, "p.inbox"), None);
        // Another queue's limit is not the inbox's.
        let other = with(vec![("x-death", deaths(vec![death("q.inbox", "delivery_limit")]))]);
        assert_eq!(delivery_limited(&other, "p.inbox"), None);
        // RabbitMQ 3.13+: x-last-death-*, and the count when the broker gives it.
        let last = with(vec![
            ("x-death", deaths(vec![death("p.inbox", "rejected")])),
            ("x-last-death-reason", long_string("delivery_limit")),
            ("x-last-death-queue", long_string("p.inbox")),
            ("x-delivery-count", AMQPValue::LongLongInt(21)),
        ]);
        assert_eq!(delivery_limited(&last, "p.inbox"), Some(21));
        assert_eq!(delivery_limited(&BasicProperties::default(), "p.inbox"), None);
        let odd = with(vec![("x-death", long_string("not an array"))]);
        assert_eq!(delivery_limited(&odd, "p.inbox"), None);
    }

    #[test]
    fn refusals_are_counted_from_turnds_header_never_from_x_death() {
        let deaths = AMQPValue::FieldArray(vec![death("p.inbox", "rejected")].into());
        // A forged or stale x-death counts for nothing.
        let forged = with(vec![("x-death", deaths.clone())]);
        assert_eq!(refusals(&forged), 0);
        let counted = with(vec![("x-death", deaths), (ATTEMPT_KEY, AMQPValue::LongLongInt(3))]);
        assert_eq!(refusals(&counted), 3);
        assert_eq!(refusals(&with(vec![(ATTEMPT_KEY, AMQPValue::ShortUInt(2))])), 2);
        assert_eq!(refusals(&with(vec![(ATTEMPT_KEY, AMQPValue::LongLongInt(-4))])), 0);
        assert_eq!(refusals(&with(vec![(ATTEMPT_KEY, long_string("7"))])), 0);
        assert_eq!(refusals(&BasicProperties::default()), 0);
        // What the mover republishes keeps the producer's headers, not the broker's.
        let mut h = FieldTable::default();
        h.insert("x-death".into(), AMQPValue::FieldArray(vec![].into()));
        h.insert("x-first-death-queue".into(), long_string("p.inbox"));
        h.insert("x-last-death-reason".into(), long_string("rejected"));
        h.insert("x-delivery-count".into(), AMQPValue::LongLongInt(2));
        h.insert("trace".into(), long_string("kept"));
        let kept = without_broker_headers(&h);
        assert_eq!(kept.inner().keys().map(|k| k.as_str()).collect::<Vec<_>>(), vec!["trace"]);
    }

    #[test]
    fn headers_json_is_bounded_in_depth_and_size() {
        let mut deep = AMQPValue::LongString("bottom".into());
        for _ in 0..40 {
            deep = AMQPValue::FieldArray(vec![deep].into());
        }
        let mut h = FieldTable::default();
        // Keys in order: walked in this order, the budget runs out at "c-big".
        h.insert("a-deep".into(), deep);
        h.insert("b-nan".into(), AMQPValue::Double(f64::NAN));
        h.insert("c-big".into(), AMQPValue::LongString(vec![b'x'; 1 << 20].into()));
        h.insert("d-bytes".into(), AMQPValue::ByteArray(vec![7u8; 1 << 20].into()));
        let json = headers_json(&h);
        assert!(json.len() <= HEADERS_JSON_BUDGET + 4096, "{} bytes", json.len());
        let v: serde_json::Value = serde_json::from_str(&json).expect("JSON");
        assert!(v["c-big"].as_str().is_some_and(|s| s.ends_with("KiB)")), "elided");
        assert!(v.get("d-bytes").is_none() && v.get("…").is_some(), "the rest elided");
        assert!(json.contains("nested deeper than 16 levels"));
        assert!(!json.contains("bottom"));
        assert_eq!(v["b-nan"], serde_json::Value::Null);
    }
}
