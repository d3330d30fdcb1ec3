//! Containment of workers (CONTRACT §5).
//!
//! Whatever the sandbox, the daemon is not dumpable ([`make_undumpable`]): its
//! `/proc/<pid>/environ`, `mem`, `fd/` are closed to same-user processes without
//! CAP_SYS_PTRACE, workers included.
//!
//! `worker.sandbox = "landlock"` (or `"auto"` where the kernel has it): [`Landlock`] holds what
//! every worker may reach, opened once at start (O_PATH descriptors of the system directories,
//! the command's directory, `sandbox_read`/`_write`). For each spawn the spawner thread builds a
//! fresh ruleset from them plus the worker's workspace and the allowed TCP ports
//! ([`Landlock::ruleset`]); the child, which shares the daemon's memory and may not allocate,
//! only adds its own `/proc/<pid>`, sets the rlimits and `no_new_privs` and calls
//! `landlock_restrict_self` before `execve` (`spawner`).
//!
//! `worker.sandbox = "systemd-run"` starts each worker in a transient systemd scope with the
//! configured limits and network restricted to loopback.
//!
//! `systemd-run --scope` execs the worker itself after creating the scope, so the worker is
//! still the daemon's child (pipes, process group and parent-death signal all hold). It needs
//! root or a polkit rule for the service user; when it cannot be used the daemon falls back to
//! a plain spawn with one warning at start.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use landlock::{
    ABI, Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, NetPort, PathBeneath,
    PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, Scope,
};

use crate::config::{ConfigError, Sandbox, WorkerConfig};

/// `prctl(PR_SET_DUMPABLE, 0)`: no core dumps, no ptrace attach, and `/proc/<pid>/*` owned by
/// root and closed to other processes of the same user without CAP_SYS_PTRACE. The process
/// itself still reads its own `/proc/self` (same thread group). `execve` resets it, so workers
/// are dumpable again (their own business).
///
/// # Errors
///
/// The prctl's, which Linux never returns for these arguments.
pub fn make_undumpable() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Landlock ABI this kernel offers: 0 when it has none (or it is disabled).
pub fn landlock_abi() -> i64 {
    // SAFETY: LANDLOCK_CREATE_RULESET_VERSION with no attributes only returns a number.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    v.max(0)
}

const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
/// The first ABI with signal and abstract-socket scopes (Linux 6.12): the contract needs them.
pub const MIN_LANDLOCK_ABI: i64 = 6;
/// `landlock_restrict_self` flag (ABI 7): log denials of the worker's program, not only of the
/// code that called it (the spawner's child before `execve`). The kernel's default logs only the
/// latter, which would leave every worker denial unlogged.
const LANDLOCK_RESTRICT_SELF_LOG_NEW_EXEC_ON: u32 = 1 << 1;

/// Whether `worker.sandbox` can be honoured on this kernel: `landlock` needs ABI ≥ 6 and is a
/// configuration error without it (`turnd run` and `check-config` exit 2 naming the key).
///
/// # Errors
///
/// [`ConfigError::Invalid`] naming `worker.sandbox`.
pub fn check(config: &WorkerConfig) -> Result<(), ConfigError> {
    if config.sandbox != Sandbox::Landlock {
        return Ok(());
    }
    let abi = landlock_abi();
    if abi < MIN_LANDLOCK_ABI {
        let have = if abi == 0 { "none".to_owned() } else { format!("ABI {abi}") };
        return Err(ConfigError::Invalid {
            key: "worker.sandbox".into(),
            message: format!(
                "\"landlock\" needs Linux Landlock ABI {MIN_LANDLOCK_ABI} or later (Linux 6.12, \
                 with landlock in the lsm= list); this kernel has {have}. Use \"auto\" to run \
                 unconfined there, or \"systemd-run\""
            ),
        });
    }
    Ok(())
}

/// What a `landlock` worker may reach besides its workspace, opened once at start.
#[derive(Debug)]
pub struct Landlock {
    /// (descriptor, access) for every read rule, write rule and device.
    rules: Vec<(PathFd, BitFlags<AccessFs>)>,
    /// A first layer, built once, when an excluded path lies inside a readable directory:
    /// carving one out takes a rule per entry of that directory (/etc: ~150, 0.7 ms a spawn),
    /// so that is done once here, and each worker's own ruleset (`rules`, whole directories)
    /// is stacked on it; Landlock allows what every layer allows. The layer also allows all
    /// of the workspaces and of /proc, which the worker's own layer narrows to its own.
    pub(super) base: Option<OwnedFd>,
    ports: Vec<u16>,
    /// (resource, limit) applied in the child.
    pub(super) rlimits: Vec<(libc::c_int, u64)>,
    /// `landlock_restrict_self` flags.
    pub(super) restrict_flags: u32,
}

