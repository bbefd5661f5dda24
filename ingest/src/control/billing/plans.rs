//! Plans, add-ons and subscriptions.
//!
//! A subscription snapshots what its plan and add-ons grant into `subscription_items` (one row
//! per entitlement, after `increment` / `override`), under a revision that grows on every change.
//! Each item grants its amount at the start of every cadence period counted from `start_at`,
//! expiring at the period's end. This endpoint grants the current period itself (so the answer
//! carries the grants); later periods are granted by the ledger-writer's scheduler. Both issue
//! the same grant id for the same (revision, item, period), so the rater applies it once.
//! Changing the subscription voids the current grants of the old revision and issues the new.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shared::billing::period::{period_index, period_start};
use shared::billing::{self, AddOn, Behavior, Cadence, Item, ItemRow, ITEM_COLS};
use shared::model::{GrantRefCmd, InputMsg};

use super::{dec, name};
use crate::auth::Tenant;
use crate::control::grants::issue_grant;
use crate::credit_type::require_credit_type;
use crate::error::replies::{BadRequest, Conflict, Invalid, NotFound, Unauthorized, Unavailable};
use crate::error::{ApiError, ApiResult, Body};
use crate::grant::GrantView;
use crate::produce::produce;
use crate::validate;
use crate::AppState;
use utoipa::ToSchema;
use uuid::Uuid;

/// How long a subscription change has to grant its current periods itself before the plan
/// scheduler takes them over (`store_revision`).
const HANDOFF: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

/// Entitlements in one plan or add-on.
const MAX_ENTITLEMENTS: usize = 50;
/// Add-ons on one subscription.
const MAX_ADDONS: usize = 50;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewEntitlement {
    credit_type: String,
    /// Credits per period: a positive decimal string.
    #[schema(value_type = String)]
    amount: Value,
    /// "monthly" or "yearly".
    cadence: String,
}

/// A credit entitlement as stored: `amount` credits every `cadence`.
#[derive(ToSchema)]
#[allow(dead_code)] // describes shared::billing::Entitlement's JSON
pub struct Entitlement {
    credit_type: String,
    /// A decimal string.
    amount: String,
    /// monthly or yearly.
    cadence: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPlan {
    name: String,
    /// How the plan is billed ("monthly" or "yearly", default monthly). A yearly plan with a
    /// monthly entitlement grants every month: the drip.
    billing_period: Option<String>,
    credit_entitlements: Vec<NewEntitlement>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAddOn {
    name: String,
    credit_entitlements: Vec<NewEntitlement>,
    /// "increment" (default: granted beside the plan's) or "override" (replaces the plan's
    /// grant of the same credit type).
    behavior: Option<String>,
}

/// A plan.
#[derive(Serialize, ToSchema)]
pub struct Plan {
    id: String,
    name: String,
    /// monthly or yearly.
    billing_period: String,
    #[schema(value_type = Vec<Entitlement>)]
    credit_entitlements: Value,
}

/// An add-on.
#[derive(Serialize, ToSchema)]
#[schema(as = AddOn)]
pub struct AddOnView {
    id: String,
    name: String,
    /// increment or override.
    behavior: String,
    #[schema(value_type = Vec<Entitlement>)]
    credit_entitlements: Value,
}

async fn entitlements(s: &AppState, tenant: &str, given: &[NewEntitlement]) -> ApiResult<Vec<billing::Entitlement>> {
    if given.len() > MAX_ENTITLEMENTS {
        return Err(ApiError::invalid(
            "credit_entitlements",
            "too_many",
            format!("at most {MAX_ENTITLEMENTS}"),
        ));
    }
    let mut out = Vec::new();
    for (i, e) in given.iter().enumerate() {
        let f = |x: &str| format!("credit_entitlements[{i}].{x}");
        let ct = require_credit_type(&s.pg.control, tenant, &e.credit_type, &f("credit_type")).await?;
        let amount = validate::amount(&f("amount"), &e.amount, ct.decimals as u32, false)?;
        let cadence = Cadence::parse(&e.cadence)
            .ok_or_else(|| ApiError::invalid(&f("cadence"), "invalid_value", "must be \"monthly\" or \"yearly\""))?;
        out.push(billing::Entitlement {
            credit_type: e.credit_type.clone(),
            amount,
            cadence,
        });
    }
    Ok(out)
}

/// `PUT /v1/plans/{id}`. Existing subscriptions keep what they were subscribed with until they
/// are changed.
#[utoipa::path(put, path = "/v1/plans/{id}", tag = "billing",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "the plan id")),
    request_body(content = NewPlan, content_type = "application/json"),
    responses((status = 200, description = "the plan", body = Plan), BadRequest, Unauthorized, Invalid, Unavailable)
)]
pub async fn put_plan(
    t: Tenant,
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
    Body(b): Body<NewPlan>,
) -> ApiResult<Json<Plan>> {
    validate::id("id", &id)?;
    name("name", &b.name)?;
    let period = b.billing_period.as_deref().unwrap_or("monthly");
    if Cadence::parse(period).is_none() {
        return Err(ApiError::invalid(
            "billing_period",
            "invalid_value",
            "must be \"monthly\" or \"yearly\"",
        ));
    }
    let ents = entitlements(&s, &t.id, &b.credit_entitlements).await?;
    let ents = serde_json::to_value(&ents).map_err(ApiError::internal)?;
    sqlx::query(
        "INSERT INTO plans (tenant_id, id, name, billing_period, entitlements) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (tenant_id, id) DO UPDATE SET name = EXCLUDED.name, billing_period = EXCLUDED.billing_period,
            entitlements = EXCLUDED.entitlements, updated_at = now()",
    )
    .bind(&t.id)
    .bind(&id)
    .bind(&b.name)
    .bind(period)
    .bind(&ents)
    .execute(&s.pg.control)
    .await?;
    Ok(Json(Plan {
        id,
        name: b.name,
        billing_period: period.to_owned(),
        credit_entitlements: ents,
    }))
}

