//! The pure half of settling a batch: which rows a batch of facts writes and how it moves grants
//! and pools, given what Postgres already held. No I/O here (`write` puts a plan into tables), so
//! every rule below is unit-tested without a database.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use shared::model::{
    Entry, EntryKind, GrantChange, GrantChangeFact, GrantFact, LedgerMsg, LimitFact, Outcome, PoolId, ReversalFact,
    UsageFact,
};
use uuid::Uuid;

use crate::webhooks::outbox::PoolMove;

/// Entry indexes of a reversal's `adjust` entries start here: the charge it gives back holds
/// the indexes below it under the same source id (one entry per grant touched).
pub const REVERSAL_IDX: i32 = 10_000;

/// Entry indexes of a dead-lettered event's charge (`adjust`, source `dead_letter`): apart from
/// its give-back's and from any other charge under the same uid.
pub const DEAD_LETTER_IDX: i32 = 20_000;

/// How a batch's ledger entries are inserted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The first attempt: when every entry is of a usage row inserted now, a plain insert (no
    /// arbiter probe); anything else goes through ON CONFLICT.
    Fast,
    /// A retry of a failed transaction: every entry through ON CONFLICT, so a broken assumption
    /// costs one retry, never a stuck partition.
    Checked,
}

/// The batch without repeated copies of one usage fact. A rater that crashed after producing
/// and before committing its offsets produces the same facts (same `event_uid`) again, and a
/// lagging ledger-writer can find both copies in one batch; the usage insert keeps one row, and
/// everything derived from the batch (rollups, ledger entries, webhook counts) must see one
/// fact too.
pub fn unique_facts<'a>(facts: &[&'a LedgerMsg]) -> Vec<&'a LedgerMsg> {
    let mut seen: HashSet<Uuid> = HashSet::with_capacity(facts.len());
    facts
        .iter()
        .copied()
        .filter(|f| match f {
            LedgerMsg::Usage(u) => seen.insert(u.event.event_uid),
            _ => true,
        })
        .collect()
}

/// The usage facts that get a `usage_events` row: all but the duplicates Redis caught.
pub fn deciding_usage<'a>(facts: &[&'a LedgerMsg]) -> Vec<&'a UsageFact> {
    facts
        .iter()
        .filter_map(|f| match f {
            LedgerMsg::Usage(u) if u.outcome != Outcome::Duplicate => Some(u),
            _ => None,
        })
        .collect()
}

/// What Postgres said about the batch's usage rows.
#[derive(Default)]
pub struct Known<'a> {
    /// Usage rows inserted now (their entries are new too).
    pub new_uids: HashSet<Uuid>,
    /// Duplicates that slipped past Redis: their key is held by another event uid.
    pub slipped: Vec<&'a UsageFact>,
    /// Redelivered events charged a second time in a pool rebuilt after a Redis loss: (the
    /// event's uid, its second charge under a uid of its own).
    pub reapplied: Vec<(Uuid, UsageFact)>,
}

/// Split usage facts whose row was not inserted by who holds their key: the same uid is a
/// redelivery, another uid a duplicate that slipped past Redis. Returns (slipped, redelivered).
pub fn split_lost<'a>(
    lost: &[&'a UsageFact],
    holder: &HashMap<(String, String), Uuid>,
) -> (Vec<&'a UsageFact>, Vec<&'a UsageFact>) {
    lost.iter().partition(|u| {
        let key = (u.event.tenant_id.clone(), u.event.idempotency_key.clone());
        holder.get(&key) != Some(&u.event.event_uid)
    })
}

/// The redelivered facts that charged something (only those can have been charged twice).
pub fn charged<'a>(redelivered: &[&'a UsageFact]) -> Vec<&'a UsageFact> {
    redelivered
        .iter()
        .copied()
        .filter(|u| matches!(&u.outcome, Outcome::Settled { entries, .. } if !entries.is_empty()))
        .collect()
}

