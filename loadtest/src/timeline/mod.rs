//! The per-second timeline of a run: what was offered, accepted and settled each second, how
//! far each consumer group lagged, how long the events settled that second took end to end, and
//! how busy each process of the pipeline was.
//!
//! Four sources, all keyed by wall-clock time and put on one axis, seconds since the first
//! scheduled batch (`started_at` of the report):
//! - the load itself: offered per second of the schedule, accepted/rejected per second of the
//!   answer ([`bump`], filled by `load`);
//! - [`sampler`]: consumer lag per group ([`LagSample`], the last one of a second counts) and
//!   CPU per process over each interval ([`CpuSample`], bucketed by the interval's middle);
//! - Postgres after settlement ([`settled`]): one row per settled event, bucketed by `settled_at`,
//!   with the p50/p99 of `settled_at - accepted_at` of the events settled in that second.
//!
//! Everything here is pure ([`assemble`], [`Timeline::to_csv`]); reading the sources and drawing
//! the chart ([`chart`]) are the effects around it.
#![allow(clippy::float_arithmetic)] // rates, percentages and latencies; money is Decimal

pub mod chart;
pub mod cpu;
pub mod lag;
pub mod sampler;
pub mod settled;

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

/// Processes whose CPU is sampled, by `comm` (every process of a name is summed: all Postgres
/// backends, both ledger-writers).
pub const PROCESSES: [&str; 7] = [
    "ingest",
    "rater",
    "ledger-writer",
    "nisshi",
    "postgres",
    "redis-server",
    "loadtest",
];

/// The CPU column of everything else on the machine (busy ticks of `/proc/stat` minus the
/// watched processes): other users of a shared machine, the kernel's own threads.
pub const OTHER: &str = "other";

/// The CPU columns: the watched processes, then [`OTHER`].
pub fn cpu_columns() -> Vec<String> {
    PROCESSES
        .iter()
        .chain(std::iter::once(&OTHER))
        .map(|p| (*p).to_owned())
        .collect()
}

/// Adds `n` to second `second` of a per-second series, growing it as needed.
pub fn bump(series: &mut Vec<u64>, second: u64, n: u64) {
    let i = usize::try_from(second).unwrap_or(usize::MAX);
    if i >= series.len() {
        series.resize(i + 1, 0);
    }
    series[i] += n;
}

/// The second (since `start`) that `at` falls in; None before `start`.
pub fn second_of(start: DateTime<Utc>, at: DateTime<Utc>) -> Option<u64> {
    let us = (at - start).num_microseconds()?;
    u64::try_from(us).ok().map(|us| us / 1_000_000)
}

/// The nearest-rank percentile (`q` in (0, 1]) of sorted values; None when empty.
pub fn percentile(sorted: &[i64], q: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Per-second counts of the load phase (index = second since the start).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadSeries {
    /// Events whose batch was due that second (sent or dropped by the generator).
    pub offered: Vec<u64>,
    /// Events whose request was answered 202 that second (the last try's answer).
    pub accepted: Vec<u64>,
    /// Events whose request finally failed that second.
    pub rejected: Vec<u64>,
}

/// Consumer lag per group at one moment: messages between the group's committed offset and
/// the high watermark, summed over the partitions (None: not measured then).
#[derive(Debug, Clone, PartialEq)]
pub struct LagSample {
    pub at: DateTime<Utc>,
    /// In the order of [`Timeline::groups`].
    pub lag: Vec<Option<i64>>,
}

/// CPU per process over one interval, in % of one core.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuSample {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// In the order of [`cpu_columns`]: [`PROCESSES`], then [`OTHER`] (absent without
    /// `/proc/stat`).
    pub pct: Vec<f64>,
}

/// One settled event: when it settled and how long after acceptance, microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settled {
    pub settled_at: DateTime<Utc>,
    pub e2e_us: i64,
}

/// One second of the run.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub t: u64,
    pub offered: u64,
    pub accepted: u64,
    pub rejected: u64,
    /// None when settlement was not read (`--ingest-only`).
    pub settled: Option<u64>,
    pub e2e_p50_ms: Option<f64>,
    pub e2e_p99_ms: Option<f64>,
    pub lag: Vec<Option<i64>>,
    pub cpu: Vec<Option<f64>>,
}

/// The assembled timeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Timeline {
    /// Consumer groups, `group` names as given to the sampler (`rater`, `ledger-writer`).
    pub groups: Vec<String>,
    pub processes: Vec<String>,
    /// Seconds from the start at which the load stopped sending.
    pub load_end_s: f64,
    pub rows: Vec<Row>,
}

