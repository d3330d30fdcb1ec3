//! The verdict over every turn sent: events (exactly one per turn, none lost), the workers'
//! own logs (no two live workers of a deployment, no turn given again once it was done), the
//! database (nothing pending, nothing unpublished), and the result table.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::Instant;

use serde_json::{Value, json};

use turnd_harness::Expected;

use crate::client::Events;
use crate::faults::{Injected, Kind};
use crate::{Clock, Sent};

/// One `turn` line of a worker log.
#[derive(Debug, Clone)]
pub struct Run {
    pub pid: i64,
    pub epoch: String,
    pub at_ns: u128,
}

/// What the worker logs say.
#[derive(Debug, Default)]
pub struct WorkerLogs {
    pub runs: HashMap<String, Vec<Run>>,
    pub starts: usize,
    pub exits: usize,
    /// Worker pid → its deployment (from `start` lines).
    pub deployment_of: HashMap<String, String>,
    /// `VIOLATION <pid> <unix_nanos>` lines of the exclusive-lock check.
    pub violations: Vec<(String, u128)>,
}

pub fn read_worker_logs(dir: &Path) -> WorkerLogs {
    let mut logs = WorkerLogs::default();
    for entry in std::fs::read_dir(dir.join("log")).into_iter().flatten().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let deployment =
            entry.path().file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        for line in text.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            match f.first().copied() {
                Some("start") => {
                    logs.starts += 1;
                    if let Some(pid) = f.get(1) {
                        logs.deployment_of.insert((*pid).to_owned(), deployment.clone());
                    }
                }
                Some("exit") => logs.exits += 1,
                Some("turn") if f.len() >= 5 => {
                    logs.runs.entry(f[3].to_owned()).or_default().push(Run {
                        pid: f[1].parse().unwrap_or(-1),
                        epoch: f[2].to_owned(),
                        at_ns: f[4].parse().unwrap_or(0),
                    });
                }
                _ => {}
            }
        }
    }
    let text = std::fs::read_to_string(dir.join("excl").join("violations.log")).unwrap_or_default();
    for line in text.lines() {
        let at = line.split(' ').nth(2).and_then(|t| t.parse().ok()).unwrap_or(0);
        logs.violations.push((line.to_owned(), at));
    }
    for runs in logs.runs.values_mut() {
        runs.sort_by_key(|r| r.at_ns);
    }
    logs
}

/// One broken promise.
#[derive(Debug, Clone)]
pub struct Violation {
    pub what: &'static str,
    pub detail: String,
    /// The turn it concerns, if one.
    pub message_id: Option<String>,
    /// When it happened (unix ns), for attribution when no turn is named.
    pub at_ns: Option<u128>,
}

/// The database at the end.
#[derive(Debug, Default)]
pub struct DbState {
    pub pending: i64,
    pub pending_samples: Vec<String>,
    pub unpublished: i64,
    /// done_at (unix µs) per (deployment, messageId) tombstone.
    pub done_at_us: HashMap<String, i64>,
}

pub struct Inputs<'a> {
    pub sent: &'a [Sent],
    pub events: &'a Events,
    pub logs: &'a WorkerLogs,
    pub db: &'a DbState,
    pub faults: &'a [Injected],
    pub extra: Vec<Violation>,
    pub clock: &'a Clock,
    /// When the load ended (turns not answered by then are pending until this instant).
    pub end: Instant,
}

