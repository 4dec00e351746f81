//! AgentService: heartbeats from the agents.
//!
//! The leader records each report in memory, registers the member through Raft when
//! it is new or changed, grants the first bootstrap of a cluster, and answers with
//! what the node must know: epoch, primary, and for the primary the standbys to wait
//! for. A follower passes the heartbeat on to the leader, so an agent that reaches any
//! coordinator is heard (a primary cut off from the leader alone keeps reporting).
//!
//! Leases: the report table belongs to the term this node leads in (it starts afresh
//! in a new one). A reply that grants a lease first confirms this leadership with a
//! quorum round (openraft's read index, `ensure_linearizable`) and then reads the state
//! applied through it; the lease ends no later than the grant window plus a lease after
//! that round *started* ([`lease_room`]), a time read before asking, so no pause of
//! this process can date a contact later than it was. A leader cut off from its quorum
//! refuses the heartbeat, the agent tries another coordinator, and an unrenewed lease
//! runs out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pgquorum_proto::v1 as pb;
use pgquorum_proto::v1::agent_service_client::AgentServiceClient;
use pgquorum_proto::v1::agent_service_server::AgentService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use super::proposer::Proposer;
use crate::failover::heartbeat_reply;
use crate::observe::Reports;
use crate::raft::leadership::{Lead, Leadership};
use crate::state::{Command, CommandError, Member};
use crate::Error;

pub struct AgentServiceImpl {
    proposer: Proposer,
    reports: Reports,
    leadership: Leadership,
    /// See [`crate::observe::ClusterReports::grant_window`].
    grant_window: Duration,
    /// Channels to leaders, for forwarding; tonic reconnects them as needed.
    channels: Mutex<HashMap<String, Channel>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn member_of(spec: &pb::MemberSpec) -> Result<Member, Error> {
    let port = u16::try_from(spec.port).map_err(|_| Error::InvalidArgument {
        field: "member.port".into(),
        message: format!("must be 1-65535, got {}", spec.port),
    })?;
    Ok(Member {
        name: spec.name.clone(),
        region: spec.region.clone(),
        host: spec.host.clone(),
        port,
        workload: spec.workload.clone(),
        priority: spec.priority,
        nofailover: spec.nofailover,
        sync_eligible: spec.sync_eligible,
    })
}

impl AgentServiceImpl {
    pub fn new(proposer: Proposer, reports: Reports, leadership: Leadership, grant_window: Duration) -> Self {
        AgentServiceImpl {
            proposer,
            reports,
            leadership,
            grant_window,
            channels: Mutex::new(HashMap::new()),
        }
    }

    async fn forward(&self, mut request: pb::HeartbeatRequest) -> Result<pb::HeartbeatReply, Status> {
        let Error::NotLeader {
            leader: Some((_, addr)),
        } = self.proposer.not_leader()
        else {
            return Err(self.proposer.not_leader().into());
        };
        let channel = {
            let mut channels = self.channels.lock().expect("channel cache lock poisoned");
            match channels.get(&addr) {
                Some(c) => c.clone(),
                None => {
                    let c = Endpoint::from_shared(format!("http://{addr}"))
                        .map_err(|e| Status::internal(format!("leader address {addr:?}: {e}")))?
                        .connect_timeout(Duration::from_millis(500))
                        .timeout(Duration::from_secs(2))
                        .tcp_nodelay(true)
                        .connect_lazy();
                    channels.insert(addr.clone(), c.clone());
                    c
                }
            }
        };
        request.forwarded = true;
        Ok(AgentServiceClient::new(channel)
            .heartbeat(request)
            .await?
            .into_inner())
    }

