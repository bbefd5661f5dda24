//! Command-line flags of the load generator (clap), with the checks that keep a run meaningful.
//!
//! Every flag has a default except the secrets, which usually come from the environment
//! (`INGEST_ADMIN_TOKEN`, `DATABASE_URL`). Durations are seconds and may be fractional so a
//! smoke run (`--duration 0.5`) is possible.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Parser;

use crate::timeline::lag::GroupTopic;

/// Most events one `POST /v1/events` may carry (api.md).
pub const MAX_BATCH: u32 = 1000;

/// Open-loop load generator for the usage-event pipeline, with end-to-end verification.
#[derive(Debug, Clone, Parser)]
#[command(name = "loadtest", version, about)]
pub struct Args {
    /// Base URL of the `ingest` HTTP service.
    #[arg(long, env = "INGEST_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,

    /// Operator token for `/v1/admin/` calls (not needed with `--seed-only`).
    #[arg(long, env = "INGEST_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Postgres URL used to verify settlement (read only); not needed with `--ingest-only`.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Redis of the pipeline, read after the run to measure memory per retained idempotency
    /// key (`redis_bytes_per_key`); without it that figure is null.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,

    /// Key prefix of the pipeline in Redis.
    #[arg(long, env = "REDIS_PREFIX", default_value = "cr")]
    pub redis_prefix: String,

    /// Measure ingest alone: no grants at setup (the rater and ledger-writer need not run), no
    /// settlement wait and no verification; the figure is `accept_rate`.
    #[arg(long)]
    pub ingest_only: bool,

    /// Target arrival rate, events per second (open loop).
    #[arg(long, default_value_t = 5000.0)]
    pub rate: f64,

    /// How long to generate load, seconds (warm-up included).
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,

    /// Leading seconds that are sent but left out of the latency figures.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,

    /// Number of ordinary customers (Zipf-skewed, spread round-robin over tenants).
    #[arg(long, default_value_t = 200)]
    pub customers: u32,

    /// Number of tenants created for the run.
    #[arg(long, default_value_t = 2)]
    pub tenants: u32,

    /// Share of events (0..1) sent to one hot customer, `c-hot` of the first tenant.
    #[arg(long, default_value_t = 0.0)]
    pub hot_share: f64,

    /// Share of sends (0..1) that repeat an earlier event (same key, identical body).
    #[arg(long, default_value_t = 0.05)]
    pub duplicates: f64,

    /// Events per POST (1..=1000).
    #[arg(long, default_value_t = 100)]
    pub batch: u32,

    /// Most requests in flight; a batch due while all are busy is dropped, never delayed.
    #[arg(long, default_value_t = 64)]
    pub concurrency: u32,

    /// Seconds to wait for Postgres to settle every accepted event.
    #[arg(long, default_value_t = 120.0)]
    pub settle_timeout: f64,

    /// Write the JSON report to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,

    /// Behave as a product server: a request that fails with a connection error, a timeout, a
    /// 5xx or a 429 is sent again with the same body (the same idempotency keys), with
    /// exponential backoff and jitter (at least the `Retry-After` it was given), until a try
    /// gets a 202 or `--retry-max` has passed since its first try. An event is accepted when
    /// some try of its request got a 202. Off by default: then nothing is retried.
    #[arg(long)]
    pub retry: bool,

    /// With `--retry`: seconds from a request's first try after which it is given up and its
    /// events count as rejected (`abandoned` in the report).
    #[arg(long, default_value_t = 120.0)]
    pub retry_max: f64,

    /// Stop sending once this file exists (checked about ten times a second), then settle and
    /// verify as after `--duration`, which stays the longest the load can run. For scripts that
    /// end the load when they are done with it (deploy/local/chaos).
    #[arg(long)]
    pub stop_file: Option<PathBuf>,

    /// Write the per-second timeline (CSV) here, and its chart next to it (the same path with
    /// `.svg`). Default: `<stem>.timeline.csv` next to the `--report` file; neither without
    /// `--report`.
    #[arg(long)]
    pub timeline: Option<PathBuf>,

    /// Kafka bootstrap servers, to sample consumer lag into the timeline; without them the lag
    /// columns stay empty.
    #[arg(long, env = "KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,

    /// Consumer groups whose lag the timeline samples, as GROUP=TOPIC (comma-separated or
    /// repeated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "rater=credits.input,ledger-writer=credits.ledger"
    )]
    pub lag_group: Vec<GroupTopic>,

    /// Before the run, top the database up to at least this many settled historical events of
    /// seed tenants of their own (`loadtest-seed-<i>`, as many as `--tenants`, each with
    /// `--customers` customers); the run's verification never sees them.
    #[arg(long)]
    pub seed_events: Option<u64>,

    /// Days before now over which newly seeded events are spread.
    #[arg(long, default_value_t = 30)]
    pub seed_days: u32,

    /// Seed (`--seed-events`) and exit without setup or load; ingest need not run.
    #[arg(long)]
    pub seed_only: bool,
}

