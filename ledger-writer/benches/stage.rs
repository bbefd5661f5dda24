//! The ledger-writer's Postgres stage alone, on a real Postgres: pre-built batches of usage facts
//! (as the rater produces them: settled with one entry against the customer's grant, plus a
//! share of Redis-caught duplicates) settled with `Settler::settle`, one transaction per batch,
//! batch after batch as the service does. No Kafka: what is timed is the settle transaction.
//!
//! `cargo bench -p ledger-writer --bench stage -- --events 200000 --customers 1000 --batch 5000`
//! prints one JSON line on stdout (a summary on stderr). It creates the scratch database
//! `bench_ledger_<pid>`, migrates it, seeds one grant and one pool per customer, and drops it at
//! the end. Afterwards the settled state is checked (one usage row and one ledger entry per
//! unique event, one duplicate row per repeat, every balance and remainder moved by exactly the
//! charged total): a wrong result exits non-zero.
#![allow(clippy::float_arithmetic)] // rates and shares only; money is Decimal

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chrono::Utc;
use clap::Parser;
use ledger_writer::settle::{Mode, Settler};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use shared::config::KafkaArgs;
use shared::model::{Dimensions, Entry, LedgerMsg, Outcome, UsageEvent, UsageFact};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use uuid::Uuid;

const TENANT: &str = "t_bench";
const GRANT: i64 = 100_000_000;

#[derive(Parser, Debug, Clone)]
#[command(about = "ledger-writer stage bench: Settler::settle on a real Postgres")]
struct Args {
    /// Usage facts settled in the timed part (duplicates included).
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Customers (one grant and one pool each).
    #[arg(long, default_value_t = 1000)]
    customers: usize,
    /// Facts per transaction (LEDGER_WRITER_MAX_BATCH).
    #[arg(long, default_value_t = 5000)]
    batch: usize,
    /// Zipf exponent of the customer popularity (0 = uniform); the load generator uses 1.1.
    #[arg(long, default_value_t = 1.1)]
    skew: f64,
    /// Share of facts that are Redis-caught duplicates of a recent event.
    #[arg(long, default_value_t = 0.05)]
    duplicates: f64,
    /// Settlers working at once, each on the customers of its share of the partitions (as
    /// ledger-writer replicas in one consumer group would); 1 = the service as it runs today.
    #[arg(long, default_value_t = 1)]
    writers: usize,
    /// Put every ledger entry through ON CONFLICT (the path a retried transaction takes)
    /// instead of the plain insert for the entries of new usage rows.
    #[arg(long)]
    checked: bool,
    /// Connections in the settler's pool (DATABASE_MAX_CONNECTIONS).
    #[arg(long, default_value_t = 8)]
    connections: u32,
    /// Postgres server (without a database) for the scratch database.
    #[arg(
        long,
        env = "DATABASE_URL_BASE",
        default_value = "postgres://postgres@127.0.0.1:5432"
    )]
    database_url_base: String,
    /// Log every statement's duration to the Postgres server log (for profiling: set on the
    /// scratch database only, `log_min_duration_statement = 0`).
    #[arg(long)]
    log_statements: bool,
    /// Create the scratch database with this LC_COLLATE (e.g. `C`, to measure what byte-order
    /// comparison of the text keys would save); default: the server's.
    #[arg(long)]
    collation: Option<String>,
    /// Only for the settler's producer, which a bench never uses (no duplicate slips past Redis).
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    kafka_brokers: String,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
    /// A name filter `cargo bench` may pass; ignored.
    #[arg(hide = true)]
    filter: Option<String>,
}

fn pick(cum: &[f64], rng: &mut StdRng) -> usize {
    let u = rng.gen::<f64>() * cum[cum.len() - 1];
    cum.partition_point(|&c| c < u).min(cum.len() - 1)
}

