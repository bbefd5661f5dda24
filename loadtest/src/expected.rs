//! Expected-charge bookkeeping: what the pipeline must have settled, derived only from what the
//! server accepted.
//!
//! The unit of charge is a unique `(tenant, idempotency key)` with at least one accepted copy.
//! Order does not matter: a repeat accepted before (or instead of) its original is the first
//! accepted copy, and a key is charged once however many copies were accepted. Every accepted
//! copy beyond the first is an "accepted repeat", which the pipeline must record as a duplicate.

use std::collections::HashMap;

use rust_decimal::Decimal;
use uuid::Uuid;

use crate::generator::Event;

#[derive(Debug, Clone, Copy)]
struct KeyState {
    event: Event,
    accepted_copies: u32,
}

/// Accepted keys per tenant and what they cost.
#[derive(Debug, Default, Clone)]
pub struct Expected {
    keys: HashMap<(usize, Uuid), KeyState>,
    accepted_sends: u64,
    /// Events of requests that were never accepted but may have been processed by the server
    /// (with `--retry`: a timeout, a dropped connection or a 5xx among their tries). Such an
    /// event may settle, at most once; it is not lost if it does not.
    maybe: HashMap<(usize, Uuid), Event>,
}

impl Expected {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one accepted copy of `event` for `tenant`. Rejected copies are simply not
    /// recorded: they must leave no trace.
    pub fn accept(&mut self, tenant: usize, event: &Event) {
        self.accepted_sends += 1;
        self.keys
            .entry((tenant, event.key))
            .and_modify(|s| s.accepted_copies += 1)
            .or_insert(KeyState {
                event: *event,
                accepted_copies: 1,
            });
    }

    /// Records `event` of `tenant` as possibly processed although no try of its request was
    /// accepted (see [`Expected::maybe_cost_of`]).
    pub fn maybe(&mut self, tenant: usize, event: &Event) {
        self.maybe.entry((tenant, event.key)).or_insert(*event);
    }

    /// The cost of a key that was never accepted but may have been processed; None for a key
    /// that some accepted copy makes certain, or that never reached the server.
    pub fn maybe_cost_of(&self, tenant: usize, key: &Uuid) -> Option<Decimal> {
        if self.keys.contains_key(&(tenant, *key)) {
            return None;
        }
        self.maybe.get(&(tenant, *key)).map(|e| e.cost())
    }

    /// Keys that may have been processed without being accepted.
    pub fn maybe_count(&self) -> u64 {
        self.maybe.keys().filter(|k| !self.keys.contains_key(k)).count() as u64
    }

    /// Expected charge per `(tenant, customer index)` when the uncertain keys in `settled`
    /// (see [`Expected::maybe`]) did settle: [`Expected::charges`] plus their costs.
    pub fn charges_with_settled_maybes(&self, settled: &[(usize, Uuid)]) -> HashMap<(usize, u32), Decimal> {
        let mut out = self.charges();
        for k in settled {
            if self.keys.contains_key(k) {
                continue;
            }
            if let Some(e) = self.maybe.get(k) {
                *out.entry((k.0, e.customer)).or_default() += e.cost();
            }
        }
        out
    }

    /// Accepted copies, originals and repeats alike.
    pub fn accepted_sends(&self) -> u64 {
        self.accepted_sends
    }

    /// Keys with at least one accepted copy: the `usage_events` rows to expect.
    pub fn unique_accepted(&self) -> u64 {
        self.keys.len() as u64
    }

    /// Accepted copies beyond the first of each key: the `duplicate_events` rows to expect.
    pub fn accepted_repeats(&self) -> u64 {
        self.accepted_sends - self.unique_accepted()
    }

    /// The cost the pipeline must settle for a key, if any copy of it was accepted.
    pub fn cost_of(&self, tenant: usize, key: &Uuid) -> Option<Decimal> {
        self.keys.get(&(tenant, *key)).map(|s| s.event.cost())
    }

