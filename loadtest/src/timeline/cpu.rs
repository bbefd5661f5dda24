//! CPU per process from `/proc/<pid>/stat`: `utime + stime` of every process whose `comm` is
//! one of the watched names, summed per name, differenced between two scans and expressed as %
//! of one core (200% is two cores busy).
//!
//! A process is keyed by (pid, start time), so a reused pid is a new process. A process that
//! started between two scans counts with all its ticks; one that exited between them loses its
//! last interval (a crash or a restart shows as a dip, not as a spike).
#![allow(clippy::float_arithmetic)] // percentages of a core

use std::collections::HashMap;
use std::time::Duration;

/// Clock ticks per second of `/proc/<pid>/stat` times: `USER_HZ`, 100 on every Linux the
/// pipeline runs on (x86-64, arm64), whatever the kernel's own `HZ`.
pub const USER_HZ: u64 = 100;

/// The fields of one `/proc/<pid>/stat` line that matter here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    pub comm: String,
    /// `utime + stime`, clock ticks.
    pub ticks: u64,
    /// `starttime`, clock ticks after boot.
    pub start: u64,
}

/// Parses a `stat` line: `pid (comm) state ppid ... utime stime ... starttime ...`. The comm may
/// hold spaces and parentheses, so it runs to the *last* `)`.
pub fn parse_stat(line: &str) -> Option<ProcStat> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    let comm = line.get(open + 1..close)?.to_owned();
    // Fields after the comm, from field 3 (state): utime is field 14, stime 15, starttime 22.
    let rest: Vec<&str> = line.get(close + 1..)?.split_whitespace().collect();
    let field = |n: usize| rest.get(n - 3)?.parse::<u64>().ok();
    Some(ProcStat {
        comm,
        ticks: field(14)? + field(15)?,
        start: field(22)?,
    })
}

/// One scan: (pid, start time) -> (index of the watched name, ticks).
pub type Snapshot = HashMap<(u32, u64), (usize, u64)>;

/// Keeps the processes whose comm is one of `names`.
pub fn snapshot(stats: impl IntoIterator<Item = (u32, ProcStat)>, names: &[String]) -> Snapshot {
    stats
        .into_iter()
        .filter_map(|(pid, s)| {
            let i = names.iter().position(|n| *n == s.comm)?;
            Some(((pid, s.start), (i, s.ticks)))
        })
        .collect()
}

/// Ticks spent per name between two scans.
pub fn delta_ticks(prev: &Snapshot, now: &Snapshot, names: usize) -> Vec<u64> {
    let mut out = vec![0; names];
    for (key, &(name, ticks)) in now {
        let before = prev.get(key).map_or(0, |p| p.1);
        if let Some(slot) = out.get_mut(name) {
            *slot += ticks.saturating_sub(before);
        }
    }
    out
}

/// Ticks over `elapsed` as % of one core.
pub fn percent(ticks: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        return 0.0;
    }
    ticks as f64 * 100.0 / (USER_HZ as f64 * secs)
}

/// Busy ticks of the whole machine from the `cpu` line of `/proc/stat` (user, nice, system,
/// irq, softirq, steal; idle and iowait left out), summed over its CPUs.
pub fn parse_machine_busy(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice, already in user/nice]
    Some([0, 1, 2, 5, 6, 7].iter().filter_map(|&i| f.get(i)).sum())
}

