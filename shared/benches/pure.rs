//! Criterion benchmarks of the pure parts on the hot path (`cargo bench -p shared --bench pure`):
//! pricing one batch, amount conversion, threshold crossing for the pools of a batch, and
//! (de)serializing one batch of facts the way the services do (ingest writes `InputMsg`, the
//! rater reads it and writes `LedgerMsg`, the ledger-writer reads that). Batches look like the load generator's: `llm-call` events with a
//! `tokens` and a `userId` dimension, uuid idempotency keys, 0.01 credits per token.

use std::hint::black_box;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use rust_decimal::Decimal;
use shared::amount::{from_fixed, round_cost, to_fixed, to_fixed_signed};
use shared::model::{Dimensions, Entry, InputMsg, LedgerMsg, Outcome, UsageEvent, UsageFact};
use shared::pricing::{price, MappingVersion, Price};
use shared::webhook::threshold::{cross, Level, Threshold};
use uuid::Uuid;

/// Events per batch: a full `POST /v1/events` is 1000; the consumers take up to 5000.
const BATCH: usize = 1000;

fn at(s: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(s, 0).expect("valid timestamp")
}

fn event(i: usize) -> UsageEvent {
    let mut dims = Dimensions::new();
    dims.insert("tokens".into(), serde_json::json!(1 + (i * 37) % 500));
    dims.insert("userId".into(), serde_json::json!(format!("u-{}", i % 50)));
    UsageEvent {
        tenant_id: "t_5f2b8c0e9a4d4e6f8b1c2d3e4f5a6b7c".into(),
        event_uid: Uuid::now_v7(),
        customer_id: format!("c-{}", i % 200),
        resource_id: String::new(),
        event_name: "llm-call".into(),
        idempotency_key: Uuid::new_v4().to_string(),
        timestamp: at(1_800_000_000 + i as i64),
        dimensions: dims,
        accepted_at: at(1_800_000_000 + i as i64),
    }
}

/// Three price versions, the event's time falling after the last (the usual case).
fn versions() -> Vec<MappingVersion> {
    ["0.02", "0.015", "0.01"]
        .iter()
        .enumerate()
        .map(|(k, cpu)| MappingVersion {
            effective_at: at(1_700_000_000 + 1_000 * k as i64),
            credit_type: "ai-tokens".into(),
            credits_per_unit: Decimal::from_str(cpu).expect("decimal"),
            quantity_dimension: Some("tokens".into()),
            decimals: 2,
        })
        .collect()
}

/// The settled fact of an event: one entry against the customer's only grant.
fn fact(e: UsageEvent, grant: Uuid) -> LedgerMsg {
    let cost = Decimal::new(150, 2);
    LedgerMsg::Usage(UsageFact {
        event: e,
        outcome: Outcome::Settled {
            credit_type: "ai-tokens".into(),
            cost,
            entries: vec![Entry {
                grant_id: Some(grant),
                amount: -cost,
                end_balance: Decimal::new(9_999_876_543, 2),
            }],
        },
    })
}

fn pricing(c: &mut Criterion) {
    let vs = versions();
    let events: Vec<UsageEvent> = (0..BATCH).map(event).collect();
    let mut g = c.benchmark_group("pricing");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("price_batch_1000", |b| {
        b.iter(|| {
            let mut total = 0i64;
            for e in &events {
                if let Price::Priced { fixed, .. } = price(black_box(&vs), e.timestamp, &e.dimensions) {
                    total += fixed;
                }
            }
            total
        })
    });
    // The version lookup alone: an event older than every version.
    let d = Dimensions::new();
    g.throughput(Throughput::Elements(1));
    g.bench_function("unpriced_before_first_version", |b| {
        b.iter(|| price(black_box(&vs), black_box(at(1)), &d))
    });
    g.finish();
}

fn amounts(c: &mut Criterion) {
    let costs: Vec<Decimal> = (0..BATCH).map(|i| Decimal::new(1 + (i as i64 * 37) % 500, 2)).collect();
    let mut g = c.benchmark_group("amount");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("to_fixed_batch_1000", |b| {
        b.iter(|| {
            costs
                .iter()
                .map(|d| to_fixed(black_box(*d), 2).unwrap_or(0))
                .sum::<i64>()
        })
    });
    g.bench_function("to_fixed_signed_negative_batch_1000", |b| {
        b.iter(|| {
            costs
                .iter()
                .map(|d| to_fixed_signed(black_box(-*d), 2).unwrap_or(0))
                .sum::<i64>()
        })
    });
    g.bench_function("from_fixed_batch_1000", |b| {
        b.iter(|| {
            for v in 0..BATCH as i64 {
                black_box(from_fixed(black_box(v * 37), 2));
            }
        })
    });
    let raw: Vec<Decimal> = (0..BATCH).map(|i| Decimal::new(i as i64 * 37, 3)).collect();
    g.bench_function("round_cost_batch_1000", |b| {
        b.iter(|| {
            for d in &raw {
                black_box(round_cost(black_box(*d), 2));
            }
        })
    });
    g.finish();
}

