//! The pure half of the rater's step, no I/O: what one input message asks of its pool
//! ([`plan`]: message + catalogue -> [`PoolOp`] or a dead-letter reason) and what a pool's
//! reply becomes ([`facts`]: reply -> ledger facts, plus the counters to bump, [`Tally`]).
//! `step.rs` does the effects around them: catalogues, the Redis round, producing.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use shared::amount::to_fixed;
use shared::model::{
    Entry, GrantChange, GrantChangeFact, GrantCmd, GrantFact, GrantRefCmd, InputMsg, LedgerMsg, LimitCmd, LimitFact,
    Outcome, PoolId, ReversalFact, ReverseCmd, UsageEvent, UsageFact,
};
use shared::pricing::{price, Price};

use crate::catalogue::TenantCatalogue;
use crate::metric as m;
use crate::pools::{dec, ident, Activation, OpResult, Part, PoolOp};

/// Why a message goes to the dead-letter topic instead of a pool.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter(pub String);

/// A message's operation on its pool.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub pool: PoolId,
    /// The credit type's decimal places (fixed-point amounts).
    pub decimals: u32,
    /// The credit type's limit when the batch's catalogue told it (usage); None: look it up.
    pub hard: Option<bool>,
    pub op: PoolOp,
    /// When the operation happens (see apply.lua's `ts_ms`).
    pub ts_ms: i64,
    /// The message's identity for the journal.
    pub id: String,
}

/// What a decodable message asks for.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // one per message, moved once
pub enum Plan {
    /// An operation on a pool.
    Pool(Planned),
    /// Usage no mapping prices: its fact needs no pool.
    Unpriced(LedgerMsg),
}

/// Plan one message. `cat`: the tenant's catalogue (usage is priced with it; None prices
/// nothing); `now`: the time of a reverse (it carries none).
pub fn plan(msg: &InputMsg, cat: Option<&TenantCatalogue>, now: DateTime<Utc>) -> Result<Plan, DeadLetter> {
    let planned = match msg {
        InputMsg::Usage(e) => return Ok(plan_usage(e, cat)),
        InputMsg::Grant(g) => plan_grant(g)?,
        InputMsg::Void(v) => plan_grant_ref(v, PoolOp::Void { grant_id: v.grant_id }),
        InputMsg::Expire(v) => plan_grant_ref(v, PoolOp::Expire { grant_id: v.grant_id }),
        InputMsg::Activate(v) => plan_grant_ref(v, PoolOp::Activate { grant_id: v.grant_id }),
        InputMsg::Reverse(r) => plan_reverse(r, now),
        InputMsg::SetLimit(l) => plan_limit(l),
    };
    Ok(Plan::Pool(planned))
}

fn pool_id(tenant: &str, customer: &str, resource: &str, credit_type: &str) -> PoolId {
    PoolId {
        tenant_id: tenant.to_owned(),
        customer_id: customer.to_owned(),
        resource_id: resource.to_owned(),
        credit_type: credit_type.to_owned(),
    }
}

fn plan_usage(e: &UsageEvent, cat: Option<&TenantCatalogue>) -> Plan {
    let versions = cat
        .and_then(|c| c.mappings.get(&e.event_name))
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    match price(versions, e.timestamp, &e.dimensions) {
        Price::Unpriced(reason) => Plan::Unpriced(LedgerMsg::Usage(UsageFact {
            event: e.clone(),
            outcome: Outcome::Unpriced {
                reason: reason.to_owned(),
            },
        })),
        Price::Priced {
            credit_type,
            decimals,
            fixed,
            ..
        } => Plan::Pool(Planned {
            pool: pool_id(&e.tenant_id, &e.customer_id, &e.resource_id, credit_type),
            decimals,
            hard: Some(cat.and_then(|c| c.credit_types.get(credit_type)).is_none_or(|c| c.hard)),
            op: PoolOp::Usage {
                idempotency_key: e.idempotency_key.clone(),
                cost: fixed,
            },
            ts_ms: e.timestamp.timestamp_millis(),
            id: ident(&e.event_uid),
        }),
    }
}

