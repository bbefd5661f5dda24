//! API keys and the operator token. A key is `ck_<prefix>_<secret>`, shown once; only its
//! SHA-256 is stored. Lookups are cached for a few seconds; a revoke on this instance takes
//! effect at once, on others within the cache TTL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use rand::distributions::Alphanumeric;
use rand::Rng;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::AppState;

const CACHE_TTL: Duration = Duration::from_secs(10);

/// The tenant a request acts for.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: String,
    pub events_per_second: u32,
}

#[derive(Clone)]
pub struct CachedKey {
    tenant: Tenant,
    prefix: String,
    at: Instant,
}

/// A new random key and its prefix.
pub fn new_key() -> (String, String) {
    let mut rng = rand::thread_rng();
    let prefix: String = (&mut rng).sample_iter(&Alphanumeric).take(10).map(char::from).collect();
    let secret: String = (&mut rng).sample_iter(&Alphanumeric).take(32).map(char::from).collect();
    (format!("ck_{prefix}_{secret}"), prefix)
}

pub fn hash(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

fn bearer(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

impl FromRequestParts<Arc<AppState>> for Tenant {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let key = bearer(parts).ok_or_else(ApiError::unauthorized)?;
        let h = hash(key);
        if let Some(c) = state.keys_cache.get(&h) {
            if c.at.elapsed() < CACHE_TTL {
                return Ok(c.tenant.clone());
            }
        }
        let prefix = key
            .strip_prefix("ck_")
            .and_then(|r| r.split('_').next())
            .ok_or_else(ApiError::unauthorized)?;
        let row: Option<(String, Vec<u8>, i32)> = sqlx::query_as(
            "SELECT k.tenant_id, k.key_hash, t.events_per_second FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
             WHERE k.prefix = $1 AND k.revoked_at IS NULL",
        )
        .bind(prefix)
        .fetch_optional(&state.pg.event)
        .await?;
        let Some((tenant_id, stored, eps)) = row else {
            return Err(ApiError::unauthorized());
        };
        // Both are SHA-256 digests: comparing them leaks nothing about the key.
        if stored != h {
            return Err(ApiError::unauthorized());
        }
        let tenant = Tenant {
            id: tenant_id,
            events_per_second: eps.max(1) as u32,
        };
        state.keys_cache.insert(
            h,
            CachedKey {
                tenant: tenant.clone(),
                prefix: prefix.to_owned(),
                at: Instant::now(),
            },
        );
        Ok(tenant)
    }
}

/// Forget cached lookups: of one key prefix, or of one tenant (its limits changed).
pub fn forget(state: &AppState, prefix: Option<&str>, tenant: Option<&str>) {
    state
        .keys_cache
        .retain(|_, c| prefix.is_none_or(|p| c.prefix != p) && tenant.is_none_or(|t| c.tenant.id != t));
}

/// The operator: `Authorization: Bearer <INGEST_ADMIN_TOKEN>`.
pub struct Operator;

impl FromRequestParts<Arc<AppState>> for Operator {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let given = bearer(parts).ok_or_else(ApiError::unauthorized)?;
        if hash(given) == hash(&state.config.admin_token) {
            Ok(Operator)
        } else {
            Err(ApiError::unauthorized())
        }
    }
}
