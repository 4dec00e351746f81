//! `pgquorum-coordinator --config FILE`: run one coordinator until SIGTERM or SIGINT.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use pgquorum_client::shutdown_signal;
use pgquorum_coordinator::{server, Config};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    version,
    about = "pgquorum coordinator: one node of the Raft group that guards PostgreSQL clusters"
)]
struct Args {
    /// Path to the TOML config file.
    #[arg(long, short = 'c', env = "PGQUORUM_COORDINATOR_CONFIG")]
    config: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("PGQUORUM_LOG").unwrap_or_else(|_| EnvFilter::new("info,openraft=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pgquorum-coordinator: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pgquorum-coordinator: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(server::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgquorum-coordinator: {e}");
            ExitCode::FAILURE
        }
    }
}
