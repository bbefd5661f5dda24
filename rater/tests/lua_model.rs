//! apply.lua against a plain Rust reference model, on a real Redis: random sequences of grants
//! (priority, category, effective/expiry times), usage with repeated keys, voids, expiries and
//! activations, under hard and soft limits, split into random Lua calls, and every call
//! redelivered once (the journal must answer with the same results and change nothing).
//! `PROPTEST_CASES` sets the number of cases (default 2000).

use std::collections::{HashMap, HashSet};

use chrono::DateTime;
use proptest::prelude::*;
use rater::pools::{Activation, Op, OpResult, Part, PoolOp, PoolOps, PoolStore};
use shared::hot_pool::OrderKey;
use shared::keys::Keys;
use shared::model::{Category, LimitKind, PoolId};
use uuid::Uuid;

#[derive(Debug, Clone)]
enum Step {
    Grant {
        prio: u32,
        promo: bool,
        eff: i64,
        exp: Option<i64>,
        amount: i64,
    },
    Use {
        key: u8,
        cost: i64,
        ts: i64,
    },
    Void {
        grant: usize,
    },
    Expire {
        grant: usize,
    },
    Activate {
        grant: usize,
    },
    /// The pool's limit override: 0 = back to the credit type's, 1 = hard, 2 = soft.
    Limit {
        kind: u8,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0u32..3, any::<bool>(), 0i64..20, proptest::option::of(5i64..40), 1i64..50)
            .prop_map(|(prio, promo, eff, exp, amount)| Step::Grant { prio, promo, eff, exp: exp.map(|e| eff + e), amount }),
        6 => (0u8..12, 0i64..30, 0i64..60).prop_map(|(key, cost, ts)| Step::Use { key, cost, ts }),
        1 => (0usize..8).prop_map(|grant| Step::Void { grant }),
        1 => (0usize..8).prop_map(|grant| Step::Expire { grant }),
        1 => (0usize..8).prop_map(|grant| Step::Activate { grant }),
        1 => (0u8..3).prop_map(|kind| Step::Limit { kind }),
    ]
}

#[derive(Debug, Clone)]
struct G {
    id: Uuid,
    key: String,
    eff: i64,
    exp: i64,
    rem: i64,
    ended: bool,
    activated: bool,
    /// Effective after it was created: it enters the ledger when activated.
    sched: bool,
}

/// The reference: the same rules as apply.lua, written plainly.
#[derive(Default)]
struct Model {
    grants: Vec<G>,
    od: i64,
    seen: HashSet<u8>,
    /// The per-pool override: Some(true) = hard.
    lim: Option<bool>,
}

