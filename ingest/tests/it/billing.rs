//! Billing end to end: a real payment endpoint on loopback (an axum server in this process)
//! that verifies every signature, keeps its own record of money taken per charge_id (a repeat
//! of a charge_id takes nothing: the receiver's idempotency), and answers by payment method:
//! `pm_ok` succeeds, `pm_decline` declines, `pm_slow_first` takes the money on the first request
//! but answers it too late (past the charge timeout), `pm_slow_3` does that to three requests.
//!
//! Clocks: auto-recharge's spend period follows `BILLING_CLOCK_OFFSET_S` (restart with a month
//! added: the period resets). Plan periods are moved to the present instead (a subscription
//! backdated so its boundary is seconds away), because the rater and the sweeper judge a
//! grant's effective and expiry times by the real clock; the scheduler's rules are also run
//! against an injected clock over years of periods in `ledger-writer/src/billing/plans.rs`.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use chrono::SubsecRound;
use reqwest::Method;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use shared::billing::period::{period_start, Cadence};
use shared::webhook::sign::verify;

use crate::harness::{Stack, Svc};

#[derive(Clone, Debug)]
struct ChargeReq {
    charge_id: String,
    idempotency_key: String,
    body: Value,
    verified: bool,
}

struct BankInner {
    secret: Mutex<String>,
    requests: Mutex<Vec<ChargeReq>>,
    /// charge_id -> the body it was taken with: money moved once per charge_id.
    taken: Mutex<HashMap<String, Value>>,
    hang: Duration,
}

struct Bank {
    addr: SocketAddr,
    inner: Arc<BankInner>,
}

async fn charge(State(b): State<Arc<BankInner>>, headers: HeaderMap, body: Bytes) -> (StatusCode, axum::Json<Value>) {
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let secret = b.secret.lock().unwrap().clone();
    let now = chrono::Utc::now().timestamp();
    let verified = verify(
        &secret,
        &h("webhook-id"),
        &h("webhook-timestamp"),
        &h("webhook-signature"),
        &body,
        now,
        300,
    )
    .is_ok();
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let id = v["charge_id"].as_str().unwrap_or("").to_owned();
    let nth = {
        let mut reqs = b.requests.lock().unwrap();
        let nth = reqs.iter().filter(|r| r.charge_id == id).count();
        reqs.push(ChargeReq {
            charge_id: id.clone(),
            idempotency_key: h("idempotency-key"),
            body: v.clone(),
            verified,
        });
        nth
    };
    if !verified || h("webhook-id") != id {
        return (StatusCode::UNAUTHORIZED, axum::Json(json!({"error": "bad signature"})));
    }
    let pm = v["payment_method_id"].as_str().unwrap_or("");
    if pm == "pm_decline" && !b.taken.lock().unwrap().contains_key(&id) {
        return (
            StatusCode::OK,
            axum::Json(json!({"status": "failed", "reason": "card_declined"})),
        );
    }
    // Money moves once per charge_id; a repeat is answered from this record.
    b.taken.lock().unwrap().entry(id.clone()).or_insert_with(|| v.clone());
    let slow = match pm {
        "pm_slow_first" => nth == 0,
        "pm_slow_3" => nth < 3,
        _ => false,
    };
    if slow {
        tokio::time::sleep(b.hang).await;
    }
    (StatusCode::OK, axum::Json(json!({"status": "succeeded"})))
}

impl Bank {
    async fn start(hang: Duration) -> Bank {
        let inner = Arc::new(BankInner {
            secret: Mutex::new(String::new()),
            requests: Mutex::new(Vec::new()),
            taken: Mutex::new(HashMap::new()),
            hang,
        });
        let app = axum::Router::new()
            .route("/charges", axum::routing::post(charge))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Bank { addr, inner }
    }
    fn url(&self) -> String {
        format!("http://{}/charges", self.addr)
    }
    fn requests(&self) -> Vec<ChargeReq> {
        self.inner.requests.lock().unwrap().clone()
    }
    fn requests_of(&self, customer: &str) -> Vec<ChargeReq> {
        self.requests()
            .into_iter()
            .filter(|r| r.body["customer_id"] == customer)
            .collect()
    }
    /// Money taken for this customer: (charges, total amount).
    fn taken_of(&self, customer: &str) -> (usize, Decimal) {
        let t = self.inner.taken.lock().unwrap();
        let mine: Vec<&Value> = t.values().filter(|v| v["customer_id"] == customer).collect();
        let total = mine
            .iter()
            .map(|v| v["amount"].as_str().unwrap().parse::<Decimal>().unwrap())
            .sum();
        (mine.len(), total)
    }
}

