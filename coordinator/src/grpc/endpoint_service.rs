//! EndpointService: the endpoint map, from this coordinator's applied state.
//!
//! Any coordinator serves it, follower or leader, so watchers ride out leader changes.
//! A watch sends the current map, then waits for applied changes and sends a map
//! whenever its version grew; a slow watcher simply gets the newest map when it reads
//! next (a `watch` channel coalesces), never a backlog.

use std::pin::Pin;
use std::time::Duration;

use pgquorum_proto::v1 as pb;
use pgquorum_proto::v1::endpoint_service_server::EndpointService;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::observe::routes::endpoint_map;
use crate::raft::leadership::Leadership;
use crate::raft::state_machine::StateHandle;
use crate::raft::Raft;
use crate::Error;

/// How often a watch stream repeats the current map while it is known current.
const CONFIRM_EVERY: Duration = Duration::from_secs(1);

pub struct EndpointServiceImpl {
    state: StateHandle,
    current: Currency,
}

/// Whether this coordinator's applied state is the group's: it leads with a quorum
/// heard from within [`CONFIRM_EVERY`], or it follows a leader it knows.
#[derive(Clone)]
struct Currency {
    raft: Raft,
    leadership: Leadership,
}

impl Currency {
    fn known(&self) -> bool {
        if let Some(lead) = self.leadership.current() {
            return lead
                .quorum_acked_at
                .is_some_and(|at| at.elapsed() < CONFIRM_EVERY);
        }
        self.raft.metrics().borrow().current_leader.is_some()
    }
}

impl EndpointServiceImpl {
    pub fn new(state: StateHandle, raft: Raft, leadership: Leadership) -> Self {
        EndpointServiceImpl {
            state,
            current: Currency { raft, leadership },
        }
    }
}

fn current(state: &StateHandle, cluster: &str) -> Result<pb::EndpointMap, Status> {
    let applied = state.read();
    let c = applied.state.cluster(cluster).map_err(Error::from)?;
    Ok(endpoint_map(c))
}

type MapStream = Pin<Box<dyn Stream<Item = Result<pb::EndpointMap, Status>> + Send>>;

#[tonic::async_trait]
impl EndpointService for EndpointServiceImpl {
    async fn get(
        &self,
        request: Request<pb::GetEndpointsRequest>,
    ) -> Result<Response<pb::EndpointMap>, Status> {
        Ok(Response::new(current(
            &self.state,
            &request.into_inner().cluster,
        )?))
    }

    type WatchStream = MapStream;

    async fn watch(
        &self,
        request: Request<pb::WatchEndpointsRequest>,
    ) -> Result<Response<MapStream>, Status> {
        let cluster = request.into_inner().cluster;
        let first = current(&self.state, &cluster)?;
        let state = self.state.clone();
        let currency = self.current.clone();
        let mut changes = state.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            let mut sent = first.version;
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            let mut confirm = tokio::time::interval(CONFIRM_EVERY);
            confirm.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Ends when the watcher goes away (send fails) or the server stops.
            loop {
                let repeat = tokio::select! {
                    changed = changes.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        false
                    }
                    _ = confirm.tick() => currency.known(),
                };
                let map = match current(&state, &cluster) {
                    Ok(m) => m,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                if map.version > sent || repeat {
                    sent = sent.max(map.version);
                    if tx.send(Ok(map)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
