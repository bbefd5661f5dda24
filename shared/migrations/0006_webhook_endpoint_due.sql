-- The sender claims due deliveries per endpoint (at most a few in flight to each), so it looks
-- them up by endpoint in due order.
CREATE INDEX webhook_deliveries_endpoint_due ON webhook_deliveries (endpoint_id, next_attempt_at)
    WHERE status = 'pending';
