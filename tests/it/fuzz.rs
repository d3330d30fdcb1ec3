//! Property-based fuzzing (proptest; cargo-fuzz would need a nightly toolchain) of everything
//! that reads outside input: the turn parser and its validation, the deployment-name
//! derivation, the worker stdout codec, the config loader, and AMQP headers (the patched
//! amq-protocol-types decoder, and what intake does with decoded headers). Each must not panic, must be
//! deterministic, and must allocate at most a bounded multiple of its input (a body over
//! `intake.max_turn_bytes` is refused before it is parsed at all).
//!
//! Bounded for CI (a few seconds per property); `PROPTEST_CASES=100000 cargo test --test it fuzz`
//! runs longer locally. Failures are persisted in `tests/it/fuzz.proptest-regressions` and
//! replayed first on every run (commit that file).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;
use std::time::{Duration, Instant};

use lapin::types::generation::{gen_field_table, gen_value};
use lapin::types::parsing::{MAX_NESTING_DEPTH, parse_field_table};
use lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use turnd::config::Config as TurndConfig;
use turnd::turn::{self, AgentId, DeploymentName, OrganizationId};
use turnd::worker::protocol::{self, WorkerLine};
use turnd::{broker, intake};

use crate::support::turns::{json_value, turn_fields};

// ---- allocation accounting --------------------------------------------------------------------

/// Counts the heap bytes of the thread that measures, so a property can bound what one input
/// costs. Per thread: every integration test runs in this one binary, and process-wide
/// counters would count the other tests' allocations too.
struct Counting;

thread_local! {
    /// (measuring, live bytes since the measurement began, their peak). A const initialiser
    /// and no destructor: the allocator reads it without allocating.
    static HEAP: Cell<(bool, isize, isize)> = const { Cell::new((false, 0, 0)) };
}

