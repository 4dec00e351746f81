//! Rust client for the pgquorum coordinators.
//!
//! Give it every coordinator address you know; it tries them in turn until one answers,
//! and when a coordinator replies "not the leader, node N at ADDR is" it goes straight
//! there. While the group has no leader (an election takes a few hundred milliseconds)
//! it keeps trying until its deadline. The CLI, the benchmarks and the tests all use it,
//! and so can any other program.

#[cfg(feature = "daemon")]
pub mod daemon;
pub mod lease;
pub mod lsn;
pub mod sync_names;
pub mod watch;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pgquorum_proto::v1::admin_service_client::AdminServiceClient;
use pgquorum_proto::v1::agent_service_client::AgentServiceClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Response, Status};

pub use pgquorum_proto::metadata;
pub use pgquorum_proto::v1 as pb;

/// Workload classes a Postgres member can serve (DESIGN.md's topology); shared by the
/// agent's config check and the coordinators' validation.
pub const WORKLOADS: &[&str] = &["realtime", "reporting", "analytics", "backup", "dr", "general"];

/// Completes on SIGTERM or SIGINT: how pgquorum's daemons (coordinator, agent) learn
/// to stop cleanly. Without signal handlers it never completes (SIGKILL still works).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Environment variable holding comma-separated coordinator addresses.
pub const COORDINATORS_ENV: &str = "PGQUORUM_COORDINATORS";

/// How long [`Coordinators::heartbeat_within`] waits before asking a coordinator that
/// failed again (an election in progress: no leader to forward to); doubled after
/// each failure, up to four times this.
pub const HEARTBEAT_RETRY: Duration = Duration::from_millis(25);

/// How long a client's connection may go without receiving anything before it is
/// pinged, and how long the ping's answer may then take before the connection is
/// dropped and a fresh one made. Set on every pgquorum client connection.
///
/// Without it a connection that lived through a network cut can stall for seconds
/// after the cut heals: whatever one side sent during the cut is still unacknowledged,
/// its TCP retransmission timer has backed off (0.2, 0.4, 0.8, 1.6 s, …), and every
/// later request or reply on that connection queues behind the next retransmission.
/// That is the best explanation found for what chaos runs showed (docs/faults.md): two
/// Raft-leader isolations a few seconds apart, the new leader the coordinator isolated
/// just before, and the primary's heartbeats reached it but no grant came back within
/// the lease, so a healthy primary was replaced. With the ping, a connection that hears
/// nothing for a second (a cut longer than that) is dropped during the cut, and the
/// first request after the heal opens a fresh one. (A shorter cut can still leave a
/// stall of a few hundred milliseconds.) A pong stuck behind the backoff counts as
/// nothing heard, whichever direction stalled.
///
/// On a link with more than ~0.5 s round trip, or losing many packets, connections
/// get replaced needlessly; pgquorum's connections are within a region or between
/// neighbouring ones.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_millis(500);
/// See [`KEEPALIVE_INTERVAL`].
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_millis(500);

/// A server's pings, to its clients: slower and more patient than a client's own (which
/// catch a stall quickly), since a server serves any client, across a WAN too. They
/// free what a vanished client held, and end a stream whose client-to-server direction
/// stalled, which the client's reads cannot notice.
pub const SERVER_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// See [`SERVER_KEEPALIVE_INTERVAL`].
pub const SERVER_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long opening a connection to a coordinator may take (one address on a LAN).
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// An endpoint for `host:port` with the settings every pgquorum connection uses: no
/// Nagle delay, [`CONNECT_TIMEOUT`], and HTTP/2 pings ([`KEEPALIVE_INTERVAL`]) that
/// replace a stalled or dead connection. Callers add their own request timeout.
pub fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true))
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no coordinator addresses given: pass --coordinators host:port[,host:port…] or set {COORDINATORS_ENV}")]
    NoAddresses,
    #[error("invalid coordinator address {addr:?}: {reason}")]
    InvalidAddress { addr: String, reason: String },
    /// Nobody answered in time, or nobody knew a leader; says what each one said.
    #[error("no coordinator could serve the request: {}", .attempts.join("; "))]
    Unavailable { attempts: Vec<String> },
    /// A coordinator answered and refused; its message says why.
    #[error("{message}")]
    Rejected { code: Code, message: String },
}

