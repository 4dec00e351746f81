//! `pgquorum-router --config FILE`: route Postgres connections by the endpoint map.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use pgquorum_client::daemon::{self, Failure};
use pgquorum_client::shutdown_signal;
use pgquorum_router::config::RouterConfig;

#[derive(Parser)]
#[command(
    version,
    about = "pgquorum router: forwards Postgres connections to the primary or a fitting replica"
)]
struct Args {
    #[arg(long, short = 'c', env = "PGQUORUM_ROUTER_CONFIG")]
    config: PathBuf,
    #[command(flatten)]
    log: daemon::LogOptions,
}

fn main() -> ExitCode {
    let args = Args::parse();
    daemon::run(
        "pgquorum-router",
        "info",
        &args.log,
        || RouterConfig::load(&args.config),
        |config| async {
            tokio::select! {
                result = pgquorum_router::run(config) => result.map_err(Failure::runtime),
                _ = shutdown_signal() => Ok(()),
            }
        },
    )
}
