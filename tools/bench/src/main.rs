//! `turnd-bench`: how much exactly-once costs. Starts a real `turnd run` per mode on a fresh
//! PostgreSQL database and AMQP prefix (local services; both dropped after), drives it with the
//! fast bundled `turnd-test-worker`, and measures:
//!
//! - `throughput`: C conversations × N turns published at once (confirmed, 256 in flight):
//!   turns/s from the first publish to the last terminal event, and latency per turn;
//! - `latency`: one conversation, one turn in flight; split at the moment the worker read the
//!   turn (the test worker's event log);
//! - `cold`: a new conversation per turn (lock + spawn + reply), split at the worker's start;
//! - `crash`: a hanging turn's worker is SIGKILLed; kill → WORKER_DIED event;
//! - `pods`: `throughput` on one daemon, then on three (one database and prefix: one active
//!   intake, workers spread over all of them); the second must not be below the first;
//! - `scale`: N live deployments on one daemon (ascending levels on one daemon): bring-up
//!   time, daemon RSS per deployment, lock-session and database connections, AMQP connections
//!   and channels, thread queues, and latency and new-conversation cost at each level, measured
//!   in rounds with floor-bench's latency between them (`--rounds`).
//!
//! With `--floor <floor-bench>` it runs floor-bench's matching mode right before each turnd
//! mode and prints each ratio against the targets of issue 21 (past the floor; issue 7's were
//! looser); `--repeat K` alternates K pairs and reports medians (steadier on a shared machine). After every mode it checks that every
//! turn got exactly one terminal event (de-duplicated on the AMQP message_id) with the outcome
//! asked for, and that the database owes nothing; a violation makes the exit code 1. Figures
//! taken while other processes used more than 10% of the machine are flagged DISTURBED.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! ./target/release/turnd-bench all --floor /tmp/floor-bench/target/release/floor-bench
//! ./target/release/turnd-bench throughput --conversations 50 --turns 40
//! ./target/release/turnd-bench pods --daemons 3 --floor /tmp/floor-bench/target/release/floor-bench
//! ./target/release/turnd-bench --json latency
//! ./target/release/turnd-bench --statements throughput --floor /tmp/floor-bench/target/release/floor-bench
//! ./target/release/turnd-bench scale --deployments 50,5000
//! ./target/release/turnd-bench cleanup      # after a run that was killed with SIGKILL
//! ```
//!
//! 5,000 live deployments need PostgreSQL's lock table to hold 5,000 advisory locks
//! (max_locks_per_transaction; `scale --alter-system` raises it, effective after a restart)
//! and 3 file descriptors per worker in the daemon (RLIMIT_NOFILE, inherited from the
//! harness); `scale` says so before it runs into either.
//!
//! `--statements` adds PostgreSQL's cost per turn by statement (calls, execution time and WAL
//! per turn, from pg_stat_statements) for each mode but scale, turnd's and floor-bench's side
//! by side; the extension must be loaded (`scripts/pg-statements.sh`).

mod client;
mod cluster;
mod cpu;
mod floor;
mod modes;
mod report;
mod statements;
mod stats;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};

use cluster::Settings;
use modes::{Measured, ScaleArgs};
use report::{Floor, Row};

