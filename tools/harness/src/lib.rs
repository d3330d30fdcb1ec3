//! turnd's test harness, one for the integration tests (`tests/it/`), `turnd-bench` and
//! `turnd-chaos`: a fresh PostgreSQL database and a fresh `amqp.prefix` per test, real
//! `turnd run` processes as pods, a client that publishes turns and collects the terminal
//! events, the exactly-once check ([`exactly_once`]), databases and topology made and removed ([`services`]), HTTP probes.
//! Everything waits on conditions with a timeout; nothing sleeps blindly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{Value, json};
use sqlx::PgPool;

pub mod exactly_once;
pub mod services;

pub use exactly_once::{Event, Expected, Ledger, Verdict};

pub const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The directory of the workspace's binaries (`target/<profile>`): the running executable's
/// own, or its parent when that is `deps` (a test binary). `CARGO_BIN_EXE_*` names only the
/// binaries of the test's own package, and the test worker lives in this one.
pub fn bin_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("the running executable's path");
        let dir = exe.parent().expect("the executable's directory");
        if dir.file_name().is_some_and(|n| n == "deps") {
            dir.parent().unwrap_or(dir).to_path_buf()
        } else {
            dir.to_path_buf()
        }
    })
}

/// A binary of the workspace; panics naming the build command when it was not built.
pub fn workspace_bin(name: &str) -> &'static str {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the workspace first (`cargo build --workspace --all-targets`, \
         as scripts/test.sh does)",
        path.display()
    );
    Box::leak(path.display().to_string().into_boxed_str())
}

pub fn turnd_bin() -> &'static str {
    workspace_bin("turnd")
}

pub fn test_worker() -> &'static str {
    workspace_bin("turnd-test-worker")
}

/// Tests that stop or cut the shared PostgreSQL or RabbitMQ run alone although every test is
/// in one binary: each cluster holds this lock shared, theirs ([`Cluster::alone`]) holds it
/// exclusively. tokio's lock is fair, so once such a test waits no new cluster starts; it runs
/// when the ones running end, and the others after it.
static SERVICES: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// How a cluster uses the shared services (held until the cluster is cleaned up).
enum Services {
    Shared {
        _guard: tokio::sync::RwLockReadGuard<'static, ()>,
    },
    Alone {
        _guard: tokio::sync::RwLockWriteGuard<'static, ()>,
    },
    /// Services of its own ([`Cluster::on`]): no lock.
    Own,
}

/// One isolated cluster: its database, its prefix, its daemons.
pub struct Cluster {
    pub db_name: String,
    pub db_url: String,
    pub prefix: String,
    /// PostgreSQL (admin database) and RabbitMQ this cluster runs on: the shared services, or
    /// the ones of [`Cluster::on`].
    pub pg_admin: String,
    pub amqp: String,
    dir: Option<tempfile::TempDir>,
    pub root: PathBuf,
    pub pool: PgPool,
    /// Environment every daemon of this cluster gets (tests add to it before starting).
    pub env: Vec<(String, String)>,
    /// argv that runs `turnd run` (e.g. [`WITHOUT_CAPABILITIES`]); empty: run it directly.
    pub daemon_prefix: Vec<String>,
    /// Arguments after `turnd run` (e.g. `--config FILE`).
    pub daemon_args: Vec<String>,
    pub daemons: Vec<Daemon>,
    /// Dropped after `Drop for Cluster` has cleaned up.
    _services: Services,
}

/// Runs a program as the test's uid with no capabilities at all (empty bounding set): what a
/// service user is. Tests run as root, and root's CAP_SYS_PTRACE and CAP_DAC_OVERRIDE would
/// hide what the kernel refuses an ordinary process.
pub const WITHOUT_CAPABILITIES: &[&str] =
    &["setpriv", "--bounding-set", "-all", "--inh-caps", "-all", "--"];

pub struct Daemon {
    pub id: String,
    pub child: Option<Child>,
    pub log: PathBuf,
    pub env: Vec<(String, String)>,
    pub prefix: Vec<String>,
    pub args: Vec<String>,
}

impl Cluster {
    /// A cluster beside the other tests' (the services shared).
    pub async fn new() -> Cluster {
        Cluster::create(Services::Shared { _guard: SERVICES.read().await }, PG_ADMIN, AMQP).await
    }

    /// A cluster for a test that stops or cuts the shared services: it starts once no other
    /// test's cluster exists, and none starts until it is gone.
    pub async fn alone() -> Cluster {
        Cluster::create(Services::Alone { _guard: SERVICES.write().await }, PG_ADMIN, AMQP).await
    }

    /// A cluster on other services (tests/it/past_one_machine.rs: a RabbitMQ cluster, a
    /// PostgreSQL pair): `pg_admin` is a URL of the server's `postgres` database, `amqp` the
    /// daemons' `amqp.url` (a comma-separated list is fine); the test's own AMQP connections
    /// (topology cleanup) use its first URL.
    pub async fn on(pg_admin: &str, amqp: &str) -> Cluster {
        Cluster::create(Services::Own, pg_admin, amqp).await
    }

