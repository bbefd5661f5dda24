//! Webhooks as Standard Webhooks defines them (the scheme Svix uses): the event types, message
//! signing and verification, the endpoint URL safety rule, and threshold crossing (a pure
//! function of the pool before and after a batch, the thresholds and what already fired).

pub mod address;
pub mod sign;
pub mod threshold;

/// A grant was created (manual, promo, plan, ...).
pub const GRANTED: &str = "credits.granted";
/// A grant changed after its creation: voided, expired or activated (`data.change`).
pub const GRANT_UPDATED: &str = "credits.grant.updated";
/// A grant crossed one of the grant-level usage thresholds (`grant_usage_percent`).
pub const GRANT_USAGE_LOW: &str = "credits.grant.usage_low";
/// A grant was consumed to zero.
pub const GRANT_DEPLETED: &str = "credits.grant.depleted";
/// A grant reached its expiry with credits left (they left the pool).
pub const EXPIRED: &str = "credits.expired";
/// A pool crossed one of its thresholds (`usage_percent` or `balance_below`).
pub const BALANCE_USAGE_LOW: &str = "credits.balance.usage_low";
/// A pool reached zero (or below, under a soft limit).
pub const BALANCE_DEPLETED: &str = "credits.balance.depleted";
/// A pool is back above a threshold it had crossed (or above zero after depletion).
pub const BALANCE_RECOVERED: &str = "credits.balance.recovered";
/// Usage of a pool was denied or could not be priced: one message per pool and window.
pub const EVENT_REJECTED: &str = "credits.event.rejected";

/// Every event type an endpoint may subscribe to.
pub const EVENT_TYPES: [&str; 12] = [
    GRANTED,
    GRANT_UPDATED,
    GRANT_USAGE_LOW,
    GRANT_DEPLETED,
    EXPIRED,
    BALANCE_USAGE_LOW,
    BALANCE_DEPLETED,
    BALANCE_RECOVERED,
    EVENT_REJECTED,
    crate::billing::AUTO_RECHARGE_SUCCEEDED,
    crate::billing::AUTO_RECHARGE_FAILED,
    crate::billing::AUTO_RECHARGE_PAUSED,
];
