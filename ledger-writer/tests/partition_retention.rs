//! `ledger-writer retention --keep-months N`, run as an operator runs it, on a ledger settled
//! over seven months: the months past the boundary are dropped (partitions and their key rows),
//! the recent ones and every key within the dedupe window are kept, each pool's balance still
//! equals its archived total plus the entries kept (reconcile finds nothing), `--dry-run` drops
//! nothing, and `--keep-months 0` is refused.

use std::process::Output;

use chrono::{DateTime, Duration, Months, Utc};
use ledger_writer::partitions;
use rust_decimal::Decimal;
use shared::testkit::{create_db, drop_db};
use sqlx::PgPool;
use uuid::Uuid;

const TENANT: &str = "t-retention";

fn bin() -> std::path::PathBuf {
    let dir = std::env::var("CREDITS_BIN_DIR").unwrap_or_else(|_| {
        let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
        format!("{}/../target/{profile}", env!("CARGO_MANIFEST_DIR"))
    });
    std::path::Path::new(&dir).join("ledger-writer")
}

fn retention(url: &str, args: &[&str]) -> Output {
    std::process::Command::new(bin())
        .arg("retention")
        .args(args)
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        .output()
        .expect("ledger-writer runs")
}

/// One pool's ledger: a grant months ago, then `cost` a month, settled at `settled[i]`; its
/// usage rows and the keys of both, as the settle path writes them. Returns the balance.
async fn settle_history(db: &PgPool, customer: &str, settled: &[DateTime<Utc>], grant: i64, cost: i64) -> i64 {
    let gid = Uuid::new_v4();
    let mut balance = 0;
    for (i, at) in settled.iter().enumerate() {
        let (kind, source, sid, amount) = if i == 0 {
            ("grant", "manual", gid.to_string(), grant)
        } else {
            ("consume", "usage", format!("{customer}-k{i}"), -cost)
        };
        balance += amount;
        sqlx::query(
            "INSERT INTO ledger_entries (tenant_id, customer_id, resource_id, credit_type, ts, type, source, source_id,
                entry_idx, grant_id, amount, end_balance, actor, settled_at)
             VALUES ($1, $2, '', 'ai', $3, $4, $5, $6, 0, $7, $8, $9, 'system', $3)",
        )
        .bind(TENANT)
        .bind(customer)
        .bind(at)
        .bind(kind)
        .bind(source)
        .bind(&sid)
        .bind(gid)
        .bind(Decimal::from(amount))
        .bind(Decimal::from(balance))
        .execute(db)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO ledger_entry_keys (tenant_id, type, source_id, entry_idx, settled_at) VALUES ($1, $2, $3, 0, $4)",
        )
        .bind(TENANT)
        .bind(kind)
        .bind(&sid)
        .bind(at)
        .execute(db)
        .await
        .unwrap();
        if i == 0 {
            continue;
        }
        let uid = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO usage_events (tenant_id, idempotency_key, event_uid, customer_id, event_name, ts, accepted_at,
                settled_at, status, credit_type, cost)
             VALUES ($1, $2, $3, $4, 'llm', $5, $5, $5, 'settled', 'ai', $6)",
        )
        .bind(TENANT)
        .bind(&sid)
        .bind(uid)
        .bind(customer)
        .bind(at)
        .bind(Decimal::from(cost))
        .execute(db)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO usage_event_keys (tenant_id, idempotency_key, event_uid, settled_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(TENANT)
        .bind(&sid)
        .bind(uid)
        .bind(at)
        .execute(db)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO duplicate_events (tenant_id, event_uid, idempotency_key, caught_by, seen_at)
             VALUES ($1, $2, $3, 'redis', $4)",
        )
        .bind(TENANT)
        .bind(Uuid::new_v4())
        .bind(&sid)
        .bind(at)
        .execute(db)
        .await
        .unwrap();
    }
    sqlx::query(
        "INSERT INTO grants (tenant_id, id, customer_id, resource_id, credit_type, amount, remaining, status, category,
            priority, effective_at, display_name, source, created_at)
         VALUES ($1, $2, $3, '', 'ai', $4, $5, 'active', 'paid', 100, $6, 'it', 'manual', $6)",
    )
    .bind(TENANT)
    .bind(gid)
    .bind(customer)
    .bind(Decimal::from(grant))
    .bind(Decimal::from(balance))
    .bind(settled[0])
    .execute(db)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO pools (tenant_id, customer_id, resource_id, credit_type, balance) VALUES ($1, $2, '', 'ai', $3)",
    )
    .bind(TENANT)
    .bind(customer)
    .bind(Decimal::from(balance))
    .execute(db)
    .await
    .unwrap();
    balance
}

async fn reconcile(db: &PgPool) -> Vec<ledger_writer::reconcile::Difference> {
    let mut redis = shared::testkit::redis_conn().await;
    let keys = shared::keys::Keys::new(format!("it-retention-{}", Uuid::new_v4().simple()));
    let (pools, diffs) = ledger_writer::reconcile::run(db, &mut redis, &keys, Some(TENANT))
        .await
        .unwrap();
    assert_eq!(pools, 2);
    diffs
}

async fn count(db: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(db).await.unwrap()
}

