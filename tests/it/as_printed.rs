//! The command line as users meet it (issue 18, CONTRACT §8): every command the README's quick
//! start and `scripts/demo.sh` print runs as printed; `--config` before or after any
//! subcommand; errors in one line naming what failed and why, each cause once; SIGHUP reloads
//! what can change live and never stops the daemon.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use turnd_harness::*;

const T: Duration = Duration::from_secs(30);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The lines of the fenced block that follows `marker` in `text`.
fn block_after(text: &str, marker: &str) -> Vec<String> {
    let start = text.find(marker).unwrap_or_else(|| panic!("README lost {marker:?}"));
    let rest = &text[start..];
    let open = rest.find("```sh\n").expect("a ```sh block") + "```sh\n".len();
    let body = &rest[open..];
    let body = &body[..body.find("```").expect("closed block")];
    body.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect()
}

/// The commands `scripts/demo.sh` prints for "another terminal".
fn demo_commands() -> Vec<String> {
    let script = std::fs::read_to_string(repo().join("scripts/demo.sh")).expect("demo.sh");
    let start = script.find("cat <<'MSG'\n").expect("demo.sh prints a message") + 12;
    let msg = &script[start..];
    let msg = &msg[..msg.find("\nMSG").expect("message ends")];
    msg.lines().filter(|l| l.starts_with("  ")).map(|l| l.trim().to_owned()).collect()
}

/// A directory laid out as the repository's root is for the demo: `target/release` holds this
/// build's binaries, `target/demo/turnd.toml` is what `scripts/demo-config.sh` writes.
fn demo_root() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let bins = Path::new(turnd_bin()).parent().expect("bin dir");
    std::fs::create_dir_all(dir.path().join("target")).expect("mkdir");
    std::os::unix::fs::symlink(bins, dir.path().join("target/release")).expect("symlink");
    let out = Command::new("bash")
        .arg(repo().join("scripts/demo-config.sh"))
        .arg(dir.path().join("target/demo"))
        .output()
        .expect("run demo-config.sh");
    assert!(out.status.success(), "demo-config.sh: {}", String::from_utf8_lossy(&out.stderr));
    dir
}

