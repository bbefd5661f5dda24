//! One batch: decode, price, apply to the pools, produce the facts, wait for every ack.
//! Offsets are stored by the caller only after this returns Ok.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::BorrowedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use rust_decimal::Decimal;
use shared::amount::to_fixed;
use shared::config::KafkaArgs;
use shared::model::{
    partition_key, Entry, GrantChange, GrantChangeFact, GrantFact, InputMsg, LedgerMsg, LimitFact, Outcome, PoolId,
    ReversalFact, UsageFact,
};
use shared::pricing::{price, Price};

use crate::catalogue::Catalogue;
use crate::metric as m;
use crate::pools::{dec, ident, order_key, Op, OpResult, Part, PoolOps, PoolStore};
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

/// What becomes of one input message.
#[allow(clippy::large_enum_variant)] // boxing would allocate once per fact on the hot path
enum Fate {
    /// Waiting for its pool's reply (index into the pool list).
    Pending,
    Fact(LedgerMsg),
    /// Scheduled grants the event activated (their facts first), then the event's.
    Facts(Vec<LedgerMsg>),
    Dlq(String),
    Nothing,
}

impl Step {
    pub async fn process(&mut self, batch: &[InMsg], committed: &HashMap<i32, i64>) -> anyhow::Result<()> {
        let mut fates: Vec<Fate> = batch.iter().map(|_| Fate::Nothing).collect();
        let mut pools: Vec<PoolOps> = Vec::new();
        let mut index: HashMap<PoolId, usize> = HashMap::new();

        // Catalogues, once per tenant per batch.
        let mut tenants: HashMap<&str, (chrono::DateTime<Utc>, Vec<&str>)> = HashMap::new();
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

        for (i, msg) in batch.iter().enumerate() {
            let decoded = match &msg.decoded {
                Ok(d) => d,
                Err(reason) => {
                    fates[i] = Fate::Dlq(reason.clone());
                    continue;
                }
            };
            let (pool, decimals, hard, op) = match decoded {
                InputMsg::Usage(e) => {
                    let cat = &cats[e.tenant_id.as_str()];
                    let versions = cat.mappings.get(&e.event_name).map(Vec::as_slice).unwrap_or(&[]);
                    match price(versions, e.timestamp, &e.dimensions) {
                        Price::Unpriced(reason) => {
                            metrics::counter!(m::EVENTS, "outcome" => "unpriced").increment(1);
                            fates[i] = Fate::Fact(LedgerMsg::Usage(UsageFact {
                                event: e.clone(),
                                outcome: Outcome::Unpriced {
                                    reason: reason.to_owned(),
                                },
                            }));
                            continue;
                        }
                        Price::Priced {
                            credit_type,
                            decimals,
                            fixed,
                            ..
                        } => {
                            let hard = cat.credit_types.get(credit_type).is_none_or(|c| c.hard);
                            let pool = PoolId {
                                tenant_id: e.tenant_id.clone(),
                                customer_id: e.customer_id.clone(),
                                resource_id: e.resource_id.clone(),
                                credit_type: credit_type.to_owned(),
                            };
                            let op = Op {
                                msg: i,
                                offset: msg.offset,
                                kind: "u",
                                a: e.idempotency_key.clone(),
                                b: fixed.to_string(),
                                c: String::new(),
                                ts_ms: e.timestamp.timestamp_millis(),
                                id: ident(&e.event_uid),
                            };
                            (pool, decimals, hard, op)
                        }
                    }
                }
                InputMsg::Grant(g) => {
                    let s = &g.grant;
                    let fixed = match to_fixed(s.amount, s.decimals) {
                        Ok(v) => v,
                        Err(e) => {
                            fates[i] = Fate::Dlq(format!("grant amount {e}"));
                            continue;
                        }
                    };
                    let pool = PoolId {
                        tenant_id: g.tenant_id.clone(),
                        customer_id: s.customer_id.clone(),
                        resource_id: s.resource_id.clone(),
                        credit_type: s.credit_type.clone(),
                    };
                    let op = Op {
                        msg: i,
                        offset: msg.offset,
                        kind: "g",
                        a: s.id.to_string(),
                        b: fixed.to_string(),
                        c: order_key(s.priority, s.expires_at, s.category, s.effective_at, s.created_at, s.id),
                        ts_ms: s.created_at.timestamp_millis(),
                        id: ident(&s.id),
                    };
                    let hard = self.hard(&g.tenant_id, &s.credit_type).await?;
                    (pool, s.decimals, hard, op)
                }
                InputMsg::Void(v) | InputMsg::Expire(v) | InputMsg::Activate(v) => {
                    let pool = PoolId {
                        tenant_id: v.tenant_id.clone(),
                        customer_id: v.customer_id.clone(),
                        resource_id: v.resource_id.clone(),
                        credit_type: v.credit_type.clone(),
                    };
                    let kind = match decoded {
                        InputMsg::Void(_) => "v",
                        InputMsg::Expire(_) => "e",
                        _ => "a",
                    };
                    let op = Op {
                        msg: i,
                        offset: msg.offset,
                        kind,
                        a: v.grant_id.to_string(),
                        b: String::new(),
                        c: String::new(),
                        ts_ms: v.at.timestamp_millis(),
                        id: ident(&v.grant_id),
                    };
                    let hard = self.hard(&v.tenant_id, &v.credit_type).await?;
                    (pool, v.decimals, hard, op)
                }
                InputMsg::Reverse(r) => {
                    let mut parts = Vec::with_capacity(r.entries.len());
                    for e in &r.entries {
                        let gid = e.grant_id.map_or_else(|| "-".to_owned(), |g| g.to_string());
                        let amt = shared::amount::to_fixed_signed(e.amount, r.decimals).unwrap_or(0);
                        parts.push(format!("{gid}:{amt}"));
                    }
                    let pool = PoolId {
                        tenant_id: r.tenant_id.clone(),
                        customer_id: r.customer_id.clone(),
                        resource_id: r.resource_id.clone(),
                        credit_type: r.credit_type.clone(),
                    };
                    let op = Op {
                        msg: i,
                        offset: msg.offset,
                        kind: "r",
                        a: r.event_uid.to_string(),
                        b: parts.join(","),
                        c: r.release
                            .as_ref()
                            .map_or_else(String::new, |x| x.idempotency_key.clone()),
                        ts_ms: Utc::now().timestamp_millis(),
                        id: ident(&r.event_uid),
                    };
                    let hard = self.hard(&r.tenant_id, &r.credit_type).await?;
                    (pool, r.decimals, hard, op)
                }
                InputMsg::SetLimit(l) => {
                    let pool = PoolId {
                        tenant_id: l.tenant_id.clone(),
                        customer_id: l.customer_id.clone(),
                        resource_id: l.resource_id.clone(),
                        credit_type: l.credit_type.clone(),
                    };
                    let op = Op {
                        msg: i,
                        offset: msg.offset,
                        kind: "l",
                        a: l.limit.map_or("", |k| k.as_str()).to_owned(),
                        b: String::new(),
                        c: String::new(),
                        ts_ms: l.at.timestamp_millis(),
                        id: l.at.timestamp_micros().to_string(),
                    };
                    let hard = self.hard(&l.tenant_id, &l.credit_type).await?;
                    (pool, l.decimals, hard, op)
                }
            };
            let k = *index.entry(pool.clone()).or_insert_with(|| {
                pools.push(PoolOps {
                    pool,
                    partition: msg.partition,
                    decimals,
                    hard,
                    ops: Vec::new(),
                });
                pools.len() - 1
            });
            pools[k].ops.push(op);
            fates[i] = Fate::Pending;
        }

        // One pipelined round for every pool of the batch.
        let settle = self.settle.clone();
        let results = self
            .store
            .apply(&pools, committed, || {
                let s = settle.clone();
                async move { s.wait(Duration::from_secs(300)).await }
            })
            .await?;
        for (p, res) in pools.iter().zip(results) {
            for (op, (_, r)) in p.ops.iter().zip(res) {
                fates[op.msg] = self.fact(&batch[op.msg], p, op, r);
            }
        }

        // Produce every fact and dead letter, then wait for all acks. Facts travel in runs: the
        // consecutive facts of one input partition that share a trace id (the events of one
        // request, usually) go as one message, a JSON array, in input order, to the same
        // partition number of the ledger topic. Fewer, larger messages are most of what the
        // broker and both clients spend per event.
        let started = Instant::now();
        let mut acks = Vec::with_capacity(batch.len());
        let mut facts = Vec::new();
        for (msg, fate) in batch.iter().zip(&fates) {
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

    /// Turn one pool reply into what is produced.
    fn fact(&self, msg: &InMsg, p: &PoolOps, op: &Op, r: OpResult) -> Fate {
        let d = p.decimals;
        let Ok(decoded) = &msg.decoded else {
            return Fate::Nothing;
        };
        match (decoded, r) {
            (_, OpResult::Refused(reason)) => Fate::Dlq(reason),
            (InputMsg::Usage(e), r) => {
                let mut first = Vec::new();
                let outcome = match r {
                    OpResult::Charged { parts, activated, .. } => {
                        for a in activated {
                            metrics::counter!(m::COMMANDS, "kind" => "activate", "result" => "by_usage").increment(1);
                            first.push(LedgerMsg::GrantChange(GrantChangeFact {
                                change: GrantChange::Activate,
                                pool: p.pool.clone(),
                                grant_id: a.grant_id,
                                at: DateTime::from_timestamp_millis(a.effective_ms).unwrap_or(e.timestamp),
                                actor: "system".into(),
                                entries: vec![Entry {
                                    grant_id: Some(a.grant_id),
                                    amount: dec(a.amount, d),
                                    end_balance: dec(a.end, d),
                                }],
                                repaid: dec(a.repaid, d),
                            }));
                        }
                        let total: i64 = parts.iter().map(|x| -x.delta).sum();
                        Outcome::Settled {
                            credit_type: p.pool.credit_type.clone(),
                            cost: dec(total, d),
                            entries: ledger_entries(parts, d),
                        }
                    }
                    OpResult::Denied { end, reason } => Outcome::Denied {
                        credit_type: p.pool.credit_type.clone(),
                        cost: dec(op.b.parse().unwrap_or(0), d),
                        end_balance: dec(end, d),
                        reason,
                    },
                    OpResult::Duplicate => Outcome::Duplicate,
                    other => return Fate::Dlq(format!("unexpected usage reply {other:?}")),
                };
                count_outcome(&outcome);
                let fact = LedgerMsg::Usage(UsageFact {
                    event: e.clone(),
                    outcome,
                });
                if first.is_empty() {
                    Fate::Fact(fact)
                } else {
                    first.push(fact);
                    Fate::Facts(first)
                }
            }
            (InputMsg::Grant(g), OpResult::Granted { end, remaining, .. }) => {
                metrics::counter!(m::COMMANDS, "kind" => "grant", "result" => "applied").increment(1);
                // A scheduled grant enters the ledger when it is activated, not before.
                let scheduled = g.grant.scheduled();
                let entries = if scheduled {
                    Vec::new()
                } else {
                    vec![Entry {
                        grant_id: Some(g.grant.id),
                        amount: g.grant.amount,
                        end_balance: dec(end, d),
                    }]
                };
                Fate::Fact(LedgerMsg::Grant(GrantFact {
                    tenant_id: g.tenant_id.clone(),
                    grant: g.grant.clone(),
                    actor: g.actor.clone(),
                    entries,
                    remaining: dec(remaining, d),
                }))
            }
            (InputMsg::Grant(_), _) => {
                metrics::counter!(m::COMMANDS, "kind" => "grant", "result" => "known").increment(1);
                Fate::Nothing
            }
            (InputMsg::Void(v) | InputMsg::Expire(v) | InputMsg::Activate(v), r) => {
                let (change, kind) = match decoded {
                    InputMsg::Void(_) => (GrantChange::Void, "void"),
                    InputMsg::Expire(_) => (GrantChange::Expire, "expire"),
                    _ => (GrantChange::Activate, "activate"),
                };
                let (entry, repaid) = match r {
                    OpResult::Voided { end, removed } => (
                        Entry {
                            grant_id: Some(v.grant_id),
                            amount: -dec(removed, d),
                            end_balance: dec(end, d),
                        },
                        0,
                    ),
                    OpResult::Activated { end, remaining, repaid } => (
                        Entry {
                            grant_id: Some(v.grant_id),
                            amount: dec(remaining + repaid, d),
                            end_balance: dec(end, d),
                        },
                        repaid,
                    ),
                    _ => {
                        metrics::counter!(m::COMMANDS, "kind" => kind, "result" => "not_applied").increment(1);
                        return Fate::Nothing;
                    }
                };
                metrics::counter!(m::COMMANDS, "kind" => kind, "result" => "applied").increment(1);
                let entry = Entry {
                    amount: if entry.amount.is_zero() {
                        Decimal::ZERO
                    } else {
                        entry.amount
                    },
                    ..entry
                };
                Fate::Fact(LedgerMsg::GrantChange(GrantChangeFact {
                    change,
                    pool: p.pool.clone(),
                    grant_id: v.grant_id,
                    at: v.at,
                    actor: v.actor.clone(),
                    entries: vec![entry],
                    repaid: dec(repaid, d),
                }))
            }
            (InputMsg::Reverse(rv), r) => {
                let OpResult::Reversed { parts, .. } = r else {
                    metrics::counter!(m::COMMANDS, "kind" => "reverse", "result" => "not_applied").increment(1);
                    return Fate::Nothing;
                };
                metrics::counter!(m::COMMANDS, "kind" => "reverse", "result" => "applied").increment(1);
                // What went back enters the ledger (adjust entries), so the pool's end balances
                // chain through the charge and its give-back; the ledger-writer wrote the charge
                // under the same uid (a dead-lettered event's as a `dead_letter` adjust).
                if parts.is_empty() {
                    return Fate::Nothing;
                }
                Fate::Fact(LedgerMsg::Reversal(ReversalFact {
                    pool: p.pool.clone(),
                    event_uid: rv.event_uid,
                    at: Utc::now(),
                    entries: ledger_entries(parts, d),
                }))
            }
            (InputMsg::SetLimit(l), r) => {
                if r != OpResult::LimitSet {
                    metrics::counter!(m::COMMANDS, "kind" => "limit", "result" => "not_applied").increment(1);
                    return Fate::Nothing;
                }
                metrics::counter!(m::COMMANDS, "kind" => "limit", "result" => "applied").increment(1);
                // Postgres learns the override in order with the pool's usage.
                Fate::Fact(LedgerMsg::Limit(LimitFact {
                    pool: p.pool.clone(),
                    limit: l.limit,
                    at: l.at,
                }))
            }
        }
    }
}

/// The ledger entries of a reply's parts (fixed-point to the credit type's places).
fn ledger_entries(parts: Vec<Part>, d: u32) -> Vec<Entry> {
    parts
        .into_iter()
        .map(|x| Entry {
            grant_id: x.grant_id,
            amount: dec(x.delta, d),
            end_balance: dec(x.end, d),
        })
        .collect()
}

fn count_outcome(o: &Outcome) {
    metrics::counter!(m::EVENTS, "outcome" => o.status()).increment(1);
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