/// Adds `delta` bytes to this thread's count while it measures.
fn account(delta: isize) {
    let _ = HEAP.try_with(|h| {
        let (on, now, peak) = h.get();
        if on {
            h.set((on, now + delta, peak.max(now + delta)));
        }
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            account(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        account(-(layout.size() as isize));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            account(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result with the peak heap bytes it added (on this thread).
fn measure<R>(f: impl FnOnce() -> R) -> (R, usize) {
    HEAP.with(|h| h.set((true, 0, 0)));
    let r = f();
    let (_, _, peak) = HEAP.with(|h| h.replace((false, 0, 0)));
    (r, peak.max(0) as usize)
}

/// What one input of `len` bytes may cost: linear, with a fixed allowance.
fn budget(len: usize) -> usize {
    256 * len + (1 << 20)
}

fn config(default_cases: u32) -> Config {
    let cases =
        std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(default_cases);
    Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..Config::default()
    }
}

const MAX: usize = 262_144;

// ---- the turn parser --------------------------------------------------------------------------

/// The parser's answer, comparable across two runs.
fn verdict(body: &[u8]) -> (Result<(String, String, String), String>, usize) {
    measure(|| match turn::parse(body, MAX) {
        Ok(t) => Ok((t.message_id.as_str().to_owned(), t.deployment.as_str().to_owned(), t.line)),
        Err(e) => {
            Err(format!("{} | {:?} {:?} {}", e.reason, e.message_id, e.deployment, e.too_large))
        }
    })
}

#[derive(Debug, Clone)]
enum Perturb {
    FlipByte(usize, u8),
    Insert(usize, u8),
    Delete(usize, usize),
    Truncate(usize),
    DuplicateField,
    Wrap,
}

fn perturb() -> impl Strategy<Value = Perturb> {
    prop_oneof![
        any::<(usize, u8)>().prop_map(|(i, b)| Perturb::FlipByte(i, b)),
        any::<(usize, u8)>().prop_map(|(i, b)| Perturb::Insert(i, b)),
        any::<(usize, usize)>().prop_map(|(i, n)| Perturb::Delete(i, n % 16)),
        any::<usize>().prop_map(Perturb::Truncate),
        Just(Perturb::DuplicateField),
        Just(Perturb::Wrap),
    ]
}

fn apply(text: &str, p: &Perturb) -> Vec<u8> {
    let mut b = text.as_bytes().to_vec();
    let at = |i: usize, len: usize| if len == 0 { 0 } else { i % len };
    match *p {
        Perturb::FlipByte(i, x) => {
            let i = at(i, b.len());
            if let Some(c) = b.get_mut(i) {
                *c ^= x | 1;
            }
        }
        Perturb::Insert(i, x) => {
            let i = at(i, b.len() + 1);
            b.insert(i, x);
        }
        Perturb::Delete(i, n) => {
            let i = at(i, b.len());
            let end = (i + n).min(b.len());
            b.drain(i..end);
        }
        Perturb::Truncate(i) => b.truncate(at(i, b.len())),
        Perturb::DuplicateField => {
            // Repeat the first field at the end: a duplicate key at the top level.
            if let Some(end) = b.windows(2).position(|w| w == b",\"")
                && end > 1
            {
                let first = b[1..end].to_vec();
                b.pop();
                b.push(b',');
                b.extend_from_slice(&first);
                b.push(b'}');
            }
        }
        Perturb::Wrap => {
            b.insert(0, b'[');
            b.push(b']');
        }
    }
    b
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn turn_parse_never_panics_on_arbitrary_bytes(body in prop::collection::vec(any::<u8>(), 0..4096)) {
        let (a, cost) = verdict(&body);
        let (b, _) = verdict(&body);
        prop_assert_eq!(&a, &b, "deterministic");
        prop_assert!(cost <= budget(body.len()), "{} bytes cost {} bytes of heap", body.len(), cost);
    }

    #[test]
    fn turn_validation_follows_the_contract(fields in turn_fields(), pretty in any::<bool>()) {
        let text = fields.json(pretty);
        let (a, cost) = verdict(text.as_bytes());
        let (b, _) = verdict(text.as_bytes());
        prop_assert_eq!(&a, &b, "deterministic");
        prop_assert!(cost <= budget(text.len()));
        prop_assert_eq!(a.is_ok(), fields.valid(), "parse says {:?} for {}", a, text);
        if let Ok((message_id, deployment, line)) = a {
            // The line is the turn on one line, as published, and parses to the same turn.
            prop_assert!(!line.contains('\n'));
            let again = turn::parse(line.as_bytes(), MAX).expect("the line re-parses");
            prop_assert_eq!(again.message_id.as_str(), message_id.as_str());
            prop_assert_eq!(again.deployment.as_str(), deployment.as_str());
            prop_assert!(DeploymentName::parse(&deployment).is_ok(), "{}", deployment);
            let v: serde_json::Value = serde_json::from_str(&line).expect("line is JSON");
            let orig: serde_json::Value = serde_json::from_str(&text).expect("text is JSON");
            prop_assert_eq!(v, orig, "nothing changed but whitespace");
        }
    }

    #[test]
    fn turn_parse_never_panics_on_perturbed_turns(fields in turn_fields(), ps in prop::collection::vec(perturb(), 1..4)) {
        let mut text = fields.json(false).into_bytes();
        for p in &ps {
            text = apply(&String::from_utf8_lossy(&text), p);
        }
        let (a, cost) = verdict(&text);
        let (b, _) = verdict(&text);
        prop_assert_eq!(&a, &b);
        prop_assert!(cost <= budget(text.len()));
        // A top-level duplicate key never passes.
        if ps.iter().any(|p| matches!(p, Perturb::DuplicateField)) && ps.len() == 1 && fields.message_id.present() {
            prop_assert!(a.is_err(), "duplicate key accepted: {}", String::from_utf8_lossy(&text));
        }
    }

    #[test]
    fn deployment_names_are_safe_stable_and_tenant_scoped(
        org in prop::option::of("[A-Za-z0-9_-]{1,64}".prop_filter("not _", |s| s != "_")),
        agent in "[A-Za-z0-9_-]{1,64}",
        key in ".{1,64}",
        org2 in prop::option::of("[A-Za-z0-9_-]{1,64}".prop_filter("not _", |s| s != "_")),
        key2 in ".{1,64}",
    ) {
        let o = org.as_deref().map(|o| OrganizationId::parse(o).expect("valid org"));
        let a = AgentId::parse(&agent).expect("valid agent");
        let name = turn::deployment_name(o.as_ref(), &a, &key);
        prop_assert_eq!(&name, &turn::deployment_name(o.as_ref(), &a, &key), "deterministic");
        prop_assert_eq!(name.lock_key(), turn::deployment_name(o.as_ref(), &a, &key).lock_key());
        let s = name.as_str();
        prop_assert!(s.len() <= 81 && s.starts_with(&format!("{agent}-")), "{}", s);
        prop_assert!(s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'), "{}", s);
        prop_assert!(DeploymentName::parse(s).is_ok(), "{}", s);
        // Another organization or conversation never shares the name (nor the lock).
        let o2 = org2.as_deref().map(|o| OrganizationId::parse(o).expect("valid org"));
        if (org2.clone(), key2.clone()) != (org.clone(), key.clone()) {
            let other = turn::deployment_name(o2.as_ref(), &a, &key2);
            prop_assert_ne!(&other, &name);
            prop_assert_ne!(other.lock_key(), name.lock_key());
        }
        // The NUL separators keep fields apart: "ab"+"c" differs from "a"+"bc".
        if let Some(org) = &org && org.len() > 1 && &org[..org.len() - 1] != "_" {
            let (head, tail) = org.split_at(org.len() - 1);
            let shifted = turn::deployment_name(Some(&OrganizationId::parse(head).expect("valid")), &a, &format!("{tail}{key}"));
            prop_assert_ne!(shifted, name);
        }
    }

    #[test]
    fn worker_lines_never_panic_and_cost_a_bounded_multiple(line in prop::collection::vec(any::<u8>(), 0..4096)) {
        let (a, cost) = measure(|| protocol::parse_line(&line));
        let b = protocol::parse_line(&line);
        prop_assert_eq!(&a, &b);
        prop_assert!(cost <= budget(line.len()));
    }

    #[test]
    fn structured_worker_lines_parse_as_what_they_say(
        kind in prop_oneof![Just("reply"), Just("error"), Just("heartbeat"), Just("provider_failed"), Just("provider_recovered"), Just("turn"), Just("")],
        message_id in prop::option::of(".{0,40}"),
        payload in prop::option::of(json_value()),
        code in prop::option::of("[A-Z0-9_]{0,70}|[a-z ]{1,5}"),
        text in prop::option::of(".{0,64}"),
        ps in prop::collection::vec(perturb(), 0..3),
    ) {
        let mut fields = vec![format!("\"type\":{}", serde_json::to_string(kind).unwrap_or_default())];
        if let Some(m) = &message_id { fields.push(format!("\"messageId\":{}", serde_json::to_string(m).unwrap_or_default())); }
        if let Some(p) = &payload { fields.push(format!("\"payload\":{p}")); }
        if let Some(c) = &code { fields.push(format!("\"code\":{}", serde_json::to_string(c).unwrap_or_default())); }
        if let Some(t) = &text { fields.push(format!("\"error\":{0},\"reason\":{0}", serde_json::to_string(t).unwrap_or_default())); }
        let line = format!("{{{}}}", fields.join(","));
        let mut bytes = line.clone().into_bytes();
        for p in &ps {
            bytes = apply(&String::from_utf8_lossy(&bytes), p);
        }
        let (parsed, cost) = measure(|| protocol::parse_line(&bytes));
        prop_assert_eq!(&parsed, &protocol::parse_line(&bytes));
        prop_assert!(cost <= budget(bytes.len()));
        if !ps.is_empty() {
            return Ok(());
        }
        let mid_ok = message_id.as_deref().is_some_and(|m| !m.is_empty());
        let code_ok = code.as_deref().filter(|c| !c.is_empty() && c.len() <= 64 && c.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'));
        match (kind, parsed) {
            ("reply", Ok(WorkerLine::Reply { message_id: m, payload: p })) => {
                prop_assert!(mid_ok);
                prop_assert_eq!(Some(m), message_id);
                let want: serde_json::Value = serde_json::from_str(payload.as_deref().unwrap_or("null")).expect("json");
                let got: serde_json::Value = serde_json::from_str(p.get()).expect("json");
                prop_assert_eq!(got, want);
            }
            ("reply", Err(e)) => {
                let deep = payload.as_deref().is_some_and(|p| p.matches(['[', '{']).count() > 100);
                prop_assert!(!mid_ok || deep, "{:?}", e);
            }
            ("error", Ok(WorkerLine::Error { message_id: m, error, code: c })) => {
                prop_assert_eq!(Some(m), message_id);
                prop_assert_eq!(error, text.unwrap_or_default());
                prop_assert_eq!(c.as_deref(), code_ok);
            }
            ("error", Err(_)) => prop_assert!(!mid_ok),
            ("heartbeat", r) => prop_assert_eq!(r, Ok(WorkerLine::Heartbeat)),
            ("provider_recovered", r) => prop_assert_eq!(r, Ok(WorkerLine::ProviderRecovered)),
            ("provider_failed", Ok(WorkerLine::ProviderFailed { code: c, reason })) => {
                prop_assert_eq!(c, code_ok.unwrap_or(protocol::DEFAULT_PROVIDER_CODE).to_owned());
                prop_assert_eq!(reason, text);
            }
            ("turn" | "", r) => prop_assert!(r.is_err()),
            (k, r) => prop_assert!(false, "{} parsed as {:?}", k, r),
        }
    }
}

// ---- the config loader ------------------------------------------------------------------------

/// Every override variable a daemon reads (CONTRACT §9), plus a few that are not.
const VARS: &[&str] = &[
    "TURND_DAEMON__ID",
    "TURND_DAEMON__STATE_DIR",
    "TURND_DATABASE__URL",
    "TURND_DATABASE__MAX_CONNECTIONS",
    "TURND_DATABASE__AUTO_MIGRATE",
    "TURND_AMQP__URL",
    "TURND_AMQP__PREFIX",
    "TURND_AMQP__PREFETCH",
    "TURND_SESSION__STORE",
    "TURND_INTAKE__MAX_TURN_BYTES",
    "TURND_INTAKE__MAX_ATTEMPTS",
    "TURND_INTAKE__RETRY_DELAY",
    "TURND_INTAKE__RETRY_MAX_DELAY",
    "TURND_WORKER__COMMAND",
    "TURND_WORKER__ENV",
    "TURND_WORKER__MAX_WORKERS",
    "TURND_WORKER__IDLE_TIMEOUT",
    "TURND_WORKER__STOP_TIMEOUT",
    "TURND_WORKER__MAX_LINE_BYTES",
    "TURND_WORKER__SANDBOX",
    "TURND_WORKER__LIMITS",
    "TURND_TURN__DEADLINE",
    "TURND_TURN__QUEUE_TIMEOUT",
    "TURND_REPLY__RETENTION",
    "TURND_SWEEP__INTERVAL",
    "TURND_SWEEP__ADOPTION_DELAY",
    "TURND_SHUTDOWN__GRACE",
    "TURND_HTTP__LISTEN",
    "TURND_HTTP__ADMIN_TOKEN",
    "TURND_HTTP__SHOW_PAYLOADS",
    "TURND_LOG__FORMAT",
    "TURND_LOG__LEVEL",
    "TURND_NOPE__KEY",
    "TURND_WORKER__NOPE",
    "TURND_WORKER_ENV_FOO",
    "TURND_DATABASE_URL",
];

fn env_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[0-9]{1,30}",
        "-[0-9]{1,5}",
        "[0-9]{1,4}(ms|s|m|h|d|days|y)",
        Just("18446744073709551616".to_owned()),
        Just("99999999999999999999999y".to_owned()),
        Just("true".to_owned()),
        Just("[\"/bin/true\", \"x\"]".to_owned()),
        Just("[]".to_owned()),
        Just("{A = \"1\"}".to_owned()),
        Just("{memory_max = \"1G\", cpu_quota = \"50%\"}".to_owned()),
        Just("postgres://u:p@h:1/d".to_owned()),
        Just("amqp://g:g@h:5672/%2f".to_owned()),
        Just("127.0.0.1:0".to_owned()),
        Just("[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[".to_owned()),
        "\\PC{0,40}",
        ".{0,40}",
    ]
}

fn load(vars: &[(usize, String)]) -> Result<String, String> {
    let env: Vec<(String, String)> =
        vars.iter().map(|(i, v)| (VARS[i % VARS.len()].to_owned(), v.clone())).collect();
    match TurndConfig::load_from(Some(Path::new("/dev/null")), env) {
        Ok(c) => {
            assert!(c.validate().is_ok(), "a loaded config validates");
            Ok(c.redacted_toml())
        }
        Err(e) => Err(e.to_string()),
    }
}

const EXAMPLE: &str = include_str!("../../config/turnd.toml");

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn config_env_overrides_never_panic_and_name_the_key(vars in prop::collection::vec((any::<usize>(), env_value()), 0..6)) {
        let (a, cost) = measure(|| load(&vars));
        prop_assert_eq!(&a, &load(&vars), "deterministic");
        let input: usize = vars.iter().map(|(_, v)| v.len()).sum();
        prop_assert!(cost <= budget(input + EXAMPLE.len()));
        if let Err(msg) = &a {
            // A bad override names its key.
            prop_assert!(msg.contains('.') || msg.contains("TURND_"), "{}", msg);
        }
    }

    #[test]
    fn config_files_never_panic(text in prop_oneof![".{0,400}", "[a-z_=\\[\\]\"{}., 0-9\n]{0,400}"]) {
        let (a, cost) = measure(|| TurndConfig::from_toml_str(&text).map(|c| c.redacted_toml()).map_err(|e| e.to_string()));
        prop_assert_eq!(&a, &TurndConfig::from_toml_str(&text).map(|c| c.redacted_toml()).map_err(|e| e.to_string()));
        prop_assert!(cost <= budget(text.len()));
    }

    #[test]
    fn perturbed_example_configs_never_panic(ps in prop::collection::vec(perturb(), 1..5)) {
        let mut text = EXAMPLE.as_bytes().to_vec();
        for p in &ps {
            text = apply(&String::from_utf8_lossy(&text), p);
        }
        let text = String::from_utf8_lossy(&text).into_owned();
        let (a, cost) = measure(|| TurndConfig::from_toml_str(&text).map(|c| c.redacted_toml()).map_err(|e| e.to_string()));
        prop_assert_eq!(&a, &TurndConfig::from_toml_str(&text).map(|c| c.redacted_toml()).map_err(|e| e.to_string()));
        prop_assert!(cost <= budget(text.len()));
    }
}

// ---- AMQP headers: the patched decoder and turnd's walks over what it decodes ------------------

/// Encodes a field table as it travels in a content header (its length prefix included).
fn encode_table(t: &FieldTable) -> Vec<u8> {
    let mut buf = vec![0u8; 1 << 20];
    let (_, n) = cookie_factory::r#gen(gen_field_table(t), &mut buf[..]).expect("encode");
    buf.truncate(n as usize);
    buf
}

/// Decodes on a thread with a 1 MiB stack, half a default thread's: decoding whose stack
/// grew with the input's nesting would overflow it long before the depths generated here.
fn decode_on_small_stack(bytes: Vec<u8>) -> (Option<FieldTable>, usize) {
    std::thread::Builder::new()
        .stack_size(1 << 20)
        .spawn(move || {
            let (r, cost) = measure(|| parse_field_table(&bytes[..]).ok().map(|(_, t)| t));
            (r, cost)
        })
        .expect("spawn")
        .join()
        .expect("decoding never panics nor overflows")
}

/// How many tables/arrays deep a decoded value goes (walked without recursion).
fn decoded_depth(table: &FieldTable) -> usize {
    let mut deepest = 1;
    let mut pending: Vec<(&AMQPValue, usize)> = table.inner().values().map(|v| (v, 2)).collect();
    while let Some((v, depth)) = pending.pop() {
        match v {
            AMQPValue::FieldArray(a) => {
                deepest = deepest.max(depth);
                pending.extend(a.as_slice().iter().map(|v| (v, depth + 1)));
            }
            AMQPValue::FieldTable(t) => {
                deepest = deepest.max(depth);
                pending.extend(t.inner().values().map(|v| (v, depth + 1)));
            }
            _ => {}
        }
    }
    deepest
}

/// Every value type a field table carries on the wire (a short string has no wire tag).
fn amqp_leaf() -> impl Strategy<Value = AMQPValue> {
    prop_oneof![
        any::<bool>().prop_map(AMQPValue::Boolean),
        any::<i8>().prop_map(AMQPValue::ShortShortInt),
        any::<u8>().prop_map(AMQPValue::ShortShortUInt),
        any::<i16>().prop_map(AMQPValue::ShortInt),
        any::<u16>().prop_map(AMQPValue::ShortUInt),
        any::<i32>().prop_map(AMQPValue::LongInt),
        any::<u32>().prop_map(AMQPValue::LongUInt),
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        any::<f32>().prop_map(AMQPValue::Float),
        any::<f64>().prop_map(AMQPValue::Double),
        (any::<u8>(), any::<u32>())
            .prop_map(|(scale, value)| AMQPValue::DecimalValue(DecimalValue { scale, value })),
        prop::collection::vec(any::<u8>(), 0..40)
            .prop_map(|b| AMQPValue::LongString(LongString::from(b))),
        prop::collection::vec(any::<u8>(), 0..40)
            .prop_map(|b| AMQPValue::ByteArray(ByteArray::from(b))),
        any::<u64>().prop_map(AMQPValue::Timestamp),
        Just(AMQPValue::Void),
    ]
}

fn amqp_value() -> impl Strategy<Value = AMQPValue> {
    amqp_leaf().prop_recursive(12, 400, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8)
                .prop_map(|v| AMQPValue::FieldArray(FieldArray::from(v))),
            prop::collection::btree_map("[a-zA-Z0-9_-]{0,12}", inner, 0..8).prop_map(|m| {
                let mut t = FieldTable::default();
                for (k, v) in m {
                    t.insert(k.into(), v);
                }
                AMQPValue::FieldTable(t)
            }),
        ]
    })
}

