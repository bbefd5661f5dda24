//! Billing tasks beside the settle loop: the plan-period scheduler and the charge worker
//! (auto-recharge, and finishing top-ups whose answer was lost). Both run every
//! `BILLING_TICK_MS`, claim their rows in Postgres with `FOR UPDATE SKIP LOCKED` (replicas split
//! the work), and send credits as grants through the input topic with ids derived from what
//! caused them (a charge, a subscription period), so a repeat after a crash is the same grant.

pub mod plans;
pub mod recharge;

use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use shared::billing::charge::ChargeClient;
use shared::model::{partition_key, GrantCmd, GrantSpec, InputMsg};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::metric as m;

/// The billing settings (flags or env). Charge URLs follow `WEBHOOK_ALLOW_PRIVATE`.
#[derive(clap::Args, Debug, Clone)]
pub struct Config {
    /// How often the scheduler and the charge worker look for work, in milliseconds.
    #[arg(long = "billing-tick-ms", env = "BILLING_TICK_MS", default_value_t = 1000)]
    pub tick_ms: u64,
    /// How long the tenant's billing system has to answer one charge attempt, in milliseconds.
    #[arg(
        long = "billing-charge-timeout-ms",
        env = "BILLING_CHARGE_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub charge_timeout_ms: u64,
    /// Attempts of one auto-recharge charge whose outcome stays unknown (timeouts, 5xx) before
    /// auto-recharge pauses (`payment_failed`); all carry the same charge_id. A decline pauses
    /// at once.
    #[arg(long = "billing-max-attempts", env = "BILLING_MAX_ATTEMPTS", default_value_t = 4,
          value_parser = clap::value_parser!(i32).range(1..=20))]
    pub max_attempts: i32,
    /// First retry delay of a charge, in milliseconds; each further retry waits 4 times longer.
    #[arg(
        long = "billing-retry-base-ms",
        env = "BILLING_RETRY_BASE_MS",
        default_value_t = 1000
    )]
    pub retry_base_ms: u64,
    /// Tests only: move the billing clock (which spend period a recharge counts in) this many
    /// seconds ahead, so a spend-limit reset is tested without waiting for a month. Grants and
    /// plan periods keep the real clock (the rater and the sweeper judge them by it).
    #[arg(long = "billing-clock-offset-s", env = "BILLING_CLOCK_OFFSET_S", default_value_t = 0)]
    pub clock_offset_s: i64,
}

impl Config {
    /// The billing clock.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::Utc::now() + chrono::Duration::seconds(self.clock_offset_s)
    }
}

/// Produce grants to the input topic, keyed like the customer's events, and wait for the acks.
pub async fn produce_grants(
    producer: &FutureProducer,
    topic: &str,
    tenant: &str,
    grants: Vec<GrantSpec>,
    actor: &str,
) -> anyhow::Result<()> {
    let mut msgs = Vec::new();
    for g in grants {
        let key = partition_key(tenant, &g.customer_id);
        let payload = serde_json::to_vec(&InputMsg::Grant(GrantCmd {
            tenant_id: tenant.to_owned(),
            grant: g,
            actor: actor.to_owned(),
        }))?;
        msgs.push((key, payload));
    }
    let acks = msgs.iter().map(|(key, payload)| {
        producer.send(
            FutureRecord::to(topic).key(key).payload(payload),
            Duration::from_secs(30),
        )
    });
    for a in futures::future::join_all(acks).await {
        a.map_err(|(e, _)| anyhow::anyhow!("billing grant produce: {e}"))?;
    }
    Ok(())
}

/// Run both tasks until `shutdown`.
pub fn spawn(
    cfg: Config,
    db: PgPool,
    producer: FutureProducer,
    input_topic: String,
    allow_private: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    crate::metric::describe_billing();
    let client = ChargeClient::new(Duration::from_millis(cfg.charge_timeout_ms), allow_private)?;
    let tick = Duration::from_millis(cfg.tick_ms.max(10));
    let scheduler = plans::Scheduler {
        db: db.clone(),
        producer: producer.clone(),
        input_topic: input_topic.clone(),
    };
    let stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            metrics::counter!(m::BILLING_TICKS, "task" => "scheduler").increment(1);
            match scheduler.tick(chrono::Utc::now()).await {
                Ok(n) if n > 0 => {
                    metrics::counter!(m::BILLING_PLAN_GRANTS).increment(n as u64);
                    tracing::info!(grants = n, "plan periods granted");
                }
                Ok(_) => {}
                Err(e) => {
                    metrics::counter!(m::ERRORS, "stage" => "billing").increment(1);
                    tracing::warn!(error = %format!("{e:#}"), "plan scheduler tick failed");
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
            }
        }
    });
    let worker = recharge::Worker {
        db,
        producer,
        input_topic,
        client,
        cfg,
    };
    tokio::spawn(async move {
        loop {
            metrics::counter!(m::BILLING_TICKS, "task" => "charges").increment(1);
            if let Err(e) = worker.tick().await {
                metrics::counter!(m::ERRORS, "stage" => "billing").increment(1);
                tracing::warn!(error = %format!("{e:#}"), "billing worker tick failed");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
            }
        }
    });
    Ok(())
}
