//! The once-a-second sampler that runs beside the load: one thread scans `/proc` for CPU per
//! process, another asks the broker for consumer lag (its calls block, and a broker that is down
//! must not delay the CPU samples). Both tick on whole seconds from their start, stop within
//! 50 ms of [`Sampler::stop`] (a lag read in flight finishes first, at most one timeout) and hand
//! back what they saw. A source that is absent (no `/proc`, no broker given, a broker that never
//! answers) leaves its samples empty; it never fails the run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::Utc;

use super::cpu;
use super::lag::{GroupTopic, LagReader};
use super::{CpuSample, LagSample};

const TICK: Duration = Duration::from_secs(1);
/// Per broker call; a sample whose read fails is left empty for that second.
const LAG_TIMEOUT: Duration = Duration::from_millis(800);

/// What to sample.
#[derive(Debug, Clone)]
pub struct SamplerConfig {
    /// Bootstrap servers; None: no lag samples.
    pub brokers: Option<String>,
    pub groups: Vec<GroupTopic>,
    /// `comm` names whose CPU is summed (see [`super::PROCESSES`]); each sample also carries
    /// the rest of the machine after them ([`super::OTHER`]).
    pub processes: Vec<String>,
}

/// Everything sampled.
#[derive(Debug, Default)]
pub struct Samples {
    pub cpu: Vec<CpuSample>,
    pub lag: Vec<LagSample>,
}

pub struct Sampler {
    stop: Arc<AtomicBool>,
    cpu: JoinHandle<Vec<CpuSample>>,
    lag: Option<JoinHandle<Vec<LagSample>>>,
}

impl Sampler {
    /// Starts sampling now.
    pub fn start(cfg: &SamplerConfig) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let cpu = {
            let (stop, names) = (stop.clone(), cfg.processes.clone());
            std::thread::spawn(move || sample_cpu(&stop, &names))
        };
        let lag = cfg.brokers.clone().map(|brokers| {
            let (stop, groups) = (stop.clone(), cfg.groups.clone());
            std::thread::spawn(move || sample_lag(&stop, &brokers, &groups))
        });
        Sampler { stop, cpu, lag }
    }

    /// Stops both threads and returns their samples.
    pub fn stop(self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        let cpu = self.cpu.join().unwrap_or_default();
        let lag = self.lag.map(|h| h.join().unwrap_or_default()).unwrap_or_default();
        Samples { cpu, lag }
    }
}

/// Sleeps until tick `k` (whole seconds from `t0`); false once `stop` is set.
fn wait_tick(stop: &AtomicBool, t0: Instant, k: u32) -> bool {
    let due = t0 + TICK * k;
    loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        let now = Instant::now();
        if now >= due {
            return true;
        }
        std::thread::sleep((due - now).min(Duration::from_millis(50)));
    }
}

fn sample_cpu(stop: &AtomicBool, names: &[String]) -> Vec<CpuSample> {
    let mut out = Vec::new();
    let mut prev = match cpu::scan(names) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("timeline: CPU not sampled (cannot read /proc: {e})");
            return out;
        }
    };
    let mut prev_busy = cpu::machine_busy();
    let (mut prev_at, mut prev_i) = (Utc::now(), Instant::now());
    let t0 = prev_i;
    for k in 1.. {
        if !wait_tick(stop, t0, k) {
            break;
        }
        let Ok(now) = cpu::scan(names) else { continue };
        let busy = cpu::machine_busy();
        let (at, i) = (Utc::now(), Instant::now());
        let elapsed = i - prev_i;
        let mut ticks = cpu::delta_ticks(&prev, &now, names.len());
        // The rest of the machine last: a run on a shared machine says so.
        let other = busy
            .zip(prev_busy)
            .map(|(b, p)| cpu::other_ticks(b.saturating_sub(p), &ticks));
        ticks.extend(other);
        out.push(CpuSample {
            from: prev_at,
            to: at,
            pct: ticks.into_iter().map(|t| cpu::percent(t, elapsed)).collect(),
        });
        (prev, prev_at, prev_i, prev_busy) = (now, at, i, busy);
    }
    out
}

fn sample_lag(stop: &AtomicBool, brokers: &str, groups: &[GroupTopic]) -> Vec<LagSample> {
    let mut out = Vec::new();
    let mut readers: Vec<Option<LagReader>> = groups
        .iter()
        .map(|g| match LagReader::new(brokers, g, LAG_TIMEOUT) {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("timeline: lag of group {} not sampled: {e:#}", g.group);
                None
            }
        })
        .collect();
    let mut failed = vec![false; groups.len()];
    let t0 = Instant::now();
    for k in 0.. {
        if !wait_tick(stop, t0, k) {
            break;
        }
        let lag = readers
            .iter_mut()
            .zip(groups)
            .zip(failed.iter_mut())
            .map(|((r, g), failed)| {
                let r = r.as_mut()?;
                match r.read() {
                    Ok(l) => Some(l),
                    Err(e) => {
                        // Once per group: a broker down during a fault would repeat it every second.
                        if !std::mem::replace(failed, true) {
                            eprintln!(
                                "timeline: lag of group {} on {} not read (left empty while it fails): {e:#}",
                                g.group, g.topic
                            );
                        }
                        None
                    }
                }
            })
            .collect();
        out.push(LagSample { at: Utc::now(), lag });
    }
    out
}