    async fn handle(&self, lead: Lead, request: pb::HeartbeatRequest) -> Result<pb::HeartbeatReply, Error> {
        let spec = request.member.ok_or_else(|| Error::InvalidArgument {
            field: "member".into(),
            message: "missing: say which node this is".into(),
        })?;
        let report = request.report.unwrap_or_default();
        let member = member_of(&spec)?;
        let name = member.name.clone();
        let cluster_name = request.cluster;

        let known = self
            .proposer
            .state
            .read()
            .state
            .cluster(&cluster_name)
            .map(|c| c.members.get(&name).cloned());
        match known {
            Err(CommandError::UnknownCluster(c)) => {
                return Err(Error::Command(CommandError::UnknownCluster(c)));
            }
            Ok(Some(m)) if m == member => {}
            _ => {
                let cmd = Command::RegisterMember {
                    cluster: cluster_name.clone(),
                    member,
                    at_ms: now_ms(),
                };
                self.proposer.propose(cmd).await?;
            }
        }
        let initializing = report.initializing;
        let system_identifier = (report.role == "primary" && report.postgres_up)
            .then_some(report.system_identifier)
            .filter(|&id| id != 0);
        // A late or repeated report is not kept; the reply is still what the state says.
        self.reports.record(&cluster_name, &name, report, Instant::now());

        let (bootstrapped, is_primary, identified) = {
            let applied = self.proposer.state.read();
            let c = applied.state.cluster(&cluster_name)?;
            (
                c.epoch > 0,
                c.primary.as_deref() == Some(name.as_str()),
                c.system_identifier.is_some(),
            )
        };
        if let Some(system_identifier) = system_identifier.filter(|_| is_primary && !identified) {
            let cmd = Command::RecordSystemIdentifier {
                cluster: cluster_name.clone(),
                node: name.clone(),
                system_identifier,
                at_ms: now_ms(),
            };
            self.proposer.propose(cmd).await?;
        }
        if initializing && !bootstrapped {
            let cmd = Command::ClaimBootstrap {
                cluster: cluster_name.clone(),
                node: name.clone(),
                at_ms: now_ms(),
            };
            match self.proposer.propose(cmd).await {
                Ok(_) | Err(Error::Command(CommandError::AlreadyBootstrapped { .. })) => {}
                Err(e) => return Err(e),
            }
        }

        let draft = self.draft(lead, &cluster_name, &name, initializing)?;
        if draft.lease_ms == 0 {
            return self.finish(draft, &cluster_name, &name, Instant::now());
        }
        // A lease: confirm this leadership with a quorum first, then answer from the
        // state applied through that confirmation.
        let asked = Instant::now();
        let confirmed =
            tokio::time::timeout(self.grant_window, self.proposer.raft.ensure_linearizable()).await;
        if !matches!(confirmed, Ok(Ok(_))) {
            return Err(self.no_quorum_contact(lead, Instant::now()));
        }
        let mut reply = self.draft(lead, &cluster_name, &name, initializing)?;
        let now = Instant::now();
        if reply.lease_ms > 0 {
            let lease = Duration::from_millis(reply.lease_ms);
            let Some(room) = lease_room(asked, self.grant_window, lease, now) else {
                return Err(self.no_quorum_contact(lead, now));
            };
            reply.lease_ms = room.as_millis() as u64;
        }
        self.finish(reply, &cluster_name, &name, now)
    }

    fn no_quorum_contact(&self, lead: Lead, now: Instant) -> Error {
        Error::NoQuorumContact {
            since_ms: lead.quorum_acked_at.map_or(u64::MAX, |at| {
                now.saturating_duration_since(at).as_millis() as u64
            }),
            window_ms: self.grant_window.as_millis() as u64,
        }
    }

    /// What the node must know and do (see [`crate::failover::reply`]) by the applied
    /// state, if this node still leads in `lead`'s term; its lease not yet bounded.
    fn draft(
        &self,
        lead: Lead,
        cluster: &str,
        name: &str,
        initializing: bool,
    ) -> Result<pb::HeartbeatReply, Error> {
        if self.leadership.current().is_none_or(|l| l.term != lead.term) {
            return Err(self.proposer.not_leader());
        }
        let applied = self.proposer.state.read();
        let cluster = applied.state.cluster(cluster)?;
        Ok(heartbeat_reply(
            cluster,
            &self.reports.cluster(&cluster.name, Instant::now()),
            name,
            initializing,
        ))
    }

    /// Records what the reply grants and tells.
    fn finish(
        &self,
        mut reply: pb::HeartbeatReply,
        cluster: &str,
        name: &str,
        now: Instant,
    ) -> Result<pb::HeartbeatReply, Error> {
        reply.reply_mark = self.reports.reply_mark(now);
        if reply.lease_ms > 0 {
            let length = Duration::from_millis(reply.lease_ms);
            self.reports.lease_granted(cluster, name, length, now);
        }
        if reply.primary.as_ref().is_some_and(|p| p.name == name) {
            self.reports
                .told_sync_names(cluster, name, &reply.synchronous_standby_names);
        }
        Ok(reply)
    }
}

/// The lease this leader may grant now, after a quorum confirmed its leadership in a
/// round that started at `confirmed_from`: it must end no later than that plus the
/// grant window plus a lease, since a new leader (elected after the round started:
/// a quorum still followed this one) counts every earlier lease as over by its
/// election plus that much (see [`crate::failover::decide::lease_expired`]). So a
/// leader whose confirmation comes late grants a shorter lease (None when too little
/// is left to be worth a margin).
pub fn lease_room(
    confirmed_from: Instant,
    grant_window: Duration,
    lease: Duration,
    now: Instant,
) -> Option<Duration> {
    let latest_end = confirmed_from + grant_window + lease;
    let room = latest_end.saturating_duration_since(now).min(lease);
    (room > pgquorum_client::lease::margin(lease) * 2).then_some(room)
}

#[tonic::async_trait]
impl AgentService for AgentServiceImpl {
    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        let request = request.into_inner();
        let Some(lead) = self.leadership.current() else {
            if request.forwarded {
                // Forwarded to us because we were leader a moment ago; do not bounce it on.
                return Err(self.proposer.not_leader().into());
            }
            return Ok(Response::new(self.forward(request).await?));
        };
        self.reports.lead(lead.term, Instant::now());
        Ok(Response::new(self.handle(lead, request).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_never_outlasts_the_confirming_round_by_more_than_window_and_lease() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let (window, lease) = (ms(150), ms(1000));
        assert_eq!(lease_room(t0, window, lease, t0 + ms(100)), Some(lease));
        assert_eq!(lease_room(t0, window, lease, t0 + ms(400)), Some(ms(750)));
        assert_eq!(lease_room(t0, window, lease, t0 + ms(1_110)), None, "40 ms left");
        assert_eq!(lease_room(t0, window, lease, t0 + ms(5_000)), None);
    }
}
