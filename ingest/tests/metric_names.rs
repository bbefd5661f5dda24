//! ingest's metric catalogue, pinned: a rename breaks this test, not a dashboard. Names follow
//! `<service>_<thing>_<unit>[_total]`, labels come from a fixed set, the series with fixed
//! labels exist at zero from start-up, and every `ingest_*` name on a board or in an alert rule
//! is one ingest describes.

#[path = "../../shared/tests/support/metric_refs.rs"]
mod metric_refs;
#[path = "../../shared/tests/support/zero_series.rs"]
mod zero_series;

use ingest::metric as m;

const PREFIX: &str = "ingest_";

/// Names the dashboards, alerts and runbooks rely on. Removing or renaming one is a breaking
/// change for operators: change the boards and rules in the same commit.
const PINNED: [(&str, &str); 8] = [
    ("counter", "ingest_http_requests_total"),
    ("histogram", "ingest_http_request_duration_seconds"),
    ("counter", "ingest_events_accepted_total"),
    ("counter", "ingest_events_rejected_total"),
    ("counter", "ingest_rate_limited_total"),
    ("histogram", "ingest_produce_duration_seconds"),
    ("gauge", "ingest_producer_queue_messages"),
    ("counter", "ingest_commands_total"),
];

/// Every label key ingest may use: route templates (never raw paths), statuses, fixed reasons.
const LABELS: [&str; 6] = ["route", "status", "reason", "kind", "plane", "state"];

fn catalogue() -> Vec<shared::telemetry::Described> {
    shared::telemetry::described(m::describe)
}

#[test]
fn pinned_names_are_described() {
    let cat = catalogue();
    for (kind, name) in PINNED {
        assert!(
            cat.iter().any(|d| d.name == name && d.kind == kind),
            "{kind} {name} is not described by ingest::metric::describe"
        );
    }
    assert_eq!(m::PRODUCER_QUEUE, "ingest_producer_queue_messages");
    assert_eq!(m::REQUESTS, "ingest_http_requests_total");
}

#[test]
fn names_follow_the_convention() {
    metric_refs::check_conventions(PREFIX, &catalogue());
}

#[test]
fn fixed_label_series_exist_at_zero_from_start_up() {
    let found = zero_series::zero_series(m::describe, &LABELS, false);
    for want in [
        "ingest_events_accepted_total",
        "ingest_rate_limited_total",
        "ingest_events_rejected_total{reason=invalid}",
        "ingest_events_rejected_total{reason=rate_limited}",
        "ingest_events_rejected_total{reason=saturated}",
        "ingest_commands_total{kind=grant}",
    ] {
        assert!(
            found.contains(want),
            "{want} not registered at start-up; have {found:#?}"
        );
    }
}

#[test]
fn boards_and_rules_use_only_described_ingest_metrics() {
    let cat: Vec<(String, &str)> = catalogue().into_iter().map(|d| (d.name, d.kind)).collect();
    let (unknown, checked) = metric_refs::unknown(PREFIX, &cat);
    assert!(checked >= 6, "only {checked} ingest metrics on the boards and rules");
    assert!(unknown.is_empty(), "not in ingest's catalogue: {unknown:#?}");
}