    async fn create(services: Services, pg_admin: &str, amqp: &str) -> Cluster {
        let suffix = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let db_name = format!("turnd_t_{suffix}");
        let prefix = format!("t{suffix}");
        services::create_database(pg_admin, &db_name).await.expect("create test database");
        let db_url = services::database_url(pg_admin, &db_name).expect("pg_admin is a URL");
        let pool = PgPool::connect(&db_url).await.expect("connect to test database");
        turnd::store::migrator().run(&pool).await.expect("migrate test database");
        let dir = tempfile::tempdir().expect("tempdir");
        for sub in ["log", "excl", "pid", "state"] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("mkdir");
        }
        let root = dir.path().to_path_buf();
        let d = root.as_path();
        let env = vec![
            ("TURND_DATABASE__URL".into(), db_url.clone()),
            ("TURND_DATABASE__MAX_CONNECTIONS".into(), "6".into()),
            ("TURND_AMQP__PREFIX".into(), prefix.clone()),
            ("TURND_AMQP__URL".into(), amqp.into()),
            ("TURND_DAEMON__STATE_DIR".into(), d.join("state").display().to_string()),
            ("TURND_WORKER__COMMAND".into(), format!("[\"{}\"]", test_worker())),
            ("TURND_HTTP__LISTEN".into(), String::new()),
            ("TURND_SWEEP__INTERVAL".into(), "300ms".into()),
            ("TURND_SWEEP__ADOPTION_DELAY".into(), "1s".into()),
            ("TURND_TURN__DEADLINE".into(), "5s".into()),
            ("TURND_INTAKE__RETRY_DELAY".into(), "200ms".into()),
            ("TURND_INTAKE__RETRY_MAX_DELAY".into(), "400ms".into()),
            ("TURND_SHUTDOWN__GRACE".into(), "5s".into()),
            ("TURND_WORKER__STOP_TIMEOUT".into(), "1s".into()),
            ("TURND_LOG__LEVEL".into(), "turnd=trace,info".into()),
            ("TURND_WORKER_ENV_TEST_WORKER_LOG".into(), d.join("log").display().to_string()),
            ("TURND_WORKER_ENV_TEST_WORKER_EXCLUSIVE".into(), d.join("excl").display().to_string()),
            (
                "TURND_WORKER_ENV_TEST_WORKER_PIDFILE_DIR".into(),
                d.join("pid").display().to_string(),
            ),
        ];
        Cluster {
            db_name,
            db_url,
            prefix,
            pg_admin: pg_admin.to_owned(),
            amqp: amqp.to_owned(),
            dir: Some(dir),
            root,
            pool,
            env,
            daemon_prefix: Vec::new(),
            daemon_args: Vec::new(),
            daemons: Vec::new(),
            _services: services,
        }
    }

    pub fn set(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
    }

    pub fn path(&self, sub: &str) -> PathBuf {
        self.root.join(sub)
    }

    /// Starts `turnd run` with the cluster's environment plus `extra`; waits until it is
    /// ready to serve. Returns its index.
    pub async fn start_daemon(&mut self, extra: &[(&str, &str)]) -> usize {
        let i = self.daemons.len();
        let id = format!("d{i}");
        let mut env = self.env.clone();
        env.push(("TURND_DAEMON__ID".into(), id.clone()));
        for (k, v) in extra {
            env.retain(|(ek, _)| ek != k);
            env.push(((*k).to_owned(), (*v).to_owned()));
        }
        let log = self.root.join(format!("{id}.log"));
        let mut daemon = Daemon {
            id,
            child: None,
            log,
            env,
            prefix: self.daemon_prefix.clone(),
            args: self.daemon_args.clone(),
        };
        daemon.spawn().await;
        self.daemons.push(daemon);
        i
    }

    pub async fn restart(&mut self, i: usize) {
        self.daemons[i].spawn().await;
    }

    pub async fn client(&self) -> Client {
        Client::new(&self.prefix).await
    }

    /// Runs a one-shot `turnd` command with this cluster's configuration, as its daemons
    /// get it (as the OS user `tester`, which the audit log records), off the async runtime.
    pub async fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = std::process::Command::new(turnd_bin());
        cmd.args(args).env_clear().envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.env("USER", "tester").env("TURND_LOG__LEVEL", "warn");
        tokio::task::spawn_blocking(move || cmd.output().expect("run turnd"))
            .await
            .expect("turnd command thread")
    }

    /// A turn's state (`queued`, `running`, `done`), None when it has no record.
    pub async fn turn_state(&self, deployment: &str, message_id: &str) -> Option<String> {
        sqlx::query_scalar(
            "SELECT state FROM turnd_turns WHERE deployment = $1 AND message_id = $2",
        )
        .bind(deployment)
        .bind(message_id)
        .fetch_optional(&self.pool)
        .await
        .expect("read turn state")
    }

    /// Rows of turnd_turns not done.
    pub async fn pending(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM turnd_turns WHERE state <> 'done'")
            .fetch_one(&self.pool)
            .await
            .expect("count pending")
    }

    pub async fn unpublished(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM turnd_outbox WHERE published_at IS NULL")
            .fetch_one(&self.pool)
            .await
            .expect("count unpublished")
    }

    /// The test worker's event log of a deployment: (kind, pid, rest).
    pub fn worker_log(&self, deployment: &str) -> Vec<Vec<String>> {
        let text = std::fs::read_to_string(self.path("log").join(format!("{deployment}.log")))
            .unwrap_or_default();
        text.lines().map(|l| l.split(' ').map(str::to_owned).collect()).collect()
    }

    /// The most workers of `deployments` alive at one moment, from the test worker's log
    /// (`start` to `exit`, per pid; a worker that logged no exit counts as alive to the end).
    pub fn max_live_workers(&self, deployments: &[String]) -> usize {
        let mut edges: Vec<(u128, i32)> = Vec::new();
        for deployment in deployments {
            let mut open: HashMap<String, u128> = HashMap::new();
            for line in self.worker_log(deployment) {
                let at = |i: usize| line.get(i).and_then(|n| n.parse::<u128>().ok());
                match line.first().map(String::as_str) {
                    Some("start") => {
                        if let (Some(pid), Some(t)) = (line.get(1), at(3)) {
                            open.insert(pid.clone(), t);
                            edges.push((t, 1));
                        }
                    }
                    Some("exit") => {
                        if let (Some(pid), Some(t)) = (line.get(1), at(2))
                            && open.remove(pid).is_some()
                        {
                            edges.push((t, -1));
                        }
                    }
                    _ => {}
                }
            }
        }
        // An exit and a start at the same instant do not overlap.
        edges.sort();
        let (mut live, mut most) = (0i32, 0i32);
        for (_, d) in edges {
            live += d;
            most = most.max(live);
        }
        usize::try_from(most).unwrap_or(0)
    }

    /// Every worker-side exclusivity violation recorded.
    pub fn violations(&self) -> String {
        std::fs::read_to_string(self.path("excl").join("violations.log")).unwrap_or_default()
    }

    pub fn worker_pid(&self, deployment: &str) -> Option<i32> {
        std::fs::read_to_string(self.path("pid").join(format!("{deployment}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Confines this cluster's workers: `worker.sandbox = mode` (`landlock`, `auto`). The test
    /// worker's log, pid-file and exclusivity directories lie outside its workspace, so they
    /// go into `worker.sandbox_write`.
    pub fn confine_workers(&mut self, mode: &str) {
        self.set("TURND_WORKER__SANDBOX", mode);
        let dirs: Vec<String> = ["log", "excl", "pid"]
            .iter()
            .map(|d| format!("{:?}", self.path(d).display().to_string()))
            .collect();
        self.set("TURND_WORKER__SANDBOX_WRITE", &format!("[{}]", dirs.join(", ")));
    }

    /// A workspace of this cluster's daemons (CONTRACT §5).
    pub fn workspace(&self, organization: &str, agent: &str) -> PathBuf {
        self.path("state").join("workspaces").join(organization).join(agent)
    }

    pub fn daemon_log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.daemons[i].log).unwrap_or_default()
    }
}

impl Daemon {
    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("daemon log");
        let start_len = log.metadata().map(|m| m.len()).unwrap_or(0);
        let mut cmd = match self.prefix.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(turnd_bin());
                cmd
            }
            None => Command::new(turnd_bin()),
        };
        cmd.arg("run")
            .args(&self.args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        let child = self.child.insert(cmd.spawn().expect("spawn turnd run"));
        let within = Duration::from_secs(30);
        let exited = || child.try_wait().ok().flatten();
        if let Err(e) = wait_ready(&self.log, start_len, within, exited).await {
            panic!("daemon {} {e}; see {}", self.id, self.log.display());
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            unsafe { libc::kill(pid as i32, sig) };
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (bounded) for the exit status.
    pub async fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        self.signal(libc::SIGTERM);
        self.exit_within(within).await
    }

    /// Waits (bounded) for the daemon to exit by itself; SIGKILL when it does not (None).
    pub async fn exit_within(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if start.elapsed() > within {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            d.kill();
        }
        if std::env::var_os("TURND_TEST_KEEP").is_some() {
            eprintln!(
                "keeping database {} and prefix {} (logs in {:?})",
                self.db_name, self.prefix, self.root
            );
            if let Some(dir) = self.dir.take() {
                let _ = dir.keep();
            }
            return;
        }
        let db = self.db_name.clone();
        let prefix = self.prefix.clone();
        // Every retry delay queue any of its daemons declared: the largest max_attempts set.
        let max_attempts = std::iter::once(&self.env)
            .chain(self.daemons.iter().map(|d| &d.env))
            .flatten()
            .filter(|(k, _)| k == "TURND_INTAKE__MAX_ATTEMPTS")
            .filter_map(|(_, v)| v.parse().ok())
            .fold(config_for(&prefix).intake.max_attempts, u32::max);
        // The outage tests' durable reply queue (tests/it/outage.rs).
        let queues =
            services::queues(&prefix, max_attempts, [], &["outage-replies", "example-replies"]);
        let (pg_admin, amqp) = (self.pg_admin.clone(), first_url(&self.amqp).to_owned());
        services::on_own_thread(async move {
            let _ = services::drop_database(&pg_admin, &db).await;
            // Thread queues expire on their own.
            let _ = services::delete_broker_objects(&amqp, &queues, &services::exchanges(&prefix))
                .await;
        });
    }
}

