//! The serve loop of one owned deployment: claim a turn, give it to the worker, then wait for
//! whatever comes first (a worker line or exit, the turn's deadline, idleness, eviction,
//! shutdown, the loss of the lock). [`Serving`] is the loop's state; each event has a handler.

use std::future::Future;
use std::pin::Pin;

use super::owner::*;
use super::*;

/// Longest an owner holds a worker's exit while intake may be claiming a turn for it.
const HAND_OVER_WAIT: Duration = Duration::from_secs(10);

/// What woke the serve loop.
enum Wake {
    /// The loop ended while running a turn handed over (`Serving::close_slot`).
    Ended(End),
    LockLost,
    Nudge,
    Cancel,
    Worker(Option<WorkerEvent>),
    Deadline,
    Idle,
    Evict,
    Drain,
    Hard,
}

/// What the loop does after a claim.
enum Then {
    /// Wait for the next event.
    Wait,
    /// Start over from the top (a failed claim waited before it is tried again).
    Again,
    End(End),
}

/// One owner's state between two events.
pub(super) struct Serving<'s> {
    owner: &'s Owner<'s>,
    who: &'s Identity<'s>,
    /// Told once the first turn is over, which starts the thread-queue consumer.
    first_turn_over: Option<&'s Notify>,
    worker: Option<Worker>,
    running: Option<Running>,
    /// A worker started and not yet recorded with the turn it was started for.
    spawned: Option<u32>,
    /// Look for a queued turn once nothing runs (a bell, a stop set it).
    want_claim: bool,
    /// Turns claimed lately: a bell for one of them needs no look.
    claimed: bells::Claimed,
    /// No claim yet: the first one starts the worker beside it.
    first_claim: bool,
    idle_since: Instant,
    /// SIGTERM seen: finish the running turn, claim no more, stop the worker.
    draining: bool,
}

impl Owner<'_> {
    pub(super) async fn serve(&self, who: &Identity<'_>, first_turn_over: &Notify) -> End {
        let mut s = Serving {
            owner: self,
            who,
            first_turn_over: Some(first_turn_over),
            worker: None,
            running: None,
            spawned: None,
            want_claim: true,
            claimed: bells::Claimed::default(),
            first_claim: true,
            idle_since: Instant::now(),
            draining: false,
        };
        // Pinned once: a completed `lost` must not be polled again (it panicked, which
        // stranded the deployment), so only the wait below polls it.
        let lost = self.ctx().locks.lost(self.held.generation);
        tokio::pin!(lost);
        loop {
            s.tell_first_turn_over();
            if s.may_claim() {
                match s.claim().await {
                    Then::Wait => {}
                    Then::Again => continue,
                    Then::End(end) => return end,
                }
            }
            s.open_slot();
            let wake = s.wait(lost.as_mut()).await;
            let Some(wake) = s.close_slot(wake).await else { continue };
            if let Some(end) = s.handle(wake).await {
                return end;
            }
            if let Some(end) = s.drained() {
                return end;
            }
        }
    }
}