#[utoipa::path(get, path = "/v1/plans/{id}", tag = "billing",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "the plan id")),
    responses((status = 200, description = "the plan", body = Plan), Unauthorized, NotFound, Invalid, Unavailable)
)]
pub async fn get_plan(t: Tenant, State(s): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult<Json<Plan>> {
    let row: Option<(String, String, Value)> =
        sqlx::query_as("SELECT name, billing_period, entitlements FROM plans WHERE tenant_id = $1 AND id = $2")
            .bind(&t.id)
            .bind(&id)
            .fetch_optional(&s.pg.control)
            .await?;
    let (n, p, e) = row.ok_or_else(|| ApiError::not_found("plan"))?;
    Ok(Json(Plan {
        id,
        name: n,
        billing_period: p,
        credit_entitlements: e,
    }))
}

/// `PUT /v1/addons/{id}`
#[utoipa::path(put, path = "/v1/addons/{id}", tag = "billing",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "the add-on id")),
    request_body(content = NewAddOn, content_type = "application/json"),
    responses((status = 200, description = "the add-on", body = AddOnView), BadRequest, Unauthorized, Invalid, Unavailable)
)]
pub async fn put_addon(
    t: Tenant,
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
    Body(b): Body<NewAddOn>,
) -> ApiResult<Json<AddOnView>> {
    validate::id("id", &id)?;
    name("name", &b.name)?;
    let behavior = b.behavior.as_deref().unwrap_or("increment");
    if !["increment", "override"].contains(&behavior) {
        return Err(ApiError::invalid(
            "behavior",
            "invalid_value",
            "must be \"increment\" or \"override\"",
        ));
    }
    let ents = entitlements(&s, &t.id, &b.credit_entitlements).await?;
    let ents = serde_json::to_value(&ents).map_err(ApiError::internal)?;
    sqlx::query(
        "INSERT INTO addons (tenant_id, id, name, behavior, entitlements) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (tenant_id, id) DO UPDATE SET name = EXCLUDED.name, behavior = EXCLUDED.behavior,
            entitlements = EXCLUDED.entitlements, updated_at = now()",
    )
    .bind(&t.id)
    .bind(&id)
    .bind(&b.name)
    .bind(behavior)
    .bind(&ents)
    .execute(&s.pg.control)
    .await?;
    Ok(Json(AddOnView {
        id,
        name: b.name,
        behavior: behavior.to_owned(),
        credit_entitlements: ents,
    }))
}

