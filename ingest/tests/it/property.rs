//! The ledger's invariants by property, through the running services (issue 15): random
//! sequences of grants (active, scheduled, expiring), voids and usage (with and without its
//! quantity) are sent over HTTP, one customer per sequence, many sequences at once; once the
//! pipeline is quiet (every event settled, every due activation and expiry swept), each pool
//! must hold, against a plain reference model of the rules:
//! - every event's outcome (settled or denied) and the final balance are the model's;
//! - the sum of the pool's ledger amounts = its settled balance = its hot balance;
//! - each entry's end balance is the running sum of the pool's entries in ledger order;
//! - every grant's entry precedes every consumption of it (`reconcile --strict`).
//!
//! `PIPELINE_PROPTEST_CASES` sets the number of sequences (default 200).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use reqwest::Method;
use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::harness::Stack;

#[derive(Debug, Clone)]
enum Op {
    /// A grant of `cents`, effective `eff_ms` from now (0 = at once), expiring `exp_ms` after
    /// it takes effect (None = never).
    Grant {
        cents: i64,
        eff_ms: i64,
        exp_ms: Option<i64>,
    },
    /// Usage: `tokens` units of 0.01 credit (None = the quantity not sent: 1 unit).
    Use { tokens: Option<i64> },
    /// Void the n-th grant of the sequence (if there is one).
    Void { nth: usize },
    /// Let time pass.
    Wait { ms: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (100i64..1000, prop_oneof![Just(0i64), 1500i64..4000], proptest::option::of(2500i64..5000))
            .prop_map(|(cents, eff_ms, exp_ms)| Op::Grant { cents, eff_ms, exp_ms }),
        8 => proptest::option::of(1i64..400).prop_map(|tokens| Op::Use { tokens }),
        1 => (0usize..4).prop_map(|nth| Op::Void { nth }),
        2 => (200u64..1500).prop_map(|ms| Op::Wait { ms }),
    ]
}

/// A grant as the model sees it (cents).
#[derive(Debug, Clone)]
struct G {
    id: String,
    rem: i64,
    eff: DateTime<Utc>,
    exp: Option<DateTime<Utc>>,
    voided: bool,
    n: usize,
}

/// The reference: a hard limit; each event spends, in its timestamp's light, the grants
/// effective at it and not yet expired, sooner expiry first (never last), then earlier
/// effective, then older; more than is spendable is denied.
#[derive(Default)]
struct Model {
    grants: Vec<G>,
}

impl Model {
    fn spendable(g: &G, ts: DateTime<Utc>) -> bool {
        !g.voided && g.eff <= ts && g.exp.is_none_or(|e| ts < e)
    }
    fn charge(&mut self, ts: DateTime<Utc>, cost: i64) -> bool {
        let avail: i64 = self
            .grants
            .iter()
            .filter(|g| Self::spendable(g, ts))
            .map(|g| g.rem)
            .sum();
        if cost > avail {
            return false;
        }
        let mut order: Vec<usize> = (0..self.grants.len()).collect();
        order.sort_by_key(|&i| {
            let g = &self.grants[i];
            (
                g.exp.map_or(i64::MAX, |e| e.timestamp_millis()),
                g.eff.timestamp_millis(),
                g.n,
            )
        });
        let mut left = cost;
        for i in order {
            let g = &mut self.grants[i];
            if left > 0 && g.rem > 0 && Self::spendable(g, ts) {
                let take = g.rem.min(left);
                g.rem -= take;
                left -= take;
            }
        }
        true
    }
    /// The balance once every due activation and expiry has been swept, at `now`.
    fn balance(&self, now: DateTime<Utc>) -> i64 {
        self.grants
            .iter()
            .filter(|g| Self::spendable(g, now))
            .map(|g| g.rem)
            .sum()
    }
}

fn cents(d: Decimal) -> i64 {
    (d * Decimal::ONE_HUNDRED).round().try_into().unwrap()
}

