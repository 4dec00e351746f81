//! Server side of the Raft transport (see [`crate::raft::network`] for the client).

use pgquorum_proto::v1::raft_service_server::RaftService;
use pgquorum_proto::v1::RaftMessage;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Response, Status};

use crate::raft::codec::{decode, encode};
use crate::raft::group::{compare, Group, GroupId, Superseded, GROUP_METADATA, REPLACED_METADATA};
use crate::raft::state_machine::StateHandle;
use crate::raft::{NodeId, Raft};

pub struct RaftServiceImpl {
    id: NodeId,
    raft: Raft,
    group: Group,
    /// For the groups this one replaced (named in refusals).
    state: StateHandle,
}

/// Which message: a node that has not joined a group yet joins the first leader that
/// replicates to it, but votes for nobody.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    FromLeader,
    Vote,
}

impl RaftServiceImpl {
    pub fn new(id: NodeId, raft: Raft, group: Group, state: StateHandle) -> Self {
        RaftServiceImpl {
            id,
            raft,
            group,
            state,
        }
    }

    /// A refusal naming `group` and the groups it replaced (`replaced`,
    /// comma-separated) in its metadata, so a sender of one of those learns it was
    /// replaced (see `raft::network`).
    fn refuse(group: &GroupId, replaced: &str, message: String) -> Status {
        let mut status = Status::failed_precondition(message);
        let md = status.metadata_mut();
        if let Ok(value) = group.as_str().parse() {
            md.insert(GROUP_METADATA, value);
        }
        if let Ok(value) = replaced.parse() {
            md.insert(REPLACED_METADATA, value);
        }
        status
    }

    async fn mark_superseded(&self, by: &GroupId, why: String) -> Result<(), Status> {
        let superseded = Superseded { by: by.clone(), why };
        self.group
            .mark_superseded(superseded)
            .await
            .map_err(|e| Status::internal(format!("cannot record the group: {e}")))
    }

    /// Admits messages of this node's group only (see [`crate::raft::group`]). Only a
    /// peer of this node's own group can tell it that the group was replaced (the
    /// lineage check): a stray message from elsewhere is refused, nothing more.
    async fn admit(&self, msg: &RaftMessage, kind: Kind) -> Result<(), Status> {
        let parse = |g: &str| {
            GroupId::parse(g)
                .ok_or_else(|| Status::invalid_argument(format!("raft message: bad group {g:?}")))
        };
        let sender = if msg.group.is_empty() {
            GroupId::founding()
        } else {
            parse(&msg.group)?
        };
        let mine = self.group.id();
        if !msg.superseded_by.is_empty() {
            // From a coordinator that knows its group was replaced: never acted on.
            let by = parse(&msg.superseded_by)?;
            let same_group = mine.as_ref() == Some(&sender);
            if same_group && self.group.superseded().is_none() && by.generation() > sender.generation() {
                let why = format!("a peer of group {sender} said group {by} replaced it");
                self.mark_superseded(&by, why).await?;
            }
            return Err(Self::refuse(
                &by,
                sender.as_str(),
                format!(
                    "coordinator {} refuses a message from a coordinator whose group {sender} was replaced by {by}",
                    self.id
                ),
            ));
        }
        if let Some(s) = self.group.superseded() {
            return Err(Self::refuse(
                &s.by,
                mine.as_ref().map_or("", |m| m.as_str()),
                format!(
                    "coordinator {} was in group {sender}, which was replaced by group {}: it takes part in \
                     neither; stop it, empty its data_dir, remove initial_members from its config and \
                     re-add it with `pgquorum raft add`",
                    self.id, s.by
                ),
            ));
        }
        match mine {
            Some(mine) => match compare(&sender, &mine) {
                None => Ok(()),
                Some(_) => Err(Self::refuse(
                    &mine,
                    &self.state.read().state.replaced.join(","),
                    format!(
                        "message from coordinator group {sender} reached coordinator {} of group {mine}; a \
                         coordinator of another group takes no part here until it is re-added with an \
                         empty data_dir (`pgquorum raft add`)",
                        self.id
                    ),
                )),
            },
            None if kind == Kind::Vote => Err(Status::failed_precondition(format!(
                "coordinator {} has not joined a group yet; it votes once a leader has added it",
                self.id
            ))),
            None => {
                tracing::info!(group = %sender, "joining the coordinator group of the leader that added this node");
                self.group
                    .join(sender)
                    .await
                    .map_err(|e| Status::internal(format!("cannot record the group: {e}")))
            }
        }
    }

    /// Checks the message is for this node and its group, and decodes it.
    async fn open<T: DeserializeOwned>(
        &self,
        request: Request<RaftMessage>,
        kind: Kind,
    ) -> Result<T, Status> {
        let msg = request.into_inner();
        if msg.target != self.id {
            // Refused as a precondition, which the sender treats as "unreachable": the
            // address it holds no longer belongs to the node it means.
            return Err(Status::failed_precondition(format!(
                "message for coordinator {} reached coordinator {}; check the address in the Raft membership",
                msg.target, self.id
            )));
        }
        self.admit(&msg, kind).await?;
        decode(&msg.payload).map_err(|e| Status::invalid_argument(format!("raft payload: {e}")))
    }
}

fn reply<T: Serialize>(result: &T) -> Result<Response<RaftMessage>, Status> {
    Ok(Response::new(RaftMessage {
        target: 0,
        payload: encode(result),
        group: String::new(),
        superseded_by: String::new(),
    }))
}

#[tonic::async_trait]
impl RaftService for RaftServiceImpl {
    async fn append_entries(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let req = self.open(request, Kind::FromLeader).await?;
        reply(&self.raft.append_entries(req).await)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let req = self.open(request, Kind::Vote).await?;
        reply(&self.raft.vote(req).await)
    }

    async fn install_snapshot(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let req = self.open(request, Kind::FromLeader).await?;
        reply(&self.raft.install_snapshot(req).await)
    }
}
