//! `/api/v1/`: the console's views as JSON, and the two actions on parked turns.
//!
//! | method | path | |
//! |---|---|---|
//! | GET | `/api/v1/cluster` | daemons (id, version, heartbeat age, owned deployments, live workers, ready) |
//! | GET | `/api/v1/deployments?q=&limit=` | owned deployments and those with pending turns, longest-waiting first |
//! | GET | `/api/v1/turns` | pending turns by state with the oldest; terminal events per 5 minutes over the hour |
//! | GET | `/api/v1/parked?code=&limit=` | parked turns, newest first (no bodies), and counts by code |
//! | GET | `/api/v1/parked/{id}` | one parked turn with headers and body (payload hidden unless `http.show_payloads`) |
//! | POST | `/api/v1/parked/{id}/replay?by=` | republish it once (bearer token) |
//! | POST | `/api/v1/parked/{id}/purge` | delete its record (bearer token) |
//!
//! Reads are open unless `http.read_token` is set; then they need it or the admin token
//! (`access.rs`, which answers 401). Actions need `Authorization: Bearer <http.admin_token>`;
//! with no token configured, or a missing or wrong one, they answer 403. Tokens are never
//! logged. A `limit` above `store::MAX_LIST_ROWS` is clamped to it (the answer says which
//! limit applied); one below 1 is a 400.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{Extensions, HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::AppState;
use crate::parked::{self, ParkedError, ReplayResult};
use crate::store::{
    ConsoleDaemon, ConsoleDeployment, EVENT_BUCKET_SECONDS, EVENT_WINDOW_SECONDS, EventBucket,
    MAX_LIST_ROWS, Parked, ParkedByCode, PendingByState, StoreError,
};

/// What replaces a turn's `payload` when `http.show_payloads` is false.
pub(super) const PAYLOAD_HIDDEN: &str = "(hidden: set http.show_payloads = true to see payloads)";

pub(super) const DEFAULT_DEPLOYMENTS: i64 = 200;
pub(super) const DEFAULT_PARKED: i64 = 100;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/cluster", get(cluster))
        .route("/api/v1/deployments", get(deployments))
        .route("/api/v1/turns", get(turns))
        .route("/api/v1/parked", get(parked_list))
        .route("/api/v1/parked/{id}", get(parked_show))
        .route("/api/v1/parked/{id}/replay", post(replay))
        .route("/api/v1/parked/{id}/purge", post(purge))
        .layer(axum::middleware::map_response(|mut r: Response| async move {
            r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }))
}

// ---- errors -----------------------------------------------------------------------------------

#[derive(Debug)]
pub(super) enum ApiError {
    Forbidden(&'static str),
    BadRequest(String),
    NotFound(String),
    Unavailable(String),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Unavailable(e.to_string())
    }
}

impl From<ParkedError> for ApiError {
    fn from(e: ParkedError) -> Self {
        ApiError::Unavailable(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            ApiError::Forbidden(m) => (StatusCode::FORBIDDEN, m.to_owned()),
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            ApiError::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, m),
        };
        (status, Json(serde_json::json!({ "error": message }))).into_response()
    }
}

// ---- views (shared with the console) -----------------------------------------------------------

#[derive(Debug, Serialize)]
pub(super) struct Cluster {
    /// The daemon that answered.
    pub daemon: String,
    pub prefix: String,
    pub version: &'static str,
    /// Daemons whose heartbeat is older than this are not `live`.
    pub live_within_s: f64,
    pub daemons: Vec<ConsoleDaemon>,
    pub unpublished_events: i64,
    pub actions_enabled: bool,
    pub show_payloads: bool,
}

pub(super) async fn cluster_view(s: &AppState) -> Result<Cluster, StoreError> {
    let live_within = s.live_within();
    Ok(Cluster {
        daemon: s.config.daemon.id.clone(),
        prefix: s.config.amqp.prefix.clone(),
        version: env!("CARGO_PKG_VERSION"),
        live_within_s: live_within.as_secs_f64(),
        daemons: s.store().console_daemons(live_within).await?,
        unpublished_events: s.store().outbox_backlog().await?,
        actions_enabled: s.admin_token().is_some(),
        show_payloads: s.config.http.show_payloads,
    })
}

