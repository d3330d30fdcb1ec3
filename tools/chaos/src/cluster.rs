//! The cluster under test: a fresh PostgreSQL database and AMQP prefix, a run directory, and
//! N real `turnd run` processes (the sibling `turnd` binary) configured through TURND_*
//! variables, each with its own `http.listen` port for /readyz.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::process::{Child, Command};
use turnd_harness::services;

/// Where the services and binaries are.
#[derive(Debug, Clone)]
pub struct Settings {
    pub admin_url: String,
    pub amqp_url: String,
    pub turnd: PathBuf,
    pub worker: PathBuf,
    pub daemons: usize,
    pub turn_deadline: Duration,
    pub log_level: String,
    pub extra_env: Vec<(String, String)>,
}

pub struct Daemon {
    pub id: String,
    pub port: u16,
    pub log: PathBuf,
    child: Option<Child>,
    pub pid: Option<u32>,
    /// How many times this daemon was started.
    pub starts: u32,
    /// Its own way to PostgreSQL (the `partition` fault silences it).
    pub pg: crate::proxy::PgProxy,
    /// The database URL through `pg`.
    pub db_url: String,
}

pub struct Cluster {
    pub db_name: String,
    pub prefix: String,
    pub dir: PathBuf,
    /// The harness's pool on the cluster's database (application_name `turnd-chaos`).
    pub pool: PgPool,
    pub admin_url: String,
    pub amqp_url: String,
    pub env: Vec<(String, String)>,
    pub config: turnd::config::Config,
    pub daemons: Vec<Daemon>,
    turnd: PathBuf,
}

impl Cluster {
    pub async fn create(s: &Settings) -> Result<Cluster> {
        let tag = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
        let db_name = format!("turnd_chaos_{tag}");
        let prefix = format!("chaos-{tag}");
        let dir = std::env::temp_dir().join(format!("turnd-chaos-{tag}"));
        for sub in ["log", "excl", "pid", "state"] {
            std::fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("create {}", dir.display()))?;
        }
        let db_url = services::database_url(&s.admin_url, &db_name)
            .with_context(|| format!("bad --database-url {}", services::redact(&s.admin_url)))?;
        let deadline = humantime::format_duration(s.turn_deadline).to_string();
        let mut env: Vec<(String, String)> = vec![
            ("TURND_DATABASE__URL".into(), db_url.clone()),
            ("TURND_DATABASE__MAX_CONNECTIONS".into(), "6".into()),
            ("TURND_AMQP__URL".into(), s.amqp_url.clone()),
            ("TURND_AMQP__PREFIX".into(), prefix.clone()),
            ("TURND_DAEMON__STATE_DIR".into(), dir.join("state").display().to_string()),
            (
                "TURND_WORKER__COMMAND".into(),
                serde_json::to_string(&[s.worker.display().to_string()])?,
            ),
            ("TURND_WORKER__STOP_TIMEOUT".into(), "1s".into()),
            ("TURND_WORKER__IDLE_TIMEOUT".into(), "20s".into()),
            ("TURND_TURN__DEADLINE".into(), deadline),
            ("TURND_SWEEP__INTERVAL".into(), "500ms".into()),
            ("TURND_SWEEP__ADOPTION_DELAY".into(), "2s".into()),
            ("TURND_SHUTDOWN__GRACE".into(), "3s".into()),
            ("TURND_INTAKE__RETRY_DELAY".into(), "200ms".into()),
            ("TURND_INTAKE__RETRY_MAX_DELAY".into(), "1s".into()),
            ("TURND_LOG__LEVEL".into(), s.log_level.clone()),
            ("TURND_LOG__FORMAT".into(), "pretty".into()),
            ("TURND_WORKER_ENV_TEST_WORKER_LOG".into(), dir.join("log").display().to_string()),
            (
                "TURND_WORKER_ENV_TEST_WORKER_EXCLUSIVE".into(),
                dir.join("excl").display().to_string(),
            ),
            (
                "TURND_WORKER_ENV_TEST_WORKER_PIDFILE_DIR".into(),
                dir.join("pid").display().to_string(),
            ),
        ];
        for (k, v) in &s.extra_env {
            env.retain(|(ek, _)| ek != k);
            env.push((k.clone(), v.clone()));
        }
        let config = turnd::config::Config::load_from(Some(Path::new("/dev/null")), env.clone())
            .context("the chaos run's turnd configuration is invalid")?;

        services::create_database(&s.admin_url, &db_name).await.with_context(|| {
            format!(
                "create database {db_name} at {} (is PostgreSQL running, and may this user \
                 create databases? see --database-url)",
                services::redact(&s.admin_url)
            )
        })?;
        let options = PgConnectOptions::from_str(&db_url)?.application_name("turnd-chaos");
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(options);
        turnd::store::migrator().run(&pool).await.context("apply turnd's migrations")?;