impl ClientError {
    /// The gRPC code of a refusal, if the request was refused rather than unanswered.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Rejected { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// How a failed connection's reason starts (tells "nothing there" from "it refused").
const CANNOT_CONNECT: &str = "cannot connect";

/// An error with every cause under it ("transport error" alone says nothing; its
/// source says "Connection refused").
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        next = cause.source();
    }
    text
}

/// The latest reason each coordinator gave (or failed with), one entry per address.
#[derive(Default)]
struct Attempts(Vec<(String, String)>);

impl Attempts {
    fn record(&mut self, addr: &str, why: impl Into<String>) {
        let why = why.into();
        match self.0.iter_mut().find(|(a, _)| a == addr) {
            Some(entry) => entry.1 = why,
            None => self.0.push((addr.to_string(), why)),
        }
    }

    fn error(self) -> ClientError {
        ClientError::Unavailable {
            attempts: self.0.into_iter().map(|(a, why)| format!("{a}: {why}")).collect(),
        }
    }
}

/// Timeouts of a [`Coordinators`] client.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Per TCP connect.
    pub connect: Duration,
    /// Per request, once connected.
    pub request: Duration,
    /// For the whole call, retries included (elections, redirects).
    pub overall: Duration,
    /// Give up sooner when for this long no coordinator could even be connected to
    /// (nothing listens: stopped, or wrong addresses); `overall` when None. An
    /// election is waited out to `overall`: its coordinators answer.
    pub unreachable: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_millis(500),
            request: Duration::from_secs(10),
            overall: Duration::from_secs(15),
            unreachable: None,
        }
    }
}

/// A handle on the coordinator group.
pub struct Coordinators {
    addrs: Vec<String>,
    timeouts: Timeouts,
    /// Where the last call succeeded; tried first next time.
    preferred: Mutex<Option<String>>,
    /// One HTTP/2 channel per address, reused across calls (tonic reconnects it).
    channels: Mutex<HashMap<String, Channel>>,
}

/// Parses `host:port[,host:port…]`.
pub fn parse_addrs(list: &str) -> Result<Vec<String>, ClientError> {
    let addrs: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    if addrs.is_empty() {
        return Err(ClientError::NoAddresses);
    }
    for a in &addrs {
        let ok = a
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !ok {
            return Err(ClientError::InvalidAddress {
                addr: a.clone(),
                reason: "expected host:port".into(),
            });
        }
    }
    Ok(addrs)
}

fn leader_hint(status: &Status) -> Option<String> {
    let addr = status.metadata().get(metadata::LEADER_ADDR)?.to_str().ok()?;
    (!addr.is_empty()).then(|| addr.to_string())
}

impl Coordinators {
    pub fn new(addrs: Vec<String>, timeouts: Timeouts) -> Result<Coordinators, ClientError> {
        if addrs.is_empty() {
            return Err(ClientError::NoAddresses);
        }
        Ok(Coordinators {
            addrs,
            timeouts,
            preferred: Mutex::new(None),
            channels: Mutex::new(HashMap::new()),
        })
    }

    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// An admin client for one coordinator, on a cached channel when there is one.
    pub async fn connect(&self, addr: &str) -> Result<AdminServiceClient<Channel>, String> {
        self.channel(addr).await.map(AdminServiceClient::new)
    }

    /// The channel to one coordinator: cached, else connected now.
    pub async fn channel(&self, addr: &str) -> Result<Channel, String> {
        if let Some(channel) = self.channels.lock().expect("lock").get(addr) {
            return Ok(channel.clone());
        }
        let endpoint = endpoint(addr)
            .map_err(|e| e.to_string())?
            .connect_timeout(self.timeouts.connect)
            .timeout(self.timeouts.request);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("{CANNOT_CONNECT}: {}", with_causes(&e)))?;
        self.channels
            .lock()
            .expect("lock")
            .insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    /// Calls one coordinator, without trying others.
    pub async fn call_at<T, F, Fut>(&self, addr: &str, op: F) -> Result<T, ClientError>
    where
        F: FnOnce(AdminServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let client = self.connect(addr).await.map_err(|e| ClientError::Unavailable {
            attempts: vec![format!("{addr}: {e}")],
        })?;
        op(client)
            .await
            .map(Response::into_inner)
            .map_err(|s| ClientError::Rejected {
                code: s.code(),
                message: s.message().to_string(),
            })
    }

