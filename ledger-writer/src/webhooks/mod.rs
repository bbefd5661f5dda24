//! Webhooks from the ledger-writer: the outbox writer (called inside each settle transaction,
//! so a message exists exactly when the ledger rows that caused it do) and the sender (a task
//! beside the settle loop, with its own bounded concurrency, so slow receivers never hold up
//! settlement).

pub mod outbox;
pub mod send;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// The delivery settings (flags or env).
#[derive(clap::Args, Debug, Clone)]
pub struct Config {
    /// Delays before each retry of a failed delivery, comma separated (ms, s, m, h); after the
    /// last one fails the message is marked failed.
    #[arg(long = "webhook-retry-schedule", env = "WEBHOOK_RETRY_SCHEDULE",
          default_value = "5s,5m,30m,2h,5h,10h,10h", value_parser = parse_schedule)]
    pub retry_schedule: Schedule,
    /// How long a receiver has to answer 2xx, in milliseconds.
    #[arg(long = "webhook-timeout-ms", env = "WEBHOOK_TIMEOUT_MS", default_value_t = 15_000)]
    pub timeout_ms: u64,
    /// Deliveries in flight at once (separate from the settle path's connections and tasks).
    #[arg(long = "webhook-concurrency", env = "WEBHOOK_CONCURRENCY", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub concurrency: u32,
    /// Allow endpoints whose addresses are private, loopback or link-local (local development
    /// and tests only).
    #[arg(long = "webhook-allow-private", env = "WEBHOOK_ALLOW_PRIVATE")]
    pub allow_private: bool,
    /// How often an idle sender looks for due deliveries, in milliseconds.
    #[arg(long = "webhook-poll-ms", env = "WEBHOOK_POLL_MS", default_value_t = 250)]
    pub poll_ms: u64,
    /// Denied and unpriced events of one pool are reported in one credits.event.rejected
    /// message per window of this many seconds.
    #[arg(long = "webhook-rejected-window-s", env = "WEBHOOK_REJECTED_WINDOW_S",
          default_value_t = DEFAULT_REJECTED_WINDOW_S,
          value_parser = clap::value_parser!(u32).range(1..=3600))]
    pub rejected_window_s: u32,
    /// Connections of the sender's own Postgres pool.
    #[arg(
        long = "webhook-database-connections",
        env = "WEBHOOK_DATABASE_CONNECTIONS",
        default_value_t = 4
    )]
    pub database_connections: u32,
    /// Deliveries in flight to one endpoint at once, so a few hanging receivers cannot hold
    /// every slot while healthy endpoints wait.
    #[arg(long = "webhook-endpoint-concurrency", env = "WEBHOOK_ENDPOINT_CONCURRENCY", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub endpoint_concurrency: u32,
    /// Deliveries started per second while settlement is busy (settling 50% of its time or more):
    /// the sender yields the machine to the ledger and catches up when the backlog is gone.
    /// 0 turns the yielding off.
    #[arg(long = "webhook-busy-rate", env = "WEBHOOK_BUSY_RATE", default_value_t = 50)]
    pub busy_rate: u32,
    /// Yielding stops while the oldest pending delivery is older than this many seconds, so a
    /// steadily busy settlement delays webhooks by about this much, never without bound.
    #[arg(long = "webhook-max-yield-s", env = "WEBHOOK_MAX_YIELD_S", default_value_t = 60)]
    pub max_yield_s: u64,
    /// Nice value of the sender's thread (0-19; Linux): under CPU contention settlement runs
    /// first and deliveries catch up when it eases. 0 = the priority of the rest.
    #[arg(long = "webhook-nice", env = "WEBHOOK_NICE", default_value_t = 10,
          value_parser = clap::value_parser!(i32).range(0..=19))]
    pub nice: i32,
}

/// The default of [`Config::rejected_window_s`].
pub const DEFAULT_REJECTED_WINDOW_S: u32 = 60;

/// Retry delays, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule(pub Vec<Duration>);

