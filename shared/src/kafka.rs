//! Kafka clients built one way for all services. Only the Kafka protocol is used, so the same
//! binaries run on Apache Kafka, Redpanda, MSK or nisshi.

use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::producer::FutureProducer;

use crate::config::KafkaArgs;

/// A client config with the brokers and the operator's `--kafka-option`s; the caller's own
/// settings go in between (`with_options` applies the options last, so they win).
pub fn base(args: &KafkaArgs) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &args.kafka_brokers);
    c
}

/// Apply the operator's `--kafka-option`s over the service's settings.
pub fn with_options(mut c: ClientConfig, args: &KafkaArgs) -> ClientConfig {
    for (k, v) in &args.kafka_options {
        c.set(k, v);
    }
    c
}

/// What every consumer does on a rebalance: log it and set its assigned-partitions gauge
/// (`gauge`: the service's `*_assigned_partitions`, the count of the latest assignment). Called
/// from a service's `ConsumerContext::post_rebalance`, which adds its own bookkeeping.
pub fn on_rebalance(rebalance: &rdkafka::consumer::Rebalance<'_>, gauge: &'static str) {
    use rdkafka::consumer::Rebalance;
    match rebalance {
        Rebalance::Assign(tpl) => {
            tracing::info!(partitions = tpl.count(), "partitions assigned");
            metrics::gauge!(gauge).set(tpl.count() as f64);
        }
        Rebalance::Revoke(tpl) => tracing::info!(partitions = tpl.count(), "partitions revoked"),
        Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
    }
}

/// An idempotent producer: acks=all, no reordering or duplicates on retry.
pub fn producer(args: &KafkaArgs, linger_ms: u32) -> Result<FutureProducer, rdkafka::error::KafkaError> {
    let mut c = base(args);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", linger_ms.to_string())
        .set("compression.type", &args.kafka_compression)
        .set("queue.buffering.max.messages", "200000")
        .set("message.timeout.ms", "30000");
    with_options(c, args).create()
}

/// Watch `producer` for a fatal error (an idempotent producer that lost its sequence with the
/// broker can never send again) and end the process when one comes, so that its supervisor
/// starts it afresh with a new producer. Nothing is lost by that: consumers store offsets only
/// after what they produced is acknowledged, and ingest answers 202 only after the ack, so a
/// restart redoes (idempotently) what was in flight, as after a kill. Without this, every
/// produce would fail from then on while the service looked alive.
pub fn exit_on_fatal_error(producer: FutureProducer, service: &'static str) -> tokio::task::JoinHandle<()> {
    use rdkafka::producer::Producer;
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if let Some((code, reason)) = producer.client().fatal_error() {
                tracing::error!(service, ?code, %reason, "Kafka producer fatal error: exiting for a restart");
                eprintln!("{service}: Kafka producer fatal error ({code:?}): {reason}; exiting for a restart");
                std::process::exit(75);
            }
        }
    })
}

/// A consumer in `group` that never commits on its own: offsets are stored by the service after
/// the side effect is durable, and librdkafka commits only stored offsets (on an interval,
/// on revoke and on close).
pub fn consumer<C: ConsumerContext + 'static, T: rdkafka::config::FromClientConfigAndContext<C>>(
    args: &KafkaArgs,
    group: &str,
    context: C,
) -> Result<T, rdkafka::error::KafkaError> {
    let mut c = base(args);
    c.set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", args.kafka_commit_interval_ms.to_string())
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("fetch.wait.max.ms", "20")
        .set("isolation.level", "read_committed");
    with_options(c, args).create_with_context(context)
}

/// The partition counts of `topics`, failing if one is missing: topics are created by the
/// operator (deploy/local/up), never auto-created.
pub fn partition_counts(args: &KafkaArgs, topics: &[&str]) -> anyhow::Result<Vec<usize>> {
    struct Quiet;
    impl ClientContext for Quiet {}
    impl ConsumerContext for Quiet {}
    let c: BaseConsumer<Quiet> = with_options(base(args), args).create_with_context(Quiet)?;
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
    next_batch_weighted(consumer, max, wait, shutdown, f, |_| 1).await
}

