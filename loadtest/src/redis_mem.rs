//! Redis memory per retained idempotency key: the dedupe sets of the run's tenants
//! (`<prefix>:{tenant:customer}:d:<hour>`, see `shared::keys`), their `MEMORY USAGE` summed and
//! divided by their members. Set overhead is included, so the figure is what one more retained
//! key really costs on average at this run's keys per set, not just a member's bytes.
#![allow(clippy::float_arithmetic)] // a memory ratio, not money

use anyhow::{Context, Result};

/// Scans the dedupe sets of `tenants` and returns (bytes, retained keys).
pub async fn dedupe_memory(url: &str, prefix: &str, tenants: &[String]) -> Result<(u64, u64)> {
    let client = redis::Client::open(url).context("REDIS_URL")?;
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .context("connecting to Redis")?;
    let (mut bytes, mut members) = (0u64, 0u64);
    for t in tenants {
        // `{` and `}` are literal in Redis globs; tenant ids hold no glob characters.
        let pattern = format!("{prefix}:{{{t}:*}}:d:*");
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut con)
                .await?;
            if !keys.is_empty() {
                let mut pipe = redis::pipe();
                for k in &keys {
                    pipe.cmd("MEMORY").arg("USAGE").arg(k).arg("SAMPLES").arg(0);
                    pipe.cmd("SCARD").arg(k);
                }
                let v: Vec<Option<u64>> = pipe.query_async(&mut con).await?;
                for pair in v.chunks(2) {
                    bytes += pair[0].unwrap_or(0);
                    members += pair[1].unwrap_or(0);
                }
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
    }
    Ok((bytes, members))
}

/// Bytes per retained key, or None when no key is retained.
pub fn per_key(bytes: u64, members: u64) -> Option<f64> {
    (members > 0).then(|| bytes as f64 / members as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_key_is_none_without_keys() {
        assert_eq!(per_key(100, 0), None);
        assert_eq!(per_key(5_600, 100), Some(56.0));
    }
}
