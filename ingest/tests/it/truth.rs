//! The ledger tells the truth (issue 15): every pool's entries, in ledger order, sum to its
//! balance and chain their end balances; a grant's entry precedes what draws on it; a missing
//! quantity is 1; a price already in force cannot be back-dated; the ledger reads one pool.

use std::time::{Duration, Instant};

use reqwest::Method;
use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::harness::Stack;

fn d(s: &str) -> Decimal {
    s.parse().unwrap()
}

async fn post_grant(s: &Stack, key: &str, body: Value) -> String {
    let (st, b) = s.call(Method::POST, "/v1/credits/grants", key, Some(body)).await;
    assert!(st == 201 || st == 202, "{st} {b}");
    b["grant"]["id"].as_str().unwrap().to_owned()
}

async fn send(s: &Stack, key: &str, events: Vec<Value>) {
    let (st, b) = s
        .call(Method::POST, "/v1/events", key, Some(json!({ "events": events })))
        .await;
    assert_eq!(st, 202, "{b}");
}

/// A pool's ledger, oldest first, as (type, amount, end_balance, grant_id, resource_id).
async fn ledger(s: &Stack, key: &str, query: &str) -> Vec<(String, Decimal, Decimal, String, Value)> {
    let mut out = Vec::new();
    let mut path = format!("/v1/credits/ledger?{query}&limit=1000");
    loop {
        let (st, page) = s.call(Method::GET, &path, key, None).await;
        assert_eq!(st, 200, "{page}");
        for e in page["entries"].as_array().unwrap() {
            out.push((
                e["type"].as_str().unwrap().to_owned(),
                d(e["amount"].as_str().unwrap()),
                d(e["end_balance"].as_str().unwrap()),
                e["grant_id"].as_str().unwrap_or("-").to_owned(),
                e["resource_id"].clone(),
            ));
        }
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("/v1/credits/ledger?{query}&limit=1000&after={c}"),
            None => break,
        }
    }
    out.reverse();
    out
}

/// Each entry's end balance is the running sum of the pool's amounts in ledger order, and the
/// sum is `balance`.
fn assert_chain(entries: &[(String, Decimal, Decimal, String, Value)], balance: Decimal) {
    let mut sum = Decimal::ZERO;
    for (i, (kind, amount, end, _, _)) in entries.iter().enumerate() {
        sum += amount;
        assert_eq!(
            *end, sum,
            "entry {i} ({kind} {amount}): end balance is not the running sum: {entries:?}"
        );
    }
    assert_eq!(sum, balance, "the amounts do not sum to the balance: {entries:?}");
}

