//! The CLI crate's one error type.

use pgquorum_client::ClientError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A bad argument the parser could not catch (e.g. a malformed `field=value`).
    #[error("{0}")]
    Usage(String),
    /// Starting or stopping local processes failed.
    #[error("{0}")]
    Launch(String),
    /// Something did not happen within its time limit.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The command ran, and what it found or caused is bad (printed already; exit 1):
    /// `alerts` with something CRITICAL, `--wait` ending with another primary.
    #[error("{0}")]
    Outcome(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// Exit code: 2 for bad usage or a refused request, 1 for everything else,
    /// so scripts can tell "you asked wrongly" from "it did not work".
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) => 2,
            Error::Client(ClientError::Rejected {
                code:
                    tonic::Code::InvalidArgument
                    | tonic::Code::NotFound
                    | tonic::Code::AlreadyExists
                    | tonic::Code::FailedPrecondition,
                ..
            }) => 2,
            Error::Client(ClientError::NoAddresses | ClientError::InvalidAddress { .. }) => 2,
            _ => 1,
        }
    }
}
