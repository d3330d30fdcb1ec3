//! The turn model (CONTRACT §2, §3): identifiers, validation of a published turn, the
//! deployment name and its cross-pod lock key, and the terminal error codes (§6).
//!
//! Everything here is pure: no I/O, no clock, no randomness.

use std::collections::HashSet;
use std::fmt;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// How many characters of an offending value a reason echoes.
const ECHO_CHARS: usize = 64;

/// Largest accepted `runId`. The contract only says "integer > 0"; we cap at `i64::MAX` so the
/// value always fits a PostgreSQL `bigint` and a hostile producer cannot wedge intake with a
/// number the database refuses.
pub const MAX_RUN_ID: u64 = i64::MAX as u64;

/// Fields that identify a turn (its messageId and deployment); a duplicate of one of these at
/// the top level makes the identification ambiguous, so no error reply is addressed from it.
const IDENTITY_FIELDS: [&str; 6] =
    ["messageId", "agentId", "organizationId", "conversationId", "channelId", "userId"];

// ---------------------------------------------------------------------------------------------
// Identifiers
// ---------------------------------------------------------------------------------------------

macro_rules! string_newtype {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// A value read back from our own database, where only validated values are
            /// written. Not for input from outside.
            pub fn from_trusted(s: String) -> Self {
                Self(s)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_inner(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

string_newtype!(
    /// `messageId`: 1–255 bytes (it travels as the AMQP `correlation_id`), no control characters.
    MessageId
);
string_newtype!(
    /// `<agentId>-<16 lowercase hex>`; see [`deployment_name`].
    DeploymentName
);
string_newtype!(
    /// `agentId`: `^[A-Za-z0-9_-]{1,64}$`.
    AgentId
);
string_newtype!(
    /// `organizationId`: `^[A-Za-z0-9_-]{1,64}$`, but not `_` (reserved for "no organization").
    OrganizationId
);

impl MessageId {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() || s.len() > 255 {
            return Err(format!("messageId {} must be 1-255 bytes, is {} bytes", echo(s), s.len()));
        }
        if s.chars().any(char::is_control) {
            return Err(format!("messageId {} must not contain control characters", echo(s)));
        }
        Ok(Self(s.to_owned()))
    }
}

impl AgentId {
    pub fn parse(s: &str) -> Result<Self, String> {
        if is_identifier(s) {
            Ok(Self(s.to_owned()))
        } else {
            Err(format!("agentId {} must match ^[A-Za-z0-9_-]{{1,64}}$", echo(s)))
        }
    }
}

impl OrganizationId {
    pub fn parse(s: &str) -> Result<Self, String> {
        if !is_identifier(s) {
            return Err(format!("organizationId {} must match ^[A-Za-z0-9_-]{{1,64}}$", echo(s)));
        }
        if s == "_" {
            return Err(
                "organizationId \"_\" is reserved for \"no organization\"; omit the field instead"
                    .to_owned(),
            );
        }
        Ok(Self(s.to_owned()))
    }

    /// The organization as a name segment: the id, or `_` for "no organization" (routing keys
    /// `reply.<organizationId or _>.<deployment>`, workspace paths).
    pub fn segment(org: Option<&OrganizationId>) -> &str {
        org.map_or("_", OrganizationId::as_str)
    }
}

impl DeploymentName {
    /// Validates the shape `<agentId>-<16 lowercase hex digits>` (e.g. a name given on the
    /// command line). It cannot check the hash itself.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("deployment {} must be <agentId>-<16 lowercase hex digits>", echo(s));
        let Some((agent, hash)) = s.rsplit_once('-') else {
            return Err(bad());
        };
        let hex_ok = hash.len() == 16
            && hash.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex_ok || !is_identifier(agent) {
            return Err(bad());
        }
        Ok(Self(s.to_owned()))
    }

    /// The key of this deployment's PostgreSQL session-level advisory lock (CONTRACT §3): the
    /// first 8 bytes, big-endian, of SHA-256(`"turnd.lock\0"` ++ name).
    ///
    /// * Stable: it depends on the name only, so every daemon — whatever its version, platform
    ///   or process — computes the same key for the same deployment (unlike `hashtext()` or
    ///   Rust's `Hash`, which are not promised to be stable).
    /// * Tenant-scoped: the name already hashes the organization, so two organizations never
    ///   contend for (or share) one lock.
    /// * The `turnd.lock\0` domain prefix keeps the key apart from the name's own hash and
    ///   from other users of advisory locks in the same database; with 64 bits a collision
    ///   between two deployments is negligible (and would only serialise them, never break
    ///   fencing, which goes by name and epoch).
    pub fn lock_key(&self) -> i64 {
        let mut h = Sha256::new();
        h.update(b"turnd.lock\0");
        h.update(self.0.as_bytes());
        let digest = h.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        i64::from_be_bytes(first)
    }
}

/// Fencing token (CONTRACT §7): a positive integer, larger each time a deployment's lock is
/// taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct Epoch(i64);

impl Epoch {
    pub const fn new(value: i64) -> Self {
        Self(value)
    }

    pub const fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A turn's place in the accept order (`turnd_turns.seq`, from one sequence): an owner claims
/// its deployment's queued turns by it, and a doorbell names the newest turn it rings for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Seq(i64);

impl Seq {
    pub const fn new(value: i64) -> Self {
        Self(value)
    }

    pub const fn get(self) -> i64 {
        self.0
    }

    /// A doorbell's body: the seq in decimal (empty or anything else: a bell without one).
    pub fn from_doorbell(body: &[u8]) -> Option<Seq> {
        std::str::from_utf8(body).ok()?.parse().ok().map(Seq)
    }

    pub fn doorbell(self) -> Vec<u8> {
        self.0.to_string().into_bytes()
    }
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `<agentId>-<h>`, `<h>` the first 16 lowercase hex digits of
/// SHA-256(organizationId or empty, NUL, agentId, NUL, conversation key) (CONTRACT §3).
///
/// Only `[A-Za-z0-9_-]` appears in it, so it is safe in queue names, file paths and systemd
/// unit names; at most 64 + 1 + 16 = 81 bytes.
pub fn deployment_name(
    org: Option<&OrganizationId>,
    agent: &AgentId,
    conversation_key: &str,
) -> DeploymentName {
    let mut h = Sha256::new();
    h.update(org.map_or("", OrganizationId::as_str).as_bytes());
    h.update([0u8]);
    h.update(agent.as_str().as_bytes());
    h.update([0u8]);
    h.update(conversation_key.as_bytes());
    let digest = h.finalize();
    DeploymentName(format!("{}-{}", agent.as_str(), hex::encode(&digest[..8])))
}

// ---------------------------------------------------------------------------------------------
// Turn
// ---------------------------------------------------------------------------------------------

/// A valid turn (CONTRACT §2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub message_id: MessageId,
    pub agent_id: AgentId,
    pub organization_id: Option<OrganizationId>,
    /// `conversationId` as published (`None` when absent or null; may be `Some("")`).
    pub conversation_id: Option<String>,
    /// The first present, non-empty one of `conversationId`, `channelId`, `userId`.
    pub conversation_key: String,
    pub run_id: Option<u64>,
    pub deployment: DeploymentName,
    /// The whole turn re-serialised compactly on one line: key order, number digits and
    /// unknown fields kept.
    pub line: String,
    /// Compact JSON `{"userId":..,"channelId":..,"platform":..,"platformMetadata":..}`,
    /// absent fields as null.
    pub routing: String,
    /// The producer's trace context from `platformMetadata.traceparent`/`.tracestate` (the
    /// orchestrator turnd replaces puts it there), as written; AMQP headers take precedence
    /// and intake checks it (`crate::otel::TraceContext::parse`). Not part of the identity.
    pub metadata_trace: Option<(String, Option<String>)>,
    /// The context stored with the turn (its intake span's), set by intake before arming.
    pub trace: Option<crate::otel::TraceContext>,
}

impl Turn {
    /// Which field a snapshot turn (one with a `runId`) lacks, `organizationId` first. Whether
    /// it matters depends on `session.store` (CONTRACT §4); the caller decides. An empty
    /// `conversationId` counts as missing.
    pub fn missing_context(&self) -> Option<&'static str> {
        self.run_id?;
        if self.organization_id.is_none() {
            return Some("organizationId");
        }
        if self.conversation_id.as_deref().is_none_or(str::is_empty) {
            return Some("conversationId");
        }
        None
    }
}

/// Why a body is not a valid turn, with whatever identifies the turn so an error reply can
/// still be addressed (CONTRACT §4). A too-large body is never parsed: nothing is set.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{reason}")]
pub struct InvalidTurn {
    /// Human-readable, names the offending field; echoed values are truncated and escaped.
    pub reason: String,
    pub message_id: Option<MessageId>,
    pub deployment: Option<DeploymentName>,
    pub organization_id: Option<OrganizationId>,
    pub agent_id: Option<AgentId>,
    pub conversation_id: Option<String>,
    pub routing: Option<String>,
    pub too_large: bool,
}

impl InvalidTurn {
    fn bare(reason: String) -> Self {
        Self {
            reason,
            message_id: None,
            deployment: None,
            organization_id: None,
            agent_id: None,
            conversation_id: None,
            routing: None,
            too_large: false,
        }
    }
}

/// Parses and validates a published turn body (CONTRACT §2, §3).
// The error carries everything an error reply needs; it is built once per invalid turn, and
// `Turn` is no smaller, so boxing would buy nothing.
#[allow(clippy::result_large_err)]
pub fn parse(body: &[u8], max_bytes: usize) -> Result<Turn, InvalidTurn> {
    if body.len() > max_bytes {
        let mut e = InvalidTurn::bare(format!(
            "turn is {} bytes, more than intake.max_turn_bytes ({max_bytes})",
            body.len()
        ));
        e.too_large = true;
        return Err(e);
    }
    let text = std::str::from_utf8(body).map_err(|e| {
        InvalidTurn::bare(format!("turn is not valid UTF-8 (at byte {})", e.valid_up_to()))
    })?;
    // serde_json's recursion limit (128) turns deep nesting into an error, not a stack
    // overflow.
    let value: Value = serde_json::from_str(text)
        .map_err(|e| InvalidTurn::bare(format!("turn is not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(InvalidTurn::bare(format!(
            "turn must be a JSON object, is {}",
            json_type(&value)
        )));
    };
    // The text is valid JSON now, so the scanner only has to find keys.
    let duplicate = find_duplicate_key(text);

    let message_id = field(&obj, "messageId")
        .map(|v| as_str("messageId", v).and_then(MessageId::parse))
        .transpose();
    let agent_id =
        field(&obj, "agentId").map(|v| as_str("agentId", v).and_then(AgentId::parse)).transpose();
    let organization_id = field(&obj, "organizationId")
        .map(|v| as_str("organizationId", v).and_then(OrganizationId::parse))
        .transpose();
    let conversation_id = field(&obj, "conversationId")
        .map(|v| as_str("conversationId", v).and_then(conversation_id_rule))
        .transpose();
    let channel_id = key_string(&obj, "channelId");
    let user_id = key_string(&obj, "userId");
    let platform = short_string(&obj, "platform");
    let platform_metadata = match field(&obj, "platformMetadata") {
        None => Ok(None),
        Some(v @ Value::Object(_)) => Ok(Some(v)),
        Some(v) => Err(format!("platformMetadata must be an object, is {}", json_type(v))),
    };
    let run_id = field(&obj, "runId").map(run_id_rule).transpose();

    // The conversation key: the first present non-empty candidate. An invalid candidate
    // before it means the key cannot be derived.
    let conversation_key: Result<Option<String>, ()> = (|| {
        for candidate in [&conversation_id, &channel_id, &user_id] {
            match candidate {
                Err(_) => return Err(()),
                Ok(Some(s)) if !s.is_empty() => return Ok(Some(s.clone())),
                Ok(_) => {}
            }
        }
        Ok(None)
    })();

    let routing = {
        let mut m = Map::new();
        let s = |r: &Result<Option<String>, String>| match r {
            Ok(Some(s)) => Value::String(s.clone()),
            _ => Value::Null,
        };
        m.insert("userId".into(), s(&user_id));
        m.insert("channelId".into(), s(&channel_id));
        m.insert("platform".into(), s(&platform));
        m.insert(
            "platformMetadata".into(),
            match &platform_metadata {
                Ok(Some(v)) => (*v).clone(),
                _ => Value::Null,
            },
        );
        serde_json::to_string(&m)
    };

    let deployment = match (&agent_id, &organization_id, &conversation_key) {
        (Ok(Some(agent)), Ok(org), Ok(Some(key))) => {
            Some(deployment_name(org.as_ref(), agent, key))
        }
        _ => None,
    };

    let first_error = duplicate
        .as_ref()
        .map(DuplicateKey::reason)
        .or_else(|| match &message_id {
            Ok(None) => Some("messageId is required".to_owned()),
            r => r.as_ref().err().cloned(),
        })
        .or_else(|| match &agent_id {
            Ok(None) => Some("agentId is required".to_owned()),
            r => r.as_ref().err().cloned(),
        })
        .or_else(|| organization_id.as_ref().err().cloned())
        .or_else(|| conversation_id.as_ref().err().cloned())
        .or_else(|| channel_id.as_ref().err().cloned())
        .or_else(|| user_id.as_ref().err().cloned())
        .or_else(|| platform.as_ref().err().cloned())
        .or_else(|| platform_metadata.as_ref().err().cloned())
        .or_else(|| run_id.as_ref().err().cloned())
        .or_else(|| match conversation_key {
            Ok(None) => Some(
                "turn has no conversation key: conversationId, channelId and userId are all \
                 absent or empty"
                    .to_owned(),
            ),
            _ => None,
        });

    let routing = match routing {
        Ok(r) => r,
        Err(e) => {
            return Err(InvalidTurn::bare(format!("turn could not be re-serialised: {e}")));
        }
    };

    if let Some(reason) = first_error {
        let ambiguous = duplicate.as_ref().is_some_and(DuplicateKey::is_identity);
        if ambiguous {
            return Err(InvalidTurn::bare(reason));
        }
        return Err(InvalidTurn {
            reason,
            message_id: message_id.ok().flatten(),
            deployment,
            organization_id: organization_id.ok().flatten(),
            agent_id: agent_id.ok().flatten(),
            conversation_id: conversation_id.ok().flatten(),
            routing: Some(routing),
            too_large: false,
        });
    }

    // No error: every field is Ok and the required ones are present; the `let else` below
    // cannot fail, but stay total instead of unwrapping.
    let missing = || InvalidTurn::bare("turn is missing a required field".to_owned());
    let (
        Ok(Some(message_id)),
        Ok(Some(agent_id)),
        Ok(organization_id),
        Ok(conversation_id),
        Ok(run_id),
        Ok(Some(conversation_key)),
        Some(deployment),
    ) = (
        message_id,
        agent_id,
        organization_id,
        conversation_id,
        run_id,
        conversation_key,
        deployment,
    )
    else {
        return Err(missing());
    };
    let metadata_trace = match &platform_metadata {
        Ok(Some(Value::Object(m))) => match m.get("traceparent") {
            Some(Value::String(tp)) => {
                Some((tp.clone(), m.get("tracestate").and_then(Value::as_str).map(str::to_owned)))
            }
            _ => None,
        },
        _ => None,
    };
    let line = minify(text);
    Ok(Turn {
        message_id,
        agent_id,
        organization_id,
        conversation_id,
        conversation_key,
        run_id,
        deployment,
        line,
        routing,
        metadata_trace,
        trace: None,
    })
}

