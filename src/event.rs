//! Terminal events: the single reply or error a turn ends with (CONTRACT §6).
//!
//! This module only builds the event's bytes; `store` decides who may emit one (the state
//! election) and `relay` publishes it.

use serde::Serialize;
use serde_json::value::RawValue;

use crate::otel::TraceContext;
use crate::turn::{DeploymentName, ErrorCode, MessageId};

/// What a turn ended with.
#[derive(Debug)]
pub enum Outcome {
    Reply(Box<RawValue>),
    Error { code: ErrorCode, message: String },
}

impl Outcome {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Outcome::Error { code, message: message.into() }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Outcome::Reply(_) => "reply",
            Outcome::Error { .. } => "error",
        }
    }

    pub fn code(&self) -> Option<&str> {
        match self {
            Outcome::Reply(_) => None,
            Outcome::Error { code, .. } => Some(code.as_str()),
        }
    }
}

/// The identification of a turn that every event about it carries, as stored with the turn.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub deployment: DeploymentName,
    pub message_id: MessageId,
    pub organization_id: Option<String>,
    pub agent_id: String,
    pub conversation_id: Option<String>,
    /// Compact JSON object {"userId":..,"channelId":..,"platform":..,"platformMetadata":..}.
    pub routing: Option<String>,
    /// The turn's stored trace context (`crate::otel`): what its event's relay span is parented
    /// on when no commit span is (fail paths).
    pub trace: Option<TraceContext>,
}

/// A terminal event ready for the outbox.
#[derive(Debug, Clone)]
pub struct TerminalEvent {
    pub deployment: DeploymentName,
    pub message_id: MessageId,
    /// Unique per terminal event: the AMQP message_id consumers de-duplicate on.
    pub event_id: String,
    pub routing_key: String,
    pub kind: &'static str,
    pub code: Option<String>,
    pub body: String,
    /// What the relay span is parented on: the commit span's context for a worker's answer,
    /// the turn's stored one otherwise.
    pub trace: Option<TraceContext>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    message_id: &'a str,
    deployment: &'a str,
    organization_id: Option<&'a str>,
    agent_id: &'a str,
    conversation_id: Option<&'a str>,
    kind: &'static str,
    payload: &'a RawValue,
    error: Option<ErrorBody<'a>>,
    routing: &'a RawValue,
    created_at: String,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: &'a str,
}

const NULL_ROUTING: &str =
    r#"{"userId":null,"channelId":null,"platform":null,"platformMetadata":null}"#;

/// The routing key of every event of a deployment: `reply.<organizationId or _>.<deployment>`.
pub fn routing_key(organization_id: Option<&str>, deployment: &DeploymentName) -> String {
    format!("reply.{}.{}", organization_id.unwrap_or("_"), deployment.as_str())
}

impl TerminalEvent {
    pub fn new(envelope: &Envelope, outcome: &Outcome) -> TerminalEvent {
        let null = raw("null");
        let routing =
            envelope.routing.as_deref().and_then(|r| RawValue::from_string(r.to_owned()).ok());
        let default_routing = raw(NULL_ROUTING);
        let (payload, error) = match outcome {
            Outcome::Reply(payload) => (&**payload, None),
            Outcome::Error { code, message } => {
                (&*null, Some(ErrorBody { code: code.as_str(), message }))
            }
        };
        let body = Body {
            message_id: envelope.message_id.as_str(),
            deployment: envelope.deployment.as_str(),
            organization_id: envelope.organization_id.as_deref(),
            agent_id: &envelope.agent_id,
            conversation_id: envelope.conversation_id.as_deref(),
            kind: outcome.kind(),
            payload,
            error,
            routing: routing.as_deref().unwrap_or(&default_routing),
            created_at: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        };
        // Serialising borrowed strings and already-valid raw JSON cannot fail.
        let body = serde_json::to_string(&body).unwrap_or_default();
        TerminalEvent {
            deployment: envelope.deployment.clone(),
            message_id: envelope.message_id.clone(),
            event_id: uuid::Uuid::now_v7().to_string(),
            routing_key: routing_key(envelope.organization_id.as_deref(), &envelope.deployment),
            kind: outcome.kind(),
            code: outcome.code().map(str::to_owned),
            body,
            trace: envelope.trace.clone(),
        }
    }
}

fn raw(json: &'static str) -> Box<RawValue> {
    // Only called with the JSON literals above.
    RawValue::from_string(json.to_owned()).unwrap_or_else(|_| unreachable!("literal JSON"))
}
