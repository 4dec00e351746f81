//! The agent's one error type.

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config file that cannot be used; names the file and the field.
    #[error("config {path}: {message}")]
    Config { path: String, message: String },
    /// A Postgres tool (initdb, pg_ctl, pg_basebackup) failed; says which and why.
    #[error("{tool} failed: {detail}")]
    Tool { tool: String, detail: String },
    /// Talking to a Postgres server failed.
    #[error("postgres at {target}: {detail}")]
    Postgres { target: String, detail: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
