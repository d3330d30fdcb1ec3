//! The worker's stdio protocol (CONTRACT §5): one JSON object per line.
//!
//! turnd → worker (stdin): `{"type":"turn","epoch":7,"traceparent":"00-…","turn":{...}}`
//! (`traceparent`, and `tracestate` when there is one, added with issue 20: a protocol-1
//! worker ignores fields it does not know).
//! worker → turnd (stdout): `reply`, `error`, `heartbeat`, `provider_failed`,
//! `provider_recovered`. Pure: no I/O.

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::otel::TraceContext;
use crate::turn::Epoch;

/// Longest error text or reason kept from a worker line, in bytes.
pub const MAX_TEXT_BYTES: usize = 4096;

/// Deepest nesting accepted in a reply payload. serde_json skips a raw value without a depth
/// limit, but anything that later parses the payload (into a `Value`, inside the reply
/// envelope; PostgreSQL) has one: 100 leaves room under serde_json's 128.
pub const MAX_PAYLOAD_DEPTH: usize = 100;

/// The code of a `provider_failed` line that gave none (or an invalid one).
pub const DEFAULT_PROVIDER_CODE: &str = "PROVIDER_FAILED";

/// The stdin line for one turn. `turn_line` is the turn's compact one-line JSON
/// ([`crate::turn::Turn::line`]); it is spliced in as is, not re-parsed. `trace`: the context
/// of the turn's worker span, for the worker's own spans (W3C strings, JSON-safe once parsed:
/// hex, dashes, and a tracestate of printable ASCII without quotes or backslashes).
pub fn turn_line(epoch: Epoch, trace: Option<&TraceContext>, turn_line: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(turn_line.len() + 160);
    out.extend_from_slice(b"{\"type\":\"turn\",\"epoch\":");
    out.extend_from_slice(epoch.get().to_string().as_bytes());
    if let Some(trace) = trace {
        // Serialised, not spliced: a tracestate is the producer's text.
        let field = |out: &mut Vec<u8>, key: &str, value: &str| {
            out.extend_from_slice(b",\"");
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(b"\":");
            out.extend_from_slice(serde_json::to_string(value).unwrap_or_default().as_bytes());
        };
        field(&mut out, "traceparent", &trace.traceparent);
        if let Some(state) = &trace.tracestate {
            field(&mut out, "tracestate", state);
        }
    }
    out.extend_from_slice(b",\"turn\":");
    out.extend_from_slice(turn_line.as_bytes());
    out.extend_from_slice(b"}\n");
    out
}

/// The stdin line that tells a worker an operator cancelled its turn `message_id` (it may
/// answer it with an error or a reply of its own before `turn.cancel_grace` ends; a
/// protocol-1 worker that ignores unknown lines keeps working).
pub fn cancel_line(message_id: &crate::turn::MessageId) -> Vec<u8> {
    let mut out = serde_json::to_vec(&serde_json::json!({
        "type": "cancel",
        "messageId": message_id.as_str(),
    }))
    .unwrap_or_default();
    out.push(b'\n');
    out
}

/// One stdout line of a worker.
#[derive(Debug)]
pub enum WorkerLine {
    /// Terminal success. `payload` is the value exactly as the worker wrote it (digits kept);
    /// `null` when absent.
    Reply {
        message_id: String,
        payload: Box<RawValue>,
    },
    /// Terminal error. `code` is `None` when the worker gave none or an invalid one (the event
    /// then carries `WORKER_ERROR`); `error` is at most [`MAX_TEXT_BYTES`].
    Error {
        message_id: String,
        error: String,
        code: Option<String>,
    },
    Heartbeat,
    /// `code` is the worker's (valid) code or [`DEFAULT_PROVIDER_CODE`].
    ProviderFailed {
        code: String,
        reason: Option<String>,
    },
    ProviderRecovered,
}

impl PartialEq for WorkerLine {
    fn eq(&self, other: &Self) -> bool {
        use WorkerLine::*;
        match (self, other) {
            (Reply { message_id: a, payload: p }, Reply { message_id: b, payload: q }) => {
                a == b && p.get() == q.get()
            }
            (
                Error { message_id: a, error: e, code: c },
                Error { message_id: b, error: f, code: d },
            ) => a == b && e == f && c == d,
            (Heartbeat, Heartbeat) | (ProviderRecovered, ProviderRecovered) => true,
            (ProviderFailed { code: a, reason: r }, ProviderFailed { code: b, reason: s }) => {
                a == b && r == s
            }
            _ => false,
        }
    }
}

