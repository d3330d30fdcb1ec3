//! The registry: owned deployments by name, each a task (`owner`) reached through its entry
//! (nudge, evict, busy, last activity); admission at `worker.max_workers` (round-robin across
//! organizations once slots are short, with the per-organization caps: `admission`) and idle
//! eviction.

use std::sync::OnceLock;

use super::admission::{Org, Waiting};
use super::owner::*;
use super::*;

/// The registry's view of one deployment task.
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) bells: Arc<Bells>,
    /// Where intake hands the idle owner a turn it claimed for it.
    pub(super) slot: Arc<Slot>,
    /// An operator cancelled a turn here: the owner looks whether its running turn is it.
    pub(super) cancel: Arc<Notify>,
    pub(super) evict: CancellationToken,
    pub(super) busy: Arc<AtomicBool>,
    /// Milliseconds since the registry's start when the deployment last finished a turn.
    pub(super) last_active: Arc<AtomicU64>,
    pub(super) has_worker: Arc<AtomicBool>,
    /// Known once looked up for admission or taken over.
    pub(super) org: Arc<OnceLock<Org>>,
}

/// Owned deployments by name.
#[derive(Debug, Clone)]
pub struct Deployments {
    pub(super) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(super) struct Inner {
    pub(super) ctx: Ctx,
    pub(super) entries: Mutex<HashMap<DeploymentName, Entry>>,
    /// Deployments waiting for a slot (always locked after `entries`, never before).
    pub(super) waiting: Mutex<Waiting>,
    pub(super) tasks: TaskTracker,
    pub(super) started: Instant,
    /// This daemon's intake is the inbox's active consumer (see [`Deployments::intake_here`]).
    pub(super) intake_here: tokio::sync::watch::Sender<bool>,
}

impl Deployments {
    pub fn new(ctx: Ctx) -> Deployments {
        Deployments {
            inner: Arc::new(Inner {
                ctx,
                entries: Mutex::new(HashMap::new()),
                waiting: Mutex::new(Waiting::default()),
                tasks: TaskTracker::new(),
                started: Instant::now(),
                intake_here: tokio::sync::watch::Sender::new(false),
            }),
        }
    }

