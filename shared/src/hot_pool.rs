//! The one model of a hot pool: the Redis hash that holds one credit pool's grants, overdraft
//! and journal watermark. The rater's Lua scripts (`apply.lua`, `init.lua`) are its only
//! writers; ingest's balance and the ledger-writer's `reconcile` read it through [`HotPool`].
//!
//! Layout of the pool hash (key `Keys::pool`, `cr:{tenant:customer}:p:<credit_type>/<resource>`):
//!
//! | field           | value                                                                 |
//! | --------------- | --------------------------------------------------------------------- |
//! | `off`           | the highest input offset in the journal's newest entry (`-1`: none)   |
//! | `od`            | overdraft, fixed int >= 0                                             |
//! | `lim`           | the pool's limit override, `hard` or `soft` (absent: the credit type's) |
//! | `o:<grant id>`  | the grant's [`OrderKey`]                                              |
//! | `r:<grant id>`  | the grant's remaining, fixed int                                      |
//! | `x:<grant id>`  | the grant ended: `1` voided, `e` expired                              |
//! | `a:<grant id>`  | `1`: a scheduled grant was activated (it entered the ledger)          |
//!
//! The order key makes string order the consumption order; apply.lua sorts grants by it as
//! strings and reads its expiry, effective and created fields by the byte ranges below
//! ([`EXPIRES`], [`EFFECTIVE`], [`CREATED`]; Lua's `string.sub` counts from 1, so `5..18` is
//! `string.sub(k, 6, 18)`).

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::model::Category;

/// The highest grant priority ingest accepts. The order key holds the priority in four digits,
/// so any bound up to 9999 keeps string order equal to numeric order.
pub const MAX_PRIORITY: u32 = 1000;

/// "Never expires" in an order key: sorts after every real expiry. Times are clamped to
/// `0..=NEVER` milliseconds.
pub const NEVER: i64 = 9_999_999_999_999;

/// Byte range of the expiry (ms) in an order key.
pub const EXPIRES: Range<usize> = 5..18;
/// Byte range of the effective time (ms) in an order key.
pub const EFFECTIVE: Range<usize> = 21..34;
/// Byte range of the creation time (ms) in an order key.
pub const CREATED: Range<usize> = 35..48;
/// The length of an order key: 48 bytes of fields and dots, a dot, a hyphenated uuid.
const LEN: usize = 49 + 36;

/// A grant's place in its pool's consumption order:
/// `PPPP.EEEEEEEEEEEEE.C.FFFFFFFFFFFFF.RRRRRRRRRRRRR.<id>` = priority, expires_at ms
/// ([`NEVER`] = never), category (0 promo, 1 paid), effective_at ms, created_at ms, grant id.
/// Lower sorts first; `Ord` is the order of the formatted strings (for priorities up to 9999).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderKey {
    pub priority: u32,
    pub expires_ms: i64,
    pub category: Category,
    pub effective_ms: i64,
    pub created_ms: i64,
    pub id: Uuid,
}

fn clamp_ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis().clamp(0, NEVER)
}

impl OrderKey {
    pub fn new(
        priority: u32,
        expires_at: Option<DateTime<Utc>>,
        category: Category,
        effective_at: DateTime<Utc>,
        created_at: DateTime<Utc>,
        id: Uuid,
    ) -> Self {
        OrderKey {
            priority,
            expires_ms: expires_at.map_or(NEVER, clamp_ms),
            category,
            effective_ms: clamp_ms(effective_at),
            created_ms: clamp_ms(created_at),
            id,
        }
    }

    /// Effective after it was created: it enters the ledger when activated, not when granted.
    pub fn scheduled(&self) -> bool {
        self.effective_ms > self.created_ms
    }

    /// What an event at `ts_ms` may spend from: effective and not yet expired.
    pub fn spendable_at(&self, ts_ms: i64) -> bool {
        self.effective_ms <= ts_ms && ts_ms < self.expires_ms
    }

    fn category_digit(&self) -> u8 {
        match self.category {
            Category::Promo => 0,
            Category::Paid => 1,
        }
    }

