//! Starts worker processes from one thread that lives as long as the daemon.
//!
//! A worker must die with the daemon (PR_SET_PDEATHSIG), which needs code between fork and
//! exec, so `posix_spawn` is out; and `fork()` copies the page tables of a daemon holding
//! thousands of deployments (milliseconds each, and the daemon's CPU at bring-up). So the child
//! is made the way `posix_spawn` makes it: `clone(CLONE_VM | CLONE_VFORK)` on a small stack of
//! its own, running only async-signal-safe calls before `execve`.
//!
//! Nor is the descriptor table copied: a daemon with 5,000 workers holds 15,000 descriptors,
//! and copying them into each child (then closing them all at exec) doubled a spawn's cost. The
//! child shares the table (CLONE_FILES) until it takes a private copy of just the few lowest
//! descriptors (`close_range(CLOSE_RANGE_UNSHARE)`). Its stdio sources sit there, in three slots
//! this thread reserved at start; between spawns the slots hold /dev/null.
//!
//! With the Landlock sandbox the ruleset is built here, on the spawner thread, and reaches the
//! child through a fourth reserved slot (a fifth holds the shared first layer, when there is
//! one: `sandbox::Landlock::base`); the child adds its own `/proc/<pid>` (only it knows
//! it), sets the rlimits and `no_new_privs` and restricts itself — raw system calls, nothing
//! that allocates — before `execve`. The daemon's copy of the ruleset is closed right after.
//!
//! The `/proc/<pid>` rule names that directory's inode, and procfs makes a new inode whenever
//! the directory's dentry was evicted (memory pressure, `drop_caches`) and is looked up again:
//! the worker would lose its own `/proc/self` (seen here after `drop_caches`). So the child
//! opens it while it still shares the daemon's descriptor table, and the daemon keeps that
//! `O_PATH` descriptor until the worker is reaped: a held path pins the dentry, so lookups keep
//! finding the inode of the rule. One descriptor per sandboxed worker, none in the worker.
//!
//! PR_SET_PDEATHSIG fires when the *thread* that made the child exits, not the process: a
//! worker made from a tokio blocking-pool thread would die when that thread retires. So every
//! spawn happens on this dedicated thread, and the child checks right after `prctl` that its
//! parent is still the daemon.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;

use tokio::sync::oneshot;

use super::SpawnError;
use super::reaper::{ExitReceiver, Reaper};
use super::sandbox::Landlock;

/// A started child: the daemon's ends of its stdio pipes, and its exit.
#[derive(Debug)]
pub struct Spawned {
    pub pid: libc::pid_t,
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    pub exit: ExitReceiver,
    /// A sandboxed worker's `/proc/<pid>` (O_PATH), held until it is reaped (see above).
    pub proc_pin: Option<OwnedFd>,
}