/// The system directories every worker reads and executes (CONTRACT §5); `/lib*` is every
/// entry of `/` whose name starts with `lib`.
const SYSTEM_READ: &[&str] = &["/usr", "/bin", "/sbin", "/etc"];
const DEVICES_READ: &[&str] = &["/dev/zero", "/dev/urandom"];

impl Landlock {
    /// Decides the sandbox for `worker.sandbox`: `None` for none/systemd-run, and for `auto`
    /// on a kernel without Landlock ABI ≥ 6 (warned once here). `exclude` are paths that stay
    /// closed even inside a readable directory (the config file, /etc/turnd, the state
    /// directory).
    ///
    /// # Errors
    ///
    /// When `landlock` is asked for and the kernel lacks it (also caught by [`check`]), or a
    /// system path cannot be opened.
    pub fn for_config(
        config: &WorkerConfig,
        program_dir: Option<&Path>,
        exclude: &[PathBuf],
        workspaces: &Path,
    ) -> io::Result<Option<Landlock>> {
        match config.sandbox {
            Sandbox::None | Sandbox::SystemdRun => return Ok(None),
            Sandbox::Landlock => {
                check(config).map_err(|e| io::Error::new(io::ErrorKind::Unsupported, e))?
            }
            Sandbox::Auto => {
                let abi = landlock_abi();
                if abi < MIN_LANDLOCK_ABI {
                    tracing::warn!(
                        abi,
                        "worker.sandbox = \"auto\": this kernel has no Landlock ABI {MIN_LANDLOCK_ABI} or \
                         later; workers run without a sandbox (the daemon is still not dumpable)"
                    );
                    return Ok(None);
                }
            }
        }
        let abi = landlock_abi();
        // Only what exists needs carving out (each costs a rule per entry of its directory).
        let exclude: Vec<PathBuf> = exclude.iter().filter(|p| p.exists()).cloned().collect();
        let exclude = exclude.as_slice();
        let read = AccessFs::from_read(ABI::V6);
        let mut roots: Vec<PathBuf> = SYSTEM_READ.iter().map(PathBuf::from).collect();
        if let Ok(entries) = std::fs::read_dir("/") {
            for e in entries.flatten() {
                if e.file_name().as_encoded_bytes().starts_with(b"lib") {
                    roots.push(e.path());
                }
            }
        }
        roots.extend(program_dir.map(Path::to_path_buf));
        // Every rule but the workspace's; `expand`: carve the excluded paths out of the
        // directories holding them (else those directories are allowed whole).
        let collect = |expand: bool, warn: bool| {
            let mut rules = Vec::new();
            for root in &roots {
                allow_except(&mut rules, root, read, exclude, expand, false);
            }
            for dev in DEVICES_READ {
                allow_except(&mut rules, Path::new(dev), read, &[], false, false);
            }
            // Writing to /dev/null is what `>/dev/null` does; harmless, and shells need it.
            let null = read | AccessFs::WriteFile | AccessFs::Truncate;
            allow_except(&mut rules, Path::new("/dev/null"), null, &[], false, false);
            for path in &config.sandbox_read {
                allow_except(&mut rules, path, read, exclude, expand, warn);
            }
            for path in &config.sandbox_write {
                let all = AccessFs::from_all(ABI::V6);
                allow_except(&mut rules, path, all, exclude, expand, warn);
            }
            rules
        };
        let readable: Vec<&PathBuf> =
            roots.iter().chain(&config.sandbox_read).chain(&config.sandbox_write).collect();
        let carve = exclude
            .iter()
            .any(|x| readable.iter().any(|r| x != *r && x.starts_with(r) && r.is_dir()));
        let rules = collect(false, true);
        let base = if carve { Some(base_layer(collect(true, false), workspaces)?) } else { None };
        let ports = config.sandbox_connect.iter().filter_map(|&p| u16::try_from(p).ok()).collect();
        let mut rlimits = Vec::new();
        let limits = &config.limits;
        if let Some(m) = &limits.memory_max
            && let Ok(Some(bytes)) = crate::config::parse_bytes(m)
        {
            rlimits.push((libc::RLIMIT_AS as libc::c_int, bytes));
        }
        if let Some(n) = limits.nofile {
            rlimits.push((libc::RLIMIT_NOFILE as libc::c_int, n));
        }
        // Above the daemon's hard limit the child's setrlimit would fail (raising it needs
        // CAP_SYS_RESOURCE) and no worker would start: the hard limit is the most there is.
        for (resource, value) in &mut rlimits {
            let mut current = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            // SAFETY: getrlimit writes only into `current`.
            if unsafe { libc::getrlimit(*resource as _, &mut current) } == 0
                && *value > current.rlim_max
            {
                tracing::warn!(
                    resource = *resource,
                    asked = *value,
                    hard = current.rlim_max,
                    "a worker.limits value is above the daemon's own hard limit; workers get that"
                );
                *value = current.rlim_max;
            }
        }
        if limits.cpu_quota.is_some() || limits.tasks_max.is_some() {
            tracing::warn!(
                "worker.limits.cpu_quota and tasks_max are not applied with worker.sandbox = \
                 \"landlock\": a CPU share and a task count per worker need a cgroup \
                 (\"systemd-run\"), and RLIMIT_NPROC counts every process of the user, the daemon \
                 and all its workers together"
            );
        }
        let restrict_flags = if abi >= 7 { LANDLOCK_RESTRICT_SELF_LOG_NEW_EXEC_ON } else { 0 };
        tracing::info!(
            abi,
            rules = rules.len(),
            carved = carve,
            ports = ?config.sandbox_connect,
            "workers run under Landlock (worker.sandbox = {:?})",
            config.sandbox
        );
        Ok(Some(Landlock { rules, base, ports, rlimits, restrict_flags }))
    }

