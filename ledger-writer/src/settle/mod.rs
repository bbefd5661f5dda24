//! One batch of facts -> one Postgres transaction.
//!
//! 1. usage events: insert, ON CONFLICT DO NOTHING on the key table `usage_event_keys` (the
//!    tables are partitioned by month; the key tables keep each key once across months,
//!    migration 0009), the row only for a key inserted now. A conflicting key with the same event_uid
//!    is a redelivery (skip); with another uid it is a duplicate that slipped past Redis: it is
//!    counted, and a reverse command gives its deduction back to the hot pool (produced and
//!    acked before the commit; the rater applies it once per uid). What the hot pool charged
//!    for it is still written to the ledger (`adjust` entries, source `duplicate`, under its
//!    uid) where Redis charged it, and the rater's reversal fact writes the give-back (`adjust`
//!    entries, source `reversal`, same uid): the pool's end balances chain through both, and
//!    `consume` entries stay exactly the settled events' charges. The same for a second charge
//!    in a pool rebuilt after a Redis loss (source `reapplied`).
//! 2. grants: insert, ON CONFLICT DO NOTHING.
//! 3. ledger entries, in one insert in the order of the facts (a pool's facts are in one
//!    partition, in the rater's order), so ledger ids follow each pool's end-balance chain: a
//!    grant's entry before the usage that draws on it. Those of usage rows inserted in step 1
//!    cannot exist yet (a usage row and its entries are only ever written together): when the
//!    batch holds nothing else, a plain insert (no arbiter probe). Entries of redelivered or
//!    slipped usage are not written at all (copies of one fact within a batch are dropped
//!    first). Each entry's key goes into `ledger_entry_keys` in the same statement. With any
//!    grant or grant-change entry: ON CONFLICT DO NOTHING (on the key) RETURNING what was
//!    new. A retry of a failed transaction takes the checked path for every entry (so a broken
//!    assumption costs one retry, never a stuck partition).
//! 4. grant remainders and pool balances move by the new entries only.
//!
//! `plan` decides every row and move without I/O; `write` has one small function per table.

mod plan;
mod write;

use std::time::{Duration, Instant};

use chrono::Utc;
use rdkafka::producer::{FutureProducer, FutureRecord};
use shared::model::{partition_key, InputMsg, LedgerMsg, Outcome, Release, ReverseCmd, UsageFact};
use sqlx::{PgConnection, PgPool};

pub use plan::{unique_facts, GrantEnd, GrantMove, Mode};

use crate::metric as m;

pub struct Settler {
    pub db: PgPool,
    pub producer: FutureProducer,
    pub input_topic: String,
    /// The window of credits.event.rejected in seconds (`webhooks::Config::rejected_window_s`):
    /// the outbox counts each batch's rejections into the window it falls in.
    pub rejected_window_s: u32,
}

impl Settler {
    /// Settle a batch (the fast path: usage entries of new usage rows without ON CONFLICT).
    pub async fn settle(&self, facts: &[&LedgerMsg]) -> anyhow::Result<()> {
        self.settle_in(facts, Mode::Fast).await
    }

