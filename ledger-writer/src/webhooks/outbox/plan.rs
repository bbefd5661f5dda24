//! What the outbox writes for one settled batch, decided without I/O (`super` reads the rows
//! these functions take and writes the rows and messages they return, in the same order):
//!
//! - [`BatchPlan`]: from the batch's facts, the pools and grants to evaluate and the grant and
//!   rejection events, kept only where this transaction moved something (a redelivery moves
//!   nothing and was evaluated by the transaction that did).
//! - [`pool_alerts`] and [`grant_alerts`]: threshold crossings (pools along the path of the
//!   batch's new ledger rows), the messages they give and the `alert_state` rows that changed.
//! - [`grant_messages`]: `credits.granted`, `credits.grant.updated` and `credits.expired`, with
//!   ids derived from the grant.
//! - [`rejection_counts`]: denied and unpriced events per pool, with up to 10 sample keys.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use shared::model::{GrantChange, GrantChangeFact, GrantFact, LedgerMsg, Outcome, PoolId, UsageFact};
use shared::webhook::threshold::{cross, cross_path, Crossing, Level, Threshold};
use shared::webhook::{self as wh};
use uuid::Uuid;

use super::{message, Moved, NewMessage, PoolKey, PoolMove};

/// Namespace of message ids derived from what caused them.
const MSG_NS: Uuid = Uuid::from_u128(0x1b7e_52c4_0f3a_4e19_9c6d_2a85_e4f1_7b30);

/// Most sample idempotency keys a rejection window keeps.
const REJECTED_SAMPLES: usize = 10;

fn dec(d: Decimal) -> String {
    d.normalize().to_string()
}

fn pool_json(p: &PoolKey, balance: Option<Decimal>) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("customer_id".into(), json!(p.customer_id));
    m.insert("credit_type".into(), json!(p.credit_type));
    m.insert(
        "resource_id".into(),
        if p.resource_id.is_empty() {
            Value::Null
        } else {
            json!(p.resource_id)
        },
    );
    m.insert("balance".into(), json!(balance.map(dec)));
    m
}

fn threshold_json(t: &Threshold) -> Value {
    match t {
        Threshold::UsagePercent(p) => json!({"type": "usage_percent", "value": p}),
        Threshold::BalanceBelow(b) => json!({"type": "balance_below", "value": dec(*b)}),
        Threshold::Depleted => json!({"type": "depleted"}),
    }
}

/// The thresholds configured for a pool or grant, and depletion (always on).
fn thresholds(usage_percent: &[i32], balance_below: &[Decimal]) -> Vec<Threshold> {
    let mut th: Vec<Threshold> = usage_percent
        .iter()
        .map(|p| Threshold::UsagePercent(*p as u32))
        .collect();
    th.extend(balance_below.iter().map(|b| Threshold::BalanceBelow(*b)));
    th.push(Threshold::Depleted);
    th
}

pub(super) fn tenant_of(f: &LedgerMsg) -> &str {
    match f {
        LedgerMsg::Usage(u) => &u.event.tenant_id,
        LedgerMsg::Grant(g) => &g.tenant_id,
        LedgerMsg::GrantChange(v) => &v.pool.tenant_id,
        LedgerMsg::Reversal(v) | LedgerMsg::DeadLetteredCharge(v) => &v.pool.tenant_id,
        LedgerMsg::Limit(v) => &v.pool.tenant_id,
    }
}

/// What the batch did to one pool.
#[derive(Debug, Default, PartialEq)]
pub(super) struct PoolBatch {
    /// What this transaction moved the balance by (set from [`Moved`]).
    pub moved: Decimal,
    /// Grant amounts that entered the pool in this batch (new active grants, activations).
    pub granted: Decimal,
    /// The batch has grant facts for the pool: its funding may change without its balance
    /// moving (a depleted grant voided or expired), so it is evaluated even if nothing moved.
    pub grant_facts: bool,
}

#[derive(Debug, PartialEq)]
pub(super) enum GrantEvent {
    Granted,
    /// The change, and what it took out of the grant (the expired amount of an expiry).
    Changed(GrantChange, Decimal),
}

/// A grant fact of the batch: its messages are made once the grant's row is read.
#[derive(Debug, PartialEq)]
pub(super) struct GrantEventAt {
    pub tenant: String,
    pub grant: Uuid,
    pub at: DateTime<Utc>,
    pub event: GrantEvent,
}

