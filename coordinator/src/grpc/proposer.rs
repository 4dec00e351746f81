//! The services' one door into Raft: propose a command, wait to read, know the leader.

use openraft::error::{ClientWriteError, RaftError};

use crate::raft::group::Group;
use crate::raft::state_machine::StateHandle;
use crate::raft::{CoordinatorNode, NodeId, Raft};
use crate::state::{Command, CommandOutput};
use crate::{Error, Result};
use pgquorum_proto::v1 as pb;

#[derive(Clone)]
pub struct Proposer {
    pub id: NodeId,
    pub raft: Raft,
    pub state: StateHandle,
    pub group: Group,
}

impl Proposer {
    /// The leader as this node knows it, with its address.
    pub fn leader_hint(&self) -> Option<(NodeId, String)> {
        let m = self.raft.metrics().borrow().clone();
        let leader = m.current_leader?;
        let node = m.membership_config.membership().get_node(&leader)?;
        Some((leader, node.addr.clone()))
    }

    /// Why this node cannot serve a leader's request. When it still takes itself for
    /// the leader (openraft keeps a leader that lost its followers), "the leader is
    /// this node" would send the client back here: it says it has no quorum instead.
    pub fn not_leader(&self) -> Error {
        match self.leader_hint() {
            Some((id, _)) if id == self.id => {
                let since = self.raft.metrics().borrow().millis_since_quorum_ack;
                Error::LeaderWithoutQuorum { since_ms: since }
            }
            leader => Error::NotLeader { leader },
        }
    }

    /// Whether this node currently believes it leads (no quorum round trip).
    pub async fn is_leader(&self) -> bool {
        self.raft.current_leader().await == Some(self.id)
    }

    pub fn write_error(&self, e: RaftError<NodeId, ClientWriteError<NodeId, CoordinatorNode>>) -> Error {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => Error::NotLeader {
                leader: f.leader_id.zip(f.leader_node.map(|n| n.addr)),
            },
            RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
                Error::Membership(c.to_string())
            }
            RaftError::Fatal(f) => Error::Raft(f.to_string()),
        }
    }

    /// Proposes a command and waits for it to be committed and applied.
    pub async fn propose(&self, command: Command) -> Result<CommandOutput> {
        // Refuse what is certainly invalid without a Raft round trip; apply checks again.
        self.state.read().state.check(&command)?;
        let response = self
            .raft
            .client_write(command)
            .await
            .map_err(|e| self.write_error(e))?;
        Ok(response.data?)
    }

    /// Read-index: confirms leadership with a quorum and waits until the state machine
    /// has applied up to the read index.
    async fn confirm_leadership(&self) -> Result<()> {
        match self.raft.ensure_linearizable().await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(_)) => Err(self.not_leader()),
            Err(RaftError::Fatal(f)) => Err(Error::Raft(f.to_string())),
        }
    }

    /// Waits until this node may answer a read at the requested consistency.
    pub async fn ready_to_read(&self, consistency: i32) -> Result<()> {
        match pb::ReadConsistency::try_from(consistency) {
            Ok(pb::ReadConsistency::Local) => Ok(()),
            Ok(pb::ReadConsistency::Linearizable) => {
                self.confirm_leadership().await?;
                // A leader that resumed from its persisted vote after a restart of the
                // whole group (same term, no new no-op entry) takes its persisted
                // committed index as read index, and that may lag an acknowledged write.
                // Every acknowledged write is in the leader's log, so when the log holds
                // entries not yet applied, committing a barrier first makes the read
                // cover them all.
                let m = self.raft.metrics().borrow().clone();
                if m.last_applied.map(|l| l.index).unwrap_or(0) < m.last_log_index.unwrap_or(0) {
                    self.raft
                        .client_write(Command::Barrier)
                        .await
                        .map_err(|e| self.write_error(e))?;
                    self.confirm_leadership().await?;
                }
                Ok(())
            }
            Err(_) => Err(Error::InvalidArgument {
                field: "consistency".into(),
                message: format!("unknown read consistency {consistency}"),
            }),
        }
    }
}
