//! Integration-test harness: a fresh PostgreSQL database and a fresh `amqp.prefix` per test,
//! real `turnd run` processes as pods, and a client that publishes turns and collects the
//! terminal events. Everything waits on conditions with a timeout; nothing sleeps blindly.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{Value, json};
use sqlx::{Connection as _, PgConnection, PgPool};

pub const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

pub fn turnd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_turnd")
}

pub fn test_worker() -> &'static str {
    env!("CARGO_BIN_EXE_turnd-test-worker")
}

/// One isolated cluster: its database, its prefix, its daemons.
pub struct Cluster {
    pub db_name: String,
    pub db_url: String,
    pub prefix: String,
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
    pub async fn new() -> Cluster {
        let suffix = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let db_name = format!("turnd_t_{suffix}");
        let prefix = format!("t{suffix}");
        let mut admin =
            PgConnection::connect(PG_ADMIN).await.expect("connect to PostgreSQL as postgres");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db_name}")))
            .execute(&mut admin)
            .await
            .expect("create test database");
        let db_url = format!("postgres://postgres@127.0.0.1:5432/{db_name}");
        let pool = PgPool::connect(&db_url).await.expect("connect to test database");
        turnd::store::MIGRATOR.run(&pool).await.expect("migrate test database");
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
            ("TURND_AMQP__URL".into(), AMQP.into()),
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
            dir: Some(dir),
            root,
            pool,
            env,
            daemon_prefix: Vec::new(),
            daemon_args: Vec::new(),
            daemons: Vec::new(),
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
        self.child = Some(cmd.spawn().expect("spawn turnd run"));
        let log = self.log.clone();
        wait_until(Duration::from_secs(30), "daemon ready", || {
            let text = std::fs::read(&log).unwrap_or_default();
            let tail = &text[(start_len as usize).min(text.len())..];
            String::from_utf8_lossy(tail).contains("turnd ready")
        })
        .await;
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
        // Async cleanup on a thread of its own: Drop may run inside a runtime.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            rt.block_on(async {
                if let Ok(mut admin) = PgConnection::connect(PG_ADMIN).await {
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
                    )))
                    .execute(&mut admin)
                    .await;
                }
                delete_topology(&prefix).await;
            });
        })
        .join();
    }
}

/// Deletes a test prefix's durable exchanges and queues (thread queues expire on their own).
pub async fn delete_topology(prefix: &str) {
    let Ok(conn) = Connection::connect(AMQP, ConnectionProperties::default()).await else {
        return;
    };
    let Ok(ch) = conn.create_channel().await else {
        return;
    };
    let mut queues =
        vec![format!("{prefix}.inbox"), format!("{prefix}.retry"), format!("{prefix}.parked")];
    // The outage tests' durable reply queue (tests/outage.rs).
    queues.push(format!("{prefix}.outage-replies"));
    queues.extend((1..10).map(|k| format!("{prefix}.retry.{k}")));
    for q in queues {
        let _ = ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await;
    }
    for e in ["turns", "replies", "retry"] {
        let _ = ch
            .exchange_delete(
                format!("{prefix}.{e}").as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
    }
    let _ = conn.close(200, "bye".into()).await;
}

/// A producer and reply consumer for one prefix.
pub struct Client {
    pub prefix: String,
    pub conn: Connection,
    pub publisher: Channel,
    replies: lapin::Consumer,
    /// Every event received, in order: (AMQP message_id, routing key, body).
    pub events: Vec<Event>,
}

#[derive(Debug, Clone)]
pub struct Event {
    pub event_id: String,
    pub correlation_id: String,
    pub routing_key: String,
    pub body: Value,
}

impl Event {
    pub fn message_id(&self) -> &str {
        self.body["messageId"].as_str().unwrap_or("")
    }
    pub fn kind(&self) -> &str {
        self.body["kind"].as_str().unwrap_or("")
    }
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

impl Client {
    pub async fn new(prefix: &str) -> Client {
        Client::with_config(prefix, &config_for(prefix)).await
    }

    /// Like [`Client::new`], declaring the topology as `config` says (it must match the
    /// daemons': e.g. the delay queues' TTLs follow `intake.retry_delay`).
    pub async fn with_config(prefix: &str, config: &turnd::config::Config) -> Client {
        let conn = Connection::connect(AMQP, ConnectionProperties::default())
            .await
            .expect("connect RabbitMQ");
        let publisher = conn.create_channel().await.expect("channel");
        publisher.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm mode");
        // Declare the topology the way a daemon would, so a publish before any daemon is up
        // is kept; the daemons' declarations are identical.
        turnd::broker::declare_topology(&publisher, config).await.expect("declare topology");
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
        Client { prefix: prefix.to_owned(), conn, publisher, replies, events: Vec::new() }
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
                Ok(Some(Ok(d))) => {
                    let body: Value =
                        serde_json::from_slice(&d.data).expect("terminal event is JSON");
                    self.events.push(Event {
                        event_id: d
                            .properties
                            .message_id()
                            .as_ref()
                            .map(|s| s.to_string())
                            .unwrap_or_default(),
                        correlation_id: d
                            .properties
                            .correlation_id()
                            .as_ref()
                            .map(|s| s.to_string())
                            .unwrap_or_default(),
                        routing_key: d.routing_key.to_string(),
                        body,
                    });
                }
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
        while let Ok(Some(Ok(del))) = tokio::time::timeout_at(deadline, self.replies.next()).await {
            let body: Value = serde_json::from_slice(&del.data).expect("JSON");
            self.events.push(Event {
                event_id: del
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
                correlation_id: del
                    .properties
                    .correlation_id()
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
                routing_key: del.routing_key.to_string(),
                body,
            });
        }
    }

    /// Events per messageId, de-duplicated on the AMQP message_id.
    pub fn by_message(&self) -> HashMap<String, Vec<Event>> {
        let mut seen = std::collections::HashSet::new();
        let mut map: HashMap<String, Vec<Event>> = HashMap::new();
        for e in &self.events {
            if seen.insert(e.event_id.clone()) {
                map.entry(e.message_id().to_owned()).or_default().push(e.clone());
            }
        }
        map
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
    json!({
        "messageId": uuid::Uuid::new_v4().to_string(),
        "agentId": agent,
        "organizationId": "org1",
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
        let conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> =
            Default::default();
        let (cut2, conns2) = (cut.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if cut2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
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
        Proxy { port, cut, conns, accept }
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
    let request = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    http_exchange(port, &request, Duration::from_secs(10)).await
}

/// Sends one HTTP/1.0 request and reads the whole response → (status, body).
async fn http_exchange(port: u16, request: &str, within: Duration) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connect = tokio::net::TcpStream::connect(("127.0.0.1", port));
    let mut s = tokio::time::timeout(Duration::from_secs(5), connect).await.ok()?.ok()?;
    s.write_all(request.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(within, s.read_to_end(&mut buf)).await.ok()?.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((status, body))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// POST http://127.0.0.1:<port><path> with an empty body and, when given, an
/// `Authorization: Bearer <token>` header → (status, body).
pub async fn http_post(port: u16, path: &str, token: Option<&str>) -> Option<(u16, String)> {
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let request =
        format!("POST {path} HTTP/1.0\r\nHost: localhost\r\n{auth}Content-Length: 0\r\n\r\n");
    http_exchange(port, &request, Duration::from_secs(30)).await
}

/// A log line without its terminal colour codes (CSI: ESC [ parameters final-byte).
pub fn strip_ansi(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
