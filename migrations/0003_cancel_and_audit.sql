-- Cancellation (CONTRACT §5, §6): an operator's request on a running turn. The request itself
-- is the record owners and the sweep act on: the owner that holds the turn writes the cancel
-- line to its worker and notes when (cancel_delivered_at, so the sweep stops reminding it),
-- cutting the turn's deadline to the request + turn.cancel_grace; the sweep ends a turn whose
-- request is older than the grace; every failure path ends a turn with a cancel request as
-- TURN_CANCELLED. A queued turn never gets these: it is ended at once by the request.
ALTER TABLE turnd_turns ADD COLUMN cancel_requested_at timestamptz;
ALTER TABLE turnd_turns ADD COLUMN cancel_delivered_at timestamptz;
-- The sweep's looks for cancel lines still to deliver and for requests past their grace
-- (rare rows; the index stays tiny).
CREATE INDEX turnd_turns_cancelling ON turnd_turns (cancel_requested_at)
    WHERE cancel_requested_at IS NOT NULL AND state = 'running';

-- Every operator action (replay, purge, cancel, and the bulk forms), append-only: who (the
-- token's name through the API, the OS user through the CLI), what, on which target, when,
-- and how it ended. Nothing in turnd updates or deletes it; the trigger below refuses it to
-- anyone else too (an operator who must trim it drops the trigger first, on purpose).
CREATE TABLE turnd_audit (
    id       bigserial   PRIMARY KEY,
    at       timestamptz NOT NULL DEFAULT now(),
    who      text        NOT NULL,
    -- Where the action came from: 'cli', 'api', 'console'.
    via      text        NOT NULL,
    action   text        NOT NULL,
    -- e.g. 'parked:42', 'turn:a1-0123456789abcdef/m1', 'filter:code=INVALID_TURN'
    target   text        NOT NULL,
    result   text        NOT NULL
);
CREATE INDEX turnd_audit_at ON turnd_audit (at DESC);

CREATE FUNCTION turnd_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'turnd_audit is append-only (% refused)', TG_OP;
END $$;
CREATE TRIGGER turnd_audit_append_only BEFORE UPDATE OR DELETE ON turnd_audit
    FOR EACH ROW EXECUTE FUNCTION turnd_audit_append_only();
CREATE TRIGGER turnd_audit_no_truncate BEFORE TRUNCATE ON turnd_audit
    FOR EACH STATEMENT EXECUTE FUNCTION turnd_audit_append_only();

-- `turnd cancel MESSAGE_ID` finds a turn by its messageId alone (the deployment is optional):
-- a hash index, the cheapest for equality on keys up to 255 bytes.
CREATE INDEX turnd_turns_message_id ON turnd_turns USING hash (message_id);
