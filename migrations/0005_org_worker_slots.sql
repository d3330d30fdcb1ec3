-- Fairness between organizations: an owner that counts against its organization's
-- cluster-wide cap (worker.max_workers_per_org_cluster) holds a slot here from its admission
-- until it lets go. Slots are counted only while their owner daemon is live, so a killed
-- daemon's slots stop counting once its heartbeat is stale.
ALTER TABLE turnd_deployments ADD COLUMN worker_slot boolean NOT NULL DEFAULT false;
CREATE INDEX turnd_deployments_slots ON turnd_deployments (organization_id) WHERE worker_slot;