pub fn violations(inp: &Inputs<'_>) -> Vec<Violation> {
    let mut out = inp.extra.clone();
    let v = |what, detail: String, mid: Option<&str>| Violation {
        what,
        detail,
        message_id: mid.map(str::to_owned),
        at_ns: None,
    };
    // The exactly-once check proper (the harness's): one event per turn, on its routing key,
    // none for a turn never sent, nothing malformed.
    let keys: Vec<String> = inp
        .sent
        .iter()
        .map(|s| {
            let org = serde_json::from_slice::<Value>(&s.body)
                .ok()
                .and_then(|t| t["organizationId"].as_str().map(str::to_owned));
            format!("reply.{}.{}", org.as_deref().unwrap_or("_"), s.deployment)
        })
        .collect();
    let verdict = inp.events.ledger.verdict(
        inp.sent
            .iter()
            .zip(&keys)
            .map(|(s, k)| Expected { message_id: &s.message_id, routing_key: Some(k) }),
    );
    let sent: HashMap<&str, &Sent> = inp.sent.iter().map(|s| (s.message_id.as_str(), s)).collect();
    for mid in &verdict.missing {
        let s = sent[mid.as_str()];
        let detail = format!("{mid} ({}, {}) got no terminal event", s.deployment, s.action);
        out.push(v("lost", detail, Some(mid)));
    }
    for (mid, events) in &verdict.duplicated {
        let detail =
            format!("{mid} got {} distinct terminal events: {}", events.len(), events.join(", "));
        out.push(v("duplicate event", detail, Some(mid)));
    }
    for (mid, what) in &verdict.misaddressed {
        out.push(v("misaddressed event", format!("{mid}: {what}"), Some(mid)));
    }
    for (mid, n) in &verdict.unknown {
        out.push(v("event for a turn never sent", format!("{mid}: {n} event(s)"), None));
    }
    for m in &verdict.malformed {
        out.push(v("malformed event", m.clone(), None));
    }
    for s in inp.sent {
        let mid = s.message_id.as_str();
        let events = inp.events.ledger.by_message.get(mid).map(Vec::as_slice).unwrap_or(&[]);
        for e in events {
            if e.deployment() != s.deployment {
                out.push(v(
                    "wrong deployment",
                    format!("{mid}: event names {}, expected {}", e.deployment(), s.deployment),
                    Some(mid),
                ));
            }
            let outcome = e.outcome();
            let contradicts = (outcome == "reply" && !matches!(s.action, "reply" | "sleep"))
                || (outcome == "CHAOS_ERROR" && s.action != "error");
            if contradicts {
                out.push(v(
                    "outcome contradicts the worker",
                    format!("{mid}: worker chose {}, event says {outcome}", s.action),
                    Some(mid),
                ));
            }
            let runs = inp.logs.runs.get(mid).map(Vec::as_slice).unwrap_or(&[]);
            if outcome == "reply" {
                let pid = e.body["payload"]["pid"].as_i64().unwrap_or(-1);
                if !runs.iter().any(|r| r.pid == pid) {
                    out.push(v(
                        "answer from a worker that never ran it",
                        format!("{mid}: replied by pid {pid}, runs {runs:?}"),
                        Some(mid),
                    ));
                }
            }
        }
        // Given to a worker again: only after the earlier worker died and while the turn was
        // still pending would that be defensible; turnd never re-queues a claimed turn, so
        // any re-run once it was done (or to the same worker) is a violation.
        let runs = inp.logs.runs.get(mid).map(Vec::as_slice).unwrap_or(&[]);
        if runs.len() > 1 {
            let done_us = inp.db.done_at_us.get(mid).copied();
            for (k, r) in runs.iter().enumerate().skip(1) {
                let same_worker = runs[..k].iter().any(|p| p.pid == r.pid);
                let after_done = done_us.is_some_and(|d| (r.at_ns / 1000) as i64 >= d);
                let what = if same_worker {
                    "turn given twice to one worker"
                } else if after_done {
                    "turn run again after its terminal event"
                } else if done_us.is_none() {
                    "turn run by two workers and never done"
                } else {
                    // A second worker while the turn was still pending: defensible only when
                    // the first died before answering; the exclusive-lock check proves it did
                    // not overlap. Counted, not a violation.
                    continue;
                };
                out.push(Violation {
                    what,
                    detail: format!("{mid}: runs {runs:?}, done at {done_us:?} µs"),
                    message_id: Some(mid.to_owned()),
                    at_ns: Some(r.at_ns),
                });
            }
        }
    }
    // Fencing seen from the workers: within a deployment, turns are given under
    // non-decreasing epochs (an older epoch's worker getting a turn after a newer one did is
    // a zombie at work).
    let mut by_deployment: HashMap<&str, Vec<(&str, &Run)>> = HashMap::new();
    for s in inp.sent {
        for r in inp.logs.runs.get(&s.message_id).into_iter().flatten() {
            by_deployment.entry(&s.deployment).or_default().push((&s.message_id, r));
        }
    }
    for (deployment, mut runs) in by_deployment {
        runs.sort_by_key(|(_, r)| r.at_ns);
        let mut newest: Option<(i64, &str)> = None;
        for (mid, r) in runs {
            let epoch: i64 = r.epoch.parse().unwrap_or(0);
            if let Some((e, prev)) = newest
                && epoch < e
            {
                out.push(Violation {
                    what: "turn given under an older epoch",
                    detail: format!(
                        "{deployment}: {mid} under epoch {epoch} after {prev} under epoch {e}"
                    ),
                    message_id: Some(mid.to_owned()),
                    at_ns: Some(r.at_ns),
                });
            }
            if newest.is_none_or(|(e, _)| epoch > e) {
                newest = Some((epoch, mid));
            }
        }
    }
    for (line, at) in &inp.logs.violations {
        let pid = line.split(' ').nth(1).unwrap_or("");
        let deployment = inp.logs.deployment_of.get(pid).map_or("?", String::as_str);
        out.push(Violation {
            what: "two live workers of one deployment",
            detail: format!(
                "{deployment}: worker {pid} started while another held its exclusive lock ({line})"
            ),
            message_id: None,
            at_ns: Some(*at),
        });
    }
    if inp.db.pending > 0 {
        out.push(v(
            "pending turn rows left",
            format!(
                "{} turn row(s) not done: {}",
                inp.db.pending,
                inp.db.pending_samples.join(", ")
            ),
            None,
        ));
    }
    if inp.db.unpublished > 0 {
        out.push(v(
            "unpublished outbox rows left",
            format!("{} outbox row(s) unpublished", inp.db.unpublished),
            None,
        ));
    }
    out
}