    pub fn ctx(&self) -> &Ctx {
        &self.inner.ctx
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<DeploymentName, Entry>> {
        // A poisoned registry means a panic elsewhere already; keep serving what is there.
        self.inner.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.inner.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn len(&self) -> usize {
        self.entries().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn live_workers(&self) -> usize {
        self.entries().values().filter(|e| e.has_worker.load(Ordering::Relaxed)).count()
    }

    /// Intake tells whether it is the inbox's active consumer: true once its subscription
    /// received a delivery, false as soon as that subscription ends (before its channel
    /// closes, so before the broker can feed another daemon's intake). While it is true, every
    /// turn of a deployment owned here comes in through this intake, which wakes its owner in
    /// memory: owners need no thread queue (`Owner::doorbell`).
    pub fn intake_here(&self, here: bool) {
        self.inner.intake_here.send_if_modified(|was| std::mem::replace(was, here) != here);
    }

    /// Reserves the hand-off slot of a locally owned deployment whose owner is idle: the epoch
    /// to claim its next turn under in the arm statement ([`Deployments::hand_over`] ends the
    /// reservation, whatever the statement did).
    pub fn reserve(&self, name: &DeploymentName) -> Option<Epoch> {
        self.entries().get(name).and_then(|e| e.slot.reserve())
    }

    /// Ends a reservation: hands over the turn claimed for the owner, or leaves its slot open
    /// (the turn, armed queued, gets the usual bell).
    pub fn hand_over(&self, name: &DeploymentName, claimed: Option<Claimed>) {
        if let Some(e) = self.entries().get(name) {
            e.slot.resolve(claimed);
        }
    }

    /// Wakes a locally owned deployment (a doorbell that skips the broker) for the turn `seq`
    /// (None: whatever is queued). False when this daemon does not own it.
    pub fn nudge(&self, name: &DeploymentName, seq: Option<Seq>) -> bool {
        match self.entries().get(name) {
            Some(e) => {
                e.bells.ring(seq);
                true
            }
            None => false,
        }
    }

    /// Tells a locally owned deployment that one of its turns was cancelled (the sweep's
    /// reminder). False when this daemon does not own it.
    pub fn cancel(&self, name: &DeploymentName) -> bool {
        match self.entries().get(name) {
            Some(e) => {
                e.cancel.notify_one();
                true
            }
            None => false,
        }
    }

    /// This daemon's live workers per organization (for the gauge).
    pub fn live_workers_by_org(&self) -> Vec<(Option<String>, i64)> {
        let mut counts: HashMap<Org, i64> = HashMap::new();
        for e in self.entries().values().filter(|e| e.has_worker.load(Ordering::Relaxed)) {
            *counts.entry(e.org.get().cloned().flatten()).or_default() += 1;
        }
        counts.into_iter().collect()
    }

    /// A new sweep round: organizations the cluster-wide cap refused are tried again (a
    /// worker of theirs may have stopped on another daemon).
    pub async fn retry_waiting(&self) {
        let waiting = {
            let mut waiting = self.waiting();
            waiting.unblock_all();
            !waiting.is_empty()
        };
        if waiting {
            self.admit().await;
        }
    }

    /// [`Deployments::ensure_owners`] on a task of its own (intake does not wait for the locks).
    pub fn ensure_owners_soon(&self, names: Vec<DeploymentName>) {
        let this = self.clone();
        self.inner.tasks.spawn(async move { this.ensure_owners(names).await });
    }

    /// Makes sure each deployment has an owner somewhere: for those not owned here, tries the
    /// lock (batched on the lock session) and starts a task for each lock won. A lock held
    /// elsewhere means that daemon's owner consumes the doorbell. When slots are short or an
    /// organization cap is set, they queue by organization first and are admitted round-robin.
    pub async fn ensure_owners(&self, names: Vec<DeploymentName>) {
        let ctx = &self.inner.ctx;
        if ctx.drain.is_cancelled() {
            return;
        }
        let mut fresh: Vec<DeploymentName> = {
            let entries = self.entries();
            names.into_iter().filter(|n| !entries.contains_key(n)).collect()
        };
        if fresh.is_empty() {
            return;
        }
        if self.fairness_needed() {
            // Already waiting: nothing to look up. Intake asks for an owner again with each
            // batch holding a turn of a deployment owned nowhere, so a flood of turns is a
            // flood of requests for the same names, and the other organizations' requests
            // queue behind them in `<prefix>.owners`: these must cost next to nothing.
            {
                let waiting = self.waiting();
                fresh.retain(|n| !waiting.contains(n));
            }
            if fresh.is_empty() {
                return;
            }
            let names: Vec<&str> = fresh.iter().map(DeploymentName::as_str).collect();
            match ctx.store.queued_orgs(&names).await {
                Ok(orgs) => {
                    {
                        let mut waiting = self.waiting();
                        for (name, org) in orgs {
                            waiting.push(org, DeploymentName::from_trusted(name));
                        }
                    }
                    return self.admit().await;
                }
                // Without the organizations, first come as before; adoption tries again.
                Err(e) => tracing::debug!(error = %e, "cannot look up organizations for admission"),
            }
        }
        let mut wanted = Vec::new();
        {
            let mut entries = self.entries();
            for name in fresh {
                if entries.contains_key(&name) || wanted.contains(&name) {
                    continue;
                }
                if !self.make_room(&mut entries) {
                    tracing::debug!(deployment = %name, "at worker.max_workers with no idle worker; leaving it for adoption");
                    break;
                }
                // Reserve the slot while the lock is tried.
                entries.insert(name.clone(), Entry::new(self.now_ms(), None));
                wanted.push(name);
            }
        }
        self.lock_and_start(wanted).await;
    }

    /// Whether admission must look at organizations: a cap is set, or slots are short (every
    /// one taken, or deployments already waiting). Otherwise a new conversation costs nothing
    /// more than before.
    fn fairness_needed(&self) -> bool {
        let worker = &self.inner.ctx.config.worker;
        worker.max_workers_per_org > 0
            || worker.max_workers_per_org_cluster > 0
            || self.entries().len() >= worker.max_workers
            || !self.waiting().is_empty()
    }

    /// Whether the organization holds all the slots `worker.max_workers_per_org` gives it
    /// here (workers being stopped included: they are still alive).
    fn at_org_cap(&self, entries: &HashMap<DeploymentName, Entry>, org: &Org) -> bool {
        let cap = self.inner.ctx.config.worker.max_workers_per_org;
        cap > 0 && entries.values().filter(|e| e.org.get() == Some(org)).count() >= cap
    }

    /// Admits waiting deployments round-robin across organizations while there is room.
    /// An organization at its own cap is skipped, and one of its idle workers asked to stop.
    async fn admit(&self) {
        if self.inner.ctx.drain.is_cancelled() {
            return;
        }
        let wanted = {
            let mut entries = self.entries();
            let mut waiting = self.waiting();
            let mut wanted = Vec::new();
            while let Some((org, name)) = waiting.next(|o| !self.at_org_cap(&entries, o)) {
                if entries.contains_key(&name) {
                    continue;
                }
                if !self.make_room(&mut entries) {
                    waiting.push_front(org, name);
                    break;
                }
                entries.insert(name.clone(), Entry::new(self.now_ms(), Some(org)));
                wanted.push(name);
            }
            for org in waiting.orgs() {
                if self.at_org_cap(&entries, &org) {
                    evict_idle_of(&entries, &org);
                }
            }
            wanted
        };
        // A lock held elsewhere gave its slot back: the next in line may have it. (Not after a
        // failed try: the lock session is away, and the rest would only fail the same way.)
        let held_elsewhere = self.lock_and_start(wanted).await;
        if held_elsewhere > 0 && !self.waiting().is_empty() {
            Box::pin(self.admit()).await;
        }
    }

    /// Whether an owner of `org` that just went idle should stop its worker for a waiting
    /// deployment: one of its own organization waits (held back by the cap), or every slot
    /// is taken and another organization could use this one.
    pub(super) fn slot_wanted(&self, org: Option<&Org>) -> bool {
        let entries = self.entries();
        let waiting = self.waiting();
        if waiting.is_empty() {
            return false;
        }
        let full = entries.values().filter(|e| !e.evict.is_cancelled()).count()
            >= self.inner.ctx.config.worker.max_workers;
        // Its own organization even when blocked: that block lifts when this worker stops.
        org.is_some_and(|o| waiting.has(o))
            || (full && waiting.any(|o| !self.at_org_cap(&entries, o)))
    }

    /// Takes the cluster-wide slot of the owner's organization, when that cap is set.
    pub(super) async fn cluster_slot(
        &self,
        name: &DeploymentName,
        epoch: Epoch,
        org: Option<&str>,
    ) -> bool {
        let ctx = &self.inner.ctx;
        let cap = ctx.config.worker.max_workers_per_org_cluster;
        if cap == 0 {
            return true;
        }
        let live_within = ctx.config.sweep.live_within();
        match ctx.store.reserve_org_slot(name, epoch, org, cap, live_within).await {
            Ok(taken) => taken,
            Err(e) => {
                // Unknown: the cap is kept (the turn waits; adoption tries again).
                tracing::debug!(deployment = %name, error = %e, "cannot take an organization slot");
                false
            }
        }
    }

    /// Tries the locks of the reserved deployments and starts a task for each lock won; the
    /// others give their slot back. Returns how many locks were held elsewhere.
    async fn lock_and_start(&self, wanted: Vec<DeploymentName>) -> usize {
        let ctx = &self.inner.ctx;
        if wanted.is_empty() {
            return 0;
        }
        let mut held_elsewhere = 0;
        let attempts: Vec<_> = wanted.iter().map(|n| ctx.locks.try_acquire(n.lock_key())).collect();
        let mut results = Vec::with_capacity(attempts.len());
        for a in attempts {
            results.push(a.await);
        }
        for (name, result) in wanted.into_iter().zip(results) {
            match result {
                Ok(Some(held)) => self.start(name, held),
                Ok(None) => {
                    held_elsewhere += 1;
                    ctx.relay.metrics().lock_contention.inc();
                    self.entries().remove(&name);
                }
                Err(e) => {
                    tracing::debug!(deployment = %name, error = %e, "cannot try the lock now");
                    self.entries().remove(&name);
                }
            }
        }
        held_elsewhere
    }

    /// At `worker.max_workers`, asks the least recently used idle deployment to stop.
    /// False when every slot is busy.
    fn make_room(&self, entries: &mut HashMap<DeploymentName, Entry>) -> bool {
        let max = self.inner.ctx.config.worker.max_workers;
        // Below the cap without looking at each entry (5,000 of them cost a new conversation
        // 0.3 ms); at the cap the scan for a victim is needed anyway.
        if entries.len() < max {
            return true;
        }
        let live = entries.values().filter(|e| !e.evict.is_cancelled()).count();
        if live < max {
            return true;
        }
        let victim = entries
            .iter()
            .filter(|(_, e)| !e.evict.is_cancelled() && !e.busy.load(Ordering::Relaxed))
            .min_by_key(|(_, e)| e.last_active.load(Ordering::Relaxed))
            .map(|(n, _)| n.clone());
        match victim.and_then(|n| entries.get(&n).map(|e| (n, e))) {
            Some((name, e)) => {
                tracing::debug!(deployment = %name, "evicting least recently used idle worker");
                e.evict.cancel();
                true
            }
            None => false,
        }
    }

    pub(super) fn now_ms(&self) -> u64 {
        u64::try_from(self.inner.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn start(&self, name: DeploymentName, held: Held) {
        let (bells, slot, cancel, evict, busy, last_active, has_worker, org) = {
            let entries = self.entries();
            let Some(e) = entries.get(&name) else { return };
            (
                e.bells.clone(),
                e.slot.clone(),
                e.cancel.clone(),
                e.evict.clone(),
                e.busy.clone(),
                e.last_active.clone(),
                e.has_worker.clone(),
                e.org.clone(),
            )
        };
        let this = self.clone();
        // Every line the task logs, its worker's I/O task's included, carries the deployment
        // and the epoch of its lock. ERROR, the span's level, only decides when it is recorded:
        // always, as long as any of turnd's lines are (an INFO span would vanish, fields and
        // all, under `log.level = "warn"`).
        let span = tracing::error_span!("owner", deployment = %name, epoch = held.epoch.get());
        let task = async move {
            let owner = Owner {
                d: &this,
                name: name.clone(),
                held,
                bells,
                slot,
                cancel,
                evict,
                busy,
                last_active,
                has_worker,
                org,
                gives: AtomicU64::new(0),
                given: Notify::new(),
            };
            let end = match panic_message(owner.run()).await {
                Ok(end) => end,
                Err(message) => owner.panicked(&message).await,
            };
            this.finish(name, held, end).await;
        };
        self.inner.tasks.spawn(tracing::Instrument::instrument(task, span));
    }

    /// After the task's worker has exited: registry removal, then the lock.
    async fn finish(&self, name: DeploymentName, held: Held, end: End) {
        let ctx = &self.inner.ctx;
        let org = self.entries().remove(&name).and_then(|e| e.org.get().cloned());
        if end == End::LockLost {
            // The record stays (the next owner's take-over clears it), but not its slot.
            if ctx.config.worker.max_workers_per_org_cluster > 0 {
                let _ = ctx.store.release_org_slot(&name, held.epoch).await;
            }
            return Box::pin(self.freed(org.as_ref())).await;
        }
        if let Err(e) = ctx.store.release_owner(&name, held.epoch).await {
            tracing::debug!(error = %e, "cannot clear the owner record");
        }
        // Wait until the lock is really free before looking: a turn armed after the look then
        // finds it free (whichever daemon took the turn in takes the deployment), and one armed
        // before is seen here. Not waiting left a window where neither happened and the turn
        // sat until adoption.
        ctx.locks.release_and_wait(held).await;
        if end == End::AtOrgCap {
            // Waits here until a worker of its organization stops (or the next sweep round,
            // for one on another daemon); an idle one here is asked to.
            let org = org.unwrap_or_default();
            {
                let entries = self.entries();
                let mut waiting = self.waiting();
                waiting.push(org.clone(), name);
                waiting.block(org.clone());
                evict_idle_of(&entries, &org);
            }
            // Its slot here is free for the other organizations.
            return Box::pin(self.admit()).await;
        }
        // A turn armed while this owner was stopping found the lock held and left it to us:
        // look again now that it is free.
        if end != End::Shutdown
            && !ctx.drain.is_cancelled()
            && let Ok(true) = ctx.store.has_queued(&name).await
        {
            Box::pin(self.ensure_owners(vec![name])).await;
        } else if ctx.drain.is_cancelled()
            && let Ok(true) = ctx.store.has_queued(&name).await
        {
            // Stopping with turns still queued: hand them to another daemon now rather than
            // after `sweep.adoption_delay` (a rolling restart stays quick).
            request_owner_elsewhere(ctx, name).await;
        }
        // Boxed: admission is rare next to the task's life, and inline it would size it.
        Box::pin(self.freed(org.as_ref())).await;
    }

    /// A slot freed (of `org`, when known): the waiting may have it.
    async fn freed(&self, org: Option<&Org>) {
        if let Some(org) = org {
            self.waiting().unblock(org);
        }
        if !self.waiting().is_empty() {
            self.admit().await;
        }
    }

    /// Waits for every deployment task to end (after `drain`/`hard`). Deployments still
    /// waiting for a slot here are offered to the other daemons first (a rolling restart
    /// does not leave them to adoption).
    pub async fn wait(&self) {
        let waiting = std::mem::take(&mut *self.waiting()).into_names();
        if !waiting.is_empty() {
            request_owners_elsewhere(&self.inner.ctx, &waiting).await;
        }
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}

/// Asks the least recently used idle worker of `org` to stop, unless one of its workers is
/// stopping already (its slot is on the way).
fn evict_idle_of(entries: &HashMap<DeploymentName, Entry>, org: &Org) {
    let of_org = || entries.iter().filter(|(_, e)| e.org.get() == Some(org));
    if of_org().any(|(_, e)| e.evict.is_cancelled()) {
        return;
    }
    if let Some((name, e)) = of_org()
        .filter(|(_, e)| !e.busy.load(Ordering::Relaxed))
        .min_by_key(|(_, e)| e.last_active.load(Ordering::Relaxed))
    {
        tracing::debug!(deployment = %name, "stopping an idle worker for a waiting deployment of its organization");
        e.evict.cancel();
    }
}

impl Entry {
    fn new(now_ms: u64, org: Option<Org>) -> Entry {
        Entry {
            bells: Arc::default(),
            slot: Arc::default(),
            cancel: Arc::new(Notify::new()),
            evict: CancellationToken::new(),
            busy: Arc::new(AtomicBool::new(true)),
            last_active: Arc::new(AtomicU64::new(now_ms)),
            has_worker: Arc::new(AtomicBool::new(false)),
            org: Arc::new(org.map(OnceLock::from).unwrap_or_default()),
        }
    }
}
