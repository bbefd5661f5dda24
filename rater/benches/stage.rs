//! The rater's Redis stage alone, on a real Redis: N usage events spread over M pools (Zipf
//! skew, a share of repeated idempotency keys), applied batch by batch through
//! `PoolStore::apply`: one apply.lua call per pool per batch, all pipelined in one round trip,
//! replies parsed into typed results. No Kafka, no pricing: what is timed is the Redis round
//! and the reply parsing, i.e. the rater's `lua` step.
//!
//! `cargo bench -p rater --bench stage -- --events 200000 --pools 1000,1 --batch 5000`
//! prints one JSON line per scenario on stdout (a summary on stderr). Pools are created through
//! the real path (missing pool -> rebuilt from an empty scratch database `bench_rater_<pid>`,
//! created and dropped here), then funded by grant operations; the Redis keys live under a
//! prefix of their own and are deleted at the end. The results are checked (every unique key
//! charged its cost once, every repeat a duplicate): a wrong result exits non-zero.
#![allow(clippy::float_arithmetic)] // rates and shares only; money is fixed-point i64 here

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chrono::Utc;
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rater::pools::{Op, OpResult, PoolOp, PoolOps, PoolStore};
use shared::hot_pool::OrderKey;
use shared::keys::Keys;
use shared::model::{Category, PoolId};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Parser, Debug, Clone)]
#[command(about = "rater stage bench: apply.lua through PoolStore on a real Redis")]
struct Args {
    /// Usage events applied in the timed part (duplicates included).
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Pools (one customer each) the events go to; a list runs one scenario per value
    /// (1 = one hot customer).
    #[arg(long, value_delimiter = ',', default_value = "1000,1")]
    pools: Vec<usize>,
    /// Events per rater batch (RATER_MAX_BATCH).
    #[arg(long, default_value_t = 5000)]
    batch: usize,
    /// Zipf exponent of the pool popularity (0 = uniform); the load generator uses 1.1.
    #[arg(long, default_value_t = 1.1)]
    skew: f64,
    /// Share of events that repeat a recent idempotency key.
    #[arg(long, default_value_t = 0.05)]
    duplicates: f64,
    /// Grants per pool (every apply.lua call loads and sorts them).
    #[arg(long, default_value_t = 2)]
    grants: usize,
    /// Input partitions the pools are spread over (offsets and journal trimming per partition).
    #[arg(long, default_value_t = 16)]
    partitions: i32,
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Postgres server (without a database) for the scratch database.
    #[arg(
        long,
        env = "DATABASE_URL_BASE",
        default_value = "postgres://postgres@127.0.0.1:5432"
    )]
    database_url_base: String,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
    /// A name filter `cargo bench` may pass; ignored.
    #[arg(hide = true)]
    filter: Option<String>,
}

/// One generated usage event.
#[derive(Clone)]
struct Ev {
    pool: usize,
    key: String,
    cost: i64,
}

/// Cumulative Zipf weights over `n` ranks (uniform when `s == 0`).
fn sampler(n: usize, s: f64) -> Vec<f64> {
    let mut acc = 0.0;
    (1..=n)
        .map(|k| {
            acc += 1.0 / (k as f64).powf(s);
            acc
        })
        .collect()
}

fn pick(cum: &[f64], rng: &mut StdRng) -> usize {
    let u = rng.gen::<f64>() * cum[cum.len() - 1];
    cum.partition_point(|&c| c < u).min(cum.len() - 1)
}

fn events(args: &Args, pools: usize, rng: &mut StdRng) -> Vec<Ev> {
    let cum = sampler(pools, args.skew);
    let mut out: Vec<Ev> = Vec::with_capacity(args.events);
    for _ in 0..args.events {
        if !out.is_empty() && rng.gen::<f64>() < args.duplicates {
            // A repeat of one of the last 2048 events: same pool, key and cost.
            let back = rng.gen_range(1..=out.len().min(2048));
            out.push(out[out.len() - back].clone());
        } else {
            out.push(Ev {
                pool: pick(&cum, rng),
                key: Uuid::new_v4().to_string(),
                cost: rng.gen_range(1..=500),
            });
        }
    }
    out
}

fn pool_id(i: usize) -> PoolId {
    PoolId {
        tenant_id: "t_bench".into(),
        customer_id: format!("c-{i}"),
        resource_id: String::new(),
        credit_type: "ai-tokens".into(),
    }
}

/// Input offsets per partition, as the consumer would see them.
struct Offsets {
    next: Vec<i64>,
    partitions: i32,
}

impl Offsets {
    fn partition(&self, pool: usize) -> i32 {
        (pool % self.partitions as usize) as i32
    }
    fn take(&mut self, pool: usize) -> i64 {
        let p = self.partition(pool) as usize;
        self.next[p] += 1;
        self.next[p] - 1
    }
    fn snapshot(&self) -> HashMap<i32, i64> {
        (0..self.partitions).map(|p| (p, self.next[p as usize])).collect()
    }
}

