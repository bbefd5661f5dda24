//! Billing: the charge client (signed POSTs to the tenant's billing system) and the pure rules
//! of plans and auto-recharge: billing periods, what a subscription grants, and the ids that
//! make every grant exactly-once (derived from what caused it, so a repeat is the same grant
//! and the rater applies it once).

pub mod charge;
pub mod period;
pub mod recharge;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::model::{Category, Cost, GrantSpec};

pub use period::Cadence;
pub use recharge::AutoRechargeSettings;

/// Grant sources of credits that billing issues.
pub const SOURCE_TOP_UP: &str = "top-up";
pub const SOURCE_AUTO_RECHARGE: &str = "auto-recharge";
pub const SOURCE_PLAN: &str = "plan";
pub const SOURCE_ADD_ON: &str = "add-on";

/// Webhook event types of auto-recharge.
pub const AUTO_RECHARGE_SUCCEEDED: &str = "credits.auto_recharge.succeeded";
pub const AUTO_RECHARGE_FAILED: &str = "credits.auto_recharge.failed";
pub const AUTO_RECHARGE_PAUSED: &str = "credits.auto_recharge.paused";

/// Namespace of grant ids derived from charges and subscription periods.
const BILLING_NS: Uuid = Uuid::from_u128(0x8c41_2e7a_5d90_4f63_b2a8_19c4_7e05_d3f1);

/// The charge id of a top-up: the same idempotency key is the same charge.
pub fn top_up_charge_id(tenant: &str, idempotency_key: &str) -> String {
    format!(
        "ch_{}",
        Uuid::new_v5(&BILLING_NS, format!("top-up/{tenant}/{idempotency_key}").as_bytes()).simple()
    )
}

/// A new auto-recharge charge id (stored before the charge is sent, then reused by retries).
pub fn new_charge_id() -> String {
    format!("ch_{}", Uuid::now_v7().simple())
}

/// The grant a charge pays for.
pub fn charge_grant_id(tenant: &str, charge_id: &str) -> Uuid {
    Uuid::new_v5(&BILLING_NS, format!("charge/{tenant}/{charge_id}").as_bytes())
}

/// The grant of one period of one subscription item.
pub fn period_grant_id(tenant: &str, customer: &str, revision: i32, item: &str, period: i32) -> Uuid {
    Uuid::new_v5(
        &BILLING_NS,
        format!("period/{tenant}/{customer}/{revision}/{item}/{period}").as_bytes(),
    )
}

/// What a top-up or recharge of `credits` costs: rounded to cents, half away from zero.
pub fn price(credits: Decimal, unit_price: Decimal) -> Decimal {
    (credits * unit_price).round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointAwayFromZero)
}

/// A credit entitlement of a plan or add-on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entitlement {
    pub credit_type: String,
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    pub cadence: Cadence,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Behavior {
    /// The add-on's credits are granted beside the plan's.
    Increment,
    /// The add-on's credits replace the plan's grant of the same credit type.
    Override,
}

/// An add-on on a subscription, with its definition.
#[derive(Debug, Clone)]
pub struct AddOn {
    pub id: String,
    pub name: String,
    pub behavior: Behavior,
    pub entitlements: Vec<Entitlement>,
    pub quantity: u32,
}

/// One thing a subscription grants every period.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// Stable within a revision: `plan:<plan>:<index>` or `addon:<addon>:<index>`.
    pub key: String,
    pub source: &'static str,
    pub display_name: String,
    pub credit_type: String,
    pub amount: Decimal,
    pub cadence: Cadence,
}