/// Everything [`assemble`] puts together.
pub struct Sources<'a> {
    pub start: DateTime<Utc>,
    /// Rows after this moment are left out (the end of the settlement wait); None: keep all.
    pub end: Option<DateTime<Utc>>,
    pub load_end_s: f64,
    pub load: &'a LoadSeries,
    /// None when settlement was not read.
    pub settled: Option<&'a [Settled]>,
    pub groups: &'a [String],
    pub lags: &'a [LagSample],
    pub processes: &'a [String],
    pub cpu: &'a [CpuSample],
}

/// Puts the sources on one per-second axis, from second 0 to the last second any source has
/// (cut at `end`).
pub fn assemble(s: &Sources<'_>) -> Timeline {
    let bucket = |at: DateTime<Utc>| {
        if s.end.is_some_and(|end| at > end) {
            return None;
        }
        second_of(s.start, at).and_then(|t| usize::try_from(t).ok())
    };

    // Settled events per second, with their latencies.
    let mut e2e: Vec<Vec<i64>> = Vec::new();
    for ev in s.settled.unwrap_or_default() {
        if let Some(i) = bucket(ev.settled_at) {
            if i >= e2e.len() {
                e2e.resize_with(i + 1, Vec::new);
            }
            e2e[i].push(ev.e2e_us);
        }
    }
    // The last lag sample of each second.
    let mut lag: Vec<Option<&LagSample>> = Vec::new();
    for l in s.lags {
        if let Some(i) = bucket(l.at) {
            if i >= lag.len() {
                lag.resize(i + 1, None);
            }
            if lag[i].is_none_or(|prev| prev.at <= l.at) {
                lag[i] = Some(l);
            }
        }
    }
    // CPU intervals by their middle; two in one second (a late tick) are averaged.
    let mut cpu: Vec<Vec<&CpuSample>> = Vec::new();
    for c in s.cpu {
        if let Some(i) = bucket(c.from + (c.to - c.from) / 2) {
            if i >= cpu.len() {
                cpu.resize_with(i + 1, Vec::new);
            }
            cpu[i].push(c);
        }
    }

    let load_len = [&s.load.offered, &s.load.accepted, &s.load.rejected]
        .iter()
        .map(|v| v.len())
        .max()
        .unwrap_or(0);
    let end_len = s.end.and_then(|end| second_of(s.start, end)).map(|t| t as usize + 1);
    let len = [load_len, e2e.len(), lag.len(), cpu.len()]
        .into_iter()
        .max()
        .unwrap_or(0)
        .min(end_len.unwrap_or(usize::MAX));
    let at = |v: &Vec<u64>, i: usize| v.get(i).copied().unwrap_or(0);

    let rows = (0..len)
        .map(|i| {
            let mut lat = e2e.get(i).cloned().unwrap_or_default();
            lat.sort_unstable();
            let ms = |v: Option<i64>| v.map(|us| us as f64 / 1000.0);
            Row {
                t: i as u64,
                offered: at(&s.load.offered, i),
                accepted: at(&s.load.accepted, i),
                rejected: at(&s.load.rejected, i),
                settled: s.settled.map(|_| lat.len() as u64),
                e2e_p50_ms: ms(percentile(&lat, 0.50)),
                e2e_p99_ms: ms(percentile(&lat, 0.99)),
                lag: match lag.get(i).copied().flatten() {
                    Some(l) => (0..s.groups.len()).map(|g| l.lag.get(g).copied().flatten()).collect(),
                    None => vec![None; s.groups.len()],
                },
                cpu: (0..s.processes.len())
                    .map(|p| {
                        let v: Vec<f64> = cpu
                            .get(i)
                            .into_iter()
                            .flatten()
                            .filter_map(|c| c.pct.get(p).copied())
                            .collect();
                        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
                    })
                    .collect(),
            }
        })
        .collect();
    Timeline {
        groups: s.groups.to_vec(),
        processes: s.processes.to_vec(),
        load_end_s: s.load_end_s,
        rows,
    }
}

