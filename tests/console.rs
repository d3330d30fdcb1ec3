//! The operator console and its JSON API (issue 9): views of a live cluster, parked turns with
//! their payload hidden, token-gated actions; the Grafana dashboard and alert rules name only
//! metrics a daemon exports, and promtool accepts the rules.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);
const TOKEN: &str = "console-test-token-7f3a";

async fn get_json(port: u16, path: &str) -> Value {
    let (status, body) = http_get(port, path).await.unwrap_or_else(|| panic!("GET {path} answers"));
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {body}"))
}

async fn get_page(port: u16, path: &str) -> (u16, String) {
    http_get(port, path).await.unwrap_or_else(|| panic!("GET {path} answers"))
}

/// Polls the parked list until it has `n` records; returns them (newest first).
async fn wait_parked(port: u16, n: usize) -> Vec<Value> {
    let mut last = Value::Null;
    for _ in 0..300 {
        last = get_json(port, "/api/v1/parked").await;
        if last["parked"].as_array().is_some_and(|a| a.len() >= n) {
            return last["parked"].as_array().unwrap().clone();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {n} parked records: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_and_console_show_the_cluster_and_actions_need_the_token() {
    let mut cluster = Cluster::new().await;
    let port = free_port();
    cluster.set("TURND_HTTP__LISTEN", &format!("127.0.0.1:{port}"));
    cluster.set("TURND_HTTP__ADMIN_TOKEN", TOKEN);
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;

    let live = turn("console-agent", "Conv-Live", json!({"text": "hello"}));
    client.publish(&live).await;
    client.wait_for(&[mid(&live)], T).await;
    let deployment = deployment_of(&live);
    let bad = json!({"messageId": "bad-1", "agentId": "../x", "organizationId": "org1",
                     "conversationId": "c", "payload": {"secret": "payload-secret-456"}});
    client.publish(&bad).await;
    let parked = wait_parked(port, 1).await;

    // Cluster: this daemon, live and (after its first heartbeat) ready.
    wait_for_async(T, "the daemon to report ready", || async {
        let c = get_json(port, "/api/v1/cluster").await;
        c["daemons"]
            .as_array()
            .is_some_and(|d| d.len() == 1 && d[0]["ready"] == true && d[0]["live"] == true)
    })
    .await;
    let c = get_json(port, "/api/v1/cluster").await;
    assert_eq!(c["daemons"][0]["id"], "d0", "{c}");
    assert_eq!(c["actions_enabled"], true);
    assert_eq!(c["show_payloads"], false);
    assert!(c["daemons"][0]["version"].is_string());

    // Deployments: the live one, owned, with its worker; `q` searches case-insensitively.
    let d = get_json(port, "/api/v1/deployments").await;
    let row = d["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["deployment"] == deployment.as_str())
        .cloned();
    let row = row.unwrap_or_else(|| panic!("{deployment} listed: {d}"));
    assert_eq!(row["owner"], "d0");
    assert_eq!(row["agent_id"], "console-agent");
    assert_eq!(row["organization_id"], "org1");
    assert_eq!(row["conversation_key"], "Conv-Live");
    assert!(row["worker_pid"].as_i64().is_some(), "{row}");
    assert!(row["epoch"].as_i64().unwrap() > 0);
    for q in ["conv-live", "CONSOLE-AG", "org1", &deployment[..10]] {
        let found = get_json(port, &format!("/api/v1/deployments?q={q}")).await;
        assert_eq!(found["deployments"].as_array().unwrap().len(), 1, "q={q}: {found}");
    }
    let none = get_json(port, "/api/v1/deployments?q=no-such-thing").await;
    assert_eq!(none["deployments"].as_array().unwrap().len(), 0);
    let (status, _) = get_page(port, "/api/v1/deployments?limit=0").await;
    assert_eq!(status, 400);

    // Turns: nothing pending, the reply counted in the current 5-minute bucket.
    let t = get_json(port, "/api/v1/turns").await;
    assert_eq!(t["pending"][0]["state"], "queued");
    assert_eq!(t["pending"][1]["state"], "running");
    assert_eq!(t["terminal_events"]["bucket_seconds"], 300);
    let replies: i64 = t["terminal_events"]["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["kind"] == "reply")
        .map(|b| b["count"].as_i64().unwrap())
        .sum();
    assert!(replies >= 1, "{t}");

    // Parked: listed with its code and reason, filterable by code; the detail hides the payload.
    let p = &parked[0];
    assert_eq!(p["code"], "INVALID_TURN", "{p}");
    assert!(p["reason"].as_str().unwrap().contains("agentId"), "{p}");
    let id = p["id"].as_i64().unwrap();
    let l = get_json(port, "/api/v1/parked?code=INVALID_TURN").await;
    assert_eq!(l["parked"].as_array().unwrap().len(), 1);
    assert_eq!(l["by_code"][0]["code"], "INVALID_TURN");
    let l = get_json(port, "/api/v1/parked?code=MISSING_CONTEXT").await;
    assert_eq!(l["parked"].as_array().unwrap().len(), 0);
    let (status, raw) = get_page(port, &format!("/api/v1/parked/{id}")).await;
    assert_eq!(status, 200, "{raw}");
    assert!(!raw.contains("payload-secret-456"), "payload leaked: {raw}");
    let detail: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(detail["body"]["messageId"], "bad-1");
    assert_eq!(detail["body"]["agentId"], "../x");
    assert!(detail["body"]["payload"].as_str().unwrap().contains("show_payloads"), "{detail}");
    assert_eq!(detail["payload_hidden"], true);
    assert_eq!(detail["headers"]["x-turnd-code"], "INVALID_TURN", "{detail}");
    let (status, _) = get_page(port, "/api/v1/parked/999999").await;
    assert_eq!(status, 404);

    // Actions: 403 without the token and with a wrong one; replayed once with it.
    let replay = format!("/api/v1/parked/{id}/replay?by=tester");
    let (status, body) = http_post(port, &replay, None).await.expect("POST answers");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("bearer token"), "{body}");
    let (status, _) = http_post(port, &replay, Some("wrong-token-9c1")).await.unwrap();
    assert_eq!(status, 403);
    let (status, body) = http_post(port, &replay, Some(TOKEN)).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["result"], "replayed");
    let (status, body) = http_post(port, &replay, Some(TOKEN)).await.unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("already_replayed"));
    // Still invalid: it parks again, as a new record; the old one says who replayed it.
    let parked = wait_parked(port, 2).await;
    assert_eq!(parked[1]["id"].as_i64(), Some(id));
    assert_eq!(parked[1]["replayed_by"], "tester");
    assert!(parked[0]["replayed_by"].is_null());
    let again = parked[0]["id"].as_i64().unwrap();

    // The page: the deployment, the parked code, the buttons; the search filters the table.
    let (status, page) = get_page(port, "/").await;
    assert_eq!(status, 200);
    for needle in [
        deployment.as_str(),
        "INVALID_TURN",
        "console-agent",
        "Conv-Live",
        "data-action=\"replay\"",
        "replayed by tester",
    ] {
        assert!(page.contains(needle), "page lacks {needle:?}");
    }
    assert!(page.contains("<svg"), "the events chart");
    let (_, filtered) = get_page(port, "/?q=no-such-thing").await;
    assert!(filtered.contains("no deployment matches"));
    assert!(!filtered.contains("Conv-Live"));
    let (status, detail_page) = get_page(port, &format!("/parked/{again}")).await;
    assert_eq!(status, 200);
    assert!(detail_page.contains("INVALID_TURN") && detail_page.contains("bad-1"));
    assert!(detail_page.contains("payload hidden"));
    assert!(!detail_page.contains("payload-secret-456"), "payload leaked on the page");
    let (status, _) = get_page(port, "/parked/999999").await;
    assert_eq!(status, 404);

    // Purge: same gate; then the record is gone.
    let purge = format!("/api/v1/parked/{again}/purge");
    let (status, _) = http_post(port, &purge, None).await.unwrap();
    assert_eq!(status, 403);
    let (status, body) = http_post(port, &purge, Some(TOKEN)).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("purged"));
    let (status, _) = http_post(port, &purge, Some(TOKEN)).await.unwrap();
    assert_eq!(status, 404);
    assert_eq!(get_json(port, "/api/v1/parked").await["parked"].as_array().unwrap().len(), 1);

    let log = cluster.daemon_log(0);
    assert!(log.contains("console action refused"), "refusals are logged");
    assert!(!log.contains(TOKEN), "the admin token must never be logged");
    assert!(!log.contains("wrong-token-9c1"), "a presented token must never be logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_admin_token_actions_are_refused_and_not_offered() {
    let mut cluster = Cluster::new().await;
    let port = free_port();
    cluster.set("TURND_HTTP__LISTEN", &format!("127.0.0.1:{port}"));
    cluster.set("TURND_HTTP__SHOW_PAYLOADS", "true");
    cluster.start_daemon(&[]).await;
    let client = cluster.client().await;
    client
        .publish_raw(
            br#"{"messageId":"bad-2","agentId":"../y","payload":{"text":"visible-payload-789"}}"#,
        )
        .await;
    let parked = wait_parked(port, 1).await;
    let id = parked[0]["id"].as_i64().unwrap();

    for action in ["replay", "purge"] {
        for token in [None, Some("anything")] {
            let (status, body) =
                http_post(port, &format!("/api/v1/parked/{id}/{action}"), token).await.unwrap();
            assert_eq!(status, 403, "{action} with {token:?}: {body}");
            assert!(body.contains("not configured"), "{body}");
        }
    }
    assert_eq!(wait_parked(port, 1).await[0]["replayed_by"], Value::Null, "nothing happened");
    let (_, page) = get_page(port, "/").await;
    assert!(page.contains("read-only"));
    assert!(!page.contains("data-action=\""), "no buttons without a token");
    let (_, detail) = get_page(port, &format!("/parked/{id}")).await;
    assert!(detail.contains("visible-payload-789"), "http.show_payloads = true shows the payload");
    assert!(!detail.contains("data-action=\""));
    assert_eq!(
        get_json(port, &format!("/api/v1/parked/{id}")).await["body"]["payload"]["text"],
        "visible-payload-789"
    );
}

// ---- dashboard and alert rules --------------------------------------------------------------

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Every `turnd_…` metric name in a text (PromQL inside JSON or YAML).
fn metric_names(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut names = BTreeSet::new();
    let mut i = 0;
    while let Some(found) = text[i..].find("turnd_") {
        let start = i + found;
        let mut end = start + "turnd_".len();
        while end < bytes.len() && word(bytes[end]) {
            end += 1;
        }
        if start == 0 || !word(bytes[start - 1]) {
            names.insert(text[start..end].to_owned());
        }
        i = end;
    }
    names
}

/// `# TYPE <family> <type>` lines of an OpenMetrics exposition.
fn families(exposition: &str) -> BTreeMap<String, String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_owned(), kind.trim().to_owned()))
        .collect()
}