struct Request {
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    dir: PathBuf,
    landlock: Option<Arc<Landlock>>,
    reply: oneshot::Sender<Result<Spawned, SpawnError>>,
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

/// The child's stack: it runs a few system calls and `execve`, nothing more.
const CHILD_STACK_BYTES: usize = 64 * 1024;

impl Spawner {
    /// Starts the thread; it ends when every handle is dropped.
    pub fn start() -> io::Result<Spawner> {
        let reaper = Reaper::get()?;
        let slots = Slots::reserve()?;
        let (requests, rx) = std_mpsc::channel::<Request>();
        std::thread::Builder::new().name("turnd-spawner".into()).spawn(move || {
            let daemon_pid = std::process::id() as libc::pid_t;
            let mut stack = vec![0u8; CHILD_STACK_BYTES];
            while let Ok(req) = rx.recv() {
                let program = req.argv.first().cloned().unwrap_or_default();
                let result = spawn_one(
                    &req.argv,
                    &req.env,
                    &req.dir,
                    req.landlock.as_deref(),
                    daemon_pid,
                    reaper,
                    &slots,
                    &mut stack,
                )
                .map_err(|source| SpawnError::Exec { program, source });
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
        landlock: Option<Arc<Landlock>>,
    ) -> Result<Spawned, SpawnError> {
        let (reply, rx) = oneshot::channel();
        self.requests
            .send(Request { argv, env, dir, landlock, reply })
            .map_err(|_| SpawnError::SpawnerGone)?;
        rx.await.map_err(|_| SpawnError::SpawnerGone)?
    }
}

/// Everything the child reads, prepared before `clone`: it may not allocate.
#[repr(C)]
struct ChildArgs {
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    dir: *const libc::c_char,
    /// Become the child's fds 0, 1, 2: the reserved slots, each ≥ 3 and below `keep_below`.
    stdio: [RawFd; 3],
    /// The child's private descriptor table holds only those below this.
    keep_below: libc::c_uint,
    daemon_pid: libc::pid_t,
    /// Set by the child when a step before (or the) `execve` failed.
    errno: libc::c_int,
    /// The Landlock ruleset's slot, or -1 for no sandbox.
    ruleset: RawFd,
    /// The shared first Landlock layer's slot, or -1 (see `sandbox::Landlock::base`).
    base_ruleset: RawFd,
    /// `landlock_restrict_self` flags.
    restrict_flags: u32,
    /// rlimits to set before `execve`: the first `rlimit_count`.
    rlimits: [(libc::c_int, libc::rlimit); MAX_RLIMITS],
    rlimit_count: usize,
    /// The rule for the child's own `/proc/<pid>`; the child fills in `parent_fd`.
    proc_self: PathBeneathAttr,
    /// The child's `/proc/<pid>` opened into the daemon's table, or -1: the parent takes it.
    proc_pin: RawFd,
}

const MAX_RLIMITS: usize = 4;

/// `struct landlock_path_beneath_attr` (packed, as the kernel declares it).
#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

const LANDLOCK_RULE_PATH_BENEATH: libc::c_int = 1;
const LANDLOCK_ACCESS_FS_READ_FILE: u64 = 1 << 2;
const LANDLOCK_ACCESS_FS_READ_DIR: u64 = 1 << 3;

#[allow(clippy::too_many_arguments)]
fn spawn_one(
    argv: &[String],
    env: &BTreeMap<String, String>,
    dir: &Path,
    landlock: Option<&Landlock>,
    daemon_pid: libc::pid_t,
    reaper: &'static Reaper,
    slots: &Slots,
    stack: &mut [u8],
) -> io::Result<Spawned> {
    // Built first: a failure here leaves nothing to undo.
    let ruleset = landlock.map(|l| l.ruleset(dir)).transpose()?;
    let program = argv.first().map(String::as_str).unwrap_or_default();
    let path = cstring(resolve(program, env.get("PATH").map(String::as_str))?.as_os_str())?;
    let argv = argv.iter().map(|a| cstring(OsStr::new(a))).collect::<io::Result<Vec<_>>>()?;
    let envp = env
        .iter()
        .map(|(k, v)| cstring(OsStr::new(&format!("{k}={v}"))))
        .collect::<io::Result<Vec<_>>>()?;
    let dir = cstring(dir.as_os_str())?;
    let argv_ptrs = null_terminated(&argv);
    let envp_ptrs = null_terminated(&envp);

    let mut rlimits = [(0, libc::rlimit { rlim_cur: 0, rlim_max: 0 }); MAX_RLIMITS];
    let mut rlimit_count = 0;
    for (slot, &(resource, value)) in
        rlimits.iter_mut().zip(landlock.map(|l| l.rlimits.as_slice()).unwrap_or(&[]))
    {
        *slot = (resource, libc::rlimit { rlim_cur: value, rlim_max: value });
        rlimit_count += 1;
    }

    let (stdin_child, stdin) = pipe()?;
    let (stdout, stdout_child) = pipe()?;
    let (stderr, stderr_child) = pipe()?;
    // The child's ends go into the slots; they leave the daemon when the slots are cleared.
    let base = landlock.and_then(|l| l.base.as_ref());
    let filled = slots.fill([&stdin_child, &stdout_child, &stderr_child], ruleset.as_ref(), base);
    // The daemon's own copies: the slots hold what the child needs until they are cleared.
    drop((stdin_child, stdout_child, stderr_child, ruleset));
    if let Err(e) = filled {
        slots.clear();
        return Err(e);
    }
    let mut args = ChildArgs {
        path: path.as_ptr(),
        argv: argv_ptrs.as_ptr(),
        envp: envp_ptrs.as_ptr(),
        dir: dir.as_ptr(),
        stdio: slots.stdio(),
        keep_below: slots.keep_below(),
        daemon_pid,
        errno: 0,
        ruleset: if landlock.is_some() { slots.ruleset() } else { -1 },
        base_ruleset: if landlock.is_some_and(|l| l.base.is_some()) { slots.base() } else { -1 },
        restrict_flags: landlock.map_or(0, |l| l.restrict_flags),
        rlimits,
        rlimit_count,
        proc_self: PathBeneathAttr {
            allowed_access: LANDLOCK_ACCESS_FS_READ_FILE | LANDLOCK_ACCESS_FS_READ_DIR,
            parent_fd: -1,
        },
        proc_pin: -1,
    };
    // The stack grows down; its top, 16-byte aligned as the ABI wants.
    let top = stack.as_mut_ptr_range().end as usize & !15;

    // Held across clone: the reaper finds this child even if it exits at once.
    let registration = reaper.begin();
    // No signal handler may run in the child while it shares our memory: block them all
    // here (the child inherits the mask, resets handlers, then unblocks).
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigset operations on local sets; clone runs `child` on `stack`, which outlives
    // it (CLONE_VFORK: we resume only after the child's execve or _exit), with `args` alive.
    let pid = unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let pid = libc::clone(
            child,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_FILES | libc::SIGCHLD,
            (&raw mut args).cast(),
        );
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        pid
    };
    let clone_error = (pid == -1).then(io::Error::last_os_error);
    slots.clear();
    // SAFETY: the child wrote it (if at all) before we resumed; a descriptor it opened in our
    // table, which nobody else owns.
    let proc_pin = match unsafe { std::ptr::read_volatile(&raw const args.proc_pin) } {
        fd if fd >= 0 => Some(unsafe { OwnedFd::from_raw_fd(fd) }),
        _ => None,
    };
    if let Some(e) = clone_error {
        return Err(e);
    }
    // SAFETY: the child wrote it (if at all) before we resumed; volatile so it is re-read.
    let errno = unsafe { std::ptr::read_volatile(&raw const args.errno) };
    if errno != 0 {
        drop(registration);
        let mut status = 0;
        // SAFETY: reaps our own failed child; it has already exited.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        return Err(io::Error::from_raw_os_error(errno));
    }
    let exit = registration.register(pid);
    Ok(Spawned { pid, stdin, stdout, stderr, exit, proc_pin })
}

/// Runs in the new process, on its own stack, in our memory, until `execve`: only
/// async-signal-safe calls, no allocation, no locks.
extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's ChildArgs, alive and unchanged while we run.
    unsafe {
        let args = &mut *arg.cast::<ChildArgs>();
        // Default dispositions: the daemon's handlers are not the worker's, and Rust's
        // ignored SIGPIPE would survive execve. The raw call, as libc refuses the signals it
        // reserves for itself (32, 33), which may be ignored too.
        let default = [0u64; 4]; // kernel struct sigaction: SIG_DFL, no flags, empty mask
        for sig in 1..=64 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::syscall(libc::SYS_rt_sigaction, sig, default.as_ptr(), 0usize, 8usize);
            }
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
            fail(args);
        }
        // The daemon died before prctl: nobody would kill us.
        if libc::getppid() != args.daemon_pid {
            libc::_exit(1);
        }
        // A process group of its own: stopping it stops whatever it started.
        if libc::setpgid(0, 0) != 0 {
            fail(args);
        }
        // Still in the daemon's descriptor table: the daemon keeps this one (see above).
        if args.ruleset >= 0 {
            allow_own_proc(args);
        }
        // Until here the descriptor table is the daemon's own: a private copy of the lowest
        // few now (a whole copy where close_range cannot unshare), then the stdio, then
        // nothing else.
        if libc::syscall(
            libc::SYS_close_range,
            args.keep_below,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_UNSHARE,
        ) != 0
            && libc::unshare(libc::CLONE_FILES) != 0
        {
            fail(args);
        }
        for (target, fd) in args.stdio.iter().enumerate() {
            if libc::dup2(*fd, target as libc::c_int) == -1 {
                fail(args);
            }
        }
        if args.ruleset >= 0 {
            confine(args);
        }
        // Best effort: whatever stays open is close-on-exec anyway.
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            0 as libc::c_uint,
        );
        if libc::chdir(args.dir) != 0 {
            fail(args);
        }
        libc::execve(args.path, args.argv, args.envp);
        fail(args)
    }
}

