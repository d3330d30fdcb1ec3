//! Worker failure and turn liveness (issue 3): crashes, exits, spawn failures, deadlines,
//! heartbeats, provider failures, late replies, idle reaping, stop escalation, graceful
//! shutdown, the crash-loop guard and garbage on stdout. Every turn still ends exactly once.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use turnd_harness::*;

const T: Duration = Duration::from_secs(20);

/// `worker.command` as a TOML array (JSON string escapes are valid TOML basic strings).
fn argv(args: &[&str]) -> String {
    serde_json::to_string(args).expect("argv")
}

/// Whether the test worker logged receiving `message_id`.
fn ran(cluster: &Cluster, dep: &str, message_id: &str) -> bool {
    cluster
        .worker_log(dep)
        .iter()
        .any(|l| l[0] == "turn" && l.get(3).map(String::as_str) == Some(message_id))
}

fn log_count(cluster: &Cluster, dep: &str, kind: &str) -> usize {
    cluster.worker_log(dep).iter().filter(|l| l[0] == kind).count()
}

fn daemon_log_count(cluster: &Cluster, i: usize, needle: &str) -> usize {
    cluster.daemon_log(i).matches(needle).count()
}

/// The worker's process-group leader as the daemon recorded it (None when it has none).
async fn leader_pid(cluster: &Cluster, dep: &str) -> Option<i32> {
    sqlx::query_scalar::<_, Option<i32>>(
        "SELECT worker_pid FROM turnd_deployments WHERE deployment = $1",
    )
    .bind(dep)
    .fetch_optional(&cluster.pool)
    .await
    .expect("read worker_pid")
    .flatten()
}

async fn turn_state(cluster: &Cluster, dep: &str, message_id: &str) -> String {
    sqlx::query_scalar("SELECT state FROM turnd_turns WHERE deployment = $1 AND message_id = $2")
        .bind(dep)
        .bind(message_id)
        .fetch_one(&cluster.pool)
        .await
        .expect("turn state")
}

fn reply_pid(client: &Client, id: &str) -> i64 {
    let e = client.event(id).expect("event");
    assert_eq!(e.kind(), "reply", "{id} was answered: {}", e.body);
    e.body["payload"]["pid"].as_i64().expect("pid in reply")
}

