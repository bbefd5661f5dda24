//! The ledger-writer alone, stopped and started again mid-stream: its own database, topics and
//! consumer group, facts produced by the test as the rater would produce them (end balances
//! chained per pool), and the real binary as a child process.
//!
//! 1. A third of the facts are on the ledger topic when the writer starts; the rest are produced
//!    while it runs. Its first run commits no offsets (a commit interval far beyond the test), so
//!    the SIGKILL once some facts are settled leaves every one of them to be redelivered.
//! 2. Started again, it settles the redelivered facts and the new ones; a SIGTERM part of the way
//!    (graceful: drain and final commit) and a third start settle the rest.
//!
//! Exactly once: one usage row and one `consume` entry per fact, each pool's balance and each
//! grant's remaining moved by each charge once, end balances chaining in ledger order,
//! `reconcile --strict` clean, and the group's committed offsets at the end of every partition.

use std::panic::AssertUnwindSafe;
use std::process::Stdio;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::FutureExt as _;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rust_decimal::Decimal;
use shared::model::{partition_key, Dimensions, Entry, LedgerMsg, Outcome, UsageEvent, UsageFact};
use shared::testkit::{
    brokers, create_db, create_topics, delete_topics_and_groups, drop_db, free_port, kill, offsets, redis_url,
    start_service, stop,
};
use sqlx::PgPool;
use tokio::process::{Child, Command};
use uuid::Uuid;

const PARTITIONS: i32 = 4;
const CUSTOMERS: usize = 8;
const PER_CUSTOMER: usize = 450;
/// Facts per ledger message (the rater sends runs of one customer's facts as a JSON array).
const RUN: usize = 5;
/// What each customer's grant holds (credit type "ai", 2 places).
const GRANT: i64 = 10_000;

/// Cost of customer `c`'s `j`th event, in hundredths.
fn cost(c: usize, j: usize) -> i64 {
    ((j * 37 + c * 11) % 500 + 1) as i64
}

struct Ctx {
    name: String,
    tenant: String,
    db_name: String,
    db_url: String,
    db: PgPool,
    ledger_topic: String,
    input_topic: String,
    dlq_topic: String,
    group: String,
    redis_prefix: String,
    /// Where its /readyz is (a port taken by someone else is replaced).
    metrics: std::sync::Mutex<String>,
    grants: Vec<Uuid>,
    log: std::path::PathBuf,
}

impl Ctx {
    fn customer(&self, c: usize) -> String {
        format!("c-{c}")
    }