/// The Landlock sandbox, in the child before `execve` (still in the daemon's memory: raw
/// system calls only). Its `/proc/<pid>` exists only now, so the child adds that rule itself;
/// then the rlimits, `no_new_privs` (required to restrict without CAP_SYS_ADMIN, and what keeps
/// a set-uid program from lifting the sandbox) and the restriction.
unsafe fn confine(args: &mut ChildArgs) {
    // SAFETY: raw system calls on values prepared by the parent; `args` is ours until execve.
    unsafe {
        for i in 0..args.rlimit_count.min(MAX_RLIMITS) {
            let (resource, limit) = args.rlimits[i];
            if libc::setrlimit(resource as _, &limit) != 0 {
                fail(args);
            }
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) != 0 {
            fail(args);
        }
        if args.base_ruleset >= 0
            && libc::syscall(
                libc::SYS_landlock_restrict_self,
                args.base_ruleset,
                args.restrict_flags,
            ) != 0
        {
            fail(args);
        }
        if libc::syscall(libc::SYS_landlock_restrict_self, args.ruleset, args.restrict_flags) != 0 {
            fail(args);
        }
    }
}

/// Opens the child's own `/proc/<pid>` (into the daemon's table, for the parent to keep) and
/// adds the rule for it to the ruleset.
unsafe fn allow_own_proc(args: &mut ChildArgs) {
    // SAFETY: raw system calls; `args` is shared with the suspended parent.
    unsafe {
        let proc_self =
            libc::open(c"/proc/self".as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC);
        if proc_self < 0 {
            fail(args);
        }
        std::ptr::write_volatile(&raw mut args.proc_pin, proc_self);
        std::ptr::write_unaligned(&raw mut args.proc_self.parent_fd, proc_self);
        if libc::syscall(
            libc::SYS_landlock_add_rule,
            args.ruleset,
            LANDLOCK_RULE_PATH_BENEATH,
            &raw const args.proc_self,
            0 as libc::c_uint,
        ) != 0
        {
            fail(args);
        }
    }
}

