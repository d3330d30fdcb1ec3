//! The faults, their seeded schedule, and the guard that brings the shared services back
//! whatever happens to the harness (error, panic, Ctrl-C).

use std::fmt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::Rng;
use crate::cluster::Cluster;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    WorkerKill,
    WorkerExit0,
    DaemonKill,
    DaemonTerm,
    LockKill,
    PoolKill,
    AmqpClose,
    AmqpRestart,
    PgRestart,
    Roll,
    Partition,
    NodeStop,
    LeaderStop,
    PgFailover,
}

impl Kind {
    pub const ALL: [Kind; 14] = [
        Kind::WorkerKill,
        Kind::WorkerExit0,
        Kind::DaemonKill,
        Kind::DaemonTerm,
        Kind::LockKill,
        Kind::PoolKill,
        Kind::AmqpClose,
        Kind::AmqpRestart,
        Kind::PgRestart,
        Kind::Roll,
        Kind::Partition,
        Kind::NodeStop,
        Kind::LeaderStop,
        Kind::PgFailover,
    ];

    /// Whether it needs services of its own (`scripts/rabbit-cluster.sh`,
    /// `scripts/pg-pair.sh`): such faults run only when `--faults` names them.
    pub fn needs_own_services(self) -> bool {
        matches!(self, Kind::NodeStop | Kind::LeaderStop | Kind::PgFailover)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::WorkerKill => "worker-kill",
            Kind::WorkerExit0 => "worker-exit0",
            Kind::DaemonKill => "daemon-kill",
            Kind::DaemonTerm => "daemon-term",
            Kind::LockKill => "lock-kill",
            Kind::PoolKill => "pool-kill",
            Kind::AmqpClose => "amqp-close",
            Kind::AmqpRestart => "amqp-restart",
            Kind::PgRestart => "pg-restart",
            Kind::Roll => "roll",
            Kind::Partition => "partition",
            Kind::NodeStop => "node-stop",
            Kind::LeaderStop => "leader-stop",
            Kind::PgFailover => "pg-failover",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Kind::WorkerKill => "SIGKILL a worker (one with a running turn when there is one)",
            Kind::WorkerExit0 => {
                "a worker exits 0 mid-turn (SIGTERM to the worker alone: the test worker _exit(0)s)"
            }
            Kind::DaemonKill => "SIGKILL a daemon, restart it 1-3 s later",
            Kind::DaemonTerm => "SIGTERM a daemon under load (must exit 0), restart it",
            Kind::LockKill => "pg_terminate_backend of a daemon's lock session (turnd-lock:<id>)",
            Kind::PoolKill => "pg_terminate_backend of a daemon's pool connections (turnd:<id>)",
            Kind::AmqpClose => "rabbitmqctl close_all_connections",
            Kind::AmqpRestart => "rabbitmqctl stop_app, 2-6 s, start_app",
            Kind::PgRestart => "pg_ctlcluster <version> main restart",
            Kind::Roll => {
                "a rolling restart: SIGTERM (exit 0) and start again each daemon in turn under load; no reply turn in flight may fail, p99 ≤ 3 s"
            }
            Kind::NodeStop => {
                "stop the RabbitMQ node a daemon is connected to (scripts/rabbit-cluster.sh), 2-5 s, start it"
            }
            Kind::LeaderStop => "stop the RabbitMQ node leading the inbox, 2-5 s, start it",
            Kind::PgFailover => {
                "PostgreSQL primary stopped (immediate), standby promoted (scripts/pg-pair.sh), the daemons' way moved to it; the old primary rebuilt as standby"
            }
            Kind::Partition => {
                "a daemon's PostgreSQL link goes silent (its proxy forwards nothing, closes nothing; the server side drops after 11 s): its workers must stop within 15 s; then healed"
            }
        }
    }

    pub fn parse(s: &str) -> Result<Kind, String> {
        Kind::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| {
            format!("unknown fault {s:?}; known: {}", Kind::ALL.map(Kind::name).join(", "))
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One injected fault: what, when, on whom, and whether it took.
#[derive(Debug, Clone)]
pub struct Injected {
    pub kind: Kind,
    pub start: Instant,
    pub end: Instant,
    pub target: String,
    /// None when it was injected; Some(why) when there was nothing to inject it on.
    pub skipped: Option<String>,
    /// Problems the fault revealed on the spot (e.g. a daemon that did not exit 0 on SIGTERM).
    pub problems: Vec<String>,
}

/// The kinds to inject, each `rounds` times, in a seeded order, at seeded times spread over
/// [10 %, 85 %] of the load window.
pub fn schedule(
    kinds: &[Kind],
    rounds: usize,
    window: Duration,
    rng: &mut Rng,
) -> Vec<(Duration, Kind)> {
    let mut list: Vec<Kind> = (0..rounds).flat_map(|_| kinds.iter().copied()).collect();
    for i in (1..list.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        list.swap(i, j);
    }
    let n = list.len().max(1) as f64;
    let from = window.as_secs_f64() * 0.10;
    let span = window.as_secs_f64() * 0.75;
    list.into_iter()
        .enumerate()
        .map(|(i, k)| {
            let jitter = rng.unit() * 0.8;
            (Duration::from_secs_f64(from + span * (i as f64 + jitter) / n), k)
        })
        .collect()
}

/// Runs a command, bounded; Err with its output when it fails.
pub async fn run(program: &str, args: &[&str], within: Duration) -> Result<String> {
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("run {program}"))?;
    let out = tokio::time::timeout(within, child.wait_with_output())
        .await
        .with_context(|| format!("{program} {} took longer than {within:?}", args.join(" ")))??;
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("{program} {} failed ({}): {}", args.join(" "), out.status, text.trim());
    }
    Ok(text)
}

