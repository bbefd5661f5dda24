use clap::Parser;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    shared::telemetry::init_tracing();
    let config = rater::Config::parse();
    let handle = shared::telemetry::install_metrics();
    let shutdown = shared::telemetry::shutdown_on_signal();
    let ready = shared::telemetry::Ready::default();
    shared::telemetry::serve_ops(config.metrics_listen, handle, ready.clone(), shutdown.clone()).await?;
    let r = rater::run(config, ready, shutdown).await;
    if let Err(e) = &r {
        tracing::error!(error = %format!("{e:#}"), "rater failed");
    }
    r
}
