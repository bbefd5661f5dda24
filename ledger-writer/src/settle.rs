//! One batch of facts -> one Postgres transaction.
//!
//! 1. usage events: insert, ON CONFLICT DO NOTHING. A conflicting key with the same event_uid
//!    is a redelivery (skip); with another uid it is a duplicate that slipped past Redis: it is
//!    counted, and a reverse command gives its deduction back to the hot pool (produced and
//!    acked before the commit; the rater applies it once per uid). What the hot pool charged
//!    for it is still written to the ledger (`adjust` entries, source `duplicate`, under its
//!    uid) where Redis charged it, and the rater's reversal fact writes the give-back (`adjust`
//!    entries, source `reversal`, same uid): the pool's end balances chain through both, and
//!    `consume` entries stay exactly the settled events' charges. The same for a second charge
//!    in a pool rebuilt after a Redis loss (source `reapplied`).
//! 2. grants: insert, ON CONFLICT DO NOTHING.
//! 3. ledger entries, in one insert in the order of the facts (a pool's facts are in one
//!    partition, in the rater's order), so ledger ids follow each pool's end-balance chain: a
//!    grant's entry before the usage that draws on it. Those of usage rows inserted in step 1
//!    cannot exist yet (a usage row and its entries are only ever written together): when the
//!    batch holds nothing else, a plain insert (no arbiter probe). Entries of redelivered or
//!    slipped usage are not written at all (copies of one fact within a batch are dropped
//!    first). With any grant or grant-change entry: ON CONFLICT DO NOTHING RETURNING what was
//!    new. A retry of a failed transaction takes the checked path for every entry (so a broken
//!    assumption costs one retry, never a stuck partition).
//! 4. grant remainders and pool balances move by the new entries only.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rust_decimal::Decimal;
use shared::model::{
    partition_key, Entry, GrantChange, InputMsg, LedgerMsg, LimitFact, Outcome, Release, ReverseCmd, UsageFact,
};
use sqlx::PgPool;
use uuid::Uuid;

use crate::metric as m;
use crate::webhooks::outbox::PoolMove;

pub struct Settler {
    pub db: PgPool,
    pub producer: FutureProducer,
    pub input_topic: String,
}

/// A pool as the entry columns take it.
fn pool_of(p: &shared::model::PoolId) -> (&str, &str, &str, &str) {
    (
        p.tenant_id.as_str(),
        p.customer_id.as_str(),
        p.resource_id.as_str(),
        p.credit_type.as_str(),
    )
}

/// Entry indexes of a reversal's `adjust` entries start here: the charge it gives back holds
/// the indexes below it under the same source id (one entry per grant touched).
const REVERSAL_IDX: i32 = 10_000;

/// Entry indexes of a dead-lettered event's charge (`adjust`, source `dead_letter`): apart from
/// its give-back's and from any other charge under the same uid.
const DEAD_LETTER_IDX: i32 = 20_000;

/// Column vectors for one multi-row insert into ledger_entries.
#[derive(Default)]
struct Entries {
    tenant: Vec<String>,
    customer: Vec<String>,
    resource: Vec<String>,
    credit_type: Vec<String>,
    ts: Vec<DateTime<Utc>>,
    kind: Vec<&'static str>,
    source: Vec<String>,
    source_id: Vec<String>,
    idx: Vec<i32>,
    grant_id: Vec<Option<Uuid>>,
    amount: Vec<Decimal>,
    end_balance: Vec<Decimal>,
    actor: Vec<String>,
}

impl Entries {
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        pool: (&str, &str, &str, &str),
        ts: DateTime<Utc>,
        kind: &'static str,
        source: &str,
        source_id: &str,
        idx: i32,
        e: &Entry,
        actor: &str,
    ) {
        self.tenant.push(pool.0.to_owned());
        self.customer.push(pool.1.to_owned());
        self.resource.push(pool.2.to_owned());
        self.credit_type.push(pool.3.to_owned());
        self.ts.push(ts);
        self.kind.push(kind);
        self.source.push(source.to_owned());
        self.source_id.push(source_id.to_owned());
        self.idx.push(idx);
        self.grant_id.push(e.grant_id);
        self.amount.push(e.amount);
        self.end_balance.push(e.end_balance);
        self.actor.push(actor.to_owned());
    }
}

