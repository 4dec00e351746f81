//! Automatic failover, as pure functions: the decision ([`decide`]) and what each
//! heartbeat reply tells an agent ([`reply`]). The leader's loop in [`crate::leader`]
//! commits what is decided, the replies carry it to the agents.

pub mod decide;
pub mod reply;

pub use decide::{choose, decide, detect, lease_expired, sync_set_after, Candidate, Step};
pub use reply::heartbeat_reply;
