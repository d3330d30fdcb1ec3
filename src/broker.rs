//! RabbitMQ: the connection and its reconnection, topology declaration, confirmed publishing,
//! and the consumers' channels.
//!
//! **Architecture invariant**: only this module names lapin's connection and topology calls;
//! other modules get a [`Session`] and its helpers. A session is one live AMQP connection with
//! its topology declared; when it fails the supervisor drops it, reconnects with back-off and
//! declares everything again, and users wait for the next session.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::turn::DeploymentName;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("RabbitMQ nacked a publish to {0}")]
    Nacked(String),
    #[error("RabbitMQ is not connected")]
    Unavailable,
    #[error("cannot connect to RabbitMQ at {target}: {}", crate::store::root_cause(error))]
    Connect { target: String, error: lapin::Error },
}

/// Where an AMQP URL points, for messages: `host:port (vhost V, user U)`, never the password.
pub fn describe_target(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => {
            let port = u.port().unwrap_or(if u.scheme() == "amqps" { 5671 } else { 5672 });
            let vhost = match u.path().trim_start_matches('/') {
                "" => "/".to_owned(),
                v => url::form_urlencoded::parse(format!("v={v}").as_bytes())
                    .next()
                    .map_or_else(|| v.to_owned(), |(_, v)| v.into_owned()),
            };
            let user = if u.username().is_empty() { "guest" } else { u.username() };
            format!("{}:{port} (vhost {vhost}, user {user})", u.host_str().unwrap_or("?"))
        }
        Err(_) => "amqp.url (unparsable)".to_owned(),
    }
}

pub type Result<T> = std::result::Result<T, BrokerError>;

/// Thread queues expire this long after their last use (no consumer, no publish): a few idle
/// deployments' worth of broker memory, freed on its own. Every daemon must use the same value
/// or the declarations conflict.
const THREAD_QUEUE_EXPIRES_MS: i64 = 300_000;
/// Thread-queue consumers share this many channels (RabbitMQ allows 2,047 per connection; a
/// channel per deployment would not scale, and one channel serialises all their frames).
const CONSUME_CHANNELS: usize = 8;
const RECONNECT_MAX: Duration = Duration::from_secs(10);

/// Every exchange and queue name, from `amqp.prefix` (CONTRACT §3a).
#[derive(Debug, Clone)]
pub struct Names {
    prefix: String,
}

impl Names {
    pub fn new(prefix: &str) -> Names {
        Names { prefix: prefix.to_owned() }
    }
    pub fn turns(&self) -> String {
        format!("{}.turns", self.prefix)
    }
    pub fn inbox(&self) -> String {
        format!("{}.inbox", self.prefix)
    }
    pub fn thread(&self, deployment: &DeploymentName) -> String {
        format!("{}.thread.{}", self.prefix, deployment.as_str())
    }
    pub fn retry(&self) -> String {
        format!("{}.retry", self.prefix)
    }
    pub fn retry_delay(&self, k: u32) -> String {
        format!("{}.retry.{k}", self.prefix)
    }
    /// Requests for an owner: deployments armed by the active intake and owned nowhere yet.
    pub fn owners(&self) -> String {
        format!("{}.owners", self.prefix)
    }
    pub fn parked(&self) -> String {
        format!("{}.parked", self.prefix)
    }
    pub fn replies(&self) -> String {
        format!("{}.replies", self.prefix)
    }
}

/// The k-th requeue delay: min(retry_delay × 2^(k−1), retry_max_delay).
pub fn retry_delay(config: &Config, k: u32) -> Duration {
    let factor = 1u32.checked_shl(k.saturating_sub(1)).unwrap_or(u32::MAX);
    config.intake.retry_delay.saturating_mul(factor).min(config.intake.retry_max_delay)
}

/// One live connection with its topology declared.
#[derive(Debug)]
pub struct Session {
    pub connection: Connection,
    /// Confirming channel for publishes (doorbells, replies, parked, retries).
    publisher: Channel,
    consume: Mutex<Vec<Channel>>,
    next_consume: AtomicUsize,
    pub names: Names,
}

/// A persistent JSON publish (delivery_mode 2).
pub fn json_properties() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/json"))
}

impl Session {
    pub fn publisher(&self) -> &Channel {
        &self.publisher
    }

    /// Publishes and returns the confirm to await (publishes pipeline; await the confirms
    /// together).
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<lapin::PublisherConfirm> {
        let options = BasicPublishOptions { mandatory, ..Default::default() };
        Ok(self
            .publisher
            .basic_publish(exchange.into(), routing_key.into(), options, body, properties)
            .await?)
    }