    /// The ledger-writer binary with this test's configuration.
    fn command(&self, commit_interval_ms: u32, metrics: &str) -> Command {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ledger-writer"));
        cmd.envs([
            ("KAFKA_BROKERS", brokers()),
            ("INPUT_TOPIC", self.input_topic.clone()),
            ("LEDGER_TOPIC", self.ledger_topic.clone()),
            ("DLQ_TOPIC", self.dlq_topic.clone()),
            ("DATABASE_URL", self.db_url.clone()),
            ("REDIS_URL", redis_url()),
            ("REDIS_PREFIX", self.redis_prefix.clone()),
            ("LEDGER_WRITER_GROUP_ID", self.group.clone()),
            ("LEDGER_WRITER_METRICS_LISTEN", metrics.to_owned()),
            ("KAFKA_COMMIT_INTERVAL_MS", commit_interval_ms.to_string()),
            // Small transactions: many commits, and a kill lands between some of them.
            ("LEDGER_WRITER_MAX_BATCH", "200".into()),
            ("RUST_LOG", "info,rdkafka=warn".into()),
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true);
        cmd
    }

    async fn start(&self, commit_interval_ms: u32) -> Child {
        start_service("ledger-writer", &self.metrics, &self.log, |addr| {
            self.command(commit_interval_ms, addr)
        })
        .await
    }

    async fn settled(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM usage_events")
            .fetch_one(&self.db)
            .await
            .unwrap()
    }

    /// Wait until at least `n` usage rows are settled.
    async fn wait_settled(&self, n: i64, limit: Duration) -> i64 {
        let started = Instant::now();
        loop {
            let have = self.settled().await;
            if have >= n {
                return have;
            }
            assert!(started.elapsed() < limit, "only {have} of {n} settled in {limit:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Facts of customer `c`, events `from..to`, chained from the grant as the rater decides them.
    fn facts(&self, c: usize, from: usize, to: usize) -> Vec<LedgerMsg> {
        let grant = self.grants[c];
        let mut end = Decimal::new(GRANT * 100, 2) - (0..from).map(|j| Decimal::new(cost(c, j), 2)).sum::<Decimal>();
        (from..to)
            .map(|j| {
                let cost = Decimal::new(cost(c, j), 2);
                end -= cost;
                let now = Utc::now();
                let mut dims = Dimensions::new();
                dims.insert("userId".into(), serde_json::json!(format!("u-{}", j % 3)));
                LedgerMsg::Usage(UsageFact {
                    event: UsageEvent {
                        tenant_id: self.tenant.clone(),
                        event_uid: Uuid::now_v7(),
                        customer_id: self.customer(c),
                        resource_id: String::new(),
                        event_name: "llm".into(),
                        idempotency_key: format!("k-{c}-{j}"),
                        timestamp: now,
                        dimensions: dims,
                        accepted_at: now,
                    },
                    outcome: Outcome::Settled {
                        credit_type: "ai".into(),
                        cost,
                        entries: vec![Entry {
                            grant_id: Some(grant),
                            amount: -cost,
                            end_balance: end,
                        }],
                    },
                })
            })
            .collect()
    }
}

async fn produce(ctx: &Ctx, producer: &FutureProducer, from: usize, to: usize, pause: Duration) {
    let mut j = from;
    while j < to {
        let end = (j + RUN).min(to);
        let mut acks = Vec::new();
        for c in 0..CUSTOMERS {
            let payload = serde_json::to_vec(&ctx.facts(c, j, end)).unwrap();
            let key = partition_key(&ctx.tenant, &ctx.customer(c));
            acks.push(
                producer
                    .send_result(FutureRecord::to(&ctx.ledger_topic).key(&key).payload(&payload))
                    .map_err(|(e, _)| e)
                    .unwrap(),
            );
        }
        for a in acks {
            a.await.unwrap().map_err(|(e, _)| e).unwrap();
        }
        j = end;
        tokio::time::sleep(pause).await;
    }
}

async fn setup() -> Ctx {
    let name = format!("lw_restart_{}", &Uuid::new_v4().simple().to_string()[..10]);
    let (db_url, db) = create_db(&name, 4).await;
    let topic = |t: &str| format!("it.{name}.{t}");
    let log = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.log"));
    let mut ctx = Ctx {
        tenant: format!("t-{name}"),
        db_name: name.clone(),
        db_url,
        db,
        ledger_topic: topic("ledger"),
        input_topic: topic("input"),
        dlq_topic: topic("dlq"),
        group: format!("it-{name}-ledger-writer"),
        redis_prefix: format!("it_{name}"),
        metrics: std::sync::Mutex::new(format!("127.0.0.1:{}", free_port())),
        grants: Vec::new(),
        log,
        name,
    };
    eprintln!("{}: ledger-writer log in {}", ctx.name, ctx.log.display());
    create_topics(&[&ctx.ledger_topic, &ctx.input_topic, &ctx.dlq_topic], PARTITIONS).await;
    // The tenant and its credit type (reconcile reads the places), and per customer a grant, its
    // pool and the grant's own ledger entry, as ledger-writer settles a grant fact.
    sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, 'it')")
        .bind(&ctx.tenant)
        .execute(&ctx.db)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO credit_types (tenant_id, id, name, unit_singular, unit_plural, decimals, limit_kind)
         VALUES ($1, 'ai', 'AI Tokens', 'token', 'tokens', 2, 'hard')",
    )
    .bind(&ctx.tenant)
    .execute(&ctx.db)
    .await
    .unwrap();
    let amount = Decimal::new(GRANT * 100, 2);
    for c in 0..CUSTOMERS {
        let grant = Uuid::new_v4();
        let customer = ctx.customer(c);
        sqlx::query(
            "INSERT INTO grants (tenant_id, id, customer_id, resource_id, credit_type, amount, remaining, status,
                category, priority, effective_at, display_name, source, created_at)
             VALUES ($1, $2, $3, '', 'ai', $4, $4, 'active', 'paid', 100, now(), 'it', 'manual', now())",
        )
        .bind(&ctx.tenant)
        .bind(grant)
        .bind(&customer)
        .bind(amount)
        .execute(&ctx.db)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO pools (tenant_id, customer_id, resource_id, credit_type, balance) VALUES ($1, $2, '', 'ai', $3)",
        )
        .bind(&ctx.tenant)
        .bind(&customer)
        .bind(amount)
        .execute(&ctx.db)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO ledger_entries (tenant_id, customer_id, resource_id, credit_type, ts, type, source, source_id,
                entry_idx, grant_id, amount, end_balance, actor)
             VALUES ($1, $2, '', 'ai', now(), 'grant', 'manual', $3::text, 0, $3, $4, $4, 'it')",
        )
        .bind(&ctx.tenant)
        .bind(&customer)
        .bind(grant)
        .bind(amount)
        .execute(&ctx.db)
        .await
        .unwrap();
        ctx.grants.push(grant);
    }
    ctx
}

