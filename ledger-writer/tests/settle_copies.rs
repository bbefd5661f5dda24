//! A rater that crashed after producing and before committing its offsets produces the same
//! facts again; a lagging ledger-writer can find both copies in one batch. Settled on the fast
//! path (no ON CONFLICT for the entries of new usage rows) against a real Postgres: one usage
//! row, one ledger entry, the pool and grant moved once, the rollups counted once, no error.

use chrono::Utc;
use ledger_writer::settle::Settler;
use rust_decimal::Decimal;
use shared::config::KafkaArgs;
use shared::model::{Dimensions, Entry, LedgerMsg, Outcome, UsageEvent, UsageFact};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use uuid::Uuid;

const TENANT: &str = "t-copies";

fn base() -> String {
    std::env::var("DATABASE_URL_BASE").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

async fn admin() -> PgPool {
    PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!("{}/postgres", base()))
        .await
        .unwrap()
}

fn usage(grant: Uuid, key: &str, cost: i64, end: i64) -> LedgerMsg {
    let mut dims = Dimensions::new();
    dims.insert("userId".into(), serde_json::json!("u-1"));
    let now = Utc::now();
    LedgerMsg::Usage(UsageFact {
        event: UsageEvent {
            tenant_id: TENANT.into(),
            event_uid: Uuid::now_v7(),
            customer_id: "c-1".into(),
            resource_id: String::new(),
            event_name: "llm".into(),
            idempotency_key: key.into(),
            timestamp: now,
            dimensions: dims,
            accepted_at: now,
        },
        outcome: Outcome::Settled {
            credit_type: "ai".into(),
            cost: Decimal::from(cost),
            entries: vec![Entry {
                grant_id: Some(grant),
                amount: Decimal::from(-cost),
                end_balance: Decimal::from(end),
            }],
        },
    })
}

#[tokio::test]
async fn two_copies_of_a_fact_in_one_batch_settle_once_on_the_fast_path() {
    let name = format!("lw_copies_{}", Uuid::new_v4().simple());
    let server = admin().await;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&server)
        .await
        .unwrap();
    let db = PgPoolOptions::new()
        .max_connections(2)
        .connect(&format!("{}/{name}", base()))
        .await
        .unwrap();
    shared::db::MIGRATOR.run(&db).await.unwrap();
    let grant = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO grants (tenant_id, id, customer_id, resource_id, credit_type, amount, remaining, status,
            category, priority, effective_at, display_name, source, created_at)
         VALUES ($1, $2, 'c-1', '', 'ai', 100, 100, 'active', 'paid', 100, now(), 'it', 'manual', now())",
    )
    .bind(TENANT)
    .bind(grant)
    .execute(&db)
    .await
    .unwrap();
    sqlx::query("INSERT INTO pools (tenant_id, customer_id, resource_id, credit_type, balance) VALUES ($1, 'c-1', '', 'ai', 100)")
        .bind(TENANT)
        .execute(&db)
        .await
        .unwrap();
    let kafka = KafkaArgs {
        kafka_brokers: std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into()),
        input_topic: "unused".into(),
        ledger_topic: "unused".into(),
        dlq_topic: "unused".into(),
        kafka_compression: "lz4".into(),
        kafka_commit_interval_ms: 500,
        kafka_options: Vec::new(),
    };
    // The producer is only used to give back duplicates that slipped past Redis: none here.
    let settler = Settler {
        db: db.clone(),
        producer: shared::kafka::producer(&kafka, 1).unwrap(),
        input_topic: "unused".into(),
        rejected_window_s: ledger_writer::webhooks::DEFAULT_REJECTED_WINDOW_S,
    };
    let (a, b) = (usage(grant, "k-a", 3, 97), usage(grant, "k-b", 4, 93));
    settler
        .settle(&[&a, &b, &a, &b, &a])
        .await
        .expect("settled on the fast path");
    // And the same batch redelivered whole: nothing changes.
    settler.settle(&[&a, &b]).await.unwrap();

    let (usage_rows, entries, balance, remaining): (i64, i64, Decimal, Decimal) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM usage_events), (SELECT count(*) FROM ledger_entries),
                (SELECT balance FROM pools), (SELECT remaining FROM grants)",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(
        (usage_rows, entries, balance, remaining),
        (2, 2, Decimal::from(93), Decimal::from(93))
    );
    // The settled usage waits in usage_rollup_pending; two compactors at once move it once.
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_rollup_pending")
        .fetch_one(&db)
        .await
        .unwrap();
    assert!(pending > 0);
    let (x, y) = tokio::join!(
        ledger_writer::rollups::compact(&db, 1),
        ledger_writer::rollups::compact(&db, 1)
    );
    let (x, y) = (x.unwrap(), y.unwrap());
    let mut moved = x.pending + y.pending;
    loop {
        let c = ledger_writer::rollups::compact(&db, 1).await.unwrap();
        assert!(!c.busy, "nobody else holds the lock now");
        moved += c.pending;
        if c.pending == 0 {
            break;
        }
    }
    assert_eq!(moved, pending, "every pending row moved exactly once");
    let rollups: Vec<(String, String, Decimal, i64)> = sqlx::query_as(
        "SELECT granularity, dim, sum(credits), sum(events)::int8 FROM usage_rollups GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(rollups.len(), 6, "{rollups:?}");
    for (g, d, credits, events) in rollups {
        assert_eq!((credits, events), (Decimal::from(7), 2), "rollups {g}/{d}");
    }
    db.close().await;
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&server)
        .await
        .unwrap();
}
