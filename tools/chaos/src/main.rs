//! `turnd-chaos`: proves CONTRACT §6 — every accepted turn gets exactly one terminal event,
//! nothing is lost, at most one worker per deployment — under the faults real clusters see.
//!
//! It runs N real `turnd run` daemons (the sibling `turnd` binary) against the local
//! PostgreSQL and RabbitMQ with a fresh database and AMQP prefix, publishes turns over many
//! conversations to `turnd-test-worker` with action `random` (seeded: reply, error, hang,
//! crash, exit 0), injects faults on a seeded schedule (worker SIGKILL, worker exit 0
//! mid-turn, daemon SIGKILL + restart, daemon SIGTERM under load + restart,
//! `pg_terminate_backend` of a daemon's lock session and of its pool, `rabbitmqctl
//! close_all_connections`, `rabbitmqctl stop_app`/`start_app`, a PostgreSQL restart), lets
//! everything settle and checks every turn sent. It prints a table: fault × turns affected ×
//! outcome codes × violations. Exit 0: no violation and every requested fault injected.
//!
//! It stops and restarts the machine's shared RabbitMQ and PostgreSQL: run it alone (CI runs
//! it after `cargo test`). A guard starts both again however the harness ends.
//!
//! ```sh
//! cargo build --workspace --bins
//! target/debug/turnd-chaos --seed 7 --turns 300 --conversations 30 --duration 2m
//! target/debug/turnd-chaos --faults worker-kill,pg-restart --rounds 3 --json
//! ```

mod check;
mod client;
mod cluster;
mod faults;
mod ha;
mod proxy;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use check::{DbState, Inputs, Violation};
use client::{Publisher, Shared};
use cluster::{Cluster, Settings};
use faults::{Injected, Kind, ServiceGuard};

#[derive(Parser)]
#[command(
    name = "turnd-chaos",
    version,
    about = "Chaos run: real turnd daemons, faults on a seeded schedule, exactly-once checked"
)]
struct Cli {
    /// Seed of everything random (turn actions, conversations, fault order, targets, timing).
    /// Default: from the clock (printed, so a run can be replayed).
    #[arg(long)]
    seed: Option<u64>,
    /// Turns to publish over the load window.
    #[arg(long, default_value_t = 300)]
    turns: usize,
    #[arg(long, default_value_t = 30)]
    conversations: usize,
    /// The load window: turns are spread over it and faults fall within it.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Faults to inject (comma-separated), each --rounds times. Default: all of them but
    /// node-stop, leader-stop and pg-failover, which need a RabbitMQ cluster and a PostgreSQL
    /// pair of their own (tools/chaos/src/ha.rs).
    #[arg(long, value_delimiter = ',', value_parser = Kind::parse)]
    faults: Vec<Kind>,
    /// How many times each fault is injected.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    #[arg(long, default_value_t = 3)]
    daemons: usize,
    /// Weights of the test worker's random action: reply,error,hang,crash,exit0.
    #[arg(long, default_value = "0.86,0.06,0.02,0.03,0.03", value_parser = weights)]
    weights: [f64; 5],
    /// turn.deadline of the daemons (a hung turn times out after it).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    turn_deadline: Duration,
    /// Longest wait, after the load, for every turn to be answered and the database to be
    /// clean.
    #[arg(long, default_value = "180s", value_parser = humantime::parse_duration)]
    settle_timeout: Duration,
    /// One JSON object with the table and every violation on stdout (the human report goes to
    /// stderr).
    #[arg(long)]
    json: bool,
    /// Keep the database, prefix and logs (kept anyway when a violation is found).
    #[arg(long)]
    keep: bool,
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    database_url: String,
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    /// The turnd binary (default: `turnd` next to this one).
    #[arg(long)]
    turnd: Option<PathBuf>,
    /// The worker (default: `turnd-test-worker` next to this one).
    #[arg(long)]
    worker: Option<PathBuf>,
    /// The daemons' log.level.
    #[arg(long, default_value = "turnd=info,warn")]
    log_level: String,
}

