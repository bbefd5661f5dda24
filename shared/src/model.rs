//! The messages on the topics. The input topic carries usage events and pool commands in one
//! ordered stream per customer (key = `tenant/customer`), so "grant, then use" is never
//! reordered. The ledger topic carries the facts the rater decided, partition for partition.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub type Dimensions = serde_json::Map<String, serde_json::Value>;

/// The Kafka message key that puts every message of one customer on one partition.
pub fn partition_key(tenant_id: &str, customer_id: &str) -> String {
    format!("{tenant_id}/{customer_id}")
}

/// A message on the input topic.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum InputMsg {
    Usage(UsageEvent),
    Grant(GrantCmd),
    Void(GrantRefCmd),
    /// The sweeper: the grant's expires_at has passed; its remainder leaves the pool.
    Expire(GrantRefCmd),
    /// The sweeper: a scheduled grant's effective_at has passed; it enters the pool.
    Activate(GrantRefCmd),
    /// Give back what a duplicate that slipped past Redis deducted (sent by ledger-writer).
    Reverse(ReverseCmd),
    /// Override the credit type's limit for one pool (None: back to the credit type's).
    SetLimit(LimitCmd),
}

impl InputMsg {
    pub fn tenant_customer(&self) -> (&str, &str) {
        match self {
            InputMsg::Usage(e) => (&e.tenant_id, &e.customer_id),
            InputMsg::Grant(g) => (&g.tenant_id, &g.grant.customer_id),
            InputMsg::Void(v) | InputMsg::Expire(v) | InputMsg::Activate(v) => (&v.tenant_id, &v.customer_id),
            InputMsg::Reverse(r) => (&r.tenant_id, &r.customer_id),
            InputMsg::SetLimit(l) => (&l.tenant_id, &l.customer_id),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UsageEvent {
    pub tenant_id: String,
    /// Assigned by ingest per accepted copy: tells a redelivery (same uid) from a repeat.
    pub event_uid: Uuid,
    pub customer_id: String,
    #[serde(default)]
    pub resource_id: String,
    pub event_name: String,
    pub idempotency_key: String,
    pub timestamp: DateTime<Utc>,
    #[serde(default)]
    pub dimensions: Dimensions,
    pub accepted_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    Paid,
    Promo,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Cost {
    pub amount: Decimal,
    pub currency: String,
}

/// Everything about a grant, fixed when it is created.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GrantSpec {
    pub id: Uuid,
    pub customer_id: String,
    #[serde(default)]
    pub resource_id: String,
    pub credit_type: String,
    /// The credit type's decimal places, so the rater needs no lookup to store it.
    pub decimals: u32,
    pub amount: Decimal,
    pub category: Category,
    pub priority: u32,
    pub cost: Option<Cost>,
    pub effective_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub display_name: String,
    pub description: Option<String>,
    pub metadata: Option<serde_json::Value>,
    pub source: String,
    pub created_at: DateTime<Utc>,
}

impl GrantSpec {
    /// A scheduled grant: effective after it was created (to the millisecond, the precision of
    /// the hot pool's order key). It enters the ledger when it is activated, not when granted.
    pub fn scheduled(&self) -> bool {
        self.effective_at.timestamp_millis() > self.created_at.timestamp_millis()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GrantCmd {
    pub tenant_id: String,
    pub grant: GrantSpec,
    pub actor: String,
}

/// A command on one grant of a pool (void, expire, activate).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GrantRefCmd {
    pub tenant_id: String,
    pub customer_id: String,
    pub resource_id: String,
    pub credit_type: String,
    pub decimals: u32,
    pub grant_id: Uuid,
    pub at: DateTime<Utc>,
    pub actor: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReverseCmd {
    pub tenant_id: String,
    pub customer_id: String,
    pub resource_id: String,
    pub credit_type: String,
    pub decimals: u32,
    /// The uid of the slipped duplicate: a reverse is applied once per uid.
    pub event_uid: Uuid,
    pub entries: Vec<Entry>,
    /// For a dead-lettered event: its dedupe mark is removed too, so a replay of the dead letter
    /// is charged (once) instead of being answered as a duplicate. Absent for a slipped
    /// duplicate, whose key stays taken by the event that settled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<Release>,
}

/// The dedupe mark of one event: its idempotency key (the timestamp is informational: marks are
/// kept by the time the rater saw the event, and released from every set they may be in).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Release {
    pub idempotency_key: String,
    pub timestamp: DateTime<Utc>,
}

/// What happens to usage that costs more than the spendable balance.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LimitKind {
    /// Denied whole; charges nothing.
    Hard,
    /// Charged; the balance goes negative (overdraft, repaid first by the next grant).
    Soft,
}

impl LimitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Hard => "hard",
            LimitKind::Soft => "soft",
        }
    }
}

