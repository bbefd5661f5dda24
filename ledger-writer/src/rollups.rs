//! Usage rollups: credits consumed per pool, hour, day and month, by feature and by user.
//!
//! The settle transaction does not upsert the rollups itself (six rows per event at high
//! cardinality, about half of its statement time): it appends the batch's newly settled usage,
//! summed per (pool, hour, feature, user), to `usage_rollup_pending` (`add`), a plain insert
//! with one narrow index. The compactor (`run`, in every ledger-writer; an advisory lock lets
//! one work at a time) moves pending rows into `usage_rollups` in a transaction of its own: one
//! statement deletes them and upserts their hour, day and month buckets, so a pending row is
//! counted once or, if the transaction fails, stays pending. Reads add their customer's
//! pending rows (ingest's `query::usage`), so usage is exact between compactions.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use rust_decimal::Decimal;
use shared::model::{Outcome, UsageFact};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::metric as m;

#[derive(Hash, PartialEq, Eq, Debug)]
struct PendingKey<'a> {
    tenant: &'a str,
    customer: &'a str,
    resource: &'a str,
    credit_type: &'a str,
    hour: DateTime<Utc>,
    feature: &'a str,
    user: &'a str,
}

/// Sum the settled usage among `usage` whose uid was inserted now, per (pool, hour, feature,
/// user): the batch's pending rollup rows.
fn sum<'a>(usage: &[&'a UsageFact], inserted: &HashSet<Uuid>) -> HashMap<PendingKey<'a>, (Decimal, i64)> {
    let mut out: HashMap<PendingKey<'a>, (Decimal, i64)> = HashMap::new();
    for u in usage {
        let Outcome::Settled { credit_type, cost, .. } = &u.outcome else {
            continue;
        };
        if !inserted.contains(&u.event.event_uid) {
            continue;
        }
        let e = &u.event;
        let k = PendingKey {
            tenant: &e.tenant_id,
            customer: &e.customer_id,
            resource: &e.resource_id,
            credit_type,
            hour: e.timestamp.duration_trunc(TimeDelta::hours(1)).unwrap_or(e.timestamp),
            feature: &e.event_name,
            user: e.dimensions.get("userId").and_then(|v| v.as_str()).unwrap_or(""),
        };
        let v = out.entry(k).or_default();
        v.0 += *cost;
        v.1 += 1;
    }
    out
}

/// Append this batch's newly settled usage to the pending rollups (one multi-row insert, in the
/// settle transaction).
pub async fn add(
    tx: &mut sqlx::PgConnection,
    usage: &[&UsageFact],
    inserted: &HashSet<Uuid>,
) -> Result<u64, sqlx::Error> {
    let rows = sum(usage, inserted);
    if rows.is_empty() {
        return Ok(0);
    }
    let n = rows.len();
    let mut cols = PendingCols::with_capacity(n);
    for (k, (credits, events)) in rows {
        cols.push(k, credits, events);
    }
    let done = sqlx::query(
        "INSERT INTO usage_rollup_pending (tenant_id, customer_id, resource_id, credit_type, hour_start, feature,
            user_key, credits, events)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::text[],
            $7::text[], $8::numeric[], $9::int8[])",
    )
    .bind(&cols.tenant)
    .bind(&cols.customer)
    .bind(&cols.resource)
    .bind(&cols.credit_type)
    .bind(&cols.hour)
    .bind(&cols.feature)
    .bind(&cols.user)
    .bind(&cols.credits)
    .bind(&cols.events)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    metrics::counter!(m::ROWS, "table" => "usage_rollup_pending").increment(done);
    Ok(done)
}

/// Column vectors for the pending insert.
struct PendingCols<'a> {
    tenant: Vec<&'a str>,
    customer: Vec<&'a str>,
    resource: Vec<&'a str>,
    credit_type: Vec<&'a str>,
    hour: Vec<DateTime<Utc>>,
    feature: Vec<&'a str>,
    user: Vec<&'a str>,
    credits: Vec<Decimal>,
    events: Vec<i64>,
}

impl<'a> PendingCols<'a> {
    fn with_capacity(n: usize) -> Self {
        PendingCols {
            tenant: Vec::with_capacity(n),
            customer: Vec::with_capacity(n),
            resource: Vec::with_capacity(n),
            credit_type: Vec::with_capacity(n),
            hour: Vec::with_capacity(n),
            feature: Vec::with_capacity(n),
            user: Vec::with_capacity(n),
            credits: Vec::with_capacity(n),
            events: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, k: PendingKey<'a>, credits: Decimal, events: i64) {
        self.tenant.push(k.tenant);
        self.customer.push(k.customer);
        self.resource.push(k.resource);
        self.credit_type.push(k.credit_type);
        self.hour.push(k.hour);
        self.feature.push(k.feature);
        self.user.push(k.user);
        self.credits.push(credits);
        self.events.push(events);
    }
}

/// The advisory lock key of the compactor (one at a time across the ledger-writers).
const COMPACTOR_LOCK: i64 = 0x726f_6c6c_7570; // "rollup"

/// Most pending rows one compaction moves.
pub const COMPACT_LIMIT: i64 = 50_000;

/// What one compaction did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    /// Pending rows moved (deleted).
    pub pending: i64,
    /// Rollup rows inserted or updated.
    pub rollups: i64,
    /// Another ledger-writer held the compactor lock: nothing was done.
    pub busy: bool,
}