/// A field's value; `null` counts as absent.
fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).filter(|v| !v.is_null())
}

fn as_str<'a>(name: &str, v: &'a Value) -> Result<&'a str, String> {
    v.as_str().ok_or_else(|| format!("{name} must be a string, is {}", json_type(v)))
}

fn conversation_id_rule(s: &str) -> Result<String, String> {
    // An empty conversationId is accepted as a field (it is just not a conversation key).
    if s.len() > 256 {
        return Err(format!(
            "conversationId {} must be at most 256 bytes, is {} bytes",
            echo(s),
            s.len()
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(format!("conversationId {} must not contain control characters", echo(s)));
    }
    Ok(s.to_owned())
}

/// `userId`, `channelId`: optional strings of at most 256 bytes without control characters.
/// Either can be the conversation key, which reaches the worker as `TURND_CONVERSATION_ID`:
/// a NUL there would fail every spawn of the deployment, and a newline would forge log lines.
fn key_string(obj: &Map<String, Value>, name: &str) -> Result<Option<String>, String> {
    let s = short_string(obj, name)?;
    if let Some(s) = &s
        && s.chars().any(char::is_control)
    {
        return Err(format!("{name} {} must not contain control characters", echo(s)));
    }
    Ok(s)
}

/// `platform` (and the two above): optional strings of at most 256 bytes.
fn short_string(obj: &Map<String, Value>, name: &str) -> Result<Option<String>, String> {
    let Some(v) = field(obj, name) else {
        return Ok(None);
    };
    let s = as_str(name, v)?;
    if s.len() > 256 {
        return Err(format!("{name} {} must be at most 256 bytes, is {} bytes", echo(s), s.len()));
    }
    Ok(Some(s.to_owned()))
}

fn run_id_rule(v: &Value) -> Result<u64, String> {
    let Value::Number(n) = v else {
        return Err(format!("runId must be an integer, is {}", json_type(v)));
    };
    // With arbitrary_precision the number is kept as written.
    let text = n.to_string();
    if text.contains(['.', 'e', 'E']) {
        return Err(format!("runId {} must be an integer", echo(&text)));
    }
    if text.starts_with('-') {
        return Err(format!("runId {} must be > 0", echo(&text)));
    }
    match n.as_u64() {
        Some(0) => Err("runId 0 must be > 0".to_owned()),
        Some(id) if id <= MAX_RUN_ID => Ok(id),
        _ => Err(format!("runId {} is too large (at most {MAX_RUN_ID})", echo(&text))),
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A value for a reason: quoted, control characters escaped, at most [`ECHO_CHARS`] chars.
fn echo(s: &str) -> String {
    let mut chars = s.chars();
    let head: String = chars.by_ref().take(ECHO_CHARS).collect();
    if chars.next().is_some() { format!("{head:?}…") } else { format!("{head:?}") }
}

/// The JSON text on one line: whitespace outside strings removed, everything else byte for
/// byte as published (key order, number spelling, string escapes, unknown fields).
///
/// `text` must already be valid JSON; JSON strings cannot contain a raw newline, so the result
/// is one line.
fn minify(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut run_start = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b' ' | b'\t' | b'\n' | b'\r' => {
                out.push_str(text.get(run_start..i).unwrap_or(""));
                i += 1;
                run_start = i;
            }
            b'"' => {
                let (_, end) = scan_string(text, i + 1, false);
                i = end;
            }
            _ => i += 1,
        }
    }
    out.push_str(text.get(run_start..).unwrap_or(""));
    out
}

// ---------------------------------------------------------------------------------------------
// Duplicate keys
// ---------------------------------------------------------------------------------------------

struct DuplicateKey {
    key: String,
    /// 1 = the turn object itself.
    depth: usize,
}

impl DuplicateKey {
    fn reason(&self) -> String {
        if self.depth == 1 {
            format!("duplicate key {} in the turn", echo(&self.key))
        } else {
            format!("duplicate key {} in a nested object (depth {})", echo(&self.key), self.depth)
        }
    }

    fn is_identity(&self) -> bool {
        self.depth == 1 && IDENTITY_FIELDS.contains(&self.key.as_str())
    }
}

/// Finds the first object that repeats a key, comparing keys after unescaping.
///
/// `text` must already be valid JSON (serde_json's `Value` silently keeps the last duplicate,
/// so this scans the text itself). Iterative, so nesting depth cannot overflow the stack;
/// never panics, whatever the input.
fn find_duplicate_key(text: &str) -> Option<DuplicateKey> {
    enum Frame {
        Object { keys: HashSet<String>, expect_key: bool },
        Array,
    }
    let bytes = text.as_bytes();
    let mut stack: Vec<Frame> = Vec::new();
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'{' => stack.push(Frame::Object { keys: HashSet::new(), expect_key: true }),
            b'[' => stack.push(Frame::Array),
            b'}' | b']' => {
                stack.pop();
            }
            b',' => {
                if let Some(Frame::Object { expect_key, .. }) = stack.last_mut() {
                    *expect_key = true;
                }
            }
            b'"' => {
                let depth = stack.len();
                let want_key = matches!(stack.last(), Some(Frame::Object { expect_key: true, .. }));
                let (key, end) = scan_string(text, i + 1, want_key);
                if let (Some(Frame::Object { keys, expect_key }), Some(key)) =
                    (stack.last_mut(), key)
                {
                    *expect_key = false;
                    if keys.contains(&key) {
                        return Some(DuplicateKey { key, depth });
                    }
                    keys.insert(key);
                }
                i = end;
                continue;
            }
            // ':', whitespace, digits, literals: none of them contain a quote or a bracket.
            _ => {}
        }
        i += 1;
    }
    None
}

