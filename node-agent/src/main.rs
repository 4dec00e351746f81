//! `pgquorum-agent --config FILE`: manage one Postgres server until SIGTERM or SIGINT.
//! `pgquorum-agent guard --data-dir DIR`: the lease guard the agent starts beside itself
//! (see `guard.rs`); not for starting by hand.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pgquorum_agent::agent::Agent;
use pgquorum_agent::config::AgentConfig;
use pgquorum_agent::guard::{self, GuardFiles};
use pgquorum_client::daemon::{self, Failure};
use pgquorum_client::shutdown_signal;

#[derive(Parser)]
#[command(version, about = "pgquorum agent: observes and manages one PostgreSQL server")]
struct Args {
    /// Path to the TOML config file.
    #[arg(long, short = 'c', env = "PGQUORUM_AGENT_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    log: daemon::LogOptions,
}

#[derive(Subcommand)]
enum Command {
    /// Internal: stop the primary Postgres of DATA_DIR when its lease runs out, whatever
    /// happens to the agent (started by the agent).
    Guard {
        #[arg(long)]
        data_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Guard { data_dir }) = args.command {
        guard::run(&GuardFiles::next_to(&data_dir));
        return ExitCode::SUCCESS;
    }
    let Some(config) = args.config else {
        eprintln!("pgquorum-agent: --config FILE (or PGQUORUM_AGENT_CONFIG) is required");
        return ExitCode::from(2);
    };
    daemon::run(
        "pgquorum-agent",
        "info",
        &args.log,
        || AgentConfig::load(&config),
        |config| async {
            let agent = Agent::new(config).map_err(Failure::usage)?;
            agent.run(shutdown_signal()).await.map_err(Failure::usage)
        },
    )
}