/// A turn was in flight during a fault if its life [published, answered] overlaps the fault
/// [start, end + slack].
fn overlaps(
    s: &Sent,
    answered: Option<Instant>,
    f: &Injected,
    slack: std::time::Duration,
    end: Instant,
) -> bool {
    let Some(p) = s.published else { return false };
    let a = answered.unwrap_or(end);
    p <= f.end + slack && a >= f.start
}

pub struct Table {
    pub rows: Vec<Row>,
}

pub struct Row {
    pub fault: String,
    pub injected: usize,
    pub skipped: usize,
    pub turns: usize,
    pub outcomes: BTreeMap<String, usize>,
    /// Turns whose outcome is not what their worker chose (reply → reply, error → its code,
    /// hang → TURN_TIMEOUT, crash/exit0 → WORKER_DIED): what the fault cost.
    pub changed: usize,
    pub violations: usize,
}

/// The outcome a turn gets when nothing else happens.
pub fn chosen_outcome(action: &str) -> &'static str {
    match action {
        "reply" | "sleep" => "reply",
        "error" => "CHAOS_ERROR",
        "hang" => "TURN_TIMEOUT",
        _ => "WORKER_DIED",
    }
}

pub fn table(
    inp: &Inputs<'_>,
    kinds: &[Kind],
    found: &[Violation],
    slack: std::time::Duration,
) -> Table {
    let answered: HashMap<&str, Instant> = inp
        .events
        .ledger
        .by_message
        .iter()
        .filter_map(|(m, e)| e.first().map(|e| (m.as_str(), e.at)))
        .collect();
    let outcome_of = |mid: &str| {
        inp.events
            .ledger
            .by_message
            .get(mid)
            .and_then(|e| e.first())
            .map_or_else(|| "LOST".to_owned(), |e| e.outcome().to_owned())
    };
    let action_of: HashMap<&str, &str> =
        inp.sent.iter().map(|s| (s.message_id.as_str(), s.action)).collect();
    let changed = |mid: &str| {
        usize::from(outcome_of(mid) != chosen_outcome(action_of.get(mid).copied().unwrap_or("")))
    };
    let viol_by_mid: HashMap<&str, usize> =
        found.iter().filter_map(|v| v.message_id.as_deref()).fold(HashMap::new(), |mut m, id| {
            *m.entry(id).or_default() += 1;
            m
        });
    let mut rows = Vec::new();
    let mut touched: HashSet<&str> = HashSet::new();
    for &kind in kinds {
        let mine: Vec<&Injected> = inp.faults.iter().filter(|f| f.kind == kind).collect();
        let live: Vec<&&Injected> = mine.iter().filter(|f| f.skipped.is_none()).collect();
        let mut turns: HashSet<&str> = HashSet::new();
        for s in inp.sent {
            let a = answered.get(s.message_id.as_str()).copied();
            if live.iter().any(|f| overlaps(s, a, f, slack, inp.end)) {
                turns.insert(&s.message_id);
            }
        }
        touched.extend(turns.iter().copied());
        let mut outcomes = BTreeMap::new();
        let mut violations = 0;
        let mut changed_n = 0;
        for mid in &turns {
            *outcomes.entry(outcome_of(mid)).or_default() += 1;
            changed_n += changed(mid);
            violations += viol_by_mid.get(mid).copied().unwrap_or(0);
        }
        // Violations without a turn: by time.
        for v in found.iter().filter(|v| v.message_id.is_none()) {
            if let Some(at) = v.at_ns
                && live.iter().any(|f| {
                    at >= inp.clock.unix_ns(f.start) && at <= inp.clock.unix_ns(f.end + slack)
                })
            {
                violations += 1;
            }
        }
        rows.push(Row {
            fault: kind.name().to_owned(),
            injected: live.len(),
            skipped: mine.len() - live.len(),
            turns: turns.len(),
            outcomes,
            changed: changed_n,
            violations,
        });
    }
    let mut calm = BTreeMap::new();
    let mut calm_n = 0;
    let mut calm_v = 0;
    let mut calm_c = 0;
    let mut all_c = 0;
    let mut all = BTreeMap::new();
    for s in inp.sent {
        let o = outcome_of(&s.message_id);
        *all.entry(o.clone()).or_default() += 1;
        all_c += changed(&s.message_id);
        if !touched.contains(s.message_id.as_str()) {
            calm_n += 1;
            calm_c += changed(&s.message_id);
            *calm.entry(o).or_default() += 1;
            calm_v += viol_by_mid.get(s.message_id.as_str()).copied().unwrap_or(0);
        }
    }
    rows.push(Row {
        fault: "(no fault)".into(),
        injected: 0,
        skipped: 0,
        turns: calm_n,
        outcomes: calm,
        changed: calm_c,
        violations: calm_v,
    });
    rows.push(Row {
        fault: "all turns".into(),
        injected: inp.faults.iter().filter(|f| f.skipped.is_none()).count(),
        skipped: inp.faults.iter().filter(|f| f.skipped.is_some()).count(),
        turns: inp.sent.len(),
        outcomes: all,
        changed: all_c,
        violations: found.len(),
    });
    Table { rows }
}