impl Args {
    /// Rejects flag combinations that would make the run meaningless or the schedule undefined.
    pub fn validate(&self) -> Result<()> {
        let finite_pos = |v: f64| v.is_finite() && v > 0.0;
        if !finite_pos(self.rate) {
            bail!("--rate must be a positive number, got {}", self.rate);
        }
        if !finite_pos(self.duration) {
            bail!("--duration must be a positive number of seconds, got {}", self.duration);
        }
        if !self.warmup.is_finite() || self.warmup < 0.0 || self.warmup >= self.duration {
            bail!("--warmup must be in [0, duration), got {}", self.warmup);
        }
        if !self.settle_timeout.is_finite() || self.settle_timeout < 0.0 {
            bail!("--settle-timeout must be >= 0, got {}", self.settle_timeout);
        }
        if self.tenants == 0 {
            bail!("--tenants must be at least 1");
        }
        if self.customers < self.tenants {
            bail!(
                "--customers ({}) must be at least --tenants ({}) so every tenant has a customer",
                self.customers,
                self.tenants
            );
        }
        if !(0.0..=1.0).contains(&self.hot_share) {
            bail!("--hot-share must be in [0, 1], got {}", self.hot_share);
        }
        if !(0.0..1.0).contains(&self.duplicates) {
            bail!("--duplicates must be in [0, 1), got {}", self.duplicates);
        }
        if self.batch == 0 || self.batch > MAX_BATCH {
            bail!("--batch must be in 1..={MAX_BATCH}, got {}", self.batch);
        }
        if self.concurrency == 0 {
            bail!("--concurrency must be at least 1");
        }
        if !self.retry_max.is_finite() || self.retry_max <= 0.0 {
            bail!(
                "--retry-max must be a positive number of seconds, got {}",
                self.retry_max
            );
        }
        if self.url.trim().is_empty() {
            bail!("--url must not be empty");
        }
        let no_db = self.database_url.as_deref().is_none_or(|u| u.trim().is_empty());
        if !self.ingest_only && no_db {
            bail!("--database-url (or DATABASE_URL) is required to verify settlement (or pass --ingest-only)");
        }
        if self.seed_only && self.seed_events.is_none() {
            bail!("--seed-only needs --seed-events");
        }
        if self.seed_events.is_some() {
            if no_db {
                bail!("--seed-events needs --database-url (or DATABASE_URL)");
            }
            if self.ingest_only && !self.seed_only {
                bail!(
                    "--seed-events seeds the database the rater and ledger-writer settle into; not with --ingest-only"
                );
            }
            if self.seed_days == 0 {
                bail!("--seed-days must be at least 1");
            }
        }
        if !self.seed_only && self.admin_token().trim().is_empty() {
            bail!("--admin-token (or INGEST_ADMIN_TOKEN) is required (unless --seed-only)");
        }
        Ok(())
    }

    /// The operator token (empty when not given; [`Args::validate`] requires it unless
    /// `--seed-only`).
    pub fn admin_token(&self) -> &str {
        self.admin_token.as_deref().unwrap_or_default()
    }

    /// Where the timeline CSV goes: `--timeline`, else next to the `--report`, else nowhere.
    pub fn timeline_path(&self) -> Option<PathBuf> {
        self.timeline
            .clone()
            .or_else(|| self.report.as_deref().map(crate::timeline::default_path))
    }

