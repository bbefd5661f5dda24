//! Webhooks from the ledger-writer: the outbox writer (called inside each settle transaction,
//! so a message exists exactly when the ledger rows that caused it do) and the sender (a task
//! beside the settle loop, with its own bounded concurrency, so slow receivers never hold up
//! settlement).

pub mod outbox;
pub mod send;

use std::sync::OnceLock;
use std::time::Duration;

use sqlx::PgPool;
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
    #[arg(long = "webhook-rejected-window-s", env = "WEBHOOK_REJECTED_WINDOW_S", default_value_t = 60,
          value_parser = clap::value_parser!(u32).range(1..=3600))]
    pub rejected_window_s: u32,
    /// Connections of the sender's own Postgres pool.
    #[arg(
        long = "webhook-database-connections",
        env = "WEBHOOK_DATABASE_CONNECTIONS",
        default_value_t = 4
    )]
    pub database_connections: u32,
}

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

/// The window of credits.event.rejected, read inside the settle transaction.
static REJECTED_WINDOW_S: OnceLock<u32> = OnceLock::new();

pub fn rejected_window_s() -> u32 {
    *REJECTED_WINDOW_S.get().unwrap_or(&60)
}

/// Start the sender beside the settle loop. It has its own small Postgres pool, so waiting
/// receivers never take connections the settle path needs.
pub async fn spawn(config: &Config, db: &shared::config::DbArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    crate::metric::describe_webhooks();
    let _ = REJECTED_WINDOW_S.set(config.rejected_window_s);
    let pool: PgPool = shared::db::connect(&shared::config::DbArgs {
        database_url: db.database_url.clone(),
        database_max_connections: config.database_connections.max(2),
    })
    .await?;
    let sender = send::Sender::new(pool, config.clone())?;
    tokio::spawn(sender.run(shutdown));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