/// A denied or unpriced event the batch holds.
#[derive(Debug, PartialEq)]
pub(super) struct Rejected<'f> {
    /// Its pool; credit type '' when it was unpriced.
    pub pool: PoolKey,
    pub key: &'f str,
    pub uid: Uuid,
    pub denied: bool,
}

/// What the outbox evaluates for one batch.
#[derive(Debug, Default)]
pub(super) struct BatchPlan<'f> {
    pub pools: BTreeMap<PoolKey, PoolBatch>,
    /// (tenant, grant) -> (its pool, what this transaction moved its remaining by).
    pub consumed: BTreeMap<(String, Uuid), (PoolKey, Decimal)>,
    pub grant_events: Vec<GrantEventAt>,
    pub rejected: Vec<Rejected<'f>>,
}

impl<'f> BatchPlan<'f> {
    /// The facts of tenants `with` endpoints, kept where this transaction `moved` something.
    pub fn new(facts: &[&'f LedgerMsg], with: &HashSet<String>, moved: &Moved<'_>) -> Self {
        let mut plan = BatchPlan::default();
        for f in facts.iter().copied().filter(|f| with.contains(tenant_of(f))) {
            plan.add(f);
        }
        plan.keep_moved(moved);
        plan
    }

    fn add(&mut self, f: &'f LedgerMsg) {
        match f {
            LedgerMsg::Usage(u) => self.add_usage(u),
            LedgerMsg::Grant(g) => self.add_grant(g),
            // A give-back moves the pool: its thresholds are evaluated (a recovery); so does a
            // dead-lettered event's charge (its give-back follows).
            LedgerMsg::Reversal(v) | LedgerMsg::DeadLetteredCharge(v) => {
                self.pools.entry(v.pool.clone()).or_default();
            }
            // A limit change moves no balance.
            LedgerMsg::Limit(_) => {}
            LedgerMsg::GrantChange(v) => self.add_grant_change(v),
        }
    }

    fn add_usage(&mut self, u: &'f UsageFact) {
        let ev = &u.event;
        let key = |ct: &str| PoolId {
            tenant_id: ev.tenant_id.clone(),
            customer_id: ev.customer_id.clone(),
            resource_id: ev.resource_id.clone(),
            credit_type: ct.to_owned(),
        };
        let idempotency_key: &'f str = &ev.idempotency_key;
        let rejected = |pool, denied| Rejected {
            pool,
            key: idempotency_key,
            uid: ev.event_uid,
            denied,
        };
        match &u.outcome {
            Outcome::Settled {
                credit_type, entries, ..
            } => {
                let pk = key(credit_type);
                self.pools.entry(pk.clone()).or_default();
                for e in entries {
                    if let Some(g) = e.grant_id {
                        self.consumed
                            .entry((ev.tenant_id.clone(), g))
                            .or_insert_with(|| (pk.clone(), Decimal::ZERO))
                            .1 += e.amount;
                    }
                }
            }
            Outcome::Denied { credit_type, .. } => {
                self.pools.entry(key(credit_type)).or_default();
                self.rejected.push(rejected(key(credit_type), true));
            }
            Outcome::Unpriced { .. } => self.rejected.push(rejected(key(""), false)),
            Outcome::Duplicate => {}
        }
    }

    fn add_grant(&mut self, g: &GrantFact) {
        let s = &g.grant;
        let pk = PoolId {
            tenant_id: g.tenant_id.clone(),
            customer_id: s.customer_id.clone(),
            resource_id: s.resource_id.clone(),
            credit_type: s.credit_type.clone(),
        };
        let p = self.pools.entry(pk).or_default();
        p.grant_facts = true;
        if !s.scheduled() {
            p.granted += s.amount;
        }
        self.grant_events.push(GrantEventAt {
            tenant: g.tenant_id.clone(),
            grant: s.id,
            at: s.created_at,
            event: GrantEvent::Granted,
        });
    }

    fn add_grant_change(&mut self, v: &GrantChangeFact) {
        let moved: Decimal = v.entries.iter().map(|e| e.amount).sum();
        let p = self.pools.entry(v.pool.clone()).or_default();
        p.grant_facts = true;
        if v.change == GrantChange::Activate {
            p.granted += moved + v.repaid;
        }
        self.grant_events.push(GrantEventAt {
            tenant: v.pool.tenant_id.clone(),
            grant: v.grant_id,
            at: v.at,
            event: GrantEvent::Changed(v.change, -moved),
        });
    }

    /// Thresholds see only what this transaction moved, exactly; pools and grants it did not
    /// move (a redelivery) were evaluated by the transaction that did, and rejections of events
    /// it did not insert were counted by the one that did.
    fn keep_moved(&mut self, moved: &Moved<'_>) {
        self.pools.retain(|k, p| match moved.pools.get(k) {
            Some(m) => {
                p.moved = m.balance;
                true
            }
            None => p.grant_facts,
        });
        self.consumed.retain(|k, (_, m)| match moved.grants.get(k) {
            Some(g) => {
                *m = g.delta;
                true
            }
            None => false,
        });
        self.rejected.retain(|r| moved.new_usage.contains(&r.uid));
    }
}

/// An `alert_state` row: the fired set of a pool (grant nil) or grant, and its level.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct AlertState {
    pub pool: PoolKey,
    pub grant: Uuid,
    pub level: Level,
    pub fired: BTreeSet<String>,
}