/// [`next_batch`], bounded by the sum of `weight` over the batch instead of its length (a
/// ledger message carries a run of facts; a transaction is sized by facts).
pub async fn next_batch_weighted<C, T>(
    consumer: &rdkafka::consumer::StreamConsumer<C>,
    max: usize,
    wait: Duration,
    shutdown: &tokio_util::sync::CancellationToken,
    f: impl Fn(&rdkafka::message::BorrowedMessage<'_>) -> T,
    weight: impl Fn(&T) -> usize,
) -> Option<Vec<T>>
where
    C: ConsumerContext + 'static,
{
    let mut batch = Vec::with_capacity(max.min(1024));
    let mut total = 0usize;
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return None,
            m = consumer.recv() => m,
        };
        match first {
            Ok(m) => {
                let t = f(&m);
                total += weight(&t);
                batch.push(t);
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, "consume error");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let deadline = tokio::time::Instant::now() + wait;
    while total < max {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => {
                let t = f(&m);
                total += weight(&t);
                batch.push(t);
            }
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

/// How often consumer lag is measured.
pub const LAG_INTERVAL: Duration = Duration::from_secs(5);

/// Report the lag of every partition `consumer` owns as the gauge `metric` {topic, partition}:
/// the high watermark minus the group's committed offset (what a restart would re-read), every
/// `every`, until `shutdown`. A partition this instance no longer owns reads 0, so summing over
/// instances gives the group's lag. Labels never carry anything but topic and partition.
pub fn spawn_lag_reporter<C: ConsumerContext + 'static>(
    consumer: std::sync::Arc<rdkafka::consumer::StreamConsumer<C>>,
    metric: &'static str,
    every: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut shown = std::collections::BTreeSet::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let c = consumer.clone();
            // librdkafka's calls block: keep them off the runtime's workers.
            match tokio::task::spawn_blocking(move || lags(&*c, Duration::from_secs(5))).await {
                Ok(Ok(lags)) => record_lag(metric, &lags, &mut shown),
                Ok(Err(e)) => tracing::debug!(error = %e, "consumer lag not measured"),
                Err(e) => tracing::debug!(error = %e, "consumer lag task failed"),
            }
        }
    })
}

/// (topic, partition, lag) for every partition assigned to `consumer`.
fn lags<C: ConsumerContext + 'static>(
    consumer: &rdkafka::consumer::StreamConsumer<C>,
    timeout: Duration,
) -> rdkafka::error::KafkaResult<Vec<(String, i32, i64)>> {
    let committed = consumer.committed(timeout)?;
    let mut out = Vec::with_capacity(committed.count());
    for e in committed.elements() {
        let (low, high) = consumer.fetch_watermarks(e.topic(), e.partition(), timeout)?;
        // Nothing committed yet: the group starts from the earliest offset.
        let from = match e.offset() {
            rdkafka::Offset::Offset(o) => o,
            _ => low,
        };
        out.push((e.topic().to_owned(), e.partition(), (high - from).max(0)));
    }
    Ok(out)
}

/// Set the lag gauges; partitions shown before but not in `lags` (revoked) drop to 0.
pub fn record_lag(
    metric: &'static str,
    lags: &[(String, i32, i64)],
    shown: &mut std::collections::BTreeSet<(String, i32)>,
) {
    let now: std::collections::BTreeSet<(String, i32)> = lags.iter().map(|(t, p, _)| (t.clone(), *p)).collect();
    for (t, p) in shown.difference(&now) {
        metrics::gauge!(metric, "topic" => t.clone(), "partition" => p.to_string()).set(0.0);
    }
    for (t, p, lag) in lags {
        metrics::gauge!(metric, "topic" => t.clone(), "partition" => p.to_string()).set(*lag as f64);
    }
    shown.extend(now);
}

/// The span of one consumed batch: its size and, per partition, the first and last offset
/// (`offsets = "3:100-150 7:20-20"`), so each log line of the batch says what it covers.
pub fn batch_span(seen: impl Iterator<Item = (i32, i64)>) -> tracing::Span {
    let mut ranges: std::collections::BTreeMap<i32, (i64, i64)> = std::collections::BTreeMap::new();
    let mut messages = 0usize;
    for (p, o) in seen {
        messages += 1;
        let r = ranges.entry(p).or_insert((o, o));
        r.0 = r.0.min(o);
        r.1 = r.1.max(o);
    }
    let offsets = ranges
        .iter()
        .map(|(p, (a, b))| format!("{p}:{a}-{b}"))
        .collect::<Vec<_>>()
        .join(" ");
    tracing::info_span!("batch", messages, partitions = ranges.len(), offsets = %offsets)
}

/// The Kafka header that carries a request's trace id from ingest through the input and ledger
/// topics (and onto a dead letter), so one id finds a request's messages and log lines.
pub const TRACE_HEADER: &str = "trace_id";

/// The trace id of a consumed message, if it carries one.
pub fn trace_id(m: &impl rdkafka::Message) -> Option<String> {
    use rdkafka::message::Headers;
    let h = m.headers()?.iter().find(|h| h.key == TRACE_HEADER)?;
    std::str::from_utf8(h.value?).ok().map(str::to_owned)
}

