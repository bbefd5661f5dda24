//! One batch: decode, price, apply to the pools, produce the facts, wait for every ack.
//! Offsets are stored by the caller only after this returns Ok.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::BorrowedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use shared::config::KafkaArgs;
use shared::model::{partition_key, InputMsg, LedgerMsg, PoolId};

use crate::catalogue::{Catalogue, TenantCatalogue};
use crate::metric as m;
use crate::plan::{facts, plan, DeadLetter, Fate, Plan};
use crate::pools::{Op, PoolOps, PoolStore};
use crate::settle::Settlement;

/// An input message, owned, decoded once.
pub struct InMsg {
    pub partition: i32,
    pub offset: i64,
    pub payload: Vec<u8>,
    pub decoded: Result<InputMsg, String>,
    /// From the `trace_id` header ingest set; passed on to the fact or the dead letter.
    pub trace_id: Option<String>,
}

impl From<&BorrowedMessage<'_>> for InMsg {
    fn from(m: &BorrowedMessage<'_>) -> Self {
        let payload = m.payload().unwrap_or_default().to_vec();
        let decoded = serde_json::from_slice::<InputMsg>(&payload).map_err(|e| format!("undecodable: {e}"));
        InMsg {
            partition: m.partition(),
            offset: m.offset(),
            payload,
            decoded,
            trace_id: shared::kafka::trace_id(m),
        }
    }
}

pub struct Step {
    pub catalogue: Catalogue,
    pub store: PoolStore,
    pub producer: FutureProducer,
    pub kafka: KafkaArgs,
    pub settle: Settlement,
}

/// The most facts one ledger message carries (a request of 1,000 events is about 550 KB of
/// facts, under the 1 MB a Kafka message may be by default).
const FACTS_PER_MESSAGE: usize = 500;

/// Consecutive facts of one input partition with one trace id, produced as one message.
#[derive(Debug)]
pub struct FactRun<'a, F> {
    pub partition: i32,
    pub trace_id: Option<&'a str>,
    pub facts: Vec<&'a F>,
}

/// Group facts, given in input order with their partition and trace id, into runs: a run ends
/// where the partition's next fact has another trace id, or at `cap` facts. Within a partition
/// the runs come out in input order, so the ledger topic keeps each partition's order (a grant
/// is settled before the usage that consumes it).
pub fn fact_runs<'a, F>(
    facts: impl IntoIterator<Item = (i32, Option<&'a str>, &'a F)>,
    cap: usize,
) -> Vec<FactRun<'a, F>> {
    let mut open: HashMap<i32, FactRun<'a, F>> = HashMap::new();
    let mut out = Vec::new();
    for (partition, trace_id, f) in facts {
        let run = open.entry(partition).or_insert_with(|| FactRun {
            partition,
            trace_id,
            facts: Vec::new(),
        });
        if run.trace_id != trace_id || run.facts.len() >= cap {
            let next = FactRun {
                partition,
                trace_id,
                facts: Vec::new(),
            };
            out.push(std::mem::replace(run, next));
        }
        run.facts.push(f);
    }
    out.extend(open.into_values());
    out
}

impl Step {
    pub async fn process(&mut self, batch: &[InMsg], committed: &HashMap<i32, i64>) -> anyhow::Result<()> {
        let cats = self.catalogues(batch).await?;
        let (mut fates, pools) = self.plan_batch(batch, &cats).await?;

        // One pipelined round for every pool of the batch.
        let settle = self.settle.clone();
        let results = self
            .store
            .apply(&pools, committed, || {
                let s = settle.clone();
                async move { s.wait(Duration::from_secs(300)).await }
            })
            .await?;
        let now = Utc::now();
        for (p, res) in pools.iter().zip(results) {
            for (op, (_, r)) in p.ops.iter().zip(res) {
                let Ok(decoded) = &batch[op.msg].decoded else {
                    fates[op.msg] = Fate::Nothing;
                    continue;
                };
                let (fate, tally) = facts(decoded, &p.pool, p.decimals, &op.op, r, now);
                tally.record();
                fates[op.msg] = fate;
            }
        }
        self.produce(batch, &fates).await
    }