/// A pool's row as `pool_thresholds` reads it: key (tenant, customer, resource, credit type),
/// stored funding level, stored fired set, balance, funding now, usage percents, balance-below
/// amounts.
pub(super) type PoolRow = (
    String,
    String,
    String,
    String,
    Option<Decimal>,
    Option<Vec<String>>,
    Decimal,
    Decimal,
    Vec<i32>,
    Vec<Decimal>,
);

/// One pool as its thresholds see it.
#[derive(Debug, Clone)]
pub(super) struct PoolRead {
    pub pool: PoolKey,
    /// The funding level stored with its fired set (None: no state row yet).
    pub stored_granted: Option<Decimal>,
    pub fired: BTreeSet<String>,
    /// Its level now, after the batch.
    pub after: Level,
    pub thresholds: Vec<Threshold>,
}

impl From<PoolRow> for PoolRead {
    fn from(row: PoolRow) -> Self {
        let (t, c, r, ct, stored_granted, fired, balance, granted, usage, below) = row;
        PoolRead {
            pool: PoolId {
                tenant_id: t,
                customer_id: c,
                resource_id: r,
                credit_type: ct,
            },
            stored_granted,
            fired: fired.unwrap_or_default().into_iter().collect(),
            after: Level { balance, granted },
            thresholds: thresholds(&usage, &below),
        }
    }
}

/// What the pools' thresholds give.
#[derive(Debug, Default)]
pub(super) struct PoolAlerts {
    pub msgs: Vec<NewMessage>,
    /// Each pool's settled balance (the grant messages carry it).
    pub balances: HashMap<PoolKey, Decimal>,
    /// State rows that changed, in the order of the rows read (key order).
    pub states: Vec<AlertState>,
}

/// Balance thresholds of every pool read. The level before the batch is the level after it
/// minus what this transaction moved; the funding before it is the stored one (stored whenever
/// it changes), else what it is now less what the batch's grants added. A state row is written
/// only when a threshold fires or recovers or the funding changed.
pub(super) fn pool_alerts(
    rows: Vec<PoolRead>,
    pools: &BTreeMap<PoolKey, PoolBatch>,
    moved: &HashMap<PoolKey, PoolMove>,
    now: DateTime<Utc>,
) -> PoolAlerts {
    let mut out = PoolAlerts::default();
    for p in rows {
        let batch = &pools[&p.pool];
        let before = Level {
            balance: p.after.balance - batch.moved,
            granted: p.stored_granted.unwrap_or(p.after.granted - batch.granted),
        };
        let steps = moved.get(&p.pool).map(|m| m.steps.as_slice()).unwrap_or_default();
        let path = level_path(before, steps, p.after);
        let (crossings, next) = cross_path(&before, &path, &p.thresholds, &p.fired);
        for x in &crossings {
            out.msgs.push(pool_crossing_message(&p.pool, p.after, x, now));
        }
        out.balances.insert(p.pool.clone(), p.after.balance);
        if next != p.fired || p.stored_granted != Some(p.after.granted) {
            out.states.push(AlertState {
                pool: p.pool,
                grant: Uuid::nil(),
                level: p.after,
                fired: next,
            });
        }
    }
    out
}

/// The levels after each of the batch's entries (balance moved, funding moved), ending exactly
/// at `after`: a grant and the usage that drains it in one batch still cross every threshold
/// between.
fn level_path(before: Level, steps: &[(Decimal, Decimal)], after: Level) -> Vec<Level> {
    let mut path = Vec::with_capacity(steps.len().max(1));
    let mut l = before;
    for (b, g) in steps {
        l.balance += b;
        l.granted += g;
        path.push(l);
    }
    match path.last_mut() {
        Some(last) => *last = after,
        None => path.push(after),
    }
    path
}

