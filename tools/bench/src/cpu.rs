//! CPU seconds spent during a measurement window, split by who spent them: the harness, the
//! turnd daemon, its workers, PostgreSQL, RabbitMQ, the kernel and everyone else. On a shared
//! machine a figure taken under someone else's load has to say so (same rule as floor-bench,
//! whose `cpu` object these figures are compared with).

use std::fs;
use std::time::Instant;

use serde_json::{Value, json};

/// /proc reports times in USER_HZ, which Linux fixes at 100.
const TICK_S: f64 = 0.01;
/// Above this share of the machine used by other processes, a figure is flagged.
pub const DISTURBED: f64 = 0.10;

#[derive(Default)]
struct Ticks {
    machine: u64,
    bench: u64,
    turnd: u64,
    workers: u64,
    postgres: u64,
    rabbitmq: u64,
    others: u64,
}

pub struct Meter {
    started: Instant,
    daemon: Option<u32>,
    at: Ticks,
}

#[derive(Debug, Clone)]
pub struct Usage {
    pub wall_s: f64,
    pub machine_s: f64,
    pub bench_s: f64,
    pub turnd_s: f64,
    pub workers_s: f64,
    pub postgres_s: f64,
    pub rabbitmq_s: f64,
    pub other_s: f64,
    /// Kernel threads (journal, writeback, softirq) and interrupts taken while idle.
    pub kernel_s: f64,
    pub cores: usize,
}

impl Meter {
    /// Starts metering; `daemon` is the turnd pid (its children are its workers).
    pub fn start(daemon: Option<u32>) -> Self {
        Meter { started: Instant::now(), daemon, at: snapshot(daemon) }
    }

    pub fn stop(&self) -> Usage {
        let now = snapshot(self.daemon);
        let secs = |a: u64, b: u64| b.saturating_sub(a) as f64 * TICK_S;
        let machine_s = secs(self.at.machine, now.machine);
        let bench_s = secs(self.at.bench, now.bench);
        let turnd_s = secs(self.at.turnd, now.turnd);
        let workers_s = secs(self.at.workers, now.workers);
        let postgres_s = secs(self.at.postgres, now.postgres);
        let rabbitmq_s = secs(self.at.rabbitmq, now.rabbitmq);
        let other_s = secs(self.at.others, now.others);
        let counted = bench_s + turnd_s + workers_s + postgres_s + rabbitmq_s + other_s;
        Usage {
            wall_s: self.started.elapsed().as_secs_f64(),
            machine_s,
            bench_s,
            turnd_s,
            workers_s,
            postgres_s,
            rabbitmq_s,
            other_s,
            kernel_s: (machine_s - counted).max(0.0),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

impl Usage {
    /// Adds a later window's usage: the scale mode meters its latency windows, not the probes
    /// and floor-bench runs between them.
    pub fn add(&mut self, other: &Usage) {
        self.wall_s += other.wall_s;
        self.machine_s += other.machine_s;
        self.bench_s += other.bench_s;
        self.turnd_s += other.turnd_s;
        self.workers_s += other.workers_s;
        self.postgres_s += other.postgres_s;
        self.rabbitmq_s += other.rabbitmq_s;
        self.other_s += other.other_s;
        self.kernel_s += other.kernel_s;
    }

    /// Share of the whole machine (all cores) that other processes used.
    pub fn others_share(&self) -> f64 {
        self.other_s / (self.wall_s * self.cores as f64).max(f64::EPSILON)
    }

    pub fn busy_share(&self) -> f64 {
        self.machine_s / (self.wall_s * self.cores as f64).max(f64::EPSILON)
    }

    /// The CPU the turn path itself used (daemon, workers, database, broker), per turn.
    pub fn path_ms_per_turn(&self, turns: usize) -> f64 {
        1e3 * (self.turnd_s + self.workers_s + self.postgres_s + self.rabbitmq_s)
            / (turns.max(1) as f64)
    }

    pub fn human(&self, turns: usize) -> String {
        let per = |s: f64| 1e3 * s / turns.max(1) as f64;
        let mut line = format!(
            "cpu over {:.2} s (machine {:.0}% busy): turnd {:.2} s, workers {:.2} s, \
             postgres {:.2} s, rabbitmq {:.2} s, harness {:.2} s, kernel {:.2} s, others {:.2} s; \
             per turn: turnd {:.3} ms, workers {:.3}, postgres {:.3}, rabbitmq {:.3} \
             (turn path {:.3} ms)",
            self.wall_s,
            100.0 * self.busy_share(),
            self.turnd_s,
            self.workers_s,
            self.postgres_s,
            self.rabbitmq_s,
            self.bench_s,
            self.kernel_s,
            self.other_s,
            per(self.turnd_s),
            per(self.workers_s),
            per(self.postgres_s),
            per(self.rabbitmq_s),
            self.path_ms_per_turn(turns),
        );
        if self.others_share() > DISTURBED {
            line += &format!(
                " — DISTURBED: other processes used {:.0}% of the machine",
                100.0 * self.others_share()
            );
        }
        line
    }

    pub fn json(&self, turns: usize) -> Value {
        let r = |x: f64| (x * 1000.0).round() / 1000.0;
        json!({
            "wall_s": r(self.wall_s),
            "machine_s": r(self.machine_s),
            "turnd_s": r(self.turnd_s),
            "workers_s": r(self.workers_s),
            "postgres_s": r(self.postgres_s),
            "rabbitmq_s": r(self.rabbitmq_s),
            "harness_s": r(self.bench_s),
            "kernel_s": r(self.kernel_s),
            "others_s": r(self.other_s),
            "others_share": r(self.others_share()),
            "disturbed": self.others_share() > DISTURBED,
            "turn_path_ms_per_turn": r(self.path_ms_per_turn(turns)),
            "all_ms_per_turn": r(self.path_ms_per_turn(turns) + 1e3 * self.bench_s / turns.max(1) as f64),
        })
    }
}

/// Busy ticks of the machine and of each party. A process's cutime/cstime hold its reaped
/// children: the daemon's are its exited workers, the postmaster's its exited backends.
fn snapshot(daemon: Option<u32>) -> Ticks {
    let mut t = Ticks::default();
    if let Ok(stat) = fs::read_to_string("/proc/stat") {
        // cpu user nice system idle iowait irq softirq steal
        let f: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        if f.len() >= 8 {
            t.machine = f[0] + f[1] + f[2] + f[5] + f[6] + f[7];
        }
    }
    let me = std::process::id().to_string();
    let daemon = daemon.map(|p| p.to_string()).unwrap_or_default();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let comm = head.split_once(" (").map_or("", |(_, c)| c);
        // After the comm: state ppid … utime(11) stime(12) cutime(13) cstime(14).
        let f: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let own = field(11) + field(12);
        let reaped = field(13) + field(14);
        let ppid = f.get(1).copied().unwrap_or_default();
        match comm {
            _ if !daemon.is_empty() && pid == daemon => {
                t.turnd += own;
                t.workers += reaped;
            }
            _ if !daemon.is_empty() && ppid == daemon => t.workers += own + reaped,
            // The harness and its helpers (perf, rabbitmqctl); the daemon is handled above.
            _ if pid == me || ppid == me => t.bench += own,
            "postgres" => t.postgres += own + reaped,
            "beam.smp" | "erl_child_setup" | "inet_gethost" | "epmd" => {
                t.rabbitmq += own + reaped;
            }
            _ if pid == "2" || ppid == "2" => {} // kernel threads: the remainder
            _ => t.others += own + reaped,
        }
    }
    t
}
