//! Dead letters (guarantee 7): a message that reached a consumer and cannot be applied or
//! stored is produced to the dead-letter topic with headers saying why and where from, and a
//! usage event's terminal status (`dead_lettered`, with the reason) is recorded in Postgres.
//!
//! Headers: `reason` (the error, text), `source_topic`, `source_partition`, `source_offset`,
//! `trace_id` (when the message had one), and `replay_topic`: the topic the payload can be
//! produced to again once the cause is fixed (the input topic for a usage event, whose payload
//! is then the input message; absent when the payload is not replayable as it is).

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::model::UsageEvent;

/// Where a dead letter was consumed from.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub trace_id: Option<&'a str>,
}

impl Source<'_> {
    fn describe(&self) -> String {
        format!("{}/{}/{}", self.topic, self.partition, self.offset)
    }
}

/// The headers of a dead letter.
pub fn headers(reason: &str, source: &Source<'_>, replay_topic: Option<&str>) -> OwnedHeaders {
    let mut h = crate::kafka::trace_headers(source.trace_id)
        .insert(Header {
            key: "reason",
            value: Some(reason),
        })
        .insert(Header {
            key: "source_topic",
            value: Some(source.topic),
        })
        .insert(Header {
            key: "source_partition",
            value: Some(&source.partition.to_string()),
        })
        .insert(Header {
            key: "source_offset",
            value: Some(&source.offset.to_string()),
        });
    if let Some(t) = replay_topic {
        h = h.insert(Header {
            key: "replay_topic",
            value: Some(t),
        });
    }
    h
}

/// Produce a dead letter and wait for its ack.
pub async fn produce(
    producer: &FutureProducer,
    dlq_topic: &str,
    key: &str,
    payload: &[u8],
    reason: &str,
    source: &Source<'_>,
    replay_topic: Option<&str>,
) -> anyhow::Result<()> {
    producer
        .send(
            FutureRecord::to(dlq_topic)
                .key(key)
                .payload(payload)
                .headers(headers(reason, source, replay_topic)),
            std::time::Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| anyhow::Error::new(e).context("dead-letter produce"))?;
    Ok(())
}

/// Text that any Postgres `text` column takes: no NUL, at most `max` characters.
pub fn storable(s: &str, max: usize) -> String {
    s.chars()
        .take(max)
        .map(|c| if c == '\0' { '\u{fffd}' } else { c })
        .collect()
}

/// Record a usage event's terminal status `dead_lettered`. Every value is made storable first,
/// so this insert cannot fail on the data that poisoned the event.
pub async fn record(
    db: &sqlx::PgPool,
    e: &UsageEvent,
    stage: &str,
    reason: &str,
    source: &Source<'_>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO dead_letters (tenant_id, idempotency_key, event_uid, customer_id, stage, reason, source)
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
    )
    .bind(storable(&e.tenant_id, 200))
    .bind(storable(&e.idempotency_key, 200))
    .bind(e.event_uid)
    .bind(storable(&e.customer_id, 200))
    .bind(stage)
    .bind(storable(reason, 2000))
    .bind(storable(&source.describe(), 400))
    .execute(db)
    .await?;
    Ok(())
}

/// A fixed label set for dead-letter reasons (never raw text).
pub fn reason_label(reason: &str) -> &'static str {
    if reason.starts_with("undecodable") {
        "undecodable"
    } else if reason.starts_with("grant amount") {
        "invalid_amount"
    } else if reason.starts_with("pool_total_too_large") {
        "pool_total_too_large"
    } else if reason.contains("postgres") || reason.contains("database") || reason.contains("SQLSTATE") {
        "unstorable"
    } else {
        "other"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storable_text_has_no_nul_and_a_bound() {
        assert_eq!(storable("a\0b", 10), "a\u{fffd}b");
        assert_eq!(storable("abcdef", 3), "abc");
        assert_eq!(storable("ü\0", 1), "ü");
    }
}
