//! `turnd run`: wires the components together and owns their lifetimes.
//!
//! ```text
//! daemon
//!  ├─ lock session task        (one PostgreSQL connection, every advisory lock)
//!  ├─ broker supervisor        (AMQP connection, topology, reconnect)
//!  ├─ intake                   (inbox, one active daemon at a time → arm/refuse/park → doorbell → owner request)
//!  ├─ owner requests           (<prefix>.owners → try the lock of a deployment armed elsewhere)
//!  ├─ retry mover              (<prefix>.retry → <prefix>.retry.<k>, or parked past the delivery limit)
//!  ├─ sweep                    (deadlines, adoption, retention, daemon heartbeat)
//!  ├─ relay                    (outbox → <prefix>.replies)
//!  ├─ http                     (console listener; the ops listener when configured)
//!  ├─ status/watchdog, SIGCHLD forwarder, SIGHUP reloader
//!  └─ deployments ──(many)──► deployment task ──► worker process
//! ```
//!
//! Every component but the deployments is supervised (`supervise`): it returns a `Result`,
//! and `run` selects on the components' join handles beside the signals. One that ends before
//! it was asked to (returns, fails or panics) is logged by name and stops the daemon in the
//! same order as SIGTERM, which then exits 1 for systemd or Kubernetes to restart it. A
//! deployment task is not such a component: it catches its own panic, fails its turns and
//! releases its lock (`deployment::owner`), and the daemon serves on.
//!
//! SIGHUP re-reads the config (file and environment) and applies what can change live:
//! `log.level` and the HTTP tokens. It logs what it applied and which changed keys wait for a
//! restart; an invalid file changes nothing. It never stops the daemon.
//!
//! Shutdown (SIGTERM/SIGINT): stop intake and adoption, let running turns finish for
//! `shutdown.grace` (a second signal cuts it short), stop workers (cut-off turns get
//! `WORKER_STOPPED`, queued ones stay for another daemon), release locks after workers exit,
//! flush the relay, exit 0 (1 when a component failed).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, Names};
use crate::config::Config;
use crate::deployment::{Ctx, Deployments};
use crate::http::{self, Health};
use crate::intake::Intake;
use crate::lock::LockSession;
use crate::metrics::Metrics;
use crate::relay::{Relay, RelayHandle};
use crate::store::{self, Store};
use crate::supervise::{ComponentError, ComponentResult, Components};
use crate::sweep::Sweep;
use crate::systemd::Notifier;
use crate::worker::{self, Spawner, WorkerSpec};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("cannot start the worker spawner thread: {0}")]
    Spawner(std::io::Error),
    #[error("worker.sandbox: {0}")]
    Sandbox(std::io::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Http(#[from] http::HttpError),
    /// A component ended before it was asked to; the daemon stopped in order after it.
    #[error("{component} {how}; the daemon stopped so that its supervisor restarts it")]
    Component { component: &'static str, how: String },
}

/// Runs the daemon until SIGTERM/SIGINT (or `stop` is cancelled, for tests). `config_path`
/// is where `config` came from (`--config`, else the default), read again on SIGHUP.
pub async fn run(
    config: Config,
    config_path: Option<PathBuf>,
    stop: CancellationToken,
) -> Result<(), DaemonError> {
    // First of all: SIGHUP's default action ends the process.
    let hup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    let config = Arc::new(config);
    let daemon_id = config.daemon.id.clone();
    raise_nofile_limit(config.worker.max_workers);
    let store = Store::connect(&config.database, &daemon_id)?;
    let background = CancellationToken::new();

    // The database first: migrations (when enabled) and the daemon record. Wait for it.
    let mut backoff = Duration::from_millis(200);
    loop {
        let step = async {
            if config.database.auto_migrate {
                store.migrate().await?;
            }
            store.register_daemon(&daemon_id, &hostname(), std::process::id()).await
        };
        match step.await {
            Ok(()) => break,
            Err(e @ store::StoreError::Migrate(_)) => return Err(e.into()),
            Err(e) => {
                tracing::warn!(error = %store.explain_unreachable(&e).await, "waiting for PostgreSQL")
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }

    // Components in three groups, stopped in this order: `front` (what takes work in),
    // `late` (relay and status, after the deployments), `back` (what everything else uses).
    let (mut front, mut late, mut back) = (Components::new(), Components::new(), Components::new());
    let lock_options =
        store::connect_options(config.database.url.expose(), &format!("turnd-lock:{daemon_id}"))?;
    let (locks, lock_task) = LockSession::start(lock_options, background.clone());
    back.spawn("lock session", lock_task);
    let (broker, broker_task) = Broker::start(config.clone(), background.clone());
    back.spawn("broker supervisor", broker_task);

    let metrics = Arc::new(Metrics::new());
    let (relay, relay_rx) = RelayHandle::channel(metrics.clone());
    let late_cancel = CancellationToken::new();
    let relay_task = Relay {
        metrics: metrics.clone(),
        store: store.clone(),
        broker: broker.clone(),
        exchange: Names::new(&config.amqp.prefix).replies(),
    };
    late.spawn("relay", relay_task.run(relay_rx, late_cancel.clone()));

    let spawner = Spawner::start().map_err(DaemonError::Spawner)?;
    let base_env = worker::base_env(std::env::vars(), &config.worker.env);
    let landlock = worker::sandbox::Landlock::for_config(
        &config.worker,
        worker::program_dir(&config.worker.command, &base_env).as_deref(),
        &sandbox_exclusions(&config),
        &config.daemon.state_dir.join("workspaces"),
    )
    .map_err(DaemonError::Sandbox)?;
    let spec = WorkerSpec {
        command: config.worker.command.clone(),
        base_env,
        state_dir: config.daemon.state_dir.clone(),
        max_line_bytes: config.worker.max_line_bytes,
        turn_deadline: config.turn.deadline,
        sandbox_prefix: worker::sandbox::prefix(&config.worker),
        landlock: landlock.map(Arc::new),
    };
    // From here on turnd spawns nothing but workers: every other child is an orphan to reap
    // (as PID 1 of a container, or as a child subreaper anywhere). SIGCHLD first, so an orphan
    // that exits while the reaper has no worker to wait for still wakes it.
    let chld = signal(SignalKind::child()).map_err(DaemonError::Signals)?;
    match worker::adopt_orphans() {
        Ok(true) => {
            tracing::info!("running as PID 1: every orphan in this PID namespace is reaped here")
        }
        Ok(false) => tracing::debug!("child subreaper: what workers leave behind is reaped here"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot become a child subreaper: orphans of workers go to init")
        }
    }
    back.spawn("SIGCHLD forwarder", forward_sigchld(chld, background.clone()));
    let drain = CancellationToken::new();
    let hard = CancellationToken::new();
    let deployments = Deployments::new(Ctx {
        config: config.clone(),
        store: store.clone(),
        locks: locks.clone(),
        broker: broker.clone(),
        spawner,
        relay: relay.clone(),
        spec,
        daemon_id: daemon_id.clone(),
        drain: drain.clone(),
        hard: hard.clone(),
    });

    let health = Health {
        store: store.clone(),
        broker: broker.clone(),
        locks: locks.clone(),
        metrics: metrics.clone(),
    };
    let tokens = http::Tokens::new(&config.http);
    back.spawn(
        "SIGHUP reloader",
        reload_on_hup(hup, config.clone(), config_path, tokens.clone(), background.clone()),
    );
    let state = http::AppState::new(health.clone(), config.clone(), tokens);
    if let Some(addr) = config.http.listen {
        back.spawn("http", http::serve(addr, state.clone(), background.clone()).await?);
    }
    if let Some(addr) = config.http.ops_listen {
        back.spawn("ops http", http::serve_ops(addr, state, background.clone()).await?);
    }
    let notifier = Notifier::from_env();
    warn_lock_capacity(&store, &config).await;

    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;

    // Ready once the lock session and the broker are up.
    let mut fatal = None;
    tokio::select! {
        _ = async { locks.wait_healthy().await; broker.session().await; } => {}
        _ = stop.cancelled() => {}
        _ = term.recv() => stop.cancel(),
        _ = int.recv() => stop.cancel(),
        ended = back.next() => fatal = Some(ended),
    }

    let intake_cancel = CancellationToken::new();
    let intake = Intake {
        config: config.clone(),
        store: store.clone(),
        broker: broker.clone(),
        deployments: deployments.clone(),
        requested: Default::default(),
    };
    front.spawn("retry mover", intake.clone().run_retry(intake_cancel.clone()));
    front.spawn("owner requests", intake.clone().run_owners(intake_cancel.clone()));
    front.spawn("intake", intake.run(intake_cancel.clone()));
    front.spawn(
        "sweep",
        Sweep { config: config.clone(), store: store.clone(), deployments: deployments.clone() }
            .run(intake_cancel.clone()),
    );
    if !stop.is_cancelled() && fatal.is_none() {
        tracing::info!(daemon = %daemon_id, prefix = %config.amqp.prefix, "turnd ready");
        notifier.notify("READY=1");
    }
    late.spawn(
        "status/watchdog",
        report_status(notifier.clone(), health.clone(), deployments.clone(), late_cancel.clone()),
    );

    if fatal.is_none() {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = term.recv() => {}
            _ = int.recv() => {}
            ended = front.next() => fatal = Some(ended),
            ended = late.next() => fatal = Some(ended),
            ended = back.next() => fatal = Some(ended),
        }
    }
    if let Some((component, how)) = &fatal {
        tracing::error!(
            component,
            "{component} {how}: stopping the daemon (exit 1) so that its supervisor restarts it"
        );
    }
    tracing::info!(grace = ?config.shutdown.grace, "shutting down: intake stopped, running turns may finish");
    notifier.notify("STOPPING=1");
    intake_cancel.cancel();
    drain.cancel();
    front.join_all().await;
    {
        let grace = tokio::time::sleep(config.shutdown.grace);
        tokio::pin!(grace);
        let all_done = deployments.wait();
        tokio::pin!(all_done);
        tokio::select! {
            _ = &mut all_done => {}
            _ = &mut grace => {
                tracing::warn!("shutdown.grace is over: stopping the remaining workers");
                hard.cancel();
                all_done.await;
            }
            _ = term.recv() => { hard.cancel(); all_done.await; }
            _ = int.recv() => { hard.cancel(); all_done.await; }
        }
    }
    late_cancel.cancel();
    late.join_all().await;
    if let Err(e) = store.daemon_stopped(&daemon_id).await {
        tracing::debug!(error = %e, "cannot record the daemon's stop");
    }
    background.cancel();
    back.join_all().await;
    tracing::info!("turnd stopped");
    match fatal {
        None => Ok(()),
        Some((component, how)) => Err(DaemonError::Component { component, how: how.to_string() }),
    }
}

/// Wakes the reaper on every SIGCHLD (see `worker::reaper`: it sleeps only while no worker
/// is registered).
async fn forward_sigchld(
    mut chld: tokio::signal::unix::Signal,
    cancel: CancellationToken,
) -> ComponentResult {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            got = chld.recv() => match got {
                Some(()) => worker::child_signal(),
                None => return Err(ComponentError::SignalsEnded("SIGCHLD")),
            },
        }
    }
}

/// Keys SIGHUP applies without a restart.
pub const LIVE_KEYS: [&str; 3] = ["log.level", "http.admin_token", "http.read_token"];

/// On each SIGHUP: loads the config again and applies [`LIVE_KEYS`]; says in the log what it
/// did. `running` stays what the other components were started with.
async fn reload_on_hup(
    mut hup: tokio::signal::unix::Signal,
    running: Arc<Config>,
    path: Option<PathBuf>,
    tokens: http::Tokens,
    cancel: CancellationToken,
) -> ComponentResult {
    let mut level = running.log.level.clone();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            got = hup.recv() => if got.is_none() { return Err(ComponentError::SignalsEnded("SIGHUP")) },
        }
        let new = match Config::load(path.as_deref()) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: the config is invalid; nothing reloaded, the running config stays");
                continue;
            }
        };
        let mut applied: Vec<&str> = Vec::new();
        if new.log.level != level {
            match crate::logging::set_level(&new.log.level) {
                Ok(()) => {
                    applied.push("log.level");
                    level = new.log.level.clone();
                    // Shows only when the new filter lets turnd's debug lines through.
                    tracing::debug!(log_level = %level, "log filter replaced");
                }
                Err(e) => tracing::error!(error = %e, "SIGHUP: log.level not reloaded"),
            }
        }
        applied.extend(tokens.set(&new.http));
        let waiting = restart_keys(&running, &new);
        tracing::info!(
            applied = %if applied.is_empty() { "nothing changed".to_owned() } else { applied.join(", ") },
            needs_restart = %waiting.join(", "),
            log_level = %level,
            "SIGHUP: configuration reloaded"
        );
    }
}