pub fn parse_schedule(s: &str) -> Result<Schedule, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let split = part.find(|c: char| !c.is_ascii_digit()).unwrap_or(part.len());
        let (n, unit) = part.split_at(split);
        let n: u64 = n.parse().map_err(|_| format!("{part}: expected a number and a unit"))?;
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" | "" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            _ => return Err(format!("{part}: unit must be ms, s, m or h")),
        };
        out.push(d);
    }
    if out.len() > 50 {
        return Err("at most 50 retries".into());
    }
    Ok(Schedule(out))
}

/// Settlement's duty cycle, measured by the settle loop over windows of [`DUTY_WINDOW`] (the
/// share of the time spent settling rather than waiting for messages) and read by the webhook
/// sender, which yields while settlement is busy. Made once at start-up and handed to both:
/// the settle loop writes it through a [`DutyMeter`], the sender reads [`SettleDuty::busy`].
#[derive(Clone, Debug)]
pub struct SettleDuty(Arc<DutySignal>);

#[derive(Debug)]
struct DutySignal {
    /// What the millisecond stamps below count from.
    epoch: Instant,
    /// The last closed window's duty cycle, in permille.
    permille: AtomicU64,
    /// When that window closed (milliseconds since `epoch`); 0 = none yet.
    at_ms: AtomicU64,
    /// When the batch being settled now began (milliseconds since `epoch`); 0 = none.
    batch_since_ms: AtomicU64,
}

const DUTY_WINDOW: Duration = Duration::from_millis(250);
/// A duty cycle at or above this means settlement is the bottleneck: the sender yields.
const BUSY_PERMILLE: u64 = 500;
/// A measurement older than this is stale (the loop is waiting for messages: not busy).
const DUTY_FRESH: Duration = Duration::from_secs(1);

impl Default for SettleDuty {
    fn default() -> Self {
        SettleDuty(Arc::new(DutySignal {
            epoch: Instant::now(),
            permille: AtomicU64::new(0),
            at_ms: AtomicU64::new(0),
            batch_since_ms: AtomicU64::new(0),
        }))
    }
}

impl SettleDuty {
    /// Never 0 (0 marks "none" in the stamps).
    fn now_ms(&self) -> u64 {
        (self.0.epoch.elapsed().as_millis() as u64).max(1)
    }

    /// The settle loop's side: measures windows and publishes them here.
    pub fn meter(&self) -> DutyMeter {
        DutyMeter {
            signal: self.clone(),
            start: Instant::now(),
            busy: Duration::ZERO,
        }
    }

    /// Whether settlement spent at least half of its last measured window settling (within the
    /// last second), or has been settling one batch for longer than a window.
    pub fn busy(&self) -> bool {
        let now = self.now_ms();
        let since = self.0.batch_since_ms.load(Ordering::Relaxed);
        if since != 0 && now >= since + DUTY_WINDOW.as_millis() as u64 {
            return true;
        }
        let at = self.0.at_ms.load(Ordering::Relaxed);
        at != 0 && now <= at + DUTY_FRESH.as_millis() as u64 && self.0.permille.load(Ordering::Relaxed) >= BUSY_PERMILLE
    }
}

/// Kept by the settle loop: adds the time each batch took to settle and publishes each closed
/// window's duty cycle to its [`SettleDuty`].
pub struct DutyMeter {
    signal: SettleDuty,
    start: Instant,
    busy: Duration,
}

impl DutyMeter {
    /// A batch starts settling.
    pub fn begin(&mut self) {
        let s = &self.signal;
        s.0.batch_since_ms.store(s.now_ms(), Ordering::Relaxed);
    }

    /// The batch begun last took `settling` to settle.
    pub fn record(&mut self, settling: Duration) {
        let s = &self.signal;
        s.0.batch_since_ms.store(0, Ordering::Relaxed);
        self.busy += settling;
        let elapsed = self.start.elapsed();
        if elapsed >= DUTY_WINDOW {
            let permille = (self.busy.as_micros() * 1000 / elapsed.as_micros().max(1)).min(1000) as u64;
            s.0.permille.store(permille, Ordering::Relaxed);
            s.0.at_ms.store(s.now_ms(), Ordering::Relaxed);
            self.start = Instant::now();
            self.busy = Duration::ZERO;
        }
    }
}