/// Why a stdout line is not valid protocol (it is logged and ignored).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("not a JSON object")]
    NotObject,
    #[error("no \"type\" field")]
    MissingType,
    #[error("\"type\" must be a string")]
    TypeNotString,
    #[error("unknown type {0}")]
    UnknownType(String),
    #[error("{kind} line without messageId")]
    MissingMessageId { kind: &'static str },
    #[error("{kind} line: {field} {detail}")]
    InvalidField { kind: &'static str, field: &'static str, detail: String },
}

/// The fields we look at; anything else on the line is ignored. A key repeated on the line is
/// a protocol error (serde reports it).
#[derive(Deserialize)]
struct RawLine<'a> {
    #[serde(rename = "type")]
    ty: Option<Value>,
    #[serde(rename = "messageId")]
    message_id: Option<Value>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
    error: Option<Value>,
    code: Option<Value>,
    reason: Option<Value>,
}

/// Parses one stdout line (without its `\n`; a trailing `\r` is tolerated).
pub fn parse_line(line: &[u8]) -> Result<WorkerLine, ProtocolError> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    // serde would read a JSON array into a struct positionally: insist on an object.
    match line.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => {}
        _ => {
            return Err(match serde_json::from_slice::<serde::de::IgnoredAny>(line) {
                Ok(_) => ProtocolError::NotObject,
                Err(e) => ProtocolError::NotJson(e.to_string()),
            });
        }
    }
    let raw: RawLine<'_> =
        serde_json::from_slice(line).map_err(|e| ProtocolError::NotJson(e.to_string()))?;
    let ty = match raw.ty {
        None | Some(Value::Null) => return Err(ProtocolError::MissingType),
        Some(Value::String(s)) => s,
        Some(_) => return Err(ProtocolError::TypeNotString),
    };
    match ty.as_str() {
        "reply" => {
            let message_id = message_id("reply", raw.message_id)?;
            let payload = match raw.payload {
                Some(p) if nests_deeper_than(p.get(), MAX_PAYLOAD_DEPTH) => {
                    return Err(ProtocolError::InvalidField {
                        kind: "reply",
                        field: "payload",
                        detail: format!("nests deeper than {MAX_PAYLOAD_DEPTH} levels"),
                    });
                }
                Some(p) => p.to_owned(),
                None => RawValue::NULL.to_owned(),
            };
            Ok(WorkerLine::Reply { message_id, payload })
        }
        "error" => {
            let message_id = message_id("error", raw.message_id)?;
            let error = match raw.error {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s,
                // Lenient: a structured error still ends the turn, as its JSON text.
                Some(other) => other.to_string(),
            };
            Ok(WorkerLine::Error {
                message_id,
                error: truncate(error, MAX_TEXT_BYTES),
                code: valid_code(raw.code),
            })
        }
        "heartbeat" => Ok(WorkerLine::Heartbeat),
        "provider_failed" => Ok(WorkerLine::ProviderFailed {
            code: valid_code(raw.code).unwrap_or_else(|| DEFAULT_PROVIDER_CODE.to_owned()),
            reason: match raw.reason {
                Some(Value::String(s)) => Some(truncate(s, MAX_TEXT_BYTES)),
                None | Some(Value::Null) => None,
                Some(other) => Some(truncate(other.to_string(), MAX_TEXT_BYTES)),
            },
        }),
        "provider_recovered" => Ok(WorkerLine::ProviderRecovered),
        other => Err(ProtocolError::UnknownType(echo(other))),
    }
}

fn message_id(kind: &'static str, v: Option<Value>) -> Result<String, ProtocolError> {
    match v {
        None | Some(Value::Null) => Err(ProtocolError::MissingMessageId { kind }),
        Some(Value::String(s)) if s.is_empty() => Err(ProtocolError::InvalidField {
            kind,
            field: "messageId",
            detail: "is empty".to_owned(),
        }),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(ProtocolError::InvalidField {
            kind,
            field: "messageId",
            detail: "must be a string".to_owned(),
        }),
    }
}

