//! Usage rollups: credits consumed per pool, hour, day and month, by feature and by user, maintained
//! in the same transaction as the usage rows. The batch is summed in memory first, so the
//! upsert writes one row per (pool, bucket, key) however many events the batch holds.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Datelike, DurationRound, TimeDelta, Utc};
use rust_decimal::Decimal;
use shared::model::{Outcome, UsageFact};
use uuid::Uuid;

use crate::metric as m;

#[derive(Hash, PartialEq, Eq)]
struct RollupKey<'a> {
    tenant: &'a str,
    customer: &'a str,
    resource: &'a str,
    credit_type: &'a str,
    granularity: &'static str,
    dim: &'static str,
    start: DateTime<Utc>,
    key: &'a str,
}

/// Sum the settled usage among `usage` whose uid was inserted now into rollup rows.
fn sum<'a>(usage: &[&'a UsageFact], inserted: &HashSet<Uuid>) -> HashMap<RollupKey<'a>, (Decimal, i64)> {
    let mut out: HashMap<RollupKey<'a>, (Decimal, i64)> = HashMap::new();
    for u in usage {
        let Outcome::Settled { credit_type, cost, .. } = &u.outcome else {
            continue;
        };
        if !inserted.contains(&u.event.event_uid) {
            continue;
        }
        let e = &u.event;
        let user = e.dimensions.get("userId").and_then(|v| v.as_str()).unwrap_or("");
        let day = e.timestamp.duration_trunc(TimeDelta::days(1)).unwrap_or(e.timestamp);
        let month = day.with_day(1).unwrap_or(day);
        let hour = e.timestamp.duration_trunc(TimeDelta::hours(1)).unwrap_or(e.timestamp);
        for (granularity, start) in [("hour", hour), ("day", day), ("month", month)] {
            for (dim, key) in [("feature", e.event_name.as_str()), ("user", user)] {
                let k = RollupKey {
                    tenant: &e.tenant_id,
                    customer: &e.customer_id,
                    resource: &e.resource_id,
                    credit_type,
                    granularity,
                    dim,
                    start,
                    key,
                };
                let v = out.entry(k).or_default();
                v.0 += *cost;
                v.1 += 1;
            }
        }
    }
    out
}

/// Add this batch's newly settled usage to the rollups (one multi-row upsert).
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
    let (mut t, mut c, mut r, mut ct, mut g, mut d, mut s, mut k, mut cr, mut ev) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for (key, (credits, events)) in rows {
        t.push(key.tenant);
        c.push(key.customer);
        r.push(key.resource);
        ct.push(key.credit_type);
        g.push(key.granularity);
        d.push(key.dim);
        s.push(key.start);
        k.push(key.key);
        cr.push(credits);
        ev.push(events);
    }
    let done = sqlx::query(
        "INSERT INTO usage_rollups AS u (tenant_id, customer_id, resource_id, credit_type, granularity, dim,
            bucket_start, key, credits, events)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
            $7::timestamptz[], $8::text[], $9::numeric[], $10::int8[])
         ON CONFLICT (tenant_id, customer_id, credit_type, resource_id, granularity, dim, bucket_start, key)
         DO UPDATE SET credits = u.credits + EXCLUDED.credits, events = u.events + EXCLUDED.events",
    )
    .bind(&t)
    .bind(&c)
    .bind(&r)
    .bind(&ct)
    .bind(&g)
    .bind(&d)
    .bind(&s)
    .bind(&k)
    .bind(&cr)
    .bind(&ev)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    metrics::counter!(m::ROWS, "table" => "usage_rollups").increment(done);
    Ok(done)
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
    fn sums_by_hour_day_month_feature_and_user_only_what_was_inserted() {
        let a = fact("a", "img", Some("u1"), "2026-01-01T10:15:00Z", 3);
        let b = fact("b", "img", Some("u2"), "2026-01-01T10:45:00Z", 4);
        let c = fact("c", "chat", None, "2026-01-01T11:00:00Z", 5);
        let skipped = fact("d", "img", Some("u1"), "2026-01-01T10:20:00Z", 100);
        let inserted: HashSet<Uuid> = [&a, &b, &c].iter().map(|f| f.event.event_uid).collect();
        let rows = sum(&[&a, &b, &c, &skipped], &inserted);
        let get = |g: &str, d: &str, start: &str, key: &str| {
            rows.iter()
                .find(|(k, _)| {
                    k.granularity == g
                        && k.dim == d
                        && k.start == start.parse::<DateTime<Utc>>().unwrap()
                        && k.key == key
                })
                .map(|(_, v)| *v)
        };
        assert_eq!(
            get("hour", "feature", "2026-01-01T10:00:00Z", "img"),
            Some((Decimal::from(7), 2))
        );
        assert_eq!(
            get("hour", "feature", "2026-01-01T11:00:00Z", "chat"),
            Some((Decimal::from(5), 1))
        );
        assert_eq!(
            get("day", "feature", "2026-01-01T00:00:00Z", "img"),
            Some((Decimal::from(7), 2))
        );
        assert_eq!(
            get("month", "user", "2026-01-01T00:00:00Z", "u1"),
            Some((Decimal::from(3), 1))
        );
        assert_eq!(
            get("hour", "user", "2026-01-01T11:00:00Z", ""),
            Some((Decimal::from(5), 1))
        );
        assert_eq!(
            get("month", "feature", "2026-01-01T00:00:00Z", "img"),
            Some((Decimal::from(7), 2))
        );
        // feature: img (hour 10), chat (hour 11), each x day x month = 6; user: u1, u2
        // (hour 10), "" (hour 11), each x day x month = 9
        assert_eq!(rows.len(), 6 + 9);
    }
}