/// Scans the string starting at `start` (just after its opening quote); returns its unescaped
/// content when `decode` and the index just past its closing quote.
fn scan_string(text: &str, start: usize, decode: bool) -> (Option<String>, usize) {
    let bytes = text.as_bytes();
    let mut out = String::new();
    let mut run_start = start;
    let mut i = start;
    loop {
        match bytes.get(i) {
            None => {
                // Unterminated (cannot happen for validated JSON).
                if decode {
                    out.push_str(text.get(run_start..).unwrap_or(""));
                }
                return (decode.then_some(out), bytes.len());
            }
            Some(b'"') => {
                if decode {
                    out.push_str(text.get(run_start..i).unwrap_or(""));
                }
                return (decode.then_some(out), i + 1);
            }
            Some(b'\\') => {
                if decode {
                    out.push_str(text.get(run_start..i).unwrap_or(""));
                }
                let esc = bytes.get(i + 1).copied();
                i += 2;
                let c = match esc {
                    Some(b'"') => '"',
                    Some(b'\\') => '\\',
                    Some(b'/') => '/',
                    Some(b'b') => '\u{8}',
                    Some(b'f') => '\u{c}',
                    Some(b'n') => '\n',
                    Some(b'r') => '\r',
                    Some(b't') => '\t',
                    Some(b'u') => {
                        let hi = hex4(bytes, i);
                        i += 4;
                        match hi {
                            Some(hi @ 0xD800..=0xDBFF) => {
                                let lo = if bytes.get(i) == Some(&b'\\')
                                    && bytes.get(i + 1) == Some(&b'u')
                                {
                                    hex4(bytes, i + 2)
                                } else {
                                    None
                                };
                                match lo {
                                    Some(lo @ 0xDC00..=0xDFFF) => {
                                        i += 6;
                                        let cp = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
                                        char::from_u32(cp).unwrap_or('\u{FFFD}')
                                    }
                                    _ => '\u{FFFD}',
                                }
                            }
                            Some(cp) => char::from_u32(cp).unwrap_or('\u{FFFD}'),
                            None => '\u{FFFD}',
                        }
                    }
                    _ => '\u{FFFD}',
                };
                if decode {
                    out.push(c);
                }
                // Escapes are ASCII, so `i` is on a char boundary again.
                run_start = i;
            }
            Some(_) => i += 1,
        }
    }
}

