//! Migration 0009 on a database with data: a database at migration 0008 gets rows in several
//! months, then the full migrator runs. Every row is there with the same values and ids, each
//! in its month's partition; new entries get larger ids; and an idempotency key settled months
//! ago is still a key settled once, whatever month its redelivery arrives in.

use std::borrow::Cow;

use chrono::{DateTime, Duration, Utc};
use ledger_writer::partitions;
use ledger_writer::settle::Settler;
use rust_decimal::Decimal;
use shared::config::KafkaArgs;
use shared::model::{Category, Dimensions, Entry, GrantFact, GrantSpec, LedgerMsg, Outcome, UsageEvent, UsageFact};
use shared::testkit::{create_empty_db, drop_db};
use sqlx::PgPool;
use uuid::Uuid;

const TENANT: &str = "t-part";

/// A database of the test's own at migration `upto`.
async fn db_at(name: &str, upto: i64) -> PgPool {
    let (_, db) = create_empty_db(name, 2).await;
    let full = &shared::db::MIGRATOR;
    let old = sqlx::migrate::Migrator {
        migrations: Cow::Owned(full.migrations.iter().filter(|m| m.version <= upto).cloned().collect()),
        ..sqlx::migrate::Migrator::DEFAULT
    };
    old.run(&db).await.unwrap();
    db
}

fn settler(db: &PgPool) -> Settler {
    let kafka = KafkaArgs {
        kafka_brokers: shared::testkit::brokers(),
        input_topic: "unused".into(),
        ledger_topic: "unused".into(),
        dlq_topic: "unused".into(),
        kafka_compression: "lz4".into(),
        kafka_commit_interval_ms: 500,
        kafka_options: Vec::new(),
    };
    // The producer only gives back duplicates that slipped past Redis: none here.
    Settler {
        db: db.clone(),
        producer: shared::kafka::producer(&kafka, 1).unwrap(),
        input_topic: "unused".into(),
        rejected_window_s: ledger_writer::webhooks::DEFAULT_REJECTED_WINDOW_S,
    }
}

