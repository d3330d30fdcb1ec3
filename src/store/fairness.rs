//! Fairness between organizations: the cluster-wide cap on one organization's live workers
//! (`worker.max_workers_per_org_cluster`), the organizations of waiting deployments, and the
//! per-organization backlog gauge.

use super::*;

/// The first key of the per-organization transaction-level advisory lock ("tdor"); the second
/// is a hash of the organization. Two organizations sharing a hash only take turns.
const ORG_SLOT_LOCK_CLASS: i32 = 0x7464_6f72;

impl Store {
    /// Takes a slot of the organization's cluster-wide cap for the deployment owned under
    /// `epoch`, unless the organization's live owners (slots of daemons whose heartbeat is
    /// younger than `live_within`) already hold `cap`. The count and the mark are serialised per
    /// organization by a transaction-level advisory lock: without it two daemons could each count
    /// `cap - 1` under READ COMMITTED and both take the last slot.
    pub async fn reserve_org_slot(
        &self,
        deployment: &DeploymentName,
        epoch: Epoch,
        organization: Option<&str>,
        cap: usize,
        live_within: Duration,
    ) -> Result<bool> {
        // Boxed: a transaction's future is large, and the owner awaits this once.
        Box::pin(async {
            let mut tx = self.pool.begin().await?;
            sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext(coalesce($2, '')))")
                .bind(ORG_SLOT_LOCK_CLASS)
                .bind(organization)
                .execute(&mut *tx)
                .await?;
            let taken: Option<i32> = sqlx::query_scalar(
                "UPDATE turnd_deployments SET worker_slot = true
                 WHERE deployment = $1 AND epoch = $2
                   AND (SELECT count(*) FROM turnd_deployments d
                        JOIN turnd_daemons m ON m.id = d.owner
                        WHERE d.worker_slot AND d.deployment <> $1
                          AND d.organization_id IS NOT DISTINCT FROM $3
                          AND m.stopped_at IS NULL
                          AND m.heartbeat_at > now() - $5::bigint * interval '1 millisecond') < $4
                 RETURNING 1",
            )
            .bind(deployment.as_str())
            .bind(epoch.get())
            .bind(organization)
            .bind(i64::try_from(cap).unwrap_or(i64::MAX))
            .bind(millis(live_within))
            .fetch_optional(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(taken.is_some())
        })
        .await
    }

    /// Gives the slot back without letting go of the deployment (its lock is already gone).
    pub async fn release_org_slot(&self, deployment: &DeploymentName, epoch: Epoch) -> Result<()> {
        sqlx::query(
            "UPDATE turnd_deployments SET worker_slot = false
             WHERE deployment = $1 AND epoch = $2 AND worker_slot",
        )
        .bind(deployment.as_str())
        .bind(epoch.get())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The organization of each deployment that has a queued turn, of those named. A
    /// deployment with none is left out: there is nothing to admit it for.
    pub async fn queued_orgs(&self, names: &[&str]) -> Result<Vec<(String, Option<String>)>> {
        Ok(sqlx::query_as(
            "SELECT DISTINCT ON (deployment) deployment, organization_id FROM turnd_turns
             WHERE deployment = ANY($1) AND state = 'queued' ORDER BY deployment, seq",
        )
        .bind(names)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Queued turns per organization, cluster-wide (`None`: turns without one).
    pub async fn org_backlog(&self) -> Result<Vec<(Option<String>, i64)>> {
        Ok(sqlx::query_as(
            "SELECT organization_id, count(*) FROM turnd_turns WHERE state = 'queued'
             GROUP BY organization_id",
        )
        .fetch_all(&self.pool)
        .await?)
    }
}
