//! AdminService: Raft membership and status, clusters and policy.
//!
//! Writes are proposed only on the leader; elsewhere the reply names the leader so the
//! client can go there (a redirect rather than forwarding keeps a follower from doing
//! the leader's work and makes "who is leader" visible to the operator). Reads are
//! linearizable by default: the leader confirms with a quorum (read-index) and waits
//! until its state machine has caught up before answering.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{SystemTime, UNIX_EPOCH};

use openraft::{ChangeMembers, ServerState};
use pgquorum_proto::v1 as pb;
use pgquorum_proto::v1::admin_service_server::AdminService;
use tonic::{Request, Response, Status};

use super::proposer::Proposer;
use crate::config::check_host_port;
use crate::failover::{decide, lease_expired, manual, Step};
use crate::observe::alerts::{self, alerts};
use crate::observe::health::node_statuses;
use crate::observe::Reports;
use crate::raft::group::{self, GroupId, Reform};
use crate::raft::{CoordinatorNode, NodeId};
use crate::state::policy::is_valid_name;
use crate::state::{Cluster, ClusterState, Command, CommandOutput, Order};
use crate::{Error, Result};

pub struct AdminServiceImpl {
    p: Proposer,
    reports: Reports,
    /// Notified to restart this coordinator (after a force-new-group was recorded).
    restart: std::sync::Arc<tokio::sync::Notify>,
    /// Held while a force-new-group is checked and recorded.
    reforming: tokio::sync::Mutex<()>,
    /// Held while taking a node out of service is checked and proposed: two at once
    /// could each leave the other as the replacement it counted on.
    out_of_service: tokio::sync::Mutex<()>,
}

/// How long `raft add` keeps asking the new coordinator's address before refusing.
const ADD_PROBE_FOR: std::time::Duration = std::time::Duration::from_secs(5);

/// How long `alerts` waits for a quorum to confirm this leader.
const QUORUM_CHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// How long force-new-group waits for each other voter's answer.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(1500);

/// Coordinator `id`'s own status at `addr`, if it answers in time as `id`.
async fn probe(id: NodeId, addr: String) -> Option<pb::RaftStatusReply> {
    probe_any(&addr).await.filter(|s| s.id == id)
}