/// A per-pool limit override, ordered with the pool's usage on the input topic.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LimitCmd {
    pub tenant_id: String,
    pub customer_id: String,
    pub resource_id: String,
    pub credit_type: String,
    pub decimals: u32,
    pub limit: Option<LimitKind>,
    pub at: DateTime<Utc>,
}

/// One line of the ledger as the rater decided it. `grant_id` is None for the overdraft part
/// of a consumption under a soft limit.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    pub grant_id: Option<Uuid>,
    /// Signed: consumption is negative.
    pub amount: Decimal,
    /// The pool balance after this entry.
    pub end_balance: Decimal,
}

/// The pool a fact belongs to (ordered by tenant, customer, resource, credit type).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolId {
    pub tenant_id: String,
    pub customer_id: String,
    pub resource_id: String,
    pub credit_type: String,
}

/// A charge given back to its hot pool (a `reverse` command applied by the rater: a duplicate
/// that slipped past Redis, an event charged again in a pool rebuilt after a Redis loss, or a
/// dead-lettered event): written to the ledger as `adjust` entries, so the pool's end balances
/// keep chaining through the charge and its give-back.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReversalFact {
    pub pool: PoolId,
    /// The uid the reverse was applied for (once per uid).
    pub event_uid: Uuid,
    pub at: DateTime<Utc>,
    /// What went back, per grant (None = overdraft), with the pool's balance after each.
    pub entries: Vec<Entry>,
}

/// A per-pool limit override as the rater applied it, in order with the pool's usage: the
/// ledger-writer stores it when it settles, so a pool built from Postgres (its first event, or a
/// rebuild after a Redis loss, which waits for settlement) never sees a limit that events
/// accepted before it were not decided under.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LimitFact {
    pub pool: PoolId,
    /// None: the credit type's limit again.
    pub limit: Option<LimitKind>,
    pub at: DateTime<Utc>,
}

/// A message on the ledger topic.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LedgerMsg {
    Usage(UsageFact),
    Grant(GrantFact),
    GrantChange(GrantChangeFact),
    Reversal(ReversalFact),
    Limit(LimitFact),
    /// The charge the hot pool made for an event whose usage fact Postgres refused
    /// (dead-lettered), in the same shape as its give-back (`entries`: what was deducted):
    /// written as `adjust` entries (source `dead_letter`) where the batch held it, so the pool's
    /// end balances keep chaining; the give-back follows as a `Reversal`.
    DeadLetteredCharge(ReversalFact),
}

impl LedgerMsg {
    /// Decode a ledger topic message: a JSON array of facts (what the rater produces: the run of
    /// one request's facts on one partition) or one fact object (earlier raters, tools).
    pub fn decode_many(payload: &[u8]) -> serde_json::Result<Vec<LedgerMsg>> {
        match payload.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'[') => serde_json::from_slice(payload),
            _ => serde_json::from_slice::<LedgerMsg>(payload).map(|m| vec![m]),
        }
    }
}

/// What happened to a grant after its creation.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum GrantChange {
    Void,
    Expire,
    Activate,
}

impl GrantChange {
    /// The ledger entry type it writes.
    pub fn entry_kind(self) -> EntryKind {
        match self {
            GrantChange::Void => EntryKind::Void,
            GrantChange::Expire => EntryKind::Expire,
            GrantChange::Activate => EntryKind::Grant,
        }
    }
}