/// Runs `line` with bash in `cwd`, with only PATH and `env`.
fn sh(cwd: &Path, line: &str, env: &[(&str, &str)]) -> Output {
    Command::new("bash")
        .args(["-o", "pipefail", "-c", line])
        .current_dir(cwd)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .output()
        .expect("run bash")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_and_the_demo_print_commands_that_work_as_printed() {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README");
    let mut commands = block_after(&readme, "While the demo runs, from another terminal");
    commands.extend(demo_commands());
    assert!(commands.len() >= 6, "{commands:?}");
    assert!(
        commands.iter().all(|c| !c.contains('$')),
        "printed commands need no variable: {commands:?}"
    );

    // The daemon the demo starts: the demo config's default worker (the bundled demo worker),
    // on this test's database, prefix and port instead of the shared ones.
    // Nothing of the harness's tuning either: the daemon and the commands read the same config.
    let mut cluster = Cluster::new().await;
    cluster.env.retain(|(k, _)| {
        k.starts_with("TURND_WORKER_ENV_")
            || ["TURND_DATABASE__URL", "TURND_AMQP__PREFIX"].contains(&k.as_str())
    });
    let port = free_port();
    cluster.set("TURND_HTTP__LISTEN", &format!("127.0.0.1:{port}"));
    let root = demo_root();
    let config = root.path().join("target/demo/turnd.toml");
    let config = config.to_str().expect("utf-8 path");
    let env = [
        ("TURND_DATABASE__URL", cluster.db_url.clone()),
        ("TURND_AMQP__PREFIX", cluster.prefix.clone()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut extra = env.clone();
    let listen = format!("127.0.0.1:{port}");
    extra.push(("TURND_HTTP__LISTEN", &listen));
    cluster.daemon_args = vec!["--config".into(), config.into()];
    cluster.start_daemon(&extra).await;

    for printed in &commands {
        // Isolation: the only change to what is printed is the test's own HTTP port.
        let line = printed.replace("127.0.0.1:9187", &listen);
        let out = sh(root.path(), &line, &env);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(
            out.status.success(),
            "{printed}\nexit {:?}\nstdout {stdout}\nstderr {stderr}",
            out.status
        );
        assert!(!stdout.trim().is_empty(), "{printed} printed nothing; stderr {stderr}");
        if printed.contains(" send ") {
            let event: serde_json::Value = serde_json::from_str(stdout.trim()).expect("an event");
            assert_eq!(event["kind"], "reply", "{printed}: {stdout}");
        }
        if printed.contains(" status ") {
            assert!(stdout.contains("DAEMONS (1)"), "{printed}: {stdout}");
        }
        if printed.contains("/metrics") {
            assert!(stdout.contains("turnd_build_info{"), "{printed}: {stdout}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_is_accepted_before_or_after_any_subcommand() {
    let cluster = Cluster::new().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("turnd.toml");
    std::fs::write(
        &file,
        format!(
            "[database]\nurl = \"{}\"\n[amqp]\nprefix = \"{}\"\n[log]\nlevel = \"warn\"\n",
            cluster.db_url, cluster.prefix
        ),
    )
    .expect("write config");
    let f = file.to_str().expect("utf-8");
    let run = |args: &[&str]| {
        Command::new(turnd_bin()).args(args).env_clear().output().expect("run turnd")
    };
    for args in [
        vec!["--config", f, "parked", "list"],
        vec!["parked", "list", "--config", f],
        vec!["parked", "--config", f, "list"],
        vec!["-c", f, "status", "--json"],
        vec!["status", "--json", "-c", f],
        vec!["check-config", "--config", f],
        vec!["--config", f, "check-config"],
        vec!["migrate", "--config", f],
    ] {
        let out = run(&args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    }
    // The file was read wherever --config stood: a file that does not exist is named.
    for args in [
        vec!["--config", "/nonexistent/t.toml", "status"],
        vec!["status", "--config", "/nonexistent/t.toml"],
    ] {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            text(&out.stderr).contains("/nonexistent/t.toml"),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}

/// One line; `needle` in it exactly once.
fn one_line_with(stderr: &str, needles: &[&str]) {
    assert_eq!(stderr.trim_end().lines().count(), 1, "not one line: {stderr}");
    for n in needles {
        assert_eq!(stderr.matches(n).count(), 1, "{n:?} not said exactly once: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_one_line_naming_the_server_and_the_cause_once() {
    let cluster = Cluster::new().await;
    let closed = free_port();
    // (arguments, environment, what stderr names exactly once)
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, String)>, Vec<String>);
    let cases: Vec<Case> = vec![
        (
            vec!["status"],
            vec![("TURND_DATABASE__URL", format!("postgres://postgres@127.0.0.1:{closed}/x"))],
            vec![format!("127.0.0.1:{closed}"), "Connection refused".into()],
        ),
        (
            vec!["parked", "list"],
            vec![("TURND_DATABASE__URL", "postgres://nosuchrole@127.0.0.1:5432/postgres".into())],
            vec!["user nosuchrole".into(), "role \"nosuchrole\" does not exist".into()],
        ),
        (
            vec!["migrate"],
            vec![(
                "TURND_DATABASE__URL",
                "postgres://postgres@127.0.0.1:5432/turnd_no_such_db".into(),
            )],
            vec!["database \"turnd_no_such_db\" does not exist".into()],
        ),
        (
            vec!["send", "hi"],
            vec![
                ("TURND_DATABASE__URL", cluster.db_url.clone()),
                ("TURND_AMQP__URL", format!("amqp://guest:guest@127.0.0.1:{closed}/%2f")),
            ],
            vec![format!("RabbitMQ at 127.0.0.1:{closed}"), "Connection refused".into()],
        ),
    ];
    for (args, env, needles) in cases {
        let out = Command::new(turnd_bin())
            .args(&args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .expect("run turnd");
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        one_line_with(&text(&out.stderr), &needles);
        assert!(!text(&out.stderr).contains(" at line "), "{}", text(&out.stderr));
    }
}

fn write_config(path: &PathBuf, level: &str, admin: &str) {
    std::fs::write(
        path,
        format!("[log]\nlevel = \"{level}\"\n[http]\nadmin_token = \"{admin}\"\n"),
    )
    .expect("write config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_log_level_and_tokens_and_never_stops_the_daemon() {
    let mut cluster = Cluster::new().await;
    cluster.env.retain(|(k, _)| k != "TURND_LOG__LEVEL");
    let port = free_port();
    cluster.set("TURND_HTTP__LISTEN", &format!("127.0.0.1:{port}"));
    let file = cluster.path("turnd.toml");
    write_config(&file, "info", "first-admin-token");
    let f = file.to_str().expect("utf-8").to_owned();
    cluster.daemon_args = vec!["--config".into(), f];
    cluster.start_daemon(&[]).await;
    let action = "/api/v1/parked/999999/purge";
    let status = |token: &'static str| async move {
        http_post(port, action, Some(token)).await.map(|(s, _)| s)
    };
    assert_ne!(status("first-admin-token").await, Some(403));
    assert_eq!(status("second-admin-token").await, Some(403));

    let reloads = |c: &Cluster| {
        strip_ansi(&c.daemon_log(0)).matches("SIGHUP: configuration reloaded").count()
    };
    write_config(&file, "turnd=debug,info", "second-admin-token");
    cluster.daemons[0].signal(libc::SIGHUP);
    wait_until(T, "the reload logged", || reloads(&cluster) == 1).await;
    let log = strip_ansi(&cluster.daemon_log(0));
    assert!(log.contains("log.level, http.admin_token"), "{log}");
    assert_ne!(status("second-admin-token").await, Some(403));
    assert_eq!(status("first-admin-token").await, Some(403));
    // turnd=debug now shows: the reload's own debug line (logged before its info line).
    assert!(log.contains("log filter replaced"), "{log}");

    // An invalid file changes nothing and stops nothing.
    std::fs::write(&file, "[log]\nlevel = 5\n").expect("write");
    cluster.daemons[0].signal(libc::SIGHUP);
    wait_until(T, "the refusal logged", || {
        strip_ansi(&cluster.daemon_log(0)).contains("SIGHUP: the config is invalid")
    })
    .await;
    assert_ne!(status("second-admin-token").await, Some(403));
    let alive = cluster.daemons[0].child.as_mut().map(|c| matches!(c.try_wait(), Ok(None)));
    assert_eq!(alive, Some(true), "SIGHUP stopped the daemon");
    let (code, _) = http_get(port, "/healthz").await.expect("healthz");
    assert_eq!(code, 200);
    let exit = cluster.daemons[0].terminate(T).await.expect("exits on SIGTERM");
    assert!(exit.success(), "{exit:?}");
}
