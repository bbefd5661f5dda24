//! What to send and when: the open-loop schedule, the Zipf-skewed customer mix, and the event
//! batches with their duplicates.
//!
//! Batch `k` is due at `start + k * batch / rate`, computed from `k` (no accumulated drift) and
//! independent of how fast the server answers. Customers `c-0 .. c-(C-1)` have Zipf weights
//! `1 / rank^1.1` and belong to tenant `index % T`; an optional hot customer `c-hot` in tenant 0
//! takes a share `H` of all events. A batch goes to one tenant (one API key), chosen with that
//! tenant's share of the traffic, and its events are drawn from the tenant's own customers, so
//! the overall mix is exactly the global one. Duplicates re-send an event from a small per-tenant
//! ring of recent originals (same key, identical body); some are taken from the batch being built
//! so they share a request with their original.
#![allow(clippy::float_arithmetic)] // schedule offsets and sampling weights; money is Decimal

use std::collections::VecDeque;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::Rng;
use rust_decimal::Decimal;
use serde::Serialize;
use uuid::Uuid;

/// Zipf exponent of the customer popularity.
pub const ZIPF_EXPONENT: f64 = 1.1;
/// Customer index that stands for `c-hot`.
pub const HOT: u32 = u32::MAX;
/// The only event name the load uses; mapped to `ai-tokens` at setup.
pub const EVENT_NAME: &str = "llm-call";
/// Credits charged per token (`credits_per_unit` of the mapping).
pub const CREDITS_PER_UNIT: Decimal = Decimal::from_parts(1, 0, 0, false, 2);
/// Largest `tokens` dimension drawn (inclusive); the smallest is 1.
pub const MAX_TOKENS: u32 = 500;
/// Distinct `userId` values (`u-0 .. u-49`).
pub const USERS: u8 = 50;
/// Share of duplicates taken from the batch being built, when it already has originals.
const SAME_BATCH_SHARE: f64 = 0.25;

/// The constant-rate arrival schedule.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    batch: u32,
    rate: f64,
    duration: Duration,
}

impl Schedule {
    pub fn new(batch: u32, rate: f64, duration: Duration) -> Self {
        Self { batch, rate, duration }
    }

    /// When batch `k` is due, relative to the start.
    pub fn offset(&self, k: u64) -> Duration {
        Duration::from_secs_f64(k as f64 * f64::from(self.batch) / self.rate)
    }

    /// Number of batches due strictly inside the duration.
    pub fn total_batches(&self) -> u64 {
        (self.duration.as_secs_f64() * self.rate / f64::from(self.batch)).ceil() as u64
    }
}

/// Picks an index with probability proportional to its weight: a CDF and a binary search.
#[derive(Debug, Clone)]
pub struct WeightedSampler {
    cdf: Vec<f64>,
}

impl WeightedSampler {
    /// Builds the sampler. Negative or non-finite weights count as 0; if every weight is 0
    /// the choice is uniform. `weights` must not be empty.
    pub fn new(weights: &[f64]) -> Self {
        assert!(!weights.is_empty(), "a sampler needs at least one choice");
        let clean = |w: f64| if w.is_finite() && w > 0.0 { w } else { 0.0 };
        let mut total: f64 = weights.iter().map(|&w| clean(w)).sum();
        let uniform = total <= 0.0;
        if uniform {
            total = weights.len() as f64;
        }
        let mut acc = 0.0;
        let cdf = weights
            .iter()
            .map(|&w| {
                acc += if uniform { 1.0 } else { clean(w) };
                acc / total
            })
            .collect();
        Self { cdf }
    }

    /// Maps a uniform `u` in `[0, 1)` to an index.
    pub fn pick(&self, u: f64) -> usize {
        self.cdf.partition_point(|&c| c <= u).min(self.cdf.len() - 1)
    }

    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> usize {
        self.pick(rng.gen::<f64>())
    }
}

/// Zipf weights `1 / k^s` for ranks `1..=n`.
pub fn zipf_weights(n: u32, s: f64) -> Vec<f64> {
    (1..=n).map(|k| 1.0 / f64::from(k).powf(s)).collect()
}