/// The first URL of a comma-separated `amqp.url` list.
pub fn first_url(urls: &str) -> &str {
    urls.split(',').next().unwrap_or(urls)
}

/// A producer and reply consumer for one prefix.
pub struct Client {
    pub prefix: String,
    pub conn: Connection,
    pub publisher: Channel,
    replies: lapin::Consumer,
    /// Every event received, in order, redeliveries included.
    pub events: Vec<Event>,
    /// The same, de-duplicated: what the exactly-once check reads.
    pub ledger: Ledger,
}

impl Client {
    pub async fn new(prefix: &str) -> Client {
        Client::with_config(prefix, &config_for(prefix)).await
    }

    /// Like [`Client::new`], declaring the topology as `config` says (it must match the
    /// daemons': e.g. the delay queues' TTLs follow `intake.retry_delay`).
    pub async fn with_config(prefix: &str, config: &turnd::config::Config) -> Client {
        Client::on(AMQP, prefix, config).await
    }

    /// A client connected to `amqp` (one URL: e.g. one node of a RabbitMQ cluster).
    pub async fn on(amqp: &str, prefix: &str, config: &turnd::config::Config) -> Client {
        let conn = Connection::connect(amqp, ConnectionProperties::default())
            .await
            .expect("connect RabbitMQ");
        let publisher = conn.create_channel().await.expect("channel");
        publisher.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm mode");
        // Declare the topology the way a daemon would, so a publish before any daemon is up
        // is kept; the daemons' declarations are identical.
        turnd::broker::declare_topology(&conn, config).await.expect("declare topology");
        let ch = conn.create_channel().await.expect("channel");
        let q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .expect("reply queue");
        ch.queue_bind(
            q.name().clone(),
            format!("{prefix}.replies").as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind reply queue");
        let replies = ch
            .basic_consume(
                q.name().clone(),
                "".into(),
                BasicConsumeOptions { no_ack: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .expect("consume replies");
        Client {
            prefix: prefix.to_owned(),
            conn,
            publisher,
            replies,
            events: Vec::new(),
            ledger: Ledger::default(),
        }
    }

    /// Publishes raw bytes to `<prefix>.turns` with a confirm.
    pub async fn publish_raw(&self, body: &[u8]) {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(ShortString::from("application/json"));
        let confirm = self
            .publisher
            .basic_publish(
                format!("{}.turns", self.prefix).as_str().into(),
                "turn.test".into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .expect("publish");
        assert!(confirm.await.expect("confirm").is_ack(), "broker nacked a turn");
    }

    /// Publishes a turn with these AMQP headers (e.g. forged broker headers), confirmed.
    pub async fn publish_with_headers(&self, turn: &Value, headers: FieldTable) {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(ShortString::from("application/json"))
            .with_headers(headers);
        let confirm = self
            .publisher
            .basic_publish(
                format!("{}.turns", self.prefix).as_str().into(),
                "turn.test".into(),
                BasicPublishOptions::default(),
                turn.to_string().as_bytes(),
                props,
            )
            .await
            .expect("publish");
        assert!(confirm.await.expect("confirm").is_ack(), "broker nacked a turn");
    }

    pub async fn publish(&self, turn: &Value) {
        self.publish_raw(turn.to_string().as_bytes()).await;
    }

    /// Receives events until `done(events)` holds, or panics after `within`.
    pub async fn wait_until(
        &mut self,
        within: Duration,
        what: &str,
        done: impl Fn(&[Event]) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + within;
        while !done(&self.events) {
            match tokio::time::timeout_at(deadline, self.replies.next()).await {
                Ok(Some(Ok(d))) => self.receive(&d),
                Ok(other) => panic!("reply consumer ended: {other:?}"),
                Err(_) => panic!(
                    "timed out after {within:?} waiting for {what}; got {} events: {:#?}",
                    self.events.len(),
                    self.events
                        .iter()
                        .map(|e| (
                            e.message_id().to_owned(),
                            e.kind().to_owned(),
                            e.code().to_owned()
                        ))
                        .collect::<Vec<_>>()
                ),
            }
        }
    }

    /// Waits for terminal events for every id in `ids`.
    pub async fn wait_for(&mut self, ids: &[String], within: Duration) {
        let ids = ids.to_vec();
        self.wait_until(within, &format!("events for {ids:?}"), move |ev| {
            ids.iter().all(|id| ev.iter().any(|e| e.message_id() == id))
        })
        .await;
    }

    /// Keeps receiving for `d` (to prove something does NOT arrive).
    pub async fn drain_for(&mut self, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        while let Ok(Some(Ok(d))) = tokio::time::timeout_at(deadline, self.replies.next()).await {
            self.receive(&d);
        }
    }

    fn receive(&mut self, d: &lapin::message::Delivery) {
        let event_id = d.properties.message_id().as_ref().map(|s| s.as_str());
        let correlation_id = d.properties.correlation_id().as_ref().map(|s| s.as_str());
        let routing_key = d.routing_key.as_str();
        let event = self.ledger.record(event_id, correlation_id, routing_key, &d.data).cloned();
        // A redelivery is the event received before; anything else is turnd's fault.
        let event = event
            .or_else(|| {
                let id = event_id?;
                self.events.iter().find(|e| e.event_id == id).cloned()
            })
            .unwrap_or_else(|| panic!("unusable terminal event: {:?}", self.ledger.malformed));
        let traceparent =
            d.properties.headers().as_ref().and_then(|h| match h.inner().get("traceparent") {
                Some(lapin::types::AMQPValue::LongString(s)) => {
                    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                }
                _ => None,
            });
        self.events.push(Event { traceparent, ..event });
    }

    /// Events per messageId, de-duplicated on the AMQP message_id.
    pub fn by_message(&self) -> HashMap<String, Vec<Event>> {
        self.ledger.by_message.clone()
    }

    /// Asserts one terminal event per id, naming it (correlation_id); returns each.
    pub fn assert_exactly_once(&self, ids: &[String]) -> HashMap<String, Event> {
        let verdict = self.ledger.verdict(ids.iter().map(|id| Expected::id(id)));
        // Events of other turns are not this check's business.
        let verdict = Verdict { unknown: Vec::new(), ..verdict };
        assert!(verdict.holds(), "exactly once: {:#?}", verdict.problems());
        ids.iter().filter_map(|id| Some((id.clone(), self.ledger.first(id)?.clone()))).collect()
    }

    /// [`Client::assert_exactly_once`], and no event for any other turn.
    pub fn assert_exactly_once_and_nothing_else(&self, ids: &[String]) {
        let verdict = self.ledger.verdict(ids.iter().map(|id| Expected::id(id)));
        assert!(verdict.holds(), "exactly once and nothing else: {:#?}", verdict.problems());
    }

    /// Publishes `turn` and waits for its terminal event.
    pub async fn ask(&mut self, turn: &Value, within: Duration) -> Event {
        self.publish(turn).await;
        let id = mid(turn);
        self.wait_for(std::slice::from_ref(&id), within).await;
        self.event(&id).cloned().expect("the event just waited for")
    }

    pub fn event(&self, message_id: &str) -> Option<&Event> {
        self.events.iter().find(|e| e.message_id() == message_id)
    }
}

/// A config with defaults and this prefix (for declaring identical topology).
pub fn config_for(prefix: &str) -> turnd::config::Config {
    let env = vec![
        ("TURND_AMQP__PREFIX".to_owned(), prefix.to_owned()),
        ("TURND_INTAKE__RETRY_DELAY".to_owned(), "200ms".to_owned()),
        ("TURND_INTAKE__RETRY_MAX_DELAY".to_owned(), "400ms".to_owned()),
    ];
    turnd::config::Config::load_from(Some(Path::new("/dev/null")), env).expect("test config")
}

/// A turn with a fresh messageId.
pub fn turn(agent: &str, conversation: &str, payload: Value) -> Value {
    org_turn("org1", agent, conversation, payload)
}

/// A turn of organization `org` with a fresh messageId.
pub fn org_turn(org: &str, agent: &str, conversation: &str, payload: Value) -> Value {
    json!({
        "messageId": uuid::Uuid::new_v4().to_string(),
        "agentId": agent,
        "organizationId": org,
        "conversationId": conversation,
        "payload": payload,
    })
}

pub fn mid(turn: &Value) -> String {
    turn["messageId"].as_str().expect("messageId").to_owned()
}

/// The deployment name a turn maps to (computed by the library, as the daemon does).
pub fn deployment_of(turn: &Value) -> String {
    turnd::turn::parse(turn.to_string().as_bytes(), 1 << 20)
        .expect("valid turn")
        .deployment
        .as_str()
        .to_owned()
}

/// Why a daemon did not become ready.
#[derive(Debug)]
pub enum NotReady {
    /// It exited first, with this status.
    Exited(std::process::ExitStatus),
    /// It did not say so within the time given.
    TimedOut(Duration),
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotReady::Exited(status) => write!(f, "exited before it was ready ({status})"),
            NotReady::TimedOut(within) => {
                write!(f, "did not log \"turnd ready\" within {within:?}")
            }
        }
    }
}

impl std::error::Error for NotReady {}

/// Waits until a daemon's `log`, from byte `offset` on (what an earlier run wrote is not
/// read), says `turnd ready`. `exited` reports the daemon's exit status once it has one.
pub async fn wait_ready(
    log: &Path,
    offset: u64,
    within: Duration,
    mut exited: impl FnMut() -> Option<std::process::ExitStatus>,
) -> Result<(), NotReady> {
    let start = Instant::now();
    loop {
        let text = std::fs::read(log).unwrap_or_default();
        let tail = &text[usize::try_from(offset).unwrap_or(usize::MAX).min(text.len())..];
        if String::from_utf8_lossy(tail).contains("turnd ready") {
            return Ok(());
        }
        if let Some(status) = exited() {
            return Err(NotReady::Exited(status));
        }
        if start.elapsed() > within {
            return Err(NotReady::TimedOut(within));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `cond` every 20 ms until it holds; panics after `within`.
pub async fn wait_until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < within, "timed out after {within:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Async-condition version of [`wait_until`].
pub async fn wait_for_async<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < within, "timed out after {within:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `read` every 20 ms until it gives a value; panics after `within`.
pub async fn wait_for_value<T, F, Fut>(within: Duration, what: &str, mut read: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = read().await {
            return v;
        }
        assert!(start.elapsed() < within, "timed out after {within:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn process_alive(pid: i32) -> bool {
    // Zombies count as dead: look at the state in /proc.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

/// A TCP proxy in front of a service, which a test can cut (every connection dropped, new
/// ones refused) and restore: an outage without stopping the shared service.
pub struct Proxy {
    pub port: u16,
    /// Where new connections go: [`Proxy::retarget`] moves it, as a service name or a virtual
    /// IP follows a promoted database.
    target: std::sync::Arc<std::sync::atomic::AtomicU16>,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target_port: u16) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let port = listener.local_addr().expect("addr").port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let target = std::sync::Arc::new(std::sync::atomic::AtomicU16::new(target_port));
        let conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> =
            Default::default();
        let (cut2, conns2, target2) = (cut.clone(), conns.clone(), target.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if cut2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target_port = target2.load(Ordering::SeqCst);
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                conns2.lock().unwrap().push(task.abort_handle());
            }
        });
        Proxy { port, target, cut, conns, accept }
    }

    /// New connections go to `port` from now on; existing ones are dropped (they led to a
    /// server that is gone).
    pub fn retarget(&self, port: u16) {
        self.target.store(port, std::sync::atomic::Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// GET http://127.0.0.1:<port><path> → (status, body), with a plain HTTP/1.0 request.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let r = http_request(port, "GET", path, &[], b"").await?;
    Some((r.status, r.body))
}

/// GET http://127.0.0.1:<port><path> → its status code (e.g. a `/readyz` probe).
pub async fn http_status(port: u16, path: &str) -> Option<u16> {
    http_request(port, "GET", path, &[], b"").await.map(|r| r.status)
}

/// One HTTP response as [`http_request`] read it.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lowercased, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }
}

/// Sends `method path` to 127.0.0.1:<port> as one HTTP/1.0 request with `headers` (plus
/// `Host: localhost` unless they name a Host; `("Host", "")` sends none) and `body`, and
/// reads the whole response. None when nothing answers within 10 s (a GET) or 30 s (an
/// action).
pub async fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<HttpResponse> {
    let mut request = format!("{method} {path} HTTP/1.0\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        request.push_str("Host: localhost\r\n");
    }
    for (name, value) in headers {
        if !(name.eq_ignore_ascii_case("host") && value.is_empty()) {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    if !body.is_empty() || method != "GET" {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    let mut raw = request.into_bytes();
    raw.extend_from_slice(body);
    let within = Duration::from_secs(if method == "GET" { 10 } else { 30 });
    http_exchange(port, &raw, within).await
}

/// Sends one HTTP/1.0 request and reads the whole response.
async fn http_exchange(port: u16, request: &[u8], within: Duration) -> Option<HttpResponse> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connect = tokio::net::TcpStream::connect(("127.0.0.1", port));
    let mut s = tokio::time::timeout(Duration::from_secs(5), connect).await.ok()?.ok()?;
    s.write_all(request).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(within, s.read_to_end(&mut buf)).await.ok()?.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Some(HttpResponse { status, headers, body: body.to_owned() })
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn try_free_port() -> std::io::Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr().map(|a| a.port())
}

pub fn free_port() -> u16 {
    try_free_port().expect("a free port on 127.0.0.1")
}

/// POST http://127.0.0.1:<port><path> with an empty body and, when given, an
/// `Authorization: Bearer <token>` header → (status, body).
pub async fn http_post(port: u16, path: &str, token: Option<&str>) -> Option<(u16, String)> {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> =
        auth.as_deref().map(|a| ("Authorization", a)).into_iter().collect();
    let r = http_request(port, "POST", path, &headers, b"").await?;
    Some((r.status, r.body))
}

/// A log without its terminal colour codes (CSI: ESC [ parameters final byte in `@`..`~`).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if ('@'..='~').contains(&d) && d != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A minimal AMQP 0-9-1 publisher over a plain socket, for messages no client library would
/// send: the content header's headers table is given already encoded, so it may nest deeper
/// than any encoder would recurse (lapin's does, once per level). Publisher confirms on.
pub struct RawPublisher {
    stream: tokio::net::TcpStream,
    /// The broker's frame_max, as tuned.
    pub frame_max: u32,
}

/// What the broker said to a raw publish.
#[derive(Debug, PartialEq)]
pub enum RawOutcome {
    Acked,
    Nacked,
    /// The broker closed the connection or channel: its reply code and text.
    Closed(u16, String),
}

impl RawPublisher {
    pub async fn connect() -> RawPublisher {
        use tokio::io::AsyncWriteExt;
        let mut stream =
            tokio::net::TcpStream::connect(("127.0.0.1", 5672)).await.expect("connect RabbitMQ");
        stream.write_all(b"AMQP\x00\x00\x09\x01").await.expect("protocol header");
        let mut p = RawPublisher { stream, frame_max: 0 };
        p.expect_method(0, 10, 10).await; // connection.start
        let mut start_ok = method(10, 11);
        start_ok.extend(0u32.to_be_bytes()); // client properties: empty table
        short_str(&mut start_ok, "PLAIN");
        long_str(&mut start_ok, b"\0guest\0guest");
        short_str(&mut start_ok, "en_US");
        p.send(1, 0, &start_ok).await;
        let tune = p.expect_method(0, 10, 30).await;
        let channel_max = u16::from_be_bytes([tune[4], tune[5]]);
        p.frame_max = u32::from_be_bytes([tune[6], tune[7], tune[8], tune[9]]);
        let mut tune_ok = method(10, 31);
        tune_ok.extend(channel_max.to_be_bytes());
        tune_ok.extend(p.frame_max.to_be_bytes());
        tune_ok.extend(0u16.to_be_bytes()); // no heartbeats
        p.send(1, 0, &tune_ok).await;
        let mut open = method(10, 40);
        short_str(&mut open, "/");
        short_str(&mut open, "");
        open.push(0);
        p.send(1, 0, &open).await;
        p.expect_method(0, 10, 41).await;
        let mut channel_open = method(20, 10);
        short_str(&mut channel_open, "");
        p.send(1, 1, &channel_open).await;
        p.expect_method(1, 20, 11).await;
        let mut select = method(85, 10);
        select.push(0);
        p.send(1, 1, &select).await;
        p.expect_method(1, 85, 11).await;
        p
    }

    /// Publishes one persistent JSON message whose headers are `headers` (an encoded field
    /// table, its length prefix included) and waits for the broker's answer.
    pub async fn publish(
        &mut self,
        exchange: &str,
        routing_key: &str,
        headers: &[u8],
        body: &[u8],
    ) -> RawOutcome {
        let mut publish = method(60, 40);
        publish.extend(0u16.to_be_bytes());
        short_str(&mut publish, exchange);
        short_str(&mut publish, routing_key);
        publish.push(0);
        self.send(1, 1, &publish).await;
        let mut header = Vec::with_capacity(headers.len() + 64);
        header.extend(60u16.to_be_bytes());
        header.extend(0u16.to_be_bytes());
        header.extend((body.len() as u64).to_be_bytes());
        header.extend(0xB000u16.to_be_bytes()); // content-type, headers, delivery-mode
        short_str(&mut header, "application/json");
        header.extend(headers);
        header.push(2);
        self.send(2, 1, &header).await;
        for chunk in body.chunks(self.frame_max as usize - 8) {
            self.send(3, 1, chunk).await;
        }
        loop {
            let Some((kind, _, payload)) = self.read_frame().await else {
                return RawOutcome::Closed(0, "connection dropped".into());
            };
            if kind != 1 || payload.len() < 4 {
                continue;
            }
            match (
                u16::from_be_bytes([payload[0], payload[1]]),
                u16::from_be_bytes([payload[2], payload[3]]),
            ) {
                (60, 80) => return RawOutcome::Acked,
                (60, 120) => return RawOutcome::Nacked,
                (10, 50) | (20, 40) => {
                    let code = u16::from_be_bytes([payload[4], payload[5]]);
                    let len = payload[6] as usize;
                    let text = String::from_utf8_lossy(&payload[7..7 + len]).into_owned();
                    return RawOutcome::Closed(code, text);
                }
                _ => {}
            }
        }
    }

    /// Closes the connection politely (best effort).
    pub async fn close(mut self) {
        let mut close = method(10, 50);
        close.extend(200u16.to_be_bytes());
        short_str(&mut close, "bye");
        close.extend([0, 0, 0, 0]);
        self.send(1, 0, &close).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.read_frame()).await;
    }

    async fn send(&mut self, kind: u8, channel: u16, payload: &[u8]) {
        use tokio::io::AsyncWriteExt;
        let mut frame = Vec::with_capacity(payload.len() + 8);
        frame.push(kind);
        frame.extend(channel.to_be_bytes());
        frame.extend((payload.len() as u32).to_be_bytes());
        frame.extend(payload);
        frame.push(0xCE);
        self.stream.write_all(&frame).await.expect("write frame");
    }

    /// The next frame; None when the broker dropped the connection.
    async fn read_frame(&mut self) -> Option<(u8, u16, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        let mut head = [0u8; 7];
        let read = tokio::time::timeout(Duration::from_secs(30), self.stream.read_exact(&mut head));
        read.await.expect("broker answers within 30 s").ok()?;
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
        let mut payload = vec![0u8; size + 1];
        self.stream.read_exact(&mut payload).await.ok()?;
        payload.pop();
        Some((head[0], u16::from_be_bytes([head[1], head[2]]), payload))
    }

    /// Reads frames until the method (class, method) on `channel`; returns its payload.
    async fn expect_method(&mut self, channel: u16, class: u16, id: u16) -> Vec<u8> {
        loop {
            let (kind, ch, payload) = self.read_frame().await.expect("broker kept the connection");
            if kind == 1 && ch == channel && payload.len() >= 4 {
                let got = (
                    u16::from_be_bytes([payload[0], payload[1]]),
                    u16::from_be_bytes([payload[2], payload[3]]),
                );
                assert_ne!(got, (10, 50), "broker closed the connection: {payload:?}");
                if got == (class, id) {
                    return payload;
                }
            }
        }
    }
}

fn method(class: u16, id: u16) -> Vec<u8> {
    let mut m = class.to_be_bytes().to_vec();
    m.extend(id.to_be_bytes());
    m
}

fn short_str(out: &mut Vec<u8>, s: &str) {
    out.push(s.len() as u8);
    out.extend(s.as_bytes());
}

fn long_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend((s.len() as u32).to_be_bytes());
    out.extend(s);
}

/// An encoded field table of `entries` (key, encoded value with its type tag), its length
/// prefix included.
pub fn encoded_table(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (key, value) in entries {
        short_str(&mut body, key);
        body.extend(value);
    }
    let mut table = (body.len() as u32).to_be_bytes().to_vec();
    table.extend(body);
    table
}

/// An encoded value (type tag first): `depth` field arrays (`b'A'`) or field tables (`b'F'`,
/// each holding the next under the key "k") nested in one another around a long string,
/// built without recursion.
pub fn nested_value(kind: u8, depth: usize) -> Vec<u8> {
    const BOTTOM: &[u8] = b"S\x00\x00\x00\x06bottom";
    let key: &[u8] = if kind == b'F' { &[1, b'k'] } else { &[] };
    let level = 5 + key.len();
    let mut out = Vec::with_capacity(BOTTOM.len() + depth * level);
    for i in 0..depth {
        // This level's size: its own tag and length, its key, and everything inside it.
        let size = BOTTOM.len() + (depth - i) * level;
        out.push(kind);
        out.extend(((size - 5) as u32).to_be_bytes());
        out.extend(key);
    }
    out.extend(BOTTOM);
    out
}

/// Messages in a queue (passive declare).
pub async fn queue_len(ch: &Channel, queue: &str) -> u32 {
    let passive = QueueDeclareOptions { passive: true, durable: true, ..Default::default() };
    ch.queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .expect("passive declare")
        .message_count()
}

/// Whether `queue` exists (a passive declare on a channel of its own: a missing queue closes it).
pub async fn queue_exists(conn: &Connection, queue: &str) -> bool {
    let ch = conn.create_channel().await.expect("channel");
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let found = ch.queue_declare(queue.into(), passive, FieldTable::default()).await.is_ok();
    if found {
        let _ = ch.close(200, "looked".into()).await;
    }
    found
}

/// Closes, from the broker's side (`rabbitmqctl close_connection`), every AMQP connection
/// whose client-provided name is `name`; returns how many it closed.
pub fn close_broker_connections(name: &str) -> usize {
    let rabbitmqctl = |args: &[&str]| {
        let out = Command::new("rabbitmqctl").args(args).output().expect("run rabbitmqctl");
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let listed =
        rabbitmqctl(&["-q", "list_connections", "--no-table-headers", "pid", "client_properties"]);
    let tag = format!("{{\"connection_name\",\"{name}\"}}");
    let pids: Vec<&str> = listed
        .lines()
        .filter(|line| line.contains(&tag))
        .filter_map(|line| line.split('\t').next())
        .collect();
    for pid in &pids {
        rabbitmqctl(&["close_connection", pid, "closed by a test"]);
    }
    pids.len()
}

/// A parked record: (code, reason, message_id, deployment, attempts).
pub type ParkedRow = (String, String, Option<String>, Option<String>, i32);

/// (body, code, reason, message_id, deployment, attempts) as read.
type ParkedRecord = (Vec<u8>, String, String, Option<String>, Option<String>, i32);

/// The parked records in `turnd_parked`, oldest first: (body, row).
pub async fn parked(cluster: &Cluster) -> Vec<(Vec<u8>, ParkedRow)> {
    let rows: Vec<ParkedRecord> = sqlx::query_as(
        "SELECT body, code, reason, message_id, deployment, attempts FROM turnd_parked ORDER BY id",
    )
    .fetch_all(&cluster.pool)
    .await
    .expect("read parked");
    rows.into_iter().map(|(b, c, r, m, d, a)| (b, (c, r, m, d, a))).collect()
}

/// Waits until at least `n` turns are recorded as parked; returns them.
pub async fn wait_parked(
    cluster: &Cluster,
    n: usize,
    within: Duration,
) -> Vec<(Vec<u8>, ParkedRow)> {
    let start = Instant::now();
    loop {
        let p = parked(cluster).await;
        if p.len() >= n {
            return p;
        }
        assert!(
            start.elapsed() < within,
            "timed out waiting for {n} parked turns; have {}",
            p.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads (and removes) `n` messages from `<prefix>.parked`: (body, headers).
pub async fn read_parked_queue(
    client: &Client,
    n: usize,
    within: Duration,
) -> Vec<(Vec<u8>, FieldTable)> {
    let ch = client.conn.create_channel().await.expect("channel");
    let parked = format!("{}.parked", client.prefix);
    let mut consumer = ch
        .basic_consume(
            parked.as_str().into(),
            "".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .expect("consume parked");
    let mut out = Vec::new();
    while out.len() < n {
        let d = tokio::time::timeout(within, consumer.next())
            .await
            .unwrap_or_else(|_| {
                panic!("timed out waiting for parked turn {} of {n}", out.len() + 1)
            })
            .expect("parked consumer ended")
            .expect("parked delivery");
        out.push((d.data, d.properties.headers().clone().unwrap_or_default()));
    }
    let _ = ch.close(200, "done".into()).await;
    out
}

/// A producer as CONTRACT §4 describes one: its own channel with publisher confirms, each turn
/// published only after the previous one's confirm. Publishes `turns` in order to
/// `<prefix>.turns` (routing key `turn.<organizationId>`), then closes its channel.
pub async fn publish_confirmed_in_order(conn: &Connection, prefix: &str, turns: &[Value]) {
    let ch = conn.create_channel().await.expect("producer channel");
    ch.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm mode");
    let exchange = format!("{prefix}.turns");
    for t in turns {
        let key = format!("turn.{}", t["organizationId"].as_str().unwrap_or("_"));
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(ShortString::from("application/json"));
        let confirm = ch
            .basic_publish(
                exchange.as_str().into(),
                key.as_str().into(),
                BasicPublishOptions::default(),
                t.to_string().as_bytes(),
                props,
            )
            .await
            .expect("publish");
        assert!(confirm.await.expect("confirm").is_ack(), "broker nacked a turn");
    }
    let _ = ch.close(200, "published".into()).await;
}

/// Accept-order inversions: for each conversation (turns in publish order), the pairs of
/// consecutive turns whose accept sequence (`turnd_turns.seq`) goes backwards. Turns not
/// armed are reported as missing.
pub async fn accept_inversions(
    pool: &PgPool,
    conversations: &[Vec<Value>],
) -> (Vec<String>, Vec<String>) {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT message_id, seq FROM turnd_turns").fetch_all(pool).await.unwrap();
    let seq: HashMap<String, i64> = rows.into_iter().collect();
    let mut inversions = Vec::new();
    let mut missing = Vec::new();
    for turns in conversations {
        let mut last: Option<(String, i64)> = None;
        for t in turns {
            let id = mid(t);
            let Some(&s) = seq.get(&id) else {
                missing.push(id);
                continue;
            };
            if let Some((prev, ps)) = &last
                && *ps > s
            {
                inversions.push(format!("{prev} (seq {ps}) accepted after {id} (seq {s})"));
            }
            last = Some((id, s));
        }
    }
    (inversions, missing)
}

/// One span as an OTLP collector received it.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// Attributes as text (OTLP JSON carries integers as strings).
    pub attributes: HashMap<String, String>,
    /// `service.instance.id` of the resource: the daemon that exported it.
    pub instance: String,
    pub error: bool,
}

/// An in-test OTLP/HTTP collector taking JSON (`POST /v1/traces`), keeping every span.
pub struct OtlpReceiver {
    pub port: u16,
    spans: std::sync::Arc<std::sync::Mutex<Vec<ReceivedSpan>>>,
    server: tokio::task::JoinHandle<()>,
}

impl OtlpReceiver {
    pub async fn start() -> OtlpReceiver {
        OtlpReceiver::serve(Duration::ZERO).await
    }

    /// A collector that holds every request for `stall` before taking it.
    pub async fn stalled(stall: Duration) -> OtlpReceiver {
        OtlpReceiver::serve(stall).await
    }

    async fn serve(stall: Duration) -> OtlpReceiver {
        let spans = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = spans.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let kept = kept.clone();
                async move {
                    tokio::time::sleep(stall).await;
                    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
                        return (axum::http::StatusCode::BAD_REQUEST, "not JSON");
                    };
                    kept.lock().unwrap().extend(otlp_spans(&v));
                    (axum::http::StatusCode::OK, "{}")
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind receiver");
        let port = listener.local_addr().expect("receiver address").port();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        OtlpReceiver { port, spans, server }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }

    /// The spans of one turn (attribute `message_id`).
    pub fn of_turn(&self, message_id: &str) -> Vec<ReceivedSpan> {
        let spans = self.spans();
        spans
            .into_iter()
            .filter(|s| s.attributes.get("message_id").map(String::as_str) == Some(message_id))
            .collect()
    }

    /// Waits until spans named `names` have arrived for the turn; returns them by name (the
    /// first of each name).
    pub async fn wait_turn(
        &self,
        message_id: &str,
        names: &[&str],
        within: Duration,
    ) -> HashMap<String, ReceivedSpan> {
        wait_for_value(within, &format!("spans {names:?} of {message_id}"), || async {
            let spans = self.of_turn(message_id);
            let mut by_name = HashMap::new();
            for s in spans {
                by_name.entry(s.name.clone()).or_insert(s);
            }
            names.iter().all(|n| by_name.contains_key(*n)).then_some(by_name)
        })
        .await
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn otlp_spans(v: &Value) -> Vec<ReceivedSpan> {
    // {"stringValue":"x"} or {"intValue":"7"} (OTLP JSON), perhaps nested once more.
    fn text(v: &Value) -> String {
        match v {
            Value::Object(o) => o.values().next().map(text).unwrap_or_default(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }
    let attributes = |a: &Value| -> HashMap<String, String> {
        a.as_array()
            .into_iter()
            .flatten()
            .map(|kv| (kv["key"].as_str().unwrap_or("").to_owned(), text(&kv["value"])))
            .collect()
    };
    let mut out = Vec::new();
    for rs in v["resourceSpans"].as_array().into_iter().flatten() {
        let resource = attributes(&rs["resource"]["attributes"]);
        let instance = resource.get("service.instance.id").cloned().unwrap_or_default();
        for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
            for s in ss["spans"].as_array().into_iter().flatten() {
                out.push(ReceivedSpan {
                    name: s["name"].as_str().unwrap_or("").to_owned(),
                    trace_id: s["traceId"].as_str().unwrap_or("").to_lowercase(),
                    span_id: s["spanId"].as_str().unwrap_or("").to_lowercase(),
                    parent_span_id: s["parentSpanId"].as_str().unwrap_or("").to_lowercase(),
                    attributes: attributes(&s["attributes"]),
                    instance: instance.clone(),
                    error: s["status"]["code"].as_i64() == Some(2)
                        || s["status"]["code"].as_str() == Some("STATUS_CODE_ERROR"),
                });
            }
        }
    }
    out
}
