//! Spawns worker processes from one thread that lives as long as the daemon.
//!
//! PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process: a
//! worker spawned from a tokio blocking-pool thread dies when that thread retires. So every
//! spawn happens on this dedicated thread, and the child checks right after `prctl` that its
//! parent is still the daemon (it may have died between fork and prctl).

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::mpsc as std_mpsc;

use tokio::process::Child;
use tokio::sync::oneshot;

use super::SpawnError;

struct Request {
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    dir: PathBuf,
    reply: oneshot::Sender<Result<Child, SpawnError>>,
}

/// Handle on the spawner thread; cheap to clone.
#[derive(Debug, Clone)]
pub struct Spawner {
    requests: std_mpsc::Sender<Request>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request").field("argv", &self.argv).finish()
    }
}

impl Spawner {
    /// Starts the thread; it ends when every handle is dropped. Must be called inside the
    /// tokio runtime (children are registered with its reactor).
    pub fn start() -> std::io::Result<Spawner> {
        let runtime = tokio::runtime::Handle::current();
        let (requests, rx) = std_mpsc::channel::<Request>();
        std::thread::Builder::new().name("turnd-spawner".into()).spawn(move || {
            let _guard = runtime.enter();
            let daemon_pid = std::process::id() as libc::pid_t;
            while let Ok(req) = rx.recv() {
                let result = spawn_one(&req.argv, &req.env, &req.dir, daemon_pid);
                let _ = req.reply.send(result);
            }
        })?;
        Ok(Spawner { requests })
    }

    pub async fn spawn(
        &self,
        argv: Vec<String>,
        env: BTreeMap<String, String>,
        dir: PathBuf,
    ) -> Result<Child, SpawnError> {
        let (reply, rx) = oneshot::channel();
        self.requests
            .send(Request { argv, env, dir, reply })
            .map_err(|_| SpawnError::SpawnerGone)?;
        rx.await.map_err(|_| SpawnError::SpawnerGone)?
    }
}

fn spawn_one(
    argv: &[String],
    env: &BTreeMap<String, String>,
    dir: &PathBuf,
    daemon_pid: libc::pid_t,
) -> Result<Child, SpawnError> {
    let program = argv.first().cloned().unwrap_or_default();
    let mut cmd = std::process::Command::new(&program);
    cmd.args(argv.iter().skip(1))
        .env_clear()
        .envs(env)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A process group of its own: stopping it stops whatever it started.
        .process_group(0);
    // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != daemon_pid {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    cmd.spawn().map_err(|source| SpawnError::Exec { program, source })
}
