//! The HTTP surface on `http.listen` (loopback by default):
//!
//! ```text
//! /metrics, /healthz, /readyz     this module: Prometheus text, liveness, readiness (503 unless
//!                                 database, broker and lock session are healthy)
//! /api/v1/...                     api.rs: the console's views as JSON, and the two actions on
//!                                 parked turns (replay, purge) behind http.admin_token
//! /, /parked/{id}                 console.rs: the operator console, server-rendered from the
//!                                 database (maud templates compiled into the binary)
//! ```
//!
//! **Architecture invariant**: it never takes a lock or changes a pending turn. The only writes
//! are the two parked-turn actions, which need the bearer token and go through `parked` and
//! `store`, the same code as `turnd parked`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

mod api;
mod console;

use crate::broker::Broker;
use crate::config::Config;
use crate::lock::LockSession;
use crate::metrics::Metrics;
use crate::store::Store;

#[derive(Debug, Clone)]
pub struct Health {
    pub store: Store,
    pub broker: Broker,
    pub locks: LockSession,
    pub metrics: Arc<Metrics>,
}

/// What /readyz reports.
#[derive(Debug, Clone, Copy)]
pub struct Readiness {
    pub database: bool,
    pub broker: bool,
    pub lock_session: bool,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        self.database && self.broker && self.lock_session
    }
}

impl Health {
    /// Checks every dependency now and records it in the `up` gauges.
    pub async fn check(&self) -> Readiness {
        let database = matches!(
            tokio::time::timeout(Duration::from_secs(2), self.store.ping()).await,
            Ok(Ok(()))
        );
        let r = Readiness {
            database,
            broker: self.broker.is_healthy(),
            lock_session: self.locks.is_healthy(),
        };
        self.metrics.set_up("database", r.database);
        self.metrics.set_up("broker", r.broker);
        self.metrics.set_up("lock_session", r.lock_session);
        r
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on http.listen {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// What every handler gets: the health checks (and through them the store and the metrics)
/// and the configuration (http.admin_token, http.show_payloads, the timings).
#[derive(Debug, Clone)]
pub struct AppState {
    pub health: Health,
    pub config: Arc<Config>,
}

impl AppState {
    pub fn new(health: Health, config: Arc<Config>) -> AppState {
        AppState { health, config }
    }

    pub(crate) fn store(&self) -> &Store {
        &self.health.store
    }

    /// A daemon whose heartbeat is older than this is not live (as `turnd status` judges).
    pub(crate) fn live_within(&self) -> Duration {
        (self.config.sweep.interval * 3).max(Duration::from_secs(15))
    }
}

/// Every route, for `serve` and for tests.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(api::routes())
        .merge(console::routes())
        .with_state(state)
}

/// Binds now (so a bad address fails the start), serves until `cancel`.
pub async fn serve(
    addr: SocketAddr,
    state: AppState,
    cancel: CancellationToken,
) -> Result<impl Future<Output = ()>, HttpError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })?;
    let actions = if state.config.http.admin_token.is_some() {
        "enabled"
    } else {
        "disabled (no http.admin_token)"
    };
    tracing::info!(%addr, actions, "http listening (console /, /api/v1/, /metrics, /healthz, /readyz)");
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    Ok(async move {
        let server = axum::serve(listener, app).with_graceful_shutdown(cancel.cancelled_owned());
        if let Err(e) = server.await {
            tracing::error!(error = %e, "http server failed");
        }
    })
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    let h = &s.health;
    h.check().await;
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        h.metrics.encode(),
    )
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let r = s.health.check().await;
    let body = format!(
        "database {}\nbroker {}\nlock_session {}\n",
        ok(r.database),
        ok(r.broker),
        ok(r.lock_session)
    );
    let status = if r.ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, body)
}

fn ok(b: bool) -> &'static str {
    if b { "ok" } else { "down" }
}
