//! The exactly-once check of CONTRACT §6, one for the tests, `turnd-bench` and `turnd-chaos`.
//! Terminal events are de-duplicated on their AMQP `message_id` (a redelivery is harmless:
//! delivery is at least once); then every turn sent must have exactly one, on its routing key,
//! with its messageId as `correlation_id`, and no turn never sent may have one.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use serde_json::Value;

/// One distinct terminal event, as received.
#[derive(Debug, Clone)]
pub struct Event {
    /// The AMQP message_id: the event's own id.
    pub event_id: String,
    pub correlation_id: String,
    pub routing_key: String,
    pub body: Value,
    /// When it arrived.
    pub at: Instant,
    /// The `traceparent` header (CONTRACT §6), when the receiver reads it.
    pub traceparent: Option<String>,
}

impl Event {
    pub fn message_id(&self) -> &str {
        self.body["messageId"].as_str().unwrap_or("")
    }
    pub fn kind(&self) -> &str {
        self.body["kind"].as_str().unwrap_or("")
    }
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
    pub fn deployment(&self) -> &str {
        self.body["deployment"].as_str().unwrap_or("")
    }
    /// `reply`, or the error code (`?` when there is none).
    pub fn outcome(&self) -> &str {
        match self.kind() {
            "reply" => "reply",
            _ => self.body["error"]["code"].as_str().unwrap_or("?"),
        }
    }
}

/// Every terminal event received, de-duplicated.
#[derive(Debug, Default, Clone)]
pub struct Ledger {
    /// Distinct events per turn messageId (`""` for an event naming none), in arrival order.
    pub by_message: HashMap<String, Vec<Event>>,
    seen: HashSet<String>,
    /// Deliveries of an event already received.
    pub redelivered: u64,
    /// Deliveries that cannot be counted: no AMQP message_id, or a body that is not JSON.
    pub malformed: Vec<String>,
}

impl Ledger {
    /// Records one delivery; returns the event when it is a new one.
    pub fn record(
        &mut self,
        event_id: Option<&str>,
        correlation_id: Option<&str>,
        routing_key: &str,
        data: &[u8],
    ) -> Option<&Event> {
        let Some(event_id) = event_id.filter(|e| !e.is_empty()) else {
            self.malformed.push(format!(
                "event without message_id (routing key {routing_key}): {}",
                String::from_utf8_lossy(&data[..data.len().min(200)])
            ));
            return None;
        };
        if self.seen.contains(event_id) {
            self.redelivered += 1;
            return None;
        }
        let body: Value = match serde_json::from_slice(data) {
            Ok(v) => v,
            Err(e) => {
                self.malformed.push(format!("event {event_id} is not JSON: {e}"));
                return None;
            }
        };
        self.seen.insert(event_id.to_owned());
        let event = Event {
            event_id: event_id.to_owned(),
            correlation_id: correlation_id.unwrap_or_default().to_owned(),
            routing_key: routing_key.to_owned(),
            body,
            at: Instant::now(),
            traceparent: None,
        };
        let events = self.by_message.entry(event.message_id().to_owned()).or_default();
        events.push(event);
        events.last()
    }

    /// The first event of a turn.
    pub fn first(&self, message_id: &str) -> Option<&Event> {
        self.by_message.get(message_id)?.first()
    }

    /// The check over the turns `sent`.
    pub fn verdict<'a>(&self, sent: impl IntoIterator<Item = Expected<'a>>) -> Verdict {
        let mut v = Verdict { malformed: self.malformed.clone(), ..Verdict::default() };
        let mut ids = HashSet::new();
        for s in sent {
            v.sent += 1;
            ids.insert(s.message_id);
            let events = self.by_message.get(s.message_id).map(Vec::as_slice).unwrap_or(&[]);
            match events.len() {
                0 => v.missing.push(s.message_id.to_owned()),
                1 => {}
                _ => v.duplicated.push((
                    s.message_id.to_owned(),
                    events.iter().map(|e| format!("{} [{}]", e.outcome(), e.event_id)).collect(),
                )),
            }
            for e in events {
                let mid = s.message_id.to_owned();
                if e.correlation_id != s.message_id {
                    v.misaddressed.push((
                        mid.clone(),
                        format!("event {} has correlation_id {:?}", e.event_id, e.correlation_id),
                    ));
                }
                if let Some(key) = s.routing_key
                    && e.routing_key != key
                {
                    v.misaddressed.push((
                        mid,
                        format!(
                            "event {} has routing key {} instead of {key}",
                            e.event_id, e.routing_key
                        ),
                    ));
                }
            }
        }
        let mut unknown: Vec<(String, usize)> = self
            .by_message
            .iter()
            .filter(|(m, _)| !ids.contains(m.as_str()))
            .map(|(m, e)| (m.clone(), e.len()))
            .collect();
        unknown.sort();
        v.unknown = unknown;
        v
    }
}

