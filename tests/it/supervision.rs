//! Supervision (issue 17): a component that fails or panics stops the daemon, in order, with
//! exit status 1 and the component named in the log, so that systemd or Kubernetes restarts
//! it. The component is failed through the debug builds' hook (`TURND_DEBUG_FAIL_COMPONENT`,
//! triggered by SIGUSR2; see `turnd::supervise`).

use std::time::{Duration, Instant};

use turnd_harness::*;

/// Starts a daemon with the hook armed for `hook`, fires it, and returns the daemon's log once
/// it has exited; asserts exit status 1 within a second of the trigger.
async fn fail_component(hook: &str) -> String {
    let mut cluster = Cluster::new().await;
    let d = cluster.start_daemon(&[("TURND_DEBUG_FAIL_COMPONENT", hook)]).await;
    let fired = Instant::now();
    cluster.daemons[d].signal(libc::SIGUSR2);
    let status = cluster.daemons[d].exit_within(Duration::from_secs(10)).await;
    let took = fired.elapsed();
    eprintln!("{hook}: the daemon exited {took:?} after the trigger");
    let log = strip_ansi(&cluster.daemon_log(d));
    let status = status.unwrap_or_else(|| panic!("the daemon kept running after {hook}:\n{log}"));
    assert_eq!(status.code(), Some(1), "exit status after {hook} ({status}):\n{log}");
    assert!(took < Duration::from_secs(1), "exit took {took:?} after {hook}:\n{log}");
    assert!(log.contains("turnd stopped"), "the orderly stop ran to its end:\n{log}");
    log
}

#[tokio::test]
async fn a_failed_intake_stops_the_daemon_with_exit_1_and_names_it() {
    let log = fail_component("intake").await;
    assert!(
        log.contains("intake failed: failed on purpose"),
        "the log names the component and why:\n{log}"
    );
}

#[tokio::test]
async fn a_panicking_relay_stops_the_daemon_with_exit_1_and_names_it() {
    let log = fail_component("relay:panic").await;
    assert!(
        log.contains("relay panicked: relay panicked on purpose"),
        "the log names the component and the panic:\n{log}"
    );
}
