//! `loadtest` binary: parse the flags, run, print the summary; exit 0 only if the run is ok.

use std::process::ExitCode;

use clap::Parser;
use loadtest::args::Args;

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadtest: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.seed_only {
        return match runtime.block_on(loadtest::seed_only(&args)) {
            Ok(s) => {
                println!(
                    "seeded: {} settled seed events in the database ({} added in {:.1}s)",
                    s.total(),
                    s.added,
                    s.elapsed.as_secs_f64()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("loadtest: error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match runtime.block_on(loadtest::run(&args)) {
        Ok(report) => {
            print!("{}", report.summary());
            if report.ok {
                ExitCode::SUCCESS
            } else {
                eprintln!("loadtest: FAILED: {}", report.failures.join("; "));
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("loadtest: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
