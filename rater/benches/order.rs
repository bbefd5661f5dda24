//! Criterion benchmarks of the rater's pure parts (`cargo bench -p rater --bench order`):
//! grant ordering (the order key that makes string order the consumption order, built for every
//! grant command and every grant of a rebuilt pool, then sorted) and parsing apply.lua's replies
//! (one line per operation, on every batch). The ordering inside apply.lua itself (HGETALL and
//! `table.sort` per call) is measured by the stage bench with `--grants`.

use std::hint::black_box;

use chrono::{DateTime, Utc};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rater::pools::parse_result;
use shared::hot_pool::OrderKey;
use shared::model::Category;
use uuid::Uuid;

fn at(s: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(s, 0).expect("valid timestamp")
}

/// What an order key is built from: priority, expiry, category, effective_at, created_at, id.
type GrantFields = (u32, Option<DateTime<Utc>>, Category, DateTime<Utc>, DateTime<Utc>, Uuid);

/// `n` grants with mixed priorities, expiries (some never), categories and start times.
fn grants(n: usize) -> Vec<GrantFields> {
    (0..n)
        .map(|i| {
            let k = i as i64;
            (
                (i % 3) as u32 * 50,
                (i % 4 != 0).then(|| at(1_900_000_000 + (k * 7919) % 100_000)),
                if i % 2 == 0 { Category::Promo } else { Category::Paid },
                at(1_800_000_000 + (k * 104_729) % 10_000),
                at(1_800_000_000 + k),
                Uuid::new_v4(),
            )
        })
        .collect()
}

fn ordering(c: &mut Criterion) {
    let mut g = c.benchmark_group("grant_order");
    for n in [1usize, 4, 16, 64] {
        let gs = grants(n);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("keys_and_sort", n), &gs, |b, gs| {
            b.iter(|| {
                let mut keys: Vec<String> = gs
                    .iter()
                    .map(|&(p, e, cat, f, r, id)| OrderKey::new(p, e, cat, f, r, id).to_string())
                    .collect();
                keys.sort_unstable();
                black_box(keys)
            })
        });
    }
    g.finish();
}

fn replies(c: &mut Criterion) {
    const N: usize = 1000;
    let grant = Uuid::new_v4();
    let charged: Vec<String> = (0..N)
        .map(|i| {
            format!(
                "{}|S|{}|{grant}:-{}:{}",
                1_000_000 + i,
                9_999_000_000 - i as i64,
                1 + i % 500,
                9_999_000_000 - i as i64
            )
        })
        .collect();
    let duplicates: Vec<String> = (0..N).map(|i| format!("{}|P", 1_000_000 + i)).collect();
    let mut g = c.benchmark_group("lua_reply");
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("parse_charged_1000", |b| {
        b.iter(|| charged.iter().filter(|l| parse_result(black_box(l)).is_ok()).count())
    });
    g.bench_function("parse_duplicate_1000", |b| {
        b.iter(|| duplicates.iter().filter(|l| parse_result(black_box(l)).is_ok()).count())
    });
    g.finish();
}

criterion_group!(benches, ordering, replies);
criterion_main!(benches);
