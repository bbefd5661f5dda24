//! Grant semantics through the HTTP API: the consumption order, per-pool limit overrides (kept
//! across a Redis loss), and the usage rollups.

use std::time::Duration;

use reqwest::Method;
use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::harness::Stack;

async fn post_grant(s: &Stack, key: &str, body: Value) -> String {
    let (st, b) = s.call(Method::POST, "/v1/credits/grants", key, Some(body)).await;
    assert_eq!(st, 201, "{b}");
    b["grant"]["id"].as_str().unwrap().to_owned()
}

fn ev(customer: &str, k: &str, tokens: u32, user: &str) -> Value {
    json!({"customer_id": customer, "event_name": "llm", "idempotency_key": k,
           "dimensions": {"tokens": tokens, "userId": user}})
}

async fn send(s: &Stack, key: &str, events: Vec<Value>) {
    let (st, b) = s
        .call(Method::POST, "/v1/events", key, Some(json!({ "events": events })))
        .await;
    assert_eq!(st, 202, "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_event_consumes_grants_in_the_documented_order_with_an_entry_per_grant() {
    let s = Stack::start("grantorder", 1).await;
    let key = s.tenant("hard").await;
    let now = chrono::Utc::now();
    let at = |secs: i64| (now + chrono::Duration::seconds(secs)).to_rfc3339();
    let g = |name: &str, extra: Value| {
        let mut b = json!({"customer_id": "c-o", "credit_type": "ai", "amount": "1", "display_name": name});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    // Posted in an order unlike the consumption order. Expected order:
    // a (priority 50) < b (expires sooner) < c (expires later) < d (never expires, promo)
    // < f (never, paid, effective earlier) < e (effective later) < h (same as e, created later).
    let e = post_grant(&s, &key, g("e", json!({"effective_at": at(-600)}))).await;
    let c = post_grant(&s, &key, g("c", json!({"expires_at": at(3 * 86_400)}))).await;
    let d = post_grant(&s, &key, g("d", json!({"category": "promo"}))).await;
    let a = post_grant(&s, &key, g("a", json!({"priority": 50}))).await;
    let f = post_grant(&s, &key, g("f", json!({"effective_at": at(-3_600)}))).await;
    let b = post_grant(&s, &key, g("b", json!({"expires_at": at(2 * 86_400)}))).await;
    let h = post_grant(&s, &key, g("h", json!({"effective_at": at(-600)}))).await;
    // One event of 6.5 credits touches all seven grants.
    send(&s, &key, vec![ev("c-o", "o-1", 650, "u-1")]).await;
    s.wait_settled(1, 0, Duration::from_secs(60)).await;
    let (st, body) = s.call(Method::GET, "/v1/events/o-1", &key, None).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["status"], "settled", "{body}");
    let entries = body["ledger_entries"].as_array().unwrap();
    let got: Vec<(String, String, String)> = entries
        .iter()
        .map(|x| {
            (
                x["grant_id"].as_str().unwrap_or("-").to_owned(),
                x["amount"].as_str().unwrap().to_owned(),
                x["end_balance"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want: Vec<(String, String, String)> = [
        (&a, "-1", "6"),
        (&b, "-1", "5"),
        (&c, "-1", "4"),
        (&d, "-1", "3"),
        (&f, "-1", "2"),
        (&e, "-1", "1"),
        (&h, "-0.5", "0.5"),
    ]
    .iter()
    .map(|(id, amt, end)| ((*id).clone(), (*amt).to_owned(), (*end).to_owned()))
    .collect();
    let norm = |v: Vec<(String, String, String)>| {
        v.into_iter()
            .map(|(i, a, e)| (i, a.parse::<Decimal>().unwrap(), e.parse::<Decimal>().unwrap()))
            .collect::<Vec<_>>()
    };
    assert_eq!(norm(got), norm(want), "{body}");
    assert_eq!(s.balance(&key, "c-o").await, "0.5".parse::<Decimal>().unwrap());
    // The ledger pages newest first by id (numerically: ids here cross from 9 to 10), three at a
    // time, every entry exactly once.
    let mut ids: Vec<i64> = Vec::new();
    let mut path = "/v1/credits/ledger?customer_id=c-o&limit=3".to_owned();
    loop {
        let (st, page) = s.call(Method::GET, &path, &key, None).await;
        assert_eq!(st, 200, "{page}");
        ids.extend(
            page["entries"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x["id"].as_str().unwrap().parse::<i64>().unwrap()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("/v1/credits/ledger?customer_id=c-o&limit=3&after={c}"),
            None => break,
        }
    }
    let mut db: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM ledger_entries WHERE customer_id = 'c-o' ORDER BY id DESC")
            .fetch_all(&s.db)
            .await
            .unwrap();
    assert_eq!(db.len(), 14, "7 grants and 7 consumptions");
    assert!(db.iter().any(|&i| i >= 10) && db.iter().any(|&i| i < 10), "{db:?}");
    assert_eq!(ids, std::mem::take(&mut db), "newest first, none skipped or repeated");
    s.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_limit_override_beats_the_credit_type_and_survives_a_redis_loss() {
    let s = Stack::start("poollimit", 1).await;
    let key = s.tenant("hard").await;
    for c in ["c-a", "c-b", "c-c"] {
        s.grant(&key, c, "1").await;
    }
    // Bad input names the field and changes nothing.
    for (body, field) in [
        (
            json!({"customer_id": "c-a", "credit_type": "ai", "limit": "medium"}),
            "limit",
        ),
        (
            json!({"customer_id": "c-a", "credit_type": "nope", "limit": "soft"}),
            "credit_type",
        ),
        (
            json!({"customer_id": "bad id", "credit_type": "ai", "limit": "soft"}),
            "customer_id",
        ),
    ] {
        let (st, b) = s.call(Method::PUT, "/v1/credits/limits", &key, Some(body)).await;
        assert!((400..500).contains(&st), "{st} {b}");
        assert_eq!(b["error"]["field"], field, "{b}");
    }
    let set = |c: &'static str, limit: Value| {
        let s = &s;
        let key = key.clone();
        async move {
            let (st, b) = s
                .call(
                    Method::PUT,
                    "/v1/credits/limits",
                    &key,
                    Some(json!({"customer_id": c, "credit_type": "ai", "limit": limit})),
                )
                .await;
            assert_eq!(st, 200, "{b}");
            b
        }
    };
    let b = set("c-a", json!("soft")).await;
    assert_eq!(
        (b["limit"].as_str(), b["overridden"].as_bool()),
        (Some("soft"), Some(true))
    );
    // 3 credits against a balance of 1: c-a (soft override) goes to -2, c-b (hard) is denied.
    send(&s, &key, vec![ev("c-a", "a-1", 300, "u"), ev("c-b", "b-1", 300, "u")]).await;
    s.wait_settled(2, 0, Duration::from_secs(60)).await;
    let status = |k: &'static str| {
        let s = &s;
        let key = key.clone();
        async move { s.call(Method::GET, &format!("/v1/events/{k}"), &key, None).await.1["status"].clone() }
    };
    assert_eq!(status("a-1").await, "settled");
    assert_eq!(status("b-1").await, "denied");
    assert_eq!(s.balance(&key, "c-a").await, Decimal::from(-2));
    let (_, bal) = s
        .call(
            Method::GET,
            "/v1/credits/balance?customer_id=c-a&credit_type=ai",
            &key,
            None,
        )
        .await;
    assert_eq!(
        (bal["limit"].as_str(), bal["has_access"].as_bool()),
        (Some("soft"), Some(true)),
        "{bal}"
    );
    // Back to the credit type's hard limit: the next event of c-a is denied.
    let b = set("c-a", Value::Null).await;
    assert_eq!(
        (b["limit"].as_str(), b["overridden"].as_bool()),
        (Some("hard"), Some(false))
    );
    send(&s, &key, vec![ev("c-a", "a-2", 100, "u")]).await;
    s.wait_settled(3, 0, Duration::from_secs(60)).await;
    assert_eq!(status("a-2").await, "denied");
    // An override set before Redis is lost is rebuilt from Postgres with the pool.
    set("c-c", json!("soft")).await;
    send(&s, &key, vec![ev("c-c", "c-1", 50, "u")]).await;
    s.wait_settled(4, 0, Duration::from_secs(60)).await;
    s.flush_redis().await;
    send(&s, &key, vec![ev("c-c", "c-2", 300, "u")]).await;
    s.wait_settled(5, 0, Duration::from_secs(120)).await;
    assert_eq!(status("c-2").await, "settled");
    assert_eq!(s.balance(&key, "c-c").await, "-2.5".parse::<Decimal>().unwrap());
    s.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_served_from_rollups_by_feature_and_user_and_isolated_per_tenant() {
    // The compactor is left to the test: the reads below run with every row pending, then
    // with every row compacted, then with both.
    let s = Stack::start_with("usage", 2, &[("LEDGER_WRITER_ROLLUP_INTERVAL_MS", "3600000")]).await;
    let key = s.tenant("hard").await;
    let other = s.tenant("hard").await;
    s.grant(&key, "c-u", "1000").await;
    s.grant(&other, "c-u", "1000").await;
    let mut events = Vec::new();
    for i in 0..30u32 {
        events.push(ev(
            "c-u",
            &format!("u-{i}"),
            100,
            if i % 3 == 0 { "alice" } else { "bob" },
        ));
    }
    // A repeat charges nothing and adds nothing to the rollups.
    events.push(ev("c-u", "u-0", 100, "alice"));
    send(&s, &key, events).await;
    // Without a userId: grouped under a null key.
    send(&s, &key, vec![json!({"customer_id": "c-u", "event_name": "llm", "idempotency_key": "u-anon", "dimensions": {"tokens": 250}})]).await;
    send(&s, &other, vec![ev("c-u", "x-1", 700, "alice")]).await;
    s.wait_settled(32, 1, Duration::from_secs(60)).await;

    let get = |q: &str, k: &str| {
        let s = &s;
        let path = format!("/v1/credits/usage?customer_id=c-u&credit_type=ai&{q}");
        let k = k.to_owned();
        async move {
            let (st, b) = s.call(Method::GET, &path, &k, None).await;
            assert_eq!(st, 200, "{path}: {b}");
            b
        }
    };
    let total = |b: &Value, k: Option<&str>| -> Decimal {
        b["series"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["key"].as_str() == k)
            .map_or(Decimal::ZERO, |x| x["total"].as_str().unwrap().parse().unwrap())
    };
    let pending = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM usage_rollup_pending")
            .fetch_one(&s.db)
            .await
            .unwrap()
    };
    assert!(pending().await > 0, "the settled usage waits in usage_rollup_pending");
    for phase in ["pending", "compacted"] {
        if phase == "compacted" {
            s.compact_rollups().await;
            assert_eq!(pending().await, 0);
        }
        let day = get("time_range=LAST_DAY&group_by=feature", &key).await;
        assert_eq!(day["bucket"], "hour");
        assert_eq!(day["series"][0]["points"].as_array().unwrap().len(), 24);
        assert_eq!(total(&day, Some("llm")), "32.5".parse::<Decimal>().unwrap(), "{day}");
        let users = get("time_range=LAST_WEEK&group_by=user", &key).await;
        assert_eq!(users["bucket"], "day");
        assert_eq!(total(&users, Some("alice")), Decimal::from(10), "{users}");
        assert_eq!(total(&users, Some("bob")), Decimal::from(20), "{users}");
        assert_eq!(total(&users, None), "2.5".parse::<Decimal>().unwrap(), "{users}");
        let year = get("time_range=LAST_YEAR", &key).await;
        assert_eq!(year["bucket"], "month");
        assert_eq!(year["series"][0]["points"].as_array().unwrap().len(), 12);
        assert_eq!(total(&year, Some("llm")), "32.5".parse::<Decimal>().unwrap(), "{year}");
        let month = get("time_range=LAST_MONTH", &key).await;
        assert_eq!(month["series"][0]["points"].as_array().unwrap().len(), 30);
        // Day buckets are summed from the hourly rollups: every credit lands on one of the points.
        for b in [&users, &month] {
            for series in b["series"].as_array().unwrap() {
                let points: Decimal = series["points"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p["credits"].as_str().unwrap().parse::<Decimal>().unwrap())
                    .sum();
                assert_eq!(points.normalize().to_string(), series["total"].as_str().unwrap(), "{b}");
            }
        }
        // The other tenant sees only its own customer's usage under the same customer id.
        let theirs = get("time_range=LAST_DAY&group_by=user", &other).await;
        assert_eq!(total(&theirs, Some("alice")), Decimal::from(7), "{theirs}");
        assert_eq!(total(&theirs, Some("bob")), Decimal::ZERO, "{theirs} ({phase})");
    }
    // Both at once: compacted rows and new pending ones, each counted once.
    send(&s, &key, vec![ev("c-u", "u-late", 100, "alice")]).await;
    s.wait_settled(33, 1, Duration::from_secs(60)).await;
    assert!(pending().await > 0);
    for q in [
        "time_range=LAST_DAY&group_by=user",
        "time_range=LAST_MONTH&group_by=user",
        "time_range=LAST_YEAR&group_by=user",
    ] {
        let b = get(q, &key).await;
        assert_eq!(total(&b, Some("alice")), Decimal::from(11), "{q}: {b}");
    }
    // Bad parameters name the field.
    for (q, field) in [("time_range=YESTERDAY", "time_range"), ("group_by=colour", "group_by")] {
        let (st, b) = s
            .call(
                Method::GET,
                &format!("/v1/credits/usage?customer_id=c-u&credit_type=ai&{q}"),
                &key,
                None,
            )
            .await;
        assert_eq!(st, 422, "{b}");
        assert_eq!(b["error"]["field"], field, "{b}");
    }
    s.cleanup().await;
}

/// Ledger cursors are keyset cursors: entries settled while a client pages (newer, so with
/// higher ids) neither shift a page nor appear in one, and nothing is skipped or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_paging_survives_concurrent_inserts_without_skipping_or_repeating() {
    let s = Stack::start("ledgerpage", 2).await;
    let key = s.tenant("hard").await;
    s.grant(&key, "c-p", "1000").await;
    send(
        &s,
        &key,
        (0..40).map(|i| ev("c-p", &format!("p-{i}"), 100, "u")).collect(),
    )
    .await;
    s.wait_settled(40, 0, Duration::from_secs(60)).await;
    let page = |after: Option<String>| {
        let s = &s;
        let key = key.clone();
        async move {
            let path = match after {
                Some(c) => format!("/v1/credits/ledger?customer_id=c-p&limit=7&after={c}"),
                None => "/v1/credits/ledger?customer_id=c-p&limit=7".to_owned(),
            };
            let (st, b) = s.call(Method::GET, &path, &key, None).await;
            assert_eq!(st, 200, "{b}");
            let ids: Vec<i64> = b["entries"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["id"].as_str().unwrap().parse().unwrap())
                .collect();
            (ids, b["next_cursor"].as_str().map(str::to_owned))
        }
    };
    // Everything before paging starts: 40 consume entries and the grant's.
    let before: Vec<i64> = sqlx::query_scalar("SELECT id FROM ledger_entries ORDER BY id DESC")
        .fetch_all(&s.db)
        .await
        .unwrap();
    assert_eq!(before.len(), 41);
    let (mut seen, mut cursor) = page(None).await;
    let mut round = 0;
    while let Some(c) = cursor {
        // New usage settles between every two pages.
        round += 1;
        send(&s, &key, vec![ev("c-p", &format!("q-{round}"), 100, "u")]).await;
        s.wait_settled(40 + round, 0, Duration::from_secs(60)).await;
        let (ids, next) = page(Some(c)).await;
        seen.extend(ids);
        cursor = next;
    }
    assert!(round >= 5, "paged in {round} rounds");
    assert_eq!(seen, before, "newest first, each entry once, none of the later ones");
    s.cleanup().await;
}
