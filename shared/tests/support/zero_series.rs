//! The start-up check each service's `tests/metric_names.rs` makes (included with `#[path]`):
//! run its `describe` under a debugging recorder and check every series it pre-registers.

use std::collections::BTreeSet;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::MetricKind;

/// Every series `describe` registers is described, a counter at 0 (a gauge only if
/// `gauges_ok`), and labelled only with keys from `labels`. Returns the series as `name` or
/// `name{key=value}`, for the caller to look for the ones its boards need.
pub fn zero_series(describe: fn(), labels: &[&str], gauges_ok: bool) -> BTreeSet<String> {
    let recorder = DebuggingRecorder::new();
    let snapshot = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, describe);
    let cat = shared::telemetry::described(describe);
    let mut found = BTreeSet::new();
    for (key, _, _, value) in snapshot.snapshot().into_vec() {
        let name = key.key().name();
        assert!(
            cat.iter().any(|d| d.name == name),
            "{name} registered but not described"
        );
        match key.kind() {
            MetricKind::Counter => assert_eq!(value, DebugValue::Counter(0), "{name} starts at 0"),
            kind => assert!(
                gauges_ok && kind == MetricKind::Gauge,
                "{name}: only counters are pre-registered"
            ),
        }
        for l in key.key().labels() {
            assert!(
                labels.contains(&l.key()),
                "{name}: label {} is not in {labels:?}",
                l.key()
            );
            found.insert(format!("{name}{{{}={}}}", l.key(), l.value()));
        }
        if key.key().labels().len() == 0 {
            found.insert(name.to_owned());
        }
    }
    found
}
