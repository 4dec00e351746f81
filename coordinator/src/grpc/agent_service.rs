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
//! quorum round (openraft's read index, `ensure_linearizable`, which sends its
//! heartbeats after it is called) and then reads the state applied through it. The
//! agent counts its lease from its *send*, before that round started; any later
//! leader was elected after the round started (a quorum still followed this one), so
//! every lease granted here ends within a lease of that election, which is what a new
//! leader waits ([`crate::failover::decide::lease_expired`]). No clock of this process
//! enters the bound, so no pause of it can stretch one. A leader cut off from its
//! quorum refuses the heartbeat, the agent tries another coordinator, and an unrenewed
//! lease runs out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pgquorum_proto::v1 as pb;
use pgquorum_proto::v1::agent_service_client::AgentServiceClient;
use pgquorum_proto::v1::agent_service_server::AgentService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::proposer::Proposer;
use crate::failover::heartbeat_reply;
use crate::observe::Reports;
use crate::raft::leadership::{Lead, Leadership};
use crate::state::{Command, CommandError, Member};
use crate::Error;

/// How much longer than a quorum round a forwarded heartbeat may take (the leader's
/// commit of a report, the network).
const FORWARD_SLACK: Duration = Duration::from_millis(200);

pub struct AgentServiceImpl {
    proposer: Proposer,
    reports: Reports,
    leadership: Leadership,
    /// How long a lease grant waits for a quorum to confirm this leadership. Safety
    /// does not depend on it (the lease counts from the agent's send), only how soon a
    /// leader cut off from its quorum says so; it must allow for a follower's fsync
    /// stall, which holds up the heartbeats queued behind an append.
    confirm_within: Duration,
    /// When the last quorum round that confirmed this leadership started.
    confirmed_from: Mutex<Option<Instant>>,
    /// One round at a time: heartbeats arriving together share rounds.
    round: tokio::sync::Mutex<()>,
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
    if !spec.agent_addr.is_empty() {
        pgquorum_client::parse_addrs(&spec.agent_addr)
            .ok()
            .filter(|a| a.len() == 1)
            .ok_or_else(|| Error::InvalidArgument {
                field: "member.agent_addr".into(),
                message: format!("expected host:port, got {:?}", spec.agent_addr),
            })?;
    }
    Ok(Member {
        name: spec.name.clone(),
        region: spec.region.clone(),
        host: spec.host.clone(),
        port,
        workload: spec.workload.clone(),
        priority: spec.priority,
        nofailover: spec.nofailover,
        sync_eligible: spec.sync_eligible,
        agent_addr: spec.agent_addr.clone(),
    })
}

