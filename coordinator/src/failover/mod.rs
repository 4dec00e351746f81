//! Automatic failover: the pure decision ([`decide`]) and nothing else; the leader's
//! loop in [`crate::leader`] commits what it decides, and the heartbeat replies carry
//! it to the agents.

pub mod decide;

pub use decide::{choose, decide, detect, lease_expired, Candidate, Step};
