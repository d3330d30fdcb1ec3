//! Collects the exit status of every worker process, for the whole daemon process.
//!
//! One thread per process (workers come from several spawners in tests) blocks in
//! `waitid(P_ALL, WNOWAIT)`, so an exit is seen the moment it happens without a descriptor per
//! child (a pidfd each would cost 5,000 descriptors at 5,000 workers). By default it reaps only
//! children registered with it and leaves any other child of the process to whoever spawned it.
//!
//! **Orphans.** `turnd run` calls [`adopt_orphans`]: the process becomes a child subreaper
//! (`PR_SET_CHILD_SUBREAPER`), so whatever a worker leaves behind (a tool it forked that
//! outlived it) is reparented to turnd rather than to init; as PID 1 of a container everything
//! orphaned in the namespace is turnd's anyway. From then on a child that is not registered is
//! an orphan (workers are registered under the lock before the reaper can see them, and the
//! daemon spawns nothing else once it runs), and the same `waitid` reaps it the moment it
//! exits, with no back-off: an orphan never delays a worker's exit. With no child at all the
//! thread sleeps until a worker is registered or SIGCHLD says an orphan arrived ([`child_signal`],
//! from the daemon's signal task): no polling either way.
//!
//! **No signal reaches a recycled pid.** Every signal to a worker goes through [`signal`],
//! which sends it only while the worker is registered, under the same lock the reaper holds
//! from the moment it sees the exit (`WNOWAIT`: the zombie still holds its pid) until it has
//! reaped it and unregistered it. So a signal is sent either before the reap, to the worker
//! itself or its zombie, or not at all.
//!
//! Process groups: a group's id is its leader's pid, and Linux hands out no pid that is still
//! in use as a pid, a process group or a session id (the `struct pid` lives while any task
//! refers to it). So `killpg(leader)` is safe while the leader is unreaped (then its zombie
//! holds the number); after the reap it is safe only while some member lives, which we cannot
//! know without racing, and once none does, the number may be handed to a new process that
//! becomes a group leader of the same id. Hence what is left of a worker's group is killed by
//! the reaper itself, between seeing the leader's exit and reaping it, and never afterwards.
//! A member that left the group (`setsid`, `setpgid`) escapes the group kill either way; it is
//! still killed with the daemon only if it is a descendant the kernel reparents to us (not
//! guaranteed), which is what the `systemd-run` sandbox or the unit's cgroup covers.

use std::collections::HashMap;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tokio::sync::oneshot;

/// How a registered child ended; an error when it could not be waited for.
pub(super) type ExitReceiver = oneshot::Receiver<io::Result<ExitStatus>>;

type Waiters = HashMap<libc::pid_t, oneshot::Sender<io::Result<ExitStatus>>>;

pub(super) struct Reaper {
    waiters: Mutex<Waiters>,
    registered: Condvar,
}

/// Set by [`adopt_orphans`]: unregistered children are orphans to reap.
static ADOPTING: AtomicBool = AtomicBool::new(false);
/// Set (under the waiters' lock) by [`child_signal`]: a child may exist though none is
/// registered; cleared by the reaper when it looks.
static CHILD_SIGNALLED: AtomicBool = AtomicBool::new(false);
/// Orphans reaped so far (the metric `turnd_orphans_reaped_total`).
static ORPHANS_REAPED: AtomicU64 = AtomicU64::new(0);

/// Makes this process reap every child it inherits: a child subreaper (`PR_SET_CHILD_SUBREAPER`;
/// as PID 1 it is one by nature), with the reaper thread started. Returns whether the process
/// is PID 1. Call once the daemon spawns nothing but workers (a `std::process::Command`
/// started afterwards would find its child reaped).
pub fn adopt_orphans() -> io::Result<bool> {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER only sets a flag of this process.
    let pid1 = std::process::id() == 1;
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 && !pid1 {
        return Err(io::Error::last_os_error());
    }
    ADOPTING.store(true, Ordering::SeqCst);
    let reaper = Reaper::get()?;
    // Orphans may have arrived before: look now.
    child_signal_to(reaper);
    Ok(pid1)
}

/// SIGCHLD arrived: wakes the reaper if it sleeps for want of registered children, so an
/// orphan that arrived meanwhile is reaped.
pub fn child_signal() {
    if let Some(reaper) = REAPER.get() {
        child_signal_to(reaper);
    }
}

fn child_signal_to(reaper: &Reaper) {
    let _waiters = reaper.lock();
    CHILD_SIGNALLED.store(true, Ordering::SeqCst);
    reaper.registered.notify_one();
}

/// Orphans (children turnd did not spawn) reaped since the start.
pub fn orphans_reaped() -> u64 {
    ORPHANS_REAPED.load(Ordering::Relaxed)
}

/// While a spawner holds this, the reaper cannot look a pid up: a child that exits at once
/// is still found once registered.
pub(super) struct Registration<'a> {
    reaper: &'static Reaper,
    waiters: MutexGuard<'a, Waiters>,
}

impl Registration<'_> {
    pub(super) fn register(mut self, pid: libc::pid_t) -> ExitReceiver {
        let (tx, rx) = oneshot::channel();
        self.waiters.insert(pid, tx);
        drop(self.waiters);
        self.reaper.registered.notify_one();
        rx
    }
}

/// Not a child the reaper knows yet (another spawner's, or being registered): look again after
/// this, reaping the known ones by pid meanwhile.
const FOREIGN_CHILD_BACKOFF: Duration = Duration::from_millis(5);

static REAPER: OnceLock<&'static Reaper> = OnceLock::new();

