use clap::Parser;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    shared::telemetry::init_tracing();
    let cli = ledger_writer::Cli::parse();
    match cli.command {
        Some(ledger_writer::Command::Migrate) => ledger_writer::migrate(&cli.config.db).await,
        Some(ledger_writer::Command::Reconcile { tenant, strict }) => {
            if ledger_writer::reconcile(&cli.config, tenant.as_deref(), strict).await? {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        Some(ledger_writer::Command::Sweep {
            at,
            tenant,
            customer,
            allow_future,
        }) => {
            let scope = ledger_writer::sweep::Scope {
                tenant_id: tenant,
                customer_id: customer,
            };
            let at = at.unwrap_or_else(chrono::Utc::now);
            if at > chrono::Utc::now() + chrono::Duration::seconds(1) && !allow_future {
                anyhow::bail!("--at {at} is in the future: grants would expire early (pass --allow-future to mean it)");
            }
            let sent = ledger_writer::sweep_once(&cli.config, at, &scope).await?;
            println!("{{\"at\":\"{}\",\"commands\":{sent}}}", at.to_rfc3339());
            Ok(())
        }
        Some(ledger_writer::Command::CompactRollups) => {
            let (pending, rollups) = ledger_writer::compact_rollups(&cli.config).await?;
            println!("{{\"pending_moved\":{pending},\"rollups_written\":{rollups}}}");
            Ok(())
        }
        Some(ledger_writer::Command::Retention { keep_months, dry_run }) => {
            let report = ledger_writer::retention(&cli.config, keep_months, dry_run).await?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        None | Some(ledger_writer::Command::Run) => {
            let handle = shared::telemetry::install_metrics();
            let shutdown = shared::telemetry::shutdown_on_signal();
            let ready = shared::telemetry::Ready::default();
            shared::telemetry::serve_ops(cli.config.metrics_listen, handle, ready.clone(), shutdown.clone()).await?;
            let r = ledger_writer::run(cli.config, ready, shutdown).await;
            if let Err(e) = &r {
                tracing::error!(error = %format!("{e:#}"), "ledger-writer failed");
            }
            r
        }
    }
}