type PoolKey = (String, String, String, String);

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
/// A ledger row inserted now: tenant, customer, resource, credit type, type, grant, amount, source id.
type NewRow = (String, String, String, String, String, Option<Uuid>, Decimal, String);

impl Entries {
    fn is_empty(&self) -> bool {
        self.tenant.is_empty()
    }

    /// Insert every entry; with `checked`, skip existing ones and return what was inserted,
    /// else insert all (a conflict is an error) and return them all.
    async fn insert(self, tx: &mut sqlx::PgConnection, checked: bool) -> Result<Vec<NewRow>, sqlx::Error> {
        if self.is_empty() {
            return Ok(Vec::new());
        }
        const INSERT: &str = "INSERT INTO ledger_entries (tenant_id, customer_id, resource_id, credit_type, ts, type,
                source, source_id, entry_idx, grant_id, amount, end_balance, actor)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::text[],
                $7::text[], $8::text[], $9::int4[], $10::uuid[], $11::numeric[], $12::numeric[], $13::text[])";
        let sql = if checked {
            format!(
                "{INSERT} ON CONFLICT (tenant_id, type, source_id, entry_idx) DO NOTHING
                 RETURNING tenant_id, customer_id, resource_id, credit_type, type, grant_id, amount, source_id"
            )
        } else {
            INSERT.to_owned()
        };
        macro_rules! bind_all {
            ($q:expr) => {
                $q.bind(&self.tenant)
                    .bind(&self.customer)
                    .bind(&self.resource)
                    .bind(&self.credit_type)
                    .bind(&self.ts)
                    .bind(&self.kind)
                    .bind(&self.source)
                    .bind(&self.source_id)
                    .bind(&self.idx)
                    .bind(&self.grant_id)
                    .bind(&self.amount)
                    .bind(&self.end_balance)
                    .bind(&self.actor)
            };
        }
        if checked {
            return bind_all!(sqlx::query_as::<_, NewRow>(&sql)).fetch_all(&mut *tx).await;
        }
        bind_all!(sqlx::query(&sql)).execute(&mut *tx).await?;
        let mut out = Vec::with_capacity(self.tenant.len());
        let rows = self
            .tenant
            .into_iter()
            .zip(self.customer)
            .zip(self.resource)
            .zip(self.credit_type)
            .zip(self.kind)
            .zip(self.grant_id)
            .zip(self.amount)
            .zip(self.source_id);
        for (((((((t, c), r), ct), k), g), a), sid) in rows {
            out.push((t, c, r, ct, k.to_owned(), g, a, sid));
        }
        Ok(out)
    }
}

impl Settler {
    /// Settle a batch (the fast path: usage entries of new usage rows without ON CONFLICT).
    pub async fn settle(&self, facts: &[&LedgerMsg]) -> anyhow::Result<()> {
        self.settle_opts(facts, false).await
    }

