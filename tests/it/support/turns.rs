//! Generators of published turns, valid and invalid in every way CONTRACT §2 allows, with an
//! oracle written independently of the parser ([`TurnFields::valid`]). Used by the parser's
//! fuzzing (tests/fuzz.rs) and the turn schema's agreement with the parser (tests/schemas.rs).

use std::collections::BTreeMap;

use proptest::prelude::*;

/// One JSON value as text, with numbers spelled as producers might (huge, exponents) and
/// strings with escapes and control characters.
pub fn json_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_owned()),
        Just("true".to_owned()),
        Just("false".to_owned()),
        "-?[1-9][0-9]{0,39}|0",
        Just("1e400".to_owned()),
        Just("-0.000000000000000000000000000001".to_owned()),
        Just("123456789012345678901234567890".to_owned()),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| f.to_string()),
        ".{0,24}".prop_map(|s| serde_json::to_string(&s).unwrap_or_default()),
    ];
    leaf.prop_recursive(6, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::btree_map("[a-zA-Z_]{1,8}", inner, 0..6).prop_map(|m| {
                let fields: Vec<String> = m
                    .into_iter()
                    .map(|(k, v)| format!("{}:{v}", serde_json::to_string(&k).unwrap_or_default()))
                    .collect();
                format!("{{{}}}", fields.join(","))
            }),
        ]
    })
}

/// A field value: the JSON text, and the string it holds when it is one.
#[derive(Debug, Clone)]
pub enum Field {
    Absent,
    Null,
    Str(String),
    /// Any other JSON (number, object, …) as text.
    Raw(String),
}

impl Field {
    pub fn text(&self) -> Option<String> {
        match self {
            Field::Absent => None,
            Field::Null => Some("null".into()),
            Field::Str(s) => Some(serde_json::to_string(s).unwrap_or_default()),
            Field::Raw(r) => Some(r.clone()),
        }
    }
    pub fn str(&self) -> Option<&str> {
        match self {
            Field::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn present(&self) -> bool {
        !matches!(self, Field::Absent | Field::Null)
    }
}

/// Identifier-like strings that follow the rule, or break it in every way it can be broken.
pub fn identifier() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "[A-Za-z0-9_-]{1,64}",
        1 => Just(String::new()),
        1 => "[A-Za-z0-9_-]{65,80}",
        1 => "[A-Za-z0-9]{0,5}[ ./:@é\u{0}\u{7f}\n\t\"\\\\][A-Za-z0-9]{0,5}",
        1 => Just("_".to_owned()),
    ]
}

pub fn free_text(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "[a-zA-Z0-9 ._-]{1,40}",
        1 => Just(String::new()),
        1 => "[a-z]{0,4}[\u{0}-\u{1f}\u{7f}\u{80}-\u{9f}][a-z]{0,4}",
        1 => prop::collection::vec(any::<char>(), 0..20).prop_map(|c| c.into_iter().collect()),
        1 => Just("x".repeat(max)),
        1 => Just("x".repeat(max + 1)),
        1 => Just("é".repeat(max / 2 + 1)),
    ]
}

pub fn string_field(s: impl Strategy<Value = String>) -> impl Strategy<Value = Field> {
    prop_oneof![
        2 => Just(Field::Absent),
        1 => Just(Field::Null),
        6 => s.prop_map(Field::Str),
        1 => json_value().prop_filter("not a string", |v| !v.starts_with('"') && v != "null").prop_map(Field::Raw),
    ]
}

#[derive(Debug, Clone)]
pub struct TurnFields {
    pub message_id: Field,
    pub agent_id: Field,
    pub organization_id: Field,
    pub conversation_id: Field,
    pub channel_id: Field,
    pub user_id: Field,
    pub platform: Field,
    pub platform_metadata: Field,
    pub run_id: Field,
    pub payload: Field,
    pub extra: BTreeMap<String, String>,
}

