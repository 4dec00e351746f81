//! `pgquorum-coordinator --config FILE`: run one coordinator until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use pgquorum_client::daemon::{self, Failure};
use pgquorum_client::shutdown_signal;
use pgquorum_coordinator::{server, Config};

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
    daemon::run(
        "pgquorum-coordinator",
        "info,openraft=warn",
        || Config::load(&args.config),
        |config| async {
            server::run(config, shutdown_signal())
                .await
                .map_err(Failure::runtime)
        },
    )
}