/// Headers carrying `trace_id` (none if there is none).
pub fn trace_headers(trace_id: Option<&str>) -> rdkafka::message::OwnedHeaders {
    let h = rdkafka::message::OwnedHeaders::new();
    match trace_id {
        Some(t) => h.insert(rdkafka::message::Header {
            key: TRACE_HEADER,
            value: Some(t),
        }),
        None => h,
    }
}

/// The trace id of an HTTP request: the trace-id of a W3C `traceparent` header when the caller
/// sent a valid one, else a new random one (32 lowercase hex digits either way).
pub fn trace_id_from_traceparent(traceparent: Option<&str>) -> String {
    let given = traceparent.and_then(|v| {
        let mut parts = v.trim().split('-');
        let (_version, id) = (parts.next()?, parts.next()?);
        let ok = id.len() == 32
            && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            && id.bytes().any(|b| b != b'0');
        ok.then(|| id.to_owned())
    });
    given.unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        kafka: KafkaArgs,
    }

    fn args(argv: &[&str]) -> Result<KafkaArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("svc").chain(argv.iter().copied())).map(|c| c.kafka)
    }

    #[test]
    fn kafka_options_pass_through_last_and_repeatable() {
        let a = args(&[
            "--kafka-option",
            "linger.ms=77",
            "--kafka-option",
            "security.protocol=SASL_SSL",
        ])
        .unwrap();
        assert_eq!(
            a.kafka_options,
            [
                ("linger.ms".into(), "77".into()),
                ("security.protocol".into(), "SASL_SSL".into())
            ]
        );
        let mut c = base(&a);
        c.set("linger.ms", "5");
        let c = with_options(c, &a);
        assert_eq!(c.get("linger.ms"), Some("77"), "the operator's setting wins");
        assert_eq!(c.get("security.protocol"), Some("SASL_SSL"));
        // A value may hold '=' (SASL JAAS strings do); only the first one splits.
        let a = args(&["--kafka-option", "sasl.oauthbearer.config=a=b"]).unwrap();
        assert_eq!(a.kafka_options[0].1, "a=b");
    }

    #[test]
    fn tls_sasl_and_every_codec_are_built_in() {
        // A librdkafka built without OpenSSL refuses security.protocol=SASL_SSL and SCRAM, one
        // without zstd refuses compression.type=zstd, at client creation: these must be created.
        let scram = |mech: &str, codec: &str| {
            args(&[
                "--kafka-compression",
                codec,
                "--kafka-option",
                "security.protocol=SASL_SSL",
                "--kafka-option",
                &format!("sasl.mechanism={mech}"),
                "--kafka-option",
                "sasl.username=credits",
                "--kafka-option",
                "sasl.password=secret",
                "--kafka-option",
                "ssl.endpoint.identification.algorithm=https",
            ])
            .unwrap()
        };
        for (mech, codec) in [
            ("SCRAM-SHA-512", "zstd"),
            ("SCRAM-SHA-256", "lz4"),
            ("PLAIN", "snappy"),
            ("PLAIN", "gzip"),
        ] {
            if let Err(e) = producer(&scram(mech, codec), 5) {
                panic!("{mech} over SASL_SSL with {codec}: {e}");
            }
        }
        // mTLS to the broker: a CA file that does not exist is named at start-up.
        let a = args(&[
            "--kafka-option",
            "security.protocol=SSL",
            "--kafka-option",
            "ssl.ca.location=/nonexistent/ca.pem",
        ])
        .unwrap();
        let e = producer(&a, 5).err().expect("a missing CA file is refused").to_string();
        assert!(
            e.contains("ssl.ca.location") || e.contains("/nonexistent/ca.pem"),
            "{e}"
        );
    }

    #[test]
    fn a_malformed_or_unknown_kafka_option_is_refused_with_its_name() {
        for bad in ["novalue", "=x", "bad name=1"] {
            let e = args(&["--kafka-option", bad]).err().expect(bad).to_string();
            assert!(
                e.contains("librdkafka setting") || e.contains("KEY=VALUE"),
                "{bad}: {e}"
            );
        }
        let a = args(&["--kafka-option", "no.such.setting=1"]).unwrap();
        let e = producer(&a, 5).err().expect("librdkafka refuses it").to_string();
        assert!(e.contains("no.such.setting"), "{e}");
        let e = consumer::<rdkafka::consumer::DefaultConsumerContext, BaseConsumer>(
            &a,
            "g",
            rdkafka::consumer::DefaultConsumerContext,
        )
        .err()
        .expect("librdkafka refuses it")
        .to_string();
        assert!(e.contains("no.such.setting"), "{e}");
    }
}