/// The name a customer index is sent as.
pub fn customer_name(idx: u32) -> String {
    if idx == HOT {
        "c-hot".to_owned()
    } else {
        format!("c-{idx}")
    }
}

/// Who gets the traffic: tenant shares and, per tenant, its customers' shares.
#[derive(Debug, Clone)]
pub struct CustomerMix {
    tenant_pick: WeightedSampler,
    tenants: Vec<(Vec<u32>, WeightedSampler)>,
}

impl CustomerMix {
    pub fn new(customers: u32, tenants: u32, hot_share: f64) -> Self {
        assert!(tenants >= 1 && customers >= tenants, "every tenant needs a customer");
        let zipf = zipf_weights(customers, ZIPF_EXPONENT);
        let z_total: f64 = zipf.iter().sum();
        let mut members: Vec<(Vec<u32>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); tenants as usize];
        for (i, w) in zipf.iter().enumerate() {
            let (ids, ws) = &mut members[i % tenants as usize];
            ids.push(i as u32);
            ws.push((1.0 - hot_share) * w / z_total);
        }
        if hot_share > 0.0 {
            members[0].0.push(HOT);
            members[0].1.push(hot_share);
        }
        let tenant_weights: Vec<f64> = members.iter().map(|(_, ws)| ws.iter().sum()).collect();
        Self {
            tenant_pick: WeightedSampler::new(&tenant_weights),
            tenants: members
                .into_iter()
                .map(|(ids, ws)| (ids, WeightedSampler::new(&ws)))
                .collect(),
        }
    }

    pub fn tenant_count(&self) -> usize {
        self.tenants.len()
    }

    /// The customers of a tenant (each gets a grant at setup), `HOT` included where it lives.
    pub fn customers_of(&self, tenant: usize) -> &[u32] {
        &self.tenants[tenant].0
    }

    pub fn pick_tenant<R: Rng + ?Sized>(&self, rng: &mut R) -> usize {
        self.tenant_pick.sample(rng)
    }

    pub fn pick_customer<R: Rng + ?Sized>(&self, tenant: usize, rng: &mut R) -> u32 {
        let (ids, sampler) = &self.tenants[tenant];
        ids[sampler.sample(rng)]
    }
}

/// One usage event as generated; cheap to copy so duplicates are bit-identical.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub customer: u32,
    pub key: Uuid,
    pub tokens: u32,
    pub user: u8,
}

impl Event {
    /// What the pipeline must charge for it: `tokens x credits_per_unit`.
    pub fn cost(&self) -> Decimal {
        Decimal::from(self.tokens) * CREDITS_PER_UNIT
    }
}

#[derive(Serialize)]
struct WireDimensions {
    tokens: u32,
    #[serde(rename = "userId")]
    user_id: String,
}

#[derive(Serialize)]
struct WireEvent {
    customer_id: String,
    event_name: &'static str,
    idempotency_key: Uuid,
    dimensions: WireDimensions,
}

#[derive(Serialize)]
struct WireBatch {
    events: Vec<WireEvent>,
}

/// The `POST /v1/events` body for a batch: `{"events": [...]}`, no `timestamp`.
pub fn batch_body(events: &[Event]) -> Vec<u8> {
    let batch = WireBatch {
        events: events
            .iter()
            .map(|e| WireEvent {
                customer_id: customer_name(e.customer),
                event_name: EVENT_NAME,
                idempotency_key: e.key,
                dimensions: WireDimensions {
                    tokens: e.tokens,
                    user_id: format!("u-{}", e.user),
                },
            })
            .collect(),
    };
    serde_json::to_vec(&batch).expect("a batch of plain values always serializes")
}

/// One request's worth of events for one tenant.
#[derive(Debug, Clone)]
pub struct Batch {
    pub tenant: usize,
    pub events: Vec<Event>,
    /// How many of `events` repeat an earlier event.
    pub duplicates: u32,
}

/// Builds batches: tenant and customers from the mix, duplicates from per-tenant rings.
pub struct Generator {
    mix: CustomerMix,
    duplicates: f64,
    ring_capacity: usize,
    rings: Vec<VecDeque<Event>>,
    rng: StdRng,
}