/// The facts, and what they must settle to: (unique events, duplicates, total charge).
fn facts(args: &Args, grants: &[Uuid], rng: &mut StdRng) -> (Vec<LedgerMsg>, usize, usize, Decimal) {
    let mut acc = 0.0;
    let cum: Vec<f64> = (1..=args.customers)
        .map(|k| {
            acc += 1.0 / (k as f64).powf(args.skew);
            acc
        })
        .collect();
    let mut balance: Vec<Decimal> = vec![Decimal::from(GRANT); args.customers];
    let mut out: Vec<LedgerMsg> = Vec::with_capacity(args.events);
    let mut originals: Vec<usize> = Vec::new();
    let (mut unique, mut dups, mut total) = (0, 0, Decimal::ZERO);
    let now = Utc::now();
    for _ in 0..args.events {
        if !originals.is_empty() && rng.gen::<f64>() < args.duplicates {
            let back = rng.gen_range(1..=originals.len().min(2048));
            let LedgerMsg::Usage(orig) = &out[originals[originals.len() - back]] else {
                unreachable!("only usage facts are generated")
            };
            let mut event = orig.event.clone();
            event.event_uid = Uuid::now_v7();
            out.push(LedgerMsg::Usage(UsageFact {
                event,
                outcome: Outcome::Duplicate,
            }));
            dups += 1;
            continue;
        }
        let c = pick(&cum, rng);
        let tokens: i64 = rng.gen_range(1..=500);
        let cost = Decimal::new(tokens, 2);
        balance[c] -= cost;
        total += cost;
        unique += 1;
        let mut dims = Dimensions::new();
        dims.insert("tokens".into(), serde_json::json!(tokens));
        dims.insert(
            "userId".into(),
            serde_json::json!(format!("u-{}", rng.gen_range(0..50))),
        );
        originals.push(out.len());
        out.push(LedgerMsg::Usage(UsageFact {
            event: UsageEvent {
                tenant_id: TENANT.into(),
                event_uid: Uuid::now_v7(),
                customer_id: format!("c-{c}"),
                resource_id: String::new(),
                event_name: "llm-call".into(),
                idempotency_key: Uuid::new_v4().to_string(),
                timestamp: now,
                dimensions: dims,
                accepted_at: now,
            },
            outcome: Outcome::Settled {
                credit_type: "ai-tokens".into(),
                cost,
                entries: vec![Entry {
                    grant_id: Some(grants[c]),
                    amount: -cost,
                    end_balance: balance[c],
                }],
            },
        }));
    }
    (out, unique, dups, total)
}

async fn admin(base: &str) -> Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!("{base}/postgres"))
        .await
        .context("postgres")
}

async fn drop_db(base: &str, name: &str) -> Result<()> {
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&admin(base).await?)
        .await?;
    Ok(())
}

/// Create, migrate and seed the scratch database; returns it and each customer's grant id.
async fn scratch_db(args: &Args, name: &str) -> Result<(PgPool, Vec<Uuid>)> {
    drop_db(&args.database_url_base, name).await?;
    let server = admin(&args.database_url_base).await?;
    let create = match &args.collation {
        Some(c) => format!(
            "CREATE DATABASE {name} TEMPLATE template0 LC_COLLATE '{}'",
            c.replace('\'', "")
        ),
        None => format!("CREATE DATABASE {name}"),
    };
    sqlx::query(&create).execute(&server).await?;
    if args.log_statements {
        sqlx::query(&format!("ALTER DATABASE {name} SET log_min_duration_statement = 0"))
            .execute(&server)
            .await?;
    }
    server.close().await;
    let db = PgPoolOptions::new()
        .max_connections(args.connections)
        .connect(&format!("{}/{name}", args.database_url_base))
        .await?;
    shared::db::MIGRATOR.run(&db).await?;
    let n = args.customers as i32;
    sqlx::query(
        "INSERT INTO grants (tenant_id, id, customer_id, resource_id, credit_type, amount, remaining, status,
            category, priority, effective_at, display_name, source, created_at)
         SELECT $1, gen_random_uuid(), 'c-' || i, '', 'ai-tokens', $2, $2, 'active', 'paid', 100, now(),
            'bench', 'manual', now()
         FROM generate_series(0, $3 - 1) AS i",
    )
    .bind(TENANT)
    .bind(Decimal::from(GRANT))
    .bind(n)
    .execute(&db)
    .await?;
    sqlx::query(
        "INSERT INTO pools (tenant_id, customer_id, resource_id, credit_type, balance)
         SELECT $1, 'c-' || i, '', 'ai-tokens', $2 FROM generate_series(0, $3 - 1) AS i",
    )
    .bind(TENANT)
    .bind(Decimal::from(GRANT))
    .bind(n)
    .execute(&db)
    .await?;
    sqlx::query("ANALYZE").execute(&db).await?;
    let rows: Vec<(String, Uuid)> = sqlx::query_as("SELECT customer_id, id FROM grants")
        .fetch_all(&db)
        .await?;
    let by_customer: HashMap<String, Uuid> = rows.into_iter().collect();
    let grants = (0..args.customers)
        .map(|c| by_customer.get(&format!("c-{c}")).copied().context("seeded grant"))
        .collect::<Result<Vec<_>>>()?;
    Ok((db, grants))
}

fn quantile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1000.0
}

