//! Worker processes: spawning (clean environment, workspace, process group, parent-death
//! signal), the stdio protocol, stopping the whole group, and classifying exits.
//!
//! Task tree of one worker: the deployment task owns a [`Worker`]; the worker owns one I/O
//! task that reads stdout (protocol lines, in order), stderr (logged) and waits for the exit,
//! and reports everything as [`WorkerEvent`]s, `Exited` always last.

mod lines;
pub mod protocol;
mod reaper;
pub mod sandbox;
mod spawner;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use lines::{LazyBufReader, read_line};
pub use protocol::WorkerLine;
use reaper::ExitReceiver;
pub use reaper::{adopt_orphans, child_signal, orphans_reaped};
use spawner::Spawned;
pub use spawner::Spawner;

use crate::config::Secret;
use crate::turn::{DeploymentName, Epoch};
use crate::untrusted::inert;

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot create workspace {path}: {source}")]
    Workspace { path: PathBuf, source: io::Error },
    #[error("cannot start worker {program:?}: {source}")]
    Exec { program: String, source: io::Error },
    #[error("the spawner thread is gone")]
    SpawnerGone,
}

/// Everything a worker is started with (CONTRACT §5).
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub command: Vec<String>,
    /// The environment besides the TURND_* variables: worker.env and TURND_WORKER_ENV_*.
    pub base_env: BTreeMap<String, String>,
    pub state_dir: PathBuf,
    pub max_line_bytes: usize,
    pub turn_deadline: Duration,
    /// `systemd-run --scope …` argv prefix when the sandbox is in use.
    pub sandbox_prefix: Vec<String>,
    /// The Landlock sandbox, when `worker.sandbox` is `landlock` (or `auto` and the kernel
    /// has it).
    pub landlock: Option<Arc<sandbox::Landlock>>,
}

/// Who a worker is for.
#[derive(Debug, Clone)]
pub struct Identity<'a> {
    pub deployment: &'a DeploymentName,
    pub agent_id: &'a str,
    pub organization_id: Option<&'a str>,
    pub conversation_key: &'a str,
    pub epoch: Epoch,
}

/// The environment a worker gets from the daemon's: PATH and LANG, plus
/// `TURND_WORKER_ENV_<NAME>` as `<NAME>`, plus `worker.env` (which wins).
pub fn base_env(
    daemon_env: impl IntoIterator<Item = (String, String)>,
    configured: &BTreeMap<String, Secret>,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert("PATH".to_owned(), "/usr/local/bin:/usr/bin:/bin".to_owned());
    env.insert("LANG".to_owned(), "C.UTF-8".to_owned());
    for (k, v) in daemon_env {
        if k == "PATH" || k == "LANG" {
            env.insert(k, v);
        } else if let Some(name) = k.strip_prefix("TURND_WORKER_ENV_")
            && !name.is_empty()
        {
            env.insert(name.to_owned(), v);
        }
    }
    env.extend(configured.iter().map(|(k, v)| (k.clone(), v.expose().to_owned())));
    env
}

/// The directory of the program `command` runs (found in the worker's PATH as the spawner
/// finds it): a sandboxed worker may read and execute it.
pub fn program_dir(command: &[String], env: &BTreeMap<String, String>) -> Option<PathBuf> {
    let program = command.first()?;
    let path = spawner::resolve(program, env.get("PATH").map(String::as_str)).ok()?;
    let path = std::fs::canonicalize(&path).unwrap_or(path);
    path.parent().map(Path::to_path_buf)
}

/// `<state_dir>/workspaces/<organizationId or _>/<agentId>/`, mode 0700.
pub fn workspace(state_dir: &Path, organization_id: Option<&str>, agent_id: &str) -> PathBuf {
    state_dir.join("workspaces").join(organization_id.unwrap_or("_")).join(agent_id)
}

/// A sandboxed worker's private temporary directory (its `TMPDIR`): inside the workspace,
/// which is all it may write, one per deployment.
pub fn private_tmp(workspace: &Path, deployment: &DeploymentName) -> PathBuf {
    workspace.join(".tmp").join(deployment.as_str())
}

fn make_workspace(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
}

/// What the I/O task reports.
#[derive(Debug)]
pub enum WorkerEvent {
    Line(WorkerLine),
    /// A stdout line that is not protocol (logged by the receiver).
    Invalid(String),
    /// The process is gone and its group killed; always the last event.
    Exited(ExitStatusText),
}

/// How a worker ended, for logs and error messages.
#[derive(Debug, Clone)]
pub struct ExitStatusText(pub String);

