//! docs/schemas/ (JSON Schema 2020-12) as validators. Every file is registered under its `$id`,
//! so the `$ref`s between them resolve offline, as an integrator's validator would.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use jsonschema::{Registry, Validator};
use serde_json::{Value, json};
use turnd::worker::protocol::parse_line;

pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs").join("schemas")
}

/// Every schema file: (file name, document).
pub fn documents() -> Vec<(String, Value)> {
    let mut docs: Vec<(String, Value)> = std::fs::read_dir(dir())
        .expect("read docs/schemas")
        .map(|entry| entry.expect("docs/schemas entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("read schema");
            let doc = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not JSON: {e}", p.display()));
            (p.file_name().unwrap_or_default().to_string_lossy().into_owned(), doc)
        })
        .collect();
    docs.sort_by(|a, b| a.0.cmp(&b.0));
    docs
}

/// A validator for `docs/schemas/<file>` (formats checked too).
pub fn validator(file: &str) -> Validator {
    let docs = documents();
    let registry = Registry::new()
        .extend(docs.iter().map(|(name, doc)| {
            let id = doc["$id"].as_str().unwrap_or_else(|| panic!("{name} has no $id"));
            (id.to_owned(), doc.clone())
        }))
        .expect("schema $ids are URIs")
        .prepare()
        .expect("the schemas' $refs resolve");
    let (_, root) = docs
        .iter()
        .find(|(name, _)| name == file)
        .unwrap_or_else(|| panic!("no docs/schemas/{file}"));
    jsonschema::options()
        .offline()
        .with_registry(&registry)
        .should_validate_formats(true)
        .build(root)
        .unwrap_or_else(|e| panic!("docs/schemas/{file} does not compile: {e}"))
}

/// Why `instance` does not validate, one line per error; empty when it does.
pub fn errors(validator: &Validator, instance: &Value) -> Vec<String> {
    validator.iter_errors(instance).map(|e| format!("{}: {e}", e.instance_path())).collect()
}

pub fn assert_valid(validator: &Validator, instance: &Value, what: &str) {
    let errors = errors(validator, instance);
    assert!(errors.is_empty(), "{what} does not validate: {errors:#?}\n{instance}");
}

/// Runs a worker (argv) on `lines` (its stdin, then EOF) and returns its stdout lines.
pub fn run_worker(argv: &[String], lines: &[Value]) -> Vec<String> {
    let program = argv.join(" ");
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .env_clear()
        .env("TURND_DEPLOYMENT", "a-0123456789abcdef")
        .env("TURND_EPOCH", "7")
        .env("TURND_PROTOCOL", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    let mut stdin = child.stdin.take().expect("stdin");
    for line in lines {
        writeln!(stdin, "{line}").expect("write a turn");
    }
    drop(stdin); // EOF: the worker exits
    let out = child.wait_with_output().expect("worker output");
    assert!(out.status.success(), "{program} exited {}", out.status);
    String::from_utf8(out.stdout).expect("UTF-8").lines().map(str::to_owned).collect()
}

pub fn turn_input(message_id: &str, payload: Value) -> Value {
    let line = json!({"type": "turn", "epoch": 7, "turn": {
        "messageId": message_id, "agentId": "a", "conversationId": "c", "payload": payload,
    }});
    assert_valid(&validator("worker-stdin.schema.json"), &line, "the test's stdin line");
    line
}

/// Each stdout line validates and turnd parses it as the line type it claims.
pub fn assert_worker_lines(program: &str, out: &[String], expect: usize) {
    assert!(out.len() >= expect, "{program} wrote {out:?}");
    let stdout = validator("worker-stdout.schema.json");
    for line in out {
        let value: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{program} wrote a line that is not JSON ({e}): {line}"));
        assert_valid(&stdout, &value, &format!("{program}'s line"));
        let parsed = parse_line(line.as_bytes())
            .unwrap_or_else(|e| panic!("turnd refuses {program}'s line {line}: {e}"));
        let kind = format!("{parsed:?}").to_lowercase();
        let claimed = value["type"].as_str().unwrap_or_default().replace('_', "");
        assert!(kind.starts_with(&claimed), "{line} parsed as {parsed:?}");
    }
}
