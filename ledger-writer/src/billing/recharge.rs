//! The charge worker: auto-recharge, and finishing charges whose outcome is still open.
//!
//! Per tick:
//! 1. release: a pool's in-flight guard is cleared once its recharge grant is settled (the
//!    settled balance then includes it, so the pool is not recharged twice for one dip);
//! 2. claim: pools whose settled balance is below the threshold, or that have a `deny` ledger
//!    entry newer than the last one seen, and no recharge in flight: the recharge (target -
//!    balance, priced like a top-up) is checked against the spend limit of the current period
//!    (over it: pause `spend_limit_reached` until the period resets or the settings are saved),
//!    then a charge row is written and the guard set, in one transaction;
//! 3. attempt: due pending/unknown charges are sent (a lease in `next_attempt_at` keeps replicas
//!    apart). `succeeded`: grant. `failed`: pause `payment_failed` (no retries until the
//!    settings are saved). Unknown: retry with the same charge_id after 1, 4, 16 x the base
//!    delay; after `BILLING_MAX_ATTEMPTS`, pause `payment_failed` and keep the charge (saving
//!    the settings retries it, still with the same charge_id);
//! 4. grant: succeeded charges whose grant was not acknowledged yet (also top-ups whose request
//!    died after the charge) are granted; the grant id derives from the charge id.
//!
//! Webhooks `credits.auto_recharge.succeeded`, `.failed`, `.paused` are written to the outbox in
//! the transaction that records the outcome, with ids derived from the charge (or the pool and
//! period), so a repeat inserts nothing.

use chrono::{DateTime, Utc};
use rdkafka::producer::FutureProducer;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use shared::billing::charge::{ChargeClient, ChargeOutcome};
use shared::billing::period::spend_period;
use shared::billing::{self, AutoRechargeSettings, ChargeRow, CHARGE_COLS};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::Config;
use crate::webhooks::outbox;

/// Namespace of the ids of auto-recharge webhook messages.
const MSG_NS: Uuid = Uuid::from_u128(0x5e0c_91b2_7a44_4d1f_8f36_c2d7_a90e_14b8);
/// Charges attempted at once by one worker.
const ATTEMPT_BATCH: i64 = 32;
/// Attempts of a top-up left unknown by its request, before it waits for an operator.
const TOP_UP_MAX_ATTEMPTS: i32 = 10;

pub struct Worker {
    pub db: PgPool,
    pub producer: FutureProducer,
    pub input_topic: String,
    pub client: ChargeClient,
    pub cfg: Config,
}

#[derive(sqlx::FromRow)]
struct Candidate {
    tenant_id: String,
    #[sqlx(flatten)]
    settings: AutoRechargeSettings,
    paused_period_start: Option<DateTime<Utc>>,
    balance: Decimal,
    unit_price: Decimal,
    price_currency: String,
    deny_id: Option<i64>,
}

fn pool_data(tenant_customer_resource_ct: (&str, &str, &str), extra: Value) -> Value {
    let (customer, resource, ct) = tenant_customer_resource_ct;
    let mut v = json!({
        "customer_id": customer, "credit_type": ct,
        "resource_id": if resource.is_empty() { None } else { Some(resource) },
    });
    if let (Some(m), Value::Object(e)) = (v.as_object_mut(), extra) {
        m.extend(e);
    }
    v
}

fn charge_data(c: &ChargeRow, extra: Value) -> Value {
    let mut base = json!({
        "charge_id": c.id, "amount": c.amount.normalize().to_string(), "currency": c.currency,
        "credits": c.credits.normalize().to_string(), "payment_method_id": c.payment_method_id,
        "grant_id": c.grant_id,
    });
    if let (Some(m), Value::Object(e)) = (base.as_object_mut(), extra) {
        m.extend(e);
    }
    pool_data((&c.customer_id, &c.resource_id, &c.credit_type), base)
}

