//! Money stays right when things go wrong (issue 14): what later stages cannot store is
//! refused at the edge; a poison message that still reaches a consumer is dead-lettered without
//! stalling anything; new topics never get old decisions.

use std::time::Duration;

use reqwest::Method;
use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::harness::{Stack, Svc};

/// Every string field of the API refuses U+0000 with a 422 naming it: the bytes a later
/// stage cannot store never reach a topic (on main before this, the first was a 202 that
/// stopped every ledger-writer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_and_unstorable_numbers_are_refused_at_the_edge_naming_the_field() {
    let s = Stack::start("nul-edge", 1).await;
    let key = s.tenant("hard").await;
    let cases: Vec<(&str, &str, Value, &str)> = vec![
        (
            "POST",
            "/v1/events",
            json!({"customer_id": "c1", "event_name": "image", "idempotency_key": "k1", "dimensions": {"a\u{0}b": "x"}}),
            "dimensions.a\\u0000b",
        ),
        (
            "POST",
            "/v1/events",
            json!({"events": [{"customer_id": "c1", "event_name": "llm", "idempotency_key": "k2", "dimensions": {"userId": "u\u{0}"}}]}),
            "events[0].dimensions.userId",
        ),
        (
            "POST",
            "/v1/credits/grants",
            json!({"customer_id": "c1", "credit_type": "ai", "amount": "5", "display_name": "promo\u{0}"}),
            "display_name",
        ),
        (
            "POST",
            "/v1/credits/grants",
            json!({"customer_id": "c1", "credit_type": "ai", "amount": "5", "display_name": "ok", "metadata": {"note": ["\u{0}"]}}),
            "metadata.note[0]",
        ),
    ];
    for (method, path, body, field) in cases {
        let (st, b) = s
            .call(Method::from_bytes(method.as_bytes()).unwrap(), path, &key, Some(body))
            .await;
        assert_eq!(st, 422, "{path}: {b}");
        assert_eq!(b["error"]["field"], field, "{b}");
        assert_eq!(b["error"]["code"], "unstorable_value", "{b}");
    }
    // A number numeric cannot hold (jsonb would refuse it), sent as raw JSON.
    let r = s
        .http
        .post(format!("{}/v1/events", s.url))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(r#"{"customer_id": "c1", "event_name": "llm", "idempotency_key": "k3", "dimensions": {"tokens": 1e999999}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 422);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["field"], "dimensions.tokens", "{b}");
    // A NUL in a query filter is the client's error (400), never a failed dependency (503):
    // schemathesis found `GET /v1/credits/grants?customer_id=%00` answering 503.
    for path in [
        "/v1/credits/grants?customer_id=a%00b",
        "/v1/credits/ledger?customer_id=c1&credit_type=%00",
        "/v1/credits/usage?customer_id=c%00",
    ] {
        let (st, b) = s.call(Method::GET, path, &key, None).await;
        assert_eq!(st, 400, "{path}: {b}");
        assert_eq!(b["error"]["code"], "invalid_query", "{b}");
    }
    // Nothing reached the input topic: nothing settles, no consumer moved.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM usage_events")
        .fetch_one(&s.db)
        .await
        .unwrap();
    assert_eq!(n, 0);
    s.cleanup().await;
}

