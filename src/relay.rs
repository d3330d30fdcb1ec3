//! The relay: publishes committed terminal events from the outbox to `<prefix>.replies`,
//! at least once, each with its unique AMQP message_id.
//!
//! Events committed by this daemon arrive in memory, in commit order, and are published in
//! batches (all publishes, then all confirms, then one UPDATE). Anything else — events of a
//! daemon that died between commit and publish, or ones whose publish failed — is caught up
//! from the table by every daemon (`FOR UPDATE SKIP LOCKED`) on a tick (`CATCH_UP_EVERY`).
//! Nothing sends a NOTIFY: commits serialise on it (~12–15% of throughput in the floor study),
//! and the local hand-off makes it unnecessary; so the relay does not LISTEN either, which
//! would hold a pooled connection for nothing.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use lapin::types::ShortString;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, Session, json_properties, trace_headers};
use crate::metrics::Metrics;
use crate::otel::{self, TraceContext};
use crate::store::{Committed, Store};
use crate::supervise::ComponentResult;

/// Events per publish batch: large enough to amortise confirms and the UPDATE, small enough
/// to keep a batch's latency low.
const BATCH: usize = 256;
/// Rows younger than this belong to the daemon that committed them (in its memory queue).
const CATCH_UP_MIN_AGE: Duration = Duration::from_secs(2);
const CATCH_UP_EVERY: Duration = Duration::from_secs(1);
/// Confirmed events are marked published together, at most this long after their confirm
/// (or as soon as `MARK_BATCH` are waiting): one UPDATE per publish batch cost a statement
/// per few events once several daemons share the load (each relay's batches are smaller).
/// Far below `CATCH_UP_MIN_AGE`, so no other daemon's catch-up takes an unmarked event for
/// an unpublished one; a daemon that dies in between leaves them to be published again
/// (at least once, as before).
const MARK_EVERY: Duration = Duration::from_millis(100);
const MARK_BATCH: usize = 1024;

/// Hands committed events to the relay; every event committed in this daemon passes here,
/// so this is also where they are counted.
#[derive(Debug, Clone)]
pub struct RelayHandle {
    tx: mpsc::UnboundedSender<Committed>,
    metrics: Arc<Metrics>,
}

