//! The ledger's invariants by property, through the running services (issue 15): random
//! sequences of grants (active, scheduled, expiring), voids, usage (with and without its
//! quantity), limit changes (hard, soft, back to the credit type's), new price versions of the
//! sequence's feature and sweeps by an injectable clock (`ledger-writer sweep --at`, ahead of
//! time) are sent over HTTP, one customer per sequence, many sequences at once; once the
//! pipeline is quiet (every event settled, every due activation and expiry swept), each pool
//! must hold, against a plain reference model of the rules:
//! - every event's outcome (settled or denied) and the final balance are the model's, with
//!   each event priced by the version in force at its timestamp;
//! - the sum of the pool's ledger amounts = its settled balance = its hot balance;
//! - each entry's end balance is the running sum of the pool's entries in ledger order;
//! - every grant's entry precedes every consumption of it (`reconcile --strict`);
//! - every threshold (below 5 credits, depleted) fires once per crossing of the pool's ledger
//!   balance path and recovers once, whatever the batching.
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
    /// Usage of the sequence's feature: `tokens` units (None = the quantity not sent: 1 unit).
    Use { tokens: Option<i64> },
    /// Void the n-th grant of the sequence (if there is one).
    Void { nth: usize },
    /// Let time pass.
    Wait { ms: u64 },
    /// A new price version of the sequence's feature, `k` cents per unit, effective `in_ms`
    /// from now (a version may not be back-dated once a price is in force).
    Price { k: i64, in_ms: i64 },
    /// The pool's limit: Some(true) soft, Some(false) hard, None back to the credit type's
    /// (hard).
    Limit { soft: Option<bool> },
    /// A sweep by the injectable clock, `ahead_ms` ahead of now: the customer's grants due by
    /// then expire or activate at once.
    Sweep { ahead_ms: i64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (100i64..2000, prop_oneof![Just(0i64), 1500i64..4000], proptest::option::of(2500i64..5000))
            .prop_map(|(cents, eff_ms, exp_ms)| Op::Grant { cents, eff_ms, exp_ms }),
        8 => proptest::option::of(1i64..100).prop_map(|tokens| Op::Use { tokens }),
        1 => (0usize..4).prop_map(|nth| Op::Void { nth }),
        2 => (200u64..1500).prop_map(|ms| Op::Wait { ms }),
        1 => (1i64..4, 2000i64..4000).prop_map(|(k, in_ms)| Op::Price { k, in_ms }),
        2 => prop_oneof![2 => Just(Some(true)), 1 => Just(Some(false)), 1 => Just(None)]
            .prop_map(|soft| Op::Limit { soft }),
        1 => (0i64..8000).prop_map(|ahead_ms| Op::Sweep { ahead_ms }),
    ]
}

/// A grant as the model sees it (cents).
#[derive(Debug, Clone)]
struct G {
    id: String,
    rem: i64,
    eff: DateTime<Utc>,
    exp: Option<DateTime<Utc>>,
    /// Effective later than created: it enters the ledger when activated.
    sched: bool,
    activated: bool,
    /// Voided or expired.
    ended: bool,
    n: usize,
}

impl G {
    fn entered(&self) -> bool {
        !self.ended && (!self.sched || self.activated)
    }
    fn spendable(&self, ts: DateTime<Utc>) -> bool {
        !self.ended && self.eff <= ts && self.exp.is_none_or(|e| ts < e)
    }
}

/// The reference, written plainly from the seeds' rules: each event spends, in its timestamp's
/// light, the grants effective at it and not yet ended, sooner expiry first (never last), then
/// earlier effective, then older; a scheduled grant enters the ledger when it is activated (at
/// its effective time, or by the first event that draws on it) and repays overdraft first, as
/// does a grant active at once; under a hard limit more than the balance is denied, under a
/// soft one the rest is overdraft; a price is the version in force at the event's timestamp.
struct Model {
    grants: Vec<G>,
    od: i64,
    soft: bool,
    /// (effective, cents per unit), the first from the beginning of time.
    prices: Vec<(DateTime<Utc>, i64)>,
}

