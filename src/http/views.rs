//! The views the console and `/api/v1/` share: what each page or JSON answer holds, read
//! from the store's read-only views, and how a parked turn's body is shown.

use serde::Serialize;

use super::AppState;
use crate::store::{
    ConsoleDaemon, ConsoleDeployment, EVENT_BUCKET_SECONDS, EVENT_WINDOW_SECONDS, EventBucket,
    Parked, ParkedByCode, PendingByState, StoreError,
};

/// What replaces a turn's `payload` when `http.show_payloads` is false.
pub(super) const PAYLOAD_HIDDEN: &str = "(hidden: set http.show_payloads = true to see payloads)";

pub(super) const DEFAULT_DEPLOYMENTS: i64 = 200;
pub(super) const DEFAULT_PARKED: i64 = 100;

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
}
