//! Raft transport between coordinators over gRPC.
//!
//! One lazily connected tonic `Channel` per peer address, shared by every replication
//! stream to that peer (a channel multiplexes; opening one per RPC, as openraft's demo
//! does, costs a TCP and HTTP/2 handshake per heartbeat). Each message carries the node
//! id it is meant for; the receiver refuses others (see `grpc::raft_service`), so a peer
//! address that now belongs to another coordinator cannot split the group. It also
//! carries the sender's group ([`super::group`]); a refusal that names a newer group
//! marks this coordinator superseded.
//!
//! Failures that mean "not there" (connection refused, wrong node, several timeouts
//! in a row) are reported as `Unreachable`, which makes openraft back off instead of
//! spinning. A single timeout is not: openraft gives an AppendEntries one heartbeat
//! interval, a follower's fsync can take longer, and backing off then would hold up a
//! new leader's first commit (and with it every lease grant) for the whole backoff.
//! A connection dropped by its keepalive ([`pgquorum_client::KEEPALIVE_INTERVAL`]: a
//! second without hearing anything) is `Unavailable` and so `Unreachable` at once.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use pgquorum_proto::v1::raft_service_client::RaftServiceClient;
use pgquorum_proto::v1::RaftMessage;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Channel;

use super::codec::{decode, encode};
use super::group::{
    parse_replaced, superseded_by, Group, GroupId, Superseded, GROUP_METADATA, REPLACED_METADATA,
};
use super::{CoordinatorNode, NodeId, TypeConfig};

/// How long to wait before retrying an unreachable peer. Short, because a restarted
/// coordinator should rejoin quickly; unreachable peers cost one failed connect each.
const UNREACHABLE_BACKOFF: Duration = Duration::from_millis(200);

/// Creates connections to peers; keeps one channel per address.
#[derive(Clone)]
pub struct Network {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    /// This node's group: named in every message, and marked superseded when a newer
    /// group refuses one (see [`super::group`]).
    group: Group,
}

impl Network {
    pub fn new(group: Group) -> Network {
        Network {
            channels: Arc::default(),
            group,
        }
    }

    fn channel(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut channels = self.channels.lock().expect("channel cache lock poisoned");
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let channel = pgquorum_client::endpoint(addr)?.connect_lazy();
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &CoordinatorNode) -> Connection {
        let client = self
            .channel(&node.addr)
            .map(RaftServiceClient::new)
            .map_err(|e| e.to_string());
        Connection {
            target,
            client,
            timeouts_in_a_row: 0,
            group: self.group.clone(),
        }
    }
}

/// A connection to one peer, as openraft's replication and election tasks use it.
pub struct Connection {
    target: NodeId,
    /// Err when the peer's address cannot even be parsed; every RPC then fails as
    /// unreachable with that reason.
    client: Result<RaftServiceClient<Channel>, String>,
    /// RPCs that timed out since the last that did not: past
    /// [`TIMEOUTS_BEFORE_BACKOFF`] the peer counts as unreachable.
    timeouts_in_a_row: u32,
    group: Group,
}

/// A timeout or two is a slow peer (a follower's fsync), retried at the next
/// heartbeat; more in a row is a peer cut off, backed off from (and logged less).
const TIMEOUTS_BEFORE_BACKOFF: u32 = 3;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

#[derive(Clone, Copy)]
enum Rpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

impl Connection {
    async fn call<Req, Resp, E>(
        &mut self,
        rpc: Rpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, CoordinatorNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: StdError + DeserializeOwned,
    {
        let client = match &mut self.client {
            Ok(c) => c,
            Err(e) => {
                return Err(RPCError::Unreachable(Unreachable::new(&TransportError(
                    e.clone(),
                ))))
            }
        };
        let mut request = tonic::Request::new(RaftMessage {
            target: self.target,
            payload: encode(req),
            group: self.group.id().map(|g| g.to_string()).unwrap_or_default(),
            // So that its old peers learn it too (see `grpc::raft_service`).
            superseded_by: self
                .group
                .superseded()
                .map(|s| s.by.to_string())
                .unwrap_or_default(),
        });
        request.set_timeout(option.hard_ttl());
        let reply = match rpc {
            Rpc::AppendEntries => client.append_entries(request).await,
            Rpc::Vote => client.vote(request).await,
            Rpc::InstallSnapshot => client.install_snapshot(request).await,
        };
        let timed_out = matches!(
            &reply,
            Err(s) if matches!(s.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled)
        );
        self.timeouts_in_a_row = if timed_out { self.timeouts_in_a_row + 1 } else { 0 };
        let cut_off = self.timeouts_in_a_row >= TIMEOUTS_BEFORE_BACKOFF;
        if let Err(status) = &reply {
            self.note_refusal(status).await;
        }
        let reply = reply.map_err(|status| {
            let e = TransportError(format!("{}: {}", status.code(), status.message()));
            match status.code() {
                tonic::Code::Unavailable | tonic::Code::FailedPrecondition => {
                    RPCError::Unreachable(Unreachable::new(&e))
                }
                tonic::Code::DeadlineExceeded | tonic::Code::Cancelled if cut_off => {
                    RPCError::Unreachable(Unreachable::new(&e))
                }
                _ => RPCError::Network(NetworkError::new(&e)),
            }
        })?;
        let result: Result<Resp, RaftError<NodeId, E>> =
            decode(&reply.into_inner().payload).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl Connection {
    /// A refusal that names a newer group than ours: our group was replaced.
    async fn note_refusal(&self, status: &tonic::Status) {
        let group_of = |key: &str| {
            status
                .metadata()
                .get(key)
                .and_then(|v| v.to_str().ok())
                .and_then(GroupId::parse)
        };
        let (Some(theirs), Some(ours)) = (group_of(GROUP_METADATA), self.group.id()) else {
            return;
        };
        let replaced = status
            .metadata()
            .get(REPLACED_METADATA)
            .and_then(|v| v.to_str().ok())
            .map(parse_replaced)
            .unwrap_or_default();
        if superseded_by(&ours, &theirs, &replaced) {
            let superseded = Superseded {
                why: format!(
                    "coordinator {} refused it: it belongs to group {theirs}, formed by force-new-group \
                     after group {ours}",
                    self.target
                ),
                by: theirs,
            };
            if let Err(e) = self.group.mark_superseded(superseded).await {
                tracing::error!(error = %e, "cannot record that this coordinator's group was replaced");
            }
        }
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, CoordinatorNode, RaftError<NodeId>>> {
        self.call(Rpc::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, CoordinatorNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(Rpc::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, CoordinatorNode, RaftError<NodeId>>> {
        self.call(Rpc::Vote, &rpc, &option).await
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(UNREACHABLE_BACKOFF))
    }
}