    /// Awaits a confirm. Ok(false): the publish was mandatory and came back unroutable.
    pub async fn confirmed(confirm: lapin::PublisherConfirm, what: &str) -> Result<bool> {
        let confirmation = confirm.await?;
        if !confirmation.is_ack() {
            return Err(BrokerError::Nacked(what.to_owned()));
        }
        Ok(confirmation.take_message().is_none())
    }

    /// Asks whichever daemon's owner-request consumer gets it to try these deployments' locks
    /// (`<prefix>.owners`); returns the confirms to await. A request is a hint: one lost is
    /// adoption's.
    pub async fn request_owners(
        &self,
        names: &[DeploymentName],
    ) -> Result<Vec<lapin::PublisherConfirm>> {
        let queue = self.names.owners();
        let mut confirms = Vec::with_capacity(names.len());
        for name in names {
            let properties = BasicProperties::default().with_delivery_mode(1);
            let body = name.as_str().as_bytes();
            confirms.push(self.publish("", &queue, true, body, properties).await?);
        }
        Ok(confirms)
    }

    /// A consumer with its own channel and prefetch (intake).
    pub async fn consumer(
        &self,
        queue: &str,
        prefetch: u16,
        tag: &str,
    ) -> Result<(Channel, Consumer)> {
        let ch = self.connection.create_channel().await?;
        ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
        let consumer = ch
            .basic_consume(
                queue.into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok((ch, consumer))
    }

    /// Declares a deployment's thread queue and consumes it, auto-acked (a doorbell is acked
    /// once read, never held), on one of the shared consume channels.
    pub async fn consume_thread(&self, deployment: &DeploymentName) -> Result<(Channel, Consumer)> {
        let ch = self.consume_channel().await?;
        let queue = self.names.thread(deployment);
        let mut args = FieldTable::default();
        args.insert("x-expires".into(), AMQPValue::LongLongInt(THREAD_QUEUE_EXPIRES_MS));
        ch.queue_declare(queue.as_str().into(), QueueDeclareOptions::default(), args).await?;
        let options = BasicConsumeOptions { no_ack: true, ..Default::default() };
        let consumer = ch
            .basic_consume(queue.as_str().into(), "".into(), options, FieldTable::default())
            .await?;
        Ok((ch, consumer))
    }

    async fn consume_channel(&self) -> Result<Channel> {
        let mut channels = self.consume.lock().await;
        channels.retain(|c| c.status().connected());
        if channels.len() < CONSUME_CHANNELS {
            let ch = self.connection.create_channel().await?;
            channels.push(ch.clone());
            return Ok(ch);
        }
        let i = self.next_consume.fetch_add(1, Ordering::Relaxed) % channels.len();
        Ok(channels[i].clone())
    }

    /// Whether a publish with these headers keeps its content header within the connection's
    /// `frame_max` (a frame over it would make the broker close the connection), with room
    /// for every other property.
    pub fn headers_fit(&self, headers: &FieldTable) -> bool {
        /// The other properties: at most nine short strings of 255 bytes and a few numbers,
        /// plus the content header's own fields and the frame's overhead.
        const OTHER_PROPERTIES: usize = 4096;
        let frame_max = self.connection.configuration().frame_max() as usize;
        frame_max == 0 || encoded_len(headers) + OTHER_PROPERTIES <= frame_max
    }

    /// Declares the topology again (e.g. after a mandatory publish came back because a queue
    /// was deleted under us).
    pub async fn redeclare(&self, config: &Config) -> Result<()> {
        declare_topology(&self.connection, config).await
    }

    pub fn is_connected(&self) -> bool {
        self.connection.status().connected() && self.publisher.status().connected()
    }
}

/// The inbox's `x-delivery-limit`: a delivery returned to the inbox this many times without
/// being handled is dead-lettered (reason `delivery_limit`) to `<prefix>.retry`, where the
/// retry mover parks it as `INVALID_TURN` (CONTRACT §4) instead of letting it loop through
/// every daemon, or letting RabbitMQ 4.0's default limit drop it.
///
/// Trade-off: too low, and returns that are not the message's fault park a good turn; too
/// high, and a message that kills its consumer takes that many daemon crashes to stop. Every
/// return counts on RabbitMQ 3.x: a nack with requeue, and a channel or connection that closes
/// while holding the delivery (a daemon crash, a broker connection drop, or intake pausing for
/// a PostgreSQL outage with the delivery prefetched). An outage costs one return per delivery
/// in flight: intake stops consuming until the database answers again (and backs off further
/// each time a batch fails again at once). 50 leaves room for dozens of outages, restarts and
/// crashes during one turn's stay in the inbox, while a poison message still stops after 50
/// deliveries. It must be the same on every daemon (queue arguments are fixed at declaration).
pub const INBOX_DELIVERY_LIMIT: i64 = 50;

/// Declares every durable name of CONTRACT §3a, idempotently, on a channel of its own (a
/// refused declaration closes its channel).
pub async fn declare_topology(connection: &Connection, config: &Config) -> Result<()> {
    let names = Names::new(&config.amqp.prefix);
    let ch = connection.create_channel().await?;
    let declared = async {
        declare_exchanges(&ch, &names).await?;
        declare_inbox(connection, &names).await?;
        declare_rest(connection, &ch, &names, config).await
    }
    .await;
    if ch.status().connected() {
        let _ = ch.close(200, "topology declared".into()).await;
    }
    declared
}

/// Whether an error is the broker's PRECONDITION_FAILED (406), e.g. a queue redeclared with
/// other arguments.
pub fn is_precondition_failed(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 406)
}

