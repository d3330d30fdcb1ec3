//! One isolated turnd installation per mode: a fresh PostgreSQL database, a fresh AMQP prefix,
//! a state directory, and one `turnd run` child configured through TURND_* variables. Stopped
//! with SIGTERM; the database is dropped and the prefix's exchanges and queues deleted after
//! (also from `Drop` when a mode fails half-way).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio::process::{Child, Command};
use turnd_harness::services::{self, redact};
use turnd_harness::{NotReady, strip_ansi, wait_ready};

use crate::statements::harness_sql;

/// What every mode shares: where the services and binaries are, how long to wait.
#[derive(Debug, Clone)]
pub struct Settings {
    /// PostgreSQL URL of a database the harness may connect to as a superuser (to create and
    /// drop the per-mode databases).
    pub admin_url: String,
    pub amqp_url: String,
    pub turnd: PathBuf,
    pub worker: PathBuf,
    pub log_level: String,
    /// Keep the database, prefix and logs of each mode (and say where they are).
    pub keep: bool,
    /// Longest wait for any expected event.
    pub timeout: Duration,
    /// After a mode's last expected event, keep listening this long for duplicates.
    pub settle: Duration,
    /// Record a perf profile of the daemon during each measurement window into this folder.
    pub perf: Option<PathBuf>,
    /// Extra TURND_* overrides for every daemon (after the harness's own).
    pub daemon_env: Vec<(String, String)>,
    /// A built floor-bench (--floor): the scale mode measures its latency at each level too,
    /// to tell what the broker and database carrying N deployments cost everyone.
    pub floor: Option<PathBuf>,
    /// Reset pg_stat_statements before each measured window and read the mode database's
    /// statements after it (`--statements`).
    pub statements: bool,
    /// Tombstones to fill in and ANALYZE before a throughput window (`--tombstones`).
    pub tombstones: u64,
}

/// How the daemon ended.
#[derive(Debug, Clone)]
pub struct Stopped {
    pub took: Duration,
    pub status: String,
    pub clean: bool,
}

/// What the daemon log says besides the harness's own lines.
#[derive(Debug, Clone, Default)]
pub struct LogSummary {
    pub warn: usize,
    pub error: usize,
    pub panics: usize,
    /// The first few distinct WARN/ERROR lines, timestamps cut.
    pub samples: Vec<String>,
}

pub struct Cluster {
    pub db_name: String,
    pub prefix: String,
    pub daemon_id: String,
    pub dir: PathBuf,
    pub log: PathBuf,
    /// The harness's own pool on the mode's database (application_name bench-harness, so it
    /// never counts as the daemon's).
    pub pool: PgPool,
    /// The daemon's configuration as turnd itself parses it from the same variables.
    pub config: turnd::config::Config,
    /// Deployments whose thread queues the cleanup deletes.
    pub deployments: BTreeSet<String>,
    daemon: Option<Child>,
    pid: u32,
    /// The daemon's environment, for its peers.
    env: Vec<(String, String)>,
    /// More daemons on the same database and prefix (`pods`): each with its log.
    peers: Vec<(Child, PathBuf)>,
    admin_url: String,
    amqp_url: String,
    keep: bool,
    cleaned: bool,
}

impl Cluster {
    /// Creates the database and prefix, starts `turnd run` with the harness's settings plus
    /// `extra` and waits until it logs "turnd ready".
    pub async fn start(s: &Settings, mode: &str, extra: &[(&str, String)]) -> Result<Cluster> {
        let tag = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let db_name = format!("turnd_bench_{tag}");
        let prefix = format!("bench-{tag}");
        let daemon_id = format!("bench-{mode}-{tag}");
        let dir = std::env::temp_dir().join(format!("turnd-bench-{mode}-{tag}"));
        let db_url = services::database_url(&s.admin_url, &db_name)
            .with_context(|| format!("bad --database-url {}", redact(&s.admin_url)))?;
        let log = dir.join("turnd.log");

        let mut env: Vec<(String, String)> = vec![
            ("TURND_DATABASE__URL".into(), db_url.clone()),
            ("TURND_AMQP__URL".into(), s.amqp_url.clone()),
            ("TURND_AMQP__PREFIX".into(), prefix.clone()),
            ("TURND_DAEMON__ID".into(), daemon_id.clone()),
            ("TURND_DAEMON__STATE_DIR".into(), dir.join("state").display().to_string()),
            ("TURND_WORKER__COMMAND".into(), toml_array(&[s.worker.display().to_string()])),
            ("TURND_HTTP__LISTEN".into(), String::new()),
            ("TURND_LOG__LEVEL".into(), s.log_level.clone()),
            ("TURND_LOG__FORMAT".into(), "pretty".into()),
            ("TURND_SHUTDOWN__GRACE".into(), "5s".into()),
            ("TURND_WORKER__STOP_TIMEOUT".into(), "1s".into()),
        ];
        for (k, v) in
            extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).chain(s.daemon_env.clone())
        {
            env.retain(|(ek, _)| *ek != k);
            env.push((k, v));
        }
        let config = turnd::config::Config::load_from(Some(Path::new("/dev/null")), env.clone())
            .context("the bench's turnd configuration is invalid")?;
        let options = PgConnectOptions::from_str(&db_url)
            .with_context(|| format!("bad PostgreSQL URL {db_url}"))?
            .application_name("bench-harness");
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy_with(options);