fn serialization(c: &mut Criterion) {
    let grant = Uuid::new_v4();
    let inputs: Vec<InputMsg> = (0..BATCH).map(|i| InputMsg::Usage(event(i))).collect();
    let facts: Vec<LedgerMsg> = (0..BATCH).map(|i| fact(event(i), grant)).collect();
    let input_bytes: Vec<Vec<u8>> = inputs
        .iter()
        .map(|m| serde_json::to_vec(m).expect("serializes"))
        .collect();
    let fact_bytes: Vec<Vec<u8>> = facts
        .iter()
        .map(|m| serde_json::to_vec(m).expect("serializes"))
        .collect();
    let mut g = c.benchmark_group("serde");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("input_to_json_batch_1000", |b| {
        b.iter(|| {
            inputs
                .iter()
                .map(|m| serde_json::to_vec(black_box(m)).map_or(0, |v| v.len()))
                .sum::<usize>()
        })
    });
    g.bench_function("input_from_json_batch_1000", |b| {
        b.iter(|| {
            input_bytes
                .iter()
                .filter(|p| serde_json::from_slice::<InputMsg>(black_box(p)).is_ok())
                .count()
        })
    });
    g.bench_function("fact_to_json_batch_1000", |b| {
        b.iter(|| {
            facts
                .iter()
                .map(|m| serde_json::to_vec(black_box(m)).map_or(0, |v| v.len()))
                .sum::<usize>()
        })
    });
    g.bench_function("fact_from_json_batch_1000", |b| {
        b.iter(|| {
            fact_bytes
                .iter()
                .filter(|p| serde_json::from_slice::<LedgerMsg>(black_box(p)).is_ok())
                .count()
        })
    });
    // What the rater does per fact besides serializing: the event is cloned into the fact.
    g.bench_function("fact_build_from_input_batch_1000", |b| {
        b.iter_batched(
            || inputs.clone(),
            |inputs| {
                inputs
                    .into_iter()
                    .filter_map(|m| match m {
                        InputMsg::Usage(e) => Some(fact(e, grant)),
                        _ => None,
                    })
                    .count()
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
    eprintln!(
        "serde: one input message is {} bytes of JSON, one settled fact {} bytes",
        input_bytes[0].len(),
        fact_bytes[0].len()
    );
}

/// Threshold crossing for the pools one batch touched: the usual case (levels move, nothing
/// crossed) and a batch where every pool crosses 80% (one fires, the others stay armed).
fn thresholds(c: &mut Criterion) {
    let th = [
        Threshold::UsagePercent(80),
        Threshold::UsagePercent(90),
        Threshold::UsagePercent(100),
        Threshold::BalanceBelow(Decimal::from(100)),
        Threshold::Depleted,
    ];
    let granted = Decimal::from(100_000);
    let level = |balance: i64| Level {
        balance: Decimal::from(balance),
        granted,
    };
    let quiet: Vec<(Level, Level)> = (0..BATCH as i64)
        .map(|i| (level(90_000 - i), level(89_000 - i)))
        .collect();
    let crossing: Vec<(Level, Level)> = (0..BATCH as i64).map(|i| (level(20_500 + i), level(19_000))).collect();
    let none = std::collections::BTreeSet::new();
    let mut g = c.benchmark_group("threshold");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("cross_no_crossing_1000_pools", |b| {
        b.iter(|| {
            quiet
                .iter()
                .map(|(x, y)| cross(x, y, black_box(&th), &none).0.len())
                .sum::<usize>()
        })
    });
    g.bench_function("cross_fires_80_percent_1000_pools", |b| {
        b.iter(|| {
            crossing
                .iter()
                .map(|(x, y)| cross(x, y, black_box(&th), &none).0.len())
                .sum::<usize>()
        })
    });
    g.finish();
}

criterion_group!(benches, pricing, amounts, serialization, thresholds);
criterion_main!(benches);