/// What a plan and its add-ons grant each period: the plan's entitlements, except the credit
/// types an `override` add-on covers, plus every add-on entitlement times its quantity.
pub fn items(plan_id: &str, plan_name: &str, plan: &[Entitlement], addons: &[AddOn]) -> Vec<Item> {
    let overridden: Vec<&str> = addons
        .iter()
        .filter(|a| a.behavior == Behavior::Override && a.quantity > 0)
        .flat_map(|a| a.entitlements.iter().map(|e| e.credit_type.as_str()))
        .collect();
    let mut out: Vec<Item> = plan
        .iter()
        .enumerate()
        .filter(|(_, e)| !overridden.contains(&e.credit_type.as_str()))
        .map(|(i, e)| Item {
            key: format!("plan:{plan_id}:{i}"),
            source: SOURCE_PLAN,
            display_name: plan_name.to_owned(),
            credit_type: e.credit_type.clone(),
            amount: e.amount,
            cadence: e.cadence,
        })
        .collect();
    for a in addons.iter().filter(|a| a.quantity > 0) {
        for (i, e) in a.entitlements.iter().enumerate() {
            out.push(Item {
                key: format!("addon:{}:{i}", a.id),
                source: SOURCE_ADD_ON,
                display_name: if a.quantity == 1 {
                    a.name.clone()
                } else {
                    format!("{} x {}", a.name, a.quantity)
                },
                credit_type: e.credit_type.clone(),
                amount: e.amount * Decimal::from(a.quantity),
                cadence: e.cadence,
            });
        }
    }
    out
}

/// A charge whose grant is to be issued (top-up or auto-recharge).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ChargeRow {
    pub tenant_id: String,
    pub id: String,
    pub reason: String,
    pub customer_id: String,
    pub resource_id: String,
    pub credit_type: String,
    pub credits: Decimal,
    pub amount: Decimal,
    pub currency: String,
    pub payment_method_id: String,
    pub grant_expiration_days: Option<i32>,
    pub status: String,
    pub attempts: i32,
    pub grant_id: Uuid,
    pub created_at: DateTime<Utc>,
}

/// The columns of [`ChargeRow`].
pub const CHARGE_COLS: &str = "tenant_id, id, reason, customer_id, resource_id, credit_type, credits, amount, currency,
    payment_method_id, grant_expiration_days, status, attempts, grant_id, created_at";

impl ChargeRow {
    pub fn request(&self) -> charge::ChargeRequest {
        charge::ChargeRequest {
            charge_id: self.id.clone(),
            customer_id: self.customer_id.clone(),
            amount: self.amount.normalize(),
            currency: self.currency.clone(),
            payment_method_id: self.payment_method_id.clone(),
            reason: self.reason.clone(),
            credit_type: self.credit_type.clone(),
            credits: self.credits.normalize(),
        }
    }

    /// The grant a succeeded charge pays for: a pure function of the row, so whoever issues it
    /// (ingest answering the top-up, or the ledger-writer finishing it) issues the same grant.
    pub fn grant(&self, decimals: u32) -> GrantSpec {
        let auto = self.reason == "auto_recharge";
        GrantSpec {
            id: self.grant_id,
            customer_id: self.customer_id.clone(),
            resource_id: self.resource_id.clone(),
            credit_type: self.credit_type.clone(),
            decimals,
            amount: self.credits,
            category: Category::Paid,
            priority: 100,
            cost: Some(Cost {
                amount: self.amount,
                currency: self.currency.clone(),
            }),
            effective_at: self.created_at,
            expires_at: self
                .grant_expiration_days
                .filter(|d| *d > 0)
                .map(|d| self.created_at + chrono::Duration::days(i64::from(d))),
            display_name: if auto { "Auto-recharge" } else { "Top-up" }.into(),
            description: None,
            metadata: Some(serde_json::json!({
                "charge_id": self.id, "payment_method_id": self.payment_method_id,
            })),
            source: if auto { SOURCE_AUTO_RECHARGE } else { SOURCE_TOP_UP }.into(),
            created_at: self.created_at,
        }
    }
}

/// One period of one subscription item.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ItemRow {
    pub tenant_id: String,
    pub customer_id: String,
    pub revision: i32,
    pub item: String,
    pub source: String,
    pub display_name: String,
    pub credit_type: String,
    pub amount: Decimal,
    pub cadence: String,
    pub start_at: DateTime<Utc>,
    pub next_period: i32,
    pub decimals: i16,
}

/// The columns of [`ItemRow`] on `subscription_items i JOIN credit_types ct`.
pub const ITEM_COLS: &str = "i.tenant_id, i.customer_id, i.revision, i.item, i.source, i.display_name, i.credit_type,
    i.amount, i.cadence, i.start_at, i.next_period, ct.decimals";

impl ItemRow {
    pub fn cadence(&self) -> Cadence {
        Cadence::parse(&self.cadence).unwrap_or(Cadence::Monthly)
    }