fn d(s: &str) -> Decimal {
    s.parse().unwrap()
}

async fn eventually<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while !f().await {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Payments at the bank and a top-up price for "ai".
async fn setup(s: &Stack, key: &str, bank: &Bank, unit_price: &str) {
    let (st, b) = s
        .call(
            Method::PUT,
            "/v1/settings/payments",
            key,
            Some(json!({"charge_url": bank.url()})),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    let secret = b["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"), "{b}");
    *bank.inner.secret.lock().unwrap() = secret;
    let (st, b) = s
        .call(
            Method::PUT,
            "/v1/credit-types/ai/top-up",
            key,
            Some(json!({"unit_price": {"amount": unit_price, "currency": "USD"}, "min": "1", "max": "1000"})),
        )
        .await;
    assert_eq!(st, 200, "{b}");
}

/// Usage of `credits` (at 0.01 per token) in one event.
async fn use_credits(s: &Stack, key: &str, customer: &str, credits: u32, k: &str) {
    let (st, b) = s
        .call(
            Method::POST,
            "/v1/events",
            key,
            Some(
                json!({"customer_id": customer, "event_name": "llm", "idempotency_key": k,
                        "dimensions": {"tokens": credits * 100}}),
            ),
        )
        .await;
    assert_eq!(st, 202, "{b}");
}

async fn grants(s: &Stack, key: &str, customer: &str, source: &str) -> Vec<Value> {
    let (st, b) = s
        .call(
            Method::GET,
            &format!("/v1/credits/grants?customer_id={customer}&limit=1000"),
            key,
            None,
        )
        .await;
    assert_eq!(st, 200, "{b}");
    b["grants"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["source"] == source)
        .cloned()
        .collect()
}

async fn recharge_state(s: &Stack, key: &str, customer: &str) -> Value {
    let (st, b) = s
        .call(
            Method::GET,
            &format!("/v1/credits/auto-recharge?customer_id={customer}&credit_type=ai"),
            key,
            None,
        )
        .await;
    assert_eq!(st, 200, "{b}");
    b
}

async fn put_recharge(s: &Stack, key: &str, customer: &str, threshold: &str, limit: &str, pm: &str) -> Value {
    let (st, b) = s
        .call(
            Method::PUT,
            "/v1/credits/auto-recharge",
            key,
            Some(
                json!({"customer_id": customer, "credit_type": "ai", "enabled": true, "threshold": threshold,
                        "target_balance": "50", "monthly_spend_limit": {"amount": limit, "currency": "USD"},
                        "grant_expiration_days": 30, "payment_method_id": pm}),
            ),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    b
}

async fn message_types(s: &Stack) -> Vec<(String, Value)> {
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT type, body FROM webhook_messages ORDER BY created_at")
        .fetch_all(&s.db)
        .await
        .unwrap();
    rows.into_iter()
        .filter(|(t, _)| t.starts_with("credits.auto_recharge."))
        .map(|(t, b)| (t, serde_json::from_str::<Value>(&b).unwrap()["data"].clone()))
        .collect()
}

fn billing_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("BILLING_CHARGE_TIMEOUT_MS", "1000"),
        ("BILLING_TICK_MS", "200"),
        ("BILLING_RETRY_BASE_MS", "200"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn top_ups_are_granted_only_after_the_charge_succeeds_and_charged_once() {
    let s = Stack::start_with("billing_topup", 2, &billing_env()).await;
    let key = s.tenant("hard").await;
    let bank = Bank::start(Duration::from_millis(2500)).await;
    let top_up = |amount: &str, pm: &str, k: &str| {
        json!({"customer_id": "c-1", "credit_type": "ai", "amount": amount, "payment_method_id": pm,
               "idempotency_key": k})
    };
    // Nothing priced, nothing configured: refused before any charge.
    let (st, b) = s
        .call(
            Method::POST,
            "/v1/credits/top-ups",
            &key,
            Some(top_up("100", "pm_ok", "k0")),
        )
        .await;
    assert_eq!(
        (st, b["error"]["code"].as_str()),
        (422, Some("top_up_not_configured")),
        "{b}"
    );
    setup(&s, &key, &bank, "0.5").await;
    let (st, b) = s
        .call(
            Method::PUT,
            "/v1/credit-types/ai/top-up",
            &key,
            Some(json!({"unit_price": {"amount": "0.5", "currency": "USD"}, "min": "10", "max": "1000"})),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    for bad in ["5", "1000.01", "2000"] {
        let (st, b) = s
            .call(
                Method::POST,
                "/v1/credits/top-ups",
                &key,
                Some(top_up(bad, "pm_ok", "kb")),
            )
            .await;
        assert_eq!((st, b["error"]["field"].as_str()), (422, Some("amount")), "{bad}: {b}");
    }
    assert!(bank.requests().is_empty(), "nothing is charged for a refused top-up");

    // Success: charged, then granted with the charge as its cost basis.
    let (st, b) = s
        .call(
            Method::POST,
            "/v1/credits/top-ups",
            &key,
            Some(top_up("100", "pm_ok", "k1")),
        )
        .await;
    assert_eq!(st, 201, "{b}");
    let g = &b["grant"];
    assert_eq!(
        (g["amount"].as_str(), g["source"].as_str()),
        (Some("100"), Some("top-up")),
        "{b}"
    );
    assert_eq!(g["cost"], json!({"amount": "50", "currency": "USD"}), "{b}");
    let grant_id = g["id"].as_str().unwrap().to_owned();
    let charge_id = b["charge"]["id"].as_str().unwrap().to_owned();
    assert_eq!(s.balance(&key, "c-1").await, d("100"));
    let reqs = bank.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].charge_id, charge_id);
    assert_eq!(reqs[0].idempotency_key, charge_id);
    assert_eq!(reqs[0].body["amount"], "50");
    assert_eq!(reqs[0].body["currency"], "USD");
    assert_eq!(reqs[0].body["reason"], "top_up");
    // The same request again: the same grant, not charged again. Another body: 409.
    let (st, b) = s
        .call(
            Method::POST,
            "/v1/credits/top-ups",
            &key,
            Some(top_up("100", "pm_ok", "k1")),
        )
        .await;
    assert_eq!((st, b["grant"]["id"].as_str()), (201, Some(grant_id.as_str())), "{b}");
    let (st, _) = s
        .call(
            Method::POST,
            "/v1/credits/top-ups",
            &key,
            Some(top_up("200", "pm_ok", "k1")),
        )
        .await;
    assert_eq!(st, 409);
    assert_eq!(bank.requests().len(), 1);

    // Declined: 402, nothing granted, and asking again does not charge again.
    for _ in 0..2 {
        let (st, b) = s
            .call(
                Method::POST,
                "/v1/credits/top-ups",
                &key,
                Some(top_up("50", "pm_decline", "k2")),
            )
            .await;
        assert_eq!((st, b["error"]["code"].as_str()), (402, Some("payment_failed")), "{b}");
    }
    assert_eq!(bank.requests().len(), 2);

    // The first answer is lost (the money was taken): the retry carries the same charge_id,
    // the bank answers from its record, and the customer is charged and granted once.
    let (st, b) = s
        .call(
            Method::POST,
            "/v1/credits/top-ups",
            &key,
            Some(top_up("40", "pm_slow_first", "k3")),
        )
        .await;
    assert_eq!(st, 201, "{b}");
    let slow_id = b["charge"]["id"].as_str().unwrap().to_owned();
    let slow: Vec<ChargeReq> = bank.requests().into_iter().filter(|r| r.charge_id == slow_id).collect();
    assert_eq!(slow.len(), 2, "one timed-out attempt and one retry");
    assert_eq!(
        bank.taken_of("c-1"),
        (2, d("70")),
        "100 and 40 credits taken once each: $50 + $20"
    );
    assert_eq!(s.balance(&key, "c-1").await, d("140"));

    // Every attempt of the request is lost: 503, and the ledger-writer finishes it (same
    // charge_id again), granting once.
    let (st, b) = s
        .call(
            Method::POST,
            "/v1/credits/top-ups",
            &key,
            Some(top_up("30", "pm_slow_3", "k4")),
        )
        .await;
    assert_eq!(
        (st, b["error"]["code"].as_str()),
        (503, Some("charge_outcome_unknown")),
        "{b}"
    );
    eventually(
        "the ledger-writer to finish the top-up",
        Duration::from_secs(30),
        || async { s.balance(&key, "c-1").await == d("170") },
    )
    .await;
    let (st, b) = s
        .call(
            Method::POST,
            "/v1/credits/top-ups",
            &key,
            Some(top_up("30", "pm_slow_3", "k4")),
        )
        .await;
    assert_eq!(st, 201, "{b}");
    let k4 = b["charge"]["id"].as_str().unwrap().to_owned();
    let k4_reqs = bank.requests().into_iter().filter(|r| r.charge_id == k4).count();
    assert_eq!(k4_reqs, 4, "three attempts by the request, one by the ledger-writer");
    assert_eq!(bank.taken_of("c-1"), (3, d("85")));
    // Grants are listed from Postgres, which the ledger-writer writes a moment after the hot
    // balance moved: wait for the third to settle, then make sure there is no fourth.
    eventually("the third top-up grant to settle", Duration::from_secs(30), || async {
        grants(&s, &key, "c-1", "top-up").await.len() >= 3
    })
    .await;
    let paid = grants(&s, &key, "c-1", "top-up").await;
    assert_eq!(paid.len(), 3, "{paid:?}");
    assert!(bank.requests().iter().all(|r| r.verified), "every charge is signed");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(s.balance(&key, "c-1").await, d("170"));
    s.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auto_recharge_refills_to_target_within_the_spend_limit_and_pauses_on_failure() {
    let mut s = Stack::start_with("billing_recharge", 2, &billing_env()).await;
    let key = s.tenant("hard").await;
    let bank = Bank::start(Duration::from_millis(2500)).await;
    // The seed: below 20 back up to 50, capped at $500 a month; $10 a credit.
    setup(&s, &key, &bank, "10").await;
    for c in ["a", "b", "c"] {
        s.grant(&key, c, if c == "a" { "60" } else { "30" }).await;
    }
    let st = put_recharge(&s, &key, "a", "20", "500", "pm_ok").await;
    assert_eq!(
        (st["paused"].as_bool(), st["spent_this_period"]["amount"].as_str()),
        (Some(false), Some("0"))
    );
    put_recharge(&s, &key, "b", "5", "500", "pm_ok").await;
    put_recharge(&s, &key, "c", "20", "500", "pm_slow_first").await;

    // a: 60 - 45 = 15 < 20: one recharge of 35 credits ($350).
    use_credits(&s, &key, "a", 45, "a-1").await;
    // b: 30 is above its threshold, but an event of 40 is denied: recharge to 50.
    use_credits(&s, &key, "b", 40, "b-1").await;
    // c: 15 < 20, and the bank's first answer is lost: one charge, retried with its id.
    use_credits(&s, &key, "c", 15, "c-1").await;
    for c in ["a", "b", "c"] {
        eventually(&format!("{c} recharged"), Duration::from_secs(30), || async {
            s.balance(&key, c).await == d("50")
        })
        .await;
    }
    assert_eq!(bank.taken_of("a"), (1, d("350")));
    assert_eq!(bank.taken_of("b"), (1, d("200")));
    assert_eq!(bank.taken_of("c"), (1, d("350")));
    let c_reqs = bank.requests_of("c");
    assert_eq!(c_reqs.len(), 2, "a timeout, then the same charge again");
    assert_eq!(c_reqs[0].charge_id, c_reqs[1].charge_id);
    eventually("a's recharge grant to settle", Duration::from_secs(30), || async {
        !grants(&s, &key, "a", "auto-recharge").await.is_empty()
    })
    .await;
    let g = grants(&s, &key, "a", "auto-recharge").await;
    assert_eq!(g.len(), 1, "{g:?}");
    assert_eq!(g[0]["amount"], "35");
    assert_eq!(g[0]["cost"], json!({"amount": "350", "currency": "USD"}));
    let created: chrono::DateTime<chrono::Utc> = g[0]["created_at"].as_str().unwrap().parse().unwrap();
    let expires: chrono::DateTime<chrono::Utc> = g[0]["expires_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(expires - created, chrono::Duration::days(30));
    eventually("a's guard released", Duration::from_secs(10), || async {
        recharge_state(&s, &key, "a").await["recharge_in_flight"] == false
    })
    .await;
    let st = recharge_state(&s, &key, "a").await;
    assert_eq!(st["spent_this_period"]["amount"], "350", "{st}");

    // Spend cap mid-month: 10 left would need 40 credits ($400): 350 + 400 > 500, so no charge.
    use_credits(&s, &key, "a", 40, "a-2").await;
    eventually("a paused at its spend limit", Duration::from_secs(20), || async {
        recharge_state(&s, &key, "a").await["paused_reason"] == "spend_limit_reached"
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(s.balance(&key, "a").await, d("10"));
    assert_eq!(bank.taken_of("a"), (1, d("350")));

    // The period resets: a month later on the billing clock, the recharge happens.
    s.env.push(("BILLING_CLOCK_OFFSET_S".into(), (32 * 86_400).to_string()));
    for svc in [Svc::LedgerWriter, Svc::Ingest] {
        s.stop(svc).await;
        s.spawn(svc).await;
    }
    eventually("a recharged in the new period", Duration::from_secs(30), || async {
        s.balance(&key, "a").await == d("50")
    })
    .await;
    assert_eq!(bank.taken_of("a"), (2, d("750")));
    eventually("the new period's spend", Duration::from_secs(10), || async {
        let st = recharge_state(&s, &key, "a").await;
        st["spent_this_period"]["amount"] == "400" && st["paused"] == false
    })
    .await;

    // A declined card (limit raised): paused at once, no retries, nothing granted.
    put_recharge(&s, &key, "a", "20", "2000", "pm_decline").await;
    eventually("a's guard released", Duration::from_secs(10), || async {
        recharge_state(&s, &key, "a").await["recharge_in_flight"] == false
    })
    .await;
    use_credits(&s, &key, "a", 35, "a-3").await;
    eventually("a paused after the decline", Duration::from_secs(20), || async {
        recharge_state(&s, &key, "a").await["paused_reason"] == "payment_failed"
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let declined = bank
        .requests_of("a")
        .into_iter()
        .filter(|r| r.body["payment_method_id"] == "pm_decline")
        .count();
    assert_eq!(declined, 1, "one attempt, no retry storm");
    assert_eq!(s.balance(&key, "a").await, d("15"));
    assert_eq!(grants(&s, &key, "a", "auto-recharge").await.len(), 2);
    // Saving the settings again resumes it.
    put_recharge(&s, &key, "a", "20", "2000", "pm_ok").await;
    eventually(
        "a recharged after the settings were saved",
        Duration::from_secs(30),
        || async { s.balance(&key, "a").await == d("50") },
    )
    .await;
    assert_eq!(bank.taken_of("a"), (3, d("1100")));
    // The charge worker counts what it did since its restart: the decline and the success.
    let text = s.metrics_text(Svc::LedgerWriter).await;
    let value = |series: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("{series} missing:\n{text}"))
    };
    assert!(value("ledger_writer_billing_charge_attempts_total{outcome=\"succeeded\"}") >= 1.0);
    assert!(value("ledger_writer_billing_charge_attempts_total{outcome=\"failed\"}") >= 1.0);
    assert!(value("ledger_writer_billing_ticks_total{task=\"charges\"}") >= 1.0);

    let msgs = message_types(&s).await;
    let count = |t: &str, f: &dyn Fn(&Value) -> bool| msgs.iter().filter(|(k, v)| k == t && f(v)).count();
    assert_eq!(
        count("credits.auto_recharge.succeeded", &|v| v["customer_id"] == "a"),
        3,
        "{msgs:?}"
    );
    assert_eq!(count("credits.auto_recharge.succeeded", &|_| true), 5, "{msgs:?}");
    assert_eq!(
        count("credits.auto_recharge.paused", &|v| v["paused_reason"]
            == "spend_limit_reached"),
        1
    );
    assert_eq!(
        count("credits.auto_recharge.paused", &|v| v["paused_reason"]
            == "payment_failed"),
        1
    );
    assert_eq!(count("credits.auto_recharge.failed", &|v| v["customer_id"] == "a"), 1);
    assert!(bank.requests().iter().all(|r| r.verified));
    s.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plans_grant_every_period_once_across_a_restart_at_the_boundary() {
    let mut s = Stack::start_with("billing_plans", 2, &billing_env()).await;
    let key = s.tenant("hard").await;
    let put = |path: String, body: Value| {
        let (s, key) = (&s, &key);
        async move {
            let (st, b) = s.call(Method::PUT, &path, key, Some(body)).await;
            assert_eq!(st, 200, "{path}: {b}");
            b
        }
    };
    put(
        "/v1/plans/pro".into(),
        json!({"name": "Pro", "credit_entitlements": [{"credit_type": "ai", "amount": "50000", "cadence": "monthly"}]}),
    )
    .await;
    put(
        "/v1/plans/basic".into(),
        json!({"name": "Basic", "credit_entitlements": [{"credit_type": "ai", "amount": "1000", "cadence": "monthly"}]}),
    )
    .await;
    put(
        "/v1/addons/extra".into(),
        json!({"name": "Extra API Credits", "behavior": "increment",
               "credit_entitlements": [{"credit_type": "ai", "amount": "10000", "cadence": "monthly"}]}),
    )
    .await;
    put(
        "/v1/addons/big".into(),
        json!({"name": "Big", "behavior": "override",
               "credit_entitlements": [{"credit_type": "ai", "amount": "200000", "cadence": "monthly"}]}),
    )
    .await;
    let (st, b) = s
        .call(
            Method::PUT,
            "/v1/plans/x",
            &key,
            Some(json!({"name": "X", "credit_entitlements": [{"credit_type": "ai", "amount": "1", "cadence": "weekly"}]})),
        )
        .await;
    assert_eq!(
        (st, b["error"]["field"].as_str()),
        (422, Some("credit_entitlements[0].cadence"))
    );

    // The seed: Pro 50,000 a month + Extra API Credits 10,000 x 3 = 80,000.
    let b = put(
        "/v1/subscriptions/c-1".into(),
        json!({"plan_id": "pro", "addons": [{"id": "extra", "quantity": 3}]}),
    )
    .await;
    let gs = b["grants"].as_array().unwrap();
    assert_eq!(gs.len(), 2, "{b}");
    assert_eq!(s.balance(&key, "c-1").await, d("80000"));
    eventually("the grants settled", Duration::from_secs(10), || async {
        grants(&s, &key, "c-1", "add-on").await.len() == 1 && grants(&s, &key, "c-1", "plan").await.len() == 1
    })
    .await;
    let addon = &grants(&s, &key, "c-1", "add-on").await[0];
    assert_eq!(
        (addon["amount"].as_str(), addon["display_name"].as_str()),
        (Some("30000"), Some("Extra API Credits x 3"))
    );
    // The same subscription again changes nothing.
    let b = put(
        "/v1/subscriptions/c-1".into(),
        json!({"plan_id": "pro", "addons": [{"id": "extra", "quantity": 3}]}),
    )
    .await;
    assert_eq!(b["grants"], json!([]));
    assert_eq!(b["subscription"]["revision"], 1);
    // An override add-on replaces the plan's grant of its credit type.
    put(
        "/v1/subscriptions/c-o".into(),
        json!({"plan_id": "pro", "addons": [{"id": "big"}]}),
    )
    .await;
    assert_eq!(s.balance(&key, "c-o").await, d("200000"));

    // Changing the plan voids the current plan grants and issues the new ones.
    use_credits(&s, &key, "c-1", 100, "c1-1").await;
    eventually("usage applied", Duration::from_secs(10), || async {
        s.balance(&key, "c-1").await == d("79900")
    })
    .await;
    let b = put("/v1/subscriptions/c-1".into(), json!({"plan_id": "basic"})).await;
    assert_eq!(b["subscription"]["revision"], 2);
    assert_eq!(s.balance(&key, "c-1").await, d("1000"));
    eventually("old grants voided", Duration::from_secs(10), || async {
        let (_, b) = s
            .call(
                Method::GET,
                "/v1/credits/grants?customer_id=c-1&status=voided",
                &key,
                None,
            )
            .await;
        b["grants"].as_array().map_or(0, Vec::len) == 2
    })
    .await;

    // A subscription whose first monthly boundary is seconds away (started a month ago).
    let now = chrono::Utc::now();
    let start = (now + chrono::Duration::seconds(6))
        .checked_sub_months(chrono::Months::new(1))
        .unwrap()
        .trunc_subsecs(3);
    let boundary = period_start(start, Cadence::Monthly, 1);
    assert!(
        boundary > now + chrono::Duration::seconds(3),
        "clamped month: {start} {boundary}"
    );
    let b = put(
        "/v1/subscriptions/c-2".into(),
        json!({"plan_id": "pro", "start_at": start.to_rfc3339()}),
    )
    .await;
    assert_eq!(
        b["grants"][0]["expires_at"]
            .as_str()
            .map(|x| x.parse::<chrono::DateTime<chrono::Utc>>().unwrap()),
        Some(boundary),
        "{b}"
    );
    assert_eq!(s.balance(&key, "c-2").await, d("50000"));
    use_credits(&s, &key, "c-2", 20000, "c2-1").await;
    // The ledger-writer (scheduler and sweeper) is killed before the boundary and comes back
    // just after it.
    s.kill(Svc::LedgerWriter).await;
    let wait = (boundary - chrono::Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(300);
    tokio::time::sleep(wait).await;
    s.spawn(Svc::LedgerWriter).await;
    // Credits reset: period 0's remainder expired, period 1 granted once.
    eventually(
        "period 1 granted and period 0 expired",
        Duration::from_secs(30),
        || async { s.balance(&key, "c-2").await == d("50000") },
    )
    .await;
    let next_period = || async {
        let n: (i32,) = sqlx::query_as("SELECT next_period FROM subscription_items WHERE customer_id = 'c-2'")
            .fetch_one(&s.db)
            .await
            .unwrap();
        n.0
    };
    // The grant may be applied before the scheduler's transaction commits the advance.
    eventually("the scheduler advanced", Duration::from_secs(10), || async {
        next_period().await == 2
    })
    .await;
    // A crash after the grant was produced but before the advance committed: the scheduler
    // produces the same period again, and the rater applies it once.
    sqlx::query("UPDATE subscription_items SET next_period = 1, next_at = $1 WHERE customer_id = 'c-2'")
        .bind(boundary)
        .execute(&s.db)
        .await
        .unwrap();
    eventually("the scheduler re-ran the period", Duration::from_secs(10), || async {
        next_period().await == 2
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(s.balance(&key, "c-2").await, d("50000"));
    // Settled (after the restart the group rebalances first).
    eventually("both periods settled", Duration::from_secs(60), || async {
        let g = grants(&s, &key, "c-2", "plan").await;
        g.len() == 2 && g.iter().any(|g| g["status"] == "expired")
    })
    .await;
    let plan_grants = grants(&s, &key, "c-2", "plan").await;
    assert_eq!(plan_grants.len(), 2, "{plan_grants:?}");
    let periods: Vec<i64> = plan_grants
        .iter()
        .map(|g| g["metadata"]["period"].as_i64().unwrap())
        .collect();
    assert!(periods.contains(&0) && periods.contains(&1), "{periods:?}");
    let expired = plan_grants.iter().find(|g| g["metadata"]["period"] == 0).unwrap();
    assert_eq!(expired["status"], "expired", "{expired}");
    let (code, lines) = s.reconcile().await;
    assert_eq!(code, 0, "{lines:?}");
    s.cleanup().await;
}
