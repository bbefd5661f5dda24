//! Settlement wait and verification, read straight from Postgres.
//!
//! Waits until `usage_events` holds one row per unique accepted key and `duplicate_events` one
//! row per accepted repeat (more than expected also ends the wait and is reported, once every
//! accepted key is confirmed present or the timeout passes), then checks
//! that nothing was lost, nothing was charged twice, and every settled pool balance equals its
//! grant minus the expected charge, compared exactly as `Decimal`. Every query is scoped to the
//! tenants this run created.
#![allow(clippy::float_arithmetic)] // rates and latencies only; money is Decimal

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use hdrhistogram::Histogram;
use rust_decimal::Decimal;
use sqlx::postgres::{PgPool, PgPoolOptions};
use uuid::Uuid;

use crate::expected::Expected;
use crate::generator::customer_name;
use crate::load::new_histogram;
use crate::setup::{Tenant, CREDIT_TYPE, GRANT_AMOUNT};

const POLL: Duration = Duration::from_millis(500);
/// Once the counts are reached, how often to confirm that every accepted key is there (a row
/// nobody expected can make up the count while an accepted key is still missing).
const CONFIRM_EVERY: Duration = Duration::from_secs(5);

/// What Postgres says about the run.
#[derive(Debug)]
pub struct Verification {
    pub settlement_completed: bool,
    pub settle_wait: Duration,
    /// When the settlement wait ended (None: no wait, `--ingest-only`).
    pub wait_ended_at: Option<DateTime<Utc>>,
    /// `usage_events` rows for the run's tenants when the wait ended.
    pub settled_rows: u64,
    /// `duplicate_events` rows for the run's tenants when the wait ended.
    pub duplicate_rows: u64,
    pub lost: u64,
    pub double_charged: u64,
    /// Keys whose consume entries sum to more than their settled cost.
    pub over_consumed_keys: u64,
    pub mismatched_pools: u64,
    pub pools_below_expected: u64,
    pub pools_checked: u64,
    /// `usage_events` rows for keys that were never accepted (or are not ours), apart from
    /// `uncertain_settled`.
    pub unexpected_rows: u64,
    /// With `--retry`: settled keys that were never accepted but whose request may have reached
    /// the server (a timeout, a dropped connection, a 5xx before the retries ran out). They are
    /// charged in the expected balances; settling them twice is still a double charge.
    pub uncertain_settled: u64,
    /// Settled rows whose `cost` differs from tokens x 0.01.
    pub cost_mismatches: u64,
    /// Rows whose status is not `settled` (`denied`, `unpriced`).
    pub not_settled_status: u64,
    pub e2e_us: Histogram<u64>,
    /// Unique events accepted after warm-up that settled.
    pub measured_events: u64,
    /// Their settled throughput, events per second (None if not measurable).
    pub events_per_second: Option<f64>,
}

impl Verification {
    /// No verification (`--ingest-only`): nothing settled, nothing checked.
    pub fn skipped() -> Self {
        Verification {
            settlement_completed: false,
            settle_wait: Duration::ZERO,
            wait_ended_at: None,
            settled_rows: 0,
            duplicate_rows: 0,
            lost: 0,
            double_charged: 0,
            over_consumed_keys: 0,
            mismatched_pools: 0,
            pools_below_expected: 0,
            pools_checked: 0,
            unexpected_rows: 0,
            uncertain_settled: 0,
            cost_mismatches: 0,
            not_settled_status: 0,
            e2e_us: new_histogram(),
            measured_events: 0,
            events_per_second: None,
        }
    }
}

/// Connects early so a bad `DATABASE_URL` fails before any load is sent.
pub async fn connect(database_url: &str) -> Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(10))
        .connect(database_url)
        .await
        .context("connecting to Postgres (DATABASE_URL)")
}

