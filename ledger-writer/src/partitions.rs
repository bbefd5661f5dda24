//! The monthly partitions of `usage_events` and `ledger_entries` (migration 0009 says why they
//! are partitioned by `settled_at` and guarded by key tables).
//!
//! - `ensure` makes this month's partition and the next two (`credits_month_partition`, which
//!   is idempotent and locks per partition, so every ledger-writer may call it): on `migrate`
//!   and every hour in each ledger-writer (`run`).
//! - `retention` (`ledger-writer retention --keep-months N`) drops whole months that ended more
//!   than max(N months, the longest dedupe window) ago. Per month of `ledger_entries`, in one
//!   transaction: each pool's entries are summed into `ledger_archived_totals` (the opening
//!   balance `reconcile` starts from), the partition is detached and dropped. Then the key
//!   rows and `duplicate_events` older than every month still held are deleted in batches. A
//!   month is a prefix of every pool's ledger (settle time grows with the ids of a pool), so
//!   the archived total and the entries left always sum to the balance.
//!
//! Nothing else reads the dropped rows: balances live in `pools`, grant remainders in
//! `grants`, usage in `usage_rollups`, the rater rebuilds a pool from those. What goes is the
//! per-event detail (`GET /v1/events/{key}` answers 404 for an event of a dropped month) and
//! the Postgres guard of keys beyond every dedupe window.

use std::time::Duration;

use chrono::{DateTime, Datelike, Months, NaiveDate, TimeZone, Utc};
use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::metric as m;

/// The partitioned tables.
pub const TABLES: [&str; 2] = ["usage_events", "ledger_entries"];

/// Months made ahead of the current one.
pub const AHEAD_MONTHS: i32 = 2;

/// The longest dedupe window a rater accepts (`DEDUPE_WINDOW_SECONDS` is at most 35 days):
/// retention never drops a month that ended within it.
pub const MAX_DEDUPE_WINDOW: chrono::Duration = chrono::Duration::days(35);

/// How often each ledger-writer makes the partitions ahead.
pub const ENSURE_INTERVAL: Duration = Duration::from_secs(3600);

/// Key rows deleted per statement.
const DELETE_BATCH: i64 = 10_000;

/// Make this month's partition of each table and the next `AHEAD_MONTHS`; returns how many were
/// created now.
pub async fn ensure(db: &PgPool) -> Result<u32, sqlx::Error> {
    let mut made = 0;
    for table in TABLES {
        for ahead in 0..=AHEAD_MONTHS {
            let created: bool =
                sqlx::query_scalar("SELECT credits_month_partition($1, now() + make_interval(months => $2))")
                    .bind(table)
                    .bind(ahead)
                    .fetch_one(db)
                    .await?;
            if created {
                tracing::info!(table, ahead, "partition created");
                made += 1;
            }
        }
    }
    Ok(made)
}

/// `ensure` now and every `interval` until `shutdown` (failures are retried at the next tick:
/// the default partition holds what arrives meanwhile).
pub async fn run(db: PgPool, interval: Duration, shutdown: CancellationToken) {
    loop {
        if let Err(e) = ensure(&db).await {
            metrics::counter!(m::ERRORS, "stage" => "partitions").increment(1);
            tracing::warn!(error = %e, "making partitions ahead failed");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// One monthly partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Month {
    pub table: String,
    pub partition: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

/// The month of a partition named `<table>_yYYYYmMM`, if `name` is one of `table`'s.
pub fn month_of(table: &str, name: &str) -> Option<Month> {
    let rest = name.strip_prefix(table)?.strip_prefix("_y")?;
    let (y, mo) = rest.split_once('m')?;
    if y.len() != 4 || mo.len() != 2 {
        return None;
    }
    let start = NaiveDate::from_ymd_opt(y.parse().ok()?, mo.parse().ok()?, 1)?;
    let from = Utc.from_utc_datetime(&start.and_hms_opt(0, 0, 0)?);
    Some(Month {
        table: table.to_owned(),
        partition: name.to_owned(),
        from,
        to: from.checked_add_months(Months::new(1))?,
    })
}

/// The start of the month of `at` (UTC).
fn month_start(at: DateTime<Utc>) -> DateTime<Utc> {
    let d = NaiveDate::from_ymd_opt(at.year(), at.month(), 1).expect("the first of a month exists");
    Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).expect("midnight exists"))
}

/// Months ending at or before the returned instant may be dropped: max(`keep_months` months,
/// the longest dedupe window) before `now`, down to its month's start.
pub fn boundary(now: DateTime<Utc>, keep_months: u32) -> DateTime<Utc> {
    let by_months = now.checked_sub_months(Months::new(keep_months)).unwrap_or(now);
    month_start(by_months.min(now - MAX_DEDUPE_WINDOW))
}

/// The monthly partitions of `table`, oldest first.
pub async fn months(db: &PgPool, table: &str) -> Result<Vec<Month>, sqlx::Error> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = $1::regclass",
    )
    .bind(table)
    .fetch_all(db)
    .await?;
    let mut out: Vec<Month> = names.iter().filter_map(|n| month_of(table, n)).collect();
    out.sort_by_key(|m| m.from);
    Ok(out)
}