        fs::create_dir_all(dir.join("state"))
            .with_context(|| format!("create the bench directory {}", dir.display()))?;
        services::create_database(&s.admin_url, &db_name).await.with_context(|| {
            format!(
                "create database {db_name} at {} (is PostgreSQL running, and may this user \
                 create databases? see --database-url)",
                services::redact(&s.admin_url)
            )
        })?;

        let mut cluster = Cluster {
            db_name,
            prefix,
            daemon_id,
            dir,
            log,
            pool,
            config,
            deployments: BTreeSet::new(),
            daemon: None,
            pid: 0,
            env: env.clone(),
            peers: Vec::new(),
            admin_url: s.admin_url.clone(),
            amqp_url: s.amqp_url.clone(),
            keep: s.keep,
            cleaned: false,
        };
        match cluster.boot(s, env).await {
            Ok(()) => Ok(cluster),
            Err(e) => {
                let tail = cluster.log_tail(20);
                cluster.cleanup().await;
                Err(anyhow::anyhow!("start turnd for mode {mode}: {e:#}\nits log ends:\n{tail}"))
            }
        }
    }

    async fn boot(&mut self, s: &Settings, env: Vec<(String, String)>) -> Result<()> {
        turnd::store::migrator()
            .run(&self.pool)
            .await
            .with_context(|| format!("apply turnd's migrations to {}", self.db_name))?;
        let empty_config = self.dir.join("turnd.toml");
        fs::write(&empty_config, "# every setting comes from TURND_* variables\n")
            .with_context(|| format!("write {}", empty_config.display()))?;
        let mut child = spawn_run(s, &empty_config, &self.log, env)
            .with_context(|| format!("start {} run (see --turnd)", s.turnd.display()))?;
        self.pid = child.id().context("turnd exited at once")?;
        let ready =
            wait_ready(&self.log, 0, Duration::from_secs(60), || child.try_wait().ok().flatten())
                .await;
        match ready {
            Ok(()) => {}
            Err(e @ NotReady::Exited(_)) => bail!("turnd {e}"),
            Err(e @ NotReady::TimedOut(_)) => {
                self.daemon = Some(child);
                bail!(
                    "turnd {e} (log.level {:?} must let turnd::daemon's info lines through)",
                    s.log_level
                );
            }
        }
        self.daemon = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Starts `n` more daemons on the same database and prefix (pods of one cluster), each
    /// with its own id and log, and waits until each is ready.
    pub async fn add_peers(&mut self, s: &Settings, n: usize) -> Result<()> {
        for k in 1..=n {
            let log = self.dir.join(format!("turnd-peer{k}.log"));
            let mut env = self.env.clone();
            env.retain(|(k, _)| k != "TURND_DAEMON__ID");
            env.push(("TURND_DAEMON__ID".into(), format!("{}-peer{k}", self.daemon_id)));
            let mut child = spawn_run(s, &self.dir.join("turnd.toml"), &log, env)
                .with_context(|| format!("start peer {k}"))?;
            let ready =
                wait_ready(&log, 0, Duration::from_secs(60), || child.try_wait().ok().flatten())
                    .await;
            if let Err(e) = ready {
                bail!("peer {k} {e}; see {}", log.display());
            }
            self.peers.push((child, log));
        }
        Ok(())
    }

    /// Fills in `n` tombstones of answered turns (1,000 conversations' worth) and ANALYZEs
    /// turnd_turns, as a database in service looks to the planner (`--tombstones`).
    pub async fn tombstones(&self, n: u64) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO turnd_turns (deployment, message_id, state, agent_id, conversation_key,
                                      deadline, done_at)
             SELECT 'bench-tomb-' || (i % 1000), 'tomb-' || i, 'done', 'a', 'k', now(), now()
             FROM generate_series(1, $1) i",
        )
        .bind(i64::try_from(n).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await
        .context("fill in tombstones")?;
        sqlx::query("ANALYZE turnd_turns").execute(&self.pool).await.context("ANALYZE")?;
        Ok(())
    }

    /// How many daemons (the first and its peers) own deployments now.
    pub async fn owners(&self) -> usize {
        sqlx::query_scalar::<_, i64>(harness_sql!(
            "SELECT count(DISTINCT owner) FROM turnd_deployments WHERE owner IS NOT NULL"
        ))
        .fetch_one(&self.pool)
        .await
        .map_or(0, |n| n as usize)
    }

    /// A line of /proc/<daemon>/status in kB (VmRSS, RssAnon, VmHWM) or count (Threads).
    pub fn proc_status(&self, key: &str) -> Option<u64> {
        proc_status(self.pid, key)
    }

    /// Open file descriptors of the daemon.
    pub fn open_fds(&self) -> Option<usize> {
        fs::read_dir(format!("/proc/{}/fd", self.pid)).ok().map(|d| d.count())
    }

    /// The daemon's live child processes (its workers) and their summed VmRSS in kB.
    pub fn children(&self) -> (usize, u64) {
        let parent = self.pid.to_string();
        let mut count = 0;
        let mut rss = 0;
        for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let Some((_, rest)) = stat.rsplit_once(") ") else {
                continue;
            };
            let mut f = rest.split_whitespace();
            let state = f.next().unwrap_or("");
            if f.next() == Some(parent.as_str()) && state != "Z" {
                count += 1;
                rss += proc_status(pid, "VmRSS").unwrap_or(0);
            }
        }
        (count, rss)
    }

    /// SIGTERM, then waits for the exit (shutdown.grace is 5 s; SIGKILL after 60 s).
    pub async fn stop(&mut self) -> Result<Stopped> {
        for (mut peer, _) in self.peers.drain(..) {
            if let Some(pid) = peer.id() {
                // SAFETY: kill(2) on the pid of a child we have not reaped yet.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
            }
            if tokio::time::timeout(Duration::from_secs(60), peer.wait()).await.is_err() {
                let _ = peer.kill().await;
            }
        }
        let Some(mut child) = self.daemon.take() else { bail!("turnd is not running") };
        let started = Instant::now();
        // SAFETY: kill(2) on the pid of a child we have not reaped yet.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        match tokio::time::timeout(Duration::from_secs(60), child.wait()).await {
            Ok(Ok(status)) => Ok(Stopped {
                took: started.elapsed(),
                status: status.to_string(),
                clean: status.success(),
            }),
            Ok(Err(e)) => Err(anyhow::Error::new(e).context("wait for turnd to exit")),
            Err(_) => {
                let _ = child.kill().await;
                Ok(Stopped {
                    took: started.elapsed(),
                    status: "did not exit within 60 s of SIGTERM; killed".into(),
                    clean: false,
                })
            }
        }
    }

    /// Whether the daemon is still running (it should be, during a mode).
    pub fn running(&mut self) -> Result<()> {
        match self.daemon.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => Ok(()),
            Some(Ok(Some(status))) => {
                bail!("turnd exited during the run ({status}); log: {}", self.log.display())
            }
            Some(Err(e)) => Err(anyhow::Error::new(e).context("check on turnd")),
            None => bail!("turnd is not running"),
        }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn log_summary(&self) -> LogSummary {
        let text = strip_ansi(&fs::read_to_string(&self.log).unwrap_or_default());
        let mut summary = LogSummary::default();
        let mut distinct: Vec<(String, usize)> = Vec::new();
        for line in text.lines() {
            let warn = line.contains(" WARN ");
            let error = line.contains(" ERROR ");
            let panic = line.contains("panicked");
            summary.panics += usize::from(panic);
            summary.warn += usize::from(warn);
            summary.error += usize::from(error);
            if warn || error || panic {
                // Cut the timestamp and the key=value fields: what is left repeats when the
                // cause does.
                let rest = line.split_once("Z ").map_or(line, |(_, rest)| rest);
                let words: Vec<&str> = rest.split_whitespace().collect();
                let keep = words.iter().position(|w| is_field(w)).unwrap_or(words.len());
                let cut: String = words[..keep].join(" ").chars().take(240).collect();
                if let Some((_, n)) = distinct.iter_mut().find(|(m, _)| *m == cut) {
                    *n += 1;
                } else if distinct.len() < 8 {
                    distinct.push((cut, 1));
                }
            }
        }
        summary.samples = distinct.into_iter().map(|(m, n)| format!("{n}× {m}")).collect();
        summary
    }

    /// Stops what is left, drops the database and deletes the prefix's broker objects.
    pub async fn cleanup(mut self) {
        self.cleaned = true;
        for (mut peer, _) in self.peers.drain(..) {
            let _ = peer.kill().await;
        }
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill().await;
        }
        self.pool.close().await;
        if self.keep {
            eprintln!(
                "kept: database {}, prefix {}, log {}",
                self.db_name,
                self.prefix,
                self.log.display()
            );
            return;
        }
        teardown(
            &self.admin_url,
            &self.amqp_url,
            &self.db_name,
            &self.prefix,
            self.config.intake.max_attempts,
            &self.deployments,
        )
        .await;
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        // A mode failed or was interrupted: kill the daemon (its workers follow it by
        // PR_SET_PDEATHSIG), then clean up on a thread with a runtime of its own.
        if let Some(child) = self.daemon.as_mut() {
            let _ = child.start_kill();
        }
        if self.keep {
            eprintln!(
                "kept: database {}, prefix {}, log {}",
                self.db_name,
                self.prefix,
                self.log.display()
            );
            return;
        }
        let (admin, amqp, db, prefix) = (
            self.admin_url.clone(),
            self.amqp_url.clone(),
            self.db_name.clone(),
            self.prefix.clone(),
        );
        let attempts = self.config.intake.max_attempts;
        let deployments = std::mem::take(&mut self.deployments);
        turnd_harness::services::on_own_thread(async move {
            teardown(&admin, &amqp, &db, &prefix, attempts, &deployments).await;
        });
        eprintln!("daemon log of the failed mode kept in {}", self.log.display());
    }
}