fn plan_grant(g: &GrantCmd) -> Result<Planned, DeadLetter> {
    let s = &g.grant;
    let amount = to_fixed(s.amount, s.decimals).map_err(|e| DeadLetter(format!("grant amount {e}")))?;
    Ok(Planned {
        pool: pool_id(&g.tenant_id, &s.customer_id, &s.resource_id, &s.credit_type),
        decimals: s.decimals,
        hard: None,
        op: PoolOp::Grant {
            grant_id: s.id,
            amount,
            order: shared::hot_pool::OrderKey::new(
                s.priority,
                s.expires_at,
                s.category,
                s.effective_at,
                s.created_at,
                s.id,
            ),
        },
        ts_ms: s.created_at.timestamp_millis(),
        id: ident(&s.id),
    })
}

fn plan_grant_ref(v: &GrantRefCmd, op: PoolOp) -> Planned {
    Planned {
        pool: pool_id(&v.tenant_id, &v.customer_id, &v.resource_id, &v.credit_type),
        decimals: v.decimals,
        hard: None,
        op,
        ts_ms: v.at.timestamp_millis(),
        id: ident(&v.grant_id),
    }
}

fn plan_reverse(r: &ReverseCmd, now: DateTime<Utc>) -> Planned {
    let entries = r
        .entries
        .iter()
        .map(|e| {
            let amount = shared::amount::to_fixed_signed(e.amount, r.decimals).unwrap_or(0);
            (e.grant_id, amount)
        })
        .collect();
    Planned {
        pool: pool_id(&r.tenant_id, &r.customer_id, &r.resource_id, &r.credit_type),
        decimals: r.decimals,
        hard: None,
        op: PoolOp::Reverse {
            event_uid: r.event_uid,
            entries,
            release: r.release.as_ref().map(|x| x.idempotency_key.clone()),
        },
        ts_ms: now.timestamp_millis(),
        id: ident(&r.event_uid),
    }
}

fn plan_limit(l: &LimitCmd) -> Planned {
    Planned {
        pool: pool_id(&l.tenant_id, &l.customer_id, &l.resource_id, &l.credit_type),
        decimals: l.decimals,
        hard: None,
        op: PoolOp::Limit { limit: l.limit },
        ts_ms: l.at.timestamp_millis(),
        id: l.at.timestamp_micros().to_string(),
    }
}

/// What becomes of one input message.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // boxing would allocate once per fact on the hot path
pub enum Fate {
    /// Waiting for its pool's reply.
    Pending,
    Fact(LedgerMsg),
    /// Scheduled grants the event activated (their facts first), then the event's.
    Facts(Vec<LedgerMsg>),
    Dlq(String),
    Nothing,
}

/// The counters one reply bumps (recorded by [`Tally::record`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// `COMMANDS{kind, result}`.
    pub command: Option<(&'static str, &'static str)>,
    /// `COMMANDS{activate, by_usage}`, once per scheduled grant a usage event activated.
    pub activated_by_usage: usize,
    /// `EVENTS{outcome}`.
    pub outcome: Option<&'static str>,
}

impl Tally {
    fn command(kind: &'static str, result: &'static str) -> Self {
        Tally {
            command: Some((kind, result)),
            ..Tally::default()
        }
    }

    pub fn record(&self) {
        if self.activated_by_usage > 0 {
            metrics::counter!(m::COMMANDS, "kind" => "activate", "result" => "by_usage")
                .increment(self.activated_by_usage as u64);
        }
        if let Some((kind, result)) = self.command {
            metrics::counter!(m::COMMANDS, "kind" => kind, "result" => result).increment(1);
        }
        if let Some(outcome) = self.outcome {
            metrics::counter!(m::EVENTS, "outcome" => outcome).increment(1);
        }
    }
}