    /// Calls the group: tries coordinators until one serves the request, following
    /// leader redirects, until the overall deadline. A refusal (bad argument, unknown
    /// cluster, …) is returned at once: asking another coordinator would not change it.
    pub async fn call<T, F, Fut>(&self, mut op: F) -> Result<T, ClientError>
    where
        F: FnMut(AdminServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        self.call_channel(|channel| op(AdminServiceClient::new(channel)))
            .await
    }

    /// Sends an agent's heartbeat to the group (any coordinator takes it).
    pub async fn heartbeat(&self, request: pb::HeartbeatRequest) -> Result<pb::HeartbeatReply, ClientError> {
        self.call_channel(|channel| {
            let request = request.clone();
            async move { AgentServiceClient::new(channel).heartbeat(request).await }
        })
        .await
    }

    /// An agent's heartbeat, bounded for a lease holder: the coordinator that answered
    /// last is asked first, for at most `attempt`; if it has not answered by then, or
    /// failed, every coordinator is asked at once and the first reply wins. One that
    /// fails (no leader known during an election, a forward given up) is asked again
    /// after [`HEARTBEAT_RETRY`], whatever the others are doing, until `overall` ends. (Any
    /// coordinator serves a heartbeat: a follower forwards it.) So one slow or frozen
    /// coordinator, or a leader change, costs a lease holder an `attempt` and an
    /// election, not its lease.
    pub async fn heartbeat_within(
        &self,
        request: pb::HeartbeatRequest,
        attempt: Duration,
        overall: Duration,
    ) -> Result<pb::HeartbeatReply, ClientError> {
        use futures::stream::{FuturesUnordered, StreamExt};
        let deadline = tokio::time::Instant::now() + overall;
        let started = tokio::time::Instant::now();
        // Each attempt may first wait (a retry of a coordinator that failed); its report
        // says how old its observation is by then.
        let one = |addr: String, after: Duration| {
            let mut request = request.clone();
            async move {
                tokio::time::sleep(after).await;
                if let Some(r) = request.report.as_mut() {
                    r.observed_ago_ms += started.elapsed().as_millis() as u64;
                }
                let outcome = match self.channel(&addr).await {
                    Ok(channel) => AgentServiceClient::new(channel)
                        .heartbeat(request)
                        .await
                        .map(Response::into_inner)
                        .map_err(|s| (s.code(), s.message().to_string())),
                    Err(e) => Err((Code::Unavailable, e)),
                };
                (addr, outcome)
            }
        };
        let now = Duration::ZERO;
        // Failures per coordinator: retried after 25, 50, then every 100 ms.
        let mut failures: HashMap<String, u32> = HashMap::new();
        let mut attempts = Vec::new();
        let preferred = self.preferred.lock().expect("lock").clone();
        let mut pending = FuturesUnordered::new();
        if let Some(first) = preferred.clone() {
            pending.push(one(first, now));
        }
        let mut others_asked = preferred.is_none();
        if others_asked {
            pending.extend(self.addrs.iter().cloned().map(|a| one(a, now)));
        }
        let mut patience = Box::pin(tokio::time::sleep(attempt.min(overall)));
        loop {
            tokio::select! {
                Some((addr, outcome)) = pending.next() => match outcome {
                    Ok(reply) => {
                        *self.preferred.lock().expect("lock") = Some(addr);
                        return Ok(reply);
                    }
                    Err((code, message)) => {
                        if matches!(code, Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition | Code::PermissionDenied | Code::Unauthenticated) {
                            return Err(ClientError::Rejected { code, message });
                        }
                        if preferred.as_ref() == Some(&addr) {
                            // Next time, everyone at once.
                            *self.preferred.lock().expect("lock") = None;
                        }
                        attempts.push(format!("{addr}: {message}"));
                        attempts.drain(..attempts.len().saturating_sub(self.addrs.len()));
                        if !others_asked {
                            others_asked = true;
                            pending.extend(self.addrs.iter().filter(|a| **a != addr).cloned().map(|a| one(a, now)));
                        }
                        // This one again shortly (an election ends, a forward to a new
                        // leader works), whatever the others are still doing.
                        let n = failures.entry(addr.clone()).or_default();
                        *n += 1;
                        let after = (HEARTBEAT_RETRY * 2u32.pow((*n - 1).min(2))).min(HEARTBEAT_RETRY * 4);
                        pending.push(one(addr, after));
                    }
                },
                _ = &mut patience, if !others_asked => {
                    others_asked = true;
                    pending.extend(self.addrs.iter().filter(|a| Some(*a) != preferred.as_ref()).cloned().map(|a| one(a, now)));
                }
                _ = tokio::time::sleep_until(deadline) => {
                    attempts.push(format!("no reply within {} ms", overall.as_millis()));
                    return Err(ClientError::Unavailable { attempts });
                }
            }
        }
    }

