-- When a deployment's owner last let go of it. The sweep deletes the rows of deployments that
-- nobody owns, that have no turn left (tombstones included) and that were let go longer than
-- reply.retention ago: without it a platform with millions of short conversations keeps a row
-- for each forever. Epochs come from the turnd_epoch sequence, not from the row, so a
-- conversation that comes back after its row was purged still gets a larger epoch.
ALTER TABLE turnd_deployments ADD COLUMN released_at timestamptz;
UPDATE turnd_deployments SET released_at = now() WHERE owner IS NULL;
-- The sweep's purge looks only at rows nobody owns, oldest release first.
CREATE INDEX turnd_deployments_released ON turnd_deployments (released_at) WHERE owner IS NULL;
