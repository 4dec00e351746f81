//! The failsafe's wire: the agent's `PeerService`, where a standby answers a primary's
//! request for a promise, and the client side a primary asks its standbys with. What
//! to answer and how long to write on the answers is [`crate::failsafe`]'s; this module
//! keeps the promise on disk and moves the messages.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgquorum_client::pb;
use pgquorum_client::pb::peer_service_client::PeerServiceClient;
use pgquorum_client::pb::peer_service_server::{PeerService, PeerServiceServer};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::failsafe::{self, Promise, PromiseRecord, Standing};
use crate::guard::{boot_id, boottime_ns};
use crate::state::StateFile;

/// What this agent has promised and what it knows to judge a request; shared by the
/// agent's loop (which updates the standing and reads the promise) and the server.
pub struct Book {
    standing: Standing,
    promise: Option<Promise>,
    file: StateFile<PromiseRecord>,
}

pub type SharedBook = Arc<Mutex<Book>>;

impl Book {
    /// The book of the node whose data directory is `data_dir`, with the promise an
    /// earlier agent process left running.
    pub fn open(data_dir: &Path) -> Result<SharedBook> {
        let file: StateFile<PromiseRecord> =
            StateFile::named(data_dir, ".pgquorum-promise.toml", "a failsafe promise");
        let promise = file.load()?.restore(Instant::now(), boottime_ns(), boot_id());
        if let Some(p) = &promise {
            warn!(
                primary = %p.primary,
                epoch = p.epoch,
                left_ms = p.left(Instant::now()).unwrap_or_default().as_millis() as u64,
                "a failsafe promise given before this start still runs: no promotion until it ends"
            );
        }
        Ok(Arc::new(Mutex::new(Book {
            standing: Standing::default(),
            promise,
            file,
        })))
    }

    pub fn set_standing(&mut self, standing: Standing) {
        self.standing = standing;
    }

    /// A coordinator leader answered at `at`, if only to refuse (a held node): this
    /// node reaches a leader and promises nothing.
    pub fn leader_answered(&mut self, at: Instant) {
        self.standing.leader_answered_at = Some(at);
    }

    /// The promise that still runs at `now`, and how long it has left.
    pub fn held(&self, now: Instant) -> Option<(Promise, Duration)> {
        let p = self.promise.as_ref()?;
        p.left(now).map(|left| (p.clone(), left))
    }

    /// Judges `request` and, if it may be given, writes the promise down before it
    /// counts. Not synced to disk: a promise is renewed several times a second during
    /// an outage, and a busy disk's fsync can take longer than the primary waits for an
    /// answer (seen: both standbys' answers missed the primary's 300 ms, and it fenced).
    /// The file outlives the agent's process; what a host crash loses is a promise of
    /// one lease, shorter than the host takes to boot again.
    fn give(&mut self, request: &pb::PromiseRequest, now: Instant) -> std::result::Result<Duration, String> {
        let length = failsafe::judge(&self.standing, request, now)?;
        let promise = failsafe::merge(
            self.held(now).map(|(p, _)| p),
            Promise {
                primary: request.primary.clone(),
                epoch: request.epoch,
                until: now + length,
            },
        );
        let record = PromiseRecord::of(&promise, length, now, boottime_ns(), boot_id());
        self.file
            .save_unsynced(&record)
            .map_err(|e| format!("cannot persist the promise: {e}"))?;
        self.promise = Some(promise);
        Ok(length)
    }
}

struct PeerServer {
    book: SharedBook,
}

