//! The ledger-writer's metric catalogue.

use metrics::{describe_counter, describe_histogram, Unit};

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
pub const SWEEP_COMMANDS: &str = "ledger_writer_sweep_commands_total";

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
    describe_counter!(ERRORS, Unit::Count, "Transient errors, by stage");
    describe_counter!(
        SWEEP_COMMANDS,
        Unit::Count,
        "Expire and activate commands sent by the grant sweeper"
    );
}
