//! Server side of the Raft transport (see [`crate::raft::network`] for the client).

use pgquorum_proto::v1::raft_service_server::RaftService;
use pgquorum_proto::v1::RaftMessage;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Response, Status};

use crate::raft::codec::{decode, encode};
use crate::raft::{NodeId, Raft};

pub struct RaftServiceImpl {
    id: NodeId,
    raft: Raft,
}

impl RaftServiceImpl {
    pub fn new(id: NodeId, raft: Raft) -> Self {
        RaftServiceImpl { id, raft }
    }

    /// Checks the message is for this node and decodes it.
    fn open<T: DeserializeOwned>(&self, request: Request<RaftMessage>) -> Result<T, Status> {
        let msg = request.into_inner();
        if msg.target != self.id {
            // Refused as a precondition, which the sender treats as "unreachable": the
            // address it holds no longer belongs to the node it means.
            return Err(Status::failed_precondition(format!(
                "message for coordinator {} reached coordinator {}; check the address in the Raft membership",
                msg.target, self.id
            )));
        }
        decode(&msg.payload).map_err(|e| Status::invalid_argument(format!("raft payload: {e}")))
    }
}

fn reply<T: Serialize>(result: &T) -> Result<Response<RaftMessage>, Status> {
    Ok(Response::new(RaftMessage {
        target: 0,
        payload: encode(result),
    }))
}

#[tonic::async_trait]
impl RaftService for RaftServiceImpl {
    async fn append_entries(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let req = self.open(request)?;
        reply(&self.raft.append_entries(req).await)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let req = self.open(request)?;
        reply(&self.raft.vote(req).await)
    }

    async fn install_snapshot(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let req = self.open(request)?;
        reply(&self.raft.install_snapshot(req).await)
    }
}