    fn sort_tuple(&self) -> (u32, i64, u8, i64, i64, Uuid) {
        (
            self.priority,
            self.expires_ms,
            self.category_digit(),
            self.effective_ms,
            self.created_ms,
            self.id,
        )
    }
}

impl fmt::Display for OrderKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04}.{:013}.{}.{:013}.{:013}.{}",
            self.priority,
            self.expires_ms,
            self.category_digit(),
            self.effective_ms,
            self.created_ms,
            self.id
        )
    }
}

impl Ord for OrderKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Fixed-width decimal fields and a lower-case hyphenated uuid: field order is string order.
        self.sort_tuple().cmp(&other.sort_tuple())
    }
}

impl PartialOrd for OrderKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an order key: {0:?}")]
pub struct BadOrderKey(pub String);

impl FromStr for OrderKey {
    type Err = BadOrderKey;

    /// Exactly what [`fmt::Display`] writes, nothing else.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadOrderKey(s.to_owned());
        let b = s.as_bytes();
        if b.len() != LEN || [4, 18, 20, 34, 48].iter().any(|&i| b[i] != b'.') {
            return Err(bad());
        }
        let digits = |r: Range<usize>| -> Result<i64, BadOrderKey> {
            let f = &s[r];
            if f.bytes().all(|c| c.is_ascii_digit()) {
                f.parse().map_err(|_| bad())
            } else {
                Err(bad())
            }
        };
        let category = match b[19] {
            b'0' => Category::Promo,
            b'1' => Category::Paid,
            _ => return Err(bad()),
        };
        let id_text = &s[49..];
        let id = Uuid::parse_str(id_text).map_err(|_| bad())?;
        if id.hyphenated().to_string() != id_text {
            return Err(bad());
        }
        Ok(OrderKey {
            priority: u32::try_from(digits(0..4)?).map_err(|_| bad())?,
            expires_ms: digits(EXPIRES)?,
            category,
            effective_ms: digits(EFFECTIVE)?,
            created_ms: digits(CREATED)?,
            id,
        })
    }
}

/// How a grant ended (field `x:<id>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Voided,
    Expired,
}

/// One grant of a hot pool, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HotGrant {
    /// The `<grant id>` of its fields (a uuid, as the rater writes it).
    pub id: String,
    /// None if the `o:` value does not parse (never written so; read as a plain grant that is
    /// effective from the epoch and never expires, as the readers always did).
    pub order: Option<OrderKey>,
    /// `r:<id>`; 0 when absent or unreadable.
    pub remaining: i64,
    pub ended: Option<Ended>,
    /// `a:<id>` present.
    pub activated: bool,
}

impl HotGrant {
    /// The grant id, if the field suffix is a uuid.
    pub fn grant_id(&self) -> Option<Uuid> {
        self.id.parse().ok()
    }

    pub fn scheduled(&self) -> bool {
        self.order.is_some_and(|k| k.scheduled())
    }

    /// Its remaining counts in the pool's ledger balance: not scheduled, or activated (an ended
    /// grant's remaining is 0).
    pub fn in_ledger(&self) -> bool {
        !self.scheduled() || self.activated
    }
}

/// A hot pool, read from its hash (HGETALL).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HotPool {
    /// `off`; None when absent.
    pub off: Option<i64>,
    /// `od`; 0 when absent or unreadable.
    pub overdraft: i64,
    /// `lim`: `hard` or `soft`, the pool's override of its credit type's limit.
    pub limit: Option<String>,
    /// Every grant with an `o:` field, by id.
    pub grants: Vec<HotGrant>,
}

/// What ingest reports as the real-time balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Balance {
    /// Spendable now (effective, not expired) minus overdraft, fixed int.
    pub spendable: i64,
    /// Not effective yet, fixed int.
    pub scheduled: i64,
}

