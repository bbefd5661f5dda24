//! The ledger-writer: consumes the ledger topic and settles each batch to Postgres in one
//! transaction (usage events, ledger entries, grant remainders, pool balances), committing the
//! Kafka offsets only after the transaction commits.
//!
//! Every write is idempotent: ledger entries are unique by (tenant, type, source, index) (a key
//! table beside the monthly partitions) and
//! balances move only by the entries actually inserted, so a redelivered batch changes nothing.

pub mod billing;
pub mod consume;
pub mod metric;
pub mod partitions;
pub mod reconcile;
pub mod rollups;
pub mod settle;
pub mod sweep;
#[cfg(test)]
mod test_facts;
pub mod webhooks;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::ClientContext;
use shared::config::{DbArgs, KafkaArgs};
use shared::telemetry::Ready;
use tokio_util::sync::CancellationToken;

#[derive(clap::Parser, Debug)]
#[command(
    name = "ledger-writer",
    about = "Settles the decided credit facts to the Postgres ledger"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum Command {
    /// Consume and settle (the default).
    Run,
    /// Apply the database migrations and exit (run once per deploy, not by every replica).
    Migrate,
    /// Compare every pool's ledger sum, grant remainders and Redis hot pool with its settled
    /// balance, and check the ledger's order (end-balance chain, grant before use); print each
    /// difference as a JSON line; exit 1 if there is any balance difference (any order
    /// difference too with --strict).
    Reconcile {
        /// Only this tenant's pools.
        #[arg(long)]
        tenant: Option<String>,
        /// Fail on ledger-order differences as well (a ledger settled by a version before
        /// give-backs were written to it may hold some).
        #[arg(long)]
        strict: bool,
    },
    /// Send the grant expiries and activations due at `--at` (default now) once and exit: a
    /// manual sweep, and the injectable clock the property tests drive. Each command carries
    /// the grant's own effective or expiry time; the rater applies it in order with the
    /// customer's events.
    Sweep {
        /// The sweep's clock (RFC 3339).
        #[arg(long)]
        at: Option<chrono::DateTime<chrono::Utc>>,
        /// Only this tenant's grants.
        #[arg(long)]
        tenant: Option<String>,
        /// Only this customer's grants (with --tenant).
        #[arg(long, requires = "tenant")]
        customer: Option<String>,
        /// Allow `--at` more than a second ahead of now: grants then expire and activate early
        /// (for tests; never on a production tenant).
        #[arg(long)]
        allow_future: bool,
    },
    /// Move every pending usage row into the rollups now and exit (what each ledger-writer's
    /// compactor does every `--rollup-interval-ms`); prints how many rows moved.
    CompactRollups,
    /// Drop the monthly partitions of `usage_events` and `ledger_entries` that ended more than
    /// max(--keep-months, the longest dedupe window: 35 days) ago, each pool's dropped entries
    /// carried forward in `ledger_archived_totals`, then the idempotency keys older than every
    /// month kept; prints what went as JSON.
    Retention {
        /// Whole months to keep before the current one's start (at least 1).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        keep_months: u32,
        /// Print what would be dropped, drop nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// `ledger-writer retention`: drop what is older than `keep_months` (see `partitions`).
pub async fn retention(config: &Config, keep_months: u32, dry_run: bool) -> anyhow::Result<partitions::Report> {
    let db = shared::db::connect(&config.db).await.context("postgres")?;
    partitions::retention(&db, chrono::Utc::now(), keep_months, dry_run).await
}

/// `ledger-writer compact-rollups`: drain `usage_rollup_pending`; returns (pending rows moved,
/// rollup rows written). Waits for a compactor that holds the lock rather than skipping.
pub async fn compact_rollups(config: &Config) -> anyhow::Result<(i64, i64)> {
    let db = shared::db::connect(&config.db).await.context("postgres")?;
    let (mut pending, mut rollups) = (0, 0);
    loop {
        let c = rollups::compact(&db, rollups::COMPACT_LIMIT).await?;
        if c.busy {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        pending += c.pending;
        rollups += c.rollups;
        if c.pending == 0 {
            return Ok((pending, rollups));
        }
    }
}

/// `ledger-writer sweep`: one sweep as of `at`; returns how many commands were sent.
pub async fn sweep_once(
    config: &Config,
    at: chrono::DateTime<chrono::Utc>,
    scope: &sweep::Scope,
) -> anyhow::Result<usize> {
    let db = shared::db::connect(&config.db).await.context("postgres")?;
    let producer = shared::kafka::producer(&config.kafka, 1)?;
    let mut sent = 0;
    loop {
        let n = sweep::tick(&db, &producer, &config.kafka.input_topic, at, scope).await?;
        sent += n;
        if n == 0 {
            return Ok(sent);
        }
    }
}

/// The ledger-writer's configuration (flags or env).
#[derive(clap::Args, Debug, Clone)]
pub struct Config {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub db: DbArgs,
    /// Redis (read by `reconcile` only).
    #[command(flatten)]
    pub redis: shared::config::RedisArgs,
    /// Consumer group of the ledger-writers.
    #[arg(long, env = "LEDGER_WRITER_GROUP_ID", default_value = "ledger-writer")]
    pub group_id: String,
    /// Where /healthz, /readyz and /metrics are served.
    #[arg(long, env = "LEDGER_WRITER_METRICS_LISTEN", default_value = "127.0.0.1:9102")]
    pub metrics_listen: SocketAddr,
    /// Most facts settled in one transaction (the batch ends with the message that reaches it;
    /// a ledger message carries a run of facts).
    #[arg(long, env = "LEDGER_WRITER_MAX_BATCH", default_value_t = 5000)]
    pub max_batch: usize,
    /// Longest wait to fill a batch, in milliseconds.
    #[arg(long, env = "LEDGER_WRITER_MAX_WAIT_MS", default_value_t = 20)]
    pub max_wait_ms: u64,
    /// How often the grant sweeper looks for due expiries and activations, in milliseconds.
    #[arg(long, env = "LEDGER_WRITER_SWEEP_INTERVAL_MS", default_value_t = 1000)]
    pub sweep_interval_ms: u64,
    /// How often the rollup compactor moves settled usage from `usage_rollup_pending` into the
    /// rollups, in milliseconds. Reads add what is pending, so this is not freshness: a longer
    /// window sums more of a customer's events into each rollup row (Postgres CPU per event at
    /// 8,000/s and 10,000 customers: 102 us with 1 s, 71 us with 10 s), a shorter one keeps
    /// fewer pending rows for a read to add.
    #[arg(long, env = "LEDGER_WRITER_ROLLUP_INTERVAL_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    pub rollup_interval_ms: u64,
    /// Webhook delivery.
    #[command(flatten)]
    pub webhooks: webhooks::Config,
    /// Plan periods and auto-recharge.
    #[command(flatten)]
    pub billing: billing::Config,
}

/// `ledger-writer reconcile`: returns whether everything agreed.
pub async fn reconcile(config: &Config, tenant: Option<&str>, strict: bool) -> anyhow::Result<bool> {
    let db = shared::db::connect(&config.db).await.context("postgres")?;
    let mut redis = shared::redis_conn::connect(&config.redis).await.context("redis")?;
    let keys = shared::keys::Keys::new(config.redis.redis_prefix.clone());
    let (pools, diffs) = reconcile::run(&db, &mut redis, &keys, tenant).await?;
    for d in &diffs {
        println!("{}", serde_json::to_string(d)?);
    }
    let order = diffs
        .iter()
        .filter(|d| reconcile::ORDER_CHECKS.contains(&d.check))
        .count();
    eprintln!(
        "reconcile: {pools} pools checked ({}), {} differences ({} of balance, {order} of ledger order{})",
        reconcile::CHECKS.join(", "),
        diffs.len(),
        diffs.len() - order,
        if strict {
            ""
        } else {
            ", reported, not failed without --strict"
        }
    );
    Ok(diffs.len() == order && (order == 0 || !strict))
}

pub async fn migrate(db: &DbArgs) -> anyhow::Result<()> {
    let pool = shared::db::connect(db).await.context("postgres")?;
    shared::db::MIGRATOR.run(&pool).await.context("migrations")?;
    let made = partitions::ensure(&pool).await.context("partitions")?;
    tracing::info!(partitions_created = made, "migrations applied");
    Ok(())
}

/// The consumer's context: logs rebalances and keeps `ledger_writer_assigned_partitions` (what
/// `deploy/local/up` waits on before its load: a group forms seconds after its members start).
pub struct Ctx;

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn post_rebalance(&self, _base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        shared::kafka::on_rebalance(rebalance, crate::metric::ASSIGNED_PARTITIONS);
    }
}

pub async fn run(config: Config, ready: Ready, shutdown: CancellationToken) -> anyhow::Result<()> {
    crate::metric::describe();
    shared::kafka::partition_counts(&config.kafka, &[&config.kafka.ledger_topic, &config.kafka.input_topic])?;
    let db = shared::db::connect(&config.db).await.context("postgres")?;
    let producer = shared::kafka::producer(&config.kafka, 1)?;
    shared::kafka::exit_on_fatal_error(producer.clone(), "ledger-writer");
    let consumer: StreamConsumer<Ctx> = shared::kafka::consumer(&config.kafka, &config.group_id, Ctx)?;
    consumer.subscribe(&[&config.kafka.ledger_topic])?;
    let consumer = std::sync::Arc::new(consumer);
    let lag_stop = shutdown.child_token();
    let _lag_stop = lag_stop.clone().drop_guard();
    shared::kafka::spawn_lag_reporter(
        consumer.clone(),
        crate::metric::CONSUMER_LAG,
        shared::kafka::LAG_INTERVAL,
        lag_stop,
    );
    let settler = settle::Settler {
        db,
        producer: producer.clone(),
        input_topic: config.kafka.input_topic.clone(),
        rejected_window_s: config.webhooks.rejected_window_s,
    };
    tokio::spawn(sweep::run(
        settler.db.clone(),
        producer.clone(),
        config.kafka.input_topic.clone(),
        Duration::from_millis(config.sweep_interval_ms),
        shutdown.clone(),
    ));
    tokio::spawn(partitions::run(
        settler.db.clone(),
        partitions::ENSURE_INTERVAL,
        shutdown.clone(),
    ));
    tokio::spawn(rollups::run(
        settler.db.clone(),
        Duration::from_millis(config.rollup_interval_ms),
        shutdown.clone(),
    ));
    // Settlement's duty cycle: the settle loop measures it, the webhook sender yields to it.
    let duty = webhooks::SettleDuty::default();
    let sender = webhooks::spawn(&config.webhooks, &config.db, duty.clone(), shutdown.clone()).await?;
    billing::spawn(
        config.billing.clone(),
        settler.db.clone(),
        producer.clone(),
        config.kafka.input_topic.clone(),
        config.webhooks.allow_private,
        shutdown.clone(),
    )?;
    ready.set(true);
    tracing::info!(group = %config.group_id, topic = %config.kafka.ledger_topic, "ledger-writer running");

    let driver = shared::consume::Driver {
        consumer: consumer.clone(),
        topic: config.kafka.ledger_topic.clone(),
        max_units: config.max_batch,
        max_wait: Duration::from_millis(config.max_wait_ms),
        runner: shared::consume::Runner {
            ready: ready.clone(),
            shutdown: shutdown.clone(),
            names: shared::consume::Names {
                errors: crate::metric::ERRORS,
                bisections: crate::metric::BISECTIONS,
                stage: "settle",
            },
            max_delay: shared::consume::MAX_DELAY,
        },
    };
    let mut step = consume::SettleStep {
        settler,
        producer,
        kafka: config.kafka.clone(),
        duty: duty.meter(),
    };
    let result = driver.run(&mut step).await;
    ready.set(false);
    shared::kafka::final_commit(&consumer);
    // The sender drains what it has in flight (bounded by its own grace) and records it.
    let joined = tokio::time::timeout(
        shared::config::SHUTDOWN_GRACE + Duration::from_secs(10),
        tokio::task::spawn_blocking(move || sender.join()),
    )
    .await;
    if joined.is_err() {
        tracing::warn!("webhook sender still draining at exit; its leases run out and another sender retries");
    }
    tracing::info!("ledger-writer stopped");
    result
}
