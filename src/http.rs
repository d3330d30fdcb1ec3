//! The HTTP surface on `http.listen`: `/metrics` (Prometheus text), `/healthz` (the process
//! answers), `/readyz` (database, broker and lock session all healthy, else 503).
//!
//! **Architecture invariant**: read-only; it never takes a lock or touches a turn.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
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
        let database = matches!(tokio::time::timeout(Duration::from_secs(2), self.store.ping()).await, Ok(Ok(())));
        let r = Readiness { database, broker: self.broker.is_healthy(), lock_session: self.locks.is_healthy() };
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

/// Binds now (so a bad address fails the start), serves until `cancel`.
pub async fn serve(
    addr: SocketAddr,
    health: Health,
    cancel: CancellationToken,
) -> Result<impl Future<Output = ()>, HttpError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| HttpError::Bind { addr, source })?;
    tracing::info!(%addr, "http listening (/metrics, /healthz, /readyz)");
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(health);
    Ok(async move {
        let server = axum::serve(listener, app).with_graceful_shutdown(cancel.cancelled_owned());
        if let Err(e) = server.await {
            tracing::error!(error = %e, "http server failed");
        }
    })
}

async fn metrics(State(h): State<Health>) -> impl IntoResponse {
    h.check().await;
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], h.metrics.encode())
}

async fn readyz(State(h): State<Health>) -> impl IntoResponse {
    let r = h.check().await;
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