#[derive(Debug, Serialize)]
pub(super) struct Deployments {
    pub q: Option<String>,
    pub limit: i64,
    pub deployments: Vec<ConsoleDeployment>,
}

pub(super) async fn deployments_view(
    s: &AppState,
    q: Option<&str>,
    limit: i64,
) -> Result<Deployments, StoreError> {
    let q = q.map(str::trim).filter(|q| !q.is_empty());
    let deployments = s.store().console_deployments(q, s.config.turn.deadline, limit).await?;
    Ok(Deployments { q: q.map(str::to_owned), limit, deployments })
}

#[derive(Debug, Serialize)]
pub(super) struct Turns {
    /// Always `queued` then `running`, with zero counts when none.
    pub pending: Vec<PendingByState>,
    pub unpublished_events: i64,
    pub terminal_events: TerminalEvents,
}

#[derive(Debug, Serialize)]
pub(super) struct TerminalEvents {
    pub bucket_seconds: i64,
    pub window_seconds: i64,
    /// `bucket` 0 is the last five minutes; rows only where there were events.
    pub buckets: Vec<EventBucket>,
}

pub(super) async fn turns_view(s: &AppState) -> Result<Turns, StoreError> {
    let found = s.store().pending_by_state().await?;
    let pending = ["queued", "running"]
        .into_iter()
        .map(|state| {
            found.iter().find(|p| p.state == state).cloned().unwrap_or(PendingByState {
                state: state.to_owned(),
                count: 0,
                oldest_age_s: None,
                oldest_deployment: None,
                oldest_message_id: None,
            })
        })
        .collect();
    Ok(Turns {
        pending,
        unpublished_events: s.store().outbox_backlog().await?,
        terminal_events: TerminalEvents {
            bucket_seconds: EVENT_BUCKET_SECONDS,
            window_seconds: EVENT_WINDOW_SECONDS,
            buckets: s.store().events_by_bucket().await?,
        },
    })
}

#[derive(Debug, Serialize)]
pub(super) struct ParkedList {
    pub code: Option<String>,
    /// The limit that applied (the one asked for, clamped to `store::MAX_LIST_ROWS`).
    pub limit: i64,
    pub by_code: Vec<ParkedByCode>,
    /// Records only: bodies and headers are in `/api/v1/parked/{id}`.
    pub parked: Vec<Parked>,
}

pub(super) async fn parked_view(
    s: &AppState,
    code: Option<&str>,
    limit: i64,
) -> Result<ParkedList, StoreError> {
    let code = code.map(str::trim).filter(|c| !c.is_empty());
    Ok(ParkedList {
        code: code.map(str::to_owned),
        limit,
        by_code: s.store().parked_by_code().await?,
        parked: s.store().parked_list(code, None, limit).await?,
    })
}

/// One parked turn with what an operator needs to judge it.
#[derive(Debug, Serialize)]
pub(super) struct ParkedDetail {
    #[serde(flatten)]
    pub parked: Parked,
    /// The AMQP headers it was parked with (x-turnd-code, x-turnd-reason, x-death…).
    pub headers: serde_json::Value,
    /// The original turn: its JSON, or the raw text when it was not JSON.
    pub body: serde_json::Value,
    pub body_bytes: usize,
    /// Whether something of the body was replaced (http.show_payloads = false).
    pub payload_hidden: bool,
}

pub(super) async fn parked_detail(
    s: &AppState,
    id: i64,
) -> Result<Option<ParkedDetail>, StoreError> {
    let Some(turn) = s.store().parked_get(id).await? else {
        return Ok(None);
    };
    let (body, payload_hidden) = shown_body(&turn.body, s.config.http.show_payloads);
    let headers =
        serde_json::from_str(&turn.headers).unwrap_or_else(|_| turn.headers.clone().into());
    Ok(Some(ParkedDetail {
        body_bytes: turn.body.len(),
        headers,
        body,
        payload_hidden,
        parked: turn.parked,
    }))
}

