//! The Redis memory one retained idempotency key costs, measured on a real Redis through the
//! real apply.lua (target: at most 64 bytes), and dedupe across batches and timestamps: a repeat
//! is found whatever timestamp it carries.

use std::collections::HashMap;

use rater::pools::{Op, OpResult, PoolOp, PoolOps, PoolStore};
use shared::hot_pool::OrderKey;
use shared::keys::Keys;
use shared::model::{Category, PoolId};
use uuid::Uuid;

const EVENTS: usize = 60_000;
const BATCH: usize = 5_000;

async fn redis_i64(con: &mut shared::redis_conn::RedisConn, cmd: &mut redis::Cmd) -> i64 {
    cmd.query_async(con).await.unwrap()
}

#[tokio::test]
async fn a_retained_key_costs_at_most_64_bytes_and_dedupes_across_batches_and_timestamps() {
    let prefix = format!("dmem_{}", Uuid::new_v4().simple());
    let redis = shared::testkit::redis_conn().await;
    let store = PoolStore {
        redis: redis.clone(),
        keys: Keys::new(prefix.clone()),
        db: sqlx::PgPool::connect_lazy("postgres://unused@127.0.0.1/unused").unwrap(),
        dedupe_window_s: 86_400,
        wait_replicas: 0,
    };
    store.load_scripts().await.unwrap();
    store.set_sentinel().await.unwrap();
    let pool = PoolId {
        tenant_id: "t".into(),
        customer_id: "c-1".into(),
        resource_id: String::new(),
        credit_type: "ai".into(),
    };
    let mut con = redis.clone();
    let pool_key = store.keys.pool("t", "c-1", "ai", "");
    let _: () = redis::cmd("HSET")
        .arg(&pool_key)
        .arg("off")
        .arg(-1)
        .arg("od")
        .arg(0)
        .query_async(&mut con)
        .await
        .unwrap();

    // Timestamps spread over three hours ending now, so the marks land in several buckets.
    let now = chrono::Utc::now();
    let t0 = now.timestamp_millis() - 3 * 3_600_000;
    let gid = Uuid::new_v4();
    let mut ops = vec![Op {
        msg: 0,
        offset: 0,
        op: PoolOp::Grant {
            grant_id: gid,
            amount: EVENTS as i64 * 10,
            order: OrderKey::new(100, None, Category::Paid, now - chrono::Duration::days(1), now, gid),
        },
        ts_ms: t0,
        id: "g".into(),
    }];
    for i in 0..EVENTS {
        ops.push(Op {
            msg: i + 1,
            offset: i as i64 + 1,
            op: PoolOp::Usage {
                // Realistic keys: a UUID each (36 characters).
                idempotency_key: Uuid::from_u128(i as u128 + 1).to_string(),
                cost: 1,
            },
            ts_ms: t0 + (i as i64 * 3 * 3_600_000 / EVENTS as i64),
            id: format!("e{i}"),
        });
    }
    let mut offset = EVENTS as i64 + 1;
    for chunk in ops.chunks(BATCH) {
        let b = PoolOps {
            pool: pool.clone(),
            partition: 0,
            decimals: 0,
            hard: true,
            ops: chunk.to_vec(),
        };
        let got = store.apply(&[b], &HashMap::new(), || async { Ok(()) }).await.unwrap();
        assert!(got[0].iter().all(|(_, r)| !matches!(r, OpResult::Duplicate)));
    }

    // Repeats of keys from every hour, in a later batch, half of them with a timestamp in
    // another hour than the first copy's: all duplicates, none charged.
    let repeats: Vec<Op> = (0..EVENTS)
        .step_by(997)
        .map(|i| {
            offset += 1;
            Op {
                msg: 0,
                offset,
                op: PoolOp::Usage {
                    idempotency_key: Uuid::from_u128(i as u128 + 1).to_string(),
                    cost: 1,
                },
                ts_ms: t0 + (i as i64 * 3 * 3_600_000 / EVENTS as i64) + (offset % 2) * 2 * 3_600_000,
                id: format!("r{offset}"),
            }
        })
        .collect();
    let n_repeats = repeats.len();
    let b = PoolOps {
        pool: pool.clone(),
        partition: 0,
        decimals: 0,
        hard: true,
        ops: repeats,
    };
    let got = store.apply(&[b], &HashMap::new(), || async { Ok(()) }).await.unwrap();
    assert_eq!(got[0].len(), n_repeats);
    assert!(
        got[0].iter().all(|(_, r)| *r == OpResult::Duplicate),
        "{:?}",
        &got[0][..3]
    );
    let rem: i64 = redis_i64(&mut con, redis::cmd("HGET").arg(&pool_key).arg(format!("r:{gid}"))).await;
    assert_eq!(rem, EVENTS as i64 * 9, "each first use charged once, no repeat charged");

    // Memory: every dedupe set of the customer, exactly (SAMPLES 0), per member.
    let sets: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}[0-9]*", store.keys.dedupe_prefix("t", "c-1")))
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(!sets.is_empty() && sets.len() <= 2, "one set per period: {sets:?}");
    let (mut bytes, mut members) = (0i64, 0i64);
    for k in &sets {
        bytes += redis_i64(&mut con, redis::cmd("MEMORY").arg("USAGE").arg(k).arg("SAMPLES").arg(0)).await;
        members += redis_i64(&mut con, redis::cmd("SCARD").arg(k)).await;
        let ttl = redis_i64(&mut con, redis::cmd("TTL").arg(k)).await;
        assert!(
            ttl > 86_400 - 600 && ttl <= 86_400,
            "{k} expires one window after its last mark: {ttl}"
        );
    }
    assert_eq!(members, EVENTS as i64);
    let per_key = bytes as f64 / members as f64;
    println!("redis bytes per retained idempotency key: {per_key:.1} ({bytes} bytes / {members} keys)");

    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut con)
        .await
        .unwrap_or_default();
    for k in keys {
        let _: Result<(), _> = redis::cmd("DEL").arg(k).query_async(&mut con).await;
    }
    assert!(per_key <= 64.0, "a retained key costs {per_key:.1} bytes (target 64)");
}