/// The family a sample name belongs to, and the type its suffix requires.
fn family_of(name: &str) -> (&str, Option<&'static str>) {
    for (suffix, kind) in [
        ("_bucket", "histogram"),
        ("_sum", "histogram"),
        ("_count", "histogram"),
        ("_total", "counter"),
    ] {
        if let Some(base) = name.strip_suffix(suffix) {
            return (base, Some(kind));
        }
    }
    (name, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_alert_rules_name_only_exported_metrics() {
    let dashboard =
        std::fs::read_to_string(repo("deploy/grafana/turnd-dashboard.json")).expect("dashboard");
    let rules =
        std::fs::read_to_string(repo("deploy/prometheus/turnd-alerts.yml")).expect("alert rules");
    let parsed: Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    assert!(parsed["panels"].as_array().is_some_and(|p| !p.is_empty()), "the dashboard has panels");

    let mut cluster = Cluster::new().await;
    let port = free_port();
    cluster.set("TURND_HTTP__LISTEN", &format!("127.0.0.1:{port}"));
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;
    let ok = turn("metrics", "c1", json!({}));
    let err = turn("metrics", "c2", json!({"action": "error", "code": "SOME_CODE"}));
    client.publish(&ok).await;
    client.publish(&err).await;
    client.wait_for(&[mid(&ok), mid(&err)], T).await;
    let (status, exposition) = http_get(port, "/metrics").await.expect("metrics");
    assert_eq!(status, 200);
    let exported = families(&exposition);

    let mut missing = Vec::new();
    let mut checked = 0;
    for (file, text) in [
        ("deploy/grafana/turnd-dashboard.json", &dashboard),
        ("deploy/prometheus/turnd-alerts.yml", &rules),
    ] {
        let names = metric_names(text);
        assert!(!names.is_empty(), "{file} names no turnd_ metric");
        for name in names {
            checked += 1;
            let (family, wants) = family_of(&name);
            // A counter `x_total` is the family `x`; a histogram's samples are `x_bucket` etc.
            let kind = exported.get(family).or_else(|| exported.get(name.as_str()));
            match (kind, wants) {
                (None, _) => {
                    missing.push(format!("{file}: {name} (family {family}) is not exported"))
                }
                (Some(k), Some(w)) if k != w => {
                    missing.push(format!("{file}: {name} needs a {w}, but {family} is a {k}"))
                }
                _ => {}
            }
        }
    }
    assert!(missing.is_empty(), "{}\nexported families: {exported:?}", missing.join("\n"));
    assert!(checked >= 10, "only {checked} names checked");
}

#[test]
fn metric_names_are_found_in_promql() {
    let names = metric_names(
        r#"{"expr":"histogram_quantile(0.99, sum by (le) (rate(turnd_turn_latency_seconds_bucket[5m])))"} up{job="turnd"} xturnd_no"#,
    );
    assert_eq!(names.into_iter().collect::<Vec<_>>(), ["turnd_turn_latency_seconds_bucket"]);
    assert_eq!(
        family_of("turnd_turn_latency_seconds_bucket"),
        ("turnd_turn_latency_seconds", Some("histogram"))
    );
    assert_eq!(family_of("turnd_worker_spawns_total"), ("turnd_worker_spawns", Some("counter")));
    assert_eq!(family_of("turnd_up"), ("turnd_up", None));
}

/// promtool from PATH, or `PROMTOOL` (scripts/test.sh extracts it from Debian's prometheus
/// package into target/tools when it is missing).
fn promtool() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PROMTOOL").map(PathBuf::from).filter(|p| p.is_file()) {
        return Some(p);
    }
    let local = repo("target/tools/prometheus/usr/bin/promtool");
    if local.is_file() {
        return Some(local);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join("promtool"))
        .find(|p| p.is_file())
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let Some(promtool) = promtool() else {
        eprintln!(
            "SKIPPED promtool_accepts_the_alert_rules: promtool not found on PATH, in $PROMTOOL or in \
             target/tools (scripts/test.sh extracts it from Debian's prometheus package)"
        );
        return;
    };
    let out = std::process::Command::new(&promtool)
        .args(["check", "rules"])
        .arg(repo("deploy/prometheus/turnd-alerts.yml"))
        .output()
        .expect("run promtool");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "promtool check rules failed:\n{text}");
    assert!(text.contains("SUCCESS"), "{text}");
}
