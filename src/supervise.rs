//! Supervision of `turnd run`'s components. Each long-lived component (intake, owner requests,
//! retry mover, sweep, relay, http and ops listeners, status/watchdog, lock session, broker
//! supervisor, signal forwarders) is a task returning a [`ComponentResult`]; the daemon holds
//! their join handles in [`Components`] and selects on them beside the signals. A component
//! that ends before the daemon asked it to — returning, failing or panicking — is fatal: the
//! daemon logs its name, stops in order (as on SIGTERM) and exits non-zero, so that systemd or
//! Kubernetes restarts it. Running on without it would leave a daemon that says it is ready
//! but, say, has no intake.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;

use tokio::task::{JoinError, JoinSet};

/// Why a component stopped before it was asked to.
#[derive(Debug, thiserror::Error)]
pub enum ComponentError {
    #[error("the broker supervisor has stopped")]
    BrokerGone,
    #[error("the HTTP server on {addr} failed: {source}")]
    Http { addr: String, source: std::io::Error },
    #[error("the {0} signal stream ended")]
    SignalsEnded(&'static str),
    #[cfg(debug_assertions)]
    #[error("failed on purpose (TURND_DEBUG_FAIL_COMPONENT, debug builds only)")]
    Injected,
}

/// What every component returns: `Ok` only once it was asked to stop.
pub type ComponentResult = Result<(), ComponentError>;

/// How a component ended.
#[derive(Debug)]
pub enum Ended {
    /// It returned `Ok`: fine during shutdown, fatal before.
    Returned,
    Failed(ComponentError),
    Panicked(String),
}

impl fmt::Display for Ended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ended::Returned => f.write_str("ended without being asked to"),
            Ended::Failed(e) => write!(f, "failed: {e}"),
            Ended::Panicked(message) => write!(f, "panicked: {message}"),
        }
    }
}

/// A group of named component tasks, stopped together.
#[derive(Debug, Default)]
pub struct Components {
    set: JoinSet<ComponentResult>,
    names: HashMap<tokio::task::Id, &'static str>,
}

impl Components {
    pub fn new() -> Components {
        Components::default()
    }

    /// Spawns a component. Must run inside the runtime.
    pub fn spawn<F>(&mut self, name: &'static str, component: F)
    where
        F: Future<Output = ComponentResult> + Send + 'static,
    {
        #[cfg(debug_assertions)]
        let component = debug_hook::wrap(name, component);
        let handle = self.set.spawn(component);
        self.names.insert(handle.id(), name);
    }

    /// The next component to end, with its name. Never completes while none is left, so a
    /// `select!` over several groups waits for the others.
    pub async fn next(&mut self) -> (&'static str, Ended) {
        match self.set.join_next_with_id().await {
            Some(joined) => self.ended(joined),
            None => std::future::pending().await,
        }
    }

    /// Waits for every component (once asked to stop); one that failed or panicked meanwhile
    /// is logged.
    pub async fn join_all(&mut self) {
        while let Some(joined) = self.set.join_next_with_id().await {
            match self.ended(joined) {
                (_, Ended::Returned) => {}
                (name, how) => tracing::error!(component = name, "{name} {how} while stopping"),
            }
        }
    }

    fn ended(
        &mut self,
        joined: Result<(tokio::task::Id, ComponentResult), JoinError>,
    ) -> (&'static str, Ended) {
        let (id, how) = match joined {
            Ok((id, Ok(()))) => (id, Ended::Returned),
            Ok((id, Err(e))) => (id, Ended::Failed(e)),
            Err(e) => {
                let id = e.id();
                let how = match e.try_into_panic() {
                    Ok(payload) => Ended::Panicked(panic_text(payload.as_ref())),
                    Err(_) => Ended::Panicked("cancelled".to_owned()),
                };
                (id, how)
            }
        };
        (self.names.remove(&id).unwrap_or("a component"), how)
    }
}

/// A panic's message, from its payload.
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// Test-only: `TURND_DEBUG_FAIL_COMPONENT=<component>` (or `<component>:panic`) makes that
/// component fail (or panic) when the daemon receives SIGUSR2, so that a test sees the
/// supervision act on a real daemon. Compiled into debug builds only: a release build — what
/// the package, the image and `cargo install` ship — has no such lever at all, and a debug
/// build installs the SIGUSR2 handler only with the variable set, whose setter could stop the
/// daemon anyway. A signal, not a timer, so that a test triggers it after "turnd ready".
#[cfg(debug_assertions)]
mod debug_hook {
    use std::future::Future;

    use tokio::signal::unix::{SignalKind, signal};

    use super::{ComponentError, ComponentResult};

    pub(super) const VAR: &str = "TURND_DEBUG_FAIL_COMPONENT";

    pub(super) fn wrap<F>(
        name: &'static str,
        component: F,
    ) -> impl Future<Output = ComponentResult> + Send + 'static
    where
        F: Future<Output = ComponentResult> + Send + 'static,
    {
        let wanted = std::env::var(VAR).ok();
        // Some(true): panic; Some(false): return an error; None: not this component.
        let armed = match wanted.as_deref().map(|w| w.split_once(':').unwrap_or((w, ""))) {
            Some((component, mode)) if component == name => Some(mode == "panic"),
            _ => None,
        };
        // Installed here, before the task first runs, so a SIGUSR2 sent after "turnd ready"
        // never meets the default action (which ends the process).
        let trigger = armed.and_then(|p| signal(SignalKind::user_defined2()).ok().map(|s| (p, s)));
        async move {
            let Some((panic, mut usr2)) = trigger else { return component.await };
            tokio::select! {
                ended = component => ended,
                _ = usr2.recv() => {
                    tracing::warn!(component = name, "{VAR}: failing {name} now");
                    if panic {
                        panic!("{name} panicked on purpose ({VAR})");
                    }
                    Err(ComponentError::Injected)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_way_a_component_ends_is_named() {
        let mut group = Components::new();
        group.spawn("ok", async { Ok(()) });
        let (name, how) = group.next().await;
        assert_eq!((name, how.to_string().as_str()), ("ok", "ended without being asked to"));
        group.spawn("broker user", async { Err(ComponentError::BrokerGone) });
        let (name, how) = group.next().await;
        assert_eq!(
            (name, how.to_string().as_str()),
            ("broker user", "failed: the broker supervisor has stopped")
        );
        group.spawn("bug", async { panic!("bad state {}", 3) });
        let (name, how) = group.next().await;
        assert_eq!((name, how.to_string().as_str()), ("bug", "panicked: bad state 3"));
        // Empty: never completes.
        let none = tokio::time::timeout(std::time::Duration::from_millis(20), group.next()).await;
        assert!(none.is_err());
    }

    #[test]
    fn a_panic_payload_becomes_its_message() {
        assert_eq!(panic_text(&"fixed"), "fixed");
        assert_eq!(panic_text(&"owned".to_owned()), "owned");
        assert_eq!(panic_text(&42u8), "a panic without a message");
    }
}