impl Serving<'_> {
    fn ctx(&self) -> &Ctx {
        self.owner.ctx()
    }

    fn config(&self) -> &Config {
        &self.owner.ctx().config
    }

    fn tell_first_turn_over(&mut self) {
        if !self.first_claim
            && self.running.is_none()
            && let Some(first_turn_over) = self.first_turn_over.take()
        {
            first_turn_over.notify_one();
        }
    }

    /// A live worker that was not asked to stop.
    fn worker_live(&self) -> bool {
        self.worker.as_ref().is_some_and(|w| !w.stop_requested())
    }

    fn stop_worker(&mut self) {
        let timeout = self.config().worker.stop_timeout;
        if let Some(w) = self.worker.as_mut() {
            w.stop(timeout);
        }
    }

    fn may_claim(&self) -> bool {
        self.running.is_none() && self.want_claim && self.may_take_more()
    }

    /// Closes the hand-off slot after a wake; the wake to handle, if any.
    async fn close_slot(&mut self, wake: Wake) -> Option<Wake> {
        loop {
            match self.owner.slot.close() {
                Closing::Nothing => return Some(wake),
                // A turn intake claimed for this owner: it runs now. An idle or eviction wake
                // was decided before it came; any other is handled as with a running turn (a
                // worker that exited meanwhile fails it with the rest).
                Closing::Given(claimed) => {
                    if let Some(end) = self.run_claimed(*claimed).await {
                        return Some(Wake::Ended(end));
                    }
                    return match wake {
                        Wake::Idle | Wake::Evict => None,
                        wake => Some(wake),
                    };
                }
                // Intake may be claiming a turn for it: neither claim nor stop before its bell
                // (`wait` leaves idleness, eviction and drain out meanwhile). A worker's exit
                // waits for it too, so that failing the pending turns includes that one.
                Closing::Pending => match wake {
                    Wake::LockLost | Wake::Hard => return Some(wake),
                    Wake::Worker(_) => {
                        // Bounded: intake resolves within its batch, or its guard on drop.
                        let _ = tokio::time::timeout(HAND_OVER_WAIT, self.owner.bells.rang()).await;
                    }
                    _ => return None,
                },
            }
        }
    }

    /// An owner idle with a live worker, that would claim on its next bell, lets intake claim
    /// for it instead (`bells::Slot`).
    fn open_slot(&self) {
        if self.running.is_none()
            && !self.want_claim
            && !self.first_claim
            && self.worker_live()
            && self.may_take_more()
        {
            self.owner.slot.open(self.owner.epoch());
        }
    }

    /// Whether another turn may start here: not draining, and no worker being stopped.
    fn may_take_more(&self) -> bool {
        // The token, not just `draining`: a reply handled in the same poll as SIGTERM (or an
        // owner started during shutdown) must not claim one more turn.
        let claim_more = !self.draining && !self.ctx().drain.is_cancelled();
        claim_more && self.worker.as_ref().is_none_or(|w| !w.stop_requested())
    }

    /// Claims the oldest queued turn and gives it to the worker (started first if needed).
    async fn claim(&mut self) -> Then {
        let (owner, ctx) = (self.owner, self.owner.ctx());
        let claim = ctx.store.claim_next(
            &owner.name,
            owner.epoch(),
            stored_deadline(ctx.config.turn.deadline),
        );
        // A new owner almost always has a turn waiting: its worker starts while the first
        // claim runs, off the cold path. Only the first, or a worker stopped for idleness
        // would be started again and again for nothing.
        let (claim, started) = if self.first_claim && self.worker.is_none() {
            let (c, w) =
                Box::pin(async { tokio::join!(claim, owner.start_worker(self.who)) }).await;
            (c, Some(w))
        } else {
            (claim.await, None)
        };
        let speculative = std::mem::take(&mut self.first_claim) && started.is_some();
        if let Some(started) = started {
            match started {
                Ok(w) => self.started(w),
                // The claim may have taken a turn: fail_all answers it with the rest.
                Err(message) => return Then::End(owner.start_failed(&message).await),
            }
        }
        match claim {
            Ok(Some(claimed)) => match self.run_claimed(claimed).await {
                Some(end) => Then::End(end),
                None => Then::Wait,
            },
            Ok(None) => match self.nothing_queued(speculative) {
                Some(end) => Then::End(end),
                None => Then::Wait,
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot claim the next turn; retrying");
                self.want_claim = false;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => self.want_claim = true,
                    // A fresh future, not the pinned `lost`: that one must complete in the
                    // wait, which handles the loss (polled again after completing here, it
                    // panicked and the deployment was stranded).
                    _ = ctx.locks.lost(owner.held.generation) => {}
                }
                Then::Again
            }
        }
    }

    fn started(&mut self, worker: Worker) {
        self.spawned = Some(worker.pid);
        self.worker = Some(worker);
    }

    /// Gives a claimed turn to the worker, starting one if there is none.
    async fn run_claimed(&mut self, claimed: Claimed) -> Option<End> {
        let (owner, ctx) = (self.owner, self.owner.ctx());
        self.claimed.push(claimed.seq);
        owner.set_busy(true);
        if self.worker.is_none() {
            match owner.start_worker(self.who).await {
                Ok(w) => self.started(w),
                Err(message) => return Some(owner.start_failed(&message).await),
            }
        }
        let claim_sent = claimed.sent;
        let give = owner.give(self.worker.as_mut(), claimed);
        self.running = Some(match self.spawned.take() {
            // While the turn is being written (off the cold path's critical section): record
            // the worker and, when the spawn was slow, restart the stored deadline from it — a
            // spawn that waited behind many others (thousands of deployments starting at once)
            // must not eat into it, or the sweep fails a turn whose worker has only just
            // started. The stored deadline has the extension interval to spare (see
            // `stored_deadline`): a spawn within half of it needs no second write.
            Some(pid) => {
                let deadline = ctx.config.turn.deadline;
                let slow = claim_sent.elapsed() > extension_interval(deadline) / 2;
                let restart =
                    slow.then(|| (stored_deadline(deadline), ctx.config.turn.queue_timeout));
                let started = ctx.store.worker_started(&owner.name, owner.epoch(), pid, restart);
                // Boxed, as once per worker: the two futures side by side would otherwise
                // size the owner for its whole life.
                let (running, _) = Box::pin(async { tokio::join!(give, started) }).await;
                running
            }
            None => Box::pin(give).await,
        });
        None
    }

    /// The claim found nothing: idle from now on; the task ends when there is no worker.
    fn nothing_queued(&mut self, speculative: bool) -> Option<End> {
        self.want_claim = false;
        self.owner.set_busy(false);
        self.idle_since = Instant::now();
        // A waiting deployment could use this slot (fair admission): give it up now rather
        // than after worker.idle_timeout.
        if self.worker.is_some() && self.owner.d.slot_wanted(self.owner.org.get()) {
            self.owner.evict.cancel();
        }
        match self.worker.as_mut() {
            None => Some(End::Done),
            // Started for a turn that was not there after all.
            Some(_) if speculative => {
                self.stop_worker();
                None
            }
            Some(_) => None,
        }
    }

    /// Waits for the next event. `lost` is polled only here.
    async fn wait(&mut self, lost: Pin<&mut impl Future<Output = ()>>) -> Wake {
        let (owner, ctx) = (self.owner, self.owner.ctx());
        // Also while the provider failed: the deadline it already had still lapses (and the
        // worker is stopped), or a heartbeating worker would hold the conversation forever.
        let deadline = self.running.as_ref().map(|r| r.deadline + LOCAL_DEADLINE_SLACK);
        // A turn may be on its way to it (`Closing::Pending`): no stop until intake's bell.
        let reserved = owner.slot.reserved();
        let idle = self.running.is_none() && self.worker_live() && !reserved;
        let idle_at = idle.then(|| self.idle_since + ctx.config.worker.idle_timeout);
        let running = self.running.is_some();
        let draining = self.draining || reserved;
        tokio::select! {
            _ = lost => Wake::LockLost,
            _ = owner.bells.rang() => Wake::Nudge,
            // Left stored while no turn runs: the next one looks once (and finds nothing).
            _ = owner.cancel.notified(), if running => Wake::Cancel,
            event = next_event(self.worker.as_mut()) => Wake::Worker(event),
            _ = sleep_until_opt(deadline) => Wake::Deadline,
            _ = sleep_until_opt(idle_at) => Wake::Idle,
            _ = owner.evict.cancelled(), if idle => Wake::Evict,
            _ = ctx.drain.cancelled(), if !draining => Wake::Drain,
            _ = ctx.hard.cancelled(), if running => Wake::Hard,
        }
    }

    async fn handle(&mut self, wake: Wake) -> Option<End> {
        match wake {
            Wake::Ended(end) => return Some(end),
            Wake::LockLost => return Some(self.lock_lost().await),
            Wake::Nudge => {
                // A bell for a turn this owner already claimed (its commit took it in the
                // same statement, before the bell arrived) needs no look.
                if self.claimed.must_look(&self.owner.bells.take()) {
                    self.want_claim = true;
                }
            }
            Wake::Cancel => Box::pin(self.cancel_asked()).await,
            Wake::Worker(event) => return self.worker_event(event).await,
            Wake::Deadline => self.deadline_lapsed().await,
            Wake::Idle => {
                tracing::debug!("worker idle for worker.idle_timeout; stopping it");
                self.stop_worker();
            }
            Wake::Evict => self.stop_worker(),
            Wake::Drain => {
                self.draining = true;
                if self.running.is_none() {
                    if self.worker.is_none() {
                        return Some(End::Shutdown);
                    }
                    self.stop_worker();
                }
            }
            Wake::Hard => {
                self.running = None;
                let o = self.owner;
                o.fail_running("shutdown", ErrorCode::WorkerStopped, "the daemon is shutting down")
                    .await;
                self.stop_worker();
            }
        }
        None
    }

    /// Draining with nothing running: stop the worker; once it is gone, the task ends.
    fn drained(&mut self) -> Option<End> {
        if !self.draining || self.running.is_some() {
            return None;
        }
        match self.worker.as_ref() {
            Some(w) if !w.stop_requested() => self.stop_worker(),
            Some(_) => {}
            None => return Some(End::Shutdown),
        }
        None
    }

    async fn lock_lost(&mut self) -> End {
        let owner = self.owner;
        tracing::error!("lock session lost: killing the worker now");
        if let Some(mut w) = self.worker.take() {
            w.kill();
            // Before the wait: `Owner::run` drops this loop on the same loss when the wait
            // (or the fail below, on a silent connection) does not end at once.
            owner.worker_gone_with_the_lock();
            w.wait().await;
        }
        if self.running.is_some() {
            owner
                .fail_running(
                    "lock_lost",
                    ErrorCode::WorkerStopped,
                    "the daemon lost its cross-pod lock",
                )
                .await;
        }
        End::LockLost
    }

    async fn worker_event(&mut self, event: Option<WorkerEvent>) -> Option<End> {
        match event {
            // Boxed: the commit inside is the owner's largest future, and it is idle most of the time.
            Some(WorkerEvent::Line(line)) => return Box::pin(self.on_line(line)).await,
            Some(WorkerEvent::Invalid(msg)) => {
                tracing::warn!(
                    "worker wrote a line that is not protocol, ignored: {}",
                    crate::untrusted::inert(&msg)
                );
            }
            Some(WorkerEvent::Exited(s)) => return self.worker_exited(s.0).await,
            None => return self.worker_exited("ended".to_owned()).await,
        }
        None
    }

    async fn worker_exited(&mut self, status: String) -> Option<End> {
        let (owner, ctx) = (self.owner, self.owner.ctx());
        let deliberate = self.worker.as_ref().is_some_and(|w| w.stop_requested());
        ctx.relay.metrics().worker_exit(if deliberate { "requested" } else { "died" });
        if let Some(mut w) = self.worker.take() {
            w.wait().await;
        }
        owner.has_worker.store(false, Ordering::Relaxed);
        let _ = ctx.store.worker_stopped(&owner.name, owner.epoch()).await;
        if !deliberate {
            if let Some(r) = &self.running {
                crate::otel::set_error(&r.span);
            }
            tracing::warn!("worker {status} without being asked to; failing its turns");
            owner.fail_all("fast", ErrorCode::WorkerDied, &format!("the worker {status}")).await;
            let _ = ctx.store.record_crash(&owner.name).await;
            return Some(End::Crashed);
        }
        if self.running.take().is_some() {
            owner
                .fail_running("shutdown", ErrorCode::WorkerStopped, "the worker was stopped")
                .await;
        }
        if self.draining || ctx.drain.is_cancelled() {
            return Some(End::Shutdown);
        }
        if owner.evict.is_cancelled()
            && !matches!(ctx.store.has_queued(&owner.name).await, Ok(true))
        {
            return Some(End::Done);
        }
        // Stopped on purpose (idle, hung turn, eviction): a turn that arrived meanwhile gets a
        // fresh worker under the lock we kept (CONTRACT §10).
        self.want_claim = true;
        None
    }

    async fn deadline_lapsed(&mut self) {
        let Some(r) = self.running.take() else { return };
        if r.cancelled {
            // The row's cancel request makes the store's outcome TURN_CANCELLED either way.
            tracing::info!(message_id = %r.envelope.message_id, "cancelled turn not answered within turn.cancel_grace; stopping the worker");
            self.owner
                .fail_running(
                    "cancel",
                    ErrorCode::TurnCancelled,
                    "cancelled by an operator; the worker did not answer within turn.cancel_grace",
                )
                .await;
        } else {
            crate::otel::set_error(&r.span);
            tracing::warn!(parent: &r.span, message_id = %r.envelope.message_id, "turn deadline lapsed; stopping the hung worker");
            self.owner
                .fail_running(
                    "timeout",
                    ErrorCode::TurnTimeout,
                    "no heartbeat or reply within turn.deadline",
                )
                .await;
        }
        self.stop_worker();
        self.want_claim = true;
    }

    async fn on_line(&mut self, line: WorkerLine) -> Option<End> {
        let owner = self.owner;
        match line {
            WorkerLine::Reply { message_id, .. } | WorkerLine::Error { message_id, .. }
                if self
                    .running
                    .as_ref()
                    .is_none_or(|r| r.envelope.message_id.as_str() != message_id) =>
            {
                tracing::info!(message_id, "reply for a turn that is not pending here; dropped");
            }
            WorkerLine::Reply { payload, .. } => {
                return self.answered(Outcome::Reply(payload)).await;
            }
            WorkerLine::Error { error, code, .. } => {
                let outcome = Outcome::error(ErrorCode::from_worker(code.as_deref()), error);
                return self.answered(outcome).await;
            }
            WorkerLine::Heartbeat => self.heartbeat().await,
            WorkerLine::ProviderFailed { code, reason } => {
                let r = self.running.as_mut()?;
                tracing::info!(
                    code,
                    reason = reason.as_deref().unwrap_or(""),
                    "provider failed; deadline extensions withdrawn"
                );
                r.provider_failed = true;
                owner.provider_failed(&code).await;
            }
            WorkerLine::ProviderRecovered => {
                let r = self.running.as_mut()?;
                if r.cancelled {
                    return None;
                }
                r.provider_failed = false;
                r.deadline = Instant::now() + owner.ctx().config.turn.deadline;
                r.last_extension = Instant::now();
                owner.provider_recovered().await;
            }
        }
        None
    }

    /// The worker answered the running turn: commit it and, in the same statement, claim the
    /// next one, which goes to the worker at once.
    async fn answered(&mut self, outcome: Outcome) -> Option<End> {
        let r = self.running.take()?;
        let next = self.owner.commit(r, outcome, self.may_take_more()).await;
        self.idle_since = Instant::now();
        // The thread queue's consumer starts now, while the worker has the next turn.
        self.tell_first_turn_over();
        match next {
            Next::Claimed(claimed) => {
                self.want_claim = false;
                self.run_claimed(*claimed).await
            }
            Next::Empty => self.nothing_queued(false),
            Next::NotLooked => {
                self.want_claim = true;
                None
            }
        }
    }

    async fn heartbeat(&mut self) {
        let deadline = self.config().turn.deadline;
        let Some(r) = self.running.as_mut() else { return };
        if r.provider_failed || r.cancelled {
            return;
        }
        let now = Instant::now();
        r.deadline = now + deadline;
        // Debounced; the stored deadline carries the debounce as slack (stored_deadline).
        if now.duration_since(r.last_extension) >= extension_interval(deadline) {
            r.last_extension = now;
            if let Err(e) = self.owner.extend_deadlines().await {
                tracing::warn!(error = %e, "cannot extend deadlines");
            }
        }
    }

    /// An operator may have cancelled the running turn: if the database says so (and nobody
    /// told this worker yet), write the cancel line and hold the turn to what is left of
    /// `turn.cancel_grace`. The write is bounded like a turn's: a worker not reading stdin is
    /// stopped at the grace's end anyway.
    async fn cancel_asked(&mut self) {
        let (owner, ctx) = (self.owner, self.owner.ctx());
        let Some(r) = self.running.as_mut() else { return };
        let grace = ctx.config.turn.cancel_grace;
        let taken =
            ctx.store.take_cancel(&owner.name, &r.envelope.message_id, owner.epoch(), grace);
        let left = match taken.await {
            Ok(Some(left)) => left,
            Ok(None) => return,
            Err(e) => {
                // The sweep reminds us next round (the request is still undelivered).
                tracing::warn!(error = %e, "cannot read the cancel request");
                return;
            }
        };
        tracing::info!(message_id = %r.envelope.message_id, grace_left_ms = left.as_millis() as u64, "turn cancelled by an operator; telling the worker");
        r.cancelled = true;
        r.deadline = r.deadline.min(Instant::now() + left);
        let until = r.deadline;
        let Some(w) = self.worker.as_mut() else { return };
        let line = crate::worker::protocol::cancel_line(&r.envelope.message_id);
        tokio::select! {
            written = w.send(&line) => if let Err(e) = written {
                tracing::debug!(error = %e, "cannot write the cancel line");
            },
            _ = tokio::time::sleep_until(until) => {}
            _ = ctx.hard.cancelled() => {}
            _ = ctx.locks.lost(owner.held.generation) => {}
        }
    }
}