/// What a retention run dropped (or, dry, would drop).
#[derive(Debug, Serialize)]
pub struct Report {
    pub dry_run: bool,
    pub keep_months: u32,
    /// Months ending at or before this are dropped.
    pub boundary: DateTime<Utc>,
    pub partitions: Vec<Dropped>,
    /// Rows deleted (dry: to delete) from the key tables and `duplicate_events`, per table.
    pub keys: Vec<(String, i64)>,
}

#[derive(Debug, Serialize)]
pub struct Dropped {
    #[serde(flatten)]
    pub month: Month,
    pub rows: i64,
}

/// `ledger-writer retention`: drop the months before `boundary(now, keep_months)`, then the key
/// rows older than every month left.
pub async fn retention(db: &PgPool, now: DateTime<Utc>, keep_months: u32, dry_run: bool) -> anyhow::Result<Report> {
    anyhow::ensure!(keep_months >= 1, "--keep-months must be at least 1");
    let boundary = boundary(now, keep_months);
    let mut report = Report {
        dry_run,
        keep_months,
        boundary,
        partitions: Vec::new(),
        keys: Vec::new(),
    };
    for table in TABLES {
        for month in months(db, table).await?.into_iter().filter(|m| m.to <= boundary) {
            let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM \"{}\"", month.partition))
                .fetch_one(db)
                .await?;
            if !dry_run {
                drop_month(db, &month).await?;
                metrics::counter!(m::RETENTION_DROPPED, "table" => table).increment(1);
                tracing::info!(partition = %month.partition, rows, "partition dropped");
            }
            report.partitions.push(Dropped { month, rows });
        }
    }
    // Keys are kept for every row still held: older than the boundary, the oldest month left
    // and anything the default partition holds.
    for (keys, table, column) in [
        ("usage_event_keys", "usage_events", "settled_at"),
        ("ledger_entry_keys", "ledger_entries", "settled_at"),
        ("duplicate_events", "usage_events", "seen_at"),
    ] {
        let held = oldest_held(db, table, dry_run.then_some(boundary)).await?;
        let before = held.map_or(boundary, |h| h.min(boundary));
        let n = if dry_run {
            sqlx::query_scalar(&format!("SELECT count(*) FROM {keys} WHERE {column} < $1"))
                .bind(before)
                .fetch_one(db)
                .await?
        } else {
            delete_before(db, keys, column, before).await?
        };
        report.keys.push((keys.to_owned(), n));
    }
    Ok(report)
}

/// The oldest settle time `table` still holds a row of: the start of its oldest monthly
/// partition (ignoring those ending at or before `dropping`, on a dry run) or the oldest row of
/// its default partition.
async fn oldest_held(
    db: &PgPool,
    table: &str,
    dropping: Option<DateTime<Utc>>,
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    let oldest_month = months(db, table)
        .await?
        .into_iter()
        .find(|m| dropping.is_none_or(|b| m.to > b))
        .map(|m| m.from);
    let in_default: Option<DateTime<Utc>> = sqlx::query_scalar(&format!("SELECT min(settled_at) FROM {table}_default"))
        .fetch_one(db)
        .await?;
    Ok(match (oldest_month, in_default) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    })
}

