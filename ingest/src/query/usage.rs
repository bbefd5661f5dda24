//! `GET /v1/credits/usage`: credits consumed over a time range, bucketed and grouped by feature
//! or by the `userId` dimension, served from the rollups ledger-writer maintains (never a scan of
//! the events): `usage_rollups`, plus the customer's settled usage its compactor has not moved
//! there yet (`usage_rollup_pending`, written in the same transaction as the usage rows).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Datelike, DurationRound, Months, NaiveDate, TimeDelta, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::Tenant;
use crate::credit_type::require_credit_type;
use crate::error::replies::{BadRequest, Invalid, NotFound, Unauthorized};
use crate::error::{ApiError, ApiResult, Q};
use crate::validate;
use crate::AppState;

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    customer_id: String,
    credit_type: String,
    /// The pool's resource; omitted = the default pool.
    resource_id: Option<String>,
    /// LAST_DAY, LAST_WEEK, LAST_MONTH (default) or LAST_YEAR.
    time_range: Option<String>,
    /// feature (default) or user.
    group_by: Option<String>,
}

/// Credits consumed over a time range, per bucket. Credits are decimal strings.
#[derive(Serialize, ToSchema)]
pub struct UsageReply {
    customer_id: String,
    credit_type: String,
    resource_id: Option<String>,
    time_range: String,
    /// feature or user.
    group_by: String,
    /// hour, day or month.
    bucket: String,
    /// The first bucket's start.
    from: DateTime<Utc>,
    series: Vec<UsageSeries>,
}

#[derive(Serialize, ToSchema)]
pub struct UsageSeries {
    /// The feature, or the userId (null for events without one).
    key: Option<String>,
    total: String,
    /// Every bucket of the range, zero where unused.
    points: Vec<UsagePoint>,
}

#[derive(Serialize, ToSchema)]
pub struct UsagePoint {
    start: DateTime<Utc>,
    credits: String,
}

/// The buckets of a time range ending now: (bucket name, rollup granularity, bucket starts).
/// Rollups are kept by hour, day and month, so a range reads at most 30 rows per key, plus the
/// customer's usage still pending compaction (`usage_rollup_pending`, seconds of it), bucketed
/// the same way at read time. (Summing
/// days from hours at read time saved a third of the rollup writes, but LAST_MONTH by user for
/// 50 users then read 36,000 rows: p99 146 ms against the 50 ms budget, `loadtest/usage-bench`.)
pub fn buckets(range: &str, now: DateTime<Utc>) -> Option<(&'static str, &'static str, Vec<DateTime<Utc>>)> {
    let hour = now.duration_trunc(TimeDelta::hours(1)).ok()?;
    let day = now.duration_trunc(TimeDelta::days(1)).ok()?;
    Some(match range {
        "LAST_DAY" => (
            "hour",
            "hour",
            (0..24).rev().map(|i| hour - TimeDelta::hours(i)).collect(),
        ),
        "LAST_WEEK" => ("day", "day", (0..7).rev().map(|i| day - TimeDelta::days(i)).collect()),
        "LAST_MONTH" => ("day", "day", (0..30).rev().map(|i| day - TimeDelta::days(i)).collect()),
        "LAST_YEAR" => {
            let first = NaiveDate::from_ymd_opt(now.year(), now.month(), 1)?
                .and_hms_opt(0, 0, 0)?
                .and_utc();
            (
                "month",
                "month",
                (0..12)
                    .rev()
                    .filter_map(|i| first.checked_sub_months(Months::new(i)))
                    .collect(),
            )
        }
        _ => return None,
    })
}