/// What one pool reply becomes: the message's fate and the counters it bumps. `op`: the
/// operation it answers; `now`: the time of a reversal's fact.
pub fn facts(
    msg: &InputMsg,
    pool: &PoolId,
    decimals: u32,
    op: &PoolOp,
    r: OpResult,
    now: DateTime<Utc>,
) -> (Fate, Tally) {
    match (msg, r) {
        (_, OpResult::Refused(reason)) => (Fate::Dlq(reason), Tally::default()),
        (InputMsg::Usage(e), r) => usage_facts(e, pool, decimals, op, r),
        (InputMsg::Grant(g), r) => grant_facts(g, decimals, r),
        (InputMsg::Void(v), r) => grant_change_facts(v, GrantChange::Void, "void", pool, decimals, r),
        (InputMsg::Expire(v), r) => grant_change_facts(v, GrantChange::Expire, "expire", pool, decimals, r),
        (InputMsg::Activate(v), r) => grant_change_facts(v, GrantChange::Activate, "activate", pool, decimals, r),
        (InputMsg::Reverse(rv), r) => reversal_facts(rv, pool, decimals, r, now),
        (InputMsg::SetLimit(l), r) => limit_facts(l, pool, r),
    }
}

fn usage_facts(e: &UsageEvent, pool: &PoolId, d: u32, op: &PoolOp, r: OpResult) -> (Fate, Tally) {
    let mut first = Vec::new();
    let mut tally = Tally::default();
    let outcome = match r {
        OpResult::Charged { parts, activated, .. } => {
            tally.activated_by_usage = activated.len();
            first.extend(activated.into_iter().map(|a| activation_fact(e, pool, d, a)));
            let total: i64 = parts.iter().map(|x| -x.delta).sum();
            Outcome::Settled {
                credit_type: pool.credit_type.clone(),
                cost: dec(total, d),
                entries: ledger_entries(parts, d),
            }
        }
        OpResult::Denied { end, reason } => {
            let cost = match op {
                PoolOp::Usage { cost, .. } => *cost,
                _ => 0,
            };
            Outcome::Denied {
                credit_type: pool.credit_type.clone(),
                cost: dec(cost, d),
                end_balance: dec(end, d),
                reason,
            }
        }
        OpResult::Duplicate => Outcome::Duplicate,
        other => return (Fate::Dlq(format!("unexpected usage reply {other:?}")), tally),
    };
    tally.outcome = Some(outcome.status());
    let fact = LedgerMsg::Usage(UsageFact {
        event: e.clone(),
        outcome,
    });
    if first.is_empty() {
        (Fate::Fact(fact), tally)
    } else {
        first.push(fact);
        (Fate::Facts(first), tally)
    }
}

/// A scheduled grant a usage event activated: its fact precedes the event's.
fn activation_fact(e: &UsageEvent, pool: &PoolId, d: u32, a: Activation) -> LedgerMsg {
    LedgerMsg::GrantChange(GrantChangeFact {
        change: GrantChange::Activate,
        pool: pool.clone(),
        grant_id: a.grant_id,
        at: DateTime::from_timestamp_millis(a.effective_ms).unwrap_or(e.timestamp),
        actor: "system".into(),
        entries: vec![Entry {
            grant_id: Some(a.grant_id),
            amount: dec(a.amount, d),
            end_balance: dec(a.end, d),
        }],
        repaid: dec(a.repaid, d),
    })
}

fn grant_facts(g: &GrantCmd, d: u32, r: OpResult) -> (Fate, Tally) {
    let OpResult::Granted { end, remaining, .. } = r else {
        return (Fate::Nothing, Tally::command("grant", "known"));
    };
    // A scheduled grant enters the ledger when it is activated, not before.
    let entries = if g.grant.scheduled() {
        Vec::new()
    } else {
        vec![Entry {
            grant_id: Some(g.grant.id),
            amount: g.grant.amount,
            end_balance: dec(end, d),
        }]
    };
    let fact = LedgerMsg::Grant(GrantFact {
        tenant_id: g.tenant_id.clone(),
        grant: g.grant.clone(),
        actor: g.actor.clone(),
        entries,
        remaining: dec(remaining, d),
    });
    (Fate::Fact(fact), Tally::command("grant", "applied"))
}