    /// Settle a batch; `checked` puts every ledger entry through ON CONFLICT (for retries).
    pub async fn settle_opts(&self, facts: &[&LedgerMsg], checked: bool) -> anyhow::Result<()> {
        if facts.is_empty() {
            return Ok(());
        }
        let facts = &unique_facts(facts)[..];
        let started = Instant::now();
        let mut tx = self.db.begin().await?;

        // 1. Usage events that decided something (not Redis-caught duplicates).
        let usage: Vec<&UsageFact> = facts
            .iter()
            .filter_map(|f| match f {
                LedgerMsg::Usage(u) if u.outcome != Outcome::Duplicate => Some(u),
                _ => None,
            })
            .collect();
        let mut slipped: Vec<&UsageFact> = Vec::new();
        let mut reapplied: Vec<UsageFact> = Vec::new();
        // The redelivered event uid each of `reapplied` is the second charge of.
        let mut reapplied_of: Vec<Uuid> = Vec::new();
        let mut new_uids: HashSet<Uuid> = HashSet::new();
        if !usage.is_empty() {
            let mut cols = UsageCols::default();
            for u in &usage {
                cols.push(u);
            }
            let inserted: Vec<(String, String, Uuid)> = sqlx::query_as(
                "INSERT INTO usage_events (tenant_id, idempotency_key, event_uid, customer_id, resource_id,
                    event_name, ts, accepted_at, status, reason, credit_type, cost, dimensions)
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::text[],
                    $7::timestamptz[], $8::timestamptz[], $9::text[], $10::text[], $11::text[], $12::numeric[], $13::jsonb[])
                 ON CONFLICT (tenant_id, idempotency_key) DO NOTHING
                 RETURNING tenant_id, idempotency_key, event_uid",
            )
            .bind(&cols.tenant)
            .bind(&cols.key)
            .bind(&cols.uid)
            .bind(&cols.customer)
            .bind(&cols.resource)
            .bind(&cols.name)
            .bind(&cols.ts)
            .bind(&cols.accepted)
            .bind(&cols.status)
            .bind(&cols.reason)
            .bind(&cols.credit_type)
            .bind(&cols.cost)
            .bind(&cols.dims)
            .fetch_all(&mut *tx)
            .await?;
            metrics::counter!(m::ROWS, "table" => "usage_events").increment(inserted.len() as u64);
            new_uids = inserted.iter().map(|r| r.2).collect();
            let lost: Vec<&&UsageFact> = usage
                .iter()
                .filter(|u| !new_uids.contains(&u.event.event_uid))
                .collect();
            if !lost.is_empty() {
                // Who holds these keys? Same uid = a redelivery; another uid = a slipped duplicate.
                let tenants: Vec<String> = lost.iter().map(|u| u.event.tenant_id.clone()).collect();
                let keys: Vec<String> = lost.iter().map(|u| u.event.idempotency_key.clone()).collect();
                let holders: Vec<(String, String, Uuid)> = sqlx::query_as(
                    "SELECT u.tenant_id, u.idempotency_key, u.event_uid FROM usage_events u
                     JOIN UNNEST($1::text[], $2::text[]) AS k(t, k) ON u.tenant_id = k.t AND u.idempotency_key = k.k",
                )
                .bind(&tenants)
                .bind(&keys)
                .fetch_all(&mut *tx)
                .await?;
                let holder: HashMap<(&str, &str), Uuid> =
                    holders.iter().map(|(t, k, u)| ((t.as_str(), k.as_str()), *u)).collect();
                let mut redelivered = Vec::new();
                for u in lost {
                    let h = holder.get(&(u.event.tenant_id.as_str(), u.event.idempotency_key.as_str()));
                    if h != Some(&u.event.event_uid) {
                        slipped.push(u);
                    } else {
                        redelivered.push(*u);
                    }
                }
                let pairs = reapplied_in_redis(&mut tx, &redelivered).await?;
                reapplied_of = pairs.iter().map(|p| p.0).collect();
                reapplied = pairs.into_iter().map(|p| p.1).collect();
            }
        }

        // Usage rollups, from the rows inserted now only.
        crate::rollups::add(&mut tx, &usage, &new_uids).await?;

        // Duplicates: caught by Redis, or slipped past it and caught here.
        let mut dup_t = Vec::new();
        let mut dup_uid = Vec::new();
        let mut dup_key = Vec::new();
        let mut dup_by = Vec::new();
        for f in facts {
            if let LedgerMsg::Usage(u) = f {
                if u.outcome == Outcome::Duplicate {
                    dup_t.push(u.event.tenant_id.clone());
                    dup_uid.push(u.event.event_uid);
                    dup_key.push(u.event.idempotency_key.clone());
                    dup_by.push("redis");
                }
            }
        }
        for u in &slipped {
            dup_t.push(u.event.tenant_id.clone());
            dup_uid.push(u.event.event_uid);
            dup_key.push(u.event.idempotency_key.clone());
            dup_by.push("postgres");
        }
        if !dup_t.is_empty() {
            let n = sqlx::query(
                "INSERT INTO duplicate_events (tenant_id, event_uid, idempotency_key, caught_by)
                 SELECT * FROM UNNEST($1::text[], $2::uuid[], $3::text[], $4::text[]) ON CONFLICT DO NOTHING",
            )
            .bind(&dup_t)
            .bind(&dup_uid)
            .bind(&dup_key)
            .bind(&dup_by)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            metrics::counter!(m::ROWS, "table" => "duplicate_events").increment(n);
            for by in &dup_by {
                metrics::counter!(m::DUPLICATES, "caught_by" => *by).increment(1);
            }
        }

        // 2. Grants, and the overdraft each repaid (only for grants inserted now).
        let mut repaid: HashMap<PoolKey, Decimal> = HashMap::new();
        for f in facts {
            if let LedgerMsg::Grant(g) = f {
                let s = &g.grant;
                let inserted = sqlx::query(
                    "INSERT INTO grants (tenant_id, id, customer_id, resource_id, credit_type, amount, remaining,
                        status, category, priority, cost_amount, cost_currency, effective_at, expires_at,
                        display_name, description, metadata, source, created_at, activated)
                     VALUES ($1,$2,$3,$4,$5,$6,$7,'active',$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19)
                     ON CONFLICT DO NOTHING",
                )
                .bind(&g.tenant_id)
                .bind(s.id)
                .bind(&s.customer_id)
                .bind(&s.resource_id)
                .bind(&s.credit_type)
                .bind(s.amount)
                .bind(g.remaining)
                .bind(match s.category {
                    shared::model::Category::Paid => "paid",
                    shared::model::Category::Promo => "promo",
                })
                .bind(s.priority as i32)
                .bind(s.cost.as_ref().map(|c| c.amount))
                .bind(s.cost.as_ref().map(|c| c.currency.clone()))
                .bind(s.effective_at)
                .bind(s.expires_at)
                .bind(&s.display_name)
                .bind(&s.description)
                .bind(&s.metadata)
                .bind(&s.source)
                .bind(s.created_at)
                .bind(!s.scheduled())
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if inserted == 1 && g.remaining < s.amount {
                    let k = (
                        g.tenant_id.clone(),
                        s.customer_id.clone(),
                        s.resource_id.clone(),
                        s.credit_type.clone(),
                    );
                    *repaid.entry(k).or_default() += s.amount - g.remaining;
                }
            }
        }

        // 3. Ledger entries, in fact order (see the module doc).
        let mut es = Entries::default();
        // Every entry is of a usage row inserted now: the plain insert is safe.
        let mut all_fresh = !checked;
        let mut activations: HashMap<(String, String), (Uuid, Decimal, PoolKey)> = HashMap::new();
        let mut e2e: Vec<f64> = Vec::new();
        let mut limits: Vec<&LimitFact> = Vec::new();
        let now = Utc::now();
        let slipped_uids: HashSet<Uuid> = slipped.iter().map(|u| u.event.event_uid).collect();
        // Redelivered event uid -> its second charge in a rebuilt hot pool (with a uid of its own).
        let again: HashMap<Uuid, &UsageFact> = reapplied
            .iter()
            .zip(&reapplied_of)
            .map(|(u, orig)| (*orig, u))
            .collect();
        for f in facts {
            match f {
                LedgerMsg::Usage(u) => {
                    let ev = &u.event;
                    // A charge the hot pool made and is given back (a duplicate that slipped past
                    // Redis, or a second charge in a rebuilt pool): its entries go in where Redis
                    // made them, under the uid its reverse is applied for, and the reverse's
                    // adjust entries follow when the rater has applied it.
                    let given_back = if slipped_uids.contains(&ev.event_uid) {
                        Some((u, "duplicate"))
                    } else {
                        again.get(&ev.event_uid).map(|a| (*a, "reapplied"))
                    };
                    if let Some((g, source)) = given_back {
                        if let Outcome::Settled {
                            credit_type, entries, ..
                        } = &g.outcome
                        {
                            all_fresh = false;
                            let pool = (
                                ev.tenant_id.as_str(),
                                ev.customer_id.as_str(),
                                ev.resource_id.as_str(),
                                credit_type.as_str(),
                            );
                            let sid = g.event.event_uid.to_string();
                            for (i, e) in entries.iter().enumerate() {
                                es.push(pool, ev.timestamp, "adjust", source, &sid, i as i32, e, "system");
                            }
                        }
                        continue;
                    }
                    // A redelivered usage row: its entries were settled with it.
                    let new = new_uids.contains(&ev.event_uid);
                    if !new && !checked {
                        continue;
                    }
                    all_fresh &= new;
                    let out = &mut es;
                    if let Ok(d) = (now - ev.accepted_at).to_std() {
                        e2e.push(d.as_secs_f64());
                    }
                    match &u.outcome {
                        Outcome::Settled {
                            credit_type, entries, ..
                        } => {
                            let pool = (
                                ev.tenant_id.as_str(),
                                ev.customer_id.as_str(),
                                ev.resource_id.as_str(),
                                credit_type.as_str(),
                            );
                            for (i, e) in entries.iter().enumerate() {
                                out.push(
                                    pool,
                                    ev.timestamp,
                                    "consume",
                                    "usage",
                                    &ev.idempotency_key,
                                    i as i32,
                                    e,
                                    "system",
                                );
                            }
                        }
                        Outcome::Denied {
                            credit_type,
                            end_balance,
                            ..
                        } => {
                            let pool = (
                                ev.tenant_id.as_str(),
                                ev.customer_id.as_str(),
                                ev.resource_id.as_str(),
                                credit_type.as_str(),
                            );
                            let e = Entry {
                                grant_id: None,
                                amount: Decimal::ZERO,
                                end_balance: *end_balance,
                            };
                            out.push(
                                pool,
                                ev.timestamp,
                                "deny",
                                "usage",
                                &ev.idempotency_key,
                                0,
                                &e,
                                "system",
                            );
                        }
                        Outcome::Unpriced { .. } | Outcome::Duplicate => {}
                    }
                }
                LedgerMsg::Grant(g) => {
                    all_fresh = false;
                    let s = &g.grant;
                    let pool = (
                        g.tenant_id.as_str(),
                        s.customer_id.as_str(),
                        s.resource_id.as_str(),
                        s.credit_type.as_str(),
                    );
                    let sid = s.id.to_string();
                    for (i, e) in g.entries.iter().enumerate() {
                        es.push(pool, s.created_at, "grant", &s.source, &sid, i as i32, e, &g.actor);
                    }
                }
                LedgerMsg::Reversal(v) => {
                    all_fresh = false;
                    let p = &v.pool;
                    let pool = pool_of(p);
                    let sid = v.event_uid.to_string();
                    for (i, e) in v.entries.iter().enumerate() {
                        es.push(
                            pool,
                            v.at,
                            "adjust",
                            "reversal",
                            &sid,
                            REVERSAL_IDX + i as i32,
                            e,
                            "system",
                        );
                    }
                }
                LedgerMsg::Limit(l) => limits.push(l),
                LedgerMsg::DeadLetteredCharge(v) => {
                    all_fresh = false;
                    let sid = v.event_uid.to_string();
                    for (i, e) in v.entries.iter().enumerate() {
                        es.push(
                            pool_of(&v.pool),
                            v.at,
                            "adjust",
                            "dead_letter",
                            &sid,
                            DEAD_LETTER_IDX + i as i32,
                            e,
                            "system",
                        );
                    }
                }
                LedgerMsg::GrantChange(v) => {
                    all_fresh = false;
                    let p = &v.pool;
                    let pool = pool_of(p);
                    let sid = v.grant_id.to_string();
                    // A scheduled grant activated by the first event that drew on it has the
                    // system as its actor; the sweeper's activations and expiries have the sweeper.
                    let source = match v.change {
                        GrantChange::Void => "api",
                        GrantChange::Activate if v.actor == "system" => "usage",
                        _ => "sweeper",
                    };
                    for (i, e) in v.entries.iter().enumerate() {
                        es.push(pool, v.at, v.change.entry_type(), source, &sid, i as i32, e, &v.actor);
                    }
                    if v.change == GrantChange::Activate {
                        let k = (
                            p.tenant_id.clone(),
                            p.customer_id.clone(),
                            p.resource_id.clone(),
                            p.credit_type.clone(),
                        );
                        activations.insert((p.tenant_id.clone(), sid), (v.grant_id, v.repaid, k));
                    }
                }
            }
        }
        let new_rows = es.insert(&mut tx, !all_fresh).await?;
        store_limits(&mut tx, &limits).await?;
        metrics::counter!(m::ROWS, "table" => "ledger_entries").increment(new_rows.len() as u64);

        // 4. Move grant remainders and pool balances by what was inserted now.
        let mut grant_delta: HashMap<(String, Uuid), (Decimal, Option<&'static str>, bool)> = HashMap::new();
        let mut pool_delta: HashMap<PoolKey, PoolMove> = HashMap::new();
        for (t, c, r, ct, kind, gid, amount, source_id) in new_rows {
            let p = pool_delta.entry((t.clone(), c, r, ct)).or_default();
            p.balance += amount;
            let funding = if kind == "grant" { amount } else { Decimal::ZERO };
            p.steps.push((amount, funding));
            match (kind.as_str(), gid) {
                // A grant is inserted with its remaining already; its entry moves the pool only,
                // except that activating a scheduled grant may repay overdraft from it.
                ("grant", _) => {
                    if let Some((g, r, k)) = activations.remove(&(t.clone(), source_id)) {
                        let d = grant_delta.entry((t, g)).or_default();
                        d.0 -= r;
                        d.2 = true;
                        repaid.entry(k).and_modify(|x| *x += r).or_insert(r);
                    }
                }
                (_, Some(g)) => {
                    let d = grant_delta.entry((t, g)).or_default();
                    d.0 += amount;
                    match kind.as_str() {
                        "void" => d.1 = Some("voided"),
                        "expire" => d.1 = Some("expired"),
                        _ => {}
                    }
                }
                // Overdraft under a soft limit: consumption beyond every grant.
                (_, None) => p.overdraft -= amount,
            }
        }
        for (k, r) in repaid {
            pool_delta.entry(k).or_default().overdraft -= r;
        }
        if !grant_delta.is_empty() {
            let (mut t, mut ids, mut ds, mut ends, mut acts) = (vec![], vec![], vec![], vec![], vec![]);
            for ((tenant, id), (d, end, act)) in &grant_delta {
                t.push(tenant.as_str());
                ids.push(*id);
                ds.push(*d);
                ends.push(*end);
                acts.push(*act);
            }
            sqlx::query(
                "UPDATE grants g SET remaining = CASE WHEN d.ended IS NOT NULL THEN 0 ELSE g.remaining + d.delta END,
                    status = CASE WHEN d.ended IS NOT NULL THEN d.ended
                                  WHEN g.status IN ('voided', 'expired') THEN g.status
                                  WHEN g.remaining + d.delta <= 0 THEN 'depleted' ELSE 'active' END,
                    voided_at = CASE WHEN d.ended = 'voided' THEN now() ELSE g.voided_at END,
                    activated = g.activated OR d.activated
                 FROM UNNEST($1::text[], $2::uuid[], $3::numeric[], $4::text[], $5::bool[])
                    AS d(tenant_id, id, delta, ended, activated)
                 WHERE g.tenant_id = d.tenant_id AND g.id = d.id",
            )
            .bind(&t)
            .bind(&ids)
            .bind(&ds)
            .bind(&ends)
            .bind(&acts)
            .execute(&mut *tx)
            .await?;
        }
        if !pool_delta.is_empty() {
            let (mut t, mut c, mut r, mut ct, mut b, mut o) = (vec![], vec![], vec![], vec![], vec![], vec![]);
            for ((tenant, customer, resource, credit_type), mv) in &pool_delta {
                let (bal, od) = (&mv.balance, &mv.overdraft);
                t.push(tenant.as_str());
                c.push(customer.as_str());
                r.push(resource.as_str());
                ct.push(credit_type.as_str());
                b.push(*bal);
                o.push(*od);
            }
            sqlx::query(
                "INSERT INTO pools AS p (tenant_id, customer_id, resource_id, credit_type, balance, overdraft)
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::numeric[], $6::numeric[])
                 ON CONFLICT (tenant_id, customer_id, credit_type, resource_id) DO UPDATE
                 SET balance = p.balance + EXCLUDED.balance, overdraft = p.overdraft + EXCLUDED.overdraft, updated_at = now()",
            )
            .bind(&t)
            .bind(&c)
            .bind(&r)
            .bind(&ct)
            .bind(&b)
            .bind(&o)
            .execute(&mut *tx)
            .await?;
        }

        // Give back what slipped duplicates deducted, durably, before the commit.
        if !slipped.is_empty() {
            self.reverse(&slipped, false).await?;
        }
        if !reapplied.is_empty() {
            self.reverse(&reapplied.iter().collect::<Vec<_>>(), false).await?;
        }
        // Webhook messages caused by this batch, in its transaction.
        let moved = crate::webhooks::outbox::Moved {
            pools: &pool_delta,
            grants: &grant_delta,
            new_usage: &new_uids,
        };
        crate::webhooks::outbox::record(&mut tx, facts, &moved).await?;
        tx.commit().await?;
        metrics::histogram!(m::TX_DURATION).record(started.elapsed().as_secs_f64());
        for s in e2e {
            metrics::histogram!(m::E2E).record(s);
        }
        Ok(())
    }

    /// Give the deductions of `facts` back to their hot pools (`reverse` commands through the
    /// input topic, applied once per event uid); with `release`, their dedupe marks go too.
    pub async fn reverse(&self, facts: &[&UsageFact], release: bool) -> anyhow::Result<()> {
        for u in facts {
            let Outcome::Settled {
                credit_type, entries, ..
            } = &u.outcome
            else {
                continue;
            };
            if entries.is_empty() {
                continue;
            }
            let ev = &u.event;
            tracing::warn!(tenant = %ev.tenant_id, key = %ev.idempotency_key, release, "giving a deduction back to redis");
            let cmd = InputMsg::Reverse(ReverseCmd {
                tenant_id: ev.tenant_id.clone(),
                customer_id: ev.customer_id.clone(),
                resource_id: ev.resource_id.clone(),
                credit_type: credit_type.clone(),
                decimals: entries[0].amount.scale(),
                event_uid: ev.event_uid,
                entries: entries.clone(),
                release: release.then(|| Release {
                    idempotency_key: ev.idempotency_key.clone(),
                    timestamp: ev.timestamp,
                }),
            });
            let payload = serde_json::to_vec(&cmd)?;
            let key = partition_key(&ev.tenant_id, &ev.customer_id);
            // Rare (a duplicate that slipped past Redis): one at a time is fine.
            self.producer
                .send(
                    FutureRecord::to(&self.input_topic).key(&key).payload(&payload),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| anyhow::anyhow!("reverse produce: {e}"))?;
            metrics::counter!(m::REVERSALS).increment(1);
        }
        Ok(())
    }
}

