//! Rows of the summary table, with the targets: each figure beside floor-bench's from
//! the same run, their ratio, and PASS/FAIL where a target applies.

use serde_json::{Value, json};

use crate::modes::Measured;
use crate::stats::short_ms;

// Issue 21's targets (issue 7's were 0.70, 1.30, 2.00 and + 5 ms, with no CPU target).
pub const THROUGHPUT_RATIO_MIN: f64 = 1.5;
pub const LATENCY_P50_RATIO_MAX: f64 = 1.0;
pub const LATENCY_P99_RATIO_MAX: f64 = 1.5;
pub const COLD_EXTRA_MS: f64 = 3.0;
/// CPU per turn of all parties against floor-bench's, where it has a counterpart.
pub const CPU_RATIO_MAX: f64 = 1.0;
pub const CRASH_P99_MAX_MS: f64 = 50.0;
pub const LOCK_CONNECTIONS_MAX: f64 = 2.0;
pub const RSS_KB_PER_DEPLOYMENT_MAX: f64 = 30.0;
pub const SCALE_LATENCY_RATIO_MAX: f64 = 1.2;

/// floor-bench's figures for a mode: its matching mode and, for `cold`, its spawn probe.
#[derive(Debug, Default, Clone)]
pub struct Floor {
    pub main: Option<Result<Value, String>>,
    pub spawn: Option<Result<Value, String>>,
}

#[derive(Debug, Clone)]
pub struct Row {
    pub label: String,
    pub metric: String,
    pub turnd: String,
    pub floor: String,
    pub ratio: String,
    pub target: String,
    pub verdict: Option<bool>,
}

impl Row {
    fn info(label: &str, metric: &str, turnd: String) -> Row {
        Row {
            label: label.to_owned(),
            metric: metric.to_owned(),
            turnd,
            floor: String::new(),
            ratio: String::new(),
            target: String::new(),
            verdict: None,
        }
    }
}

