//! The optional worker sandbox: `worker.sandbox = "systemd-run"` starts each worker in a
//! transient systemd scope with the configured limits and network restricted to loopback.
//!
//! `systemd-run --scope` execs the worker itself after creating the scope, so the worker is
//! still the daemon's child (pipes, process group and parent-death signal all hold). It needs
//! root or a polkit rule for the service user; when it cannot be used the daemon falls back to
//! a plain spawn with one warning at start.

use std::process::{Command, Stdio};

use crate::config::{Sandbox, WorkerConfig};

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
