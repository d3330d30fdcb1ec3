//! The producer and the reply collector. Both ride out broker faults the way a careful client
//! would: the publisher retries a turn until the broker confirms it (a re-publish of the same
//! messageId is a duplicate turnd must absorb), and the collector reads a durable queue bound
//! to `<prefix>.replies` with manual acks, so events published while it is disconnected wait
//! for it; redeliveries are de-duplicated on the AMQP message_id, as the contract asks.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio_util::sync::CancellationToken;
use turnd_harness::Ledger;

#[derive(Debug, Default)]
pub struct Events {
    /// Distinct events per turn, de-duplicated on the AMQP message_id (the harness's check).
    pub ledger: Ledger,
    pub reconnects: u64,
}

impl Events {
    pub fn count_answered(&self, ids: &[String]) -> usize {
        ids.iter().filter(|id| self.ledger.by_message.contains_key(*id)).count()
    }
}

pub type Shared = Arc<Mutex<Events>>;

pub fn lock(events: &Shared) -> std::sync::MutexGuard<'_, Events> {
    events.lock().unwrap_or_else(|e| e.into_inner())
}

/// Connects to the first of the comma-separated `urls` that answers (a RabbitMQ cluster's
/// nodes: the harness follows a stopped node as the daemons do).
pub async fn connect(urls: &str, name: &str) -> anyhow::Result<Connection> {
    let mut last = None;
    for url in urls.split(',') {
        let props = ConnectionProperties::default().with_connection_name(name.into());
        match tokio::time::timeout(Duration::from_secs(10), Connection::connect(url.trim(), props))
            .await
        {
            Ok(Ok(conn)) => return Ok(conn),
            Ok(Err(e)) => last = Some(anyhow::Error::from(e)),
            Err(e) => last = Some(anyhow::Error::from(e)),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no AMQP URL")))
}

/// Declares the collector's durable queue and consumes it until `cancel`, reconnecting.
pub async fn collect(url: String, prefix: String, events: Shared, cancel: CancellationToken) {
    let queue = format!("{prefix}.chaos-replies");
    let mut backoff = Duration::from_millis(100);
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let session = async {
            let conn = connect(&url, "turnd-chaos collector").await?;
            let ch = conn.create_channel().await?;
            ch.basic_qos(500, BasicQosOptions::default()).await?;
            // Quorum: on a cluster, a classic queue would be lost with its node (and the events
            // routed to it meanwhile).
            let mut args = FieldTable::default();
            args.insert("x-queue-type".into(), turnd::broker::long_string("quorum"));
            ch.queue_declare(queue.as_str().into(), QueueDeclareOptions::durable(), args).await?;
            ch.queue_bind(
                queue.as_str().into(),
                format!("{prefix}.replies").as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
            let consumer = ch
                .basic_consume(
                    queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, anyhow::Error>((conn, ch, consumer))
        };
        let (conn, _ch, mut consumer) = match session.await {
            Ok(s) => s,
            Err(_) => {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        loop {
            let next = tokio::select! {
                _ = cancel.cancelled() => {
                    let _ = conn.close(200, "chaos done".into()).await;
                    return;
                }
                d = consumer.next() => d,
            };
            let Some(Ok(delivery)) = next else { break };
            lock(&events).ledger.record(
                delivery.properties.message_id().as_ref().map(|s| s.as_str()),
                delivery.properties.correlation_id().as_ref().map(|s| s.as_str()),
                delivery.routing_key.as_str(),
                &delivery.data,
            );
            // An ack lost to a fault means a redelivery, which `record` recognises.
            let _ = delivery.ack(BasicAckOptions::default()).await;
        }
        lock(&events).reconnects += 1;
    }
}

/// A confirming publisher that reconnects on demand.
pub struct Publisher {
    url: String,
    exchange: String,
    conn: Option<(Connection, Channel)>,
    pub reconnects: u64,
    pub republished: u64,
}

impl Publisher {
    pub fn new(url: &str, prefix: &str) -> Publisher {
        Publisher {
            url: url.to_owned(),
            exchange: format!("{prefix}.turns"),
            conn: None,
            reconnects: 0,
            republished: 0,
        }
    }

    async fn channel(&mut self) -> anyhow::Result<Channel> {
        if let Some((c, ch)) = &self.conn
            && c.status().connected()
            && ch.status().connected()
        {
            return Ok(ch.clone());
        }
        if let Some((c, _)) = self.conn.take() {
            self.reconnects += 1;
            let _ = c.close(200, "reconnecting".into()).await;
        }
        let conn = connect(&self.url, "turnd-chaos publisher").await?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        self.conn = Some((conn, ch.clone()));
        Ok(ch)
    }

    /// Publishes until the broker confirms it (or `cancel`). Returns false when cancelled.
    pub async fn publish(
        &mut self,
        routing_key: &str,
        body: &[u8],
        cancel: &CancellationToken,
    ) -> bool {
        let mut backoff = Duration::from_millis(50);
        let mut first = true;
        loop {
            if cancel.is_cancelled() {
                return false;
            }
            if !first {
                self.republished += 1;
            }
            first = false;
            let attempt = async {
                let ch = self.channel().await?;
                let props = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type(ShortString::from("application/json"));
                let confirm = ch
                    .basic_publish(
                        self.exchange.as_str().into(),
                        routing_key.into(),
                        BasicPublishOptions::default(),
                        body,
                        props,
                    )
                    .await?;
                let c = confirm.await?;
                Ok::<bool, anyhow::Error>(c.is_ack())
            };
            match tokio::time::timeout(Duration::from_secs(15), attempt).await {
                Ok(Ok(true)) => return true,
                _ => {
                    // Nacked, failed or stuck: drop the connection and try again.
                    if let Some((c, _)) = self.conn.take() {
                        self.reconnects += 1;
                        let _ = tokio::time::timeout(
                            Duration::from_secs(2),
                            c.close(200, "retry".into()),
                        )
                        .await;
                    }
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return false,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    pub async fn close(mut self) {
        if let Some((c, _)) = self.conn.take() {
            let _ = c.close(200, "chaos done".into()).await;
        }
    }
}
