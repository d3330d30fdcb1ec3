//! The registry: owned deployments by name, each a task (`owner`) reached through its entry
//! (nudge, evict, busy, last activity); admission at `worker.max_workers` and idle eviction.

use super::owner::*;
use super::*;

/// The registry's view of one deployment task.
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) nudge: Arc<Notify>,
    /// An operator cancelled a turn here: the owner looks whether its running turn is it.
    pub(super) cancel: Arc<Notify>,
    pub(super) evict: CancellationToken,
    pub(super) busy: Arc<AtomicBool>,
    /// Milliseconds since the registry's start when the deployment last finished a turn.
    pub(super) last_active: Arc<AtomicU64>,
    pub(super) has_worker: Arc<AtomicBool>,
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
    pub(super) tasks: TaskTracker,
    pub(super) started: Instant,
}

impl Deployments {
    pub fn new(ctx: Ctx) -> Deployments {
        Deployments {
            inner: Arc::new(Inner {
                ctx,
                entries: Mutex::new(HashMap::new()),
                tasks: TaskTracker::new(),
                started: Instant::now(),
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

    pub fn len(&self) -> usize {
        self.entries().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn live_workers(&self) -> usize {
        self.entries().values().filter(|e| e.has_worker.load(Ordering::Relaxed)).count()
    }

    /// Wakes a locally owned deployment (a doorbell that skips the broker). False when this
    /// daemon does not own it.
    pub fn nudge(&self, name: &DeploymentName) -> bool {
        match self.entries().get(name) {
            Some(e) => {
                e.nudge.notify_one();
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

    /// Makes sure each deployment has an owner somewhere: for those not owned here, tries the
    /// lock (batched on the lock session) and starts a task for each lock won. A lock held
    /// elsewhere means that daemon's owner consumes the doorbell.
    pub async fn ensure_owners(&self, names: Vec<DeploymentName>) {
        let ctx = &self.inner.ctx;
        if ctx.drain.is_cancelled() {
            return;
        }
        let mut wanted = Vec::new();
        {
            let mut entries = self.entries();
            for name in names {
                if entries.contains_key(&name) || wanted.contains(&name) {
                    continue;
                }
                if !self.make_room(&mut entries) {
                    tracing::debug!(deployment = %name, "at worker.max_workers with no idle worker; leaving it for adoption");
                    break;
                }
                // Reserve the slot while the lock is tried.
                entries.insert(name.clone(), Entry::new(self.now_ms()));
                wanted.push(name);
            }
        }
        if wanted.is_empty() {
            return;
        }
        let attempts: Vec<_> = wanted.iter().map(|n| ctx.locks.try_acquire(n.lock_key())).collect();
        let mut results = Vec::with_capacity(attempts.len());
        for a in attempts {
            results.push(a.await);
        }
        for (name, result) in wanted.into_iter().zip(results) {
            match result {
                Ok(Some(held)) => self.start(name, held),
                Ok(None) => {
                    ctx.relay.metrics().lock_contention.inc();
                    self.entries().remove(&name);
                }
                Err(e) => {
                    tracing::debug!(deployment = %name, error = %e, "cannot try the lock now");
                    self.entries().remove(&name);
                }
            }
        }
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
        let (nudge, cancel, evict, busy, last_active, has_worker) = {
            let entries = self.entries();
            let Some(e) = entries.get(&name) else { return };
            (
                e.nudge.clone(),
                e.cancel.clone(),
                e.evict.clone(),
                e.busy.clone(),
                e.last_active.clone(),
                e.has_worker.clone(),
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
                nudge,
                cancel,
                evict,
                busy,
                last_active,
                has_worker,
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
        self.entries().remove(&name);
        if end == End::LockLost {
            return;
        }
        if let Err(e) = ctx.store.release_owner(&name, held.epoch).await {
            tracing::debug!(error = %e, "cannot clear the owner record");
        }
        // Wait until the lock is really free before looking: a turn armed after the look then
        // finds it free (whichever daemon took the turn in takes the deployment), and one armed
        // before is seen here. Not waiting left a window where neither happened and the turn
        // sat until adoption.
        ctx.locks.release_and_wait(held).await;
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
    }

    /// Waits for every deployment task to end (after `drain`/`hard`).
    pub async fn wait(&self) {
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}

impl Entry {
    fn new(now_ms: u64) -> Entry {
        Entry {
            nudge: Arc::new(Notify::new()),
            cancel: Arc::new(Notify::new()),
            evict: CancellationToken::new(),
            busy: Arc::new(AtomicBool::new(true)),
            last_active: Arc::new(AtomicU64::new(now_ms)),
            has_worker: Arc::new(AtomicBool::new(false)),
        }
    }
}