/// Records errno for the parent and ends the child.
unsafe fn fail(args: &mut ChildArgs) -> ! {
    // SAFETY: errno is this thread's; `args` is shared with the suspended parent.
    unsafe {
        let errno = *libc::__errno_location();
        std::ptr::write_volatile(
            &raw mut args.errno,
            if errno == 0 { libc::EINVAL } else { errno },
        );
        libc::_exit(127)
    }
}

/// The program as `execve` wants it: a path with a slash is taken as given (relative ones
/// from the daemon's directory, not the workspace); a bare name is looked up in the worker's
/// PATH, as a shell would.
pub(super) fn resolve(program: &str, path_var: Option<&str>) -> io::Result<PathBuf> {
    if program.contains('/') {
        return std::path::absolute(program);
    }
    let search = path_var.unwrap_or("/usr/local/bin:/usr/bin:/bin");
    for dir in search.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(program);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    Err(io::Error::new(io::ErrorKind::NotFound, format!("not found in PATH {search}")))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("{s:?} contains a NUL byte"))
    })
}

fn null_terminated(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings.iter().map(|s| s.as_ptr()).chain(std::iter::once(std::ptr::null())).collect()
}

/// Five descriptor numbers held by the spawner thread for a child's stdio sources and its
/// Landlock rulesets (its own and the shared first layer), reserved low (the first free
/// numbers at start) so that the child copies only the table below them.
struct Slots {
    slots: [OwnedFd; 5],
    null: OwnedFd,
}

