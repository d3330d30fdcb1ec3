-- Plans that stay cheap however stale PostgreSQL's statistics are.
--
-- ANALYZE nearly always sees turnd_turns as tombstones with next to nothing pending (it runs
-- once a burst has drained), so the planner believes every partial index over pending turns
-- is empty. With two such indexes a statement may use either, and it took the one without a
-- useful key: once a backlog came back, the claim of each turn read the whole deadline index
-- and sorted it, and the commit and the claim found their one row through it too — 9 ms per
-- turn at 5,000 pending turns instead of 0.2 (O(backlog) per turn, quadratic in a drain).
--
-- Now each partial index has a predicate of its own, and each statement implies only the one
-- meant for it:
--   * turnd_turns_pending (state <> 'done') is keyed by state too, so a claim ("the oldest
--     queued turn of this deployment") is one ordered range scan that stops at the first row;
--   * turnd_turns_deadline is over done_at IS NULL — the same rows, which the constraint below
--     guarantees — so only the statements that say so (the sweep) can use it.
-- The release before this one runs on it unchanged. On 1,000,000 tombstones and 5,000 pending
-- turns (and one row of each inconsistent kind) the whole migration took 0.39 s.

-- Every release so far set done_at exactly when a turn became 'done'; a row that disagrees
-- (written by hand, say) is mended rather than failing the migration, and with it the start.
UPDATE turnd_turns SET done_at = accepted_at WHERE state = 'done' AND done_at IS NULL;
UPDATE turnd_turns SET done_at = NULL WHERE state <> 'done' AND done_at IS NOT NULL;
ALTER TABLE turnd_turns ADD CONSTRAINT turnd_turns_done_at
    CHECK ((state = 'done') = (done_at IS NOT NULL));

DROP INDEX turnd_turns_pending;
CREATE INDEX turnd_turns_pending ON turnd_turns (deployment, state, seq) WHERE state <> 'done';

DROP INDEX turnd_turns_deadline;
CREATE INDEX turnd_turns_deadline ON turnd_turns (deadline) WHERE done_at IS NULL;
