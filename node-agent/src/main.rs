//! `pgquorum-agent --config FILE`: manage one Postgres server until SIGTERM or SIGINT.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use pgquorum_agent::agent::Agent;
use pgquorum_agent::config::AgentConfig;
use pgquorum_client::shutdown_signal;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(version, about = "pgquorum agent: observes and manages one PostgreSQL server")]
struct Args {
    /// Path to the TOML config file.
    #[arg(long, short = 'c', env = "PGQUORUM_AGENT_CONFIG")]
    config: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("PGQUORUM_LOG").unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let config = match AgentConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pgquorum-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pgquorum-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match Agent::new(config) {
            Ok(agent) => {
                agent.run(shutdown_signal()).await;
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("pgquorum-agent: {e}");
                ExitCode::from(2)
            }
        }
    })
}