/// (tenant, idempotency key) -> its settled `consume` entries: (index, amount, end balance).
pub type SettledEntries = HashMap<(String, String), Vec<(i32, Decimal, Decimal)>>;

/// Redelivered usage facts (same key, same uid as the settled event) that Redis charged a second
/// time: a rater that crashed after charging an event, while Redis lost its state, charges it
/// again in the pool rebuilt from Postgres (which already holds the first charge), and the
/// second fact's entries differ from the settled ones (a journal replay repeats them exactly).
/// Each is returned with a uid of its own (derived from the event's and its entries), so the
/// reverse that gives the second charge back is applied once, after the event's own uid.
pub fn reapplied(charged: &[&UsageFact], mut settled: SettledEntries) -> Vec<(Uuid, UsageFact)> {
    let mut out = Vec::new();
    for u in charged {
        let Outcome::Settled { entries, .. } = &u.outcome else {
            continue;
        };
        let mut have = settled
            .remove(&(u.event.tenant_id.clone(), u.event.idempotency_key.clone()))
            .unwrap_or_default();
        have.sort_by_key(|x| x.0);
        let same = have.len() == entries.len()
            && have
                .iter()
                .zip(entries)
                .all(|(h, e)| h.1 == e.amount && h.2 == e.end_balance);
        if same {
            continue;
        }
        let mut again = (*u).clone();
        let seed: String = entries
            .iter()
            .map(|e| format!("{}:{};", e.amount, e.end_balance))
            .collect();
        again.event.event_uid = Uuid::new_v5(&u.event.event_uid, seed.as_bytes());
        tracing::warn!(tenant = %u.event.tenant_id, key = %u.event.idempotency_key,
            "an event was charged again in a rebuilt hot pool: giving the second charge back");
        out.push((u.event.event_uid, again));
    }
    out
}

/// Where a duplicate was caught.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaughtBy {
    Redis,
    Postgres,
}

impl CaughtBy {
    pub fn as_str(self) -> &'static str {
        match self {
            CaughtBy::Redis => "redis",
            CaughtBy::Postgres => "postgres",
        }
    }
}

/// One `duplicate_events` row.
#[derive(Debug, PartialEq)]
pub struct DuplicateRow<'a> {
    pub tenant_id: &'a str,
    pub event_uid: Uuid,
    pub idempotency_key: &'a str,
    pub caught_by: CaughtBy,
}

/// The batch's duplicates: caught by Redis (their fact says so), or slipped past it.
pub fn duplicates<'a>(facts: &[&'a LedgerMsg], slipped: &[&'a UsageFact]) -> Vec<DuplicateRow<'a>> {
    let row = |u: &'a UsageFact, caught_by| DuplicateRow {
        tenant_id: &u.event.tenant_id,
        event_uid: u.event.event_uid,
        idempotency_key: &u.event.idempotency_key,
        caught_by,
    };
    let redis = facts.iter().filter_map(|f| match f {
        LedgerMsg::Usage(u) if u.outcome == Outcome::Duplicate => Some(row(u, CaughtBy::Redis)),
        _ => None,
    });
    redis
        .chain(slipped.iter().map(|u| row(u, CaughtBy::Postgres)))
        .collect()
}

/// A pool as the entry columns take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolRef<'a> {
    pub tenant_id: &'a str,
    pub customer_id: &'a str,
    pub resource_id: &'a str,
    pub credit_type: &'a str,
}

impl<'a> PoolRef<'a> {
    pub fn of(p: &'a PoolId) -> Self {
        PoolRef {
            tenant_id: &p.tenant_id,
            customer_id: &p.customer_id,
            resource_id: &p.resource_id,
            credit_type: &p.credit_type,
        }
    }

    fn of_usage(u: &'a UsageFact, credit_type: &'a str) -> Self {
        PoolRef {
            tenant_id: &u.event.tenant_id,
            customer_id: &u.event.customer_id,
            resource_id: &u.event.resource_id,
            credit_type,
        }
    }
}

