//! PostgreSQL's cost per turn by statement (`--statements`), from `pg_stat_statements`.
//!
//! The view lives in the admin database (where `scripts/pg-statements.sh` creates the
//! extension) and covers every database; a mode's rows are those of its own database
//! (`dbid`). The counters are reset right before a measured window (after the mode's set-up,
//! migrations and warm-up) and read after it, then divided by the turns of the window.
//! Resetting is server-wide, which is fine while modes run one at a time.
//!
//! The harness's own statements on a mode's database carry [`HARNESS_TAG`] (pg_stat_statements
//! keeps a statement's leading comment in its text) and are left out of the figures;
//! floor-bench's set-up and check, which cannot be tagged, are recognised by their text.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::cluster::admin_connection;

/// Leads every statement the harness sends to a mode's database (see [`harness_sql`]).
pub const HARNESS_TAG: &str = "/* bench-harness */";

/// A statement the harness sends to a mode's database, tagged with [`HARNESS_TAG`] so that
/// `--statements` leaves it out of the turns' figures.
macro_rules! harness_sql {
    ($sql:literal) => {
        concat!("/* bench-harness */ ", $sql)
    };
}
pub(crate) use harness_sql;

/// Statements shown one by one (by execution time); the rest are summed as "(other)".
const TOP: usize = 12;

/// Characters of a statement's text in the table.
const SHOWN_CHARS: usize = 70;

/// floor-bench's statements that are not part of its turns: its table reset and its check.
const FLOOR_HARNESS: [&str; 3] = [
    "DROP TABLE IF EXISTS floor_outbox",
    "CREATE TABLE floor_",
    "SELECT (SELECT count(*) FROM floor_outbox)",
];

const HOW: &str = "run scripts/pg-statements.sh (it adds pg_stat_statements to \
                   shared_preload_libraries, restarts PostgreSQL and creates the extension)";

/// Fails unless the server loaded pg_stat_statements and the admin database has its view.
pub async fn check(admin_url: &str) -> Result<()> {
    let mut admin = admin_connection(admin_url).await?;
    let preload: String = sqlx::query_scalar("SELECT current_setting('shared_preload_libraries')")
        .fetch_one(&mut admin)
        .await
        .context("read shared_preload_libraries")?;
    if !preload.split(',').any(|l| l.trim().trim_matches('"') == "pg_stat_statements") {
        bail!(
            "--statements: PostgreSQL has not loaded pg_stat_statements (shared_preload_libraries \
             = {preload:?}); {HOW}"
        );
    }
    let installed: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements')",
    )
    .fetch_one(&mut admin)
    .await
    .context("look for the pg_stat_statements extension")?;
    if !installed {
        bail!(
            "--statements: the extension pg_stat_statements does not exist in the database of \
             --database-url; {HOW}"
        );
    }
    let track: String = sqlx::query_scalar("SELECT current_setting('pg_stat_statements.track')")
        .fetch_one(&mut admin)
        .await
        .context("read pg_stat_statements.track")?;
    if track == "none" {
        bail!("--statements: pg_stat_statements.track is 'none', nothing is counted; {HOW}");
    }
    sqlx::query("SELECT pg_stat_statements_reset()")
        .execute(&mut admin)
        .await
        .context("--statements: pg_stat_statements_reset() (needs a superuser --database-url)")?;
    Ok(())
}

/// Zeroes every counter (server-wide), right before a measured window.
pub async fn reset(admin_url: &str) -> Result<()> {
    let mut admin = admin_connection(admin_url).await?;
    sqlx::query("SELECT pg_stat_statements_reset()")
        .execute(&mut admin)
        .await
        .context("pg_stat_statements_reset()")?;
    Ok(())
}

/// One statement's counters (summed over the rows that share its text).
#[derive(Debug, Clone, Default)]
pub struct Stmt {
    /// Whitespace collapsed.
    pub text: String,
    pub calls: f64,
    pub exec_ms: f64,
    pub rows: f64,
    pub wal_bytes: f64,
    /// shared_blks_hit + shared_blks_read.
    pub blocks: f64,
}

impl Stmt {
    fn add(&mut self, o: &Stmt) {
        self.calls += o.calls;
        self.exec_ms += o.exec_ms;
        self.rows += o.rows;
        self.wal_bytes += o.wal_bytes;
        self.blocks += o.blocks;
    }

    fn json(&self, turns: f64) -> Value {
        json!({
            "statement": self.text,
            "calls": self.calls,
            "total_exec_ms": self.exec_ms,
            "rows": self.rows,
            "wal_bytes": self.wal_bytes,
            "shared_blocks": self.blocks,
            "calls_per_turn": self.calls / turns,
            "exec_ms_per_turn": self.exec_ms / turns,
            "rows_per_turn": self.rows / turns,
            "wal_bytes_per_turn": self.wal_bytes / turns,
            "shared_blocks_per_turn": self.blocks / turns,
        })
    }
}