/// The rows and the JSON targets of one mode.
pub fn rows(m: &Measured, floor: &Floor) -> (Vec<Row>, Vec<Value>) {
    let mut b = Builder { label: m.label.clone(), rows: Vec::new(), targets: Vec::new() };
    let t = &m.json;
    let f = floor.main.as_ref().and_then(|r| r.as_ref().ok());
    let floor_error = floor.main.as_ref().and_then(|r| r.as_ref().err());
    match m.mode {
        "throughput" => {
            let rate = num(t, "/turns_per_s");
            let frate = f.and_then(|f| num(f, "/turns_per_s"));
            b.ratio_row(
                "turns/s",
                rate,
                frate,
                |v| format!("{v:.0}"),
                Cmp::AtLeast(THROUGHPUT_RATIO_MIN),
            );
            b.pair_row("latency p50 / p99", t, f, "/latency/p50_ms", "/latency/p99_ms");
            b.cpu_row(t, f);
        }
        "latency" => {
            let p = "/round_trip";
            b.ratio_row(
                "p50",
                num(t, &format!("{p}/p50_ms")),
                f.and_then(|f| num(f, &format!("{p}/p50_ms"))),
                short_ms,
                Cmp::AtMost(LATENCY_P50_RATIO_MAX),
            );
            b.ratio_row(
                "p99",
                num(t, &format!("{p}/p99_ms")),
                f.and_then(|f| num(f, &format!("{p}/p99_ms"))),
                short_ms,
                Cmp::AtMost(LATENCY_P99_RATIO_MAX),
            );
            b.pair_row("p90 / max", t, f, "/round_trip/p90_ms", "/round_trip/max_ms");
            b.pair_row(
                "publish→confirm p50 / p99",
                t,
                f,
                "/inbox_confirm/p50_ms",
                "/inbox_confirm/p99_ms",
            );
            b.cpu_row(t, f);
        }
        "cold" => {
            let p50 = num(t, "/round_trip/p50_ms");
            let flat = f.and_then(|f| num(f, "/round_trip/p50_ms"));
            let fspawn = floor
                .spawn
                .as_ref()
                .and_then(|r| r.as_ref().ok())
                .and_then(|s| num(s, "/spawn_and_echo/p50_ms"));
            let limit = flat.zip(fspawn).map(|(l, s)| l + s + COLD_EXTRA_MS);
            let verdict = p50.zip(limit).map(|(v, l)| v <= l);
            b.rows.push(Row {
                label: b.label.clone(),
                metric: "p50 (lock + spawn + reply)".into(),
                turnd: p50.map_or("?".into(), short_ms),
                floor: match (flat, fspawn) {
                    (Some(l), Some(s)) => {
                        format!("{} + spawn {} + {COLD_EXTRA_MS} ms", short_ms(l), short_ms(s))
                    }
                    _ => String::new(),
                },
                ratio: p50.zip(limit).map_or(String::new(), |(v, l)| format!("{:.2}", v / l)),
                target: limit
                    .map_or(format!("≤ floor p50 + spawn p50 + {COLD_EXTRA_MS} ms"), |l| {
                        format!("≤ {}", short_ms(l))
                    }),
                verdict,
            });
            let name =
                format!("cold p50 ≤ floor latency p50 + floor spawn p50 + {COLD_EXTRA_MS} ms");
            b.target(&name, p50, limit, verdict);
            b.pair_row("p99 / max", t, None, "/round_trip/p99_ms", "/round_trip/max_ms");
            b.cpu_row(t, None);
        }
        "crash" => {
            b.rows.push(Row::info(
                &m.label,
                "kill → WORKER_DIED p50 / p90",
                pair(t, "/kill_to_error_event/p50_ms", "/kill_to_error_event/p90_ms"),
            ));
            let p99 = num(t, "/kill_to_error_event/p99_ms");
            b.abs_row("kill → WORKER_DIED p99", p99, short_ms, Cmp::AtMost(CRASH_P99_MAX_MS), "ms");
            b.rows.push(Row::info(
                &m.label,
                "publish → worker has the turn p50 / p99",
                pair(t, "/publish_to_worker_has_turn/p50_ms", "/publish_to_worker_has_turn/p99_ms"),
            ));
        }
        "scale" => scale_rows(&mut b, t),
        _ => {}
    }
    if let Some(e) = floor_error {
        b.rows.push(Row::info(&m.label, "floor-bench", format!("FAILED: {e}")));
    }
    b.rows.push(Row {
        label: m.label.clone(),
        metric: "exactly one terminal event".into(),
        turnd: m.check.human(),
        floor: String::new(),
        ratio: String::new(),
        target: "every turn".into(),
        verdict: Some(!m.check.violated()),
    });
    b.rows.push(Row {
        label: m.label.clone(),
        metric: "outcomes as asked".into(),
        turnd: m.check.outcomes_human(),
        floor: String::new(),
        ratio: String::new(),
        target: if m.mode == "crash" { "WORKER_DIED each" } else { "reply each" }.into(),
        verdict: Some(!m.check.unexpected()),
    });
    let others = |v: &Value| num(v, "/cpu/others_share");
    if let Some(o) = others(t) {
        let flag = |x: f64| {
            if x > crate::cpu::DISTURBED { " DISTURBED" } else { "" }
        };
        b.rows.push(Row {
            label: m.label.clone(),
            metric: "other processes' CPU (share of machine)".into(),
            turnd: format!("{:.0}%{}", 100.0 * o, flag(o)),
            floor: f
                .and_then(others)
                .map_or(String::new(), |x| format!("{:.0}%{}", 100.0 * x, flag(x))),
            ratio: String::new(),
            target: String::new(),
            verdict: None,
        });
    }
    (b.rows, b.targets)
}