fn pool_crossing_message(pool: &PoolKey, after: Level, x: &Crossing, now: DateTime<Utc>) -> NewMessage {
    let (kind, t) = match x {
        Crossing::Fired(t @ Threshold::Depleted) => (wh::BALANCE_DEPLETED, t),
        Crossing::Fired(t) => (wh::BALANCE_USAGE_LOW, t),
        Crossing::Recovered(t) => (wh::BALANCE_RECOVERED, t),
    };
    let mut data = pool_json(pool, Some(after.balance));
    data.insert("granted".into(), json!(dec(after.granted)));
    data.insert("threshold".into(), threshold_json(t));
    message(Uuid::now_v7(), &pool.tenant_id, kind, now, Value::Object(data))
}

/// A grant's row as `grant_thresholds` reads it: tenant, id, amount, remaining, status, stored
/// fired set, usage percents.
pub(super) type GrantRow = (String, Uuid, Decimal, Decimal, String, Option<Vec<String>>, Vec<i32>);

/// One grant as its thresholds see it.
#[derive(Debug, Clone)]
pub(super) struct GrantRead {
    pub tenant: String,
    pub grant: Uuid,
    pub amount: Decimal,
    pub remaining: Decimal,
    pub status: String,
    pub fired: BTreeSet<String>,
    pub thresholds: Vec<Threshold>,
}

impl From<GrantRow> for GrantRead {
    fn from(row: GrantRow) -> Self {
        let (tenant, grant, amount, remaining, status, fired, usage) = row;
        GrantRead {
            tenant,
            grant,
            amount,
            remaining,
            status,
            fired: fired.unwrap_or_default().into_iter().collect(),
            thresholds: thresholds(&usage, &[]),
        }
    }
}

/// Grant-level thresholds (grant_usage_percent) and depletion of every grant read (those the
/// batch consumed from): the remaining before is the remaining after minus what this
/// transaction moved. Returns the messages and the state rows that changed.
pub(super) fn grant_alerts(
    rows: Vec<GrantRead>,
    consumed: &BTreeMap<(String, Uuid), (PoolKey, Decimal)>,
    balances: &HashMap<PoolKey, Decimal>,
    now: DateTime<Utc>,
) -> (Vec<NewMessage>, Vec<AlertState>) {
    let (mut msgs, mut states) = (Vec::new(), Vec::new());
    for g in rows {
        let (pk, moved) = &consumed[&(g.tenant.clone(), g.grant)];
        let after = Level {
            balance: g.remaining,
            granted: g.amount,
        };
        let before = Level {
            balance: g.remaining - moved,
            granted: g.amount,
        };
        let (crossings, next) = cross(&before, &after, &g.thresholds, &g.fired);
        // A voided or expired grant is not "used up"; its thresholds stay quiet.
        if g.status != "voided" && g.status != "expired" {
            for x in crossings {
                let Crossing::Fired(t) = x else { continue };
                msgs.push(grant_crossing_message(&g, pk, balances.get(pk).copied(), &t, now));
            }
        }
        if next != g.fired {
            states.push(AlertState {
                pool: pk.clone(),
                grant: g.grant,
                level: after,
                fired: next,
            });
        }
    }
    (msgs, states)
}

fn grant_crossing_message(
    g: &GrantRead,
    pool: &PoolKey,
    balance: Option<Decimal>,
    t: &Threshold,
    now: DateTime<Utc>,
) -> NewMessage {
    let kind = if *t == Threshold::Depleted {
        wh::GRANT_DEPLETED
    } else {
        wh::GRANT_USAGE_LOW
    };
    let mut data = pool_json(pool, balance);
    data.insert(
        "grant".into(),
        json!({"id": g.grant, "amount": dec(g.amount), "remaining": dec(g.remaining), "status": g.status}),
    );
    data.insert("threshold".into(), threshold_json(t));
    message(Uuid::now_v7(), &g.tenant, kind, now, Value::Object(data))
}

/// A grant's row as `grant_messages` reads it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(super) struct GrantDetail {
    pub tenant_id: String,
    pub id: Uuid,
    pub customer_id: String,
    pub resource_id: String,
    pub credit_type: String,
    pub amount: Decimal,
    pub remaining: Decimal,
    pub status: String,
    pub category: String,
    pub priority: i32,
    pub cost_amount: Option<Decimal>,
    pub cost_currency: Option<String>,
    pub effective_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub display_name: String,
    pub description: Option<String>,
    pub metadata: Option<Value>,
    pub source: String,
    pub created_at: DateTime<Utc>,
    pub voided_at: Option<DateTime<Utc>>,
}

