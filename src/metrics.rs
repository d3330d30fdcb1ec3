//! Prometheus metrics: what an operator graphs and alerts on. One registry per daemon,
//! encoded on `/metrics` by `http`.

use prometheus_client::encoding::{EncodeLabelSet, text::encode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::turn::ErrorCode;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub kind: &'static str,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabel {
    pub path: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ComponentLabel {
    pub component: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OrgLabel {
    pub organization: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
    pub edition: &'static str,
    pub profile: &'static str,
}

/// Upper bounds of the turn latency buckets, in seconds. From a cached echo (5 ms) to an agent
/// turn that works for many minutes (30 min): 20 buckets, each a series per daemon in
/// Prometheus; finer steps where a quantile is read most (under a minute), coarser past it.
pub const LATENCY_BUCKETS: [f64; 20] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    900.0, 1200.0, 1500.0, 1800.0,
];

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Inbox deliveries by what intake did: armed, duplicate, refused, parked.
    pub turns_received: Family<OutcomeLabel, Counter>,
    /// Terminal events committed here, by kind and code ("" for replies).
    pub terminal_events: Family<EventLabels, Counter>,
    /// Accept → terminal commit, for turns answered by this daemon's workers.
    pub turn_latency: Histogram,
    pub live_workers: Gauge,
    pub owned_deployments: Gauge,
    pub worker_spawns: Counter,
    /// Worker exits: requested, died, start_failed, lock_lost.
    pub worker_exits: Family<ReasonLabel, Counter>,
    pub locks_held: Gauge,
    /// Children turnd did not spawn (orphans a worker left behind), reaped.
    pub orphans_reaped: Counter,
    /// Lock attempts that found the deployment held by another daemon.
    pub lock_contention: Counter,
    /// Pending turns failed, by the path that failed them: fast (worker died), sweep,
    /// takeover, timeout (owner-side deadline), shutdown, lock_lost, crash_loop.
    pub turns_failed: Family<PathLabel, Counter>,
    /// Terminal events not yet published (cluster-wide, from the last sweep).
    pub outbox_backlog: Gauge,
    pub events_published: Counter,
    /// Age of the oldest pending turn in the cluster (from the last sweep), 0 when none.
    pub oldest_pending_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// 1 when the component is healthy: database, broker, lock_session.
    pub up: Family<ComponentLabel, Gauge>,
    /// Queued turns per organization (cluster-wide, from the last sweep): the top
    /// [`ORG_LABELS`] by count, the rest summed under [`OTHER_ORGS`].
    pub org_backlog: Family<OrgLabel, Gauge>,
    /// Live workers per organization on this daemon, bounded the same way.
    pub org_live_workers: Family<OrgLabel, Gauge>,
    /// The organization labels each of the two families exports now (to drop the stale ones).
    org_labels: std::sync::Mutex<[Vec<String>; 2]>,
    /// The worker-chosen codes that have a `code` label of their own (see
    /// [`Metrics::terminal_event`]).
    worker_codes: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// How many distinct codes chosen by workers get a label of their own. Workers are tenants'
/// code: one that invents a code per turn would otherwise grow `/metrics` (and every
/// Prometheus that scrapes it) without bound. Fifty is far above what a platform's error
/// taxonomy uses and keeps the family small; later codes fold into [`FOLDED_WORKER_CODE`]
/// (the event itself still carries the worker's code).
pub const MAX_WORKER_CODE_LABELS: usize = 50;

/// The `code` label of worker-chosen codes past [`MAX_WORKER_CODE_LABELS`].
pub const FOLDED_WORKER_CODE: &str = "OTHER_WORKER_CODE";

/// How many organizations get an `organization` label of their own in the per-organization
/// gauges. Organizations are tenants and may number in the thousands: a series for each would
/// grow every scrape without bound. The ten largest are the ones an operator acts on (who
/// floods, who waits); the rest are summed under [`OTHER_ORGS`], so totals stay right.
pub const ORG_LABELS: usize = 10;

/// The label of the organizations past [`ORG_LABELS`] (not a valid organizationId, so it
/// never names a real one); turns without an organization are `_`, as in routing keys.
pub const OTHER_ORGS: &str = "(other)";

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("turnd");
        let m = Metrics {
            turns_received: Family::default(),
            terminal_events: Family::default(),
            turn_latency: Histogram::new(LATENCY_BUCKETS),
            live_workers: Gauge::default(),
            owned_deployments: Gauge::default(),
            worker_spawns: Counter::default(),
            worker_exits: Family::default(),
            locks_held: Gauge::default(),
            orphans_reaped: Counter::default(),
            lock_contention: Counter::default(),
            turns_failed: Family::default(),
            outbox_backlog: Gauge::default(),
            events_published: Counter::default(),
            oldest_pending_seconds: Gauge::default(),
            up: Family::default(),
            org_backlog: Family::default(),
            org_live_workers: Family::default(),
            org_labels: Default::default(),
            worker_codes: Default::default(),
            registry: Registry::default(),
        };
        registry.register(
            "turns_received",
            "Inbox deliveries by intake outcome",
            m.turns_received.clone(),
        );
        registry.register(
            "terminal_events",
            "Terminal events committed, by kind and code",
            m.terminal_events.clone(),
        );
        registry.register(
            "turn_latency_seconds",
            "Accept to terminal commit",
            m.turn_latency.clone(),
        );
        registry.register(
            "live_workers",
            "Worker processes alive on this daemon",
            m.live_workers.clone(),
        );
        registry.register(
            "owned_deployments",
            "Deployments whose lock this daemon holds",
            m.owned_deployments.clone(),
        );
        registry.register("worker_spawns", "Worker processes started", m.worker_spawns.clone());
        registry.register("worker_exits", "Worker exits by reason", m.worker_exits.clone());
        registry.register(
            "locks_held",
            "Advisory locks held on the lock session",
            m.locks_held.clone(),
        );
        registry.register(
            "orphans_reaped",
            "Orphans reaped (processes workers left behind; every orphan of the namespace as PID 1)",
            m.orphans_reaped.clone(),
        );
        registry.register(
            "lock_contention",
            "Lock attempts that found the lock held elsewhere",
            m.lock_contention.clone(),
        );
        registry.register("turns_failed", "Pending turns failed, by path", m.turns_failed.clone());
        registry.register(
            "outbox_backlog",
            "Terminal events not yet published (cluster-wide)",
            m.outbox_backlog.clone(),
        );
        registry.register(
            "events_published",
            "Terminal events published to the replies exchange",
            m.events_published.clone(),
        );
        registry.register(
            "oldest_pending_seconds",
            "Age of the oldest pending turn (cluster-wide)",
            m.oldest_pending_seconds.clone(),
        );
        registry.register("up", "1 when the component is healthy", m.up.clone());
        // OpenTelemetry export (`[otel]`); counted by `otel` from the process's start.
        let otel = &crate::otel::STATS;
        registry.register(
            "otel_spans_exported",
            "Spans handed to the OTLP exporter",
            otel.exported.clone(),
        );
        registry.register(
            "otel_spans_dropped",
            "Spans dropped because the export queue (otel.queue_size) was full",
            otel.dropped.clone(),
        );
        registry.register(
            "otel_spans_failed",
            "Spans in export requests that the collector did not take",
            otel.failed.clone(),
        );
        registry.register(
            "org_backlog",
            "Queued turns per organization (cluster-wide; top 10, the rest as (other))",
            m.org_backlog.clone(),
        );
        registry.register(
            "org_live_workers",
            "Worker processes alive on this daemon per organization (top 10, the rest as (other))",
            m.org_live_workers.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                edition: "2024",
                profile: if cfg!(debug_assertions) { "debug" } else { "release" },
            })
            .set(1);
        registry.register("build_info", "Always 1; the labels say which turnd this is", build_info);
        // Known label values start at 0, so every family the dashboard and the alert rules use
        // is exported from the start (an empty family prints nothing) and rate() has a baseline.
        for outcome in ["armed", "duplicate", "refused", "parked"] {
            m.turns_received.get_or_create(&OutcomeLabel { outcome }).inc_by(0);
        }
        for reason in ["requested", "died", "start_failed", "lock_lost", "panic"] {
            m.worker_exits.get_or_create(&ReasonLabel { reason }).inc_by(0);
        }
        for path in
            ["fast", "sweep", "takeover", "timeout", "shutdown", "lock_lost", "crash_loop", "panic"]
        {
            m.turns_failed.get_or_create(&PathLabel { path }).inc_by(0);
        }
        Metrics { registry, ..m }
    }

    /// Counts a committed terminal event. The contract's own codes always have their label;
    /// a worker's own code has one while fewer than [`MAX_WORKER_CODE_LABELS`] have.
    pub fn terminal_event(&self, kind: &'static str, code: Option<&str>) {
        let code = match code {
            None => String::new(),
            Some(c) if !matches!(ErrorCode::from_worker(Some(c)), ErrorCode::Other(_)) => {
                c.to_owned()
            }
            Some(c) => {
                // A poisoned lock only means another thread panicked mid-insert; the set is
                // still a set.
                let mut seen = self.worker_codes.lock().unwrap_or_else(|p| p.into_inner());
                if seen.contains(c) {
                    c.to_owned()
                } else if seen.len() < MAX_WORKER_CODE_LABELS {
                    seen.insert(c.to_owned());
                    c.to_owned()
                } else {
                    FOLDED_WORKER_CODE.to_owned()
                }
            }
        };
        self.terminal_events.get_or_create(&EventLabels { kind, code }).inc();
    }

    /// Sets the queued turns per organization (`None`: no organization).
    pub fn set_org_backlog(&self, counts: Vec<(Option<String>, i64)>) {
        self.set_by_org(0, counts);
    }

    /// Sets this daemon's live workers per organization.
    pub fn set_org_live_workers(&self, counts: Vec<(Option<String>, i64)>) {
        self.set_by_org(1, counts);
    }

    fn set_by_org(&self, which: usize, counts: Vec<(Option<String>, i64)>) {
        let family = if which == 0 { &self.org_backlog } else { &self.org_live_workers };
        let shown = top_orgs(counts, ORG_LABELS);
        let mut labels = self.org_labels.lock().unwrap_or_else(|p| p.into_inner());
        for (organization, n) in &shown {
            family.get_or_create(&OrgLabel { organization: organization.clone() }).set(*n);
        }
        // Organizations that left the top (or have nothing now) stop being exported.
        for gone in labels[which].iter().filter(|l| !shown.iter().any(|(o, _)| o == *l)) {
            family.remove(&OrgLabel { organization: gone.clone() });
        }
        labels[which] = shown.into_iter().map(|(o, _)| o).collect();
    }

    pub fn received(&self, outcome: &'static str, n: u64) {
        if n > 0 {
            self.turns_received.get_or_create(&OutcomeLabel { outcome }).inc_by(n);
        }
    }

    pub fn failed(&self, path: &'static str, n: usize) {
        if n > 0 {
            self.turns_failed.get_or_create(&PathLabel { path }).inc_by(n as u64);
        }
    }

    pub fn worker_exit(&self, reason: &'static str) {
        self.worker_exits.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn set_up(&self, component: &'static str, up: bool) {
        self.up.get_or_create(&ComponentLabel { component }).set(i64::from(up));
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The `top` organizations by count (ties by name), the rest summed as [`OTHER_ORGS`] when
/// there is any; `None` (no organization) is labelled `_`.
pub fn top_orgs(counts: Vec<(Option<String>, i64)>, top: usize) -> Vec<(String, i64)> {
    let mut counts: Vec<(String, i64)> = counts
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(o, n)| (o.unwrap_or_else(|| "_".to_owned()), n))
        .collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let rest: i64 = counts.iter().skip(top).map(|(_, n)| n).sum();
    counts.truncate(top);
    if rest > 0 {
        counts.push((OTHER_ORGS.to_owned(), rest));
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_reach_half_an_hour_and_build_info_is_one() {
        let m = Metrics::new();
        m.turn_latency.observe(28.0 * 60.0);
        let text = m.encode();
        assert!(text.contains("turnd_turn_latency_seconds_bucket{le=\"1800.0\"} 1"), "{text}");
        assert!(text.contains("turnd_turn_latency_seconds_bucket{le=\"1500.0\"} 0"), "{text}");
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            text.lines().any(|l| l.starts_with("turnd_build_info{")
                && l.contains(&format!("version=\"{version}\""))
                && l.ends_with(" 1")),
            "{text}"
        );
    }

    #[test]
    fn worker_codes_past_the_cap_fold_into_one_label() {
        let m = Metrics::new();
        for i in 0..1_000 {
            m.terminal_event("error", Some(&format!("TENANT_CODE_{i}")));
        }
        m.terminal_event("error", Some("TENANT_CODE_3"));
        m.terminal_event("error", Some("WORKER_DIED"));
        m.terminal_event("reply", None);
        let text = m.encode();
        let series = text.lines().filter(|l| l.starts_with("turnd_terminal_events_total{")).count();
        // the capped worker codes, the folded one, WORKER_DIED, the reply
        assert_eq!(series, MAX_WORKER_CODE_LABELS + 3, "{text}");
        assert!(text.contains(&format!(
            "code=\"{FOLDED_WORKER_CODE}\"}} {}",
            1_000 - MAX_WORKER_CODE_LABELS
        )));
        assert!(text.contains("code=\"TENANT_CODE_3\"} 2"), "{text}");
        assert!(text.contains("code=\"WORKER_DIED\"} 1"), "{text}");
    }

    #[test]
    fn organizations_past_the_top_fold_into_other() {
        let counts = (0..25).map(|i| (Some(format!("org{i:02}")), i64::from(i) + 1)).collect();
        let shown = top_orgs(counts, ORG_LABELS);
        assert_eq!(shown.len(), ORG_LABELS + 1);
        assert_eq!(shown[0], ("org24".to_owned(), 25));
        // org00..org14 hold 1..15: 120 in all.
        assert_eq!(shown[ORG_LABELS], (OTHER_ORGS.to_owned(), 120));
        assert_eq!(top_orgs(vec![(None, 3), (Some("a".into()), 0)], 10), vec![("_".into(), 3)]);
        let m = Metrics::new();
        m.set_org_backlog(vec![(Some("big".into()), 900), (None, 4)]);
        m.set_org_backlog(vec![(Some("big".into()), 800)]);
        let text = m.encode();
        assert!(text.contains("turnd_org_backlog{organization=\"big\"} 800"), "{text}");
        assert!(!text.contains("organization=\"_\""), "a stale label stays exported: {text}");
    }
}