async fn teardown(ctx: Ctx) {
    drop_db(ctx.db, &ctx.db_name).await;
    delete_topics_and_groups(&[&ctx.ledger_topic, &ctx.input_topic, &ctx.dlq_topic], &[&ctx.group]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_stopped_ledger_writer_settles_every_fact_once() {
    let ctx = setup().await;
    let result = AssertUnwindSafe(scenario(&ctx)).catch_unwind().await;
    teardown(ctx).await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

async fn scenario(ctx: &Ctx) {
    let total = (CUSTOMERS * PER_CUSTOMER) as i64;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .create()
        .unwrap();
    let started = Instant::now();
    // A third before the writer starts.
    let first = PER_CUSTOMER / 3;
    produce(ctx, &producer, 0, first, Duration::ZERO).await;

    // Run 1: no offset commit before the kill (the interval is an hour), so all it settled comes
    // again.
    let lw = ctx.start(3_600_000).await;
    let producing = produce(ctx, &producer, first, PER_CUSTOMER, Duration::from_millis(60));
    let run = async {
        let at_kill = ctx.wait_settled(total / 5, Duration::from_secs(300)).await;
        kill(lw).await;
        let after = ctx.settled().await;
        eprintln!("killed with {after} of {total} settled ({at_kill} seen before the kill)");
        assert!(after < total, "everything settled before the kill: nothing was tested");
        // Run 2: redelivered from offset 0, plus what is produced meanwhile; SIGTERM part way.
        let lw = ctx.start(500).await;
        ctx.wait_settled(total * 3 / 5, Duration::from_secs(300)).await;
        let status = stop(lw, "ledger-writer").await;
        assert!(status.success(), "ledger-writer exited {status} after SIGTERM");
        eprintln!("stopped gracefully with {} of {total} settled", ctx.settled().await);
    };
    tokio::join!(producing, run);
    // Run 3: the rest.
    let lw = ctx.start(500).await;
    ctx.wait_settled(total, Duration::from_secs(300)).await;
    // Anything more (a second row for a fact) would show up as more rows: give it a moment.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = stop(lw, "ledger-writer").await;
    assert!(status.success(), "ledger-writer exited {status} after SIGTERM");
    eprintln!("all {total} settled after {:?}", started.elapsed());

    check(ctx, total).await;
}

async fn check(ctx: &Ctx, total: i64) {
    let db = &ctx.db;
    // Every fact: one usage row, as settled, with its own uid... (the key is the primary key, so
    // a count per customer and the costs are what can go wrong).
    let rows: Vec<(String, String, String, Option<Decimal>)> =
        sqlx::query_as("SELECT customer_id, idempotency_key, status, cost FROM usage_events")
            .fetch_all(db)
            .await
            .unwrap();
    assert_eq!(rows.len() as i64, total, "usage rows");
    for (customer, key, status, cost_found) in &rows {
        let mut parts = key.strip_prefix("k-").unwrap().split('-');
        let c: usize = parts.next().unwrap().parse().unwrap();
        let j: usize = parts.next().unwrap().parse().unwrap();
        assert_eq!(customer, &ctx.customer(c));
        assert_eq!(status, "settled", "{key}");
        assert_eq!(*cost_found, Some(Decimal::new(cost(c, j), 2)), "{key}");
    }
    // Every consume entry exactly once: one per fact, none twice, nothing else charged.
    let (consumes, distinct, others, dups): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE type = 'consume'),
                count(DISTINCT source_id) FILTER (WHERE type = 'consume'),
                count(*) FILTER (WHERE type NOT IN ('consume', 'grant')),
                (SELECT count(*) FROM duplicate_events)
         FROM ledger_entries",
    )
    .fetch_one(db)
    .await
    .unwrap();
    assert_eq!(
        (consumes, distinct, others, dups),
        (total, total, 0, 0),
        "consume entries, distinct consumed keys, other entries, duplicate rows"
    );
    let mismatched: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ledger_entries l JOIN usage_events u
            ON u.tenant_id = l.tenant_id AND u.idempotency_key = l.source_id
         WHERE l.type = 'consume' AND (l.amount <> -u.cost OR l.entry_idx <> 0 OR l.customer_id <> u.customer_id)",
    )
    .fetch_one(db)
    .await
    .unwrap();
    assert_eq!(mismatched, 0, "consume entries that are not their event's charge");
    // Each pool's balance and each grant's remaining: the grant minus that customer's charges.
    for c in 0..CUSTOMERS {
        let expected =
            Decimal::new(GRANT * 100, 2) - (0..PER_CUSTOMER).map(|j| Decimal::new(cost(c, j), 2)).sum::<Decimal>();
        let (balance, overdraft): (Decimal, Decimal) =
            sqlx::query_as("SELECT balance, overdraft FROM pools WHERE tenant_id = $1 AND customer_id = $2")
                .bind(&ctx.tenant)
                .bind(ctx.customer(c))
                .fetch_one(db)
                .await
                .unwrap();
        let remaining: Decimal = sqlx::query_scalar("SELECT remaining FROM grants WHERE tenant_id = $1 AND id = $2")
            .bind(&ctx.tenant)
            .bind(ctx.grants[c])
            .fetch_one(db)
            .await
            .unwrap();
        assert_eq!(
            (balance, overdraft, remaining),
            (expected, Decimal::ZERO, expected),
            "customer {c}: pool balance, overdraft, grant remaining"
        );
    }
    // End balances chain per pool in ledger id order (each one the running sum so far).
    let breaks: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT end_balance, sum(amount) OVER (PARTITION BY tenant_id, customer_id, credit_type,
            resource_id ORDER BY id) AS run FROM ledger_entries) l WHERE run <> end_balance",
    )
    .fetch_one(db)
    .await
    .unwrap();
    assert_eq!(breaks, 0, "ledger entries whose end balance is not the running sum");
    // The binary's own check, strict (its Redis prefix holds nothing: the hot checks are skipped).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ledger-writer"))
        .args(["reconcile", "--strict", "--tenant", &ctx.tenant])
        .env("DATABASE_URL", &ctx.db_url)
        .env("REDIS_URL", redis_url())
        .env("REDIS_PREFIX", &ctx.redis_prefix)
        .env("KAFKA_BROKERS", brokers())
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty(),
        "reconcile --strict: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The group's committed offsets reach the end of every partition; more than one was used.
    let offs = offsets(&ctx.ledger_topic, &ctx.group, PARTITIONS);
    let used = offs.iter().filter(|(low, high, _)| high > low).count();
    assert!(used >= 2, "customers on one partition only: {offs:?}");
    for (p, (low, high, committed)) in offs.iter().enumerate() {
        if high > low {
            assert_eq!(
                *committed,
                Some(*high),
                "partition {p}: committed offset vs end: {offs:?}"
            );
        }
    }
}