/// The body as shown: all of it with `show_payloads`; otherwise a JSON object keeps every field
/// but `payload` (replaced by a note), and anything that is not a JSON object is hidden whole.
pub(super) fn shown_body(body: &[u8], show_payloads: bool) -> (serde_json::Value, bool) {
    let parsed = serde_json::from_slice::<serde_json::Value>(body);
    if show_payloads {
        return match parsed {
            Ok(v) => (v, false),
            Err(_) => (String::from_utf8_lossy(body).into_owned().into(), false),
        };
    }
    match parsed {
        Ok(serde_json::Value::Object(mut map)) => {
            let hidden = match map.get_mut("payload") {
                Some(p) => {
                    *p = PAYLOAD_HIDDEN.into();
                    true
                }
                None => false,
            };
            (serde_json::Value::Object(map), hidden)
        }
        Ok(_) | Err(_) => (
            format!("(body hidden: {} bytes, not a JSON object; set http.show_payloads = true to see it)", body.len())
                .into(),
            true,
        ),
    }
}

// ---- handlers -----------------------------------------------------------------------------------

async fn cluster(State(s): State<AppState>) -> Result<Json<Cluster>, ApiError> {
    Ok(Json(cluster_view(&s).await?))
}

#[derive(Debug, Deserialize)]
pub(super) struct DeploymentsQuery {
    pub q: Option<String>,
    pub limit: Option<i64>,
}

async fn deployments(
    State(s): State<AppState>,
    Query(q): Query<DeploymentsQuery>,
) -> Result<Json<Deployments>, ApiError> {
    let limit = limit(q.limit, DEFAULT_DEPLOYMENTS)?;
    Ok(Json(deployments_view(&s, q.q.as_deref(), limit).await?))
}

async fn turns(State(s): State<AppState>) -> Result<Json<Turns>, ApiError> {
    Ok(Json(turns_view(&s).await?))
}

#[derive(Debug, Deserialize)]
struct ParkedQuery {
    code: Option<String>,
    limit: Option<i64>,
}

async fn parked_list(
    State(s): State<AppState>,
    Query(q): Query<ParkedQuery>,
) -> Result<Json<ParkedList>, ApiError> {
    let limit = limit(q.limit, DEFAULT_PARKED)?;
    Ok(Json(parked_view(&s, q.code.as_deref(), limit).await?))
}

async fn parked_show(
    State(s): State<AppState>,
    Path(id): Path<i64>,
) -> Result<Json<ParkedDetail>, ApiError> {
    match parked_detail(&s, id).await? {
        Some(d) => Ok(Json(d)),
        None => Err(ApiError::NotFound(format!("no parked turn {id}"))),
    }
}

#[derive(Debug, Deserialize)]
struct ReplayQuery {
    /// Recorded as who replayed it (default "http").
    by: Option<String>,
}

async fn replay(
    State(s): State<AppState>,
    Path(id): Path<i64>,
    Query(q): Query<ReplayQuery>,
    headers: HeaderMap,
    extensions: Extensions,
) -> Result<Response, ApiError> {
    authorize(&s, &headers, &extensions, "replay", id)?;
    let who = operator_name(q.by.as_deref())?;
    let mut results = parked::replay(&s.config, s.store(), &[id], &who).await?;
    let result = results.pop().unwrap_or(ReplayResult { id, result: "not_found".to_owned() });
    let status = match result.result.as_str() {
        "replayed" => StatusCode::OK,
        "already_replayed" => StatusCode::CONFLICT,
        "not_found" => StatusCode::NOT_FOUND,
        _ => StatusCode::BAD_GATEWAY,
    };
    Ok((status, Json(result)).into_response())
}

async fn purge(
    State(s): State<AppState>,
    Path(id): Path<i64>,
    headers: HeaderMap,
    extensions: Extensions,
) -> Result<Response, ApiError> {
    authorize(&s, &headers, &extensions, "purge", id)?;
    let n = s.store().parked_purge(&[id], None, None).await?;
    if n == 0 {
        return Ok((
            StatusCode::NOT_FOUND,
            Json(ReplayResult { id, result: "not_found".to_owned() }),
        )
            .into_response());
    }
    tracing::info!(id, peer = %peer(&extensions), "parked turn purged through the API");
    Ok(Json(ReplayResult { id, result: "purged".to_owned() }).into_response())
}

// ---- helpers -----------------------------------------------------------------------------------

