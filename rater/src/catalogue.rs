//! The tenant catalogue the rater prices with: credit types and feature mapping versions,
//! cached per tenant and reloaded from Postgres when it may be stale for the events at hand.
//!
//! Reload rule (per tenant, per batch): the events carry timestamps; a load at time L covers
//! every mapping whose version took effect before L. A batch with an event at or after L
//! reloads when the cache is older than `max_age` or names an event the cache does not know, so
//! a new feature is priced at once and a price change is seen within `max_age`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use rust_decimal::Decimal;
use shared::pricing::MappingVersion;
use sqlx::PgPool;

#[derive(Debug, Clone)]
pub struct CreditType {
    pub decimals: u32,
    pub hard: bool,
}

#[derive(Debug, Default)]
pub struct TenantCatalogue {
    pub loaded_at: DateTime<Utc>,
    pub credit_types: HashMap<String, CreditType>,
    /// Event name -> versions sorted by effective_at ascending.
    pub mappings: HashMap<String, Vec<MappingVersion>>,
}

pub struct Catalogue {
    db: PgPool,
    cache: DashMap<String, Arc<TenantCatalogue>>,
    max_age: Duration,
}

impl Catalogue {
    pub fn new(db: PgPool, max_age: Duration) -> Self {
        Self {
            db,
            cache: DashMap::new(),
            max_age,
        }
    }

    /// The catalogue of `tenant`, fresh enough for events up to `max_ts` naming `names`.
    pub async fn get<'a>(
        &self,
        tenant: &str,
        max_ts: DateTime<Utc>,
        mut names: impl Iterator<Item = &'a str>,
    ) -> Result<Arc<TenantCatalogue>, sqlx::Error> {
        if let Some(c) = self.cache.get(tenant) {
            let c = c.clone();
            let stale_for_batch = max_ts >= c.loaded_at;
            let old = (Utc::now() - c.loaded_at).to_std().unwrap_or_default() > self.max_age;
            if !stale_for_batch || !(old || names.any(|n| !c.mappings.contains_key(n))) {
                return Ok(c);
            }
        }
        let c = Arc::new(self.load(tenant).await?);
        metrics::counter!(crate::metric::CATALOGUE_RELOADS).increment(1);
        self.cache.insert(tenant.to_owned(), c.clone());
        Ok(c)
    }

    /// The credit type of a tenant, from the cache or a reload.
    pub async fn credit_type(&self, tenant: &str, id: &str) -> Result<Option<CreditType>, sqlx::Error> {
        if let Some(ct) = self.cache.get(tenant).and_then(|c| c.credit_types.get(id).cloned()) {
            return Ok(Some(ct));
        }
        let c = Arc::new(self.load(tenant).await?);
        self.cache.insert(tenant.to_owned(), c.clone());
        Ok(c.credit_types.get(id).cloned())
    }

    async fn load(&self, tenant: &str) -> Result<TenantCatalogue, sqlx::Error> {
        // Taken before the queries: anything committed after this instant counts as unseen.
        let loaded_at = Utc::now();
        let types: Vec<(String, i16, String)> =
            sqlx::query_as("SELECT id, decimals, limit_kind FROM credit_types WHERE tenant_id = $1")
                .bind(tenant)
                .fetch_all(&self.db)
                .await?;
        let credit_types: HashMap<String, CreditType> = types
            .into_iter()
            .map(|(id, d, l)| {
                (
                    id,
                    CreditType {
                        decimals: d as u32,
                        hard: l == "hard",
                    },
                )
            })
            .collect();
        #[allow(clippy::type_complexity)] // one row of the query below
        let rows: Vec<(String, DateTime<Utc>, String, Decimal, Option<String>)> = sqlx::query_as(
            "SELECT event_name, effective_at, credit_type, credits_per_unit, quantity_dimension
             FROM feature_mappings WHERE tenant_id = $1 ORDER BY event_name, effective_at",
        )
        .bind(tenant)
        .fetch_all(&self.db)
        .await?;
        let mut mappings: HashMap<String, Vec<MappingVersion>> = HashMap::new();
        for (name, effective_at, credit_type, credits_per_unit, quantity_dimension) in rows {
            let decimals = credit_types.get(&credit_type).map_or(0, |c| c.decimals);
            mappings.entry(name).or_default().push(MappingVersion {
                effective_at,
                credit_type,
                credits_per_unit,
                quantity_dimension,
                decimals,
            });
        }
        Ok(TenantCatalogue {
            loaded_at,
            credit_types,
            mappings,
        })
    }
}
