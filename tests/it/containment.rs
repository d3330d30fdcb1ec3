//! Containment (issue 15, CONTRACT §5): what a worker of one organization can and cannot reach.
//!
//! Each test has a worker try forbidden things through the test worker's `probe` action and
//! answer its turn normally, so the reply carries what happened to each try.
//!
//! These tests run as root, and root reads any process's `/proc/<pid>/environ` through
//! CAP_SYS_PTRACE whatever its dumpable flag. So the test of the non-dumpable daemon without a
//! sandbox runs the daemon under `setpriv` with an empty capability bounding set: daemon and
//! workers are then processes of one uid without privileges, which is what they are in
//! production (the unit runs as `turnd` with `CapabilityBoundingSet=`). A control process of the
//! same uid, also without capabilities but dumpable, has its environment read by the worker, so
//! the refusal is the daemon's flag and nothing else. Under Landlock no capability matters:
//! the worker's domain may not ptrace (nor open the /proc entries of) anything outside it.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use turnd_harness::*;

const T: Duration = Duration::from_secs(30);

/// The probes' outcomes of a `probe` turn's reply, in order: (ok, error text, text read).
fn results(event: &Event) -> Vec<(bool, String, String)> {
    assert_eq!(event.kind(), "reply", "the turn is answered normally: {:#?}", event.body);
    event.body["payload"]["results"]
        .as_array()
        .expect("probe results")
        .iter()
        .map(|r| {
            (
                r["ok"].as_bool().unwrap_or(false),
                r["error"].as_str().unwrap_or("").to_owned(),
                r["text"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

fn probe_turn(org: &str, conversation: &str, probes: Value) -> Value {
    let mut t = turn("a1", conversation, json!({"action": "probe", "probes": probes}));
    t["organizationId"] = json!(org);
    t
}

/// A file of organization `org2`'s workspace, written by the test as that tenant's data.
fn plant_secret(cluster: &Cluster) -> std::path::PathBuf {
    let ws = cluster.workspace("org2", "a1");
    std::fs::create_dir_all(&ws).expect("org2 workspace");
    let secret = ws.join("secret.txt");
    std::fs::write(&secret, "org2's data").expect("plant secret");
    secret
}

fn denied(outcome: &(bool, String, String), what: &str) {
    assert!(!outcome.0, "{what} must be refused, got {outcome:?}");
    assert!(
        outcome.1.contains("ermission denied") || outcome.1.contains("not permitted"),
        "{what}: refused by the kernel's access checks, got {outcome:?}"
    );
}

fn allowed(outcome: &(bool, String, String), what: &str) {
    assert!(outcome.0, "{what} must work, got {outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_landlock_worker_cannot_reach_the_daemon_other_tenants_or_the_database_yet_answers() {
    let mut cluster = Cluster::new().await;
    cluster.confine_workers("landlock");
    let d = cluster.start_daemon(&[]).await;
    let daemon_pid = cluster.daemons[d].pid().expect("daemon pid");
    let mut client = cluster.client().await;
    let secret = plant_secret(&cluster);

    // Another tenant's worker, alive: its pid is the target of a signal below, and it listens
    // on an abstract Unix socket.
    let abstract_name = format!("turnd-test-{}", cluster.prefix);
    let listen = json!([{"listen_abstract": abstract_name}]);
    let other = client.ask(&probe_turn("org2", "c2", listen), T).await;
    allowed(&results(&other)[0], "listening on an abstract socket");
    let other_pid = other.body["payload"]["pid"].as_i64().expect("org2 worker pid");

    // Where org1's worker is told to keep temporary files.
    let mut env_turn = turn("a1", "c1", json!({"action": "env"}));
    env_turn["organizationId"] = json!("org1");
    let env = client.ask(&env_turn, T).await;
    let own = cluster.workspace("org1", "a1");
    let tmpdir = env.body["payload"]["TMPDIR"].as_str().expect("TMPDIR is set").to_owned();
    assert!(Path::new(&tmpdir).starts_with(&own), "TMPDIR {tmpdir} is inside {own:?}");

    let outside = cluster.path("outside.txt");
    let planted = cluster.workspace("org2", "a1").join("planted.txt");
    let probes = json!([
        {"read": format!("/proc/{daemon_pid}/environ")},
        {"read": format!("/proc/{daemon_pid}/cmdline")},
        {"read": secret.display().to_string()},
        {"write": outside.display().to_string()},
        {"write": planted.display().to_string()},
        {"signal": daemon_pid},
        {"signal": other_pid},
        {"connect": "127.0.0.1:5432"},
        {"bind": "127.0.0.1:0"},
        {"connect_abstract": abstract_name},
        // What it may do:
        {"write": "own.txt"},
        {"write": format!("{tmpdir}/scratch")},
        {"read": "/etc/os-release"},
        {"read": "/proc/self/status"},
        {"read": "/dev/null"},
    ]);
    let event = client.ask(&probe_turn("org1", "c1", probes), T).await;
    let r = results(&event);
    denied(&r[0], "reading the daemon's environment");
    denied(&r[1], "reading the daemon's /proc entries");
    denied(&r[2], "reading another organization's workspace");
    denied(&r[3], "writing outside its workspace");
    denied(&r[4], "writing into another organization's workspace");
    denied(&r[5], "signalling the daemon");
    denied(&r[6], "signalling another worker");
    denied(&r[7], "connecting to PostgreSQL on 127.0.0.1:5432");
    denied(&r[8], "binding a TCP port");
    denied(&r[9], "connecting to another worker's abstract Unix socket");
    allowed(&r[10], "writing its own workspace");
    allowed(&r[11], "writing its TMPDIR");
    allowed(&r[12], "reading /etc");
    allowed(&r[13], "reading its own /proc/self");
    assert!(r[13].2.contains(&format!("Pid:\t{}", event.body["payload"]["pid"])), "{:?}", r[13]);
    allowed(&r[14], "reading /dev/null");
    assert!(!outside.exists() && !planted.exists(), "nothing was written outside");
    assert!(own.join("own.txt").exists());

    // The daemon and the worker carry on: the same worker answers the next turn.
    assert!(process_alive(daemon_pid as i32));
    let mut next = turn("a1", "c1", json!({"text": "still here"}));
    next["organizationId"] = json!("org1");
    let e = client.ask(&next, T).await;
    assert_eq!(e.kind(), "reply");
    assert_eq!(e.body["payload"]["pid"], event.body["payload"]["pid"], "the same worker");
    let log = strip_ansi(&cluster.daemon_log(d));
    assert!(log.contains("workers run under Landlock"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_sandbox_the_non_dumpable_daemon_still_hides_its_environment() {
    let mut cluster = Cluster::new().await;
    cluster.daemon_prefix = WITHOUT_CAPABILITIES.iter().map(|s| (*s).to_owned()).collect();
    let d = cluster.start_daemon(&[]).await;
    let daemon_pid = cluster.daemons[d].pid().expect("daemon pid");
    let mut client = cluster.client().await;
    let secret = plant_secret(&cluster);

    // The control: a dumpable process of the same uid, as unprivileged, with a secret in its
    // environment.
    let mut control = std::process::Command::new(WITHOUT_CAPABILITIES[0])
        .args(&WITHOUT_CAPABILITIES[1..])
        .args(["sleep", "60"])
        .env("CONTROL_SECRET", "visible-to-same-uid")
        .spawn()
        .expect("spawn control");

    // The worker really is unprivileged.
    let probes = json!([
        {"read": "/proc/self/status"},
        {"read": format!("/proc/{daemon_pid}/environ")},
        {"read": format!("/proc/{daemon_pid}/mem")},
        {"read": format!("/proc/{}/environ", control.id())},
        {"read": secret.display().to_string()},
    ]);
    let event = client.ask(&probe_turn("org1", "c1", probes), T).await;
    let _ = control.kill();
    let _ = control.wait();
    let r = results(&event);
    assert!(r[0].2.contains("CapEff:\t0000000000000000"), "{:?}", r[0]);
    denied(&r[1], "reading the non-dumpable daemon's environment");
    denied(&r[2], "reading the non-dumpable daemon's memory");
    allowed(&r[3], "reading a dumpable same-uid process's environment (the control)");
    assert!(r[3].2.contains("CONTROL_SECRET=visible-to-same-uid"), "{:?}", r[3]);
    // Without a sandbox the uid is all that separates tenants: this is what Landlock closes.
    allowed(&r[4], "reading another organization's workspace without a sandbox");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_outside_the_system_directories_runs_only_once_listed_in_sandbox_read() {
    let mut cluster = Cluster::new().await;
    cluster.confine_workers("landlock");
    // The "language runtime": a copy of the test worker in a directory of its own, outside
    // /usr; the worker command is a script in another directory, run by that interpreter.
    let runtime = cluster.path("runtime");
    let bin = cluster.path("bin");
    for dir in [&runtime, &bin] {
        std::fs::create_dir_all(dir).expect("mkdir");
    }
    let interpreter = runtime.join("turnd-test-worker");
    std::fs::copy(test_worker(), &interpreter).expect("copy the runtime");
    let script = bin.join("worker");
    std::fs::write(&script, format!("#!{}\n", interpreter.display())).expect("script");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    cluster.set("TURND_WORKER__COMMAND", &format!("[{:?}]", script.display().to_string()));

    let d0 = cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;
    let unlisted = client.ask(&turn("a1", "c1", json!({"text": "hi"})), T).await;
    assert_eq!(unlisted.kind(), "error", "{:#?}", unlisted.body);
    assert_eq!(unlisted.code(), "WORKER_START_FAILED", "{:#?}", unlisted.body);
    cluster.daemons[d0].terminate(T).await;

    let listed = format!("[{:?}]", runtime.display().to_string());
    cluster.start_daemon(&[("TURND_WORKER__SANDBOX_READ", &listed)]).await;
    let answered = client.ask(&turn("a1", "c2", json!({"text": "hi"})), T).await;
    assert_eq!(answered.kind(), "reply", "{:#?}", answered.body);
    assert_eq!(answered.body["payload"]["text"], "hi");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_uses_landlock_where_the_kernel_has_it() {
    let mut cluster = Cluster::new().await;
    cluster.confine_workers("auto");
    let d = cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;
    let secret = plant_secret(&cluster);
    let probes = json!([{"read": secret.display().to_string()}, {"write": "own.txt"}]);
    let r = results(&client.ask(&probe_turn("org1", "c1", probes), T).await);
    denied(&r[0], "reading another organization's workspace under auto");
    allowed(&r[1], "writing its own workspace under auto");
    let log = strip_ansi(&cluster.daemon_log(d));
    assert!(log.contains("workers run under Landlock"), "{log}");
    assert!(!log.contains("without a sandbox"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_file_stays_closed_inside_a_directory_the_worker_reads() {
    let mut cluster = Cluster::new().await;
    cluster.confine_workers("landlock");
    // A directory the worker may read (sandbox_read) that also holds the daemon's config.
    let shared = cluster.path("shared");
    std::fs::create_dir_all(&shared).expect("mkdir");
    let config = shared.join("turnd.toml");
    std::fs::write(&config, "[log]\nformat = \"pretty\"\n").expect("config");
    std::fs::write(shared.join("model.bin"), "weights").expect("data");
    cluster.daemon_args = vec!["--config".to_owned(), config.display().to_string()];
    let listed = format!("[{:?}]", shared.display().to_string());
    let d = cluster.start_daemon(&[("TURND_WORKER__SANDBOX_READ", &listed)]).await;
    let mut client = cluster.client().await;
    let probes = json!([
        {"read": shared.join("model.bin").display().to_string()},
        {"read": config.display().to_string()},
        {"write": shared.join("model.bin").display().to_string()},
    ]);
    let r = results(&client.ask(&probe_turn("org1", "c1", probes), T).await);
    allowed(&r[0], "reading a file of a sandbox_read directory");
    assert_eq!(r[0].2, "weights");
    denied(&r[1], "reading the config file inside it");
    denied(&r[2], "writing into a sandbox_read directory");
    let log = strip_ansi(&cluster.daemon_log(d));
    assert!(log.contains("carved=true"), "the config was carved out: {log}");
}