#[utoipa::path(get, path = "/v1/addons/{id}", tag = "billing",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "the add-on id")),
    responses((status = 200, description = "the add-on", body = AddOnView), Unauthorized, NotFound, Invalid, Unavailable)
)]
pub async fn get_addon(
    t: Tenant,
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<AddOnView>> {
    let row: Option<(String, String, Value)> =
        sqlx::query_as("SELECT name, behavior, entitlements FROM addons WHERE tenant_id = $1 AND id = $2")
            .bind(&t.id)
            .bind(&id)
            .fetch_optional(&s.pg.control)
            .await?;
    let (n, b, e) = row.ok_or_else(|| ApiError::not_found("add-on"))?;
    Ok(Json(AddOnView {
        id,
        name: n,
        behavior: b,
        credit_entitlements: e,
    }))
}

#[derive(Deserialize, Clone, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubAddOn {
    id: String,
    /// 1-10000, default 1.
    quantity: Option<u32>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSubscription {
    plan_id: String,
    /// Each add-on once, at most 50.
    addons: Option<Vec<SubAddOn>>,
    /// RFC 3339: the billing anchor; default now (a change keeps the current one).
    #[schema(value_type = Option<String>, format = DateTime)]
    start_at: Option<Value>,
}

/// An add-on of a subscription.
#[derive(ToSchema)]
#[allow(dead_code)] // describes the JSON stored with the subscription
pub struct SubscribedAddOn {
    id: String,
    quantity: u32,
}

/// A customer's subscription.
#[derive(Serialize, ToSchema)]
pub struct Subscription {
    customer_id: String,
    plan_id: String,
    #[schema(value_type = Vec<SubscribedAddOn>)]
    addons: Value,
    /// The billing anchor: periods count from it.
    start_at: DateTime<Utc>,
    /// Grows on every change.
    revision: i32,
}

/// The current period of an item.
#[derive(Serialize, ToSchema)]
pub struct Period {
    index: i32,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    /// The period's grant.
    grant_id: Uuid,
}

/// One entitlement of a subscription (after add-ons).
#[derive(Serialize, ToSchema)]
pub struct SubscriptionItem {
    item: String,
    /// plan or addon.
    source: String,
    display_name: String,
    credit_type: String,
    /// A decimal string.
    amount: String,
    /// monthly or yearly.
    cadence: String,
    /// Null before the subscription starts.
    current_period: Option<Period>,
}

/// A subscription and its items.
#[derive(Serialize, ToSchema)]
pub struct SubscriptionReply {
    subscription: Subscription,
    items: Vec<SubscriptionItem>,
}

/// A subscription, its items, and the grants of the current period this change issued
/// (none when nothing changed).
#[derive(Serialize, ToSchema)]
pub struct SubscriptionChanged {
    subscription: Subscription,
    items: Vec<SubscriptionItem>,
    grants: Vec<GrantView>,
}

type SubRow = (String, Value, DateTime<Utc>, i32);

async fn items_of(s: &AppState, tenant: &str, customer: &str, revision: i32) -> ApiResult<Vec<ItemRow>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {ITEM_COLS} FROM subscription_items i
         JOIN credit_types ct ON ct.tenant_id = i.tenant_id AND ct.id = i.credit_type
         WHERE i.tenant_id = $1 AND i.customer_id = $2 AND i.revision = $3 ORDER BY i.item"
    ))
    .bind(tenant)
    .bind(customer)
    .bind(revision)
    .fetch_all(&s.pg.control)
    .await?)
}

fn sub_json(customer: &str, r: &SubRow) -> Subscription {
    Subscription {
        customer_id: customer.to_owned(),
        plan_id: r.0.clone(),
        addons: r.1.clone(),
        start_at: r.2,
        revision: r.3,
    }
}

fn item_json(i: &ItemRow, now: DateTime<Utc>) -> SubscriptionItem {
    let c = i.cadence();
    let current = period_index(i.start_at, c, now);
    SubscriptionItem {
        item: i.item.clone(),
        source: i.source.clone(),
        display_name: i.display_name.clone(),
        credit_type: i.credit_type.clone(),
        amount: dec(i.amount),
        cadence: i.cadence.clone(),
        current_period: current.map(|n| Period {
            index: n,
            start: period_start(i.start_at, c, n),
            end: period_start(i.start_at, c, n + 1),
            grant_id: billing::period_grant_id(&i.tenant_id, &i.customer_id, i.revision, &i.item, n),
        }),
    }
}