fn scale_rows(b: &mut Builder, t: &Value) {
    let levels = t["levels"].as_array().cloned().unwrap_or_default();
    let last = levels.len().saturating_sub(1);
    for (i, l) in levels.iter().enumerate() {
        let n = l["deployments"].as_u64().unwrap_or(0);
        let at = |metric: &str| format!("{n} live: {metric}");
        b.rows.push(Row::info(
            &b.label.clone(),
            &at("bring-up"),
            format!(
                "+{} in {:.2} s ({:.0}/s)",
                l["bring_up_added"],
                num(l, "/bring_up_s").unwrap_or(f64::NAN),
                num(l, "/bring_up_per_s").unwrap_or(f64::NAN)
            ),
        ));
        let locks = num(l, "/lock_connections");
        b.abs_row(
            &at("lock connections"),
            locks,
            |v| format!("{v:.0}"),
            Cmp::AtMost(LOCK_CONNECTIONS_MAX),
            "",
        );
        b.rows.push(Row::info(
            &b.label.clone(),
            &at("db connections / advisory locks"),
            format!("{} / {}", l["db_connections"], l["advisory_locks"]),
        ));
        let rss = num(l, "/rss_kb_per_deployment");
        let rss_text = |v: f64| format!("{v:.1} kB (RSS {} kB)", l["rss_kb"]);
        if i == last {
            b.abs_row(
                &at("daemon RSS per deployment"),
                rss,
                rss_text,
                Cmp::AtMost(RSS_KB_PER_DEPLOYMENT_MAX),
                "kB",
            );
        } else {
            b.rows.push(Row::info(
                &b.label.clone(),
                &at("daemon RSS per deployment"),
                rss.map_or("?".into(), rss_text),
            ));
        }
        b.rows.push(Row::info(
            &b.label.clone(),
            &at("AMQP connections / channels"),
            match (l["amqp_connections"].as_u64(), l["amqp_channels"].as_u64()) {
                (Some(c), Some(ch)) => format!("{c} / {ch}"),
                _ => format!("unknown: {}", l["amqp_note"].as_str().unwrap_or("")),
            },
        ));
        b.rows.push(Row::info(
            &b.label.clone(),
            &at("threads / fds / workers"),
            format!("{} / {} / {}", l["threads"], l["open_fds"], l["workers"]),
        ));
        let others = num(l, "/latency_cpu/others_share").map_or(String::new(), |o| {
            let flag = if o > crate::cpu::DISTURBED { " DISTURBED" } else { "" };
            format!(" (others' CPU {:.0}%{flag})", 100.0 * o)
        });
        b.rows.push(Row::info(
            &b.label.clone(),
            &at("latency p50 / p99"),
            format!("{}{others}", pair(l, "/latency/p50_ms", "/latency/p99_ms")),
        ));
        b.rows.push(Row::info(
            &b.label.clone(),
            &at("new conversation p50 / p99"),
            pair(l, "/new_conversation/p50_ms", "/new_conversation/p99_ms"),
        ));
        if l["floor_latency"].is_object() {
            b.rows.push(Row::info(
                &b.label.clone(),
                &at(&format!(
                    "floor-bench latency p50 / p99 beside them (median of {})",
                    l["floor_latency"]["runs"]
                )),
                pair(l, "/floor_latency/p50_ms", "/floor_latency/p99_ms"),
            ));
        }
    }
    if levels.len() >= 2 {
        let (lo, hi) = (&levels[0]["deployments"], &levels[last]["deployments"]);
        // The same ratio for floor-bench, run beside each level between turnd's rounds: how
        // far the machine moved and the loaded services slowed any client. Shown, not used to
        // correct the verdict: on a machine that swings ±25% from one second to the next the
        // correction adds floor-bench's own noise to turnd's.
        let floor = num(t, "/floor_latency_ratio_p50");
        let rounds = t["rounds"].as_u64().unwrap_or(1);
        // With --repeat, these ratios are medians over whole scale runs (the rows above are
        // the first run's).
        let runs = match t["runs"].as_array().map(Vec::len) {
            Some(n) if n > 1 => format!("median of {n} runs; "),
            _ => String::new(),
        };
        let context = |raw: Option<f64>| match (raw, floor) {
            (Some(r), Some(f)) if f > 0.0 => format!(
                "{runs}floor-bench {f:.2} beside them (median of {rounds}); net of it {:.2}",
                r / f
            ),
            _ => runs.trim_end_matches("; ").to_owned(),
        };
        let latency = num(t, "/latency_ratio_p50");
        let p99 = num(t, "/latency_ratio_p99").map_or(String::new(), |r| format!("p99 {r:.2}; "));
        b.scale_ratio_row(
            &format!("latency p50 at {hi} ÷ at {lo}"),
            "scale latency p50 ratio",
            latency,
            format!("{p99}{}", context(latency)),
        );
        // A new conversation is on the turn path too (lock, spawn, first reply).
        let new_conversation = num(t, "/new_conversation_ratio_p50");
        b.scale_ratio_row(
            &format!("new conversation p50 at {hi} ÷ at {lo}"),
            "scale new conversation p50 ratio",
            new_conversation,
            context(new_conversation),
        );
    }
    if let Some(skipped) = t["skipped_levels"].as_array().filter(|s| !s.is_empty()) {
        b.rows.push(Row {
            label: b.label.clone(),
            metric: format!("skipped levels {skipped:?}"),
            turnd: "PostgreSQL's lock table is too small (see notes)".into(),
            floor: String::new(),
            ratio: String::new(),
            target: String::new(),
            verdict: Some(false),
        });
    }
}

