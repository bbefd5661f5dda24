//! The ledger-writer's metric catalogue, pinned: a rename breaks this test, not a dashboard.
//! Names follow `<service>_<thing>_<unit>[_total]`, labels come from a fixed set, the series
//! with fixed labels exist at zero from start-up, and every `ledger_writer_*` name on a board
//! or in an alert rule is one the ledger-writer describes.

#[path = "../../shared/tests/support/metric_refs.rs"]
mod metric_refs;
#[path = "../../shared/tests/support/zero_series.rs"]
mod zero_series;

use ledger_writer::metric as m;

const PREFIX: &str = "ledger_writer_";

/// Names the dashboards, alerts and runbooks rely on. Removing or renaming one is a breaking
/// change for operators: change the boards and rules in the same commit.
const PINNED: [(&str, &str); 23] = [
    ("counter", "ledger_writer_messages_consumed_total"),
    ("counter", "ledger_writer_batches_total"),
    ("histogram", "ledger_writer_batch_size_messages"),
    ("histogram", "ledger_writer_transaction_duration_seconds"),
    ("counter", "ledger_writer_rows_written_total"),
    ("counter", "ledger_writer_duplicates_total"),
    ("counter", "ledger_writer_reversals_total"),
    ("histogram", "ledger_writer_e2e_latency_seconds"),
    ("counter", "ledger_writer_dlq_messages_total"),
    ("counter", "ledger_writer_errors_total"),
    ("counter", "ledger_writer_sweep_commands_total"),
    ("gauge", "ledger_writer_consumer_lag_messages"),
    ("counter", "ledger_writer_rollup_compactions_total"),
    ("histogram", "ledger_writer_rollup_compaction_duration_seconds"),
    ("gauge", "ledger_writer_rollup_pending_rows"),
    ("counter", "ledger_writer_webhook_deliveries_total"),
    ("gauge", "ledger_writer_webhook_backlog_deliveries"),
    ("gauge", "ledger_writer_webhook_oldest_pending_age_seconds"),
    ("counter", "ledger_writer_webhook_endpoints_disabled_total"),
    ("counter", "ledger_writer_billing_ticks_total"),
    ("counter", "ledger_writer_billing_charge_attempts_total"),
    ("histogram", "ledger_writer_billing_charge_duration_seconds"),
    ("counter", "ledger_writer_billing_plan_grants_total"),
];

/// Every label key the ledger-writer may use on its pre-registered series: fixed sets only.
const LABELS: [&str; 7] = ["table", "caught_by", "reason", "stage", "kind", "outcome", "task"];

/// Everything the ledger-writer describes at start-up: settlement, then the webhook sender.
fn describe_all() {
    m::describe();
    m::describe_webhooks();
    m::describe_billing();
}

fn catalogue() -> Vec<shared::telemetry::Described> {
    shared::telemetry::described(describe_all)
}

#[test]
fn pinned_names_are_described() {
    let cat = catalogue();
    for (kind, name) in PINNED {
        assert!(
            cat.iter().any(|d| d.name == name && d.kind == kind),
            "{kind} {name} is not described by ledger_writer::metric::describe"
        );
    }
    assert_eq!(m::CONSUMER_LAG, "ledger_writer_consumer_lag_messages");
    assert_eq!(m::E2E, "ledger_writer_e2e_latency_seconds");
}

#[test]
fn names_follow_the_convention() {
    metric_refs::check_conventions(PREFIX, &catalogue());
}

#[test]
fn fixed_label_series_exist_at_zero_from_start_up() {
    let found = zero_series::zero_series(describe_all, &LABELS, true);
    for want in [
        "ledger_writer_messages_consumed_total",
        "ledger_writer_reversals_total",
        "ledger_writer_rows_written_total{table=ledger_entries}",
        "ledger_writer_duplicates_total{caught_by=postgres}",
        "ledger_writer_dlq_messages_total{reason=undecodable}",
        "ledger_writer_errors_total{stage=settle}",
        "ledger_writer_sweep_commands_total{kind=expire}",
        "ledger_writer_webhook_deliveries_total{outcome=success}",
        "ledger_writer_webhook_deliveries_total{outcome=timeout}",
        "ledger_writer_webhook_endpoints_disabled_total",
        "ledger_writer_billing_ticks_total{task=scheduler}",
        "ledger_writer_billing_charge_attempts_total{outcome=unknown}",
        "ledger_writer_billing_plan_grants_total",
        "ledger_writer_errors_total{stage=billing}",
    ] {
        assert!(
            found.contains(want),
            "{want} not registered at start-up; have {found:#?}"
        );
    }
}

#[test]
fn boards_and_rules_use_only_described_ledger_writer_metrics() {
    let cat: Vec<(String, &str)> = catalogue().into_iter().map(|d| (d.name, d.kind)).collect();
    let (unknown, checked) = metric_refs::unknown(PREFIX, &cat);
    assert!(
        checked >= 10,
        "only {checked} ledger-writer metrics on the boards and rules"
    );
    assert!(unknown.is_empty(), "not in the ledger-writer's catalogue: {unknown:#?}");
}
