//! The rater's step for the shared consumer driver (`shared::consume`): a unit is one input
//! message. A permanent error (a pool script that fails on a message, a fact the broker will
//! never take) isolates the message; it goes to the dead-letter topic as it was consumed
//! (replayable to the input topic once the cause is fixed), and a usage event's status becomes
//! `dead_lettered`.

use std::time::Duration;

use rdkafka::message::BorrowedMessage;
use shared::consume::{Step, StepError};
use shared::dead_letter::{self, Source};
use shared::model::InputMsg;

use crate::metric as m;
use crate::pools::PoolError;
use crate::step::InMsg;
use crate::Committed;

impl shared::consume::Unit for InMsg {
    fn partition(&self) -> i32 {
        self.partition
    }
    fn offset(&self) -> i64 {
        self.offset
    }
}

/// Rate batches of input messages.
pub struct RateStep {
    pub step: crate::step::Step,
    pub committed: Committed,
}

/// Sort an error of the batch step: a pool reply the rater cannot read is permanent (it comes
/// from the message), the rest by its cause.
fn sorted(e: anyhow::Error) -> StepError {
    if matches!(e.downcast_ref::<PoolError>(), Some(PoolError::Reply(_))) {
        return StepError::Permanent(e);
    }
    StepError::sorted(e)
}

impl Step for RateStep {
    type Unit = InMsg;

    fn decode(&self, m: &BorrowedMessage<'_>) -> Vec<InMsg> {
        vec![InMsg::from(m)]
    }

    fn rejected(&self, unit: &InMsg) -> Option<String> {
        unit.decoded.as_ref().err().cloned()
    }

    async fn process(&mut self, units: &[InMsg], _attempt: u32) -> Result<(), StepError> {
        self.step
            .process(units, &self.committed.snapshot())
            .await
            .map_err(sorted)
    }

    async fn dead_letter(&mut self, unit: &InMsg, reason: &str) -> Result<(), StepError> {
        metrics::counter!(m::DLQ, "reason" => dead_letter::reason_label(reason)).increment(1);
        let kafka = &self.step.kafka;
        let source = Source {
            topic: &kafka.input_topic,
            partition: unit.partition,
            offset: unit.offset,
            trace_id: unit.trace_id.as_deref(),
        };
        let replay = unit.decoded.is_ok().then_some(kafka.input_topic.as_str());
        let key = match &unit.decoded {
            Ok(msg) => {
                let (t, c) = msg.tenant_customer();
                shared::model::partition_key(t, c)
            }
            Err(_) => String::new(),
        };
        dead_letter::produce(
            &self.step.producer,
            &kafka.dlq_topic,
            &key,
            &unit.payload,
            reason,
            &source,
            replay,
        )
        .await
        .map_err(StepError::Transient)?;
        if let Ok(InputMsg::Usage(e)) = &unit.decoded {
            dead_letter::record(&self.step.store.db, e, "rater", reason, &source)
                .await
                .map_err(|e| StepError::Transient(e.into()))?;
        }
        Ok(())
    }

    fn batch_done(&mut self, units: &[InMsg], elapsed: Duration) {
        metrics::counter!(m::MESSAGES).increment(units.len() as u64);
        metrics::counter!(m::BATCHES).increment(1);
        metrics::histogram!(m::BATCH_SIZE).record(units.len() as f64);
        metrics::histogram!(m::BATCH_DURATION).record(elapsed.as_secs_f64());
    }
}