/// A ledger entry's `type` (the column's CHECK constraint lists the same six).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A grant's amount entering its pool (or a scheduled grant's activation).
    Grant,
    /// A settled event's charge, one entry per grant touched.
    Consume,
    /// A grant's remaining taken out at its expiry.
    Expire,
    /// A grant's remaining taken out when it is voided.
    Void,
    /// A charge the hot pool made and gave back (slipped duplicate, re-application, dead letter).
    Adjust,
    /// An event refused by a hard limit: amount 0, the balance it was refused at.
    Deny,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Grant => "grant",
            EntryKind::Consume => "consume",
            EntryKind::Expire => "expire",
            EntryKind::Void => "void",
            EntryKind::Adjust => "adjust",
            EntryKind::Deny => "deny",
        }
    }
}

impl TryFrom<String> for EntryKind {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Ok(match s.as_str() {
            "grant" => EntryKind::Grant,
            "consume" => EntryKind::Consume,
            "expire" => EntryKind::Expire,
            "void" => EntryKind::Void,
            "adjust" => EntryKind::Adjust,
            "deny" => EntryKind::Deny,
            _ => return Err(format!("unknown ledger entry type {s:?}")),
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UsageFact {
    pub event: UsageEvent,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// Charged: one entry per grant touched (plus overdraft under a soft limit).
    Settled {
        credit_type: String,
        cost: Decimal,
        entries: Vec<Entry>,
    },
    /// Refused by a hard limit: charges nothing.
    Denied {
        credit_type: String,
        cost: Decimal,
        end_balance: Decimal,
        reason: String,
    },
    /// No mapping at its time, or no usable quantity: charges nothing.
    Unpriced { reason: String },
    /// A repeat of an idempotency key already seen: charges nothing.
    Duplicate,
}

impl Outcome {
    pub fn status(&self) -> &'static str {
        match self {
            Outcome::Settled { .. } => "settled",
            Outcome::Denied { .. } => "denied",
            Outcome::Unpriced { .. } => "unpriced",
            Outcome::Duplicate => "duplicate",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GrantFact {
    pub tenant_id: String,
    pub grant: GrantSpec,
    pub actor: String,
    /// The grant entry (+amount) and, under a soft limit, overdraft repaid from it.
    pub entries: Vec<Entry>,
    /// What is left of the grant once any overdraft is repaid.
    pub remaining: Decimal,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GrantChangeFact {
    pub change: GrantChange,
    pub pool: PoolId,
    pub grant_id: Uuid,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub entries: Vec<Entry>,
    /// Overdraft repaid from the grant when it was activated.
    #[serde(default)]
    pub repaid: Decimal,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_round_trips_as_tagged_json() {
        let e = InputMsg::Usage(UsageEvent {
            tenant_id: "t".into(),
            event_uid: Uuid::nil(),
            customer_id: "c".into(),
            resource_id: String::new(),
            event_name: "image".into(),
            idempotency_key: "k".into(),
            timestamp: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            dimensions: Dimensions::new(),
            accepted_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
        });
        let s = serde_json::to_string(&e).unwrap();
        assert!(s.contains("\"kind\":\"usage\""));
        assert_eq!(serde_json::from_str::<InputMsg>(&s).unwrap(), e);
    }

    #[test]
    fn ledger_messages_decode_as_a_run_or_one_fact() {
        let fact = |k: &str| {
            LedgerMsg::Usage(UsageFact {
                event: UsageEvent {
                    tenant_id: "t".into(),
                    event_uid: Uuid::nil(),
                    customer_id: "c".into(),
                    resource_id: String::new(),
                    event_name: "image".into(),
                    idempotency_key: k.into(),
                    timestamp: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
                    dimensions: Dimensions::new(),
                    accepted_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
                },
                outcome: Outcome::Unpriced {
                    reason: "no mapping".into(),
                },
            })
        };
        let run = vec![fact("a"), fact("b")];
        let bytes = serde_json::to_vec(&run).unwrap();
        assert_eq!(LedgerMsg::decode_many(&bytes).unwrap(), run);
        let one = serde_json::to_vec(&run[0]).unwrap();
        assert_eq!(LedgerMsg::decode_many(&one).unwrap(), vec![fact("a")]);
        assert_eq!(LedgerMsg::decode_many(b" \n[]").unwrap(), vec![]);
        assert!(LedgerMsg::decode_many(b"[{\"kind\":\"nope\"}]").is_err());
        assert!(LedgerMsg::decode_many(b"").is_err());
    }
}
