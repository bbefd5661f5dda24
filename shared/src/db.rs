//! Postgres: the migrations (run by `ledger-writer migrate`, never on every start) and the pool.

use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

use crate::config::DbArgs;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub async fn connect(args: &DbArgs) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(args.database_max_connections)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect(&args.database_url)
        .await
}