fn usage(uid: Uuid, key: &str, at: DateTime<Utc>, grant: Uuid, cost: i64, end: i64) -> LedgerMsg {
    LedgerMsg::Usage(UsageFact {
        event: UsageEvent {
            tenant_id: TENANT.into(),
            event_uid: uid,
            customer_id: "c-1".into(),
            resource_id: String::new(),
            event_name: "llm".into(),
            idempotency_key: key.into(),
            timestamp: at,
            dimensions: Dimensions::new(),
            accepted_at: at,
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

fn grant_fact(id: Uuid, amount: i64, at: DateTime<Utc>) -> LedgerMsg {
    LedgerMsg::Grant(GrantFact {
        tenant_id: TENANT.into(),
        grant: GrantSpec {
            id,
            customer_id: "c-1".into(),
            resource_id: String::new(),
            credit_type: "ai".into(),
            decimals: 2,
            amount: Decimal::from(amount),
            category: Category::Paid,
            priority: 100,
            cost: None,
            effective_at: at,
            expires_at: None,
            display_name: "it".into(),
            description: None,
            metadata: None,
            source: "manual".into(),
            created_at: at,
        },
        actor: "api".into(),
        entries: vec![Entry {
            grant_id: Some(id),
            amount: Decimal::from(amount),
            end_balance: Decimal::from(amount),
        }],
        remaining: Decimal::from(amount),
    })
}

/// Every row of both tables as text, in a stable order (ledger entries with their ids).
async fn snapshot(db: &PgPool) -> (Vec<String>, Vec<String>) {
    let usage: Vec<String> = sqlx::query_scalar(
        "SELECT row(tenant_id, idempotency_key, event_uid, customer_id, resource_id, event_name, ts, accepted_at,
            settled_at, status, reason, credit_type, cost, dimensions)::text
         FROM usage_events ORDER BY tenant_id, idempotency_key",
    )
    .fetch_all(db)
    .await
    .unwrap();
    let ledger: Vec<String> = sqlx::query_scalar(
        "SELECT row(id, tenant_id, customer_id, resource_id, credit_type, ts, type, source, source_id, entry_idx,
            grant_id, amount, end_balance, actor)::text
         FROM ledger_entries ORDER BY id",
    )
    .fetch_all(db)
    .await
    .unwrap();
    (usage, ledger)
}

#[tokio::test]
async fn partition_migration_keeps_every_row_and_every_key_settles_once() {
    let name = format!("lw_partmig_{}", Uuid::new_v4().simple());
    let db = db_at(&name, 8).await;
    let now = Utc::now();
    let grant = Uuid::new_v4();
    let granted_at = now - Duration::days(100);
    // The schema of 0008: one grant, usage in four months, a duplicate, a deny.
    sqlx::query(
        "INSERT INTO grants (tenant_id, id, customer_id, resource_id, credit_type, amount, remaining, status,
            category, priority, effective_at, display_name, source, created_at)
         VALUES ($1, $2, 'c-1', '', 'ai', 1000, 990, 'active', 'paid', 100, $3, 'it', 'manual', $3)",
    )
    .bind(TENANT)
    .bind(grant)
    .bind(granted_at)
    .execute(&db)
    .await
    .unwrap();
    sqlx::query("INSERT INTO pools (tenant_id, customer_id, resource_id, credit_type, balance) VALUES ($1, 'c-1', '', 'ai', 990)")
        .bind(TENANT)
        .execute(&db)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO ledger_entries (tenant_id, customer_id, resource_id, credit_type, ts, type, source, source_id,
            entry_idx, grant_id, amount, end_balance, actor)
         VALUES ($1, 'c-1', '', 'ai', $3, 'grant', 'manual', $2::text, 0, $2, 1000, 1000, 'api')",
    )
    .bind(TENANT)
    .bind(grant)
    .bind(granted_at)
    .execute(&db)
    .await
    .unwrap();
    let mut old_uids = Vec::new();
    for (i, days) in [95i64, 70, 40, 10, 0].into_iter().enumerate() {
        let at = now - Duration::days(days);
        let key = format!("k-{i}");
        let uid = Uuid::new_v4();
        old_uids.push((key.clone(), uid, at));
        sqlx::query(
            "INSERT INTO usage_events (tenant_id, idempotency_key, event_uid, customer_id, resource_id, event_name,
                ts, accepted_at, settled_at, status, reason, credit_type, cost, dimensions)
             VALUES ($1, $2, $3, 'c-1', '', 'llm', $4, $4, $4 + interval '1 second', 'settled', NULL, 'ai', 2,
                jsonb_build_object('userId', 'u-' || $5::text))",
        )
        .bind(TENANT)
        .bind(&key)
        .bind(uid)
        .bind(at)
        .bind(i as i64)
        .execute(&db)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO ledger_entries (tenant_id, customer_id, resource_id, credit_type, ts, type, source, source_id,
                entry_idx, grant_id, amount, end_balance, actor)
             VALUES ($1, 'c-1', '', 'ai', $3, 'consume', 'usage', $2, 0, $4, -2, 1000 - 2 * ($5 + 1), 'system')",
        )
        .bind(TENANT)
        .bind(&key)
        .bind(at)
        .bind(grant)
        .bind(i as i64)
        .execute(&db)
        .await
        .unwrap();
    }
    sqlx::query(
        "INSERT INTO usage_events (tenant_id, idempotency_key, event_uid, customer_id, event_name, ts, accepted_at,
            settled_at, status, reason, credit_type, cost)
         VALUES ($1, 'k-denied', $2, 'c-1', 'llm', $3, $3, $3, 'denied', 'hard limit', 'ai', 5000)",
    )
    .bind(TENANT)
    .bind(Uuid::new_v4())
    .bind(now - Duration::days(50))
    .execute(&db)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO duplicate_events (tenant_id, event_uid, idempotency_key, caught_by) VALUES ($1, $2, 'k-0', 'redis')",
    )
    .bind(TENANT)
    .bind(Uuid::new_v4())
    .execute(&db)
    .await
    .unwrap();
    let before = snapshot(&db).await;
    assert_eq!((before.0.len(), before.1.len()), (6, 6));
    let last_id: i64 = sqlx::query_scalar("SELECT max(id) FROM ledger_entries")
        .fetch_one(&db)
        .await
        .unwrap();

    shared::db::MIGRATOR.run(&db).await.unwrap();
    partitions::ensure(&db).await.unwrap();

    // Every row, same values, same ids.
    assert_eq!(snapshot(&db).await, before);
    let (parted, keys): (bool, i64) = sqlx::query_as(
        "SELECT (SELECT relkind = 'p' FROM pg_class WHERE oid = 'ledger_entries'::regclass)
                AND (SELECT relkind = 'p' FROM pg_class WHERE oid = 'usage_events'::regclass),
                (SELECT count(*) FROM usage_event_keys) + (SELECT count(*) FROM ledger_entry_keys)",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert!(parted, "both tables partitioned");
    // The id sequence is the old one, owned by the new column (dropped with the table, not before).
    let seq: Option<String> = sqlx::query_scalar("SELECT pg_get_serial_sequence('ledger_entries', 'id')")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(seq.as_deref(), Some("public.ledger_entries_id_seq"));
    assert_eq!(keys, 12, "one key row per usage row and per entry");
    // Each row in its month's partition (none left in the default ones), and the months from
    // the oldest row to two ahead exist.
    for table in partitions::TABLES {
        let rows: Vec<(String, DateTime<Utc>)> =
            sqlx::query_as(&format!("SELECT tableoid::regclass::text, settled_at FROM {table}"))
                .fetch_all(&db)
                .await
                .unwrap();
        for (part, settled_at) in rows {
            let m = partitions::month_of(table, &part).unwrap_or_else(|| panic!("{table} row in {part}"));
            assert!(m.from <= settled_at && settled_at < m.to, "{part} holds {settled_at}");
        }
        let months = partitions::months(&db, table).await.unwrap();
        assert!(months.len() >= 6, "{table}: {months:?}");
        assert!(
            months.last().unwrap().from > now + Duration::days(31),
            "{table}: two months ahead"
        );
    }

    // Redelivered months later: the old event (same uid) and the old grant settle nothing;
    // a new event gets a larger id, after the grant's fact, in the chain.
    let s = settler(&db);
    let (old_key, old_uid, old_at) = old_uids[0].clone();
    let redelivered = usage(old_uid, &old_key, old_at, grant, 2, 998);
    let regrant = grant_fact(grant, 1000, granted_at);
    let fresh = usage(Uuid::new_v4(), "k-new", now, grant, 3, 987);
    s.settle(&[&redelivered, &regrant, &fresh]).await.unwrap();
    s.settle(&[&redelivered, &regrant, &fresh]).await.unwrap();
    let (usage_rows, entries, balance, remaining, new_id): (i64, i64, Decimal, Decimal, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM usage_events), (SELECT count(*) FROM ledger_entries),
                (SELECT balance FROM pools), (SELECT remaining FROM grants),
                (SELECT id FROM ledger_entries WHERE source_id = 'k-new')",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(
        (usage_rows, entries, balance, remaining),
        (7, 7, Decimal::from(987), Decimal::from(987))
    );
    assert!(new_id > last_id, "new id {new_id} after {last_id}");
    // A plain insert of a key settled months ago is refused by the key table, whatever month.
    let refused = sqlx::query(
        "INSERT INTO usage_event_keys (tenant_id, idempotency_key, event_uid, settled_at) VALUES ($1, $2, $3, now())",
    )
    .bind(TENANT)
    .bind(&old_key)
    .bind(Uuid::new_v4())
    .execute(&db)
    .await;
    assert!(refused.is_err(), "a second row for an old key");
    // The retried (checked) path as well: nothing new.
    s.settle_in(&[&redelivered, &regrant], ledger_writer::settle::Mode::Checked)
        .await
        .unwrap();
    let entries_after: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger_entries")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(entries_after, 7);
    drop_db(db, &name).await;
}