impl Slots {
    fn reserve() -> io::Result<Slots> {
        let open_null = || -> io::Result<OwnedFd> {
            Ok(std::fs::OpenOptions::new().read(true).write(true).open("/dev/null")?.into())
        };
        let null = open_null()?;
        let slots = [
            above_stdio(open_null()?)?,
            above_stdio(open_null()?)?,
            above_stdio(open_null()?)?,
            above_stdio(open_null()?)?,
            above_stdio(open_null()?)?,
        ];
        Ok(Slots { slots, null })
    }

    fn stdio(&self) -> [RawFd; 3] {
        [0, 1, 2].map(|i| self.slots[i].as_raw_fd())
    }

    fn ruleset(&self) -> RawFd {
        self.slots[3].as_raw_fd()
    }

    fn base(&self) -> RawFd {
        self.slots[4].as_raw_fd()
    }

    fn keep_below(&self) -> libc::c_uint {
        self.slots.iter().map(|s| s.as_raw_fd()).max().map_or(3, |n| n as libc::c_uint + 1)
    }

    /// Puts duplicates of `sources` (and the ruleset) into the slots (close-on-exec, like
    /// everything here).
    fn fill(
        &self,
        sources: [&OwnedFd; 3],
        ruleset: Option<&OwnedFd>,
        base: Option<&OwnedFd>,
    ) -> io::Result<()> {
        for (slot, source) in self.slots.iter().zip(sources) {
            dup_onto(source.as_raw_fd(), slot.as_raw_fd())?;
        }
        for (i, fd) in [(3, ruleset), (4, base)] {
            if let Some(fd) = fd {
                dup_onto(fd.as_raw_fd(), self.slots[i].as_raw_fd())?;
            }
        }
        Ok(())
    }

    /// Back to /dev/null: the daemon must not hold the child's ends (its stdout would never
    /// reach EOF), and the numbers must stay taken.
    fn clear(&self) {
        for slot in &self.slots {
            let _ = dup_onto(self.null.as_raw_fd(), slot.as_raw_fd());
        }
    }
}

/// `dup3(source, target, O_CLOEXEC)`: replaces `target` atomically (it is never free).
fn dup_onto(source: RawFd, target: RawFd) -> io::Result<()> {
    loop {
        // SAFETY: both are open descriptors of this process; target is replaced, not leaked.
        if unsafe { libc::dup3(source, target, libc::O_CLOEXEC) } != -1 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        // EBUSY: another thread was opening onto that number (Linux); try again.
        if !matches!(err.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) {
            return Err(err);
        }
    }
}

/// A close-on-exec pipe (read end, write end).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills `fds` with two new descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Any numbers will do, 0..2 included: the child's ends reach it through the slots.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A daemon started with 0, 1 or 2 closed could get them for a slot; the child's dup2 onto
/// 0..2 must never overwrite one of its own sources.
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor we own.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if new == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_names_are_found_in_the_workers_path() {
        assert_eq!(resolve("sh", Some("/nonexistent:/bin")).unwrap(), Path::new("/bin/sh"));
        let err = resolve("no-such-program-here", Some("/bin")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("/bin"), "{err}");
        assert!(resolve("./w", None).unwrap().is_absolute());
    }
}
