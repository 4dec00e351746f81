//! The coordinator's one error type, and how each kind reaches a gRPC client.
//!
//! Messages are written for the operator who reads them: they say what was wrong and,
//! where there is one, what to do instead.

use pgquorum_proto::metadata;

use crate::raft::codec::CodecError;
use crate::raft::NodeId;
use crate::state::CommandError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config file that cannot be used; names the file and the field.
    #[error("config {path}: {message}")]
    Config { path: String, message: String },

    /// A request field that cannot be used; names the field.
    #[error("invalid {field}: {message}")]
    InvalidArgument { field: String, message: String },

    /// A write or a linearizable read reached a coordinator that is not the leader.
    #[error("this coordinator is not the Raft leader{}", match .leader {
        Some((id, addr)) => format!("; the leader is node {id} at {addr}"),
        None => "; no leader is known right now (election in progress or no quorum)".to_string(),
    })]
    NotLeader { leader: Option<(NodeId, String)> },

    /// This node takes itself for the leader but could not confirm it with a quorum
    /// (its followers unreachable, or a newer leader it has not heard of).
    #[error("this coordinator is the Raft leader of its term but cannot reach a quorum of the coordinator group ({}); nothing can be committed until a majority of coordinators answers", match .since_ms {
        Some(ms) => format!("last quorum contact {ms} ms ago"),
        None => "no quorum contact in this term".to_string(),
    })]
    LeaderWithoutQuorum { since_ms: Option<u64> },

    /// This node leads, but no quorum confirmed its leadership in time: it may have
    /// been replaced without knowing, so it grants no lease.
    #[error("this coordinator leads but no quorum confirmed it within {window_ms} ms (last quorum contact {since_ms} ms ago); it grants no lease")]
    NoQuorumContact { since_ms: u64, window_ms: u64 },

    /// An agent is not the node it names (another live agent has the name, or its
    /// database is another cluster's); says which and what to do.
    #[error("{0}")]
    Identity(String),

    /// A membership change openraft refused, e.g. promoting a node that is not a learner.
    #[error("membership change refused: {0}")]
    Membership(String),

    /// A command the state machine refused (unknown cluster, bad policy value, …).
    #[error(transparent)]
    Command(#[from] CommandError),

    #[error("storage: {0}")]
    Storage(#[from] sled::Error),

    #[error("stored data: {0}")]
    Codec(#[from] CodecError),

    /// openraft stopped or failed in a way that is not the client's doing.
    #[error("raft: {0}")]
    Raft(String),

    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },

    #[error("{0}")]
    Io(#[from] std::io::Error),

    /// This coordinator's group was replaced by force-new-group elsewhere.
    #[error("coordinator {id}'s group was replaced by force-new-group ({why}); it answers no node: stop it, empty its data_dir, remove initial_members from its config and re-add it with `pgquorum raft add`")]
    GroupReplaced { id: NodeId, why: String },

    /// force-new-group made this coordinator's group; the replicated state does not
    /// record it yet (the leader commits that first).
    #[error("the coordinator group was just re-formed and is not recorded yet; ask again in a moment")]
    GroupReforming,
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> tonic::Status {
        let message = e.to_string();
        match e {
            Error::InvalidArgument { .. } => tonic::Status::invalid_argument(message),
            Error::NotLeader { leader } => {
                let mut status = tonic::Status::unavailable(message);
                if let Some((id, addr)) = leader {
                    let md = status.metadata_mut();
                    if let (Ok(id), Ok(addr)) = (id.to_string().parse(), addr.parse()) {
                        md.insert(metadata::LEADER_ID, id);
                        md.insert(metadata::LEADER_ADDR, addr);
                    }
                }
                status
            }
            Error::NoQuorumContact { .. } | Error::LeaderWithoutQuorum { .. } => {
                tonic::Status::unavailable(message)
            }
            Error::Membership(_) | Error::Identity(_) => tonic::Status::failed_precondition(message),
            Error::Command(CommandError::UnknownCluster(_)) => tonic::Status::not_found(message),
            Error::Command(CommandError::ClusterExists(_)) => tonic::Status::already_exists(message),
            Error::Command(CommandError::UnknownMember(_)) => tonic::Status::not_found(message),
            Error::Command(CommandError::AlreadyBootstrapped { .. }) => {
                tonic::Status::failed_precondition(message)
            }
            Error::Command(CommandError::SyncSetChanged { .. }) => tonic::Status::aborted(message),
            Error::Command(CommandError::FailoverStep(_))
            | Error::Command(CommandError::Held { .. })
            | Error::Command(CommandError::NotHeld { .. })
            | Error::Command(CommandError::NotRemovable { .. })
            | Error::Command(CommandError::NoMaintenance { .. })
            | Error::Command(CommandError::NoOrder { .. })
            | Error::Command(CommandError::Schedule { .. })
            | Error::Command(CommandError::NotDeletable { .. }) => {
                tonic::Status::failed_precondition(message)
            }
            // Unavailable, not a final refusal: the agent must go on to the other
            // coordinators (the new group) rather than give up the heartbeat.
            Error::GroupReplaced { .. } | Error::GroupReforming => tonic::Status::unavailable(message),
            Error::Command(CommandError::ForeignSystemIdentifier { .. }) => {
                tonic::Status::failed_precondition(message)
            }
            Error::Command(_) => tonic::Status::invalid_argument(message),
            Error::Config { .. }
            | Error::Storage(_)
            | Error::Codec(_)
            | Error::Raft(_)
            | Error::Listen { .. }
            | Error::Io(_) => tonic::Status::internal(message),
        }
    }
}
