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
    #[command(flatten)]
    log: daemon::LogOptions,
}

fn main() -> ExitCode {
    let args = Args::parse();
    daemon::run(
        "pgquorum-coordinator",
        "info,openraft=warn",
        &args.log,
        || Config::load(&args.config),
        |config| async {
            match server::run(config, shutdown_signal()).await {
                Ok(server::Exit::Stopped) => Ok(()),
                Ok(server::Exit::Restart) => Err(Failure::runtime(restart())),
                Err(e) => Err(Failure::runtime(e)),
            }
        },
    )
}

/// Replaces this process with a fresh start of the same program and arguments (same
/// pid, so a supervisor or the sandbox keeps track of it); returns only on failure.
fn restart() -> String {
    use std::os::unix::process::CommandExt;
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return format!("cannot restart after force-new-group (start it again by hand): {e}"),
    };
    let e = std::process::Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .exec();
    format!(
        "cannot restart {} after force-new-group (start it again by hand; the new group is formed at start): {e}",
        exe.display()
    )
}
