//! The ledger-writer's step for the shared consumer driver (`shared::consume`): a unit is one
//! fact of a ledger message (a message carries a run of them), so a permanent error isolates
//! the one fact Postgres refuses, not the request it travelled with.
//!
//! A dead-lettered usage fact: produced to the dead-letter topic as the input message it came
//! from (replayable to the input topic once the cause is fixed), its status recorded as
//! `dead_lettered`, and, if the rater charged it, its charge written to the ledger as `adjust`
//! entries (source `dead_letter`) where the batch held it, then its deduction and its dedupe
//! mark given back to the hot pool through a `reverse` command (whose reversal fact the rater
//! writes), so the pool's end balances chain through both.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::BorrowedMessage;
use rdkafka::producer::FutureProducer;
use rdkafka::Message;
use shared::config::KafkaArgs;
use shared::consume::{Step, StepError};
use shared::dead_letter::{self, Source};
use shared::model::{partition_key, InputMsg, LedgerMsg, Outcome, PoolId, ReversalFact};

use crate::metric as m;
use crate::settle::Mode;
use crate::settle::Settler;
use crate::webhooks::DutyMeter;

/// One fact of a consumed ledger message (or the whole message, if it does not decode).
pub struct FactUnit {
    pub partition: i32,
    pub offset: i64,
    pub trace_id: Option<Arc<str>>,
    pub fact: Result<LedgerMsg, Undecodable>,
}

/// A ledger message that does not decode: the reason and its bytes.
pub struct Undecodable {
    pub reason: String,
    pub payload: Vec<u8>,
}

impl shared::consume::Unit for FactUnit {
    fn partition(&self) -> i32 {
        self.partition
    }
    fn offset(&self) -> i64 {
        self.offset
    }
}

/// Decode a ledger message into its facts.
pub fn decode(m: &BorrowedMessage<'_>) -> Vec<FactUnit> {
    let payload = m.payload().unwrap_or_default();
    let trace_id: Option<Arc<str>> = shared::kafka::trace_id(m).map(Into::into);
    let (partition, offset) = (m.partition(), m.offset());
    match LedgerMsg::decode_many(payload) {
        Ok(facts) => facts
            .into_iter()
            .map(|f| FactUnit {
                partition,
                offset,
                trace_id: trace_id.clone(),
                fact: Ok(f),
            })
            .collect(),
        Err(e) => vec![FactUnit {
            partition,
            offset,
            trace_id,
            fact: Err(Undecodable {
                reason: format!("undecodable: {e}"),
                payload: payload.to_vec(),
            }),
        }],
    }
}

/// Settle batches of facts.
pub struct SettleStep {
    pub settler: Settler,
    pub producer: FutureProducer,
    pub kafka: KafkaArgs,
    /// How much of its time settlement spends settling (the webhook sender yields when it is most).
    pub duty: DutyMeter,
}

impl Step for SettleStep {
    type Unit = FactUnit;

    fn decode(&self, m: &BorrowedMessage<'_>) -> Vec<FactUnit> {
        decode(m)
    }

    fn rejected(&self, unit: &FactUnit) -> Option<String> {
        unit.fact.as_ref().err().map(|u| u.reason.clone())
    }

    async fn process(&mut self, units: &[FactUnit], attempt: u32) -> Result<(), StepError> {
        let facts: Vec<&LedgerMsg> = units.iter().filter_map(|u| u.fact.as_ref().ok()).collect();
        // A retry takes the checked path (every ledger entry through ON CONFLICT).
        match self
            .settler
            .settle_in(&facts, if attempt > 0 { Mode::Checked } else { Mode::Fast })
            .await
        {
            Ok(()) => Ok(()),
            // The fast path assumes new usage rows have no entries yet; a unique violation there
            // is a broken assumption that the checked path settles, not a poison fact.
            Err(e) if attempt == 0 && shared::consume::sqlstate(&e).as_deref() == Some("23505") => {
                Err(StepError::Transient(e))
            }
            Err(e) => Err(StepError::sorted(e.context("postgres refused the batch"))),
        }
    }

