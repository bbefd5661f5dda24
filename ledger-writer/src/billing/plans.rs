//! The plan-period scheduler: grants each subscription item's period exactly once.
//!
//! A tick claims the items whose next period has started (`next_at <= now`, row locks with SKIP
//! LOCKED), produces the grant of the current period, waits for Kafka's ack and only then
//! advances `next_period` and commits. A crash anywhere in between leaves `next_period` where it
//! was, so the next tick (here or on a replica) produces the same grant again: its id derives
//! from (customer, revision, item, period) and the rater applies an id once. Nothing is granted
//! twice and no current period is skipped. Periods that ended while nobody was running are not
//! granted (their credits would have expired already); the current one is.
//!
//! `now` is a parameter (the injected clock): tests drive the rules with any clock value.

use chrono::{DateTime, Utc};
use rdkafka::producer::FutureProducer;
use shared::billing::period::{period_index, period_start};
use shared::billing::{ItemRow, ITEM_COLS};
use sqlx::PgPool;

pub struct Scheduler {
    pub db: PgPool,
    pub producer: FutureProducer,
    pub input_topic: String,
}

/// What a due item does at `now`: the period to grant and the item's next (index, start).
/// None if nothing is due (not started yet, or already granted).
pub fn due(item: &ItemRow, now: DateTime<Utc>) -> Option<(i32, i32, DateTime<Utc>)> {
    let c = item.cadence();
    let n = period_index(item.start_at, c, now)?;
    if n < item.next_period {
        return None;
    }
    Some((n, n + 1, period_start(item.start_at, c, n + 1)))
}

impl Scheduler {
    /// One tick: returns how many grants were produced.
    pub async fn tick(&self, now: DateTime<Utc>) -> anyhow::Result<usize> {
        let mut tx = self.db.begin().await?;
        let rows: Vec<ItemRow> = sqlx::query_as(&format!(
            "SELECT {ITEM_COLS} FROM subscription_items i
             JOIN credit_types ct ON ct.tenant_id = i.tenant_id AND ct.id = i.credit_type
             WHERE i.ended_at IS NULL AND i.next_at <= $1
             ORDER BY i.next_at LIMIT 500 FOR UPDATE OF i SKIP LOCKED"
        ))
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let mut sent = 0;
        for item in &rows {
            let Some((n, next, next_at)) = due(item, now) else {
                continue;
            };
            if n > item.next_period {
                tracing::warn!(customer = %item.customer_id, item = %item.item, missed = n - item.next_period,
                    "periods that ended unattended are not granted");
            }
            super::produce_grants(
                &self.producer,
                &self.input_topic,
                &item.tenant_id,
                vec![item.grant(n)],
                "scheduler",
            )
            .await?;
            sqlx::query(
                "UPDATE subscription_items SET next_period = $5, next_at = $6
                 WHERE tenant_id = $1 AND customer_id = $2 AND revision = $3 AND item = $4",
            )
            .bind(&item.tenant_id)
            .bind(&item.customer_id)
            .bind(item.revision)
            .bind(&item.item)
            .bind(next)
            .bind(next_at)
            .execute(&mut *tx)
            .await?;
            sent += 1;
        }
        tx.commit().await?;
        Ok(sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal::Decimal;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn item(cadence: &str, next_period: i32) -> ItemRow {
        ItemRow {
            tenant_id: "t".into(),
            customer_id: "c".into(),
            revision: 1,
            item: "plan:pro:0".into(),
            source: "plan".into(),
            display_name: "Pro".into(),
            credit_type: "api".into(),
            amount: Decimal::from(50_000),
            cadence: cadence.into(),
            start_at: t("2024-01-31T10:00:00Z"),
            next_period,
            decimals: 0,
        }
    }

    /// Simulate the scheduler against an injected clock: a tick every `step`, a crash (the
    /// grant produced, the advance lost) every `crash_every` ticks. Returns the grants the rater
    /// would apply (distinct ids) in order of first production.
    fn simulate(cadence: &str, until: DateTime<Utc>, step: chrono::Duration, crash_every: usize) -> Vec<i32> {
        let mut it = item(cadence, 0);
        let mut applied: Vec<uuid::Uuid> = Vec::new();
        let mut periods = Vec::new();
        let mut now = it.start_at;
        let mut ticks = 0;
        while now < until {
            if let Some((n, next, _)) = due(&it, now) {
                let g = it.grant(n);
                assert_eq!(g.effective_at, period_start(it.start_at, it.cadence(), n));
                assert_eq!(g.expires_at, Some(period_start(it.start_at, it.cadence(), n + 1)));
                if !applied.contains(&g.id) {
                    applied.push(g.id);
                    periods.push(n);
                }
                ticks += 1;
                if crash_every == 0 || ticks % crash_every != 0 {
                    it.next_period = next;
                }
            }
            now += step;
        }
        periods
    }

    #[test]
    fn every_period_is_granted_once_across_crashes_at_the_boundary() {
        let until = t("2026-02-15T00:00:00Z");
        // Two years of monthly periods from Jan 31: 25 periods, each once, none skipped.
        for crash_every in [0, 1, 2, 3] {
            let p = simulate("monthly", until, chrono::Duration::hours(1), crash_every);
            assert_eq!(p, (0..25).collect::<Vec<_>>(), "crash every {crash_every}");
        }
        let p = simulate("yearly", until, chrono::Duration::hours(5), 2);
        assert_eq!(p, vec![0, 1, 2]);
    }

    #[test]
    fn exactly_at_the_boundary_the_new_period_is_due() {
        let it = item("monthly", 1);
        let b = t("2024-02-29T10:00:00Z");
        assert_eq!(due(&it, b - chrono::Duration::milliseconds(1)), None);
        assert_eq!(due(&it, b), Some((1, 2, t("2024-03-31T10:00:00Z"))));
        // Down for two months: only the current period is granted, the next is after it.
        assert_eq!(
            due(&it, t("2024-04-30T11:00:00Z")),
            Some((3, 4, t("2024-05-31T10:00:00Z")))
        );
    }
}