enum Cmp {
    AtLeast(f64),
    AtMost(f64),
}

struct Builder {
    label: String,
    rows: Vec<Row>,
    targets: Vec<Value>,
}

impl Builder {
    /// A figure at the largest scale level over the same at the smallest, judged against the
    /// issue's turn-path bound.
    fn scale_ratio_row(
        &mut self,
        metric: &str,
        target_name: &str,
        ratio: Option<f64>,
        extra: String,
    ) {
        let verdict = ratio.map(|r| r <= SCALE_LATENCY_RATIO_MAX);
        self.rows.push(Row {
            label: self.label.clone(),
            metric: metric.to_owned(),
            turnd: ratio.map_or("?".into(), |r| format!("{r:.2}")),
            floor: String::new(),
            ratio: extra,
            target: format!("≤ {SCALE_LATENCY_RATIO_MAX:.1}"),
            verdict,
        });
        self.target(target_name, ratio, Some(SCALE_LATENCY_RATIO_MAX), verdict);
    }

    fn target(&mut self, name: &str, value: Option<f64>, limit: Option<f64>, pass: Option<bool>) {
        self.targets.push(json!({ "target": name, "value": value, "limit": limit, "pass": pass }));
    }

    /// turnd vs floor, their ratio, and the ratio's target.
    fn ratio_row(
        &mut self,
        metric: &str,
        v: Option<f64>,
        f: Option<f64>,
        fmt: impl Fn(f64) -> String,
        cmp: Cmp,
    ) {
        let ratio = v.zip(f).filter(|(_, f)| *f > 0.0).map(|(v, f)| v / f);
        let (target, verdict) = match cmp {
            Cmp::AtLeast(x) => (format!("ratio ≥ {x:.2}"), ratio.map(|r| r >= x)),
            Cmp::AtMost(x) => (format!("ratio ≤ {x:.2}"), ratio.map(|r| r <= x)),
        };
        self.rows.push(Row {
            label: self.label.clone(),
            metric: metric.to_owned(),
            turnd: v.map_or("?".into(), &fmt),
            floor: f.map_or(String::new(), &fmt),
            ratio: ratio.map_or(String::new(), |r| format!("{r:.2}")),
            target: target.clone(),
            verdict,
        });
        let name = format!("{} {metric} {target}", self.label);
        self.target(&name, ratio, None, verdict);
    }

    /// An absolute target (no floor).
    fn abs_row(
        &mut self,
        metric: &str,
        v: Option<f64>,
        fmt: impl Fn(f64) -> String,
        cmp: Cmp,
        unit: &str,
    ) {
        let (target, verdict, limit) = match cmp {
            Cmp::AtLeast(x) => (format!("≥ {x} {unit}"), v.map(|v| v >= x), x),
            Cmp::AtMost(x) => (format!("≤ {x} {unit}"), v.map(|v| v <= x), x),
        };
        self.rows.push(Row {
            label: self.label.clone(),
            metric: metric.to_owned(),
            turnd: v.map_or("?".into(), &fmt),
            floor: String::new(),
            ratio: String::new(),
            target: target.trim().to_owned(),
            verdict,
        });
        let name = format!("{} {metric}", self.label);
        self.target(&name, v, Some(limit), verdict);
    }