/// Redelivered usage facts (same key, same uid as the settled event) that Redis charged a second
/// time: a rater that crashed after charging an event, while Redis lost its state, charges it
/// again in the pool rebuilt from Postgres (which already holds the first charge), and the
/// second fact's entries differ from the settled ones (a journal replay repeats them exactly).
/// Each is returned with a uid of its own (derived from the event's and its entries), so the
/// reverse that gives the second charge back is applied once, after the event's own uid.
async fn reapplied_in_redis(
    tx: &mut sqlx::PgConnection,
    redelivered: &[&UsageFact],
) -> Result<Vec<(Uuid, UsageFact)>, sqlx::Error> {
    let charged: Vec<&UsageFact> = redelivered
        .iter()
        .copied()
        .filter(|u| matches!(&u.outcome, Outcome::Settled { entries, .. } if !entries.is_empty()))
        .collect();
    if charged.is_empty() {
        return Ok(Vec::new());
    }
    let tenants: Vec<String> = charged.iter().map(|u| u.event.tenant_id.clone()).collect();
    let keys: Vec<String> = charged.iter().map(|u| u.event.idempotency_key.clone()).collect();
    let rows: Vec<(String, String, i32, Decimal, Decimal)> = sqlx::query_as(
        "SELECT e.tenant_id, e.source_id, e.entry_idx, e.amount, e.end_balance FROM ledger_entries e
         JOIN UNNEST($1::text[], $2::text[]) AS k(t, k) ON e.tenant_id = k.t AND e.type = 'consume' AND e.source_id = k.k",
    )
    .bind(&tenants)
    .bind(&keys)
    .fetch_all(&mut *tx)
    .await?;
    // (tenant, idempotency key) -> its settled entries (index, amount, end balance).
    type Settled<'a> = HashMap<(&'a str, &'a str), Vec<(i32, Decimal, Decimal)>>;
    let mut settled: Settled = HashMap::new();
    for (t, k, i, a, b) in &rows {
        settled.entry((t.as_str(), k.as_str())).or_default().push((*i, *a, *b));
    }
    let mut out = Vec::new();
    for u in charged {
        let Outcome::Settled { entries, .. } = &u.outcome else {
            continue;
        };
        let mut have = settled
            .remove(&(u.event.tenant_id.as_str(), u.event.idempotency_key.as_str()))
            .unwrap_or_default();
        have.sort_by_key(|x| x.0);
        let same = have.len() == entries.len()
            && have
                .iter()
                .zip(entries)
                .all(|(h, e)| h.1 == e.amount && h.2 == e.end_balance);
        if !same {
            let mut again = u.clone();
            let seed: String = entries
                .iter()
                .map(|e| format!("{}:{};", e.amount, e.end_balance))
                .collect();
            again.event.event_uid = Uuid::new_v5(&u.event.event_uid, seed.as_bytes());
            tracing::warn!(tenant = %u.event.tenant_id, key = %u.event.idempotency_key,
                "an event was charged again in a rebuilt hot pool: giving the second charge back");
            out.push((u.event.event_uid, again));
        }
    }
    Ok(out)
}

