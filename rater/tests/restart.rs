//! The rater alone, stopped and started again mid-stream: its own database (tenant, credit type
//! and mapping inserted by SQL), Redis key prefix, topics and consumer group, the input produced
//! by the test (a grant per customer, then usage events) and the real binary as a child process.
//! The test reads the ledger topic itself; no ledger-writer runs.
//!
//! 1. A third of the events are on the input topic when the rater starts; the rest are produced
//!    while it runs. Its first run commits no offsets (a commit interval far beyond the test), so
//!    the SIGKILL once some events are decided leaves every one of them to be redelivered.
//! 2. Started again, it decides the redelivered events (answered from the pools' journals) and
//!    the new ones; a SIGTERM part of the way (graceful) and a third start decide the rest.
//!
//! Exactly once: every event has one decision (copies of a fact are redeliveries and must be
//! identical: same uid, same charge, same end balance), charged its price, the end balances of
//! each pool chain from its grant, and the hot pool in Redis holds the grant minus the charges;
//! nothing denied or dead-lettered; the group's committed offsets at the end of the input.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::FutureExt as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message as _, Offset, TopicPartitionList};
use rust_decimal::Decimal;
use shared::model::{
    partition_key, Category, Dimensions, GrantCmd, GrantFact, GrantSpec, InputMsg, LedgerMsg, Outcome, UsageEvent,
    UsageFact,
};
use shared::testkit::{
    brokers, create_db, create_topics, delete_redis_prefix, delete_topics_and_groups, drop_db, free_port, kill,
    offsets, redis_url, start_service, stop,
};
use sqlx::PgPool;
use tokio::process::{Child, Command};
use uuid::Uuid;

const PARTITIONS: i32 = 4;
const CUSTOMERS: usize = 8;
const PER_CUSTOMER: usize = 450;
/// Events per input message round (one message each).
const ROUND: usize = 5;
/// What each customer's grant holds (credit type "ai", 2 places).
const GRANT: i64 = 10_000;

/// Tokens of customer `c`'s `j`th event; at 0.01 credits per token it costs this many hundredths.
fn tokens(c: usize, j: usize) -> i64 {
    ((j * 37 + c * 11) % 500 + 1) as i64
}

fn key(c: usize, j: usize) -> String {
    format!("k-{c}-{j}")
}

/// What the test has read from the ledger topic.
#[derive(Default)]
struct Seen {
    /// Every copy of each usage fact, by idempotency key.
    usage: HashMap<String, Vec<UsageFact>>,
    /// Every copy of each grant fact, by grant id.
    grants: HashMap<Uuid, Vec<GrantFact>>,
    /// Each customer's facts, first copies only, in ledger order.
    order: HashMap<String, Vec<LedgerMsg>>,
    /// Facts of any other kind.
    other: Vec<LedgerMsg>,
    /// Next offset to read, per partition.
    next: HashMap<i32, i64>,
}

impl Seen {
    fn add(&mut self, f: LedgerMsg) {
        let (customer, first) = match &f {
            LedgerMsg::Usage(u) => {
                let copies = self.usage.entry(u.event.idempotency_key.clone()).or_default();
                copies.push(u.clone());
                (u.event.customer_id.clone(), copies.len() == 1)
            }
            LedgerMsg::Grant(g) => {
                let copies = self.grants.entry(g.grant.id).or_default();
                copies.push(g.clone());
                (g.grant.customer_id.clone(), copies.len() == 1)
            }
            _ => (String::new(), false),
        };
        if customer.is_empty() {
            self.other.push(f);
        } else if first {
            self.order.entry(customer).or_default().push(f);
        }
    }
}

struct Ctx {
    name: String,
    tenant: String,
    db_name: String,
    db_url: String,
    db: PgPool,
    input_topic: String,
    ledger_topic: String,
    dlq_topic: String,
    group: String,
    ledger_group: String,
    redis_prefix: String,
    /// Where its /readyz is (a port taken by someone else is replaced).
    metrics: Mutex<String>,
    grants: Vec<Uuid>,
    log: std::path::PathBuf,
    seen: Arc<Mutex<Seen>>,
}

impl Ctx {
    fn customer(&self, c: usize) -> String {
        format!("c-{c}")
    }