impl From<io::Result<ExitStatus>> for ExitStatusText {
    fn from(status: io::Result<ExitStatus>) -> Self {
        use std::os::unix::process::ExitStatusExt;
        ExitStatusText(match status {
            Ok(s) => match (s.code(), s.signal()) {
                (Some(code), _) => format!("exited with code {code}"),
                (None, Some(sig)) => format!("killed by signal {sig}"),
                _ => "ended".to_owned(),
            },
            Err(e) => format!("could not be waited for: {e}"),
        })
    }
}

enum Control {
    /// SIGTERM to the group, SIGKILL after the timeout.
    Stop(Duration),
    Kill,
}

/// A live worker process.
#[derive(Debug)]
pub struct Worker {
    pub pid: u32,
    stdin: Option<pipe::Sender>,
    /// Boxed: a channel keeps a block of 32 slots from the start, 2 KiB of WorkerEvents
    /// per idle worker; 256 bytes of boxes.
    events: mpsc::Receiver<Box<WorkerEvent>>,
    control: mpsc::UnboundedSender<Control>,
    io: Option<JoinHandle<()>>,
    stop_requested: bool,
}

impl Worker {
    pub async fn spawn(
        spawner: &Spawner,
        spec: &WorkerSpec,
        who: &Identity<'_>,
    ) -> Result<Worker, SpawnError> {
        let dir = workspace(&spec.state_dir, who.organization_id, who.agent_id);
        make_workspace(&dir)
            .map_err(|source| SpawnError::Workspace { path: dir.clone(), source })?;
        let mut argv = spec.sandbox_prefix.clone();
        argv.extend(spec.command.iter().cloned());
        let mut env = spec.base_env.clone();
        let dir_str = dir.to_string_lossy().into_owned();
        let tmp = spec.landlock.is_some().then(|| private_tmp(&dir, who.deployment));
        if let Some(tmp) = &tmp {
            make_workspace(tmp)
                .map_err(|source| SpawnError::Workspace { path: tmp.clone(), source })?;
            env.insert("TMPDIR".to_owned(), tmp.to_string_lossy().into_owned());
        }
        for (k, v) in [
            ("HOME", dir_str.clone()),
            ("TURND_DEPLOYMENT", who.deployment.as_str().to_owned()),
            ("TURND_AGENT_ID", who.agent_id.to_owned()),
            ("TURND_ORGANIZATION_ID", who.organization_id.unwrap_or("").to_owned()),
            ("TURND_CONVERSATION_ID", who.conversation_key.to_owned()),
            ("TURND_EPOCH", who.epoch.get().to_string()),
            ("TURND_WORKSPACE", dir_str),
            ("TURND_TURN_DEADLINE_MS", spec.turn_deadline.as_millis().to_string()),
            ("TURND_PROTOCOL", "1".to_owned()),
        ] {
            env.insert(k.to_owned(), v);
        }
        let spawned = spawner.spawn(argv, env, dir, spec.landlock.clone()).await;
        if let (Err(_), Some(tmp)) = (&spawned, &tmp) {
            let _ = std::fs::remove_dir_all(tmp);
        }
        let Spawned { pid, stdin, stdout, stderr, exit, proc_pin } = spawned?;
        // From here the process is ours to stop whatever fails: the guard kills its group.
        let process = Process { pid, exit, exited: false, private_tmp: tmp, _proc_pin: proc_pin };
        let pid = pid as u32;
        let registered = |source| SpawnError::Exec { program: argv0(spec), source };
        let stdin = pipe::Sender::from_owned_fd(stdin).map_err(registered)?;
        let stdout = pipe::Receiver::from_owned_fd(stdout).map_err(registered)?;
        let stderr = pipe::Receiver::from_owned_fd(stderr).map_err(registered)?;
        let (tx, events) = mpsc::channel(64);
        let (control, control_rx) = mpsc::unbounded_channel();
        // In the caller's span (the owner's: deployment and epoch) for its log lines.
        let io = tokio::spawn(tracing::Instrument::in_current_span(io_task(
            process,
            stdout,
            stderr,
            spec.max_line_bytes,
            tx,
            control_rx,
        )));
        Ok(Worker { pid, stdin: Some(stdin), events, control, io: Some(io), stop_requested: false })
    }

    /// Writes one protocol line. An error means the worker is going away; its exit follows.
    pub async fn send(&mut self, line: &[u8]) -> io::Result<()> {
        match self.stdin.as_mut() {
            Some(stdin) => stdin.write_all(line).await,
            None => Err(io::Error::new(io::ErrorKind::BrokenPipe, "worker stdin closed")),
        }
    }