#[tokio::test]
async fn partition_retention_drops_old_months_and_keeps_balances_and_recent_keys() {
    let name = format!("lw_retention_{}", Uuid::new_v4().simple());
    let (url, db) = create_db(&name, 2).await;
    sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, 'it')")
        .bind(TENANT)
        .execute(&db)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO credit_types (tenant_id, id, name, unit_singular, unit_plural, decimals, limit_kind)
         VALUES ($1, 'ai', 'AI', 'credit', 'credits', 2, 'hard')",
    )
    .bind(TENANT)
    .execute(&db)
    .await
    .unwrap();
    let now = Utc::now();
    // Rows settled in each of the last seven months (their partitions made as the
    // ledger-writer would have made them then), and a few within the dedupe window.
    let mut settled: Vec<DateTime<Utc>> = (1..=6u32)
        .rev()
        .map(|k| now.checked_sub_months(Months::new(k)).unwrap())
        .collect();
    settled.extend([now - Duration::days(34), now - Duration::days(3), now]);
    settled.sort();
    for table in partitions::TABLES {
        for at in &settled {
            sqlx::query("SELECT credits_month_partition($1, $2)")
                .bind(table)
                .bind(at)
                .execute(&db)
                .await
                .unwrap();
        }
    }
    let a = settle_history(&db, "c-a", &settled, 1000, 7).await;
    let b = settle_history(&db, "c-b", &settled[settled.len() - 3..], 50, 5).await;
    assert!(reconcile(&db).await.is_empty(), "a consistent ledger to start from");
    let all = count(&db, "SELECT count(*) FROM ledger_entries").await;
    let keys_before = count(&db, "SELECT count(*) FROM ledger_entry_keys").await;

    // N < 1 is refused, by clap and by the library.
    let out = retention(&url, &["--keep-months", "0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("keep-months"));
    assert!(partitions::retention(&db, now, 0, false).await.is_err());

    // A dry run says what would go and drops nothing.
    let out = retention(&url, &["--keep-months", "2", "--dry-run"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dry: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let boundary = partitions::boundary(Utc::now(), 2);
    let doomed: Vec<DateTime<Utc>> = settled.iter().copied().filter(|t| *t < boundary).collect();
    assert!(doomed.len() >= 3, "months to drop: {doomed:?} before {boundary}");
    assert_eq!(dry["dry_run"], true);
    let would = dry["partitions"].as_array().unwrap();
    assert!(!would.is_empty());
    assert_eq!(count(&db, "SELECT count(*) FROM ledger_entries").await, all);
    assert_eq!(count(&db, "SELECT count(*) FROM ledger_entry_keys").await, keys_before);

    // The real run.
    let out = retention(&url, &["--keep-months", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["partitions"], dry["partitions"], "the dry run told the truth");
    let dropped = doomed.len() as i64;
    assert_eq!(
        count(&db, "SELECT count(*) FROM ledger_entries").await,
        all - dropped,
        "one entry of c-a per dropped month"
    );
    for table in partitions::TABLES {
        for m in partitions::months(&db, table).await.unwrap() {
            assert!(m.to > boundary, "{} kept", m.partition);
        }
    }
    // Every month dropped ended before both the dedupe window and the N months.
    let oldest_kept = (now - partitions::MAX_DEDUPE_WINDOW).min(now.checked_sub_months(Months::new(2)).unwrap());
    for p in report["partitions"].as_array().unwrap() {
        let to: DateTime<Utc> = p["to"].as_str().unwrap().parse().unwrap();
        assert!(to <= oldest_kept, "{p} dropped");
    }
    // Keys: every one settled since the boundary is kept (so every one within the dedupe
    // window), the older ones went with their months.
    for (table, keep) in [
        ("ledger_entry_keys", keys_before - dropped),
        // c-a's usage since the boundary (its first entry, the grant, is long gone) and c-b's two.
        (
            "usage_event_keys",
            settled.iter().filter(|t| **t >= boundary).count() as i64 + 2,
        ),
    ] {
        assert_eq!(
            count(&db, &format!("SELECT count(*) FROM {table}")).await,
            keep,
            "{table}"
        );
        let old: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table} WHERE settled_at < $1"))
            .bind(boundary)
            .fetch_one(&db)
            .await
            .unwrap();
        assert_eq!(old, 0, "{table}");
    }
    let recent: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_event_keys WHERE settled_at >= $1")
        .bind(now - partitions::MAX_DEDUPE_WINDOW)
        .fetch_one(&db)
        .await
        .unwrap();
    let window = settled[1..]
        .iter()
        .filter(|t| **t >= now - partitions::MAX_DEDUPE_WINDOW)
        .count() as i64;
    assert_eq!(recent, window + 2, "every key of the dedupe window is kept");
    // Balances: unchanged, and the ledger still sums to them.
    let balances: Vec<Decimal> = sqlx::query_scalar("SELECT balance FROM pools ORDER BY customer_id")
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(balances, [Decimal::from(a), Decimal::from(b)]);
    let diffs = reconcile(&db).await;
    assert!(diffs.is_empty(), "{diffs:#?}");
    // Nothing more to drop: a second run is a no-op.
    let again: serde_json::Value = serde_json::from_slice(&retention(&url, &["--keep-months", "2"]).stdout).unwrap();
    assert_eq!(again["partitions"].as_array().unwrap().len(), 0);
    drop_db(db, &name).await;
}