/// A turn sent, as the check needs it.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    pub message_id: &'a str,
    /// `reply.<organizationId or _>.<deployment>`, when the sender knows it.
    pub routing_key: Option<&'a str>,
}

impl<'a> Expected<'a> {
    pub fn id(message_id: &'a str) -> Expected<'a> {
        Expected { message_id, routing_key: None }
    }
}

/// What the check found; it holds when every list is empty.
#[derive(Debug, Default, Clone)]
pub struct Verdict {
    pub sent: usize,
    /// Turns sent that have no terminal event.
    pub missing: Vec<String>,
    /// Turns with more than one distinct terminal event: (messageId, `outcome [event id]`).
    pub duplicated: Vec<(String, Vec<String>)>,
    /// Events of turns never sent (or naming none): (messageId, how many).
    pub unknown: Vec<(String, usize)>,
    /// Events of a turn sent with another correlation_id or on another routing key:
    /// (messageId, what).
    pub misaddressed: Vec<(String, String)>,
    /// Deliveries that cannot be counted.
    pub malformed: Vec<String>,
}

impl Verdict {
    pub fn holds(&self) -> bool {
        self.missing.is_empty()
            && self.duplicated.is_empty()
            && self.unknown.is_empty()
            && self.misaddressed.is_empty()
            && self.malformed.is_empty()
    }

    /// One line per broken promise.
    pub fn problems(&self) -> Vec<String> {
        let mut out: Vec<String> =
            self.missing.iter().map(|m| format!("{m}: no terminal event")).collect();
        out.extend(
            self.duplicated
                .iter()
                .map(|(m, e)| format!("{m}: {} terminal events: {}", e.len(), e.join(", "))),
        );
        out.extend(self.unknown.iter().map(|(m, n)| format!("{m:?}: {n} event(s), never sent")));
        out.extend(self.misaddressed.iter().map(|(m, what)| format!("{m}: {what}")));
        out.extend(self.malformed.iter().cloned());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(mid: &str, kind: &str) -> Vec<u8> {
        serde_json::json!({"messageId": mid, "kind": kind}).to_string().into_bytes()
    }

    #[test]
    fn each_broken_promise_is_named_and_a_redelivery_is_not_one() {
        let mut l = Ledger::default();
        let key = "reply.o.d";
        assert!(l.record(Some("e1"), Some("m1"), key, &body("m1", "reply")).is_some());
        assert!(l.record(Some("e1"), Some("m1"), key, &body("m1", "reply")).is_none());
        l.record(Some("e2"), Some("m2"), key, &body("m2", "reply"));
        l.record(Some("e3"), Some("m2"), key, &body("m2", "error"));
        l.record(Some("e4"), Some("x"), "reply.o.other", &body("m4", "reply"));
        l.record(Some("e5"), Some("m9"), key, &body("m9", "reply"));
        l.record(None, None, key, b"{}");
        l.record(Some("e6"), None, key, b"not json");
        let sent =
            ["m1", "m2", "m3", "m4"].map(|m| Expected { message_id: m, routing_key: Some(key) });
        let v = l.verdict(sent);
        assert_eq!(l.redelivered, 1);
        assert_eq!(v.sent, 4);
        assert_eq!(v.missing, ["m3"]);
        assert_eq!(v.duplicated.len(), 1);
        assert_eq!(v.duplicated[0].0, "m2");
        assert_eq!(v.unknown, [("m9".to_owned(), 1)]);
        // m4's event: another correlation_id and another routing key.
        assert_eq!(v.misaddressed.len(), 2);
        assert!(v.misaddressed.iter().all(|(m, _)| m == "m4"));
        assert_eq!(v.malformed.len(), 2);
        assert!(!v.holds());
        assert_eq!(v.problems().len(), 1 + 1 + 1 + 2 + 2);
        let only_m1 = l.verdict([Expected::id("m1")]);
        assert!(only_m1.missing.is_empty() && only_m1.duplicated.is_empty());
    }
}
