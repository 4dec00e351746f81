//! pgquorum agent: runs next to one PostgreSQL server, reports its state to the
//! coordinators several times a second and carries out what they decide.
//!
//! # Layout
//! - [`config`]: the TOML config file.
//! - [`postgres`]: running Postgres's tools as the right OS user, and observing the
//!   server over one kept-open connection.
//! - [`state`]: the newest epoch seen, kept across restarts.
//! - [`plan`]: what to do with a heartbeat reply, decided without I/O.
//! - [`agent`]: the observe → report → act loop that executes the plan.
//! - [`guard`]: the process that stops a primary whose lease ran out, whatever
//!   happens to the agent.
//! - [`failsafe`]: when a standby may promise a primary that no coordinator leader
//!   answers not to be promoted, and how long the primary may write on the promises;
//!   [`peer`]: the agent's own gRPC service that carries them.
//! - [`http`]: health endpoints for load balancers and probes, and [`metrics`].
//! - [`hooks`]: the operator's commands on start, stop and role change.

pub mod agent;
pub mod config;
mod error;
pub mod failsafe;
pub mod guard;
pub mod hooks;
pub mod http;
pub mod metrics;
pub mod peer;
pub mod plan;
pub mod postgres;
pub mod state;

pub use error::{Error, Result};