/// A mode's statements over one measured window.
#[derive(Debug, Clone)]
pub struct Table {
    /// "turnd" or "floor-bench".
    pub who: String,
    pub database: String,
    pub turns: usize,
    /// The turns' statements, most execution time first.
    pub statements: Vec<Stmt>,
    /// The harness's own statements (left out of the figures).
    pub harness: Vec<Stmt>,
    /// Statements pg_stat_statements evicted during the window (its `max`): figures missing.
    pub dealloc: i64,
}

/// The counters of `database` since the last reset, over `turns` turns.
pub async fn read(admin_url: &str, database: &str, turns: usize, who: &str) -> Result<Table> {
    let mut admin = admin_connection(admin_url).await?;
    // to_jsonb: the columns differ between PostgreSQL versions (total_time before 13, no
    // wal_bytes before 13, toplevel from 14).
    let rows: Vec<String> = sqlx::query_scalar(
        "SELECT to_jsonb(s)::text FROM pg_stat_statements s
          WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = $1)",
    )
    .bind(database)
    .fetch_all(&mut admin)
    .await
    .with_context(|| format!("read pg_stat_statements for database {database}"))?;
    // pg_stat_statements_info exists from 14.
    let dealloc: i64 = sqlx::query_scalar(
        "SELECT CASE WHEN to_regclass('pg_stat_statements_info') IS NULL THEN 0
                     ELSE (SELECT (to_jsonb(i)->>'dealloc')::bigint FROM pg_stat_statements_info i)
                END",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap_or(0);
    let mut by_text: BTreeMap<String, Stmt> = BTreeMap::new();
    for row in &rows {
        let v: Value = serde_json::from_str(row).context("pg_stat_statements row as JSON")?;
        // track = 'all' also counts statements inside functions, already in their caller's.
        if v.get("toplevel").and_then(Value::as_bool) == Some(false) {
            continue;
        }
        let f = |k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(0.0);
        let text = collapse(v.get("query").and_then(Value::as_str).unwrap_or("?"));
        let s = Stmt {
            text: text.clone(),
            calls: f("calls"),
            exec_ms: if v.get("total_exec_time").is_some() {
                f("total_exec_time")
            } else {
                f("total_time")
            },
            rows: f("rows"),
            wal_bytes: f("wal_bytes"),
            blocks: f("shared_blks_hit") + f("shared_blks_read"),
        };
        by_text.entry(text.clone()).or_insert_with(|| Stmt { text, ..Stmt::default() }).add(&s);
    }
    let (mut harness, mut statements): (Vec<Stmt>, Vec<Stmt>) =
        by_text.into_values().partition(|s| is_harness(&s.text));
    statements.sort_by(|a, b| b.exec_ms.total_cmp(&a.exec_ms));
    harness.sort_by(|a, b| b.exec_ms.total_cmp(&a.exec_ms));
    Ok(Table {
        who: who.to_owned(),
        database: database.to_owned(),
        turns,
        statements,
        harness,
        dealloc,
    })
}

fn is_harness(text: &str) -> bool {
    text.starts_with(HARNESS_TAG) || FLOOR_HARNESS.iter().any(|p| text.starts_with(p))
}

