//! ingest: the HTTP front door, laid out by the data that flows through it.
//!
//! - [`event`]: the event path. Validates, authenticates and rate-limits usage events and
//!   produces them to the input topic (idempotent producer, acks=all): 202 means durable in
//!   Kafka.
//! - [`control`]: the control plane. Tenants and keys, catalogue, grants, limits, webhook
//!   endpoints and alerts, billing.
//! - [`query`]: the query plane. Balance, pre-check, grants list, ledger, usage, event status.
//!
//! Each plane has its own Postgres pool ([`Pools`], sized by [`PoolSizes`]). What more than one
//! plane uses sits beside them: [`auth`], [`error`], [`validate`], [`produce`] (grants and
//! limits travel the input topic too), [`credit_type`], [`grant`] and [`page`]. The planes do
//! not import each other, except `control::billing` issuing grants through `control::grants`.

pub mod auth;
pub mod control;
pub mod credit_type;
pub mod error;
pub mod event;
pub mod grant;
pub mod limit;
pub mod metric;
pub mod openapi;
pub mod page;
pub mod produce;
pub mod query;
pub mod validate;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use dashmap::DashMap;
use rdkafka::producer::{FutureProducer, Producer};
use shared::config::{DbArgs, KafkaArgs, RedisArgs};
use shared::keys::Keys;
use shared::telemetry::Ready;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;

/// ingest's configuration (flags or env).
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "ingest", about = "HTTP API of the credits pipeline")]
pub struct Config {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub db: DbArgs,
    /// Address of the HTTP API.
    #[arg(long, env = "INGEST_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Where /healthz, /readyz and /metrics are served.
    #[arg(long, env = "INGEST_METRICS_LISTEN", default_value = "127.0.0.1:9100")]
    pub metrics_listen: SocketAddr,
    /// Operator token for /v1/admin/.
    #[arg(long, env = "INGEST_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: String,
    /// How far back an event's timestamp may lie, in seconds: the rater's dedupe window.
    #[arg(long, env = "DEDUPE_WINDOW_SECONDS", default_value_t = 86_400,
          value_parser = clap::value_parser!(u64).range(60..=35 * 86_400))]
    pub dedupe_window_s: u64,
    /// How long a grant or void waits to be applied to the live pool before answering 202.
    #[arg(long, env = "INGEST_APPLY_WAIT_MS", default_value_t = 5000)]
    pub apply_wait_ms: u64,
    /// Producer linger, in milliseconds: how long a produce waits for more events of its
    /// partition to share a batch (a request's 202 waits for the ack, so this adds up to that much
    /// to its latency). Each event is one input message, so small batches cost the broker most:
    /// at 8,000 events/s over 16 partitions, 50 ms against 5 ms cut the broker's CPU per event by
    /// about 40% (`loadtest/RESULTS.md`, 2026-12-07).
    #[arg(long, env = "INGEST_LINGER_MS", default_value_t = 50)]
    pub linger_ms: u32,
    /// Where the tenants' events-per-second limits live: `redis` (one limit shared by every
    /// replica, one Redis call per request) or `local` (per replica, no Redis call).
    #[arg(long, env = "INGEST_RATE_LIMITER", value_enum, default_value = "redis")]
    pub rate_limiter: limit::Mode,
    /// Postgres connections per plane.
    #[command(flatten)]
    pub pools: PoolSizes,
    /// Webhook endpoints.
    #[command(flatten)]
    pub webhooks: control::webhooks::Settings,
    /// Charges (top-ups).
    #[command(flatten)]
    pub billing: control::billing::Settings,
}

/// How many Postgres connections each plane may hold. The query plane's pool is
/// `DATABASE_MAX_CONNECTIONS`, as the other services size theirs.
#[derive(clap::Args, Debug, Clone)]
pub struct PoolSizes {
    /// Connections of the event path: API keys missing from the 10 s cache.
    #[arg(long, env = "INGEST_DB_EVENT_CONNECTIONS", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub db_event_connections: u32,
    /// Connections of the control plane: catalogue, grants, webhooks, billing.
    #[arg(long, env = "INGEST_DB_CONTROL_CONNECTIONS", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub db_control_connections: u32,
}

/// One Postgres pool per plane: a burst of ledger reads or a top-up waiting on the payment
/// endpoint never takes a connection another plane needs.
pub struct Pools {
    pub event: sqlx::PgPool,
    pub control: sqlx::PgPool,
    pub query: sqlx::PgPool,
}

impl Pools {
    async fn connect(db: &DbArgs, sizes: &PoolSizes) -> Result<Self, sqlx::Error> {
        let sized = |n: u32| DbArgs {
            database_max_connections: n,
            ..db.clone()
        };
        Ok(Self {
            event: shared::db::connect(&sized(sizes.db_event_connections)).await?,
            control: shared::db::connect(&sized(sizes.db_control_connections)).await?,
            query: shared::db::connect(db).await?,
        })
    }

