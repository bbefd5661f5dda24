//! Consumer lag per group, read from the broker as the services read their own
//! (`shared::kafka::spawn_lag_reporter`): for every partition of the group's input topic, the
//! high watermark minus the group's committed offset (the earliest offset where nothing is
//! committed yet, as the consumers start from the earliest), summed.
//!
//! One `BaseConsumer` per group carries the group's `group.id` but never subscribes, so it
//! never joins the group: it only asks the coordinator for the committed offsets. librdkafka's
//! calls block; [`super::sampler`] makes them on a thread of its own, each with a short
//! timeout, and a sample whose reads failed is left empty rather than late.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

/// A consumer group and the topic it consumes, given as `GROUP=TOPIC`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupTopic {
    pub group: String,
    pub topic: String,
}

impl std::str::FromStr for GroupTopic {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('=') {
            Some((g, t)) if !g.trim().is_empty() && !t.trim().is_empty() => Ok(GroupTopic {
                group: g.trim().to_owned(),
                topic: t.trim().to_owned(),
            }),
            _ => Err(format!("expected GROUP=TOPIC, got {s:?}")),
        }
    }
}

/// A group's lag from (committed offset, low watermark, high watermark) per partition; None
/// for a partition means nothing committed there yet.
pub fn group_lag(partitions: &[(Option<i64>, i64, i64)]) -> i64 {
    partitions
        .iter()
        .map(|&(committed, low, high)| (high - committed.unwrap_or(low)).max(0))
        .sum()
}

/// Reads one group's lag.
pub struct LagReader {
    consumer: BaseConsumer,
    topic: String,
    /// Partitions of the topic, read once they are known.
    partitions: Option<i32>,
    timeout: Duration,
}

impl LagReader {
    pub fn new(brokers: &str, gt: &GroupTopic, timeout: Duration) -> Result<Self> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", &gt.group)
            .set("enable.auto.commit", "false")
            .set("client.id", "loadtest-lag")
            .create()
            .with_context(|| format!("a Kafka client for group {}", gt.group))?;
        Ok(LagReader {
            consumer,
            topic: gt.topic.clone(),
            partitions: None,
            timeout,
        })
    }

    fn partition_count(&mut self) -> Result<i32> {
        if let Some(n) = self.partitions {
            return Ok(n);
        }
        let md = self.consumer.fetch_metadata(Some(self.topic.as_str()), self.timeout)?;
        let t = md
            .topics()
            .first()
            .ok_or_else(|| anyhow!("no metadata for topic {}", self.topic))?;
        if let Some(e) = t.error() {
            bail!("topic {}: {e:?}", self.topic);
        }
        let n = i32::try_from(t.partitions().len())?;
        if n == 0 {
            bail!("topic {} has no partitions", self.topic);
        }
        self.partitions = Some(n);
        Ok(n)
    }

    /// The group's lag now; an error as soon as one read fails (so a sample never takes longer
    /// than about one timeout per partition, and usually one timeout in all when the broker is
    /// down).
    pub fn read(&mut self) -> Result<i64> {
        let n = self.partition_count()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..n {
            tpl.add_partition(&self.topic, p);
        }
        let committed = self.consumer.committed_offsets(tpl, self.timeout)?;
        let mut parts = Vec::with_capacity(n as usize);
        for e in committed.elements() {
            let (low, high) = self.consumer.fetch_watermarks(e.topic(), e.partition(), self.timeout)?;
            let c = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            parts.push((c, low, high));
        }
        Ok(group_lag(&parts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_high_watermark_minus_committed_or_the_earliest() {
        assert_eq!(group_lag(&[]), 0);
        assert_eq!(group_lag(&[(Some(90), 0, 100), (Some(100), 0, 100)]), 10);
        // Nothing committed: everything from the low watermark on is still to read.
        assert_eq!(group_lag(&[(None, 40, 100)]), 60);
        // A commit past the watermark (a stale watermark read) is no negative lag.
        assert_eq!(group_lag(&[(Some(120), 0, 100), (Some(1), 0, 3)]), 2);
    }

    #[test]
    fn group_topic_parses() {
        let g: GroupTopic = "ledger-writer=credits.ledger".parse().unwrap();
        assert_eq!(
            g,
            GroupTopic {
                group: "ledger-writer".into(),
                topic: "credits.ledger".into()
            }
        );
        assert!("rater".parse::<GroupTopic>().is_err());
        assert!("=x".parse::<GroupTopic>().is_err());
        assert!("x=".parse::<GroupTopic>().is_err());
    }
}
