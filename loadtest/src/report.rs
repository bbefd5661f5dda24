//! The run report: a JSON document with stable keys (consumed by CI and the README's
//! "Measured" table) and a human summary on stdout.
//!
//! Key order is part of the contract: the documented keys come first, in this order, and new
//! ones are only ever appended after `ok`. The test at the bottom breaks on any rename.
#![allow(clippy::float_arithmetic)] // rates and latencies only; money is Decimal

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::args::Args;
use crate::load::LoadOutcome;
use crate::verify::Verification;

pub const REPORT_VERSION: u32 = 1;

/// The JSON report. Field order is the serialized key order.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub version: u32,
    pub started_at: String,
    pub rate_target: f64,
    pub duration_s: f64,
    pub batch: u32,
    pub tenants: u32,
    pub customers: u32,
    pub hot_share: f64,
    pub duplicates_ratio: f64,
    pub sent: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub rejected_by_status: BTreeMap<String, u64>,
    pub dropped_by_generator: u64,
    pub duplicates_sent: u64,
    pub duplicates_accepted: u64,
    pub unique_accepted: u64,
    pub events_per_second: Option<f64>,
    pub accept_rate: f64,
    pub http_p50_ms: Option<f64>,
    pub http_p99_ms: Option<f64>,
    pub http_p999_ms: Option<f64>,
    pub http_max_ms: Option<f64>,
    pub e2e_p50_ms: Option<f64>,
    pub e2e_p99_ms: Option<f64>,
    pub e2e_p999_ms: Option<f64>,
    pub e2e_max_ms: Option<f64>,
    pub settle_wait_s: f64,
    pub lost: u64,
    pub double_charged: u64,
    pub mismatched_pools: u64,
    pub pools_checked: u64,
    pub redis_bytes_per_key: Option<f64>,
    pub ok: bool,
    // ---- additions (append only) ----
    pub settlement_completed: bool,
    pub warmup_s: f64,
    pub requests: u64,
    pub dropped_batches: u64,
    pub send_window_s: f64,
    pub accepted_count_mismatches: u64,
    pub settled_rows: u64,
    pub duplicate_rows: u64,
    pub unexpected_rows: u64,
    pub cost_mismatches: u64,
    pub not_settled_status: u64,
    pub over_consumed_keys: u64,
    pub pools_below_expected: u64,
    pub measured_events: u64,
    pub http_samples: u64,
    pub e2e_samples: u64,
    /// Why `ok` is false; empty when it is true.
    pub failures: Vec<String>,
    /// `"full"` or `"ingest_only"` (`--ingest-only`: no settlement wait, nothing verified).
    pub mode: String,
    /// Whether settlement was waited for and checked (false with `--ingest-only`).
    pub verified: bool,
    /// `events_per_second / rate_target` (null with `--ingest-only`): below 1 the pipeline
    /// settled less than was offered; `1 / this` is by how much the rate is missed.
    pub settled_vs_target: Option<f64>,
    /// The pipeline kept up with the offered rate as the budget asks: settled at least
    /// [`KEEP_UP_SHARE`] of it (the window runs to the last settlement, so a run that keeps up
    /// shows a little under 1) with e2e p99 under [`KEEP_UP_E2E_P99_MS`]. Null with `--ingest-only`.
    pub kept_up: Option<bool>,
    /// `--retry`: failed requests were retried with the same body (the fields below are zero
    /// without it, apart from `tries`).
    pub retry: bool,
    /// `--retry-max` (null without `--retry`).
    pub retry_max_s: Option<f64>,
    /// HTTP tries, first ones included.
    pub tries: u64,
    /// Tries beyond the first (`tries - requests`).
    pub retries: u64,
    /// Requests that needed more than one try.
    pub retried_requests: u64,
    /// Retried tries by what they failed with (`"503"`, `"429"`, `connect_error`, `timeout`, ...).
    pub retries_by_cause: BTreeMap<String, u64>,
    /// Most tries one request took.
    pub max_tries: u32,
    /// Events accepted on a try after the first (part of `accepted`).
    pub accepted_after_retry: u64,
    /// Events of requests given up after `--retry-max` (part of `rejected`).
    pub abandoned: u64,
    /// Keys never accepted whose request may have been processed anyway (a timeout, a dropped
    /// connection or a 5xx among its tries; counted with `--retry` only).
    pub uncertain: u64,
    /// Of those, keys that settled (once; they are in the expected balances).
    pub uncertain_settled: u64,
    /// The tenants created for the run (every event of the run is theirs).
    pub tenant_ids: Vec<String>,
    /// The load ended before `duration_s` because the `--stop-file` appeared (`send_window_s`
    /// is then how long it ran, and `accept_rate` is over that).
    pub stopped_by_file: bool,
    /// With `--seed-events`: settled seed events in the database when the run started (seed
    /// tenants only; null without the flag).
    pub seeded_events: Option<u64>,
    /// Seconds spent seeding before the run (null without `--seed-events`).
    pub seed_s: Option<f64>,
    /// The timeline CSV written for the run (null when none was).
    pub timeline: Option<String>,
}