    /// A fresh ruleset for one worker: everything opened at start, plus `workspace` (read and
    /// write), plus the TCP ports. Scoped signals and abstract sockets; TCP bind handled and
    /// never allowed. Runs on the spawner thread.
    ///
    /// # Errors
    ///
    /// A Landlock call failed, or the workspace could not be opened.
    pub(super) fn ruleset(&self, workspace: &Path) -> io::Result<OwnedFd> {
        let err = |e: landlock::RulesetError| io::Error::other(format!("landlock: {e}"));
        let mut ruleset = Ruleset::default()
            .set_compatibility(CompatLevel::HardRequirement)
            .handle_access(AccessFs::from_all(ABI::V6))
            .map_err(err)?
            .handle_access(AccessNet::from_all(ABI::V6))
            .map_err(err)?
            .scope(Scope::from_all(ABI::V6))
            .map_err(err)?
            .create()
            .map_err(err)?;
        for (fd, access) in &self.rules {
            ruleset = ruleset.add_rule(PathBeneath::new(fd.as_fd(), *access)).map_err(err)?;
        }
        let ws = PathFd::new(workspace)
            .map_err(|e| io::Error::other(format!("landlock: workspace: {e}")))?;
        ruleset =
            ruleset.add_rule(PathBeneath::new(ws, AccessFs::from_all(ABI::V6))).map_err(err)?;
        for &port in &self.ports {
            ruleset = ruleset.add_rule(NetPort::new(port, AccessNet::ConnectTcp)).map_err(err)?;
        }
        Option::<OwnedFd>::from(ruleset)
            .ok_or_else(|| io::Error::other("landlock: the kernel gave no ruleset"))
    }
}

/// The shared first layer: filesystem rights only, `rules` (carved), all workspaces and /proc.
fn base_layer(rules: Vec<(PathFd, BitFlags<AccessFs>)>, workspaces: &Path) -> io::Result<OwnedFd> {
    let err = |e: landlock::RulesetError| io::Error::other(format!("landlock: {e}"));
    std::fs::create_dir_all(workspaces)?;
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_all(ABI::V6))
        .map_err(err)?
        .create()
        .map_err(err)?;
    for (fd, access) in rules {
        ruleset = ruleset.add_rule(PathBeneath::new(fd, access)).map_err(err)?;
    }
    let read = AccessFs::from_read(ABI::V6);
    let proc = PathFd::new("/proc").map_err(|e| io::Error::other(format!("landlock: {e}")))?;
    ruleset = ruleset.add_rule(PathBeneath::new(proc, read)).map_err(err)?;
    let ws = PathFd::new(workspaces).map_err(|e| io::Error::other(format!("landlock: {e}")))?;
    ruleset = ruleset.add_rule(PathBeneath::new(ws, AccessFs::from_all(ABI::V6))).map_err(err)?;
    Option::<OwnedFd>::from(ruleset)
        .ok_or_else(|| io::Error::other("landlock: the kernel gave no ruleset"))
}