    /// The rater binary with this test's configuration.
    fn command(&self, commit_interval_ms: u32, metrics: &str) -> Command {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rater"));
        cmd.envs([
            ("KAFKA_BROKERS", brokers()),
            ("INPUT_TOPIC", self.input_topic.clone()),
            ("LEDGER_TOPIC", self.ledger_topic.clone()),
            ("DLQ_TOPIC", self.dlq_topic.clone()),
            ("DATABASE_URL", self.db_url.clone()),
            ("REDIS_URL", redis_url()),
            ("REDIS_PREFIX", self.redis_prefix.clone()),
            ("RATER_GROUP_ID", self.group.clone()),
            ("LEDGER_WRITER_GROUP_ID", self.ledger_group.clone()),
            ("RATER_METRICS_LISTEN", metrics.to_owned()),
            ("KAFKA_COMMIT_INTERVAL_MS", commit_interval_ms.to_string()),
            // Small batches: many of them, and a kill lands between some.
            ("RATER_MAX_BATCH", "200".into()),
            ("RUST_LOG", "info,rdkafka=warn".into()),
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true);
        cmd
    }

    async fn start(&self, commit_interval_ms: u32) -> Child {
        start_service("rater", &self.metrics, &self.log, |addr| {
            self.command(commit_interval_ms, addr)
        })
        .await
    }

    /// Events with at least one fact on the ledger topic.
    fn decided(&self) -> usize {
        self.seen.lock().unwrap().usage.len()
    }

    async fn wait_decided(&self, n: usize, limit: Duration) -> usize {
        let started = Instant::now();
        loop {
            let have = self.decided();
            if have >= n {
                return have;
            }
            assert!(
                started.elapsed() < limit,
                "only {have} of {n} events decided in {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn grant_cmd(&self, c: usize) -> InputMsg {
        let now = Utc::now();
        InputMsg::Grant(GrantCmd {
            tenant_id: self.tenant.clone(),
            grant: GrantSpec {
                id: self.grants[c],
                customer_id: self.customer(c),
                resource_id: String::new(),
                credit_type: "ai".into(),
                decimals: 2,
                amount: Decimal::new(GRANT * 100, 2),
                category: Category::Paid,
                priority: 100,
                cost: None,
                effective_at: now,
                expires_at: None,
                display_name: "it".into(),
                description: None,
                metadata: None,
                source: "manual".into(),
                created_at: now,
            },
            actor: "it".into(),
        })
    }

    fn usage(&self, c: usize, j: usize) -> InputMsg {
        let now = Utc::now();
        let mut dims = Dimensions::new();
        dims.insert("tokens".into(), serde_json::json!(tokens(c, j)));
        dims.insert("userId".into(), serde_json::json!(format!("u-{}", j % 3)));
        InputMsg::Usage(UsageEvent {
            tenant_id: self.tenant.clone(),
            event_uid: Uuid::now_v7(),
            customer_id: self.customer(c),
            resource_id: String::new(),
            event_name: "llm".into(),
            idempotency_key: key(c, j),
            timestamp: now,
            dimensions: dims,
            accepted_at: now,
        })
    }
}

async fn send(ctx: &Ctx, producer: &FutureProducer, msgs: Vec<InputMsg>) {
    let mut acks = Vec::new();
    for m in msgs {
        let (t, c) = m.tenant_customer();
        let key = partition_key(t, c);
        let payload = serde_json::to_vec(&m).unwrap();
        acks.push(
            producer
                .send_result(FutureRecord::to(&ctx.input_topic).key(&key).payload(&payload))
                .map_err(|(e, _)| e)
                .unwrap(),
        );
    }
    for a in acks {
        a.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
}

/// Customers' events `from..to`, a round of `ROUND` per customer at a time, `pause` between.
async fn produce(ctx: &Ctx, producer: &FutureProducer, from: usize, to: usize, pause: Duration) {
    let mut j = from;
    while j < to {
        let end = (j + ROUND).min(to);
        let msgs = (j..end)
            .flat_map(|j| (0..CUSTOMERS).map(move |c| (c, j)))
            .map(|(c, j)| ctx.usage(c, j))
            .collect();
        send(ctx, producer, msgs).await;
        j = end;
        tokio::time::sleep(pause).await;
    }
}

/// Read the ledger topic from the start into `seen` until `stop`.
fn spawn_reader(ctx: &Ctx, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", format!("{}-reader", ctx.group))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(&ctx.ledger_topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let seen = ctx.seen.clone();
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let m = match tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await {
                Err(_) => continue,
                Ok(m) => m.expect("ledger topic read"),
            };
            let facts = LedgerMsg::decode_many(m.payload().unwrap_or_default()).expect("a ledger message");
            let mut s = seen.lock().unwrap();
            for f in facts {
                s.add(f);
            }
            s.next.insert(m.partition(), m.offset() + 1);
        }
        drop(tokio::task::spawn_blocking(move || drop(consumer)));
    })
}

async fn setup() -> Ctx {
    let name = format!("rater_restart_{}", &Uuid::new_v4().simple().to_string()[..10]);
    let (db_url, db) = create_db(&name, 2).await;
    let topic = |t: &str| format!("it.{name}.{t}");
    let log = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.log"));
    let ctx = Ctx {
        tenant: format!("t-{name}"),
        db_name: name.clone(),
        db_url,
        db,
        input_topic: topic("input"),
        ledger_topic: topic("ledger"),
        dlq_topic: topic("dlq"),
        group: format!("it-{name}-rater"),
        ledger_group: format!("it-{name}-ledger-writer"),
        redis_prefix: format!("it_{name}"),
        metrics: Mutex::new(format!("127.0.0.1:{}", free_port())),
        grants: (0..CUSTOMERS).map(|_| Uuid::new_v4()).collect(),
        log,
        seen: Arc::default(),
        name,
    };
    eprintln!("{}: rater log in {}", ctx.name, ctx.log.display());
    create_topics(&[&ctx.input_topic, &ctx.ledger_topic, &ctx.dlq_topic], PARTITIONS).await;
    // The catalogue the rater prices with: a hard-limited credit type with 2 places and the
    // feature "llm" at 0.01 per token.
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
    sqlx::query(
        "INSERT INTO feature_mappings (tenant_id, event_name, effective_at, credit_type, credits_per_unit,
            quantity_dimension)
         VALUES ($1, 'llm', '2000-01-01T00:00:00Z', 'ai', 0.01, 'tokens')",
    )
    .bind(&ctx.tenant)
    .execute(&ctx.db)
    .await
    .unwrap();
    ctx
}