        let mut daemons = Vec::new();
        let target = url::Url::parse(&db_url)?;
        let pg_port = target.port().unwrap_or(5432);
        anyhow::ensure!(
            matches!(target.host_str(), Some("127.0.0.1" | "localhost")),
            "the partition proxies forward to 127.0.0.1 only: --database-url must be local"
        );
        for i in 0..s.daemons {
            let id = format!("chaos-{tag}-d{i}");
            let pg = crate::proxy::PgProxy::start(pg_port).await?;
            let mut proxied = target.clone();
            proxied.set_host(Some("127.0.0.1"))?;
            let _ = proxied.set_port(Some(pg.port));
            daemons.push(Daemon {
                pg,
                db_url: proxied.to_string(),
                log: dir.join(format!("d{i}.log")),
                id,
                port: turnd_harness::try_free_port().context("find a free port")?,
                child: None,
                pid: None,
                starts: 0,
            });
        }
        Ok(Cluster {
            db_name,
            prefix,
            dir,
            pool,
            admin_url: s.admin_url.clone(),
            amqp_url: s.amqp_url.clone(),
            env,
            config,
            daemons,
            turnd: s.turnd.clone(),
        })
    }

    /// The port of the PostgreSQL server the harness's pool reaches.
    pub fn database_port(&self) -> Option<u16> {
        url::Url::parse(&self.admin_url).ok()?.port()
    }

    /// After a failover: every daemon's proxy and the harness's pool go to `port`.
    pub async fn move_database(&mut self, port: u16) -> Result<()> {
        for d in &self.daemons {
            d.pg.retarget(port);
        }
        let mut admin = url::Url::parse(&self.admin_url)?;
        let _ = admin.set_port(Some(port));
        self.admin_url = admin.to_string();
        let db_url = services::database_url(&self.admin_url, &self.db_name)?;
        let options = PgConnectOptions::from_str(&db_url)?.application_name("turnd-chaos");
        let old = std::mem::replace(
            &mut self.pool,
            PgPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(5))
                .connect_lazy_with(options),
        );
        old.close().await;
        Ok(())
    }

    /// Starts daemon `i` and waits (bounded) until it logs "turnd ready".
    pub async fn start(&mut self, i: usize) -> Result<()> {
        let turnd = self.turnd.clone();
        let env = self.env.clone();
        let d = &mut self.daemons[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&d.log)
            .with_context(|| format!("open {}", d.log.display()))?;
        let offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        let mut cmd = Command::new(&turnd);
        cmd.arg("run")
            .arg("--config")
            .arg("/dev/null")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()))
            .env("NO_COLOR", "1")
            .envs(env)
            // Several broker URLs: each daemon lists them from another one on, as pods in
            // three zones would (their own zone's node first).
            .env("TURND_AMQP__URL", rotate(&self.amqp_url, i))
            .env("TURND_DAEMON__ID", &d.id)
            .env("TURND_DATABASE__URL", &d.db_url)
            .env("TURND_HTTP__LISTEN", format!("127.0.0.1:{}", d.port))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            // Its own group: a Ctrl-C at the terminal reaches the harness, which stops it.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn().with_context(|| format!("start {} run", turnd.display()))?;
        d.pid = child.id();
        d.starts += 1;
        let within = Duration::from_secs(90);
        let ready =
            turnd_harness::wait_ready(&d.log, offset, within, || child.try_wait().ok().flatten())
                .await;
        if let Err(e) = ready {
            d.child = Some(child);
            bail!("daemon {} {e}; see {}", d.id, d.log.display());
        }
        d.child = Some(child);
        Ok(())
    }

    pub fn running(&mut self, i: usize) -> bool {
        match self.daemons[i].child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL and reap.
    pub async fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.daemons[i].child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
        self.daemons[i].pid = None;
    }

    /// SIGTERM and wait up to `within` for the exit; Err with what happened otherwise (the
    /// daemon is killed then).
    pub async fn terminate(&mut self, i: usize, within: Duration) -> Result<(), String> {
        let Some(mut c) = self.daemons[i].child.take() else { return Ok(()) };
        self.daemons[i].pid = None;
        if let Some(pid) = c.id() {
            // SAFETY: sending a signal to our own child.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        match tokio::time::timeout(within, c.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(format!("exited with {status} after SIGTERM")),
            Ok(Err(e)) => Err(format!("cannot be waited for: {e}")),
            Err(_) => {
                let _ = c.start_kill();
                let _ = c.wait().await;
                Err(format!("did not exit within {within:?} of SIGTERM"))
            }
        }
    }

    /// GET /readyz of daemon `i` → HTTP status.
    pub async fn readyz(&self, i: usize) -> Option<u16> {
        turnd_harness::http_status(self.daemons[i].port, "/readyz").await
    }

    pub fn daemon_log(&self, i: usize) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.daemons[i].log).unwrap_or_default())
            .into_owned()
    }

    /// Drops the database and deletes the prefix's exchanges and queues (thread queues expire).
    pub async fn cleanup(&mut self, deployments: &[String]) {
        for i in 0..self.daemons.len() {
            self.kill(i).await;
        }
        self.pool.close().await;
        let _ = services::drop_database(&self.admin_url, &self.db_name).await;
        let queues = services::queues(
            &self.prefix,
            self.config.intake.max_attempts,
            deployments.iter().map(String::as_str),
            &["chaos-replies"],
        );
        let exchanges = services::exchanges(&self.prefix);
        let _ = services::delete_broker_objects(
            turnd_harness::first_url(&self.amqp_url),
            &queues,
            &exchanges,
        )
        .await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A comma-separated URL list, starting from its `i`-th entry.
fn rotate(urls: &str, i: usize) -> String {
    let list: Vec<&str> = urls.split(',').collect();
    let k = i % list.len();
    list[k..].iter().chain(&list[..k]).copied().collect::<Vec<_>>().join(",")
}
