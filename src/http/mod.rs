//! The HTTP surface: the console listener on `http.listen` (loopback by default) and, when
//! `http.ops_listen` is set, an ops listener for probes and scrapers.
//!
//! ```text
//! http.listen       /metrics, /healthz, /readyz   this module: Prometheus text, liveness,
//!                                                 readiness (503 unless database, broker and
//!                                                 lock session are healthy); always open
//!                   /api/v1/...                   api.rs: the console's views as JSON, and the
//!                                                 operator actions (replay, purge, bulk,
//!                                                 cancel) behind http.admin_token
//!                   /, /parked/{id}               console.rs: the operator console,
//!                                                 server-rendered from the database (maud
//!                                                 templates compiled into the binary)
//!                   /login, /logout               access.rs: the console's read session
//!                   the API, the pages, /login, /logout: the Host check; the API and the
//!                   pages: http.read_token, when set (access.rs)
//! http.ops_listen   /metrics, /healthz, /readyz   only these; anything else is 404
//! ```
//!
//! **Architecture invariant**: it never takes a lock. The only writes are the operator actions
//! (parked replay and purge, one by one or in bulk; cancelling a turn, the one change to a
//! pending turn), which need the bearer token, go through `parked`, `cancel` and `store` (the
//! same code as `turnd parked` and `turnd cancel`) and are audited. Lists never read a parked turn's body (only the
//! one-turn view does) and never return more than `store::MAX_LIST_ROWS` rows.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use tokio_util::sync::CancellationToken;

mod access;
mod api;
mod console;
mod views;

use crate::broker::Broker;
use crate::config::{Config, HttpConfig, Secret};
use crate::lock::LockSession;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::supervise::{ComponentError, ComponentResult};

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
    #[error("cannot listen on {key} {addr}: {source}")]
    Bind { key: &'static str, addr: SocketAddr, source: std::io::Error },
}

/// What every handler gets: the health checks (and through them the store and the metrics),
/// the configuration (http.show_payloads, the timings) and the tokens, which SIGHUP may
/// replace while the daemon runs (so they are read from here, never from `config`).
#[derive(Debug, Clone)]
pub struct AppState {
    pub health: Health,
    pub config: Arc<Config>,
    tokens: Tokens,
}

/// `http.admin_token` and `http.read_token` as they are now: shared by both listeners and
/// every handler, replaced as a pair on reload.
#[derive(Debug, Clone, Default)]
pub struct Tokens(Arc<std::sync::RwLock<TokenPair>>);

#[derive(Debug, Clone, Default)]
struct TokenPair {
    admin: Option<Secret>,
    /// `http.admin_token_name`: who the admin token stands for in the audit log.
    admin_name: String,
    read: Option<Secret>,
}

impl Tokens {
    pub fn new(http: &HttpConfig) -> Tokens {
        let t = Tokens::default();
        t.set(http);
        t
    }

    /// Replaces both tokens with those of `http`; returns which of them changed.
    pub fn set(&self, http: &HttpConfig) -> Vec<&'static str> {
        // A poisoned lock only means a reader panicked; the pair is whole.
        let mut pair = self.0.write().unwrap_or_else(|p| p.into_inner());
        let mut changed = Vec::new();
        if pair.admin != http.admin_token {
            changed.push("http.admin_token");
        }
        if pair.read != http.read_token {
            changed.push("http.read_token");
        }
        *pair = TokenPair {
            admin: http.admin_token.clone(),
            admin_name: http.admin_token_name.clone(),
            read: http.read_token.clone(),
        };
        changed
    }

    pub fn admin(&self) -> Option<Secret> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).admin.clone()
    }

    pub fn read(&self) -> Option<Secret> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).read.clone()
    }

    pub fn admin_name(&self) -> String {
        self.0.read().unwrap_or_else(|p| p.into_inner()).admin_name.clone()
    }
}

impl AppState {
    pub fn new(health: Health, config: Arc<Config>, tokens: Tokens) -> AppState {
        AppState { health, config, tokens }
    }

    pub(crate) fn admin_token(&self) -> Option<Secret> {
        self.tokens.admin()
    }

    pub(crate) fn admin_name(&self) -> String {
        self.tokens.admin_name()
    }

    pub(crate) fn read_token(&self) -> Option<Secret> {
        self.tokens.read()
    }

    pub(crate) fn store(&self) -> &Store {
        &self.health.store
    }

    /// A daemon whose heartbeat is older than this is not live (as `turnd status` judges).
    pub(crate) fn live_within(&self) -> Duration {
        self.config.sweep.live_within()
    }
}

/// `/metrics`, `/healthz`, `/readyz`: open on both listeners.
fn open_routes() -> Router<AppState> {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
}

/// Every route of the console listener (`http.listen`), for `serve` and for tests: the open
/// routes as they are; the console, the API and the login behind the Host check; the console
/// and the API behind the read token too.
pub fn router(state: AppState) -> Router {
    let gated = Router::new()
        .merge(api::routes())
        .merge(console::routes())
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), access::require_read));
    let console = Router::new()
        .route("/login", post(access::login).layer(DefaultBodyLimit::max(access::MAX_LOGIN_BYTES)))
        .route("/logout", post(access::logout))
        .merge(gated)
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), access::check_host));
    open_routes().merge(console).with_state(state)
}

/// The routes of the ops listener (`http.ops_listen`): only `/metrics`, `/healthz`,
/// `/readyz`; anything else is 404, so opening it to the network exposes no console.
pub fn ops_router(state: AppState) -> Router {
    open_routes()
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "not found: this listener (http.ops_listen) serves only /metrics, /healthz and \
                 /readyz; the console is on http.listen\n",
            )
        })
        .with_state(state)
}

/// Binds the console listener now (so a bad address fails the start), serves until `cancel`.
pub async fn serve(
    addr: SocketAddr,
    state: AppState,
    cancel: CancellationToken,
) -> Result<impl Future<Output = ComponentResult>, HttpError> {
    let actions =
        if state.admin_token().is_some() { "enabled" } else { "disabled (no http.admin_token)" };
    let reads = if state.read_token().is_some() { "token required" } else { "open" };
    if state.read_token().is_none() && !addr.ip().to_canonical().is_loopback() {
        tracing::warn!(
            %addr,
            "http.listen is not a loopback address and http.read_token is not set: whoever \
             reaches it reads the console and the API; set http.read_token, or keep http.listen \
             on loopback and scrape through http.ops_listen"
        );
    }
    let listener = bind("http.listen", addr).await?;
    tracing::info!(%addr, actions, reads, "http listening (console /, /api/v1/, /metrics, /healthz, /readyz)");
    Ok(run(listener, router(state), cancel))
}

/// Binds the ops listener now, serves until `cancel`.
pub async fn serve_ops(
    addr: SocketAddr,
    state: AppState,
    cancel: CancellationToken,
) -> Result<impl Future<Output = ComponentResult>, HttpError> {
    let listener = bind("http.ops_listen", addr).await?;
    tracing::info!(%addr, "ops http listening (/metrics, /healthz, /readyz only)");
    Ok(run(listener, ops_router(state), cancel))
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<tokio::net::TcpListener, HttpError> {
    tokio::net::TcpListener::bind(addr).await.map_err(|source| HttpError::Bind {
        key,
        addr,
        source,
    })
}

async fn run(
    listener: tokio::net::TcpListener,
    app: Router,
    cancel: CancellationToken,
) -> ComponentResult {
    let addr = listener.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string());
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    let server = axum::serve(listener, app).with_graceful_shutdown(cancel.cancelled_owned());
    server.await.map_err(|source| ComponentError::Http { addr, source })
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
