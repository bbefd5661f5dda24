//! The settled side of the timeline, read from Postgres after the settlement wait: every
//! `usage_events` row of the run's tenants with its `settled_at` and `settled_at - accepted_at`
//! (16 bytes a row, streamed; a million events is a few seconds and 16 MB).

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use sqlx::PgPool;

use super::Settled;

pub async fn read(pool: &PgPool, tenant_ids: &[String]) -> Result<Vec<Settled>> {
    let mut out = Vec::new();
    let mut rows = sqlx::query_as::<_, (DateTime<Utc>, i64)>(
        "select settled_at, (extract(epoch from (settled_at - accepted_at)) * 1000000)::int8 \
         from usage_events where tenant_id = any($1) and settled_at is not null",
    )
    .bind(tenant_ids)
    .fetch(pool);
    while let Some((settled_at, e2e_us)) = rows.try_next().await.context("reading settled_at per event")? {
        out.push(Settled { settled_at, e2e_us });
    }
    Ok(out)
}