impl AgentServiceImpl {
    pub fn new(
        proposer: Proposer,
        reports: Reports,
        leadership: Leadership,
        confirm_within: Duration,
    ) -> Self {
        AgentServiceImpl {
            proposer,
            reports,
            leadership,
            confirm_within,
            confirmed_from: Mutex::new(None),
            round: tokio::sync::Mutex::new(()),
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// Forwards a heartbeat to the leader this node knows. Gives up as soon as that
    /// changes (an election: the old leader may be cut off and never answer, and the
    /// agent, asking again, reaches the new one at once), or after a healthy leader's
    /// quorum round and some slack.
    async fn forward(&self, mut request: pb::HeartbeatRequest) -> Result<pb::HeartbeatReply, Status> {
        let mut metrics = self.proposer.raft.metrics();
        let Error::NotLeader {
            leader: Some((leader, addr)),
        } = self.proposer.not_leader()
        else {
            return Err(self.proposer.not_leader().into());
        };
        let channel = {
            let mut channels = self.channels.lock().expect("channel cache lock poisoned");
            match channels.get(&addr) {
                Some(c) => c.clone(),
                None => {
                    let c = pgquorum_client::endpoint(&addr)
                        .map_err(|e| Status::internal(format!("leader address {addr:?}: {e}")))?
                        .timeout(self.confirm_within + FORWARD_SLACK)
                        .connect_lazy();
                    channels.insert(addr.clone(), c.clone());
                    c
                }
            }
        };
        request.forwarded = true;
        let mut client = AgentServiceClient::new(channel);
        let call = client.heartbeat(request);
        let leader_changed = async {
            loop {
                if metrics.changed().await.is_err() {
                    return;
                }
                if metrics.borrow_and_update().current_leader != Some(leader) {
                    return;
                }
            }
        };
        tokio::select! {
            reply = call => Ok(reply?.into_inner()),
            _ = leader_changed => Err(Status::unavailable(format!(
                "the leader changed while forwarding to coordinator {leader}; ask again"
            ))),
        }
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

        let known = {
            let applied = self.proposer.state.read();
            let local = self.proposer.group.id();
            if crate::leader::group_unrecorded(&applied.state.group, local.as_ref()) {
                return Err(Error::GroupReforming);
            }
            let cluster = applied.state.cluster(&cluster_name);
            if let Ok(c) = cluster {
                c.admits(&name)?;
                let reports = self.reports.cluster(&c.name, Instant::now());
                if let Some(why) = crate::observe::identity::conflict(c, &reports, &member, &report) {
                    return Err(Error::Identity(why));
                }
            }
            cluster.map(|c| c.members.get(&name).cloned())
        };
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
        let asked = Instant::now();
        // A reply without a lease needs a quorum heard from lately; a leader that lost
        // its followers (openraft keeps it leader) must not answer at all: a standby it
        // answered would count as reaching a leader and refuse the primary its failsafe
        // promise, although nothing can be committed.
        let quorum_recent = lead
            .quorum_acked_at
            .is_some_and(|at| asked.saturating_duration_since(at) < self.confirm_within);
        if draft.lease_ms == 0 && quorum_recent {
            return self.finish(draft, &cluster_name, &name, asked);
        }
        // A lease (or no recent quorum): confirm this leadership with a quorum first,
        // then answer from the state applied through that confirmation.
        if draft.lease_ms > 0 {
            // Counted as granted from now on, before it is: the controller, deciding on
            // another thread while this round runs, must not see the lease as over and
            // start a failover that this reply then contradicts. Unused, it only errs late.
            self.reports
                .lease_granted(&cluster_name, &name, Duration::from_millis(draft.lease_ms), asked);
        }
        if !self
            .confirm_leadership(lead, asked, asked + self.confirm_within)
            .await
        {
            return Err(self.no_quorum_contact(lead, Instant::now()));
        }
        if let Some(s) = self.proposer.group.superseded() {
            // Learned during the round: the group this leadership belongs to is gone.
            return Err(Error::GroupReplaced {
                id: self.proposer.id,
                why: s.why,
            });
        }
        let mut reply = self.draft(lead, &cluster_name, &name, initializing)?;
        if draft.lease_ms == 0 && reply.lease_ms > 0 {
            // The state moved meanwhile; a lease noted as granted only from now would
            // start later than it counts: none this time (the next heartbeat has one).
            reply.lease_ms = 0;
            reply.failsafe_peers.clear();
        }
        self.finish(reply, &cluster_name, &name, asked)
    }

    /// Whether a quorum confirms this leadership (in `lead`'s term), before
    /// `deadline`, in a round that started after `asked` (any such round will do: the
    /// requests waiting together share one). openraft gives up a round when a
    /// follower's answer takes over a heartbeat interval (an fsync stall on a busy
    /// follower), so failed rounds are retried, with a pause.
    async fn confirm_leadership(&self, lead: Lead, asked: Instant, deadline: Instant) -> bool {
        let confirmed = || {
            self.confirmed_from
                .lock()
                .expect("confirmation lock poisoned")
                .is_some_and(|from| from >= asked)
        };
        loop {
            if confirmed() {
                return true;
            }
            let Ok(_turn) = tokio::time::timeout_at(deadline.into(), self.round.lock()).await else {
                return false;
            };
            if confirmed() {
                return true;
            }
            let started = Instant::now();
            let round =
                tokio::time::timeout_at(deadline.into(), self.proposer.raft.ensure_linearizable()).await;
            match round {
                Ok(Ok(_)) => {
                    let mut from = self.confirmed_from.lock().expect("confirmation lock poisoned");
                    *from = (*from).max(Some(started));
                    return true;
                }
                Err(_) => return false,
                Ok(Err(_)) => {}
            }
            if self.leadership.current().is_none_or(|l| l.term != lead.term) || Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn no_quorum_contact(&self, lead: Lead, now: Instant) -> Error {
        Error::NoQuorumContact {
            since_ms: lead.quorum_acked_at.map_or(u64::MAX, |at| {
                now.saturating_duration_since(at).as_millis() as u64
            }),
            window_ms: self.confirm_within.as_millis() as u64,
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
        self.reports.answered(cluster, name, &mut reply, now);
        Ok(reply)
    }
}

#[tonic::async_trait]
impl AgentService for AgentServiceImpl {
    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        let request = request.into_inner();
        if let Some(s) = self.proposer.group.superseded() {
            return Err(Error::GroupReplaced {
                id: self.proposer.id,
                why: s.why,
            }
            .into());
        }
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