/// A client's repeat (a new event uid) of a key settled in an earlier month, that slipped past
/// Redis: the real settle path finds the key in `usage_event_keys`, settles no second row,
/// records the duplicate as caught by Postgres, writes the hot pool's charge as an `adjust`
/// and gives it back through the input topic.
#[tokio::test]
async fn partition_repeat_of_a_key_from_an_earlier_month_is_a_duplicate() {
    let name = format!("lw_partdup_{}", Uuid::new_v4().simple());
    let (_, db) = shared::testkit::create_db(&name, 2).await;
    let topic = format!("it-partdup-{}", Uuid::new_v4().simple());
    shared::testkit::create_topics(&[&topic], 1).await;
    let grant = Uuid::new_v4();
    let long_ago = Utc::now() - Duration::days(80);
    sqlx::query("SELECT credits_month_partition(t, $1) FROM unnest(ARRAY['usage_events', 'ledger_entries']) t")
        .bind(long_ago)
        .execute(&db)
        .await
        .unwrap();
    let mut s = settler(&db);
    s.input_topic = topic.clone();
    s.settle(&[&grant_fact(grant, 100, long_ago)]).await.unwrap();
    let first = usage(Uuid::new_v4(), "k-old", long_ago, grant, 3, 97);
    s.settle(&[&first]).await.unwrap();
    // Settled "80 days ago": move the rows and their keys into that month, as time would have.
    for sql in [
        "UPDATE usage_events SET settled_at = $1",
        "UPDATE usage_event_keys SET settled_at = $1",
        "UPDATE ledger_entries SET settled_at = $1",
        "UPDATE ledger_entry_keys SET settled_at = $1",
    ] {
        sqlx::query(sql).bind(long_ago).execute(&db).await.unwrap();
    }
    let old_part: String = sqlx::query_scalar("SELECT tableoid::regclass::text FROM usage_events")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(
        partitions::month_of("usage_events", &old_part).map(|m| m.from <= long_ago && long_ago < m.to),
        Some(true)
    );

    let repeat = usage(Uuid::new_v4(), "k-old", Utc::now(), grant, 3, 94);
    s.settle(&[&repeat]).await.unwrap();
    s.settle(&[&repeat]).await.unwrap();
    let (rows, caught, consumes, adjusts, balance): (i64, String, i64, Decimal, Decimal) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM usage_events), (SELECT string_agg(caught_by, ',') FROM duplicate_events),
                (SELECT count(*) FROM ledger_entries WHERE type = 'consume'),
                (SELECT sum(amount) FROM ledger_entries WHERE type = 'adjust' AND source = 'duplicate'),
                (SELECT balance FROM pools)",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(
        (rows, caught.as_str(), consumes, adjusts, balance),
        (1, "postgres", 1, Decimal::from(-3), Decimal::from(94)),
        "one settled row; the repeat's charge in the ledger as an adjust, to be given back"
    );
    // The give-back went to the input topic (the rater applies it and writes the reversal).
    let (_, high, _) = shared::testkit::offsets(&topic, "unused", 1)[0];
    assert!(high >= 1, "a reverse command on the input topic");
    shared::testkit::delete_topics_and_groups(&[&topic], &[]).await;
    drop_db(db, &name).await;
}