    /// The grant of period `n`: effective at its start, expiring at its end (credits reset each
    /// period). A pure function of the row, so a repeat is the same grant.
    pub fn grant(&self, n: i32) -> GrantSpec {
        let c = self.cadence();
        let start = period::period_start(self.start_at, c, n);
        let end = period::period_start(self.start_at, c, n + 1);
        GrantSpec {
            id: period_grant_id(&self.tenant_id, &self.customer_id, self.revision, &self.item, n),
            customer_id: self.customer_id.clone(),
            resource_id: String::new(),
            credit_type: self.credit_type.clone(),
            decimals: self.decimals as u32,
            amount: self.amount,
            category: Category::Paid,
            priority: 100,
            cost: None,
            effective_at: start,
            expires_at: Some(end),
            display_name: self.display_name.clone(),
            description: None,
            metadata: Some(serde_json::json!({
                "subscription_revision": self.revision, "item": self.item, "period": n,
                "period_start": start, "period_end": end,
            })),
            source: if self.source == SOURCE_ADD_ON {
                SOURCE_ADD_ON
            } else {
                SOURCE_PLAN
            }
            .into(),
            created_at: start,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ent(ct: &str, amount: i64, cadence: Cadence) -> Entitlement {
        Entitlement {
            credit_type: ct.into(),
            amount: Decimal::from(amount),
            cadence,
        }
    }

    #[test]
    fn pro_plan_with_three_extra_credit_add_ons_grants_80000() {
        let plan = [ent("api", 50_000, Cadence::Monthly)];
        let extra = AddOn {
            id: "extra".into(),
            name: "Extra API Credits".into(),
            behavior: Behavior::Increment,
            entitlements: vec![ent("api", 10_000, Cadence::Monthly)],
            quantity: 3,
        };
        let items = items("pro", "Pro", &plan, &[extra]);
        let total: Decimal = items.iter().map(|i| i.amount).sum();
        assert_eq!(total, Decimal::from(80_000));
        assert_eq!(items.len(), 2);
        assert_eq!(items[1].amount, Decimal::from(30_000));
        assert_eq!(items[1].source, SOURCE_ADD_ON);
    }

    #[test]
    fn override_replaces_the_plan_grant_of_its_credit_type_only() {
        let plan = [ent("api", 50_000, Cadence::Monthly), ent("img", 100, Cadence::Monthly)];
        let big = AddOn {
            id: "big".into(),
            name: "Big".into(),
            behavior: Behavior::Override,
            entitlements: vec![ent("api", 200_000, Cadence::Monthly)],
            quantity: 1,
        };
        let items = items("pro", "Pro", &plan, std::slice::from_ref(&big));
        let api: Vec<&Item> = items.iter().filter(|i| i.credit_type == "api").collect();
        assert_eq!(api.len(), 1);
        assert_eq!(api[0].amount, Decimal::from(200_000));
        assert!(items
            .iter()
            .any(|i| i.credit_type == "img" && i.amount == Decimal::from(100)));
        // Quantity 0: the add-on does nothing, the plan's grant stands.
        let none = AddOn { quantity: 0, ..big };
        let items = super::items("pro", "Pro", &plan, &[none]);
        assert_eq!(items.len(), 2);
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        assert_eq!(top_up_charge_id("t", "k"), top_up_charge_id("t", "k"));
        assert_ne!(top_up_charge_id("t", "k"), top_up_charge_id("t2", "k"));
        let a = period_grant_id("t", "c", 1, "plan:pro:0", 0);
        assert_eq!(a, period_grant_id("t", "c", 1, "plan:pro:0", 0));
        assert_ne!(a, period_grant_id("t", "c", 1, "plan:pro:0", 1));
        assert_ne!(a, period_grant_id("t", "c", 2, "plan:pro:0", 0));
        assert_eq!(charge_grant_id("t", "ch_1"), charge_grant_id("t", "ch_1"));
    }

    #[test]
    fn prices_round_to_cents() {
        let d = |s: &str| s.parse::<Decimal>().unwrap();
        assert_eq!(price(d("30"), d("0.5")), d("15"));
        assert_eq!(price(d("1"), d("0.005")), d("0.01"));
        assert_eq!(price(d("3"), d("0.333")), d("1.00"));
    }
}