impl HotPool {
    /// The typed reading of a pool hash; an empty hash is an empty pool (see [`HotPool::exists`]).
    pub fn from_hash(h: &HashMap<String, String>) -> Self {
        let fixed = |f: &str| h.get(f).and_then(|v| v.parse::<i64>().ok());
        let mut grants: Vec<HotGrant> = h
            .iter()
            .filter_map(|(f, key)| {
                let id = f.strip_prefix("o:")?;
                Some(HotGrant {
                    id: id.to_owned(),
                    order: key.parse().ok(),
                    remaining: fixed(&format!("r:{id}")).unwrap_or(0),
                    ended: h
                        .get(&format!("x:{id}"))
                        .map(|x| if x == "e" { Ended::Expired } else { Ended::Voided }),
                    activated: h.contains_key(&format!("a:{id}")),
                })
            })
            .collect();
        grants.sort_by(|a, b| a.id.cmp(&b.id));
        HotPool {
            off: fixed("off"),
            overdraft: fixed("od").unwrap_or(0),
            limit: h.get("lim").cloned(),
            grants,
        }
    }

    /// The balance at `now_ms` the way apply.lua spends it: a grant counts once effective and
    /// until it expires; overdraft is subtracted. Grants not yet effective are `scheduled`.
    pub fn balance_at(&self, now_ms: i64) -> Balance {
        let (mut spendable, mut scheduled) = (0i64, 0i64);
        for g in &self.grants {
            let (eff, exp) = g.order.map_or((0, i64::MAX), |k| (k.effective_ms, k.expires_ms));
            if eff > now_ms {
                scheduled += g.remaining;
            } else if now_ms < exp {
                spendable += g.remaining;
            }
        }
        Balance {
            spendable: spendable - self.overdraft,
            scheduled,
        }
    }

    /// The pool's ledger balance: what entered the ledger, minus overdraft.
    pub fn ledger_balance(&self) -> i64 {
        self.grants
            .iter()
            .filter(|g| g.in_ledger())
            .map(|g| g.remaining)
            .sum::<i64>()
            - self.overdraft
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(ms).unwrap()
    }

    fn key() -> impl Strategy<Value = OrderKey> {
        (
            0..=MAX_PRIORITY,
            proptest::option::of(-5i64..NEVER + 5),
            any::<bool>(),
            -5i64..NEVER + 5,
            -5i64..NEVER + 5,
            any::<u128>(),
        )
            .prop_map(|(p, e, promo, f, c, id)| {
                let cat = if promo { Category::Promo } else { Category::Paid };
                OrderKey::new(p, e.map(t), cat, t(f), t(c), Uuid::from_u128(id))
            })
    }

    /// The format the rater wrote before this module, verbatim.
    fn legacy(
        priority: u32,
        expires_at: Option<DateTime<Utc>>,
        category: Category,
        effective_at: DateTime<Utc>,
        created_at: DateTime<Utc>,
        id: Uuid,
    ) -> String {
        let exp = expires_at.map_or(NEVER, |t| t.timestamp_millis().clamp(0, NEVER));
        let cat = match category {
            Category::Promo => 0,
            Category::Paid => 1,
        };
        format!(
            "{priority:04}.{exp:013}.{cat}.{:013}.{:013}.{id}",
            effective_at.timestamp_millis().clamp(0, NEVER),
            created_at.timestamp_millis().clamp(0, NEVER)
        )
    }

