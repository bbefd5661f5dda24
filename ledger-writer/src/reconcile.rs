//! `ledger-writer reconcile`: does every pool agree with itself?
//!
//! For each settled pool it checks, and reports every difference:
//! 1. the sum of its ledger entries, plus what retention archived of it
//!    (`ledger_archived_totals`), equals its settled balance;
//! 2. its grants' remainders (activated ones) minus its overdraft equal that balance;
//! 3. the hot pool in Redis (spendable-or-not grant remainders minus overdraft, scheduled grants
//!    not yet activated left out) equals it, and each grant's remainder matches;
//! 4. `end_balance_chain`: each ledger entry's end balance is the running sum of the pool's
//!    amounts in ledger order, from its archived total (reported at the first entry that breaks
//!    it);
//! 5. `grant_before_use`: every consumption of a grant comes after the grant's own entry
//!    (reported at the first consumption that precedes it; a grant entry of an archived month
//!    came before every entry kept).
//!
//! [`CHECKS`] names them; the command prints the list with its summary.
//!
//! Redis runs ahead of Postgres by the facts not yet settled, so run it when the pipeline is
//! quiet (or read a difference on a busy pool as "in flight" and run again).

use std::collections::HashMap;

use rust_decimal::Decimal;
use serde::Serialize;
use shared::amount::from_fixed;
use shared::hot_pool::HotPool;
use shared::keys::Keys;
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Debug, Serialize, PartialEq)]
pub struct Difference {
    pub tenant_id: String,
    pub customer_id: String,
    pub credit_type: String,
    pub resource_id: String,
    pub check: &'static str,
    pub expected: String,
    pub found: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<Uuid>,
}

type PoolRow = (
    String,
    String,
    String,
    String,
    Decimal,
    Decimal,
    i16,
    Option<Decimal>,
    Option<Decimal>,
);

/// What `reconcile` checks, in its output's words.
pub const CHECKS: [&str; 6] = [
    "ledger_sum",
    "grant_remainders",
    "hot_balance",
    "grant_hot_remaining",
    "end_balance_chain",
    "grant_before_use",
];

/// The checks of the ledger's order (4 and 5).
pub const ORDER_CHECKS: [&str; 2] = ["end_balance_chain", "grant_before_use"];

/// Check every pool (of one tenant, if given); returns (pools checked, differences).
pub async fn run(
    db: &PgPool,
    redis: &mut shared::redis_conn::RedisConn,
    keys: &Keys,
    tenant: Option<&str>,
) -> anyhow::Result<(usize, Vec<Difference>)> {
    let pools: Vec<PoolRow> = sqlx::query_as(
        "SELECT p.tenant_id, p.customer_id, p.credit_type, p.resource_id, p.balance, p.overdraft, ct.decimals,
            (SELECT COALESCE(sum(amount), 0) FROM ledger_entries l WHERE l.tenant_id = p.tenant_id
                AND l.customer_id = p.customer_id AND l.credit_type = p.credit_type AND l.resource_id = p.resource_id)
            + COALESCE((SELECT amount FROM ledger_archived_totals a WHERE a.tenant_id = p.tenant_id
                AND a.customer_id = p.customer_id AND a.credit_type = p.credit_type AND a.resource_id = p.resource_id), 0),
            (SELECT sum(remaining) FROM grants g WHERE g.tenant_id = p.tenant_id AND g.customer_id = p.customer_id
                AND g.credit_type = p.credit_type AND g.resource_id = p.resource_id AND g.activated)
         FROM pools p JOIN credit_types ct ON ct.tenant_id = p.tenant_id AND ct.id = p.credit_type
         WHERE $1::text IS NULL OR p.tenant_id = $1",
    )
    .bind(tenant)
    .fetch_all(db)
    .await?;
    let mut diffs = Vec::new();
    for (t, c, ct, r, balance, overdraft, decimals, ledger_sum, grants_sum) in &pools {
        let mut diff = |check, expected: Decimal, found: Decimal, grant_id| {
            if expected != found {
                diffs.push(Difference {
                    tenant_id: t.clone(),
                    customer_id: c.clone(),
                    credit_type: ct.clone(),
                    resource_id: r.clone(),
                    check,
                    expected: expected.normalize().to_string(),
                    found: found.normalize().to_string(),
                    grant_id,
                });
            }
        };
        diff("ledger_sum", *balance, ledger_sum.unwrap_or_default(), None);
        diff(
            "grant_remainders",
            *balance,
            grants_sum.unwrap_or_default() - overdraft,
            None,
        );
        // The hot pool.
        let h: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(keys.pool(t, c, ct, r))
            .query_async(redis)
            .await?;
        if h.is_empty() {
            // Not in Redis (lost, or never hot since a restart): rebuilt from Postgres on use.
            continue;
        }
        let d = *decimals as u32;
        let pool = HotPool::from_hash(&h);
        let mut hot = -pool.overdraft;
        let settled: HashMap<Uuid, Decimal> = sqlx::query_as(
            "SELECT id, remaining FROM grants WHERE tenant_id = $1 AND customer_id = $2 AND credit_type = $3
                AND resource_id = $4",
        )
        .bind(t)
        .bind(c)
        .bind(ct)
        .bind(r)
        .fetch_all(db)
        .await?
        .into_iter()
        .collect();
        for g in pool.grants.iter().filter(|g| g.in_ledger()) {
            let rem = g.remaining;
            hot += rem;
            if let Some(gid) = g.grant_id() {
                let pg = settled.get(&gid).copied().unwrap_or_default();
                diff("grant_hot_remaining", pg, from_fixed(rem, d), Some(gid));
            }
        }
        diff("hot_balance", *balance, from_fixed(hot, d), None);
    }
    diffs.extend(ledger_order(db, tenant).await?);
    Ok((pools.len(), diffs))
}

