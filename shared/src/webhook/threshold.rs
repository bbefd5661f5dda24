//! Threshold crossing: which alerts a batch fires, as a pure function of the level before and
//! after it, the thresholds, and which thresholds have fired and not yet recovered.
//!
//! A threshold fires once when the level crosses it (it was not crossed before the batch and is
//! after); it stays fired until the level is back on the good side, which emits one `recovered`
//! and re-arms it. A threshold that is already crossed when it is first seen (configured while
//! the pool was low) does not fire until the pool has recovered above it and crosses it again.
//! Fired thresholds that are no longer configured are forgotten.

use std::collections::BTreeSet;

use rust_decimal::Decimal;

/// A pool (or one grant) as thresholds see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Level {
    /// The pool's balance (negative under a soft limit's overdraft), or the grant's remaining.
    pub balance: Decimal,
    /// What funds it: the amounts of the grants still in the pool, or the grant's amount.
    pub granted: Decimal,
}

impl Level {
    /// A pool nothing was ever granted to.
    pub const EMPTY: Level = Level {
        balance: Decimal::ZERO,
        granted: Decimal::ZERO,
    };
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Threshold {
    /// At least this percent of `granted` used (1-100). Never crossed while nothing is granted.
    UsagePercent(u32),
    /// The balance is strictly below this amount.
    BalanceBelow(Decimal),
    /// The balance is zero or less.
    Depleted,
}

impl Threshold {
    /// A stable name, stored in the fired set and sent in the message.
    pub fn key(&self) -> String {
        match self {
            Threshold::UsagePercent(p) => format!("usage_percent:{p}"),
            Threshold::BalanceBelow(b) => format!("balance_below:{}", b.normalize()),
            Threshold::Depleted => "depleted".into(),
        }
    }

