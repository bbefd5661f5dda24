//! The rater's metric catalogue: every name in one place, described at start-up.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

pub const MESSAGES: &str = "rater_messages_consumed_total";
pub const EVENTS: &str = "rater_events_total";
pub const COMMANDS: &str = "rater_commands_total";
pub const BATCHES: &str = "rater_batches_total";
pub const BATCH_SIZE: &str = "rater_batch_size_messages";
pub const BATCH_DURATION: &str = "rater_batch_duration_seconds";
pub const LUA_DURATION: &str = "rater_lua_duration_seconds";
pub const REDIS_REPLICATION_WAITS: &str = "rater_redis_replication_waits_total";
pub const PRODUCE_DURATION: &str = "rater_produce_duration_seconds";
pub const DLQ: &str = "rater_dlq_messages_total";
pub const LEDGER_MESSAGES: &str = "rater_ledger_messages_produced_total";
pub const REPLAYED: &str = "rater_replayed_operations_total";
pub const POOL_REBUILDS: &str = "rater_pool_rebuilds_total";
pub const CATALOGUE_RELOADS: &str = "rater_catalogue_reloads_total";
pub const ERRORS: &str = "rater_errors_total";
pub const BISECTIONS: &str = "rater_bisections_total";
pub const ASSIGNED_PARTITIONS: &str = "rater_assigned_partitions";
pub const CONSUMER_LAG: &str = "rater_consumer_lag_messages";

pub fn describe() {
    describe_counter!(MESSAGES, Unit::Count, "Input messages consumed");
    describe_counter!(
        EVENTS,
        Unit::Count,
        "Usage events decided, by outcome (settled, denied, unpriced, duplicate)"
    );
    describe_counter!(COMMANDS, Unit::Count, "Pool commands applied, by kind and result");
    describe_counter!(BATCHES, Unit::Count, "Batches processed (one loop turn each)");
    describe_histogram!(BATCH_SIZE, Unit::Count, "Messages per batch");
    describe_histogram!(
        BATCH_DURATION,
        Unit::Seconds,
        "Time to decide, produce and store one batch"
    );
    describe_histogram!(LUA_DURATION, Unit::Seconds, "One pipelined round of pool scripts");
    describe_counter!(
        REDIS_REPLICATION_WAITS,
        Unit::Count,
        "WAITs after a pipeline of pool scripts (--redis-wait-replicas), by outcome (ok, short: fewer replicas acknowledged in time; the batch is retried)"
    );
    describe_histogram!(
        PRODUCE_DURATION,
        Unit::Seconds,
        "Time until every fact of a batch is acked"
    );
    describe_counter!(DLQ, Unit::Count, "Messages sent to the dead-letter topic, by reason");
    describe_counter!(
        LEDGER_MESSAGES,
        Unit::Count,
        "Ledger messages produced (each carries a run of facts of one partition and trace id)"
    );
    describe_counter!(
        REPLAYED,
        Unit::Count,
        "Operations redelivered after a crash and answered from the journal"
    );
    describe_counter!(POOL_REBUILDS, Unit::Count, "Pools rebuilt in Redis from Postgres");
    describe_counter!(CATALOGUE_RELOADS, Unit::Count, "Tenant catalogue reloads from Postgres");
    describe_counter!(
        ERRORS,
        Unit::Count,
        "Transient errors, by stage (each one retried with backoff)"
    );
    describe_counter!(
        BISECTIONS,
        Unit::Count,
        "Batches split to isolate a message that fails permanently (it is then dead-lettered)"
    );
    describe_gauge!(
        ASSIGNED_PARTITIONS,
        Unit::Count,
        "Input partitions owned by this instance"
    );
    describe_gauge!(
        CONSUMER_LAG,
        Unit::Count,
        "Input messages not yet committed, by topic and partition (high watermark - committed)"
    );
    zero();
}

/// Register the series with fixed labels at zero, so dashboards and alerts see them (and
/// `rate()` has a start) before the first event of each kind.
fn zero() {
    for c in [
        MESSAGES,
        BATCHES,
        REPLAYED,
        POOL_REBUILDS,
        CATALOGUE_RELOADS,
        LEDGER_MESSAGES,
        BISECTIONS,
    ] {
        metrics::counter!(c).increment(0);
    }
    for outcome in ["settled", "denied", "unpriced", "duplicate"] {
        metrics::counter!(EVENTS, "outcome" => outcome).increment(0);
    }
    for reason in ["undecodable", "invalid_amount", "pool_total_too_large", "other"] {
        metrics::counter!(DLQ, "reason" => reason).increment(0);
    }
    metrics::counter!(ERRORS, "stage" => "batch").increment(0);
}
