-- Scheduled grants enter the pool when the sweeper activates them; expiring grants leave it
-- when the sweeper expires them. Both travel through the input topic (the rater is the only
-- writer of a pool); sweep_sent_at keeps the sweeper from resending on every tick.
ALTER TABLE grants ADD COLUMN activated BOOLEAN NOT NULL DEFAULT true;
ALTER TABLE grants ADD COLUMN sweep_sent_at TIMESTAMPTZ;
CREATE INDEX grants_due_expiry ON grants (expires_at) WHERE status = 'active' AND expires_at IS NOT NULL;
CREATE INDEX grants_due_activation ON grants (effective_at) WHERE NOT activated;
