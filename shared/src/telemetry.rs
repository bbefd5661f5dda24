//! Logs, metrics, health and shutdown, set up one way in every service.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// JSON logs when stderr is not a terminal, human ones when it is; `RUST_LOG` filters.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if std::io::stderr().is_terminal() {
        builder.try_init()
    } else {
        builder.json().flatten_event(true).try_init()
    };
}

/// Install the Prometheus recorder (once per process) with latency buckets in seconds.
pub fn install_metrics() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ])
                .expect("static buckets")
                .install_recorder()
                .expect("one recorder per process")
        })
        .clone()
}

/// Readiness flag a service flips once its dependencies answer.
#[derive(Clone, Default)]
pub struct Ready(Arc<AtomicBool>);

impl Ready {
    pub fn set(&self, v: bool) {
        self.0.store(v, Ordering::Release);
    }
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// `/healthz` (the process runs), `/readyz` (it can do its job), `/metrics` (Prometheus).
pub fn ops_router(handle: PrometheusHandle, ready: Ready) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State((_, ready)): State<(PrometheusHandle, Ready)>| async move {
                if ready.get() {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                }
            }),
        )
        .route(
            "/metrics",
            get(|State((handle, _)): State<(PrometheusHandle, Ready)>| async move { handle.render() }),
        )
        .with_state((handle, ready))
}

/// Serve the ops router on `addr` until `shutdown`.
pub async fn serve_ops(
    addr: SocketAddr,
    handle: PrometheusHandle,
    ready: Ready,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = ops_router(handle, ready);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    });
    Ok(local)
}

/// A token cancelled on SIGTERM or ctrl-c: it feeds the HTTP server and every consumer loop.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
            tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested");
        t.cancel();
    });
    token
}

/// One metric as a service describes it at start-up.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Described {
    /// "counter", "gauge" or "histogram".
    pub kind: &'static str,
    pub name: String,
    pub unit: Option<&'static str>,
    pub description: String,
}

/// Every metric `describe` describes (a crate's `metric::describe`), sorted by name: the
/// catalogue, for tests that pin names and for checks that dashboards use only real ones.
pub fn described(describe: impl FnOnce()) -> Vec<Described> {
    use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Catalogue(Mutex<Vec<Described>>);
    impl Catalogue {
        fn add(&self, kind: &'static str, key: KeyName, unit: Option<Unit>, description: SharedString) {
            self.0.lock().expect("poisoned").push(Described {
                kind,
                name: key.as_str().to_owned(),
                unit: unit.map(|u| u.as_str()),
                description: description.to_string(),
            });
        }
    }
    impl Recorder for Catalogue {
        fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
            self.add("counter", key, unit, description);
        }
        fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
            self.add("gauge", key, unit, description);
        }
        fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
            self.add("histogram", key, unit, description);
        }
        fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
            Counter::noop()
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    let catalogue = Catalogue::default();
    metrics::with_local_recorder(&catalogue, describe);
    let mut out = catalogue.0.into_inner().expect("poisoned");
    out.sort();
    out
}