/// A run that keeps up settles at least this share of the offered rate.
pub const KEEP_UP_SHARE: f64 = 0.9;
/// ... with its e2e p99 under this many milliseconds (the budget's line).
pub const KEEP_UP_E2E_P99_MS: f64 = 1000.0;

/// Percentiles of a microsecond histogram in milliseconds: p50, p99, p99.9, max.
fn percentiles_ms(h: &Histogram<u64>) -> [Option<f64>; 4] {
    if h.is_empty() {
        return [None; 4];
    }
    let ms = |us: u64| Some(us as f64 / 1000.0);
    [
        ms(h.value_at_quantile(0.50)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max()),
    ]
}

impl Report {
    pub fn build(args: &Args, load: &LoadOutcome, v: &Verification) -> Self {
        let [http_p50_ms, http_p99_ms, http_p999_ms, http_max_ms] = percentiles_ms(&load.http_us);
        let [e2e_p50_ms, e2e_p99_ms, e2e_p999_ms, e2e_max_ms] = percentiles_ms(&v.e2e_us);
        let window = if load.stopped_by_file {
            load.send_window.as_secs_f64()
        } else {
            load.send_window.as_secs_f64().max(args.duration)
        };
        let mut r = Report {
            version: REPORT_VERSION,
            started_at: load.started_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            rate_target: args.rate,
            duration_s: args.duration,
            batch: args.batch,
            tenants: args.tenants,
            customers: args.customers,
            hot_share: args.hot_share,
            duplicates_ratio: args.duplicates,
            sent: load.sent,
            accepted: load.accepted,
            rejected: load.rejected,
            rejected_by_status: load.rejected_by_status.clone(),
            dropped_by_generator: load.dropped_by_generator,
            duplicates_sent: load.duplicates_sent,
            duplicates_accepted: load.expected.accepted_repeats(),
            unique_accepted: load.expected.unique_accepted(),
            events_per_second: v.events_per_second,
            accept_rate: load.accepted as f64 / window,
            http_p50_ms,
            http_p99_ms,
            http_p999_ms,
            http_max_ms,
            e2e_p50_ms,
            e2e_p99_ms,
            e2e_p999_ms,
            e2e_max_ms,
            settle_wait_s: v.settle_wait.as_secs_f64(),
            lost: v.lost,
            double_charged: v.double_charged,
            mismatched_pools: v.mismatched_pools,
            pools_checked: v.pools_checked,
            redis_bytes_per_key: None,
            ok: false,
            settlement_completed: v.settlement_completed,
            warmup_s: args.warmup,
            requests: load.requests,
            dropped_batches: load.dropped_batches,
            send_window_s: load.send_window.as_secs_f64(),
            accepted_count_mismatches: load.accepted_count_mismatches,
            settled_rows: v.settled_rows,
            duplicate_rows: v.duplicate_rows,
            unexpected_rows: v.unexpected_rows,
            cost_mismatches: v.cost_mismatches,
            not_settled_status: v.not_settled_status,
            over_consumed_keys: v.over_consumed_keys,
            pools_below_expected: v.pools_below_expected,
            measured_events: v.measured_events,
            http_samples: load.http_us.len(),
            e2e_samples: v.e2e_us.len(),
            failures: Vec::new(),
            mode: args.mode().to_owned(),
            verified: !args.ingest_only,
            settled_vs_target: None,
            kept_up: None,
            retry: args.retry,
            retry_max_s: args.retry.then_some(args.retry_max),
            tries: load.tries,
            retries: load.tries.saturating_sub(load.requests),
            retried_requests: load.retried_requests,
            retries_by_cause: load.retries_by_cause.clone(),
            max_tries: load.max_tries,
            accepted_after_retry: load.accepted_after_retry,
            abandoned: load.abandoned,
            uncertain: load.expected.maybe_count(),
            uncertain_settled: v.uncertain_settled,
            tenant_ids: Vec::new(),
            stopped_by_file: load.stopped_by_file,
            seeded_events: None,
            seed_s: None,
            timeline: None,
        };
        r.failures = r.failure_reasons();
        r.ok = r.failures.is_empty();
        r.judge_keep_up();
        r
    }