    fn pair_row(&mut self, metric: &str, t: &Value, f: Option<&Value>, a: &str, b: &str) {
        let ratio =
            num(t, a).zip(f.and_then(|f| num(f, a))).filter(|(_, f)| *f > 0.0).map(|(t, f)| t / f);
        self.rows.push(Row {
            label: self.label.clone(),
            metric: metric.to_owned(),
            turnd: pair(t, a, b),
            floor: f.map_or(String::new(), |f| pair(f, a, b)),
            ratio: ratio.map_or(String::new(), |r| format!("{r:.2}")),
            target: String::new(),
            verdict: None,
        });
    }

    /// CPU per turn of everyone involved: turnd + workers + harness + postgres + rabbitmq,
    /// against floor-bench's own process (its pipeline and harness) + postgres + rabbitmq.
    /// floor-bench meters its whole mode (setup included), turnd-bench its measurement window.
    fn cpu_row(&mut self, t: &Value, f: Option<&Value>) {
        let ours = num(t, "/cpu/all_ms_per_turn");
        let theirs = f.and_then(|f| {
            // floor-bench's latency mode meters its warm-up turns too.
            let turns = num(f, "/turns")? + num(f, "/warmup").unwrap_or(0.0);
            let cpu = num(f, "/cpu/floor_bench_s")?
                + num(f, "/cpu/postgres_s")?
                + num(f, "/cpu/rabbitmq_s")?;
            Some(1e3 * cpu / turns.max(1.0))
        });
        let ratio = ours.zip(theirs).filter(|(_, f)| *f > 0.0).map(|(o, f)| o / f);
        let metric = "CPU per turn (all parties, harness incl.)";
        let (target, verdict) = match f {
            Some(_) => (format!("ratio ≤ {CPU_RATIO_MAX:.2}"), ratio.map(|r| r <= CPU_RATIO_MAX)),
            None => (String::new(), None),
        };
        self.rows.push(Row {
            label: self.label.clone(),
            metric: metric.into(),
            turnd: ours.map_or("?".into(), |v| format!("{v:.2} ms")),
            floor: theirs.map_or(String::new(), |v| format!("{v:.2} ms")),
            ratio: ratio.map_or(String::new(), |r| format!("{r:.2}")),
            target: target.clone(),
            verdict,
        });
        if f.is_some() {
            let name = format!("{} {metric} {target}", self.label);
            self.target(&name, ratio, None, verdict);
        }
    }
}

pub fn num(v: &Value, path: &str) -> Option<f64> {
    v.pointer(path).and_then(Value::as_f64)
}

fn pair(v: &Value, a: &str, b: &str) -> String {
    match (num(v, a), num(v, b)) {
        (Some(x), Some(y)) => format!("{} / {}", short_ms(x), short_ms(y)),
        _ => "?".into(),
    }
}

/// A failed mode's row.
pub fn failed(label: &str, error: &str) -> Row {
    Row {
        label: label.to_owned(),
        metric: "run".into(),
        turnd: format!("FAILED: {}", error.lines().next().unwrap_or(error)),
        floor: String::new(),
        ratio: String::new(),
        target: String::new(),
        verdict: Some(false),
    }
}

/// A Markdown table, columns padded.
pub fn table(rows: &[Row]) -> String {
    let head = ["mode", "metric", "turnd", "floor", "ratio", "target", "result"];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.label.clone(),
                r.metric.clone(),
                r.turnd.clone(),
                r.floor.clone(),
                r.ratio.clone(),
                r.target.clone(),
                match r.verdict {
                    Some(true) => "PASS".into(),
                    Some(false) => "FAIL".into(),
                    None => String::new(),
                },
            ]
        })
        .collect();
    let mut width = head.map(|h| h.chars().count());
    for row in &cells {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cols: &[String]| {
        let padded: Vec<String> = cols
            .iter()
            .zip(width)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
            .collect();
        format!("| {} |", padded.join(" | "))
    };
    let mut out = line(&head.map(str::to_owned));
    out.push('\n');
    out += &format!("|{}|", width.map(|w| "-".repeat(w + 2)).join("|"));
    for row in &cells {
        out.push('\n');
        out += &line(row);
    }
    out
}
