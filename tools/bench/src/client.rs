//! The producer and the reply collector. Replies come from an exclusive queue bound to
//! `<prefix>.replies` with `#`, declared before anything is published; a task stamps each
//! delivery on arrival and the ledger checks it: one terminal event per turn, de-duplicated
//! on the AMQP message_id, with the outcome the turn asked for.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures_lite::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, PublisherConfirm};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use turnd_harness::{Expected, Ledger};

use turnd_harness::services::redact;

use crate::cluster::Cluster;

/// Publishes in flight before the producer waits for the oldest confirm (as floor-bench).
pub const PUBLISH_WINDOW: usize = 256;
/// About 200 bytes of JSON per turn, like floor-bench's turns.
const TEXT: &str =
    "Summarise the open incidents for the payments team and draft a short reply to the customer.";

/// What a turn is expected to end with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    Reply,
    Error(&'static str),
}

/// One turn ready to publish.
#[derive(Debug, Clone)]
pub struct Turn {
    pub message_id: String,
    pub deployment: String,
    pub body: Vec<u8>,
    pub expect: Expect,
}

/// Builds turns and remembers each conversation's deployment name (as turnd derives it).
#[derive(Debug, Default)]
pub struct Turns {
    deployments: HashMap<String, String>,
}

impl Turns {
    /// A turn of `conversation` whose worker does `action` (turnd-test-worker's payload.action).
    pub fn make(&mut self, conversation: &str, message_id: String, action: &str) -> Result<Turn> {
        let body = json!({
            "messageId": message_id,
            "agentId": "bench",
            "organizationId": "bench",
            "conversationId": conversation,
            "payload": { "action": action, "text": TEXT },
        })
        .to_string()
        .into_bytes();
        let deployment = match self.deployments.get(conversation) {
            Some(d) => d.clone(),
            None => {
                let parsed = turnd::turn::parse(&body, 1 << 20)
                    .map_err(|e| anyhow::anyhow!("turnd rejects the bench's turn: {e}"))?;
                let d = parsed.deployment.as_str().to_owned();
                self.deployments.insert(conversation.to_owned(), d.clone());
                d
            }
        };
        let expect = match action {
            "hang" | "crash" => Expect::Error("WORKER_DIED"),
            _ => Expect::Reply,
        };
        Ok(Turn { message_id, deployment, body, expect })
    }
}

struct Arrival {
    at: Instant,
    wall_ns: u64,
    event_id: Option<String>,
    correlation_id: Option<String>,
    routing_key: String,
    body: Vec<u8>,
}

struct Sent {
    at: Instant,
    wall_ns: u64,
    deployment: String,
    expect: Expect,
}

/// The first terminal event seen for a turn.
#[derive(Debug, Clone)]
pub struct Got {
    pub at: Instant,
    /// CLOCK_REALTIME at arrival, to line up with the test worker's event log.
    pub wall_ns: u64,
}

/// The exactly-once check of one mode.
#[derive(Debug, Clone, Default)]
pub struct ExactlyOnce {
    pub sent: usize,
    pub answered: usize,
    pub missing: usize,
    /// Turns with more than one distinct terminal event (distinct AMQP message_id).
    pub duplicates: usize,
    /// Deliveries of an event already seen (same message_id): de-duplicated, not a violation.
    pub redelivered: usize,
    /// Events for a messageId the harness never sent.
    pub unknown: usize,
    /// Events that break CONTRACT §6: not JSON, no message_id, correlation_id ≠ messageId,
    /// routing key ≠ reply.<org>.<deployment>.
    pub malformed: usize,
    /// Turns answered with another outcome than asked for (e.g. an error for a reply): not an
    /// exactly-once violation, but the mode's figures are not what they claim.
    pub wrong_outcome: usize,
    /// Those outcomes by "kind CODE".
    pub wrong_by_code: BTreeMap<String, usize>,
    /// What the database still owes after the run (turns not done, events unpublished, an
    /// outbox row count that differs from the turns sent), if anything.
    pub database: Option<String>,
    /// Examples of what went wrong, for the report.
    pub examples: Vec<String>,
}

impl ExactlyOnce {
    pub fn violated(&self) -> bool {
        self.missing + self.duplicates + self.unknown + self.malformed > 0
            || self.database.is_some()
    }