/// Drop one month: for `ledger_entries`, its per-pool sums go into `ledger_archived_totals` in
/// the same transaction. The partition is summed under a SHARE lock (nothing settles into a
/// past month), then detached (a short ACCESS EXCLUSIVE lock on the parent) and dropped.
async fn drop_month(db: &PgPool, month: &Month) -> Result<(), sqlx::Error> {
    let part = &month.partition;
    let mut tx = db.begin().await?;
    sqlx::query("SET LOCAL lock_timeout = '30s'").execute(&mut *tx).await?;
    sqlx::query(&format!("LOCK TABLE \"{part}\" IN SHARE MODE"))
        .execute(&mut *tx)
        .await?;
    if month.table == "ledger_entries" {
        sqlx::query(&format!(
            "INSERT INTO ledger_archived_totals AS a (tenant_id, customer_id, resource_id, credit_type, amount, entries,
                through_id, through)
             SELECT tenant_id, customer_id, resource_id, credit_type, sum(amount), count(*), max(id), $1
             FROM \"{part}\" GROUP BY tenant_id, customer_id, resource_id, credit_type
             ON CONFLICT (tenant_id, customer_id, credit_type, resource_id) DO UPDATE
             SET amount = a.amount + EXCLUDED.amount, entries = a.entries + EXCLUDED.entries,
                 through_id = GREATEST(a.through_id, EXCLUDED.through_id), through = GREATEST(a.through, EXCLUDED.through),
                 updated_at = now()"
        ))
        .bind(month.to)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query(&format!("ALTER TABLE {} DETACH PARTITION \"{part}\"", month.table))
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!("DROP TABLE \"{part}\"")).execute(&mut *tx).await?;
    tx.commit().await
}

/// Delete the rows of `table` with `column` before `before`, a batch per statement; returns
/// how many went.
async fn delete_before(db: &PgPool, table: &str, column: &str, before: DateTime<Utc>) -> Result<i64, sqlx::Error> {
    let mut total = 0;
    loop {
        let n = sqlx::query(&format!(
            "DELETE FROM {table} WHERE ctid = ANY (ARRAY(SELECT ctid FROM {table} WHERE {column} < $1 LIMIT $2))"
        ))
        .bind(before)
        .bind(DELETE_BATCH)
        .execute(db)
        .await?
        .rows_affected();
        total += n as i64;
        if n == 0 {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn a_partition_name_gives_its_month() {
        let m = month_of("ledger_entries", "ledger_entries_y2026m02").unwrap();
        assert_eq!((m.from, m.to), (at("2026-02-01T00:00:00Z"), at("2026-03-01T00:00:00Z")));
        let m = month_of("usage_events", "usage_events_y2026m12").unwrap();
        assert_eq!(m.to, at("2027-01-01T00:00:00Z"));
        assert_eq!(month_of("usage_events", "usage_events_default"), None);
        assert_eq!(month_of("usage_events", "ledger_entries_y2026m02"), None);
        assert_eq!(month_of("usage_events", "usage_events_y2026m13"), None);
    }

    #[test]
    fn the_boundary_keeps_n_months_and_never_less_than_the_dedupe_window() {
        // One month back from Dec 7 is Nov 7: November is kept, October (ended Nov 1) goes.
        assert_eq!(boundary(at("2026-12-07T12:00:00Z"), 1), at("2026-11-01T00:00:00Z"));
        // On Mar 3 one month back is Feb 3, but 35 days back is Jan 27: February's start is
        // not old enough, January is kept too.
        assert_eq!(boundary(at("2026-03-03T00:00:00Z"), 1), at("2026-01-01T00:00:00Z"));
        assert_eq!(boundary(at("2026-12-07T12:00:00Z"), 12), at("2025-12-01T00:00:00Z"));
        // Every month it lets go ended at least 35 days and N months ago.
        let mut now = at("2025-01-01T00:00:00Z");
        while now < at("2027-01-01T00:00:00Z") {
            for n in 1..4 {
                let b = boundary(now, n);
                assert!(b <= now - MAX_DEDUPE_WINDOW, "{now} {n}");
                assert!(b <= now.checked_sub_months(Months::new(n)).unwrap(), "{now} {n}");
            }
            now += chrono::Duration::hours(13);
        }
    }
}