pub fn turn_fields() -> impl Strategy<Value = TurnFields> {
    let run_id = prop_oneof![
        3 => Just(Field::Absent),
        1 => Just(Field::Null),
        2 => (1u64..=i64::MAX as u64).prop_map(|n| Field::Raw(n.to_string())),
        1 => prop_oneof![
            Just("0"), Just("-1"), Just("1.5"), Just("1e3"), Just("9223372036854775808"),
            Just("123456789012345678901234567890"), Just("\"7\""), Just("true"), Just("[1]"),
        ]
        .prop_map(|s| Field::Raw(s.to_owned())),
    ];
    let metadata = prop_oneof![
        2 => Just(Field::Absent),
        1 => Just(Field::Null),
        1 => json_value().prop_map(Field::Raw),
    ];
    (
        (
            string_field(free_text(255)),
            string_field(identifier()),
            string_field(identifier()),
            string_field(free_text(256)),
            string_field(free_text(256)),
            string_field(free_text(256)),
        ),
        (
            string_field(free_text(256)),
            metadata,
            run_id,
            prop_oneof![Just(Field::Absent), json_value().prop_map(Field::Raw)],
            prop::collection::btree_map("[a-z]{1,6}X", json_value(), 0..3),
        ),
    )
        .prop_map(|((m, a, o, c, ch, u), (p, pm, r, pay, extra))| TurnFields {
            message_id: m,
            agent_id: a,
            organization_id: o,
            conversation_id: c,
            channel_id: ch,
            user_id: u,
            platform: p,
            platform_metadata: pm,
            run_id: r,
            payload: pay,
            extra,
        })
}

impl TurnFields {
    pub fn json(&self, pretty: bool) -> String {
        let mut parts = Vec::new();
        for (k, f) in [
            ("messageId", &self.message_id),
            ("agentId", &self.agent_id),
            ("organizationId", &self.organization_id),
            ("conversationId", &self.conversation_id),
            ("channelId", &self.channel_id),
            ("userId", &self.user_id),
            ("platform", &self.platform),
            ("platformMetadata", &self.platform_metadata),
            ("runId", &self.run_id),
            ("payload", &self.payload),
        ] {
            if let Some(t) = f.text() {
                parts.push(format!("\"{k}\":{t}"));
            }
        }
        for (k, v) in &self.extra {
            parts.push(format!("\"{k}\":{v}"));
        }
        if pretty {
            format!("{{\n  {}\n}}", parts.join(",\n  "))
        } else {
            format!("{{{}}}", parts.join(","))
        }
    }

    /// CONTRACT §2 and §3, written independently of the parser.
    pub fn valid(&self) -> bool {
        let ident = |s: &str| {
            (1..=64).contains(&s.len())
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        let no_control = |s: &str| !s.chars().any(char::is_control);
        let optional_str = |f: &Field, ok: &dyn Fn(&str) -> bool| match f {
            Field::Absent | Field::Null => true,
            Field::Str(s) => ok(s),
            Field::Raw(_) => false,
        };
        let message_ok = matches!(&self.message_id, Field::Str(s) if (1..=255).contains(&s.len()) && no_control(s));
        let agent_ok = matches!(&self.agent_id, Field::Str(s) if ident(s));
        let org_ok = optional_str(&self.organization_id, &|s| ident(s) && s != "_");
        let conv_ok = optional_str(&self.conversation_id, &|s| s.len() <= 256 && no_control(s));
        let short_ok = |f: &Field| optional_str(f, &|s| s.len() <= 256);
        // userId and channelId can be the conversation key (the worker's environment).
        let key_ok = |f: &Field| optional_str(f, &|s| s.len() <= 256 && no_control(s));
        let meta_ok = match &self.platform_metadata {
            Field::Absent | Field::Null => true,
            Field::Raw(r) => r.starts_with('{'),
            Field::Str(_) => false,
        };
        let run_ok = match &self.run_id {
            Field::Absent | Field::Null => true,
            Field::Raw(r) => {
                r.bytes().all(|b| b.is_ascii_digit())
                    && r.parse::<u64>().is_ok_and(|n| n >= 1 && n <= i64::MAX as u64)
            }
            Field::Str(_) => false,
        };
        let key = [&self.conversation_id, &self.channel_id, &self.user_id]
            .into_iter()
            .any(|f| f.str().is_some_and(|s| !s.is_empty()));
        message_ok
            && agent_ok
            && org_ok
            && conv_ok
            && key_ok(&self.channel_id)
            && key_ok(&self.user_id)
            && short_ok(&self.platform)
            && meta_ok
            && run_ok
            && key
    }
}
