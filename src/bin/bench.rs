//! `turnd-bench`: how much exactly-once costs. Starts a real `turnd run` per mode on a fresh
//! PostgreSQL database and AMQP prefix (local services), drives it with the fast bundled
//! `turnd-test-worker`, and measures throughput, one-at-a-time latency, new-conversation
//! (cold) latency, worker-crash recovery and N live deployments on one daemon. With
//! `--floor <floor-bench>` it runs floor-bench's matching mode right before each turnd mode
//! and prints each ratio against the targets of issue 7. After every mode it checks that every
//! turn got exactly one terminal event; a violation makes the exit code 1.
//!
//! ```sh
//! cargo build --release --bins
//! ./target/release/turnd-bench all --floor /tmp/floor-bench/target/release/floor-bench
//! ./target/release/turnd-bench throughput --conversations 50 --turns 40
//! ./target/release/turnd-bench --json latency
//! ```

#[path = "bench/client.rs"]
mod client;
#[path = "bench/cluster.rs"]
mod cluster;
#[path = "bench/cpu.rs"]
mod cpu;
#[path = "bench/floor.rs"]
mod floor;
#[path = "bench/modes.rs"]
mod modes;
#[path = "bench/report.rs"]
mod report;
#[path = "bench/stats.rs"]
mod stats;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};

use cluster::Settings;
use modes::ScaleArgs;
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
    #[arg(
        long,
        global = true,
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    #[arg(
        long,
        global = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
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
    /// Every mode in sequence (floor-bench interleaved with --floor), then the table.
    All(AllArgs),
}