impl Model {
    fn sorted(&mut self) {
        self.grants.sort_by(|a, b| a.key.cmp(&b.key));
    }
    fn spendable(g: &G, ts: i64) -> bool {
        g.eff <= ts && ts < g.exp
    }
    /// In the ledger: granted active, or scheduled and activated; not ended.
    fn entered(g: &G) -> bool {
        !g.ended && (!g.sched || g.activated)
    }
    /// The balance the ledger shows (end balances): what entered it, minus overdraft.
    fn ledger_balance(&self) -> i64 {
        self.grants
            .iter()
            .filter(|g| Self::entered(g))
            .map(|g| g.rem)
            .sum::<i64>()
            - self.od
    }
    fn balance(&self, ts: i64) -> i64 {
        self.grants
            .iter()
            .filter(|g| Self::spendable(g, ts))
            .map(|g| g.rem)
            .sum::<i64>()
            - self.od
    }
    fn apply(&mut self, op: &Op, hard: bool) -> OpResult {
        let ts = op.ts_ms;
        let hard = self.lim.unwrap_or(hard);
        match &op.op {
            PoolOp::Usage { idempotency_key, cost } => {
                let key: u8 = idempotency_key.parse().unwrap();
                if !self.seen.insert(key) {
                    return OpResult::Duplicate;
                }
                let cost: i64 = *cost;
                let avail = self.balance(ts);
                if hard && cost > avail {
                    return OpResult::Denied {
                        end: self.ledger_balance(),
                        reason: "insufficient_balance".into(),
                    };
                }
                let (mut left, mut bal, mut parts) = (cost, self.ledger_balance(), Vec::new());
                let mut activated = Vec::new();
                // Scheduled grants the event draws on enter the ledger first, whole (repaying
                // overdraft), before any of its consumption.
                let mut l = cost;
                for g in self.grants.iter_mut() {
                    if l <= 0 {
                        break;
                    }
                    if g.rem > 0 && Self::spendable(g, ts) {
                        if !Self::entered(g) {
                            let whole = g.rem;
                            let repaid = self.od.min(g.rem);
                            g.rem -= repaid;
                            self.od -= repaid;
                            g.activated = true;
                            bal += whole;
                            activated.push(Activation {
                                grant_id: g.id,
                                amount: whole,
                                end: bal,
                                repaid,
                                effective_ms: g.eff,
                            });
                        }
                        l -= g.rem.min(l);
                    }
                }
                for g in self.grants.iter_mut() {
                    if left <= 0 {
                        break;
                    }
                    if g.rem > 0 && Self::spendable(g, ts) {
                        let take = g.rem.min(left);
                        g.rem -= take;
                        left -= take;
                        bal -= take;
                        parts.push(Part {
                            grant_id: Some(g.id),
                            delta: -take,
                            end: bal,
                        });
                    }
                }
                if left > 0 {
                    self.od += left;
                    bal -= left;
                    parts.push(Part {
                        grant_id: None,
                        delta: -left,
                        end: bal,
                    });
                }
                OpResult::Charged {
                    end: bal,
                    parts,
                    activated,
                }
            }
            PoolOp::Grant {
                grant_id,
                amount,
                order,
            } => {
                let id: Uuid = *grant_id;
                let amt: i64 = *amount;
                let k = &order.to_string();
                let mut g = G {
                    id,
                    key: k.clone(),
                    exp: k[5..18].parse().unwrap(),
                    eff: k[21..34].parse().unwrap(),
                    rem: amt,
                    ended: false,
                    activated: false,
                    sched: k[21..34] > k[35..48],
                };
                let repaid = if Self::spendable(&g, ts) { self.od.min(amt) } else { 0 };
                g.rem -= repaid;
                self.od -= repaid;
                let remaining = g.rem;
                self.grants.push(g);
                self.sorted();
                OpResult::Granted {
                    end: self.ledger_balance(),
                    remaining,
                    repaid,
                }
            }
            PoolOp::Void { grant_id } | PoolOp::Expire { grant_id } => {
                let id: Uuid = *grant_id;
                let Some(g) = self.grants.iter_mut().find(|g| g.id == id) else {
                    return OpResult::NotApplied;
                };
                if g.ended || (matches!(op.op, PoolOp::Expire { .. }) && ts < g.exp) {
                    return OpResult::NotApplied;
                }
                // Nothing leaves the ledger for a scheduled grant that never entered it.
                let removed = if Self::entered(g) { g.rem } else { 0 };
                g.rem = 0;
                g.ended = true;
                OpResult::Voided {
                    end: self.ledger_balance(),
                    removed,
                }
            }
            PoolOp::Activate { grant_id } => {
                let id: Uuid = *grant_id;
                let od = self.od;
                let Some(g) = self.grants.iter_mut().find(|g| g.id == id) else {
                    return OpResult::NotApplied;
                };
                if g.ended || g.activated || !g.sched || ts < g.eff {
                    return OpResult::NotApplied;
                }
                let repaid = od.min(g.rem);
                g.rem -= repaid;
                g.activated = true;
                let remaining = g.rem;
                self.od -= repaid;
                OpResult::Activated {
                    end: self.ledger_balance(),
                    remaining,
                    repaid,
                }
            }
            PoolOp::Limit { limit } => {
                self.lim = match limit {
                    Some(LimitKind::Hard) => Some(true),
                    Some(LimitKind::Soft) => Some(false),
                    None => None,
                };
                OpResult::LimitSet
            }
            _ => unreachable!(),
        }
    }
}

