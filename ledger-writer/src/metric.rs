//! The ledger-writer's metric catalogue.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

pub const MESSAGES: &str = "ledger_writer_messages_consumed_total";
pub const BATCHES: &str = "ledger_writer_batches_total";
pub const BATCH_SIZE: &str = "ledger_writer_batch_size_messages";
pub const TX_DURATION: &str = "ledger_writer_transaction_duration_seconds";
pub const ROWS: &str = "ledger_writer_rows_written_total";
pub const DUPLICATES: &str = "ledger_writer_duplicates_total";
pub const REVERSALS: &str = "ledger_writer_reversals_total";
pub const E2E: &str = "ledger_writer_e2e_latency_seconds";
pub const DLQ: &str = "ledger_writer_dlq_messages_total";
pub const ERRORS: &str = "ledger_writer_errors_total";
pub const BISECTIONS: &str = "ledger_writer_bisections_total";
pub const SWEEP_COMMANDS: &str = "ledger_writer_sweep_commands_total";
pub const CONSUMER_LAG: &str = "ledger_writer_consumer_lag_messages";
pub const ASSIGNED_PARTITIONS: &str = "ledger_writer_assigned_partitions";
pub const ROLLUP_COMPACTIONS: &str = "ledger_writer_rollup_compactions_total";
pub const ROLLUP_DURATION: &str = "ledger_writer_rollup_compaction_duration_seconds";
pub const ROLLUP_PENDING: &str = "ledger_writer_rollup_pending_rows";
pub const RETENTION_DROPPED: &str = "ledger_writer_retention_partitions_dropped_total";

pub fn describe() {
    describe_counter!(MESSAGES, Unit::Count, "Ledger messages consumed");
    describe_counter!(BATCHES, Unit::Count, "Batches settled (one transaction each)");
    describe_histogram!(BATCH_SIZE, Unit::Count, "Messages per settled batch");
    describe_histogram!(
        TX_DURATION,
        Unit::Seconds,
        "Time of one settle transaction, begin to commit"
    );
    describe_counter!(ROWS, Unit::Count, "Rows written, by table");
    describe_counter!(
        DUPLICATES,
        Unit::Count,
        "Repeated idempotency keys, by who caught them (redis, postgres)"
    );
    describe_counter!(
        REVERSALS,
        Unit::Count,
        "Duplicates that slipped past Redis and were given back"
    );
    describe_histogram!(
        E2E,
        Unit::Seconds,
        "From acceptance at ingest to settlement in Postgres"
    );
    describe_counter!(DLQ, Unit::Count, "Messages sent to the dead-letter topic, by reason");
    describe_counter!(
        ERRORS,
        Unit::Count,
        "Transient errors, by stage (each one retried with backoff)"
    );
    describe_counter!(
        BISECTIONS,
        Unit::Count,
        "Batches split to isolate a fact Postgres refuses (the fact is then dead-lettered)"
    );
    describe_counter!(
        SWEEP_COMMANDS,
        Unit::Count,
        "Expire and activate commands sent by the grant sweeper"
    );
    describe_gauge!(
        CONSUMER_LAG,
        Unit::Count,
        "Ledger messages not yet committed, by topic and partition (high watermark - committed)"
    );
    describe_gauge!(
        ASSIGNED_PARTITIONS,
        Unit::Count,
        "Ledger partitions this instance holds in its consumer group (0 until the group has formed)"
    );
    describe_counter!(
        ROLLUP_COMPACTIONS,
        Unit::Count,
        "Rollup compactor ticks, by outcome (done, busy: another ledger-writer held the lock, error)"
    );
    describe_histogram!(
        ROLLUP_DURATION,
        Unit::Seconds,
        "Time of one rollup compaction tick that moved the pending usage into the rollups"
    );
    describe_gauge!(
        ROLLUP_PENDING,
        Unit::Count,
        "Pending rollup rows found and moved by the last compaction tick (the queue behind the usage reads)"
    );
    describe_counter!(
        RETENTION_DROPPED,
        Unit::Count,
        "Monthly partitions dropped by `ledger-writer retention`, by table"
    );
    zero();
}

/// Register the series with fixed labels at zero, so dashboards and alerts see them (and
/// `rate()` has a start) before the first event of each kind.
fn zero() {
    for c in [MESSAGES, BATCHES, REVERSALS, BISECTIONS] {
        metrics::counter!(c).increment(0);
    }
    for table in [
        "usage_events",
        "duplicate_events",
        "ledger_entries",
        "usage_rollup_pending",
        "usage_rollups",
    ] {
        metrics::counter!(ROWS, "table" => table).increment(0);
    }
    for by in ["redis", "postgres"] {
        metrics::counter!(DUPLICATES, "caught_by" => by).increment(0);
    }
    for reason in ["undecodable", "unstorable"] {
        metrics::counter!(DLQ, "reason" => reason).increment(0);
    }
    for stage in ["settle", "sweep", "rollup", "partitions"] {
        metrics::counter!(ERRORS, "stage" => stage).increment(0);
    }
    for kind in ["expire", "activate"] {
        metrics::counter!(SWEEP_COMMANDS, "kind" => kind).increment(0);
    }
    for outcome in ["done", "busy", "error"] {
        metrics::counter!(ROLLUP_COMPACTIONS, "outcome" => outcome).increment(0);
    }
    for table in crate::partitions::TABLES {
        metrics::counter!(RETENTION_DROPPED, "table" => table).increment(0);
    }
    metrics::gauge!(ROLLUP_PENDING).set(0.0);
    metrics::gauge!(ASSIGNED_PARTITIONS).set(0.0);
}