impl Model {
    fn new() -> Self {
        Model {
            grants: Vec::new(),
            od: 0,
            soft: false,
            prices: vec![(DateTime::<Utc>::MIN_UTC, 1)],
        }
    }
    fn price(&self, ts: DateTime<Utc>) -> i64 {
        self.prices
            .iter()
            .filter(|(e, _)| *e <= ts)
            .max_by_key(|(e, _)| *e)
            .unwrap()
            .1
    }
    /// The consumption order.
    fn order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.grants.len()).collect();
        order.sort_by_key(|&i| {
            let g = &self.grants[i];
            (
                g.exp.map_or(i64::MAX, |e| e.timestamp_millis()),
                g.eff.timestamp_millis(),
                g.n,
            )
        });
        order
    }
    fn activate(&mut self, i: usize) {
        let g = &mut self.grants[i];
        let repaid = self.od.min(g.rem);
        g.rem -= repaid;
        self.od -= repaid;
        g.activated = true;
    }
    /// What a sweep at `at` does: activations at their effective time, expiries at theirs, in
    /// time order (the sweeper claims in effective order and activates before it expires).
    fn sweep(&mut self, at: DateTime<Utc>) {
        let mut due: Vec<(DateTime<Utc>, u8, usize)> = Vec::new();
        for (i, g) in self.grants.iter().enumerate() {
            if g.ended {
                continue;
            }
            if g.sched && !g.activated && g.eff <= at {
                due.push((g.eff, 0, i));
            }
            if let Some(e) = g.exp.filter(|e| *e <= at) {
                due.push((e, 1, i));
            }
        }
        due.sort();
        for (_, kind, i) in due {
            if kind == 0 {
                self.activate(i);
            } else {
                self.grants[i].ended = true;
                self.grants[i].rem = 0;
            }
        }
    }
    fn grant(&mut self, g: G) {
        let mut g = g;
        if !g.sched {
            let repaid = self.od.min(g.rem);
            g.rem -= repaid;
            self.od -= repaid;
        }
        self.grants.push(g);
    }
    fn charge(&mut self, ts: DateTime<Utc>, cost: i64) -> bool {
        let avail: i64 = self
            .grants
            .iter()
            .filter(|g| g.spendable(ts))
            .map(|g| g.rem)
            .sum::<i64>()
            - self.od;
        if !self.soft && cost > avail {
            return false;
        }
        let order = self.order();
        // Scheduled grants the event draws on enter first (repaying overdraft).
        let mut l = cost;
        for &i in &order {
            if l <= 0 {
                break;
            }
            if self.grants[i].rem > 0 && self.grants[i].spendable(ts) {
                if !self.grants[i].entered() {
                    self.activate(i);
                }
                l -= self.grants[i].rem.min(l);
            }
        }
        let mut left = cost;
        for &i in &order {
            let g = &mut self.grants[i];
            if left > 0 && g.rem > 0 && g.spendable(ts) {
                let take = g.rem.min(left);
                g.rem -= take;
                left -= take;
            }
        }
        self.od += left;
        true
    }
    /// The ledger balance.
    fn balance(&self) -> i64 {
        self.grants.iter().filter(|g| g.entered()).map(|g| g.rem).sum::<i64>() - self.od
    }
}

/// The threshold messages a pool's balance path (its end balances in ledger order, cents, from
/// an empty pool) must give: below 5 credits and depleted (at or below 0) each fire when the
/// balance crosses to their side and recover when it leaves it; one already crossed when the
/// pool starts (empty, so both) fires only after a recovery.
type Crossed = fn(i64) -> bool;

fn crossings(path: &[i64]) -> Vec<(String, bool)> {
    let th: [(&str, Crossed); 2] = [("balance_below:5", |b| b < 500), ("depleted:", |b| b <= 0)];
    let mut out = Vec::new();
    let mut fired = [false; 2];
    let mut prev = 0i64;
    for &b in path {
        for (i, (key, crossed)) in th.iter().enumerate() {
            if fired[i] && !crossed(b) {
                out.push((key.to_string(), false));
                fired[i] = false;
            } else if !fired[i] && crossed(b) && !crossed(prev) {
                out.push((key.to_string(), true));
                fired[i] = true;
            }
        }
        prev = b;
    }
    out
}

