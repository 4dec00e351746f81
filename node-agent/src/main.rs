//! `pgquorum-agent --config FILE`: manage one Postgres server until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use pgquorum_agent::agent::Agent;
use pgquorum_agent::config::AgentConfig;
use pgquorum_client::daemon::{self, Failure};
use pgquorum_client::shutdown_signal;

#[derive(Parser)]
#[command(version, about = "pgquorum agent: observes and manages one PostgreSQL server")]
struct Args {
    /// Path to the TOML config file.
    #[arg(long, short = 'c', env = "PGQUORUM_AGENT_CONFIG")]
    config: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    daemon::run(
        "pgquorum-agent",
        "info",
        || AgentConfig::load(&args.config),
        |config| async {
            let agent = Agent::new(config).map_err(Failure::usage)?;
            agent.run(shutdown_signal()).await;
            Ok(())
        },
    )
}