/// A worker's code if it matches `^[A-Z0-9_]{1,64}$`.
fn valid_code(v: Option<Value>) -> Option<String> {
    match v {
        Some(Value::String(s))
            if !s.is_empty()
                && s.len() <= 64
                && s.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_') =>
        {
            Some(s)
        }
        _ => None,
    }
}

/// Whether the (valid) JSON text nests arrays/objects more than `limit` levels deep.
fn nests_deeper_than(json: &str, limit: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for b in json.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Cuts `s` to at most `max` bytes, at a char boundary.
fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// An unknown type for the error message: quoted, escaped, bounded.
fn echo(s: &str) -> String {
    let mut chars = s.chars();
    let head: String = chars.by_ref().take(64).collect();
    if chars.next().is_some() { format!("{head:?}…") } else { format!("{head:?}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    fn p(s: &str) -> Result<WorkerLine, ProtocolError> {
        parse_line(s.as_bytes())
    }

    #[test]
    fn turn_line_splices() {
        let line = turn_line(Epoch::new(7), None, r#"{"messageId":"m1","n":1.10}"#);
        assert_eq!(
            line,
            b"{\"type\":\"turn\",\"epoch\":7,\"turn\":{\"messageId\":\"m1\",\"n\":1.10}}\n"
        );
        // valid JSON, exactly one newline, at the end
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["epoch"], 7);
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        let line = turn_line(Epoch::new(i64::MAX), None, "{}");
        assert_eq!(line, b"{\"type\":\"turn\",\"epoch\":9223372036854775807,\"turn\":{}}\n");
    }

    #[test]
    fn cancel_line_is_one_json_line() {
        let line = cancel_line(&crate::turn::MessageId::from_trusted("m\"1".into()));
        assert_eq!(line, b"{\"type\":\"cancel\",\"messageId\":\"m\\\"1\"}\n");
    }

    #[test]
    fn turn_line_carries_the_trace_context() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = TraceContext { traceparent: tp.to_owned(), tracestate: Some("a=1,b=2".into()) };
        let line = turn_line(Epoch::new(3), Some(&cx), r#"{"messageId":"m1"}"#);
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["traceparent"], tp);
        assert_eq!(v["tracestate"], "a=1,b=2");
        assert_eq!(v["turn"]["messageId"], "m1");
        let cx = TraceContext { traceparent: tp.to_owned(), tracestate: None };
        let v: Value = serde_json::from_slice(&turn_line(Epoch::new(3), Some(&cx), "{}")).unwrap();
        assert!(v.get("tracestate").is_none());
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
    }

    #[test]
    fn reply() {
        assert_eq!(
            p(
                r#"{"type":"reply","messageId":"m1","payload":{"text":"hi","n":12345678901234567890123,"f":1.10}}"#
            ),
            Ok(WorkerLine::Reply {
                message_id: "m1".into(),
                payload: raw(r#"{"text":"hi","n":12345678901234567890123,"f":1.10}"#),
            })
        );
        // no payload, null payload → "null"
        for line in [
            r#"{"type":"reply","messageId":"m1"}"#,
            r#"{"type":"reply","messageId":"m1","payload":null}"#,
        ] {
            match p(line).unwrap() {
                WorkerLine::Reply { message_id, payload } => {
                    assert_eq!(message_id, "m1");
                    assert_eq!(payload.get(), "null");
                }
                other => panic!("{other:?}"),
            }
        }
        // unknown fields ignored, any field order, \r tolerated, scalars as payload
        assert_eq!(
            p(
                "{\"payload\":\"x\",\"extra\":[1,2],\"messageId\":\"m\\u0031\",\"type\":\"reply\"}\r"
            ),
            Ok(WorkerLine::Reply { message_id: "m1".into(), payload: raw("\"x\"") })
        );
        assert_eq!(
            p(r#"{"type":"reply","payload":1}"#),
            Err(ProtocolError::MissingMessageId { kind: "reply" })
        );
        assert_eq!(
            p(r#"{"type":"reply","messageId":null}"#),
            Err(ProtocolError::MissingMessageId { kind: "reply" })
        );
        assert!(matches!(
            p(r#"{"type":"reply","messageId":5}"#),
            Err(ProtocolError::InvalidField { field: "messageId", .. })
        ));
        assert!(matches!(
            p(r#"{"type":"reply","messageId":""}"#),
            Err(ProtocolError::InvalidField { field: "messageId", .. })
        ));
    }

    #[test]
    fn error() {
        assert_eq!(
            p(r#"{"type":"error","messageId":"m1","error":"boom","code":"RATE_LIMITED_2"}"#),
            Ok(WorkerLine::Error {
                message_id: "m1".into(),
                error: "boom".into(),
                code: Some("RATE_LIMITED_2".into()),
            })
        );
        assert_eq!(
            p(r#"{"type":"error","messageId":"m1","error":"boom"}"#),
            Ok(WorkerLine::Error { message_id: "m1".into(), error: "boom".into(), code: None })
        );
        // invalid codes → None (WORKER_ERROR), text kept
        for code in [
            r#""lower""#,
            r#""""#,
            r#""A-B""#,
            r#""A B""#,
            "5",
            "null",
            &format!("\"{}\"", "A".repeat(65)),
        ] {
            assert_eq!(
                p(&format!(r#"{{"type":"error","messageId":"m1","error":"boom","code":{code}}}"#)),
                Ok(WorkerLine::Error { message_id: "m1".into(), error: "boom".into(), code: None }),
                "{code}"
            );
        }
        let c64 = "A".repeat(64);
        assert!(matches!(
            p(&format!(r#"{{"type":"error","messageId":"m","code":"{c64}"}}"#)),
            Ok(WorkerLine::Error { code: Some(c), .. }) if c == c64
        ));
        // missing or structured error text: still a terminal error
        assert_eq!(
            p(r#"{"type":"error","messageId":"m1"}"#),
            Ok(WorkerLine::Error { message_id: "m1".into(), error: String::new(), code: None })
        );
        assert_eq!(
            p(r#"{"type":"error","messageId":"m1","error":{"detail":1.50}}"#),
            Ok(WorkerLine::Error {
                message_id: "m1".into(),
                error: r#"{"detail":1.50}"#.into(),
                code: None,
            })
        );
        assert_eq!(
            p(r#"{"type":"error","error":"x"}"#),
            Err(ProtocolError::MissingMessageId { kind: "error" })
        );
    }

    #[test]
    fn error_text_is_truncated_at_a_char_boundary() {
        let text = format!("a{}", "é".repeat(5000)); // 1 + 10000 bytes
        let line = format!(r#"{{"type":"error","messageId":"m","error":"{text}"}}"#);
        match p(&line).unwrap() {
            WorkerLine::Error { error, .. } => {
                assert_eq!(error.len(), 4095);
                assert!(text.starts_with(&error));
            }
            other => panic!("{other:?}"),
        }
        let exact = "x".repeat(MAX_TEXT_BYTES);
        let line = format!(r#"{{"type":"error","messageId":"m","error":"{exact}"}}"#);
        assert!(matches!(p(&line), Ok(WorkerLine::Error { error, .. }) if error == exact));
    }

    #[test]
    fn heartbeat_and_provider_lines() {
        assert_eq!(p(r#"{"type":"heartbeat"}"#), Ok(WorkerLine::Heartbeat));
        assert_eq!(
            p(r#" {"type":"heartbeat","messageId":"m","progress":0.5} "#),
            Ok(WorkerLine::Heartbeat)
        );
        assert_eq!(p(r#"{"type":"provider_recovered"}"#), Ok(WorkerLine::ProviderRecovered));
        assert_eq!(
            p(r#"{"type":"provider_failed","code":"PROVIDER_QUOTA_EXHAUSTED","reason":"429"}"#),
            Ok(WorkerLine::ProviderFailed {
                code: "PROVIDER_QUOTA_EXHAUSTED".into(),
                reason: Some("429".into()),
            })
        );
        assert_eq!(
            p(r#"{"type":"provider_failed"}"#),
            Ok(WorkerLine::ProviderFailed { code: "PROVIDER_FAILED".into(), reason: None })
        );
        assert_eq!(
            p(r#"{"type":"provider_failed","code":"bad code","reason":null}"#),
            Ok(WorkerLine::ProviderFailed { code: "PROVIDER_FAILED".into(), reason: None })
        );
        let long = "r".repeat(5000);
        assert!(matches!(
            p(&format!(r#"{{"type":"provider_failed","reason":"{long}"}}"#)),
            Ok(WorkerLine::ProviderFailed { reason: Some(r), .. }) if r.len() == MAX_TEXT_BYTES
        ));
    }

    #[test]
    fn malformed_lines() {
        assert!(matches!(p(""), Err(ProtocolError::NotJson(_))));
        assert!(matches!(p("   "), Err(ProtocolError::NotJson(_))));
        assert!(matches!(p("hello"), Err(ProtocolError::NotJson(_))));
        assert!(matches!(p("{"), Err(ProtocolError::NotJson(_))));
        assert!(matches!(p(r#"{"type":"heartbeat"} x"#), Err(ProtocolError::NotJson(_))));
        assert!(matches!(p(r#"{"type":"heartbeat"}{}"#), Err(ProtocolError::NotJson(_))));
        assert_eq!(p("[]"), Err(ProtocolError::NotObject));
        assert_eq!(p(r#"["reply","m1"]"#), Err(ProtocolError::NotObject));
        assert_eq!(p("42"), Err(ProtocolError::NotObject));
        assert_eq!(p("\"heartbeat\""), Err(ProtocolError::NotObject));
        assert_eq!(p("null"), Err(ProtocolError::NotObject));
        assert_eq!(p("{}"), Err(ProtocolError::MissingType));
        assert_eq!(p(r#"{"type":null}"#), Err(ProtocolError::MissingType));
        assert_eq!(p(r#"{"type":1}"#), Err(ProtocolError::TypeNotString));
        assert_eq!(p(r#"{"type":"x"}"#), Err(ProtocolError::UnknownType("\"x\"".into())));
        assert_eq!(p(r#"{"type":"x"}"#).unwrap_err().to_string(), r#"unknown type "x""#);
        assert_eq!(
            p(r#"{"type":"reply"}"#).unwrap_err().to_string(),
            "reply line without messageId"
        );
        // the unknown type is echoed bounded and escaped
        let long = format!("{}\\n", "t".repeat(500));
        let e = p(&format!(r#"{{"type":"{long}"}}"#)).unwrap_err().to_string();
        assert!(e.len() < 100 && !e.contains('\n'), "{e}");
        // duplicate keys on the line are a protocol error
        assert!(matches!(
            p(r#"{"type":"reply","messageId":"a","messageId":"b"}"#),
            Err(ProtocolError::NotJson(_))
        ));
        // a line with an embedded newline is two lines; a turn line is not a worker line
        assert!(p("{\"type\":\"heartbeat\"}\n{}").is_err());
        assert!(matches!(
            p(r#"{"type":"turn","epoch":1,"turn":{}}"#),
            Err(ProtocolError::UnknownType(_))
        ));
    }

    #[test]
    fn binary_noise_never_panics() {
        assert!(p("\u{feff}{\"type\":\"heartbeat\"}").is_err());
        assert!(parse_line(&[0xff, 0xfe, 0x00, 0x7b]).is_err());
        assert!(parse_line(b"{\"type\":\"reply\",\"messageId\":\"\xff\"}").is_err());
        assert!(parse_line(&[b'['; 100_000]).is_err());
        assert!(parse_line(&[b'{'; 100_000]).is_err());
        let nested = format!(
            r#"{{"type":"reply","messageId":"m","payload":{}1{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert!(matches!(
            parse_line(nested.as_bytes()),
            Err(ProtocolError::InvalidField { field: "payload", .. })
        ));
        // 100 levels, with brackets inside strings that must not count
        let payload = format!("{}\"[{{\\\"]\"{}", "[{\"a\":".repeat(50), "}]".repeat(50));
        let ok_depth = format!(r#"{{"type":"reply","messageId":"m","payload":{payload}}}"#);
        assert!(
            matches!(parse_line(ok_depth.as_bytes()), Ok(WorkerLine::Reply { .. })),
            "{ok_depth}"
        );
        let too_deep = format!(
            r#"{{"type":"reply","messageId":"m","payload":{}1{}}}"#,
            "[".repeat(101),
            "]".repeat(101)
        );
        assert!(parse_line(too_deep.as_bytes()).is_err());
        let mut seed: u64 = 0x2545f4914f6cdd1d;
        for n in 0..3000 {
            let len = n % 80;
            let mut b = Vec::with_capacity(len + 1);
            b.push(b'{');
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                b.push((seed >> 32) as u8);
            }
            let _ = parse_line(&b);
        }
    }
}
