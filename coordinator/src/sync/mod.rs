//! The synchronous standby set: which standbys the primary waits for (Invariant 3).
//!
//! [`plan`] decides, purely, from the replicated state and the latest reports; the
//! leader's loop ([`crate::leader`]) commits what it decides, and the heartbeat reply
//! tells the primary's agent what to put in `synchronous_standby_names`.

pub mod plan;

pub use plan::{plan, SyncPlan};
