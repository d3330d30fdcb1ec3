//! Parked turns, the operator's actions on them: replay (republish the original turn once,
//! recording who and when) and purge. Used by `turnd parked` and the HTTP API.

use lapin::types::{AMQPValue, FieldTable, ShortString};

use crate::broker::{self, Names, Session, json_properties, long_string};
use crate::config::Config;
use crate::store::{Actor, ParkedTurn, Store, StoreError};

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
/// the claim. `who` is recorded on the parked record; each attempt, whatever its result, in
/// the audit log as `actor`'s.
pub async fn replay(
    config: &Config,
    store: &Store,
    ids: &[i64],
    who: &str,
    actor: &Actor,
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
        store.audit(actor, "replay", &format!("parked:{id}"), &result).await?;
        results.push(ReplayResult { id, result });
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(results)
}

/// Deletes parked records by id, or by code and/or age, and records each one deleted in the
/// audit log (a purge that matched nothing is recorded once, by what it asked for).
pub async fn purge(
    store: &Store,
    ids: &[i64],
    code: Option<&str>,
    older_than: Option<std::time::Duration>,
    actor: &Actor,
) -> Result<Vec<i64>, ParkedError> {
    let purged = store.parked_purge(ids, code, older_than).await?;
    for id in &purged {
        store.audit(actor, "purge", &format!("parked:{id}"), "purged").await?;
    }
    if purged.is_empty() {
        let target = match (ids, code, older_than) {
            ([id], ..) => format!("parked:{id}"),
            _ => format!(
                "filter:ids={ids:?},code={},older_than={}",
                code.unwrap_or("*"),
                older_than.map_or("*".to_owned(), |d| humantime::format_duration(d).to_string())
            ),
        };
        store.audit(actor, "purge", &target, "not_found").await?;
    }
    Ok(purged)
}

/// A bulk action by filter: what it would act on, and the confirmation that must come back
/// with the request to act, so a set that changed in between is not acted on blindly.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BulkPreview {
    /// "replay" or "purge".
    pub action: String,
    /// How many parked turns it acts on now (at most `store::MAX_LIST_ROWS`; `more` is set
    /// when the batch is full, so others may match beyond it: act again afterwards).
    pub count: usize,
    pub more: bool,
    /// A hash of the action and the exact ids: the same ids give the same confirmation.
    pub confirm: String,
    /// The first few ids, to look at.
    pub sample: Vec<i64>,
}

/// The filter of a bulk action (each part optional; at least one must be given).
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct BulkFilter {
    pub code: Option<String>,
    pub deployment: Option<String>,
    /// Parked longer ago than this (a duration like "1h").
    pub older_than: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BulkError {
    #[error("{0}")]
    BadFilter(String),
    /// The set changed since the preview; here is the new one.
    #[error("the matching set changed since it was counted (now {} turns); confirm again", .0.count)]
    Changed(BulkPreview),
    #[error(transparent)]
    Parked(#[from] ParkedError),
}

impl From<StoreError> for BulkError {
    fn from(e: StoreError) -> Self {
        BulkError::Parked(ParkedError::Store(e))
    }
}

/// Counts what a bulk action would act on.
pub async fn bulk_preview(
    store: &Store,
    action: &str,
    filter: &BulkFilter,
) -> Result<(BulkPreview, Vec<i64>), BulkError> {
    let replay = match action {
        "replay" => true,
        "purge" => false,
        other => return Err(BulkError::BadFilter(format!("action {other:?}: replay or purge"))),
    };
    let older_than = match filter.older_than.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(humantime::parse_duration(s).map_err(|e| {
            BulkError::BadFilter(format!("older_than {s:?}: {e} (e.g. \"30m\", \"2h\")"))
        })?),
    };
    let code = filter.code.as_deref().map(str::trim).filter(|s| !s.is_empty());
    let deployment = filter.deployment.as_deref().map(str::trim).filter(|s| !s.is_empty());
    if code.is_none() && deployment.is_none() && older_than.is_none() {
        return Err(BulkError::BadFilter(
            "name a code, a deployment or an age (older_than); \"0s\" means every age".into(),
        ));
    }
    let limit = crate::store::MAX_LIST_ROWS;
    let mut ids =
        store.parked_ids_matching(code, deployment, older_than, replay, limit + 1).await?;
    // Lists stop at MAX_LIST_ROWS (the store clamps): a full batch may have more behind it.
    let more = ids.len() as i64 >= limit;
    ids.truncate(limit as usize);
    let preview = BulkPreview {
        action: action.to_owned(),
        count: ids.len(),
        more,
        confirm: confirmation(action, &ids),
        sample: ids.iter().take(10).copied().collect(),
    };
    Ok((preview, ids))
}

/// Acts on the filter's set if it is still the one confirmed; each turn acted on is audited.
pub async fn bulk_act(
    config: &Config,
    store: &Store,
    action: &str,
    filter: &BulkFilter,
    confirm: &str,
    actor: &Actor,
) -> Result<Vec<ReplayResult>, BulkError> {
    let (preview, ids) = bulk_preview(store, action, filter).await?;
    if preview.confirm != confirm {
        return Err(BulkError::Changed(preview));
    }
    if action == "replay" {
        let who = actor.who.clone();
        return Ok(replay(config, store, &ids, &who, actor).await?);
    }
    let purged = purge(store, &ids, None, None, actor).await?;
    Ok(ids
        .iter()
        .map(|id| ReplayResult {
            id: *id,
            result: if purged.contains(id) { "purged" } else { "not_found" }.to_owned(),
        })
        .collect())
}

fn confirmation(action: &str, ids: &[i64]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(action.as_bytes());
    for id in ids {
        h.update(id.to_be_bytes());
    }
    hex::encode(&h.finalize()[..8])
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
    fn confirmations_change_with_the_set_and_the_action() {
        let a = confirmation("purge", &[1, 2, 3]);
        assert_eq!(a, confirmation("purge", &[1, 2, 3]));
        assert_ne!(a, confirmation("purge", &[1, 2]));
        assert_ne!(a, confirmation("replay", &[1, 2, 3]));
        assert_eq!(a.len(), 16);
    }

    #[test]
    fn replay_drops_bookkeeping_headers_and_keeps_the_producers() {
        let t = replay_headers(
            r#"{"x-death":[{"count":3}],"x-turnd-code":"MISSING_CONTEXT","tenant":"acme","n":5}"#,
        );
        let keys: Vec<&str> = t.inner().keys().map(|k| k.as_str()).collect();
        assert_eq!(keys, vec!["n", "tenant"]);
    }
}