impl RelayHandle {
    pub fn channel(metrics: Arc<Metrics>) -> (RelayHandle, mpsc::UnboundedReceiver<Committed>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (RelayHandle { tx, metrics }, rx)
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn send(&self, events: Vec<Committed>) {
        for e in events {
            self.metrics.terminal_event(e.event.kind, e.event.code.as_deref());
            // If the relay is gone the row stays unpublished and another daemon catches it up.
            let _ = self.tx.send(e);
        }
    }

    /// Events committed elsewhere and not yet published, taken with a deployment (they go
    /// out before anything committed here for it). Counted where they were committed.
    pub fn resend(&self, events: Vec<Committed>) {
        for e in events {
            let _ = self.tx.send(e);
        }
    }

    /// Pending turns failed on `path` (fast, sweep, takeover, timeout, shutdown, …).
    pub fn failed(&self, path: &'static str, events: Vec<Committed>) {
        self.metrics.failed(path, events.len());
        self.send(events);
    }
}

#[derive(Debug)]
pub struct Relay {
    pub metrics: Arc<Metrics>,
    pub store: Store,
    pub broker: Broker,
    pub exchange: String,
}

impl Relay {
    /// Runs until `cancel`, then drains what is already in memory (bounded).
    ///
    /// Order: events committed here are published in commit order, also across a broker
    /// outage. A batch that could not be published (no session, a failed publish, a missing
    /// confirm) is kept, from its first unconfirmed event on, ahead of everything committed
    /// after it, and tried again once a session is back (checked every `CATCH_UP_EVERY`);
    /// nothing newer goes out before it. Memory: while the broker is away no turn comes in
    /// (intake needs it), so what piles up here is bounded by the turns already accepted.
    pub async fn run(
        self,
        mut rx: mpsc::UnboundedReceiver<Committed>,
        cancel: CancellationToken,
    ) -> ComponentResult {
        let mut tick = tokio::time::interval(CATCH_UP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending: VecDeque<Committed> = VecDeque::new();
        let mut received: Vec<Committed> = Vec::with_capacity(BATCH);
        // Confirmed, not yet marked published; marked by `mark_at` at the latest.
        let mut unmarked: Vec<i64> = Vec::new();
        let mut mark_at: Option<tokio::time::Instant> = None;
        // Set when a publish failed: wait for the tick before trying again.
        let mut stalled = false;
        loop {
            while !pending.is_empty() && !stalled {
                stalled = !self.publish_local(&mut pending, &mut unmarked).await;
                if unmarked.len() >= MARK_BATCH {
                    self.mark(&mut unmarked).await;
                }
                // Let events committed meanwhile join the next batch, in order.
                while let Ok(e) = rx.try_recv() {
                    admit(&mut pending, &unmarked, e);
                }
            }
            if unmarked.is_empty() {
                mark_at = None;
            } else if mark_at.is_none() {
                mark_at = Some(tokio::time::Instant::now() + MARK_EVERY);
            }
            tokio::select! {
                biased;
                _ = sleep_until_opt(mark_at) => {
                    self.mark(&mut unmarked).await;
                    mark_at = None;
                }
                n = rx.recv_many(&mut received, BATCH) => {
                    if n == 0 {
                        break;
                    }
                    for e in received.drain(..) {
                        admit(&mut pending, &unmarked, e);
                    }
                }
                _ = tick.tick() => {
                    stalled = false;
                    // Held-back events go first; the catch-up (other daemons' leftovers) after.
                    if pending.is_empty() {
                        self.catch_up().await;
                    }
                }
                _ = cancel.cancelled() => {
                    rx.close();
                    let drain = async {
                        while rx.recv_many(&mut received, BATCH).await > 0 {
                            for e in received.drain(..) {
                                admit(&mut pending, &unmarked, e);
                            }
                        }
                        while !pending.is_empty() {
                            if !self.publish_local(&mut pending, &mut unmarked).await {
                                // Left in the outbox: another daemon's catch-up publishes it.
                                break;
                            }
                        }
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
                    let _ = tokio::time::timeout(Duration::from_secs(2), self.mark(&mut unmarked)).await;
                    break;
                }
            }
        }
        Ok(())
    }

    /// Marks the confirmed events published (best effort: a failure leaves them to be
    /// published again by a catch-up).
    async fn mark(&self, unmarked: &mut Vec<i64>) {
        if unmarked.is_empty() {
            return;
        }
        if let Err(e) = self.store.mark_published(unmarked).await {
            tracing::warn!(error = %e, "cannot mark events published; they may be published again");
        }
        unmarked.clear();
    }

    /// Publishes the first `BATCH` pending events. What was confirmed leaves `pending`, up to
    /// the first event that was not (the rest stays, in order, to be published again: a
    /// consumer may see a duplicate, never a newer event before an older one), and joins
    /// `unmarked`. False when not all of them went out.
    async fn publish_local(
        &self,
        pending: &mut VecDeque<Committed>,
        unmarked: &mut Vec<i64>,
    ) -> bool {
        let n = pending.len().min(BATCH);
        let rows: Vec<Row<'_>> = pending
            .iter()
            .take(n)
            .map(|c| Row {
                id: c.id,
                event_id: &c.event.event_id,
                routing_key: &c.event.routing_key,
                message_id: c.event.message_id.as_str(),
                body: &c.event.body,
                trace: c.event.trace.as_ref(),
            })
            .collect();
        let ids = self.publish(&rows).await.unwrap_or_default();
        drop(rows);
        unmarked.extend_from_slice(&ids);
        // The confirmed prefix leaves; from the first unconfirmed event on, all stay.
        let confirmed: std::collections::HashSet<i64> = ids.into_iter().collect();
        let mut done = 0;
        while done < n && pending.front().is_some_and(|c| confirmed.contains(&c.id)) {
            pending.pop_front();
            done += 1;
        }
        done == n
    }

    /// Publishes rows and awaits every confirm; returns the ids confirmed.
    async fn publish(&self, rows: &[Row<'_>]) -> Option<Vec<i64>> {
        let session: Arc<Session> = self.broker.current()?;
        let mut confirms = Vec::with_capacity(rows.len());
        for row in rows {
            // The routing key ends in the deployment (`reply.<org>.<deployment>`).
            let deployment = row.routing_key.rsplit('.').next().unwrap_or("");
            let span = otel::relay_span(row.trace, deployment, row.message_id);
            let mut properties = json_properties()
                .with_correlation_id(ShortString::from(row.message_id))
                .with_message_id(ShortString::from(row.event_id));
            // Consumers continue the turn's trace from the event (CONTRACT §6).
            if let Some(cx) = otel::hand_on(&span, row.trace) {
                properties = properties.with_headers(trace_headers(&cx));
            }
            match session
                .publish(&self.exchange, row.routing_key, false, row.body.as_bytes(), properties)
                .await
            {
                Ok(c) => confirms.push((row.id, c, span)),
                Err(e) => {
                    otel::set_error(&span);
                    tracing::warn!(parent: &span, error = %e, "cannot publish terminal event; will retry from the outbox");
                    break;
                }
            }
        }
        let mut ids = Vec::with_capacity(confirms.len());
        for (id, confirm, span) in confirms {
            match Session::confirmed(confirm, &self.exchange).await {
                Ok(_) => {
                    drop(span);
                    self.metrics.events_published.inc();
                    ids.push(id);
                }
                Err(e) => {
                    otel::set_error(&span);
                    tracing::warn!(parent: &span, error = %e, "terminal event not confirmed; will retry from the outbox")
                }
            }
        }
        Some(ids)
    }

    /// Publishes unpublished rows older than the local hand-off window, batch by batch.
    async fn catch_up(&self) {
        if self.broker.current().is_none() {
            return;
        }
        loop {
            let (mut tx, rows) =
                match self.store.lock_unpublished(CATCH_UP_MIN_AGE, BATCH as i64).await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::debug!(error = %e, "outbox catch-up unavailable");
                        return;
                    }
                };
            if rows.is_empty() {
                return;
            }
            let refs: Vec<Row<'_>> = rows
                .iter()
                .map(|r| Row {
                    id: r.id,
                    event_id: &r.event_id,
                    routing_key: &r.routing_key,
                    message_id: &r.message_id,
                    body: &r.body,
                    trace: r.trace.as_ref(),
                })
                .collect();
            let Some(ids) = self.publish(&refs).await else { return };
            let full = ids.len() == rows.len();
            if Store::mark_published_in(&mut tx, &ids).await.is_err()
                || tx.commit().await.is_err()
                || !full
            {
                return;
            }
            if rows.len() < BATCH {
                return;
            }
        }
    }
}

struct Row<'a> {
    id: i64,
    event_id: &'a str,
    routing_key: &'a str,
    message_id: &'a str,
    body: &'a str,
    trace: Option<&'a TraceContext>,
}

/// Queues an event unless this relay already holds it (pending, or published and not yet
/// marked): a take-over hands over the deployment's unpublished events, which are this
/// daemon's own when it took the deployment back from itself.
fn admit(pending: &mut VecDeque<Committed>, unmarked: &[i64], e: Committed) {
    if !unmarked.contains(&e.id) && !pending.iter().any(|p| p.id == e.id) {
        pending.push_back(e);
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
