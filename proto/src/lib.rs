//! The wire contract of pgquorum, and nothing else.
//!
//! Every program that talks to the coordinators (the CLI, agents, routers, third-party
//! tools) depends on this crate alone for the message and service types. Keeping the
//! generated code apart from the coordinator means a client never compiles Raft or sled.
//!
//! Services (package `pgquorum.v1`):
//! - `RaftService`: the coordinators' internal Raft transport.
//! - `AdminService`: what operators and the `pgquorum` CLI use: Raft membership and
//!   status, clusters and their policy, live node status and alerts.
//! - `AgentService`: heartbeats from the agent next to each Postgres server.
//! - `EndpointService`: where the primary and usable replicas are (`Get`, `Watch`).

#![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]

pub mod v1 {
    tonic::include_proto!("pgquorum.v1");
}

/// Encoded `FileDescriptorSet` of every pgquorum service, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/pgquorum_descriptor.bin"));

/// gRPC metadata keys a coordinator sets when it refuses a request because it is not the
/// Raft leader; clients use them to retry on the leader instead of guessing.
pub mod metadata {
    /// Raft node id of the current leader, when this coordinator knows it.
    pub const LEADER_ID: &str = "x-pgquorum-leader-id";
    /// gRPC address (`host:port`) of the current leader, when known.
    pub const LEADER_ADDR: &str = "x-pgquorum-leader-addr";
}