/// One `ledger_entries` row to insert.
#[derive(Debug, Clone, PartialEq)]
pub struct EntryRow<'a> {
    pub pool: PoolRef<'a>,
    pub ts: DateTime<Utc>,
    pub kind: EntryKind,
    pub source: &'a str,
    pub source_id: Cow<'a, str>,
    pub idx: i32,
    pub grant_id: Option<Uuid>,
    pub amount: Decimal,
    pub end_balance: Decimal,
    pub actor: &'a str,
}

/// A scheduled grant's activation in this batch: the overdraft it repaid, should its entry be new.
#[derive(Debug, Clone, PartialEq)]
pub struct Activation {
    pub grant_id: Uuid,
    pub repaid: Decimal,
    pub pool: PoolId,
}

/// The batch's ledger entries, in fact order (a pool's facts are in one partition, in the
/// rater's order, so ledger ids follow each pool's end-balance chain), and what else settling
/// them needs.
#[derive(Debug, Default)]
pub struct EntryPlan<'a> {
    pub rows: Vec<EntryRow<'a>>,
    /// Insert through ON CONFLICT (some entry may already exist).
    pub checked: bool,
    /// (tenant, grant id as the entry's source id) -> the activation.
    pub activations: HashMap<(String, String), Activation>,
    /// Limit overrides, in fact order.
    pub limits: Vec<&'a LimitFact>,
    /// Seconds from acceptance to `now` of each usage event decided now.
    pub e2e: Vec<f64>,
}

impl<'a> EntryPlan<'a> {
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        pool: PoolRef<'a>,
        ts: DateTime<Utc>,
        kind: EntryKind,
        source: &'a str,
        source_id: Cow<'a, str>,
        idx: i32,
        e: &Entry,
        actor: &'a str,
    ) {
        self.rows.push(EntryRow {
            pool,
            ts,
            kind,
            source,
            source_id,
            idx,
            grant_id: e.grant_id,
            amount: e.amount,
            end_balance: e.end_balance,
            actor,
        });
    }

    /// Every entry of `entries` under one source, indexes from `first`.
    #[allow(clippy::too_many_arguments)]
    fn push_all(
        &mut self,
        pool: PoolRef<'a>,
        ts: DateTime<Utc>,
        kind: EntryKind,
        source: &'a str,
        source_id: Cow<'a, str>,
        first: i32,
        entries: &[Entry],
        actor: &'a str,
    ) {
        for (i, e) in entries.iter().enumerate() {
            self.push(pool, ts, kind, source, source_id.clone(), first + i as i32, e, actor);
        }
    }
}

/// The ledger entries of a batch (see the module doc of `settle`).
pub fn entries<'a>(facts: &[&'a LedgerMsg], known: &'a Known<'_>, mode: Mode, now: DateTime<Utc>) -> EntryPlan<'a> {
    let slipped: HashSet<Uuid> = known.slipped.iter().map(|u| u.event.event_uid).collect();
    // Redelivered event uid -> its second charge in a rebuilt hot pool.
    let again: HashMap<Uuid, &UsageFact> = known.reapplied.iter().map(|(orig, u)| (*orig, u)).collect();
    let mut plan = EntryPlan {
        checked: mode == Mode::Checked,
        ..EntryPlan::default()
    };
    for f in facts {
        match f {
            LedgerMsg::Usage(u) => {
                let given_back: Option<(&UsageFact, &str)> = if slipped.contains(&u.event.event_uid) {
                    Some((u, "duplicate"))
                } else {
                    again.get(&u.event.event_uid).map(|a| (*a, "reapplied"))
                };
                match given_back {
                    Some((charge, source)) => given_back_entries(&mut plan, u, charge, source),
                    None => usage_entries(&mut plan, u, known.new_uids.contains(&u.event.event_uid), mode, now),
                }
            }
            LedgerMsg::Grant(g) => grant_entries(&mut plan, g),
            LedgerMsg::Reversal(v) => give_back_entries(&mut plan, v, "reversal", REVERSAL_IDX),
            LedgerMsg::DeadLetteredCharge(v) => give_back_entries(&mut plan, v, "dead_letter", DEAD_LETTER_IDX),
            LedgerMsg::GrantChange(v) => change_entries(&mut plan, v),
            LedgerMsg::Limit(l) => plan.limits.push(l),
        }
    }
    plan
}