fn amqp_table() -> impl Strategy<Value = FieldTable> {
    prop::collection::btree_map("[a-z-]{1,16}", amqp_value(), 0..12).prop_map(|m| {
        let mut t = FieldTable::default();
        for (k, v) in m {
            t.insert(k.into(), v);
        }
        t
    })
}

/// A value nested `shape.len()` levels deep, each level an array (true) or a table (false),
/// encoded by hand around `leaf` (an encoder would recurse as deep).
fn nested_encoding(shape: &[bool], leaf: &[u8]) -> Vec<u8> {
    let level = |array: bool| if array { 5 } else { 7 };
    let mut sizes = vec![0usize; shape.len() + 1];
    sizes[shape.len()] = leaf.len();
    for i in (0..shape.len()).rev() {
        sizes[i] = sizes[i + 1] + level(shape[i]);
    }
    let mut out = Vec::with_capacity(sizes[0]);
    for (i, array) in shape.iter().enumerate() {
        out.push(if *array { b'A' } else { b'F' });
        out.extend(((sizes[i] - 5) as u32).to_be_bytes());
        if !array {
            out.extend([1, b'k']);
        }
    }
    out.extend(leaf);
    out
}

/// A headers table holding one entry, "h", whose value is `value` (encoded, tag first).
fn table_of(value: &[u8]) -> Vec<u8> {
    let mut t = ((value.len() + 2) as u32).to_be_bytes().to_vec();
    t.extend([1, b'h']);
    t.extend(value);
    t
}