#[utoipa::path(get, path = "/v1/credits/usage", tag = "credits",
    security(("api_key" = [])),
    params(UsageQuery),
    responses((status = 200, description = "credits consumed per bucket", body = UsageReply), BadRequest, Unauthorized, NotFound, Invalid)
)]
pub async fn usage(t: Tenant, State(s): State<Arc<AppState>>, Q(q): Q<UsageQuery>) -> ApiResult<Json<UsageReply>> {
    validate::id("customer_id", &q.customer_id)?;
    let resource = q.resource_id.clone().unwrap_or_default();
    if !resource.is_empty() {
        validate::id("resource_id", &resource)?;
    }
    let range = q.time_range.as_deref().unwrap_or("LAST_MONTH");
    let Some((bucket, granularity, starts)) = buckets(range, Utc::now()) else {
        return Err(ApiError::invalid(
            "time_range",
            "invalid_value",
            "time_range must be LAST_DAY, LAST_WEEK, LAST_MONTH or LAST_YEAR",
        ));
    };
    let dim = match q.group_by.as_deref().unwrap_or("feature") {
        "feature" => "feature",
        "user" => "user",
        _ => {
            return Err(ApiError::invalid(
                "group_by",
                "invalid_value",
                "group_by must be feature or user",
            ))
        }
    };
    require_credit_type(&s.pg.query, &t.id, &q.credit_type, "credit_type").await?;
    let from = starts[0];
    let rows: Vec<(String, DateTime<Utc>, Decimal)> = sqlx::query_as(
        "SELECT key, date_bin($8::interval, bucket_start, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS b, sum(credits)
         FROM (
            SELECT key, bucket_start, credits FROM usage_rollups
            WHERE tenant_id = $1 AND customer_id = $2 AND credit_type = $3 AND resource_id = $4
              AND granularity = $5 AND dim = $6 AND bucket_start >= $7 AND bucket_start <= $9
            UNION ALL
            SELECT CASE $6 WHEN 'feature' THEN feature ELSE user_key END,
                   date_trunc($5, hour_start, 'UTC'), credits
            FROM usage_rollup_pending
            WHERE tenant_id = $1 AND customer_id = $2 AND credit_type = $3 AND resource_id = $4
              AND date_trunc($5, hour_start, 'UTC') >= $7 AND date_trunc($5, hour_start, 'UTC') <= $9
         ) r
         GROUP BY 1, 2",
    )
    .bind(&t.id)
    .bind(&q.customer_id)
    .bind(&q.credit_type)
    .bind(&resource)
    .bind(granularity)
    .bind(dim)
    .bind(from)
    .bind(if bucket == "day" { "1 day" } else { "1 hour" })
    // Events may be stamped up to 5 minutes ahead: a bucket after the last one is not shown
    // yet, and not counted in the totals either.
    .bind(starts[starts.len() - 1])
    .fetch_all(&s.pg.query)
    .await?;

    // key -> bucket start -> credits; every bucket of the range is listed, zero where unused.
    let mut by_key: BTreeMap<String, BTreeMap<DateTime<Utc>, Decimal>> = BTreeMap::new();
    for (key, start, credits) in rows {
        *by_key.entry(key).or_default().entry(start).or_default() += credits;
    }
    let series: Vec<UsageSeries> = by_key
        .into_iter()
        .map(|(key, points)| {
            let total: Decimal = points.values().sum();
            UsageSeries {
                key: if key.is_empty() { None } else { Some(key) },
                total: total.normalize().to_string(),
                points: starts
                    .iter()
                    .map(|st| UsagePoint {
                        start: *st,
                        credits: points.get(st).copied().unwrap_or_default().normalize().to_string(),
                    })
                    .collect(),
            }
        })
        .collect();
    Ok(Json(UsageReply {
        customer_id: q.customer_id,
        credit_type: q.credit_type,
        resource_id: if resource.is_empty() { None } else { Some(resource) },
        time_range: range.to_owned(),
        group_by: dim.to_owned(),
        bucket: bucket.to_owned(),
        from,
        series,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_have_the_documented_buckets() {
        let now: DateTime<Utc> = "2026-03-15T10:20:00Z".parse().unwrap();
        let (b, g, s) = buckets("LAST_DAY", now).unwrap();
        assert_eq!((b, g, s.len()), ("hour", "hour", 24));
        assert_eq!(s[23], "2026-03-15T10:00:00Z".parse::<DateTime<Utc>>().unwrap());
        assert_eq!(s[0], "2026-03-14T11:00:00Z".parse::<DateTime<Utc>>().unwrap());
        let (b, _, s) = buckets("LAST_WEEK", now).unwrap();
        assert_eq!((b, s.len()), ("day", 7));
        assert_eq!(s[0], "2026-03-09T00:00:00Z".parse::<DateTime<Utc>>().unwrap());
        let (_, _, s) = buckets("LAST_MONTH", now).unwrap();
        assert_eq!(s.len(), 30);
        let (b, g, s) = buckets("LAST_YEAR", now).unwrap();
        assert_eq!((b, g, s.len()), ("month", "month", 12));
        assert_eq!(s[0], "2025-04-01T00:00:00Z".parse::<DateTime<Utc>>().unwrap());
        assert_eq!(s[11], "2026-03-01T00:00:00Z".parse::<DateTime<Utc>>().unwrap());
        assert!(buckets("YESTERDAY", now).is_none());
    }
}