    async fn dead_letter(&mut self, unit: &FactUnit, reason: &str) -> Result<(), StepError> {
        let source = Source {
            topic: &self.kafka.ledger_topic,
            partition: unit.partition,
            offset: unit.offset,
            trace_id: unit.trace_id.as_deref(),
        };
        let fail = |e: anyhow::Error| StepError::Transient(e);
        match &unit.fact {
            Err(u) => {
                metrics::counter!(m::DLQ, "reason" => "undecodable").increment(1);
                dead_letter::produce(
                    &self.producer,
                    &self.kafka.dlq_topic,
                    "",
                    &u.payload,
                    reason,
                    &source,
                    None,
                )
                .await
                .map_err(fail)?;
            }
            Ok(LedgerMsg::Usage(u)) => {
                metrics::counter!(m::DLQ, "reason" => dead_letter::reason_label(reason)).increment(1);
                let e = &u.event;
                // The input message it came from: replayable once the cause is fixed.
                let payload = serde_json::to_vec(&InputMsg::Usage(e.clone())).map_err(|e| fail(e.into()))?;
                let key = partition_key(&e.tenant_id, &e.customer_id);
                let replay = Some(self.kafka.input_topic.as_str());
                dead_letter::produce(
                    &self.producer,
                    &self.kafka.dlq_topic,
                    &key,
                    &payload,
                    reason,
                    &source,
                    replay,
                )
                .await
                .map_err(fail)?;
                dead_letter::record(&self.settler.db, e, "ledger-writer", reason, &source)
                    .await
                    .map_err(|e| fail(e.into()))?;
                // What the rater deducted enters the ledger where this batch held it (the units
                // before it have settled, the ones after it have not), then goes back with the
                // event's dedupe mark (a replay of the dead letter is then charged as a new
                // event, once); the rater writes the give-back as a reversal. The pool's end
                // balances chain through both.
                if let Outcome::Settled {
                    credit_type, entries, ..
                } = &u.outcome
                {
                    let charge = LedgerMsg::DeadLetteredCharge(ReversalFact {
                        pool: PoolId {
                            tenant_id: e.tenant_id.clone(),
                            customer_id: e.customer_id.clone(),
                            resource_id: e.resource_id.clone(),
                            credit_type: credit_type.clone(),
                        },
                        event_uid: e.event_uid,
                        at: e.timestamp,
                        entries: entries.clone(),
                    });
                    self.settler.settle(&[&charge]).await.map_err(fail)?;
                    self.settler.reverse(&[u], true).await.map_err(fail)?;
                }
            }
            Ok(fact) => {
                // A grant or grant change Postgres refuses: kept on the dead-letter topic for the
                // operator (ingest validates grants, so this is not expected).
                metrics::counter!(m::DLQ, "reason" => dead_letter::reason_label(reason)).increment(1);
                let payload = serde_json::to_vec(fact).map_err(|e| fail(e.into()))?;
                let replay = Some(self.kafka.ledger_topic.as_str());
                dead_letter::produce(
                    &self.producer,
                    &self.kafka.dlq_topic,
                    "",
                    &payload,
                    reason,
                    &source,
                    replay,
                )
                .await
                .map_err(fail)?;
            }
        }
        Ok(())
    }

    fn batch_started(&mut self) {
        self.duty.begin();
    }

    fn batch_done(&mut self, units: &[FactUnit], elapsed: Duration) {
        let mut messages = 0u64;
        let mut last = None;
        for u in units {
            if last != Some((u.partition, u.offset)) {
                messages += 1;
                last = Some((u.partition, u.offset));
            }
        }
        metrics::counter!(m::MESSAGES).increment(messages);
        metrics::counter!(m::BATCHES).increment(1);
        metrics::histogram!(m::BATCH_SIZE).record(messages as f64);
        self.duty.record(elapsed);
        tracing::debug!(elapsed_ms = elapsed.as_millis() as u64, "batch settled");
    }
}