fn ops(steps: &[Step]) -> Vec<Op> {
    let t = |s: i64| DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap();
    let mut ids: Vec<Uuid> = Vec::new();
    let mut out = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        let (op, ts) = match s {
            Step::Grant {
                prio,
                promo,
                eff,
                exp,
                amount,
            } => {
                let id = Uuid::from_u128(i as u128 + 1);
                ids.push(id);
                let cat = if *promo { Category::Promo } else { Category::Paid };
                // Created "now" (ts 10): a grant effective later is scheduled.
                let order = OrderKey::new(*prio, exp.map(t), cat, t(*eff), t(10), id);
                (
                    PoolOp::Grant {
                        grant_id: id,
                        amount: *amount,
                        order,
                    },
                    t(10).timestamp_millis(),
                )
            }
            Step::Limit { kind } => (
                PoolOp::Limit {
                    limit: [None, Some(LimitKind::Hard), Some(LimitKind::Soft)][*kind as usize],
                },
                t(20).timestamp_millis(),
            ),
            Step::Use { key, cost, ts } => (
                PoolOp::Usage {
                    idempotency_key: key.to_string(),
                    cost: *cost,
                },
                t(*ts).timestamp_millis(),
            ),
            Step::Void { grant } | Step::Expire { grant } | Step::Activate { grant } => {
                let Some(grant_id) = ids.get(*grant % ids.len().max(1)).copied() else {
                    continue;
                };
                let (op, at) = match s {
                    Step::Void { .. } => (PoolOp::Void { grant_id }, t(30)),
                    Step::Expire { .. } => (PoolOp::Expire { grant_id }, t(45)),
                    _ => (PoolOp::Activate { grant_id }, t(25)),
                };
                (op, at.timestamp_millis())
            }
        };
        out.push(Op {
            msg: i,
            offset: i as i64,
            ts_ms: ts,
            id: format!("m{i}"),
            op,
        });
    }
    out
}

/// The ledger entries a reply becomes, in order: each end balance is the running sum of the
/// pool's entries (a scheduled grant writes none until it is activated).
fn chain(ledger: &mut i64, op: &Op, r: &OpResult) {
    let mut entry = |amount: i64, end: i64| {
        *ledger += amount;
        assert_eq!(
            end, *ledger,
            "end balance off the ledger's running sum: {op:?} -> {r:?}"
        );
    };
    match r {
        OpResult::Charged { parts, activated, .. } => {
            for a in activated {
                entry(a.amount, a.end);
            }
            for p in parts {
                entry(p.delta, p.end);
            }
        }
        OpResult::Denied { end, .. } => entry(0, *end),
        OpResult::Granted { end, .. } => {
            let PoolOp::Grant { amount, order, .. } = &op.op else {
                panic!("granted: {op:?}")
            };
            let c = order.to_string();
            let scheduled = c[21..34] > c[35..48];
            entry(if scheduled { 0 } else { *amount }, *end)
        }
        OpResult::Voided { end, removed } => entry(-removed, *end),
        OpResult::Activated { end, remaining, repaid } => entry(remaining + repaid, *end),
        _ => {}
    }
}

