//! The ingest metric catalogue.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

pub const REQUESTS: &str = "ingest_http_requests_total";
pub const REQUEST_DURATION: &str = "ingest_http_request_duration_seconds";
pub const EVENTS_ACCEPTED: &str = "ingest_events_accepted_total";
pub const EVENTS_REJECTED: &str = "ingest_events_rejected_total";
pub const RATE_LIMITED: &str = "ingest_rate_limited_total";
pub const RATE_LIMITER_FALLBACKS: &str = "ingest_rate_limiter_fallbacks_total";
pub const PRODUCE_DURATION: &str = "ingest_produce_duration_seconds";
pub const PRODUCER_QUEUE: &str = "ingest_producer_queue_messages";
pub const COMMANDS: &str = "ingest_commands_total";
pub const DB_CONNECTIONS: &str = "ingest_db_connections";

pub fn describe() {
    describe_counter!(REQUESTS, Unit::Count, "HTTP requests, by route and status");
    describe_histogram!(REQUEST_DURATION, Unit::Seconds, "HTTP request latency, by route");
    describe_counter!(
        EVENTS_ACCEPTED,
        Unit::Count,
        "Usage events durable in Kafka (answered 202)"
    );
    describe_counter!(EVENTS_REJECTED, Unit::Count, "Usage events refused, by reason");
    describe_counter!(
        RATE_LIMITED,
        Unit::Count,
        "Requests refused with 429 by the tenant rate limit"
    );
    describe_counter!(
        RATE_LIMITER_FALLBACKS,
        Unit::Count,
        "Requests judged by this replica's own limiter because Redis failed (INGEST_RATE_LIMITER=redis)"
    );
    describe_histogram!(
        PRODUCE_DURATION,
        Unit::Seconds,
        "From enqueue to the broker's ack, per request"
    );
    describe_gauge!(PRODUCER_QUEUE, Unit::Count, "Messages waiting in the producer queue");
    describe_counter!(COMMANDS, Unit::Count, "Pool commands sent (grant, void)");
    describe_gauge!(
        DB_CONNECTIONS,
        Unit::Count,
        "Postgres connections of each plane's pool (event, control, query), by state (in_use, idle)"
    );
    zero();
}

/// Register the series with fixed labels at zero, so dashboards and alerts see them (and
/// `rate()` has a start) before the first request of each kind.
fn zero() {
    metrics::counter!(EVENTS_ACCEPTED).increment(0);
    metrics::counter!(RATE_LIMITED).increment(0);
    metrics::counter!(RATE_LIMITER_FALLBACKS).increment(0);
    for reason in ["invalid", "rate_limited", "saturated"] {
        metrics::counter!(EVENTS_REJECTED, "reason" => reason).increment(0);
    }
    for kind in ["grant", "void"] {
        metrics::counter!(COMMANDS, "kind" => kind).increment(0);
    }
}
