//! What an operator sees: a request's trace id on both topics, and the consumer lag gauges
//! rising while a consumer is held up and draining to zero once it catches up.

use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message;
use serde_json::json;

use crate::harness::{Stack, Svc};

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn env<'a>(s: &'a Stack, k: &str) -> &'a str {
    &s.env.iter().find(|(n, _)| n == k).unwrap().1
}

/// The sum of `metric` over the partitions of `topic`, as the service at `addr` reports it now
/// (None while it reports no partition of that topic).
async fn lag(s: &Stack, addr: &str, metric: &str, topic: &str) -> Option<f64> {
    let text = s
        .http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let label = format!("topic=\"{topic}\"");
    let values: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Poll until `ok(lag)` holds, or panic after `limit` with the last reading.
async fn wait_lag(s: &Stack, addr: &str, metric: &str, topic: &str, limit: Duration, ok: impl Fn(f64) -> bool) -> f64 {
    let started = Instant::now();
    loop {
        let l = lag(s, addr, metric, topic).await;
        if let Some(v) = l.filter(|v| ok(*v)) {
            return v;
        }
        assert!(started.elapsed() < limit, "{metric} on {topic}: {l:?} after {limit:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The `trace_id` header of the message on `topic` whose payload contains `needle`.
async fn trace_header(s: &Stack, topic: &str, partitions: i32, needle: &str) -> Option<String> {
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", crate::harness::brokers())
        .set("group.id", format!("it-{}-trace-reader", s.name))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut found = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while let Ok(Ok(m)) = tokio::time::timeout_at(deadline, consumer.recv()).await {
        if String::from_utf8_lossy(m.payload().unwrap_or_default()).contains(needle) {
            found = Some(shared::kafka::trace_id(&m));
            break;
        }
    }
    // Closing a consumer blocks; do it off the runtime, and do not wait on it forever.
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::task::spawn_blocking(move || drop(consumer)),
    )
    .await;
    found.unwrap_or_else(|| panic!("no message with {needle} on {topic}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_id_follows_the_request_through_both_topics() {
    let s = Stack::start("trace", 2).await;
    let key = s.tenant("hard").await;
    s.grant(&key, "c-t", "100").await;
    let post = |idempotency_key: &str, traceparent: Option<&str>| {
        let mut rb = s.http.post(format!("{}/v1/events", s.url)).bearer_auth(&key).json(
            &json!({"customer_id": "c-t", "event_name": "llm", "idempotency_key": idempotency_key,
                          "dimensions": {"tokens": 100}}),
        );
        if let Some(t) = traceparent {
            rb = rb.header("traceparent", t);
        }
        rb.send()
    };
    let r = post("traced", Some(TRACEPARENT)).await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["x-trace-id"], TRACE_ID, "the caller's trace id is kept");
    let r = post("untraced", Some("garbage")).await.unwrap();
    assert_eq!(r.status(), 202);
    let fresh = r.headers()["x-trace-id"].to_str().unwrap().to_owned();
    assert!(
        fresh.len() == 32 && fresh.bytes().all(|b| b.is_ascii_hexdigit()) && fresh != TRACE_ID,
        "a new trace id when the caller sends none valid: {fresh}"
    );
    s.wait_settled(2, 0, Duration::from_secs(60)).await;
    let ledger_topic = env(&s, "LEDGER_TOPIC").to_owned();
    assert_eq!(
        trace_header(&s, &s.input_topic, 2, "\"traced\"").await.as_deref(),
        Some(TRACE_ID),
        "input topic"
    );
    assert_eq!(
        trace_header(&s, &ledger_topic, 2, "\"traced\"").await.as_deref(),
        Some(TRACE_ID),
        "ledger topic"
    );
    assert_eq!(
        trace_header(&s, &ledger_topic, 2, "\"untraced\"").await,
        Some(fresh),
        "ledger topic"
    );
    s.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_gauges_rise_while_a_consumer_is_held_up_and_drain_to_zero() {
    let mut s = Stack::start("lag", 2).await;
    let key = s.tenant("hard").await;
    s.grant(&key, "c-l", "1000").await;
    let rater = env(&s, "RATER_METRICS_LISTEN").to_owned();
    let writer = env(&s, "LEDGER_WRITER_METRICS_LISTEN").to_owned();
    let input = s.input_topic.clone();
    let ledger = env(&s, "LEDGER_TOPIC").to_owned();
    let (rl, ll) = ("rater_consumer_lag_messages", "ledger_writer_consumer_lag_messages");
    // Both report every partition they own, and nothing is waiting.
    wait_lag(&s, &rater, rl, &input, Duration::from_secs(30), |v| v == 0.0).await;
    wait_lag(&s, &writer, ll, &ledger, Duration::from_secs(30), |v| v == 0.0).await;

    // Hold the rater up: with the ledger-writer stopped, one fact stays unsettled; then Redis
    // loses the pool, and the rater must wait for settlement before rebuilding it, so the
    // events behind it wait on the input topic.
    s.stop(Svc::LedgerWriter).await;
    let ev = |k: String| json!({"customer_id": "c-l", "event_name": "llm", "idempotency_key": k, "dimensions": {"tokens": 100}});
    let (st, b) = s
        .call(reqwest::Method::POST, "/v1/events", &key, Some(ev("first".into())))
        .await;
    assert_eq!(st, 202, "{b}");
    // The rater has decided it (its fact is on the ledger topic) once the hot pool shows it.
    let started = Instant::now();
    while s.balance(&key, "c-l").await != rust_decimal::Decimal::from(999) {
        assert!(started.elapsed() < Duration::from_secs(30), "first event not rated");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.flush_redis().await;
    let events: Vec<_> = (0..20).map(|i| ev(format!("held-{i}"))).collect();
    let (st, b) = s
        .call(
            reqwest::Method::POST,
            "/v1/events",
            &key,
            Some(json!({"events": events})),
        )
        .await;
    assert_eq!(st, 202, "{b}");
    let held = wait_lag(&s, &rater, rl, &input, Duration::from_secs(30), |v| v >= 20.0).await;
    assert_eq!(held, 20.0, "exactly the 20 waiting events");

    // The ledger-writer comes back: it reports its own backlog draining, the rater rebuilds
    // the pool and catches up, and both gauges return to zero.
    s.spawn(Svc::LedgerWriter).await;
    wait_lag(&s, &rater, rl, &input, Duration::from_secs(60), |v| v == 0.0).await;
    s.wait_settled(21, 0, Duration::from_secs(60)).await;
    wait_lag(&s, &writer, ll, &ledger, Duration::from_secs(30), |v| v == 0.0).await;
    assert_eq!(s.balance(&key, "c-l").await, rust_decimal::Decimal::from(979));
    s.cleanup().await;
}