/// Group one batch's operations by pool, in arrival order, as the rater's step does.
fn group(ops: impl Iterator<Item = (usize, Op)>, offsets: &Offsets) -> Vec<PoolOps> {
    let mut index: HashMap<usize, usize> = HashMap::new();
    let mut out: Vec<PoolOps> = Vec::new();
    for (pool, op) in ops {
        let k = *index.entry(pool).or_insert_with(|| {
            out.push(PoolOps {
                pool: pool_id(pool),
                partition: offsets.partition(pool),
                decimals: 2,
                hard: true,
                ops: Vec::new(),
            });
            out.len() - 1
        });
        out[k].ops.push(op);
    }
    out
}

async fn never_settles() -> Result<(), String> {
    Err("a bench never waits for settlement (the sentinel is set)".into())
}

async fn scratch_db(base: &str, name: &str) -> Result<PgPool> {
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!("{base}/postgres"))
        .await
        .context("postgres")?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&admin)
        .await?;
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await?;
    admin.close().await;
    let db = PgPoolOptions::new()
        .max_connections(4)
        .connect(&format!("{base}/{name}"))
        .await?;
    shared::db::MIGRATOR.run(&db).await?;
    Ok(db)
}

async fn drop_db(base: &str, name: &str) -> Result<()> {
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!("{base}/postgres"))
        .await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&admin)
        .await?;
    Ok(())
}

/// Delete every key under `prefix:`.
async fn delete_prefix(con: &mut redis::aio::ConnectionManager, prefix: &str) -> Result<u64> {
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(con)
            .await?;
        if !keys.is_empty() {
            let n: u64 = redis::cmd("UNLINK").arg(&keys).query_async(con).await?;
            deleted += n;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

/// (calls, usec) of EVALSHA so far, from INFO commandstats (server-wide).
async fn evalsha_stats(con: &mut redis::aio::ConnectionManager) -> Result<(u64, u64)> {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(con).await?;
    let line = info.lines().find(|l| l.starts_with("cmdstat_evalsha:")).unwrap_or("");
    let field = |name: &str| {
        line.split([':', ','])
            .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.parse().ok()))
            .unwrap_or(0)
    };
    Ok((field("calls="), field("usec=")))
}

fn quantile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