    /// Adds another run's check to this one.
    pub fn absorb(&mut self, o: &ExactlyOnce) {
        self.sent += o.sent;
        self.answered += o.answered;
        self.missing += o.missing;
        self.duplicates += o.duplicates;
        self.redelivered += o.redelivered;
        self.unknown += o.unknown;
        self.malformed += o.malformed;
        self.wrong_outcome += o.wrong_outcome;
        for (k, n) in &o.wrong_by_code {
            *self.wrong_by_code.entry(k.clone()).or_default() += n;
        }
        if self.database.is_none() {
            self.database.clone_from(&o.database);
        }
        let room = 8usize.saturating_sub(self.examples.len());
        self.examples.extend(o.examples.iter().take(room).cloned());
    }

    /// Some turn ended otherwise than the mode asked (e.g. TURN_TIMEOUT for a reply).
    pub fn unexpected(&self) -> bool {
        self.wrong_outcome > 0
    }

    pub fn outcomes_human(&self) -> String {
        if self.wrong_outcome == 0 {
            return format!("all {} as asked", self.answered);
        }
        let by: Vec<String> =
            self.wrong_by_code.iter().map(|(k, n)| format!("{n} × {k}")).collect();
        format!("{} of {} not as asked: {}", self.wrong_outcome, self.answered, by.join(", "))
    }

    pub fn human(&self) -> String {
        let mut s = format!(
            "{} sent, {} answered: {} missing, {} duplicate, {} unknown, {} malformed",
            self.sent, self.answered, self.missing, self.duplicates, self.unknown, self.malformed
        );
        if self.redelivered > 0 {
            s += &format!(" ({} redelivered copies de-duplicated)", self.redelivered);
        }
        if let Some(db) = &self.database {
            s += &format!("; {db}");
        }
        s
    }

    pub fn json(&self) -> Value {
        json!({
            "ok": !self.violated(),
            "sent": self.sent,
            "answered": self.answered,
            "missing": self.missing,
            "duplicates": self.duplicates,
            "redelivered": self.redelivered,
            "unknown": self.unknown,
            "malformed": self.malformed,
            "wrong_outcome": self.wrong_outcome,
            "wrong_outcome_by_code": self.wrong_by_code,
            "database": self.database,
            "examples": self.examples,
        })
    }
}

pub struct Client {
    conn: Connection,
    publisher: Channel,
    turns_exchange: String,
    arrivals: mpsc::UnboundedReceiver<Result<Arrival>>,
    sent: HashMap<String, Sent>,
    got: HashMap<String, Got>,
    /// The events, de-duplicated (the harness's exactly-once check).
    ledger: Ledger,
    /// The outcomes not as asked, counted as events arrive.
    check: ExactlyOnce,
    timeout: Duration,
}