fn hex4(bytes: &[u8], at: usize) -> Option<u32> {
    let digits = bytes.get(at..at + 4)?;
    let s = std::str::from_utf8(digits).ok()?;
    u32::from_str_radix(s, 16).ok()
}

// ---------------------------------------------------------------------------------------------
// Error codes
// ---------------------------------------------------------------------------------------------

/// The code of a terminal error event (CONTRACT §6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorCode {
    WorkerDied,
    WorkerStartFailed,
    TurnTimeout,
    WorkerStopped,
    WorkerCrashLoop,
    MissingContext,
    InvalidTurn,
    WorkerError,
    /// An operator cancelled the turn (`turnd cancel`, the API, the console) and its worker did
    /// not answer first.
    TurnCancelled,
    /// A worker's own code (from an `error` line, or the code of `provider_failed`).
    Other(String),
}

impl ErrorCode {
    pub fn as_str(&self) -> &str {
        match self {
            Self::WorkerDied => "WORKER_DIED",
            Self::WorkerStartFailed => "WORKER_START_FAILED",
            Self::TurnTimeout => "TURN_TIMEOUT",
            Self::WorkerStopped => "WORKER_STOPPED",
            Self::WorkerCrashLoop => "WORKER_CRASH_LOOP",
            Self::MissingContext => "MISSING_CONTEXT",
            Self::InvalidTurn => "INVALID_TURN",
            Self::WorkerError => "WORKER_ERROR",
            Self::TurnCancelled => "TURN_CANCELLED",
            Self::Other(code) => code,
        }
    }