/// Sends `sig` to a registered, unreaped child and its process group; false (and nothing
/// sent) when the child was already reaped or was never registered.
pub(super) fn signal(pid: libc::pid_t, sig: libc::c_int) -> bool {
    let Some(reaper) = REAPER.get() else { return false };
    if pid <= 0 {
        return false;
    }
    let waiters = reaper.lock();
    if !waiters.contains_key(&pid) {
        return false;
    }
    // SAFETY: kill/killpg only send signals. `pid` is registered and we hold the lock the
    // reaper holds while reaping: it is our child, alive or a zombie, and so is the group's id
    // (the leader holds it). The leader gets it directly too, in case it left its group.
    unsafe {
        libc::killpg(pid, sig);
        libc::kill(pid, sig);
    }
    drop(waiters);
    true
}

/// What is left of `pid`'s group gets SIGKILL; called with the lock held and the leader
/// exited but not yet reaped, so the group id is still its own.
fn kill_leftovers(pid: libc::pid_t) {
    // SAFETY: only sends a signal; see `signal` for why the id is still this group's.
    unsafe { libc::killpg(pid, libc::SIGKILL) };
}

impl Reaper {
    /// The process's reaper, started on first use.
    pub(super) fn get() -> io::Result<&'static Reaper> {
        static START: Mutex<()> = Mutex::new(());
        if let Some(r) = REAPER.get() {
            return Ok(r);
        }
        let _once = START.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = REAPER.get() {
            return Ok(r);
        }
        let reaper: &'static Reaper = Box::leak(Box::new(Reaper {
            waiters: Mutex::new(HashMap::new()),
            registered: Condvar::new(),
        }));
        std::thread::Builder::new().name("turnd-reaper".into()).spawn(move || reaper.run())?;
        let _ = REAPER.set(reaper);
        Ok(reaper)
    }

    pub(super) fn begin(&'static self) -> Registration<'static> {
        Registration { reaper: self, waiters: self.lock() }
    }

    fn lock(&self) -> MutexGuard<'_, Waiters> {
        // The map stays consistent whatever a panicking holder did: inserts and removes only.
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self) {
        loop {
            {
                let mut waiters = self.lock();
                while waiters.is_empty() && !CHILD_SIGNALLED.swap(false, Ordering::SeqCst) {
                    waiters = self.registered.wait(waiters).unwrap_or_else(|e| e.into_inner());
                }
            }
            // SAFETY: waitid writes only into `info`; WNOWAIT leaves the child waitable.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            let r =
                unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
            if r == -1 {
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EINTR) => {}
                    // No children at all: whatever is registered and gone was reaped by
                    // someone else.
                    Some(libc::ECHILD) => collect_by_pid(&mut self.lock()),
                    _ => std::thread::sleep(FOREIGN_CHILD_BACKOFF),
                }
                continue;
            }
            // SAFETY: filled in by a successful waitid with WEXITED.
            let pid = unsafe { info.si_pid() };
            let mut waiters = self.lock();
            match waiters.remove(&pid) {
                Some(tx) => {
                    // Under the lock, so no `signal` can slip in between the reap and the
                    // removal: the leftovers first, while the zombie still holds the group id.
                    kill_leftovers(pid);
                    let status = reap(pid, 0).map(|(_, s)| s);
                    drop(waiters);
                    let _ = tx.send(status);
                }
                None if ADOPTING.load(Ordering::SeqCst) => {
                    // An orphan (registration holds this lock, so no worker of ours is
                    // unregistered now): reap it at once and look again.
                    drop(waiters);
                    if matches!(reap(pid, libc::WNOHANG), Ok((true, _))) {
                        ORPHANS_REAPED.fetch_add(1, Ordering::Relaxed);
                    }
                    // Signals coalesce: one SIGCHLD may stand for many orphans gone at once,
                    // so look again before sleeping (ECHILD ends the search).
                    CHILD_SIGNALLED.store(true, Ordering::SeqCst);
                }
                None => {
                    // Someone else's child: its owner reaps it. Ours may be behind it in the
                    // kernel's list, so collect them by pid before looking again.
                    collect_by_pid(&mut waiters);
                    drop(waiters);
                    std::thread::sleep(FOREIGN_CHILD_BACKOFF);
                }
            }
        }
    }
}

/// Reaps the registered children that are gone, one `waitpid` each.
fn collect_by_pid(waiters: &mut Waiters) {
    waiters.retain(|&pid, tx| {
        // Look without reaping, so the group can still be killed by its own id.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes only into `info`; WNOWAIT leaves the child waitable.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: si_pid is filled in (non-zero) only when a child had exited.
        if r == 0 && unsafe { info.si_pid() } == pid {
            kill_leftovers(pid);
        }
        let ended = match reap(pid, libc::WNOHANG) {
            Ok((false, _)) => return true,
            Ok((true, status)) => Ok(status),
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
                Err(io::Error::other("reaped by another waiter"))
            }
            Err(_) => return true,
        };
        // A sender is consumed by send: swap in a closed one.
        let (closed, _) = oneshot::channel();
        let _ = std::mem::replace(tx, closed).send(ended);
        false
    });
}

/// `waitpid(pid, flags)`: (reaped, status).
fn reap(pid: libc::pid_t, flags: libc::c_int) -> io::Result<(bool, ExitStatus)> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes only into `status`.
        let r = unsafe { libc::waitpid(pid, &mut status, flags) };
        if r == -1 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(err);
        }
        return Ok((r == pid, ExitStatus::from_raw(status)));
    }
}