    /// The catalogue of every tenant with usage in the batch, loaded once per batch.
    async fn catalogues<'b>(&self, batch: &'b [InMsg]) -> anyhow::Result<HashMap<&'b str, Arc<TenantCatalogue>>> {
        let mut tenants: HashMap<&str, (DateTime<Utc>, Vec<&str>)> = HashMap::new();
        for msg in batch {
            if let Ok(InputMsg::Usage(e)) = &msg.decoded {
                let t = tenants.entry(&e.tenant_id).or_insert((e.timestamp, Vec::new()));
                t.0 = t.0.max(e.timestamp);
                t.1.push(&e.event_name);
            }
        }
        let mut cats = HashMap::new();
        for (tenant, (max_ts, names)) in tenants {
            cats.insert(tenant, self.catalogue.get(tenant, max_ts, names.into_iter()).await?);
        }
        Ok(cats)
    }

    /// Plan every message: its fate so far, and the operations grouped per pool (pools in the
    /// order their first message came, operations in input order).
    async fn plan_batch(
        &self,
        batch: &[InMsg],
        cats: &HashMap<&str, Arc<TenantCatalogue>>,
    ) -> anyhow::Result<(Vec<Fate>, Vec<PoolOps>)> {
        let mut fates: Vec<Fate> = batch.iter().map(|_| Fate::Nothing).collect();
        let mut pools: Vec<PoolOps> = Vec::new();
        let mut index: HashMap<PoolId, usize> = HashMap::new();
        let now = Utc::now();
        for (i, msg) in batch.iter().enumerate() {
            let decoded = match &msg.decoded {
                Ok(d) => d,
                Err(reason) => {
                    fates[i] = Fate::Dlq(reason.clone());
                    continue;
                }
            };
            let cat = usage_tenant(decoded).and_then(|t| cats.get(t)).map(|c| &**c);
            let p = match plan(decoded, cat, now) {
                Err(DeadLetter(reason)) => {
                    fates[i] = Fate::Dlq(reason);
                    continue;
                }
                Ok(Plan::Unpriced(fact)) => {
                    metrics::counter!(m::EVENTS, "outcome" => "unpriced").increment(1);
                    fates[i] = Fate::Fact(fact);
                    continue;
                }
                Ok(Plan::Pool(p)) => p,
            };
            let hard = match p.hard {
                Some(h) => h,
                None => self.hard(&p.pool.tenant_id, &p.pool.credit_type).await?,
            };
            let k = *index.entry(p.pool.clone()).or_insert_with(|| {
                pools.push(PoolOps {
                    pool: p.pool,
                    partition: msg.partition,
                    decimals: p.decimals,
                    hard,
                    ops: Vec::new(),
                });
                pools.len() - 1
            });
            pools[k].ops.push(Op {
                msg: i,
                offset: msg.offset,
                ts_ms: p.ts_ms,
                id: p.id,
                op: p.op,
            });
            fates[i] = Fate::Pending;
        }
        Ok((fates, pools))
    }

    /// Produce every fact and dead letter, then wait for all acks.
    async fn produce(&self, batch: &[InMsg], fates: &[Fate]) -> anyhow::Result<()> {
        // Facts travel in runs: the
        // consecutive facts of one input partition that share a trace id (the events of one
        // request, usually) go as one message, a JSON array, in input order, to the same
        // partition number of the ledger topic. Fewer, larger messages are most of what the
        // broker and both clients spend per event.
        let started = Instant::now();
        let mut acks = Vec::with_capacity(batch.len());
        let mut facts = Vec::new();
        for (msg, fate) in batch.iter().zip(fates) {
            let (topic, key, payload, headers) = match fate {
                Fate::Fact(f) => {
                    facts.push((msg.partition, msg.trace_id.as_deref(), f));
                    continue;
                }
                Fate::Facts(fs) => {
                    facts.extend(fs.iter().map(|f| (msg.partition, msg.trace_id.as_deref(), f)));
                    continue;
                }
                Fate::Dlq(reason) => {
                    metrics::counter!(m::DLQ, "reason" => shared::dead_letter::reason_label(reason)).increment(1);
                    let trace_id = msg.trace_id.as_deref();
                    tracing::warn!(partition = msg.partition, offset = msg.offset, trace_id, %reason, "dead-lettered");
                    let source = shared::dead_letter::Source {
                        topic: &self.kafka.input_topic,
                        partition: msg.partition,
                        offset: msg.offset,
                        trace_id,
                    };
                    let headers = shared::dead_letter::headers(reason, &source, None);
                    (&self.kafka.dlq_topic, String::new(), msg.payload.clone(), headers)
                }
                Fate::Nothing | Fate::Pending => continue,
            };
            let rec = FutureRecord::to(topic).key(&key).payload(&payload).headers(headers);
            acks.push(self.send(rec).await?);
        }
        for run in fact_runs(facts, FACTS_PER_MESSAGE) {
            let (t, c) = fact_owner(run.facts[0]);
            let key = partition_key(t, c);
            let payload = serde_json::to_vec(&run.facts)?;
            metrics::counter!(m::LEDGER_MESSAGES).increment(1);
            let rec = FutureRecord::to(&self.kafka.ledger_topic)
                .key(&key)
                .payload(&payload)
                .headers(shared::kafka::trace_headers(run.trace_id))
                .partition(run.partition);
            acks.push(self.send(rec).await?);
        }
        for a in acks {
            match a.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(anyhow::Error::new(e).context("produce failed")),
                Err(_) => anyhow::bail!("produce cancelled"),
            }
        }
        metrics::histogram!(m::PRODUCE_DURATION).record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Hand one record to the producer, waiting while its local queue is full.
    async fn send<'a>(
        &self,
        mut rec: FutureRecord<'a, String, Vec<u8>>,
    ) -> anyhow::Result<rdkafka::producer::DeliveryFuture> {
        loop {
            match self.producer.send_result(rec) {
                Ok(f) => return Ok(f),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    // Local queue full: wait for some acks to drain it.
                    tracing::debug!("producer queue full");
                    rec = r;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                // Anything else fails the batch (it is retried, then the rater stops).
                Err((e, _)) => return Err(anyhow::Error::new(e).context("produce refused")),
            }
        }
    }

    async fn hard(&self, tenant: &str, credit_type: &str) -> anyhow::Result<bool> {
        Ok(self
            .catalogue
            .credit_type(tenant, credit_type)
            .await?
            .is_none_or(|c| c.hard))
    }
}