/// Move up to `limit` pending rows into the rollups, in one transaction: the DELETE ... RETURNING
/// feeds the upsert of their hour, day and month buckets by feature and by user (UTC, as the
/// reads bucket them), so a row is either moved and counted or left pending.
pub async fn compact(db: &PgPool, limit: i64) -> Result<Compacted, sqlx::Error> {
    let mut tx = db.begin().await?;
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(COMPACTOR_LOCK)
        .fetch_one(&mut *tx)
        .await?;
    if !got {
        return Ok(Compacted {
            busy: true,
            ..Compacted::default()
        });
    }
    let (pending, rollups): (i64, i64) = sqlx::query_as(
        "WITH moved AS (
            DELETE FROM usage_rollup_pending
            WHERE ctid = ANY (ARRAY(SELECT ctid FROM usage_rollup_pending LIMIT $1))
            RETURNING tenant_id, customer_id, resource_id, credit_type, hour_start, feature, user_key, credits, events
         ), summed AS (
            SELECT m.tenant_id, m.customer_id, m.resource_id, m.credit_type, g.granularity, d.dim,
                   date_trunc(g.granularity, m.hour_start, 'UTC') AS bucket_start,
                   CASE d.dim WHEN 'feature' THEN m.feature ELSE m.user_key END AS key,
                   sum(m.credits) AS credits, sum(m.events)::int8 AS events
            FROM moved m
            CROSS JOIN (VALUES ('hour'), ('day'), ('month')) AS g(granularity)
            CROSS JOIN (VALUES ('feature'), ('user')) AS d(dim)
            GROUP BY 1, 2, 3, 4, 5, 6, 7, 8
         ), upserted AS (
            INSERT INTO usage_rollups AS u (tenant_id, customer_id, resource_id, credit_type, granularity, dim,
                bucket_start, key, credits, events)
            SELECT * FROM summed
            ON CONFLICT (tenant_id, customer_id, credit_type, resource_id, granularity, dim, bucket_start, key)
            DO UPDATE SET credits = u.credits + EXCLUDED.credits, events = u.events + EXCLUDED.events
            RETURNING 1
         )
         SELECT (SELECT count(*) FROM moved), (SELECT count(*) FROM upserted)",
    )
    .bind(limit)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    metrics::counter!(m::ROWS, "table" => "usage_rollups").increment(rollups as u64);
    Ok(Compacted {
        pending,
        rollups,
        busy: false,
    })
}

/// Compact every `interval` until `shutdown`: each tick drains what is pending (in rounds of
/// `COMPACT_LIMIT`), unless another ledger-writer holds the lock.
pub async fn run(db: PgPool, interval: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let started = Instant::now();
        let mut moved = 0;
        let outcome = loop {
            match compact(&db, COMPACT_LIMIT).await {
                Ok(c) if c.busy => break "busy",
                Ok(c) => {
                    moved += c.pending;
                    if c.pending < COMPACT_LIMIT || shutdown.is_cancelled() {
                        break "done";
                    }
                }
                Err(e) => {
                    metrics::counter!(m::ERRORS, "stage" => "rollup").increment(1);
                    tracing::warn!(error = %e, "rollup compaction failed; the rows stay pending");
                    break "error";
                }
            }
        };
        metrics::counter!(m::ROLLUP_COMPACTIONS, "outcome" => outcome).increment(1);
        if outcome == "done" {
            metrics::gauge!(m::ROLLUP_PENDING).set(moved as f64);
            metrics::histogram!(m::ROLLUP_DURATION).record(started.elapsed().as_secs_f64());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::model::UsageEvent;

    fn fact(key: &str, name: &str, user: Option<&str>, ts: &str, cost: i64) -> UsageFact {
        let mut dims = serde_json::Map::new();
        if let Some(u) = user {
            dims.insert("userId".into(), u.into());
        }
        UsageFact {
            event: UsageEvent {
                tenant_id: "t".into(),
                event_uid: Uuid::new_v4(),
                customer_id: "c".into(),
                resource_id: String::new(),
                event_name: name.into(),
                idempotency_key: key.into(),
                timestamp: ts.parse().unwrap(),
                dimensions: dims,
                accepted_at: Utc::now(),
            },
            outcome: Outcome::Settled {
                credit_type: "ai".into(),
                cost: Decimal::from(cost),
                entries: Vec::new(),
            },
        }
    }

    #[test]
    fn sums_per_pool_hour_feature_and_user_only_what_was_inserted() {
        let a = fact("a", "img", Some("u1"), "2026-01-01T10:15:00Z", 3);
        let b = fact("b", "img", Some("u2"), "2026-01-01T10:45:00Z", 4);
        let c = fact("c", "chat", None, "2026-01-01T11:00:00Z", 5);
        let e = fact("e", "img", Some("u1"), "2026-01-01T10:59:59Z", 2);
        let skipped = fact("d", "img", Some("u1"), "2026-01-01T10:20:00Z", 100);
        let inserted: HashSet<Uuid> = [&a, &b, &c, &e].iter().map(|f| f.event.event_uid).collect();
        let rows = sum(&[&a, &b, &c, &e, &skipped], &inserted);
        let get = |hour: &str, feature: &str, user: &str| {
            rows.iter()
                .find(|(k, _)| {
                    k.hour == hour.parse::<DateTime<Utc>>().unwrap() && k.feature == feature && k.user == user
                })
                .map(|(_, v)| *v)
        };
        assert_eq!(get("2026-01-01T10:00:00Z", "img", "u1"), Some((Decimal::from(5), 2)));
        assert_eq!(get("2026-01-01T10:00:00Z", "img", "u2"), Some((Decimal::from(4), 1)));
        assert_eq!(get("2026-01-01T11:00:00Z", "chat", ""), Some((Decimal::from(5), 1)));
        assert_eq!(rows.len(), 3, "{rows:?}");
    }
}