fn cents(d: Decimal) -> i64 {
    (d * Decimal::ONE_HUNDRED).round().try_into().unwrap()
}

/// Wait until no activation or expiry the sweeper has yet to make is near (due within 1.5 s:
/// an operation and the sweeper's command could pass each other, e.g. an event stamped just
/// before an expiry but rated after the command, or a grant created as another activates and
/// repays overdraft), and until every one already due has settled (so its command went into
/// the topic ahead of what comes next). Then the model makes every activation and expiry due.
async fn clear_of_sweeps(s: &Stack, customer: &str, m: &mut Model) -> DateTime<Utc> {
    let started = Instant::now();
    loop {
        let now = Utc::now();
        let soon = |t: DateTime<Utc>| (-100..1500).contains(&(t - now).num_milliseconds());
        let live = || m.grants.iter().filter(|g| !g.ended);
        let busy = live().any(|g| (g.sched && !g.activated && soon(g.eff)) || g.exp.is_some_and(soon));
        let due_act: Vec<&str> = live()
            .filter(|g| g.sched && !g.activated && g.eff <= now)
            .map(|g| g.id.as_str())
            .collect();
        let due_exp: Vec<&str> = live()
            .filter(|g| g.exp.is_some_and(|e| e <= now))
            .map(|g| g.id.as_str())
            .collect();
        let mut done = true;
        if !busy && (!due_act.is_empty() || !due_exp.is_empty()) {
            let rows: Vec<(String, bool, String)> =
                sqlx::query_as("SELECT id::text, activated, status FROM grants WHERE customer_id = $1")
                    .bind(customer)
                    .fetch_all(&s.db)
                    .await
                    .unwrap();
            let row = |id: &str| rows.iter().find(|r| r.0 == id);
            done = due_act.iter().all(|id| row(id).is_some_and(|r| r.1))
                && due_exp
                    .iter()
                    // A grant used up before it expires stays `depleted` (nothing to expire).
                    .all(|id| row(id).is_some_and(|r| matches!(r.2.as_str(), "expired" | "voided" | "depleted")));
        }
        if !busy && done {
            m.sweep(now);
            return now;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "sweeps of {customer} not settled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Run one sequence for `customer` (its own feature, `f-<customer>`); returns the model and
/// each event's expected outcome.
async fn run(s: &Stack, key: &str, tenant: &str, customer: &str, ops: &[Op]) -> (Model, HashMap<String, bool>) {
    let mut m = Model::new();
    let mut outcomes = HashMap::new();
    let feature = format!("f-{customer}");
    let mapping = |k: i64, at: Option<DateTime<Utc>>| {
        let mut b = json!({"credit_type": "ai", "credits_per_unit": Decimal::new(k, 2).to_string(),
                           "quantity_dimension": "tokens"});
        if let Some(at) = at {
            b["effective_at"] = json!(at.to_rfc3339());
        }
        b
    };
    let path = format!("/v1/features/{feature}/credit-mapping");
    let (st, b) = s
        .call(
            Method::PUT,
            &path,
            key,
            Some(mapping(
                1,
                DateTime::parse_from_rfc3339("2000-01-01T00:00:00Z")
                    .ok()
                    .map(|t| t.to_utc()),
            )),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    let parse = |v: &Value| v.as_str().map(|t| DateTime::parse_from_rfc3339(t).unwrap().to_utc());
    for (i, op) in ops.iter().enumerate() {
        if !matches!(op, Op::Wait { .. }) {
            clear_of_sweeps(s, customer, &mut m).await;
        }
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
                let n = m.grants.len();
                m.grant(G {
                    id: g["id"].as_str().unwrap().to_owned(),
                    rem: *cents,
                    eff: parse(&g["effective_at"]).unwrap(),
                    exp: parse(&g["expires_at"]),
                    sched: *eff_ms > 0,
                    activated: false,
                    ended: false,
                    n,
                });
            }
            Op::Use { tokens } => {
                let ts = Utc::now();
                let k = format!("{customer}-{i}");
                let mut ev = json!({"customer_id": customer, "event_name": feature, "idempotency_key": k,
                    "timestamp": ts.to_rfc3339()});
                if let Some(t) = tokens {
                    ev["dimensions"] = json!({ "tokens": t });
                }
                let (st, b) = s.call(Method::POST, "/v1/events", key, Some(ev)).await;
                assert_eq!(st, 202, "{b}");
                let cost = tokens.unwrap_or(1) * m.price(ts);
                let ok = m.charge(ts, cost);
                outcomes.insert(k, ok);
            }
            Op::Void { nth } => {
                let Some(g) = m.grants.get(*nth).cloned() else { continue };
                if g.ended {
                    continue;
                }
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
                m.grants[*nth].ended = true;
                m.grants[*nth].rem = 0;
            }
            Op::Wait { ms } => tokio::time::sleep(Duration::from_millis(*ms)).await,
            Op::Price { k, in_ms } => {
                let at = Utc::now() + chrono::Duration::milliseconds(*in_ms);
                let (st, b) = s.call(Method::PUT, &path, key, Some(mapping(*k, Some(at)))).await;
                assert_eq!(st, 200, "{b}");
                m.prices.push((parse(&b["effective_at"]).unwrap(), *k));
            }
            Op::Limit { soft } => {
                let limit = soft.map(|x| if x { "soft" } else { "hard" });
                let (st, b) = s
                    .call(
                        Method::PUT,
                        "/v1/credits/limits",
                        key,
                        Some(json!({"customer_id": customer, "credit_type": "ai", "limit": limit})),
                    )
                    .await;
                assert_eq!(st, 200, "{b}");
                m.soft = soft.unwrap_or(false);
            }
            Op::Sweep { ahead_ms } => {
                // The sweeper sees the grants that settled: wait for the sequence's.
                let started = Instant::now();
                loop {
                    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM grants WHERE customer_id = $1")
                        .bind(customer)
                        .fetch_one(&s.db)
                        .await
                        .unwrap();
                    if n as usize == m.grants.len() {
                        break;
                    }
                    assert!(started.elapsed() < Duration::from_secs(30), "grants not settled");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                clear_of_sweeps(s, customer, &mut m).await;
                let at = Utc::now() + chrono::Duration::milliseconds(*ahead_ms);
                // The expiries this sweep applies ahead of their time: a use timestamped before
                // one of them may still draw on that grant (event time), which the model does
                // not follow (README, Known gaps); the sequence goes on once they have passed.
                let ahead: Option<DateTime<Utc>> = m
                    .grants
                    .iter()
                    .filter(|g| !g.ended)
                    .filter_map(|g| g.exp)
                    .filter(|e| *e <= at && *e > Utc::now())
                    .max();
                s.sweep_at(at, tenant, customer).await;
                m.sweep(at);
                if let Some(e) = ahead {
                    let wait = (e - Utc::now()).num_milliseconds() + 300;
                    if wait > 0 {
                        tokio::time::sleep(Duration::from_millis(wait as u64)).await;
                    }
                }
            }
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
    let tenant: String = sqlx::query_scalar("SELECT tenant_id FROM credit_types WHERE id = 'ai'")
        .fetch_one(&s.db)
        .await
        .unwrap();
    // Thresholds: every pool alerts below 5 credits (and when depleted, always on). An
    // endpoint makes the ledger-writer record them (nothing listens there; delivery is not
    // what this test checks).
    let (st, b) = s
        .call(
            Method::POST,
            "/v1/webhooks/endpoints",
            &key,
            Some(json!({"url": "http://127.0.0.1:9/nothing"})),
        )
        .await;
    assert_eq!(st, 201, "{b}");
    let (st, b) = s
        .call(
            Method::PUT,
            "/v1/credits/alerts/defaults",
            &key,
            Some(json!({"credit_type": "ai", "balance_below": ["5"]})),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    let mut runner = TestRunner::default();
    let strategy = proptest::collection::vec(op(), 1..12);
    let seqs: Vec<Vec<Op>> = (0..cases)
        .map(|_| strategy.new_tree(&mut runner).unwrap().current())
        .collect();
    // Every sequence at once, each on a customer of its own.
    let runs = seqs.iter().enumerate().map(|(i, ops)| {
        let s = &s;
        let key = &key;
        let tenant = &tenant;
        async move { run(s, key, tenant, &format!("p{i}"), ops).await }
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
    let mut results = results;
    for (m, _) in results.iter_mut() {
        m.sweep(now);
    }
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
    // What the run exercised, so a reader can see the sequences were not trivial.
    let mut kinds: std::collections::BTreeMap<&str, usize> = Default::default();
    for op in seqs.iter().flatten() {
        let k = match op {
            Op::Grant { eff_ms: 0, .. } => "grant",
            Op::Grant { .. } => "scheduled grant",
            Op::Use { .. } => "use",
            Op::Void { .. } => "void",
            Op::Wait { .. } => "wait",
            Op::Price { .. } => "price version",
            Op::Limit { .. } => "limit change",
            Op::Sweep { .. } => "sweep ahead",
        };
        *kinds.entry(k).or_default() += 1;
    }
    let settled = results.iter().flat_map(|(_, o)| o.values()).filter(|ok| **ok).count();
    let overdrawn = results.iter().filter(|(m, _)| m.od > 0).count();
    eprintln!(
        "property: {cases} sequences, ops {kinds:?}; {events} events ({settled} settled, {} denied); {overdrawn} pools end in overdraft",
        events - settled
    );
    // Each pool's threshold messages, in the order they were recorded: (threshold, fired?).
    let mut alerts: HashMap<String, Vec<(String, bool)>> = HashMap::new();
    let bodies: Vec<String> =
        sqlx::query_scalar("SELECT body FROM webhook_messages WHERE type LIKE 'credits.balance.%' ORDER BY id")
            .fetch_all(&s.db)
            .await
            .unwrap();
    for b in bodies {
        let m: Value = serde_json::from_str(&b).unwrap();
        let t = &m["data"]["threshold"];
        let key = format!("{}:{}", t["type"].as_str().unwrap(), t["value"].as_str().unwrap_or(""));
        alerts
            .entry(m["data"]["customer_id"].as_str().unwrap().to_owned())
            .or_default()
            .push((key, m["type"] != "credits.balance.recovered"));
    }
    eprintln!(
        "property: {} threshold messages (fired and recovered) in {} pools",
        alerts.values().map(Vec::len).sum::<usize>(),
        alerts.len()
    );
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
        let want = m.balance();
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
        let mut path = Vec::new();
        for e in page["entries"].as_array().unwrap().iter().rev() {
            sum += cents(e["amount"].as_str().unwrap().parse().unwrap());
            let end = cents(e["end_balance"].as_str().unwrap().parse().unwrap());
            chain_ok &= end == sum;
            path.push(end);
        }
        if !chain_ok {
            why.push("end balances are not the running sum".into());
        }
        // Every threshold fires once per crossing of the ledger's balance path and recovers
        // once, whatever the batching.
        let want_alerts = crossings(&path);
        let got = alerts.remove(&c).unwrap_or_default();
        for th in ["balance_below:5", "depleted:"] {
            let w: Vec<bool> = want_alerts.iter().filter(|(k, _)| k == th).map(|(_, f)| *f).collect();
            let g: Vec<bool> = got.iter().filter(|(k, _)| k == th).map(|(_, f)| *f).collect();
            if w != g {
                why.push(format!(
                    "{th} alerts (true = fired): got {g:?}, the balance path gives {w:?}"
                ));
            }
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
