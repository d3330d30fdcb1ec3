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
use serde::Deserialize;

use super::AppState;
use super::views::{
    Cluster, DEFAULT_DEPLOYMENTS, DEFAULT_PARKED, Deployments, ParkedDetail, ParkedList, Turns,
    cluster_view, deployments_view, parked_detail, parked_view, turns_view,
};
use crate::parked::{self, ParkedError, ReplayResult};
use crate::store::{MAX_LIST_ROWS, StoreError};

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
