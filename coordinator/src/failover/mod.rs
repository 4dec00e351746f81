//! Failover, as pure functions: the automatic decision ([`decide`]), an operator's
//! failover or switchover ([`manual`]) and what each heartbeat reply tells an agent
//! ([`reply`]). The leader's loop in [`crate::leader`] and the admin service commit
//! what is decided, the replies carry it to the agents.

pub mod decide;
pub mod manual;
pub mod reply;
pub mod stonith;

pub use decide::{choose, decide, detect, lease_expired, sync_set_after, Candidate, Step};
pub use reply::heartbeat_reply;