/// The dotted keys whose value differs between `old` and `new`, other than [`LIVE_KEYS`]:
/// what only a restart applies.
fn restart_keys(old: &Config, new: &Config) -> Vec<String> {
    let (Ok(a), Ok(b)) = (toml::Table::try_from(old), toml::Table::try_from(new)) else {
        return Vec::new();
    };
    let mut keys = Vec::new();
    for (section, values) in &b {
        let (Some(new_keys), Some(old_keys)) =
            (values.as_table(), a.get(section).and_then(|v| v.as_table()))
        else {
            continue;
        };
        for (key, value) in new_keys {
            let dotted = format!("{section}.{key}");
            if old_keys.get(key) != Some(value) && !LIVE_KEYS.contains(&dotted.as_str()) {
                keys.push(dotted);
            }
        }
    }
    keys
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned())
}

/// Every second: gauges, STATUS= for systemd; WATCHDOG=1 as often as systemd asks. Runs on
/// the daemon's own event loop, so a stuck loop stops the watchdog (outages do not).
async fn report_status(
    notifier: Notifier,
    health: Health,
    deployments: Deployments,
    cancel: CancellationToken,
) -> ComponentResult {
    let mut status = tokio::time::interval(Duration::from_secs(1));
    status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watchdog = notifier.watchdog_interval().map(tokio::time::interval);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = status.tick() => {
                let m = &health.metrics;
                let workers = deployments.live_workers();
                m.live_workers.set(workers as i64);
                m.owned_deployments.set(deployments.len() as i64);
                m.locks_held.set(health.locks.held_count() as i64);
                let orphans = worker::orphans_reaped();
                m.orphans_reaped.inc_by(orphans.saturating_sub(m.orphans_reaped.get()));
                let r = health.check().await;
                let state = if r.ready() { "ready".to_owned() } else {
                    let down: Vec<&str> = [("database", r.database), ("broker", r.broker), ("lock session", r.lock_session)]
                        .iter().filter(|(_, ok)| !ok).map(|(n, _)| *n).collect();
                    format!("degraded ({} down)", down.join(", "))
                };
                notifier.notify(&format!(
                    "STATUS={state}; {workers} live workers; {} owned deployments; outbox backlog {}",
                    deployments.len(),
                    m.outbox_backlog.get()
                ));
            }
            _ = async { match watchdog.as_mut() { Some(w) => { w.tick().await; } None => std::future::pending().await } } => {
                notifier.notify("WATCHDOG=1");
            }
        }
    }
}