#[tonic::async_trait]
impl PeerService for PeerServer {
    async fn promise(
        &self,
        request: Request<pb::PromiseRequest>,
    ) -> std::result::Result<Response<pb::PromiseReply>, Status> {
        let request = request.into_inner();
        let book = self.book.clone();
        let (was_promising, outcome) = {
            let now = Instant::now();
            let mut book = book.lock().expect("promise book lock poisoned");
            let was = book.held(now).is_some();
            (was, book.give(&request, now))
        };
        let reply = match outcome {
            Ok(length) => {
                if !was_promising {
                    info!(
                        primary = %request.primary,
                        epoch = request.epoch,
                        for_ms = length.as_millis() as u64,
                        "failsafe: no coordinator leader answers; promised the primary not to be promoted (renewed while asked)"
                    );
                }
                pb::PromiseReply {
                    granted: true,
                    for_ms: length.as_millis() as u64,
                    refusal: String::new(),
                }
            }
            Err(refusal) => {
                debug!(primary = %request.primary, epoch = request.epoch, %refusal, "failsafe: promise refused");
                pb::PromiseReply {
                    granted: false,
                    for_ms: 0,
                    refusal,
                }
            }
        };
        Ok(Response::new(reply))
    }
}

/// Binds the PeerService's address now (so a bad one fails the agent's start), and
/// returns the server to run.
pub async fn bind(
    addr: &str,
    book: SharedBook,
) -> Result<impl std::future::Future<Output = std::result::Result<(), tonic::transport::Error>>> {
    let socket: SocketAddr = addr.parse().map_err(|e| Error::Config {
        path: "peer_address".into(),
        message: format!("{addr:?} is not an IP address and port: {e}"),
    })?;
    let listener = tokio::net::TcpListener::bind(socket)
        .await
        .map_err(|e| Error::Config {
            path: "peer_address".into(),
            message: format!("cannot listen on {addr}: {e}"),
        })?;
    Ok(tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(pgquorum_client::SERVER_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(pgquorum_client::SERVER_KEEPALIVE_TIMEOUT))
        .add_service(PeerServiceServer::new(PeerServer { book }))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)))
}

/// A primary's side: one channel per standby agent, kept.
#[derive(Default)]
pub struct Peers {
    channels: HashMap<String, Channel>,
}

/// What a primary's peers answered it.
pub struct Answers {
    /// The length each gave (None: refused, unreachable, too slow, or no address).
    pub granted: Vec<Option<Duration>>,
    /// Why not, for the log.
    pub refusals: Vec<String>,
    /// Some peer answered "no" (it reaches a leader, it knows another epoch, …):
    /// asking again at once would get the same answer.
    pub said_no: bool,
}

impl Peers {
    /// Asks every one of `peers` for a promise at once, each bounded by `within`.
    pub async fn ask_all(
        &mut self,
        peers: &[pb::FailsafePeer],
        request: &pb::PromiseRequest,
        within: Duration,
    ) -> Answers {
        let asks = peers.iter().map(|peer| {
            let channel = self.channel(&peer.agent_addr);
            let request = pb::PromiseRequest {
                member: peer.name.clone(),
                ..request.clone()
            };
            // Err((said no, why)).
            async move {
                let channel = channel.map_err(|e| (false, format!("{}: {e}", peer.name)))?;
                let reply = tokio::time::timeout(within, PeerServiceClient::new(channel).promise(request))
                    .await
                    .map_err(|_| {
                        (
                            false,
                            format!("{}: no answer within {} ms", peer.name, within.as_millis()),
                        )
                    })?
                    .map_err(|s| (false, format!("{}: {}", peer.name, s.message())))?
                    .into_inner();
                if reply.granted {
                    Ok(Duration::from_millis(reply.for_ms))
                } else {
                    Err((true, format!("{}: said no: {}", peer.name, reply.refusal)))
                }
            }
        });
        let outcomes = futures::future::join_all(asks).await;
        Answers {
            said_no: outcomes.iter().any(|o| matches!(o, Err((true, _)))),
            refusals: outcomes
                .iter()
                .filter_map(|o| o.as_ref().err().map(|(_, why)| why.clone()))
                .collect(),
            granted: outcomes.into_iter().map(|o| o.ok()).collect(),
        }
    }

    fn channel(&mut self, addr: &str) -> std::result::Result<Channel, String> {
        if addr.is_empty() {
            return Err("its agent serves no PeerService (no peer_address)".into());
        }
        if let Some(c) = self.channels.get(addr) {
            return Ok(c.clone());
        }
        let channel = pgquorum_client::endpoint(addr)
            .map_err(|e| format!("address {addr:?}: {e}"))?
            .connect_lazy();
        self.channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }
}