/// The inbox's arguments (CONTRACT §3a).
pub fn inbox_arguments(names: &Names) -> FieldTable {
    let mut inbox = FieldTable::default();
    inbox.insert("x-queue-type".into(), long_string("quorum"));
    inbox.insert("x-dead-letter-exchange".into(), long_string(&names.retry()));
    // At-least-once dead-lettering needs reject-publish overflow; a refused turn is never lost
    // between the inbox and the retry queue.
    inbox.insert("x-dead-letter-strategy".into(), long_string("at-least-once"));
    inbox.insert("x-overflow".into(), long_string("reject-publish"));
    inbox.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(INBOX_DELIVERY_LIMIT));
    // One consumer at a time, cluster-wide: the turns of a conversation published on one
    // channel are accepted in publish order whatever the number of daemons (CONTRACT §4).
    // Every daemon subscribes; the broker feeds the oldest subscription and moves to the next
    // when it goes (see ARCHITECTURE "One intake at a time").
    inbox.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    inbox
}

/// Warned at most once per process: an inbox declared by an older turnd (other arguments).
static OLD_INBOX_WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Declares and binds the inbox. An inbox that an older turnd declared with other arguments
/// (no `x-delivery-limit`) cannot be changed by redeclaring it: RabbitMQ answers
/// PRECONDITION_FAILED. Then the existing queue is used as it is (a passive declare proves it
/// is there) and the operator is told, once, how to add the limit without a redeclaration.
async fn declare_inbox(connection: &Connection, names: &Names) -> Result<()> {
    let inbox = names.inbox();
    let ch = connection.create_channel().await?;
    let declared = ch
        .queue_declare(
            inbox.as_str().into(),
            QueueDeclareOptions::durable(),
            inbox_arguments(names),
        )
        .await;
    let ch = match declared {
        Ok(_) => ch,
        Err(e) if is_precondition_failed(&e) => {
            // The refusal closed that channel.
            let ch = connection.create_channel().await?;
            let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::durable() };
            ch.queue_declare(inbox.as_str().into(), passive, FieldTable::default()).await?;
            if !OLD_INBOX_WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    queue = %inbox,
                    error = %e,
                    "the inbox exists with other arguments (declared by an older turnd); using it as it is, so \
                     intake keeps running. If it has no x-delivery-limit argument, a delivery that keeps failing \
                     is never parked unless a policy sets one: rabbitmqctl set_policy turnd-inbox-limit '^{}$' \
                     '{{\"delivery-limit\":{INBOX_DELIVERY_LIMIT}}}' --apply-to queues. If it has no \
                     x-single-active-consumer argument, every daemon competes for it and the turns of a \
                     conversation may be accepted out of publish order while more than one daemon runs; no \
                     policy sets that: recreate the inbox (README \"Upgrading the inbox\": pause the producers, \
                     wait until it holds no message, rabbitmqctl delete_queue {}; every daemon declares it again)",
                    regex_escape(&inbox),
                    inbox,
                );
            }
            ch
        }
        Err(e) => return Err(e.into()),
    };
    let bound = ch
        .queue_bind(
            inbox.as_str().into(),
            names.turns().as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await;
    if ch.status().connected() {
        let _ = ch.close(200, "inbox declared".into()).await;
    }
    bound?;
    Ok(())
}