#[derive(Args)]
struct ThroughputArgs {
    #[arg(long)]
    conversations: Option<usize>,
    /// Turns per conversation.
    #[arg(long)]
    turns: Option<u32>,
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
    #[arg(long, default_value_t = 300)]
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
    #[arg(long, default_value_t = 20)]
    cold_probes: usize,
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
    #[arg(long, default_value_t = 100)]
    crash_trials: usize,
    #[arg(long, value_delimiter = ',', default_value = "50,5000")]
    scale_deployments: Vec<usize>,
    #[arg(long, default_value_t = 300)]
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
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    if !k.starts_with("TURND_") {
        return Err(format!("{k} is not a TURND_* variable"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

fn shape(s: &str) -> Result<(usize, u32), String> {
    let (c, n) = s
        .split_once(['x', '×'])
        .ok_or_else(|| format!("{s:?} is not CxN (e.g. 50x40)"))?;
    let c = c.trim().parse().map_err(|e| format!("{s:?}: {e}"))?;
    let n = n.trim().parse().map_err(|e| format!("{s:?}: {e}"))?;
    Ok((c, n))
}

/// One mode to run.
enum Step {
    Throughput(usize, u32),
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
    let worker = cli
        .worker
        .clone()
        .unwrap_or_else(|| here.join("turnd-test-worker"));
    for (what, path, flag) in [
        ("turnd", &turnd, "--turnd"),
        ("the test worker", &worker, "--worker"),
    ] {
        ensure!(
            path.is_file(),
            "{what} is not at {} (build with `cargo build --release --bins`, or pass {flag})",
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
    };
    let machine = preflight(&s).await?;

    let steps: Vec<Step> = match &cli.mode {
        Mode::Throughput(a) => match (a.conversations, a.turns) {
            (None, None) => vec![Step::Throughput(50, 40), Step::Throughput(200, 10)],
            (c, n) => vec![Step::Throughput(c.unwrap_or(50), n.unwrap_or(40))],
        },
        Mode::Latency(a) => vec![Step::Latency(*a)],
        Mode::Cold(a) => vec![Step::Cold(*a)],
        Mode::Crash(a) => vec![Step::Crash(*a)],
        Mode::Scale(a) => vec![Step::Scale(a.clone())],
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
                steps.push(Step::Cold(ColdArgs {
                    count: a.cold_count,
                    warmup: 5,
                }));
            }
            if on("crash") {
                steps.push(Step::Crash(CrashArgs {
                    trials: a.crash_trials,
                    warmup: 3,
                }));
            }
            if on("scale") {
                steps.push(Step::Scale(ScaleCli {
                    deployments: a.scale_deployments.clone(),
                    latency_turns: a.scale_latency_turns,
                    latency_warmup: 30,
                    alter_system: a.alter_system,
                    bring_up_window: a.scale_bring_up_window,
                    cold_probes: 20,
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
    let mut notes: Vec<String> = Vec::new();
    let mut violated = false;
    let mut unexpected = false;
    let mut errors = 0;
    // floor-bench's latency result, reused for `cold` when `latency` ran in this run.
    let mut floor_latency: Option<Result<Value, String>> = None;
    for step in steps {
        let (label, floor) = match &step {
            Step::Throughput(c, n) => (
                format!("throughput {c}×{n}"),
                Floor {
                    main: floor_run(
                        cli,
                        &[
                            "throughput",
                            "--conversations",
                            &c.to_string(),
                            "--turns",
                            &n.to_string(),
                        ],
                    )
                    .await,
                    spawn: None,
                },
            ),
            Step::Latency(a) => {
                let f = floor_run(
                    cli,
                    &[
                        "latency",
                        "--turns",
                        &a.turns.to_string(),
                        "--warmup",
                        &a.warmup.to_string(),
                    ],
                )
                .await;
                floor_latency = f.clone();
                (
                    "latency".into(),
                    Floor {
                        main: f,
                        spawn: None,
                    },
                )
            }
            Step::Cold(_) => {
                let main = match &floor_latency {
                    Some(f) => Some(f.clone()),
                    None => floor_run(cli, &["latency"]).await,
                };
                (
                    "cold".into(),
                    Floor {
                        main,
                        spawn: floor_run(cli, &["spawn"]).await,
                    },
                )
            }
            Step::Crash(_) => ("crash".into(), Floor::default()),
            Step::Scale(_) => ("scale".into(), Floor::default()),
        };
        eprintln!("turnd-bench: running {label} …");
        let result = match &step {
            Step::Throughput(c, n) => modes::throughput(&s, *c, *n).await,
            Step::Latency(a) => modes::latency(&s, a.turns, a.warmup).await,
            Step::Cold(a) => modes::cold(&s, a.count, a.warmup).await,
            Step::Crash(a) => modes::crash(&s, a.trials, a.warmup).await,
            Step::Scale(a) => {
                let args = ScaleArgs {
                    levels: a.deployments.clone(),
                    latency_turns: a.latency_turns,
                    latency_warmup: a.latency_warmup,
                    alter_system: a.alter_system,
                    bring_up_window: a.bring_up_window,
                    cold_probes: a.cold_probes,
                };
                modes::scale(&s, &args).await
            }
        };
        match result {
            Ok(m) => {
                violated |= m.check.violated();
                unexpected |= m.check.unexpected();
                let (mut mode_rows, targets) = report::rows(&m, &floor);
                say(&format!("{}: {}", m.label, m.line));
                for n in &m.notes {
                    say(&format!("  {n}"));
                }
                if m.check.violated() {
                    say(&format!("  EXACTLY-ONCE VIOLATED: {}", m.check.human()));
                }
                if m.check.unexpected() {
                    say(&format!(
                        "  UNEXPECTED OUTCOMES: {}",
                        m.check.outcomes_human()
                    ));
                }
                if m.check.violated() || m.check.unexpected() {
                    for e in &m.check.examples {
                        say(&format!("    {e}"));
                    }
                }
                notes.push(format!("{}:", m.label));
                notes.extend(m.notes.iter().map(|n| format!("  {n}")));
                if cli.json {
                    let mut j = m.json.clone();
                    j["floor"] = json!({
                        "main": floor.main.as_ref().map(|r| r.clone().unwrap_or_else(|e| json!({ "error": e }))),
                        "spawn": floor.spawn.as_ref().map(|r| r.clone().unwrap_or_else(|e| json!({ "error": e }))),
                    });
                    j["targets"] = Value::Array(targets);
                    j["machine"] = machine.clone();
                    println!("{j}");
                }
                rows.append(&mut mode_rows);
            }
            Err(e) => {
                errors += 1;
                let text = format!("{e:#}");
                say(&format!("{label}: FAILED: {text}"));
                rows.push(report::failed(&label, &text));
                if cli.json {
                    println!(
                        "{}",
                        json!({ "mode": label, "error": text, "machine": machine })
                    );
                }
            }
        }
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
    let failed_targets = rows.iter().filter(|r| r.verdict == Some(false)).count();
    say(&format!(
        "{} PASS, {} FAIL; exactly-once {}; outcomes {}; {} mode(s) failed to run",
        rows.iter().filter(|r| r.verdict == Some(true)).count(),
        failed_targets,
        if violated {
            "VIOLATED"
        } else {
            "held in every mode"
        },
        if unexpected {
            "NOT as asked in some mode"
        } else {
            "as asked"
        },
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
    Some(
        floor::run(floor, &cli.amqp_url, &args)
            .await
            .map_err(|e| format!("{e:#}")),
    )
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
                cluster::redact(&s.amqp_url)
            )
        })?;
    let rabbitmq = tokio::process::Command::new("rabbitmqctl")
        .args(["-q", "version"])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "?".to_owned(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        );
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
