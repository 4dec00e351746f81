//! EndpointService: the endpoint map, from this coordinator's applied state.
//!
//! Any coordinator serves it, follower or leader, so watchers ride out leader changes.
//! A watch sends the current map, then waits for applied changes and sends a map
//! whenever its version grew; a slow watcher simply gets the newest map when it reads
//! next (a `watch` channel coalesces), never a backlog. Only the leader, while a quorum
//! acknowledges it, marks its maps `vouched` and repeats them every second: watchers
//! use that to tell a current map from a possibly stale one, and to find the leader.

use std::pin::Pin;
use std::time::Duration;

use pgquorum_proto::v1 as pb;
use pgquorum_proto::v1::endpoint_service_server::EndpointService;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::observe::routes::endpoint_map;
use crate::raft::group::Group;
use crate::raft::leadership::{Leadership, QUORUM_RECENT};
use crate::raft::state_machine::StateHandle;
use crate::Error;

/// How often a watch stream repeats the current map while it is known current.
const CONFIRM_EVERY: Duration = Duration::from_secs(1);

pub struct EndpointServiceImpl {
    state: StateHandle,
    current: Currency,
}

/// Whether this coordinator's applied state is the group's: it leads with a quorum
/// heard from within [`QUORUM_RECENT`]. Only a leader can know that: a follower that
/// still hears a leader which lost its quorum (openraft keeps it leader) would vouch
/// for an outdated map forever.
/// A coordinator whose group was replaced (force-new-group) vouches for nothing.
#[derive(Clone)]
struct Currency {
    leadership: Leadership,
    group: Group,
}

impl Currency {
    fn known(&self) -> bool {
        self.group.superseded().is_none()
            && self.leadership.current().is_some_and(|lead| {
                lead.quorum_acked_at
                    .is_some_and(|at| at.elapsed() < QUORUM_RECENT)
            })
    }
}

impl EndpointServiceImpl {
    pub fn new(state: StateHandle, leadership: Leadership, group: Group) -> Self {
        EndpointServiceImpl {
            state,
            current: Currency { leadership, group },
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
        let mut first = current(&self.state, &cluster)?;
        first.vouched = self.current.known();
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
                let mut map = match current(&state, &cluster) {
                    Ok(m) => m,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                map.vouched = repeat || currency.known();
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
