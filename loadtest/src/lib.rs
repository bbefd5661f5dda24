//! `loadtest`: an open-loop load generator for the usage-event pipeline that also proves the
//! result. It creates fresh tenants through the API, sends usage events at a constant arrival
//! rate (no coordinated omission), waits for Postgres to settle them, and checks that nothing was
//! lost or double charged and that every pool balance is exactly grant - expected charge.
//!
//! Modules: [`args`] (flags), [`setup`] (API calls), [`generator`] (schedule, Zipf mix,
//! duplicates), [`expected`] (charge bookkeeping), [`load`] (the driver), [`verify`] (Postgres
//! checks), [`report`] (JSON and summary).

pub mod args;
pub mod expected;
pub mod generator;
pub mod load;
pub mod redis_mem;
pub mod report;
pub mod setup;
pub mod verify;

use anyhow::{Context, Result};

use crate::args::Args;
use crate::generator::CustomerMix;
use crate::load::LoadConfig;
use crate::report::Report;

/// Runs the whole test: setup, load, settlement wait, verification, report (with
/// `--ingest-only`: setup without grants, load, report).
///
/// Returns the report (whether or not it is `ok`); an `Err` means the run could not be
/// carried out at all (bad flags, setup refused, Postgres unreachable).
pub async fn run(args: &Args) -> Result<Report> {
    args.validate()?;
    let pool = match &args.database_url {
        Some(url) if !args.ingest_only => Some(verify::connect(url).await?),
        _ => None,
    };
    let client = setup::http_client(args.concurrency as usize)?;
    let mix = CustomerMix::new(args.customers, args.tenants, args.hot_share);

    eprintln!("setup: creating {} tenants at {}", args.tenants, args.base_url());
    let tenants = setup::setup(&client, args, &mix)
        .await
        .context("setup through the API")?;

    let cfg = LoadConfig {
        url: args.base_url().to_owned(),
        rate: args.rate,
        duration: args.duration(),
        warmup: args.warmup(),
        batch: args.batch,
        concurrency: args.concurrency as usize,
        duplicates: args.duplicates,
        retry: args.retry_policy(),
        stop_file: args.stop_file.clone(),
    };
    // A marker for scripts that act during the load (deploy/local/chaos waits for it).
    eprintln!(
        "load: sending {} events/s for {}s{}",
        args.rate,
        args.duration,
        if args.retry {
            format!(" (retrying failed requests for up to {}s each)", args.retry_max)
        } else {
            String::new()
        }
    );
    let outcome = load::run_load(&client, &cfg, &tenants, mix).await?;
    eprintln!(
        "load: finished sending after {:.1}s{} (accepted {}, rejected {})",
        outcome.send_window.as_secs_f64(),
        if outcome.stopped_by_file {
            ", stopped by --stop-file"
        } else {
            ""
        },
        outcome.accepted,
        outcome.rejected
    );

    let warmup_end = outcome.started_at + chrono::Duration::from_std(args.warmup()).context("warm-up out of range")?;
    let verification = match pool {
        Some(pool) => {
            let v = verify::verify(&pool, &tenants, &outcome.expected, warmup_end, args.settle_timeout())
                .await
                .context("verifying settlement in Postgres")?;
            pool.close().await;
            v
        }
        None => verify::Verification::skipped(),
    };

    let mut report = Report::build(args, &outcome, &verification);
    report.tenant_ids = tenants.iter().map(|t| t.id.clone()).collect();
    if let (Some(url), false) = (&args.redis_url, args.ingest_only) {
        let ids: Vec<String> = tenants.iter().map(|t| t.id.clone()).collect();
        match redis_mem::dedupe_memory(url, &args.redis_prefix, &ids).await {
            Ok((bytes, keys)) => report.redis_bytes_per_key = redis_mem::per_key(bytes, keys),
            Err(e) => eprintln!("redis memory per key not measured: {e:#}"),
        }
    }
    if let Some(path) = &args.report {
        report.write_json(path)?;
    }
    Ok(report)
}
