//! The console in a real browser (issue 9): headless Chromium, driven over WebDriver
//! (chromedriver + fantoccini), against a running daemon. The page shows a live deployment and
//! a parked turn; Replay without the token is refused (403 on the page); with it the turn is
//! republished and answered. Saves the screenshot the README shows (docs/console.png).
//!
//! Needs Debian's `chromium` and `chromium-driver` (scripts/test-tools.sh installs them); without
//! them the test prints SKIPPED with the reason and passes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client as Browser, ClientBuilder, Locator};
use serde_json::{Value, json};
use turnd_harness::*;

const T: Duration = Duration::from_secs(30);
const TOKEN: &str = "browser-test-token-51c2";

/// chromedriver on a free port, killed with the test.
struct Driver {
    child: Child,
    port: u16,
    _profile: tempfile::TempDir,
    profile: PathBuf,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find(candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// The browser and its driver, or why the test cannot run here.
fn browser_binaries() -> Result<(PathBuf, PathBuf), String> {
    let chromium =
        find(&["/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser"])
            .ok_or("chromium is not installed (Debian package `chromium`)")?;
    let driver = find(&["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"])
        .ok_or("chromedriver is not installed (Debian package `chromium-driver`)")?;
    Ok((chromium, driver))
}

async fn start_driver(driver: &Path, log: &Path) -> Driver {
    let port = free_port();
    let log = std::fs::File::create(log).expect("chromedriver log");
    let child = Command::new(driver)
        .arg(format!("--port={port}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup"))
        .stderr(log)
        .spawn()
        .expect("start chromedriver");
    let profile = tempfile::tempdir().expect("profile dir");
    let d = Driver { child, port, profile: profile.path().to_path_buf(), _profile: profile };
    // (chromedriver refuses HTTP/1.0, so no http_get here: a TCP connect says it listens.)
    wait_for_async(T, "chromedriver to listen", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await;
    d
}

async fn connect(driver: &Driver, chromium: &Path) -> Browser {
    let args = [
        "--headless".to_owned(),
        "--no-sandbox".to_owned(),
        "--disable-gpu".to_owned(),
        "--disable-quic".to_owned(),
        "--no-first-run".to_owned(),
        "--disable-background-networking".to_owned(),
        "--disable-component-update".to_owned(),
        "--disable-sync".to_owned(),
        "--disable-dev-shm-usage".to_owned(),
        "--window-size=1400,1050".to_owned(),
        format!("--user-data-dir={}", driver.profile.display()),
    ];
    let mut caps = serde_json::Map::new();
    caps.insert("browserName".into(), json!("chrome"));
    // Prompts stay open until the test answers them.
    caps.insert("unhandledPromptBehavior".into(), json!("ignore"));
    caps.insert("goog:chromeOptions".into(), json!({ "binary": chromium, "args": args }));
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a WebDriver session with headless Chromium")
}

/// Polls `what` (an async read of the page) until `ok` holds for it.
async fn wait_page<F, Fut>(
    within: Duration,
    what: &str,
    mut read: F,
    ok: impl Fn(&str) -> bool,
) -> String
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<String>>,
{
    let start = Instant::now();
    let mut last = String::new();
    loop {
        if let Some(text) = read().await {
            if ok(&text) {
                return text;
            }
            last = text;
        }
        assert!(
            start.elapsed() < within,
            "timed out after {within:?} waiting for {what}; last seen: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn text_of(b: &Browser, css: &str) -> Option<String> {
    b.find(Locator::Css(css)).await.ok()?.text().await.ok()
}

async fn wait_prompt(b: &Browser) -> String {
    let start = Instant::now();
    loop {
        if let Ok(text) = b.get_alert_text().await {
            return text;
        }
        assert!(start.elapsed() < T, "no token prompt appeared");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn click_replay(b: &Browser) {
    click(b, "#detail button[data-action=replay]").await;
}

/// Finds and clicks `css`. The page swaps its live parts every few seconds: an element found
/// just before a swap is stale by the click, so it is found again and retried (bounded).
async fn click(b: &Browser, css: &str) {
    let start = Instant::now();
    loop {
        let element =
            b.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("find {css}: {e:?}"));
        match element.click().await {
            Ok(_) => return,
            Err(e) if start.elapsed() < T && format!("{e:?}").contains("StaleElementReference") => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("click {css}: {e:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_chromium_shows_the_cluster_and_replays_with_the_token() {
    let (chromium, chromedriver) = match browser_binaries() {
        Ok(b) => b,
        Err(why) => {
            eprintln!(
                "SKIPPED console_in_chromium_shows_the_cluster_and_replays_with_the_token: {why}; scripts/test-tools.sh installs it"
            );
            return;
        }
    };

    let mut cluster = Cluster::new().await;
    let port = free_port();
    cluster.set("TURND_HTTP__LISTEN", &format!("127.0.0.1:{port}"));
    cluster.set("TURND_HTTP__ADMIN_TOKEN", TOKEN);
    cluster.set("TURND_INTAKE__MAX_ATTEMPTS", "2");
    let mut client = cluster.client().await;

    // A snapshot turn without its organization parks with MISSING_CONTEXT...
    cluster.start_daemon(&[]).await;
    let parked_turn = json!({"messageId": "needs-context", "agentId": "browser-agent", "conversationId": "c-parked",
                             "runId": 3, "payload": {"text": "parked, then answered"}});
    client.publish(&parked_turn).await;
    client.wait_for(&["needs-context".into()], T).await;
    assert_eq!(client.event("needs-context").unwrap().code(), "MISSING_CONTEXT");
    // ...and the operator fixes the cause: this cluster does not need shared snapshots.
    let status = cluster.daemons[0].terminate(T).await;
    assert!(status.is_some_and(|s| s.success()), "d0 stops cleanly");
    cluster.start_daemon(&[("TURND_SESSION__STORE", "file")]).await;

    let live = turn("browser-agent", "c-live", json!({"text": "hello"}));
    let failing =
        turn("browser-agent", "c-failing", json!({"action": "error", "code": "UPSTREAM_TIMEOUT"}));
    client.publish(&live).await;
    client.publish(&failing).await;
    client.wait_for(&[mid(&live), mid(&failing)], T).await;
    client.publish_raw(br#"{"messageId":"bad-agent","agentId":"../x","payload":{}}"#).await;
    let deployment = deployment_of(&live);
    let parked = {
        let mut list = Vec::new();
        for _ in 0..200 {
            let (_, body) = http_get(port, "/api/v1/parked").await.expect("parked list");
            list = serde_json::from_str::<Value>(&body).unwrap()["parked"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if list.len() >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        list
    };
    let id = parked
        .iter()
        .find(|p| p["code"] == "MISSING_CONTEXT")
        .and_then(|p| p["id"].as_i64())
        .unwrap_or_else(|| panic!("the MISSING_CONTEXT turn is recorded: {parked:?}"));

    let driver = start_driver(&chromedriver, &cluster.path("chromedriver.log")).await;
    let b = connect(&driver, &chromium).await;
    let result = async {
        // The page: a live deployment and the parked turn.
        let base = format!("http://127.0.0.1:{port}");
        b.goto(&format!("{base}/")).await.expect("open the console");
        let table = wait_page(
            T,
            "the live deployment",
            || text_of(&b, "#deployments-table"),
            |t| t.contains(&deployment),
        )
        .await;
        assert!(
            table.contains("browser-agent") && table.contains("c-live") && table.contains("d1"),
            "{table}"
        );
        let parked_text = text_of(&b, "#parked").await.unwrap_or_default();
        assert!(
            parked_text.contains("MISSING_CONTEXT") && parked_text.contains("INVALID_TURN"),
            "{parked_text}"
        );
        assert!(parked_text.contains("organizationId"), "the reason is shown: {parked_text}");

        // Its detail page, through the link.
        click(&b, &format!("a[href='/parked/{id}']")).await;
        wait_page(
            T,
            "the detail page",
            || text_of(&b, "#detail"),
            |t| t.contains("MISSING_CONTEXT"),
        )
        .await;
        let body = text_of(&b, "#body").await.unwrap_or_default();
        assert!(
            body.contains("needs-context") && body.contains("show_payloads"),
            "payload hidden: {body}"
        );
        assert!(!body.contains("parked, then answered"), "payload hidden: {body}");

        // Replay without the token: the prompt is dismissed, the API refuses, the page says so.
        click_replay(&b).await;
        wait_prompt(&b).await;
        b.dismiss_alert().await.expect("dismiss the prompt");
        wait_page(T, "a 403 on the page", || text_of(&b, "#flash"), |t| t.contains("403")).await;
        // A wrong token: refused too.
        click_replay(&b).await;
        wait_prompt(&b).await;
        b.send_alert_text("not-the-token").await.expect("type");
        b.accept_alert().await.expect("accept");
        wait_page(
            T,
            "a 403 for a wrong token",
            || text_of(&b, "#flash"),
            |t| t.contains("403") && t.contains("wrong"),
        )
        .await;
        assert!(
            client.event("needs-context").is_some_and(|e| e.kind() == "error"),
            "nothing replayed yet"
        );

        // With the token: replayed, and this time the turn is answered.
        click_replay(&b).await;
        let prompt = wait_prompt(&b).await;
        assert!(prompt.contains("http.admin_token"), "{prompt}");
        b.send_alert_text(TOKEN).await.expect("type the token");
        b.accept_alert().await.expect("accept");
        wait_page(T, "the replay's outcome", || text_of(&b, "#flash"), |t| t.contains("replayed"))
            .await;
        client
            .wait_until(T, "a reply to the replayed turn", |ev| {
                ev.iter().any(|e| e.message_id() == "needs-context" && e.kind() == "reply")
            })
            .await;
        wait_page(
            T,
            "the detail to say who replayed it",
            || text_of(&b, "#status"),
            |t| t.contains("replayed by console"),
        )
        .await;
        let buttons =
            b.find_all(Locator::Css("#detail button[data-action=replay]")).await.expect("find");
        assert!(buttons.is_empty(), "a replayed turn offers no second replay");

        // Back on the console: the replayed turn's deployment is live too. Screenshot for the README.
        b.goto(&format!("{base}/")).await.expect("open the console");
        let replayed_deployment = deployment_of(
            &json!({"messageId": "x", "agentId": "browser-agent", "conversationId": "c-parked"}),
        );
        wait_page(
            T,
            "the replayed turn's deployment",
            || text_of(&b, "#deployments-table"),
            |t| t.contains(&replayed_deployment),
        )
        .await;
        let parked_text = text_of(&b, "#parked").await.unwrap_or_default();
        assert!(parked_text.contains("replayed by console"), "{parked_text}");
        b.set_window_size(1400, 1050).await.expect("window size");
        let png = b.screenshot().await.expect("screenshot");
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/console.png");
        std::fs::write(&out, &png).expect("write docs/console.png");
        eprintln!("screenshot: {} ({} bytes)", out.display(), png.len());
    };
    // Close the browser even when an assertion fails.
    let outcome = futures_lite::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(result)).await;
    let _ = b.close().await;
    drop(driver);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

const READ_TOKEN: &str = "browser-read-token-0e6f";

/// With `http.read_token`: the console asks for it once on a login form, then the session
/// cookie carries every navigation and refresh (the page's script cannot read it), actions
/// still need the admin token, and "log out" ends the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_read_token_the_console_asks_for_it_once_and_keeps_a_session() {
    let (chromium, chromedriver) = match browser_binaries() {
        Ok(b) => b,
        Err(why) => {
            eprintln!(
                "SKIPPED with_a_read_token_the_console_asks_for_it_once_and_keeps_a_session: {why}; scripts/test-tools.sh installs it"
            );
            return;
        }
    };
    let mut cluster = Cluster::new().await;
    let port = free_port();
    cluster.set("TURND_HTTP__LISTEN", &format!("127.0.0.1:{port}"));
    cluster.set("TURND_HTTP__ADMIN_TOKEN", TOKEN);
    cluster.set("TURND_HTTP__READ_TOKEN", READ_TOKEN);
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;
    let live = turn("login-agent", "c-live", json!({"text": "hello"}));
    client.publish(&live).await;
    client.wait_for(&[mid(&live)], T).await;
    client.publish_raw(br#"{"messageId":"bad-login","agentId":"../x","payload":{}}"#).await;
    let deployment = deployment_of(&live);
    let auth = format!("Bearer {READ_TOKEN}");
    let id = wait_for_value(T, "the parked record", || async {
        let r =
            http_request(port, "GET", "/api/v1/parked", &[("Authorization", &auth)], b"").await?;
        serde_json::from_str::<Value>(&r.body).ok()?["parked"][0]["id"].as_i64()
    })
    .await;

    let driver = start_driver(&chromedriver, &cluster.path("chromedriver.log")).await;
    let b = connect(&driver, &chromium).await;
    let result = async {
        let base = format!("http://127.0.0.1:{port}");
        // A deep link: the login form, which then returns to it.
        b.goto(&format!("{base}/parked/{id}")).await.expect("open a detail page");
        wait_page(T, "the login form", || text_of(&b, "#login"), |t| t.contains("Log in")).await;
        let page = b.source().await.expect("page source");
        assert!(!page.contains("bad-login") && !page.contains(&cluster.prefix), "nothing shown");
        let form_token = b.find(Locator::Css("#token")).await.expect("the token field");
        form_token.send_keys("not-the-token").await.expect("type");
        click(&b, "#login-submit").await;
        wait_page(T, "a wrong token", || text_of(&b, "#login-problem"), |t| t.contains("Wrong"))
            .await;
        let form_token = b.find(Locator::Css("#token")).await.expect("the token field");
        form_token.send_keys(READ_TOKEN).await.expect("type");
        click(&b, "#login-submit").await;
        wait_page(
            T,
            "the detail page after login",
            || text_of(&b, "#detail"),
            |t| t.contains("INVALID_TURN"),
        )
        .await;
        let cookie = b.execute("return document.cookie", vec![]).await.expect("run a script");
        assert_eq!(cookie, json!(""), "the session cookie is HttpOnly");

        // Navigations and the page's refreshes carry the session.
        click(&b, "a[href='/#parked']").await;
        wait_page(
            T,
            "the console",
            || text_of(&b, "#deployments-table"),
            |t| t.contains(&deployment),
        )
        .await;
        wait_page(T, "a refresh", || text_of(&b, "#updated"), |t| t.starts_with("updated")).await;

        // Actions still need the admin token: the read token is refused, the admin token acts.
        click(&b, &format!("a[href='/parked/{id}']")).await;
        let heading = format!("#{id} INVALID_TURN");
        wait_page(T, "the detail page", || text_of(&b, "#detail"), |t| t.contains(&heading)).await;
        click(&b, "#detail button[data-action=replay]").await;
        wait_prompt(&b).await;
        b.send_alert_text(READ_TOKEN).await.expect("type");
        b.accept_alert().await.expect("accept");
        wait_page(T, "a 403", || text_of(&b, "#flash"), |t| t.contains("403")).await;
        click(&b, "#detail button[data-action=replay]").await;
        wait_prompt(&b).await;
        b.send_alert_text(TOKEN).await.expect("type");
        b.accept_alert().await.expect("accept");
        wait_page(T, "the replay", || text_of(&b, "#flash"), |t| t.contains("replayed")).await;

        // Log out: back to the form, and the API refuses this browser again.
        click(&b, "#logout button").await;
        wait_page(T, "the login form again", || text_of(&b, "#login"), |t| t.contains("Log in"))
            .await;
        b.goto(&format!("{base}/api/v1/cluster")).await.expect("open the API");
        let body = b.find(Locator::Css("body")).await.expect("body").text().await.expect("text");
        assert!(body.contains("http.read_token"), "{body}");
    };
    let outcome = futures_lite::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(result)).await;
    let _ = b.close().await;
    drop(driver);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