fn weights(s: &str) -> Result<[f64; 5], String> {
    let v: Vec<f64> = s
        .split(',')
        .map(|p| p.trim().parse::<f64>().map_err(|e| format!("{p:?}: {e}")))
        .collect::<Result<_, _>>()?;
    let a: [f64; 5] =
        v.try_into().map_err(|_| "five weights: reply,error,hang,crash,exit0".to_owned())?;
    if a.iter().any(|w| !w.is_finite() || *w < 0.0) || a.iter().sum::<f64>() <= 0.0 {
        return Err("weights must be ≥ 0 and not all 0".into());
    }
    Ok(a)
}

/// splitmix64: small, seedable, and the same generator the test worker uses.
pub struct Rng(u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0.wrapping_sub(0x9E37_79B9_7F4A_7C15))
    }
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn mix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const ACTIONS: [&str; 5] = ["reply", "error", "hang", "crash", "exit0"];

/// The test worker's `random` choice for this seed (`pick_random` in
/// tools/harness/src/bin/test_worker.rs).
fn worker_choice(seed: u64, w: &[f64; 5]) -> &'static str {
    let total: f64 = w.iter().sum();
    let unit = (mix(seed) >> 11) as f64 / (1u64 << 53) as f64;
    let mut target = unit * total;
    for (a, wt) in ACTIONS.iter().zip(w) {
        if *wt > 0.0 && target < *wt {
            return a;
        }
        target -= wt;
    }
    ACTIONS.iter().zip(w).rev().find(|(_, w)| **w > 0.0).map_or("reply", |(a, _)| a)
}

/// Instants as unix nanoseconds (the worker logs' clock).
pub struct Clock {
    base: Instant,
    base_ns: u128,
}

impl Clock {
    fn new() -> Clock {
        let base_ns =
            SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        Clock { base: Instant::now(), base_ns }
    }
    pub fn unix_ns(&self, at: Instant) -> u128 {
        match at.checked_duration_since(self.base) {
            Some(d) => self.base_ns + d.as_nanos(),
            None => self.base_ns.saturating_sub(self.base.duration_since(at).as_nanos()),
        }
    }
}

/// A turn the harness publishes.
#[derive(Debug, Clone)]
pub struct Sent {
    pub message_id: String,
    pub deployment: String,
    pub action: &'static str,
    pub body: Vec<u8>,
    pub routing_key: String,
    /// First publish attempt / broker confirm.
    pub published: Option<Instant>,
    pub confirmed: Option<Instant>,
}

fn make_turn(i: usize, conversation: usize, seed: u64, w: &[f64; 5], probe: bool) -> Result<Sent> {
    let c = conversation;
    let org = (!c.is_multiple_of(5)).then(|| format!("org{}", c % 3));
    let agent = format!("agent{}", c % 2);
    let message_id = if probe { format!("probe-{i}") } else { format!("chaos-{i}") };
    let payload = if probe {
        json!({"action": "reply", "text": "probe"})
    } else {
        let p: serde_json::Map<String, Value> =
            ACTIONS.iter().zip(w).map(|(a, w)| ((*a).to_owned(), json!(w))).collect();
        json!({"action": "random", "seed": seed, "p": p, "code": "CHAOS_ERROR", "error": "chaos error", "text": i})
    };
    let mut turn = json!({
        "messageId": message_id,
        "agentId": agent,
        "conversationId": if probe { format!("probe-{i}") } else { format!("conv-{c}") },
        "payload": payload,
    });
    if let Some(org) = &org {
        turn["organizationId"] = json!(org);
    }
    let body = serde_json::to_vec(&turn)?;
    let parsed = turnd::turn::parse(&body, 1 << 20)
        .map_err(|e| anyhow::anyhow!("harness turn invalid: {e}"))?;
    Ok(Sent {
        message_id,
        deployment: parsed.deployment.as_str().to_owned(),
        action: if probe { "reply" } else { worker_choice(seed, w) },
        body,
        routing_key: format!("turn.{}", org.as_deref().unwrap_or("_")),
        published: None,
        confirmed: None,
    })
}

