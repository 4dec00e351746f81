//! The `pgquorum` operator CLI, as a library so that tests and benchmarks share its
//! pieces.
//!
//! # Layout
//! - [`commands`]: one module per command group (`raft`, `cluster`, `policy`).
//! - [`launch`]: starting a coordinator group as local processes — the one way the
//!   sandbox, the benchmarks and the end-to-end tests start a cluster.
//! - [`bench`]: `pgquorum bench …`.
//! - [`check`]: writers that record what was acknowledged where and when.
//! - [`output`]: tables for people, JSON for scripts.

// `status --json` builds one object with many keys (json! recurses per key).
#![recursion_limit = "256"]

pub mod bench;
pub mod check;
pub mod commands;
mod error;
pub mod launch;
pub mod output;

pub use error::{Error, Result};
