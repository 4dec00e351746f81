//! The coordinator's Raft node: openraft filled with sled storage and a gRPC transport.
//!
//! - [`log_store`]: the Raft log and vote in sled, each write on stable storage before
//!   it is acknowledged (openraft's correctness depends on it; its test suite cannot tell).
//! - [`durable`]: what makes a sled flush survive a power cut (`fdatasync` after it).
//! - [`state_machine`]: the cluster state in memory, rebuilt on start from the last
//!   snapshot plus the log after it; snapshots are the durable copy.
//! - [`network`]: one lazily connected gRPC channel per peer; every message names the
//!   node id it is meant for, and the receiver refuses it otherwise.
//! - [`group`]: which group this node belongs to; re-forming one from a survivor.
//! - [`codec`]: the versioned encoding every stored and transported value goes through.

pub mod codec;
pub mod durable;
pub mod group;
pub mod leadership;
pub mod log_store;
pub mod network;
pub mod state_machine;

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::state::{Command, CommandResult};

pub type NodeId = u64;

/// What the group knows about each coordinator: where to reach it and where it runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorNode {
    /// gRPC address (`host:port`) other coordinators and clients connect to.
    pub addr: String,
    /// Region or availability zone, for operators and placement checks.
    pub region: String,
}

openraft::declare_raft_types!(
    /// openraft type configuration of the coordinator group.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = NodeId,
        Node = CoordinatorNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StoredMembership = openraft::StoredMembership<NodeId, CoordinatorNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, CoordinatorNode>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
