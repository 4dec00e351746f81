//! The writes the coordinator group replicates, and what applying one returns.
//!
//! A command carries everything its effect depends on, wall-clock time included, so
//! that applying it is a pure function of the state and the command: every coordinator
//! that applies the same log ends with the same state.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::cluster::Cluster;
use super::policy::{Policy, PolicyError};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Start guarding a new database cluster.
    CreateCluster {
        name: String,
        /// Policy fields that differ from the defaults.
        settings: BTreeMap<String, String>,
        actor: String,
        at_ms: u64,
    },
    /// Change some fields of a cluster's policy.
    SetPolicy {
        cluster: String,
        settings: BTreeMap<String, String>,
        actor: String,
        at_ms: u64,
    },
}

/// The successful outcome of a command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandOutput {
    /// The cluster as it stands after the command.
    Cluster(Box<Cluster>),
    Policy(Box<Policy>),
    /// Raft-internal entries (blank, membership) that carry no command.
    None,
}

/// A command refused deterministically: every coordinator reaches the same verdict, so
/// the refusal goes back to the client and the state stays as it was.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CommandError {
    #[error("cluster {0:?} does not exist")]
    UnknownCluster(String),
    #[error("cluster {0:?} already exists")]
    ClusterExists(String),
    #[error("invalid cluster name {0:?}: use 1-63 letters, digits, '-', '_' or '.'")]
    InvalidName(String),
    #[error("{0}")]
    Policy(PolicyError),
}

/// What applying one log entry returned; travels back to the proposer.
pub type CommandResult = Result<CommandOutput, CommandError>;