/// What turnd does with the headers of a delivery it parks or moves: none of it may panic,
/// recurse past the decoder's bound, or write more than its budget.
fn walk_like_intake(headers: &FieldTable) -> Result<(), TestCaseError> {
    let json = intake::headers_json(headers);
    prop_assert!(json.len() <= 70 * 1024, "headers_json wrote {} bytes", json.len());
    prop_assert!(serde_json::from_str::<serde_json::Value>(&json).is_ok(), "valid JSON");
    let properties = lapin::BasicProperties::default().with_headers(headers.clone());
    let _ = intake::refusals(&properties);
    let _ = intake::delivery_limited(&properties, "p.inbox");
    prop_assert!(broker::encoded_len(headers) > 0);
    Ok(())
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn header_tables_round_trip_through_the_patched_decoder(table in amqp_table()) {
        let bytes = encode_table(&table);
        prop_assert_eq!(broker::encoded_len(&table), bytes.len(), "turnd's size estimate is exact");
        let len = bytes.len();
        let (decoded, cost) = decode_on_small_stack(bytes.clone());
        let decoded = decoded.expect("a table the encoder wrote decodes");
        // Compared as bytes: NaN floats are not equal to themselves.
        prop_assert_eq!(encode_table(&decoded), bytes);
        prop_assert!(cost <= budget(len), "{} bytes cost {}", len, cost);
        walk_like_intake(&decoded)?;
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_header_decoder(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let len = bytes.len();
        let (decoded, cost) = decode_on_small_stack(bytes);
        prop_assert!(cost <= budget(len));
        if let Some(t) = decoded {
            prop_assert!(decoded_depth(&t) <= MAX_NESTING_DEPTH);
            walk_like_intake(&t)?;
        }
    }

    #[test]
    fn nesting_of_any_shape_and_depth_decodes_to_a_bounded_depth(
        shape in prop::collection::vec(any::<bool>(), 0..4000),
        leaf in amqp_leaf(),
    ) {
        let mut encoded_leaf = vec![0u8; 256];
        let (_, n) = cookie_factory::r#gen(gen_value(&leaf), &mut encoded_leaf[..]).expect("leaf");
        encoded_leaf.truncate(n as usize);
        let bytes = table_of(&nested_encoding(&shape, &encoded_leaf));
        let len = bytes.len();
        let (decoded, cost) = decode_on_small_stack(bytes);
        let decoded = decoded.expect("decodes");
        let depth = decoded_depth(&decoded);
        prop_assert_eq!(depth, (shape.len() + 1).min(MAX_NESTING_DEPTH));
        prop_assert!(cost <= budget(len), "{} bytes cost {}", len, cost);
        walk_like_intake(&decoded)?;
        // Dropping is recursive too: on the small stack as well.
        std::thread::Builder::new().stack_size(1 << 20).spawn(move || drop(decoded))
            .expect("spawn").join().expect("drop");
    }
}

#[test]
fn a_frame_full_of_the_cheapest_values_costs_a_bounded_multiple() {
    // A content header is one frame: its headers table is at most frame_max (RabbitMQ's
    // default, 131,072 bytes). The shapes that make the most values out of the fewest bytes.
    const FRAME: usize = 131_072 - 64;
    let array_of = |item: &[u8]| {
        let n = (FRAME - 10) / item.len();
        let mut v = vec![b'A'];
        v.extend(((n * item.len()) as u32).to_be_bytes());
        for _ in 0..n {
            v.extend(item);
        }
        table_of(&v)
    };
    // Keys are short strings, so UTF-8: three printable ASCII bytes each, all distinct.
    let mut distinct_keys = Vec::new();
    for i in 0..(FRAME / 5) as u32 {
        let digit = |d: u32| b' ' + (d % 95) as u8;
        distinct_keys.extend([3, digit(i / 9025), digit(i / 95), digit(i), b'V']);
    }
    let mut keys = (distinct_keys.len() as u32).to_be_bytes().to_vec();
    keys.extend(distinct_keys);
    let shapes = [
        ("voids in an array", array_of(b"V")),
        ("booleans in an array", array_of(b"t\x01")),
        ("empty arrays in an array", array_of(b"A\x00\x00\x00\x00")),
        ("empty tables in an array", array_of(b"F\x00\x00\x00\x00")),
        ("voids under distinct 3-byte keys", keys),
        ("nested tables", table_of(&nested_encoding(&vec![false; FRAME / 7], b"V"))),
        ("nested arrays", table_of(&nested_encoding(&vec![true; FRAME / 5], b"V"))),
    ];
    eprintln!("size of AMQPValue: {} bytes", std::mem::size_of::<AMQPValue>());
    for (name, bytes) in shapes {
        let len = bytes.len();
        let (decoded, cost) = decode_on_small_stack(bytes);
        let decoded = decoded.expect("decodes");
        let (json, json_cost) = measure(|| intake::headers_json(&decoded));
        eprintln!(
            "{name}: {len} bytes decode into {cost} bytes of heap ({}x); headers_json {} bytes ({json_cost} of heap)",
            cost / len,
            json.len()
        );
        // Bounded by the frame, with a constant factor.
        assert!(cost <= 64 * len, "{name}: {len} bytes cost {cost}");
        // headers_json's budget bounds its entries (at most 8,192), whatever the frame holds.
        assert!(
            json.len() <= 70 * 1024 && json_cost <= 4 << 20,
            "{name}: {} {json_cost}",
            json.len()
        );
        std::thread::Builder::new()
            .stack_size(1 << 20)
            .spawn(move || drop(decoded))
            .expect("spawn")
            .join()
            .expect("drop");
    }
}

// ---- fixed cases: what the generators rarely hit ----------------------------------------------

#[test]
fn a_body_over_the_limit_is_refused_without_being_parsed() {
    for body in [
        vec![b'['; 10 << 20],
        vec![0xff; MAX + 1],
        format!("{{\"messageId\":\"{}\"}}", "m".repeat(MAX)).into_bytes(),
    ] {
        let start = Instant::now();
        let (r, cost) = measure(|| turn::parse(&body, MAX).map_err(Box::new));
        let e = r.expect_err("too large");
        assert!(e.too_large && e.message_id.is_none() && e.deployment.is_none(), "{e:?}");
        assert!(e.reason.contains("max_turn_bytes"), "{}", e.reason);
        assert!(cost < 4096, "refusing {} bytes cost {cost} bytes", body.len());
        assert!(start.elapsed() < Duration::from_millis(50));
    }
}

#[test]
fn pathological_turns_are_refused_or_accepted_within_budget() {
    let deep = |open: &str, close: &str, n: usize| {
        format!(
            "{{\"messageId\":\"m\",\"agentId\":\"a\",\"conversationId\":\"c\",\"payload\":{}1{}}}",
            open.repeat(n),
            close.repeat(n)
        )
    };
    let cases: Vec<(String, bool)> = vec![
        // 100k '[': too deep for the JSON reader (its recursion limit), refused, no overflow.
        ("[".repeat(100_000), false),
        (deep("[", "]", 100_000), false),
        (deep("{\"a\":", "}", 20_000), false),
        (deep("[", "]", 100), true),
        // Numbers kept as written, however large.
        ("{\"messageId\":\"m\",\"agentId\":\"a\",\"conversationId\":\"c\",\"payload\":{\"n\":123456789012345678901234567890,\"f\":1e400}}".into(), true),
        // Many keys, long strings, escapes.
        (format!("{{\"messageId\":\"m\",\"agentId\":\"a\",\"userId\":\"u\",\"payload\":{{{}\"z\":0}}}}", (0..5000).map(|i| format!("\"k{i}\":[{i}],")).collect::<String>()), true),
        (format!("{{\"messageId\":\"m\",\"agentId\":\"a\",\"userId\":\"u\",\"payload\":\"{}\"}}", "\\u0000\\ud83d\\ude00".repeat(10_000)), true),
    ];
    for (text, ok) in cases {
        let (r, cost) = measure(|| turn::parse(text.as_bytes(), 1 << 20).map_err(Box::new));
        assert_eq!(r.is_ok(), ok, "{:.80}: {:?}", text, r.as_ref().err().map(|e| &e.reason));
        assert!(cost <= budget(text.len()), "{} bytes cost {cost}", text.len());
        if let Ok(t) = r {
            assert!(
                t.line.contains("123456789012345678901234567890")
                    || !text.contains("1234567890123"),
                "{}",
                t.line
            );
            assert!(t.line.contains("1e400") || !text.contains("1e400"));
        }
    }
}

#[test]
fn a_worker_line_at_the_size_limit_costs_a_bounded_multiple() {
    let big = format!(
        "{{\"type\":\"reply\",\"messageId\":\"m\",\"payload\":\"{}\"}}",
        "x".repeat(1 << 20)
    );
    let nested = format!(
        "{{\"type\":\"reply\",\"messageId\":\"m\",\"payload\":{}1{}}}",
        "[".repeat(1 << 19),
        "]".repeat(1 << 19)
    );
    let noise: Vec<u8> =
        (0..(1u32 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    for line in [big.as_bytes(), nested.as_bytes(), &noise] {
        let (_, cost) = measure(|| protocol::parse_line(line));
        assert!(cost <= 4 * line.len() + (1 << 20), "{} bytes cost {cost}", line.len());
    }
}

#[test]
fn deep_or_huge_configs_are_refused_with_a_bounded_message() {
    for n in [1000usize, 100_000, 500_000] {
        for text in [
            format!("a = {}", "[".repeat(n)),
            format!("a = {}1{}", "[".repeat(n), "]".repeat(n)),
            format!("a = {}1{}", "{b=".repeat(n), "}".repeat(n)),
        ] {
            let (r, cost) = measure(|| {
                TurndConfig::from_toml_str(&text).map(|_| ()).map_err(|e| e.to_string())
            });
            let e = r.expect_err("refused");
            assert!(
                e.len() < 4096,
                "{} bytes of message for {} bytes of input",
                e.len(),
                text.len()
            );
            assert!(cost <= budget(text.len()));
            let env = vec![("TURND_WORKER__COMMAND".to_owned(), text.clone())];
            let e = TurndConfig::load_from(Some(Path::new("/dev/null")), env)
                .expect_err("refused")
                .to_string();
            assert!(e.contains("worker.command") && e.len() < 4096, "{e:.200}");
        }
    }
    // A file over the limit is refused before it is read whole.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("big.toml");
    std::fs::write(&path, format!("# {}\n", "x".repeat(3 << 20))).expect("write");
    let (r, cost) = measure(|| {
        TurndConfig::load_from(Some(&path), Vec::new()).map(|_| ()).map_err(|e| e.to_string())
    });
    let e = r.expect_err("refused");
    assert!(e.contains("larger than"), "{e}");
    assert!(cost < (1 << 20) * 3, "{cost}");
}