    /// `"full"` (load, settle, verify) or `"ingest_only"`.
    pub fn mode(&self) -> &'static str {
        if self.ingest_only {
            "ingest_only"
        } else {
            "full"
        }
    }

    /// The ingest base URL without a trailing slash.
    pub fn base_url(&self) -> &str {
        self.url.trim_end_matches('/')
    }

    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration)
    }

    pub fn warmup(&self) -> Duration {
        Duration::from_secs_f64(self.warmup)
    }

    pub fn settle_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.settle_timeout)
    }

    /// The retry policy of `--retry` (None without it).
    pub fn retry_policy(&self) -> Option<crate::load::RetryPolicy> {
        self.retry
            .then(|| crate::load::RetryPolicy::with_budget(Duration::from_secs_f64(self.retry_max)))
    }

    /// Per-tenant limit asked for at setup: four times the whole target rate, so neither the
    /// skew nor duplicates can push a tenant into 429s.
    pub fn tenant_events_per_second(&self) -> u64 {
        // Rates are not money; an f64 -> integer conversion is fine here.
        #[allow(clippy::float_arithmetic)]
        let eps = (self.rate * 4.0).ceil();
        (eps as u64).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Args {
        let mut argv = vec!["loadtest", "--admin-token", "t", "--database-url", "postgres://x"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).expect("parse")
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let a = parse(&["--url", "http://127.0.0.1:8080/"]);
        assert_eq!(a.rate, 5000.0);
        assert_eq!(a.duration, 30.0);
        assert_eq!(a.warmup, 2.0);
        assert_eq!(a.customers, 200);
        assert_eq!(a.tenants, 2);
        assert_eq!(a.hot_share, 0.0);
        assert_eq!(a.duplicates, 0.05);
        assert_eq!(a.batch, 100);
        assert_eq!(a.concurrency, 64);
        assert_eq!(a.settle_timeout, 120.0);
        assert!(a.report.is_none());
        assert!(!a.retry && a.retry_policy().is_none());
        assert_eq!(a.retry_max, 120.0);
        assert!(a.stop_file.is_none());
        assert!(a.timeline.is_none() && a.timeline_path().is_none());
        assert_eq!(
            a.lag_group,
            [
                "rater=credits.input".parse::<GroupTopic>().unwrap(),
                "ledger-writer=credits.ledger".parse().unwrap()
            ]
        );
        assert!(a.seed_events.is_none() && !a.seed_only);
        assert_eq!(a.seed_days, 30);
        assert_eq!(a.base_url(), "http://127.0.0.1:8080");
        assert_eq!(a.tenant_events_per_second(), 20_000);
        a.validate().expect("defaults are valid");
    }

    #[test]
    fn rejects_out_of_range_values() {
        assert!(parse(&["--hot-share", "1.5"]).validate().is_err());
        assert!(parse(&["--duplicates", "1"]).validate().is_err());
        assert!(parse(&["--batch", "1001"]).validate().is_err());
        assert!(parse(&["--batch", "0"]).validate().is_err());
        assert!(parse(&["--warmup", "30"]).validate().is_err());
        assert!(parse(&["--rate", "0"]).validate().is_err());
        assert!(parse(&["--customers", "1", "--tenants", "2"]).validate().is_err());
        assert!(parse(&["--concurrency", "0"]).validate().is_err());
        assert!(parse(&["--retry", "--retry-max", "0"]).validate().is_err());
        let r = parse(&["--retry", "--retry-max", "30"]);
        r.validate().unwrap();
        assert_eq!(r.retry_policy().unwrap().max_total, Duration::from_secs(30));
        parse(&["--hot-share", "1", "--duration", "0.5", "--warmup", "0"])
            .validate()
            .unwrap();
    }

    #[test]
    fn timeline_goes_next_to_the_report_unless_given() {
        let a = parse(&["--report", "/tmp/x/run.json"]);
        assert_eq!(a.timeline_path().unwrap(), PathBuf::from("/tmp/x/run.timeline.csv"));
        let a = parse(&["--report", "/tmp/x/run.json", "--timeline", "/y/t.csv"]);
        assert_eq!(a.timeline_path().unwrap(), PathBuf::from("/y/t.csv"));
        let a = parse(&["--lag-group", "a=t1", "--lag-group", "b=t2,c=t3"]);
        let groups: Vec<&str> = a.lag_group.iter().map(|g| g.group.as_str()).collect();
        assert_eq!(groups, ["a", "b", "c"]);
        assert!(Args::try_parse_from(["loadtest", "--lag-group", "nonsense"]).is_err());
    }

    #[test]
    fn seeding_needs_a_database_and_seed_only_no_token() {
        let mut a = Args::try_parse_from(["loadtest", "--seed-events", "1000", "--seed-only"]).unwrap();
        a.database_url = Some("postgres://x".into());
        a.admin_token = None;
        a.validate().expect("seed-only needs no admin token");
        a.database_url = None;
        assert!(a.validate().is_err());
        let mut a = Args::try_parse_from(["loadtest", "--seed-only"]).unwrap();
        a.database_url = Some("postgres://x".into());
        assert!(a.validate().is_err(), "--seed-only without --seed-events");
        let mut a = parse(&["--seed-events", "10"]);
        a.admin_token = None;
        assert!(a.validate().is_err(), "a run after seeding still needs the token");
        assert!(parse(&["--seed-events", "10", "--seed-days", "0"]).validate().is_err());
        assert!(parse(&["--seed-events", "10", "--ingest-only"]).validate().is_err());
        parse(&["--seed-events", "10"]).validate().unwrap();
    }

    #[test]
    fn database_url_is_needed_unless_ingest_only() {
        let bare = |extra: &[&str]| {
            let mut argv = vec!["loadtest", "--admin-token", "t"];
            argv.extend_from_slice(extra);
            Args::try_parse_from(argv).expect("parse")
        };
        // Cleared so a DATABASE_URL in the test environment cannot satisfy the check.
        let mut a = bare(&[]);
        a.database_url = None;
        assert!(a.validate().is_err());
        assert_eq!(a.mode(), "full");
        let mut a = bare(&["--ingest-only"]);
        a.database_url = None;
        a.validate().expect("ingest-only needs no database");
        assert_eq!(a.mode(), "ingest_only");
        assert!(parse(&[]).validate().is_ok());
    }
}