/// A usage event in a form Postgres refuses (a NUL in a dimension name), produced straight to
/// the input topic as a buggy or older producer could: the rater charges it, the ledger-writer's
/// transaction fails on it. It must be isolated from the events around it (they settle), go to
/// the dead-letter topic with its reason, answer `dead_lettered`, have its charge given back to
/// the hot pool, and no consumer may exit (on main before this, both ledger-writers exited
/// after 20 retries and nothing of any tenant settled again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fact_postgres_refuses_is_dead_lettered_and_everything_around_it_settles() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let mut s = Stack::start("poison-fact", 1).await;
    let key = s.tenant("hard").await;
    s.grant(&key, "c-p", "1000").await;
    let tenant: String = sqlx::query_scalar("SELECT id FROM tenants LIMIT 1")
        .fetch_one(&s.db)
        .await
        .unwrap();
    let ev = |i: usize| json!({"customer_id": "c-p", "event_name": "llm", "idempotency_key": format!("ok-{i}"), "dimensions": {"tokens": 100}});
    // 100 good events around the poison, in requests of ten, so they share ledger batches.
    let send = |range: std::ops::Range<usize>| {
        let s = &s;
        let key = &key;
        async move {
            for chunk in range.collect::<Vec<_>>().chunks(10) {
                let body = json!({"events": chunk.iter().map(|i| ev(*i)).collect::<Vec<_>>()});
                let (st, b) = s.call(Method::POST, "/v1/events", key, Some(body)).await;
                assert_eq!(st, 202, "{b}");
            }
        }
    };
    send(0..50).await;
    let poison = shared::model::InputMsg::Usage(shared::model::UsageEvent {
        tenant_id: tenant.clone(),
        event_uid: uuid::Uuid::now_v7(),
        customer_id: "c-p".into(),
        resource_id: String::new(),
        event_name: "llm".into(),
        idempotency_key: "poison-1".into(),
        timestamp: chrono::Utc::now(),
        dimensions: serde_json::from_value(json!({"tokens": 100, "bad\u{0}name": "x"})).unwrap(),
        accepted_at: chrono::Utc::now(),
    });
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", crate::harness::brokers())
        .create()
        .unwrap();
    producer
        .send(
            FutureRecord::to(&s.input_topic)
                .key(&shared::model::partition_key(&tenant, "c-p"))
                .payload(&serde_json::to_vec(&poison).unwrap()),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    send(50..100).await;
    // The 100 good events settle (the poison never does).
    s.wait_settled(100, 0, Duration::from_secs(60)).await;
    // Its status: dead_lettered, with Postgres's reason.
    let mut status = Value::Null;
    for _ in 0..100 {
        let (_, b) = s
            .call(Method::GET, "/v1/events/poison-1?customer_id=c-p", &key, None)
            .await;
        status = b;
        if status["status"] == "dead_lettered" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(status["status"], "dead_lettered", "{status}");
    assert!(status["reason"].as_str().unwrap_or("").contains("postgres"), "{status}");
    // Its charge (1 credit) came back: 1000 - 100 x 1.
    let want = Decimal::from(900);
    let mut bal = Decimal::ZERO;
    for _ in 0..100 {
        bal = s.balance(&key, "c-p").await;
        if bal == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(bal, want, "the dead-lettered event's deduction was given back");
    // The ledger holds the charge where Redis made it and its give-back (adjust entries), so
    // the pool's end balances chain (`--strict`; on main before this the chain broke here).
    let mut adjusts: Vec<(String, Decimal)> = Vec::new();
    for _ in 0..150 {
        adjusts = sqlx::query_as("SELECT source, amount FROM ledger_entries WHERE type = 'adjust' ORDER BY id")
            .fetch_all(&s.db)
            .await
            .unwrap();
        if adjusts.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        adjusts,
        [
            ("dead_letter".to_owned(), Decimal::from(-1)),
            ("reversal".to_owned(), Decimal::from(1))
        ]
    );
    let (code, diffs) = s.reconcile_strict().await;
    assert_eq!((code, diffs.len()), (0, 0), "{diffs:?}");
    // On the dead-letter topic, replayable to the input topic, with where it came from.
    let headers = crate::harness::first_dead_letter_headers(&s.dlq_topic).await;
    assert_eq!(headers.get("replay_topic"), Some(&s.input_topic), "{headers:?}");
    assert_eq!(headers.get("source_topic"), Some(&s.ledger_topic), "{headers:?}");
    assert!(headers["reason"].contains("postgres"), "{headers:?}");
    // Nobody exited, and the isolation was counted.
    for svc in [Svc::Rater, Svc::LedgerWriter, Svc::Ingest] {
        assert!(s.running(svc), "{svc:?} exited");
    }
    let m = s.metrics_text(Svc::LedgerWriter).await;
    assert!(
        m.contains("ledger_writer_dlq_messages_total{reason=\"unstorable\"} 1"),
        "{m}"
    );
    // The replayed event is charged as a new event, once: its dedupe mark was released.
    let replayed = serde_json::to_vec(&match poison {
        shared::model::InputMsg::Usage(mut e) => {
            e.dimensions.retain(|k, _| !k.contains('\0'));
            shared::model::InputMsg::Usage(e)
        }
        other => other,
    })
    .unwrap();
    producer
        .send(
            FutureRecord::to(&s.input_topic)
                .key(&shared::model::partition_key(&tenant, "c-p"))
                .payload(&replayed),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    s.wait_settled(101, 0, Duration::from_secs(60)).await;
    let (_, b) = s.call(Method::GET, "/v1/events/poison-1", &key, None).await;
    assert_eq!(b["status"], "settled", "{b}");
    let mut bal = Decimal::ZERO;
    for _ in 0..100 {
        bal = s.balance(&key, "c-p").await;
        if bal == Decimal::from(899) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(bal, Decimal::from(899));
    s.cleanup().await;
}

/// New topics (deleted and created again, a broker without its storage, another cluster, new
/// consumer groups) start from offset 0 while Redis keeps the pools: a new event must never be
/// answered with the decision the old topic's message at the same offset got (on main before
/// this, the hot balance read 790 where Postgres had 600).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_topics_never_get_old_decisions() {
    let mut s = Stack::start("new-topics", 1).await;
    let key = s.tenant("hard").await;
    s.grant(&key, "c-1", "1000").await;
    send_twenty(&s, &key, "old").await;
    s.wait_settled(20, 0, Duration::from_secs(60)).await;
    assert_eq!(s.balance(&key, "c-1").await, Decimal::from(800));
    for svc in [Svc::Ingest, Svc::Rater, Svc::LedgerWriter] {
        s.stop(svc).await;
    }
    s.move_to_new_topics(2, 1).await;
    for svc in [Svc::LedgerWriter, Svc::Rater, Svc::Ingest] {
        s.spawn(svc).await;
    }
    send_twenty(&s, &key, "new").await;
    s.wait_settled(40, 0, Duration::from_secs(60)).await;
    let settled: Decimal = sqlx::query_scalar("SELECT balance FROM pools WHERE customer_id = 'c-1'")
        .fetch_one(&s.db)
        .await
        .unwrap();
    assert_eq!(settled, Decimal::from(600));
    assert_eq!(s.balance(&key, "c-1").await, Decimal::from(600), "hot balance");
    // Every new event was charged (no replayed "settled" of an old one at its offset).
    let (charged,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM usage_events WHERE idempotency_key LIKE 'new-%' AND status = 'settled'")
            .fetch_one(&s.db)
            .await
            .unwrap();
    assert_eq!(charged, 20);
    let (code, diffs) = s.reconcile().await;
    assert_eq!(code, 0, "{diffs:?}");
    s.cleanup().await;
}

/// Property-generated events (any Unicode and control characters in dimension names and values,
/// maximum lengths, extreme numbers, missing and extra fields, odd timestamps), each posted
/// alone: every one ingest accepts reaches a terminal status (settled, denied, unpriced,
/// dead_lettered) within a bound, every one it refuses is a 4xx naming the field, and no consumer
/// exits. `FUZZ_EVENTS` sets how many (default 300).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzzed_events_each_reach_a_terminal_status_and_no_consumer_exits() {
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let n: usize = std::env::var("FUZZ_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let mut s = Stack::start("fuzz", 2).await;
    let key = s.tenant("hard").await;
    for c in ["c-0", "c-1", "c-2"] {
        s.grant(&key, c, "100000").await;
    }
    let any_text = prop_oneof![
        ".{0,40}",
        "\\PC{0,20}",
        "[\\x00-\\x1f\\x7f]{1,8}",
        Just("x".repeat(1024)),
        Just("y".repeat(1025)),
        Just(String::new()),
    ];
    let number = prop_oneof![
        any::<i64>().prop_map(|v| json!(v)),
        any::<f64>()
            .prop_filter("finite", |v| v.is_finite())
            .prop_map(|v| json!(v)),
        Just(serde_json::from_str::<Value>("1e308").unwrap()),
        Just(serde_json::from_str::<Value>("-1e-300").unwrap()),
        Just(serde_json::from_str::<Value>("123456789012345678901234567890123456789").unwrap()),
        Just(json!(0)),
        Just(json!(-1)),
    ];
    let value = prop_oneof![
        4 => any_text.clone().prop_map(Value::String),
        4 => number.clone(),
        1 => Just(json!(true)),
        1 => Just(Value::Null),
        1 => Just(json!({"nested": 1})),
    ];
    let dims = proptest::collection::btree_map(
        prop_oneof![3 => any_text.clone(), 2 => Just("tokens".to_owned()), 1 => Just("userId".to_owned())],
        value,
        0..6,
    );
    let event = (
        prop_oneof![Just("c-0"), Just("c-1"), Just("c-2"), Just("c bad")],
        prop_oneof![4 => Just("llm"), 1 => Just("unknown-feature"), 1 => Just("")],
        proptest::option::of(prop_oneof![
            Just("now".to_owned()),
            Just("2000-01-01T00:00:00Z".to_owned()),
            Just("not a time".to_owned()),
            (0i64..3600).prop_map(|s| (chrono::Utc::now() - chrono::Duration::seconds(s)).to_rfc3339()),
        ]),
        proptest::option::of(dims),
        proptest::option::of(any_text),
        any::<bool>(),
    );
    let mut runner = TestRunner::default();
    let mut accepted = Vec::new();
    for i in 0..n {
        let (customer, name, ts, dims, extra, missing_key) = event.new_tree(&mut runner).unwrap().current();
        let mut ev = serde_json::Map::new();
        ev.insert("customer_id".into(), json!(customer));
        ev.insert("event_name".into(), json!(name));
        if !(missing_key && i % 7 == 0) {
            ev.insert("idempotency_key".into(), json!(format!("fz-{i}")));
        }
        match ts.as_deref() {
            Some("now") => {
                ev.insert("timestamp".into(), json!(chrono::Utc::now().to_rfc3339()));
            }
            Some(t) => {
                ev.insert("timestamp".into(), json!(t));
            }
            None => {}
        }
        if let Some(d) = dims {
            ev.insert("dimensions".into(), json!(d));
        }
        if let Some(x) = extra {
            ev.insert(x, json!(1));
        }
        let (st, b) = s
            .call(Method::POST, "/v1/events", &key, Some(Value::Object(ev.clone())))
            .await;
        match st {
            202 => accepted.push((format!("fz-{i}"), customer.to_owned())),
            400 | 413 | 422 => assert!(
                st == 400 || b["error"]["field"].is_string(),
                "a 422 names its field: {b} for {ev:?}"
            ),
            _ => panic!("unexpected {st} {b} for {ev:?}"),
        }
    }
    // About 15% of generated events are valid (45 of 300 on average, standard deviation about
    // 6); the bar only catches a generator that stopped making valid ones. It was n / 10, which
    // a fair run missed about once in a hundred (30 of 300 in a CI rehearsal at 6456b1b).
    assert!(
        accepted.len() > n / 20,
        "the generator mostly made events ingest refuses: {}",
        accepted.len()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    for (k, c) in &accepted {
        loop {
            let (st, b) = s
                .call(Method::GET, &format!("/v1/events/{k}?customer_id={c}"), &key, None)
                .await;
            let status = b["status"].as_str().unwrap_or("");
            if st == 200 && ["settled", "denied", "unpriced", "dead_lettered"].contains(&status) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{k} has no terminal status after 90 s: {st} {b}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for svc in [Svc::Rater, Svc::LedgerWriter, Svc::Ingest] {
        assert!(s.running(svc), "{svc:?} exited");
    }
    let (code, diffs) = s.reconcile().await;
    assert_eq!(code, 0, "{diffs:?}");
    s.cleanup().await;
}

/// Twenty events of 10 credits each for c-1, keys `<prefix>-<i>`.
async fn send_twenty(s: &Stack, key: &str, prefix: &str) {
    for i in 0..20 {
        let ev = json!({"customer_id": "c-1", "event_name": "llm", "idempotency_key": format!("{prefix}-{i}"), "dimensions": {"tokens": 1000}});
        let (st, b) = s.call(Method::POST, "/v1/events", key, Some(ev)).await;
        assert_eq!(st, 202, "{b}");
    }
}
