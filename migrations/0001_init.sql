-- turnd schema. Every guarantee that spans rows lives in one transaction in src/store.rs.

-- Fencing tokens: one global sequence, so epochs follow the order in which locks were held.
-- Taken in the same statement as the advisory lock (src/lock.rs).
CREATE SEQUENCE turnd_epoch;

-- Accept order of turns, cluster-wide.
CREATE SEQUENCE turnd_accept_seq;

-- One row per accepted turn, keyed by (deployment, message_id). While state is queued or
-- running it is the obligation to emit exactly one terminal event; once done it is a
-- tombstone (turn text dropped) kept for reply.retention, so a duplicate publish conflicts on
-- the key instead of arming again.
CREATE TABLE turnd_turns (
    deployment       text        NOT NULL,
    message_id       text        NOT NULL,
    seq              bigint      NOT NULL DEFAULT nextval('turnd_accept_seq'),
    state            text        NOT NULL CHECK (state IN ('queued', 'running', 'done')),
    organization_id  text,
    agent_id         text        NOT NULL,
    conversation_key text        NOT NULL,
    conversation_id  text,
    -- The turn as the worker sees it (one compact JSON line); NULL once done.
    turn             text,
    -- {"userId":..,"channelId":..,"platform":..,"platformMetadata":..} for the reply; NULL once done.
    routing          text,
    -- The epoch under which the turn was claimed (running) .
    epoch            bigint,
    -- queued: accepted_at + turn.queue_timeout; running: last heartbeat + turn.deadline.
    deadline         timestamptz NOT NULL,
    -- Set by provider_failed: heartbeats stop extending the deadline, the timeout carries it.
    provider_code    text,
    accepted_at      timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    done_at          timestamptz,
    PRIMARY KEY (deployment, message_id)
);
CREATE INDEX turnd_turns_pending ON turnd_turns (deployment, seq) WHERE state <> 'done';
CREATE INDEX turnd_turns_deadline ON turnd_turns (deadline) WHERE state <> 'done';
CREATE INDEX turnd_turns_done ON turnd_turns (done_at) WHERE state = 'done';

-- Terminal events. The unique key makes a second terminal event for a turn impossible even
-- by bug. body is dropped once published (retention keeps only key and time).
CREATE TABLE turnd_outbox (
    id           bigserial   PRIMARY KEY,
    deployment   text        NOT NULL,
    message_id   text        NOT NULL,
    event_id     text        NOT NULL,
    routing_key  text        NOT NULL,
    kind         text        NOT NULL CHECK (kind IN ('reply', 'error')),
    code         text,
    body         text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz,
    UNIQUE (deployment, message_id)
);
CREATE INDEX turnd_outbox_unpublished ON turnd_outbox (id) WHERE published_at IS NULL;
CREATE INDEX turnd_outbox_published ON turnd_outbox (published_at) WHERE published_at IS NOT NULL;

-- One row per deployment ever owned: the current epoch (fencing), who owns it, and the
-- crash-loop record shared by every daemon.
CREATE TABLE turnd_deployments (
    deployment      text        PRIMARY KEY,
    organization_id text,
    agent_id        text        NOT NULL,
    conversation_key text       NOT NULL,
    epoch           bigint      NOT NULL DEFAULT 0,
    owner           text,
    since           timestamptz,
    worker_pid      integer,
    worker_started_at timestamptz,
    crash_count     integer     NOT NULL DEFAULT 0,
    crash_window_at timestamptz,
    backoff_until   timestamptz
);

-- Live daemons, for status and adoption.
CREATE TABLE turnd_daemons (
    id            text        PRIMARY KEY,
    hostname      text        NOT NULL,
    pid           integer     NOT NULL,
    version       text        NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    ready         boolean     NOT NULL DEFAULT false,
    live_workers  integer     NOT NULL DEFAULT 0,
    stopped_at    timestamptz
);

-- Parked turns: what went to <prefix>.parked, also here so operators can act on them.
CREATE TABLE turnd_parked (
    id           bigserial   PRIMARY KEY,
    code         text        NOT NULL,
    reason       text        NOT NULL,
    body         bytea       NOT NULL,
    headers      text        NOT NULL,
    routing_key  text        NOT NULL,
    deployment   text,
    message_id   text,
    attempts     integer     NOT NULL DEFAULT 1,
    first_attempt_at timestamptz,
    parked_at    timestamptz NOT NULL DEFAULT now(),
    replayed_at  timestamptz,
    replayed_by  text
);
CREATE INDEX turnd_parked_code ON turnd_parked (code, parked_at);