    /// Settle a batch in one transaction.
    pub async fn settle_in(&self, facts: &[&LedgerMsg], mode: Mode) -> anyhow::Result<()> {
        if facts.is_empty() {
            return Ok(());
        }
        let facts = &unique_facts(facts)[..];
        let started = Instant::now();
        let mut tx = self.db.begin().await?;

        // 1. Usage rows, rollups of the rows inserted now, duplicates.
        let usage = plan::deciding_usage(facts);
        let known = known(&mut tx, &usage).await?;
        crate::rollups::add(&mut tx, &usage, &known.new_uids).await?;
        write::duplicates(&mut tx, &plan::duplicates(facts, &known.slipped)).await?;
        // 2. Grants, and the overdraft each repaid (only for grants inserted now).
        let repaid = write::grants(&mut tx, facts).await?;
        // 3. Ledger entries in fact order, then limit overrides.
        let entries = plan::entries(facts, &known, mode, Utc::now());
        let new_rows = write::entries(&mut tx, &entries.rows, entries.checked).await?;
        write::limits(&mut tx, &entries.limits).await?;
        // 4. Grant remainders and pool balances, by what was inserted now.
        let moves = plan::moves(new_rows, entries.activations, repaid);
        write::grant_moves(&mut tx, &moves.grants).await?;
        write::pool_moves(&mut tx, &moves.pools).await?;

        // Give back what slipped duplicates and second charges deducted, durably, before the commit.
        self.reverse(&known.slipped, false).await?;
        self.reverse(&known.reapplied.iter().map(|r| &r.1).collect::<Vec<_>>(), false)
            .await?;
        // Webhook messages caused by this batch, in its transaction.
        let moved = crate::webhooks::outbox::Moved {
            pools: &moves.pools,
            grants: &moves.grants,
            new_usage: &known.new_uids,
        };
        crate::webhooks::outbox::record(&mut tx, facts, &moved, self.rejected_window_s).await?;
        tx.commit().await?;
        metrics::histogram!(m::TX_DURATION).record(started.elapsed().as_secs_f64());
        for s in entries.e2e {
            metrics::histogram!(m::E2E).record(s);
        }
        Ok(())
    }

    /// Give the deductions of `facts` back to their hot pools (`reverse` commands through the
    /// input topic, applied once per event uid); with `release`, their dedupe marks go too.
    pub async fn reverse(&self, facts: &[&UsageFact], release: bool) -> anyhow::Result<()> {
        for u in facts {
            let Outcome::Settled {
                credit_type, entries, ..
            } = &u.outcome
            else {
                continue;
            };
            if entries.is_empty() {
                continue;
            }
            let ev = &u.event;
            tracing::warn!(tenant = %ev.tenant_id, key = %ev.idempotency_key, release, "giving a deduction back to redis");
            let cmd = InputMsg::Reverse(ReverseCmd {
                tenant_id: ev.tenant_id.clone(),
                customer_id: ev.customer_id.clone(),
                resource_id: ev.resource_id.clone(),
                credit_type: credit_type.clone(),
                decimals: entries[0].amount.scale(),
                event_uid: ev.event_uid,
                entries: entries.clone(),
                release: release.then(|| Release {
                    idempotency_key: ev.idempotency_key.clone(),
                    timestamp: ev.timestamp,
                }),
            });
            let payload = serde_json::to_vec(&cmd)?;
            let key = partition_key(&ev.tenant_id, &ev.customer_id);
            // Rare (a duplicate that slipped past Redis): one at a time is fine.
            self.producer
                .send(
                    FutureRecord::to(&self.input_topic).key(&key).payload(&payload),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| anyhow::anyhow!("reverse produce: {e}"))?;
            metrics::counter!(m::REVERSALS).increment(1);
        }
        Ok(())
    }
}

/// Insert the usage rows and classify the ones that were there already (see `plan::Known`).
async fn known<'a>(tx: &mut PgConnection, usage: &[&'a UsageFact]) -> Result<plan::Known<'a>, sqlx::Error> {
    if usage.is_empty() {
        return Ok(plan::Known::default());
    }
    let new_uids = write::usage_rows(tx, usage).await?;
    let lost: Vec<&UsageFact> = usage
        .iter()
        .copied()
        .filter(|u| !new_uids.contains(&u.event.event_uid))
        .collect();
    if lost.is_empty() {
        return Ok(plan::Known {
            new_uids,
            ..plan::Known::default()
        });
    }
    let holders = write::key_holders(tx, &lost).await?;
    let (slipped, redelivered) = plan::split_lost(&lost, &holders);
    let charged = plan::charged(&redelivered);
    let reapplied = if charged.is_empty() {
        Vec::new()
    } else {
        plan::reapplied(&charged, write::settled_consumes(tx, &charged).await?)
    };
    Ok(plan::Known {
        new_uids,
        slipped,
        reapplied,
    })
}