// Webhooks (the outbox writer and the sender, ledger-writer/src/webhooks/).
pub const WEBHOOK_MESSAGES: &str = "ledger_writer_webhook_messages_total";
pub const WEBHOOK_DELIVERIES: &str = "ledger_writer_webhook_deliveries_total";
pub const WEBHOOK_DURATION: &str = "ledger_writer_webhook_delivery_duration_seconds";
pub const WEBHOOK_BACKLOG: &str = "ledger_writer_webhook_backlog_deliveries";
pub const WEBHOOK_OLDEST_AGE: &str = "ledger_writer_webhook_oldest_pending_age_seconds";
pub const WEBHOOK_ENDPOINTS_DISABLED: &str = "ledger_writer_webhook_endpoints_disabled_total";
pub const WEBHOOK_YIELDED_POLLS: &str = "ledger_writer_webhook_yielded_polls_total";

/// The webhook outcomes: a fixed label set.
pub const WEBHOOK_OUTCOMES: [&str; 6] = [
    "success",
    "http_error",
    "timeout",
    "connect",
    "refused_address",
    "error",
];

pub fn describe_webhooks() {
    describe_counter!(
        WEBHOOK_MESSAGES,
        Unit::Count,
        "Webhook messages written to the outbox, by type"
    );
    describe_counter!(
        WEBHOOK_DELIVERIES,
        Unit::Count,
        "Webhook delivery attempts, by outcome (success, http_error, timeout, connect, refused_address, error)"
    );
    describe_histogram!(
        WEBHOOK_DURATION,
        Unit::Seconds,
        "Time of one webhook delivery attempt, request to answer"
    );
    describe_gauge!(
        WEBHOOK_BACKLOG,
        Unit::Count,
        "Webhook deliveries pending (due or waiting to retry)"
    );
    describe_gauge!(
        WEBHOOK_OLDEST_AGE,
        Unit::Seconds,
        "Age of the oldest webhook delivery not yet delivered or failed"
    );
    describe_counter!(
        WEBHOOK_ENDPOINTS_DISABLED,
        Unit::Count,
        "Webhook endpoints disabled after a message failed with no success in between"
    );
    describe_counter!(
        WEBHOOK_YIELDED_POLLS,
        Unit::Count,
        "Webhook sender polls held to the busy rate because settlement was busy (50% of its time or more)"
    );
    for outcome in WEBHOOK_OUTCOMES {
        metrics::counter!(WEBHOOK_DELIVERIES, "outcome" => outcome).increment(0);
    }
    metrics::counter!(WEBHOOK_ENDPOINTS_DISABLED).increment(0);
    metrics::counter!(WEBHOOK_YIELDED_POLLS).increment(0);
    for stage in [
        "webhook_dispatch",
        "webhook_claim",
        "webhook_record",
        "webhook_flush",
        "webhook_gauge",
    ] {
        metrics::counter!(ERRORS, "stage" => stage).increment(0);
    }
}

// Billing (the plan scheduler and the charge worker, ledger-writer/src/billing/).
pub const BILLING_TICKS: &str = "ledger_writer_billing_ticks_total";
pub const BILLING_CHARGES: &str = "ledger_writer_billing_charge_attempts_total";
pub const BILLING_CHARGE_DURATION: &str = "ledger_writer_billing_charge_duration_seconds";
pub const BILLING_PLAN_GRANTS: &str = "ledger_writer_billing_plan_grants_total";

/// The billing loops and the charge outcomes: fixed label sets.
pub const BILLING_TASKS: [&str; 2] = ["scheduler", "charges"];
pub const BILLING_OUTCOMES: [&str; 3] = ["succeeded", "failed", "unknown"];

pub fn describe_billing() {
    describe_counter!(
        BILLING_TICKS,
        Unit::Count,
        "Billing loop rounds, by task (scheduler, charges)"
    );
    describe_counter!(
        BILLING_CHARGES,
        Unit::Count,
        "Charge attempts sent to tenants' billing systems, by outcome (succeeded, failed, unknown)"
    );
    describe_histogram!(
        BILLING_CHARGE_DURATION,
        Unit::Seconds,
        "Time of one charge attempt, request to answer"
    );
    describe_counter!(
        BILLING_PLAN_GRANTS,
        Unit::Count,
        "Plan and add-on period grants produced by the scheduler"
    );
    for task in BILLING_TASKS {
        metrics::counter!(BILLING_TICKS, "task" => task).increment(0);
    }
    for outcome in BILLING_OUTCOMES {
        metrics::counter!(BILLING_CHARGES, "outcome" => outcome).increment(0);
    }
    metrics::counter!(BILLING_PLAN_GRANTS).increment(0);
    metrics::counter!(ERRORS, "stage" => "billing").increment(0);
}
