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
//! | GET | `/api/v1/parked/bulk?action=&code=&deployment=&older_than=` | what a bulk replay or purge by filter would act on: count, a sample, and the confirmation to send back |
//! | POST | `/api/v1/parked/bulk?action=&code=&deployment=&older_than=&confirm=` | act on it, if the set is still the one confirmed (else 409 with the new count); each turn audited (bearer token) |
//! | POST | `/api/v1/turns/{messageId}/cancel?deployment=` | cancel a turn (bearer token): 200 `cancelled` / `cancelling` / `already_cancelling`, 409 `already_done` or `ambiguous` (with the candidate deployments), 404 `not_found` |
//! | GET | `/api/v1/audit?action=&limit=` | operator actions, newest first |
//!
//! Reads are open unless `http.read_token` is set; then they need it or the admin token
//! (`access.rs`, which answers 401). Actions need `Authorization: Bearer <http.admin_token>`;
//! with no token configured, or a missing or wrong one, they answer 403. Tokens are never
//! logged. Every action is recorded in the audit log as `http.admin_token_name`'s, via `api`
//! (or `console` when the console's script sent it: header `X-Turnd-Via: console`). A `limit` above `store::MAX_LIST_ROWS` is clamped to it (the answer says which
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
use crate::cancel::CancelReport;
use crate::parked::{self, BulkError, BulkFilter, ParkedError, ReplayResult};
use crate::store::{Actor, AuditRow, CancelResult, MAX_LIST_ROWS, StoreError};

/// Default rows of the audit list.
pub(super) const DEFAULT_AUDIT: i64 = 100;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/cluster", get(cluster))
        .route("/api/v1/deployments", get(deployments))
        .route("/api/v1/turns", get(turns))
        .route("/api/v1/parked", get(parked_list))
        .route("/api/v1/parked/bulk", get(bulk_preview).post(bulk_act))
        .route("/api/v1/parked/{id}", get(parked_show))
        .route("/api/v1/parked/{id}/replay", post(replay))
        .route("/api/v1/parked/{id}/purge", post(purge))
        .route("/api/v1/turns/{message_id}/cancel", post(cancel))
        .route("/api/v1/audit", get(audit))
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
    let actor = authorize(&s, &headers, &extensions, "replay", &id.to_string())?;
    let who = operator_name(q.by.as_deref(), &actor)?;
    let mut results = parked::replay(&s.config, s.store(), &[id], &who, &actor).await?;
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
    let actor = authorize(&s, &headers, &extensions, "purge", &id.to_string())?;
    let purged = parked::purge(s.store(), &[id], None, None, &actor).await?;
    if purged.is_empty() {
        return Ok((
            StatusCode::NOT_FOUND,
            Json(ReplayResult { id, result: "not_found".to_owned() }),
        )
            .into_response());
    }
    tracing::info!(id, peer = %peer(&extensions), "parked turn purged through the API");
    Ok(Json(ReplayResult { id, result: "purged".to_owned() }).into_response())
}

#[derive(Debug, Deserialize)]
struct BulkQuery {
    action: String,
    #[serde(flatten)]
    filter: BulkFilter,
    confirm: Option<String>,
}

impl From<BulkError> for ApiError {
    fn from(e: BulkError) -> Self {
        match e {
            BulkError::BadFilter(m) => ApiError::BadRequest(m),
            BulkError::Changed(_) => ApiError::BadRequest(e.to_string()),
            BulkError::Parked(e) => e.into(),
        }
    }
}

async fn bulk_preview(
    State(s): State<AppState>,
    Query(q): Query<BulkQuery>,
) -> Result<Response, ApiError> {
    let (preview, _) = parked::bulk_preview(s.store(), &q.action, &q.filter).await?;
    Ok(Json(preview).into_response())
}

