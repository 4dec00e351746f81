//! pgquorum coordinator: the group of nodes that agree, through Raft, on the state of
//! every PostgreSQL cluster they guard.
//!
//! # Layout
//! - [`state`]: the replicated state (clusters, policy, members, epoch, history) and the
//!   pure function that applies a command to it. No I/O.
//! - [`observe`]: the leader's latest heartbeat reports, and the pure judgement of each
//!   node's health and of what needs an alert.
//! - [`sync`]: choosing the synchronous standby set (pure).
//! - [`failover`]: detecting a failed primary and choosing its successor (pure).
//! - [`leader`]: the leader's loop that commits what those decide.
//! - [`raft`]: openraft wired to sled storage and a gRPC transport.
//! - [`grpc`]: the services other programs call.
//! - [`config`]: the TOML config file.
//! - [`server`]: start a node from a config, stop it cleanly.

// openraft's StorageError is large and is what its storage traits must return.
#![allow(clippy::result_large_err)]

pub mod config;
mod error;
pub mod failover;
pub mod grpc;
pub mod leader;
pub mod observe;
pub mod raft;
pub mod server;
pub mod state;
pub mod sync;

pub use config::Config;
pub use error::{Error, Result};