#[derive(Parser)]
#[command(
    name = "turnd-bench",
    version,
    about = "Benchmark turnd against local PostgreSQL and RabbitMQ (optionally beside floor-bench)"
)]
struct Cli {
    /// One JSON object per mode on stdout (one per line); the human output goes to stderr.
    #[arg(long, global = true)]
    json: bool,
    /// A built floor-bench binary: run its matching modes in the same run and print ratios.
    #[arg(long, global = true, value_name = "PATH")]
    floor: Option<PathBuf>,
    /// The turnd binary (default: `turnd` next to this binary).
    #[arg(long, global = true, value_name = "PATH")]
    turnd: Option<PathBuf>,
    /// The worker (default: `turnd-test-worker` next to this binary).
    #[arg(long, global = true, value_name = "PATH")]
    worker: Option<PathBuf>,
    /// PostgreSQL as a user that may create databases; one `turnd_bench_<random>` per mode is
    /// created there and dropped after.
    #[arg(long, global = true, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    database_url: String,
    #[arg(long, global = true, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    /// The daemons' log.level (turnd::daemon's info lines must pass: "turnd ready").
    #[arg(long, global = true, default_value = "warn,turnd::daemon=info")]
    log_level: String,
    /// A mode fails when no expected terminal event arrives for this long (seconds).
    #[arg(long, global = true, default_value_t = 120)]
    timeout_s: u64,
    /// After a mode's last expected event, listen this long for duplicates (ms).
    #[arg(long, global = true, default_value_t = 1000)]
    settle_ms: u64,
    /// Keep each mode's database, prefix and daemon log (and print where they are).
    #[arg(long, global = true)]
    keep: bool,
    /// Record `perf record -g` of the daemon during each measurement window into DIR.
    #[arg(long, global = true, value_name = "DIR")]
    perf: Option<PathBuf>,
    /// Extra daemon setting, e.g. --daemon-env TURND_DATABASE__MAX_CONNECTIONS=20 (repeatable).
    #[arg(long = "daemon-env", global = true, value_name = "KEY=VALUE", value_parser = key_value)]
    daemon_env: Vec<(String, String)>,
    /// Run each mode (and its floor-bench counterpart) this many times, alternating, and
    /// report the median of each figure (scale: of its ratios; its per-level rows are from its
    /// first run): steadier ratios on a shared machine.
    #[arg(long, global = true, default_value_t = 1)]
    repeat: usize,
    /// PostgreSQL's cost per turn by statement, from pg_stat_statements: reset right before
    /// each measured window (turnd's, after its warm-up; floor-bench's whole run), read after
    /// it, one table per mode (with --repeat, of the first run). Needs the extension loaded:
    /// scripts/pg-statements.sh.
    #[arg(long, global = true)]
    statements: bool,
    /// Throughput and pods: before the measured window, give the database N answered turns'
    /// tombstones and ANALYZE it — a database in service, whose statistics say next to
    /// nothing is pending when the burst arrives (a fresh one has no statistics at all).
    #[arg(long, global = true, default_value_t = 0, value_name = "N")]
    tombstones: u64,
    /// Exit 2 when a target FAILs (exactly-once violations and errors always exit 1).
    #[arg(long, global = true)]
    fail_on_target: bool,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// C conversations × N turns published at once (default: 50×40, then 200×10).
    Throughput(ThroughputArgs),
    /// One conversation, one turn in flight: round-trip percentiles.
    Latency(LatencyArgs),
    /// A new conversation per turn, one at a time: lock + spawn + reply.
    Cold(ColdArgs),
    /// A hanging turn's worker is SIGKILLed: time until its WORKER_DIED event arrives.
    Crash(CrashArgs),
    /// N live deployments on one daemon: memory, connections, channels, latency.
    Scale(ScaleCli),
    /// Throughput on one daemon, then on several on one database and prefix (pods: one
    /// active intake, workers spread): the second must not be below the first.
    Pods(PodsArgs),
    /// Every mode in sequence (floor-bench interleaved with --floor), then the table.
    All(AllArgs),
    /// Remove what killed runs left behind: databases turnd_bench_* and the broker's bench-*
    /// queues and exchanges (found with rabbitmqctl). Not while another turnd-bench runs.
    Cleanup,
}

#[derive(Args)]
struct ThroughputArgs {
    #[arg(long)]
    conversations: Option<usize>,
    /// Turns per conversation.
    #[arg(long)]
    turns: Option<u32>,
}

#[derive(Args)]
struct PodsArgs {
    #[arg(long, default_value_t = 50)]
    conversations: usize,
    /// Turns per conversation.
    #[arg(long, default_value_t = 40)]
    turns: u32,
    /// Daemons in the second run.
    #[arg(long, default_value_t = 3)]
    daemons: usize,
}

#[derive(Args, Clone, Copy)]
struct LatencyArgs {
    #[arg(long, default_value_t = 500)]
    turns: u32,
    /// Turns sent first and not measured.
    #[arg(long, default_value_t = 50)]
    warmup: u32,
}

