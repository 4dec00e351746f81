//! The coordinator's gRPC services. Handlers translate between protobuf and the domain
//! types, and leave decisions to [`crate::state`], [`crate::observe`], [`crate::sync`]
//! and openraft.

pub mod admin_service;
pub mod agent_service;
mod convert;
pub mod endpoint_service;
pub mod health;
pub mod proposer;
pub mod raft_service;
