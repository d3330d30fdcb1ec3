//! docs/schemas/ (JSON Schema 2020-12) as validators. Every file is registered under its `$id`,
//! so the `$ref`s between them resolve offline, as an integrator's validator would.

use std::path::{Path, PathBuf};

use jsonschema::{Registry, Validator};
use serde_json::Value;

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