    /// Fill `settled_vs_target` and `kept_up` from the settled rate and e2e p99.
    pub fn judge_keep_up(&mut self) {
        if !self.verified || self.rate_target <= 0.0 {
            self.settled_vs_target = None;
            self.kept_up = None;
            return;
        }
        self.settled_vs_target = self.events_per_second.map(|e| e / self.rate_target);
        self.kept_up = Some(
            self.settled_vs_target.is_some_and(|x| x >= KEEP_UP_SHARE)
                && self.e2e_p99_ms.is_some_and(|p| p < KEEP_UP_E2E_P99_MS),
        );
    }

    /// Every reason the run is not ok.
    pub fn failure_reasons(&self) -> Vec<String> {
        let mut why = Vec::new();
        if self.verified && !self.settlement_completed {
            why.push(format!(
                "settlement incomplete after {:.1}s: {}/{} events, {}/{} duplicates in Postgres",
                self.settle_wait_s,
                self.settled_rows,
                self.unique_accepted,
                self.duplicate_rows,
                self.duplicates_accepted
            ));
        }
        if self.lost > 0 {
            why.push(format!("{} accepted events were never settled (lost)", self.lost));
        }
        if self.double_charged > 0 {
            why.push(format!(
                "{} double charges ({} keys consumed more than their cost, {} pools below expected)",
                self.double_charged, self.over_consumed_keys, self.pools_below_expected
            ));
        }
        if self.mismatched_pools > 0 {
            why.push(format!(
                "{} of {} pools differ from grant - expected charge",
                self.mismatched_pools, self.pools_checked
            ));
        }
        if self.accepted == 0 {
            why.push("no event was accepted, so nothing was verified".to_owned());
        }
        why
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).context("serializing the report")?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing the report to {}", path.display()))
    }

    /// The human summary.
    pub fn summary(&self) -> String {
        let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
        let extra = |got: u64, want: u64| {
            if got > want {
                format!(" ({} MORE than expected)", got - want)
            } else {
                String::new()
            }
        };
        let mut s = String::new();
        let mut line = |l: String| {
            s.push_str(&l);
            s.push('\n');
        };
        let stopped = if self.stopped_by_file {
            format!(" (stopped by --stop-file after {:.1}s)", self.send_window_s)
        } else {
            String::new()
        };
        line(format!(
            "loadtest {}: {} ev/s target for {}s{stopped} ({}s warm-up excluded from latency), batch {}, {} tenants, {} customers, hot {}, duplicates {}",
            self.started_at, self.rate_target, self.duration_s, self.warmup_s,
            self.batch, self.tenants, self.customers, self.hot_share, self.duplicates_ratio
        ));
        line(format!(
            "  sent {} in {} requests, accepted {} ({:.0}/s), rejected {} {:?}, dropped by generator {} ({} batches)",
            self.sent,
            self.requests,
            self.accepted,
            self.accept_rate,
            self.rejected,
            self.rejected_by_status,
            self.dropped_by_generator,
            self.dropped_batches
        ));
        line(format!(
            "  duplicates sent {}, accepted repeats {}, unique accepted {}",
            self.duplicates_sent, self.duplicates_accepted, self.unique_accepted
        ));
        if self.retry {
            line(format!(
                "  retries {} in {} requests (most tries {}) {:?}; accepted after a retry {}; given up after {}s: {} events; uncertain {} ({} settled)",
                self.retries,
                self.retried_requests,
                self.max_tries,
                self.retries_by_cause,
                self.accepted_after_retry,
                self.retry_max_s.unwrap_or_default(),
                self.abandoned,
                self.uncertain,
                self.uncertain_settled
            ));
        }
        line(format!(
            "  http ms   p50 {}  p99 {}  p99.9 {}  max {}  ({} requests measured)",
            ms(self.http_p50_ms),
            ms(self.http_p99_ms),
            ms(self.http_p999_ms),
            ms(self.http_max_ms),
            self.http_samples
        ));
        if !self.verified {
            line("  ingest only: settlement not waited for, nothing verified".to_owned());
            line(if self.ok {
                "  OK".to_owned()
            } else {
                format!("  FAILED: {}", self.failures.join("; "))
            });
            return s;
        }
        line(format!(
            "  e2e ms    p50 {}  p99 {}  p99.9 {}  max {}  ({} events measured)",
            ms(self.e2e_p50_ms),
            ms(self.e2e_p99_ms),
            ms(self.e2e_p999_ms),
            ms(self.e2e_max_ms),
            self.e2e_samples
        ));
        line(format!(
            "  settled throughput {} ev/s; settle wait {:.1}s; rows {}/{}{}, duplicates {}/{}{}",
            self.events_per_second
                .map_or_else(|| "-".to_owned(), |v| format!("{v:.0}")),
            self.settle_wait_s,
            self.settled_rows,
            self.unique_accepted,
            extra(self.settled_rows, self.unique_accepted),
            self.duplicate_rows,
            self.duplicates_accepted,
            extra(self.duplicate_rows, self.duplicates_accepted)
        ));
        line(format!(
            "  lost {}, double charged {}, mismatched pools {} of {}, unexpected rows {}, cost mismatches {}, not settled {}",
            self.lost, self.double_charged, self.mismatched_pools, self.pools_checked,
            self.unexpected_rows, self.cost_mismatches, self.not_settled_status
        ));
        if let (Some(x), Some(kept)) = (self.settled_vs_target, self.kept_up) {
            let e2e = self
                .e2e_p99_ms
                .map_or_else(|| "-".to_owned(), |p| format!("{:.2}", p / 1000.0));
            line(if kept {
                format!(
                    "  kept up: settled {:.2}x of the {} ev/s offered, e2e p99 {e2e} s (under {} s)",
                    x,
                    self.rate_target,
                    KEEP_UP_E2E_P99_MS / 1000.0
                )
            } else {
                format!(
                    "  DID NOT KEEP UP: settled {:.2}x of the {} ev/s offered (short by {:.2}x), e2e p99 {e2e} s (budget {} s)",
                    x,
                    self.rate_target,
                    if x > 0.0 { 1.0 / x } else { f64::INFINITY },
                    KEEP_UP_E2E_P99_MS / 1000.0
                )
            });
        }
        line(format!(
            "  redis bytes per retained idempotency key {}",
            self.redis_bytes_per_key
                .map_or_else(|| "- (no --redis-url)".to_owned(), |v| format!("{v:.1}"))
        ));
        line(if self.ok {
            "  OK".to_owned()
        } else {
            format!("  FAILED: {}", self.failures.join("; "))
        });
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented keys, in their documented order.
    const STABLE_KEYS: &[&str] = &[
        "version",
        "started_at",
        "rate_target",
        "duration_s",
        "batch",
        "tenants",
        "customers",
        "hot_share",
        "duplicates_ratio",
        "sent",
        "accepted",
        "rejected",
        "rejected_by_status",
        "dropped_by_generator",
        "duplicates_sent",
        "duplicates_accepted",
        "unique_accepted",
        "events_per_second",
        "accept_rate",
        "http_p50_ms",
        "http_p99_ms",
        "http_p999_ms",
        "http_max_ms",
        "e2e_p50_ms",
        "e2e_p99_ms",
        "e2e_p999_ms",
        "e2e_max_ms",
        "settle_wait_s",
        "lost",
        "double_charged",
        "mismatched_pools",
        "pools_checked",
        "redis_bytes_per_key",
        "ok",
    ];

    #[test]
    fn every_stable_key_is_present_first_and_in_order() {
        let mut r = Report {
            version: REPORT_VERSION,
            ..Report::default()
        };
        r.rejected_by_status.insert("503".into(), 100);
        let text = serde_json::to_string(&r).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let obj = value.as_object().unwrap();
        let mut last = 0;
        assert_eq!(STABLE_KEYS.len(), 34);
        for &key in STABLE_KEYS {
            assert!(obj.contains_key(key), "missing key {key}");
            let at = text.find(&format!("\"{key}\":")).unwrap();
            assert!(at >= last, "key {key} out of order");
            last = at;
        }
        assert_eq!(obj["version"], 1);
        assert!(obj["redis_bytes_per_key"].is_null());
        assert_eq!(obj["rejected_by_status"]["503"], 100);
        // Additions come only after `ok`.
        let ok_at = text.find("\"ok\":").unwrap();
        for added in [
            "settlement_completed",
            "failures",
            "mode",
            "verified",
            "settled_vs_target",
            "kept_up",
            "retry",
            "retries",
            "retries_by_cause",
            "abandoned",
            "uncertain_settled",
            "tenant_ids",
            "stopped_by_file",
            "seeded_events",
            "seed_s",
            "timeline",
        ] {
            assert!(text.find(&format!("\"{added}\":")).unwrap() > ok_at, "{added}");
        }
    }

    #[test]
    fn ingest_only_is_ok_without_settlement() {
        let ingest = Report {
            accepted: 10,
            mode: "ingest_only".into(),
            verified: false,
            ..Report::default()
        };
        assert!(ingest.failure_reasons().is_empty());
        assert!(!Report {
            accepted: 0,
            ..ingest.clone()
        }
        .failure_reasons()
        .is_empty());
        // A verified run that did not settle is not ok.
        assert!(!Report {
            verified: true,
            ..ingest.clone()
        }
        .failure_reasons()
        .is_empty());
        let summary = Report { ok: true, ..ingest }.summary();
        assert!(summary.contains("ingest only") && summary.contains("  OK") && !summary.contains("e2e ms"));
    }

    #[test]
    fn ok_requires_complete_settlement_and_no_errors() {
        let good = Report {
            accepted: 10,
            unique_accepted: 10,
            settlement_completed: true,
            verified: true,
            ..Report::default()
        };
        assert!(good.failure_reasons().is_empty());
        for bad in [
            Report {
                settlement_completed: false,
                ..good.clone()
            },
            Report {
                lost: 1,
                ..good.clone()
            },
            Report {
                double_charged: 1,
                ..good.clone()
            },
            Report {
                mismatched_pools: 1,
                ..good.clone()
            },
            Report {
                accepted: 0,
                ..good.clone()
            },
        ] {
            assert!(!bad.failure_reasons().is_empty());
        }
        assert!(Report {
            ok: true,
            ..good.clone()
        }
        .summary()
        .contains("  OK"));
        let failed = Report {
            ok: false,
            failures: vec!["x".into()],
            ..good
        };
        assert!(failed.summary().contains("FAILED: x"));
    }

    #[test]
    fn keeping_up_needs_the_rate_and_the_e2e_p99() {
        let run = |eps: f64, p99: f64| {
            let mut r = Report {
                rate_target: 20_000.0,
                events_per_second: Some(eps),
                e2e_p99_ms: Some(p99),
                verified: true,
                ..Report::default()
            };
            r.judge_keep_up();
            r
        };
        let slow = run(13_697.0, 35_783.0);
        assert_eq!(slow.kept_up, Some(false));
        assert!((slow.settled_vs_target.unwrap() - 0.68485).abs() < 1e-4);
        assert!(slow
            .summary()
            .contains("DID NOT KEEP UP: settled 0.68x of the 20000 ev/s offered (short by 1.46x)"));
        assert_eq!(run(19_500.0, 800.0).kept_up, Some(true));
        assert!(run(19_500.0, 800.0).summary().contains("kept up: settled 0.97x"));
        // Fast enough on average but late: not kept up; on time but short: not kept up.
        assert_eq!(run(19_500.0, 1_500.0).kept_up, Some(false));
        assert_eq!(run(15_000.0, 300.0).kept_up, Some(false));
        let mut ingest = Report {
            rate_target: 50_000.0,
            ..Report::default()
        };
        ingest.judge_keep_up();
        assert_eq!((ingest.settled_vs_target, ingest.kept_up), (None, None));
    }

    #[test]
    fn the_summary_shows_retries_only_with_retry() {
        let plain = Report {
            accepted: 10,
            ..Report::default()
        };
        assert!(!plain.summary().contains("retries"));
        let mut by = BTreeMap::new();
        by.insert("503".to_owned(), 7);
        let retried = Report {
            retry: true,
            retry_max_s: Some(120.0),
            retries: 9,
            retried_requests: 4,
            retries_by_cause: by,
            max_tries: 3,
            abandoned: 100,
            ..plain
        };
        let s = retried.summary();
        assert!(s.contains("retries 9 in 4 requests (most tries 3)"), "{s}");
        assert!(s.contains("given up after 120s: 100 events"), "{s}");
    }

    #[test]
    fn percentiles_are_milliseconds_or_null() {
        assert_eq!(percentiles_ms(&crate::load::new_histogram()), [None; 4]);
        let mut h = crate::load::new_histogram();
        for us in 1..=1000u64 {
            h.record(us * 1000).unwrap(); // 1..=1000 ms
        }
        let [p50, p99, _, max] = percentiles_ms(&h);
        assert!((p50.unwrap() - 500.0).abs() < 1.0);
        assert!((p99.unwrap() - 990.0).abs() < 1.0);
        assert!((max.unwrap() - 1000.0).abs() < 1.0);
    }
}