/// credits.granted, credits.grant.updated and credits.expired of the batch's grant events, with
/// ids derived from the grant (and the change), in event order; an event whose grant was not
/// read gives nothing. `now` decides whether an active grant is still `scheduled`.
pub(super) fn grant_messages(
    events: &[GrantEventAt],
    rows: Vec<GrantDetail>,
    balances: &HashMap<PoolKey, Decimal>,
    now: DateTime<Utc>,
) -> Vec<NewMessage> {
    let by_id: HashMap<(String, Uuid), GrantDetail> =
        rows.into_iter().map(|r| ((r.tenant_id.clone(), r.id), r)).collect();
    let mut msgs = Vec::new();
    for e in events {
        let Some(r) = by_id.get(&(e.tenant.clone(), e.grant)) else {
            continue;
        };
        let pk = PoolId {
            tenant_id: r.tenant_id.clone(),
            customer_id: r.customer_id.clone(),
            resource_id: r.resource_id.clone(),
            credit_type: r.credit_type.clone(),
        };
        let mut data = pool_json(&pk, balances.get(&pk).copied());
        data.insert("grant".into(), grant_json(r, now));
        grant_event_messages(e, data, &mut msgs);
    }
    msgs
}

/// A grant as the messages show it.
fn grant_json(r: &GrantDetail, now: DateTime<Utc>) -> Value {
    let status = if r.status == "active" && r.effective_at > now {
        "scheduled"
    } else {
        r.status.as_str()
    };
    json!({
        "id": r.id, "customer_id": r.customer_id, "credit_type": r.credit_type,
        "resource_id": if r.resource_id.is_empty() { None } else { Some(&r.resource_id) },
        "amount": dec(r.amount), "remaining": dec(r.remaining), "status": status, "category": r.category,
        "priority": r.priority,
        "cost": r.cost_amount.map(|a| json!({"amount": dec(a), "currency": r.cost_currency})),
        "effective_at": r.effective_at, "expires_at": r.expires_at, "display_name": r.display_name,
        "description": r.description, "metadata": r.metadata, "source": r.source, "created_at": r.created_at,
        "voided_at": r.voided_at,
    })
}

/// The messages of one grant event, `data` being its pool and grant.
fn grant_event_messages(e: &GrantEventAt, mut data: serde_json::Map<String, Value>, msgs: &mut Vec<NewMessage>) {
    let (tenant, gid) = (&e.tenant, e.grant);
    let derived = |cause: String| Uuid::new_v5(&MSG_NS, cause.as_bytes());
    match &e.event {
        GrantEvent::Granted => {
            let id = derived(format!("{}/{tenant}/{gid}", wh::GRANTED));
            msgs.push(message(id, tenant, wh::GRANTED, e.at, Value::Object(data)));
        }
        GrantEvent::Changed(change, left) => {
            let name = match change {
                GrantChange::Void => "voided",
                GrantChange::Expire => "expired",
                GrantChange::Activate => "activated",
            };
            if *change == GrantChange::Expire {
                let mut d = data.clone();
                d.insert("expired_amount".into(), json!(dec(*left)));
                let id = derived(format!("{}/{tenant}/{gid}", wh::EXPIRED));
                msgs.push(message(id, tenant, wh::EXPIRED, e.at, Value::Object(d)));
            }
            data.insert("change".into(), json!(name));
            let id = derived(format!("{}/{name}/{tenant}/{gid}", wh::GRANT_UPDATED));
            msgs.push(message(id, tenant, wh::GRANT_UPDATED, e.at, Value::Object(data)));
        }
    }
}

/// One pool's rejections: (denied, unpriced, sample keys).
pub(super) type RejectionCount<'a> = (i64, i64, Vec<&'a str>);

/// The rejections counted per pool, in key order, each keeping its first 10 sample keys.
pub(super) fn rejection_counts<'a>(rejected: &'a [Rejected<'_>]) -> BTreeMap<&'a PoolKey, RejectionCount<'a>> {
    let mut per: BTreeMap<&PoolKey, RejectionCount<'a>> = BTreeMap::new();
    for r in rejected {
        let e = per.entry(&r.pool).or_default();
        if r.denied {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
        if e.2.len() < REJECTED_SAMPLES {
            e.2.push(r.key);
        }
    }
    per
}

#[cfg(test)]
mod tests;