impl Client {
    /// Connects, declares the topology as a daemon would, binds the reply queue and starts
    /// consuming it: every event published from now on is seen.
    pub async fn connect(cluster: &Cluster, amqp_url: &str, timeout: Duration) -> Result<Client> {
        let properties = ConnectionProperties::default().with_connection_name("turnd-bench".into());
        let conn = Connection::connect(amqp_url, properties).await.with_context(|| {
            format!("connect to RabbitMQ at {} (is it running? see --amqp-url)", redact(amqp_url))
        })?;
        let publisher = conn.create_channel().await.context("open a channel")?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("enable publisher confirms")?;
        turnd::broker::declare_topology(&conn, &cluster.config)
            .await
            .context("declare turnd's topology")?;
        let names = turnd::broker::Names::new(&cluster.prefix);
        let ch = conn.create_channel().await.context("open a channel")?;
        let queue = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .context("declare the reply queue")?;
        ch.queue_bind(
            queue.name().clone(),
            names.replies().as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .context("bind the reply queue")?;
        let mut consumer = ch
            .basic_consume(
                queue.name().clone(),
                "turnd-bench".into(),
                BasicConsumeOptions { no_ack: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .context("consume the reply queue")?;
        let (tx, arrivals) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(delivery) = consumer.next().await {
                let at = Instant::now();
                let wall_ns = unix_ns();
                let arrival = delivery
                    .map(|d| Arrival {
                        at,
                        wall_ns,
                        event_id: d.properties.message_id().as_ref().map(ToString::to_string),
                        correlation_id: d
                            .properties
                            .correlation_id()
                            .as_ref()
                            .map(ToString::to_string),
                        routing_key: d.routing_key.to_string(),
                        body: d.data,
                    })
                    .context("the reply consumer lost its connection to RabbitMQ (was the broker restarted, or its connections closed?); events published meanwhile cannot be counted, so the mode stops");
                let failed = arrival.is_err();
                if tx.send(arrival).is_err() || failed {
                    break;
                }
            }
        });
        Ok(Client {
            conn,
            publisher,
            turns_exchange: names.turns(),
            arrivals,
            sent: HashMap::new(),
            got: HashMap::new(),
            ledger: Ledger::default(),
            check: ExactlyOnce::default(),
            timeout,
        })
    }

    /// Publishes one turn (persistent, mandatory); returns its confirm.
    pub async fn publish(&mut self, turn: &Turn) -> Result<PublisherConfirm> {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(ShortString::from("application/json"));
        let options = BasicPublishOptions { mandatory: true, ..Default::default() };
        let at = Instant::now();
        let wall_ns = unix_ns();
        let confirm = self
            .publisher
            .basic_publish(
                self.turns_exchange.as_str().into(),
                "turn.bench".into(),
                options,
                &turn.body,
                props,
            )
            .await
            .context("publish a turn")?;
        let sent =
            Sent { at, wall_ns, deployment: turn.deployment.clone(), expect: turn.expect.clone() };
        ensure!(
            self.sent.insert(turn.message_id.clone(), sent).is_none(),
            "the harness published messageId {} twice",
            turn.message_id
        );
        Ok(confirm)
    }

    /// Publishes and waits for the broker's confirm; returns publish → confirm.
    pub async fn publish_confirmed(&mut self, turn: &Turn) -> Result<Duration> {
        let started = Instant::now();
        let confirm = self.publish(turn).await?;
        confirmed(confirm).await?;
        Ok(started.elapsed())
    }

    /// Publishes every turn in order with up to [`PUBLISH_WINDOW`] unconfirmed, then waits
    /// for the remaining confirms. Replies are collected meanwhile by the consumer task.
    pub async fn publish_all(&mut self, turns: &[Turn]) -> Result<Duration> {
        let started = Instant::now();
        let mut in_flight = VecDeque::with_capacity(PUBLISH_WINDOW + 1);
        for turn in turns {
            in_flight.push_back(self.publish(turn).await?);
            if in_flight.len() > PUBLISH_WINDOW
                && let Some(oldest) = in_flight.pop_front()
            {
                confirmed(oldest).await?;
            }
        }
        for confirm in in_flight {
            confirmed(confirm).await?;
        }
        Ok(started.elapsed())
    }

    /// Publishes `turns` keeping at most `window` of them unanswered (0: no limit), then waits
    /// for the rest. Only for a batch started with nothing else outstanding.
    pub async fn publish_paced(&mut self, turns: &[Turn], window: usize) -> Result<Instant> {
        if window == 0 {
            self.publish_all(turns).await?;
            return self.wait_all().await;
        }
        let answered_before = self.got.len();
        let mut confirms = VecDeque::with_capacity(PUBLISH_WINDOW + 1);
        let mut next = 0;
        while next < turns.len() {
            let outstanding = next - (self.got.len() - answered_before);
            if outstanding >= window {
                self.receive().await?;
                continue;
            }
            confirms.push_back(self.publish(&turns[next]).await?);
            next += 1;
            if confirms.len() > PUBLISH_WINDOW
                && let Some(oldest) = confirms.pop_front()
            {
                confirmed(oldest).await?;
            }
        }
        for confirm in confirms {
            confirmed(confirm).await?;
        }
        self.wait_all().await
    }

    /// Waits until every turn sent so far has its terminal event; returns when the last one
    /// arrived.
    pub async fn wait_all(&mut self) -> Result<Instant> {
        while self.got.len() < self.sent.len() {
            self.receive().await?;
        }
        Ok(self.got.values().map(|g| g.at).max().unwrap_or_else(Instant::now))
    }

    /// Waits for one turn's terminal event.
    pub async fn wait_for(&mut self, message_id: &str) -> Result<Got> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            if let Some(got) = self.got.get(message_id) {
                return Ok(got.clone());
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "no terminal event for {message_id} within {:?}",
                self.timeout
            );
            self.receive().await?;
        }
    }

    /// Publish → first terminal event, for a turn that has one.
    pub fn latency(&self, message_id: &str) -> Option<Duration> {
        let sent = self.sent.get(message_id)?;
        Some(self.got.get(message_id)?.at.saturating_duration_since(sent.at))
    }

    /// (publish, first terminal event) in CLOCK_REALTIME ns.
    pub fn wall(&self, message_id: &str) -> Option<(u64, u64)> {
        Some((self.sent.get(message_id)?.wall_ns, self.got.get(message_id)?.wall_ns))
    }

    /// Keeps listening for `d` (duplicates arrive late, if at all).
    pub async fn settle(&mut self, d: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            match tokio::time::timeout_at(deadline, self.arrivals.recv()).await {
                Ok(Some(a)) => self.record(a?),
                Ok(None) => bail!("the reply consumer stopped"),
                Err(_) => return Ok(()),
            }
        }
    }

    /// The exactly-once check over everything sent and received so far.
    pub fn check(&self) -> ExactlyOnce {
        let keys: HashMap<&str, String> = self
            .sent
            .iter()
            .map(|(m, s)| (m.as_str(), format!("reply.bench.{}", s.deployment)))
            .collect();
        let verdict = self
            .ledger
            .verdict(keys.iter().map(|(m, k)| Expected { message_id: m, routing_key: Some(k) }));
        let mut c = self.check.clone();
        c.sent = verdict.sent;
        c.answered = self.got.len();
        c.missing = verdict.missing.len();
        c.duplicates = verdict.duplicated.iter().map(|(_, e)| e.len() - 1).sum();
        c.unknown = verdict.unknown.iter().map(|(_, n)| n).sum();
        c.malformed = verdict.malformed.len() + verdict.misaddressed.len();
        c.redelivered = self.ledger.redelivered as usize;
        let room = 8usize.saturating_sub(c.examples.len());
        c.examples.extend(verdict.problems().into_iter().take(room));
        c
    }

    /// Takes the next event; fails when none arrives within the timeout.
    async fn receive(&mut self) -> Result<()> {
        match tokio::time::timeout(self.timeout, self.arrivals.recv()).await {
            Ok(Some(a)) => {
                self.record(a?);
                Ok(())
            }
            Ok(None) => bail!("the reply consumer stopped"),
            Err(_) => bail!(
                "no terminal event for {:?}: {} of {} turns have one",
                self.timeout,
                self.got.len(),
                self.sent.len()
            ),
        }
    }

    fn record(&mut self, a: Arrival) {
        let Some(event) = self.ledger.record(
            a.event_id.as_deref(),
            a.correlation_id.as_deref(),
            &a.routing_key,
            &a.body,
        ) else {
            return;
        };
        let message_id = event.message_id();
        // Unknown turns and second events are the ledger's to report; the first event of a
        // turn sent is timed and its outcome compared with what the turn asked for.
        let Some(sent) = self.sent.get(message_id) else { return };
        if self.got.contains_key(message_id) {
            return;
        }
        let (kind, code) = (event.kind(), event.code());
        let as_expected = match &sent.expect {
            Expect::Reply => kind == "reply",
            Expect::Error(want) => kind == "error" && code == *want,
        };
        if !as_expected {
            let c = &mut self.check;
            c.wrong_outcome += 1;
            *c.wrong_by_code.entry(format!("{kind} {code}")).or_default() += 1;
            if c.examples.len() < 8 {
                let message = event.body.pointer("/error/message").and_then(Value::as_str);
                c.examples.push(format!(
                    "{message_id}: expected {:?}, got {kind} {code} {}",
                    sent.expect,
                    message.unwrap_or("")
                ));
            }
        }
        self.got.insert(message_id.to_owned(), Got { at: a.at, wall_ns: a.wall_ns });
    }

    pub async fn close(self) {
        let _ = self.conn.close(200, "bench done".into()).await;
    }
}

/// CLOCK_REALTIME in ns, the clock the test worker stamps its event log with.
pub fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

pub async fn confirmed(confirm: PublisherConfirm) -> Result<()> {
    let confirmation = confirm.await.context("publisher confirm")?;
    ensure!(confirmation.is_ack(), "RabbitMQ nacked a turn");
    if let Some(returned) = confirmation.take_message() {
        bail!(
            "RabbitMQ returned a turn as unroutable (key {}): is {}.inbox bound?",
            returned.delivery.routing_key,
            returned.delivery.exchange
        );
    }
    Ok(())
}