/// A queue name as a regular expression matching only itself (for the policy hint).
fn regex_escape(name: &str) -> String {
    name.chars()
        .flat_map(|c| {
            let escape = !(c.is_ascii_alphanumeric() || c == '_' || c == '-');
            escape.then_some('\\').into_iter().chain(std::iter::once(c))
        })
        .collect()
}

async fn declare_exchanges(ch: &Channel, names: &Names) -> Result<()> {
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    for (name, kind) in [
        (names.turns(), ExchangeKind::Topic),
        (names.replies(), ExchangeKind::Topic),
        (names.retry(), ExchangeKind::Fanout),
    ] {
        ch.exchange_declare(name.as_str().into(), kind, durable, FieldTable::default()).await?;
    }
    Ok(())
}

async fn declare_rest(
    connection: &Connection,
    ch: &Channel,
    names: &Names,
    config: &Config,
) -> Result<()> {
    declare_bound(ch, &names.retry(), FieldTable::default(), &names.retry(), "").await?;
    for k in 1..config.intake.max_attempts {
        declare_delay_queue(connection, names, k).await?;
    }
    ch.queue_declare(
        names.parked().as_str().into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await?;
    // Owner requests are hints (adoption covers a lost one): a durable classic queue with
    // transient messages.
    ch.queue_declare(
        names.owners().as_str().into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await?;
    Ok(())
}

/// A delay queue's arguments: only where it dead-letters to. The delay itself travels on each
/// message as its `expiration` (see [`delay_expiration`]), so changing `intake.retry_delay`,
/// `retry_max_delay` or `max_attempts` between restarts never changes a queue's arguments
/// (they are fixed at declaration: a redeclaration with others is refused).
pub fn delay_queue_arguments(names: &Names) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-dead-letter-exchange".into(), long_string(&names.turns()));
    args
}

/// The `expiration` property (milliseconds, as text) that holds a refused turn in its delay
/// queue for the k-th delay.
pub fn delay_expiration(config: &Config, k: u32) -> ShortString {
    ShortString::from(retry_delay(config, k).as_millis().to_string())
}

/// Warned at most once per process: a delay queue declared by an older turnd (with a TTL).
static OLD_DELAY_WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Declares `<prefix>.retry.<k>`. One that an older turnd declared with `x-message-ttl` is
/// used as it is (the broker holds a message for the shorter of the queue's TTL and the
/// message's own `expiration`), with one warning: refusing to start would stop a fleet on a
/// rolling upgrade.
async fn declare_delay_queue(connection: &Connection, names: &Names, k: u32) -> Result<()> {
    let name = names.retry_delay(k);
    let ch = connection.create_channel().await?;
    let declared = ch
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions::durable(),
            delay_queue_arguments(names),
        )
        .await;
    let result = match declared {
        Ok(_) => Ok(()),
        Err(e) if is_precondition_failed(&e) => {
            let ch = connection.create_channel().await?;
            let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::durable() };
            let found =
                ch.queue_declare(name.as_str().into(), passive, FieldTable::default()).await;
            if found.is_ok() && !OLD_DELAY_WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    queue = %name,
                    error = %e,
                    "a delay queue exists with other arguments (an older turnd gave it a fixed x-message-ttl); \
                     using it as it is: a refused turn waits there for the shorter of that TTL and its own delay. \
                     To drop the old TTL, delete the delay queues once empty (rabbitmqctl delete_queue <name> --if-empty); \
                     turnd declares them again"
                );
            }
            if ch.status().connected() {
                let _ = ch.close(200, "delay queue checked".into()).await;
            }
            found.map(|_| ()).map_err(BrokerError::from)
        }
        Err(e) => Err(e.into()),
    };
    if ch.status().connected() {
        let _ = ch.close(200, "delay queue declared".into()).await;
    }
    result
}

async fn declare_bound(
    ch: &Channel,
    queue: &str,
    args: FieldTable,
    exchange: &str,
    key: &str,
) -> Result<()> {
    ch.queue_declare(queue.into(), QueueDeclareOptions::durable(), args).await?;
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(())
}

