//! The sweep, on every daemon every `sweep.interval`: fails lapsed turns (`TURN_TIMEOUT`, or
//! the provider's code), adopts deployments whose queued turns have no owner (and lets
//! organizations refused by their cluster-wide cap try again), wakes local owners that
//! missed a doorbell, sets the per-organization gauges, deletes what outlived
//! `reply.retention`, and records this daemon's heartbeat.
//!
//! It backs up every faster path: a dead daemon's turns, a lost doorbell, a worker that hangs
//! while its daemon is gone. Exactly once across daemons because each lapsed row is taken with
//! `FOR UPDATE SKIP LOCKED` and ended by the same election as every other path.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::deployment::Deployments;
use crate::store::Store;
use crate::turn::DeploymentName;

/// Deployments looked at per adoption round; the rest wait for the next round.
const ADOPT_PER_ROUND: i64 = 256;

#[derive(Debug)]
pub struct Sweep {
    pub config: Arc<Config>,
    pub store: Store,
    pub deployments: Deployments,
}

impl Sweep {
    pub async fn run(self, cancel: CancellationToken) -> crate::supervise::ComponentResult {
        let mut tick = tokio::time::interval(self.config.sweep.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            self.once().await;
        }
    }

    /// One round; errors are logged and the next round tries again.
    pub async fn once(&self) {
        let relay = &self.deployments.ctx().relay;
        loop {
            match self.store.sweep_lapsed().await {
                Ok(failed) => {
                    let n = failed.len();
                    if n > 0 {
                        tracing::info!(turns = n, "deadline sweep failed lapsed turns");
                    }
                    relay.failed("sweep", failed);
                    if n < 500 {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "deadline sweep failed; next round retries");
                    break;
                }
            }
        }
        self.deployments.retry_waiting().await;
        match self
            .store
            .adoption_candidates(self.config.sweep.adoption_delay, ADOPT_PER_ROUND)
            .await
        {
            Ok(names) => {
                let orphans: Vec<DeploymentName> = names
                    .into_iter()
                    .map(DeploymentName::from_trusted)
                    // Owned here but idle: it missed a doorbell; wake it.
                    .filter(|n| !self.deployments.nudge(n, None))
                    .collect();
                if !orphans.is_empty() {
                    tracing::debug!(
                        count = orphans.len(),
                        "trying to adopt deployments with waiting turns"
                    );
                    self.deployments.ensure_owners(orphans).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "adoption query failed"),
        }
        // Running turns cancelled longer than the grace ago whose owner did not end them (it
        // died mid-cancel, or never heard).
        match self.store.sweep_cancelled(self.config.turn.cancel_grace).await {
            Ok(failed) => {
                if !failed.is_empty() {
                    tracing::info!(
                        turns = failed.len(),
                        "sweep ended cancelled turns past turn.cancel_grace"
                    );
                }
                relay.failed("sweep", failed);
            }
            Err(e) => tracing::warn!(error = %e, "cancel sweep failed; next round retries"),
        }
        // Cancel requests whose doorbell did not reach this daemon's owner (lost, or its
        // thread-queue consumer not started yet): wake the owner in memory.
        match self.store.undelivered_cancels(&self.config.daemon.id).await {
            Ok(names) => {
                for name in names {
                    self.deployments.cancel(&DeploymentName::from_trusted(name));
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot look for undelivered cancels"),
        }
        if let Err(e) = self.store.purge_retention(self.config.reply.retention).await {
            tracing::warn!(error = %e, "retention purge failed");
        }
        match self.store.outbox_backlog().await {
            Ok(n) => {
                relay.metrics().outbox_backlog.set(n);
            }
            Err(e) => tracing::debug!(error = %e, "cannot count the outbox backlog"),
        }
        match self.store.org_backlog().await {
            Ok(counts) => relay.metrics().set_org_backlog(counts),
            Err(e) => tracing::debug!(error = %e, "cannot count the backlog per organization"),
        }
        relay.metrics().set_org_live_workers(self.deployments.live_workers_by_org());
        if let Ok(age) = self.store.oldest_pending_age().await {
            relay.metrics().oldest_pending_seconds.set(age);
        }
        let ready = true;
        if let Err(e) = self
            .store
            .daemon_heartbeat(&self.config.daemon.id, ready, self.deployments.live_workers())
            .await
        {
            tracing::debug!(error = %e, "cannot record daemon heartbeat");
        }
    }
}