/// A list's `limit`: the default when absent, clamped to [`MAX_LIST_ROWS`] when larger (the
/// store clamps too; this makes the answer say so), refused when below 1.
fn limit(asked: Option<i64>, default: i64) -> Result<i64, ApiError> {
    match asked {
        None => Ok(default.min(MAX_LIST_ROWS)),
        Some(n) if n >= 1 => Ok(n.min(MAX_LIST_ROWS)),
        Some(n) => Err(ApiError::BadRequest(format!(
            "limit {n}: must be at least 1 (at most {MAX_LIST_ROWS} rows are returned)"
        ))),
    }
}

fn operator_name(by: Option<&str>) -> Result<String, ApiError> {
    let by = by.map(str::trim).filter(|b| !b.is_empty()).unwrap_or("http");
    if by.chars().count() > 64 || by.chars().any(char::is_control) {
        return Err(ApiError::BadRequest("by: at most 64 printable characters".to_owned()));
    }
    Ok(by.to_owned())
}

fn peer(extensions: &Extensions) -> String {
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_else(|| "-".to_owned())
}

/// The token of an `Authorization: Bearer <token>` header.
pub(super) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// Actions need http.admin_token as a bearer token: 403 without one configured, and for a
/// missing or wrong one. Refusals are logged with the peer address, never with the token.
fn authorize(
    s: &AppState,
    headers: &HeaderMap,
    extensions: &Extensions,
    action: &str,
    id: i64,
) -> Result<(), ApiError> {
    let Some(token) = s.admin_token() else {
        tracing::info!(action, id, peer = %peer(extensions), "console action refused: no http.admin_token is configured");
        return Err(ApiError::Forbidden(
            "actions are disabled: http.admin_token is not configured",
        ));
    };
    let given = bearer(headers);
    if !given.is_some_and(|g| token.matches(g)) {
        tracing::warn!(
            action,
            id,
            peer = %peer(extensions),
            token_sent = given.is_some(),
            "console action refused: missing or wrong bearer token"
        );
        return Err(ApiError::Forbidden(
            "missing or wrong bearer token (Authorization: Bearer <http.admin_token>)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_hidden_and_the_rest_kept() {
        let body = br#"{"messageId":"m1","agentId":"a","payload":{"secret":"x"},"runId":7}"#;
        let (v, hidden) = shown_body(body, false);
        assert!(hidden);
        assert_eq!(v["payload"], PAYLOAD_HIDDEN);
        assert_eq!(v["messageId"], "m1");
        assert_eq!(v["runId"], 7);
        assert!(!v.to_string().contains("secret"));
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["messageId", "agentId", "payload", "runId"], "field order kept");

        let (v, hidden) = shown_body(body, true);
        assert!(!hidden);
        assert_eq!(v["payload"]["secret"], "x");
    }

    #[test]
    fn a_body_that_is_not_a_json_object_is_hidden_whole() {
        let (v, hidden) = shown_body(b"not json at all", false);
        assert!(hidden);
        assert!(v.as_str().unwrap().contains("15 bytes"));
        let (v, _) = shown_body(b"[1,2]", false);
        assert!(v.as_str().unwrap().contains("hidden"));
        let (v, hidden) = shown_body(b"not json at all", true);
        assert_eq!(v, "not json at all");
        assert!(!hidden);
        let (_, hidden) = shown_body(br#"{"messageId":"m"}"#, false);
        assert!(!hidden, "nothing to hide");
    }

    #[test]
    fn bearer_tokens_are_parsed_strictly() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer s3cret"));
        assert_eq!(bearer(&h), Some("s3cret"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer  s3cret "));
        assert_eq!(bearer(&h), Some("s3cret"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic czNjcmV0"));
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn operator_names_and_limits_are_checked() {
        assert_eq!(operator_name(None).unwrap(), "http");
        assert_eq!(operator_name(Some(" alice ")).unwrap(), "alice");
        assert!(operator_name(Some("a\nb")).is_err());
        assert!(operator_name(Some(&"x".repeat(65))).is_err());
        assert_eq!(limit(None, 7).unwrap(), 7);
        assert!(limit(Some(0), 7).is_err());
        assert!(limit(Some(-5), 7).is_err());
        assert_eq!(limit(Some(MAX_LIST_ROWS), 7).unwrap(), MAX_LIST_ROWS);
        assert_eq!(limit(Some(MAX_LIST_ROWS + 1), 7).unwrap(), MAX_LIST_ROWS);
        assert_eq!(limit(Some(i64::MAX), 7).unwrap(), MAX_LIST_ROWS);
    }
}