/// Start the sender beside the settle loop, on a thread of its own at a lower CPU priority
/// (`nice`) with a single-threaded runtime: it competes with settlement for neither the
/// runtime's workers nor, under contention, the cores. It has its own small Postgres pool, so
/// waiting receivers never take connections the settle path needs. Returns once the sender
/// is connected (or failed to), with its thread: join it after `shutdown` to let it drain.
pub async fn spawn(
    config: &Config,
    db: &shared::config::DbArgs,
    duty: SettleDuty,
    shutdown: CancellationToken,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    crate::metric::describe_webhooks();
    let (config, db) = (config.clone(), db.clone());
    let (started, ready) = tokio::sync::oneshot::channel::<anyhow::Result<()>>();
    let thread = std::thread::Builder::new()
        .name("webhook-sender".into())
        .spawn(move || {
            lower_priority(config.nice);
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = started.send(Err(e.into()));
                    return;
                }
            };
            rt.block_on(async move {
                let pool = shared::db::connect(&shared::config::DbArgs {
                    database_url: db.database_url.clone(),
                    database_max_connections: config.database_connections.max(2),
                })
                .await;
                let sender = pool
                    .map_err(anyhow::Error::from)
                    .and_then(|pool| send::Sender::new(pool, config, duty));
                match sender {
                    Ok(sender) => {
                        let _ = started.send(Ok(()));
                        sender.run(shutdown).await;
                    }
                    Err(e) => {
                        let _ = started.send(Err(e));
                    }
                }
            });
        })?;
    ready
        .await
        .map_err(|_| anyhow::anyhow!("webhook sender thread ended at start-up"))??;
    Ok(thread)
}

/// Lower the calling thread's CPU priority (on Linux the nice value is per thread; threads it
/// starts inherit it).
fn lower_priority(nice: i32) {
    if nice == 0 {
        return;
    }
    // who = None: on Linux, the calling thread.
    if let Err(e) = rustix::process::setpriority_process(None, nice) {
        tracing::warn!(nice, error = %e, "webhook sender priority not lowered");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settlement_is_busy_while_it_settles_most_of_the_time() {
        let duty = SettleDuty::default();
        assert!(!duty.busy(), "nothing measured yet");
        // A small share of a window settling: not busy.
        let mut meter = duty.meter();
        std::thread::sleep(DUTY_WINDOW);
        meter.begin();
        meter.record(Duration::from_millis(10));
        assert!(!duty.busy());
        // Settling all along: busy.
        let mut meter = duty.meter();
        std::thread::sleep(DUTY_WINDOW);
        meter.begin();
        meter.record(meter.start.elapsed());
        assert!(duty.busy());
        // Then no window closes for a second (the loop waits for messages): not busy.
        std::thread::sleep(DUTY_FRESH + Duration::from_millis(20));
        assert!(!duty.busy(), "a stale measurement does not count");
        // One long batch in progress is busy before it ends.
        meter.begin();
        assert!(!duty.busy(), "a batch that has only begun");
        std::thread::sleep(DUTY_WINDOW + Duration::from_millis(20));
        assert!(duty.busy(), "a batch in progress for longer than a window");
        meter.record(Duration::from_millis(10));
    }

    #[test]
    fn each_duty_signal_is_its_own() {
        // Two services in one process (the tests start several) do not see each other's load.
        let (a, b) = (SettleDuty::default(), SettleDuty::default());
        let mut meter = a.meter();
        std::thread::sleep(DUTY_WINDOW);
        meter.begin();
        meter.record(meter.start.elapsed());
        assert!(a.busy());
        assert!(!b.busy());
        // A clone is the same signal (the sender's copy of the settle loop's).
        assert!(a.clone().busy());
    }

    #[test]
    fn schedules_parse() {
        let s = parse_schedule("5s,5m,30m,2h,5h,10h,10h").unwrap();
        assert_eq!(s.0.len(), 7);
        assert_eq!(s.0[1], Duration::from_secs(300));
        assert_eq!(s.0[6], Duration::from_secs(36_000));
        assert_eq!(
            parse_schedule("100ms, 1").unwrap().0,
            [Duration::from_millis(100), Duration::from_secs(1)]
        );
        assert_eq!(parse_schedule("").unwrap().0, []);
        assert!(parse_schedule("5d").is_err());
        assert!(parse_schedule("fast").is_err());
    }
}
