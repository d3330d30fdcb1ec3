//! The operator surface (issue 5): metrics, health, status, sd_notify, the unit file, config
//! errors, secrets kept out of output, JSON logs.

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use turnd_harness::*;

const T: Duration = Duration::from_secs(20);

fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name_and_labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_and_readyz_follows_the_database() {
    let mut cluster = Cluster::new().await;
    let proxy = Proxy::start(5432).await;
    let port = free_port();
    let db_via_proxy = cluster.db_url.replace(":5432/", &format!(":{}/", proxy.port));
    cluster.set("TURND_DATABASE__URL", &db_via_proxy);
    cluster.set("TURND_HTTP__LISTEN", &format!("127.0.0.1:{port}"));
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;

    let (status, _) = http_get(port, "/healthz").await.expect("healthz answers");
    assert_eq!(status, 200);
    let (_, before) = http_get(port, "/metrics").await.expect("metrics");
    let ids: Vec<String> = (0..3)
        .map(|i| {
            let t = turn("m", &format!("c{i}"), json!({}));
            mid(&t)
        })
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let mut t = turn("m", &format!("c{i}"), json!({}));
        t["messageId"] = json!(id);
        client.publish(&t).await;
    }
    let bad = turn("m", "cx", json!({"action": "error", "code": "BAD_THING"}));
    client.publish(&bad).await;
    let mut all = ids.clone();
    all.push(mid(&bad));
    client.wait_for(&all, T).await;
    let (_, after) = http_get(port, "/metrics").await.expect("metrics");
    assert_eq!(
        metric(&after, "turnd_turns_received_total{outcome=\"armed\"}")
            - metric(&before, "turnd_turns_received_total{outcome=\"armed\"}"),
        4.0,
        "{after}"
    );
    assert!(metric(&after, "turnd_terminal_events_total{kind=\"reply\"") >= 3.0, "{after}");
    assert_eq!(
        metric(&after, "turnd_terminal_events_total{kind=\"error\",code=\"BAD_THING\"}"),
        1.0,
        "{after}"
    );
    assert!(metric(&after, "turnd_worker_spawns_total") >= 4.0);
    assert!(metric(&after, "turnd_turn_latency_seconds_count") >= 4.0, "{after}");
    assert_eq!(metric(&after, "turnd_up{component=\"database\"}"), 1.0);
    let (status, body) = http_get(port, "/readyz").await.expect("readyz");
    assert_eq!(status, 200, "{body}");

    proxy.cut();
    wait_for_async(T, "readyz 503 while the database is unreachable", || async {
        matches!(http_get(port, "/readyz").await, Some((503, b)) if b.contains("database down"))
    })
    .await;
    proxy.restore();
    wait_for_async(T, "readyz 200 after the database returns", || async {
        matches!(http_get(port, "/readyz").await, Some((200, _)))
    })
    .await;
    // And it serves again.
    let again = turn("m", "c-again", json!({}));
    client.publish(&again).await;
    client.wait_for(&[mid(&again)], T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_shows_owner_epoch_and_pending_from_another_process() {
    let mut cluster = Cluster::new().await;
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;
    let running = turn("st", "c1", json!({"action": "sleep", "ms": 3000}));
    let queued = turn("st", "c1", json!({}));
    client.publish(&running).await;
    client.publish(&queued).await;
    let dep = deployment_of(&running);
    let mut found = None;
    wait_until(T, "status shows the deployment with a running and a queued turn", || {
        let out = Command::new(turnd_bin())
            .args(["status", "--json"])
            .env_clear()
            .env("TURND_DATABASE__URL", &cluster.db_url)
            .output()
            .expect("run turnd status");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
        let d = v["deployments"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["deployment"] == dep.as_str())
            .cloned();
        let ok = d.as_ref().is_some_and(|d| d["running"] == 1 && d["queued"] == 1);
        if ok {
            found = Some((v, d.unwrap()));
        }
        ok
    })
    .await;
    let (v, d) = found.unwrap();
    assert_eq!(d["owner"], "d0");
    assert!(d["epoch"].as_i64().unwrap() >= 1);
    assert_eq!(v["daemons"][0]["id"], "d0");
    assert!(v["pending"]["queued"].as_i64().unwrap() >= 1);
    assert!(v["pending"]["oldest_age_s"].as_f64().is_some());
    // The human table names the same things.
    let out = Command::new(turnd_bin())
        .args(["status"])
        .env_clear()
        .env("TURND_DATABASE__URL", &cluster.db_url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&dep) && text.contains("d0"), "{text}");
    client.wait_for(&[mid(&running), mid(&queued)], T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd_notify_ready_after_serving_and_stopping_on_sigterm() {
    let mut cluster = Cluster::new().await;
    let sock_path = cluster.path("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    cluster.set("NOTIFY_SOCKET", sock_path.to_str().unwrap());
    cluster.set("WATCHDOG_USEC", "400000");
    let mut client = cluster.client().await;
    // A turn waiting before the daemon starts: once READY=1 is sent, it is served.
    let t = turn("sd", "c1", json!({}));
    client.publish(&t).await;
    cluster.start_daemon(&[]).await;
    let recv = |sock: &UnixDatagram| {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = recv(&sock);
    assert_eq!(first, "READY=1", "READY=1 is the first notification");
    client.wait_for(&[mid(&t)], T).await;
    let mut seen = Vec::new();
    while !(seen.iter().any(|m: &String| m.starts_with("STATUS="))
        && seen.iter().any(|m| m == "WATCHDOG=1"))
    {
        seen.push(recv(&sock));
    }
    cluster.daemons[0].signal(libc::SIGTERM);
    loop {
        let m = recv(&sock);
        if m == "STOPPING=1" {
            break;
        }
    }
    let status = cluster.daemons[0].terminate(T).await.expect("daemon exits");
    assert!(status.success());
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!(
            "SKIPPED: systemd-analyze is not installed (Debian package `systemd`); scripts/test.sh installs it on CI"
        );
        return;
    };
    assert!(out.status.success());
    let unit =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/turnd.service"))
            .unwrap();
    // verify checks that ExecStart exists: point it at the binary under test.
    let unit = unit.replace("/usr/local/bin/turnd", turnd_bin());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("turnd.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("turnd.service:"),
        "systemd-analyze verify: {stderr}"
    );
}

#[test]
fn bad_config_exits_2_naming_the_key_and_secrets_are_redacted() {
    let run = |envs: &[(&str, &str)]| {
        let out = Command::new(turnd_bin())
            .arg("check-config")
            .env_clear()
            .envs(envs.iter().copied())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, _, err) = run(&[("TURND_WORKER__NO_SUCH_KEY", "1")]);
    assert_eq!(code, Some(2));
    assert!(err.contains("worker.no_such_key"), "{err}");
    let (code, _, err) = run(&[("TURND_TURN__DEADLINE", "5 parsecs")]);
    assert_eq!(code, Some(2));
    assert!(err.contains("turn.deadline"), "{err}");
    let (code, _, err) = run(&[("TURND_DATABASE__URL", "mysql://x:s3cret@h/db")]);
    assert_eq!(code, Some(2));
    assert!(err.contains("database.url") && !err.contains("s3cret"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("turnd.toml");
    std::fs::write(&file, "[amqp]\nprefetch = \"many\"\n").unwrap();
    let out = Command::new(turnd_bin())
        .args(["check-config", "--config"])
        .arg(&file)
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("amqp.prefetch"));
    let (code, out, _) = run(&[
        ("TURND_DATABASE__URL", "postgres://turnd:s3cret@db.example/turnd"),
        ("TURND_AMQP__URL", "amqp://turnd:hunter2@mq/%2f"),
        ("TURND_HTTP__ADMIN_TOKEN", "tok-123456"),
    ]);
    assert_eq!(code, Some(0));
    assert!(out.contains("postgres://turnd:***@db.example/turnd"), "{out}");
    assert!(
        !out.contains("s3cret") && !out.contains("hunter2") && !out.contains("tok-123456"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_deployment_epoch_and_no_secrets() {
    let mut cluster = Cluster::new().await;
    let with_password = cluster.db_url.replace("postgres@", "postgres:s3cret-pw@");
    cluster.set("TURND_DATABASE__URL", &with_password);
    cluster.set("TURND_LOG__FORMAT", "json");
    cluster.set("TURND_LOG__LEVEL", "turnd=debug,info");
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;
    let t = turn("lg", "c1", json!({"action": "error"}));
    let late = turn("lg", "c1", json!({"action": "garbage", "lines": ["not json"]}));
    client.publish(&t).await;
    client.publish(&late).await;
    client.wait_for(&[mid(&t), mid(&late)], T).await;
    let log = cluster.daemon_log(0);
    let dep = deployment_of(&t);
    // An owner's lines carry its span's fields: the deployment and the epoch of its lock.
    let mut from_owner = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line}"));
        if v["span"]["deployment"] == dep.as_str() {
            assert!(
                v["span"]["epoch"].as_u64().is_some_and(|e| e >= 1),
                "an owner's line carries its epoch: {line}"
            );
            from_owner += 1;
        }
    }
    assert!(from_owner >= 1, "some log lines name the deployment and epoch: {log}");
    assert!(!log.contains("s3cret-pw"), "the database password leaked into the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cap_beyond_the_open_files_limit_is_named_at_start() {
    let mut cluster = Cluster::new().await;
    // Three descriptors per worker: a million workers need more than any test machine allows.
    let i = cluster.start_daemon(&[("TURND_WORKER__MAX_WORKERS", "1000000")]).await;
    wait_until(T, "the open-files warning", || {
        let log = strip_ansi(&cluster.daemon_log(i));
        log.contains("worker.max_workers = 1000000 needs about 3000256 open files")
            && log.contains("LimitNOFILE=")
    })
    .await;
    // A cap that fits says nothing.
    let j = cluster.start_daemon(&[("TURND_WORKER__MAX_WORKERS", "8")]).await;
    let mut client = cluster.client().await;
    let t = turn("fd", "c", json!({}));
    client.publish(&t).await;
    client.wait_for(&[mid(&t)], T).await;
    assert!(!strip_ansi(&cluster.daemon_log(j)).contains("open files"));
}

/// The records of deployments and daemons gone for longer than `reply.retention` are purged;
/// a deployment still owned keeps its row (its claims and commits need it) however old its
/// turns, and a conversation that comes back gets a larger epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_deployments_and_daemons_gone_past_retention_are_purged() {
    let mut cluster = Cluster::new().await;
    cluster.set("TURND_REPLY__RETENTION", "1s");
    cluster.set("TURND_SWEEP__INTERVAL", "200ms");
    cluster.set("TURND_WORKER__IDLE_TIMEOUT", "6s");
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;
    let t = json!({"messageId": "r1", "agentId": "a1", "organizationId": "o1",
                   "conversationId": "c1", "payload": {}});
    let dep = deployment_of(&t);
    client.publish(&t).await;
    client.wait_for(&["r1".into()], T).await;

    // A daemon killed long ago, still named as the owner of a deployment of its own. One
    // transaction: a sweep between two inserts purged the daemon before its deployment
    // existed, and that deployment then stayed owned by nobody alive forever.
    let mut tx = cluster.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO turnd_daemons (id, hostname, pid, version, heartbeat_at)
         VALUES ('long-gone', 'h', 1, 'v', now() - interval '1 hour')",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO turnd_deployments (deployment, agent_id, conversation_key, epoch, owner, since)
         VALUES ('a9-0000000000000000', 'a9', 'c9', 1, 'long-gone', now() - interval '1 hour')",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();

    let pool = cluster.pool.clone();
    let rows = |sql: &'static str| {
        let pool = pool.clone();
        async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await.unwrap() }
    };
    // The tombstone outlives retention first; the worker is still alive, so the row stays.
    wait_for_async(T, "the tombstone to be purged", || async {
        rows("SELECT count(*) FROM turnd_turns").await == 0
    })
    .await;
    let owned: Option<String> =
        sqlx::query_scalar("SELECT owner FROM turnd_deployments WHERE deployment = $1")
            .bind(&dep)
            .fetch_one(&cluster.pool)
            .await
            .expect("an owned deployment keeps its row");
    assert_eq!(owned.as_deref(), Some("d0"));
    let epoch: i64 =
        sqlx::query_scalar("SELECT epoch FROM turnd_deployments WHERE deployment = $1")
            .bind(&dep)
            .fetch_one(&cluster.pool)
            .await
            .unwrap();

    // The dead daemon's row and its deployment go; then, once idle and past retention, ours.
    wait_for_async(T, "the dead daemon and its deployment to be purged", || async {
        rows("SELECT count(*) FROM turnd_daemons WHERE id = 'long-gone'").await == 0
            && rows("SELECT count(*) FROM turnd_deployments WHERE agent_id = 'a9'").await == 0
    })
    .await;
    wait_for_async(Duration::from_secs(30), "the idle deployment's row to be purged", || async {
        rows("SELECT count(*) FROM turnd_deployments").await == 0
    })
    .await;
    assert_eq!(rows("SELECT count(*) FROM turnd_daemons WHERE id = 'd0'").await, 1);

    // The conversation comes back: answered, under a larger epoch.
    let t2 = json!({"messageId": "r2", "agentId": "a1", "organizationId": "o1",
                    "conversationId": "c1", "payload": {}});
    client.publish(&t2).await;
    client.wait_for(&["r2".into()], T).await;
    assert_eq!(client.event("r2").unwrap().kind(), "reply");
    let again: i64 =
        sqlx::query_scalar("SELECT epoch FROM turnd_deployments WHERE deployment = $1")
            .bind(&dep)
            .fetch_one(&cluster.pool)
            .await
            .unwrap();
    assert!(again > epoch, "epoch {again} after {epoch}");
}

/// A rollback, or a pod of the old release restarting in the middle of a rollout, runs a
/// turnd older than its database's schema: it must start and serve on it, not refuse because
/// a newer turnd applied a migration it does not know (sqlx's default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turnd_older_than_its_schema_starts_and_serves() {
    let mut cluster = Cluster::new().await;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (99999999, 'from a newer turnd', true, '\\x00', 1)",
    )
    .execute(&cluster.pool)
    .await
    .expect("a newer migration");
    let migrate = cluster.cli(&["migrate"]).await;
    assert!(
        migrate.status.success(),
        "turnd migrate: {}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;
    let e = client.ask(&turn("older", "c1", json!({})), T).await;
    assert_eq!(e.kind(), "reply", "{:?}", e.body);
}