#[derive(Args, Clone, Copy)]
struct ColdArgs {
    #[arg(long, default_value_t = 100)]
    count: usize,
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Also run cold with this worker sandbox, right after the plain run (one table, both
    /// figures): what the sandbox adds to a new conversation.
    #[arg(long, value_enum)]
    sandbox: Option<BenchSandbox>,
}

/// A worker sandbox the cold mode can measure.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BenchSandbox {
    /// `worker.sandbox = "landlock"`.
    Landlock,
}

#[derive(Args, Clone, Copy)]
struct CrashArgs {
    #[arg(long, default_value_t = 100)]
    trials: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
}

#[derive(Args, Clone)]
struct ScaleCli {
    /// Live deployment counts, brought up in ascending order on one daemon.
    #[arg(long, value_delimiter = ',', default_value = "50,5000")]
    deployments: Vec<usize>,
    /// Latency turns measured at each level.
    #[arg(long, default_value_t = 500)]
    latency_turns: u32,
    #[arg(long, default_value_t = 30)]
    latency_warmup: u32,
    /// When PostgreSQL's lock table is too small, run ALTER SYSTEM SET
    /// max_locks_per_transaction (takes effect after a restart, which you do).
    #[arg(long)]
    alter_system: bool,
    /// New conversations in flight while bringing deployments up (0: all at once).
    #[arg(long, default_value_t = 256)]
    bring_up_window: usize,
    /// New conversations started one at a time at each level (spawn cost at that size).
    #[arg(long, default_value_t = 100)]
    cold_probes: usize,
    /// Rounds the latency turns and new conversations are split into at each level; with
    /// --floor each round is followed by floor-bench's latency, whose ratio between levels is
    /// printed beside turnd's (the verdict stays on turnd's own ratio).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

#[derive(Args)]
struct AllArgs {
    /// Throughput shapes, CxN each.
    #[arg(long, value_delimiter = ',', default_value = "50x40,200x10", value_parser = shape)]
    throughput: Vec<(usize, u32)>,
    #[arg(long, default_value_t = 500)]
    latency_turns: u32,
    #[arg(long, default_value_t = 50)]
    latency_warmup: u32,
    #[arg(long, default_value_t = 100)]
    cold_count: usize,
    /// Also run cold with this worker sandbox, right after the plain cold run.
    #[arg(long, value_enum)]
    cold_sandbox: Option<BenchSandbox>,
    #[arg(long, default_value_t = 100)]
    crash_trials: usize,
    #[arg(long, value_delimiter = ',', default_value = "50,5000")]
    scale_deployments: Vec<usize>,
    #[arg(long, default_value_t = 500)]
    scale_latency_turns: u32,
    /// New conversations in flight while bringing deployments up (0: all at once).
    #[arg(long, default_value_t = 256)]
    scale_bring_up_window: usize,
    #[arg(long)]
    alter_system: bool,
    /// Modes to leave out (throughput, latency, cold, crash, scale).
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    if !k.starts_with("TURND_") {
        return Err(format!("{k} is not a TURND_* variable"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

fn shape(s: &str) -> Result<(usize, u32), String> {
    let (c, n) =
        s.split_once(['x', '×']).ok_or_else(|| format!("{s:?} is not CxN (e.g. 50x40)"))?;
    let c = c.trim().parse().map_err(|e| format!("{s:?}: {e}"))?;
    let n = n.trim().parse().map_err(|e| format!("{s:?}: {e}"))?;
    Ok((c, n))
}

/// One mode to run.
enum Step {
    Throughput(usize, u32),
    /// Throughput with this many daemons.
    Pods(usize, u32, usize),
    Latency(LatencyArgs),
    Cold(ColdArgs),
    Crash(CrashArgs),
    Scale(ScaleCli),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = tokio::select! {
        r = run(&cli) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted; cleaning up")),
    };
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("turnd-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: &Cli) -> Result<ExitCode> {
    let here = std::env::current_exe()
        .context("locate this binary")?
        .parent()
        .map(Path::to_path_buf)
        .context("this binary has no directory")?;
    let turnd = cli.turnd.clone().unwrap_or_else(|| here.join("turnd"));
    let worker = cli.worker.clone().unwrap_or_else(|| here.join("turnd-test-worker"));
    for (what, path, flag) in
        [("turnd", &turnd, "--turnd"), ("the test worker", &worker, "--worker")]
    {
        ensure!(
            path.is_file(),
            "{what} is not at {} (build with `cargo build --release --workspace --bins`, or pass {flag})",
            path.display()
        );
    }
    if let Some(floor) = &cli.floor {
        ensure!(
            floor.is_file(),
            "floor-bench is not at {} (cp -r ../shared/floor-bench /tmp/floor-bench && cd \
             /tmp/floor-bench && cargo build --release)",
            floor.display()
        );
    }
    if let Some(dir) = &cli.perf {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let s = Settings {
        admin_url: cli.database_url.clone(),
        amqp_url: cli.amqp_url.clone(),
        turnd: std::fs::canonicalize(&turnd).unwrap_or(turnd),
        worker: std::fs::canonicalize(&worker).unwrap_or(worker),
        log_level: cli.log_level.clone(),
        keep: cli.keep,
        timeout: Duration::from_secs(cli.timeout_s),
        settle: Duration::from_millis(cli.settle_ms),
        perf: cli.perf.clone(),
        daemon_env: cli.daemon_env.clone(),
        floor: cli.floor.clone(),
        statements: cli.statements,
        tombstones: cli.tombstones,
    };
    if let Mode::Cleanup = cli.mode {
        return cleanup(&s).await.map(|()| ExitCode::SUCCESS);
    }
    let machine = preflight(&s).await?;
    if cli.statements {
        statements::check(&s.admin_url).await?;
    }

    let steps: Vec<Step> = match &cli.mode {
        Mode::Throughput(a) => match (a.conversations, a.turns) {
            (None, None) => vec![Step::Throughput(50, 40), Step::Throughput(200, 10)],
            (c, n) => vec![Step::Throughput(c.unwrap_or(50), n.unwrap_or(40))],
        },
        Mode::Pods(a) => vec![
            Step::Throughput(a.conversations, a.turns),
            Step::Pods(a.conversations, a.turns, a.daemons),
        ],
        Mode::Latency(a) => vec![Step::Latency(*a)],
        Mode::Cold(a) => cold_steps(*a),
        Mode::Crash(a) => vec![Step::Crash(*a)],
        Mode::Scale(a) => vec![Step::Scale(a.clone())],
        Mode::Cleanup => Vec::new(),
        Mode::All(a) => {
            let on = |m: &str| !a.skip.iter().any(|x| x == m);
            let mut steps = Vec::new();
            if on("throughput") {
                steps.extend(a.throughput.iter().map(|&(c, n)| Step::Throughput(c, n)));
            }
            if on("latency") {
                steps.push(Step::Latency(LatencyArgs {
                    turns: a.latency_turns,
                    warmup: a.latency_warmup,
                }));
            }
            if on("cold") {
                steps.extend(cold_steps(ColdArgs {
                    count: a.cold_count,
                    warmup: 5,
                    sandbox: a.cold_sandbox,
                }));
            }
            if on("crash") {
                steps.push(Step::Crash(CrashArgs { trials: a.crash_trials, warmup: 3 }));
            }
            if on("scale") {
                steps.push(Step::Scale(ScaleCli {
                    deployments: a.scale_deployments.clone(),
                    latency_turns: a.scale_latency_turns,
                    latency_warmup: 30,
                    alter_system: a.alter_system,
                    bring_up_window: a.scale_bring_up_window,
                    cold_probes: 100,
                    rounds: 5,
                }));
            }
            steps
        }
    };
    let say = |line: &str| {
        if cli.json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    };
    say(&format!(
        "turnd-bench: {} cores, PostgreSQL {}, RabbitMQ {}; turnd {}",
        machine["nproc"],
        machine["postgres"].as_str().unwrap_or("?"),
        machine["rabbitmq"].as_str().unwrap_or("?"),
        s.turnd.display()
    ));

    let mut rows: Vec<Row> = Vec::new();
    let mut violated = false;
    let mut unexpected = false;
    let mut errors = 0;
    // floor-bench's latency result, reused for `cold` when `latency` ran in this run.
    let mut floor_latency: Option<Result<Value, String>> = None;
    let repeat = cli.repeat.max(1);
    // (daemons, turns/s) of each throughput step, for the pods comparison.
    let mut rates: Vec<(u64, f64)> = Vec::new();
    for step in steps {
        let label = step.label();
        // Each turnd run right after its floor run; scale runs floor-bench inside its levels.
        let mut measured: Vec<Measured> = Vec::new();
        let mut floor_main: Vec<Result<Value, String>> = Vec::new();
        let mut floor_spawn: Vec<Result<Value, String>> = Vec::new();
        let mut failure: Option<String> = None;
        // floor-bench's statements (--statements), of its first run.
        let mut floor_statements: Option<Result<statements::Table, String>> = None;
        for r in 0..repeat {
            let tag = if repeat > 1 { format!(" [run {}/{repeat}]", r + 1) } else { String::new() };
            // --statements counts the first run of each mode only.
            let counted = cli.statements && r == 0;
            match &step {
                Step::Throughput(c, n) | Step::Pods(c, n, _) => {
                    let (c, n) = (c.to_string(), n.to_string());
                    let args = ["throughput", "--conversations", &c, "--turns", &n];
                    let (f, st) = floor_run_counted(cli, &s, &args, counted).await;
                    floor_main.extend(f);
                    floor_statements = floor_statements.or(st);
                }
                Step::Latency(a) => {
                    let (t, w) = (a.turns.to_string(), a.warmup.to_string());
                    let args = ["latency", "--turns", &t, "--warmup", &w];
                    let (f, st) = floor_run_counted(cli, &s, &args, counted).await;
                    floor_main.extend(f);
                    floor_statements = floor_statements.or(st);
                }
                Step::Cold(_) => floor_spawn.extend(floor_run(cli, &["spawn"]).await),
                Step::Crash(_) | Step::Scale(_) => {}
            }
            eprintln!("turnd-bench: running {label}{tag} …");
            let settings = Settings { statements: counted, ..s.clone() };
            match run_step(&settings, &step).await {
                Ok(m) => {
                    say(&format!("{}{tag}: {}", m.label, m.line));
                    for n in &m.notes {
                        say(&format!("  {n}"));
                    }
                    if m.check.violated() {
                        say(&format!("  EXACTLY-ONCE VIOLATED: {}", m.check.human()));
                    }
                    if m.check.unexpected() {
                        say(&format!("  UNEXPECTED OUTCOMES: {}", m.check.outcomes_human()));
                    }
                    if m.check.violated() || m.check.unexpected() {
                        for e in &m.check.examples {
                            say(&format!("    {e}"));
                        }
                    }
                    measured.push(m);
                }
                Err(e) => {
                    let text = format!("{e:#}");
                    say(&format!("{label}{tag}: FAILED: {text}"));
                    failure = Some(text);
                    break;
                }
            }
        }
        if let Some(text) = failure {
            errors += 1;
            rows.push(report::failed(&label, &text));
            if cli.json {
                println!("{}", json!({ "mode": label, "error": text, "machine": machine }));
            }
            continue;
        }
        let floor = match &step {
            Step::Latency(_) => {
                let f = combine_floor(floor_main);
                floor_latency.clone_from(&f);
                Floor { main: f, spawn: None }
            }
            Step::Cold(_) => {
                let main = match &floor_latency {
                    Some(f) => Some(f.clone()),
                    None => floor_run(cli, &["latency"]).await,
                };
                Floor { main, spawn: combine_floor(floor_spawn) }
            }
            _ => Floor { main: combine_floor(floor_main), spawn: None },
        };
        let m = combine(measured);
        let statements_json = if cli.statements {
            let which = if repeat > 1 { format!(", run 1 of {repeat}") } else { String::new() };
            print_statements(&say, &format!("{label}{which}"), &m, &floor_statements);
            Some(json!({
                "run": if repeat > 1 { format!("the first of {repeat}") } else { "the only one".into() },
                "turnd": m.statements.as_ref().map(statements::Table::json),
                "floor": floor_statements.as_ref().map(|r| match r {
                    Ok(t) => t.json(),
                    Err(e) => json!({ "error": e }),
                }),
            }))
        } else {
            None
        };
        if let Some(rate) = m.json.get("turns_per_s").and_then(Value::as_f64) {
            let daemons = m.json.get("daemons").and_then(Value::as_u64).unwrap_or(1);
            rates.push((daemons, rate));
        }
        violated |= m.check.violated();
        unexpected |= m.check.unexpected();
        let (mut mode_rows, targets) = report::rows(&m, &floor);
        if cli.json {
            let mut j = m.json.clone();
            let or_error = |f: &Option<Result<Value, String>>| {
                f.as_ref().map(|r| r.clone().unwrap_or_else(|e| json!({ "error": e })))
            };
            j["floor"] = json!({ "main": or_error(&floor.main), "spawn": or_error(&floor.spawn) });
            j["targets"] = Value::Array(targets);
            j["machine"] = machine.clone();
            if let Some(st) = statements_json {
                j["statements"] = st;
            }
            println!("{j}");
        }
        rows.append(&mut mode_rows);
    }

    say("");
    say(&format!(
        "turnd-bench summary — {} cores, PostgreSQL {}, RabbitMQ {}{}",
        machine["nproc"],
        machine["postgres"].as_str().unwrap_or("?"),
        machine["rabbitmq"].as_str().unwrap_or("?"),
        if cli.floor.is_some() {
            "; floor-bench ran in the same run, just before each mode"
        } else {
            ""
        }
    ));
    say(&report::table(&rows));
    if let (Some(one), Some(many)) = (
        rates.iter().find(|(d, _)| *d == 1).map(|(_, r)| *r),
        rates.iter().find(|(d, _)| *d > 1).copied(),
    ) {
        let ratio = many.1 / one.max(1e-9);
        say(&format!(
            "pods: {} daemons {:.0} turns/s vs 1 daemon {one:.0} turns/s: ×{ratio:.2} ({})",
            many.0,
            many.1,
            if ratio >= 1.0 { "PASS: not below one daemon" } else { "FAIL: below one daemon" }
        ));
    }
    let failed_targets = rows.iter().filter(|r| r.verdict == Some(false)).count();
    say(&format!(
        "{} PASS, {} FAIL; exactly-once {}; outcomes {}; {} mode(s) failed to run",
        rows.iter().filter(|r| r.verdict == Some(true)).count(),
        failed_targets,
        if violated { "VIOLATED" } else { "held in every mode" },
        if unexpected { "NOT as asked in some mode" } else { "as asked" },
        errors
    ));
    if violated || unexpected || errors > 0 {
        return Ok(ExitCode::FAILURE);
    }
    if cli.fail_on_target && failed_targets > 0 {
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

/// floor-bench's mode, when --floor is given; its failure is reported, not fatal.
async fn floor_run(cli: &Cli, args: &[&str]) -> Option<Result<Value, String>> {
    let floor = cli.floor.as_ref()?;
    eprintln!("turnd-bench: floor-bench {} …", args.join(" "));
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    Some(floor::run(floor, &cli.amqp_url, &args).await.map_err(|e| format!("{e:#}")))
}

/// [`floor_run`], and with `counted` (`--statements`) floor-bench's statements over its whole
/// run (its table reset and check are recognised and left out).
async fn floor_run_counted(
    cli: &Cli,
    s: &Settings,
    args: &[&str],
    counted: bool,
) -> (Option<Result<Value, String>>, Option<Result<statements::Table, String>>) {
    if !counted || cli.floor.is_none() {
        return (floor_run(cli, args).await, None);
    }
    if let Err(e) = statements::reset(&s.admin_url).await {
        return (floor_run(cli, args).await, Some(Err(format!("{e:#}"))));
    }
    let result = floor_run(cli, args).await;
    let table = match &result {
        Some(Ok(v)) => {
            // Every turn of its run reached the database, the warm-up's too.
            let turns = ["turns", "warmup"]
                .iter()
                .filter_map(|k| v.get(*k).and_then(Value::as_u64))
                .sum::<u64>();
            statements::read(&s.admin_url, floor::DATABASE, turns as usize, "floor-bench")
                .await
                .map_err(|e| format!("{e:#}"))
        }
        Some(Err(e)) => Err(format!("floor-bench failed: {e}")),
        None => Err("floor-bench did not run".into()),
    };
    (result, Some(table))
}

/// The statement tables of one mode: turnd's, floor-bench's, and their totals compared.
fn print_statements(
    say: &impl Fn(&str),
    label: &str,
    m: &Measured,
    floor: &Option<Result<statements::Table, String>>,
) {
    match &m.statements {
        Some(t) => say(&t.human(label)),
        None => say(&format!("PostgreSQL per turn, turnd — {label}: not measured in this mode")),
    }
    match floor {
        Some(Ok(f)) => {
            say(&f.human(label));
            if let Some(t) = &m.statements {
                say(&statements::compare(t, f));
            }
        }
        Some(Err(e)) => say(&format!("PostgreSQL per turn, floor-bench — {label}: not read: {e}")),
        None => {}
    }
}

impl Step {
    fn label(&self) -> String {
        match self {
            Step::Throughput(c, n) => format!("throughput {c}×{n}"),
            Step::Pods(c, n, d) => format!("throughput {c}×{n} on {d} daemons"),
            Step::Latency(_) => "latency".into(),
            Step::Cold(a) if a.sandbox == Some(BenchSandbox::Landlock) => "cold (landlock)".into(),
            Step::Cold(_) => "cold".into(),
            Step::Crash(_) => "crash".into(),
            Step::Scale(a) => {
                let levels: Vec<String> = a.deployments.iter().map(ToString::to_string).collect();
                format!("scale {}", levels.join(","))
            }
        }
    }
}

async fn run_step(s: &Settings, step: &Step) -> Result<Measured> {
    match step {
        Step::Throughput(c, n) => modes::throughput(s, *c, *n).await,
        Step::Pods(c, n, d) => modes::throughput_on(s, *c, *n, *d).await,
        Step::Latency(a) => modes::latency(s, a.turns, a.warmup).await,
        Step::Cold(a) => {
            let landlock = a.sandbox == Some(BenchSandbox::Landlock);
            modes::cold(s, a.count, a.warmup, landlock).await
        }
        Step::Crash(a) => modes::crash(s, a.trials, a.warmup).await,
        Step::Scale(a) => {
            let args = ScaleArgs {
                levels: a.deployments.clone(),
                latency_turns: a.latency_turns,
                latency_warmup: a.latency_warmup,
                alter_system: a.alter_system,
                bring_up_window: a.bring_up_window,
                cold_probes: a.cold_probes,
                rounds: a.rounds,
            };
            modes::scale(s, &args).await
        }
    }
}

/// The plain cold step, and with `--sandbox` the same again in the sandbox.
fn cold_steps(a: ColdArgs) -> Vec<Step> {
    let plain = Step::Cold(ColdArgs { sandbox: None, ..a });
    match a.sandbox {
        Some(_) => vec![plain, Step::Cold(a)],
        None => vec![plain],
    }
}

/// Several runs of one mode as one: the median of every figure, the checks summed.
fn combine(mut runs: Vec<Measured>) -> Measured {
    if runs.len() == 1 {
        return runs.remove(0);
    }
    let jsons: Vec<Value> = runs.iter().map(|m| m.json.clone()).collect();
    let mut first = runs.remove(0);
    for m in &runs {
        first.check.absorb(&m.check);
    }
    first.json = median(&jsons);
    first.json["exactly_once"] = first.check.json();
    first.json["runs"] = Value::Array(jsons);
    first
}

/// floor-bench's runs of one mode as one (the median), or the first error.
fn combine_floor(runs: Vec<Result<Value, String>>) -> Option<Result<Value, String>> {
    if runs.is_empty() {
        return None;
    }
    let ok: Vec<Value> = runs.iter().filter_map(|r| r.as_ref().ok().cloned()).collect();
    if ok.is_empty() {
        return runs.into_iter().next();
    }
    Some(Ok(median(&ok)))
}

/// The median (lower, for an even count) of each number found at the same place in every
/// value; other leaves and arrays come from the first value.
fn median(values: &[Value]) -> Value {
    match values.first() {
        Some(Value::Object(first)) => {
            let mut out = serde_json::Map::new();
            for k in first.keys() {
                let items: Vec<Value> = values.iter().filter_map(|v| v.get(k).cloned()).collect();
                out.insert(k.clone(), median(&items));
            }
            Value::Object(out)
        }
        Some(Value::Number(_)) => {
            if values.iter().all(|v| v.as_i64().is_some()) {
                let mut xs: Vec<i64> = values.iter().filter_map(Value::as_i64).collect();
                xs.sort_unstable();
                json!(xs[(xs.len() - 1) / 2])
            } else {
                let mut xs: Vec<f64> = values.iter().filter_map(Value::as_f64).collect();
                xs.sort_by(f64::total_cmp);
                xs.get((xs.len().max(1) - 1) / 2).map_or(Value::Null, |x| json!(x))
            }
        }
        Some(v) => v.clone(),
        None => Value::Null,
    }
}

/// `turnd-bench cleanup`.
async fn cleanup(s: &Settings) -> Result<()> {
    let mut admin = cluster::admin_connection(&s.admin_url).await?;
    let dbs: Vec<String> = sqlx::query_scalar(
        "SELECT datname FROM pg_database WHERE datname LIKE 'turnd\\_bench\\_%' ORDER BY 1",
    )
    .fetch_all(&mut admin)
    .await
    .context("list databases")?;
    for db in &dbs {
        cluster::drop_database(&s.admin_url, db).await;
    }
    println!(
        "dropped {} database(s){}",
        dbs.len(),
        if dbs.is_empty() { String::new() } else { format!(": {}", dbs.join(", ")) }
    );
    // bench-<12 hex>.<rest>: the prefixes the harness makes.
    let ours = |name: &str| {
        name.strip_prefix("bench-")
            .and_then(|r| r.split_once('.'))
            .is_some_and(|(tag, _)| tag.len() == 12 && tag.bytes().all(|b| b.is_ascii_hexdigit()))
    };
    let names = |text: String| -> Vec<String> {
        text.lines().map(str::trim).filter(|n| ours(n)).map(str::to_owned).collect()
    };
    let queues =
        names(modes::rabbitmqctl(&["-q", "list_queues", "--no-table-headers", "name"]).await?);
    let exchanges =
        names(modes::rabbitmqctl(&["-q", "list_exchanges", "--no-table-headers", "name"]).await?);
    cluster::delete_broker_objects(&s.amqp_url, &queues, &exchanges).await;
    println!(
        "deleted {} queue(s) and {} exchange(s) of bench-* prefixes",
        queues.len(),
        exchanges.len()
    );
    Ok(())
}

/// Both services answer, and what the figures depend on.
async fn preflight(s: &Settings) -> Result<Value> {
    let mut admin = cluster::admin_connection(&s.admin_url).await?;
    let postgres: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&mut admin)
        .await
        .context("ask PostgreSQL its version")?;
    let conn = lapin::Connection::connect(&s.amqp_url, lapin::ConnectionProperties::default())
        .await
        .with_context(|| {
            format!(
                "connect to RabbitMQ at {} (is it running? see --amqp-url)",
                turnd_harness::services::redact(&s.amqp_url)
            )
        })?;
    let rabbitmq = tokio::process::Command::new("rabbitmqctl")
        .args(["-q", "version"])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(|| "?".to_owned(), |o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let _ = conn.close(200, "preflight".into()).await;
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    if nproc == 0 {
        bail!("cannot tell how many cores this machine has");
    }
    Ok(json!({
        "nproc": nproc,
        "postgres": postgres,
        "rabbitmq": rabbitmq,
        "kernel": kernel.trim(),
    }))
}
