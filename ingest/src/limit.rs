//! The tenant's events-per-second limit.
//!
//! With `INGEST_RATE_LIMITER=redis` (the default) the limit is one GCRA state per tenant in Redis
//! (`gcra.lua`: one atomic call per request), so any number of ingest replicas share it: N
//! replicas admit the tenant's rate, not N times it. `local` keeps a limiter per replica
//! (governor's GCRA, no Redis round trip; the limit is then per replica). When Redis fails, the
//! request is judged by the local limiter instead (counted in `ingest_rate_limiter_fallbacks_total`),
//! so a Redis outage does not stop ingestion.

use std::num::NonZeroU32;
use std::sync::{Arc, LazyLock};

use dashmap::DashMap;
use governor::{DefaultDirectRateLimiter, Quota};

use crate::auth::Tenant;
use crate::metric as m;
use shared::keys::Keys;
use shared::redis_conn::RedisConn;

static GCRA: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(include_str!("lua/gcra.lua")));

/// Where the limit's state lives.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// In Redis: one limit across every replica.
    Redis,
    /// In each replica's memory: the limit applies per replica.
    Local,
}

/// The limit's verdict on one request of `n` events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// Over the rate; the request would fit after this many seconds (at least 1). `None`: more
    /// events in one request than the burst allows, never.
    Refused(Option<u64>),
}

/// The script's arguments for a rate (pure): the emission interval in microseconds (at least 1)
/// and the burst (one second's worth, at least 1 event).
pub fn gcra_args(events_per_second: u32) -> (u64, u64) {
    let rate = u64::from(events_per_second.max(1));
    ((1_000_000 / rate).max(1), rate)
}

/// The verdict of gcra.lua's reply (pure).
pub fn verdict(reply: (i64, i64)) -> Verdict {
    match reply {
        (1, _) => Verdict::Allowed,
        (_, w) if w < 0 => Verdict::Refused(None),
        (_, w) => Verdict::Refused(Some((w as u64).div_ceil(1_000_000).max(1))),
    }
}

pub struct Limiter {
    mode: Mode,
    redis: RedisConn,
    keys: Keys,
    local: DashMap<String, (u32, Arc<DefaultDirectRateLimiter>)>,
}

impl Limiter {
    pub fn new(mode: Mode, redis: RedisConn, keys: Keys) -> Self {
        Self {
            mode,
            redis,
            keys,
            local: DashMap::new(),
        }
    }

    /// Admit `n` events of the tenant, or not.
    pub async fn check(&self, tenant: &Tenant, n: usize) -> Verdict {
        if self.mode == Mode::Redis {
            match self.shared(tenant, n).await {
                Ok(v) => return v,
                Err(e) => {
                    metrics::counter!(m::RATE_LIMITER_FALLBACKS).increment(1);
                    tracing::warn!(error = %e, tenant = %tenant.id, "rate limiter: redis failed, judged by this replica's limiter");
                }
            }
        }
        self.local(tenant, n)
    }

    async fn shared(&self, tenant: &Tenant, n: usize) -> redis::RedisResult<Verdict> {
        let (interval_us, burst) = gcra_args(tenant.events_per_second);
        let mut con = self.redis.clone();
        let reply: (i64, i64) = GCRA
            .key(self.keys.rate_limit(&tenant.id))
            .arg(interval_us)
            .arg(burst)
            .arg(n as u64)
            .invoke_async(&mut con)
            .await?;
        Ok(verdict(reply))
    }

    fn local(&self, tenant: &Tenant, n: usize) -> Verdict {
        let limiter = match self.local.get(&tenant.id) {
            Some(l) if l.0 == tenant.events_per_second => l.1.clone(),
            _ => {
                let rate = NonZeroU32::new(tenant.events_per_second).unwrap_or(NonZeroU32::MIN);
                let l = Arc::new(governor::RateLimiter::direct(Quota::per_second(rate)));
                self.local
                    .insert(tenant.id.clone(), (tenant.events_per_second, l.clone()));
                l
            }
        };
        match u32::try_from(n)
            .ok()
            .and_then(NonZeroU32::new)
            .map(|k| limiter.check_n(k))
        {
            Some(Ok(Ok(()))) => Verdict::Allowed,
            Some(Ok(Err(_))) => Verdict::Refused(Some(1)),
            _ => Verdict::Refused(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_second_of_events_is_the_burst() {
        assert_eq!(gcra_args(100), (10_000, 100));
        assert_eq!(gcra_args(0), (1_000_000, 1));
        assert_eq!(gcra_args(3_000_000), (1, 3_000_000));
    }

    #[test]
    fn replies_become_verdicts_with_whole_seconds_to_wait() {
        assert_eq!(verdict((1, 0)), Verdict::Allowed);
        assert_eq!(verdict((0, 1)), Verdict::Refused(Some(1)));
        assert_eq!(verdict((0, 1_500_000)), Verdict::Refused(Some(2)));
        assert_eq!(verdict((0, -1)), Verdict::Refused(None));
    }
}