    /// The next event; `Exited` is the last, after which this returns None.
    pub async fn next_event(&mut self) -> Option<WorkerEvent> {
        let event = self.events.recv().await.map(|e| *e);
        if event.is_none()
            && let Some(io) = self.io.take()
        {
            let _ = io.await;
        }
        event
    }

    /// Asks the worker to stop (SIGTERM to its group, SIGKILL after `timeout`); closing
    /// stdin tells a well-behaved worker the same.
    pub fn stop(&mut self, timeout: Duration) {
        self.stop_requested = true;
        self.stdin = None;
        let _ = self.control.send(Control::Stop(timeout));
    }

    /// SIGKILL to the whole group at once (lock lost: not a moment longer).
    pub fn kill(&mut self) {
        self.stop_requested = true;
        self.stdin = None;
        let _ = self.control.send(Control::Kill);
    }

    pub fn stop_requested(&self) -> bool {
        self.stop_requested
    }

    /// Waits for the worker's exit, discarding other events.
    pub async fn wait(&mut self) -> Option<ExitStatusText> {
        while let Some(event) = self.next_event().await {
            if let WorkerEvent::Exited(status) = event {
                while self.next_event().await.is_some() {}
                return Some(status);
            }
        }
        None
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // A worker never outlives its handle: the I/O task kills the group when asked.
        let _ = self.control.send(Control::Kill);
    }
}

/// `signal` to the worker and its group, only while the reaper has not reaped it (a reaped
/// pid may already be someone else's); see `reaper` for the process-group reasoning.
fn signal_group(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        reaper::signal(pid, signal);
    }
}

/// The worker's process until it is reaped; dropped before that (runtime shutdown, a failed
/// set-up), it kills the group so no worker outlives its handle.
struct Process {
    pid: libc::pid_t,
    exit: ExitReceiver,
    exited: bool,
    /// A sandboxed worker's TMPDIR, removed after its exit.
    private_tmp: Option<PathBuf>,
    /// A sandboxed worker's `/proc/<pid>`, held so its Landlock rule keeps matching (spawner).
    _proc_pin: Option<std::os::fd::OwnedFd>,
}

impl Process {
    /// SIGKILL to the leader and its group, unless it was already reaped.
    fn kill(&self) {
        reaper::signal(self.pid, libc::SIGKILL);
    }

    /// Cancel-safe: resolves once, with the exit status.
    async fn wait(&mut self) -> io::Result<ExitStatus> {
        if self.exited {
            return Err(io::Error::other("already waited for"));
        }
        let status =
            (&mut self.exit).await.unwrap_or_else(|_| Err(io::Error::other("reaper gone")));
        self.exited = true;
        status
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if !self.exited {
            self.kill();
        }
    }
}

fn argv0(spec: &WorkerSpec) -> String {
    spec.sandbox_prefix.first().or(spec.command.first()).cloned().unwrap_or_default()
}

/// Stderr lines of one worker logged per second; past it they are counted and dropped, and
/// the count logged when the next second starts. A worker is a tenant's code: one stuck in a
/// loop that prints would otherwise fill the host's journal or disk for everyone (systemd's
/// journal rate limit is per unit, so one worker would silence all the others' lines too).
/// A hundred a second is far more than a person reads and a small share of the daemon's CPU.
const STDERR_LINES_PER_SECOND: u32 = 100;

/// A fixed one-second window over a worker's stderr lines.
#[derive(Debug)]
struct StderrBudget {
    window_start: std::time::Instant,
    used: u32,
    dropped: u64,
}

impl StderrBudget {
    fn new(now: std::time::Instant) -> Self {
        StderrBudget { window_start: now, used: 0, dropped: 0 }
    }

    fn take(&mut self, now: std::time::Instant) -> Budget {
        if now.duration_since(self.window_start) >= Duration::from_secs(1) {
            self.window_start = now;
            self.used = 0;
        }
        if self.used >= STDERR_LINES_PER_SECOND {
            self.dropped += 1;
            return if self.dropped == 1 { Budget::DropFirst } else { Budget::Drop };
        }
        self.used += 1;
        Budget::Log { dropped_before: std::mem::take(&mut self.dropped) }
    }
}

/// What to do with one stderr line.
#[derive(Debug, PartialEq, Eq)]
enum Budget {
    /// Log it, after saying how many were dropped before it.
    Log {
        dropped_before: u64,
    },
    /// Drop it; the first of a run, so say that dropping started.
    DropFirst,
    Drop,
}

/// After the leader exited: bounded drain of what it wrote before dying.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);