impl Timeline {
    /// The CSV header: fixed columns, then `lag_<group>` per group and `cpu_<process>_pct` per
    /// process.
    pub fn csv_header(&self) -> Vec<String> {
        let mut h: Vec<String> = [
            "t_s",
            "offered",
            "accepted",
            "rejected",
            "settled",
            "e2e_p50_ms",
            "e2e_p99_ms",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        h.extend(self.groups.iter().map(|g| format!("lag_{g}")));
        h.extend(self.processes.iter().map(|p| format!("cpu_{p}_pct")));
        h
    }

    /// The whole CSV; an empty cell is a value that was not measured.
    pub fn to_csv(&self) -> String {
        fn opt<T: ToString>(v: Option<T>) -> String {
            v.map(|v| v.to_string()).unwrap_or_default()
        }
        let f1 = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_default();
        let mut out = self.csv_header().join(",");
        out.push('\n');
        for r in &self.rows {
            let mut cells = vec![
                r.t.to_string(),
                r.offered.to_string(),
                r.accepted.to_string(),
                r.rejected.to_string(),
                opt(r.settled),
                f1(r.e2e_p50_ms),
                f1(r.e2e_p99_ms),
            ];
            cells.extend(r.lag.iter().map(|l| opt(*l)));
            cells.extend(r.cpu.iter().map(|c| f1(*c)));
            out.push_str(&cells.join(","));
            out.push('\n');
        }
        out
    }
}

/// `<dir>/<stem>.timeline.csv` next to the JSON report `<dir>/<stem>.json`.
pub fn default_path(report: &Path) -> PathBuf {
    let stem = report
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    report.with_file_name(format!("{stem}.timeline.csv"))
}

/// The chart's path: the CSV's with `.svg` for its extension.
pub fn svg_path(csv: &Path) -> PathBuf {
    csv.with_extension("svg")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_700_000_000_000 + ms).unwrap()
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn bump_grows_the_series_and_adds() {
        let mut v = Vec::new();
        bump(&mut v, 2, 5);
        bump(&mut v, 0, 1);
        bump(&mut v, 2, 3);
        assert_eq!(v, [1, 0, 8]);
    }

    #[test]
    fn seconds_are_floored_and_nothing_before_the_start_counts() {
        assert_eq!(second_of(t(0), t(0)), Some(0));
        assert_eq!(second_of(t(0), t(999)), Some(0));
        assert_eq!(second_of(t(0), t(1000)), Some(1));
        assert_eq!(second_of(t(0), t(61_500)), Some(61));
        assert_eq!(second_of(t(0), t(-1)), None);
    }