/// Checks 4 and 5, over the whole ledger in one pass each (the pool index orders the chain; a
/// grant's own entry is found by its unique key).
async fn ledger_order(db: &PgPool, tenant: Option<&str>) -> anyhow::Result<Vec<Difference>> {
    type Row = (String, String, String, String, Decimal, Decimal, Option<Uuid>);
    let chain: Vec<Row> = sqlx::query_as(
        "SELECT DISTINCT ON (tenant_id, customer_id, credit_type, resource_id)
            tenant_id, customer_id, credit_type, resource_id, run, end_balance, grant_id
         FROM (SELECT l.*, COALESCE(a.amount, 0)
                    + sum(l.amount) OVER (PARTITION BY l.tenant_id, l.customer_id, l.credit_type, l.resource_id ORDER BY l.id)
                    AS run
               FROM ledger_entries l LEFT JOIN ledger_archived_totals a ON a.tenant_id = l.tenant_id
                    AND a.customer_id = l.customer_id AND a.credit_type = l.credit_type AND a.resource_id = l.resource_id
               WHERE $1::text IS NULL OR l.tenant_id = $1) l
         WHERE run <> end_balance
         ORDER BY tenant_id, customer_id, credit_type, resource_id, id",
    )
    .bind(tenant)
    .fetch_all(db)
    .await?;
    let early: Vec<Row> = sqlx::query_as(
        "SELECT DISTINCT ON (c.tenant_id, c.customer_id, c.credit_type, c.resource_id, c.grant_id)
            c.tenant_id, c.customer_id, c.credit_type, c.resource_id, 0::numeric, 0::numeric, c.grant_id
         FROM ledger_entries c
         WHERE c.type = 'consume' AND c.grant_id IS NOT NULL AND ($1::text IS NULL OR c.tenant_id = $1)
           AND NOT EXISTS (SELECT 1 FROM ledger_entries g WHERE g.tenant_id = c.tenant_id AND g.type = 'grant'
                AND g.source_id = c.grant_id::text AND g.entry_idx = 0 AND g.id < c.id)
           AND (EXISTS (SELECT 1 FROM ledger_entries g WHERE g.tenant_id = c.tenant_id AND g.type = 'grant'
                    AND g.source_id = c.grant_id::text AND g.entry_idx = 0)
                OR NOT EXISTS (SELECT 1 FROM ledger_archived_totals a WHERE a.tenant_id = c.tenant_id
                    AND a.customer_id = c.customer_id AND a.credit_type = c.credit_type AND a.resource_id = c.resource_id))
         ORDER BY c.tenant_id, c.customer_id, c.credit_type, c.resource_id, c.grant_id, c.id",
    )
    .bind(tenant)
    .fetch_all(db)
    .await?;
    let diff = |check, (t, c, ct, r, expected, found, grant_id): Row, what: Option<(&str, &str)>| Difference {
        tenant_id: t,
        customer_id: c,
        credit_type: ct,
        resource_id: r,
        check,
        expected: what.map_or_else(|| expected.normalize().to_string(), |w| w.0.to_owned()),
        found: what.map_or_else(|| found.normalize().to_string(), |w| w.1.to_owned()),
        grant_id,
    };
    Ok(chain
        .into_iter()
        .map(|r| diff("end_balance_chain", r, None))
        .chain(early.into_iter().map(|r| {
            diff(
                "grant_before_use",
                r,
                Some(("the grant's entry first", "a consumption before it")),
            )
        }))
        .collect())
}
