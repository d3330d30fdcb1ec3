//! sd_notify: READY=1 once the daemon can serve, STATUS= lines, WATCHDOG=1 from its own event
//! loop, STOPPING=1 on shutdown. A no-op when not run by systemd (no NOTIFY_SOCKET).
//!
//! The watchdog says the daemon's event loop is alive; database or broker outages do not stop
//! it (the daemon rides them out; they show in /readyz, STATUS= and metrics — CONTRACT §10).

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Notifier {
    socket: Option<PathOrAbstract>,
    watchdog: Option<Duration>,
}

#[derive(Debug, Clone)]
enum PathOrAbstract {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// From NOTIFY_SOCKET and WATCHDOG_USEC (WATCHDOG_PID, when set, must be us).
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET").map(|s| {
            let bytes = std::os::unix::ffi::OsStrExt::as_bytes(s.as_os_str()).to_vec();
            match bytes.strip_prefix(b"@") {
                Some(name) => PathOrAbstract::Abstract(name.to_vec()),
                None => PathOrAbstract::Path(PathBuf::from(s)),
            }
        });
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|p| p == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|u| *u > 0 && for_us)
            .map(Duration::from_micros);
        Notifier { socket, watchdog }
    }

    /// How often to send WATCHDOG=1: half the configured interval.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|w| w / 2)
    }

    pub fn notify(&self, state: &str) {
        let Some(target) = &self.socket else { return };
        let Ok(sock) = UnixDatagram::unbound() else { return };
        let result = match target {
            PathOrAbstract::Path(p) => sock.send_to(state.as_bytes(), p),
            PathOrAbstract::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                match std::os::unix::net::SocketAddr::from_abstract_name(name) {
                    Ok(addr) => sock.send_to_addr(state.as_bytes(), &addr),
                    Err(e) => Err(e),
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "sd_notify failed");
        }
    }
}
