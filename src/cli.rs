//! The command line (CONTRACT §8): argument parsing and the one-shot commands. `run` hands
//! over to `daemon`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use futures_lite::StreamExt;
use lapin::types::ShortString;

use crate::broker::{self, Names, Session, json_properties};
use crate::config::{Config, ConfigError};
use crate::store::{self, Store};
use crate::untrusted::{inert, inert_lines};

#[derive(Debug, Parser)]
#[command(
    name = "turnd",
    version,
    about = "Exactly-once conversation turns over RabbitMQ and PostgreSQL"
)]
pub struct Cli {
    /// Config file (default /etc/turnd/turnd.toml; environment TURND_<SECTION>__<KEY> overrides).
    /// Accepted before or after any subcommand.
    #[arg(long, short = 'c', value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (systemd's ExecStart)
    Run,
    /// Apply database migrations
    Migrate,
    /// Validate the config and print the effective config with secrets redacted
    CheckConfig,
    /// The cluster as the database sees it
    Status {
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
    /// Publish one turn with payload {"text": TEXT}
    Send(SendArgs),
    /// Parked turns: list, show, replay, purge
    Parked {
        #[command(subcommand)]
        action: ParkedAction,
    },
    /// Cancel turns: a queued one ends TURN_CANCELLED now; a running one's worker is told and
    /// has turn.cancel_grace to answer first. Exit 1 unless every turn was (being) cancelled
    Cancel {
        /// messageIds (unique per deployment; see --deployment)
        #[arg(required = true)]
        message_ids: Vec<String>,
        /// The deployment, when a messageId is used in several (the error lists them)
        #[arg(long)]
        deployment: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// The audit log of operator actions (replay, purge, cancel), newest first
    Audit {
        /// Only this action (replay, purge, cancel)
        #[arg(long)]
        action: Option<String>,
        /// At most this many (lists stop at 1000)
        #[arg(long, default_value_t = 100)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ParkedAction {
    /// List parked turns, newest first
    List {
        #[arg(long)]
        code: Option<String>,
        /// Only those parked within this long (e.g. 1h)
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<Duration>,
        /// At most this many (lists stop at 1000)
        #[arg(long, default_value_t = 100)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Show one parked turn with its body and headers
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Republish parked turns to <prefix>.turns, each once
    Replay {
        /// Parked ids
        ids: Vec<i64>,
        /// Every parked turn with this code (not yet replayed)
        #[arg(long, conflicts_with = "ids")]
        code: Option<String>,
        #[arg(long, value_parser = humantime::parse_duration, requires = "code")]
        since: Option<Duration>,
        /// Recorded as who replayed (default: $USER)
        #[arg(long)]
        by: Option<String>,
    },
    /// Delete parked records (the AMQP parked queue keeps its copy)
    Purge {
        ids: Vec<i64>,
        #[arg(long)]
        code: Option<String>,
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Option<Duration>,
    },
}

#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// agentId
    #[arg(long, default_value = "demo")]
    pub agent: String,
    /// organizationId
    #[arg(long)]
    pub org: Option<String>,
    /// conversationId (a fresh one when absent)
    #[arg(long)]
    pub conversation: Option<String>,
    /// runId
    #[arg(long)]
    pub run_id: Option<u64>,
    /// Wait for the terminal event and print it (exit 0 reply, 1 error, 124 timeout)
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// The text of the turn's payload
    pub text: String,
}

/// Exit code for an invalid config (CONTRACT §8).
pub const EXIT_BAD_CONFIG: u8 = 2;
pub const EXIT_TIMEOUT: u8 = 124;

pub fn load_config(path: Option<&std::path::Path>) -> Result<Config, ConfigError> {
    Config::load(path)
}

/// An error as one line: each cause of the chain once (a cause whose text the line already
/// holds is left out), line breaks folded. CONTRACT §8.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    let store = Store::connect_now(&config.database, &config.daemon.id).await?;
    store.migrate().await.context("apply migrations")?;
    println!("migrations applied");
    Ok(())
}

pub async fn status(config: &Config, json: bool) -> anyhow::Result<()> {
    let store = Store::connect_now(&config.database, &config.daemon.id).await?;
    let live_within = (config.sweep.interval * 3).max(Duration::from_secs(15));
    let status = store.status(live_within).await.context("read cluster status")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    println!("DAEMONS ({})", status.daemons.len());
    println!(
        "  {:<32} {:<16} {:>8} {:>6} {:>8} {:>8}",
        "ID", "HOST", "PID", "READY", "WORKERS", "OWNS"
    );
    for d in &status.daemons {
        println!(
            "  {:<32} {:<16} {:>8} {:>6} {:>8} {:>8}",
            d.id, d.hostname, d.pid, d.ready, d.live_workers, d.owned_deployments
        );
    }
    if status.owned_deployments > status.deployments.len() as i64 {
        println!(
            "DEPLOYMENTS ({}, the first {} by name; the console searches them all)",
            status.owned_deployments,
            status.deployments.len()
        );
    } else {
        println!("DEPLOYMENTS ({})", status.deployments.len());
    }
    println!(
        "  {:<36} {:<24} {:>8} {:>9} {:>7} {:>7}",
        "DEPLOYMENT", "OWNER", "EPOCH", "SINCE", "QUEUED", "RUNNING"
    );
    for d in &status.deployments {
        println!(
            "  {:<36} {:<24} {:>8} {:>8.0}s {:>7} {:>7}",
            d.deployment, d.owner, d.epoch, d.since_s, d.queued, d.running
        );
    }
    let p = &status.pending;
    println!(
        "PENDING  queued {}  running {}  oldest {}",
        p.queued,
        p.running,
        p.oldest_age_s.map_or("-".to_owned(), |s| format!("{s:.1}s"))
    );
    println!("UNPUBLISHED EVENTS  {}", status.unpublished_events);
    Ok(())
}

/// `turnd send`: returns the process exit code.
pub async fn send(config: &Config, args: &SendArgs) -> anyhow::Result<ExitCode> {
    let message_id = uuid::Uuid::new_v4().to_string();
    let conversation =
        args.conversation.clone().unwrap_or_else(|| format!("cli-{}", uuid::Uuid::new_v4()));
    let mut turn = serde_json::Map::new();
    turn.insert("messageId".into(), message_id.clone().into());
    turn.insert("agentId".into(), args.agent.clone().into());
    if let Some(org) = &args.org {
        turn.insert("organizationId".into(), org.clone().into());
    }
    turn.insert("conversationId".into(), conversation.into());
    if let Some(run_id) = args.run_id {
        turn.insert("runId".into(), run_id.into());
    }
    turn.insert("payload".into(), serde_json::json!({ "text": args.text }));
    let body = serde_json::to_vec(&turn)?;
    let parsed = crate::turn::parse(&body, config.intake.max_turn_bytes)
        .map_err(|e| anyhow::anyhow!("this turn would be refused: {e}"))?;

    let (connection, publisher) = broker::connect(config, "turnd send").await?;
    broker::declare_topology(&connection, config).await.context("declare topology")?;
    let names = Names::new(&config.amqp.prefix);
    let mut replies = None;
    if args.wait {
        let key = crate::event::routing_key(args.org.as_deref(), &parsed.deployment);
        replies = Some(broker::reply_consumer(&connection, &names, &key).await?);
    }
    let key = format!("turn.{}", args.org.as_deref().unwrap_or("_"));
    let properties = json_properties().with_message_id(ShortString::from(message_id.as_str()));
    let confirm =
        broker::publish_on(&publisher, &names.turns(), &key, true, &body, properties).await?;
    if !Session::confirmed(confirm, &names.turns()).await? {
        bail!("the turn was not routed: is {} bound to {}?", names.inbox(), names.turns());
    }
    let Some(mut replies) = replies else {
        println!("{{\"messageId\":\"{message_id}\",\"deployment\":\"{}\"}}", parsed.deployment);
        return Ok(ExitCode::SUCCESS);
    };
    let wait = async {
        while let Some(delivery) = replies.next().await {
            let delivery = delivery?;
            if delivery.properties.correlation_id().as_ref().map(|c| c.as_str())
                == Some(message_id.as_str())
            {
                return Ok::<_, anyhow::Error>(Some(delivery.data));
            }
        }
        Ok(None)
    };
    match tokio::time::timeout(args.timeout, wait).await {
        Ok(Ok(Some(data))) => {
            println!("{}", String::from_utf8_lossy(&data));
            let event: serde_json::Value = serde_json::from_slice(&data).unwrap_or_default();
            Ok(if event["kind"] == "reply" { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Ok(Ok(None)) => bail!("the broker closed the reply consumer"),
        Ok(Err(e)) => Err(e),
        Err(_) => {
            eprintln!(
                "no terminal event for {message_id} within {}",
                humantime::format_duration(args.timeout)
            );
            Ok(ExitCode::from(EXIT_TIMEOUT))
        }
    }
}

pub async fn parked(config: &Config, action: &ParkedAction) -> anyhow::Result<ExitCode> {
    let store = Store::connect_now(&config.database, &config.daemon.id).await?;
    match action {
        ParkedAction::List { code, since, limit, json } => {
            if *limit > store::MAX_LIST_ROWS {
                eprintln!(
                    "--limit {limit}: lists stop at {} rows; narrow with --code or --since",
                    store::MAX_LIST_ROWS
                );
            }
            let rows = store.parked_list(code.as_deref(), *since, *limit).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:>8} {:<16} {:>8} {:>4} {:<10} REASON",
                    "ID", "CODE", "AGE", "TRY", "REPLAYED"
                );
                for p in rows {
                    println!(
                        "{:>8} {:<16} {:>7.0}s {:>4} {:<10} {}",
                        p.id,
                        inert(&p.code),
                        p.age_s,
                        p.attempts,
                        inert(p.replayed_by.as_deref().unwrap_or("-")),
                        inert(&p.reason)
                    );
                }
            }
        }
        ParkedAction::Show { id, json } => {
            let Some(turn) = store.parked_get(*id).await? else { bail!("no parked turn {id}") };
            let body = String::from_utf8_lossy(&turn.body).into_owned();
            let p = &turn.parked;
            if *json {
                let mut v = serde_json::to_value(p)?;
                v["body"] = body.into();
                v["headers"] = serde_json::from_str(&turn.headers).unwrap_or_default();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "id         {}\ncode       {}\nreason     {}\ndeployment {}\nmessageId  {}\nattempts   {}\nage        {:.0}s\nreplayed   {}\nheaders    {}\nbody       {}",
                    p.id,
                    inert(&p.code),
                    inert(&p.reason),
                    inert(p.deployment.as_deref().unwrap_or("-")),
                    inert(p.message_id.as_deref().unwrap_or("-")),
                    p.attempts,
                    p.age_s,
                    inert(p.replayed_by.as_deref().unwrap_or("-")),
                    inert(&turn.headers),
                    inert_lines(&body)
                );
            }
        }
        ParkedAction::Replay { ids, code, since, by } => {
            let ids = match code {
                Some(code) => store.parked_replayable_ids(code, *since).await?,
                None => ids.clone(),
            };
            if ids.is_empty() {
                bail!("nothing to replay: name parked ids or --code");
            }
            let who = by
                .clone()
                .or_else(|| std::env::var("USER").ok())
                .unwrap_or_else(|| "cli".to_owned());
            let results = crate::parked::replay(config, &store, &ids, &who, &cli_actor()).await?;
            let mut failed = false;
            for r in &results {
                println!("{:>8} {}", r.id, r.result);
                failed |= r.result != "replayed";
            }
            if failed {
                return Ok(ExitCode::from(1));
            }
        }
        ParkedAction::Purge { ids, code, older_than } => {
            if ids.is_empty() && code.is_none() && older_than.is_none() {
                bail!(
                    "name parked ids, --code or --older-than (purging everything needs an explicit --older-than 0s)"
                );
            }
            let purged =
                crate::parked::purge(&store, ids, code.as_deref(), *older_than, &cli_actor())
                    .await?;
            println!("purged {} parked records", purged.len());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Who runs a one-shot command, for the audit log: the OS user.
pub fn cli_actor() -> store::Actor {
    let who = ["USER", "LOGNAME"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
        // SAFETY: getuid cannot fail.
        .unwrap_or_else(|| format!("uid:{}", unsafe { libc::getuid() }));
    store::Actor { who, via: "cli" }
}

pub async fn cancel(
    config: &Config,
    message_ids: &[String],
    deployment: Option<&str>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use crate::store::CancelResult as R;
    let store = Store::connect_now(&config.database, &config.daemon.id).await?;
    // The owners hear at once through their thread queues; without the broker, the sweep
    // tells them within sweep.interval.
    let broker = match crate::broker::connect(config, "turnd cancel").await {
        Ok(b) => Some(b),
        Err(e) => {
            eprintln!(
                "RabbitMQ unavailable ({e}); the owners learn of the cancel within sweep.interval"
            );
            None
        }
    };
    let reports = crate::cancel::cancel(
        config,
        &store,
        broker.as_ref().map(|(_, ch)| ch),
        message_ids,
        deployment,
        &cli_actor(),
    )
    .await?;
    if let Some((connection, _)) = broker {
        let _ = connection.close(200, "done".into()).await;
    }
    let mut all = true;
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    }
    for r in &reports {
        let id = inert(&r.message_id);
        let line = match &r.result {
            R::Cancelled { deployment } => {
                format!("{id}: cancelled (was queued in {deployment}; TURN_CANCELLED sent)")
            }
            R::Cancelling { deployment, owner } => format!(
                "{id}: cancelling (running in {deployment} on {}; its worker has turn.cancel_grace to answer, then TURN_CANCELLED)",
                owner.as_deref().unwrap_or("no daemon right now"),
            ),
            R::AlreadyCancelling { deployment } => {
                format!("{id}: already cancelling (in {deployment})")
            }
            R::AlreadyDone { deployment, kind, code } => {
                all = false;
                format!(
                    "{id}: already answered in {deployment} ({}); nothing changed",
                    match (kind.as_deref(), code.as_deref()) {
                        (Some("error"), Some(c)) => format!("error {c}"),
                        (Some(k), _) => k.to_owned(),
                        (None, _) => "event no longer kept".to_owned(),
                    }
                )
            }
            R::NotFound => {
                all = false;
                format!(
                    "{id}: no such turn{} (never accepted, or older than reply.retention)",
                    deployment.map(|d| format!(" in {d}")).unwrap_or_default()
                )
            }
            R::Ambiguous { candidates } => {
                all = false;
                format!(
                    "{id}: in several deployments, name one with --deployment: {}",
                    candidates.join(", ")
                )
            }
        };
        if !json {
            println!("{line}");
        }
    }
    Ok(if all { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

pub async fn audit(
    config: &Config,
    action: Option<&str>,
    limit: i64,
    json: bool,
) -> anyhow::Result<()> {
    let store = Store::connect_now(&config.database, &config.daemon.id).await?;
    let rows = store.audit_list(action, limit).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!("{:<24} {:<16} {:<8} {:<8} {:<40} RESULT", "AT", "WHO", "VIA", "ACTION", "TARGET");
    for r in rows {
        println!(
            "{:<24} {:<16} {:<8} {:<8} {:<40} {}",
            r.at,
            inert(&r.who),
            r.via,
            inert(&r.action),
            inert(&r.target),
            inert(&r.result)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("database error: {0}")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("pool timed out\nwhile waiting")]
    struct Inner;

    #[test]
    fn an_error_is_one_line_and_says_each_cause_once() {
        let e = anyhow::Error::new(Outer(Inner)).context("read cluster status");
        assert_eq!(
            one_line(&e),
            "read cluster status: database error: pool timed out while waiting"
        );
        let e = anyhow::anyhow!("a").context("b: a");
        assert_eq!(one_line(&e), "b: a");
    }

    #[test]
    fn config_parses_before_and_after_every_subcommand() {
        for args in [
            &["turnd", "--config", "F", "parked", "list"][..],
            &["turnd", "parked", "list", "--config", "F"],
            &["turnd", "parked", "--config", "F", "show", "3"],
            &["turnd", "send", "hi", "-c", "F"],
            &["turnd", "-c", "F", "run"],
            &["turnd", "check-config", "--config=F"],
        ] {
            let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert_eq!(cli.config.as_deref(), Some(std::path::Path::new("F")), "{args:?}");
        }
    }
}