    #[test]
    fn format_pins_the_layout() {
        let id = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        let k = OrderKey::new(7, None, Category::Promo, t(1_700_000_000_000), t(1_600_000_000_000), id);
        assert_eq!(
            k.to_string(),
            "0007.9999999999999.0.1700000000000.1600000000000.01234567-89ab-cdef-0123-456789abcdef"
        );
        let s = k.to_string();
        assert_eq!(&s[EXPIRES], "9999999999999");
        assert_eq!(&s[EFFECTIVE], "1700000000000");
        assert_eq!(&s[CREATED], "1600000000000");
        assert!(k.scheduled());
        assert!(!k.spendable_at(1_699_999_999_999) && k.spendable_at(1_700_000_000_000));
        assert_eq!(s.len(), LEN);
        let (cat2, upper) = (s.replace(".0.", ".2."), s.to_uppercase());
        let bads: [&str; 5] = ["", "0007.x", &s[..LEN - 1], &cat2, &upper];
        for bad in bads {
            assert!(bad.parse::<OrderKey>().is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn format_is_the_legacy_format_and_parses_back(
            p in 0..=9999u32,
            e in proptest::option::of(-5i64..NEVER + 5),
            promo in any::<bool>(),
            f in -5i64..NEVER + 5,
            c in -5i64..NEVER + 5,
            id in any::<u128>(),
        ) {
            let cat = if promo { Category::Promo } else { Category::Paid };
            let id = Uuid::from_u128(id);
            let k = OrderKey::new(p, e.map(t), cat, t(f), t(c), id);
            prop_assert_eq!(k.to_string(), legacy(p, e.map(t), cat, t(f), t(c), id));
            prop_assert_eq!(k.to_string().parse::<OrderKey>(), Ok(k));
        }

        #[test]
        fn order_is_string_order(a in key(), b in key()) {
            prop_assert_eq!(a.cmp(&b), a.to_string().cmp(&b.to_string()));
        }

        /// balance_at against the computation ingest did on the raw hash.
        #[test]
        fn balance_at_is_what_ingest_computed(
            grants in proptest::collection::vec((key(), -100i64..1000, any::<bool>()), 0..8),
            od in proptest::option::of(0i64..500),
            now in -5i64..NEVER + 5,
        ) {
            let mut h = HashMap::new();
            for (k, rem, has_rem) in &grants {
                h.insert(format!("o:{}", k.id), k.to_string());
                if *has_rem {
                    h.insert(format!("r:{}", k.id), rem.to_string());
                }
            }
            if let Some(od) = od {
                h.insert("od".to_owned(), od.to_string());
            }
            let (mut spendable, mut scheduled) = (0i64, 0i64);
            for (f, key) in &h {
                let Some(id) = f.strip_prefix("o:") else { continue };
                let rem: i64 = h.get(&format!("r:{id}")).and_then(|r| r.parse().ok()).unwrap_or(0);
                let exp: i64 = key.get(5..18).and_then(|x| x.parse().ok()).unwrap_or(i64::MAX);
                let eff: i64 = key.get(21..34).and_then(|x| x.parse().ok()).unwrap_or(0);
                if eff > now {
                    scheduled += rem;
                } else if now < exp {
                    spendable += rem;
                }
            }
            let want = Balance { spendable: spendable - od.unwrap_or(0), scheduled };
            prop_assert_eq!(HotPool::from_hash(&h).balance_at(now), want);
        }
    }

    #[test]
    fn reads_every_field() {
        let g1 = Uuid::from_u128(1);
        let g2 = Uuid::from_u128(2);
        let k1 = OrderKey::new(1, None, Category::Paid, t(0), t(0), g1);
        let k2 = OrderKey::new(1, Some(t(50)), Category::Promo, t(20), t(10), g2);
        let h: HashMap<String, String> = [
            ("off", "7".to_owned()),
            ("od", "3".to_owned()),
            ("lim", "soft".to_owned()),
            (&format!("o:{g1}"), k1.to_string()),
            (&format!("r:{g1}"), "10".to_owned()),
            (&format!("x:{g1}"), "e".to_owned()),
            (&format!("o:{g2}"), k2.to_string()),
            (&format!("r:{g2}"), "5".to_owned()),
            (&format!("a:{g2}"), "1".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let p = HotPool::from_hash(&h);
        assert_eq!(p.off, Some(7));
        assert_eq!(p.overdraft, 3);
        assert_eq!(p.limit.as_deref(), Some("soft"));
        assert_eq!(p.grants.len(), 2);
        assert_eq!(p.grants[0].grant_id(), Some(g1));
        assert_eq!(p.grants[0].ended, Some(Ended::Expired));
        assert_eq!(p.grants[1].order, Some(k2));
        assert!(p.grants[1].scheduled() && p.grants[1].activated && p.grants[1].in_ledger());
        assert_eq!(p.ledger_balance(), 10 + 5 - 3);
        assert_eq!(
            p.balance_at(15),
            Balance {
                spendable: 10 - 3,
                scheduled: 5
            }
        );
        assert_eq!(
            p.balance_at(30),
            Balance {
                spendable: 15 - 3,
                scheduled: 0
            }
        );
        assert_eq!(
            p.balance_at(50),
            Balance {
                spendable: 10 - 3,
                scheduled: 0
            }
        );
        assert_eq!(HotPool::from_hash(&HashMap::new()), HotPool::default());
    }
}