async fn bulk_act(
    State(s): State<AppState>,
    Query(q): Query<BulkQuery>,
    headers: HeaderMap,
    extensions: Extensions,
) -> Result<Response, ApiError> {
    let actor = authorize(&s, &headers, &extensions, &format!("bulk {}", q.action), "filter")?;
    let Some(confirm) = q.confirm.as_deref() else {
        return Err(ApiError::BadRequest(
            "confirm: send back the confirmation of GET /api/v1/parked/bulk with the same filter"
                .into(),
        ));
    };
    match parked::bulk_act(&s.config, s.store(), &q.action, &q.filter, confirm, &actor).await {
        Ok(results) => Ok(Json(serde_json::json!({ "results": results })).into_response()),
        Err(BulkError::Changed(preview)) => Ok((
            StatusCode::CONFLICT,
            Json(serde_json::json!({
                "error": format!("the matching set changed since it was counted (now {}); nothing was done: confirm the new count", preview.count),
                "preview": preview,
            })),
        )
            .into_response()),
        Err(e) => Err(e.into()),
    }
}

#[derive(Debug, Deserialize)]
struct CancelQuery {
    deployment: Option<String>,
}

async fn cancel(
    State(s): State<AppState>,
    Path(message_id): Path<String>,
    Query(q): Query<CancelQuery>,
    headers: HeaderMap,
    extensions: Extensions,
) -> Result<Response, ApiError> {
    let actor = authorize(&s, &headers, &extensions, "cancel", &message_id)?;
    let session = s.health.broker.current();
    let deployment = q.deployment.as_deref().map(str::trim).filter(|d| !d.is_empty());
    let mut reports = crate::cancel::cancel(
        &s.config,
        s.store(),
        session.as_ref().map(|s| s.publisher()),
        std::slice::from_ref(&message_id),
        deployment,
        &actor,
    )
    .await?;
    let report =
        reports.pop().unwrap_or(CancelReport { message_id, result: CancelResult::NotFound });
    let status = match report.result {
        CancelResult::Cancelled { .. }
        | CancelResult::Cancelling { .. }
        | CancelResult::AlreadyCancelling { .. } => StatusCode::OK,
        CancelResult::AlreadyDone { .. } | CancelResult::Ambiguous { .. } => StatusCode::CONFLICT,
        CancelResult::NotFound => StatusCode::NOT_FOUND,
    };
    Ok((status, Json(report)).into_response())
}

#[derive(Debug, Deserialize)]
struct AuditQuery {
    action: Option<String>,
    limit: Option<i64>,
}

#[derive(Debug, serde::Serialize)]
pub(super) struct AuditList {
    pub limit: i64,
    pub rows: Vec<AuditRow>,
}

async fn audit(
    State(s): State<AppState>,
    Query(q): Query<AuditQuery>,
) -> Result<Json<AuditList>, ApiError> {
    let limit = limit(q.limit, DEFAULT_AUDIT)?;
    let action = q.action.as_deref().filter(|a| !a.is_empty());
    Ok(Json(AuditList { limit, rows: s.store().audit_list(action, limit).await? }))
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

/// Who a replay is recorded as on the parked record: `by`, else the token's name.
fn operator_name(by: Option<&str>, actor: &Actor) -> Result<String, ApiError> {
    let by = by.map(str::trim).filter(|b| !b.is_empty()).unwrap_or(&actor.who);
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
/// Who acted, for the audit log: the token's name, via the console or the API.
fn authorize(
    s: &AppState,
    headers: &HeaderMap,
    extensions: &Extensions,
    action: &str,
    id: &str,
) -> Result<Actor, ApiError> {
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
    let via = match headers.get("x-turnd-via").and_then(|v| v.to_str().ok()) {
        Some("console") => "console",
        _ => "api",
    };
    Ok(Actor { who: s.admin_name(), via })
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
        let actor = Actor { who: "ops".into(), via: "api" };
        assert_eq!(operator_name(None, &actor).unwrap(), "ops");
        assert_eq!(operator_name(Some(" alice "), &actor).unwrap(), "alice");
        assert!(operator_name(Some("a\nb"), &actor).is_err());
        assert!(operator_name(Some(&"x".repeat(65)), &actor).is_err());
        assert_eq!(limit(None, 7).unwrap(), 7);
        assert!(limit(Some(0), 7).is_err());
        assert!(limit(Some(-5), 7).is_err());
        assert_eq!(limit(Some(MAX_LIST_ROWS), 7).unwrap(), MAX_LIST_ROWS);
        assert_eq!(limit(Some(MAX_LIST_ROWS + 1), 7).unwrap(), MAX_LIST_ROWS);
        assert_eq!(limit(Some(i64::MAX), 7).unwrap(), MAX_LIST_ROWS);
    }
}