/// `PUT /v1/subscriptions/{customer_id}` `{plan_id, addons?: [{id, quantity}], start_at?}`:
/// the subscription, its items and the grants of the current period.
#[utoipa::path(put, path = "/v1/subscriptions/{customer_id}", tag = "billing",
    security(("api_key" = [])),
    params(("customer_id" = String, Path, description = "the customer")),
    request_body(content = NewSubscription, content_type = "application/json"),
    responses((status = 200, description = "the subscription, its items and the grants of the current period it issued", body = SubscriptionChanged), (status = 202, description = "changed; some grants of the current period are not yet applied (status pending)", body = SubscriptionChanged), BadRequest, Unauthorized, NotFound, Conflict, Invalid, Unavailable)
)]
pub async fn put_subscription(
    t: Tenant,
    State(s): State<Arc<AppState>>,
    Path(customer): Path<String>,
    Body(b): Body<NewSubscription>,
) -> ApiResult<(StatusCode, Json<SubscriptionChanged>)> {
    validate::id("customer_id", &customer)?;
    validate::id("plan_id", &b.plan_id)?;
    let now = Utc::now();
    let start_at = match &b.start_at {
        None | Some(Value::Null) => None,
        Some(v) => Some(validate::timestamp("start_at", v)?),
    };
    let addons_in = b.addons.clone().unwrap_or_default();
    if addons_in.len() > MAX_ADDONS {
        return Err(ApiError::invalid("addons", "too_many", format!("at most {MAX_ADDONS}")));
    }
    let plan: Option<(String, Value)> =
        sqlx::query_as("SELECT name, entitlements FROM plans WHERE tenant_id = $1 AND id = $2")
            .bind(&t.id)
            .bind(&b.plan_id)
            .fetch_optional(&s.pg.control)
            .await?;
    let (plan_name, plan_ents) =
        plan.ok_or_else(|| ApiError::invalid("plan_id", "unknown_plan", format!("no plan {}", b.plan_id)))?;
    let plan_ents: Vec<billing::Entitlement> = serde_json::from_value(plan_ents).map_err(ApiError::internal)?;
    let addons = addons_of(&s, &t.id, &addons_in).await?;
    let addons_json = json!(addons_in
        .iter()
        .map(|a| json!({"id": a.id, "quantity": a.quantity.unwrap_or(1)}))
        .collect::<Vec<_>>());
    let items = billing::items(&b.plan_id, &plan_name, &plan_ents, &addons);

    let (sub, revision, old_rev, ended) =
        match store_revision(&s, &t.id, &customer, &b.plan_id, &addons_json, start_at, &items, now).await? {
            Stored::Same(c) => {
                let rows = items_of(&s, &t.id, &customer, c.3).await?;
                return Ok((
                    StatusCode::OK,
                    Json(SubscriptionChanged {
                        subscription: sub_json(&customer, &c),
                        items: rows.iter().map(|i| item_json(i, now)).collect(),
                        grants: Vec::new(),
                    }),
                ));
            }
            Stored::Changed {
                sub,
                revision,
                old_rev,
                ended,
            } => (sub, revision, old_rev, ended),
        };

    // Void what the old revision granted for its current period (the grant of next_period - 1;
    // earlier ones have expired). A void of a grant the pool never saw changes nothing.
    let voids = period_voids(&t.id, &customer, &ended, old_rev, now);
    if !voids.is_empty() {
        produce(&s, voids.into_iter()).await?;
    }
    // Grant the current period of every item now; the scheduler takes the later ones.
    let rows = items_of(&s, &t.id, &customer, revision).await?;
    let (grants, all_applied) = grant_current_periods(&s, &t.id, &customer, revision, &rows, now).await?;
    let status = if all_applied {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((
        status,
        Json(SubscriptionChanged {
            subscription: sub_json(&customer, &sub),
            items: rows.iter().map(|i| item_json(i, now)).collect(),
            grants,
        }),
    ))
}

/// What saving a subscription did.
enum Stored {
    /// The same subscription again: nothing changed.
    Same(SubRow),
    /// A new revision, its items inserted and the old revision's items ended.
    Changed {
        sub: SubRow,
        revision: i32,
        old_rev: Option<i32>,
        ended: Vec<EndedItem>,
    },
}

/// Save the subscription's new revision and its items in one transaction, ending the old
/// revision's items; the same subscription again changes nothing.
#[allow(clippy::too_many_arguments)] // the request's parts, each once
async fn store_revision(
    s: &AppState,
    tenant: &str,
    customer: &str,
    plan_id: &str,
    addons_json: &Value,
    start_at: Option<DateTime<Utc>>,
    items: &[Item],
    now: DateTime<Utc>,
) -> ApiResult<Stored> {
    let mut tx = s.pg.control.begin().await?;
    let current: Option<SubRow> = sqlx::query_as(
        "SELECT plan_id, addons, start_at, revision FROM subscriptions WHERE tenant_id = $1 AND customer_id = $2
         FOR UPDATE",
    )
    .bind(tenant)
    .bind(customer)
    .fetch_optional(&mut *tx)
    .await?;
    let same = |c: &&SubRow| c.0 == plan_id && c.1 == *addons_json && start_at.is_none_or(|st| st == c.2);
    if let Some(c) = current.as_ref().filter(same) {
        // The same subscription again: nothing changes.
        tx.commit().await?;
        return Ok(Stored::Same(c.clone()));
    }
    // A change keeps the original start (the billing anchor) unless a new one is given.
    let start = start_at.or(current.as_ref().map(|c| c.2)).unwrap_or(now);
    let revision = current.as_ref().map_or(1, |c| c.3 + 1);
    let sub: SubRow = sqlx::query_as(
        "INSERT INTO subscriptions (tenant_id, customer_id, plan_id, addons, start_at, revision)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (tenant_id, customer_id) DO UPDATE SET plan_id = EXCLUDED.plan_id, addons = EXCLUDED.addons,
            start_at = EXCLUDED.start_at, revision = EXCLUDED.revision, updated_at = now()
         RETURNING plan_id, addons, start_at, revision",
    )
    .bind(tenant)
    .bind(customer)
    .bind(plan_id)
    .bind(addons_json)
    .bind(start)
    .bind(revision)
    .fetch_one(&mut *tx)
    .await?;
    // End the old revision; its row locks make us wait for a scheduler tick in progress, so
    // next_period read here includes a grant it just issued.
    let ended: Vec<EndedItem> = sqlx::query_as(
        "UPDATE subscription_items i SET ended_at = now() FROM credit_types ct
         WHERE i.tenant_id = $1 AND i.customer_id = $2 AND i.ended_at IS NULL
            AND ct.tenant_id = i.tenant_id AND ct.id = i.credit_type
         RETURNING i.item, i.next_period, i.credit_type, ct.decimals",
    )
    .bind(tenant)
    .bind(customer)
    .fetch_all(&mut *tx)
    .await?;
    for it in items {
        let (n, at) = match period_index(start, it.cadence, now) {
            Some(n) => (n, period_start(start, it.cadence, n)),
            None => (0, start),
        };
        // A period that has started is granted by this request itself, after it has produced
        // the old revision's voids; the scheduler must not grant it first (the customer would
        // hold both revisions' credits until the voids land, and could spend the old ones). So
        // the item is the scheduler's only after a hand-off lease: this request moves next_at
        // on once it has granted; if it dies first, the scheduler grants the then-current
        // period when the lease runs out.
        let at = if at <= now { now + HANDOFF } else { at };
        sqlx::query(
            "INSERT INTO subscription_items (tenant_id, customer_id, revision, item, source, display_name, credit_type,
                amount, cadence, start_at, next_period, next_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(tenant)
        .bind(customer)
        .bind(revision)
        .bind(&it.key)
        .bind(it.source)
        .bind(&it.display_name)
        .bind(&it.credit_type)
        .bind(it.amount)
        .bind(it.cadence.as_str())
        .bind(start)
        .bind(n)
        .bind(at)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(Stored::Changed {
        sub,
        revision,
        old_rev: current.as_ref().map(|c| c.3),
        ended,
    })
}

/// The add-ons a subscription asks for, each validated and read from the catalogue (the first
/// bad one answers 422, naming it).
async fn addons_of(s: &AppState, tenant: &str, addons_in: &[SubAddOn]) -> ApiResult<Vec<AddOn>> {
    let mut addons = Vec::new();
    let mut seen = HashMap::new();
    for (i, a) in addons_in.iter().enumerate() {
        validate::id(&format!("addons[{i}].id"), &a.id)?;
        if seen.insert(a.id.clone(), i).is_some() {
            return Err(ApiError::invalid(
                &format!("addons[{i}].id"),
                "duplicate",
                "each add-on once (use quantity)",
            ));
        }
        let q = a.quantity.unwrap_or(1);
        if !(1..=10_000).contains(&q) {
            return Err(ApiError::invalid(
                &format!("addons[{i}].quantity"),
                "out_of_range",
                "must be between 1 and 10000",
            ));
        }
        let row: Option<(String, String, Value)> =
            sqlx::query_as("SELECT name, behavior, entitlements FROM addons WHERE tenant_id = $1 AND id = $2")
                .bind(tenant)
                .bind(&a.id)
                .fetch_optional(&s.pg.control)
                .await?;
        let (n, behavior, ents) = row.ok_or_else(|| {
            ApiError::invalid(
                &format!("addons[{i}].id"),
                "unknown_addon",
                format!("no add-on {}", a.id),
            )
        })?;
        addons.push(AddOn {
            id: a.id.clone(),
            name: n,
            behavior: if behavior == "override" {
                Behavior::Override
            } else {
                Behavior::Increment
            },
            entitlements: serde_json::from_value(ents).map_err(ApiError::internal)?,
            quantity: q,
        });
    }
    Ok(addons)
}

/// The voids of what the old revision granted for its current period (the grant of
/// next_period - 1; earlier ones have expired), from the items `ended`.
fn period_voids(
    tenant: &str,
    customer: &str,
    ended: &[EndedItem],
    old_rev: Option<i32>,
    now: DateTime<Utc>,
) -> Vec<InputMsg> {
    ended
        .iter()
        .filter(|e| e.1 > 0)
        .filter_map(|(item, next, ct, decimals)| {
            old_rev.map(|r| {
                InputMsg::Void(GrantRefCmd {
                    tenant_id: tenant.to_owned(),
                    customer_id: customer.to_owned(),
                    resource_id: String::new(),
                    credit_type: ct.clone(),
                    decimals: *decimals as u32,
                    grant_id: billing::period_grant_id(tenant, customer, r, item, next - 1),
                    at: now,
                    actor: "subscription".into(),
                })
            })
        })
        .collect()
}

/// Grant the current period of every item now (the scheduler takes the later ones) and move
/// its next period on: the grants, and whether every one was applied to the live pool.
async fn grant_current_periods(
    s: &AppState,
    tenant: &str,
    customer: &str,
    revision: i32,
    rows: &[ItemRow],
    now: DateTime<Utc>,
) -> ApiResult<(Vec<GrantView>, bool)> {
    let mut grants = Vec::new();
    let mut all_applied = true;
    for i in rows {
        let Some(n) = period_index(i.start_at, i.cadence(), now) else {
            continue;
        };
        if i.next_period > n {
            continue;
        }
        let (st, Json(g)) = issue_grant(s, tenant, i.grant(n), "subscription").await?;
        all_applied &= st == StatusCode::CREATED;
        grants.push(g.grant);
        let c = i.cadence();
        sqlx::query(
            "UPDATE subscription_items SET next_period = $5, next_at = $6
             WHERE tenant_id = $1 AND customer_id = $2 AND revision = $3 AND item = $4 AND next_period <= $7",
        )
        .bind(tenant)
        .bind(customer)
        .bind(revision)
        .bind(&i.item)
        .bind(n + 1)
        .bind(period_start(i.start_at, c, n + 1))
        .bind(n)
        .execute(&s.pg.control)
        .await?;
    }
    Ok((grants, all_applied))
}

/// An item the new revision ended: (item, next_period, credit_type, decimals).
type EndedItem = (String, i32, String, i16);

/// `GET /v1/subscriptions/{customer_id}`
#[utoipa::path(get, path = "/v1/subscriptions/{customer_id}", tag = "billing",
    security(("api_key" = [])),
    params(("customer_id" = String, Path, description = "the customer")),
    responses((status = 200, description = "the subscription", body = SubscriptionReply), Unauthorized, NotFound, Invalid, Unavailable)
)]
pub async fn get_subscription(
    t: Tenant,
    State(s): State<Arc<AppState>>,
    Path(customer): Path<String>,
) -> ApiResult<Json<SubscriptionReply>> {
    let sub: Option<SubRow> = sqlx::query_as(
        "SELECT plan_id, addons, start_at, revision FROM subscriptions WHERE tenant_id = $1 AND customer_id = $2",
    )
    .bind(&t.id)
    .bind(&customer)
    .fetch_optional(&s.pg.control)
    .await?;
    let sub = sub.ok_or_else(|| ApiError::not_found("subscription"))?;
    let rows = items_of(&s, &t.id, &customer, sub.3).await?;
    let now = Utc::now();
    Ok(Json(SubscriptionReply {
        subscription: sub_json(&customer, &sub),
        items: rows.iter().map(|i| item_json(i, now)).collect(),
    }))
}