fn outcomes_text(o: &BTreeMap<String, usize>) -> String {
    let mut v: Vec<(&String, &usize)> = o.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    v.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", ")
}

impl Table {
    pub fn render(&self) -> String {
        let head = [
            "fault",
            "injected",
            "turns affected",
            "outcome codes",
            "not as the worker chose",
            "violations",
        ];
        let body: Vec<[String; 6]> = self
            .rows
            .iter()
            .map(|r| {
                let injected = if r.fault.starts_with('(') {
                    "-".to_owned()
                } else if r.skipped > 0 {
                    format!("{} (+{} skipped)", r.injected, r.skipped)
                } else {
                    r.injected.to_string()
                };
                [
                    r.fault.clone(),
                    injected,
                    r.turns.to_string(),
                    outcomes_text(&r.outcomes),
                    r.changed.to_string(),
                    r.violations.to_string(),
                ]
            })
            .collect();
        let mut w = head.map(str::len);
        for row in &body {
            for (i, c) in row.iter().enumerate() {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let line = |cells: [&str; 6]| {
            let mut s = String::from("|");
            for (i, c) in cells.iter().enumerate() {
                s.push_str(&format!(" {c:<width$} |", width = w[i]));
            }
            s
        };
        let mut out = vec![line(head)];
        out.push(format!(
            "|{}",
            w.iter().map(|n| format!("{}|", "-".repeat(n + 2))).collect::<String>()
        ));
        for row in &body {
            out.push(line([&row[0], &row[1], &row[2], &row[3], &row[4], &row[5]]));
        }
        out.join("\n")
    }

    pub fn json(&self) -> Value {
        Value::Array(
            self.rows
                .iter()
                .map(|r| {
                    json!({
                        "fault": r.fault,
                        "injected": r.injected,
                        "skipped": r.skipped,
                        "turns_affected": r.turns,
                        "outcomes": r.outcomes,
                        "not_as_chosen": r.changed,
                        "violations": r.violations,
                    })
                })
                .collect(),
        )
    }
}

/// The rolling-restart bound (issue 16): no reply turn in flight during a roll fails, and
/// their p99 (publish → terminal event) is at most this.
pub const ROLL_P99: std::time::Duration = std::time::Duration::from_secs(3);

/// Whether `s` was published while a turn of its conversation that keeps a worker busy or
/// kills it (hang, sleep, crash, exit0) was still pending: `s` then waits for that turn's
/// deadline, sleep or the respawn, whatever the fault; its latency measures the workload.
fn queued_behind_slow(inp: &Inputs<'_>, s: &Sent) -> bool {
    queued_behind(inp, s, |action| !matches!(action, "reply" | "error"))
}

/// Whether `s` was published while an earlier turn of its conversation whose worker was to
/// die (crash, exit, hang until killed) was still unanswered: that death fails every pending
/// turn of the deployment, `s` included when it was queued behind it (CONTRACT: a worker that
/// exits unasked fails all pending turns), roll or not.
fn queued_behind_a_death(inp: &Inputs<'_>, s: &Sent) -> bool {
    queued_behind(inp, s, |action| matches!(chosen_outcome(action), "WORKER_DIED" | "TURN_TIMEOUT"))
}

/// Whether `s` was published while an earlier turn of its conversation with an action `like`
/// was still unanswered.
fn queued_behind(inp: &Inputs<'_>, s: &Sent, like: impl Fn(&str) -> bool) -> bool {
    let Some(p) = s.published else { return false };
    inp.sent.iter().any(|t| {
        t.deployment == s.deployment
            && like(t.action)
            && t.published.is_some_and(|tp| tp < p)
            && inp
                .events
                .ledger
                .by_message
                .get(&t.message_id)
                .and_then(|e| e.first())
                .is_none_or(|e| e.at > p)
    })
}

/// Checks the turns in flight during each `roll` fault (and during no other fault) whose
/// worker was to reply: each must get its reply (or WORKER_DIED when queued behind a turn
/// whose worker was to die: [`queued_behind_a_death`]), and their p99 latency must stay within
/// [`ROLL_P99`]. The bound applies to the turns not queued behind a slow turn of their own
/// conversation ([`queued_behind_slow`]: they wait for it with or without a roll); the
/// summary line gives the p99 of all of them too. Returns the violations and one summary
/// line per roll.
pub fn roll(inp: &Inputs<'_>, slack: std::time::Duration) -> (Vec<Violation>, Vec<String>) {
    let mut found = Vec::new();
    let mut lines = Vec::new();
    for f in inp.faults.iter().filter(|f| f.kind == Kind::Roll && f.skipped.is_none()) {
        let others: Vec<&Injected> =
            inp.faults.iter().filter(|o| o.kind != Kind::Roll && o.skipped.is_none()).collect();
        let mut latencies = Vec::new();
        let mut all_latencies = Vec::new();
        let mut failed = 0;
        for s in inp.sent.iter().filter(|s| chosen_outcome(s.action) == "reply") {
            let first = inp.events.ledger.by_message.get(&s.message_id).and_then(|e| e.first());
            let answered = first.map(|e| e.at);
            if !overlaps(s, answered, f, slack, inp.end)
                || others.iter().any(|o| overlaps(s, answered, o, slack, inp.end))
            {
                continue;
            }
            if let (Some(p), Some(a)) = (s.published, answered) {
                all_latencies.push(a.saturating_duration_since(p));
            }
            let outcome = first.map_or_else(|| "LOST".to_owned(), |e| e.outcome().to_owned());
            let a_death_before_it = outcome == "WORKER_DIED" && queued_behind_a_death(inp, s);
            if outcome != "reply" && !a_death_before_it {
                failed += 1;
                found.push(Violation {
                    what: "roll: a turn failed",
                    detail: format!("{} ended {outcome} during a rolling restart", s.message_id),
                    message_id: Some(s.message_id.clone()),
                    at_ns: None,
                });
            }
            if let (Some(p), Some(a)) = (s.published, answered)
                && !queued_behind_slow(inp, s)
            {
                latencies.push(a.saturating_duration_since(p));
            }
        }
        latencies.sort();
        all_latencies.sort();
        let pct = |l: &[std::time::Duration], q: f64| {
            l.get(((l.len() as f64 * q).ceil() as usize).saturating_sub(1))
                .copied()
                .unwrap_or_default()
        };
        let (p50, p99) = (pct(&latencies, 0.50), pct(&latencies, 0.99));
        let max = latencies.last().copied().unwrap_or_default();
        lines.push(format!(
            "roll ({}): {} reply turns in flight, {failed} failed; not behind a slow turn of their conversation: {}, latency p50 {} ms, p99 {} ms, max {} ms (bound p99 ≤ {} ms); all: p99 {} ms",
            f.target,
            all_latencies.len(),
            latencies.len(),
            p50.as_millis(),
            p99.as_millis(),
            max.as_millis(),
            ROLL_P99.as_millis(),
            pct(&all_latencies, 0.99).as_millis(),
        ));
        if p99 > ROLL_P99 {
            found.push(Violation {
                what: "roll: p99 over the bound",
                detail: format!("p99 {} ms during a rolling restart", p99.as_millis()),
                message_id: None,
                at_ns: Some(inp.clock.unix_ns(f.end)),
            });
        }
    }
    (found, lines)
}