fn grant_change_facts(
    v: &GrantRefCmd,
    change: GrantChange,
    kind: &'static str,
    pool: &PoolId,
    d: u32,
    r: OpResult,
) -> (Fate, Tally) {
    let (amount, end, repaid) = match r {
        OpResult::Voided { end, removed } => (-dec(removed, d), end, 0),
        OpResult::Activated { end, remaining, repaid } => (dec(remaining + repaid, d), end, repaid),
        _ => return (Fate::Nothing, Tally::command(kind, "not_applied")),
    };
    let entry = Entry {
        grant_id: Some(v.grant_id),
        // No negative zero in the ledger.
        amount: if amount.is_zero() { Decimal::ZERO } else { amount },
        end_balance: dec(end, d),
    };
    let fact = LedgerMsg::GrantChange(GrantChangeFact {
        change,
        pool: pool.clone(),
        grant_id: v.grant_id,
        at: v.at,
        actor: v.actor.clone(),
        entries: vec![entry],
        repaid: dec(repaid, d),
    });
    (Fate::Fact(fact), Tally::command(kind, "applied"))
}

fn reversal_facts(rv: &ReverseCmd, pool: &PoolId, d: u32, r: OpResult, now: DateTime<Utc>) -> (Fate, Tally) {
    let OpResult::Reversed { parts, .. } = r else {
        return (Fate::Nothing, Tally::command("reverse", "not_applied"));
    };
    let tally = Tally::command("reverse", "applied");
    // What went back enters the ledger (adjust entries), so the pool's end balances chain
    // through the charge and its give-back; the ledger-writer wrote the charge under the same
    // uid (a dead-lettered event's as a `dead_letter` adjust).
    if parts.is_empty() {
        return (Fate::Nothing, tally);
    }
    let fact = LedgerMsg::Reversal(ReversalFact {
        pool: pool.clone(),
        event_uid: rv.event_uid,
        at: now,
        entries: ledger_entries(parts, d),
    });
    (Fate::Fact(fact), tally)
}

fn limit_facts(l: &LimitCmd, pool: &PoolId, r: OpResult) -> (Fate, Tally) {
    if r != OpResult::LimitSet {
        return (Fate::Nothing, Tally::command("limit", "not_applied"));
    }
    // Postgres learns the override in order with the pool's usage.
    let fact = LedgerMsg::Limit(LimitFact {
        pool: pool.clone(),
        limit: l.limit,
        at: l.at,
    });
    (Fate::Fact(fact), Tally::command("limit", "applied"))
}