    /// [`Self::call`] for any service: `op` gets a channel to wrap in its client.
    pub async fn call_channel<T, F, Fut>(&self, mut op: F) -> Result<T, ClientError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let deadline = Instant::now() + self.timeouts.overall;
        let mut attempts = Attempts::default();
        let mut unreachable_since: Option<Instant> = None;
        loop {
            let preferred = self.preferred.lock().expect("lock").clone();
            let mut queue: Vec<String> = preferred.iter().cloned().collect();
            queue.extend(
                self.addrs
                    .iter()
                    .filter(|a| preferred.as_ref() != Some(*a))
                    .cloned(),
            );
            let mut redirects = 0;
            let mut connected = false;
            while let Some(addr) = (!queue.is_empty()).then(|| queue.remove(0)) {
                if Instant::now() >= deadline {
                    return Err(attempts.error());
                }
                let client = match self.channel(&addr).await {
                    Ok(c) => c,
                    Err(e) => {
                        attempts.record(&addr, e);
                        continue;
                    }
                };
                connected = true;
                match op(client).await {
                    Ok(r) => {
                        *self.preferred.lock().expect("lock") = Some(addr);
                        return Ok(r.into_inner());
                    }
                    Err(status) => {
                        if let Some(leader) = leader_hint(&status) {
                            if leader != addr && redirects < 3 {
                                redirects += 1;
                                queue.retain(|a| *a != leader);
                                queue.insert(0, leader);
                                continue;
                            }
                        }
                        match status.code() {
                            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                                attempts.record(&addr, status.message());
                            }
                            code => {
                                return Err(ClientError::Rejected {
                                    code,
                                    message: status.message().to_string(),
                                })
                            }
                        }
                    }
                }
            }
            // Nobody could serve it (election in progress, or all down): retry until
            // the deadline, or sooner when nothing listens anywhere.
            let now = Instant::now();
            unreachable_since = if connected {
                None
            } else {
                unreachable_since.or(Some(now))
            };
            let gave_up = unreachable_since
                .zip(self.timeouts.unreachable)
                .is_some_and(|(since, limit)| now.duration_since(since) >= limit);
            if gave_up || now + Duration::from_millis(100) >= deadline {
                return Err(attempts.error());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_checked() {
        assert_eq!(parse_addrs("a:1, b:2,").unwrap(), ["a:1", "b:2"]);
        assert!(matches!(parse_addrs(" , "), Err(ClientError::NoAddresses)));
        assert!(matches!(parse_addrs("a:1,b"), Err(ClientError::InvalidAddress { addr, .. }) if addr == "b"));
        assert!(matches!(
            parse_addrs("a:0"),
            Err(ClientError::InvalidAddress { .. })
        ));
        assert!(matches!(
            parse_addrs(":80"),
            Err(ClientError::InvalidAddress { .. })
        ));
    }
}
