//! The query plane: what tenants read. The real-time balance and the pre-check (from the hot
//! pool in Redis), the grants list, the settled ledger and usage (Postgres), and an event's
//! status.
//!
//! It reads Postgres through its own pool (`Pools::query`), so a burst of ledger or usage reads
//! never takes the connection an API-key lookup on the event path or a top-up needs.

pub mod balance;
pub mod events;
pub mod grants;
pub mod ledger;
pub mod usage;

use std::sync::Arc;

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;

/// The query plane's routes, with their OpenAPI operations.
pub fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(events::get_event))
        .routes(routes!(grants::list_grants))
        .routes(routes!(balance::balance))
        .routes(routes!(balance::check))
        .routes(routes!(usage::usage))
        .routes(routes!(ledger::ledger))
}