#[derive(Default)]
struct UsageCols {
    tenant: Vec<String>,
    key: Vec<String>,
    uid: Vec<Uuid>,
    customer: Vec<String>,
    resource: Vec<String>,
    name: Vec<String>,
    ts: Vec<DateTime<Utc>>,
    accepted: Vec<DateTime<Utc>>,
    status: Vec<&'static str>,
    reason: Vec<Option<String>>,
    credit_type: Vec<Option<String>>,
    cost: Vec<Option<Decimal>>,
    dims: Vec<serde_json::Value>,
}

impl UsageCols {
    fn push(&mut self, u: &UsageFact) {
        let e = &u.event;
        self.tenant.push(e.tenant_id.clone());
        self.key.push(e.idempotency_key.clone());
        self.uid.push(e.event_uid);
        self.customer.push(e.customer_id.clone());
        self.resource.push(e.resource_id.clone());
        self.name.push(e.event_name.clone());
        self.ts.push(e.timestamp);
        self.accepted.push(e.accepted_at);
        self.status.push(u.outcome.status());
        let (reason, ct, cost) = match &u.outcome {
            Outcome::Settled { credit_type, cost, .. } => (None, Some(credit_type.clone()), Some(*cost)),
            Outcome::Denied {
                credit_type,
                cost,
                reason,
                ..
            } => (Some(reason.clone()), Some(credit_type.clone()), Some(*cost)),
            Outcome::Unpriced { reason } => (Some(reason.clone()), None, None),
            Outcome::Duplicate => (None, None, None),
        };
        self.reason.push(reason);
        self.credit_type.push(ct);
        self.cost.push(cost);
        self.dims.push(serde_json::Value::Object(e.dimensions.clone()));
    }
}

/// Store per-pool limit overrides in fact order (the last one of a pool wins); None deletes.
async fn store_limits(tx: &mut sqlx::PgConnection, limits: &[&LimitFact]) -> Result<(), sqlx::Error> {
    for l in limits {
        let (t, c, r, ct) = pool_of(&l.pool);
        match l.limit {
            Some(k) => {
                sqlx::query(
                    "INSERT INTO pool_limits (tenant_id, customer_id, resource_id, credit_type, limit_kind)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (tenant_id, customer_id, credit_type, resource_id)
                     DO UPDATE SET limit_kind = EXCLUDED.limit_kind, updated_at = now()",
                )
                .bind(t)
                .bind(c)
                .bind(r)
                .bind(ct)
                .bind(k.as_str())
                .execute(&mut *tx)
                .await?;
            }
            None => {
                sqlx::query(
                    "DELETE FROM pool_limits WHERE tenant_id = $1 AND customer_id = $2 AND resource_id = $3
                        AND credit_type = $4",
                )
                .bind(t)
                .bind(c)
                .bind(r)
                .bind(ct)
                .execute(&mut *tx)
                .await?;
            }
        }
        metrics::counter!(m::ROWS, "table" => "pool_limits").increment(1);
    }
    Ok(())
}