    /// The code a worker gave: none → `WORKER_ERROR`; a known name → its variant; anything
    /// else is kept as `Other` (the protocol codec has already checked its shape).
    pub fn from_worker(code: Option<&str>) -> ErrorCode {
        match code {
            None => Self::WorkerError,
            Some("WORKER_DIED") => Self::WorkerDied,
            Some("WORKER_START_FAILED") => Self::WorkerStartFailed,
            Some("TURN_TIMEOUT") => Self::TurnTimeout,
            Some("WORKER_STOPPED") => Self::WorkerStopped,
            Some("WORKER_CRASH_LOOP") => Self::WorkerCrashLoop,
            Some("MISSING_CONTEXT") => Self::MissingContext,
            Some("INVALID_TURN") => Self::InvalidTurn,
            Some("WORKER_ERROR") => Self::WorkerError,
            Some("TURN_CANCELLED") => Self::TurnCancelled,
            Some(other) => Self::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 262_144;

    fn ok(body: &str) -> Turn {
        match parse(body.as_bytes(), MAX) {
            Ok(t) => t,
            Err(e) => panic!("expected a valid turn, got: {e} for {body}"),
        }
    }

    fn bad(body: &str) -> InvalidTurn {
        match parse(body.as_bytes(), MAX) {
            Ok(t) => panic!("expected an invalid turn, got {t:?} for {body}"),
            Err(e) => e,
        }
    }

    fn agent(s: &str) -> AgentId {
        AgentId::parse(s).unwrap()
    }

    fn org(s: &str) -> OrganizationId {
        OrganizationId::parse(s).unwrap()
    }

    /// A valid base turn with `extra` spliced in as further fields.
    fn with(extra: &str) -> String {
        format!(r#"{{"messageId":"m1","agentId":"a1","conversationId":"c1"{extra}}}"#)
    }

    // --- deployment name -----------------------------------------------------------------

    #[test]
    fn deployment_name_is_pinned() {
        // printf 'o1\0a1\0c1' | sha256sum → 95804e53b4c4505d...
        let d = deployment_name(Some(&org("o1")), &agent("a1"), "c1");
        assert_eq!(d.as_str(), "a1-95804e53b4c4505d");
        // printf '\0a1\0c1' | sha256sum → 01c1b2001811db9f...
        let d = deployment_name(None, &agent("a1"), "c1");
        assert_eq!(d.as_str(), "a1-01c1b2001811db9f");
        // and parse() derives the same
        let t =
            ok(r#"{"messageId":"m","agentId":"a1","organizationId":"o1","conversationId":"c1"}"#);
        assert_eq!(t.deployment.as_str(), "a1-95804e53b4c4505d");
    }

    #[test]
    fn deployment_name_is_tenant_scoped_and_safe() {
        let a = agent("agent_X-1");
        let d1 = deployment_name(Some(&org("o1")), &a, "c");
        let d2 = deployment_name(Some(&org("o2")), &a, "c");
        let d3 = deployment_name(None, &a, "c");
        assert_ne!(d1, d2);
        assert_ne!(d1, d3);
        assert_ne!(d2, d3);
        assert_ne!(d1, deployment_name(Some(&org("o1")), &a, "d"));
        // NUL separators: ("o1a", "b") ≠ ("o1", "ab") style shifts
        assert_ne!(
            deployment_name(Some(&org("x")), &agent("yz"), "c"),
            deployment_name(Some(&org("xy")), &agent("z"), "c")
        );
        for d in [&d1, &d2, &d3] {
            assert!(
                d.as_str().bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            );
            assert_eq!(d.as_str().len(), "agent_X-1".len() + 17);
            assert!(DeploymentName::parse(d.as_str()).is_ok());
        }
        // an empty org is not "no org": it cannot be constructed at all
        assert!(OrganizationId::parse("").is_err());
        // stable
        assert_eq!(d1, deployment_name(Some(&org("o1")), &a, "c"));
    }

    #[test]
    fn deployment_name_parse_and_lock_key() {
        assert!(DeploymentName::parse("a1-0123456789abcdef").is_ok());
        assert!(DeploymentName::parse("a-b_c-0123456789abcdef").is_ok());
        assert!(DeploymentName::parse("a1-0123456789ABCDEF").is_err());
        assert!(DeploymentName::parse("a1-0123456789abcde").is_err());
        assert!(DeploymentName::parse("-0123456789abcdef").is_err());
        assert!(DeploymentName::parse("0123456789abcdef").is_err());
        assert!(DeploymentName::parse("a/b-0123456789abcdef").is_err());
        let d = DeploymentName::from_trusted("a1-0123456789abcdef".into());
        // printf 'turnd.lock\0a1-0123456789abcdef' | sha256sum → 58ff044dfd19b688...
        assert_eq!(d.lock_key(), i64::from_be_bytes(0x58ff044dfd19b688u64.to_be_bytes()));
        assert_ne!(
            d.lock_key(),
            DeploymentName::from_trusted("a1-0123456789abcdee".into()).lock_key()
        );
    }

    // --- conversation key ------------------------------------------------------------------

    #[test]
    fn conversation_key_precedence() {
        let t = ok(
            r#"{"messageId":"m","agentId":"a","conversationId":"c","channelId":"ch","userId":"u"}"#,
        );
        assert_eq!(t.conversation_key, "c");
        assert_eq!(t.conversation_id.as_deref(), Some("c"));
        let t = ok(r#"{"messageId":"m","agentId":"a","channelId":"ch","userId":"u"}"#);
        assert_eq!(t.conversation_key, "ch");
        assert_eq!(t.conversation_id, None);
        let t = ok(r#"{"messageId":"m","agentId":"a","userId":"u"}"#);
        assert_eq!(t.conversation_key, "u");
        // empty strings and nulls are skipped
        let t = ok(
            r#"{"messageId":"m","agentId":"a","conversationId":"","channelId":null,"userId":"u"}"#,
        );
        assert_eq!(t.conversation_key, "u");
        assert_eq!(t.conversation_id.as_deref(), Some(""));
        let t = ok(r#"{"messageId":"m","agentId":"a","conversationId":"","channelId":"ch"}"#);
        assert_eq!(t.conversation_key, "ch");
        // none at all
        let e = bad(r#"{"messageId":"m","agentId":"a"}"#);
        assert!(e.reason.contains("conversation key"), "{}", e.reason);
        assert_eq!(e.message_id.as_ref().map(MessageId::as_str), Some("m"));
        assert!(e.deployment.is_none());
        let e = bad(
            r#"{"messageId":"m","agentId":"a","conversationId":"","channelId":"","userId":""}"#,
        );
        assert!(e.reason.contains("conversation key"), "{}", e.reason);
        // same key through different fields → same deployment
        let a = ok(r#"{"messageId":"m","agentId":"a","conversationId":"k"}"#);
        let b = ok(r#"{"messageId":"m","agentId":"a","userId":"k"}"#);
        assert_eq!(a.deployment, b.deployment);
    }

    // --- field rules -----------------------------------------------------------------------

    #[test]
    fn conversation_keys_never_carry_control_characters() {
        // The key reaches the worker's environment: a NUL there failed every spawn.
        for field in ["channelId", "userId"] {
            for value in [r"a\u0000b", r"a\nb", r"\u001b[31m", r"a\u007f"] {
                let e = bad(&format!(r#"{{"messageId":"m","agentId":"a","{field}":"{value}"}}"#));
                assert!(e.reason.starts_with(field), "{field}: {}", e.reason);
                assert!(e.reason.contains("control characters"), "{}", e.reason);
            }
        }
        // platform is never a key: passed through as published.
        ok(r#"{"messageId":"m","agentId":"a","userId":"u","platform":"a\tb"}"#);
        ok(r#"{"messageId":"m","agentId":"a","userId":"ünï-côde ok"}"#);
    }

    #[test]
    fn message_id_rules() {
        let long = "x".repeat(255);
        assert_eq!(
            ok(&format!(r#"{{"messageId":"{long}","agentId":"a","userId":"u"}}"#))
                .message_id
                .as_str(),
            long
        );
        let e = bad(&format!(r#"{{"messageId":"{long}y","agentId":"a","userId":"u"}}"#));
        assert!(e.reason.starts_with("messageId"), "{}", e.reason);
        assert!(e.reason.contains('…'), "{}", e.reason);
        assert!(e.reason.len() < 200, "{}", e.reason);
        for body in [
            r#"{"agentId":"a","userId":"u"}"#,
            r#"{"messageId":null,"agentId":"a","userId":"u"}"#,
            r#"{"messageId":"","agentId":"a","userId":"u"}"#,
            r#"{"messageId":"a\nb","agentId":"a","userId":"u"}"#,
            r#"{"messageId":"a\u007fb","agentId":"a","userId":"u"}"#,
            r#"{"messageId":5,"agentId":"a","userId":"u"}"#,
            r#"{"messageId":["m"],"agentId":"a","userId":"u"}"#,
        ] {
            let e = bad(body);
            assert!(e.reason.starts_with("messageId"), "{body}: {}", e.reason);
            assert!(e.message_id.is_none());
            assert!(!e.reason.contains('\n'), "{}", e.reason);
            // the rest still identifies the deployment
            assert!(e.deployment.is_some());
        }
        assert_eq!(
            ok(r#"{"messageId":"ünï code/ok:1","agentId":"a","userId":"u"}"#).message_id.as_str(),
            "ünï code/ok:1"
        );
    }

    #[test]
    fn agent_id_rules() {
        let a64 = "A".repeat(64);
        ok(&format!(r#"{{"messageId":"m","agentId":"{a64}","userId":"u"}}"#));
        ok(r#"{"messageId":"m","agentId":"a-Z_0","userId":"u"}"#);
        for body in [
            r#"{"messageId":"m","userId":"u"}"#,
            r#"{"messageId":"m","agentId":null,"userId":"u"}"#,
            r#"{"messageId":"m","agentId":"","userId":"u"}"#,
            r#"{"messageId":"m","agentId":"../x","userId":"u"}"#,
            r#"{"messageId":"m","agentId":"a.b","userId":"u"}"#,
            r#"{"messageId":"m","agentId":"é","userId":"u"}"#,
            r#"{"messageId":"m","agentId":1,"userId":"u"}"#,
        ] {
            let e = bad(body);
            assert!(e.reason.starts_with("agentId"), "{body}: {}", e.reason);
            assert!(e.deployment.is_none());
            assert_eq!(e.message_id.as_ref().map(MessageId::as_str), Some("m"));
        }
        let e = bad(&format!(r#"{{"messageId":"m","agentId":"{a64}A","userId":"u"}}"#));
        assert!(e.reason.starts_with("agentId"));
        let e = bad(r#"{"messageId":"m","agentId":"../x","userId":"u"}"#);
        assert_eq!(e.reason, r#"agentId "../x" must match ^[A-Za-z0-9_-]{1,64}$"#);
    }

    #[test]
    fn organization_id_rules() {
        let t = ok(&with(r#","organizationId":"org-1_A""#));
        assert_eq!(t.organization_id.as_ref().map(OrganizationId::as_str), Some("org-1_A"));
        let t = ok(&with(r#","organizationId":null"#));
        assert_eq!(t.organization_id, None);
        for extra in [
            r#","organizationId":"_""#,
            r#","organizationId":"""#,
            r#","organizationId":"a b""#,
            r#","organizationId":true"#,
        ] {
            let e = bad(&with(extra));
            assert!(e.reason.starts_with("organizationId"), "{extra}: {}", e.reason);
            assert!(e.deployment.is_none(), "an invalid org must not yield a deployment");
            assert!(e.organization_id.is_none());
            assert!(e.message_id.is_some());
        }
        assert_eq!(OrganizationId::segment(None), "_");
        assert_eq!(OrganizationId::segment(Some(&org("o"))), "o");
    }

    #[test]
    fn conversation_id_rules() {
        let c256 = "c".repeat(256);
        ok(&format!(r#"{{"messageId":"m","agentId":"a","conversationId":"{c256}"}}"#));
        for body in [
            format!(r#"{{"messageId":"m","agentId":"a","conversationId":"{c256}c","userId":"u"}}"#),
            r#"{"messageId":"m","agentId":"a","conversationId":"a\tb","userId":"u"}"#.to_owned(),
            r#"{"messageId":"m","agentId":"a","conversationId":7,"userId":"u"}"#.to_owned(),
        ] {
            let e = bad(&body);
            assert!(e.reason.starts_with("conversationId"), "{body}: {}", e.reason);
            // the invalid conversationId comes first in precedence: no deployment
            assert!(e.deployment.is_none());
            assert!(e.conversation_id.is_none());
        }
    }

    #[test]
    fn routing_field_rules() {
        let s256 = "s".repeat(256);
        for name in ["userId", "channelId", "platform"] {
            ok(&with(&format!(r#","{name}":"{s256}""#)));
            ok(&with(&format!(r#","{name}":"""#)));
            let e = bad(&with(&format!(r#","{name}":"{s256}s""#)));
            assert!(e.reason.starts_with(name), "{}", e.reason);
            let e = bad(&with(&format!(r#","{name}":{{}}"#)));
            assert!(e.reason.starts_with(name), "{}", e.reason);
            // conversationId decides the key, so the turn is still identified
            assert!(e.deployment.is_some());
            assert_eq!(e.conversation_id.as_deref(), Some("c1"));
        }
        ok(&with(r#","platformMetadata":{"a":[1,2]}"#));
        ok(&with(r#","platformMetadata":null"#));
        for v in ["[]", "\"x\"", "1", "false"] {
            let e = bad(&with(&format!(r#","platformMetadata":{v}"#)));
            assert!(e.reason.starts_with("platformMetadata"), "{}", e.reason);
        }
    }

    #[test]
    fn routing_is_compact_with_nulls() {
        let t =
            ok(&with(r#","platform":"slack","platformMetadata":{"z":1,"a":1.50},"userId":"u""#));
        assert_eq!(
            t.routing,
            r#"{"userId":"u","channelId":null,"platform":"slack","platformMetadata":{"z":1,"a":1.50}}"#
        );
        let t = ok(&with(""));
        assert_eq!(
            t.routing,
            r#"{"userId":null,"channelId":null,"platform":null,"platformMetadata":null}"#
        );
    }

    #[test]
    fn run_id_rules() {
        assert_eq!(ok(&with(r#","runId":1"#)).run_id, Some(1));
        assert_eq!(ok(&with(r#","runId":9223372036854775807"#)).run_id, Some(MAX_RUN_ID));
        assert_eq!(ok(&with(r#","runId":null"#)).run_id, None);
        assert_eq!(ok(&with("")).run_id, None);
        for v in [
            "0",
            "-1",
            "-0",
            "1.0",
            "1.5",
            "1e3",
            "1E3",
            "9223372036854775808",
            "18446744073709551616",
            "123456789012345678901234567890",
            "\"5\"",
            "true",
            "[1]",
        ] {
            let e = bad(&with(&format!(r#","runId":{v}"#)));
            assert!(e.reason.starts_with("runId"), "{v}: {}", e.reason);
            // a bad runId still identifies the turn
            assert_eq!(e.message_id.as_ref().map(MessageId::as_str), Some("m1"));
            assert_eq!(e.agent_id.as_ref().map(AgentId::as_str), Some("a1"));
            assert_eq!(e.conversation_id.as_deref(), Some("c1"));
            assert_eq!(e.deployment, Some(deployment_name(None, &agent("a1"), "c1")));
            assert!(e.routing.is_some());
            assert!(!e.too_large);
        }
    }

    #[test]
    fn identification_on_error_includes_org_and_routing() {
        let e = bad(
            r#"{"messageId":"m","agentId":"a1","organizationId":"o1","conversationId":"c1","userId":"u","platform":"p","runId":0}"#,
        );
        assert_eq!(e.deployment.as_ref().map(DeploymentName::as_str), Some("a1-95804e53b4c4505d"));
        assert_eq!(e.organization_id.as_ref().map(OrganizationId::as_str), Some("o1"));
        assert_eq!(
            e.routing.as_deref(),
            Some(r#"{"userId":"u","channelId":null,"platform":"p","platformMetadata":null}"#)
        );
        // an invalid routing field is null in the error's routing
        let e = bad(&with(r#","userId":5,"platform":"p""#));
        assert_eq!(
            e.routing.as_deref(),
            Some(r#"{"userId":null,"channelId":null,"platform":"p","platformMetadata":null}"#)
        );
    }

    #[test]
    fn payload_is_any_json() {
        for p in ["1", "\"x\"", "[1,{\"a\":null}]", "{\"text\":\"hi\"}", "true"] {
            ok(&with(&format!(r#","payload":{p}"#)));
        }
    }

    #[test]
    fn missing_context() {
        assert_eq!(ok(&with("")).missing_context(), None);
        assert_eq!(ok(&with(r#","runId":3"#)).missing_context(), Some("organizationId"));
        let t = ok(r#"{"messageId":"m","agentId":"a","userId":"u","runId":3}"#);
        assert_eq!(t.missing_context(), Some("organizationId"));
        let t =
            ok(r#"{"messageId":"m","agentId":"a","organizationId":"o","userId":"u","runId":3}"#);
        assert_eq!(t.missing_context(), Some("conversationId"));
        let t = ok(
            r#"{"messageId":"m","agentId":"a","organizationId":"o","conversationId":"","userId":"u","runId":3}"#,
        );
        assert_eq!(t.missing_context(), Some("conversationId"));
        let t = ok(
            r#"{"messageId":"m","agentId":"a","organizationId":"o","conversationId":"c","runId":3}"#,
        );
        assert_eq!(t.missing_context(), None);
        let t = ok(r#"{"messageId":"m","agentId":"a","userId":"u"}"#);
        assert_eq!(t.missing_context(), None);
    }

    // --- document-level rules ----------------------------------------------------------------

    #[test]
    fn size_limit_is_checked_before_parsing() {
        let body = with("");
        assert!(parse(body.as_bytes(), body.len()).is_ok());
        let e = parse(body.as_bytes(), body.len() - 1).unwrap_err();
        assert!(e.too_large);
        assert!(e.reason.contains("max_turn_bytes"), "{}", e.reason);
        assert!(e.message_id.is_none() && e.deployment.is_none() && e.routing.is_none());
        // not even valid: still "too large", never parsed
        let e = parse(&[0xff; 100], 10).unwrap_err();
        assert!(e.too_large);
    }

    #[test]
    fn not_json_not_object_not_utf8() {
        for body in ["", "{", "nope", "{\"a\":1} x", "{\"a\":01}", "[]", "\"s\"", "null", "1"] {
            let e = bad(body);
            assert!(!e.too_large);
            assert!(e.message_id.is_none() && e.deployment.is_none());
            assert!(e.reason.starts_with("turn "), "{body}: {}", e.reason);
        }
        let mut b = with("").into_bytes();
        b.insert(3, 0xff);
        let e = parse(&b, MAX).unwrap_err();
        assert!(e.reason.contains("UTF-8"), "{}", e.reason);
        let e = parse(&[0xc3, 0x28], MAX).unwrap_err();
        assert!(e.reason.contains("UTF-8"));
        // lone surrogates are not valid strings
        bad(&with(r#","payload":"\ud800""#));
    }

    #[test]
    fn deep_nesting_is_invalid_not_a_crash() {
        let body = "[".repeat(100_000);
        let e = parse(body.as_bytes(), usize::MAX).unwrap_err();
        assert!(e.reason.contains("JSON"), "{}", e.reason);
        let body = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        parse(body.as_bytes(), usize::MAX).unwrap_err();
        let body = with(&format!(r#","payload":{}"#, "{\"a\":".repeat(100_000)));
        parse(body.as_bytes(), usize::MAX).unwrap_err();
        // within the limit: fine
        let body = with(&format!(r#","payload":{}1{}"#, "[".repeat(100), "]".repeat(100)));
        ok(&body);
    }

    #[test]
    fn duplicate_keys_anywhere() {
        let e = bad(r#"{"messageId":"m","agentId":"a","userId":"u","x":1,"x":2}"#);
        assert!(e.reason.contains("duplicate key \"x\""), "{}", e.reason);
        // a non-identity duplicate still identifies the turn
        assert!(e.message_id.is_some() && e.deployment.is_some());
        let e = bad(&with(r#","runId":1,"runId":2"#));
        assert!(e.message_id.is_some() && e.deployment.is_some());
        // identity field duplicated: ambiguous, no identification
        let e = bad(r#"{"messageId":"m","agentId":"a","userId":"u","userId":"v"}"#);
        assert!(e.message_id.is_none() && e.deployment.is_none());
        let e = bad(r#"{"messageId":"m","agentId":"a","userId":"u","messageId":"n"}"#);
        assert!(e.reason.contains("duplicate key \"messageId\""), "{}", e.reason);
        assert!(e.message_id.is_none() && e.deployment.is_none());
        // nested, in arrays, escaped
        for extra in [
            r#","payload":{"a":{"b":1,"b":1}}"#,
            r#","payload":[{"k":1},{"k":1,"j":{"q":[{"z":0,"z":0}]}}]"#,
            r#","payload":{"a":1,"\u0061":2}"#,
            r#","payload":{"\"":1,"\u0022":2}"#,
            r#","payload":{"é":1,"\u00e9":2}"#,
            r#","payload":{"😀":1,"\ud83d\ude00":2}"#,
            r#","payload":{"a\/b":1,"a/b":2}"#,
            r#","platformMetadata":{"t":1,"t":null}"#,
        ] {
            let e = bad(&with(extra));
            assert!(e.reason.contains("duplicate key"), "{extra}: {}", e.reason);
            assert!(e.reason.contains("nested"), "{extra}: {}", e.reason);
        }
        // the same key in sibling or nested objects is fine, and values that look like keys too
        ok(&with(
            r#","payload":[{"k":1},{"k":1}],"x":{"k":{"k":"k"}},"y":["k","k"],"z":{"a":"a","b":"a"}"#,
        ));
        ok(&with(r#","payload":{"a\\":1,"a":2,"a\"":3,"\\\"":4,"{":"}","[":"]",",":":"}"#));
        ok(&with(r#","payload":{"a":{},"b":[],"c":[{}],"d":{"a":{"b":{}}},"a2":1}"#));
    }

    #[test]
    fn line_keeps_order_unknown_fields_and_digits() {
        let body = r#"{"zeta":1,"messageId":"m","big":12345678901234567890123,"agentId":"a","dec":1.10,"exp":1E+400,"neg":-0.000,"userId":"u","unknown":{"b":2,"a":[1.0,2.50]},"payload":{"text":"hé\"\n"}}"#;
        let t = ok(body);
        assert_eq!(t.line, body);
        // escapes are kept as written too
        let body = r#"{"messageId":"m","agentId":"a","userId":"\u0075","s":"\u00e9\/ \t"}"#;
        let t = ok(body);
        assert_eq!(t.line, body);
        assert_eq!(t.conversation_key, "u");
        // pretty printed → one compact line
        let pretty = "{\n  \"messageId\" : \"m\",\r\n\t\"agentId\": \"a\",\n  \"userId\": \"u\",\n  \"n\": 1.10,\n  \"list\": [ 1 , 2 ],\n  \"s\": \"a b\\nc\"\n}\n";
        let t = ok(pretty);
        assert_eq!(
            t.line,
            r#"{"messageId":"m","agentId":"a","userId":"u","n":1.10,"list":[1,2],"s":"a b\nc"}"#
        );
        assert!(!t.line.contains('\n'));
        // nulls stay in the line (they are "absent" for validation only)
        let t = ok(&with(r#","organizationId":null"#));
        assert!(t.line.contains(r#""organizationId":null"#));
    }

    #[test]
    fn never_panics_on_noise() {
        let mut seed: u64 = 0x9e3779b97f4a7c15;
        let alphabet = br#"{}[]",:\u0123456789abcdefnulltrue-+.eE "#;
        for n in 0..2000 {
            let len = n % 64;
            let mut b = Vec::with_capacity(len);
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                b.push(if n % 3 == 0 {
                    (seed >> 24) as u8
                } else {
                    alphabet[(seed >> 24) as usize % alphabet.len()]
                });
            }
            let _ = parse(&b, MAX);
            if let Ok(s) = std::str::from_utf8(&b) {
                let _ = find_duplicate_key(s);
            }
        }
    }

    #[test]
    fn echo_is_bounded_and_escaped() {
        assert_eq!(echo("a\u{0}b\n"), r#""a\0b\n""#);
        let e = echo(&"é".repeat(1000));
        assert!(e.chars().count() <= ECHO_CHARS + 3);
        assert!(e.ends_with('…'));
    }

    // --- newtypes and codes ------------------------------------------------------------------

    #[test]
    fn newtypes() {
        let m = MessageId::parse("m1").unwrap();
        assert_eq!(m.to_string(), "m1");
        assert_eq!(m.clone().into_inner(), "m1");
        assert_eq!(serde_json::to_string(&m).unwrap(), "\"m1\"");
        let e = Epoch::new(7);
        assert_eq!(e.get(), 7);
        assert_eq!(e.to_string(), "7");
        assert!(Epoch::new(1) < Epoch::new(2));
    }

    #[test]
    fn error_codes() {
        let all = [
            (ErrorCode::WorkerDied, "WORKER_DIED"),
            (ErrorCode::WorkerStartFailed, "WORKER_START_FAILED"),
            (ErrorCode::TurnTimeout, "TURN_TIMEOUT"),
            (ErrorCode::WorkerStopped, "WORKER_STOPPED"),
            (ErrorCode::TurnCancelled, "TURN_CANCELLED"),
            (ErrorCode::WorkerCrashLoop, "WORKER_CRASH_LOOP"),
            (ErrorCode::MissingContext, "MISSING_CONTEXT"),
            (ErrorCode::InvalidTurn, "INVALID_TURN"),
            (ErrorCode::WorkerError, "WORKER_ERROR"),
        ];
        for (code, name) in all {
            assert_eq!(code.as_str(), name);
            assert_eq!(code.to_string(), name);
            assert_eq!(ErrorCode::from_worker(Some(name)), code);
        }
        assert_eq!(ErrorCode::from_worker(None), ErrorCode::WorkerError);
        let other = ErrorCode::from_worker(Some("PROVIDER_QUOTA_EXHAUSTED"));
        assert_eq!(other, ErrorCode::Other("PROVIDER_QUOTA_EXHAUSTED".into()));
        assert_eq!(other.as_str(), "PROVIDER_QUOTA_EXHAUSTED");
    }
}