/// Adds a rule giving `access` on `path`, except below any of `exclude` when `expand`: a
/// directory holding an excluded path gets only ReadDir, and each of its other entries a rule
/// of its own (Landlock can only add, never subtract). An excluded path itself is always
/// skipped. A missing path is skipped (with a warning when `configured`).
fn allow_except(
    rules: &mut Vec<(PathFd, BitFlags<AccessFs>)>,
    path: &Path,
    access: BitFlags<AccessFs>,
    exclude: &[PathBuf],
    expand: bool,
    configured: bool,
) {
    if exclude.iter().any(|x| x == path) {
        if configured {
            tracing::warn!(
                path = %path.display(),
                "sandbox path skipped: workers may never reach the state directory or the config"
            );
        }
        return;
    }
    let inner: Vec<&PathBuf> = exclude.iter().filter(|x| expand && x.starts_with(path)).collect();
    let is_dir = std::fs::metadata(path).is_ok_and(|m| m.is_dir());
    if inner.is_empty() || !is_dir {
        match PathFd::new(path) {
            Ok(fd) => {
                let access = if is_dir { access } else { access & AccessFs::from_file(ABI::V6) };
                rules.push((fd, access));
            }
            Err(e) => {
                if configured {
                    tracing::warn!(path = %path.display(), "sandbox path skipped: {e}");
                }
            }
        }
        return;
    }
    if let Ok(fd) = PathFd::new(path) {
        rules.push((fd, access & AccessFs::ReadDir));
    }
    let Ok(entries) = std::fs::read_dir(path) else { return };
    for entry in entries.flatten() {
        allow_except(rules, &entry.path(), access, exclude, expand, false);
    }
}

/// The argv prefix for the configured sandbox; empty for a plain spawn.
pub fn prefix(config: &WorkerConfig) -> Vec<String> {
    if config.sandbox != Sandbox::SystemdRun {
        return Vec::new();
    }
    let prefix = systemd_run_argv(config);
    match probe(&prefix) {
        Ok(()) => {
            tracing::info!(
                "workers run in transient systemd scopes (worker.sandbox = systemd-run)"
            );
            prefix
        }
        Err(why) => {
            tracing::warn!(
                "worker.sandbox = \"systemd-run\" is not usable here ({why}); workers are spawned without a sandbox. \
                 It needs root or a polkit rule allowing the service user to start transient units."
            );
            Vec::new()
        }
    }
}

pub fn systemd_run_argv(config: &WorkerConfig) -> Vec<String> {
    let mut argv: Vec<String> =
        ["systemd-run", "--scope", "--quiet", "--collect"].map(String::from).into();
    let l = &config.limits;
    let mut property = |p: String| {
        argv.push("-p".to_owned());
        argv.push(p);
    };
    if let Some(m) = &l.memory_max {
        property(format!("MemoryMax={m}"));
    }
    if let Some(c) = &l.cpu_quota {
        property(format!("CPUQuota={c}"));
    }
    if let Some(t) = l.tasks_max {
        property(format!("TasksMax={t}"));
    }
    if let Some(n) = l.nofile {
        property(format!("LimitNOFILE={n}"));
    }
    property("IPAddressDeny=any".to_owned());
    property("IPAddressAllow=localhost".to_owned());
    argv.push("--".to_owned());
    argv
}

fn probe(prefix: &[String]) -> Result<(), String> {
    let mut cmd = Command::new(&prefix[0]);
    cmd.args(&prefix[1..])
        .arg("true")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    match cmd.output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(String::from_utf8_lossy(&out.stderr).trim().chars().take(200).collect()),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_carries_the_limits_and_loopback_only_network() {
        let mut c = WorkerConfig { sandbox: Sandbox::SystemdRun, ..Default::default() };
        c.limits.memory_max = Some("512M".into());
        c.limits.tasks_max = Some(64);
        let argv = systemd_run_argv(&c).join(" ");
        assert!(argv.starts_with("systemd-run --scope"));
        assert!(argv.contains("-p MemoryMax=512M"));
        assert!(argv.contains("-p TasksMax=64"));
        assert!(argv.contains("-p IPAddressDeny=any -p IPAddressAllow=localhost"));
        assert!(argv.ends_with(" --"));
        assert!(!argv.contains("CPUQuota"));
    }
}