/// Wait until `at` is not within the window around any expiry of `model` where the sweeper's
/// expiry and an event could pass each other (the event stamped just before the expiry but
/// rated after the sweeper's command).
async fn clear_of_expiries(model: &Model) {
    loop {
        let now = Utc::now();
        let near = model.grants.iter().filter_map(|g| g.exp).any(|e| {
            let d = (e - now).num_milliseconds();
            (-400..1500).contains(&d)
        });
        if !near {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Run one sequence for `customer`; returns the model and each event's expected outcome.
async fn run(s: &Stack, key: &str, customer: &str, ops: &[Op]) -> (Model, HashMap<String, bool>) {
    let mut m = Model::default();
    let mut outcomes = HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        match op {
            Op::Grant { cents, eff_ms, exp_ms } => {
                let now = Utc::now();
                let eff = now + chrono::Duration::milliseconds(*eff_ms);
                let exp = exp_ms.map(|x| eff + chrono::Duration::milliseconds(x));
                let mut body = json!({"customer_id": customer, "credit_type": "ai",
                    "amount": Decimal::new(*cents, 2).to_string(), "display_name": format!("g{i}")});
                if *eff_ms > 0 {
                    body["effective_at"] = json!(eff.to_rfc3339());
                }
                if let Some(e) = exp {
                    body["expires_at"] = json!(e.to_rfc3339());
                }
                let (st, b) = s.call(Method::POST, "/v1/credits/grants", key, Some(body)).await;
                assert!(st == 201 || st == 202, "{st} {b}");
                let g = &b["grant"];
                let parse = |v: &Value| v.as_str().map(|t| DateTime::parse_from_rfc3339(t).unwrap().to_utc());
                m.grants.push(G {
                    id: g["id"].as_str().unwrap().to_owned(),
                    rem: *cents,
                    eff: parse(&g["effective_at"]).unwrap(),
                    exp: parse(&g["expires_at"]),
                    voided: false,
                    n: m.grants.len(),
                });
            }
            Op::Use { tokens } => {
                clear_of_expiries(&m).await;
                let ts = Utc::now();
                let k = format!("{customer}-{i}");
                let mut ev = json!({"customer_id": customer, "event_name": "llm", "idempotency_key": k,
                    "timestamp": ts.to_rfc3339()});
                if let Some(t) = tokens {
                    ev["dimensions"] = json!({ "tokens": t });
                }
                let (st, b) = s.call(Method::POST, "/v1/events", key, Some(ev)).await;
                assert_eq!(st, 202, "{b}");
                let ok = m.charge(ts, tokens.unwrap_or(1));
                outcomes.insert(k, ok);
            }
            Op::Void { nth } => {
                let Some(g) = m.grants.get(*nth).cloned() else { continue };
                if g.voided {
                    continue;
                }
                clear_of_expiries(&m).await;
                // The grant's row exists once its fact settled.
                let started = Instant::now();
                loop {
                    let (st, b) = s
                        .call(Method::POST, &format!("/v1/credits/grants/{}/void", g.id), key, None)
                        .await;
                    if st == 200 {
                        break;
                    }
                    assert!(
                        st == 404 && started.elapsed() < Duration::from_secs(30),
                        "void: {st} {b}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                // An expired grant has nothing left to void; the model's state says the same.
                if g.exp.is_none_or(|e| Utc::now() < e) {
                    m.grants[*nth].voided = true;
                }
            }
            Op::Wait { ms } => tokio::time::sleep(Duration::from_millis(*ms)).await,
        }
    }
    (m, outcomes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_invariants_hold_for_random_sequences_through_the_pipeline() {
    let cases: usize = std::env::var("PIPELINE_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let s = Stack::start_with("property", 2, &[("LEDGER_WRITER_SWEEP_INTERVAL_MS", "200")]).await;
    let key = s.tenant("hard").await;
    let mut runner = TestRunner::default();
    let strategy = proptest::collection::vec(op(), 1..12);
    let seqs: Vec<Vec<Op>> = (0..cases)
        .map(|_| strategy.new_tree(&mut runner).unwrap().current())
        .collect();
    // Every sequence at once, each on a customer of its own.
    let runs = seqs.iter().enumerate().map(|(i, ops)| {
        let s = &s;
        let key = &key;
        async move { run(s, key, &format!("p{i}"), ops).await }
    });
    let results = futures::future::join_all(runs).await;
    // Quiet: every event settled, every grant due to activate or expire swept.
    let events: usize = results.iter().map(|(_, o)| o.len()).sum();
    s.wait_settled(events as i64, 0, Duration::from_secs(120)).await;
    let last = results
        .iter()
        .flat_map(|(m, _)| m.grants.iter().flat_map(|g| [Some(g.eff), g.exp]).flatten())
        .max()
        .unwrap_or_else(Utc::now);
    if let Ok(d) = (last - Utc::now()).to_std() {
        tokio::time::sleep(d).await;
    }
    let started = Instant::now();
    loop {
        let due: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM grants WHERE status = 'active'
               AND ((expires_at IS NOT NULL AND expires_at <= now()) OR (NOT activated AND effective_at <= now()))",
        )
        .fetch_one(&s.db)
        .await
        .unwrap();
        if due == 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{due} grants not swept");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let now = Utc::now();
    let statuses: HashMap<String, String> = sqlx::query_as("SELECT idempotency_key, status FROM usage_events")
        .fetch_all(&s.db)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let pg: HashMap<String, Decimal> = sqlx::query_as("SELECT customer_id, balance FROM pools")
        .fetch_all(&s.db)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let mut failures = Vec::new();
    for (i, ((m, outcomes), ops)) in results.iter().zip(&seqs).enumerate() {
        let c = format!("p{i}");
        let mut why = Vec::new();
        for (k, ok) in outcomes {
            let want = if *ok { "settled" } else { "denied" };
            if statuses.get(k).map(String::as_str) != Some(want) {
                why.push(format!("{k}: {:?}, model {want}", statuses.get(k)));
            }
        }
        let want = m.balance(now);
        let settled = pg.get(&c).copied().map(cents).unwrap_or(0);
        let (_, b) = s
            .call(
                Method::GET,
                &format!("/v1/credits/balance?customer_id={c}&credit_type=ai"),
                &key,
                None,
            )
            .await;
        let hot = cents(b["balance"].as_str().unwrap().parse().unwrap());
        // The ledger, oldest first: the chain and the sum.
        let (_, page) = s
            .call(
                Method::GET,
                &format!("/v1/credits/ledger?customer_id={c}&credit_type=ai&limit=1000"),
                &key,
                None,
            )
            .await;
        let mut sum = 0i64;
        let mut chain_ok = true;
        for e in page["entries"].as_array().unwrap().iter().rev() {
            sum += cents(e["amount"].as_str().unwrap().parse().unwrap());
            chain_ok &= cents(e["end_balance"].as_str().unwrap().parse().unwrap()) == sum;
        }
        if !chain_ok {
            why.push("end balances are not the running sum".into());
        }
        if (want, want, want) != (settled, hot, sum) {
            why.push(format!(
                "balance: model {want}, Postgres {settled}, hot {hot}, ledger sum {sum}"
            ));
        }
        if !why.is_empty() {
            failures.push(format!("{c} {ops:?}: {}; ledger {}", why.join("; "), page["entries"]));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {cases} sequences broke an invariant:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let (code, diffs) = s.reconcile_strict().await;
    assert_eq!((code, diffs.len()), (0, 0), "{diffs:?}");
    s.cleanup().await;
}
