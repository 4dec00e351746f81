//! How pgquorum's daemons (coordinator, agent, router) start and end, in one place:
//! logs to stderr filtered by `PGQUORUM_LOG` (`RUST_LOG` syntax, e.g.
//! `info,pgquorum_coordinator=debug,openraft=warn`), as text or one JSON object a line
//! (`--log-format json`); a config that fails to load exits 2 with the loader's message
//! (it names the file and the field); SIGHUP is logged and ignored (the config is read
//! at start: restart to apply a change), so a stray `kill -HUP` ends nothing; a failure
//! while running exits with the code the daemon chose.

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

/// How a daemon writes its log lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line of text per event, fields as `key=value`.
    #[default]
    Text,
    /// One JSON object per event: `timestamp`, `level`, `target`, `fields`, `spans`.
    Json,
}

/// The log options every daemon takes (`#[command(flatten)]`).
#[derive(Clone, Debug, clap::Args)]
pub struct LogOptions {
    /// Log lines as text or as JSON objects (one per line, for log shippers).
    #[arg(long, value_enum, default_value = "text", env = "PGQUORUM_LOG_FORMAT")]
    pub log_format: LogFormat,
}

/// Sets up logging, loads the config, runs `body` on a tokio runtime.
/// `default_log`: the log filter when `PGQUORUM_LOG` is not set.
pub fn run<C, L, E, B, F>(name: &str, default_log: &str, log: &LogOptions, load: L, body: B) -> ExitCode
where
    L: FnOnce() -> Result<C, E>,
    E: std::fmt::Display,
    B: FnOnce(C) -> F,
    F: Future<Output = Result<(), Failure>>,
{
    let filter = EnvFilter::try_from_env("PGQUORUM_LOG").unwrap_or_else(|_| EnvFilter::new(default_log));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match log.log_format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().with_current_span(false).with_ansi(false).init(),
    }
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
    runtime.spawn(ignore_hangups(name.to_string()));
    match runtime.block_on(body(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("{name}: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// Logs each SIGHUP instead of dying of it (its default action ends the process).
async fn ignore_hangups(name: String) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        tracing::warn!(
            daemon = %name,
            "SIGHUP ignored: the config is read at start only; restart to apply a change"
        );
    }
}
