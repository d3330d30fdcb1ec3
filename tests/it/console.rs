//! The operator console and its JSON API (issue 9): views of a live cluster, parked turns with
//! their payload hidden, token-gated actions; the Grafana dashboard and alert rules name only
//! metrics a daemon exports, and promtool accepts the rules. Console access (issue 15): the
//! read token (bearer or login cookie; the admin token reads too), the ops listener, the Host
//! check, capped lists that never carry parked bodies.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use turnd_harness::*;

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

// ---- access: read token, ops listener, Host check, list caps (issue 15) ---------------------

const READ: &str = "read-token-test-3b9e";
const ADMIN: &str = "admin-token-test-8d21";

async fn request(port: u16, method: &str, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
    request_with_body(port, method, path, headers, b"").await
}

async fn request_with_body(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    http_request(port, method, path, headers, body)
        .await
        .unwrap_or_else(|| panic!("{method} {path} answers"))
}

/// Logs in through the page's form; returns the response (303 and a cookie when right).
async fn login(port: u16, token: &str, next: &str) -> HttpResponse {
    let form = format!("token={token}&next={}", next.replace('/', "%2F").replace('?', "%3F"));
    let headers = [("Content-Type", "application/x-www-form-urlencoded")];
    request_with_body(port, "POST", "/login", &headers, form.as_bytes()).await
}

