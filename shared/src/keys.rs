//! Redis keys. Every key of one customer carries the Cluster hash tag `{tenant:customer}`, so one
//! Lua call can touch all of them and the same code runs on Redis Cluster.

/// Key builder bound to a prefix (`cr` in production; tests use their own).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self { prefix: prefix.into() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The hash holding one pool: its grants, overdraft, applied-offset watermark.
    pub fn pool(&self, tenant: &str, customer: &str, credit_type: &str, resource: &str) -> String {
        // `/` cannot occur in ids, so credit type and resource never run together.
        format!("{}:{{{tenant}:{customer}}}:p:{credit_type}/{resource}", self.prefix)
    }

    /// The tenant's rate-limit state (ingest's GCRA, shared by its replicas).
    pub fn rate_limit(&self, tenant: &str) -> String {
        format!("{}:{{{tenant}}}:rl", self.prefix)
    }

    /// The journal of recent outcomes of one pool (for exact replay after a crash).
    pub fn journal(&self, pool_key: &str) -> String {
        format!("{pool_key}:j")
    }

    /// The prefix of the customer's dedupe sets (and of its reverse marks); a set's name is the
    /// prefix and the start of its period in seconds since the epoch.
    pub fn dedupe_prefix(&self, tenant: &str, customer: &str) -> String {
        format!("{}:{{{tenant}:{customer}}}:d:", self.prefix)
    }

    /// The mark that a reverse of this event was applied (apply.lua sets it once per uid).
    pub fn reverse_mark(&self, tenant: &str, customer: &str, event_uid: &uuid::Uuid) -> String {
        format!("{}rv:{event_uid}", self.dedupe_prefix(tenant, customer))
    }

    /// The customer's dedupe sets at `now_ms`, as apply.lua takes them: the current period's
    /// first (new marks go there), then each earlier period a mark made within the last
    /// `window_s` may be in, then the next period (a rater whose clock runs ahead may have
    /// marked there). A repeat of an idempotency key is found whatever timestamp it carries.
    pub fn dedupe_sets(&self, tenant: &str, customer: &str, now_ms: i64, window_s: u64) -> Vec<String> {
        let prefix = self.dedupe_prefix(tenant, customer);
        let len = dedupe_period_s(window_s);
        let p = now_ms.div_euclid(len * 1000);
        std::iter::once(p)
            .chain((1..=DEDUPE_PERIODS_PER_WINDOW).map(|i| p - i))
            .chain(std::iter::once(p + 1))
            .map(|q| format!("{prefix}{}", q * len))
            .collect()
    }
}

/// A customer's dedupe marks go into one set per period of a quarter of the dedupe window, by
/// the time the rater sees the event (not the event's timestamp, which a repeat may change); a
/// set expires one window after the last mark added to it, so a mark lives between one window
/// and a window and a quarter. A repeat arriving within the window of the first copy is in the
/// current period's set or one of the four before it.
pub const DEDUPE_PERIODS_PER_WINDOW: i64 = 4;

/// The length of one dedupe period, seconds (at least 1; rounded up, so the periods looked in
/// always cover the whole window).
pub fn dedupe_period_s(window_s: u64) -> i64 {
    ((window_s as i64 + DEDUPE_PERIODS_PER_WINDOW - 1) / DEDUPE_PERIODS_PER_WINDOW).max(1)
}

/// The set member that marks an idempotency key as seen: the first 96 bits of its SHA-256.
/// Keys are up to 128 characters; a fixed 12-byte member keeps every mark the same small size.
/// Two distinct keys of one customer and period collide with probability about n^2 / 2^97
/// (n = 10^9 keys in one hour: 6e-12).
pub fn dedupe_member(idempotency_key: &str) -> [u8; 12] {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(idempotency_key.as_bytes());
    let mut m = [0u8; 12];
    m.copy_from_slice(&d[..12]);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_hash_tag_per_customer() {
        let k = Keys::new("cr");
        let p = k.pool("t1", "c1", "ai", "");
        assert_eq!(p, "cr:{t1:c1}:p:ai/");
        assert!(k.dedupe_prefix("t1", "c1").starts_with("cr:{t1:c1}:"));
        assert!(k.journal(&p).starts_with("cr:{t1:c1}:"));
        assert_eq!(
            k.reverse_mark("t1", "c1", &uuid::Uuid::nil()),
            "cr:{t1:c1}:d:rv:00000000-0000-0000-0000-000000000000"
        );
    }

    #[test]
    fn dedupe_sets_cover_the_window_and_members_are_fixed_size() {
        let k = Keys::new("cr");
        let day = 86_400;
        // Periods of 6 hours: the current one, four before it, the next one.
        let sets = k.dedupe_sets("t1", "c1", 6 * 3_600_000 + 5, day);
        assert_eq!(sets[0], "cr:{t1:c1}:d:21600");
        assert_eq!(sets[1], "cr:{t1:c1}:d:0");
        assert_eq!(sets[2], "cr:{t1:c1}:d:-21600");
        assert_eq!(sets[5], "cr:{t1:c1}:d:43200");
        assert_eq!(sets.len(), 6);
        // A mark made at any instant is among the sets looked in up to one window later.
        for made in [0i64, 1, 21_599_999, 21_600_000, 40_000_000] {
            let at = k.dedupe_sets("t1", "c1", made, day)[0].clone();
            for later in [made, made + 1, made + day as i64 * 1000 - 1, made + day as i64 * 1000] {
                assert!(k.dedupe_sets("t1", "c1", later, day).contains(&at), "{made} {later}");
            }
        }
        assert_eq!(dedupe_period_s(2), 1);
        // A window that is not a multiple of four is still covered to its end.
        for window in [90u64, 7, 86_401] {
            for made in [0i64, 1_234, 22_999] {
                let at = k.dedupe_sets("t1", "c1", made, window)[0].clone();
                let later = made + window as i64 * 1000;
                assert!(
                    k.dedupe_sets("t1", "c1", later, window).contains(&at),
                    "{window} {made}"
                );
            }
        }
        assert_eq!(dedupe_member("a"), dedupe_member("a"));
        assert_ne!(dedupe_member("a"), dedupe_member("b"));
        assert_eq!(dedupe_member(&"x".repeat(128)).len(), 12);
    }
}