/// Best effort: errors here cannot change the figures.
async fn teardown(
    admin_url: &str,
    amqp_url: &str,
    db_name: &str,
    prefix: &str,
    max_attempts: u32,
    deployments: &BTreeSet<String>,
) {
    drop_database(admin_url, db_name).await;
    let queues =
        services::queues(prefix, max_attempts, deployments.iter().map(String::as_str), &[]);
    delete_broker_objects(amqp_url, &queues, &services::exchanges(prefix)).await;
}

pub async fn drop_database(admin_url: &str, db_name: &str) {
    if let Err(e) = services::drop_database(admin_url, db_name).await {
        eprintln!("turnd-bench: cannot drop database {db_name}: {e}");
    }
}

/// Deletes queues and exchanges (the harness retries the connection for 10 s: the broker
/// may be restarting); says so when RabbitMQ cannot be reached.
pub async fn delete_broker_objects(amqp_url: &str, queues: &[String], exchanges: &[String]) {
    if let Err(e) = services::delete_broker_objects(amqp_url, queues, exchanges).await {
        eprintln!(
            "turnd-bench: cannot reach RabbitMQ to delete {} queues and {} exchanges \
             (first {:?}): {e}; `turnd-bench cleanup` removes them later",
            queues.len(),
            exchanges.len(),
            queues.first()
        );
    }
}

