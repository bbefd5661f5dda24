//! Ledger facts for unit tests: tenant "t", customer "c", credit type "credits" and
//! idempotency key "k<n>" unless named, times in whole seconds.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use shared::model::{Category, Entry, GrantFact, GrantSpec, LedgerMsg, Outcome, UsageEvent, UsageFact};
use uuid::Uuid;

pub fn t(s: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(s, 0).unwrap()
}

/// A ledger entry of grant `g` (None: overdraft) moving `amount`, the pool at `end` after it.
pub fn entry(g: Option<u128>, amount: i64, end: i64) -> Entry {
    Entry {
        grant_id: g.map(Uuid::from_u128),
        amount: Decimal::from(amount),
        end_balance: Decimal::from(end),
    }
}

/// Usage of tenant "t" with event uid `n`.
pub fn usage(n: u128, outcome: Outcome) -> LedgerMsg {
    usage_of("t", n, outcome)
}

/// Usage of `tenant` with event uid `n`.
pub fn usage_of(tenant: &str, n: u128, outcome: Outcome) -> LedgerMsg {
    LedgerMsg::Usage(UsageFact {
        event: UsageEvent {
            tenant_id: tenant.into(),
            event_uid: Uuid::from_u128(n),
            customer_id: "c".into(),
            resource_id: String::new(),
            event_name: "e".into(),
            idempotency_key: format!("k{n}"),
            timestamp: t(100),
            dimensions: Default::default(),
            accepted_at: t(100),
        },
        outcome,
    })
}

/// Charged in "credits", by these entries.
pub fn settled(entries: Vec<Entry>) -> Outcome {
    Outcome::Settled {
        credit_type: "credits".into(),
        cost: entries.iter().map(|e| -e.amount).sum(),
        entries,
    }
}

/// The grant fact for tenant "t" of a paid grant created at t(50), effective at t(`effective`)
/// (later: scheduled): its grant entry, `remaining` left of it.
pub fn grant_in(id: u128, credit_type: &str, amount: i64, effective: i64, remaining: i64) -> LedgerMsg {
    LedgerMsg::Grant(GrantFact {
        tenant_id: "t".into(),
        grant: GrantSpec {
            id: Uuid::from_u128(id),
            customer_id: "c".into(),
            resource_id: String::new(),
            credit_type: credit_type.into(),
            decimals: 0,
            amount: Decimal::from(amount),
            category: Category::Paid,
            priority: 1,
            cost: None,
            effective_at: t(effective),
            expires_at: None,
            display_name: "g".into(),
            description: None,
            metadata: None,
            source: "api".into(),
            created_at: t(50),
        },
        actor: "api".into(),
        entries: vec![entry(Some(id), amount, amount)],
        remaining: Decimal::from(remaining),
    })
}

/// An active grant of "credits" of `amount`, `remaining` left of it.
pub fn grant(id: u128, amount: i64, remaining: i64) -> LedgerMsg {
    grant_in(id, "credits", amount, 50, remaining)
}