impl Generator {
    pub fn new(mix: CustomerMix, duplicates: f64, ring_capacity: usize, rng: StdRng) -> Self {
        let rings = vec![VecDeque::with_capacity(ring_capacity); mix.tenant_count()];
        Self {
            mix,
            duplicates,
            ring_capacity: ring_capacity.max(1),
            rings,
            rng,
        }
    }

    fn fresh(&mut self, tenant: usize) -> Event {
        let customer = self.mix.pick_customer(tenant, &mut self.rng);
        Event {
            customer,
            key: uuid::Builder::from_random_bytes(self.rng.gen()).into_uuid(),
            tokens: self.rng.gen_range(1..=MAX_TOKENS),
            user: self.rng.gen_range(0..USERS),
        }
    }

    pub fn next_batch(&mut self, size: usize) -> Batch {
        let tenant = self.mix.pick_tenant(&mut self.rng);
        let mut events = Vec::with_capacity(size);
        let mut originals: Vec<usize> = Vec::with_capacity(size);
        let mut duplicates = 0;
        for _ in 0..size {
            let ring = &self.rings[tenant];
            if self.duplicates > 0.0 && !ring.is_empty() && self.rng.gen_bool(self.duplicates) {
                let repeat = if !originals.is_empty() && self.rng.gen_bool(SAME_BATCH_SHARE) {
                    events[originals[self.rng.gen_range(0..originals.len())]]
                } else {
                    ring[self.rng.gen_range(0..ring.len())]
                };
                events.push(repeat);
                duplicates += 1;
            } else {
                let ev = self.fresh(tenant);
                let ring = &mut self.rings[tenant];
                if ring.len() == self.ring_capacity {
                    ring.pop_front();
                }
                ring.push_back(ev);
                originals.push(events.len());
                events.push(ev);
            }
        }
        Batch {
            tenant,
            events,
            duplicates,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use std::collections::{HashMap, HashSet};

    #[test]
    fn schedule_due_times_are_k_times_batch_over_rate() {
        let s = Schedule::new(100, 5000.0, Duration::from_secs(30));
        assert_eq!(s.offset(0), Duration::ZERO);
        assert_eq!(s.offset(1), Duration::from_millis(20));
        assert_eq!(s.offset(50), Duration::from_secs(1));
        assert_eq!(s.offset(1499), Duration::from_millis(29_980));
        assert_eq!(s.total_batches(), 1500);
        // 3 events/s in batches of 2 for 1 s: due at 0 and 0.667 s, not at 1.333 s.
        let s = Schedule::new(2, 3.0, Duration::from_secs(1));
        assert_eq!(s.total_batches(), 2);
        assert!(s.offset(1) < Duration::from_secs(1) && s.offset(2) > Duration::from_secs(1));
        // No drift after a long run: computed from k, not accumulated.
        let s = Schedule::new(7, 3000.0, Duration::from_secs(3600));
        let k = 1_000_000;
        let exact = k as f64 * 7.0 / 3000.0;
        assert!((s.offset(k).as_secs_f64() - exact).abs() < 1e-6);
    }

    #[test]
    fn zipf_sampler_stays_in_bounds_and_is_skewed() {
        let n = 200;
        let sampler = WeightedSampler::new(&zipf_weights(n, ZIPF_EXPONENT));
        assert_eq!(sampler.pick(0.0), 0);
        assert_eq!(sampler.pick(0.999_999_999), n as usize - 1);
        assert_eq!(sampler.pick(1.0), n as usize - 1);
        let mut rng = StdRng::seed_from_u64(7);
        let mut counts = vec![0u32; n as usize];
        let draws = 400_000;
        for _ in 0..draws {
            counts[sampler.sample(&mut rng)] += 1;
        }
        // Rank 1 vs rank 10 should be about 10^1.1 = 12.6.
        let ratio = f64::from(counts[0]) / f64::from(counts[9]);
        assert!((10.0..16.0).contains(&ratio), "ratio {ratio}");
        // Popularity falls with rank, and the head dominates the tail.
        assert!(counts[0] > counts[1] && counts[1] > counts[4] && counts[4] > counts[49]);
        let head: u32 = counts[..10].iter().sum();
        let tail: u32 = counts[100..].iter().sum();
        assert!(head > 3 * tail, "head {head} tail {tail}");
        assert!(counts.iter().all(|&c| c > 0), "every customer gets some traffic");
    }

    #[test]
    fn weighted_sampler_skips_zero_weights_and_falls_back_to_uniform() {
        let s = WeightedSampler::new(&[0.0, 1.0, 0.0, 1.0]);
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..10_000 {
            let i = s.sample(&mut rng);
            assert!(i == 1 || i == 3);
        }
        let u = WeightedSampler::new(&[0.0, 0.0]);
        assert_eq!(u.pick(0.1), 0);
        assert_eq!(u.pick(0.9), 1);
    }

    #[test]
    fn mix_spreads_customers_round_robin_and_honours_hot_share() {
        let mix = CustomerMix::new(10, 3, 0.5);
        assert_eq!(mix.customers_of(0), &[0, 3, 6, 9, HOT]);
        assert_eq!(mix.customers_of(1), &[1, 4, 7]);
        assert_eq!(mix.customers_of(2), &[2, 5, 8]);
        let mut rng = StdRng::seed_from_u64(3);
        let draws = 200_000;
        let mut hot = 0;
        for _ in 0..draws {
            let t = mix.pick_tenant(&mut rng);
            let c = mix.pick_customer(t, &mut rng);
            assert!(mix.customers_of(t).contains(&c));
            hot += u32::from(c == HOT);
        }
        let share = f64::from(hot) / f64::from(draws);
        assert!((0.48..0.52).contains(&share), "hot share {share}");
        assert_eq!(customer_name(HOT), "c-hot");
        assert_eq!(customer_name(12), "c-12");
    }

    #[test]
    fn duplicates_repeat_identical_events_and_some_share_a_batch() {
        let mix = CustomerMix::new(20, 2, 0.0);
        let mut gen = Generator::new(mix, 0.3, 500, StdRng::seed_from_u64(11));
        let mut seen: HashMap<Uuid, (usize, Event)> = HashMap::new();
        let (mut dups, mut sends, mut same_batch) = (0u32, 0u32, 0u32);
        for _ in 0..200 {
            let b = gen.next_batch(50);
            let mut in_batch = HashSet::new();
            for ev in &b.events {
                assert!((1..=MAX_TOKENS).contains(&ev.tokens) && ev.user < USERS);
                match seen.get(&ev.key) {
                    Some((t, orig)) => {
                        assert_eq!((*t, orig), (b.tenant, ev), "a repeat is identical, same tenant");
                        same_batch += u32::from(in_batch.contains(&ev.key));
                    }
                    None => {
                        seen.insert(ev.key, (b.tenant, *ev));
                    }
                }
                in_batch.insert(ev.key);
            }
            dups += b.duplicates;
            sends += b.events.len() as u32;
        }
        assert_eq!(sends as usize - seen.len(), dups as usize);
        let share = f64::from(dups) / f64::from(sends);
        assert!((0.27..0.33).contains(&share), "duplicate share {share}");
        assert!(same_batch > dups / 10, "same-batch duplicates {same_batch} of {dups}");
    }

    #[test]
    fn body_is_the_documented_shape_and_cost_is_exact() {
        let key = Uuid::nil();
        let ev = Event {
            customer: 7,
            key,
            tokens: 123,
            user: 4,
        };
        let v: serde_json::Value = serde_json::from_slice(&batch_body(&[ev, ev])).unwrap();
        let e = &v["events"][1];
        assert_eq!(e["customer_id"], "c-7");
        assert_eq!(e["event_name"], "llm-call");
        assert_eq!(e["idempotency_key"], key.to_string());
        assert_eq!(e["dimensions"]["tokens"], 123);
        assert_eq!(e["dimensions"]["userId"], "u-4");
        assert!(e.get("timestamp").is_none());
        assert_eq!(ev.cost().to_string(), "1.23");
        assert_eq!(CREDITS_PER_UNIT.to_string(), "0.01");
    }
}