/// The `name=value` part of a response's Set-Cookie.
fn cookie_of(r: &HttpResponse) -> String {
    let set = r.header("set-cookie").unwrap_or_else(|| panic!("a Set-Cookie: {r:?}"));
    set.split(';').next().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_token_guards_console_and_api_reads_but_never_metrics_or_health() {
    let mut cluster = Cluster::new().await;
    let port = free_port();
    let ops = free_port();
    cluster.set("TURND_HTTP__LISTEN", &format!("127.0.0.1:{port}"));
    cluster.set("TURND_HTTP__OPS_LISTEN", &format!("127.0.0.1:{ops}"));
    cluster.set("TURND_HTTP__READ_TOKEN", READ);
    cluster.set("TURND_HTTP__ADMIN_TOKEN", ADMIN);
    cluster.start_daemon(&[]).await;
    let client = cluster.client().await;
    client.publish_raw(br#"{"messageId":"bad-r","agentId":"../r","payload":{}}"#).await;
    let read_auth = format!("Bearer {READ}");
    let admin_auth = format!("Bearer {ADMIN}");
    let with_read = [("Authorization", read_auth.as_str())];
    let with_admin = [("Authorization", admin_auth.as_str())];
    let wrong = [("Authorization", "Bearer wrong-token-5a7c")];
    let id = wait_for_value(T, "the parked record", || async {
        let r = request(port, "GET", "/api/v1/parked", &with_read).await;
        serde_json::from_str::<Value>(&r.body).ok()?["parked"][0]["id"].as_i64()
    })
    .await;

    // The API: 401 with a JSON error without a token and with a wrong one; the read token
    // and the admin token both read.
    for path in [
        "/api/v1/cluster".to_owned(),
        "/api/v1/deployments".to_owned(),
        "/api/v1/turns".to_owned(),
        "/api/v1/parked".to_owned(),
        format!("/api/v1/parked/{id}"),
    ] {
        let r = request(port, "GET", &path, &[]).await;
        assert_eq!(r.status, 401, "GET {path} without a token: {r:?}");
        let e: Value = serde_json::from_str(&r.body).expect("a JSON error");
        assert!(e["error"].as_str().unwrap().contains("http.read_token"), "{e}");
        assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"turnd\""));
        let r = request(port, "GET", &path, &wrong).await;
        assert_eq!(r.status, 401, "GET {path} with a wrong token");
        assert!(r.body.contains("wrong bearer token"), "{}", r.body);
        for auth in [&with_read, &with_admin] {
            let r = request(port, "GET", &path, auth).await;
            assert_eq!(r.status, 200, "GET {path} with {auth:?}: {}", r.body);
            serde_json::from_str::<Value>(&r.body).expect("JSON");
        }
    }
    // Actions: the read gate first (401), then the admin token's own (403 for the read token).
    let purge = format!("/api/v1/parked/{id}/purge");
    assert_eq!(request(port, "POST", &purge, &[]).await.status, 401);
    let r = request(port, "POST", &purge, &with_read).await;
    assert_eq!(r.status, 403, "the read token is not the admin token: {}", r.body);

    // The pages: the login form (401) without a token, showing nothing of the cluster.
    for path in ["/".to_owned(), format!("/parked/{id}"), "/?q=x".to_owned()] {
        let r = request(port, "GET", &path, &[]).await;
        assert_eq!(r.status, 401, "GET {path}");
        assert!(r.body.contains("action=\"/login\"") && r.body.contains("name=\"token\""));
        assert!(
            r.body.contains(&format!("name=\"next\" value=\"{}\"", path.replace('&', "&amp;"))),
            "{}",
            r.body
        );
        assert!(!r.body.contains(&cluster.prefix), "the login page shows no cluster detail");
        assert!(!r.body.contains("bad-r") && !r.body.contains("INVALID_TURN"));
        let r = request(port, "GET", &path, &with_read).await;
        assert_eq!(r.status, 200, "GET {path} with the read token");
    }
    let r = request(port, "GET", "/", &wrong).await;
    assert_eq!(r.status, 401);
    assert!(r.body.contains("wrong"), "{}", r.body);

    // The login form: a wrong token gets the form again; the read token (or the admin
    // token) a session cookie, HttpOnly and SameSite=Strict, which is not the token.
    let r = login(port, "wrong-token-5a7c", "/").await;
    assert_eq!(r.status, 401);
    assert!(r.body.contains("Wrong token"), "{}", r.body);
    assert!(r.header("set-cookie").is_none());
    let r = login(port, READ, &format!("/parked/{id}")).await;
    assert_eq!(r.status, 303, "{r:?}");
    assert_eq!(r.header("location"), Some(format!("/parked/{id}").as_str()));
    let set = r.header("set-cookie").unwrap().to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(set.contains(attribute), "{set}");
    }
    assert!(!set.contains(READ), "the cookie does not carry the token: {set}");
    let cookie = cookie_of(&r);
    let with_cookie = [("Cookie", cookie.as_str())];
    let r = request(port, "GET", &format!("/parked/{id}"), &with_cookie).await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("INVALID_TURN") && r.body.contains("log out"));
    assert_eq!(request(port, "GET", "/api/v1/turns", &with_cookie).await.status, 200);
    let r = login(port, ADMIN, "//evil.example/").await;
    assert_eq!(r.status, 303, "the admin token logs in too");
    assert_eq!(r.header("location"), Some("/"), "no redirect off the site");
    let admin_cookie = cookie_of(&r);
    assert_eq!(request(port, "GET", "/", &[("Cookie", admin_cookie.as_str())]).await.status, 200);
    // A forged or altered cookie is refused.
    let (value, mac) = cookie.split_once('.').unwrap();
    let flipped = if mac.starts_with('0') { "1" } else { "0" };
    for forged in [format!("{value}.{flipped}{}", &mac[1..]), "turnd_read=99999999999.00".into()] {
        let r = request(port, "GET", "/", &[("Cookie", forged.as_str())]).await;
        assert_eq!(r.status, 401, "{forged}");
    }
    // The cookie reads; it does not act (actions need the admin bearer token).
    let r = request(port, "POST", &purge, &with_cookie).await;
    assert_eq!(r.status, 403, "{}", r.body);
    // Log out: the cookie is cleared.
    let r = request(port, "POST", "/logout", &with_cookie).await;
    assert_eq!(r.status, 303);
    assert!(r.header("set-cookie").unwrap().contains("Max-Age=0"));

    // /metrics, /healthz, /readyz need no token, on both listeners.
    wait_for_async(T, "readyz 200", || async {
        request(port, "GET", "/readyz", &[]).await.status == 200
    })
    .await;
    for p in [port, ops] {
        for path in ["/metrics", "/healthz", "/readyz"] {
            let r = request(p, "GET", path, &[]).await;
            assert_eq!(r.status, 200, "GET {path} on port {p}: {}", r.body);
        }
    }
    // The ops listener serves nothing else, token or not, and checks no Host: probes and
    // scrapers use pod addresses and names.
    for path in ["/", "/api/v1/cluster", "/api/v1/parked", &format!("/parked/{id}"), "/metrics/x"] {
        for auth in [&[][..], &with_admin[..]] {
            let r = request(ops, "GET", path, auth).await;
            assert_eq!(r.status, 404, "ops GET {path}: {}", r.body);
            assert!(r.body.contains("http.ops_listen"), "{}", r.body);
        }
    }
    assert_eq!(request(ops, "POST", "/login", &[]).await.status, 404);
    assert_eq!(request(ops, "POST", &purge, &with_admin).await.status, 404);
    let r = request(ops, "GET", "/metrics", &[("Host", "turnd-0.turnd.example:9188")]).await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("turnd_up"), "the ops listener's metrics are the daemon's");

    // Still there: nothing above purged it.
    assert_eq!(request(port, "GET", &format!("/api/v1/parked/{id}"), &with_read).await.status, 200);
    let log = cluster.daemon_log(0);
    for secret in [READ, ADMIN, "wrong-token-5a7c"] {
        assert!(!log.contains(secret), "a token reached the log: {secret}");
    }
    assert!(log.contains("ops http listening"), "the ops listener says where it listens");
    assert!(log.contains("console login refused"), "wrong logins are logged (without the token)");

    // Both listeners belong to the daemon: SIGTERM stops it cleanly, and both ports close.
    let status = cluster.daemons[0].terminate(T).await;
    assert!(status.is_some_and(|s| s.success()), "the daemon stops cleanly: {status:?}");
    for p in [port, ops] {
        assert!(tokio::net::TcpStream::connect(("127.0.0.1", p)).await.is_err(), "port {p} closed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_host_is_refused_and_local_names_are_served() {
    let mut cluster = Cluster::new().await;
    let port = free_port();
    cluster.set("TURND_HTTP__LISTEN", &format!("127.0.0.1:{port}"));
    cluster.start_daemon(&[]).await;
    let here = format!("127.0.0.1:{port}");
    let local = format!("localhost:{port}");
    let v6 = format!("[::1]:{port}");
    // Reached through a tunnel on another local port, or without a port, or without a Host
    // (HTTP/1.0 tools; no browser omits it).
    for host in [here.as_str(), &local, &v6, "localhost:8080", "127.0.0.1", "LOCALHOST", ""] {
        for path in ["/", "/api/v1/cluster", "/metrics", "/healthz"] {
            let r = request(port, "GET", path, &[("Host", host)]).await;
            assert_eq!(r.status, 200, "Host {host:?} GET {path}: {}", r.body);
        }
    }
    // A name that is not ours, or an address it does not listen on (DNS rebinding: a page on
    // evil.example whose name now points at 127.0.0.1 sends its own name).
    let evil = format!("evil.example:{port}");
    let rebound = format!("127.0.0.1.evil.example:{port}");
    let other_ip = format!("10.9.8.7:{port}");
    for host in [evil.as_str(), &rebound, &other_ip, "localhost.evil.example", "evil.example"] {
        for path in ["/", "/parked/1", "/?q=x"] {
            let r = request(port, "GET", path, &[("Host", host)]).await;
            assert_eq!(r.status, 421, "Host {host:?} GET {path}: {}", r.body);
            assert!(r.body.contains("DNS rebinding") && r.body.contains("127.0.0.1"), "{}", r.body);
        }
        // What probes and scrapers read is not checked: they may use any name for the pod.
        for path in ["/metrics", "/healthz"] {
            let r = request(port, "GET", path, &[("Host", host)]).await;
            assert_eq!(r.status, 200, "Host {host:?} GET {path}: {}", r.body);
        }
        assert_eq!(request(port, "GET", "/nope", &[("Host", host)]).await.status, 404);
        let r = request(port, "GET", "/api/v1/turns", &[("Host", host)]).await;
        assert_eq!(r.status, 421);
        let e: Value = serde_json::from_str(&r.body).expect("the API's refusal is JSON");
        assert!(e["error"].as_str().unwrap().contains("Host"), "{e}");
        let r = request(port, "POST", "/api/v1/parked/1/purge", &[("Host", host)]).await;
        assert_eq!(r.status, 421, "actions too");
        assert_eq!(request(port, "POST", "/login", &[("Host", host)]).await.status, 421);
    }
}

/// Inserts `n` parked records with `body_bytes`-byte bodies (straight into the table: the
/// broker would refuse bodies this size, and a thousand parkings through it take minutes).
async fn insert_parked(cluster: &Cluster, code: &str, n: i64, body_bytes: i32) {
    sqlx::query(
        "INSERT INTO turnd_parked (code, reason, body, headers, routing_key, deployment, message_id)
         SELECT $1, 'inserted by the test', convert_to(repeat('B', $3), 'UTF8'),
                '{\"x-huge\":\"' || repeat('H', $3) || '\"}', 'turn.test', NULL, 'm-' || i
         FROM generate_series(1, $2) AS i",
    )
    .bind(code)
    .bind(n)
    .bind(body_bytes)
    .execute(&cluster.pool)
    .await
    .expect("insert parked records");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_are_capped_and_never_carry_parked_bodies() {
    let mut cluster = Cluster::new().await;
    let port = free_port();
    cluster.set("TURND_HTTP__LISTEN", &format!("127.0.0.1:{port}"));
    cluster.set("TURND_HTTP__SHOW_PAYLOADS", "true");
    // 1,200 small records, then 40 with 2 MB bodies and 2 MB headers (160 MB together).
    insert_parked(&cluster, "SMALL_TEST", 1200, 10).await;
    insert_parked(&cluster, "HUGE_TEST", 40, 2 << 20).await;
    cluster.start_daemon(&[]).await;

    // limit=1000000 is clamped to 1,000, and the answer says so.
    let r = request(port, "GET", "/api/v1/parked?limit=1000000", &[]).await;
    assert_eq!(r.status, 200, "{}", &r.body[..r.body.len().min(500)]);
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["limit"], 1000);
    let rows = v["parked"].as_array().unwrap();
    assert_eq!(rows.len(), 1000);
    // Newest first: the 40 huge ones lead, and none carries its body or headers.
    assert_eq!(rows[0]["code"], "HUGE_TEST");
    assert!(rows[0].get("body").is_none() && rows[0].get("headers").is_none(), "{}", rows[0]);
    assert!(r.body.len() < 1 << 20, "a list of 1,000 records is {} bytes", r.body.len());
    assert!(!r.body.contains("BBBBBBBB") && !r.body.contains("HHHHHHHH"));
    let v = get_json(port, "/api/v1/parked?code=HUGE_TEST&limit=50").await;
    assert_eq!(v["parked"].as_array().unwrap().len(), 40);
    assert_eq!(v["limit"], 50);
    assert!(v.to_string().len() < 64 << 10, "40 huge records list small");
    let v = get_json(port, "/api/v1/deployments?limit=1000000").await;
    assert_eq!(v["limit"], 1000);
    for bad in ["0", "-1"] {
        let r = request(port, "GET", &format!("/api/v1/parked?limit={bad}"), &[]).await;
        assert_eq!(r.status, 400, "limit={bad}");
    }

    // The page lists them small too; one record still shows its whole body.
    let (status, page) = get_page(port, "/").await;
    assert_eq!(status, 200);
    assert!(page.len() < 1 << 20, "the console page is {} bytes", page.len());
    assert!(page.contains("HUGE_TEST") && !page.contains("BBBBBBBB"));
    let id = get_json(port, "/api/v1/parked?code=HUGE_TEST&limit=1").await["parked"][0]["id"]
        .as_i64()
        .unwrap();
    let detail = get_json(port, &format!("/api/v1/parked/{id}")).await;
    assert_eq!(detail["body_bytes"], 2 << 20);

    // `turnd parked list` stops at 1,000 rows too, and says so; its rows carry no body.
    let out = std::process::Command::new(turnd_bin())
        .args(["parked", "--config", "/dev/null", "list", "--json", "--limit", "5000"])
        .env("TURND_DATABASE__URL", &cluster.db_url)
        .output()
        .expect("run turnd parked list");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("stop at 1000"));
    assert!(out.stdout.len() < 1 << 20, "{} bytes", out.stdout.len());
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(rows.len(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ops_listen_address_in_use_stops_the_start_naming_the_key() {
    let cluster = Cluster::new().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let log = cluster.path("ops-in-use.log");
    let file = std::fs::File::create(&log).expect("log file");
    let child = std::process::Command::new(turnd_bin())
        .arg("run")
        .env_clear()
        .envs(cluster.env.iter().map(|(k, v)| (k, v)))
        .env("TURND_HTTP__OPS_LISTEN", &addr)
        .stdout(file.try_clone().expect("dup"))
        .stderr(file)
        .spawn()
        .expect("spawn turnd run");
    // A Daemon, so that it is killed should the test fail while it still runs.
    let mut daemon = Daemon {
        id: "d0".into(),
        child: Some(child),
        log: log.clone(),
        env: Vec::new(),
        prefix: Vec::new(),
        args: Vec::new(),
    };
    let status = wait_for_value(T, "turnd run to give up", || {
        let s = daemon.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
        async move { s }
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!status.success(), "{text}");
    assert!(text.contains(&format!("cannot listen on http.ops_listen {addr}")), "{text}");
    drop(taken);
}

#[test]
fn check_config_redacts_the_read_token_and_names_the_ops_listen_key() {
    let run = |envs: &[(&str, &str)]| {
        let out = std::process::Command::new(turnd_bin())
            .args(["check-config", "--config", "/dev/null"])
            .env_clear()
            .envs(envs.iter().copied())
            .output()
            .expect("run turnd check-config");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), text)
    };
    let (code, out) = run(&[
        ("TURND_HTTP__READ_TOKEN", "read-s3cret-token"),
        ("TURND_HTTP__OPS_LISTEN", "127.0.0.1:9188"),
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("read-s3cret-token"), "{out}");
    assert!(out.contains("read_token = \"***\""), "{out}");
    assert!(out.contains("ops_listen = \"127.0.0.1:9188\""), "{out}");
    let (code, out) = run(&[("TURND_HTTP__OPS_LISTEN", "127.0.0.1:9187")]);
    assert_eq!(code, Some(2));
    assert!(out.contains("http.ops_listen") && out.contains("port of its own"), "{out}");
    let (code, out) = run(&[("TURND_HTTP__READ_TOKEN", "")]);
    assert_eq!(code, Some(2));
    assert!(out.contains("http.read_token"), "{out}");
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
