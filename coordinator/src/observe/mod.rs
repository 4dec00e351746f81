//! What the leader knows of each node between Raft writes: the latest heartbeat report
//! ([`reports`]), and the pure functions that judge it ([`health`], [`lag`], [`alerts`]).
//!
//! Reports live only in the leader's memory (DESIGN.md: heartbeats are too frequent to
//! replicate). A new leader starts with none and fills up within one heartbeat
//! interval; until then nodes show as `unknown`, which is the truth from where it sits.

pub mod alerts;
pub mod health;
pub mod identity;
pub mod lag;
pub mod metrics;
pub mod reports;
pub mod routes;

pub use reports::{AppliedSync, ClusterReports, Observed, OwnLease, Reports};
