//! One owned deployment's task: take-over, claim, worker I/O, deadlines, commit, idle and
//! eviction, crash handling and stop.

use super::registry::*;
use super::*;
use crate::otel;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    /// Nothing left to do, or the worker stopped on purpose with nothing queued.
    Done,
    /// The worker died (or could not start): pending turns failed, lock released.
    Crashed,
    /// The lock session was lost: the server freed the lock already.
    LockLost,
    Shutdown,
    /// Its organization is at `worker.max_workers_per_org_cluster`: let go without a worker;
    /// the deployment waits for a slot (its turns stay queued).
    AtOrgCap,
}

/// What a commit found next.
pub(super) enum Next {
    /// Boxed: the other variants are empty.
    Claimed(Box<Claimed>),
    /// It looked: nothing is queued.
    Empty,
    /// It did not look (not asked to, or the commit gave up).
    NotLooked,
}

/// The turn being answered.
pub(super) struct Running {
    pub(super) envelope: Envelope,
    /// When the turn was accepted (for the latency histogram).
    pub(super) accepted: Instant,
    /// Local deadline: last heartbeat + turn.deadline (heartbeats stop moving it while the
    /// provider failed; when it lapses the turn fails with the provider's code).
    pub(super) deadline: Instant,
    pub(super) provider_failed: bool,
    pub(super) last_extension: Instant,
    /// An operator cancelled it and its worker was told: heartbeats no longer move the
    /// deadline, which is the end of `turn.cancel_grace`.
    pub(super) cancelled: bool,
    /// The turn's `turnd.worker` span (crate::otel): open until the turn ends here.
    pub(super) span: tracing::Span,
}

pub(super) struct Owner<'a> {
    pub(super) d: &'a Deployments,
    pub(super) name: DeploymentName,
    pub(super) held: Held,
    /// Wakes it to look for queued turns.
    pub(super) bells: Arc<Bells>,
    /// Where intake hands it a turn claimed for it while idle.
    pub(super) slot: Arc<Slot>,
    /// An operator cancelled one of its turns (cancel doorbell, or the sweep's reminder).
    pub(super) cancel: Arc<Notify>,
    pub(super) evict: CancellationToken,
    pub(super) busy: Arc<AtomicBool>,
    pub(super) last_active: Arc<AtomicU64>,
    pub(super) has_worker: Arc<AtomicBool>,
    pub(super) org: Arc<std::sync::OnceLock<super::admission::Org>>,
    /// Turns given to the worker so far, and told of each (`doorbell` watches for a long one).
    pub(super) gives: AtomicU64,
    pub(super) given: Notify,
}

/// A turn running this long makes its owner listen on its thread queue even while intake is
/// here: a cancel doorbell from another process (`turnd cancel`, another daemon's API) then
/// reaches it at once. One shorter would most likely be over before a cancel could matter; the
/// sweep delivers the cancel in any case (`cancel`).
const LONG_TURN: Duration = Duration::from_secs(1);

/// Grace after the deadline before the owner itself fails a silent turn (the sweep would too).
pub(super) const LOCAL_DEADLINE_SLACK: Duration = Duration::from_millis(100);

/// Heartbeats reach the database at most this often (a write per heartbeat would cost a
/// statement per line; a longer interval lets the stored deadline lag further behind).
pub(super) fn extension_interval(deadline: Duration) -> Duration {
    (deadline / 4).max(Duration::from_millis(100))
}

/// The deadline stored for a running turn, which the sweep acts on: `turn.deadline` plus the
/// extension interval, since the last heartbeat may not have been written. The sweep (the
/// backup for an owner that died) may so fail a turn that much late, but never before its
/// worker was silent for a whole `turn.deadline`; the live owner's own deadline is exact.
pub fn stored_deadline(deadline: Duration) -> Duration {
    deadline + extension_interval(deadline)
}