/// Whitespace runs as one space.
fn collapse(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The first [`SHOWN_CHARS`] characters (`…` when cut) as code in a Markdown table cell:
/// `|` escaped, backticks made quotes.
fn shown(text: &str) -> String {
    let mut s: String = text.chars().take(SHOWN_CHARS).collect();
    if text.chars().count() > SHOWN_CHARS {
        s.push('…');
    }
    format!("`{}`", s.replace('`', "'").replace('|', "\\|"))
}

impl Table {
    fn per_turn(&self) -> f64 {
        self.turns.max(1) as f64
    }

    /// The sum of every statement of the turns.
    pub fn total(&self) -> Stmt {
        let mut t = Stmt { text: "total".into(), ..Stmt::default() };
        for s in &self.statements {
            t.add(s);
        }
        t
    }

    /// The top statements, the rest summed as "(other: k statements)".
    fn shown_rows(&self) -> Vec<Stmt> {
        let mut rows: Vec<Stmt> = self.statements.iter().take(TOP).cloned().collect();
        let rest = &self.statements[rows.len()..];
        if !rest.is_empty() {
            let mut other =
                Stmt { text: format!("(other: {} statements)", rest.len()), ..Stmt::default() };
            for s in rest {
                other.add(s);
            }
            rows.push(other);
        }
        rows
    }

    pub fn json(&self) -> Value {
        let n = self.per_turn();
        json!({
            "database": self.database,
            "turns": self.turns,
            "statements": self.statements.iter().map(|s| s.json(n)).collect::<Vec<_>>(),
            "total": self.total().json(n),
            "harness_excluded": self.harness.iter().map(|s| s.json(n)).collect::<Vec<_>>(),
            "dealloc": self.dealloc,
        })
    }

    /// A Markdown table: the top statements, "(other)", the total; a line on what was left out.
    pub fn human(&self, label: &str) -> String {
        let n = self.per_turn();
        let mut out = format!(
            "PostgreSQL per turn, {} — {label} ({} turns, database {}):\n\
             | statement | calls/turn | ms/turn | WAL B/turn | blocks/turn |\n\
             |---|---:|---:|---:|---:|\n",
            self.who, self.turns, self.database
        );
        let line = |s: &Stmt, text: String| {
            format!(
                "| {text} | {:.3} | {:.4} | {:.0} | {:.1} |\n",
                s.calls / n,
                s.exec_ms / n,
                s.wal_bytes / n,
                s.blocks / n
            )
        };
        for s in self.shown_rows() {
            let text = if s.text.starts_with("(other") { s.text.clone() } else { shown(&s.text) };
            out += &line(&s, text);
        }
        out += &line(&self.total(), "**total**".into());
        if !self.harness.is_empty() {
            let calls: f64 = self.harness.iter().map(|s| s.calls).sum();
            let ms: f64 = self.harness.iter().map(|s| s.exec_ms).sum();
            out += &format!(
                "(left out: {} statement(s) of the harness's set-up and checks, {calls:.0} \
                 calls, {ms:.1} ms in all)\n",
                self.harness.len()
            );
        }
        if self.dealloc > 0 {
            out += &format!(
                "WARNING: pg_stat_statements evicted {} statement(s) during the window \
                 (pg_stat_statements.max): figures are missing\n",
                self.dealloc
            );
        }
        out.trim_end().to_owned()
    }
}

/// One line comparing two tables' totals per turn.
pub fn compare(turnd: &Table, floor: &Table) -> String {
    let (t, f) = (turnd.total(), floor.total());
    let (nt, nf) = (turnd.per_turn(), floor.per_turn());
    let ratio = |a: f64, b: f64| if b > 0.0 { format!(" (×{:.2})", a / b) } else { String::new() };
    format!(
        "PostgreSQL per turn, turnd vs floor-bench: {:.2} vs {:.2} statements{}, {:.3} vs {:.3} ms \
         executing{}, {:.0} vs {:.0} B of WAL{}",
        t.calls / nt,
        f.calls / nf,
        ratio(t.calls / nt, f.calls / nf),
        t.exec_ms / nt,
        f.exec_ms / nf,
        ratio(t.exec_ms / nt, f.exec_ms / nf),
        t.wal_bytes / nt,
        f.wal_bytes / nf,
        ratio(t.wal_bytes / nt, f.wal_bytes / nf),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_collapsed_cut_and_escaped() {
        assert_eq!(collapse("SELECT  a,\n\t b FROM t"), "SELECT a, b FROM t");
        let long = "x".repeat(100);
        assert_eq!(shown(&long).chars().count(), SHOWN_CHARS + 3);
        assert_eq!(shown("SELECT a || b"), "`SELECT a \\|\\| b`");
    }

    #[test]
    fn harness_statements_are_recognised() {
        assert!(is_harness(harness_sql!("SELECT count(*) FROM turnd_turns")));
        assert!(is_harness("/* bench-harness */ SELECT 1"));
        assert!(is_harness("SELECT (SELECT count(*) FROM floor_outbox), (SELECT 1)"));
        assert!(!is_harness("UPDATE turnd_turns SET state = $1"));
    }

    #[test]
    fn the_rest_is_summed_as_other() {
        let statements: Vec<Stmt> = (0..TOP + 3)
            .map(|i| Stmt { text: format!("S{i}"), calls: 1.0, exec_ms: 1.0, ..Stmt::default() })
            .collect();
        let t = Table {
            who: "turnd".into(),
            database: "d".into(),
            turns: 0,
            statements,
            harness: Vec::new(),
            dealloc: 0,
        };
        let rows = t.shown_rows();
        assert_eq!(rows.len(), TOP + 1);
        assert_eq!(rows[TOP].calls, 3.0);
        assert_eq!(t.total().calls, (TOP + 3) as f64);
        // No turns: no division by zero.
        assert!(t.human("x").contains("| **total** | 15.000 |"));
    }
}
