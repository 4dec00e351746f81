//! How pgquorum's daemons (coordinator, agent, router) start and end, in one place:
//! logs to stderr filtered by `PGQUORUM_LOG`, a config that fails to load exits 2 with
//! the loader's message (it names the file and the field), a failure while running
//! exits with the code the daemon chose.

use std::future::Future;
use std::io::IsTerminal;
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

/// Why a daemon stopped unsuccessfully: the exit code and the message for stderr.
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    /// Exit 2: the input (config, arguments) cannot be used.
    pub fn usage(message: impl ToString) -> Failure {
        Failure {
            code: 2,
            message: message.to_string(),
        }
    }

    /// Exit 1: it ran and failed.
    pub fn runtime(message: impl ToString) -> Failure {
        Failure {
            code: 1,
            message: message.to_string(),
        }
    }
}

/// Sets up logging, loads the config, runs `body` on a tokio runtime.
/// `default_log`: the log filter when `PGQUORUM_LOG` is not set.
pub fn run<C, L, E, B, F>(name: &str, default_log: &str, load: L, body: B) -> ExitCode
where
    L: FnOnce() -> Result<C, E>,
    E: std::fmt::Display,
    B: FnOnce(C) -> F,
    F: Future<Output = Result<(), Failure>>,
{
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("PGQUORUM_LOG").unwrap_or_else(|_| EnvFilter::new(default_log)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let config = match load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(body(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("{name}: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}