pub async fn admin_connection(url: &str) -> Result<PgConnection> {
    PgConnection::connect(url).await.with_context(|| {
        format!(
            "connect to PostgreSQL at {} (is it running, and does it let this user create \
             databases? see --database-url)",
            redact(url)
        )
    })
}

/// A TOML array of basic strings (TURND_* variables hold lists in TOML syntax).
fn toml_array(items: &[String]) -> String {
    let quoted: Vec<String> =
        items.iter().map(|s| serde_json::Value::String(s.clone()).to_string()).collect();
    format!("[{}]", quoted.join(", "))
}

pub fn proc_status(pid: u32, key: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// A tracing field (`key=value`) of a pretty log line: where the message ends.
fn is_field(word: &str) -> bool {
    word.split_once('=').is_some_and(|(k, _)| {
        !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_' || b == b'.')
    })
}

/// `turnd run --config <config>` with exactly `env` (plus PATH), its output into `log`.
fn spawn_run(
    s: &Settings,
    config: &Path,
    log: &Path,
    env: Vec<(String, String)>,
) -> Result<tokio::process::Child> {
    let file = fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let err = file.try_clone().context("duplicate the log file handle")?;
    Command::new(&s.turnd)
        .arg("run")
        .arg("--config")
        .arg(config)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()))
        .env("NO_COLOR", "1")
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(err))
        // Its own group: a Ctrl-C at the terminal reaches the harness, which stops it.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .context("spawn")
}