    /// Every accepted `(tenant, key)`.
    pub fn keys(&self) -> impl Iterator<Item = (usize, Uuid)> + '_ {
        self.keys.keys().copied()
    }

    /// Expected charge per `(tenant, customer index)`: the sum of the cost of its unique
    /// accepted keys. Customers with nothing accepted are absent (their charge is zero).
    pub fn charges(&self) -> HashMap<(usize, u32), Decimal> {
        let mut out: HashMap<(usize, u32), Decimal> = HashMap::new();
        for (&(tenant, _), state) in &self.keys {
            *out.entry((tenant, state.event.customer)).or_default() += state.event.cost();
        }
        out
    }

    /// Expected charge of one customer.
    pub fn charge_of(charges: &HashMap<(usize, u32), Decimal>, tenant: usize, customer: u32) -> Decimal {
        charges.get(&(tenant, customer)).copied().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn ev(customer: u32, key: u128, tokens: u32) -> Event {
        Event {
            customer,
            key: Uuid::from_u128(key),
            tokens,
            user: 0,
        }
    }

    fn dec(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn accepted_duplicates_charge_once() {
        let mut x = Expected::new();
        let a = ev(1, 1, 150);
        x.accept(0, &a);
        x.accept(0, &a); // repeat, same batch or later
        x.accept(0, &a); // and again
        assert_eq!(x.unique_accepted(), 1);
        assert_eq!(x.accepted_sends(), 3);
        assert_eq!(x.accepted_repeats(), 2);
        assert_eq!(Expected::charge_of(&x.charges(), 0, 1), dec("1.50"));
    }

    #[test]
    fn a_duplicate_of_a_failed_original_is_the_first_accepted_copy() {
        let mut x = Expected::new();
        let a = ev(2, 7, 333);
        // The original's request failed (nothing recorded); the repeat was accepted.
        x.accept(1, &a);
        assert_eq!(x.unique_accepted(), 1);
        assert_eq!(x.accepted_repeats(), 0);
        assert_eq!(x.cost_of(1, &a.key), Some(dec("3.33")));
        assert_eq!(Expected::charge_of(&x.charges(), 1, 2), dec("3.33"));
    }

    #[test]
    fn uncertain_keys_count_only_when_settled_and_never_over_an_accepted_one() {
        let mut x = Expected::new();
        let a = ev(1, 1, 100);
        let b = ev(1, 2, 250);
        x.maybe(0, &a); // its request timed out, then the retries ran out
        x.maybe(0, &b);
        x.accept(0, &b); // a later copy of b was accepted: b is certain
        assert_eq!(x.maybe_count(), 1);
        assert_eq!(x.maybe_cost_of(0, &a.key), Some(dec("1.00")));
        assert_eq!(x.maybe_cost_of(0, &b.key), None);
        assert_eq!(x.unique_accepted(), 1);
        assert_eq!(Expected::charge_of(&x.charges(), 0, 1), dec("2.50"));
        // a settled after all: it is charged once on top; b is never counted twice.
        let c = x.charges_with_settled_maybes(&[(0, a.key), (0, b.key)]);
        assert_eq!(Expected::charge_of(&c, 0, 1), dec("3.50"));
    }

    #[test]
    fn keys_never_accepted_charge_nothing() {
        let x = Expected::new();
        assert_eq!(x.unique_accepted(), 0);
        assert_eq!(x.cost_of(0, &Uuid::from_u128(9)), None);
        assert_eq!(Expected::charge_of(&x.charges(), 0, 5), Decimal::ZERO);
    }

    #[test]
    fn charges_sum_per_tenant_and_customer_exactly() {
        let mut x = Expected::new();
        // Same key in two tenants is two different events.
        x.accept(0, &ev(1, 1, 1));
        x.accept(1, &ev(1, 1, 1));
        for k in 10..20u128 {
            x.accept(0, &ev(3, k, 7)); // 10 x 0.07
        }
        x.accept(0, &ev(3, 10, 7)); // repeat of key 10
        let c = x.charges();
        assert_eq!(Expected::charge_of(&c, 0, 1), dec("0.01"));
        assert_eq!(Expected::charge_of(&c, 1, 1), dec("0.01"));
        assert_eq!(Expected::charge_of(&c, 0, 3), dec("0.70"));
        assert_eq!(x.unique_accepted(), 12);
        assert_eq!(x.accepted_repeats(), 1);
        assert_eq!(x.keys().count(), 12);
        // 0.01 summed ten thousand times is exactly 100: no float drift.
        let mut y = Expected::new();
        for k in 0..10_000u128 {
            y.accept(0, &ev(0, k, 1));
        }
        assert_eq!(Expected::charge_of(&y.charges(), 0, 0), dec("100"));
    }
}
