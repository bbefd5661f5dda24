//! The event path's one effect: messages onto the input topic, acknowledged. Usage events and
//! every pool command (grants, voids, limits) go through here, so "grant, then use" keeps its
//! order in the customer's partition.

use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::FutureRecord;
use shared::model::{partition_key, InputMsg};

use crate::error::{ApiError, ApiResult};
use crate::metric as m;
use crate::AppState;

/// Produce messages to the input topic and wait for every ack. A full producer queue is a 503
/// with Retry-After (backpressure), never an unbounded buffer.
pub async fn produce(s: &AppState, msgs: impl Iterator<Item = InputMsg>) -> ApiResult<()> {
    let started = Instant::now();
    let trace = crate::TRACE_ID.try_with(Clone::clone).ok();
    let mut acks = Vec::new();
    for msg in msgs {
        let (t, c) = msg.tenant_customer();
        let key = partition_key(t, c);
        let payload = serde_json::to_vec(&msg).map_err(ApiError::internal)?;
        match s.producer.send_result(
            FutureRecord::to(&s.config.kafka.input_topic)
                .key(&key)
                .payload(&payload)
                .headers(shared::kafka::trace_headers(trace.as_deref())),
        ) {
            Ok(f) => acks.push(f),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                return Err(ApiError::unavailable(
                    "saturated",
                    "the pipeline is saturated, retry shortly",
                    1,
                ));
            }
            Err((e, _)) => return Err(ApiError::internal(e)),
        }
    }
    for a in acks {
        match tokio::time::timeout(Duration::from_secs(30), a).await {
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err((e, _)))) => return Err(ApiError::internal(e)),
            _ => {
                return Err(ApiError::unavailable(
                    "saturated",
                    "the broker did not acknowledge in time",
                    1,
                ))
            }
        }
    }
    metrics::histogram!(m::PRODUCE_DURATION).record(started.elapsed().as_secs_f64());
    Ok(())
}