async fn scenario(args: &Args, pools: usize, db: &PgPool, redis: &redis::aio::ConnectionManager) -> Result<()> {
    let prefix = format!("bench-rater-{}-{pools}", std::process::id());
    let store = PoolStore {
        redis: shared::redis_conn::RedisConn::Single(redis.clone()),
        keys: Keys::new(prefix.clone()),
        db: db.clone(),
        dedupe_window_s: 3600,
        wait_replicas: 0,
    };
    store.load_scripts().await?;
    // Present sentinel: a missing pool is new, rebuilt from (empty) Postgres without waiting.
    store.set_sentinel().await?;
    let mut offsets = Offsets {
        next: vec![0; args.partitions as usize],
        partitions: args.partitions,
    };
    let now = Utc::now();
    let ts_ms = now.timestamp_millis();

    // Setup: every pool created and funded with `grants` grants (priorities and expiries vary).
    let mut granted = 0usize;
    for chunk in (0..pools).collect::<Vec<_>>().chunks(1000) {
        let mut ops = Vec::new();
        for &p in chunk {
            for g in 0..args.grants {
                let id = Uuid::new_v4();
                let expires = (g % 2 == 1).then(|| now + chrono::Duration::days(30 + g as i64));
                let cat = if g % 3 == 0 { Category::Paid } else { Category::Promo };
                ops.push((
                    p,
                    Op {
                        msg: ops.len(),
                        offset: offsets.take(p),
                        op: PoolOp::Grant {
                            grant_id: id,
                            amount: 1_000_000_000_000,
                            order: OrderKey::new(100 + (g % 3) as u32, expires, cat, now, now, id),
                        },
                        ts_ms,
                        id: rater::pools::ident(&id),
                    },
                ));
            }
        }
        let batch = group(ops.into_iter(), &offsets);
        let results = store.apply(&batch, &offsets.snapshot(), never_settles).await?;
        for r in results.iter().flatten() {
            match r.1 {
                OpResult::Granted { .. } => granted += 1,
                ref other => bail!("grant not applied: {other:?}"),
            }
        }
    }
    anyhow::ensure!(
        granted == pools * args.grants,
        "granted {granted} of {}",
        pools * args.grants
    );

    // Timed: the usage events, batch by batch.
    let mut rng = StdRng::seed_from_u64(7);
    let evs = events(args, pools, &mut rng);
    let mut seen = HashSet::new();
    let (mut want_charge, mut want_unique) = (0i64, 0usize);
    for e in &evs {
        if seen.insert(e.key.as_str()) {
            want_charge += e.cost;
            want_unique += 1;
        }
    }
    let mut batches = Vec::new();
    for chunk in evs.chunks(args.batch) {
        // Committed = where this batch starts: the journal keeps only what is in flight.
        let committed = offsets.snapshot();
        let ops = chunk.iter().enumerate().map(|(i, e)| {
            (
                e.pool,
                Op {
                    msg: i,
                    offset: offsets.take(e.pool),
                    op: PoolOp::Usage {
                        idempotency_key: e.key.clone(),
                        cost: e.cost,
                    },
                    ts_ms,
                    id: rater::pools::ident(&Uuid::new_v4()),
                },
            )
        });
        let ops: Vec<_> = ops.collect();
        batches.push((committed, group(ops.into_iter(), &offsets)));
    }
    let lua_calls: usize = batches.iter().map(|(_, b)| b.len()).sum();

    let mut con = redis.clone();
    let before = evalsha_stats(&mut con).await?;
    let mut rounds = Vec::with_capacity(batches.len());
    let (mut charged, mut charge, mut duplicate, mut other) = (0usize, 0i64, 0usize, 0usize);
    let started = Instant::now();
    for (committed, batch) in &batches {
        let t = Instant::now();
        let results = store.apply(batch, committed, never_settles).await?;
        rounds.push(t.elapsed());
        for (_, r) in results.into_iter().flatten() {
            match r {
                OpResult::Charged { parts, .. } => {
                    charged += 1;
                    charge -= parts.iter().map(|p| p.delta).sum::<i64>();
                }
                OpResult::Duplicate => duplicate += 1,
                _ => other += 1,
            }
        }
    }
    let elapsed = started.elapsed();
    let after = evalsha_stats(&mut con).await?;
    let deleted = delete_prefix(&mut con, &prefix).await?;

    rounds.sort();
    let secs = elapsed.as_secs_f64();
    let eps = evs.len() as f64 / secs;
    let lua_s = (after.1.saturating_sub(before.1)) as f64 / 1e6;
    let ok = charged == want_unique && duplicate == evs.len() - want_unique && charge == want_charge && other == 0;
    let report = serde_json::json!({
        "bench": "rater_stage",
        "pools": pools,
        "events": evs.len(),
        "batch": args.batch,
        "skew": args.skew,
        "duplicates_ratio": args.duplicates,
        "grants_per_pool": args.grants,
        "batches": batches.len(),
        "lua_calls": lua_calls,
        "ops_per_lua_call": evs.len() as f64 / lua_calls as f64,
        "seconds": secs,
        "events_per_second": eps,
        "round_p50_ms": quantile(&rounds, 0.5),
        "round_p99_ms": quantile(&rounds, 0.99),
        "round_max_ms": quantile(&rounds, 1.0),
        "redis_evalsha_calls": after.0.saturating_sub(before.0),
        "redis_evalsha_s": lua_s,
        "redis_share": lua_s / secs,
        "charged": charged,
        "duplicates": duplicate,
        "ok": ok,
    });
    println!("{report}");
    eprintln!(
        "rater stage: {pools} pools, {} events in {secs:.2}s = {eps:.0} events/s; {lua_calls} Lua calls \
         ({:.1} ops each); round p50 {:.1} ms max {:.1} ms; Redis in EVALSHA {lua_s:.2}s ({:.0}%); \
         {deleted} keys deleted",
        evs.len(),
        evs.len() as f64 / lua_calls as f64,
        quantile(&rounds, 0.5),
        quantile(&rounds, 1.0),
        100.0 * lua_s / secs,
    );
    if !ok {
        bail!(
            "wrong results: charged {charged} (want {want_unique}), duplicates {duplicate} (want {}), \
             charge {charge} (want {want_charge}), other {other}",
            evs.len() - want_unique
        );
    }
    Ok(())
}

async fn run(args: &Args, db_name: &str) -> Result<()> {
    let db = scratch_db(&args.database_url_base, db_name).await?;
    let redis = redis::aio::ConnectionManager::new(redis::Client::open(args.redis_url.as_str())?)
        .await
        .context("redis")?;
    for &pools in &args.pools {
        scenario(args, pools, &db, &redis).await?;
    }
    db.close().await;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.events > 0 && args.batch > 0 && args.partitions > 0 && args.grants > 0,
        "--events, --batch, --grants and --partitions must be positive"
    );
    anyhow::ensure!(args.pools.iter().all(|&p| p > 0), "--pools must be positive");
    let db_name = format!("bench_rater_{}", std::process::id());
    let result = run(&args, &db_name).await;
    drop_db(&args.database_url_base, &db_name).await?;
    result
}