/// A new grant's entry (and, under a soft limit, the overdraft it repaid).
fn grant_entries<'a>(plan: &mut EntryPlan<'a>, g: &'a GrantFact) {
    plan.checked = true;
    let s = &g.grant;
    let pool = PoolRef {
        tenant_id: &g.tenant_id,
        customer_id: &s.customer_id,
        resource_id: &s.resource_id,
        credit_type: &s.credit_type,
    };
    let sid = Cow::Owned(s.id.to_string());
    plan.push_all(
        pool,
        s.created_at,
        EntryKind::Grant,
        &s.source,
        sid,
        0,
        &g.entries,
        &g.actor,
    );
}

/// A reversal applied by the rater, or a dead-lettered event's charge: `adjust` entries under
/// the event uid, indexes from `first` (apart from the charge's own).
fn give_back_entries<'a>(plan: &mut EntryPlan<'a>, v: &'a ReversalFact, source: &'a str, first: i32) {
    plan.checked = true;
    let sid = Cow::Owned(v.event_uid.to_string());
    plan.push_all(
        PoolRef::of(&v.pool),
        v.at,
        EntryKind::Adjust,
        source,
        sid,
        first,
        &v.entries,
        "system",
    );
}

/// A void, expiry or activation; an activation is remembered for the overdraft it repaid.
fn change_entries<'a>(plan: &mut EntryPlan<'a>, v: &'a GrantChangeFact) {
    plan.checked = true;
    // A scheduled grant activated by the first event that drew on it has the system as its
    // actor; the sweeper's activations and expiries have the sweeper.
    let source = match v.change {
        GrantChange::Void => "api",
        GrantChange::Activate if v.actor == "system" => "usage",
        _ => "sweeper",
    };
    let sid = v.grant_id.to_string();
    let kind = v.change.entry_kind();
    let pool = PoolRef::of(&v.pool);
    plan.push_all(
        pool,
        v.at,
        kind,
        source,
        Cow::Owned(sid.clone()),
        0,
        &v.entries,
        &v.actor,
    );
    if v.change == GrantChange::Activate {
        let a = Activation {
            grant_id: v.grant_id,
            repaid: v.repaid,
            pool: v.pool.clone(),
        };
        plan.activations.insert((v.pool.tenant_id.clone(), sid), a);
    }
}

/// A charge the hot pool made and gives back (a duplicate that slipped past Redis, or a second
/// charge in a rebuilt pool): its entries go in where Redis made them, as `adjust` under the uid
/// its reverse is applied for; the reverse's own entries follow when the rater has applied it.
fn given_back_entries<'a>(plan: &mut EntryPlan<'a>, u: &'a UsageFact, charge: &'a UsageFact, source: &'a str) {
    let Outcome::Settled {
        credit_type, entries, ..
    } = &charge.outcome
    else {
        return;
    };
    plan.checked = true;
    let sid = Cow::Owned(charge.event.event_uid.to_string());
    let pool = PoolRef::of_usage(u, credit_type);
    plan.push_all(
        pool,
        u.event.timestamp,
        EntryKind::Adjust,
        source,
        sid,
        0,
        entries,
        "system",
    );
}