/// The tenant whose catalogue prices a message (usage only).
fn usage_tenant(m: &InputMsg) -> Option<&str> {
    match m {
        InputMsg::Usage(e) => Some(&e.tenant_id),
        _ => None,
    }
}

fn fact_owner(f: &LedgerMsg) -> (&str, &str) {
    match f {
        LedgerMsg::Usage(u) => (&u.event.tenant_id, &u.event.customer_id),
        LedgerMsg::Grant(g) => (&g.tenant_id, &g.grant.customer_id),
        LedgerMsg::GrantChange(v) => (&v.pool.tenant_id, &v.pool.customer_id),
        LedgerMsg::Reversal(v) | LedgerMsg::DeadLetteredCharge(v) => (&v.pool.tenant_id, &v.pool.customer_id),
        LedgerMsg::Limit(v) => (&v.pool.tenant_id, &v.pool.customer_id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Runs keep every fact once, each partition's facts in input order, one partition and
        /// one trace id per run, at most `cap` facts per run, and only split where they must.
        #[test]
        fn runs_keep_each_partition_in_order(
            input in proptest::collection::vec((0i32..3, proptest::option::of(0u8..3)), 0..200),
            cap in 1usize..8,
        ) {
            let traces: Vec<Option<String>> = input.iter().map(|(_, t)| t.map(|t| format!("t{t}"))).collect();
            let ids: Vec<usize> = (0..input.len()).collect();
            let runs = fact_runs(
                input.iter().zip(&traces).zip(&ids).map(|(((p, _), t), i)| (*p, t.as_deref(), i)),
                cap,
            );
            for p in 0..3 {
                let want: Vec<usize> = ids.iter().copied().filter(|i| input[*i].0 == p).collect();
                let mine: Vec<&FactRun<usize>> = runs.iter().filter(|r| r.partition == p).collect();
                let got: Vec<usize> = mine.iter().flat_map(|r| r.facts.iter().map(|i| **i)).collect();
                prop_assert_eq!(&got, &want);
                for (k, r) in mine.iter().enumerate() {
                    prop_assert!(!r.facts.is_empty() && r.facts.len() <= cap);
                    for i in &r.facts {
                        prop_assert_eq!(traces[**i].as_deref(), r.trace_id);
                    }
                    // A run shorter than the cap ends only where the trace id changes.
                    if let Some(next) = mine.get(k + 1) {
                        prop_assert!(r.facts.len() == cap || next.trace_id != r.trace_id);
                    }
                }
            }
        }
    }
}