async fn io_task(
    mut process: Process,
    stdout: pipe::Receiver,
    stderr: pipe::Receiver,
    max_line_bytes: usize,
    events: mpsc::Sender<Box<WorkerEvent>>,
    mut control: mpsc::UnboundedReceiver<Control>,
) {
    let pid = process.pid as u32;
    let stderr_task = async {
        let mut reader = LazyBufReader::new(stderr);
        let mut buf = Vec::new();
        let mut budget = StderrBudget::new(std::time::Instant::now());
        while let Ok(Some(line)) = read_line(&mut reader, &mut buf, 16 * 1024).await {
            match budget.take(std::time::Instant::now()) {
                Budget::Log { dropped_before: 0 } => {}
                Budget::Log { dropped_before } => {
                    tracing::warn!(
                        pid,
                        dropped = dropped_before,
                        "worker stderr lines dropped: more than {STDERR_LINES_PER_SECOND} a second"
                    );
                }
                Budget::DropFirst => {
                    tracing::warn!(
                        pid,
                        "worker stderr over {STDERR_LINES_PER_SECOND} lines a second: dropping lines until the next second"
                    );
                    continue;
                }
                Budget::Drop => continue,
            }
            match line {
                Ok(text) => {
                    let text = String::from_utf8_lossy(text);
                    tracing::info!(pid, "worker stderr: {}", inert(text.trim_end()))
                }
                Err(len) => {
                    tracing::warn!(pid, len, "worker stderr line too long; dropped")
                }
            }
        }
        if budget.dropped > 0 {
            tracing::warn!(
                pid,
                dropped = budget.dropped,
                "worker stderr lines dropped: more than {STDERR_LINES_PER_SECOND} a second"
            );
        }
    };
    let stdout_task = async {
        let mut reader = LazyBufReader::new(stdout);
        let mut buf = Vec::with_capacity(1024);
        loop {
            match read_line(&mut reader, &mut buf, max_line_bytes).await {
                Ok(Some(Ok(line))) => {
                    let event = match protocol::parse_line(line) {
                        Ok(parsed) => WorkerEvent::Line(parsed),
                        Err(e) => WorkerEvent::Invalid(e.to_string()),
                    };
                    if events.send(Box::new(event)).await.is_err() {
                        break;
                    }
                }
                Ok(Some(Err(len))) => {
                    let msg = format!(
                        "line of {len}+ bytes exceeds worker.max_line_bytes ({max_line_bytes})"
                    );
                    if events.send(Box::new(WorkerEvent::Invalid(msg))).await.is_err() {
                        break;
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
    };
    let wait_exit = async {
        let mut stopping: Option<tokio::time::Instant> = None;
        loop {
            let kill_at = stopping.map(tokio::time::sleep_until);
            tokio::select! {
                status = process.wait() => return status,
                cmd = control.recv() => match cmd {
                    Some(Control::Stop(timeout)) => {
                        signal_group(pid, libc::SIGTERM);
                        let at = tokio::time::Instant::now() + timeout;
                        stopping = Some(stopping.map_or(at, |s| s.min(at)));
                    }
                    Some(Control::Kill) | None => {
                        process.kill();
                        return process.wait().await;
                    }
                },
                _ = async { match kill_at { Some(s) => s.await, None => std::future::pending().await } } => {
                    tracing::warn!(pid, "worker ignored SIGTERM; killing it");
                    signal_group(pid, libc::SIGKILL);
                    stopping = None;
                }
            }
        }
    };
    tokio::pin!(stdout_task, stderr_task);
    let mut stdout_done = false;
    let mut stderr_finished = false;
    let status = {
        tokio::pin!(wait_exit);
        loop {
            tokio::select! {
                status = &mut wait_exit => break status,
                _ = &mut stdout_task, if !stdout_done => stdout_done = true,
                _ = &mut stderr_task, if !stderr_finished => stderr_finished = true,
            }
        }
    };
    // Whatever was left of its group (wrappers, tools it ran) was killed by the reaper before
    // it reaped the leader: after the reap the group's id may belong to someone else.
    let drain = async {
        if !stdout_done {
            (&mut stdout_task).await;
        }
        if !stderr_finished {
            (&mut stderr_task).await;
        }
    };
    let _ = tokio::time::timeout(DRAIN_AFTER_EXIT, drain).await;
    if let Some(tmp) = process.private_tmp.take() {
        // Its private TMPDIR ends with it (a next worker of the deployment gets a fresh one).
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(tmp)).await;
    }
    let _ = events.send(Box::new(WorkerEvent::Exited(ExitStatusText::from(status)))).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_env_is_only_path_lang_passthrough_and_config() {
        let daemon = vec![
            ("PATH".to_owned(), "/p".to_owned()),
            ("DATABASE_URL".to_owned(), "postgres://secret".to_owned()),
            ("TURND_WORKER_ENV_FOO".to_owned(), "bar".to_owned()),
            ("TURND_DATABASE__URL".to_owned(), "postgres://secret".to_owned()),
        ];
        let mut configured = BTreeMap::new();
        configured.insert("X".to_owned(), Secret::new("1"));
        let env = base_env(daemon, &configured);
        let keys: Vec<&str> = env.keys().map(String::as_str).collect();
        assert_eq!(keys, vec!["FOO", "LANG", "PATH", "X"]);
        assert_eq!(env["FOO"], "bar");
        assert_eq!(env["PATH"], "/p");
    }

    #[test]
    fn stderr_budget_drops_past_the_rate_and_reports_the_count() {
        let t0 = std::time::Instant::now();
        let mut b = StderrBudget::new(t0);
        for _ in 0..STDERR_LINES_PER_SECOND {
            assert_eq!(b.take(t0), Budget::Log { dropped_before: 0 });
        }
        assert_eq!(b.take(t0 + Duration::from_millis(10)), Budget::DropFirst);
        assert_eq!(b.take(t0 + Duration::from_millis(999)), Budget::Drop);
        let next = t0 + Duration::from_secs(1);
        assert_eq!(b.take(next), Budget::Log { dropped_before: 2 }, "the count, once");
        assert_eq!(b.take(next), Budget::Log { dropped_before: 0 });
    }

    #[test]
    fn exit_status_text_names_the_code_or_the_signal() {
        use std::os::unix::process::ExitStatusExt;
        let text = |raw| ExitStatusText::from(Ok::<_, io::Error>(ExitStatus::from_raw(raw))).0;
        assert_eq!(text(0), "exited with code 0");
        assert_eq!(text(3 << 8), "exited with code 3");
        assert_eq!(text(libc::SIGKILL), "killed by signal 9");
        let failed = ExitStatusText::from(Err::<ExitStatus, _>(io::Error::other("gone"))).0;
        assert!(failed.starts_with("could not be waited for"), "{failed}");
    }

    /// A live process that is not a zombie.
    fn alive(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
    }

    /// Whether `pid` is gone within a second (a SIGKILLed process takes a moment to exit).
    async fn gone_soon(pid: i32) -> bool {
        for _ in 0..50 {
            if !alive(pid) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    async fn spawn_sh(
        spawner: &Spawner,
        state_dir: &Path,
        script: &str,
    ) -> Result<Worker, SpawnError> {
        let command = ["/bin/sh", "-c", script].map(str::to_owned).to_vec();
        let env = base_env(std::env::vars().filter(|(k, _)| k == "PATH"), &BTreeMap::new());
        spawn_argv(spawner, state_dir, command, env).await
    }

    async fn spawn_argv(
        spawner: &Spawner,
        state_dir: &Path,
        command: Vec<String>,
        base_env: BTreeMap<String, String>,
    ) -> Result<Worker, SpawnError> {
        spawn_confined(spawner, state_dir, command, base_env, None).await
    }

    async fn spawn_confined(
        spawner: &Spawner,
        state_dir: &Path,
        command: Vec<String>,
        base_env: BTreeMap<String, String>,
        landlock: Option<Arc<sandbox::Landlock>>,
    ) -> Result<Worker, SpawnError> {
        let name = DeploymentName::from_trusted("unit-0123456789abcdef".to_owned());
        let who = Identity {
            deployment: &name,
            agent_id: "unit",
            organization_id: None,
            conversation_key: "c",
            epoch: Epoch::new(1),
        };
        let spec = WorkerSpec {
            command,
            base_env,
            state_dir: state_dir.to_path_buf(),
            max_line_bytes: 1024,
            turn_deadline: Duration::from_secs(5),
            sandbox_prefix: Vec::new(),
            landlock,
        };
        Worker::spawn(spawner, &spec, &who).await
    }

    /// The pid a script wrote to `bg.pid` in its workspace.
    fn background_pid(state_dir: &Path) -> i32 {
        let path = workspace(state_dir, None, "unit").join("bg.pid");
        std::fs::read_to_string(path).unwrap().trim().parse().unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stop_escalates_to_sigkill_after_the_timeout_and_takes_the_whole_group() {
        let spawner = Spawner::start().unwrap();
        let dir = tempfile::tempdir().unwrap();
        // Leader and child both ignore SIGTERM (and stdin EOF).
        let script = "trap '' TERM; sleep 30 & echo $! > bg.pid; echo '{\"type\":\"heartbeat\"}'; wait; sleep 30";
        let mut w = spawn_sh(&spawner, dir.path(), script).await.unwrap();
        assert!(matches!(w.next_event().await, Some(WorkerEvent::Line(WorkerLine::Heartbeat))));
        let bg = background_pid(dir.path());
        assert!(alive(bg));
        let started = std::time::Instant::now();
        w.stop(Duration::from_millis(400));
        let status =
            tokio::time::timeout(Duration::from_secs(5), w.wait()).await.expect("stopped in time");
        let took = started.elapsed();
        assert_eq!(status.unwrap().0, "killed by signal 9");
        assert!(
            took >= Duration::from_millis(350),
            "SIGTERM was ignored, so it took the timeout: {took:?}"
        );
        assert!(took < Duration::from_secs(3), "{took:?}");
        assert!(gone_soon(bg).await, "the group went with it");
        assert!(w.stop_requested());
        assert!(w.next_event().await.is_none(), "Exited is the last event");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unrequested_exit_reports_its_status_and_what_it_left_is_killed() {
        let spawner = Spawner::start().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let script = "sleep 30 & echo $! > bg.pid; echo 'not protocol'; exit 3";
        let mut w = spawn_sh(&spawner, dir.path(), script).await.unwrap();
        let mut events = Vec::new();
        let started = std::time::Instant::now();
        while let Some(e) = tokio::time::timeout(Duration::from_secs(5), w.next_event())
            .await
            .expect("events in time")
        {
            events.push(e);
        }
        // The orphan kept stdout open: the drain after the exit is bounded.
        assert!(
            started.elapsed() < DRAIN_AFTER_EXIT + Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert!(matches!(events.first(), Some(WorkerEvent::Invalid(_))), "{events:?}");
        match events.last() {
            Some(WorkerEvent::Exited(status)) => assert_eq!(status.0, "exited with code 3"),
            other => panic!("Exited last, got {other:?}"),
        }
        assert!(!w.stop_requested());
        assert!(gone_soon(background_pid(dir.path())).await, "its group is killed after the exit");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_worker_starts_with_default_signals_in_its_own_group_holding_only_its_stdio() {
        let spawner = Spawner::start().unwrap();
        let dir = tempfile::tempdir().unwrap();
        // Nothing of the daemon's (database and broker sockets, other workers' pipes) may
        // reach a worker, even a descriptor that is not close-on-exec.
        let leaky = std::fs::File::open("/dev/null").unwrap();
        // SAFETY: clears FD_CLOEXEC on a descriptor this test owns.
        unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&leaky), libc::F_SETFD, 0) };
        // A bare program name, found in the worker's PATH. `sleep` leaves its mask alone (a
        // shell blocks every signal around its own forks, so it cannot report its own).
        let command = vec!["sleep".to_owned(), "30".to_owned()];
        let env = base_env([("PATH".to_owned(), "/usr/bin:/bin".to_owned())], &BTreeMap::new());
        let mut w = spawn_argv(&spawner, dir.path(), command, env).await.unwrap();
        // Spawn returns after the child's execve (CLONE_VFORK): this is sleep's own state.
        let status = std::fs::read_to_string(format!("/proc/{}/status", w.pid)).unwrap();
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", w.pid)).unwrap();
        // Read once sleep's own start-up is over: the loader and setlocale open and close
        // files of their own (libc, locale data) as fd 3 right after the execve. A descriptor
        // the worker inherited would stay, so the wait ends at the bound and the test fails.
        let fds_of = || -> Vec<String> {
            std::fs::read_dir(format!("/proc/{}/fd", w.pid))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        };
        let settled = std::time::Instant::now() + Duration::from_secs(2);
        let mut fds = fds_of();
        while fds.len() != 3 && std::time::Instant::now() < settled {
            tokio::time::sleep(Duration::from_millis(10)).await;
            fds = fds_of();
        }
        w.kill();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or("?")
                .to_owned()
        };
        // Rust ignores SIGPIPE in the daemon, and the spawner blocks every signal around the
        // clone: a worker inherits neither.
        assert_eq!(field("SigIgn:"), "0000000000000000", "{status}");
        assert_eq!(field("SigBlk:"), "0000000000000000", "{status}");
        // /proc/<pid>/stat: "pid (comm) state ppid pgrp …"
        let pgrp: u32 =
            stat.rsplit(')').next().unwrap().split_whitespace().nth(2).unwrap().parse().unwrap();
        assert_eq!(pgrp, w.pid, "leader of its own process group");
        assert_eq!(fds.len(), 3, "{fds:?}");
        assert!(["0", "1", "2"].iter().all(|n| fds.iter().any(|f| f == n)), "{fds:?}");
        drop(leaky);
    }

    /// What Landlock adds to a spawn: `cargo test --release --lib spawn_cost -- --ignored
    /// --nocapture`. Times `Spawner::spawn` (pipes, ruleset, clone, child, execve) of
    /// `/bin/true`, alternating plain spawns, sandboxed ones, and sandboxed ones where /etc is
    /// carved up (as when the config sits in /etc/turnd: a rule per entry of /etc); prints the
    /// medians.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement, not a test"]
    async fn spawn_cost_with_and_without_landlock() {
        let spawner = Spawner::start().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::WorkerConfig {
            sandbox: crate::config::Sandbox::Landlock,
            ..Default::default()
        };
        let make = |exclude: &[PathBuf]| {
            Arc::new(
                sandbox::Landlock::for_config(
                    &config,
                    Some(Path::new("/usr/bin")),
                    exclude,
                    &dir.path().join("workspaces"),
                )
                .unwrap()
                .unwrap(),
            )
        };
        let landlock = make(&[dir.path().to_path_buf()]);
        let carved = make(&[dir.path().to_path_buf(), PathBuf::from("/etc/hostname")]);
        let argv = vec!["/bin/true".to_owned()];
        let env = base_env([("PATH".to_owned(), "/usr/bin:/bin".to_owned())], &BTreeMap::new());
        let mut times: [Vec<Duration>; 3] = Default::default();
        for i in 0..900 {
            let sandbox = match i % 3 {
                0 => None,
                1 => Some(landlock.clone()),
                _ => Some(carved.clone()),
            };
            let started = std::time::Instant::now();
            let spawned = spawner
                .spawn(argv.clone(), env.clone(), dir.path().to_path_buf(), sandbox)
                .await
                .unwrap();
            let took = started.elapsed();
            let _ = spawned.exit.await;
            if i >= 150 {
                times[i % 3].push(took);
            }
        }
        let [p, l, c] = times.map(|mut t| {
            t.sort();
            (t[t.len() / 2], t[t.len() * 9 / 10])
        });
        println!(
            "spawn p50 / p90: plain {:?} / {:?}; landlock {:?} / {:?}; landlock with /etc carved \
             up {:?} / {:?}",
            p.0, p.1, l.0, l.1, c.0, c.1
        );
    }

    /// The `/proc/<pid>` rule survives the eviction of that directory's dentry (procfs would
    /// make a new inode on the next lookup): the daemon pins it. Drops the machine's dentry
    /// cache (root only; skipped elsewhere): a moment's slower lookups for everyone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_landlock_worker_keeps_its_own_proc_entry_when_dentries_are_dropped() {
        if sandbox::landlock_abi() < sandbox::MIN_LANDLOCK_ABI {
            eprintln!("skipped: no Landlock ABI 6 here");
            return;
        }
        let spawner = Spawner::start().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::WorkerConfig {
            sandbox: crate::config::Sandbox::Landlock,
            ..Default::default()
        };
        let exclude = [dir.path().to_path_buf()];
        let landlock =
            sandbox::Landlock::for_config(&config, None, &exclude, &dir.path().join("workspaces"))
                .unwrap()
                .unwrap();
        // One probe per stdin line, from the shell itself (its /proc/self is the worker's).
        let script = "exec 3<&0; while read x <&3; do \
            if read l < /proc/self/status; then echo ok >> r; else echo denied >> r; fi; \
            echo '{\"type\":\"heartbeat\"}'; done";
        let command = ["/bin/sh", "-c", script].map(str::to_owned).to_vec();
        let env = base_env([("PATH".to_owned(), "/usr/bin:/bin".to_owned())], &BTreeMap::new());
        let mut w = spawn_confined(&spawner, dir.path(), command, env, Some(Arc::new(landlock)))
            .await
            .unwrap();
        let probe = async |w: &mut Worker| {
            w.send(b"probe\n").await.unwrap();
            let e = tokio::time::timeout(Duration::from_secs(5), w.next_event()).await.unwrap();
            assert!(matches!(e, Some(WorkerEvent::Line(WorkerLine::Heartbeat))), "{e:?}");
        };
        probe(&mut w).await;
        if std::fs::write("/proc/sys/vm/drop_caches", "2").is_err() {
            eprintln!("skipped the eviction: not root");
        }
        probe(&mut w).await;
        let r = std::fs::read_to_string(workspace(dir.path(), None, "unit").join("r")).unwrap();
        w.kill();
        assert_eq!(r, "ok\nok\n");
    }

    /// Once the reaper has reaped a worker, nothing signals its pid again, not even when the
    /// number is handed to a new process (made to happen here through ns_last_pid, as root).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_signal_reaches_a_pid_after_its_worker_was_reaped() {
        let spawner = Spawner::start().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut w = spawn_sh(&spawner, dir.path(), "exit 0").await.unwrap();
        let pid = w.pid as libc::pid_t;
        let status = tokio::time::timeout(Duration::from_secs(5), w.wait()).await.unwrap();
        assert_eq!(status.unwrap().0, "exited with code 0");
        // A process that now holds the worker's old pid, when the kernel lets us arrange it.
        let mut recycled = None;
        for _ in 0..20 {
            if std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).is_err() {
                break;
            }
            let child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
            if child.id() as libc::pid_t == pid {
                recycled = Some(child);
                break;
            }
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        assert!(!reaper::signal(pid, libc::SIGKILL), "a reaped worker's pid is not signalled");
        w.kill();
        drop(w);
        if let Some(mut child) = recycled {
            assert!(alive(pid), "the process now holding the old pid was not touched");
            let _ = child.kill();
            let _ = child.wait();
        } else {
            eprintln!("could not recycle pid {pid}; checked the refusal only");
        }
    }

    /// A shell worker under Landlock: its workspace, TMPDIR and its own /proc entry are its
    /// own (read here by its child `cat`: a child's own /proc/self is not, see README); the
    /// state directory's other workspaces, writes elsewhere and signals to the daemon are not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_landlock_worker_reaches_its_workspace_and_nothing_else() {
        if sandbox::landlock_abi() < sandbox::MIN_LANDLOCK_ABI {
            eprintln!("skipped: no Landlock ABI 6 here");
            return;
        }
        let spawner = Spawner::start().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let other = workspace(dir.path(), Some("other"), "unit");
        make_workspace(&other).unwrap();
        std::fs::write(other.join("secret"), "s").unwrap();
        let mut config = crate::config::WorkerConfig {
            sandbox: crate::config::Sandbox::Landlock,
            ..Default::default()
        };
        config.limits.nofile = Some(64);
        config.limits.memory_max = Some("1G".to_owned());
        // /etc/hostname stands for the config file: carved out of /etc (the shared layer).
        let exclude = [dir.path().to_path_buf(), PathBuf::from("/etc/hostname")];
        let landlock =
            sandbox::Landlock::for_config(&config, None, &exclude, &dir.path().join("workspaces"))
                .unwrap()
                .unwrap();
        let script = format!(
            "r() {{ if \"$@\" >/dev/null 2>&1; then echo \"$1 ok\"; else echo \"$1 denied\"; fi; }}; \
             {{ r cat /proc/$$/status; r touch \"$TMPDIR/t\"; r touch ./own; \
             r cat {secret}; r touch {outside}; r kill -0 {daemon}; r cat /proc/{daemon}/status; \
             r cat /etc/os-release; r cat /etc/hostname; ulimit -n; ulimit -v; }} > ./result; echo '{{\"type\":\"heartbeat\"}}'; read x",
            secret = other.join("secret").display(),
            outside = dir.path().join("outside").display(),
            daemon = std::process::id(),
        );
        let command = ["/bin/sh", "-c", &script].map(str::to_owned).to_vec();
        let env = base_env([("PATH".to_owned(), "/usr/bin:/bin".to_owned())], &BTreeMap::new());
        let mut w = spawn_confined(&spawner, dir.path(), command, env, Some(Arc::new(landlock)))
            .await
            .unwrap();
        let first = tokio::time::timeout(Duration::from_secs(10), w.next_event()).await.unwrap();
        assert!(matches!(first, Some(WorkerEvent::Line(WorkerLine::Heartbeat))), "{first:?}");
        let ws = workspace(dir.path(), None, "unit");
        let result = std::fs::read_to_string(ws.join("result")).unwrap();
        w.stop(Duration::from_secs(1));
        w.wait().await;
        let lines: Vec<&str> = result.lines().collect();
        assert_eq!(
            lines,
            [
                "cat ok",
                "touch ok",
                "touch ok",
                "cat denied",
                "touch denied",
                "kill denied",
                "cat denied",
                "cat ok",
                "cat denied",
                "64",
                "1048576"
            ],
            "{result}"
        );
        assert!(!dir.path().join("outside").exists());
        let name = DeploymentName::from_trusted("unit-0123456789abcdef".to_owned());
        assert!(!private_tmp(&ws, &name).exists(), "the private TMPDIR goes with the worker");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_missing_program_is_a_spawn_error_naming_it() {
        let spawner = Spawner::start().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let command = vec!["/nonexistent/worker".to_owned()];
        let err = spawn_argv(&spawner, dir.path(), command, BTreeMap::new()).await.unwrap_err();
        assert!(matches!(err, SpawnError::Exec { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/worker"), "{err}");
    }
}