/// The ledger entries of a reply's parts (fixed-point to the credit type's places).
fn ledger_entries(parts: Vec<Part>, d: u32) -> Vec<Entry> {
    parts
        .into_iter()
        .map(|x| Entry {
            grant_id: x.grant_id,
            amount: dec(x.delta, d),
            end_balance: dec(x.end, d),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::CreditType;
    use shared::hot_pool::OrderKey;
    use shared::model::{Category, Dimensions, GrantSpec, Release};
    use shared::pricing::MappingVersion;
    use uuid::Uuid;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(s, 0).unwrap()
    }

    fn usage() -> UsageEvent {
        UsageEvent {
            tenant_id: "t".into(),
            event_uid: Uuid::from_u128(0xabc),
            customer_id: "c".into(),
            resource_id: String::new(),
            event_name: "call".into(),
            idempotency_key: "k1".into(),
            timestamp: t(1_700_000_000),
            dimensions: Dimensions::new(),
            accepted_at: t(1_700_000_000),
        }
    }

    fn catalogue(hard: bool) -> TenantCatalogue {
        let mut c = TenantCatalogue::default();
        c.credit_types.insert("ai".into(), CreditType { decimals: 2, hard });
        c.mappings.insert(
            "call".into(),
            vec![MappingVersion {
                effective_at: t(0),
                credit_type: "ai".into(),
                credits_per_unit: Decimal::new(125, 2),
                quantity_dimension: None,
                decimals: 2,
            }],
        );
        c
    }

    fn pool() -> PoolId {
        pool_id("t", "c", "", "ai")
    }

    #[test]
    fn usage_is_priced_into_a_charge_or_unpriced() {
        let e = usage();
        let Ok(Plan::Pool(p)) = plan(&InputMsg::Usage(e.clone()), Some(&catalogue(false)), t(0)) else {
            panic!("not planned")
        };
        assert_eq!(
            p,
            Planned {
                pool: pool(),
                decimals: 2,
                hard: Some(false),
                op: PoolOp::Usage {
                    idempotency_key: "k1".into(),
                    cost: 125
                },
                ts_ms: 1_700_000_000_000,
                id: ident(&e.event_uid),
            }
        );
        let Ok(Plan::Unpriced(LedgerMsg::Usage(f))) = plan(&InputMsg::Usage(e), None, t(0)) else {
            panic!("priced without a catalogue")
        };
        assert_eq!(
            f.outcome,
            Outcome::Unpriced {
                reason: "no_mapping".into()
            }
        );
    }

    #[test]
    fn grants_carry_their_order_key_and_bad_amounts_dead_letter() {
        let id = Uuid::from_u128(7);
        let mut g = GrantCmd {
            tenant_id: "t".into(),
            grant: GrantSpec {
                id,
                customer_id: "c".into(),
                resource_id: String::new(),
                credit_type: "ai".into(),
                decimals: 2,
                amount: Decimal::new(1050, 2),
                category: Category::Promo,
                priority: 5,
                cost: None,
                effective_at: t(20),
                expires_at: Some(t(90)),
                display_name: "g".into(),
                description: None,
                metadata: None,
                source: "api".into(),
                created_at: t(10),
            },
            actor: "api".into(),
        };
        let Ok(Plan::Pool(p)) = plan(&InputMsg::Grant(g.clone()), None, t(0)) else {
            panic!("not planned")
        };
        assert_eq!(
            p.op,
            PoolOp::Grant {
                grant_id: id,
                amount: 1050,
                order: OrderKey::new(5, Some(t(90)), Category::Promo, t(20), t(10), id),
            }
        );
        assert_eq!((p.hard, p.ts_ms, p.id), (None, 10_000, ident(&id)));
        g.grant.amount = Decimal::new(-1, 0);
        assert!(matches!(plan(&InputMsg::Grant(g), None, t(0)), Err(DeadLetter(r)) if r.starts_with("grant amount")));
    }

    #[test]
    fn reverses_and_limits_plan_their_fields() {
        let uid = Uuid::from_u128(9);
        let g = Uuid::from_u128(7);
        let r = ReverseCmd {
            tenant_id: "t".into(),
            customer_id: "c".into(),
            resource_id: String::new(),
            credit_type: "ai".into(),
            decimals: 2,
            event_uid: uid,
            entries: vec![
                Entry {
                    grant_id: Some(g),
                    amount: Decimal::new(-150, 2),
                    end_balance: Decimal::ZERO,
                },
                Entry {
                    grant_id: None,
                    amount: Decimal::new(-1, 2),
                    end_balance: Decimal::ZERO,
                },
            ],
            release: Some(Release {
                idempotency_key: "k1".into(),
                timestamp: t(0),
            }),
        };
        let Ok(Plan::Pool(p)) = plan(&InputMsg::Reverse(r), None, t(33)) else {
            panic!("not planned")
        };
        assert_eq!(
            p.op,
            PoolOp::Reverse {
                event_uid: uid,
                entries: vec![(Some(g), -150), (None, -1)],
                release: Some("k1".into()),
            }
        );
        assert_eq!(p.ts_ms, 33_000);
        let l = LimitCmd {
            tenant_id: "t".into(),
            customer_id: "c".into(),
            resource_id: String::new(),
            credit_type: "ai".into(),
            decimals: 2,
            limit: Some(shared::model::LimitKind::Soft),
            at: t(5),
        };
        let Ok(Plan::Pool(p)) = plan(&InputMsg::SetLimit(l), None, t(0)) else {
            panic!("not planned")
        };
        assert_eq!(
            p.op,
            PoolOp::Limit {
                limit: Some(shared::model::LimitKind::Soft)
            }
        );
        assert_eq!(p.id, "5000000");
    }

    #[test]
    fn replies_become_facts_and_counts() {
        let e = usage();
        let op = PoolOp::Usage {
            idempotency_key: "k1".into(),
            cost: 125,
        };
        let msg = InputMsg::Usage(e.clone());
        let denied = OpResult::Denied {
            end: 3,
            reason: "insufficient_balance".into(),
        };
        let (fate, tally) = facts(&msg, &pool(), 2, &op, denied, t(0));
        let Fate::Fact(LedgerMsg::Usage(f)) = fate else {
            panic!("{fate:?}")
        };
        assert_eq!(
            f.outcome,
            Outcome::Denied {
                credit_type: "ai".into(),
                cost: Decimal::new(125, 2),
                end_balance: Decimal::new(3, 2),
                reason: "insufficient_balance".into(),
            }
        );
        assert_eq!(tally.outcome, Some("denied"));
        let g = Uuid::from_u128(7);
        let charged = OpResult::Charged {
            end: 0,
            parts: vec![Part {
                grant_id: Some(g),
                delta: -125,
                end: 0,
            }],
            activated: vec![Activation {
                grant_id: g,
                amount: 125,
                end: 125,
                repaid: 0,
                effective_ms: 1_000,
            }],
        };
        let (fate, tally) = facts(&msg, &pool(), 2, &op, charged, t(0));
        let Fate::Facts(fs) = fate else { panic!("{fate:?}") };
        assert!(
            matches!(&fs[0], LedgerMsg::GrantChange(c) if c.change == GrantChange::Activate && c.at == DateTime::from_timestamp_millis(1_000).unwrap())
        );
        assert!(matches!(&fs[1], LedgerMsg::Usage(u) if u.outcome.status() == "settled"));
        assert_eq!((tally.activated_by_usage, tally.outcome), (1, Some("settled")));
        let (fate, tally) = facts(&msg, &pool(), 2, &op, OpResult::Refused("x".into()), t(0));
        assert_eq!((fate, tally), (Fate::Dlq("x".into()), Tally::default()));
        let v = GrantRefCmd {
            tenant_id: "t".into(),
            customer_id: "c".into(),
            resource_id: String::new(),
            credit_type: "ai".into(),
            decimals: 2,
            grant_id: g,
            at: t(1),
            actor: "api".into(),
        };
        let void = PoolOp::Void { grant_id: g };
        let (fate, tally) = facts(
            &InputMsg::Void(v.clone()),
            &pool(),
            2,
            &void,
            OpResult::NotApplied,
            t(0),
        );
        assert_eq!((fate, tally.command), (Fate::Nothing, Some(("void", "not_applied"))));
        let voided = OpResult::Voided { end: 5, removed: 0 };
        let (fate, tally) = facts(&InputMsg::Void(v), &pool(), 2, &void, voided, t(0));
        let Fate::Fact(LedgerMsg::GrantChange(c)) = fate else {
            panic!("{fate:?}")
        };
        assert!(!c.entries[0].amount.is_sign_negative(), "no negative zero");
        assert_eq!(tally.command, Some(("void", "applied")));
    }
}