    /// Each pool's connections in use and idle, as gauges labelled by plane.
    fn record(&self) {
        for (plane, pool) in [
            ("event", &self.event),
            ("control", &self.control),
            ("query", &self.query),
        ] {
            let idle = pool.num_idle() as f64;
            let size = f64::from(pool.size());
            metrics::gauge!(crate::metric::DB_CONNECTIONS, "plane" => plane, "state" => "idle").set(idle);
            metrics::gauge!(crate::metric::DB_CONNECTIONS, "plane" => plane, "state" => "in_use").set(size - idle);
        }
    }
}

pub struct AppState {
    pub config: Config,
    /// Postgres, one pool per plane.
    pub pg: Pools,
    pub redis: shared::redis_conn::RedisConn,
    pub producer: FutureProducer,
    pub keys: Keys,
    pub keys_cache: DashMap<Vec<u8>, auth::CachedKey>,
    /// The tenants' events-per-second limits.
    pub limiter: limit::Limiter,
    /// The payment endpoint client (top-ups), built once at start-up from the settings.
    pub charges: shared::billing::charge::ChargeClient,
}

/// The API: every route with its handler's `#[utoipa::path]`, from which utoipa-axum builds
/// the OpenAPI document as it routes (handlers of one path share a `routes!`).
pub fn api() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(event::routes())
        .merge(control::routes())
        .merge(query::routes())
}

pub fn router(state: Arc<AppState>) -> Router {
    let (api, doc) = api().split_for_parts();
    api.route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ready" }))
        .route("/openapi.json", get(openapi::serve))
        .merge(openapi::docs::<Arc<AppState>>(doc))
        .layer(axum::middleware::from_fn(track))
        .layer(axum::extract::DefaultBodyLimit::max(5 * 1024 * 1024))
        .fallback(|| async { error::ApiError::not_found("route") })
        .with_state(state)
}

tokio::task_local! {
    /// The trace id of the request being served: `produce::produce` puts it on every message.
    pub static TRACE_ID: String;
}

/// Count and time every request by route template (never the raw path) and status; run it in
/// a span with its trace id (from `traceparent`, else new), answered as `x-trace-id`.
async fn track(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched".to_owned(), |p| p.as_str().to_owned());
    let trace_id =
        shared::kafka::trace_id_from_traceparent(req.headers().get("traceparent").and_then(|v| v.to_str().ok()));
    let span = tracing::info_span!("request", trace_id = %trace_id, route = %route);
    let started = Instant::now();
    let mut resp = TRACE_ID
        .scope(trace_id.clone(), tracing::Instrument::instrument(next.run(req), span))
        .await;
    if let Ok(v) = axum::http::HeaderValue::from_str(&trace_id) {
        resp.headers_mut().insert("x-trace-id", v);
    }
    let status = resp.status().as_u16().to_string();
    metrics::counter!(crate::metric::REQUESTS, "route" => route.clone(), "status" => status).increment(1);
    metrics::histogram!(crate::metric::REQUEST_DURATION, "route" => route).record(started.elapsed().as_secs_f64());
    resp
}

/// Connect to everything and serve on `listener` until `shutdown`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    ready: Ready,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    crate::metric::describe();
    anyhow::ensure!(
        config.admin_token.len() >= 16,
        "INGEST_ADMIN_TOKEN must be at least 16 characters"
    );
    shared::kafka::partition_counts(&config.kafka, &[&config.kafka.input_topic])?;
    let pg = Pools::connect(&config.db, &config.pools).await.context("postgres")?;
    let redis = shared::redis_conn::connect(&config.redis).await.context("redis")?;
    let producer = shared::kafka::producer(&config.kafka, config.linger_ms)?;
    shared::kafka::exit_on_fatal_error(producer.clone(), "ingest");
    let charges = shared::billing::charge::ChargeClient::new(
        Duration::from_millis(config.billing.charge_timeout_ms),
        config.webhooks.allow_private,
    )?;
    let (config_limiter, redis_limiter, keys_limiter) = (
        config.rate_limiter,
        redis.clone(),
        Keys::new(config.redis.redis_prefix.clone()),
    );
    let state = Arc::new(AppState {
        charges,
        keys: Keys::new(config.redis.redis_prefix.clone()),
        config,
        pg,
        redis,
        producer: producer.clone(),
        keys_cache: DashMap::new(),
        limiter: limit::Limiter::new(config_limiter, redis_limiter, keys_limiter),
    });
    // The producer queue depth and each plane's Postgres connections, as gauges.
    let gauge_producer = producer.clone();
    let gauge_state = state.clone();
    let gauge_stop = shutdown.clone();
    tokio::spawn(async move {
        while !gauge_stop.is_cancelled() {
            metrics::gauge!(crate::metric::PRODUCER_QUEUE).set(f64::from(gauge_producer.in_flight_count()));
            gauge_state.pg.record();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    ready.set(true);
    tracing::info!(addr = %listener.local_addr()?, "ingest listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    ready.set(false);
    // Everything answered 202 is already acked; flush whatever is left of in-flight requests.
    let _ = producer.flush(shared::config::SHUTDOWN_GRACE);
    tracing::info!("ingest stopped");
    Ok(())
}