fn run_case(store: &PoolStore, rt: &tokio::runtime::Runtime, steps: Vec<Step>, cuts: Vec<usize>, hard: bool) {
    let ops = ops(&steps);
    let customer = Uuid::new_v4().simple().to_string();
    let pool = PoolId {
        tenant_id: "prop".into(),
        customer_id: customer,
        resource_id: String::new(),
        credit_type: "ai".into(),
    };
    let pool_key = store
        .keys
        .pool(&pool.tenant_id, &pool.customer_id, &pool.credit_type, &pool.resource_id);
    rt.block_on(async {
        let mut con = store.redis.clone();
        let _: () = redis::cmd("HSET")
            .arg(&pool_key)
            .arg("off")
            .arg(-1)
            .arg("od")
            .arg(0)
            .query_async(&mut con)
            .await
            .unwrap();
    });
    let mut model = Model::default();
    let mut ledger = 0i64;
    let mut start = 0;
    let mut bounds: Vec<usize> = cuts.into_iter().map(|c| c % (ops.len() + 1)).collect();
    bounds.push(ops.len());
    bounds.sort();
    for end in bounds {
        if end <= start {
            continue;
        }
        let chunk = PoolOps {
            pool: pool.clone(),
            partition: 0,
            decimals: 0,
            hard,
            ops: ops[start..end].to_vec(),
        };
        let expected: Vec<OpResult> = chunk.ops.iter().map(|op| model.apply(op, hard)).collect();
        for (op, r) in chunk.ops.iter().zip(&expected) {
            chain(&mut ledger, op, r);
        }
        for attempt in 0..2 {
            // The second time is a redelivery: same offsets, same answers, no change.
            let got = rt
                .block_on(store.apply(std::slice::from_ref(&chunk), &HashMap::new(), || async { Ok(()) }))
                .unwrap();
            let got: Vec<OpResult> = got[0].iter().map(|(_, r)| r.clone()).collect();
            assert_eq!(got, expected, "ops {:?} (attempt {attempt})", &chunk.ops);
        }
        start = end;
    }
    // The final state: every grant's remaining and the overdraft.
    let state: HashMap<String, String> = rt.block_on(async {
        let mut con = store.redis.clone();
        let h = redis::cmd("HGETALL")
            .arg(&pool_key)
            .query_async(&mut con)
            .await
            .unwrap();
        let _: () = redis::cmd("DEL")
            .arg(&pool_key)
            .arg(store.keys.journal(&pool_key))
            .query_async(&mut con)
            .await
            .unwrap();
        h
    });
    for g in &model.grants {
        assert_eq!(
            state.get(&format!("r:{}", g.id)).map(String::as_str),
            Some(g.rem.to_string().as_str()),
            "remaining of {}",
            g.id
        );
    }
    assert_eq!(
        state.get("od").map(String::as_str),
        Some(model.od.to_string().as_str()),
        "overdraft"
    );
}

#[test]
fn apply_lua_matches_the_reference_model() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let prefix = format!("prop_{}", Uuid::new_v4().simple());
    let store = rt.block_on(async {
        let redis = shared::testkit::redis_conn().await;
        PoolStore {
            redis,
            keys: Keys::new(prefix.clone()),
            db: sqlx::PgPool::connect_lazy("postgres://unused@127.0.0.1/unused").unwrap(),
            dedupe_window_s: 600,
            wait_replicas: 0,
        }
    });
    rt.block_on(store.load_scripts()).unwrap();
    rt.block_on(store.set_sentinel()).unwrap();
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(2000);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases,
        ..ProptestConfig::default()
    });
    let strategy = (
        proptest::collection::vec(step(), 1..40),
        proptest::collection::vec(0usize..40, 0..4),
        any::<bool>(),
    );
    let result = runner.run(&strategy, |(steps, cuts, hard)| {
        run_case(&store, &rt, steps, cuts, hard);
        Ok(())
    });
    // Clean up this test's keys whatever happened.
    rt.block_on(async {
        let mut con = store.redis.clone();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}:*"))
            .query_async(&mut con)
            .await
            .unwrap_or_default();
        for k in keys {
            let _: Result<(), _> = redis::cmd("DEL").arg(k).query_async(&mut con).await;
        }
    });
    result.unwrap();
}
