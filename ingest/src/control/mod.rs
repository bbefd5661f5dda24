//! The control plane: what tenants and the operator configure. Tenants and keys, the catalogue
//! (credit types, feature mappings), grants, voids and limit overrides (produced to the input
//! topic, so they keep their order with usage), webhook endpoints and alert thresholds, and
//! billing (top-up prices, auto-recharge, plans, subscriptions; a top-up calls the payment
//! endpoint inside the request).
//!
//! It reads and writes Postgres through its own pool (`Pools::control`), so a top-up waiting
//! on a slow payment endpoint holds none of the connections the event path or the query plane
//! need.

pub mod admin;
pub mod billing;
pub mod catalogue;
pub mod grants;
pub mod webhooks;

use std::sync::Arc;

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;

/// The control plane's routes, with their OpenAPI operations.
pub fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(admin::create_tenant))
        .routes(routes!(admin::create_key))
        .routes(routes!(admin::revoke_key))
        .routes(routes!(admin::set_limits))
        .routes(routes!(catalogue::create_credit_type, catalogue::list_credit_types))
        .routes(routes!(catalogue::put_mapping, catalogue::get_mapping))
        .routes(routes!(grants::create_grant))
        .routes(routes!(grants::void_grant))
        .routes(routes!(grants::set_limit))
        .merge(webhooks::routes())
        .merge(billing::routes())
}
