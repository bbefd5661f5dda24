//! Waiting for settlement: before a pool lost from Redis is rebuilt from Postgres, every fact
//! already on the ledger topic must be settled, i.e. the ledger-writers' committed offset has
//! reached the high watermark of every ledger partition.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use shared::config::KafkaArgs;

#[derive(Clone)]
pub struct Settlement {
    /// A client in the ledger-writers' group that never subscribes: it only reads offsets.
    reader: Arc<BaseConsumer>,
    topic: String,
}

impl Settlement {
    pub fn new(kafka: &KafkaArgs, ledger_group: &str) -> anyhow::Result<Self> {
        let mut c = shared::kafka::base(kafka);
        c.set("group.id", ledger_group).set("enable.auto.commit", "false");
        let reader: BaseConsumer = shared::kafka::with_options(c, kafka).create()?;
        Ok(Self {
            reader: Arc::new(reader),
            topic: kafka.ledger_topic.clone(),
        })
    }

    /// True once every ledger partition is settled up to its high watermark.
    fn settled(&self) -> anyhow::Result<bool> {
        let md = self.reader.fetch_metadata(Some(&self.topic), Duration::from_secs(5))?;
        let parts: Vec<i32> = md
            .topics()
            .iter()
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        let mut tpl = TopicPartitionList::new();
        for p in &parts {
            tpl.add_partition(&self.topic, *p);
        }
        let committed = self.reader.committed_offsets(tpl, Duration::from_secs(5))?;
        for p in parts {
            let (low, high) = self.reader.fetch_watermarks(&self.topic, p, Duration::from_secs(5))?;
            let done = match committed.find_partition(&self.topic, p).map(|e| e.offset()) {
                // Beyond the high watermark: a commit from an earlier incarnation of the topic
                // (deleted and created again), not a settlement of this one.
                Some(Offset::Offset(o)) => o == high,
                // Never committed: settled only if the partition holds nothing.
                _ => high <= low,
            };
            if !done {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Wait until settled, polling; gives up after `limit`.
    pub async fn wait(&self, limit: Duration) -> Result<(), String> {
        let started = Instant::now();
        loop {
            let me = self.clone();
            let r = tokio::task::spawn_blocking(move || me.settled())
                .await
                .map_err(|e| e.to_string())?;
            match r {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "settlement check failed"),
            }
            if started.elapsed() > limit {
                return Err(format!("ledger not settled after {limit:?}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