/// A turn for a worker fault to interrupt: it sleeps 2 s (within turn.deadline) then replies.
fn make_victim(k: usize, conversation: usize) -> Result<Sent> {
    let mut t = make_turn(k, conversation, 0, &[1.0, 0.0, 0.0, 0.0, 0.0], false)?;
    let mut turn: Value = serde_json::from_slice(&t.body)?;
    t.message_id = format!("victim-{k}");
    turn["messageId"] = json!(t.message_id);
    turn["payload"] = json!({"action": "sleep", "ms": 2000, "text": "victim"});
    t.body = serde_json::to_vec(&turn)?;
    t.action = "sleep";
    Ok(t)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let guard = match faults::pg_version() {
        Ok(v) => ServiceGuard { pg_version: v },
        Err(e) => {
            eprintln!("turnd-chaos: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("turnd-chaos: cannot handle SIGTERM: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Interrupted (Ctrl-C, SIGTERM from a CI timeout): the run is dropped (its daemons killed)
    // and the services restored below.
    let outcome = tokio::select! {
        r = run(&cli, &guard) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        _ = term.recv() => Err(anyhow::anyhow!("terminated")),
    };
    // Services back whatever happened (Drop does it again on a panic).
    if let Err(e) = guard.restore().await {
        eprintln!("turnd-chaos: {e:#}");
    }
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("turnd-chaos: {e:#}");
            ExitCode::from(2)
        }
    }
}

macro_rules! say {
    ($cli:expr, $($arg:tt)*) => {
        if $cli.json { eprintln!($($arg)*) } else { println!($($arg)*) }
    };
}

async fn run(cli: &Cli, guard: &ServiceGuard) -> Result<bool> {
    let here = std::env::current_exe()?.parent().map(Path::to_path_buf).context("no directory")?;
    let turnd = cli.turnd.clone().unwrap_or_else(|| here.join("turnd"));
    let worker = cli.worker.clone().unwrap_or_else(|| here.join("turnd-test-worker"));
    for p in [&turnd, &worker] {
        ensure!(p.is_file(), "{} is missing (cargo build --workspace --bins)", p.display());
    }
    ensure!(
        cli.turns > 0 && cli.conversations > 0 && cli.daemons > 0,
        "--turns, --conversations and --daemons must be > 0"
    );
    let seed = cli.seed.unwrap_or_else(|| {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    let kinds: Vec<Kind> = if cli.faults.is_empty() {
        Kind::ALL.into_iter().filter(|k| !k.needs_own_services()).collect()
    } else {
        cli.faults.iter().copied().collect::<BTreeSet<_>>().into_iter().collect()
    };
    say!(
        cli,
        "turnd-chaos: seed {seed} (replay: --seed {seed}); {} turns over {} conversations in {:?}; {} daemons; faults {} × {}",
        cli.turns,
        cli.conversations,
        cli.duration,
        cli.daemons,
        kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join(","),
        cli.rounds
    );
    guard.restore().await.context("PostgreSQL and RabbitMQ must be up to begin")?;

    let clock = Clock::new();
    let mut rng = Rng(seed);
    let settings = Settings {
        admin_url: cli.database_url.clone(),
        amqp_url: cli.amqp_url.clone(),
        turnd: std::fs::canonicalize(&turnd)?,
        worker: std::fs::canonicalize(&worker)?,
        daemons: cli.daemons,
        turn_deadline: cli.turn_deadline,
        log_level: cli.log_level.clone(),
        extra_env: Vec::new(),
    };
    let mut cluster = Cluster::create(&settings).await?;
    say!(
        cli,
        "turnd-chaos: database {}, prefix {}, logs in {}",
        cluster.db_name,
        cluster.prefix,
        cluster.dir.display()
    );
    let result = drive(cli, guard, &mut cluster, &mut rng, &clock, &kinds, seed).await;
    let (ok, deployments) = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "turnd-chaos: the run failed; keeping {} (database {}, prefix {})",
                cluster.dir.display(),
                cluster.db_name,
                cluster.prefix
            );
            for i in 0..cluster.daemons.len() {
                cluster.kill(i).await;
            }
            return Err(e);
        }
    };
    if cli.keep || !ok {
        for i in 0..cluster.daemons.len() {
            cluster.kill(i).await;
        }
        say!(
            cli,
            "turnd-chaos: kept database {}, prefix {}, logs in {}",
            cluster.db_name,
            cluster.prefix,
            cluster.dir.display()
        );
    } else {
        cluster.cleanup(&deployments).await;
    }
    Ok(ok)
}

