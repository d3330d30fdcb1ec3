//! Cancelling turns: what `turnd cancel`, `POST /api/v1/turns/{messageId}/cancel` and the
//! console's Cancel button share.
//!
//! The request is the row (`store::cancel_turn`): a queued turn ends there, a running one is
//! marked with the time of the request. How the owner — on whichever daemon —
//! learns of it, so its worker gets `{"type":"cancel","messageId":…}`:
//!
//! 1. at once, a cancel doorbell on the deployment's thread queue (AMQP `type` = `cancel`),
//!    which only the lock holder consumes — on the active intake's daemon from a turn's first
//!    second on (`deployment::owner`), when the fresh consumer also looks for a cancel;
//! 2. as a backstop (a lost doorbell, a thread-queue consumer not started yet, a broker away),
//!    every daemon's sweep asks the database for cancels its owners have not delivered
//!    (`store::undelivered_cancels`) and wakes them in memory.
//!
//! Neither is needed for the end: the sweep of any daemon fails the turn `TURN_CANCELLED` once
//! the request is older than its `turn.cancel_grace`, so a cancelled running turn ends within
//! `turn.cancel_grace` + `sweep.interval` of the request even when its owner died mid-cancel;
//! the live owner ends it at the grace itself. The worker's own answer before that wins the
//! same single election. The grace is always the daemons' (the requester's config plays no
//! part).

use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;

use crate::broker::Names;
use crate::config::Config;
use crate::store::{Actor, CancelResult, Store, StoreError};
use crate::turn::DeploymentName;

/// The AMQP `type` of a cancel doorbell.
pub const CANCEL_DOORBELL: &str = "cancel";

/// How long a cancel doorbell's publish may take before the sweep is left to deliver it.
const DOORBELL_TIMEOUT: Duration = Duration::from_secs(2);

/// One cancel request's outcome, as the CLI prints it and the API returns it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelReport {
    pub message_id: String,
    #[serde(flatten)]
    pub result: CancelResult,
}

/// Cancels each turn (`deployment` narrows a messageId that several deployments share), then
/// rings the owners of those still running. `publisher` is a confirming channel; without one
/// the sweep delivers the cancel lines.
pub async fn cancel(
    config: &Config,
    store: &Store,
    publisher: Option<&lapin::Channel>,
    message_ids: &[String],
    deployment: Option<&str>,
    actor: &Actor,
) -> Result<Vec<CancelReport>, StoreError> {
    let mut reports = Vec::with_capacity(message_ids.len());
    for message_id in message_ids {
        let (result, _committed) = store.cancel_turn(message_id, deployment, actor).await?;
        tracing::info!(message_id, result = result.word(), by = %actor.who, via = actor.via, "cancel requested");
        let names = Names::new(&config.amqp.prefix);
        match (&result, publisher) {
            (CancelResult::Cancelling { deployment, .. }, Some(p)) => {
                ring(p, &names, deployment, message_id, true).await
            }
            // A claim that waited on the row this cancel ended can come back empty even with
            // more turns queued behind it (FOR UPDATE under LIMIT 1): a plain doorbell makes
            // the owner look again now rather than at adoption.
            (CancelResult::Cancelled { deployment }, Some(p)) => {
                ring(p, &names, deployment, message_id, false).await
            }
            _ => {}
        }
        reports.push(CancelReport { message_id: message_id.clone(), result });
    }
    // An event committed here (a queued turn's TURN_CANCELLED) is published by the relays'
    // catch-up, which takes rows once they are `relay::CATCH_UP_MIN_AGE` old: within about
    // 3 s. No NOTIFY: relays do not listen (one pooled connection each, for this rare path).
    Ok(reports)
}

/// Best effort, bounded: a doorbell lost is the sweep's to make up for. `cancel`: a cancel
/// doorbell, else a plain one (the owner claims again).
async fn ring(
    publisher: &lapin::Channel,
    names: &Names,
    deployment: &str,
    message_id: &str,
    cancel: bool,
) {
    let queue = names.thread(&DeploymentName::from_trusted(deployment.to_owned()));
    let body = serde_json::json!({ "type": "cancel", "messageId": message_id }).to_string();
    let publish = async {
        let mut properties = BasicProperties::default().with_delivery_mode(1);
        if cancel {
            properties = properties.with_type(ShortString::from(CANCEL_DOORBELL));
        }
        // Not mandatory: a thread queue that is gone has no consumer to tell.
        publisher
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                properties,
            )
            .await?
            .await
    };
    match tokio::time::timeout(DOORBELL_TIMEOUT, publish).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::debug!(deployment, error = %e, "cannot ring the owner; the sweep will")
        }
        Err(_) => tracing::debug!(deployment, "ringing the owner timed out; the sweep will"),
    }
}
