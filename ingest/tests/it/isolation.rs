//! Tenant isolation across every read and write path of the API: tenant B, with the same
//! customer id, credit type, feature, plan ids and event keys as tenant A, never sees or moves
//! anything of A's. A leak would put one of A's markers (ids, names, URLs) into a reply to B, or
//! move A's balance, ledger, alerts or endpoints.

use std::time::{Duration, Instant};

use reqwest::Method;
use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::harness::Stack;

const MARK: &str = "tenant-a-secret";

async fn ok(s: &Stack, m: Method, path: &str, key: &str, body: Option<Value>) -> Value {
    let (st, b) = s.call(m, path, key, body).await;
    assert!((200..300).contains(&st), "{path}: {st} {b}");
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenant_sees_and_moves_nothing_on_any_path() {
    let s = Stack::start("isolation", 2).await;
    let a = s.tenant("hard").await;
    let b = s.tenant("hard").await;

    // Tenant A: a grant, usage, a webhook endpoint and its messages, alerts, payments, a top-up
    // price, auto-recharge, a plan, an add-on and a subscription, all for customer c-1.
    let g = s.grant(&a, "c-1", "100").await;
    let grant_id = g["grant"]["id"].as_str().unwrap().to_owned();
    let ep = ok(
        &s,
        Method::POST,
        "/v1/webhooks/endpoints",
        &a,
        Some(json!({"url": format!("http://127.0.0.1:9/{MARK}-hook")})),
    )
    .await;
    let ep_id = ep["id"].as_str().unwrap().to_owned();
    let a_mark = |p: &str, body: Value| {
        let (s, a) = (&s, &a);
        let p = p.to_owned();
        async move { ok(s, Method::PUT, &p, a, Some(body)).await }
    };
    a_mark(
        "/v1/credits/alerts",
        json!({"customer_id": "c-1", "credit_type": "ai", "usage_percent": [42]}),
    )
    .await;
    a_mark(
        "/v1/settings/payments",
        json!({"charge_url": format!("http://127.0.0.1:9/{MARK}-bank")}),
    )
    .await;
    a_mark(
        "/v1/credit-types/ai/top-up",
        json!({"unit_price": {"amount": "7.77", "currency": "USD"}, "min": "1", "max": "1000"}),
    )
    .await;
    a_mark(
        "/v1/credits/auto-recharge",
        json!({"customer_id": "c-1", "credit_type": "ai", "enabled": false, "threshold": "13.13",
               "target_balance": "50", "monthly_spend_limit": {"amount": "500", "currency": "USD"},
               "grant_expiration_days": 30, "payment_method_id": format!("{MARK}-pm")}),
    )
    .await;
    a_mark(
        "/v1/plans/pro",
        json!({"name": format!("{MARK} plan"), "credit_entitlements": [{"credit_type": "ai", "amount": "10", "cadence": "monthly"}]}),
    )
    .await;
    a_mark(
        "/v1/addons/extra",
        json!({"name": format!("{MARK} add-on"), "behavior": "increment",
               "credit_entitlements": [{"credit_type": "ai", "amount": "5", "cadence": "monthly"}]}),
    )
    .await;
    a_mark("/v1/subscriptions/c-1", json!({"plan_id": "pro"})).await;
    for i in 0..3 {
        let ev = json!({"customer_id": "c-1", "event_name": "llm", "idempotency_key": format!("{MARK}-{i}"),
                        "dimensions": {"tokens": 100, "userId": format!("{MARK}-user")}});
        ok(&s, Method::POST, "/v1/events", &a, Some(ev)).await;
    }
    // Settled: 2 grants (the manual one, the plan's) and 3 usage rows; a webhook message exists.
    let started = Instant::now();
    let msg_id = loop {
        let m = ok(&s, Method::GET, "/v1/webhooks/messages", &a, None).await;
        let settled: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_events")
            .fetch_one(&s.db)
            .await
            .unwrap();
        if let (Some(id), 3) = (m["messages"][0]["id"].as_str(), settled) {
            break id.to_owned();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "A's facts not settled: {m}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let a_balance = s.balance(&a, "c-1").await;
    assert_eq!(a_balance, Decimal::from(107), "100 + 10 from the plan - 3");
    let a_ledger = ok(
        &s,
        Method::GET,
        "/v1/credits/ledger?customer_id=c-1&limit=100",
        &a,
        None,
    )
    .await;
    let a_alerts = ok(
        &s,
        Method::GET,
        "/v1/credits/alerts?customer_id=c-1&credit_type=ai",
        &a,
        None,
    )
    .await;
    let markers = [MARK.to_owned(), grant_id.clone(), ep_id.clone(), msg_id.clone()];
    let leaks = |path: &str, body: &Value| {
        let text = body.to_string();
        for m in &markers {
            assert!(
                !text.contains(m.as_str()),
                "{path} shows tenant B {m:?} of tenant A: {text}"
            );
        }
    };

    // Tenant B reads every path with A's ids and A's customer: nothing of A's comes back.
    let reads = [
        "/v1/credit-types".to_owned(),
        "/v1/features/llm/credit-mapping".to_owned(),
        "/v1/credits/grants?customer_id=c-1".to_owned(),
        "/v1/credits/balance?customer_id=c-1&credit_type=ai".to_owned(),
        "/v1/credits/ledger?customer_id=c-1".to_owned(),
        format!("/v1/events/{MARK}-0"),
        "/v1/credits/usage?customer_id=c-1&credit_type=ai&time_range=LAST_DAY&group_by=user".to_owned(),
        "/v1/webhooks/endpoints".to_owned(),
        format!("/v1/webhooks/endpoints/{ep_id}"),
        "/v1/webhooks/messages".to_owned(),
        format!("/v1/webhooks/messages?endpoint_id={ep_id}"),
        "/v1/credits/alerts?customer_id=c-1&credit_type=ai".to_owned(),
        "/v1/settings/payments".to_owned(),
        "/v1/credit-types/ai/top-up".to_owned(),
        "/v1/credits/auto-recharge?customer_id=c-1&credit_type=ai".to_owned(),
        "/v1/plans/pro".to_owned(),
        "/v1/addons/extra".to_owned(),
        "/v1/subscriptions/c-1".to_owned(),
    ];
    for path in &reads {
        let (st, body) = s.call(Method::GET, path, &b, None).await;
        assert!(st < 500, "{path}: {st} {body}");
        leaks(path, &body);
    }
    // What B may not touch at all is not found.
    for path in [
        format!("/v1/events/{MARK}-0"),
        format!("/v1/events/{MARK}-1?customer_id=c-1"),
        format!("/v1/webhooks/endpoints/{ep_id}"),
        "/v1/plans/pro".to_owned(),
        "/v1/addons/extra".to_owned(),
        "/v1/subscriptions/c-1".to_owned(),
        "/v1/credit-types/ai/top-up".to_owned(),
    ] {
        let (st, body) = s.call(Method::GET, &path, &b, None).await;
        assert_eq!(st, 404, "{path}: {body}");
    }
    assert_eq!(s.balance(&b, "c-1").await, Decimal::ZERO);

    // Tenant B writes against A's ids: not found, and nothing of A's moves.
    for (m, path) in [
        (Method::POST, format!("/v1/credits/grants/{grant_id}/void")),
        (Method::POST, format!("/v1/webhooks/endpoints/{ep_id}/rotate-secret")),
        (Method::POST, format!("/v1/webhooks/endpoints/{ep_id}/enable")),
        (Method::POST, format!("/v1/webhooks/messages/{msg_id}/retry")),
        (Method::DELETE, format!("/v1/webhooks/endpoints/{ep_id}")),
    ] {
        let (st, body) = s.call(m, &path, &b, None).await;
        assert_eq!(st, 404, "{path}: {body}");
        leaks(&path, &body);
    }
    // B's own writes for "its" c-1 land in B's pools and settings only.
    let (st, body) = s
        .call(
            Method::POST,
            "/v1/events",
            &b,
            Some(
                json!({"customer_id": "c-1", "event_name": "llm", "idempotency_key": format!("{MARK}-0"),
                        "dimensions": {"tokens": 100}}),
            ),
        )
        .await;
    assert_eq!(st, 202, "{body}");
    // B's event (a hard deny: B granted nothing) settles as B's.
    let started = Instant::now();
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_events")
            .fetch_one(&s.db)
            .await
            .unwrap();
        if n == 4 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "B's event not settled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (st, e) = s.call(Method::GET, &format!("/v1/events/{MARK}-0"), &b, None).await;
    assert_eq!((st, e["status"].as_str()), (200, Some("denied")), "{e}");

    for (path, body) in [
        (
            "/v1/credits/limits",
            json!({"customer_id": "c-1", "credit_type": "ai", "limit": "soft"}),
        ),
        (
            "/v1/credits/alerts",
            json!({"customer_id": "c-1", "credit_type": "ai", "usage_percent": [99]}),
        ),
    ] {
        let (st, r) = s.call(Method::PUT, path, &b, Some(body)).await;
        assert_eq!(st, 200, "{path}: {r}");
        leaks(path, &r);
    }
    let (st, c) = s
        .call(
            Method::POST,
            "/v1/credits/check",
            &b,
            Some(json!({"customer_id": "c-1", "event_name": "llm", "quantity": 100})),
        )
        .await;
    assert_eq!(st, 200, "{c}");
    assert_eq!(c["balance"], "0", "B's check sees B's pool: {c}");
    // A is exactly as it was.
    assert_eq!(s.balance(&a, "c-1").await, a_balance);
    assert_eq!(
        ok(
            &s,
            Method::GET,
            "/v1/credits/ledger?customer_id=c-1&limit=100",
            &a,
            None
        )
        .await,
        a_ledger
    );
    assert_eq!(
        ok(
            &s,
            Method::GET,
            "/v1/credits/alerts?customer_id=c-1&credit_type=ai",
            &a,
            None
        )
        .await,
        a_alerts
    );
    let g = ok(&s, Method::GET, "/v1/credits/grants?customer_id=c-1", &a, None).await;
    assert!(
        g["grants"].as_array().unwrap().iter().all(|g| g["status"] == "active"),
        "{g}"
    );
    let e = ok(&s, Method::GET, &format!("/v1/webhooks/endpoints/{ep_id}"), &a, None).await;
    assert_eq!(e["id"], ep_id.as_str(), "{e}");
    let (st, e) = s.call(Method::GET, &format!("/v1/events/{MARK}-0"), &a, None).await;
    assert_eq!((st, e["status"].as_str()), (200, Some("settled")), "{e}");
    s.cleanup().await;
}