async fn db_state(cluster: &Cluster) -> Result<DbState> {
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM turnd_turns WHERE state <> 'done'")
        .fetch_one(&cluster.pool)
        .await?;
    let pending_samples: Vec<String> = sqlx::query_scalar(
        "SELECT message_id || ' ' || state || ' epoch ' || COALESCE(epoch::text, '-') FROM turnd_turns WHERE state <> 'done' ORDER BY seq LIMIT 10",
    )
    .fetch_all(&cluster.pool)
    .await?;
    let unpublished: i64 =
        sqlx::query_scalar("SELECT count(*) FROM turnd_outbox WHERE published_at IS NULL")
            .fetch_one(&cluster.pool)
            .await?;
    let done: Vec<(String, i64)> = sqlx::query_as(
        "SELECT message_id, (EXTRACT(EPOCH FROM done_at) * 1000000)::bigint FROM turnd_turns WHERE state = 'done' AND done_at IS NOT NULL",
    )
    .fetch_all(&cluster.pool)
    .await?;
    Ok(DbState { pending, pending_samples, unpublished, done_at_us: done.into_iter().collect() })
}

async fn drive(
    cli: &Cli,
    guard: &ServiceGuard,
    cluster: &mut Cluster,
    rng: &mut Rng,
    clock: &Clock,
    kinds: &[Kind],
    seed: u64,
) -> Result<(bool, Vec<String>)> {
    // Topology first (identical to the daemons'), so nothing published early is dropped.
    {
        let conn = client::connect(&cluster.amqp_url, "turnd-chaos")
            .await
            .context("connect to RabbitMQ")?;
        turnd::broker::declare_topology(&conn, &cluster.config)
            .await
            .context("declare topology")?;
        let _ = conn.close(200, "declared".into()).await;
    }
    let events: Shared = Arc::new(Mutex::new(client::Events::default()));
    let stop_collector = CancellationToken::new();
    let collector = tokio::spawn(client::collect(
        cluster.amqp_url.clone(),
        cluster.prefix.clone(),
        events.clone(),
        stop_collector.clone(),
    ));
    // Give the collector its queue before anything can be answered.
    let q = format!("{}.chaos-replies", cluster.prefix);
    for _ in 0..100 {
        if lapin_queue_exists(&cluster.amqp_url, &q).await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..cluster.daemons.len() {
        cluster.start(i).await?;
    }

    // The turns, all decided by the seed up front.
    let mut plan = Vec::with_capacity(cli.turns);
    for i in 0..cli.turns {
        let c = (rng.next_u64() % cli.conversations as u64) as usize;
        let s = rng.next_u64();
        plan.push(make_turn(i, c, s, &cli.weights, false)?);
    }
    let schedule = faults::schedule(kinds, cli.rounds, cli.duration, rng);
    let sent: Arc<Mutex<Vec<Sent>>> = Arc::new(Mutex::new(plan));
    let started = Instant::now();
    let stop_publishing = CancellationToken::new();
    let publisher = {
        let sent = sent.clone();
        let url = cluster.amqp_url.clone();
        let prefix = cluster.prefix.clone();
        let cancel = stop_publishing.clone();
        let n = cli.turns;
        let window = cli.duration;
        let mut jitter = Rng(rng.next_u64());
        tokio::spawn(async move {
            let mut p = Publisher::new(&url, &prefix);
            for i in 0..n {
                let at = started + window.mul_f64((i as f64 + jitter.unit()) / n as f64);
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep_until(at.into()) => {}
                }
                let (key, body) = {
                    let mut s = sent.lock().unwrap_or_else(|e| e.into_inner());
                    s[i].published = Some(Instant::now());
                    (s[i].routing_key.clone(), s[i].body.clone())
                };
                if !p.publish(&key, &body, &cancel).await {
                    break;
                }
                sent.lock().unwrap_or_else(|e| e.into_inner())[i].confirmed = Some(Instant::now());
            }
            let stats = (p.reconnects, p.republished);
            p.close().await;
            stats
        })
    };

    let mut injected: Vec<Injected> = Vec::new();
    let mut extra: Vec<Violation> = Vec::new();
    let mut victims: Vec<Sent> = Vec::new();
    let mut victim_publisher = Publisher::new(&cluster.amqp_url, &cluster.prefix);
    for (offset, kind) in &schedule {
        tokio::time::sleep_until((started + *offset).into()).await;
        // A worker fault interrupts a turn: send one that runs for a while, on a conversation
        // that may have more turns queued behind it.
        let mut victim = None;
        if matches!(kind, Kind::WorkerKill | Kind::WorkerExit0) {
            let c = (rng.next_u64() % cli.conversations as u64) as usize;
            let mut t = make_victim(victims.len(), c)?;
            t.published = Some(Instant::now());
            let never = CancellationToken::new();
            if tokio::time::timeout(
                Duration::from_secs(30),
                victim_publisher.publish(&t.routing_key, &t.body, &never),
            )
            .await
                == Ok(true)
            {
                t.confirmed = Some(Instant::now());
                victim = Some(t.deployment.clone());
                victims.push(t);
            }
        }
        let f = faults::inject(*kind, cluster, guard, rng, victim.as_deref()).await;
        let t = f.start.duration_since(started).as_secs_f64();
        match &f.skipped {
            None => say!(
                cli,
                "  {t:7.1}s  {:<13} {} ({:.1} s)",
                kind.name(),
                f.target,
                f.end.duration_since(f.start).as_secs_f64()
            ),
            Some(why) => say!(cli, "  {t:7.1}s  {:<13} SKIPPED: {why}", kind.name()),
        }
        for p in &f.problems {
            say!(cli, "            PROBLEM: {p}");
            extra.push(Violation {
                what: "fault handling",
                detail: format!("{}: {p}", kind.name()),
                message_id: None,
                at_ns: Some(clock.unix_ns(f.end)),
            });
        }
        injected.push(f);
    }
    victim_publisher.close().await;
    let (pub_reconnects, republished) = publisher.await.unwrap_or((0, 0));
    let load_end = Instant::now();
    guard.restore().await?;
    // A daemon that is not running now died on its own: that is a finding. Start it again so
    // the rest can settle.
    for i in 0..cluster.daemons.len() {
        if !cluster.running(i) {
            extra.push(Violation {
                what: "daemon died unprompted",
                detail: format!(
                    "{} was not running at the end of the load; see {}",
                    cluster.daemons[i].id,
                    cluster.daemons[i].log.display()
                ),
                message_id: None,
                at_ns: Some(clock.unix_ns(load_end)),
            });
            cluster.start(i).await?;
        }
    }

    // Settle: every turn answered, nothing pending, nothing unpublished.
    let mut ids: Vec<String> = sent
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|s| s.message_id.clone())
        .collect();
    ids.extend(victims.iter().map(|s| s.message_id.clone()));
    say!(
        cli,
        "turnd-chaos: load done after {:.0} s; settling (up to {:?})",
        started.elapsed().as_secs_f64(),
        cli.settle_timeout
    );
    let settle_start = Instant::now();
    loop {
        let answered = client::lock(&events).count_answered(&ids);
        let db = db_state(cluster).await.ok();
        let clean = db.as_ref().is_some_and(|d| d.pending == 0 && d.unpublished == 0);
        if answered == ids.len() && clean {
            break;
        }
        if settle_start.elapsed() > cli.settle_timeout {
            say!(
                cli,
                "turnd-chaos: settle timed out: {answered}/{} answered, db {:?}",
                ids.len(),
                db.map(|d| (d.pending, d.unpublished))
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Listen a little longer for duplicates.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Still serving: /readyz on each, and probe turns on fresh conversations.
    for i in 0..cluster.daemons.len() {
        let alive = cluster.running(i);
        let mut status = None;
        for _ in 0..40 {
            status = cluster.readyz(i).await;
            if status == Some(200) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        if !alive || status != Some(200) {
            extra.push(Violation {
                what: "daemon not serving",
                detail: format!("{}: alive {alive}, /readyz {status:?}", cluster.daemons[i].id),
                message_id: None,
                at_ns: None,
            });
        }
    }
    let probes_n = cluster.daemons.len() * 3;
    let mut probes = Vec::new();
    {
        let cancel = CancellationToken::new();
        let mut p = Publisher::new(&cluster.amqp_url, &cluster.prefix);
        for k in 0..probes_n {
            let mut t = make_turn(k, 0, 0, &cli.weights, true)?;
            t.published = Some(Instant::now());
            let _ = tokio::time::timeout(
                Duration::from_secs(30),
                p.publish(&t.routing_key, &t.body, &cancel),
            )
            .await;
            t.confirmed = Some(Instant::now());
            probes.push(t);
        }
        p.close().await;
    }
    let probe_ids: Vec<String> = probes.iter().map(|p| p.message_id.clone()).collect();
    let until = Instant::now() + Duration::from_secs(60);
    while client::lock(&events).count_answered(&probe_ids) < probe_ids.len()
        && Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Which daemons answered probes (the daemon that owns a probe's deployment answers it).
    let owners: Vec<String> = sqlx::query_scalar("SELECT DISTINCT owner FROM turnd_deployments WHERE deployment = ANY($1) AND owner IS NOT NULL")
        .bind(probes.iter().map(|p| p.deployment.clone()).collect::<Vec<_>>())
        .fetch_all(&cluster.pool)
        .await
        .unwrap_or_default();

    // A clean stop of every daemon: SIGTERM → exit 0.
    let grace = cluster.config.shutdown.grace
        + cluster.config.worker.stop_timeout
        + Duration::from_secs(20);
    for i in 0..cluster.daemons.len() {
        if let Err(e) = cluster.terminate(i, grace).await {
            extra.push(Violation {
                what: "unclean stop",
                detail: format!("{}: {e}", cluster.daemons[i].id),
                message_id: None,
                at_ns: None,
            });
        }
        let log = cluster.daemon_log(i);
        for line in log.lines().filter(|l| l.contains("panicked at")).take(3) {
            extra.push(Violation {
                what: "daemon panicked",
                detail: format!("{}: {line}", cluster.daemons[i].id),
                message_id: None,
                at_ns: None,
            });
        }
    }
    stop_collector.cancel();
    let _ = collector.await;

    let mut all_sent = sent.lock().unwrap_or_else(|e| e.into_inner()).clone();
    all_sent.extend(victims);
    all_sent.extend(probes);
    let events = std::mem::take(&mut *client::lock(&events));
    let logs = check::read_worker_logs(&cluster.dir);
    let db = db_state(cluster).await.context("read the database at the end")?;
    let inputs = Inputs {
        sent: &all_sent,
        events: &events,
        logs: &logs,
        db: &db,
        faults: &injected,
        extra,
        clock,
        end: Instant::now(),
    };
    let mut found = check::violations(&inputs);
    let slack = Duration::from_secs(2);
    let (roll_found, roll_lines) = check::roll(&inputs, slack);
    found.extend(roll_found);
    let table = check::table(&inputs, kinds, &found, slack);

    let reruns = logs.runs.values().filter(|r| r.len() > 1).count();
    let never_injected: Vec<&str> = kinds
        .iter()
        .filter(|k| !injected.iter().any(|f| f.kind == **k && f.skipped.is_none()))
        .map(|k| k.name())
        .collect();
    say!(cli, "");
    say!(
        cli,
        "turnd-chaos result — seed {seed}, {} turns (+{} probes), {} conversations, {} daemons, {:.0} s",
        cli.turns,
        probes_n,
        cli.conversations,
        cluster.daemons.len(),
        started.elapsed().as_secs_f64()
    );
    say!(cli, "{}", table.render());
    for line in &roll_lines {
        say!(cli, "{line}");
    }
    say!(
        cli,
        "worker processes: {} started, {} logged exits; turns given to a worker: {}; turns given to two workers (first one died first): {reruns}",
        logs.starts,
        logs.exits,
        logs.runs.len()
    );
    say!(
        cli,
        "client: {} event redeliveries de-duplicated, collector reconnects {}, publisher reconnects {pub_reconnects}, re-publishes {republished}; probes answered by {} daemon(s)",
        events.ledger.redelivered,
        events.reconnects,
        owners.len()
    );
    for k in kinds {
        say!(cli, "  {:<13} {}", k.name(), k.describe());
    }
    if !never_injected.is_empty() {
        say!(cli, "NOT INJECTED (no target): {}", never_injected.join(", "));
    }
    if found.is_empty() {
        say!(
            cli,
            "exactly-once held: every turn one terminal event, none lost, no two live workers, no re-run, nothing pending or unpublished, every daemon serving"
        );
    } else {
        say!(cli, "{} VIOLATION(S):", found.len());
        let mut by_what: HashMap<&str, usize> = HashMap::new();
        for v in &found {
            *by_what.entry(v.what).or_default() += 1;
        }
        for (what, n) in &by_what {
            say!(cli, "  {what}: {n}");
        }
        for v in found.iter().take(40) {
            say!(cli, "  - {}: {}", v.what, v.detail);
        }
    }
    if cli.json {
        println!(
            "{}",
            json!({
                "seed": seed,
                "turns": cli.turns,
                "probes": probes_n,
                "conversations": cli.conversations,
                "daemons": cluster.daemons.len(),
                "duration_s": started.elapsed().as_secs_f64(),
                "table": table.json(),
                "faults": injected.iter().map(|f| json!({
                    "fault": f.kind.name(),
                    "at_s": f.start.duration_since(started).as_secs_f64(),
                    "took_s": f.end.duration_since(f.start).as_secs_f64(),
                    "target": f.target,
                    "skipped": f.skipped,
                })).collect::<Vec<_>>(),
                "not_injected": never_injected,
                "violations": found.iter().map(|v| json!({"what": v.what, "detail": v.detail, "messageId": v.message_id})).collect::<Vec<_>>(),
                "worker_starts": logs.starts,
                "event_redeliveries": events.ledger.redelivered,
                "database": cluster.db_name,
                "prefix": cluster.prefix,
            })
        );
    }
    let deployments: Vec<String> = all_sent
        .iter()
        .map(|s| s.deployment.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    Ok((found.is_empty() && never_injected.is_empty(), deployments))
}

async fn lapin_queue_exists(url: &str, queue: &str) -> bool {
    let Ok(conn) = client::connect(url, "turnd-chaos").await else {
        return false;
    };
    let ok = match conn.create_channel().await {
        Ok(ch) => ch
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions { passive: true, ..Default::default() },
                Default::default(),
            )
            .await
            .is_ok(),
        Err(_) => false,
    };
    let _ = conn.close(200, "checked".into()).await;
    ok
}
