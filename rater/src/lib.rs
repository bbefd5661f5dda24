//! The rater: consumes the input topic, prices usage events, applies each batch to the Redis
//! pools (one Lua call per pool, pipelined), produces the decided facts to the ledger topic
//! (same partition number as the input), and only then stores the input offsets.
//!
//! A crash anywhere is harmless: a redelivered operation is recognised by its input offset and
//! answered from the pool's journal with the result decided the first time.

pub mod catalogue;
pub mod consume;
pub mod metric;
pub mod plan;
pub mod pools;
pub mod settle;
pub mod step;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::consumer::{Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use shared::config::{DbArgs, KafkaArgs, RedisArgs};
use shared::telemetry::Ready;
use tokio_util::sync::CancellationToken;

/// The rater's configuration (flags or env).
#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "rater",
    about = "Prices usage events and deducts them from the hot credit pools"
)]
pub struct Config {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub db: DbArgs,
    /// Consumer group of the raters.
    #[arg(long, env = "RATER_GROUP_ID", default_value = "rater")]
    pub group_id: String,
    /// Consumer group of the ledger-writers (to wait for settlement before a rebuild).
    #[arg(long, env = "LEDGER_WRITER_GROUP_ID", default_value = "ledger-writer")]
    pub ledger_writer_group_id: String,
    /// Where /healthz, /readyz and /metrics are served.
    #[arg(long, env = "RATER_METRICS_LISTEN", default_value = "127.0.0.1:9101")]
    pub metrics_listen: SocketAddr,
    /// Most messages decided in one batch.
    #[arg(long, env = "RATER_MAX_BATCH", default_value_t = 5000)]
    pub max_batch: usize,
    /// Longest wait to fill a batch, in milliseconds.
    #[arg(long, env = "RATER_MAX_WAIT_MS", default_value_t = 10)]
    pub max_wait_ms: u64,
    /// How long an idempotency key is remembered in Redis, in seconds (default 24 h, at most 35 days).
    #[arg(long, env = "DEDUPE_WINDOW_SECONDS", default_value_t = 86_400,
          value_parser = clap::value_parser!(u64).range(60..=35 * 86_400))]
    pub dedupe_window_s: u64,
    /// Producer linger for the ledger topic, in milliseconds.
    #[arg(long, env = "RATER_LINGER_MS", default_value_t = 20)]
    pub linger_ms: u32,
    /// Replicas that must hold each round of pool writes (Redis WAIT) before its facts are
    /// produced: 1 on a Redis Cluster or a replicated Redis, so that a failover to a replica
    /// loses no decision; 0 (the default) for a single server, whose loss the rebuild from
    /// Postgres covers.
    #[arg(long, env = "RATER_REDIS_WAIT_REPLICAS", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=5))]
    pub redis_wait_replicas: u32,
}

/// Committed input offsets per partition, fed by librdkafka's commit callback: the journal of a
/// pool may drop what lies below them.
#[derive(Clone, Default)]
pub struct Committed(Arc<Mutex<HashMap<i32, i64>>>);

impl Committed {
    /// The group committed `offset` for `partition`. Taken as it is, not as a maximum: a
    /// topic created again starts from 0, and an old, higher offset would trim the new topic's
    /// journal entries before they are committed.
    pub fn set(&self, partition: i32, offset: i64) {
        self.0.lock().expect("poisoned").insert(partition, offset);
    }
    /// Forget everything (partitions assigned anew: their commits may have moved elsewhere).
    pub fn clear(&self) {
        self.0.lock().expect("poisoned").clear();
    }
    pub fn snapshot(&self) -> HashMap<i32, i64> {
        self.0.lock().expect("poisoned").clone()
    }
}

pub struct Ctx {
    committed: Committed,
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn post_rebalance(&self, _base: &rdkafka::consumer::BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(_) = rebalance {
            self.committed.clear();
        }
        shared::kafka::on_rebalance(rebalance, crate::metric::ASSIGNED_PARTITIONS);
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => {
                for e in offsets.elements() {
                    if let Offset::Offset(o) = e.offset() {
                        self.committed.set(e.partition(), o);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "offset commit failed (will be retried)"),
        }
    }
}

/// Run the rater until `shutdown`. Returns an error for what a restart should handle.
pub async fn run(config: Config, ready: Ready, shutdown: CancellationToken) -> anyhow::Result<()> {
    crate::metric::describe();
    let counts =
        shared::kafka::partition_counts(&config.kafka, &[&config.kafka.input_topic, &config.kafka.ledger_topic])?;
    anyhow::ensure!(
        counts[0] == counts[1],
        "the ledger topic must have as many partitions as the input topic ({} vs {})",
        counts[1],
        counts[0]
    );
    let db = shared::db::connect(&config.db).await.context("postgres")?;
    let redis = shared::redis_conn::connect(&config.redis).await.context("redis")?;
    let store = pools::PoolStore {
        redis,
        keys: shared::keys::Keys::new(config.redis.redis_prefix.clone()),
        db: db.clone(),
        dedupe_window_s: config.dedupe_window_s,
        wait_replicas: config.redis_wait_replicas,
    };
    store.load_scripts().await?;
    let producer = shared::kafka::producer(&config.kafka, config.linger_ms)?;
    shared::kafka::exit_on_fatal_error(producer.clone(), "rater");
    let committed = Committed::default();
    let consumer: StreamConsumer<Ctx> = shared::kafka::consumer(
        &config.kafka,
        &config.group_id,
        Ctx {
            committed: committed.clone(),
        },
    )?;
    consumer.subscribe(&[&config.kafka.input_topic])?;
    let consumer = Arc::new(consumer);
    let lag_stop = shutdown.child_token();
    let _lag_stop = lag_stop.clone().drop_guard();
    shared::kafka::spawn_lag_reporter(
        consumer.clone(),
        crate::metric::CONSUMER_LAG,
        shared::kafka::LAG_INTERVAL,
        lag_stop,
    );
    let settle = settle::Settlement::new(&config.kafka, &config.ledger_writer_group_id)?;
    let stepper = step::Step {
        catalogue: catalogue::Catalogue::new(db, Duration::from_secs(1)),
        store,
        producer,
        kafka: config.kafka.clone(),
        settle,
    };
    ready.set(true);
    tracing::info!(group = %config.group_id, topic = %config.kafka.input_topic, "rater running");

    let driver = shared::consume::Driver {
        consumer: consumer.clone(),
        topic: config.kafka.input_topic.clone(),
        max_units: config.max_batch,
        max_wait: Duration::from_millis(config.max_wait_ms),
        runner: shared::consume::Runner {
            ready: ready.clone(),
            shutdown: shutdown.clone(),
            names: shared::consume::Names {
                errors: crate::metric::ERRORS,
                bisections: crate::metric::BISECTIONS,
                stage: "batch",
            },
            max_delay: shared::consume::MAX_DELAY,
        },
    };
    let mut step = consume::RateStep {
        step: stepper,
        committed,
    };
    let result = driver.run(&mut step).await;
    ready.set(false);
    // Drain: commit what was stored, synchronously.
    shared::kafka::final_commit(&consumer);
    tracing::info!("rater stopped");
    result
}
