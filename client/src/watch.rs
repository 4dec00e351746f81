//! Following a cluster's endpoint map, across coordinator failures.
//!
//! [`watch_endpoints`] keeps one `Watch` stream open to some coordinator (any of them
//! serves it); when that coordinator goes away it moves to the next one and carries
//! on. Maps come out in growing version order only: a map older than one already
//! delivered (a lagging follower) is skipped, so a consumer never goes back in time.
//! [`EndpointWatch::confirmed`] says when a coordinator last vouched for the newest
//! map (only the Raft leader does, every second while it has a quorum; a coordinator
//! that has not vouched for [`MOVE_ON`] is left for the next): how stale it may be.

use std::time::{Duration, Instant};

use pgquorum_proto::v1 as pb;
use pgquorum_proto::v1::endpoint_service_client::EndpointServiceClient;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::Code;

use crate::ClientError;

/// Pause before trying the next coordinator after a failure.
const RETRY: Duration = Duration::from_millis(100);
/// A coordinator that has sent no vouched map this long (it does every second while it
/// leads with a quorum) is left for the next one: it may be a follower, cut off from
/// the group, or a leader that lost its quorum.
const MOVE_ON: Duration = Duration::from_secs(3);

/// A live watch; dropping it stops watching.
pub struct EndpointWatch {
    rx: mpsc::Receiver<Result<pb::EndpointMap, ClientError>>,
    confirmed: tokio::sync::watch::Receiver<Option<Instant>>,
    task: JoinHandle<()>,
}

impl EndpointWatch {
    /// The next newer map, or the error that ended the watch (e.g. an unknown cluster).
    pub async fn next(&mut self) -> Option<Result<pb::EndpointMap, ClientError>> {
        self.rx.recv().await
    }

    /// When a coordinator leading with a quorum last sent the newest map, new or
    /// repeated (`vouched`); None: never.
    pub fn confirmed(&self) -> Option<Instant> {
        *self.confirmed.borrow()
    }
}

impl Drop for EndpointWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Watches `cluster`'s endpoint map through any of `addrs`.
pub fn watch_endpoints(addrs: Vec<String>, cluster: String) -> EndpointWatch {
    let (tx, rx) = mpsc::channel(4);
    let (confirm, confirmed) = tokio::sync::watch::channel(None);
    let task = tokio::spawn(async move {
        let mut last = 0u64;
        let mut i = 0usize;
        loop {
            let addr = &addrs[i % addrs.len().max(1)];
            i += 1;
            match follow(addr, &cluster, &mut last, &tx, &confirm).await {
                Ok(()) => return,
                Err(Some(e)) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                Err(None) => tokio::time::sleep(RETRY).await,
            }
        }
    });
    EndpointWatch { rx, confirmed, task }
}

/// Streams from one coordinator until it fails. `Ok`: the consumer went away;
/// `Err(None)`: try another coordinator; `Err(Some)`: a refusal that ends the watch.
async fn follow(
    addr: &str,
    cluster: &str,
    last: &mut u64,
    tx: &mpsc::Sender<Result<pb::EndpointMap, ClientError>>,
    confirm: &tokio::sync::watch::Sender<Option<Instant>>,
) -> Result<(), Option<ClientError>> {
    let channel = crate::endpoint(addr)
        .map_err(|e| {
            Some(ClientError::InvalidAddress {
                addr: addr.to_string(),
                reason: e.to_string(),
            })
        })?
        .connect()
        .await
        .map_err(|_| None)?;
    let request = pb::WatchEndpointsRequest {
        cluster: cluster.to_string(),
    };
    let refused = |s: tonic::Status| match s.code() {
        Code::NotFound | Code::InvalidArgument => Some(ClientError::Rejected {
            code: s.code(),
            message: s.message().to_string(),
        }),
        _ => None,
    };
    let mut stream = EndpointServiceClient::new(channel)
        .watch(request)
        .await
        .map_err(refused)?
        .into_inner();
    let mut vouched_at = tokio::time::Instant::now();
    loop {
        let Ok(message) = tokio::time::timeout_at(vouched_at + MOVE_ON, stream.message()).await else {
            // Connected, but nobody vouches here: try the next coordinator.
            return Err(None);
        };
        match message {
            Ok(Some(map)) => {
                if map.vouched && map.version >= *last {
                    vouched_at = tokio::time::Instant::now();
                    confirm.send_replace(Some(Instant::now()));
                }
                if map.version > *last {
                    *last = map.version;
                    if tx.send(Ok(map)).await.is_err() {
                        return Ok(());
                    }
                }
            }
            Ok(None) => return Err(None),
            Err(s) => return Err(refused(s)),
        }
    }
}