/// A usage event's own entries: one `consume` per grant touched, or one `deny` at the balance it
/// was refused at. A redelivered row's entries were settled with it (written again only on a
/// checked retry, where ON CONFLICT keeps them once).
fn usage_entries<'a>(plan: &mut EntryPlan<'a>, u: &'a UsageFact, new: bool, mode: Mode, now: DateTime<Utc>) {
    if !new && mode == Mode::Fast {
        return;
    }
    plan.checked |= !new;
    let ev = &u.event;
    if let Ok(d) = (now - ev.accepted_at).to_std() {
        plan.e2e.push(d.as_secs_f64());
    }
    let key = Cow::Borrowed(ev.idempotency_key.as_str());
    match &u.outcome {
        Outcome::Settled {
            credit_type, entries, ..
        } => {
            let pool = PoolRef::of_usage(u, credit_type);
            plan.push_all(
                pool,
                ev.timestamp,
                EntryKind::Consume,
                "usage",
                key,
                0,
                entries,
                "system",
            );
        }
        Outcome::Denied {
            credit_type,
            end_balance,
            ..
        } => {
            let e = Entry {
                grant_id: None,
                amount: Decimal::ZERO,
                end_balance: *end_balance,
            };
            let pool = PoolRef::of_usage(u, credit_type);
            plan.push(pool, ev.timestamp, EntryKind::Deny, "usage", key, 0, &e, "system");
        }
        Outcome::Unpriced { .. } | Outcome::Duplicate => {}
    }
}

/// A ledger row inserted now (what the checked insert returns; on the fast path, every row).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct NewEntry {
    pub tenant_id: String,
    pub customer_id: String,
    pub resource_id: String,
    pub credit_type: String,
    #[sqlx(rename = "type", try_from = "String")]
    pub kind: EntryKind,
    pub grant_id: Option<Uuid>,
    pub amount: Decimal,
    pub source_id: String,
}

impl From<&EntryRow<'_>> for NewEntry {
    fn from(r: &EntryRow<'_>) -> Self {
        NewEntry {
            tenant_id: r.pool.tenant_id.to_owned(),
            customer_id: r.pool.customer_id.to_owned(),
            resource_id: r.pool.resource_id.to_owned(),
            credit_type: r.pool.credit_type.to_owned(),
            kind: r.kind,
            grant_id: r.grant_id,
            amount: r.amount,
            source_id: r.source_id.clone().into_owned(),
        }
    }
}

/// How a grant ended in this batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantEnd {
    Voided,
    Expired,
}

impl GrantEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantEnd::Voided => "voided",
            GrantEnd::Expired => "expired",
        }
    }
}

/// What the batch's new entries did to one grant.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct GrantMove {
    /// Remaining moved by.
    pub delta: Decimal,
    /// Voided or expired now (its remaining becomes 0).
    pub ended: Option<GrantEnd>,
    /// A scheduled grant activated now.
    pub activated: bool,
}

/// Grant remainders and pool balances moved by the new entries only (a redelivered fact
/// inserts nothing and moves nothing).
#[derive(Default)]
pub struct Moves {
    /// (tenant, grant) -> its move.
    pub grants: HashMap<(String, Uuid), GrantMove>,
    pub pools: HashMap<PoolId, PoolMove>,
}