async fn count(pool: &PgPool, table: &str, tenant_ids: &[String]) -> Result<u64> {
    let sql = format!("select count(*) from {table} where tenant_id = any($1)");
    let n: i64 = sqlx::query_scalar(&sql)
        .bind(tenant_ids)
        .fetch_one(pool)
        .await
        .with_context(|| format!("counting {table}"))?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Waits for settlement, then runs every check.
pub async fn verify(
    pool: &PgPool,
    tenants: &[Tenant],
    expected: &Expected,
    warmup_end: DateTime<Utc>,
    settle_timeout: Duration,
) -> Result<Verification> {
    let tenant_ids: Vec<String> = tenants.iter().map(|t| t.id.clone()).collect();
    let want_rows = expected.unique_accepted();
    let want_dups = expected.accepted_repeats();

    let index: HashMap<&str, usize> = tenants.iter().enumerate().map(|(i, t)| (t.id.as_str(), i)).collect();
    let started = tokio::time::Instant::now();
    let mut confirmed_at: Option<tokio::time::Instant> = None;
    let (settled_rows, duplicate_rows, settlement_completed) = loop {
        let rows = count(pool, "usage_events", &tenant_ids).await?;
        let dups = count(pool, "duplicate_events", &tenant_ids).await?;
        if rows >= want_rows && dups >= want_dups && confirmed_at.is_none_or(|t| t.elapsed() >= CONFIRM_EVERY) {
            if check_rows(pool, &tenant_ids, &index, expected).await?.lost == 0 {
                break (rows, dups, true);
            }
            confirmed_at = Some(tokio::time::Instant::now());
        }
        if started.elapsed() >= settle_timeout {
            break (rows, dups, false);
        }
        eprint!("\rsettling: {rows}/{want_rows} events, {dups}/{want_dups} duplicates   ");
        tokio::time::sleep(POLL).await;
    };
    let settle_wait = started.elapsed();
    let wait_ended_at = Utc::now();
    eprintln!(
        "\rsettling: {settled_rows}/{want_rows} events, {duplicate_rows}/{want_dups} duplicates after {:.1}s{}",
        settle_wait.as_secs_f64(),
        if settlement_completed { "" } else { " (timed out)" }
    );

    let rows = check_rows(pool, &tenant_ids, &index, expected).await?;
    let over_consumed_keys = over_consumed(pool, &tenant_ids).await?;
    let charges = expected.charges_with_settled_maybes(&rows.uncertain_settled);
    // A charge the hot pool gave back (a duplicate that slipped past Redis, a second charge in
    // a pool rebuilt after a Redis loss) is in the ledger until its reversal settles a moment
    // later: a pool off by one is read again for up to 30 s before it counts.
    let pools_started = tokio::time::Instant::now();
    let pools = loop {
        let p = check_pools(pool, tenants, &tenant_ids, &charges).await?;
        if (p.mismatched == 0 && p.below == 0) || pools_started.elapsed() > Duration::from_secs(30) {
            break p;
        }
        tokio::time::sleep(POLL).await;
    };
    let (e2e_us, measured_events, events_per_second) = e2e(pool, &tenant_ids, warmup_end).await?;

    Ok(Verification {
        settlement_completed,
        settle_wait,
        wait_ended_at: Some(wait_ended_at),
        settled_rows,
        duplicate_rows,
        lost: rows.lost,
        double_charged: over_consumed_keys + pools.below,
        over_consumed_keys,
        mismatched_pools: pools.mismatched,
        pools_below_expected: pools.below,
        pools_checked: pools.checked,
        unexpected_rows: rows.unexpected,
        uncertain_settled: rows.uncertain_settled.len() as u64,
        cost_mismatches: rows.cost_mismatches,
        not_settled_status: rows.not_settled,
        e2e_us,
        measured_events,
        events_per_second,
    })
}

struct RowCheck {
    lost: u64,
    unexpected: u64,
    /// Settled keys that were never accepted but may have been processed.
    uncertain_settled: Vec<(usize, Uuid)>,
    cost_mismatches: u64,
    not_settled: u64,
}

/// Compares the settled keys with the accepted ones.
async fn check_rows(
    pool: &PgPool,
    tenant_ids: &[String],
    index: &HashMap<&str, usize>,
    expected: &Expected,
) -> Result<RowCheck> {
    let mut found: HashSet<(usize, Uuid)> = HashSet::new();
    let mut check = RowCheck {
        lost: 0,
        unexpected: 0,
        uncertain_settled: Vec::new(),
        cost_mismatches: 0,
        not_settled: 0,
    };
    let mut rows = sqlx::query_as::<_, (String, String, Option<Decimal>, Option<String>)>(
        "select tenant_id, idempotency_key, cost, status from usage_events where tenant_id = any($1)",
    )
    .bind(tenant_ids)
    .fetch(pool);
    while let Some((tenant_id, key, cost, status)) = rows.try_next().await.context("reading usage_events")? {
        if status.as_deref() != Some("settled") {
            check.not_settled += 1;
        }
        let parsed = index.get(tenant_id.as_str()).copied().zip(Uuid::parse_str(&key).ok());
        let Some((tenant, key)) = parsed else {
            check.unexpected += 1;
            continue;
        };
        match expected.cost_of(tenant, &key) {
            Some(want) => {
                found.insert((tenant, key));
                if cost != Some(want) {
                    check.cost_mismatches += 1;
                }
            }
            None => match expected.maybe_cost_of(tenant, &key) {
                Some(want) => {
                    check.uncertain_settled.push((tenant, key));
                    if cost != Some(want) {
                        check.cost_mismatches += 1;
                    }
                }
                None => check.unexpected += 1,
            },
        }
    }
    check.lost = expected.keys().filter(|k| !found.contains(k)).count() as u64;
    Ok(check)
}

/// Keys whose consume ledger entries add up to more than their settled cost.
async fn over_consumed(pool: &PgPool, tenant_ids: &[String]) -> Result<u64> {
    let n: i64 = sqlx::query_scalar(
        "select count(*) from ( \
           select tenant_id, source_id, -sum(amount) as charged \
           from ledger_entries \
           where tenant_id = any($1) and type = 'consume' \
           group by tenant_id, source_id \
         ) c \
         left join usage_events u \
           on u.tenant_id = c.tenant_id and u.idempotency_key = c.source_id \
         where c.charged > coalesce(u.cost, 0)",
    )
    .bind(tenant_ids)
    .fetch_one(pool)
    .await
    .context("comparing consume ledger entries with usage_events.cost")?;
    Ok(u64::try_from(n).unwrap_or(0))
}

struct PoolCheck {
    checked: u64,
    mismatched: u64,
    below: u64,
}

/// Every granted pool must hold exactly grant - expected charge (`charges`, per tenant and
/// customer).
async fn check_pools(
    pool: &PgPool,
    tenants: &[Tenant],
    tenant_ids: &[String],
    charges: &HashMap<(usize, u32), Decimal>,
) -> Result<PoolCheck> {
    let rows = sqlx::query_as::<_, (String, String, Decimal)>(
        "select tenant_id, customer_id, balance from pools \
         where tenant_id = any($1) and credit_type = $2 and resource_id = ''",
    )
    .bind(tenant_ids)
    .bind(CREDIT_TYPE)
    .fetch_all(pool)
    .await
    .context("reading pools")?;
    let balances: HashMap<(String, String), Decimal> = rows.into_iter().map(|(t, c, b)| ((t, c), b)).collect();
    let mut check = PoolCheck {
        checked: 0,
        mismatched: 0,
        below: 0,
    };
    for (t, tenant) in tenants.iter().enumerate() {
        for &customer in &tenant.customers {
            let want = GRANT_AMOUNT - Expected::charge_of(charges, t, customer);
            check.checked += 1;
            match balances.get(&(tenant.id.clone(), customer_name(customer))) {
                Some(&got) if got == want => {}
                Some(&got) => {
                    check.mismatched += 1;
                    check.below += u64::from(got < want);
                    if check.mismatched <= 5 {
                        eprintln!(
                            "pool {}/{}: balance {got}, expected {want}",
                            tenant.id,
                            customer_name(customer)
                        );
                    }
                }
                None => {
                    check.mismatched += 1;
                    if check.mismatched <= 5 {
                        eprintln!("pool {}/{}: missing", tenant.id, customer_name(customer));
                    }
                }
            }
        }
    }
    Ok(check)
}

/// End-to-end latency (accepted -> settled) and settled throughput after the warm-up.
async fn e2e(
    pool: &PgPool,
    tenant_ids: &[String],
    warmup_end: DateTime<Utc>,
) -> Result<(Histogram<u64>, u64, Option<f64>)> {
    let mut hist = new_histogram();
    let mut rows = sqlx::query_scalar::<_, i64>(
        "select (extract(epoch from (settled_at - accepted_at)) * 1000000)::int8 \
         from usage_events \
         where tenant_id = any($1) and accepted_at >= $2 and settled_at is not null",
    )
    .bind(tenant_ids)
    .bind(warmup_end)
    .fetch(pool);
    while let Some(us) = rows.try_next().await.context("reading e2e latencies")? {
        hist.saturating_record(u64::try_from(us).unwrap_or(0).max(1));
    }
    drop(rows);

    let (n, first, last): (i64, Option<DateTime<Utc>>, Option<DateTime<Utc>>) = sqlx::query_as(
        "select count(*), min(accepted_at), max(settled_at) from usage_events \
         where tenant_id = any($1) and accepted_at >= $2 and settled_at is not null",
    )
    .bind(tenant_ids)
    .bind(warmup_end)
    .fetch_one(pool)
    .await
    .context("measuring settled throughput")?;
    let n = u64::try_from(n).unwrap_or(0);
    let eps = match (first, last) {
        (Some(a), Some(b)) => throughput(n, b - a),
        _ => None,
    };
    Ok((hist, n, eps))
}

/// Events per second over a window; None for an empty or non-positive window.
pub fn throughput(events: u64, window: chrono::TimeDelta) -> Option<f64> {
    let secs = window.num_microseconds()? as f64 / 1e6;
    (events > 0 && secs > 0.0).then(|| events as f64 / secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_over_a_window() {
        assert_eq!(throughput(1000, chrono::TimeDelta::milliseconds(500)), Some(2000.0));
        assert_eq!(throughput(0, chrono::TimeDelta::seconds(1)), None);
        assert_eq!(throughput(10, chrono::TimeDelta::zero()), None);
        assert_eq!(throughput(10, chrono::TimeDelta::seconds(-1)), None);
    }
}