impl Owner<'_> {
    pub(super) fn ctx(&self) -> &Ctx {
        &self.d.inner.ctx
    }

    pub(super) fn epoch(&self) -> Epoch {
        self.held.epoch
    }

    pub(super) async fn run(&self) -> End {
        let ctx = self.ctx();
        let takeover = match ctx.store.take_over(&self.name, self.epoch(), &ctx.daemon_id).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "cannot take over deployment; leaving it for adoption");
                return End::Done;
            }
        };
        ctx.relay.resend(takeover.unpublished);
        ctx.relay.failed("takeover", takeover.failed);
        // Another daemon that owned it and did not let go may still run its worker, unaware
        // that its lock session is gone (see lock::LOSS_NOTICED_WITHIN).
        let unreleased = takeover.previous_owner.is_some_and(|o| o != ctx.daemon_id);
        let Some(meta) = takeover.meta else { return End::Done };
        if let Some(ms) = takeover.backoff_ms {
            let failed = ctx
                .store
                .fail_pending(&self.name, self.epoch(), false, &|_| {
                    Outcome::error(
                        ErrorCode::WorkerCrashLoop,
                        format!(
                            "the worker keeps dying; restarts back off for another {} s",
                            (ms + 999) / 1000
                        ),
                    )
                })
                .await;
            if let Ok(failed) = failed {
                ctx.relay.failed("crash_loop", failed);
            }
            return End::Done;
        }
        let _ = self.org.set(meta.organization_id.clone());
        if !self.d.cluster_slot(&self.name, self.epoch(), meta.organization_id.as_deref()).await {
            tracing::debug!(deployment = %self.name, "organization at worker.max_workers_per_org_cluster; the deployment waits");
            return End::AtOrgCap;
        }
        if unreleased {
            // Fenced already (the takeover moved the epoch); spawn once the old worker is gone.
            tokio::select! {
                _ = tokio::time::sleep(crate::lock::LOSS_NOTICED_WITHIN) => {}
                _ = ctx.locks.lost(self.held.generation) => return End::LockLost,
                _ = ctx.hard.cancelled() => return End::Shutdown,
            }
        }
        let doorbells = CancellationToken::new();
        // The thread queue is declared and consumed once it may be needed (`doorbell`).
        let first_turn_over = Notify::new();
        let bell = self.doorbell(doorbells.clone(), &first_turn_over);
        tokio::pin!(bell);
        let who = Identity {
            deployment: &self.name,
            agent_id: &meta.agent_id,
            organization_id: meta.organization_id.as_deref(),
            conversation_key: &meta.conversation_key,
            epoch: self.epoch(),
        };
        let end = tokio::select! {
            biased;
            end = self.serve(&who, &first_turn_over) => end,
            _ = &mut bell => End::Done,
            // The serve loop handles the lock's loss whenever it waits, but a statement on a
            // connection gone silent (a partition: no answer, no error) never returns, and the
            // worker must not outlive the lock while it hangs (the chaos partition fault saw 7
            // workers live 25 s on). Dropping the loop drops its worker, whose I/O task
            // SIGKILLs the group at once; the next owner's take-over fails its turn.
            _ = ctx.locks.lost(self.held.generation) => self.lost_while_busy(),
        };
        doorbells.cancel();
        bell.await;
        end
    }

    /// The lock was lost while the serve loop was inside an await (dropped now, with its
    /// worker).
    fn lost_while_busy(&self) -> End {
        if self.worker_gone_with_the_lock() {
            tracing::error!("lock session lost during a database call: killing the worker now");
        }
        End::LockLost
    }

    /// Counts the worker's exit for the lock's loss, once (the serve loop and `run` may both
    /// see it). True when there was a worker to count.
    pub(super) fn worker_gone_with_the_lock(&self) -> bool {
        let had = self.has_worker.swap(false, Ordering::Relaxed);
        if had {
            self.ctx().relay.metrics().worker_exit("lock_lost");
        }
        had
    }

    /// Consumes the thread queue for as long as the deployment is owned, across broker
    /// reconnects, once it may be needed; each doorbell wakes the owner.
    ///
    /// Only another daemon's intake rings it (this daemon's wakes owners in memory), and
    /// cancel doorbells. So it is declared once the first turn is over (declaring it beside a
    /// new conversation's spawn made the broker's work part of the first reply's wait) and
    /// this daemon's intake is not the active one, or once a turn runs for `LONG_TURN`. A
    /// queue costs the broker more than all of a short turn's messages: a daemon alone, or
    /// the active intake's, mostly needs none. Nothing is missed meanwhile: the owner claims
    /// again after each turn, local turns and duplicates wake it in memory, the intake tells
    /// the moment it stops (before another daemon's can start), and a fresh consumer looks
    /// once for queued turns and for a cancel.
    async fn doorbell(&self, stop: CancellationToken, first_turn_over: &Notify) {
        let mut here = self.d.inner.intake_here.subscribe();
        let long = self.a_turn_runs_long();
        tokio::pin!(long);
        let mut first_over = false;
        loop {
            if first_over && !*here.borrow_and_update() {
                break;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = first_turn_over.notified(), if !first_over => first_over = true,
                changed = here.changed(), if first_over => if changed.is_err() { break },
                _ = &mut long => break,
            }
        }
        let broker = &self.ctx().broker;
        let mut last: Option<Arc<crate::broker::Session>> = None;
        loop {
            let session = tokio::select! {
                _ = stop.cancelled() => return,
                s = async { match &last { Some(old) => broker.next_session(old).await, None => broker.session().await } } => s,
            };
            let Some(session) = session else {
                stop.cancelled().await;
                return;
            };
            last = Some(session.clone());
            // Boxed: a one-off, and the biggest future the owner would otherwise carry while idle.
            match Box::pin(session.consume_thread(&self.name)).await {
                Ok((channel, consumer)) => {
                    let bells = self.bells.clone();
                    let cancel = self.cancel.clone();
                    let ended = Arc::new(Notify::new());
                    let ended2 = ended.clone();
                    let tag = consumer.tag();
                    consumer.set_delegate(move |delivery: lapin::message::DeliveryResult| {
                        match delivery {
                            Ok(Some(d))
                                if d.properties.kind().as_ref().is_some_and(|k| {
                                    k.as_str() == crate::cancel::CANCEL_DOORBELL
                                }) =>
                            {
                                cancel.notify_one()
                            }
                            // The bell names the newest turn it rings for (an older
                            // daemon's empty bell names none).
                            Ok(Some(d)) => bells.ring(Seq::from_doorbell(&d.data)),
                            _ => ended2.notify_one(),
                        }
                        async {}
                    });
                    // A fresh consumer may have missed doorbells: look once, and at the
                    // running turn's record for a cancel.
                    self.bells.ring(None);
                    if self.busy.load(Ordering::Relaxed) {
                        self.cancel.notify_one();
                    }
                    tokio::select! {
                        _ = stop.cancelled() => {
                            let _ = channel.basic_cancel(tag, Default::default()).await;
                            return;
                        }
                        _ = ended.notified() => {}
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot consume thread queue; waiting for the next broker session");
                }
            }
        }
    }

    /// Resolves once a turn was with the worker for `LONG_TURN`.
    async fn a_turn_runs_long(&self) {
        loop {
            self.given.notified().await;
            let turn = self.gives.load(Ordering::Relaxed);
            tokio::time::sleep(LONG_TURN).await;
            if self.busy.load(Ordering::Relaxed) && self.gives.load(Ordering::Relaxed) == turn {
                return;
            }
        }
    }

    pub(super) fn set_busy(&self, busy: bool) {
        self.busy.store(busy, Ordering::Relaxed);
        if !busy {
            self.last_active.store(self.d.now_ms(), Ordering::Relaxed);
        }
    }

    pub(super) async fn start_worker(&self, who: &Identity<'_>) -> Result<Worker, String> {
        let ctx = self.ctx();
        match Worker::spawn(&ctx.spawner, &ctx.spec, who).await {
            Ok(w) => {
                tracing::debug!(pid = w.pid, "worker started");
                ctx.relay.metrics().worker_spawns.inc();
                self.has_worker.store(true, Ordering::Relaxed);
                Ok(w)
            }
            Err(e) => {
                tracing::error!(error = %e, "worker could not be started");
                ctx.relay.metrics().worker_exit("start_failed");
                Err(e.to_string())
            }
        }
    }

    /// A worker that cannot start fails every pending turn and counts as a crash.
    pub(super) async fn start_failed(&self, message: &str) -> End {
        self.fail_all("fast", ErrorCode::WorkerStartFailed, message).await;
        let _ = self.ctx().store.record_crash(&self.name).await;
        End::Crashed
    }

    /// A bug, not an input: the task's state is gone, but the deployment must not stay
    /// registered (it would never be adopted) nor its turns wait for the sweep.
    pub(super) async fn panicked(&self, message: &str) -> End {
        tracing::error!("deployment task panicked: {message}; failing its turns and releasing it");
        self.ctx().relay.metrics().worker_exit("panic");
        // The worker's handle went with the unwinding, and its I/O task SIGKILLs the group on
        // that: give the kill a moment before the lock can go to another daemon.
        tokio::time::sleep(PANIC_KILL_GRACE).await;
        self.has_worker.store(false, Ordering::Relaxed);
        self.fail_all("panic", ErrorCode::WorkerDied, "the daemon hit an internal error").await;
        End::Crashed
    }

    /// Writes a claimed turn to the worker. The write is bounded by the turn's deadline: a
    /// worker that does not read its stdin (a turn larger than the pipe) is as hung as one that
    /// does not answer, and the deadline branch then stops it. Shutdown's hard stop and the loss
    /// of the lock cut the write short too; the serve loop handles either next.
    pub(super) async fn give(&self, worker: Option<&mut Worker>, claimed: Claimed) -> Running {
        let ctx = self.ctx();
        let (epoch, id) = (self.epoch().get(), claimed.envelope.message_id.as_str());
        let claim = otel::claim_span(
            claimed.envelope.trace.as_ref(),
            self.name.as_str(),
            epoch,
            id,
            claimed.waited,
        );
        let span = otel::worker_span(&claim, self.name.as_str(), epoch, id);
        drop(claim);
        let cx = otel::hand_on(&span, claimed.envelope.trace.as_ref());
        let line = turn_line(self.epoch(), cx.as_ref(), &claimed.line);
        tracing::trace!(message_id = %claimed.envelope.message_id, "turn given to worker");
        let now = Instant::now();
        let deadline = now + ctx.config.turn.deadline;
        if let Some(w) = worker {
            tokio::select! {
                written = w.send(&line) => if let Err(e) = written {
                    // The worker is going away; its exit fails the turn.
                    tracing::debug!(error = %e, "cannot write turn to worker");
                },
                _ = tokio::time::sleep_until(deadline + LOCAL_DEADLINE_SLACK) => {
                    tracing::warn!(message_id = %claimed.envelope.message_id, "the worker did not read its turn within turn.deadline");
                }
                _ = ctx.hard.cancelled() => {}
                _ = ctx.locks.lost(self.held.generation) => {}
            }
        }
        let accepted = now.checked_sub(claimed.waited).unwrap_or(now);
        self.gives.fetch_add(1, Ordering::Relaxed);
        self.given.notify_one();
        Running {
            envelope: claimed.envelope,
            accepted,
            deadline,
            provider_failed: false,
            last_extension: now,
            cancelled: false,
            span,
        }
    }

    pub(super) async fn extend_deadlines(&self) -> Result<(), crate::store::StoreError> {
        let ctx = self.ctx();
        let config = &ctx.config;
        ctx.store
            .extend_deadlines(
                &self.name,
                self.epoch(),
                stored_deadline(config.turn.deadline),
                config.turn.queue_timeout,
            )
            .await
    }

    pub(super) async fn provider_failed(&self, code: &str) {
        let ctx = self.ctx();
        if let Err(e) = ctx.store.set_provider_code(&self.name, self.epoch(), Some(code)).await {
            tracing::warn!(error = %e, "cannot record provider failure");
        }
    }

    pub(super) async fn provider_recovered(&self) {
        let ctx = self.ctx();
        if let Err(e) = ctx.store.set_provider_code(&self.name, self.epoch(), None).await {
            tracing::warn!(error = %e, "cannot record provider recovery");
        }
        let _ = self.extend_deadlines().await;
    }

    /// Commits the running turn's outcome and, with `claim_next`, claims the deployment's next
    /// turn in the same statement (one round trip where a commit and a claim took two).
    pub(super) async fn commit(&self, mut r: Running, outcome: Outcome, claim_next: bool) -> Next {
        let ctx = self.ctx();
        let span = otel::commit_span(
            &r.span,
            self.name.as_str(),
            self.epoch().get(),
            r.envelope.message_id.as_str(),
            outcome.kind(),
        );
        if let Outcome::Error { .. } = outcome {
            otel::set_error(&r.span);
        }
        // The event's relay span hangs off this commit, wherever it is published.
        if let Some(cx) = otel::hand_on(&span, r.envelope.trace.as_ref()) {
            r.envelope.trace = Some(cx);
        }
        let claim = claim_next.then(|| stored_deadline(ctx.config.turn.deadline));
        // Retried while the database is away: the obligation is ours until it commits or
        // someone else (sweep, takeover) ends it. A retry after an answer that was lost finds
        // its turn done (by that very attempt); a turn that attempt claimed stays running,
        // never given to the worker, until the sweep ends it at its deadline (a turn is never
        // given to a worker twice), as after a lost answer to a claim alone.
        let mut backoff = Duration::from_millis(50);
        loop {
            let done = Some((&r.envelope, &outcome));
            match ctx.store.commit_and_claim(&self.name, done, self.epoch(), claim).await {
                Ok(result) => {
                    match result.committed {
                        Some(committed) => {
                            span.record("committed", true);
                            tracing::debug!(parent: &span, message_id = %r.envelope.message_id, kind = outcome.kind(), "turn committed");
                            let latency = r.accepted.elapsed().as_secs_f64();
                            ctx.relay.metrics().turn_latency.observe(latency);
                            ctx.relay.send(vec![committed]);
                        }
                        None => {
                            span.record("committed", false);
                            tracing::info!(parent: &span, message_id = %r.envelope.message_id, "turn already ended elsewhere (deadline or newer owner); reply dropped");
                        }
                    }
                    return match result.claimed {
                        Some(claimed) => Next::Claimed(Box::new(claimed)),
                        None if result.looked => Next::Empty,
                        None => Next::NotLooked,
                    };
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot commit the terminal event; retrying");
                    if ctx.hard.is_cancelled() && backoff >= Duration::from_secs(2) {
                        return Next::NotLooked;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        // The lock is gone (with the database, typically): stop retrying so the
                        // serve loop kills the worker now, not once PostgreSQL is back and
                        // another daemon may already run one. The next owner's takeover (or
                        // the sweep) ends the turn, once.
                        _ = ctx.locks.lost(self.held.generation) => return Next::NotLooked,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    pub(super) async fn fail_all(&self, path: &'static str, code: ErrorCode, message: &str) {
        self.fail(path, false, code, message).await
    }

    pub(super) async fn fail_running(&self, path: &'static str, code: ErrorCode, message: &str) {
        self.fail(path, true, code, message).await
    }

    async fn fail(&self, path: &'static str, running_only: bool, code: ErrorCode, message: &str) {
        let ctx = self.ctx();
        let outcome = |_: &str| Outcome::error(code.clone(), message);
        match ctx.store.fail_pending(&self.name, self.epoch(), running_only, &outcome).await {
            Ok(failed) => ctx.relay.failed(path, failed),
            Err(e) => {
                tracing::error!(error = %e, "cannot fail pending turns; the deadline sweep will")
            }
        }
    }
}

/// After a deployment task panicked: time for its worker's group to be killed.
pub(super) const PANIC_KILL_GRACE: Duration = Duration::from_millis(500);

/// Runs `fut`, turning a panic into its message.
pub(super) async fn panic_message<T>(fut: impl Future<Output = T>) -> Result<T, String> {
    use futures_lite::FutureExt;
    std::panic::AssertUnwindSafe(fut)
        .catch_unwind()
        .await
        .map_err(|payload| crate::supervise::panic_text(payload.as_ref()))
}

pub(super) async fn next_event(worker: Option<&mut Worker>) -> Option<WorkerEvent> {
    match worker {
        Some(w) => w.next_event().await,
        None => std::future::pending().await,
    }
}

pub(super) async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Publishes an owner request for `name` (best effort, bounded: adoption covers a miss).
pub(super) async fn request_owner_elsewhere(ctx: &Ctx, name: DeploymentName) {
    request_owners_elsewhere(ctx, std::slice::from_ref(&name)).await
}

/// Publishes owner requests for `names` (best effort, bounded: adoption covers a miss).
pub(super) async fn request_owners_elsewhere(ctx: &Ctx, names: &[DeploymentName]) {
    let Some(session) = ctx.broker.current() else { return };
    let request = async {
        for c in session.request_owners(names).await? {
            crate::broker::Session::confirmed(c, "owner requests").await?;
        }
        Ok::<_, crate::broker::BrokerError>(())
    };
    let first = names.first().map(DeploymentName::as_str).unwrap_or_default();
    let count = names.len();
    match tokio::time::timeout(std::time::Duration::from_secs(2), request).await {
        Ok(Ok(())) => {
            tracing::debug!(deployment = first, count, "queued turns offered to the other daemons")
        }
        Ok(Err(e)) => {
            tracing::debug!(deployment = first, count, error = %e, "cannot offer queued turns; adoption will")
        }
        Err(_) => {
            tracing::debug!(
                deployment = first,
                count,
                "offering queued turns timed out; adoption will"
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_in_a_deployment_task_becomes_its_message() {
        assert_eq!(panic_message(async { 7 }).await, Ok(7));
        let formatted = panic_message(async {
            let n = 3;
            if n == 3 {
                panic!("bad state {n}");
            }
        });
        assert_eq!(formatted.await, Err("bad state 3".to_owned()));
        let fixed = panic_message(async { std::panic::panic_any("fixed text") });
        assert_eq!(fixed.await.unwrap_err(), "fixed text");
        let other = panic_message(async { std::panic::panic_any(42u8) });
        assert_eq!(other.await.unwrap_err(), "a panic without a message");
    }
}
