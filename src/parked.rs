//! Parked turns, the operator's actions on them: replay (republish the original turn once,
//! recording who and when) and purge. Used by `turnd parked` and the HTTP API.

use lapin::types::{AMQPValue, FieldTable, ShortString};

use crate::broker::{self, Names, Session, json_properties, long_string};
use crate::config::Config;
use crate::store::{ParkedTurn, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ParkedError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
}

/// What happened to one replay request.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplayResult {
    pub id: i64,
    /// "replayed", "already_replayed", "not_found", or "failed: …".
    pub result: String,
}

/// Republishes each parked turn once. The claim in the database comes first, so two operators
/// (or one command naming an id twice) never publish a turn twice; a failed publish undoes
/// the claim.
pub async fn replay(
    config: &Config,
    store: &Store,
    ids: &[i64],
    who: &str,
) -> Result<Vec<ReplayResult>, ParkedError> {
    let (connection, publisher) = broker::connect(config, "turnd parked replay").await?;
    let names = Names::new(&config.amqp.prefix);
    let mut results = Vec::with_capacity(ids.len());
    let mut done = std::collections::HashSet::new();
    for &id in ids {
        if !done.insert(id) {
            continue;
        }
        let result = match store.parked_claim_replay(id, who).await? {
            None => match store.parked_exists(id).await? {
                true => "already_replayed".to_owned(),
                false => "not_found".to_owned(),
            },
            Some(p) => match publish(&publisher, &names, &p).await {
                Ok(()) => {
                    tracing::info!(id, by = who, "parked turn replayed");
                    "replayed".to_owned()
                }
                Err(e) => {
                    store.parked_unclaim_replay(id).await?;
                    format!("failed: {e}")
                }
            },
        };
        results.push(ReplayResult { id, result });
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(results)
}

async fn publish(
    publisher: &lapin::Channel,
    names: &Names,
    p: &ParkedTurn,
) -> Result<(), ParkedError> {
    let mut properties = json_properties();
    let headers = replay_headers(&p.headers);
    if !headers.inner().is_empty() {
        properties = properties.with_headers(headers);
    }
    if let Some(m) = &p.parked.message_id {
        properties = properties.with_message_id(ShortString::from(m.as_str()));
    }
    let confirm = publisher
        .basic_publish(
            names.turns().as_str().into(),
            p.parked.routing_key.as_str().into(),
            lapin::options::BasicPublishOptions { mandatory: true, ..Default::default() },
            &p.body,
            properties,
        )
        .await?;
    if !Session::confirmed(confirm, &names.turns()).await? {
        return Err(ParkedError::Broker(broker::BrokerError::Nacked(format!(
            "{} (unroutable: is the inbox bound?)",
            names.turns()
        ))));
    }
    Ok(())
}

/// The producer's own headers, without turnd's and the broker's bookkeeping (x-turnd-*,
/// x-death…), so a replayed turn starts with a fresh attempt count.
fn replay_headers(json: &str) -> FieldTable {
    let mut table = FieldTable::default();
    let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(json) else {
        return table;
    };
    for (k, v) in map {
        // Also not the record's marker for headers it left out (too many to show).
        if k.starts_with("x-") || k == crate::intake::HEADERS_JSON_ELIDED_KEY {
            continue;
        }
        let value = match v {
            serde_json::Value::String(s) => long_string(&s),
            serde_json::Value::Bool(b) => AMQPValue::Boolean(b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => AMQPValue::LongLongInt(i),
                None => long_string(&n.to_string()),
            },
            other => long_string(&other.to_string()),
        };
        table.insert(k.as_str().into(), value);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_drops_bookkeeping_headers_and_keeps_the_producers() {
        let t = replay_headers(
            r#"{"x-death":[{"count":3}],"x-turnd-code":"MISSING_CONTEXT","tenant":"acme","n":5}"#,
        );
        let keys: Vec<&str> = t.inner().keys().map(|k| k.as_str()).collect();
        assert_eq!(keys, vec!["n", "tenant"]);
    }
}