type PoolRef<'a> = (&'a str, &'a str, &'a str, &'a str);

/// Remember the newest deny entry seen for the pool: older denials trigger nothing more.
async fn mark_seen(tx: &mut PgConnection, key: PoolRef<'_>, deny: Option<i64>) -> sqlx::Result<()> {
    if let Some(d) = deny {
        sqlx::query(
            "UPDATE auto_recharge SET deny_seen_id = GREATEST(deny_seen_id, $5) WHERE tenant_id = $1
                AND customer_id = $2 AND credit_type = $3 AND resource_id = $4",
        )
        .bind(key.0)
        .bind(key.1)
        .bind(key.2)
        .bind(key.3)
        .bind(d)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

async fn emit(conn: &mut PgConnection, tenant: &str, kind: &'static str, cause: &str, data: Value) -> sqlx::Result<()> {
    let id = Uuid::new_v5(&MSG_NS, format!("{kind}/{tenant}/{cause}").as_bytes());
    outbox::insert(conn, &[outbox::message(id, tenant, kind, Utc::now(), data)]).await?;
    Ok(())
}

impl Candidate {
    fn key(&self) -> PoolRef<'_> {
        let s = &self.settings;
        (&self.tenant_id, &s.customer_id, &s.credit_type, &s.resource_id)
    }
}

/// A recharge to make: credits to grant and what they cost.
#[derive(Debug, PartialEq)]
struct Recharge {
    credits: Decimal,
    amount: Decimal,
}

/// The recharge a candidate pool needs in the spend period starting at `start`: up to its
/// target, priced like a top-up. None while it is paused for this period (it waits for the
/// next one, or new settings), when it is at or above its target, or when its top-up price is
/// in another currency than its spend limit.
fn recharge_of(c: &Candidate, start: DateTime<Utc>) -> Option<Recharge> {
    let s = &c.settings;
    if s.paused_reason.is_some() && c.paused_period_start == Some(start) {
        return None;
    }
    let credits = s.target_balance - c.balance;
    if credits <= Decimal::ZERO || c.price_currency != s.currency {
        return None;
    }
    Some(Recharge {
        credits,
        amount: billing::price(credits, c.unit_price),
    })
}

/// The recharge would pass the spend limit: pause the pool until the period from `start` ends
/// (or the settings are saved), and say so once per period.
async fn pause_at_spend_limit(
    tx: &mut PgConnection,
    c: &Candidate,
    start: DateTime<Utc>,
    spent: Decimal,
    amount: Decimal,
) -> anyhow::Result<()> {
    let (s, key) = (&c.settings, c.key());
    sqlx::query(
        "UPDATE auto_recharge SET paused_reason = 'spend_limit_reached', paused_at = now(),
            paused_period_start = $5, updated_at = now()
         WHERE tenant_id = $1 AND customer_id = $2 AND credit_type = $3 AND resource_id = $4",
    )
    .bind(key.0)
    .bind(key.1)
    .bind(key.2)
    .bind(key.3)
    .bind(start)
    .execute(&mut *tx)
    .await?;
    mark_seen(tx, key, c.deny_id).await?;
    tracing::info!(customer = %s.customer_id, credit_type = %s.credit_type, %spent, %amount,
        "auto-recharge paused: spend limit reached");
    emit(
        tx,
        &c.tenant_id,
        billing::AUTO_RECHARGE_PAUSED,
        &format!(
            "{}/{}/{}/{}",
            s.customer_id,
            s.credit_type,
            s.resource_id,
            start.timestamp()
        ),
        pool_data(
            (&s.customer_id, &s.resource_id, &s.credit_type),
            json!({"paused_reason": "spend_limit_reached",
                "spent_this_period": {"amount": spent.normalize().to_string(), "currency": s.currency},
                "monthly_spend_limit": {"amount": s.spend_limit.normalize().to_string(), "currency": s.currency},
                "balance": c.balance.normalize().to_string()}),
        ),
    )
    .await?;
    Ok(())
}

/// Write the recharge's charge row (sent by `attempt_due`) and set the pool's in-flight guard.
async fn start_recharge(tx: &mut PgConnection, c: &Candidate, r: &Recharge, now: DateTime<Utc>) -> anyhow::Result<()> {
    let (s, key) = (&c.settings, c.key());
    let charge_id = billing::new_charge_id();
    sqlx::query(
        "INSERT INTO charges (tenant_id, id, reason, customer_id, resource_id, credit_type, credits, amount,
            currency, payment_method_id, grant_expiration_days, grant_id, billed_at)
         VALUES ($1, $2, 'auto_recharge', $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(key.0)
    .bind(&charge_id)
    .bind(key.1)
    .bind(key.3)
    .bind(key.2)
    .bind(r.credits)
    .bind(r.amount)
    .bind(&s.currency)
    .bind(&s.payment_method_id)
    .bind(s.grant_expiration_days)
    .bind(billing::charge_grant_id(key.0, &charge_id))
    .bind(now)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE auto_recharge SET in_flight_charge = $5, in_flight_since = now(), paused_reason = NULL,
            paused_at = NULL, paused_period_start = NULL, updated_at = now()
         WHERE tenant_id = $1 AND customer_id = $2 AND credit_type = $3 AND resource_id = $4",
    )
    .bind(key.0)
    .bind(key.1)
    .bind(key.2)
    .bind(key.3)
    .bind(&charge_id)
    .execute(&mut *tx)
    .await?;
    mark_seen(tx, key, c.deny_id).await?;
    tracing::info!(customer = %s.customer_id, credit_type = %s.credit_type, credits = %r.credits,
        amount = %r.amount, %charge_id, balance = %c.balance, "auto-recharge started");
    Ok(())
}

impl Worker {
    pub async fn tick(&self) -> anyhow::Result<()> {
        self.release().await?;
        self.claim(self.cfg.now()).await?;
        self.attempt_due().await?;
        self.grant_succeeded().await?;
        Ok(())
    }

    async fn release(&self) -> anyhow::Result<()> {
        sqlx::query(
            "UPDATE auto_recharge a SET in_flight_charge = NULL, in_flight_since = NULL, last_recharge_at = now(),
                updated_at = now()
             FROM charges c JOIN grants g ON g.tenant_id = c.tenant_id AND g.id = c.grant_id
             WHERE a.in_flight_charge IS NOT NULL AND c.tenant_id = a.tenant_id AND c.id = a.in_flight_charge
                AND c.status = 'succeeded'",
        )
        .execute(&self.db)
        .await?;
        Ok(())
    }

    async fn claim(&self, now: DateTime<Utc>) -> anyhow::Result<()> {
        let mut tx = self.db.begin().await?;
        let rows: Vec<Candidate> = sqlx::query_as(
            "SELECT a.tenant_id, a.customer_id, a.resource_id, a.credit_type, a.threshold, a.target_balance, a.spend_limit,
                a.currency, a.reset_day, a.grant_expiration_days, a.payment_method_id, a.paused_reason,
                a.paused_period_start, p.balance, tp.unit_price, tp.currency AS price_currency,
                (SELECT max(l.id) FROM ledger_entries l WHERE l.tenant_id = a.tenant_id
                    AND l.customer_id = a.customer_id AND l.credit_type = a.credit_type
                    AND l.resource_id = a.resource_id AND l.type = 'deny' AND l.id > a.deny_seen_id) AS deny_id
             FROM auto_recharge a
             JOIN pools p ON p.tenant_id = a.tenant_id AND p.customer_id = a.customer_id
                AND p.credit_type = a.credit_type AND p.resource_id = a.resource_id
             JOIN top_up_prices tp ON tp.tenant_id = a.tenant_id AND tp.credit_type = a.credit_type
             WHERE a.enabled AND a.in_flight_charge IS NULL
                AND (a.paused_reason IS NULL OR a.paused_reason = 'spend_limit_reached')
             ORDER BY a.updated_at LIMIT 200
             FOR UPDATE OF a SKIP LOCKED",
        )
        .fetch_all(&mut *tx)
        .await?;
        // Only the pools below their threshold or with new denials.
        let rows: Vec<Candidate> = rows
            .into_iter()
            .filter(|c| c.balance < c.settings.threshold || c.deny_id.is_some())
            .collect();
        for c in rows {
            self.claim_one(&mut tx, &c, now).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Recharge one candidate pool, pause it at its spend limit, or only note its denials seen.
    async fn claim_one(&self, tx: &mut PgConnection, c: &Candidate, now: DateTime<Utc>) -> anyhow::Result<()> {
        let (start, _) = spend_period(c.settings.reset_day as u32, now);
        let key = c.key();
        let Some(r) = recharge_of(c, start) else {
            mark_seen(tx, key, c.deny_id).await?;
            return Ok(());
        };
        let spent = shared::billing::recharge::spent_since(&mut *tx, key, start).await?;
        if spent + r.amount > c.settings.spend_limit {
            pause_at_spend_limit(tx, c, start, spent, r.amount).await
        } else {
            start_recharge(tx, c, &r, now).await
        }
    }

    async fn attempt_due(&self) -> anyhow::Result<()> {
        let lease = (self.cfg.charge_timeout_ms / 1000 + 10) as f64;
        let due: Vec<ChargeRow> = sqlx::query_as(&format!(
            "UPDATE charges c SET next_attempt_at = now() + make_interval(secs => $1)
             FROM (SELECT tenant_id, id FROM charges WHERE status IN ('pending', 'unknown') AND next_attempt_at <= now()
                   ORDER BY next_attempt_at LIMIT $2 FOR UPDATE SKIP LOCKED) d
             WHERE c.tenant_id = d.tenant_id AND c.id = d.id
             RETURNING {}",
            CHARGE_COLS
                .split(',')
                .map(|c| format!("c.{}", c.trim()))
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .bind(lease)
        .bind(ATTEMPT_BATCH)
        .fetch_all(&self.db)
        .await?;
        let results = futures::future::join_all(due.iter().map(|c| self.attempt(c))).await;
        for r in results {
            r?;
        }
        Ok(())
    }

    async fn attempt(&self, c: &ChargeRow) -> anyhow::Result<()> {
        let settings: Option<(String, String)> =
            sqlx::query_as("SELECT charge_url, secret FROM payment_settings WHERE tenant_id = $1")
                .bind(&c.tenant_id)
                .fetch_optional(&self.db)
                .await?;
        let started = std::time::Instant::now();
        let outcome = match &settings {
            Some((url, secret)) => self.client.charge(url, secret, &c.request()).await,
            None => ChargeOutcome::Failed("payments_not_configured".into()),
        };
        if settings.is_some() {
            metrics::histogram!(crate::metric::BILLING_CHARGE_DURATION).record(started.elapsed().as_secs_f64());
        }
        let label = match &outcome {
            ChargeOutcome::Succeeded => "succeeded",
            ChargeOutcome::Failed(_) => "failed",
            ChargeOutcome::Unknown(_) => "unknown",
        };
        metrics::counter!(crate::metric::BILLING_CHARGES, "outcome" => label).increment(1);
        let auto = c.reason == "auto_recharge";
        let attempts = c.attempts + 1;
        let mut tx = self.db.begin().await?;
        match &outcome {
            ChargeOutcome::Succeeded => {
                sqlx::query(
                    "UPDATE charges SET status = 'succeeded', failure_reason = NULL, attempts = $3, updated_at = now()
                     WHERE tenant_id = $1 AND id = $2 AND status IN ('pending', 'unknown')",
                )
                .bind(&c.tenant_id)
                .bind(&c.id)
                .bind(attempts)
                .execute(&mut *tx)
                .await?;
                if auto {
                    emit(
                        &mut tx,
                        &c.tenant_id,
                        billing::AUTO_RECHARGE_SUCCEEDED,
                        &c.id,
                        charge_data(c, json!({})),
                    )
                    .await?;
                }
                tracing::info!(charge_id = %c.id, reason = %c.reason, "charge succeeded");
            }
            ChargeOutcome::Failed(r) => {
                sqlx::query(
                    "UPDATE charges SET status = 'failed', failure_reason = $4, attempts = $3, updated_at = now()
                     WHERE tenant_id = $1 AND id = $2 AND status IN ('pending', 'unknown')",
                )
                .bind(&c.tenant_id)
                .bind(&c.id)
                .bind(attempts)
                .bind(r)
                .execute(&mut *tx)
                .await?;
                if auto {
                    self.pause_payment_failed(&mut tx, c, "failed").await?;
                }
                tracing::info!(charge_id = %c.id, reason = %r, "charge declined");
            }
            ChargeOutcome::Unknown(r) => {
                let cap = if auto {
                    self.cfg.max_attempts
                } else {
                    TOP_UP_MAX_ATTEMPTS
                };
                let delay_ms = self
                    .cfg
                    .retry_base_ms
                    .saturating_mul(4u64.saturating_pow(c.attempts.clamp(0, 10) as u32));
                // After the last attempt the charge waits: for new settings (auto-recharge) or an
                // operator (a top-up); it is never replaced by a new charge.
                let next = if attempts >= cap {
                    "'infinity'::timestamptz".to_owned()
                } else {
                    format!("now() + make_interval(secs => {delay_ms}::float8 / 1000)")
                };
                sqlx::query(&format!(
                    "UPDATE charges SET status = 'unknown', failure_reason = $4, attempts = $3, updated_at = now(),
                        next_attempt_at = {next}
                     WHERE tenant_id = $1 AND id = $2 AND status IN ('pending', 'unknown')"
                ))
                .bind(&c.tenant_id)
                .bind(&c.id)
                .bind(attempts)
                .bind(r)
                .execute(&mut *tx)
                .await?;
                if auto && attempts >= cap {
                    self.pause_payment_failed(&mut tx, c, "unknown").await?;
                }
                tracing::warn!(charge_id = %c.id, attempts, reason = %r, "charge outcome unknown");
            }
        }
        tx.commit().await?;
        if outcome == ChargeOutcome::Succeeded {
            self.grant(std::slice::from_ref(c)).await?;
        }
        Ok(())
    }

    /// Pause the pool's auto-recharge after a decline (or an outcome that stayed unknown). A
    /// declined charge releases the guard; an unknown one keeps it (it may still succeed).
    async fn pause_payment_failed(&self, tx: &mut PgConnection, c: &ChargeRow, outcome: &str) -> anyhow::Result<()> {
        sqlx::query(
            "UPDATE auto_recharge SET paused_reason = 'payment_failed', paused_at = now(), updated_at = now(),
                in_flight_charge = CASE WHEN $6 THEN NULL ELSE in_flight_charge END,
                in_flight_since = CASE WHEN $6 THEN NULL ELSE in_flight_since END
             WHERE tenant_id = $1 AND customer_id = $2 AND credit_type = $3 AND resource_id = $4
                AND in_flight_charge = $5",
        )
        .bind(&c.tenant_id)
        .bind(&c.customer_id)
        .bind(&c.credit_type)
        .bind(&c.resource_id)
        .bind(&c.id)
        .bind(outcome == "failed")
        .execute(&mut *tx)
        .await?;
        let data = charge_data(c, json!({"outcome": outcome, "paused_reason": "payment_failed"}));
        emit(tx, &c.tenant_id, billing::AUTO_RECHARGE_FAILED, &c.id, data.clone()).await?;
        emit(tx, &c.tenant_id, billing::AUTO_RECHARGE_PAUSED, &c.id, data).await?;
        Ok(())
    }

    /// Grant succeeded charges whose grant was not acknowledged yet. A top-up's own request
    /// grants it first; this only finishes what a request left (after 10 s).
    async fn grant_succeeded(&self) -> anyhow::Result<()> {
        let rows: Vec<ChargeRow> = sqlx::query_as(&format!(
            "SELECT {CHARGE_COLS} FROM charges WHERE status = 'succeeded' AND granted_at IS NULL
                AND (reason = 'auto_recharge' OR updated_at < now() - interval '10 seconds')
             ORDER BY updated_at LIMIT 100"
        ))
        .fetch_all(&self.db)
        .await?;
        self.grant(&rows).await
    }

    async fn grant(&self, charges: &[ChargeRow]) -> anyhow::Result<()> {
        for c in charges {
            let decimals: Option<i16> =
                sqlx::query_scalar("SELECT decimals FROM credit_types WHERE tenant_id = $1 AND id = $2")
                    .bind(&c.tenant_id)
                    .bind(&c.credit_type)
                    .fetch_optional(&self.db)
                    .await?;
            let Some(d) = decimals else { continue };
            super::produce_grants(
                &self.producer,
                &self.input_topic,
                &c.tenant_id,
                vec![c.grant(d as u32)],
                "billing",
            )
            .await?;
            sqlx::query("UPDATE charges SET granted_at = now() WHERE tenant_id = $1 AND id = $2")
                .bind(&c.tenant_id)
                .bind(&c.id)
                .execute(&self.db)
                .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn candidate(balance: i64) -> Candidate {
        Candidate {
            tenant_id: "t".into(),
            settings: AutoRechargeSettings {
                customer_id: "c".into(),
                resource_id: String::new(),
                credit_type: "credits".into(),
                threshold: Decimal::from(10),
                target_balance: Decimal::from(100),
                spend_limit: Decimal::from(50),
                currency: "USD".into(),
                reset_day: 1,
                grant_expiration_days: None,
                payment_method_id: "pm".into(),
                paused_reason: None,
            },
            paused_period_start: None,
            balance: Decimal::from(balance),
            // 0.333 USD a credit: a recharge of 97 credits costs 32.301, 32.30 in cents.
            unit_price: Decimal::new(333, 3),
            price_currency: "USD".into(),
            deny_id: None,
        }
    }

    #[test]
    fn a_recharge_fills_up_to_the_target_at_the_top_up_price() {
        let start = t("2024-03-01T00:00:00Z");
        assert_eq!(
            recharge_of(&candidate(3), start),
            Some(Recharge {
                credits: Decimal::from(97),
                amount: Decimal::new(3230, 2),
            })
        );
        // Under an overdraft the recharge covers it too.
        assert_eq!(recharge_of(&candidate(-5), start).unwrap().credits, Decimal::from(105));
        // At or above the target (a denial with the balance high): nothing to recharge.
        assert_eq!(recharge_of(&candidate(100), start), None);
        assert_eq!(recharge_of(&candidate(120), start), None);
        // The top-up price in another currency than the spend limit: never charged.
        let mut c = candidate(3);
        c.price_currency = "EUR".into();
        assert_eq!(recharge_of(&c, start), None);
    }

    #[test]
    fn a_pool_paused_at_its_spend_limit_waits_for_the_next_period() {
        let start = t("2024-03-01T00:00:00Z");
        let mut c = candidate(3);
        c.settings.paused_reason = Some("spend_limit_reached".into());
        c.paused_period_start = Some(start);
        assert_eq!(recharge_of(&c, start), None);
        // The next period: recharged again (the claim lifts the pause).
        assert!(recharge_of(&c, t("2024-04-01T00:00:00Z")).is_some());
    }
}
