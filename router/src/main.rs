//! `pgquorum-router --config FILE`: route Postgres connections by the endpoint map.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use pgquorum_router::config::RouterConfig;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    version,
    about = "pgquorum router: forwards Postgres connections to the primary or a fitting replica"
)]
struct Args {
    #[arg(long, short = 'c', env = "PGQUORUM_ROUTER_CONFIG")]
    config: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("PGQUORUM_LOG").unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let config = match RouterConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pgquorum-router: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pgquorum-router: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        tokio::select! {
            result = pgquorum_router::run(config) => match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("pgquorum-router: {e}");
                    ExitCode::FAILURE
                }
            },
            _ = pgquorum_client::shutdown_signal() => ExitCode::SUCCESS,
        }
    })
}