/// PostgreSQL's lock table is server-wide and small by default: warn when this daemon alone
/// could fill a large share of it.
async fn warn_lock_capacity(store: &Store, config: &Config) {
    match store.lock_capacity().await {
        Ok(capacity) => {
            let want = config.worker.max_workers as i64;
            if want * 2 > capacity {
                tracing::warn!(
                    capacity,
                    max_workers = want,
                    "PostgreSQL's lock table holds about {capacity} locks (max_locks_per_transaction × \
                     (max_connections + max_prepared_transactions)); worker.max_workers × live daemons \
                     could exceed it and take-overs would fail with 'out of shared memory'. Raise \
                     max_locks_per_transaction."
                );
            }
        }
        Err(e) => tracing::debug!(error = %e, "cannot read the lock table capacity"),
    }
}

/// Each live worker costs the daemon three pipe descriptors.
const FDS_PER_WORKER: u64 = 3;
/// Database and broker connections, the HTTP listener, logs: what the daemon needs besides.
const FDS_OWN: u64 = 256;

/// Raises the soft open-files limit to the hard one, as a daemon holding thousands of workers
/// needs, and says so when even that is short of `worker.max_workers` (each one past it fails
/// with WORKER_START_FAILED "Too many open files").
fn raise_nofile_limit(max_workers: usize) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        if limit.rlim_cur < limit.rlim_max {
            let wanted = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
    }
    let needed = (max_workers as u64).saturating_mul(FDS_PER_WORKER).saturating_add(FDS_OWN);
    if limit.rlim_cur < needed {
        tracing::warn!(
            limit = limit.rlim_cur,
            needed,
            "worker.max_workers = {max_workers} needs about {needed} open files ({FDS_PER_WORKER} per \
             worker), more than this daemon may open: workers past the limit fail with \
             WORKER_START_FAILED; raise LimitNOFILE= (the unit sets 65536) or lower worker.max_workers"
        );
    }
}

/// What a sandboxed worker may not read even inside a directory it reads (CONTRACT §5): the
/// config file, the default config directory (the environment file with the secrets sits
/// there), and the state directory (every tenant's workspace).
fn sandbox_exclusions(config: &Config) -> Vec<std::path::PathBuf> {
    let canonical = |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.into());
    let mut out = vec![std::path::PathBuf::from("/etc/turnd")];
    out.extend(config.source.as_deref().map(canonical));
    out.push(canonical(&config.daemon.state_dir));
    out
}
