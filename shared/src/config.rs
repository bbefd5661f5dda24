//! Configuration pieces every service flattens into its own `Config` (clap, `--flag` or env).

use std::time::Duration;

/// Where the broker is and what the topics are called.
#[derive(clap::Args, Debug, Clone)]
pub struct KafkaArgs {
    /// Bootstrap servers of the Kafka-API broker (Apache Kafka, Redpanda, MSK or nisshi).
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// Usage events and pool commands, keyed by tenant/customer.
    #[arg(long, env = "INPUT_TOPIC", default_value = "credits.input")]
    pub input_topic: String,
    /// Decided ledger facts; must have as many partitions as the input topic.
    #[arg(long, env = "LEDGER_TOPIC", default_value = "credits.ledger")]
    pub ledger_topic: String,
    /// Messages no consumer could process, with the reason in a header.
    #[arg(long, env = "DLQ_TOPIC", default_value = "credits.dlq")]
    pub dlq_topic: String,
    /// Compression of produced batches (CPU on producers and broker against bytes on the wire).
    #[arg(long, env = "KAFKA_COMPRESSION", default_value = "lz4",
          value_parser = ["none", "gzip", "snappy", "lz4", "zstd"])]
    pub kafka_compression: String,
    /// How often a consumer commits the offsets it stored (after their effects were durable),
    /// in milliseconds. Longer means more is redelivered after a crash (harmlessly).
    #[arg(long, env = "KAFKA_COMMIT_INTERVAL_MS", default_value_t = 500,
          value_parser = clap::value_parser!(u32).range(10..=3_600_000))]
    pub kafka_commit_interval_ms: u32,
    /// Any librdkafka setting, `KEY=VALUE`, applied after the service's own (repeatable; the env
    /// form is comma-separated), e.g. `client.id=credits-eu`. A
    /// setting librdkafka does not know fails at start-up with its name.
    #[arg(long = "kafka-option", env = "KAFKA_OPTIONS", value_delimiter = ',', value_parser = kafka_option)]
    pub kafka_options: Vec<(String, String)>,
}

/// Parse one `KEY=VALUE` librdkafka setting.
pub fn kafka_option(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE (a librdkafka setting)"))?;
    let k = k.trim();
    if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_') {
        return Err(format!("{k:?} is not a librdkafka setting name"));
    }
    Ok((k.to_owned(), v.trim().to_owned()))
}

#[derive(clap::Args, Debug, Clone)]
pub struct RedisArgs {
    /// Redis holding the hot pools: `redis://` or `rediss://` (TLS) for one server; several URLs
    /// separated by commas, or `redis+cluster://host:port,host:port` (`rediss+cluster://`), for
    /// a Redis Cluster.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// PEM file of the CA that signed the Redis server's certificate (`rediss://`; default: the
    /// system's roots).
    #[arg(long, env = "REDIS_CA_FILE")]
    pub redis_ca_file: Option<String>,
    /// PEM client certificate for Redis mutual TLS (with `--redis-client-key`).
    #[arg(long, env = "REDIS_CLIENT_CERT")]
    pub redis_client_cert: Option<String>,
    /// PEM private key of `--redis-client-cert`.
    #[arg(long, env = "REDIS_CLIENT_KEY")]
    pub redis_client_key: Option<String>,
    /// Prefix of every key (tests use their own).
    #[arg(long, env = "REDIS_PREFIX", default_value = "cr")]
    pub redis_prefix: String,
}

#[derive(clap::Args, Debug, Clone)]
pub struct DbArgs {
    /// Postgres holding the settled ledger and the catalogue.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/credits"
    )]
    pub database_url: String,
    /// Connections in the pool.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 8)]
    pub database_max_connections: u32,
}

/// How long a service may take to drain and commit after SIGTERM.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