async fn teardown(ctx: Ctx) {
    drop_db(ctx.db, &ctx.db_name).await;
    delete_redis_prefix(&ctx.redis_prefix).await;
    let reader = format!("{}-reader", ctx.group);
    delete_topics_and_groups(
        &[&ctx.input_topic, &ctx.ledger_topic, &ctx.dlq_topic],
        &[&ctx.group, &reader],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_stopped_rater_decides_every_event_once() {
    let ctx = setup().await;
    let stop_reader = Arc::new(AtomicBool::new(false));
    let reader = spawn_reader(&ctx, stop_reader.clone());
    let result = AssertUnwindSafe(scenario(&ctx)).catch_unwind().await;
    stop_reader.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(10), reader).await;
    teardown(ctx).await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

async fn scenario(ctx: &Ctx) {
    let total = CUSTOMERS * PER_CUSTOMER;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .create()
        .unwrap();
    let started = Instant::now();
    // The grants, then a third of the events before the rater starts.
    send(ctx, &producer, (0..CUSTOMERS).map(|c| ctx.grant_cmd(c)).collect()).await;
    let first = PER_CUSTOMER / 3;
    produce(ctx, &producer, 0, first, Duration::ZERO).await;

    // Run 1: no offset commit before the kill (the interval is an hour), so everything it decided
    // is delivered again.
    let rater = ctx.start(3_600_000).await;
    let producing = produce(ctx, &producer, first, PER_CUSTOMER, Duration::from_millis(60));
    let run = async {
        ctx.wait_decided(total / 5, Duration::from_secs(300)).await;
        kill(rater).await;
        // What run 1 produced may still be on its way to the reader: let it arrive.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let at_kill = ctx.decided();
        eprintln!("killed with {at_kill} of {total} events decided");
        assert!(
            at_kill < total,
            "everything decided before the kill: nothing was tested"
        );
        // Run 2: redelivered from offset 0, plus what is produced meanwhile; SIGTERM part way.
        let rater = ctx.start(500).await;
        ctx.wait_decided(total * 3 / 5, Duration::from_secs(300)).await;
        let status = stop(rater, "rater").await;
        assert!(status.success(), "rater exited {status} after SIGTERM");
        eprintln!("stopped gracefully with {} of {total} decided", ctx.decided());
        at_kill
    };
    let ((), at_kill) = tokio::join!(producing, run);
    // Run 3: the rest.
    let rater = ctx.start(500).await;
    ctx.wait_decided(total, Duration::from_secs(300)).await;
    // Anything more (a second decision for an event) would come now: give it a moment.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = stop(rater, "rater").await;
    assert!(status.success(), "rater exited {status} after SIGTERM");
    // Read the ledger topic to its end.
    let ends = offsets(&ctx.ledger_topic, &ctx.group, PARTITIONS);
    let read_from = Instant::now();
    loop {
        let caught_up = {
            let s = ctx.seen.lock().unwrap();
            ends.iter()
                .enumerate()
                .all(|(p, (_, high, _))| s.next.get(&(p as i32)).copied().unwrap_or(0) >= *high)
        };
        if caught_up {
            break;
        }
        assert!(
            read_from.elapsed() < Duration::from_secs(60),
            "ledger topic not read to its end"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("all {total} decided after {:?}", started.elapsed());

    check(ctx, total, at_kill).await;
}

async fn check(ctx: &Ctx, total: usize, at_kill: usize) {
    check_facts(ctx, total, at_kill);
    check_redis_and_offsets(ctx).await;
}

/// What the ledger topic holds.
fn check_facts(ctx: &Ctx, total: usize, at_kill: usize) {
    let s = ctx.seen.lock().unwrap();
    assert!(
        s.other.is_empty(),
        "unexpected facts: {:?}",
        &s.other[..s.other.len().min(3)]
    );
    // Every event has facts; its copies are one decision (redeliveries), charged its price.
    assert_eq!(s.usage.len(), total, "events with a fact");
    let mut copies = 0;
    for c in 0..CUSTOMERS {
        for j in 0..PER_CUSTOMER {
            let k = key(c, j);
            let facts = s.usage.get(&k).unwrap_or_else(|| panic!("no fact for {k}"));
            let one = &facts[0];
            for f in &facts[1..] {
                assert_eq!(f, one, "two different decisions for {k}");
            }
            copies += facts.len() - 1;
            let cost = Decimal::new(tokens(c, j), 2);
            match &one.outcome {
                Outcome::Settled {
                    credit_type,
                    cost: charged,
                    entries,
                } => {
                    assert_eq!((credit_type.as_str(), *charged), ("ai", cost), "{k}");
                    assert_eq!(entries.len(), 1, "{k}: {entries:?}");
                    assert_eq!(entries[0].grant_id, Some(ctx.grants[c]), "{k}");
                    assert_eq!(entries[0].amount, -cost, "{k}");
                }
                other => panic!("{k} not settled: {other:?}"),
            }
        }
    }
    eprintln!("{copies} redelivered copies of usage facts");
    assert!(
        copies >= at_kill,
        "{copies} copies, but the {at_kill} events decided before the kill were all due again"
    );
    // One grant decision per customer.
    assert_eq!(s.grants.len(), CUSTOMERS);
    let amount = Decimal::new(GRANT * 100, 2);
    for (id, facts) in &s.grants {
        for f in &facts[1..] {
            assert_eq!(f, &facts[0], "two different decisions for grant {id}");
        }
        assert_eq!(facts[0].remaining, amount);
    }
    // Per pool, in ledger order: the grant, then each event's end balance one charge lower.
    for c in 0..CUSTOMERS {
        let facts = &s.order[&ctx.customer(c)];
        let LedgerMsg::Grant(g) = &facts[0] else {
            panic!("customer {c}: the first fact is not the grant: {:?}", facts[0]);
        };
        assert_eq!(g.entries.len(), 1);
        let mut balance = g.entries[0].end_balance;
        assert_eq!(balance, amount);
        for f in &facts[1..] {
            let LedgerMsg::Usage(u) = f else {
                panic!("customer {c}: a second grant fact {f:?}");
            };
            let Outcome::Settled { cost, entries, .. } = &u.outcome else {
                unreachable!("checked above");
            };
            balance -= cost;
            assert_eq!(
                entries[0].end_balance, balance,
                "customer {c}: end balance chain breaks at {}",
                u.event.idempotency_key
            );
        }
        assert_eq!(facts.len(), PER_CUSTOMER + 1, "customer {c}: facts");
    }
}

async fn check_redis_and_offsets(ctx: &Ctx) {
    // The hot pools hold the grant minus the charges (read as ingest reads a balance).
    let mut con = shared::testkit::redis_conn().await;
    let keys = shared::keys::Keys::new(ctx.redis_prefix.clone());
    for c in 0..CUSTOMERS {
        let h: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(keys.pool(&ctx.tenant, &ctx.customer(c), "ai", ""))
            .query_async(&mut con)
            .await
            .unwrap();
        let fixed = |f: &str| h.get(f).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
        let grants: Vec<&str> = h.keys().filter_map(|f| f.strip_prefix("o:")).collect();
        assert_eq!(
            grants,
            vec![ctx.grants[c].to_string().as_str()],
            "customer {c}: grants in Redis"
        );
        let hot = grants.iter().map(|g| fixed(&format!("r:{g}"))).sum::<i64>() - fixed("od");
        let expected = GRANT * 100 - (0..PER_CUSTOMER).map(|j| tokens(c, j)).sum::<i64>();
        assert_eq!(hot, expected, "customer {c}: hot balance (hundredths)");
    }
    // Nothing dead-lettered; the group's committed offsets at the end of the input.
    let dlq = offsets(&ctx.dlq_topic, &ctx.group, PARTITIONS);
    assert!(dlq.iter().all(|(low, high, _)| high == low), "dead letters: {dlq:?}");
    let input = offsets(&ctx.input_topic, &ctx.group, PARTITIONS);
    let used = input.iter().filter(|(low, high, _)| high > low).count();
    assert!(used >= 2, "customers on one partition only: {input:?}");
    for (p, (low, high, committed)) in input.iter().enumerate() {
        if high > low {
            assert_eq!(
                *committed,
                Some(*high),
                "partition {p}: committed offset vs end: {input:?}"
            );
        }
    }
}
