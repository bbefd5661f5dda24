//! `loadtest`: an open-loop load generator for the usage-event pipeline that also proves the
//! result. It creates fresh tenants through the API, sends usage events at a constant arrival
//! rate (no coordinated omission), waits for Postgres to settle them, and checks that nothing was
//! lost or double charged and that every pool balance is exactly grant - expected charge.
//!
//! Modules: [`args`] (flags), [`setup`] (API calls), [`generator`] (schedule, Zipf mix,
//! duplicates), [`expected`] (charge bookkeeping), [`load`] (the driver), [`verify`] (Postgres
//! checks), [`report`] (JSON and summary), [`timeline`] (per-second samples, CSV and chart),
//! [`seed`] (settled history for a database of realistic size).

pub mod args;
pub mod expected;
pub mod generator;
pub mod load;
pub mod redis_mem;
pub mod report;
pub mod seed;
pub mod setup;
pub mod timeline;
pub mod verify;

use std::path::Path;

use anyhow::{Context, Result};
use sqlx::PgPool;

use crate::args::Args;
use crate::generator::CustomerMix;
use crate::load::{LoadConfig, LoadOutcome};
use crate::report::Report;
use crate::seed::{SeedConfig, SeedOutcome};
use crate::timeline::sampler::{Sampler, SamplerConfig, Samples};
use crate::verify::Verification;

/// Runs the whole test: (seeding,) setup, load, settlement wait, verification, report and
/// timeline (with `--ingest-only`: setup without grants, load, report).
///
/// Returns the report (whether or not it is `ok`); an `Err` means the run could not be
/// carried out at all (bad flags, setup refused, Postgres unreachable, seeding failed).
pub async fn run(args: &Args) -> Result<Report> {
    args.validate()?;
    let pool = match &args.database_url {
        Some(url) if !args.ingest_only => Some(verify::connect(url).await?),
        _ => None,
    };
    let seeded = match (&pool, args.seed_events) {
        (Some(pool), Some(_)) => Some(seed_db(pool, args).await?),
        _ => None,
    };
    let client = setup::http_client(args.concurrency as usize)?;
    let mix = CustomerMix::new(args.customers, args.tenants, args.hot_share);

    eprintln!("setup: creating {} tenants at {}", args.tenants, args.base_url());
    let tenants = setup::setup(&client, args, &mix)
        .await
        .context("setup through the API")?;
    let tenant_ids: Vec<String> = tenants.iter().map(|t| t.id.clone()).collect();

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
    let timeline_path = args.timeline_path();
    let sampler = timeline_path.as_ref().map(|_| {
        Sampler::start(&SamplerConfig {
            brokers: args.kafka_brokers.clone().filter(|b| !b.trim().is_empty()),
            groups: args.lag_group.clone(),
            processes: timeline::PROCESSES.iter().map(|p| (*p).to_owned()).collect(),
        })
    });
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
    let verification = match &pool {
        Some(pool) => verify::verify(pool, &tenants, &outcome.expected, warmup_end, args.settle_timeout())
            .await
            .context("verifying settlement in Postgres")?,
        None => Verification::skipped(),
    };
    let samples = sampler.map(Sampler::stop);

    let mut report = Report::build(args, &outcome, &verification);
    report.tenant_ids = tenant_ids.clone();
    if let Some(s) = seeded {
        report.seeded_events = Some(s.total());
        report.seed_s = Some(s.elapsed.as_secs_f64());
    }
    if let (Some(url), false) = (&args.redis_url, args.ingest_only) {
        match redis_mem::dedupe_memory(url, &args.redis_prefix, &tenant_ids).await {
            Ok((bytes, keys)) => report.redis_bytes_per_key = redis_mem::per_key(bytes, keys),
            Err(e) => eprintln!("redis memory per key not measured: {e:#}"),
        }
    }
    if let (Some(path), Some(samples)) = (&timeline_path, samples) {
        // A timeline that cannot be written is reported, but does not make the run fail.
        match write_timeline(
            path,
            args,
            pool.as_ref(),
            &tenant_ids,
            &outcome,
            &verification,
            &samples,
        )
        .await
        {
            Ok(rows) => {
                eprintln!(
                    "timeline: {} seconds in {} and {}",
                    rows,
                    path.display(),
                    timeline::svg_path(path).display()
                );
                report.timeline = Some(path.display().to_string());
            }
            Err(e) => eprintln!("timeline: not written: {e:#}"),
        }
    }
    if let Some(pool) = pool {
        pool.close().await;
    }
    if let Some(path) = &args.report {
        report.write_json(path)?;
    }
    Ok(report)
}

/// `--seed-only`: seeds and returns what it did.
pub async fn seed_only(args: &Args) -> Result<SeedOutcome> {
    args.validate()?;
    let url = args.database_url.as_deref().unwrap_or_default();
    let pool = verify::connect(url).await?;
    let out = seed_db(&pool, args).await;
    pool.close().await;
    out
}

async fn seed_db(pool: &PgPool, args: &Args) -> Result<SeedOutcome> {
    let cfg = SeedConfig {
        events: args.seed_events.unwrap_or_default(),
        tenants: args.tenants,
        customers: args.customers,
        days: args.seed_days,
    };
    seed::seed(pool, &cfg)
        .await
        .context("seeding the database (--seed-events)")
}

/// Reads the settled side, assembles the timeline, writes the CSV and the chart; returns the
/// number of seconds (rows).
async fn write_timeline(
    path: &Path,
    args: &Args,
    pool: Option<&PgPool>,
    tenant_ids: &[String],
    outcome: &LoadOutcome,
    verification: &Verification,
    samples: &Samples,
) -> Result<usize> {
    let settled = match pool {
        Some(pool) => Some(timeline::settled::read(pool, tenant_ids).await?),
        None => None,
    };
    let groups: Vec<String> = args.lag_group.iter().map(|g| g.group.clone()).collect();
    let processes = timeline::cpu_columns();
    let tl = timeline::assemble(&timeline::Sources {
        start: outcome.started_at,
        end: verification.wait_ended_at,
        load_end_s: outcome.send_window.as_secs_f64(),
        load: &outcome.series,
        settled: settled.as_deref(),
        groups: &groups,
        lags: &samples.lag,
        processes: &processes,
        cpu: &samples.cpu,
    });
    std::fs::write(path, tl.to_csv()).with_context(|| format!("writing {}", path.display()))?;
    timeline::chart::draw(&tl, &timeline::svg_path(path))?;
    Ok(tl.rows.len())
}