    /// Is the level on the bad side of this threshold?
    pub fn is_crossed(&self, l: &Level) -> bool {
        match self {
            Threshold::UsagePercent(p) => {
                l.granted > Decimal::ZERO
                    && (l.granted - l.balance) * Decimal::ONE_HUNDRED >= Decimal::from(*p) * l.granted
            }
            Threshold::BalanceBelow(b) => l.balance < *b,
            Threshold::Depleted => l.balance <= Decimal::ZERO,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Crossing {
    Fired(Threshold),
    Recovered(Threshold),
}

/// The crossings of one batch and the fired set to store after it.
pub fn cross(
    before: &Level,
    after: &Level,
    thresholds: &[Threshold],
    fired: &BTreeSet<String>,
) -> (Vec<Crossing>, BTreeSet<String>) {
    let mut out = Vec::new();
    let mut next = BTreeSet::new();
    for t in thresholds {
        let key = t.key();
        let was_fired = fired.contains(&key);
        let now = t.is_crossed(after);
        if was_fired {
            if now {
                next.insert(key);
            } else {
                out.push(Crossing::Recovered(t.clone()));
            }
        } else if now && !t.is_crossed(before) {
            out.push(Crossing::Fired(t.clone()));
            next.insert(key);
        }
    }
    (out, next)
}

/// [`cross`] along a path: `levels` are the levels after each step of a batch, in order (the
/// last is the level after the batch). Every threshold the path crosses fires once, and one
/// that recovers within the path recovers once, whatever the batching.
pub fn cross_path(
    before: &Level,
    levels: &[Level],
    thresholds: &[Threshold],
    fired: &BTreeSet<String>,
) -> (Vec<Crossing>, BTreeSet<String>) {
    let mut out = Vec::new();
    let mut fired = fired.clone();
    let mut prev = before;
    for l in levels {
        let (mut c, next) = cross(prev, l, thresholds, &fired);
        out.append(&mut c);
        fired = next;
        prev = l;
    }
    (out, fired)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lvl(balance: i64, granted: i64) -> Level {
        Level {
            balance: Decimal::from(balance),
            granted: Decimal::from(granted),
        }
    }

    fn set(keys: &[&str]) -> BTreeSet<String> {
        keys.iter().map(|k| k.to_string()).collect()
    }

    /// Issue 15, case 6: the grant of 10 and the twelve events of 1 that drain it settle in one
    /// batch. Between the batch's ends nothing is crossed (0 before, 0 after); along its path
    /// the 50% and 80% alerts and the depletion each fire once.
    #[test]
    fn a_grant_and_the_usage_that_drains_it_in_one_batch_cross_every_threshold() {
        let th = [
            Threshold::UsagePercent(50),
            Threshold::UsagePercent(80),
            Threshold::Depleted,
        ];
        let mut path = vec![lvl(10, 10)];
        path.extend((0..10).rev().map(|b| lvl(b, 10)));
        let (ends, _) = cross(&Level::EMPTY, path.last().unwrap(), &th, &BTreeSet::new());
        assert!(!ends.contains(&Crossing::Fired(Threshold::Depleted)));
        let (e, f) = cross_path(&Level::EMPTY, &path, &th, &BTreeSet::new());
        assert_eq!(
            e,
            [
                Crossing::Fired(Threshold::UsagePercent(50)),
                Crossing::Fired(Threshold::UsagePercent(80)),
                Crossing::Fired(Threshold::Depleted),
            ]
        );
        assert_eq!(f, set(&["depleted", "usage_percent:50", "usage_percent:80"]));
        // A refill within the same batch recovers each once.
        let (e, f) = cross_path(&lvl(0, 10), &[lvl(0, 10), lvl(100, 110)], &th, &f);
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(f.is_empty());
    }

    #[test]
    fn a_pool_drained_then_refilled() {
        let th = [
            Threshold::UsagePercent(80),
            Threshold::UsagePercent(100),
            Threshold::BalanceBelow(Decimal::from(50)),
            Threshold::Depleted,
        ];
        // Granted 100: 100 -> 60 (nothing) -> 20 (80% and below 50) -> 0 (100%, depleted).
        let (e, f) = cross(&Level::EMPTY, &lvl(100, 100), &th, &BTreeSet::new());
        assert!(e.is_empty(), "{e:?}");
        let (e, f) = cross(&lvl(100, 100), &lvl(60, 100), &th, &f);
        assert!(e.is_empty(), "{e:?}");
        let (e, f) = cross(&lvl(60, 100), &lvl(20, 100), &th, &f);
        assert_eq!(
            e,
            [
                Crossing::Fired(Threshold::UsagePercent(80)),
                Crossing::Fired(Threshold::BalanceBelow(Decimal::from(50)))
            ]
        );
        let (e, f) = cross(&lvl(20, 100), &lvl(0, 100), &th, &f);
        assert_eq!(
            e,
            [
                Crossing::Fired(Threshold::UsagePercent(100)),
                Crossing::Fired(Threshold::Depleted)
            ]
        );
        // The same batch again (a redelivery sees after == before): nothing.
        let (e, f2) = cross(&lvl(0, 100), &lvl(0, 100), &th, &f);
        assert!(e.is_empty());
        assert_eq!(f2, f);
        // A grant of 100 more: 0 of 200 -> 100 of 200 = 50% used: everything recovers but
        // "below 50" (100 is not below 50, so it recovers too).
        let (e, f) = cross(&lvl(0, 100), &lvl(100, 200), &th, &f);
        assert_eq!(e.len(), 4, "{e:?}");
        assert!(e.iter().all(|c| matches!(c, Crossing::Recovered(_))));
        assert!(f.is_empty());
        // Down again: 80% of 200 used fires again.
        let (e, _) = cross(&lvl(100, 200), &lvl(40, 200), &th, &f);
        assert_eq!(
            e,
            [
                Crossing::Fired(Threshold::UsagePercent(80)),
                Crossing::Fired(Threshold::BalanceBelow(Decimal::from(50)))
            ]
        );
    }

    #[test]
    fn configured_while_low_waits_for_a_recovery_and_obsolete_ones_are_forgotten() {
        let th = [Threshold::BalanceBelow(Decimal::from(10))];
        let (e, f) = cross(&lvl(5, 100), &lvl(4, 100), &th, &BTreeSet::new());
        assert!(e.is_empty());
        assert!(f.is_empty());
        let (e, f) = cross(&lvl(4, 100), &lvl(50, 100), &th, &f);
        assert!(e.is_empty(), "never fired, so no recovery: {e:?}");
        let (e, f) = cross(&lvl(50, 100), &lvl(9, 100), &th, &f);
        assert_eq!(e, [Crossing::Fired(th[0].clone())]);
        assert_eq!(f, set(&["balance_below:10"]));
        let (e, f) = cross(
            &lvl(9, 100),
            &lvl(8, 100),
            &[Threshold::BalanceBelow(Decimal::from(5))],
            &f,
        );
        assert!(e.is_empty());
        assert!(f.is_empty(), "the old threshold is forgotten");
    }

    #[test]
    fn percent_is_of_the_granted_total_and_never_crossed_with_nothing_granted() {
        let t = Threshold::UsagePercent(80);
        assert!(!t.is_crossed(&Level::EMPTY));
        assert!(!t.is_crossed(&lvl(-5, 0)));
        assert!(!t.is_crossed(&lvl(21, 100)));
        assert!(t.is_crossed(&lvl(20, 100)), "exactly 80% used");
        assert!(t.is_crossed(&lvl(-1, 100)), "overdraft is over 100%");
        let frac = Level {
            balance: Decimal::new(2001, 2),
            granted: Decimal::new(10000, 2),
        };
        assert!(!t.is_crossed(&frac), "79.99%");
        assert!(Threshold::Depleted.is_crossed(&Level::EMPTY));
        assert_eq!(
            Threshold::BalanceBelow(Decimal::new(1000, 1)).key(),
            "balance_below:100"
        );
    }

    /// Every (before, after, fired) over a small grid: the rule, case by case.
    #[test]
    fn exhaustive_over_a_small_grid() {
        let th = [
            Threshold::UsagePercent(50),
            Threshold::UsagePercent(100),
            Threshold::BalanceBelow(Decimal::from(3)),
            Threshold::Depleted,
        ];
        let levels: Vec<Level> = [0i64, 4, 10]
            .iter()
            .flat_map(|&g| (-2..=11).map(move |b| lvl(b, g)))
            .collect();
        let keys: Vec<String> = th.iter().map(Threshold::key).collect();
        let mut cases = 0;
        for before in &levels {
            for after in &levels {
                for mask in 0..(1u32 << (th.len() + 1)) {
                    // Bit 4: a stale key of a threshold no longer configured.
                    let mut fired: BTreeSet<String> = (0..th.len())
                        .filter(|i| mask & (1 << i) != 0)
                        .map(|i| keys[i].clone())
                        .collect();
                    if mask & (1 << th.len()) != 0 {
                        fired.insert("usage_percent:7".into());
                    }
                    let (events, next) = cross(before, after, &th, &fired);
                    for (i, t) in th.iter().enumerate() {
                        let was = fired.contains(&keys[i]);
                        let fires = events.contains(&Crossing::Fired(t.clone()));
                        let recovers = events.contains(&Crossing::Recovered(t.clone()));
                        assert_eq!(
                            fires,
                            !was && !t.is_crossed(before) && t.is_crossed(after),
                            "{t:?} {before:?} {after:?} {fired:?}"
                        );
                        assert_eq!(recovers, was && !t.is_crossed(after));
                        assert_eq!(next.contains(&keys[i]), t.is_crossed(after) && (was || fires));
                    }
                    assert!(!next.contains("usage_percent:7"));
                    assert!(events.len() <= th.len());
                    // Applying the same batch twice changes nothing the second time.
                    let (again, next2) = cross(after, after, &th, &next);
                    assert!(again.is_empty());
                    assert_eq!(next2, next);
                    cases += 1;
                }
            }
        }
        assert_eq!(cases, 42 * 42 * 32);
    }

    fn threshold() -> impl Strategy<Value = Threshold> {
        prop_oneof![
            (1u32..=100).prop_map(Threshold::UsagePercent),
            (-5i64..60).prop_map(|b| Threshold::BalanceBelow(Decimal::from(b))),
            Just(Threshold::Depleted),
        ]
    }

    /// A pool's life: consumption, grants, expiries, as (balance, granted) steps.
    fn walk() -> impl Strategy<Value = Vec<Level>> {
        proptest::collection::vec((-30i64..30, 0i64..3), 1..60).prop_map(|steps| {
            let (mut b, mut g) = (0i64, 0i64);
            steps
                .into_iter()
                .map(|(d, grant)| {
                    if grant == 0 {
                        g += 40;
                        b += 40;
                    }
                    b = (b + d).max(-20);
                    Level {
                        balance: Decimal::from(b),
                        granted: Decimal::from(g),
                    }
                })
                .collect()
        })
    }

    proptest! {
        /// Against a reference model that only looks at the whole walk: a threshold fires at
        /// exactly each step where the level goes from uncrossed to crossed, and recovers at
        /// exactly each step where it goes back, provided it has fired before.
        #[test]
        fn fires_once_per_crossing_and_recovers_once_per_recovery(
            th in proptest::collection::btree_set(threshold(), 1..5),
            walk in walk(),
        ) {
            let th: Vec<Threshold> = th.into_iter().collect();
            let mut fired = BTreeSet::new();
            let mut prev = Level::EMPTY;
            let mut seen_fire: Vec<bool> = vec![false; th.len()];
            for (step, l) in walk.iter().enumerate() {
                let (events, next) = cross(&prev, l, &th, &fired);
                for (i, t) in th.iter().enumerate() {
                    let down = !t.is_crossed(&prev) && t.is_crossed(l);
                    let up = t.is_crossed(&prev) && !t.is_crossed(l);
                    prop_assert_eq!(events.contains(&Crossing::Fired(t.clone())), down, "step {} {:?}", step, t);
                    prop_assert_eq!(
                        events.contains(&Crossing::Recovered(t.clone())),
                        up && seen_fire[i],
                        "step {} {:?}", step, t
                    );
                    seen_fire[i] |= down;
                    prop_assert_eq!(next.contains(&t.key()), t.is_crossed(l) && seen_fire[i]);
                }
                fired = next;
                prev = *l;
            }
        }

        /// Evaluated only now and then (no endpoint for a while, or several steps in one batch):
        /// per threshold, fires and recoveries still alternate starting with a fire, a fire
        /// only where the level is crossed, never more fires than real crossings.
        #[test]
        fn evaluated_at_some_steps_only_still_alternates(
            th in proptest::collection::btree_set(threshold(), 1..5),
            walk in walk(),
            pick in proptest::collection::vec(any::<bool>(), 60),
        ) {
            let th: Vec<Threshold> = th.into_iter().collect();
            let mut fired = BTreeSet::new();
            let mut last_seen = Level::EMPTY;
            let mut prev = Level::EMPTY;
            let mut history: Vec<Vec<bool>> = vec![Vec::new(); th.len()];
            let mut crossings = vec![0usize; th.len()];
            for (step, l) in walk.iter().enumerate() {
                for (i, t) in th.iter().enumerate() {
                    if !t.is_crossed(&prev) && t.is_crossed(l) {
                        crossings[i] += 1;
                    }
                }
                prev = *l;
                if !pick[step] {
                    continue;
                }
                let (events, next) = cross(&last_seen, l, &th, &fired);
                for e in &events {
                    let (t, is_fire) = match e {
                        Crossing::Fired(t) => (t, true),
                        Crossing::Recovered(t) => (t, false),
                    };
                    let i = th.iter().position(|x| x == t).unwrap();
                    prop_assert_eq!(is_fire, t.is_crossed(l));
                    history[i].push(is_fire);
                }
                fired = next;
                last_seen = *l;
            }
            for (i, h) in history.iter().enumerate() {
                for (k, is_fire) in h.iter().enumerate() {
                    prop_assert_eq!(*is_fire, k % 2 == 0, "{:?}: {:?}", th[i], h);
                }
                prop_assert!(h.iter().filter(|f| **f).count() <= crossings[i]);
            }
        }
    }
}
