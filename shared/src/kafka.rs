//! Kafka clients built one way for all services. Only the Kafka protocol is used, so the same
//! binaries run on Apache Kafka, Redpanda, MSK or nisshi.

use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::producer::FutureProducer;

use crate::config::KafkaArgs;

/// An idempotent producer: acks=all, no reordering or duplicates on retry.
pub fn producer(args: &KafkaArgs, linger_ms: u32) -> Result<FutureProducer, rdkafka::error::KafkaError> {
    ClientConfig::new()
        .set("bootstrap.servers", &args.kafka_brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", linger_ms.to_string())
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "200000")
        .set("message.timeout.ms", "30000")
        .create()
}

/// A consumer in `group` that never commits on its own: offsets are stored by the service after
/// the side effect is durable, and librdkafka commits only stored offsets (on an interval,
/// on revoke and on close).
pub fn consumer<C: ConsumerContext + 'static, T: rdkafka::config::FromClientConfigAndContext<C>>(
    args: &KafkaArgs,
    group: &str,
    context: C,
) -> Result<T, rdkafka::error::KafkaError> {
    ClientConfig::new()
        .set("bootstrap.servers", &args.kafka_brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "500")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("fetch.wait.max.ms", "20")
        .set("isolation.level", "read_committed")
        .create_with_context(context)
}

/// The partition counts of `topics`, failing if one is missing: topics are created by the
/// operator (deploy/local/up), never auto-created.
pub fn partition_counts(args: &KafkaArgs, topics: &[&str]) -> anyhow::Result<Vec<usize>> {
    struct Quiet;
    impl ClientContext for Quiet {}
    impl ConsumerContext for Quiet {}
    let c: BaseConsumer<Quiet> = ClientConfig::new()
        .set("bootstrap.servers", &args.kafka_brokers)
        .create_with_context(Quiet)?;
    let mut out = Vec::new();
    for t in topics {
        let md = c.fetch_metadata(Some(t), Duration::from_secs(10))?;
        let topic = md
            .topics()
            .first()
            .ok_or_else(|| anyhow::anyhow!("topic {t} missing"))?;
        if topic.error().is_some() || topic.partitions().is_empty() {
            anyhow::bail!("topic {t} does not exist: create it first (deploy/local/up does)");
        }
        out.push(topic.partitions().len());
    }
    Ok(out)
}

/// Wait for the next message, then gather more until `max` or `wait` has passed. Returns None
/// once `shutdown` is cancelled (nothing half-gathered is lost: it was not stored).
pub async fn next_batch<C, T>(
    consumer: &rdkafka::consumer::StreamConsumer<C>,
    max: usize,
    wait: Duration,
    shutdown: &tokio_util::sync::CancellationToken,
    f: impl Fn(&rdkafka::message::BorrowedMessage<'_>) -> T,
) -> Option<Vec<T>>
where
    C: ConsumerContext + 'static,
{
    let mut batch = Vec::with_capacity(max.min(1024));
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return None,
            m = consumer.recv() => m,
        };
        match first {
            Ok(m) => {
                batch.push(f(&m));
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, "consume error");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let deadline = tokio::time::Instant::now() + wait;
    while batch.len() < max {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => batch.push(f(&m)),
            Ok(Err(e)) => tracing::warn!(error = %e, "consume error"),
            Err(_) => break,
        }
    }
    Some(batch)
}

/// Store (for the next commit) the offset after the highest one seen per partition.
pub fn store_offsets<C: ConsumerContext + 'static>(
    consumer: &rdkafka::consumer::StreamConsumer<C>,
    topic: &str,
    seen: impl Iterator<Item = (i32, i64)>,
) -> rdkafka::error::KafkaResult<()> {
    let mut next: std::collections::HashMap<i32, i64> = std::collections::HashMap::new();
    for (p, o) in seen {
        let e = next.entry(p).or_insert(o + 1);
        *e = (*e).max(o + 1);
    }
    let mut tpl = rdkafka::TopicPartitionList::new();
    for (p, o) in next {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Offset(o))?;
    }
    consumer.store_offsets(&tpl)
}

/// Commit what was stored, synchronously, at shutdown.
pub fn final_commit<C: ConsumerContext + 'static>(consumer: &rdkafka::consumer::StreamConsumer<C>) {
    if let Err(e) = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
        tracing::debug!(error = %e, "final commit");
    }
}
