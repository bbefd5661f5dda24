//! The grant sweeper: expiry and activation happen whether or not traffic arrives.
//!
//! Every tick it claims due grants in Postgres (FOR UPDATE SKIP LOCKED, so replicas split the
//! work) and sends `activate` / `expire` commands through the input topic, keyed like the
//! customer's events: the rater stays the only writer of a pool, and the command lands in order
//! with the customer's usage. A command may be sent more than once (a crash, the 30 s resend,
//! an expiry due just after the activation was sent); the rater applies each at most once.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::producer::{FutureProducer, FutureRecord};
use shared::model::{partition_key, GrantRefCmd, InputMsg};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::metric as m;

type Due = (
    String,
    Uuid,
    String,
    String,
    String,
    i16,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    bool,
);

/// Which grants a sweep looks at: all, or one tenant's, or one customer's.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    pub tenant_id: Option<String>,
    pub customer_id: Option<String>,
}

/// Claim up to `limit` grants due at `now` and mark them sent (at the later of the database's
/// clock and the sweep's, so a sweep ahead of time does not claim them again). A command is
/// sent again 30 s after that, and an expiry is sent as soon as it is due even if the grant's
/// activation was sent a moment before.
async fn claim(db: &PgPool, limit: i64, now: DateTime<Utc>, scope: &Scope) -> Result<Vec<Due>, sqlx::Error> {
    sqlx::query_as(
        "WITH due AS (
            SELECT tenant_id, id FROM grants
            WHERE status = 'active'
              AND ((expires_at IS NOT NULL AND expires_at <= $2
                    AND (sweep_sent_at IS NULL OR sweep_sent_at < expires_at OR sweep_sent_at < now() - interval '30 seconds'))
                OR (NOT activated AND effective_at <= $2
                    AND (sweep_sent_at IS NULL OR sweep_sent_at < now() - interval '30 seconds')))
              AND ($3::text IS NULL OR tenant_id = $3) AND ($4::text IS NULL OR customer_id = $4)
            ORDER BY effective_at, created_at, id
            LIMIT $1 FOR UPDATE SKIP LOCKED)
         UPDATE grants g SET sweep_sent_at = GREATEST(now(), $2)
         FROM due, credit_types ct
         WHERE g.tenant_id = due.tenant_id AND g.id = due.id AND ct.tenant_id = g.tenant_id AND ct.id = g.credit_type
         RETURNING g.tenant_id, g.id, g.customer_id, g.resource_id, g.credit_type, ct.decimals, g.effective_at,
                   g.expires_at, g.activated",
    )
    .bind(limit)
    .bind(now)
    .bind(&scope.tenant_id)
    .bind(&scope.customer_id)
    .fetch_all(db)
    .await
}

/// One tick as of `now` (the clock is injectable: `ledger-writer sweep --at` runs one for an
/// operator or a test): returns how many commands were sent. Each command carries the grant's
/// own effective or expiry time, which the rater applies it at.
pub async fn tick(
    db: &PgPool,
    producer: &FutureProducer,
    input_topic: &str,
    now: DateTime<Utc>,
    scope: &Scope,
) -> anyhow::Result<usize> {
    let mut due = claim(db, 1000, now, scope).await?;
    // RETURNING keeps no order: activations go out earliest effective first.
    due.sort_by_key(|d| (d.6, d.1));
    let mut sent = 0;
    for (tenant_id, grant_id, customer_id, resource_id, credit_type, decimals, effective_at, expires_at, activated) in
        due
    {
        let cmd = |at| GrantRefCmd {
            tenant_id: tenant_id.clone(),
            customer_id: customer_id.clone(),
            resource_id: resource_id.clone(),
            credit_type: credit_type.clone(),
            decimals: decimals as u32,
            grant_id,
            at,
            actor: "sweeper".into(),
        };
        let mut msgs = Vec::new();
        if !activated && effective_at <= now {
            msgs.push((InputMsg::Activate(cmd(effective_at)), "activate"));
        }
        if let Some(exp) = expires_at.filter(|e| *e <= now) {
            msgs.push((InputMsg::Expire(cmd(exp)), "expire"));
        }
        let key = partition_key(&tenant_id, &customer_id);
        for (msg, kind) in msgs {
            let payload = serde_json::to_vec(&msg)?;
            producer
                .send(
                    FutureRecord::to(input_topic).key(&key).payload(&payload),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| anyhow::anyhow!("sweep produce: {e}"))?;
            metrics::counter!(m::SWEEP_COMMANDS, "kind" => kind).increment(1);
            sent += 1;
        }
    }
    Ok(sent)
}

/// Sweep every `interval` until `shutdown`.
pub async fn run(
    db: PgPool,
    producer: FutureProducer,
    input_topic: String,
    interval: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        match tick(&db, &producer, &input_topic, Utc::now(), &Scope::default()).await {
            Ok(n) if n > 0 => tracing::info!(commands = n, "grant sweep"),
            Ok(_) => {}
            Err(e) => {
                metrics::counter!(m::ERRORS, "stage" => "sweep").increment(1);
                tracing::warn!(error = %format!("{e:#}"), "grant sweep failed");
            }
        }
    }
}