pub fn pg_version() -> Result<String> {
    let mut versions: Vec<String> = std::fs::read_dir("/etc/postgresql")
        .context("read /etc/postgresql (is PostgreSQL installed from Debian's packages?)")?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    versions
        .sort_by_key(|v| v.split('.').map(|p| p.parse::<u32>().unwrap_or(0)).collect::<Vec<_>>());
    versions.pop().context("no cluster in /etc/postgresql")
}

pub fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))
        .is_ok()
}

async fn wait_port(port: u16, within: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < within {
        if port_open(port) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Brings RabbitMQ's app and PostgreSQL back. Called after every service fault, at the end,
/// and from `Drop` (on error or panic).
pub struct ServiceGuard {
    pub pg_version: String,
}

impl ServiceGuard {
    pub async fn restore(&self) -> Result<()> {
        let mut problems = Vec::new();
        if let Err(e) = run("rabbitmqctl", &["start_app"], Duration::from_secs(120)).await {
            problems.push(format!("{e:#}"));
        }
        if !port_open(5432)
            && let Err(e) = run(
                "pg_ctlcluster",
                &["--skip-systemctl-redirect", &self.pg_version, "main", "start"],
                Duration::from_secs(120),
            )
            .await
        {
            problems.push(format!("{e:#}"));
        }
        let _ = run("rabbitmqctl", &["await_startup"], Duration::from_secs(120)).await;
        if !wait_port(5672, Duration::from_secs(60)).await {
            problems.push("RabbitMQ does not listen on 5672".into());
        }
        if !wait_port(5432, Duration::from_secs(60)).await {
            problems.push("PostgreSQL does not listen on 5432".into());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            bail!("restoring services: {}", problems.join("; "))
        }
    }
}

impl Drop for ServiceGuard {
    fn drop(&mut self) {
        // Synchronous on purpose: this also runs while a panic unwinds, maybe inside the runtime.
        let _ = std::process::Command::new("rabbitmqctl")
            .arg("start_app")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !port_open(5432) {
            let _ = std::process::Command::new("pg_ctlcluster")
                .args(["--skip-systemctl-redirect", &self.pg_version, "main", "start"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// How soon a partitioned daemon must have stopped its workers (issue 16).
pub const PARTITION_BOUND: Duration = Duration::from_secs(15);

/// Live (not zombie) processes whose parent is `pid`: a daemon's workers.
pub fn children_of(pid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else { continue };
        let rest = stat.rsplit(')').next().unwrap_or("").trim_start().to_owned();
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or("Z");
        let ppid: u32 = fields.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if ppid == pid && state != "Z" {
            out.push(child);
        }
    }
    out
}

/// Pids of live test workers whose deployment has a running turn, then any live worker.
async fn worker_targets(cluster: &Cluster) -> (Vec<(i32, String)>, Vec<(i32, String)>) {
    let busy: Vec<(i32, String)> = sqlx::query_as(
        "SELECT DISTINCT d.worker_pid, d.deployment FROM turnd_deployments d
         JOIN turnd_turns t ON t.deployment = d.deployment AND t.state = 'running'
         WHERE d.worker_pid IS NOT NULL ORDER BY 2",
    )
    .fetch_all(&cluster.pool)
    .await
    .unwrap_or_default();
    let busy = busy.into_iter().filter(|(pid, _)| is_our_worker(cluster, *pid)).collect();
    let mut any = Vec::new();
    for entry in std::fs::read_dir(cluster.dir.join("pid")).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().trim_end_matches(".pid").to_owned();
        if let Some(pid) =
            std::fs::read_to_string(entry.path()).ok().and_then(|t| t.trim().parse::<i32>().ok())
            && is_our_worker(cluster, pid)
        {
            any.push((pid, name));
        }
    }
    any.sort();
    (busy, any)
}

/// A live (not zombie) process whose parent is one of our daemons.
fn is_our_worker(cluster: &Cluster, pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let rest = stat.rsplit(')').next().unwrap_or("").trim_start().to_owned();
    let mut fields = rest.split_whitespace();
    let state = fields.next().unwrap_or("Z");
    let ppid: u32 = fields.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    state != "Z" && cluster.daemons.iter().any(|d| d.pid == Some(ppid))
}

async fn terminate_backends(cluster: &Cluster, application_name: &str) -> Result<i64> {
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE application_name = $1 AND datname = $2) t",
    )
    .bind(application_name)
    .bind(&cluster.db_name)
    .fetch_one(&cluster.pool)
    .await?;
    Ok(n)
}

fn running_daemons(cluster: &mut Cluster) -> Vec<usize> {
    (0..cluster.daemons.len()).filter(|i| cluster.running(*i)).collect()
}

/// The worker of `deployment` once it has a running turn (bounded wait).
async fn running_worker(cluster: &Cluster, deployment: &str, within: Duration) -> Option<i32> {
    let until = Instant::now() + within;
    while Instant::now() < until {
        let pid: Option<Option<i32>> = sqlx::query_scalar(
            "SELECT d.worker_pid FROM turnd_deployments d
             WHERE d.deployment = $1 AND EXISTS (SELECT 1 FROM turnd_turns t
                   WHERE t.deployment = d.deployment AND t.state = 'running' AND t.epoch = d.epoch)",
        )
        .bind(deployment)
        .fetch_optional(&cluster.pool)
        .await
        .ok()
        .flatten();
        if let Some(Some(pid)) = pid
            && is_our_worker(cluster, pid)
        {
            return Some(pid);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Injects one fault. Daemons that it stops are started again before it returns. `victim`:
/// for the worker faults, the deployment of a turn the harness just sent to be interrupted.
pub async fn inject(
    kind: Kind,
    cluster: &mut Cluster,
    guard: &ServiceGuard,
    rng: &mut Rng,
    victim: Option<&str>,
) -> Injected {
    let start = Instant::now();
    let mut target = String::new();
    let mut skipped = None;
    let mut problems = Vec::new();
    let pick = |n: usize, rng: &mut Rng| (rng.next_u64() % n.max(1) as u64) as usize;
    match kind {
        Kind::WorkerKill | Kind::WorkerExit0 => {
            // The victim's worker mid-turn; else any worker with a running turn; else any.
            let mut chosen = None;
            if let Some(d) = victim
                && let Some(pid) = running_worker(cluster, d, Duration::from_secs(10)).await
            {
                chosen = Some((pid, d.to_owned()));
            }
            let until = Instant::now() + Duration::from_secs(2);
            while chosen.is_none() {
                let (busy, any) = worker_targets(cluster).await;
                if !busy.is_empty() {
                    chosen = Some(busy[pick(busy.len(), rng)].clone());
                } else if Instant::now() > until {
                    if !any.is_empty() {
                        chosen = Some(any[pick(any.len(), rng)].clone());
                    }
                    break;
                } else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            match chosen {
                Some((pid, deployment)) => {
                    let sig = if kind == Kind::WorkerKill { libc::SIGKILL } else { libc::SIGTERM };
                    // SAFETY: a signal to one process we checked is a child of our daemon.
                    unsafe { libc::kill(pid, sig) };
                    target = format!("{deployment} pid {pid}");
                }
                None => skipped = Some("no live worker".to_owned()),
            }
        }
        Kind::DaemonKill | Kind::DaemonTerm => {
            let live = running_daemons(cluster);
            if live.is_empty() {
                skipped = Some("no running daemon".into());
            } else {
                let i = live[pick(live.len(), rng)];
                target = cluster.daemons[i].id.clone();
                if kind == Kind::DaemonKill {
                    cluster.kill(i).await;
                    tokio::time::sleep(Duration::from_millis(1000 + rng.next_u64() % 2000)).await;
                } else {
                    let grace = cluster.config.shutdown.grace + cluster.config.worker.stop_timeout;
                    if let Err(e) = cluster.terminate(i, grace + Duration::from_secs(20)).await {
                        problems.push(format!("daemon {target} {e}"));
                    }
                }
                if let Err(e) = cluster.start(i).await {
                    problems.push(format!("daemon {target} did not come back: {e:#}"));
                }
            }
        }
        Kind::LockKill | Kind::PoolKill => {
            // A daemon whose session is reconnecting right now has no backend to terminate:
            // try the others, and again for a while.
            let until = Instant::now() + Duration::from_secs(10);
            let first = rng.next_u64();
            loop {
                let live = running_daemons(cluster);
                let mut done = false;
                for k in 0..live.len() {
                    let i = live[(first as usize + k) % live.len()];
                    let id = &cluster.daemons[i].id;
                    let app = if kind == Kind::LockKill {
                        format!("turnd-lock:{id}")
                    } else {
                        format!("turnd:{id}")
                    };
                    match terminate_backends(cluster, &app).await {
                        Ok(0) => skipped = Some(format!("no backend named {app}")),
                        Ok(n) => {
                            target = format!("{app} ({n} backend(s))");
                            skipped = None;
                            done = true;
                            break;
                        }
                        Err(e) => skipped = Some(format!("cannot terminate {app}: {e}")),
                    }
                }
                if live.is_empty() {
                    skipped = Some("no running daemon".into());
                }
                if done || Instant::now() > until {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Kind::AmqpClose => {
            match run(
                "rabbitmqctl",
                &["close_all_connections", "turnd-chaos"],
                Duration::from_secs(60),
            )
            .await
            {
                Ok(_) => target = "all connections".into(),
                Err(e) => skipped = Some(format!("{e:#}")),
            }
        }
        Kind::AmqpRestart => {
            match run("rabbitmqctl", &["stop_app"], Duration::from_secs(120)).await {
                Ok(_) => {
                    let hold = Duration::from_millis(2000 + rng.next_u64() % 4000);
                    target = format!("down {:.1} s", hold.as_secs_f64());
                    tokio::time::sleep(hold).await;
                    if let Err(e) = guard.restore().await {
                        problems.push(format!("{e:#}"));
                    }
                }
                Err(e) => skipped = Some(format!("{e:#}")),
            }
        }
        Kind::Roll => {
            let grace = cluster.config.shutdown.grace + cluster.config.worker.stop_timeout;
            let mut rolled = Vec::new();
            for i in 0..cluster.daemons.len() {
                if !cluster.running(i) {
                    continue;
                }
                let id = cluster.daemons[i].id.clone();
                if let Err(e) = cluster.terminate(i, grace + Duration::from_secs(20)).await {
                    problems.push(format!("daemon {id} {e}"));
                }
                if let Err(e) = cluster.start(i).await {
                    problems.push(format!("daemon {id} did not come back: {e:#}"));
                }
                rolled.push(id);
            }
            if rolled.is_empty() {
                skipped = Some("no running daemon".into());
            } else {
                target = rolled.join(", ");
            }
        }
        Kind::Partition => {
            // The daemon with the most live workers, so the stop is measured on something.
            let live = running_daemons(cluster);
            let busiest = live
                .iter()
                .copied()
                .max_by_key(|i| cluster.daemons[*i].pid.map_or(0, |p| children_of(p).len()));
            match busiest {
                None => skipped = Some("no running daemon".into()),
                Some(i) => {
                    let id = cluster.daemons[i].id.clone();
                    let pid = cluster.daemons[i].pid.unwrap_or(0);
                    let workers = children_of(pid).len();
                    let silenced = Instant::now();
                    cluster.daemons[i].pg.silence();
                    let mut stopped = None;
                    while silenced.elapsed() < PARTITION_BOUND + Duration::from_secs(10) {
                        if children_of(pid).is_empty() {
                            stopped = Some(silenced.elapsed());
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    match stopped {
                        Some(took) => {
                            target = format!(
                                "{id}: {workers} worker(s) stopped {:.1} s after its PostgreSQL link went silent",
                                took.as_secs_f64()
                            );
                            if took > PARTITION_BOUND {
                                problems.push(format!(
                                    "{id}'s workers stopped {:.1} s after the partition (bound {PARTITION_BOUND:?})",
                                    took.as_secs_f64()
                                ));
                            }
                        }
                        None => {
                            target = format!("{id}: {workers} worker(s)");
                            problems.push(format!(
                                "{id} still has workers {:.0} s into the partition",
                                silenced.elapsed().as_secs_f64()
                            ));
                        }
                    }
                    // Long enough for the server to drop the silent side (and free the
                    // locks), then heal; the daemon must serve again.
                    let hold = crate::proxy::SERVER_NOTICES + Duration::from_secs(1);
                    if let Some(rest) = hold.checked_sub(silenced.elapsed()) {
                        tokio::time::sleep(rest).await;
                    }
                    cluster.daemons[i].pg.heal();
                    let healed = Instant::now();
                    let mut ready = false;
                    while healed.elapsed() < Duration::from_secs(30) {
                        if cluster.readyz(i).await == Some(200) {
                            ready = true;
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    if !ready {
                        problems.push(format!("{id} not ready 30 s after the partition healed"));
                    }
                }
            }
        }
        Kind::NodeStop | Kind::LeaderStop | Kind::PgFailover => {
            (target, skipped, problems) = match kind {
                Kind::NodeStop => crate::ha::node_stop(cluster, rng).await,
                Kind::LeaderStop => crate::ha::leader_stop(cluster, rng).await,
                _ => crate::ha::pg_failover(cluster).await,
            };
        }
        Kind::PgRestart => {
            match run(
                "pg_ctlcluster",
                &["--skip-systemctl-redirect", &guard.pg_version, "main", "restart"],
                Duration::from_secs(120),
            )
            .await
            {
                Ok(_) => target = format!("PostgreSQL {}", guard.pg_version),
                Err(e) => skipped = Some(format!("{e:#}")),
            }
            if let Err(e) = guard.restore().await {
                problems.push(format!("{e:#}"));
            }
        }
    }
    Injected { kind, start, end: Instant::now(), target, skipped, problems }
}