/// The encoded size of a field table, in bytes, walked without recursion.
pub fn encoded_len(table: &FieldTable) -> usize {
    let mut len = 4;
    let mut pending: Vec<&AMQPValue> = Vec::new();
    for (key, value) in table.inner() {
        len += 1 + key.as_str().len() + 1;
        pending.push(value);
    }
    while let Some(value) = pending.pop() {
        len += match value {
            AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
            AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
            AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
            AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
            AMQPValue::DecimalValue(_) => 5,
            AMQPValue::ShortString(s) => 1 + s.as_str().len(),
            AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
            AMQPValue::ByteArray(b) => 4 + b.as_slice().len(),
            AMQPValue::Void => 0,
            AMQPValue::FieldArray(a) => {
                for v in a.as_slice() {
                    len += 1;
                    pending.push(v);
                }
                4
            }
            AMQPValue::FieldTable(t) => {
                for (key, v) in t.inner() {
                    len += 1 + key.as_str().len() + 1;
                    pending.push(v);
                }
                4
            }
        };
    }
    len
}

pub fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// Connects once and opens a confirming channel.
pub async fn connect(config: &Config, name: &str) -> Result<(Connection, Channel)> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let connection =
        Connection::connect(config.amqp.url.expose(), properties).await.map_err(|e| {
            BrokerError::Connect { target: describe_target(config.amqp.url.expose()), error: e }
        })?;
    let publisher = connection.create_channel().await?;
    publisher.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok((connection, publisher))
}

/// Keeps a session alive: connect, declare, publish it to watchers; on failure, withdraw it,
/// back off and start over.
#[derive(Debug, Clone)]
pub struct Broker {
    session: watch::Receiver<Option<Arc<Session>>>,
}

impl Broker {
    pub fn start(
        config: Arc<Config>,
        cancel: CancellationToken,
    ) -> (Broker, impl Future<Output = crate::supervise::ComponentResult>) {
        let (tx, rx) = watch::channel(None);
        (Broker { session: rx }, supervise(config, tx, cancel))
    }

    /// The current session, if connected.
    pub fn current(&self) -> Option<Arc<Session>> {
        self.session.borrow().clone().filter(|s| s.is_connected())
    }

    /// Waits for a connected session (or None when the daemon stops).
    pub async fn session(&self) -> Option<Arc<Session>> {
        let mut rx = self.session.clone();
        let s = rx.wait_for(|s| s.as_ref().is_some_and(|s| s.is_connected())).await.ok()?;
        s.clone()
    }

    /// Waits for a session other than `old` (after `old` failed).
    pub async fn next_session(&self, old: &Arc<Session>) -> Option<Arc<Session>> {
        let mut rx = self.session.clone();
        let s = rx
            .wait_for(|s| s.as_ref().is_some_and(|s| !Arc::ptr_eq(s, old) && s.is_connected()))
            .await
            .ok()?;
        s.clone()
    }

    pub fn is_healthy(&self) -> bool {
        self.current().is_some()
    }
}

async fn supervise(
    config: Arc<Config>,
    tx: watch::Sender<Option<Arc<Session>>>,
    cancel: CancellationToken,
) -> crate::supervise::ComponentResult {
    let mut backoff = Duration::from_millis(100);
    let name = format!("turnd {}", config.daemon.id);
    loop {
        let attempt = async {
            let (connection, publisher) = connect(&config, &name).await?;
            declare_topology(&connection, &config).await?;
            Ok::<_, BrokerError>((connection, publisher))
        };
        let result = tokio::select! {
            _ = cancel.cancelled() => break,
            r = attempt => r,
        };
        match result {
            Ok((connection, publisher)) => {
                backoff = Duration::from_millis(100);
                let mut events = connection.events_listener();
                let session = Arc::new(Session {
                    connection,
                    publisher,
                    consume: Mutex::new(Vec::new()),
                    next_consume: AtomicUsize::new(0),
                    names: Names::new(&config.amqp.prefix),
                });
                tracing::info!("connected to RabbitMQ; topology declared");
                tx.send_replace(Some(session.clone()));
                let mut check = tokio::time::interval(Duration::from_millis(500));
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => {
                            tx.send_replace(None);
                            let _ = session.connection.close(200, "turnd stopping".into()).await;
                            return Ok(());
                        }
                        event = events.next() => match event {
                            Some(lapin::Event::Error(e)) => {
                                tracing::error!(error = %e, "RabbitMQ connection failed; reconnecting");
                                break;
                            }
                            Some(_) => {}
                            None => break,
                        },
                        _ = check.tick() => if !session.is_connected() {
                            tracing::error!("RabbitMQ connection or publishing channel closed; reconnecting");
                            break;
                        }
                    }
                }
                tx.send_replace(None);
                drop(session);
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot connect to RabbitMQ");
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(RECONNECT_MAX);
    }
    tx.send_replace(None);
    Ok(())
}