async fn run(args: &Args, name: &str) -> Result<()> {
    let (db, grants) = scratch_db(args, name).await?;
    let kafka = KafkaArgs {
        kafka_brokers: args.kafka_brokers.clone(),
        input_topic: "bench.unused".into(),
        ledger_topic: "bench.unused".into(),
        dlq_topic: "bench.unused".into(),
        kafka_compression: "lz4".into(),
        kafka_commit_interval_ms: 500,
        kafka_options: Vec::new(),
    };
    let settler = Arc::new(Settler {
        db: db.clone(),
        producer: shared::kafka::producer(&kafka, 1)?,
        input_topic: kafka.input_topic.clone(),
        rejected_window_s: ledger_writer::webhooks::DEFAULT_REJECTED_WINDOW_S,
    });
    let mut rng = StdRng::seed_from_u64(11);
    let (all, unique, dups, total) = facts(args, &grants, &mut rng);
    let events = all.len();

    // One stream of facts per writer, split by customer as partitions split them.
    let mut streams: Vec<Vec<LedgerMsg>> = (0..args.writers).map(|_| Vec::new()).collect();
    for f in all {
        let LedgerMsg::Usage(u) = &f else {
            unreachable!("only usage facts are generated")
        };
        let c: usize = u.event.customer_id[2..].parse()?;
        streams[c % args.writers].push(f);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for stream in streams {
        let (settler, batch, checked) = (settler.clone(), args.batch, args.checked);
        tasks.push(tokio::spawn(async move {
            let mut txs = Vec::new();
            for chunk in stream.chunks(batch) {
                let refs: Vec<&LedgerMsg> = chunk.iter().collect();
                let t = Instant::now();
                let mode = if checked { Mode::Checked } else { Mode::Fast };
                settler.settle_in(&refs, mode).await?;
                txs.push(t.elapsed());
            }
            anyhow::Ok(txs)
        }));
    }
    let mut txs = Vec::new();
    for t in tasks {
        txs.extend(t.await??);
    }
    let elapsed = started.elapsed();

    // What Postgres holds now (sizes: every partition of both tables and their key tables).
    let (usage, ledger, dup_rows): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM usage_events), (SELECT count(*) FROM ledger_entries),
                (SELECT count(*) FROM duplicate_events)",
    )
    .fetch_one(&db)
    .await?;
    let (balances, remaining): (Decimal, Decimal) =
        sqlx::query_as("SELECT (SELECT sum(balance) FROM pools), (SELECT sum(remaining) FROM grants)")
            .fetch_one(&db)
            .await?;
    let (table_bytes, index_bytes): (i64, i64) = sqlx::query_as(
        "WITH t(relid) AS (
            SELECT relid FROM pg_partition_tree('ledger_entries') UNION ALL
            SELECT relid FROM pg_partition_tree('usage_events') UNION ALL
            SELECT 'ledger_entry_keys'::regclass UNION ALL SELECT 'usage_event_keys'::regclass)
         SELECT sum(pg_table_size(relid))::int8, sum(pg_indexes_size(relid))::int8 FROM t",
    )
    .fetch_one(&db)
    .await?;
    db.close().await;

    let seeded = Decimal::from(GRANT) * Decimal::from(args.customers as u64);
    let ok = usage as usize == unique
        && ledger as usize == unique
        && dup_rows as usize == dups
        && balances == seeded - total
        && remaining == seeded - total;
    txs.sort();
    let secs = elapsed.as_secs_f64();
    let eps = events as f64 / secs;
    let report = serde_json::json!({
        "bench": "ledger_writer_stage",
        "customers": args.customers,
        "events": events,
        "writers": args.writers,
        "checked": args.checked,
        "batch": args.batch,
        "skew": args.skew,
        "duplicates_ratio": args.duplicates,
        "transactions": txs.len(),
        "seconds": secs,
        "events_per_second": eps,
        "tx_p50_ms": quantile(&txs, 0.5),
        "tx_p99_ms": quantile(&txs, 0.99),
        "tx_max_ms": quantile(&txs, 1.0),
        "usage_rows": usage,
        "ledger_rows": ledger,
        "duplicate_rows": dup_rows,
        "heap_bytes_per_event": table_bytes as f64 / unique.max(1) as f64,
        "index_bytes_per_event": index_bytes as f64 / unique.max(1) as f64,
        "ok": ok,
    });
    println!("{report}");
    eprintln!(
        "ledger-writer stage: {} facts in {} transactions, {secs:.2}s = {eps:.0} events/s; tx p50 {:.0} ms \
         max {:.0} ms",
        events,
        txs.len(),
        quantile(&txs, 0.5),
        quantile(&txs, 1.0)
    );
    if !ok {
        bail!(
            "wrong settlement: usage rows {usage} (want {unique}), ledger rows {ledger} (want {unique}), \
             duplicate rows {dup_rows} (want {dups}), balances {balances} and remainders {remaining} \
             (want {})",
            seeded - total
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.events > 0 && args.batch > 0 && args.customers > 0 && args.connections > 0 && args.writers > 0,
        "--events, --batch, --customers, --connections and --writers must be positive"
    );
    let name = format!("bench_ledger_{}", std::process::id());
    let result = run(&args, &name).await;
    drop_db(&args.database_url_base, &name).await?;
    result
}