/// The moves of the entries inserted now. `repaid` is the overdraft repaid by grants inserted
/// now (a grant is inserted with its remaining already: its entry moves the pool only), to which
/// each new activation's repayment is added.
pub fn moves(
    new_rows: Vec<NewEntry>,
    mut activations: HashMap<(String, String), Activation>,
    mut repaid: HashMap<PoolId, Decimal>,
) -> Moves {
    let mut out = Moves::default();
    for row in new_rows {
        let pool = PoolId {
            tenant_id: row.tenant_id,
            customer_id: row.customer_id,
            resource_id: row.resource_id,
            credit_type: row.credit_type,
        };
        let t = pool.tenant_id.clone();
        let p = out.pools.entry(pool).or_default();
        p.balance += row.amount;
        let funding = if row.kind == EntryKind::Grant {
            row.amount
        } else {
            Decimal::ZERO
        };
        p.steps.push((row.amount, funding));
        match (row.kind, row.grant_id) {
            // Activating a scheduled grant may repay overdraft from it.
            (EntryKind::Grant, _) => {
                if let Some(a) = activations.remove(&(t.clone(), row.source_id)) {
                    let g = out.grants.entry((t, a.grant_id)).or_default();
                    g.delta -= a.repaid;
                    g.activated = true;
                    *repaid.entry(a.pool).or_default() += a.repaid;
                }
            }
            (kind, Some(gid)) => {
                let g = out.grants.entry((t, gid)).or_default();
                g.delta += row.amount;
                match kind {
                    EntryKind::Void => g.ended = Some(GrantEnd::Voided),
                    EntryKind::Expire => g.ended = Some(GrantEnd::Expired),
                    _ => {}
                }
            }
            // Overdraft under a soft limit: consumption beyond every grant.
            (_, None) => p.overdraft -= row.amount,
        }
    }
    for (pool, r) in repaid {
        out.pools.entry(pool).or_default().overdraft -= r;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_facts::{entry, grant, settled, t, usage};
    use shared::model::{GrantChangeFact, ReversalFact};

    fn pool() -> PoolId {
        PoolId {
            tenant_id: "t".into(),
            customer_id: "c".into(),
            resource_id: String::new(),
            credit_type: "credits".into(),
        }
    }

    fn uid(f: &LedgerMsg) -> Uuid {
        match f {
            LedgerMsg::Usage(u) => u.event.event_uid,
            _ => unreachable!(),
        }
    }

    fn new_of(facts: &[&LedgerMsg]) -> Known<'static> {
        Known {
            new_uids: facts
                .iter()
                .filter(|f| matches!(f, LedgerMsg::Usage(_)))
                .map(|f| uid(f))
                .collect(),
            ..Known::default()
        }
    }

    #[test]
    fn fresh_usage_takes_the_plain_insert_and_keeps_fact_order() {
        let a = usage(1, settled(vec![entry(Some(9), -2, 8)]));
        let b = usage(
            2,
            Outcome::Denied {
                credit_type: "credits".into(),
                cost: Decimal::from(20),
                end_balance: Decimal::from(8),
                reason: "hard limit".into(),
            },
        );
        let c = usage(
            3,
            Outcome::Unpriced {
                reason: "no mapping".into(),
            },
        );
        let facts = [&a, &b, &c];
        let known = new_of(&facts);
        let p = entries(&facts, &known, Mode::Fast, t(101));
        assert!(!p.checked);
        let kinds: Vec<(EntryKind, &str, i64)> = p
            .rows
            .iter()
            .map(|r| (r.kind, r.source_id.as_ref(), r.amount.try_into().unwrap()))
            .collect();
        assert_eq!(kinds, [(EntryKind::Consume, "k1", -2), (EntryKind::Deny, "k2", 0)]);
        assert_eq!(p.rows[1].end_balance, Decimal::from(8));
        assert_eq!(p.e2e, [1.0, 1.0, 1.0]);
        // A retry puts the same rows through ON CONFLICT.
        assert!(entries(&facts, &known, Mode::Checked, t(101)).checked);
    }

    #[test]
    fn a_grant_enters_before_the_usage_that_follows_it_and_forces_the_checked_insert() {
        let g = grant(9, 10, 10);
        let u = usage(1, settled(vec![entry(Some(9), -3, 7)]));
        let facts = [&g, &u];
        let known = new_of(&facts);
        let p = entries(&facts, &known, Mode::Fast, t(101));
        assert!(p.checked);
        let kinds: Vec<EntryKind> = p.rows.iter().map(|r| r.kind).collect();
        assert_eq!(kinds, [EntryKind::Grant, EntryKind::Consume]);
        assert_eq!(p.rows[0].source_id, Uuid::from_u128(9).to_string());
        assert_eq!(p.rows[0].actor, "api");
    }

    #[test]
    fn a_redelivered_row_writes_nothing_on_the_fast_path_and_everything_on_a_retry() {
        let u = usage(1, settled(vec![entry(Some(9), -3, 7)]));
        let facts = [&u];
        let known = Known::default();
        let fast = entries(&facts, &known, Mode::Fast, t(101));
        assert!(fast.rows.is_empty() && fast.e2e.is_empty() && !fast.checked);
        let retry = entries(&facts, &known, Mode::Checked, t(101));
        assert_eq!(retry.rows.len(), 1);
        assert!(retry.checked);
    }

    #[test]
    fn a_slipped_duplicate_is_written_as_an_adjust_under_its_uid_and_recorded_as_caught_by_postgres() {
        let first = usage(1, settled(vec![entry(Some(9), -3, 7)]));
        let LedgerMsg::Usage(mut again) = usage(2, settled(vec![entry(Some(9), -3, 4)])) else {
            unreachable!()
        };
        again.event.idempotency_key = "k1".into();
        let again = LedgerMsg::Usage(again);
        let caught = usage(3, Outcome::Duplicate);
        let facts = [&first, &again, &caught];
        let LedgerMsg::Usage(slipped) = &again else {
            unreachable!()
        };
        let known = Known {
            new_uids: [uid(&first)].into(),
            slipped: vec![slipped],
            reapplied: vec![],
        };
        let p = entries(&facts, &known, Mode::Fast, t(101));
        assert!(p.checked);
        let rows: Vec<(EntryKind, &str, String)> = p
            .rows
            .iter()
            .map(|r| (r.kind, r.source, r.source_id.to_string()))
            .collect();
        assert_eq!(
            rows,
            [
                (EntryKind::Consume, "usage", "k1".to_string()),
                (EntryKind::Adjust, "duplicate", Uuid::from_u128(2).to_string()),
            ]
        );
        let d = duplicates(&facts, &known.slipped);
        let by: Vec<(Uuid, CaughtBy)> = d.iter().map(|r| (r.event_uid, r.caught_by)).collect();
        assert_eq!(
            by,
            [
                (Uuid::from_u128(3), CaughtBy::Redis),
                (Uuid::from_u128(2), CaughtBy::Postgres)
            ]
        );
    }

    #[test]
    fn lost_rows_split_by_who_holds_the_key() {
        let LedgerMsg::Usage(a) = usage(1, Outcome::Duplicate) else {
            unreachable!()
        };
        let LedgerMsg::Usage(b) = usage(2, Outcome::Duplicate) else {
            unreachable!()
        };
        let holder: HashMap<(String, String), Uuid> = [
            (("t".to_string(), "k1".to_string()), Uuid::from_u128(1)),
            (("t".to_string(), "k2".to_string()), Uuid::from_u128(7)),
        ]
        .into();
        let (slipped, redelivered) = split_lost(&[&a, &b], &holder);
        assert_eq!(slipped, [&b]);
        assert_eq!(redelivered, [&a]);
    }

    #[test]
    fn only_a_charge_that_differs_from_the_settled_one_is_given_back_under_a_stable_uid() {
        let LedgerMsg::Usage(u) = usage(1, settled(vec![entry(Some(9), -3, 7)])) else {
            unreachable!()
        };
        let key = ("t".to_string(), "k1".to_string());
        let same: SettledEntries = [(key.clone(), vec![(0, Decimal::from(-3), Decimal::from(7))])].into();
        assert!(reapplied(&[&u], same).is_empty());
        let other: SettledEntries = [(key.clone(), vec![(0, Decimal::from(-3), Decimal::from(10))])].into();
        let a = reapplied(&[&u], other.clone());
        let b = reapplied(&[&u], other);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].0, u.event.event_uid);
        assert_ne!(a[0].1.event.event_uid, u.event.event_uid);
        assert_eq!(a[0].1.event.event_uid, b[0].1.event.event_uid);
    }

    fn row(kind: EntryKind, g: Option<u128>, amount: i64, sid: &str) -> NewEntry {
        NewEntry {
            tenant_id: "t".into(),
            customer_id: "c".into(),
            resource_id: String::new(),
            credit_type: "credits".into(),
            kind,
            grant_id: g.map(Uuid::from_u128),
            amount: Decimal::from(amount),
            source_id: sid.into(),
        }
    }

    #[test]
    fn moves_follow_the_new_entries_only() {
        let gid = Uuid::from_u128(9).to_string();
        let rows = vec![
            row(EntryKind::Grant, Some(9), 10, &gid),
            row(EntryKind::Consume, Some(9), -4, "k1"),
            // Overdraft under a soft limit: beyond every grant.
            row(EntryKind::Consume, None, -2, "k2"),
            row(EntryKind::Void, Some(8), -5, "x"),
        ];
        let m = moves(rows, HashMap::new(), HashMap::new());
        let p = &m.pools[&pool()];
        assert_eq!(p.balance, Decimal::from(-1));
        assert_eq!(p.overdraft, Decimal::from(2));
        let steps: Vec<(i64, i64)> = p
            .steps
            .iter()
            .map(|(b, f)| ((*b).try_into().unwrap(), (*f).try_into().unwrap()))
            .collect();
        assert_eq!(steps, [(10, 10), (-4, 0), (-2, 0), (-5, 0)]);
        // A grant's own entry does not move its remaining (it was inserted with it).
        assert_eq!(
            m.grants[&("t".to_string(), Uuid::from_u128(9))].delta,
            Decimal::from(-4)
        );
        let voided = &m.grants[&("t".to_string(), Uuid::from_u128(8))];
        assert_eq!(voided.ended, Some(GrantEnd::Voided));
    }

    #[test]
    fn an_activation_repays_overdraft_from_its_grant_once_its_entry_is_new() {
        let gid = Uuid::from_u128(9);
        let change = LedgerMsg::GrantChange(GrantChangeFact {
            change: GrantChange::Activate,
            pool: pool(),
            grant_id: gid,
            at: t(60),
            actor: "sweeper".into(),
            entries: vec![entry(Some(9), 10, 7)],
            repaid: Decimal::from(3),
        });
        let facts = [&change];
        let known = Known::default();
        let p = entries(&facts, &known, Mode::Fast, t(61));
        assert_eq!(p.rows[0].source, "sweeper");
        let new: Vec<NewEntry> = p.rows.iter().map(NewEntry::from).collect();
        let m = moves(new, p.activations.clone(), HashMap::new());
        let g = &m.grants[&("t".to_string(), gid)];
        assert_eq!((g.delta, g.activated), (Decimal::from(-3), true));
        assert_eq!(m.pools[&pool()].overdraft, Decimal::from(-3));
        // Redelivered: no new entry, no move.
        let m = moves(Vec::new(), p.activations, HashMap::new());
        assert!(m.grants.is_empty() && m.pools.is_empty());
    }

    #[test]
    fn a_reversal_and_a_dead_lettered_charge_take_their_own_index_ranges() {
        let v = ReversalFact {
            pool: pool(),
            event_uid: Uuid::from_u128(5),
            at: t(70),
            entries: vec![entry(Some(9), 3, 10)],
        };
        let rev = LedgerMsg::Reversal(v.clone());
        let dead = LedgerMsg::DeadLetteredCharge(v);
        let facts = [&dead, &rev];
        let known = Known::default();
        let p = entries(&facts, &known, Mode::Fast, t(71));
        let got: Vec<(&str, i32)> = p.rows.iter().map(|r| (r.source, r.idx)).collect();
        assert_eq!(got, [("dead_letter", DEAD_LETTER_IDX), ("reversal", REVERSAL_IDX)]);
        assert!(p.rows.iter().all(|r| r.kind == EntryKind::Adjust));
    }
}
