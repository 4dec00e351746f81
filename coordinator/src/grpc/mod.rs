//! The coordinator's gRPC services. Handlers translate between protobuf and the domain
//! types, and leave decisions to [`crate::state`] and openraft.

pub mod admin_service;
mod convert;
pub mod raft_service;
