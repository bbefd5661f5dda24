//! The settled ledger as the query plane reads it: one row type and one column list for every
//! read of `ledger_entries` (the ledger page, an event's status).

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

/// One settled ledger entry. Amounts are decimal strings.
#[derive(Serialize, sqlx::FromRow, ToSchema)]
pub struct LedgerEntry {
    pub id: String,
    pub timestamp: DateTime<Utc>,
    /// grant, consume, expire, void, adjust or deny.
    #[serde(rename = "type")]
    pub kind: String,
    pub source: String,
    pub source_id: String,
    pub grant_id: Option<Uuid>,
    #[serde(with = "rust_decimal::serde::str")]
    #[schema(value_type = String)]
    pub amount: Decimal,
    /// The balance of the entry's pool (credit type and resource) after the entry.
    #[serde(with = "rust_decimal::serde::str")]
    #[schema(value_type = String)]
    pub end_balance: Decimal,
    pub actor: String,
    pub customer_id: String,
    pub credit_type: String,
    /// The pool's resource (`null` for the customer's default pool): `end_balance` is that
    /// pool's balance.
    pub resource_id: Option<String>,
}

pub const LEDGER_COLS: &str = "id::text AS id, ts AS timestamp, type AS kind, source, source_id, grant_id,
    amount, end_balance, actor, customer_id, credit_type, NULLIF(resource_id, '') AS resource_id";
