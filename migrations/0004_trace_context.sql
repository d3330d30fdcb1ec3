-- The W3C trace context of each turn (CONTRACT §5, §6): that of its intake span, in the
-- producer's trace, so whichever daemon claims, fails or relays the turn continues that trace,
-- also after an adoption. Cleared when the turn is done (tombstones stay small).
ALTER TABLE turnd_turns ADD COLUMN traceparent text, ADD COLUMN tracestate text;
-- The context a terminal event's relay span is parented on: the commit span of a worker's
-- answer, else the turn's own. Dropped with the body once published.
ALTER TABLE turnd_outbox ADD COLUMN traceparent text, ADD COLUMN tracestate text;
