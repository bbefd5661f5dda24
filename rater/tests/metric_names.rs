//! The rater's metric catalogue, pinned: a rename breaks this test, not a dashboard. Names follow
//! `<service>_<thing>_<unit>[_total]`, labels come from a fixed set, the series with fixed
//! labels exist at zero from start-up, and every `rater_*` name on a board or in an alert rule
//! is one the rater describes.

#[path = "../../shared/tests/support/metric_refs.rs"]
mod metric_refs;
#[path = "../../shared/tests/support/zero_series.rs"]
mod zero_series;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use rater::metric as m;

const PREFIX: &str = "rater_";

/// Names the dashboards, alerts and runbooks rely on. Removing or renaming one is a breaking
/// change for operators: change the boards and rules in the same commit.
const PINNED: [(&str, &str); 16] = [
    ("counter", "rater_messages_consumed_total"),
    ("counter", "rater_events_total"),
    ("counter", "rater_commands_total"),
    ("counter", "rater_batches_total"),
    ("histogram", "rater_batch_size_messages"),
    ("histogram", "rater_batch_duration_seconds"),
    ("histogram", "rater_lua_duration_seconds"),
    ("histogram", "rater_produce_duration_seconds"),
    ("counter", "rater_dlq_messages_total"),
    ("counter", "rater_ledger_messages_produced_total"),
    ("counter", "rater_replayed_operations_total"),
    ("counter", "rater_pool_rebuilds_total"),
    ("counter", "rater_catalogue_reloads_total"),
    ("counter", "rater_errors_total"),
    ("gauge", "rater_assigned_partitions"),
    ("gauge", "rater_consumer_lag_messages"),
];

/// Every label key the rater may use: small fixed sets, never ids or error text.
const LABELS: [&str; 7] = ["outcome", "kind", "result", "reason", "stage", "topic", "partition"];

fn catalogue() -> Vec<shared::telemetry::Described> {
    shared::telemetry::described(m::describe)
}

#[test]
fn pinned_names_are_described() {
    let cat = catalogue();
    for (kind, name) in PINNED {
        assert!(
            cat.iter().any(|d| d.name == name && d.kind == kind),
            "{kind} {name} is not described by rater::metric::describe"
        );
    }
    assert_eq!(m::CONSUMER_LAG, "rater_consumer_lag_messages");
    assert_eq!(m::EVENTS, "rater_events_total");
}

#[test]
fn names_follow_the_convention() {
    metric_refs::check_conventions(PREFIX, &catalogue());
}

#[test]
fn fixed_label_series_exist_at_zero_from_start_up() {
    let found = zero_series::zero_series(m::describe, &LABELS, false);
    for want in [
        "rater_messages_consumed_total",
        "rater_ledger_messages_produced_total",
        "rater_events_total{outcome=settled}",
        "rater_events_total{outcome=denied}",
        "rater_events_total{outcome=unpriced}",
        "rater_events_total{outcome=duplicate}",
        "rater_dlq_messages_total{reason=undecodable}",
        "rater_errors_total{stage=batch}",
    ] {
        assert!(
            found.contains(want),
            "{want} not registered at start-up; have {found:#?}"
        );
    }
}

#[test]
fn lag_is_reported_per_partition_and_drops_to_zero_on_revoke() {
    let recorder = DebuggingRecorder::new();
    let snapshot = recorder.snapshotter();
    let gauges = |snap: metrics_util::debugging::Snapshot| {
        snap.into_vec()
            .into_iter()
            .filter(|(k, ..)| k.key().name() == m::CONSUMER_LAG)
            .map(|(k, _, _, v)| {
                let labels: Vec<String> = k.key().labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
                let DebugValue::Gauge(v) = v else {
                    panic!("lag is a gauge")
                };
                (labels.join(","), v.into_inner())
            })
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let mut shown = std::collections::BTreeSet::new();
    metrics::with_local_recorder(&recorder, || {
        shared::kafka::record_lag(
            m::CONSUMER_LAG,
            &[("credits.input".into(), 3, 1200), ("credits.input".into(), 7, 0)],
            &mut shown,
        )
    });
    let first = gauges(snapshot.snapshot());
    assert_eq!(first.get("topic=credits.input,partition=3"), Some(&1200.0), "{first:?}");
    assert_eq!(first.get("topic=credits.input,partition=7"), Some(&0.0), "{first:?}");
    // Partition 3 moved to another instance: it reads 0 here, so the group's sum stays right.
    metrics::with_local_recorder(&recorder, || {
        shared::kafka::record_lag(m::CONSUMER_LAG, &[("credits.input".into(), 7, 40)], &mut shown)
    });
    let second = gauges(snapshot.snapshot());
    assert_eq!(second.get("topic=credits.input,partition=3"), Some(&0.0), "{second:?}");
    assert_eq!(second.get("topic=credits.input,partition=7"), Some(&40.0), "{second:?}");
}

#[test]
fn boards_and_rules_use_only_described_rater_metrics() {
    let cat: Vec<(String, &str)> = catalogue().into_iter().map(|d| (d.name, d.kind)).collect();
    let (unknown, checked) = metric_refs::unknown(PREFIX, &cat);
    assert!(checked >= 10, "only {checked} rater metrics on the boards and rules");
    assert!(unknown.is_empty(), "not in the rater's catalogue: {unknown:#?}");
}