async fn wait_entries(s: &Stack, n: i64) {
    let started = Instant::now();
    loop {
        let got: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger_entries")
            .fetch_one(&s.db)
            .await
            .unwrap();
        if got >= n {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{got}/{n} ledger entries");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Seed 003: "the quantity in the priced unit (defaults to 1 if you don't send it)". On main
/// before this, an event without its quantity dimension was `unpriced` and charged nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quantity_not_sent_is_one_and_a_bad_one_is_refused() {
    let s = Stack::start("quantity1", 1).await;
    let key = s.tenant("hard").await; // llm: 0.01 per unit of dimension `tokens`
    s.grant(&key, "c-q", "10").await;
    send(
        &s,
        &key,
        vec![
            json!({"customer_id": "c-q", "event_name": "llm", "idempotency_key": "q-none"}),
            json!({"customer_id": "c-q", "event_name": "llm", "idempotency_key": "q-text", "dimensions": {"tokens": "many"}}),
            json!({"customer_id": "c-q", "event_name": "llm", "idempotency_key": "q-neg", "dimensions": {"tokens": -3}}),
        ],
    )
    .await;
    s.wait_settled(3, 0, Duration::from_secs(60)).await;
    for (k, status, cost) in [
        ("q-none", "settled", Some("0.01")),
        ("q-text", "unpriced", None),
        ("q-neg", "unpriced", None),
    ] {
        let (st, b) = s.call(Method::GET, &format!("/v1/events/{k}"), &key, None).await;
        assert_eq!(st, 200, "{b}");
        assert_eq!(b["status"], status, "{k}: {b}");
        if let Some(c) = cost {
            assert_eq!(d(b["cost"].as_str().unwrap()), d(c), "{k}: {b}");
        }
    }
    assert_eq!(s.balance(&key, "c-q").await, d("9.99"));
    let (code, diffs) = s.reconcile_strict().await;
    assert_eq!((code, diffs.len()), (0, 0), "{diffs:?}");
    s.cleanup().await;
}

/// Case 2: a scheduled grant that an event draws on before the sweeper activates it enters the
/// ledger first, whole (on main: `deny 0 -> 0`, `consume -1 -> 4`, `grant +4 -> 4`). The sweeper
/// runs rarely here, so the event is what activates it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_grant_enters_the_ledger_whole_before_the_usage_that_draws_on_it() {
    let s = Stack::start_with("schedorder", 1, &[("LEDGER_WRITER_SWEEP_INTERVAL_MS", "600000")]).await;
    let key = s.tenant("hard").await;
    // Far enough ahead that the grant's POST (which waits for the rater) returns before it.
    let eff = chrono::Utc::now() + chrono::Duration::seconds(15);
    let g = post_grant(
        &s,
        &key,
        json!({"customer_id": "c-s", "credit_type": "ai", "amount": "5", "display_name": "later",
               "effective_at": eff.to_rfc3339()}),
    )
    .await;
    // Before it is effective: denied, nothing to spend.
    send(
        &s,
        &key,
        vec![
            json!({"customer_id": "c-s", "event_name": "llm", "idempotency_key": "s-1",
                   "timestamp": (eff - chrono::Duration::seconds(5)).to_rfc3339(), "dimensions": {"tokens": 100}}),
        ],
    )
    .await;
    s.wait_settled(1, 0, Duration::from_secs(60)).await;
    tokio::time::sleep((eff - chrono::Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(300)).await;
    let ts = (eff + chrono::Duration::milliseconds(100)).to_rfc3339();
    send(
        &s,
        &key,
        vec![
            json!({"customer_id": "c-s", "event_name": "llm", "idempotency_key": "s-2", "timestamp": ts,
                    "dimensions": {"tokens": 100}}),
        ],
    )
    .await;
    s.wait_settled(2, 0, Duration::from_secs(60)).await;
    wait_entries(&s, 3).await;
    let entries = ledger(&s, &key, "customer_id=c-s&credit_type=ai").await;
    let got: Vec<(&str, Decimal, Decimal, &str)> = entries
        .iter()
        .map(|(k, a, e, gid, _)| (k.as_str(), *a, *e, gid.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("deny", d("0"), d("0"), "-"),
            ("grant", d("5"), d("5"), g.as_str()),
            ("consume", d("-1"), d("4"), g.as_str()),
        ]
    );
    assert_chain(&entries, d("4"));
    assert_eq!(s.balance(&key, "c-s").await, d("4"));
    let (status, activated): (String, bool) =
        sqlx::query_as("SELECT status, activated FROM grants WHERE id = $1::uuid")
            .bind(&g)
            .fetch_one(&s.db)
            .await
            .unwrap();
    assert_eq!((status.as_str(), activated), ("active", true));
    let (pool,): (Decimal,) = sqlx::query_as("SELECT balance FROM pools WHERE customer_id = 'c-s'")
        .fetch_one(&s.db)
        .await
        .unwrap();
    assert_eq!(pool, d("4"));
    let (code, diffs) = s.reconcile_strict().await;
    assert_eq!((code, diffs.len()), (0, 0), "{diffs:?}");
    s.cleanup().await;
}

/// Case 3: voiding a scheduled grant removes nothing from the ledger (it never entered it): on
/// main the ledger read `grant +10`, three `consume`, `void -7 -> 7`, summing to 0 against 7.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voiding_a_scheduled_grant_removes_nothing_that_never_arrived() {
    let s = Stack::start("schedvoid", 1).await;
    let key = s.tenant("hard").await;
    s.grant(&key, "c-v", "10").await;
    let events = (0..3)
        .map(|i| json!({"customer_id": "c-v", "event_name": "llm", "idempotency_key": format!("v-{i}"), "dimensions": {"tokens": 100}}))
        .collect();
    send(&s, &key, events).await;
    s.wait_settled(3, 0, Duration::from_secs(60)).await;
    let later = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let g = post_grant(
        &s,
        &key,
        json!({"customer_id": "c-v", "credit_type": "ai", "amount": "7", "display_name": "next", "effective_at": later}),
    )
    .await;
    // The grant's row is written when its fact settles.
    let started = Instant::now();
    let (st, b) = loop {
        let (st, b) = s
            .call(Method::POST, &format!("/v1/credits/grants/{g}/void"), &key, None)
            .await;
        if st != 404 || started.elapsed() > Duration::from_secs(30) {
            break (st, b);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(st, 200, "{b}");
    wait_entries(&s, 5).await;
    let entries = ledger(&s, &key, "customer_id=c-v&credit_type=ai").await;
    let kinds: Vec<(&str, Decimal)> = entries.iter().map(|(k, a, ..)| (k.as_str(), *a)).collect();
    assert_eq!(
        kinds,
        [
            ("grant", d("10")),
            ("consume", d("-1")),
            ("consume", d("-1")),
            ("consume", d("-1")),
            ("void", d("0")),
        ]
    );
    assert_chain(&entries, d("7"));
    assert_eq!(s.balance(&key, "c-v").await, d("7"));
    let (remaining, status): (Decimal, String) =
        sqlx::query_as("SELECT remaining, status FROM grants WHERE id = $1::uuid")
            .bind(&g)
            .fetch_one(&s.db)
            .await
            .unwrap();
    assert_eq!((remaining, status.as_str()), (Decimal::ZERO, "voided"));
    let (code, diffs) = s.reconcile_strict().await;
    assert_eq!((code, diffs.len()), (0, 0), "{diffs:?}");
    // reconcile finds a broken chain (an end balance one cent off) and a consumption before
    // its grant's entry, and names the check and the pool.
    sqlx::query(
        "UPDATE ledger_entries SET end_balance = end_balance + 0.01
         WHERE id = (SELECT id FROM ledger_entries WHERE type = 'consume' ORDER BY id LIMIT 1)",
    )
    .execute(&s.db)
    .await
    .unwrap();
    sqlx::query("UPDATE ledger_entries SET id = -id WHERE type = 'grant' AND amount = 10")
        .execute(&s.db)
        .await
        .unwrap();
    sqlx::query("UPDATE ledger_entries SET id = 1000000 WHERE id < 0")
        .execute(&s.db)
        .await
        .unwrap();
    let (code, diffs) = s.reconcile_strict().await;
    assert_eq!(code, 1, "{diffs:?}");
    let checks: Vec<Value> = diffs.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    let names: std::collections::BTreeSet<&str> = checks.iter().map(|c| c["check"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["end_balance_chain", "grant_before_use"].into_iter().collect(),
        "{checks:?}"
    );
    assert!(checks.iter().all(|c| c["customer_id"] == "c-v"), "{checks:?}");
    // Without --strict they are reported, and only balance differences fail it.
    let (code, diffs) = s.reconcile().await;
    assert_eq!((code, diffs.len()), (0, 2), "{diffs:?}");
    s.cleanup().await;
}

/// Case 4: without `resource_id` the ledger is the default pool's, as for the balance; every
/// entry names its pool (on main the entries of every pool came back interleaved, unnamed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_reads_one_pool_and_each_entry_names_it() {
    let s = Stack::start("ledgerpool", 1).await;
    let key = s.tenant("hard").await;
    s.grant(&key, "c-r", "10").await;
    post_grant(
        &s,
        &key,
        json!({"customer_id": "c-r", "credit_type": "ai", "resource_id": "site-1", "amount": "5", "display_name": "site"}),
    )
    .await;
    let mut events = Vec::new();
    for i in 0..4 {
        let mut e = json!({"customer_id": "c-r", "event_name": "llm", "idempotency_key": format!("r-{i}"), "dimensions": {"tokens": 100}});
        if i % 2 == 1 {
            e["resource_id"] = json!("site-1");
        }
        events.push(e);
    }
    send(&s, &key, events).await;
    s.wait_settled(4, 0, Duration::from_secs(60)).await;
    wait_entries(&s, 6).await;
    let default = ledger(&s, &key, "customer_id=c-r&credit_type=ai").await;
    assert_eq!(default.len(), 3, "{default:?}");
    assert!(default.iter().all(|e| e.4.is_null()), "{default:?}");
    assert_chain(&default, d("8"));
    let site = ledger(&s, &key, "customer_id=c-r&credit_type=ai&resource_id=site-1").await;
    assert_eq!(site.len(), 3, "{site:?}");
    assert!(site.iter().all(|e| e.4 == "site-1"), "{site:?}");
    assert_chain(&site, d("3"));
    let (code, diffs) = s.reconcile_strict().await;
    assert_eq!((code, diffs.len()), (0, 0), "{diffs:?}");
    s.cleanup().await;
}

/// Case 5: once a feature has a price in force, a version effective in the past is refused
/// (on main it was stored, and events stamped after it cost the old or the new price by
/// arrival). A version effective now or later is accepted; a feature's first price may be
/// back-dated (a backfill: no price to contradict).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_price_in_force_cannot_be_back_dated() {
    let s = Stack::start("backdate", 1).await;
    let key = s.tenant("hard").await; // llm in force since 2000
    let ago = (chrono::Utc::now() - chrono::Duration::minutes(30)).to_rfc3339();
    let (st, b) = s
        .call(
            Method::PUT,
            "/v1/features/llm/credit-mapping",
            &key,
            Some(json!({"credit_type": "ai", "credits_per_unit": "0.03", "quantity_dimension": "tokens", "effective_at": ago})),
        )
        .await;
    assert_eq!(st, 422, "{b}");
    assert_eq!(b["error"]["field"], "effective_at", "{b}");
    assert_eq!(b["error"]["code"], "effective_at_in_past", "{b}");
    let soon = (chrono::Utc::now() + chrono::Duration::minutes(5)).to_rfc3339();
    let (st, b) = s
        .call(
            Method::PUT,
            "/v1/features/llm/credit-mapping",
            &key,
            Some(json!({"credit_type": "ai", "credits_per_unit": "0.03", "quantity_dimension": "tokens", "effective_at": soon})),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    // A new feature's first price, back-dated a year: accepted.
    let (st, b) = s
        .call(
            Method::PUT,
            "/v1/features/image/credit-mapping",
            &key,
            Some(json!({"credit_type": "ai", "credits_per_unit": "2", "effective_at": "2025-01-01T00:00:00Z"})),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    // Events stamped 10 minutes ago cost the price in force then, whatever their order.
    s.grant(&key, "c-b", "100").await;
    let ts = (chrono::Utc::now() - chrono::Duration::minutes(10)).to_rfc3339();
    let events = (0..5)
        .map(|i| json!({"customer_id": "c-b", "event_name": "llm", "idempotency_key": format!("b-{i}"), "timestamp": ts, "dimensions": {"tokens": 1000}}))
        .collect();
    send(&s, &key, events).await;
    s.wait_settled(5, 0, Duration::from_secs(60)).await;
    let costs: Vec<Decimal> = sqlx::query_scalar("SELECT cost FROM usage_events ORDER BY idempotency_key")
        .fetch_all(&s.db)
        .await
        .unwrap();
    assert_eq!(costs, vec![d("10"); 5]);
    let (code, diffs) = s.reconcile_strict().await;
    assert_eq!((code, diffs.len()), (0, 0), "{diffs:?}");
    s.cleanup().await;
}

async fn set_limit(s: &Stack, key: &str, limit: Value) {
    let (st, b) = s
        .call(
            Method::PUT,
            "/v1/credits/limits",
            key,
            Some(json!({"customer_id": "c-l", "credit_type": "ai", "limit": limit})),
        )
        .await;
    assert_eq!(st, 200, "{b}");
}

/// Case 7 (a known gap): a per-pool limit change never decides events accepted before it, even
/// when the change reaches a pool that is being built (its first event). On main, ingest stored
/// the override in Postgres before producing it, so a pool first built after the change carried
/// it: the two events accepted under the hard limit settled (balance -3, not -1). Now the
/// ledger-writer stores it when it settles, in order with the pool's usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_change_never_decides_events_accepted_before_it() {
    let mut s = Stack::start("limitorder", 1).await;
    let key = s.tenant("hard").await;
    let ev = |k: &str| json!({"customer_id": "c-l", "event_name": "llm", "idempotency_key": k, "dimensions": {"tokens": 100}});
    // Nothing rates until all of it is in the topic: the pool is built at its first event,
    // after the change was accepted.
    s.stop(crate::harness::Svc::Rater).await;
    send(&s, &key, vec![ev("before-1"), ev("before-2")]).await;
    set_limit(&s, &key, json!("soft")).await;
    send(&s, &key, vec![ev("after-1")]).await;
    s.spawn(crate::harness::Svc::Rater).await;
    s.wait_settled(3, 0, Duration::from_secs(60)).await;
    let mut got = Vec::new();
    for k in ["before-1", "before-2", "after-1"] {
        got.push(s.call(Method::GET, &format!("/v1/events/{k}"), &key, None).await.1["status"].clone());
    }
    assert_eq!(got, [json!("denied"), json!("denied"), json!("settled")]);
    assert_eq!(s.balance(&key, "c-l").await, d("-1"));
    // Postgres learned the override when it settled, so a rebuild after a Redis loss keeps it;
    // and back to the credit type's limit removes it.
    let stored = || async {
        sqlx::query_scalar::<_, String>("SELECT limit_kind FROM pool_limits WHERE customer_id = 'c-l'")
            .fetch_optional(&s.db)
            .await
            .unwrap()
    };
    assert_eq!(stored().await.as_deref(), Some("soft"));
    set_limit(&s, &key, Value::Null).await;
    let started = Instant::now();
    while stored().await.is_some() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the override is still stored"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, diffs) = s.reconcile_strict().await;
    assert_eq!((code, diffs.len()), (0, 0), "{diffs:?}");
    s.cleanup().await;
}

/// Case 7 (a known gap): a repeat of an idempotency key that carries a timestamp in another hour
/// than the first copy is caught in Redis, as a duplicate, like any repeat. On main the marks
/// lived in hourly sets of the event's timestamp: such a repeat was charged, caught by Postgres,
/// and given back (a `consume` and an `adjust` entry in the ledger).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_with_a_timestamp_in_another_hour_is_a_duplicate_in_redis() {
    let s = Stack::start("crosshour", 1).await;
    let key = s.tenant("hard").await;
    s.grant(&key, "c-h", "10").await;
    let now = chrono::Utc::now();
    let ev = |ts: chrono::DateTime<chrono::Utc>| {
        json!({"customer_id": "c-h", "event_name": "llm", "idempotency_key": "same-key",
               "timestamp": ts.to_rfc3339(), "dimensions": {"tokens": 100}})
    };
    send(&s, &key, vec![ev(now)]).await;
    s.wait_settled(1, 0, Duration::from_secs(60)).await;
    send(&s, &key, vec![ev(now - chrono::Duration::hours(3))]).await;
    s.wait_settled(1, 1, Duration::from_secs(60)).await;
    let entries = ledger(&s, &key, "customer_id=c-h&credit_type=ai").await;
    let kinds: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(kinds, ["grant", "consume"], "{entries:?}");
    assert_eq!(s.balance(&key, "c-h").await, d("9"));
    let caught: Vec<String> = sqlx::query_scalar("SELECT caught_by FROM duplicate_events")
        .fetch_all(&s.db)
        .await
        .unwrap();
    assert_eq!(caught, ["redis"]);
    let (code, diffs) = s.reconcile_strict().await;
    assert_eq!((code, diffs.len()), (0, 0), "{diffs:?}");
    s.cleanup().await;
}