/// The machine's busy ticks now (None without `/proc/stat`).
pub fn machine_busy() -> Option<u64> {
    parse_machine_busy(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// Ticks of everything else on the machine: its busy ticks minus those of the watched
/// processes (never below zero: the two are counted at slightly different moments).
pub fn other_ticks(machine: u64, watched: &[u64]) -> u64 {
    machine.saturating_sub(watched.iter().sum())
}

/// Reads every process's stat (processes that exit meanwhile are skipped); an error only if
/// `/proc` itself cannot be listed.
pub fn scan(names: &[String]) -> std::io::Result<Snapshot> {
    let mut stats = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(line) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some(s) = parse_stat(&line) {
            stats.push((pid, s));
        }
    }
    Ok(snapshot(stats, names))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(pid: u32, comm: &str, utime: u64, stime: u64, start: u64) -> String {
        // 52 fields as the kernel writes them; only 14, 15 and 22 matter.
        let mut f: Vec<String> = vec![pid.to_string(), format!("({comm})"), "S".into()];
        f.extend((4..=52).map(|n| match n {
            14 => utime.to_string(),
            15 => stime.to_string(),
            22 => start.to_string(),
            _ => "0".into(),
        }));
        f.join(" ")
    }

    #[test]
    fn parses_utime_stime_and_start_even_with_odd_comms() {
        let s = parse_stat(&line(42, "ledger-writer", 1200, 34, 99_000)).unwrap();
        assert_eq!((s.comm.as_str(), s.ticks, s.start), ("ledger-writer", 1234, 99_000));
        let s = parse_stat(&line(7, "a) (b", 1, 2, 3)).unwrap();
        assert_eq!((s.comm.as_str(), s.ticks, s.start), ("a) (b", 3, 3));
        assert_eq!(parse_stat("12 (x) S 1 2"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn the_real_stat_of_this_process_parses() {
        let me = std::fs::read_to_string("/proc/self/stat").unwrap();
        let s = parse_stat(&me).unwrap();
        assert!(!s.comm.is_empty() && s.start > 0);
    }

    #[test]
    fn deltas_sum_per_name_and_count_new_and_reused_pids_whole() {
        let names: Vec<String> = ["postgres", "rater"].iter().map(|s| (*s).to_owned()).collect();
        let p = |comm: &str, ticks, start| ProcStat {
            comm: comm.into(),
            ticks,
            start,
        };
        let prev = snapshot(
            vec![
                (10, p("postgres", 100, 1)),
                (11, p("postgres", 50, 1)),
                (20, p("rater", 300, 2)),
                (30, p("bash", 9, 3)),      // not watched
                (40, p("postgres", 70, 4)), // exits before the next scan
            ],
            &names,
        );
        assert_eq!(prev.len(), 4);
        let now = snapshot(
            vec![
                (10, p("postgres", 130, 1)), // +30
                (11, p("postgres", 55, 1)),  // +5
                (12, p("postgres", 8, 5)),   // a new backend: +8
                (20, p("rater", 310, 9)),    // pid reused by a restarted rater: +310
                (30, p("bash", 99, 3)),
            ],
            &names,
        );
        assert_eq!(delta_ticks(&prev, &now, names.len()), [43, 310]);
        assert_eq!(delta_ticks(&now, &now, names.len()), [0, 0]);
    }

    #[test]
    fn machine_busy_leaves_idle_and_iowait_out() {
        let stat = "cpu  100 2 30 5000 40 6 7 8 9 10\ncpu0 50 1 15 2500 20 3 3 4 0 0\nintr 1 2\n";
        assert_eq!(parse_machine_busy(stat), Some(100 + 2 + 30 + 6 + 7 + 8));
        assert_eq!(parse_machine_busy("cpu0 1 2 3\n"), None);
        assert!(machine_busy().is_some_and(|b| b > 0));
        assert_eq!(other_ticks(150, &[40, 60]), 50);
        assert_eq!(other_ticks(90, &[40, 60]), 0);
    }

    #[test]
    fn percent_of_one_core() {
        assert_eq!(percent(100, Duration::from_secs(1)), 100.0);
        assert_eq!(percent(150, Duration::from_secs(1)), 150.0);
        assert_eq!(percent(50, Duration::from_secs(2)), 25.0);
        assert_eq!(percent(125, Duration::from_millis(2500)), 50.0);
        assert_eq!(percent(10, Duration::ZERO), 0.0);
    }
}