fn error_message(client: &Client, id: &str) -> String {
    client.event(id).expect("event").body["error"]["message"].as_str().unwrap_or("").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_fails_every_pending_turn_at_once_and_a_new_worker_takes_over() {
    let mut cluster = Cluster::new().await;
    // turn.deadline stays at 5 s: the errors below must come from the crash, not a deadline.
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;

    let hang = turn("a1", "c1", json!({"action": "hang"}));
    let dep = deployment_of(&hang);
    client.publish(&hang).await;
    wait_until(T, "the hanging turn reached its worker", || ran(&cluster, &dep, &mid(&hang))).await;
    let queued: Vec<Value> =
        (0..2).map(|i| turn("a1", "c1", json!({"text": format!("q{i}")}))).collect();
    for q in &queued {
        client.publish(q).await;
    }
    wait_for_async(T, "both queued turns armed", || async { cluster.pending().await == 3 }).await;
    let pid = cluster.worker_pid(&dep).expect("worker pid file");
    assert!(process_alive(pid));

    let mut ids = vec![mid(&hang)];
    ids.extend(queued.iter().map(mid));
    let killed = Instant::now();
    // SAFETY: sends a signal to the test worker's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    client.wait_for(&ids, T).await;
    let latency = killed.elapsed();
    eprintln!("worker SIGKILL -> WORKER_DIED for all 3 pending turns received after {latency:?}");
    assert!(latency < Duration::from_secs(1), "crash fast path took {latency:?}");
    for id in &ids {
        let e = client.event(id).unwrap();
        assert_eq!(e.code(), "WORKER_DIED", "{id}: {}", e.body);
        assert!(error_message(&client, id).contains("signal 9"), "{}", e.body);
    }
    // The queued turns were failed, never given to anyone.
    for q in &queued {
        assert!(!ran(&cluster, &dep, &mid(q)));
    }

    // The next turn of the conversation is answered by a new worker under a new epoch.
    let next = turn("a1", "c1", json!({"text": "after"}));
    client.publish(&next).await;
    client.wait_for(&[mid(&next)], T).await;
    assert_ne!(reply_pid(&client, &mid(&next)), i64::from(pid), "a fresh worker");
    assert!(!process_alive(pid));
    let starts: Vec<i64> = cluster
        .worker_log(&dep)
        .iter()
        .filter(|l| l[0] == "start")
        .map(|l| l[2].parse().unwrap())
        .collect();
    assert_eq!(starts.len(), 2);
    assert!(starts[1] > starts[0], "epochs grow: {starts:?}");

    client.drain_for(Duration::from_millis(500)).await;
    ids.push(mid(&next));
    client.assert_exactly_once_and_nothing_else(&ids);
    assert_eq!(cluster.pending().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_exits_without_replying_fails_its_turn_with_worker_died() {
    let mut cluster = Cluster::new().await;
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;

    let exit0 = turn("a1", "c1", json!({"action": "exit0"}));
    let exit3 = turn("a1", "c2", json!({"action": "exit_code", "code_num": 3}));
    let started = Instant::now();
    client.publish(&exit0).await;
    client.publish(&exit3).await;
    client.wait_for(&[mid(&exit0), mid(&exit3)], T).await;
    // Well before turn.deadline (5 s): the exit itself is noticed.
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    assert_eq!(client.event(&mid(&exit0)).unwrap().code(), "WORKER_DIED");
    assert!(
        error_message(&client, &mid(&exit0)).contains("code 0"),
        "{}",
        error_message(&client, &mid(&exit0))
    );
    assert_eq!(client.event(&mid(&exit3)).unwrap().code(), "WORKER_DIED");
    assert!(error_message(&client, &mid(&exit3)).contains("code 3"));

    let again = turn("a1", "c1", json!({"text": "still there"}));
    client.publish(&again).await;
    client.wait_for(&[mid(&again)], T).await;
    assert_eq!(client.event(&mid(&again)).unwrap().body["payload"]["text"], "still there");
    client.drain_for(Duration::from_millis(300)).await;
    client.assert_exactly_once_and_nothing_else(&[mid(&exit0), mid(&exit3), mid(&again)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_cannot_be_started_fails_with_worker_start_failed_and_the_daemon_keeps_serving()
 {
    for missing in [true, false] {
        let mut cluster = Cluster::new().await;
        let (command, needle) = if missing {
            (argv(&["/nonexistent/worker"]), "/nonexistent/worker")
        } else {
            use std::os::unix::fs::PermissionsExt;
            let path = cluster.path("not-executable");
            std::fs::write(&path, "#!/bin/sh\necho never\n").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            (argv(&[path.to_str().unwrap()]), "ermission denied")
        };
        let d = cluster.start_daemon(&[("TURND_WORKER__COMMAND", &command)]).await;
        let mut client = cluster.client().await;
        let first = turn("a1", "c1", json!({}));
        let started = Instant::now();
        client.publish(&first).await;
        client.wait_for(&[mid(&first)], T).await;
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
        let e = client.event(&mid(&first)).unwrap().clone();
        assert_eq!(e.code(), "WORKER_START_FAILED", "{}", e.body);
        let message = error_message(&client, &mid(&first));
        assert!(message.contains(needle), "the message says why: {message}");

        // The daemon is still alive and serving: another conversation, and the same one again.
        let pid = cluster.daemons[d].pid().unwrap() as i32;
        assert!(process_alive(pid), "the daemon survived the spawn failure");
        let other = turn("a1", "c2", json!({}));
        let same = turn("a1", "c1", json!({}));
        let started = Instant::now();
        client.publish(&other).await;
        client.publish(&same).await;
        client.wait_for(&[mid(&other), mid(&same)], T).await;
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
        assert_eq!(client.event(&mid(&other)).unwrap().code(), "WORKER_START_FAILED");
        assert_eq!(client.event(&mid(&same)).unwrap().code(), "WORKER_START_FAILED");
        assert!(process_alive(pid));
        client.drain_for(Duration::from_millis(300)).await;
        client.assert_exactly_once_and_nothing_else(&[mid(&first), mid(&other), mid(&same)]);
        assert_eq!(cluster.pending().await, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_worker_times_out_and_is_replaced() {
    let mut cluster = Cluster::new().await;
    cluster.start_daemon(&[("TURND_TURN__DEADLINE", "1s")]).await;
    let mut client = cluster.client().await;

    let hang = turn("a1", "c1", json!({"action": "hang"}));
    let dep = deployment_of(&hang);
    let started = Instant::now();
    client.publish(&hang).await;
    wait_until(T, "the hanging turn reached its worker", || ran(&cluster, &dep, &mid(&hang))).await;
    let pid = cluster.worker_pid(&dep).unwrap();
    client.wait_for(&[mid(&hang)], T).await;
    let took = started.elapsed();
    eprintln!("hung turn -> TURN_TIMEOUT after {took:?} (turn.deadline 1s)");
    assert_eq!(client.event(&mid(&hang)).unwrap().code(), "TURN_TIMEOUT");
    assert!(took >= Duration::from_secs(1), "not before the deadline: {took:?}");
    assert!(took < Duration::from_secs(3), "soon after the deadline: {took:?}");
    // A hung worker is not given the next turn: it is stopped, and a fresh one answers.
    wait_until(Duration::from_secs(5), "the hung worker stopped", || !process_alive(pid)).await;
    let next = turn("a1", "c1", json!({"text": "next"}));
    client.publish(&next).await;
    client.wait_for(&[mid(&next)], T).await;
    assert_ne!(reply_pid(&client, &mid(&next)), i64::from(pid));
    client.drain_for(Duration::from_millis(300)).await;
    client.assert_exactly_once_and_nothing_else(&[mid(&hang), mid(&next)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_a_long_turn_alive_past_its_deadline() {
    let mut cluster = Cluster::new().await;
    cluster.start_daemon(&[("TURND_TURN__DEADLINE", "1s")]).await;
    let mut client = cluster.client().await;

    let long = turn(
        "a1",
        "c1",
        json!({"action": "heartbeat", "interval_ms": 100, "duration_ms": 3000, "text": "done"}),
    );
    let started = Instant::now();
    client.publish(&long).await;
    client.wait_for(&[mid(&long)], T).await;
    let took = started.elapsed();
    let e = client.event(&mid(&long)).unwrap();
    assert_eq!(e.kind(), "reply", "heartbeats kept it alive: {}", e.body);
    assert_eq!(e.body["payload"]["text"], "done");
    assert!(took >= Duration::from_secs(3), "three deadlines long: {took:?}");
    client.drain_for(Duration::from_millis(1500)).await;
    client.assert_exactly_once_and_nothing_else(&[mid(&long)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_failure_fails_the_turn_with_its_code_despite_heartbeats() {
    let mut cluster = Cluster::new().await;
    cluster.start_daemon(&[("TURND_TURN__DEADLINE", "1s")]).await;
    let mut client = cluster.client().await;

    let failing = turn(
        "a1",
        "c1",
        json!({"action": "provider_failed", "code": "PROVIDER_QUOTA_EXHAUSTED", "interval_ms": 100}),
    );
    let dep = deployment_of(&failing);
    let started = Instant::now();
    client.publish(&failing).await;
    wait_until(T, "the turn reached its worker", || ran(&cluster, &dep, &mid(&failing))).await;
    let pid = cluster.worker_pid(&dep).unwrap();
    client.wait_for(&[mid(&failing)], T).await;
    let took = started.elapsed();
    let e = client.event(&mid(&failing)).unwrap();
    assert_eq!(e.code(), "PROVIDER_QUOTA_EXHAUSTED", "{}", e.body);
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(4),
        "once its deadline lapsed: {took:?}"
    );

    // The heartbeating worker no longer holds the conversation: the next turn is answered.
    let next = turn("a1", "c1", json!({"text": "next"}));
    client.publish(&next).await;
    client.wait_for(&[mid(&next)], T).await;
    assert_ne!(
        reply_pid(&client, &mid(&next)),
        i64::from(pid),
        "the worker whose turn lapsed was not given the next"
    );
    assert!(!process_alive(pid), "and it was stopped");
    client.drain_for(Duration::from_millis(300)).await;
    client.assert_exactly_once_and_nothing_else(&[mid(&failing), mid(&next)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_after_the_deadline_fired_is_dropped() {
    let mut cluster = Cluster::new().await;
    // The worker survives SIGTERM for long enough to write its late reply.
    cluster
        .start_daemon(&[
            ("TURND_TURN__DEADLINE", "1s"),
            ("TURND_WORKER__STOP_TIMEOUT", "10s"),
            ("TURND_WORKER_ENV_TEST_WORKER_IGNORE_TERM", "1"),
        ])
        .await;
    let mut client = cluster.client().await;

    let slow = turn("a1", "c1", json!({"action": "sleep", "ms": 2500, "text": "late"}));
    let dep = deployment_of(&slow);
    let started = Instant::now();
    client.publish(&slow).await;
    client.wait_for(&[mid(&slow)], T).await;
    assert_eq!(client.event(&mid(&slow)).unwrap().code(), "TURN_TIMEOUT");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "the timeout came first: {:?}",
        started.elapsed()
    );
    let next = turn("a1", "c1", json!({"text": "next"}));
    client.publish(&next).await;

    // The late reply is written (and dropped by the daemon) …
    wait_until(T, "the late reply was seen and dropped", || {
        daemon_log_count(&cluster, 0, "reply for a turn that is not pending here; dropped") >= 1
    })
    .await;
    // … and never becomes a second event, however long we listen.
    client.wait_for(&[mid(&next)], T).await;
    client.drain_for(Duration::from_millis(1500)).await;
    client.assert_exactly_once_and_nothing_else(&[mid(&slow), mid(&next)]);
    assert_eq!(client.event(&mid(&slow)).unwrap().code(), "TURN_TIMEOUT");
    let outbox: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM turnd_outbox WHERE deployment = $1 AND message_id = $2",
    )
    .bind(&dep)
    .bind(mid(&slow))
    .fetch_one(&cluster.pool)
    .await
    .unwrap();
    assert_eq!(outbox, 1);
    // The next turn went to a fresh worker, not the one whose turn lapsed.
    assert_eq!(log_count(&cluster, &dep, "start"), 2);
    let first_pid = cluster.worker_log(&dep)[0][1].parse::<i64>().unwrap();
    assert_ne!(reply_pid(&client, &mid(&next)), first_pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_is_reaped_without_failing_anything_and_a_fresh_one_answers_next() {
    let mut cluster = Cluster::new().await;
    cluster.start_daemon(&[("TURND_WORKER__IDLE_TIMEOUT", "500ms")]).await;
    let mut client = cluster.client().await;

    let first = turn("a1", "c1", json!({"text": "one"}));
    let dep = deployment_of(&first);
    client.publish(&first).await;
    client.wait_for(&[mid(&first)], T).await;
    let answered = Instant::now();
    let pid = reply_pid(&client, &mid(&first)) as i32;
    wait_until(Duration::from_secs(5), "the idle worker stopped", || !process_alive(pid)).await;
    let idle_for = answered.elapsed();
    eprintln!("idle worker gone {idle_for:?} after its last reply (idle_timeout 500ms)");
    assert!(idle_for >= Duration::from_millis(400), "not before idle_timeout: {idle_for:?}");
    // It was asked to stop (stdin closed and SIGTERM: the worker logs its exit, possibly once
    // for each) and nothing failed.
    wait_until(Duration::from_secs(2), "exit logged", || log_count(&cluster, &dep, "exit") >= 1)
        .await;
    wait_for_async(Duration::from_secs(5), "worker record cleared", || async {
        leader_pid(&cluster, &dep).await.is_none()
    })
    .await;
    client.drain_for(Duration::from_millis(300)).await;
    client.assert_exactly_once_and_nothing_else(&[mid(&first)]);

    // A turn longer than idle_timeout is never reaped mid-way.
    let long = turn("a1", "c1", json!({"action": "sleep", "ms": 1500, "text": "long"}));
    let quick = turn("a1", "c1", json!({"text": "right after"}));
    client.publish(&long).await;
    client.publish(&quick).await;
    client.wait_for(&[mid(&long), mid(&quick)], T).await;
    let p2 = reply_pid(&client, &mid(&long));
    assert_ne!(p2, i64::from(pid), "a fresh worker");
    assert_eq!(reply_pid(&client, &mid(&quick)), p2, "the same worker answered both");
    assert_eq!(client.event(&mid(&long)).unwrap().body["payload"]["text"], "long");
    assert_eq!(log_count(&cluster, &dep, "start"), 2);
    client.drain_for(Duration::from_millis(300)).await;
    client.assert_exactly_once_and_nothing_else(&[mid(&first), mid(&long), mid(&quick)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_ignores_sigterm_is_killed_after_stop_timeout() {
    let mut cluster = Cluster::new().await;
    // The test worker leaves on stdin EOF, which a stop also sends; so the group leader is a
    // shell that ignores SIGTERM and lingers after the worker exits, like a stuck wrapper.
    let command = argv(&["/bin/sh", "-c", "trap '' TERM; \"$0\"; exec sleep 600", test_worker()]);
    cluster
        .start_daemon(&[
            ("TURND_WORKER__COMMAND", &command),
            ("TURND_WORKER__IDLE_TIMEOUT", "500ms"),
            ("TURND_WORKER__STOP_TIMEOUT", "1500ms"),
            ("TURND_WORKER_ENV_TEST_WORKER_IGNORE_TERM", "1"),
        ])
        .await;
    let mut client = cluster.client().await;

    let first = turn("a1", "c1", json!({}));
    let dep = deployment_of(&first);
    client.publish(&first).await;
    client.wait_for(&[mid(&first)], T).await;
    let answered = Instant::now();
    let leader = leader_pid(&cluster, &dep).await.expect("the daemon records the worker's pid");
    assert!(process_alive(leader));
    assert_ne!(i64::from(leader), reply_pid(&client, &mid(&first)), "the leader is the wrapper");

    // The idle stop begins; a turn that arrives while the worker is being stopped is answered
    // by a fresh worker as soon as the old one is gone, not left for adoption.
    wait_until(Duration::from_secs(5), "idle stop started", || {
        daemon_log_count(&cluster, 0, "worker idle for worker.idle_timeout; stopping it") == 1
    })
    .await;
    let during = turn("a1", "c1", json!({"text": "during the stop"}));
    client.publish(&during).await;

    wait_until(Duration::from_secs(10), "the TERM-ignoring worker is gone", || {
        !process_alive(leader)
    })
    .await;
    let gone = answered.elapsed();
    eprintln!(
        "TERM-ignoring idle worker gone {gone:?} after its last reply (idle 500ms + stop_timeout 1500ms)"
    );
    assert!(
        gone >= Duration::from_millis(1800),
        "SIGTERM alone did not stop it, SIGKILL came after stop_timeout: {gone:?}"
    );
    assert!(gone <= Duration::from_millis(4000), "SIGKILL came soon after stop_timeout: {gone:?}");
    assert!(daemon_log_count(&cluster, 0, "worker ignored SIGTERM; killing it") >= 1);

    client.wait_for(&[mid(&during)], T).await;
    let stopped_to_answer = answered.elapsed() - gone;
    assert_eq!(client.event(&mid(&during)).unwrap().kind(), "reply");
    assert!(
        stopped_to_answer < Duration::from_secs(2),
        "answered right after the old worker exited: {stopped_to_answer:?}"
    );
    assert_ne!(leader_pid(&cluster, &dep).await, Some(leader));
    client.drain_for(Duration::from_millis(300)).await;
    client.assert_exactly_once_and_nothing_else(&[mid(&first), mid(&during)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_worker_that_ignores_sigterm_is_killed_after_stop_timeout() {
    let mut cluster = Cluster::new().await;
    cluster
        .start_daemon(&[
            ("TURND_TURN__DEADLINE", "1s"),
            ("TURND_WORKER__STOP_TIMEOUT", "1500ms"),
            ("TURND_WORKER_ENV_TEST_WORKER_IGNORE_TERM", "1"),
        ])
        .await;
    let mut client = cluster.client().await;
    let hang = turn("a1", "c1", json!({"action": "hang"}));
    let dep = deployment_of(&hang);
    client.publish(&hang).await;
    wait_until(T, "the hanging turn reached its worker", || ran(&cluster, &dep, &mid(&hang))).await;
    let pid = cluster.worker_pid(&dep).unwrap();
    client.wait_for(&[mid(&hang)], T).await;
    let timed_out = Instant::now();
    assert_eq!(client.event(&mid(&hang)).unwrap().code(), "TURN_TIMEOUT");
    wait_until(Duration::from_secs(10), "the hung worker is gone", || !process_alive(pid)).await;
    let gone = timed_out.elapsed();
    eprintln!("hung TERM-ignoring worker gone {gone:?} after TURN_TIMEOUT (stop_timeout 1500ms)");
    assert!(gone >= Duration::from_millis(1200), "SIGKILL only after stop_timeout: {gone:?}");
    assert!(gone <= Duration::from_millis(3500), "{gone:?}");
    assert_eq!(log_count(&cluster, &dep, "exit"), 0, "it never left on its own");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_running_turn_finish_and_leaves_the_queued_one_for_the_next_daemon() {
    let mut cluster = Cluster::new().await;
    let d = cluster.start_daemon(&[]).await; // shutdown.grace 5 s
    let mut client = cluster.client().await;

    let running = turn("a1", "c1", json!({"action": "sleep", "ms": 1000, "text": "finished"}));
    let queued = turn("a1", "c1", json!({"text": "later"}));
    let dep = deployment_of(&running);
    client.publish(&running).await;
    wait_until(T, "the first turn is running", || ran(&cluster, &dep, &mid(&running))).await;
    client.publish(&queued).await;
    wait_for_async(T, "the second turn is armed", || async { cluster.pending().await == 2 }).await;
    let pid = cluster.worker_pid(&dep).unwrap();

    let signalled = Instant::now();
    let status =
        cluster.daemons[d].terminate(Duration::from_secs(15)).await.expect("the daemon exited");
    let took = signalled.elapsed();
    eprintln!("daemon exited {took:?} after SIGTERM with {status}");
    assert!(status.success(), "exit status {status}");
    assert!(took < Duration::from_secs(5), "within shutdown.grace: {took:?}");
    assert!(!process_alive(pid), "no worker outlives its daemon");

    client.wait_for(&[mid(&running)], T).await;
    let e = client.event(&mid(&running)).unwrap();
    assert_eq!(e.kind(), "reply", "the running turn finished: {}", e.body);
    assert_eq!(e.body["payload"]["text"], "finished");
    client.drain_for(Duration::from_millis(300)).await;
    assert!(
        client.event(&mid(&queued)).is_none(),
        "the queued turn is not failed by a graceful stop"
    );
    assert_eq!(turn_state(&cluster, &dep, &mid(&queued)).await, "queued");
    assert!(!ran(&cluster, &dep, &mid(&queued)));

    cluster.restart(d).await;
    client.wait_for(&[mid(&queued)], T).await;
    assert_eq!(client.event(&mid(&queued)).unwrap().body["payload"]["text"], "later");
    assert_ne!(reply_pid(&client, &mid(&queued)), i64::from(pid));
    client.drain_for(Duration::from_millis(300)).await;
    client.assert_exactly_once_and_nothing_else(&[mid(&running), mid(&queued)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_looping_worker_backs_off_and_its_turns_fail_fast() {
    let mut cluster = Cluster::new().await;
    cluster.start_daemon(&[]).await;
    let mut client = cluster.client().await;

    let mut codes = Vec::new();
    let mut ids = Vec::new();
    let mut dep = String::new();
    for i in 0..8 {
        let t = turn("a1", "c1", json!({"action": "crash"}));
        dep = deployment_of(&t);
        let sent = Instant::now();
        client.publish(&t).await;
        client.wait_for(&[mid(&t)], T).await;
        let took = sent.elapsed();
        let code = client.event(&mid(&t)).unwrap().code().to_owned();
        eprintln!("crash turn {i}: {code} after {took:?}");
        assert!(took < Duration::from_secs(2), "turn {i} ended fast: {took:?}");
        codes.push(code);
        ids.push(mid(&t));
    }
    let died = codes.iter().take_while(|c| *c == "WORKER_DIED").count();
    assert_eq!(
        died,
        turnd::store::CRASH_THRESHOLD as usize,
        "crashes up to the threshold first: {codes:?}"
    );
    assert!(codes[died..].iter().all(|c| c == "WORKER_CRASH_LOOP"), "then the guard: {codes:?}");
    let starts = log_count(&cluster, &dep, "start");
    assert_eq!(starts, died, "no worker was started while backing off");
    assert!(starts < ids.len(), "fewer starts ({starts}) than turns ({})", ids.len());
    let message = error_message(&client, ids.last().unwrap());
    assert!(message.contains("back"), "{message}");

    // The record is in PostgreSQL: another daemon honours the back-off too.
    let d1 = cluster.start_daemon(&[]).await;
    let status =
        cluster.daemons[0].terminate(Duration::from_secs(15)).await.expect("first daemon exited");
    assert!(status.success());
    let t = turn("a1", "c1", json!({"action": "crash"}));
    let sent = Instant::now();
    client.publish(&t).await;
    client.wait_for(&[mid(&t)], T).await;
    assert_eq!(client.event(&mid(&t)).unwrap().code(), "WORKER_CRASH_LOOP");
    assert!(sent.elapsed() < Duration::from_secs(2), "{:?}", sent.elapsed());
    assert!(cluster.daemon_log(d1).contains("turnd ready"));
    assert_eq!(
        log_count(&cluster, &dep, "start"),
        starts,
        "the other daemon started no worker either"
    );
    ids.push(mid(&t));

    // The back-off ends: a healthy turn is then answered again.
    let until: f64 = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM (backoff_until - now()))::float8 FROM turnd_deployments WHERE deployment = $1",
    )
    .bind(&dep)
    .fetch_one(&cluster.pool)
    .await
    .unwrap();
    assert!(until > 0.0 && until < 310.0, "a bounded back-off is in force: {until}");
    wait_for_async(Duration::from_secs(30), "the back-off is over", || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT backoff_until < now() FROM turnd_deployments WHERE deployment = $1",
        )
        .bind(&dep)
        .fetch_one(&cluster.pool)
        .await
        .unwrap()
    })
    .await;
    let healthy = turn("a1", "c1", json!({"text": "better now"}));
    client.publish(&healthy).await;
    client.wait_for(&[mid(&healthy)], T).await;
    assert_eq!(client.event(&mid(&healthy)).unwrap().body["payload"]["text"], "better now");
    client.drain_for(Duration::from_millis(300)).await;
    ids.push(mid(&healthy));
    client.assert_exactly_once_and_nothing_else(&ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_stdout_is_logged_and_ignored() {
    let mut cluster = Cluster::new().await;
    // Real binary noise (invalid UTF-8, NUL) before the worker starts, from a wrapper.
    let command = argv(&[
        "/bin/sh",
        "-c",
        "printf '\\377\\376\\000\\001\\033[31mnoise\\n'; exec \"$0\"",
        test_worker(),
    ]);
    cluster
        .start_daemon(&[
            ("TURND_WORKER__MAX_LINE_BYTES", "2048"),
            ("TURND_WORKER__COMMAND", &command),
        ])
        .await;
    let mut client = cluster.client().await;

    let id = uuid::Uuid::new_v4().to_string();
    let oversized_reply =
        format!(r#"{{"type":"reply","messageId":"{id}","payload":"{}"}}"#, "y".repeat(3000));
    let lines = vec![
        "not json at all".to_owned(),
        r#"{"type":"heartbeat""#.to_owned(),
        "[1,2,3]".to_owned(),
        r#"{"type":"bogus"}"#.to_owned(),
        r#"{"no":"type"}"#.to_owned(),
        r#"{"type":"reply"}"#.to_owned(),
        r#"{"type":"reply","messageId":"someone-else","payload":1}"#.to_owned(),
        "\u{0}\u{1}\u{7f}\u{ff}\u{fffd}\u{1b}[2J".to_owned(),
        "x".repeat(5000),
        oversized_reply,
        String::new(),
    ];
    let t = json!({
        "messageId": id, "agentId": "a1", "organizationId": "org1", "conversationId": "c1",
        "payload": {"action": "garbage", "lines": lines, "text": "survived"},
    });
    let dep = deployment_of(&t);
    client.publish(&t).await;
    client.wait_for(std::slice::from_ref(&id), T).await;
    let e = client.event(&id).unwrap();
    assert_eq!(e.kind(), "reply", "{}", e.body);
    assert_eq!(e.body["payload"]["text"], "survived", "the real reply, not the over-long one");
    let pid = reply_pid(&client, &id);

    // Ten bad lines from the worker, one from its wrapper.
    let invalid = daemon_log_count(&cluster, 0, "worker wrote a line that is not protocol");
    assert_eq!(invalid, 11, "each bad line is logged once");
    assert!(daemon_log_count(&cluster, 0, "exceeds worker.max_line_bytes (2048)") >= 2);
    assert!(
        daemon_log_count(&cluster, 0, "not pending here") >= 1,
        "a reply for another turn is dropped"
    );

    // The same worker keeps serving.
    let next = turn("a1", "c1", json!({"text": "next"}));
    client.publish(&next).await;
    client.wait_for(&[mid(&next)], T).await;
    assert_eq!(reply_pid(&client, &mid(&next)), pid);
    assert_eq!(log_count(&cluster, &dep, "start"), 1);
    client.drain_for(Duration::from_millis(300)).await;
    client.assert_exactly_once_and_nothing_else(&[id, mid(&next)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_never_reads_stdin_cannot_wedge_its_deployment() {
    let mut cluster = Cluster::new().await;
    // A worker that never reads its stdin, given a turn larger than a pipe holds.
    let command = argv(&["/bin/sh", "-c", "exec sleep 600"]);
    let d = cluster
        .start_daemon(&[
            ("TURND_WORKER__COMMAND", &command),
            ("TURND_TURN__DEADLINE", "1s"),
            ("TURND_WORKER__STOP_TIMEOUT", "500ms"),
        ])
        .await;
    let mut client = cluster.client().await;
    let big = turn("a1", "c1", json!({"text": "z".repeat(200_000)}));
    let dep = deployment_of(&big);
    client.publish(&big).await;
    wait_for_async(T, "the worker started", || async {
        leader_pid(&cluster, &dep).await.is_some()
    })
    .await;
    let leader = leader_pid(&cluster, &dep).await.expect("worker pid");
    client.wait_for(&[mid(&big)], T).await;
    assert_eq!(client.event(&mid(&big)).unwrap().code(), "TURN_TIMEOUT");
    // Its owner is not stuck writing to it: the worker is stopped like any hung worker …
    wait_until(Duration::from_secs(5), "the silent worker stopped", || !process_alive(leader))
        .await;
    // … and the daemon shuts down promptly.
    let status =
        cluster.daemons[d].terminate(Duration::from_secs(10)).await.expect("daemon exited");
    assert!(status.success());
    client.drain_for(Duration::from_millis(300)).await;
    client.assert_exactly_once_and_nothing_else(&[mid(&big)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_from_an_idle_worker_do_not_keep_it_alive() {
    let mut cluster = Cluster::new().await;
    // The worker's group heartbeats every 100 ms whether or not a turn is pending.
    let command = argv(&[
        "/bin/sh",
        "-c",
        "( while :; do echo '{\"type\":\"heartbeat\"}'; sleep 0.1; done ) & exec \"$0\"",
        test_worker(),
    ]);
    cluster
        .start_daemon(&[
            ("TURND_WORKER__COMMAND", &command),
            ("TURND_WORKER__IDLE_TIMEOUT", "500ms"),
        ])
        .await;
    let mut client = cluster.client().await;
    let t = turn("a1", "c1", json!({}));
    client.publish(&t).await;
    client.wait_for(&[mid(&t)], T).await;
    let answered = Instant::now();
    let pid = reply_pid(&client, &mid(&t)) as i32;
    wait_until(Duration::from_secs(5), "the idle (but heartbeating) worker stopped", || {
        !process_alive(pid)
    })
    .await;
    let idle_for = answered.elapsed();
    eprintln!(
        "heartbeating idle worker gone {idle_for:?} after its last reply (idle_timeout 500ms)"
    );
    assert!(
        idle_for >= Duration::from_millis(400) && idle_for < Duration::from_secs(3),
        "{idle_for:?}"
    );
    client.drain_for(Duration::from_millis(300)).await;
    client.assert_exactly_once_and_nothing_else(&[mid(&t)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_workers_the_least_recently_used_idle_worker_is_evicted() {
    let mut cluster = Cluster::new().await;
    cluster.start_daemon(&[("TURND_WORKER__MAX_WORKERS", "1")]).await;
    let mut client = cluster.client().await;

    let c1 = turn("a1", "c1", json!({}));
    client.publish(&c1).await;
    client.wait_for(&[mid(&c1)], T).await;
    let p1 = reply_pid(&client, &mid(&c1)) as i32;

    let c2 = turn("a1", "c2", json!({}));
    let sent = Instant::now();
    client.publish(&c2).await;
    client.wait_for(&[mid(&c2)], T).await;
    assert!(sent.elapsed() < Duration::from_secs(2), "no wait for adoption: {:?}", sent.elapsed());
    let p2 = reply_pid(&client, &mid(&c2)) as i32;
    assert_ne!(p1, p2);
    wait_until(Duration::from_secs(5), "the evicted worker stopped", || !process_alive(p1)).await;
    assert!(process_alive(p2), "the new one stays");

    let again = turn("a1", "c1", json!({}));
    client.publish(&again).await;
    client.wait_for(&[mid(&again)], T).await;
    let p3 = reply_pid(&client, &mid(&again)) as i32;
    assert_ne!(p3, p1);
    wait_until(Duration::from_secs(5), "the second worker evicted in turn", || !process_alive(p2))
        .await;
    client.drain_for(Duration::from_millis(300)).await;
    client.assert_exactly_once_and_nothing_else(&[mid(&c1), mid(&c2), mid(&again)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_still_running_when_the_grace_is_over_gets_worker_stopped() {
    let mut cluster = Cluster::new().await;
    let d = cluster.start_daemon(&[("TURND_SHUTDOWN__GRACE", "1s")]).await;
    let mut client = cluster.client().await;
    let long = turn("a1", "c1", json!({"action": "sleep", "ms": 30000}));
    let dep = deployment_of(&long);
    client.publish(&long).await;
    wait_until(T, "the turn is running", || ran(&cluster, &dep, &mid(&long))).await;
    let pid = cluster.worker_pid(&dep).unwrap();

    let signalled = Instant::now();
    let status =
        cluster.daemons[d].terminate(Duration::from_secs(15)).await.expect("the daemon exited");
    let took = signalled.elapsed();
    eprintln!("daemon with a 30 s turn exited {took:?} after SIGTERM (grace 1s)");
    assert!(status.success(), "{status}");
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(4), "{took:?}");
    assert!(!process_alive(pid));
    client.wait_for(&[mid(&long)], T).await;
    assert_eq!(client.event(&mid(&long)).unwrap().code(), "WORKER_STOPPED");
    client.drain_for(Duration::from_millis(300)).await;
    client.assert_exactly_once_and_nothing_else(&[mid(&long)]);
    assert_eq!(cluster.pending().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_dies_with_its_daemon_and_its_turn_fails_when_the_deployment_is_taken_over() {
    let mut cluster = Cluster::new().await;
    // A deadline far away: the orphaned turn must end by the take-over, not by the sweep.
    let extra = [("TURND_TURN__DEADLINE", "60s")];
    let d = cluster.start_daemon(&extra).await;
    let mut client = cluster.client().await;
    let hang = turn("a1", "c1", json!({"action": "hang"}));
    let dep = deployment_of(&hang);
    client.publish(&hang).await;
    wait_until(T, "the turn is running", || ran(&cluster, &dep, &mid(&hang))).await;
    let pid = cluster.worker_pid(&dep).unwrap();

    let killed = Instant::now();
    cluster.daemons[d].kill();
    wait_until(Duration::from_secs(2), "the worker died with its daemon", || !process_alive(pid))
        .await;
    eprintln!("worker gone {:?} after its daemon was SIGKILLed", killed.elapsed());

    cluster.restart(d).await;
    let next = turn("a1", "c1", json!({"text": "after"}));
    client.publish(&next).await;
    client.wait_for(&[mid(&hang), mid(&next)], T).await;
    assert_eq!(client.event(&mid(&hang)).unwrap().code(), "WORKER_DIED");
    assert!(
        killed.elapsed() < Duration::from_secs(30),
        "long before its deadline: {:?}",
        killed.elapsed()
    );
    assert_ne!(reply_pid(&client, &mid(&next)), i64::from(pid));
    client.drain_for(Duration::from_millis(300)).await;
    client.assert_exactly_once_and_nothing_else(&[mid(&hang), mid(&next)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_fails_only_a_whole_deadline_after_its_last_heartbeat() {
    let mut cluster = Cluster::new().await;
    // Two heartbeats early in the turn, then quiet work for most of a deadline (2 s): the
    // last heartbeat at ~0.4 s keeps the turn alive until ~2.4 s; the reply comes at ~2.1 s.
    let script = r#"while read -r line; do
id=$(printf '%s\n' "$line" | sed 's/.*"messageId":"\([^"]*\)".*/\1/')
echo '{"type":"heartbeat"}'; sleep 0.4; echo '{"type":"heartbeat"}'; sleep 1.7
printf '{"type":"reply","messageId":"%s","payload":{"pid":%s}}\n' "$id" "$$"
done"#;
    let command = argv(&["/bin/sh", "-c", script]);
    cluster
        .start_daemon(&[
            ("TURND_WORKER__COMMAND", &command),
            ("TURND_TURN__DEADLINE", "2s"),
            // A sweep that looks often would catch a stored deadline that lags the heartbeats.
            ("TURND_SWEEP__INTERVAL", "50ms"),
        ])
        .await;
    let mut client = cluster.client().await;
    let t = turn("a1", "c1", json!({}));
    let sent = Instant::now();
    client.publish(&t).await;
    client.wait_for(&[mid(&t)], T).await;
    let e = client.event(&mid(&t)).unwrap();
    assert_eq!(
        e.kind(),
        "reply",
        "the turn was alive: its last heartbeat was less than a deadline ago: {}",
        e.body
    );
    assert!(sent.elapsed() >= Duration::from_secs(2), "{:?}", sent.elapsed());
    client.drain_for(Duration::from_millis(500)).await;
    client.assert_exactly_once_and_nothing_else(&[mid(&t)]);
}