/// The own status of whichever coordinator answers at `addr` in time.
async fn probe_any(addr: &str) -> Option<pb::RaftStatusReply> {
    use pgquorum_proto::v1::admin_service_client::AdminServiceClient;
    let ask = async {
        let channel = pgquorum_client::endpoint(addr).ok()?.connect().await.ok()?;
        let reply = AdminServiceClient::new(channel)
            .raft_status(pb::RaftStatusRequest {})
            .await
            .ok()?;
        Some(reply.into_inner())
    };
    tokio::time::timeout(PROBE_TIMEOUT, ask).await.ok().flatten()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Who made a request, for the history: what the client said, else its address.
fn actor<T>(request: &Request<T>, claimed: &str) -> String {
    if !claimed.trim().is_empty() {
        return claimed.trim().to_string();
    }
    request
        .remote_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn invalid(field: &str, message: impl Into<String>) -> Error {
    Error::InvalidArgument {
        field: field.to_string(),
        message: message.into(),
    }
}

impl AdminServiceImpl {
    pub fn new(p: Proposer, reports: Reports, restart: std::sync::Arc<tokio::sync::Notify>) -> Self {
        AdminServiceImpl {
            p,
            reports,
            restart,
            reforming: tokio::sync::Mutex::new(()),
            out_of_service: tokio::sync::Mutex::new(()),
        }
    }

    /// The voters other than this one that answer as members of `group` in good
    /// standing, with their last log index.
    async fn answering_voters(&self, group: &GroupId) -> BTreeMap<NodeId, u64> {
        let m = self.p.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let mut asks = tokio::task::JoinSet::new();
        for id in membership.voter_ids().filter(|v| *v != self.p.id) {
            if let Some(node) = membership.get_node(&id) {
                asks.spawn(probe(id, node.addr.clone()));
            }
        }
        let mut answered = BTreeMap::new();
        while let Some(done) = asks.join_next().await {
            if let Ok(Some(s)) = done {
                if s.group == group.as_str() && s.superseded.is_empty() {
                    answered.insert(s.id, s.last_log_index);
                }
            }
        }
        answered
    }

    async fn read<T>(&self, consistency: i32, f: impl FnOnce(&ClusterState) -> Result<T>) -> Result<T> {
        self.p.ready_to_read(consistency).await?;
        let applied = self.p.state.read();
        f(&applied.state)
    }

    fn membership_reply(&self, log_index: u64) -> pb::MembershipReply {
        pb::MembershipReply {
            log_index,
            members: self.members(None),
        }
    }

    fn members(
        &self,
        replication: Option<&BTreeMap<NodeId, Option<crate::raft::LogId>>>,
    ) -> Vec<pb::RaftMember> {
        let m = self.p.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, node)| pb::RaftMember {
                id: *id,
                addr: node.addr.clone(),
                region: node.region.clone(),
                voter: voters.contains(id),
                matched_index: replication
                    .and_then(|r| r.get(id))
                    .map(|l| l.map(|l| l.index).unwrap_or(0)),
            })
            .collect()
    }

    fn voters(&self) -> BTreeSet<NodeId> {
        self.p
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    fn learners(&self) -> BTreeSet<NodeId> {
        self.p
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .learner_ids()
            .collect()
    }

    /// Membership changes are leader work; refuse early, naming the leader, so that the
    /// checks below read the leader's membership rather than a follower's stale copy.
    async fn require_leader(&self) -> Result<()> {
        if self.p.is_leader().await {
            Ok(())
        } else {
            Err(self.p.not_leader())
        }
    }

    /// Starts an operator's failover or switchover ([`manual::hand_over`] checks it
    /// and says which commands carry it out).
    async fn hand_over(&self, cluster: &str, request: manual::Request) -> Result<pb::FailoverReply> {
        self.require_leader().await?;
        let cluster = self.resolve_cluster(cluster)?;
        let reports = self.reports.cluster(&cluster.name, std::time::Instant::now());
        for command in manual::hand_over(&cluster, &reports, request, now_ms())? {
            self.p.propose(command).await?;
        }
        self.failover_reply(&cluster.name)
    }

    /// Proposes `command` (`what`, for an unexpected result) and replies with the
    /// cluster as it left it.
    async fn propose_for_cluster(
        &self,
        command: Command,
        what: &str,
    ) -> std::result::Result<Response<pb::ClusterReply>, Status> {
        match self.p.propose(command).await? {
            CommandOutput::Cluster(c) => Ok(Response::new(cluster_reply(&c))),
            other => Err(Error::Raft(format!("unexpected result of {what}: {other:?}")).into()),
        }
    }

    /// The reply to a failover, switchover or override: the cluster as now applied.
    fn failover_reply(&self, cluster: &str) -> Result<pb::FailoverReply> {
        let applied = self.p.state.read();
        let c = applied.state.cluster(cluster)?;
        Ok(pb::FailoverReply {
            cluster: c.name.clone(),
            epoch: c.epoch,
            failover: c.failover.as_ref().map(Into::into),
            scheduled: c.scheduled_switchover.as_ref().map(Into::into),
        })
    }

    /// The cluster a status or alerts request means: the named one, or the only one.
    fn resolve_cluster(&self, name: &str) -> Result<Cluster> {
        let applied = self.p.state.read();
        if !name.is_empty() {
            return Ok(applied.state.cluster(name)?.clone());
        }
        let mut all = applied.state.clusters.values();
        match (all.next(), all.next()) {
            (Some(c), None) => Ok(c.clone()),
            (None, _) => Err(invalid(
                "cluster",
                "no cluster exists yet; create one with `pgquorum cluster create`",
            )),
            (Some(_), Some(_)) => Err(invalid(
                "cluster",
                format!(
                    "several clusters exist ({}); name one",
                    applied
                        .state
                        .clusters
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }

    async fn change_membership(
        &self,
        change: ChangeMembers<NodeId, CoordinatorNode>,
    ) -> Result<pb::MembershipReply> {
        let response = self
            .p
            .raft
            .change_membership(change, false)
            .await
            .map_err(|e| self.p.write_error(e))?;
        Ok(self.membership_reply(response.log_id.index))
    }
}

fn cluster_reply(c: &Cluster) -> pb::ClusterReply {
    pb::ClusterReply {
        cluster: Some(c.into()),
    }
}

fn checked_settings(settings: &std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    settings
        .iter()
        .map(|(k, v)| (k.trim().to_string(), v.clone()))
        .collect()
}

#[tonic::async_trait]
impl AdminService for AdminServiceImpl {
    async fn raft_status(
        &self,
        _request: Request<pb::RaftStatusRequest>,
    ) -> Result<Response<pb::RaftStatusReply>, Status> {
        let m = self.p.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let me = membership.get_node(&self.p.id).cloned().unwrap_or_default();
        let is_voter = membership.voter_ids().any(|v| v == self.p.id);
        let state = match m.state {
            ServerState::Leader => "leader",
            ServerState::Candidate => "candidate",
            ServerState::Follower if is_voter => "follower",
            ServerState::Follower | ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        let leader_addr = m
            .current_leader
            .and_then(|l| membership.get_node(&l))
            .map(|n| n.addr.clone())
            .unwrap_or_default();
        Ok(Response::new(pb::RaftStatusReply {
            id: self.p.id,
            addr: me.addr,
            region: me.region,
            state: state.to_string(),
            term: m.current_term,
            leader_id: m.current_leader,
            leader_addr,
            last_log_index: m.last_log_index.unwrap_or(0),
            last_applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
            purged_index: m.purged.map(|l| l.index).unwrap_or(0),
            members: self.members(m.replication.as_ref()),
            millis_since_quorum_ack: m.millis_since_quorum_ack,
            group: self.p.group.id().map(|g| g.to_string()).unwrap_or_default(),
            superseded: self.p.group.superseded().map(|s| s.why).unwrap_or_default(),
        }))
    }

    async fn force_new_group(
        &self,
        request: Request<pb::ForceNewGroupRequest>,
    ) -> Result<Response<pb::ForceNewGroupReply>, Status> {
        let actor = actor(&request, &request.get_ref().actor);
        let req = request.into_inner();
        let reason = req.reason.trim().to_string();
        if reason.is_empty() {
            return Err(invalid(
                "reason",
                "say why (kept in this coordinator's audit record and every cluster's history)",
            )
            .into());
        }
        let Some(previous_group) = self.p.group.id() else {
            return Err(Status::failed_precondition(format!(
                "coordinator {} has not joined a group; there is nothing to re-form",
                self.p.id
            )));
        };
        if let Some(s) = self.p.group.superseded() {
            return Err(Status::failed_precondition(format!(
                "coordinator {}'s group was already replaced ({}); re-add it to the new group instead",
                self.p.id, s.why
            )));
        }
        // One at a time: a second request must see the first one's record.
        let _one = self.reforming.lock().await;
        if self.p.group.pending_reform().map_err(Status::from)?.is_some() {
            return Err(Status::failed_precondition(
                "a force-new-group is already recorded here and is carried out as this coordinator restarts",
            ));
        }
        let (voters, me, last) = {
            let m = self.p.raft.metrics().borrow().clone();
            let membership = m.membership_config.membership();
            let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
            let last = m.last_log_index.unwrap_or(0);
            (voters, membership.get_node(&self.p.id).cloned(), last)
        };
        let answered = self.answering_voters(&previous_group).await;
        group::may_reform(self.p.id, last, &voters, &answered, req.accept_split_brain_risk)
            .map_err(Status::failed_precondition)?;
        let Some(node) = me else {
            return Err(Status::failed_precondition(format!(
                "coordinator {}'s address is not in its own membership",
                self.p.id
            )));
        };
        let at_ms = now_ms();
        let reform = Reform {
            group: previous_group.next(self.p.id, at_ms),
            previous_group,
            formed_by: self.p.id,
            node,
            previous_voters: voters.iter().copied().collect(),
            actor,
            reason,
            at_ms,
            last_log_index: None,
        };
        self.p.group.request_reform(&reform).await.map_err(Status::from)?;
        tracing::warn!(group = %reform.group, actor = %reform.actor, reason = %reform.reason,
            "force-new-group recorded; restarting to carry it out");
        // After the reply has left.
        let restart = self.restart.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            restart.notify_one();
        });
        Ok(Response::new(pb::ForceNewGroupReply {
            group: reform.group.to_string(),
            previous_group: reform.previous_group.to_string(),
            formed_by: reform.formed_by,
            previous_voters: reform.previous_voters,
            reachable_voters: answered.into_keys().collect(),
        }))
    }

    async fn remove_member(
        &self,
        request: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::ClusterReply>, Status> {
        let actor = actor(&request, &request.get_ref().actor);
        let req = request.into_inner();
        let member = req.node.trim().to_string();
        if member.is_empty() {
            return Err(invalid("node", "name the node to remove").into());
        }
        self.require_leader().await?;
        let cluster = self.resolve_cluster(&req.cluster)?;
        if !cluster.members.contains_key(&member) {
            return Err(Error::Command(crate::state::CommandError::UnknownMember(member)).into());
        }
        if let Err(why) = cluster.removable(&member) {
            return Err(Error::Command(crate::state::CommandError::NotRemovable {
                cluster: cluster.name,
                member,
                why,
            })
            .into());
        }
        // A member whose agent still reports would register again at its next
        // heartbeat: it must be stopped first (its host retired or lost). A held
        // member's heartbeats are refused before they count, and a new leader has
        // heard nobody yet: neither can tell a live agent from a dead one.
        let reports = self.reports.cluster(&cluster.name, std::time::Instant::now());
        let not_yet = |why: String| {
            Error::Command(crate::state::CommandError::NotRemovable {
                cluster: cluster.name.clone(),
                member: member.clone(),
                why,
            })
        };
        if cluster.held.contains(&member) {
            return Err(not_yet(
                "it is held since force-new-group, so whether its agent runs is unknown; readmit it or \
                 stop its agent, readmit, then remove"
                    .into(),
            )
            .into());
        }
        if let Some(why) = reports.not_listened_enough(cluster.policy.failure_timeout_ms) {
            return Err(not_yet(why).into());
        }
        if let Some(o) = crate::observe::health::fresh(&cluster, &reports, &member) {
            return Err(Error::Command(crate::state::CommandError::NotRemovable {
                cluster: cluster.name,
                member,
                why: format!(
                    "its agent reported {} ms ago; stop it (and its Postgres) first",
                    o.age.as_millis()
                ),
            })
            .into());
        }
        let command = Command::RemoveMember {
            cluster: cluster.name,
            member,
            actor,
            at_ms: now_ms(),
        };
        self.propose_for_cluster(command, "remove").await
    }

    async fn readmit_node(
        &self,
        request: Request<pb::ReadmitNodeRequest>,
    ) -> Result<Response<pb::ClusterReply>, Status> {
        let actor = actor(&request, &request.get_ref().actor);
        let req = request.into_inner();
        let member = req.node.trim().to_string();
        if member.is_empty() {
            return Err(invalid("node", "name the node to readmit").into());
        }
        let cluster = self.resolve_cluster(&req.cluster)?.name;
        let command = Command::Readmit {
            cluster,
            member,
            actor,
            at_ms: now_ms(),
        };
        self.propose_for_cluster(command, "readmit").await
    }

    async fn add_learner(
        &self,
        request: Request<pb::AddLearnerRequest>,
    ) -> Result<Response<pb::MembershipReply>, Status> {
        let req = request.into_inner();
        if req.id == 0 {
            return Err(invalid("id", "must be a positive integer").into());
        }
        check_host_port("addr", &req.addr).map_err(|(f, m)| invalid(&f, m))?;
        if !is_valid_name(&req.region) {
            return Err(invalid("region", format!("{:?} is not a region name", req.region)).into());
        }
        if self.voters().contains(&req.id) {
            return Err(invalid("id", format!("coordinator {} is already a voter", req.id)).into());
        }
        self.require_leader().await?;
        // openraft adds an address where nothing listens and reports it caught up:
        // the operator learns of the typo only when the group cannot reach a quorum.
        // Asked for a few seconds: a coordinator started a moment ago may not listen yet.
        let answer = async {
            let deadline = tokio::time::Instant::now() + ADD_PROBE_FOR;
            loop {
                if let Some(answer) = probe_any(&req.addr).await {
                    return Some(answer);
                }
                if tokio::time::Instant::now() >= deadline {
                    return None;
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        };
        let Some(answer) = answer.await else {
            return Err(Error::Membership(format!(
                "nothing answers as a coordinator at {} (is it started, without initial_members, \
                 listening there?); not added",
                req.addr
            ))
            .into());
        };
        if answer.id != req.id {
            return Err(invalid(
                "id",
                format!(
                    "the coordinator at {} is node {}, not {}; not added",
                    req.addr, answer.id, req.id
                ),
            )
            .into());
        }
        let node = CoordinatorNode {
            addr: req.addr,
            region: req.region,
        };
        // Blocking: returns once the learner has caught up, so a following promote does
        // not stall commits behind a far-behind new voter.
        let response = self
            .p
            .raft
            .add_learner(req.id, node, true)
            .await
            .map_err(|e| self.p.write_error(e))?;
        Ok(Response::new(self.membership_reply(response.log_id.index)))
    }

    async fn promote_voter(
        &self,
        request: Request<pb::PromoteVoterRequest>,
    ) -> Result<Response<pb::MembershipReply>, Status> {
        let id = request.into_inner().id;
        self.require_leader().await?;
        if self.voters().contains(&id) {
            return Err(invalid("id", format!("coordinator {id} is already a voter")).into());
        }
        if !self.learners().contains(&id) {
            return Err(invalid(
                "id",
                format!("coordinator {id} is not a learner; add it first with `pgquorum raft add`"),
            )
            .into());
        }
        Ok(Response::new(
            self.change_membership(ChangeMembers::AddVoterIds([id].into()))
                .await?,
        ))
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::MembershipReply>, Status> {
        let id = request.into_inner().id;
        self.require_leader().await?;
        let voters = self.voters();
        let change = if voters.contains(&id) {
            if voters.len() == 1 {
                return Err(invalid(
                    "id",
                    format!("coordinator {id} is the last voter; the group needs one"),
                )
                .into());
            }
            ChangeMembers::RemoveVoters([id].into())
        } else if self.learners().contains(&id) {
            ChangeMembers::RemoveNodes([id].into())
        } else {
            return Err(invalid("id", format!("coordinator {id} is not a member of the group")).into());
        };
        Ok(Response::new(self.change_membership(change).await?))
    }

    async fn create_cluster(
        &self,
        request: Request<pb::CreateClusterRequest>,
    ) -> Result<Response<pb::ClusterReply>, Status> {
        let actor = actor(&request, &request.get_ref().actor);
        let req = request.into_inner();
        let command = Command::CreateCluster {
            name: req.name,
            settings: checked_settings(&req.settings),
            actor,
            at_ms: now_ms(),
        };
        self.propose_for_cluster(command, "create").await
    }

    async fn delete_cluster(
        &self,
        request: Request<pb::DeleteClusterRequest>,
    ) -> Result<Response<pb::ClusterReply>, Status> {
        let actor = actor(&request, &request.get_ref().actor);
        let req = request.into_inner();
        if req.name.trim().is_empty() {
            return Err(invalid("name", "name the cluster to delete").into());
        }
        self.require_leader().await?;
        let cluster = self.resolve_cluster(req.name.trim())?;
        // An agent that still reports would find its cluster gone mid-flight: every
        // one must be stopped first. A new leader has heard nobody yet.
        let reports = self.reports.cluster(&cluster.name, std::time::Instant::now());
        let refuse = |why: String| -> Status {
            Error::Command(crate::state::CommandError::NotDeletable {
                cluster: cluster.name.clone(),
                why,
            })
            .into()
        };
        if let Some(why) = reports.not_listened_enough(cluster.policy.failure_timeout_ms) {
            return Err(refuse(why));
        }
        let reporting: Vec<&String> = cluster
            .members
            .keys()
            .filter(|m| crate::observe::health::fresh(&cluster, &reports, m).is_some())
            .collect();
        if !reporting.is_empty() {
            return Err(refuse(format!(
                "the agents of {} still report; stop them (and their Postgres) first",
                reporting
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let command = Command::DeleteCluster {
            name: cluster.name.clone(),
            actor,
            at_ms: now_ms(),
        };
        self.propose_for_cluster(command, "delete").await
    }

    async fn list_clusters(
        &self,
        request: Request<pb::ListClustersRequest>,
    ) -> Result<Response<pb::ListClustersReply>, Status> {
        let consistency = request.into_inner().consistency;
        let clusters = self
            .read(consistency, |s| Ok(s.clusters.values().map(Into::into).collect()))
            .await?;
        Ok(Response::new(pb::ListClustersReply { clusters }))
    }

    async fn get_cluster(
        &self,
        request: Request<pb::GetClusterRequest>,
    ) -> Result<Response<pb::ClusterReply>, Status> {
        let req = request.into_inner();
        let reply = self
            .read(req.consistency, |s| Ok(cluster_reply(s.cluster(&req.name)?)))
            .await?;
        Ok(Response::new(reply))
    }

    async fn get_policy(
        &self,
        request: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::PolicyReply>, Status> {
        let req = request.into_inner();
        let policy = self
            .read(req.consistency, |s| Ok((&s.cluster(&req.cluster)?.policy).into()))
            .await?;
        Ok(Response::new(pb::PolicyReply {
            cluster: req.cluster,
            policy: Some(policy),
        }))
    }

    async fn set_policy(
        &self,
        request: Request<pb::SetPolicyRequest>,
    ) -> Result<Response<pb::PolicyReply>, Status> {
        let actor = actor(&request, &request.get_ref().actor);
        let req = request.into_inner();
        if req.settings.is_empty() {
            return Err(invalid("settings", "nothing to change; give at least one field=value").into());
        }
        let command = Command::SetPolicy {
            cluster: req.cluster.clone(),
            settings: checked_settings(&req.settings),
            actor,
            at_ms: now_ms(),
        };
        match self.p.propose(command).await? {
            CommandOutput::Policy(p) => Ok(Response::new(pb::PolicyReply {
                cluster: req.cluster,
                policy: Some((&*p).into()),
            })),
            other => Err(Error::Raft(format!("unexpected result of set policy: {other:?}")).into()),
        }
    }

    async fn status(&self, request: Request<pb::StatusRequest>) -> Result<Response<pb::StatusReply>, Status> {
        // Reports live in the leader's memory only; a follower's view would be empty.
        self.require_leader().await?;
        self.p
            .ready_to_read(pb::ReadConsistency::Linearizable as i32)
            .await?;
        let cluster = self.resolve_cluster(&request.get_ref().cluster)?;
        let reports = self.reports.cluster(&cluster.name, std::time::Instant::now());
        let statuses = node_statuses(&cluster, &reports);
        let lease_left = reports.lease_left();
        let failsafe = cluster.primary.as_ref().is_some_and(|p| {
            matches!(
                crate::failover::decide::promised_to(&reports, p),
                crate::observe::OwnLease::EndsIn(_)
            )
        });
        let raft = self
            .raft_status(Request::new(pb::RaftStatusRequest {}))
            .await?
            .into_inner();
        let nodes = statuses
            .into_iter()
            .map(|s| {
                let m = &cluster.members[&s.name];
                let r = s.report.unwrap_or_default();
                let drained = cluster.drained.contains(&s.name);
                let held = cluster.held.contains(&s.name);
                pb::NodeStatus {
                    name: s.name,
                    role: s.role,
                    health: s.health.into(),
                    sync_state: s.sync_state.into(),
                    timeline: s.timeline,
                    lag_ms: s.lag_ms,
                    lag_bytes: s.lag_bytes,
                    lag_source: s.lag_source.to_proto().into(),
                    workload: m.workload.clone(),
                    region: m.region.clone(),
                    heartbeat_age_ms: s.heartbeat_age_ms,
                    current_lsn: r.current_lsn,
                    receive_lsn: r.receive_lsn,
                    replay_lsn: r.replay_lsn,
                    host: m.host.clone(),
                    port: m.port.into(),
                    replay_paused: r.replay_paused,
                    error: r.error,
                    in_sync_set: s.in_sync_set,
                    drained,
                    held,
                    lease_left_ms: lease_left.get(&m.name).map(|d| d.as_millis() as u64),
                    maintenance: cluster.in_maintenance(&m.name),
                    reinit_pending: cluster.pending(&m.name, Order::Reinit) > 0,
                    restart_requested: cluster.pending(&m.name, Order::Restart) > 0,
                    reload_requested: cluster.pending(&m.name, Order::Reload) > 0,
                    pending_restart: !r.pending_restart.is_empty(),
                    pending_restart_parameters: r.pending_restart.clone(),
                    parameters_version: r.parameters_version,
                    parameter_errors: r.parameter_errors.clone(),
                }
            })
            .collect();
        Ok(Response::new(pb::StatusReply {
            cluster: cluster.name.clone(),
            epoch: cluster.epoch,
            primary: cluster.primary.clone().unwrap_or_default(),
            maintenance: cluster.policy.maintenance,
            sync_set: cluster.sync_set.clone(),
            raft: Some(raft),
            nodes,
            sync_mode: cluster.policy.sync_mode.as_str().into(),
            failover: cluster.failover.as_ref().map(Into::into),
            failsafe,
            scheduled_switchover: cluster.scheduled_switchover.as_ref().map(Into::into),
        }))
    }

    async fn alerts(&self, request: Request<pb::AlertsRequest>) -> Result<Response<pb::AlertsReply>, Status> {
        self.require_leader().await?;
        // A leader that lost its quorum stays leader in openraft; its view is then
        // frozen and nothing it decides can be committed: the first thing to say.
        // openraft gives a round up when one follower's answer is slow (an fsync
        // stall): rounds are retried until QUORUM_CHECK, and only then is it said.
        let deadline = tokio::time::Instant::now() + QUORUM_CHECK;
        let no_quorum = loop {
            let round = tokio::time::timeout_at(
                deadline,
                self.p.ready_to_read(pb::ReadConsistency::Linearizable as i32),
            )
            .await;
            let why = match round {
                Ok(Ok(())) => break None,
                Ok(Err(e @ Error::NotLeader { .. })) => return Err(e.into()),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!(
                    "this coordinator leads but no quorum of the coordinator group answered within {} ms; \
                     nothing can be committed (no failover, no switchover) until a majority answers",
                    QUORUM_CHECK.as_millis()
                ),
            };
            if tokio::time::Instant::now() + std::time::Duration::from_millis(50) >= deadline {
                break Some(why);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        let cluster = self.resolve_cluster(&request.get_ref().cluster)?;
        let reports = self.reports.cluster(&cluster.name, std::time::Instant::now());
        let statuses = node_statuses(&cluster, &reports);
        let old = cluster
            .failover
            .as_ref()
            .map(|f| f.old_primary.clone())
            .or_else(|| cluster.primary.clone());
        let expired = old.is_some_and(|o| lease_expired(&cluster, &reports, &o));
        let stuck = match decide(&cluster, &reports, expired) {
            Step::Stuck(why) => Some(why),
            _ => None,
        };
        let alerts = no_quorum
            .map(alerts::no_quorum)
            .into_iter()
            .chain(alerts(&cluster, &statuses, stuck))
            .map(|a| pb::Alert {
                severity: a.severity.as_str().into(),
                node: a.node,
                message: a.message,
            })
            .collect();
        Ok(Response::new(pb::AlertsReply {
            cluster: cluster.name,
            alerts,
        }))
    }

    async fn failover(
        &self,
        request: Request<pb::FailoverRequest>,
    ) -> Result<Response<pb::FailoverReply>, Status> {
        let actor = actor(&request, &request.get_ref().actor);
        let req = request.into_inner();
        let to = req.to.trim().to_string();
        let request = manual::Request {
            to: Some(to),
            accept_data_loss: req.accept_data_loss,
            kind: manual::Kind::Manual,
            actor,
        };
        let reply = self.hand_over(&req.cluster, request).await?;
        Ok(Response::new(reply))
    }

    async fn switchover(
        &self,
        request: Request<pb::SwitchoverRequest>,
    ) -> Result<Response<pb::FailoverReply>, Status> {
        let actor = actor(&request, &request.get_ref().actor);
        let req = request.into_inner();
        let to = Some(req.to.trim().to_string()).filter(|t| !t.is_empty());
        if req.at_ms != 0 && req.at_ms <= now_ms() {
            return Err(invalid("at_ms", format!("{} ms (unix) is not in the future", req.at_ms)).into());
        }
        if req.at_ms > 0 {
            // Started by the leader at its time, with the checks of that moment.
            let cluster = self.resolve_cluster(&req.cluster)?.name;
            let command = Command::ScheduleSwitchover {
                cluster: cluster.clone(),
                due_ms: req.at_ms,
                to,
                actor,
                at_ms: now_ms(),
            };
            self.p.propose(command).await?;
            return Ok(Response::new(self.failover_reply(&cluster)?));
        }
        let request = manual::Request {
            to,
            accept_data_loss: false,
            kind: manual::Kind::Switchover,
            actor,
        };
        let reply = self.hand_over(&req.cluster, request).await?;
        Ok(Response::new(reply))
    }

    async fn cancel_switchover(
        &self,
        request: Request<pb::CancelSwitchoverRequest>,
    ) -> Result<Response<pb::ClusterReply>, Status> {
        let actor = actor(&request, &request.get_ref().actor);
        let req = request.into_inner();
        let cluster = self.resolve_cluster(&req.cluster)?.name;
        let command = Command::CancelSwitchover {
            cluster,
            why: "cancelled by an operator".into(),
            actor,
            at_ms: now_ms(),
        };
        self.propose_for_cluster(command, "cancel").await
    }

    async fn order_node(
        &self,
        request: Request<pb::OrderNodeRequest>,
    ) -> Result<Response<pb::ClusterReply>, Status> {
        let actor = actor(&request, &request.get_ref().actor);
        let req = request.into_inner();
        let member = req.node.trim().to_string();
        if member.is_empty() {
            return Err(invalid("node", "name the node").into());
        }
        let order = match req.order() {
            pb::NodeOrder::Reinit => Order::Reinit,
            pb::NodeOrder::Restart => Order::Restart,
            pb::NodeOrder::Reload => Order::Reload,
            pb::NodeOrder::Unspecified => {
                return Err(invalid("order", "say what to do: reinit, restart or reload").into())
            }
        };
        let _serial = self.out_of_service.lock().await;
        let cluster = self.resolve_cluster(&req.cluster)?;
        if order == Order::Reinit {
            // A sync standby being rebuilt stops streaming: in strict mode the
            // primary's commits would wait for it unless another standby can replace it.
            self.require_leader().await?;
            let reports = self.reports.cluster(&cluster.name, std::time::Instant::now());
            if let Some(why) = crate::sync::plan::leaving_stalls(&cluster, &reports, &member) {
                return Err(Error::Command(crate::state::CommandError::NoOrder {
                    cluster: cluster.name,
                    member,
                    order: order.as_str().into(),
                    why,
                })
                .into());
            }
        }
        let command = Command::AskNode {
            cluster: cluster.name,
            member,
            order,
            actor,
            at_ms: now_ms(),
        };
        match self.p.propose(command).await? {
            CommandOutput::Cluster(c) => Ok(Response::new(cluster_reply(&c))),
            other => Err(Error::Raft(format!("unexpected result of {}: {other:?}", order.as_str())).into()),
        }
    }

    async fn set_parameters(
        &self,
        request: Request<pb::SetParametersRequest>,
    ) -> Result<Response<pb::ClusterReply>, Status> {
        let actor = actor(&request, &request.get_ref().actor);
        let req = request.into_inner();
        let cluster = self.resolve_cluster(&req.cluster)?.name;
        let command = Command::SetParameters {
            cluster,
            set: req.set.into_iter().collect(),
            unset: req.unset,
            actor,
            at_ms: now_ms(),
        };
        self.propose_for_cluster(command, "config set").await
    }

    async fn set_maintenance(
        &self,
        request: Request<pb::MaintenanceRequest>,
    ) -> Result<Response<pb::ClusterReply>, Status> {
        let actor = actor(&request, &request.get_ref().actor);
        let req = request.into_inner();
        let member = req.node.trim().to_string();
        if member.is_empty() {
            return Err(invalid("node", "name the node").into());
        }
        let _serial = self.out_of_service.lock().await;
        let cluster = self.resolve_cluster(&req.cluster)?;
        if req.on {
            // Only the leader holds the reports the stall check needs.
            self.require_leader().await?;
            let reports = self.reports.cluster(&cluster.name, std::time::Instant::now());
            if let Some(why) = crate::sync::plan::leaving_stalls(&cluster, &reports, &member) {
                return Err(Error::Command(crate::state::CommandError::NoMaintenance {
                    cluster: cluster.name,
                    member,
                    why,
                })
                .into());
            }
        }
        let command = Command::SetMaintenance {
            cluster: cluster.name,
            member,
            on: req.on,
            actor,
            at_ms: now_ms(),
        };
        self.propose_for_cluster(command, "maintenance").await
    }

    async fn drain(&self, request: Request<pb::DrainRequest>) -> Result<Response<pb::DrainReply>, Status> {
        let actor = actor(&request, &request.get_ref().actor);
        let req = request.into_inner();
        let node = req.node.trim().to_string();
        if node.is_empty() {
            return Err(invalid("node", "name the node to drain").into());
        }
        let cluster = self.resolve_cluster(&req.cluster)?.name;
        let command = Command::SetDrain {
            cluster: cluster.clone(),
            member: node,
            drained: req.drained,
            actor,
            at_ms: now_ms(),
        };
        match self.p.propose(command).await? {
            CommandOutput::Cluster(c) => Ok(Response::new(pb::DrainReply {
                cluster,
                endpoint_version: c.endpoint_version,
                drained: c.drained.iter().cloned().collect(),
            })),
            other => Err(Error::Raft(format!("unexpected result of drain: {other:?}")).into()),
        }
    }
}