    #[test]
    fn nearest_rank_percentiles() {
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[7], 0.99), Some(7));
        let v: Vec<i64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.50), Some(50));
        assert_eq!(percentile(&v, 0.99), Some(99));
        assert_eq!(percentile(&v, 1.0), Some(100));
        // Two values: p50 is the lower one, p99 the upper one.
        assert_eq!(percentile(&[10, 20], 0.5), Some(10));
        assert_eq!(percentile(&[10, 20], 0.99), Some(20));
    }

    fn sources<'a>(
        load: &'a LoadSeries,
        settled: Option<&'a [Settled]>,
        groups: &'a [String],
        lags: &'a [LagSample],
        procs: &'a [String],
        cpu: &'a [CpuSample],
    ) -> Sources<'a> {
        Sources {
            start: t(0),
            end: None,
            load_end_s: 2.0,
            load,
            settled,
            groups,
            lags,
            processes: procs,
            cpu,
        }
    }

    #[test]
    fn settled_events_are_bucketed_by_settled_at_with_percentiles_per_second() {
        let load = LoadSeries {
            offered: vec![100, 100],
            accepted: vec![90, 100],
            rejected: vec![10],
        };
        // Second 0: 1..=100 ms; second 2: one event of 5 s (second 1 settles nothing).
        let mut settled: Vec<Settled> = (1..=100)
            .map(|ms| Settled {
                settled_at: t(10 * ms),
                e2e_us: ms * 1000,
            })
            .collect();
        settled.push(Settled {
            settled_at: t(2_000),
            e2e_us: 5_000_000,
        });
        let (g, p) = (names(&[]), names(&[]));
        let tl = assemble(&sources(&load, Some(&settled), &g, &[], &p, &[]));
        assert_eq!(tl.rows.len(), 3);
        let r0 = &tl.rows[0];
        assert_eq!((r0.offered, r0.accepted, r0.rejected), (100, 90, 10));
        // settled_at 10 ms .. 1000 ms: the last one (1000 ms) is already second 1.
        assert_eq!(r0.settled, Some(99));
        assert_eq!(r0.e2e_p50_ms, Some(50.0));
        assert_eq!(r0.e2e_p99_ms, Some(99.0));
        let r1 = &tl.rows[1];
        assert_eq!((r1.settled, r1.e2e_p50_ms), (Some(1), Some(100.0)));
        let r2 = &tl.rows[2];
        assert_eq!((r2.offered, r2.accepted, r2.settled), (0, 0, Some(1)));
        assert_eq!(r2.e2e_p99_ms, Some(5000.0));
        // Without settlement, the settled cells are unknown, not zero.
        let tl = assemble(&sources(&load, None, &g, &[], &p, &[]));
        assert_eq!(tl.rows.len(), 2);
        assert!(tl.rows.iter().all(|r| r.settled.is_none() && r.e2e_p50_ms.is_none()));
    }

    #[test]
    fn lag_keeps_the_last_sample_of_a_second_and_cpu_averages_by_interval_middle() {
        let load = LoadSeries::default();
        let groups = names(&["rater", "ledger-writer"]);
        let lags = [
            LagSample {
                at: t(1_900),
                lag: vec![Some(500), Some(7)],
            },
            LagSample {
                at: t(1_100),
                lag: vec![Some(100), None],
            },
            LagSample {
                at: t(3_050),
                lag: vec![None, Some(9)],
            },
        ];
        let procs = names(&["ingest", "rater"]);
        let cpu = [
            // [0.0, 1.0] -> second 0
            CpuSample {
                from: t(0),
                to: t(1_000),
                pct: vec![50.0, 10.0],
            },
            // [1.0, 2.2] middle 1.6 -> second 1, and [1.2, 1.9] too: averaged
            CpuSample {
                from: t(1_000),
                to: t(2_200),
                pct: vec![100.0, 0.0],
            },
            CpuSample {
                from: t(1_200),
                to: t(1_900),
                pct: vec![50.0, 20.0],
            },
        ];
        let tl = assemble(&sources(&load, None, &groups, &lags, &procs, &cpu));
        assert_eq!(tl.rows.len(), 4);
        assert_eq!(tl.rows[0].lag, [None, None]);
        assert_eq!(tl.rows[1].lag, [Some(500), Some(7)]);
        assert_eq!(tl.rows[2].lag, [None, None]);
        assert_eq!(tl.rows[3].lag, [None, Some(9)]);
        assert_eq!(tl.rows[0].cpu, [Some(50.0), Some(10.0)]);
        assert_eq!(tl.rows[1].cpu, [Some(75.0), Some(10.0)]);
        assert_eq!(tl.rows[2].cpu, [None, None]);
    }

    #[test]
    fn rows_stop_at_the_end_of_the_wait() {
        let load = LoadSeries {
            offered: vec![1; 5],
            ..LoadSeries::default()
        };
        let procs = names(&["x"]);
        let cpu: Vec<CpuSample> = (0..10)
            .map(|s| CpuSample {
                from: t(s * 1000),
                to: t(s * 1000 + 1000),
                pct: vec![1.0],
            })
            .collect();
        let mut s = sources(&load, None, &[], &[], &procs, &cpu);
        s.end = Some(t(6_500));
        let tl = assemble(&s);
        assert_eq!(tl.rows.len(), 7);
        assert_eq!(tl.rows.last().unwrap().cpu, [Some(1.0)]);
    }

    #[test]
    fn csv_has_one_column_per_group_and_process_and_blank_unknowns() {
        let load = LoadSeries {
            offered: vec![200, 200],
            accepted: vec![200, 100],
            rejected: vec![0, 100],
        };
        let groups = names(&["rater", "ledger-writer"]);
        let procs = names(&["ingest", "postgres"]);
        let lags = [LagSample {
            at: t(500),
            lag: vec![Some(12), None],
        }];
        let cpu = [CpuSample {
            from: t(1_000),
            to: t(2_000),
            pct: vec![33.333, 150.0],
        }];
        let settled = [Settled {
            settled_at: t(1_250),
            e2e_us: 1_234_567,
        }];
        let tl = assemble(&sources(&load, Some(&settled), &groups, &lags, &procs, &cpu));
        let csv = tl.to_csv();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines[0],
            "t_s,offered,accepted,rejected,settled,e2e_p50_ms,e2e_p99_ms,lag_rater,lag_ledger-writer,cpu_ingest_pct,cpu_postgres_pct"
        );
        assert_eq!(lines[1], "0,200,200,0,0,,,12,,,");
        assert_eq!(lines[2], "1,200,100,100,1,1234.6,1234.6,,,33.3,150.0");
        assert_eq!(lines.len(), 3);
        assert!(lines.iter().all(|l| l.split(',').count() == tl.csv_header().len()));
    }

    #[test]
    fn files_go_next_to_the_report() {
        let p = default_path(Path::new("/tmp/run/loadtest-report.json"));
        assert_eq!(p, Path::new("/tmp/run/loadtest-report.timeline.csv"));
        assert_eq!(svg_path(&p), Path::new("/tmp/run/loadtest-report.timeline.svg"));
        assert_eq!(default_path(Path::new("r")), Path::new("r.timeline.csv"));
    }
}
