-- Usage events that reached a consumer and could not be applied or stored (guarantee 7): their
-- terminal status is `dead_lettered` with the reason, instead of `pending` forever. The message
-- itself is on the dead-letter topic; a row here is the answer GET /v1/events/{key} gives until
-- the event is replayed and settles (usage_events answers first).
CREATE TABLE dead_letters (
    tenant_id text NOT NULL,
    idempotency_key text NOT NULL,
    event_uid uuid NOT NULL,
    customer_id text NOT NULL,
    -- rater or ledger-writer
    stage text NOT NULL,
    reason text NOT NULL,
    -- topic/partition/offset the message was consumed from
    source text NOT NULL,
    dead_lettered_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, idempotency_key, event_uid)
);
