//! The replicated state machine's contents and the pure function that changes them.
//!
//! [`ClusterState::apply`] is the only way state changes. It does no I/O, reads no
//! clock and never panics on bad input: a command that cannot be applied returns a
//! [`CommandError`] that every coordinator computes identically. The Raft storage layer
//! ([`crate::raft::state_machine`]) feeds it committed entries and snapshots it.

pub mod cluster;
pub mod command;
pub mod parameters;
pub mod policy;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use cluster::{
    Cluster, FailoverRecord, HistoryEvent, LeaseSettling, Member, Order, ReplicaRoute, ScheduledSwitchover,
    SCHEDULED,
};
pub use command::{Command, CommandError, CommandOutput, CommandResult};
pub use policy::{Policy, PolicyError, SyncMode};

/// How far a re-formed group moves every cluster's epoch and endpoint map version
/// (see [`Command::RecordGroup`]): more failovers than an old group will ever make.
pub const GROUP_EPOCH_JUMP: u64 = 1 << 20;

/// Every database cluster the coordinator group guards, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub clusters: BTreeMap<String, Cluster>,
    /// The coordinator group this state was last re-formed into (see
    /// `raft::group`); empty: the founding group.
    #[serde(default)]
    pub group: String,
    /// Every group that `group` replaced, oldest first: a refusal names them, so a
    /// returning coordinator of any of them learns it was replaced, and nobody else.
    #[serde(default)]
    pub replaced: Vec<String>,
}

fn settings_iter(settings: &BTreeMap<String, String>) -> impl Iterator<Item = (&str, &str)> {
    settings.iter().map(|(k, v)| (k.as_str(), v.as_str()))
}

impl ClusterState {
    pub fn cluster(&self, name: &str) -> Result<&Cluster, CommandError> {
        self.clusters
            .get(name)
            .ok_or_else(|| CommandError::UnknownCluster(name.to_string()))
    }

    /// Checks a command against the current state without changing it. The gRPC layer
    /// calls this before proposing, so most bad requests are refused without a Raft
    /// round trip; `apply` checks again, because the state may move in between.
    pub fn check(&self, command: &Command) -> Result<(), CommandError> {
        self.clone().apply(command, 0).map(|_| ())
    }

    /// Applies one committed command. `log_index` is the Raft index of its entry.
    pub fn apply(&mut self, command: &Command, log_index: u64) -> CommandResult {
        match command {
            Command::CreateCluster {
                name,
                settings,
                actor,
                at_ms,
            } => {
                if !policy::is_valid_name(name) {
                    return Err(CommandError::InvalidName(name.clone()));
                }
                if self.clusters.contains_key(name) {
                    return Err(CommandError::ClusterExists(name.clone()));
                }
                let policy = Policy::default()
                    .with_settings(settings_iter(settings))
                    .map_err(CommandError::Policy)?;
                let mut cluster = Cluster::new(name.clone(), policy, *at_ms);
                cluster.record(HistoryEvent {
                    at_ms: *at_ms,
                    epoch: 0,
                    kind: "cluster_created".into(),
                    detail: describe_settings(settings),
                    actor: actor.clone(),
                    log_index,
                    duration_ms: None,
                });
                self.clusters.insert(name.clone(), cluster.clone());
                Ok(CommandOutput::Cluster(Box::new(cluster)))
            }
            Command::RecordStonith {
                cluster,
                node,
                epoch,
                outcome,
                at_ms,
            } => {
                let c = self.cluster_mut(cluster)?;
                c.record(HistoryEvent {
                    at_ms: *at_ms,
                    epoch: 0,
                    kind: "stonith".into(),
                    detail: format!("STONITH hook for {node} (failover to epoch {epoch}): {outcome}"),
                    actor: "coordinator".into(),
                    log_index,
                    duration_ms: None,
                });
                Ok(CommandOutput::None)
            }
            Command::DeleteCluster { name, actor, at_ms } => {
                let gone = self
                    .clusters
                    .remove(name)
                    .ok_or_else(|| CommandError::UnknownCluster(name.clone()))?;
                tracing::warn!(cluster = %name, %actor, at_ms, log_index, "cluster deleted");
                Ok(CommandOutput::Cluster(Box::new(gone)))
            }
            Command::SetPolicy {
                cluster,
                settings,
                actor,
                at_ms,
            } => {
                let c = self
                    .clusters
                    .get_mut(cluster)
                    .ok_or_else(|| CommandError::UnknownCluster(cluster.clone()))?;
                let next = c
                    .policy
                    .with_settings(settings_iter(settings))
                    .map_err(CommandError::Policy)?;
                let before = c.policy.to_settings();
                // Leases granted under a longer lease_ms may outlive the lowering.
                let longest = c
                    .lease_ms_settling
                    .map_or(0, |s| s.lease_ms)
                    .max(c.policy.lease_ms);
                if next.lease_ms != c.policy.lease_ms {
                    c.lease_ms_settling = (next.lease_ms < longest).then_some(LeaseSettling {
                        lease_ms: longest,
                        since_log_index: log_index,
                    });
                }
                let changes: Vec<String> = next
                    .to_settings()
                    .into_iter()
                    .filter(|(k, v)| before.get(k) != Some(v))
                    .map(|(k, v)| format!("{k}: {} -> {v}", before.get(&k).map(String::as_str).unwrap_or("")))
                    .collect();
                c.policy = next;
                if !changes.is_empty() {
                    c.record(HistoryEvent {
                        at_ms: *at_ms,
                        epoch: 0,
                        kind: "policy_changed".into(),
                        detail: changes.join(", "),
                        actor: actor.clone(),
                        log_index,
                        duration_ms: None,
                    });
                }
                Ok(CommandOutput::Policy(Box::new(c.policy.clone())))
            }
            Command::RegisterMember {
                cluster,
                member,
                at_ms,
            } => {
                check_member(member)?;
                let c = self.cluster_mut(cluster)?;
                let kind = match c.members.get(&member.name) {
                    Some(m) if m == member => return Ok(CommandOutput::None),
                    Some(_) => "member_changed",
                    None => "member_registered",
                };
                c.removed.retain(|r| r != &member.name);
                c.members.insert(member.name.clone(), member.clone());
                c.endpoint_version += 1;
                c.record(HistoryEvent {
                    at_ms: *at_ms,
                    epoch: 0,
                    kind: kind.into(),
                    detail: format!(
                        "{} at {}:{} ({}, region {}, priority {}{}{})",
                        member.name,
                        member.host,
                        member.port,
                        member.workload,
                        member.region,
                        member.priority,
                        if member.nofailover { ", nofailover" } else { "" },
                        if member.sync_eligible {
                            ", sync eligible"
                        } else {
                            ""
                        },
                    ),
                    actor: format!("agent {}", member.name),
                    log_index,
                    duration_ms: None,
                });
                Ok(CommandOutput::None)
            }
            Command::ClaimBootstrap { cluster, node, at_ms } => {
                let c = self.cluster_mut(cluster)?;
                if !c.members.contains_key(node) {
                    return Err(CommandError::UnknownMember(node.clone()));
                }
                // Once per cluster: at epoch 0. (Not "while it has no primary": it has
                // none during every failover, and a node whose data was lost would then
                // create an empty database and become its primary.)
                if c.epoch > 0 || c.system_identifier.is_some() {
                    return Err(CommandError::AlreadyBootstrapped {
                        cluster: cluster.clone(),
                        primary: c.primary.clone().unwrap_or_else(|| "none right now".into()),
                        epoch: c.epoch,
                    });
                }
                c.primary = Some(node.clone());
                c.primary_roster = Some(c.roster_without(node));
                c.epoch += 1;
                c.endpoint_version += 1;
                c.record(HistoryEvent {
                    at_ms: *at_ms,
                    epoch: 0,
                    kind: "bootstrap".into(),
                    detail: format!("{node} initializes the cluster as its first primary"),
                    actor: format!("agent {node}"),
                    log_index,
                    duration_ms: None,
                });
                Ok(CommandOutput::None)
            }
            Command::SettleLease {
                cluster,
                since_log_index,
                at_ms,
            } => {
                let c = self.cluster_mut(cluster)?;
                let Some(settling) = c
                    .lease_ms_settling
                    .filter(|s| s.since_log_index == *since_log_index)
                else {
                    return Ok(CommandOutput::None);
                };
                let lease_ms = settling.lease_ms;
                c.lease_ms_settling = None;
                c.record(HistoryEvent {
                    at_ms: *at_ms,
                    epoch: 0,
                    kind: "lease_settled".into(),
                    detail: format!(
                        "every lease of the former lease_ms {lease_ms} has ended; lease_ms {} alone counts",
                        c.policy.lease_ms
                    ),
                    actor: "coordinator".into(),
                    log_index,
                    duration_ms: None,
                });
                Ok(CommandOutput::None)
            }
            Command::RecordSystemIdentifier {
                cluster,
                node,
                system_identifier,
                at_ms,
            } => {
                let c = self.cluster_mut(cluster)?;
                match c.system_identifier {
                    Some(id) if id == *system_identifier => return Ok(CommandOutput::None),
                    Some(recorded) => {
                        return Err(CommandError::ForeignSystemIdentifier {
                            cluster: cluster.clone(),
                            node: node.clone(),
                            recorded,
                            reported: *system_identifier,
                        })
                    }
                    None => {}
                }
                if c.primary.as_ref() != Some(node) || *system_identifier == 0 {
                    return Err(CommandError::InvalidMember {
                        name: node.clone(),
                        message: "only the primary's system identifier is the cluster's".into(),
                    });
                }
                c.system_identifier = Some(*system_identifier);
                c.record(HistoryEvent {
                    at_ms: *at_ms,
                    epoch: 0,
                    kind: "system_identifier".into(),
                    detail: format!("{node}'s database {system_identifier} is the cluster's"),
                    actor: format!("agent {node}"),
                    log_index,
                    duration_ms: None,
                });
                Ok(CommandOutput::None)
            }
            Command::SetSyncSet {
                cluster,
                expected,
                sync_set,
                reason,
                at_ms,
            } => {
                let c = self.cluster_mut(cluster)?;
                if &c.sync_set != expected {
                    return Err(CommandError::SyncSetChanged {
                        actual: c.sync_set.clone(),
                    });
                }
                if let Some(unknown) = sync_set.iter().find(|n| !c.members.contains_key(*n)) {
                    return Err(CommandError::UnknownMember(unknown.clone()));
                }
                if c.primary.as_ref().is_some_and(|p| sync_set.contains(p)) {
                    return Err(CommandError::InvalidMember {
                        name: c.primary.clone().unwrap_or_default(),
                        message: "the primary cannot be its own synchronous standby".into(),
                    });
                }
                let before = c.sync_set.clone();
                c.sync_set = sync_set.clone();
                c.record(HistoryEvent {
                    at_ms: *at_ms,
                    epoch: 0,
                    kind: "sync_set_changed".into(),
                    detail: format!("[{}] -> [{}]: {reason}", before.join(", "), sync_set.join(", ")),
                    actor: "coordinator".into(),
                    log_index,
                    duration_ms: None,
                });
                Ok(CommandOutput::None)
            }
            Command::Barrier => Ok(CommandOutput::None),
            Command::StartFailover { .. } => self.start_failover(command, log_index),
            Command::PublishRoutes { cluster, routes } => {
                let c = self.cluster_mut(cluster)?;
                if let Some(unknown) = routes.keys().find(|n| !c.members.contains_key(*n)) {
                    return Err(CommandError::UnknownMember(unknown.clone()));
                }
                c.replica_routes = routes.clone();
                c.endpoint_version += 1;
                Ok(CommandOutput::None)
            }
            Command::OverrideCandidate {
                cluster,
                to_epoch,
                candidate,
                actor,
                at_ms,
            } => {
                let c = self.member_cluster_mut(cluster, candidate)?;
                out_of_service(c, candidate)?;
                let f = match &mut c.failover {
                    Some(f) if f.to_epoch == *to_epoch && f.step == "started" && f.old_primary != *candidate => f,
                    other => {
                        return Err(CommandError::FailoverStep(format!(
                            "no failover to epoch {to_epoch} waiting for a candidate other than {candidate} (now: {})",
                            other
                                .as_ref()
                                .map(|f| format!("step {} to epoch {}, old primary {}", f.step, f.to_epoch, f.old_primary))
                                .unwrap_or_else(|| "no failover in flight".into())
                        )))
                    }
                };
                f.candidate = candidate.clone();
                f.accept_data_loss = true;
                c.record(HistoryEvent {
                    at_ms: *at_ms,
                    epoch: 0,
                    kind: "candidate_overridden".into(),
                    detail: format!("operator chose {candidate}, accepting data loss"),
                    actor: actor.clone(),
                    log_index,
                    duration_ms: None,
                });
                Ok(CommandOutput::None)
            }
            Command::AbandonCandidate {
                cluster,
                to_epoch,
                candidate,
                reason,
                at_ms,
            } => {
                let c = self.cluster_mut(cluster)?;
                let f = match &mut c.failover {
                    Some(f)
                        if f.to_epoch == *to_epoch
                            && f.step == "candidate_chosen"
                            && f.candidate == *candidate =>
                    {
                        f
                    }
                    other => {
                        return Err(CommandError::FailoverStep(format!(
                            "no candidate {candidate:?} chosen for epoch {to_epoch} (now: {})",
                            other
                                .as_ref()
                                .map(|f| format!(
                                    "step {} to epoch {}, candidate {:?}",
                                    f.step, f.to_epoch, f.candidate
                                ))
                                .unwrap_or_else(|| "no failover in flight".into())
                        )))
                    }
                };
                f.step = "started".into();
                f.from_epoch = *to_epoch;
                f.to_epoch = to_epoch + 1;
                f.old_primary = candidate.clone();
                f.candidate = String::new();
                f.reason = format!("candidate {candidate} lost before its promotion was published: {reason}");
                f.fenced_by = String::new();
                f.fenced_at_ms = 0;
                f.chosen_at_ms = 0;
                f.candidate_lsn = String::new();
                f.accept_data_loss = false;
                c.epoch = to_epoch + 1;
                c.endpoint_version += 1;
                c.record(HistoryEvent {
                    at_ms: *at_ms,
                    epoch: 0,
                    kind: "candidate_abandoned".into(),
                    detail: format!(
                        "{candidate} (epoch {to_epoch}) -> epoch {}: {reason}",
                        to_epoch + 1
                    ),
                    actor: "coordinator".into(),
                    log_index,
                    duration_ms: None,
                });
                Ok(CommandOutput::None)
            }
            Command::RecordGroup {
                group,
                previous,
                formed_by,
                reason,
                actor,
                at_ms,
            } => {
                if &self.group == group {
                    return Ok(CommandOutput::None);
                }
                self.group = group.clone();
                if !previous.is_empty() && !self.replaced.contains(previous) {
                    self.replaced.push(previous.clone());
                }
                for c in self.clusters.values_mut() {
                    // Above anything the old group can have reached: agents and routers
                    // that heard its last leader (further along than this survivor)
                    // take the new group's epochs and maps as the newer ones, and the
                    // old group's, should it come back, as stale.
                    // A cluster never bootstrapped stays at 0, bootstrappable.
                    if c.epoch > 0 {
                        c.epoch += GROUP_EPOCH_JUMP;
                    }
                    if let Some(f) = &mut c.failover {
                        f.from_epoch += GROUP_EPOCH_JUMP;
                        f.to_epoch += GROUP_EPOCH_JUMP;
                    }
                    c.endpoint_version += GROUP_EPOCH_JUMP;
                    c.held = c.members.keys().cloned().collect();
                    let held = c.held.iter().cloned().collect::<Vec<_>>().join(", ");
                    c.record(HistoryEvent {
                        at_ms: *at_ms,
                        epoch: 0,
                        kind: "group_reformed".into(),
                        detail: format!(
                            "coordinator group re-formed as {group} by force-new-group on coordinator \
                             {formed_by} ({reason}); held until readmitted: {held}"
                        ),
                        actor: actor.clone(),
                        log_index,
                        duration_ms: None,
                    });
                }
                Ok(CommandOutput::None)
            }
            Command::AckRoster {
                cluster,
                epoch,
                primary,
                roster,
            } => {
                let c = self.cluster_mut(cluster)?;
                if c.epoch != *epoch || c.primary.as_ref() != Some(primary) {
                    return Err(CommandError::FailoverStep(format!(
                        "{primary} is not the primary of epoch {epoch}"
                    )));
                }
                let members: Vec<String> = roster
                    .iter()
                    .filter(|m| *m != primary && c.members.contains_key(*m))
                    .cloned()
                    .collect();
                c.primary_roster
                    .get_or_insert_with(Default::default)
                    .extend(members);
                Ok(CommandOutput::None)
            }
            Command::RemoveMember {
                cluster,
                member,
                actor,
                at_ms,
            } => {
                let c = self.member_cluster_mut(cluster, member)?;
                c.removable(member).map_err(|why| CommandError::NotRemovable {
                    cluster: cluster.clone(),
                    member: member.clone(),
                    why,
                })?;
                let m = c.members.remove(member).expect("member_cluster_mut checked it");
                c.drained.remove(member);
                c.held.remove(member);
                c.maintenance.remove(member);
                c.orders.remove(member);
                c.replica_routes.remove(member);
                if let Some(roster) = c.primary_roster.as_mut() {
                    roster.remove(member);
                }
                c.removed.retain(|r| r != member);
                c.removed.push(member.clone());
                let excess = c.removed.len().saturating_sub(cluster::REMOVED_KEPT);
                c.removed.drain(..excess);
                c.endpoint_version += 1;
                c.record(HistoryEvent {
                    at_ms: *at_ms,
                    epoch: 0,
                    kind: "member_removed".into(),
                    detail: format!(
                        "{member} at {}:{} removed; its replication slot is dropped",
                        m.host, m.port
                    ),
                    actor: actor.clone(),
                    log_index,
                    duration_ms: None,
                });
                Ok(CommandOutput::Cluster(Box::new(c.clone())))
            }
            Command::Readmit {
                cluster,
                member,
                actor,
                at_ms,
            } => {
                let c = self.member_cluster_mut(cluster, member)?;
                if !c.held.remove(member) {
                    return Err(CommandError::NotHeld {
                        cluster: cluster.clone(),
                        member: member.clone(),
                    });
                }
                c.record(HistoryEvent {
                    at_ms: *at_ms,
                    epoch: 0,
                    kind: "readmitted".into(),
                    detail: format!("{member} readmitted after the coordinator group was re-formed"),
                    actor: actor.clone(),
                    log_index,
                    duration_ms: None,
                });
                Ok(CommandOutput::Cluster(Box::new(c.clone())))
            }
            Command::SetDrain {
                cluster,
                member,
                drained,
                actor,
                at_ms,
            } => {
                let c = self.member_cluster_mut(cluster, member)?;
                let changed = if *drained {
                    c.drained.insert(member.clone())
                } else {
                    c.drained.remove(member)
                };
                c.endpoint_version += 1;
                if changed {
                    c.record(HistoryEvent {
                        at_ms: *at_ms,
                        epoch: 0,
                        kind: if *drained { "drained" } else { "undrained" }.into(),
                        detail: format!(
                            "{member} {} read routing",
                            if *drained { "taken out of" } else { "back in" }
                        ),
                        actor: actor.clone(),
                        log_index,
                        duration_ms: None,
                    });
                }
                Ok(CommandOutput::Cluster(Box::new(c.clone())))
            }
            Command::SetMaintenance {
                cluster,
                member,
                on,
                actor,
                at_ms,
            } => self.set_maintenance(cluster, member, *on, actor, *at_ms, log_index),
            Command::ScheduleSwitchover {
                cluster,
                due_ms,
                to,
                actor,
                at_ms,
            } => self.schedule_switchover(cluster, *due_ms, to.as_deref(), actor, *at_ms, log_index),
            Command::CancelSwitchover {
                cluster,
                why,
                actor,
                at_ms,
            } => self.cancel_switchover(cluster, why, actor, *at_ms, log_index),
            Command::SetParameters {
                cluster,
                set,
                unset,
                actor,
                at_ms,
            } => self.set_parameters(cluster, set, unset, actor, *at_ms, log_index),
            Command::AskNode {
                cluster,
                member,
                order,
                actor,
                at_ms,
            } => self.ask_node(cluster, member, *order, actor, *at_ms, log_index),
            Command::NodeDone {
                cluster,
                member,
                order,
                token,
                at_ms,
            } => self.node_done(cluster, member, *order, *token, *at_ms, log_index),
            Command::ChooseCandidate {
                cluster,
                to_epoch,
                candidate,
                lsn,
                fenced_by,
                sync_set,
                at_ms,
            } => {
                let c = self.cluster_mut(cluster)?;
                out_of_service(c, candidate)?;
                let f = match &mut c.failover {
                    Some(f) if f.to_epoch == *to_epoch && f.step == "started" => f,
                    other => {
                        return Err(CommandError::FailoverStep(format!(
                            "no failover to epoch {to_epoch} waiting for a candidate ({:?})",
                            other.as_ref().map(|f| (&f.step, f.to_epoch))
                        )))
                    }
                };
                if !c.members.contains_key(candidate) || candidate == &f.old_primary {
                    return Err(CommandError::UnknownMember(candidate.clone()));
                }
                if let Some(bad) = sync_set
                    .iter()
                    .find(|s| !c.members.contains_key(*s) || *s == candidate)
                {
                    return Err(CommandError::UnknownMember(bad.clone()));
                }
                f.step = "candidate_chosen".into();
                f.candidate = candidate.clone();
                f.candidate_lsn = lsn.clone();
                f.fenced_by = fenced_by.clone();
                f.fenced_at_ms = *at_ms;
                f.chosen_at_ms = *at_ms;
                let detail = format!(
                    "{candidate} at {lsn}; old primary {} fenced: {fenced_by}; sync set from the promotion on: [{}]",
                    f.old_primary,
                    sync_set.join(", ")
                );
                c.sync_set = sync_set.clone();
                c.sync_floor_lsn = pgquorum_client::lsn::Lsn::parse(lsn)
                    .map(|l| l.0)
                    .unwrap_or(c.sync_floor_lsn);
                c.record(HistoryEvent {
                    at_ms: *at_ms,
                    epoch: 0,
                    kind: "candidate_chosen".into(),
                    detail,
                    actor: "coordinator".into(),
                    log_index,
                    duration_ms: None,
                });
                Ok(CommandOutput::None)
            }
            Command::CompletePromotion {
                cluster,
                to_epoch,
                primary,
                at_ms,
            } => {
                let c = self.cluster_mut(cluster)?;
                let f = match &c.failover {
                    Some(f)
                        if f.to_epoch == *to_epoch
                            && f.step == "candidate_chosen"
                            && &f.candidate == primary =>
                    {
                        f.clone()
                    }
                    other => {
                        return Err(CommandError::FailoverStep(format!(
                            "no promotion of {primary} to epoch {to_epoch} in flight ({:?})",
                            other.as_ref().map(|f| (&f.step, f.to_epoch, &f.candidate))
                        )))
                    }
                };
                c.primary = Some(primary.clone());
                // A rebuild or restart asked of it as a standby is not one of a primary.
                if let Some(o) = c.orders.get_mut(primary) {
                    o.retain(|order, _| *order == Order::Reload);
                }
                c.orders.retain(|_, o| !o.is_empty());
                c.primary_roster = Some(c.roster_without(primary));
                c.sync_set.retain(|s| s != primary);
                c.endpoint_version += 1;
                c.failover = None;
                let total = at_ms.saturating_sub(f.started_at_ms);
                let detail = format!(
                    "{} -> {primary}, epoch {} -> {}, LSN {}; fenced by {} after {} ms, promoted after {} ms more \
                     (total {total} ms; {})",
                    f.old_primary,
                    f.from_epoch,
                    f.to_epoch,
                    f.candidate_lsn,
                    f.fenced_by,
                    f.fenced_at_ms.saturating_sub(f.started_at_ms),
                    at_ms.saturating_sub(f.chosen_at_ms),
                    f.reason,
                );
                c.record(HistoryEvent {
                    at_ms: *at_ms,
                    epoch: 0,
                    kind: format!("{}_completed", f.kind),
                    detail,
                    actor: "coordinator".into(),
                    log_index,
                    duration_ms: Some(total),
                });
                Ok(CommandOutput::None)
            }
        }
    }

    fn start_failover(&mut self, command: &Command, log_index: u64) -> CommandResult {
        let Command::StartFailover {
            cluster,
            from_epoch,
            old_primary,
            candidate,
            accept_data_loss,
            kind,
            reason,
            actor,
            at_ms,
            scheduled,
        } = command
        else {
            unreachable!("called with StartFailover only")
        };
        let c = self.cluster_mut(cluster)?;
        let step = |m: String| Err(CommandError::FailoverStep(m));
        if let Some(f) = &c.failover {
            return step(format!(
                "a {} to epoch {} is already in flight (step {})",
                f.kind, f.to_epoch, f.step
            ));
        }
        if c.epoch != *from_epoch {
            return step(format!("the cluster is at epoch {}, not {from_epoch}", c.epoch));
        }
        if c.primary.as_deref().unwrap_or("") != old_primary {
            return step(format!(
                "{old_primary:?} is not the primary of epoch {from_epoch}"
            ));
        }
        if let Some(to) = candidate {
            if !c.members.contains_key(to) {
                return Err(CommandError::UnknownMember(to.clone()));
            }
            out_of_service(c, to)?;
        }
        if let Some(id) = scheduled {
            if c.scheduled_switchover.as_ref().map(|s| s.log_index) != Some(*id) {
                return step("the scheduled switchover it starts was cancelled or replaced".into());
            }
        }
        let dropped = c.scheduled_switchover.take().filter(|_| scheduled.is_none());
        if let Some(s) = dropped {
            c.record(HistoryEvent {
                at_ms: *at_ms,
                epoch: 0,
                kind: "switchover_unscheduled".into(),
                detail: format!(
                    "the switchover scheduled for {} ms (unix) is dropped: a {kind} started first",
                    s.at_ms
                ),
                actor: actor.clone(),
                log_index,
                duration_ms: None,
            });
        }
        c.epoch += 1;
        c.primary = None;
        c.endpoint_version += 1;
        c.failover = Some(FailoverRecord {
            kind: kind.clone(),
            step: "started".into(),
            from_epoch: *from_epoch,
            to_epoch: c.epoch,
            old_primary: old_primary.clone(),
            candidate: candidate.clone().unwrap_or_default(),
            reason: reason.clone(),
            started_at_ms: *at_ms,
            fenced_by: String::new(),
            fenced_at_ms: 0,
            chosen_at_ms: 0,
            candidate_lsn: String::new(),
            accept_data_loss: *accept_data_loss,
        });
        let to = candidate
            .as_deref()
            .map(|t| format!(" to {t}"))
            .unwrap_or_default();
        c.record(HistoryEvent {
            at_ms: *at_ms,
            epoch: 0,
            kind: format!("{kind}_started"),
            detail: format!("{old_primary} -> epoch {}{to}: {reason}", c.epoch),
            actor: actor.clone(),
            log_index,
            duration_ms: None,
        });
        Ok(CommandOutput::None)
    }

    /// [`Command::SetMaintenance`]. A member going in is never the primary nor in a
    /// failover in flight (refused); one already in (or already out) changes nothing
    /// but still publishes, like a drain, so the caller has a version to wait for.
    fn set_maintenance(
        &mut self,
        cluster: &str,
        member: &str,
        on: bool,
        actor: &str,
        at_ms: u64,
        log_index: u64,
    ) -> CommandResult {
        let c = self.member_cluster_mut(cluster, member)?;
        if on {
            c.may_enter_maintenance(member)
                .map_err(|why| CommandError::NoMaintenance {
                    cluster: cluster.to_string(),
                    member: member.to_string(),
                    why,
                })?;
        }
        let changed = if on {
            c.maintenance.insert(member.to_string())
        } else {
            c.maintenance.remove(member)
        };
        c.endpoint_version += 1;
        if changed {
            c.record(HistoryEvent {
                at_ms,
                epoch: 0,
                kind: if on { "maintenance_on" } else { "maintenance_off" }.into(),
                detail: if on {
                    format!("{member} in maintenance: never promoted, out of the sync set and read routing")
                } else {
                    format!("{member} out of maintenance")
                },
                actor: actor.to_string(),
                log_index,
                duration_ms: None,
            });
        }
        Ok(CommandOutput::Cluster(Box::new(c.clone())))
    }

    /// [`Command::ScheduleSwitchover`]: one at a time, in the future, from the primary
    /// of now to another member.
    fn schedule_switchover(
        &mut self,
        cluster: &str,
        due_ms: u64,
        to: Option<&str>,
        actor: &str,
        at_ms: u64,
        log_index: u64,
    ) -> CommandResult {
        let c = self.cluster_mut(cluster)?;
        let refuse = |why: String| {
            Err(CommandError::Schedule {
                cluster: cluster.to_string(),
                why,
            })
        };
        if let Some(s) = &c.scheduled_switchover {
            return refuse(format!(
                "a switchover is already scheduled for {} ms (unix) by {}; cancel it first",
                s.at_ms, s.actor
            ));
        }
        let Some(from) = c.primary.clone() else {
            return refuse("it has no primary now".into());
        };
        if c.policy.maintenance {
            return refuse("it is paused; nothing is scheduled while paused (pgquorum resume)".into());
        }
        if due_ms <= at_ms {
            return refuse(format!("{due_ms} ms (unix) is not in the future"));
        }
        if let Some(to) = to {
            if !c.members.contains_key(to) {
                return Err(CommandError::UnknownMember(to.to_string()));
            }
            if to == from {
                return refuse(format!("{to} is already the primary"));
            }
        }
        c.scheduled_switchover = Some(cluster::ScheduledSwitchover {
            at_ms: due_ms,
            to: to.map(str::to_string),
            from: from.clone(),
            actor: actor.to_string(),
            asked_at_ms: at_ms,
            log_index,
        });
        c.record(HistoryEvent {
            at_ms,
            epoch: 0,
            kind: "switchover_scheduled".into(),
            detail: format!(
                "{from} -> {} at {due_ms} ms (unix), in {} s",
                to.unwrap_or("the best candidate then"),
                (due_ms - at_ms) / 1000
            ),
            actor: actor.to_string(),
            log_index,
            duration_ms: None,
        });
        Ok(CommandOutput::Cluster(Box::new(c.clone())))
    }

    /// [`Command::CancelSwitchover`].
    fn cancel_switchover(
        &mut self,
        cluster: &str,
        why: &str,
        actor: &str,
        at_ms: u64,
        log_index: u64,
    ) -> CommandResult {
        let c = self.cluster_mut(cluster)?;
        let Some(s) = c.scheduled_switchover.take() else {
            return Err(CommandError::Schedule {
                cluster: cluster.to_string(),
                why: "no switchover is scheduled".into(),
            });
        };
        c.record(HistoryEvent {
            at_ms,
            epoch: 0,
            kind: "switchover_unscheduled".into(),
            detail: format!(
                "the switchover scheduled for {} ms (unix) is dropped: {why}",
                s.at_ms
            ),
            actor: actor.to_string(),
            log_index,
            duration_ms: None,
        });
        Ok(CommandOutput::Cluster(Box::new(c.clone())))
    }

    /// [`Command::SetParameters`]: checked as a whole ([`parameters::change`]); a
    /// change that changes nothing is refused (nothing to apply, nothing to record).
    fn set_parameters(
        &mut self,
        cluster: &str,
        set: &BTreeMap<String, String>,
        unset: &[String],
        actor: &str,
        at_ms: u64,
        log_index: u64,
    ) -> CommandResult {
        let c = self.cluster_mut(cluster)?;
        let bad = |why: String| CommandError::Parameters {
            cluster: cluster.to_string(),
            why,
        };
        let next = parameters::change(&c.parameters, set, unset).map_err(bad)?;
        let diff = parameters::diff(&c.parameters, &next);
        if diff.is_empty() {
            return Err(bad("nothing changes".into()));
        }
        c.parameters = next;
        c.parameters_version = log_index;
        c.record(HistoryEvent {
            at_ms,
            epoch: 0,
            kind: "config_changed".into(),
            detail: diff.join("; "),
            actor: actor.to_string(),
            log_index,
            duration_ms: None,
        });
        Ok(CommandOutput::Cluster(Box::new(c.clone())))
    }

    /// [`Command::AskNode`]: the request's log index is its token. A repeat replaces
    /// an order not done yet (the agent does the newest once).
    fn ask_node(
        &mut self,
        cluster: &str,
        member: &str,
        order: Order,
        actor: &str,
        at_ms: u64,
        log_index: u64,
    ) -> CommandResult {
        let c = self.member_cluster_mut(cluster, member)?;
        c.may_order(member, order).map_err(|why| CommandError::NoOrder {
            cluster: cluster.to_string(),
            member: member.to_string(),
            order: order.as_str().to_string(),
            why,
        })?;
        c.orders.entry(member.to_string()).or_default().insert(
            order,
            cluster::Asked {
                token: log_index,
                at_ms,
            },
        );
        let what = match order {
            Order::Reinit => "to be rebuilt from a fresh base backup of the primary",
            Order::Restart => "to restart Postgres",
            Order::Reload => "to reload Postgres's configuration",
        };
        c.record(HistoryEvent {
            at_ms,
            epoch: 0,
            kind: format!("{}_requested", order.as_str()),
            detail: format!("{member} {what}"),
            actor: actor.to_string(),
            log_index,
            duration_ms: None,
        });
        Ok(CommandOutput::Cluster(Box::new(c.clone())))
    }

    /// [`Command::NodeDone`]: clears the order if `token` is still the one asked (a
    /// newer request stays); otherwise changes nothing.
    fn node_done(
        &mut self,
        cluster: &str,
        member: &str,
        order: Order,
        token: u64,
        at_ms: u64,
        log_index: u64,
    ) -> CommandResult {
        let c = self.member_cluster_mut(cluster, member)?;
        let asked = c.orders.get(member).and_then(|o| o.get(&order)).copied();
        if let Some(asked) = asked.filter(|a| a.token == token) {
            if let Some(o) = c.orders.get_mut(member) {
                o.remove(&order);
                if o.is_empty() {
                    c.orders.remove(member);
                }
            }
            let took = at_ms.saturating_sub(asked.at_ms);
            c.record(HistoryEvent {
                at_ms,
                epoch: 0,
                kind: format!("{}_done", order.as_str()),
                detail: format!("{member}: {} done ({took} ms after the request)", order.as_str()),
                actor: "coordinator".into(),
                log_index,
                duration_ms: Some(took),
            });
        }
        Ok(CommandOutput::Cluster(Box::new(c.clone())))
    }

    /// `name`'s cluster, if `member` is one of its members.
    fn member_cluster_mut(&mut self, name: &str, member: &str) -> Result<&mut Cluster, CommandError> {
        let c = self.cluster_mut(name)?;
        if !c.members.contains_key(member) {
            return Err(CommandError::UnknownMember(member.to_string()));
        }
        Ok(c)
    }

    fn cluster_mut(&mut self, name: &str) -> Result<&mut Cluster, CommandError> {
        self.clusters
            .get_mut(name)
            .ok_or_else(|| CommandError::UnknownCluster(name.to_string()))
    }
}

/// Refuses `candidate` for a promotion when an operator took it out of service
/// (checked again as the step is applied: a maintenance or a rebuild asked meanwhile).
fn out_of_service(c: &Cluster, candidate: &str) -> Result<(), CommandError> {
    if c.out_of_service(candidate) {
        return Err(CommandError::FailoverStep(format!(
            "{candidate} is in maintenance or to be rebuilt: never promoted"
        )));
    }
    Ok(())
}

fn check_member(m: &Member) -> Result<(), CommandError> {
    let bad = |message: String| {
        Err(CommandError::InvalidMember {
            name: m.name.clone(),
            message,
        })
    };
    if !policy::is_valid_name(&m.name) {
        return bad("name: use 1-63 letters, digits, '-', '_' or '.'".into());
    }
    if !policy::is_valid_name(&m.region) {
        return bad(format!("region {:?} is not a region name", m.region));
    }
    if m.host.trim().is_empty() {
        return bad("host is empty".into());
    }
    if m.port == 0 {
        return bad("port must be 1-65535".into());
    }
    if !policy::WORKLOADS.contains(&m.workload.as_str()) {
        return bad(format!(
            "unknown workload {:?}; known: {}",
            m.workload,
            policy::WORKLOADS.join(", ")
        ));
    }
    Ok(())
}

fn describe_settings(settings: &BTreeMap<String, String>) -> String {
    if settings.is_empty() {
        "default policy".to_string()
    } else {
        settings
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(name: &str, settings: &[(&str, &str)]) -> Command {
        Command::CreateCluster {
            name: name.into(),
            settings: settings
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            actor: "test".into(),
            at_ms: 1,
        }
    }

    fn set(cluster: &str, settings: &[(&str, &str)]) -> Command {
        Command::SetPolicy {
            cluster: cluster.into(),
            settings: settings
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            actor: "test".into(),
            at_ms: 2,
        }
    }

    #[test]
    fn create_then_set_policy_records_history() {
        let mut s = ClusterState::default();
        s.apply(&create("main", &[("lease_ms", "2000")]), 1).unwrap();
        assert_eq!(s.cluster("main").unwrap().policy.lease_ms, 2000);
        s.apply(&set("main", &[("maintenance", "true")]), 2).unwrap();
        let c = s.cluster("main").unwrap();
        assert!(c.policy.maintenance);
        let kinds: Vec<&str> = c.history.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["cluster_created", "policy_changed"]);
        assert_eq!(c.history[1].detail, "maintenance: false -> true");
        assert_eq!(c.history[1].log_index, 2);
    }

    #[test]
    fn lowering_the_lease_keeps_the_longer_one_until_settled() {
        let mut s = ClusterState::default();
        s.apply(&create("main", &[("lease_ms", "8000")]), 1).unwrap();
        let settling = |s: &ClusterState| {
            s.cluster("main")
                .unwrap()
                .lease_ms_settling
                .map(|l| (l.lease_ms, l.since_log_index))
        };
        s.apply(&set("main", &[("lease_ms", "2000")]), 2).unwrap();
        assert_eq!(settling(&s), Some((8_000, 2)));
        s.apply(&set("main", &[("maintenance", "true")]), 3).unwrap();
        assert_eq!(settling(&s), Some((8_000, 2)), "another field: the count goes on");
        s.apply(&set("main", &[("lease_ms", "1000")]), 4).unwrap();
        assert_eq!(
            settling(&s),
            Some((8_000, 4)),
            "the longest still counts, from now"
        );
        let settle = |since_log_index| Command::SettleLease {
            cluster: "main".into(),
            since_log_index,
            at_ms: 4,
        };
        s.apply(&settle(2), 5).unwrap();
        assert_eq!(settling(&s), Some((8_000, 4)), "compare-and-set: a later change");
        s.apply(&settle(4), 5).unwrap();
        assert_eq!(settling(&s), None);
        assert_eq!(
            s.cluster("main").unwrap().history.back().unwrap().kind,
            "lease_settled"
        );
        s.apply(&set("main", &[("lease_ms", "3000")]), 6).unwrap();
        assert_eq!(settling(&s), None, "raised: nothing to settle");
        s.apply(&set("main", &[("lease_ms", "1000")]), 7).unwrap();
        s.apply(&set("main", &[("lease_ms", "9000")]), 8).unwrap();
        assert_eq!(settling(&s), None, "raised past the longest");
    }

    #[test]
    fn refused_commands_leave_state_untouched() {
        let mut s = ClusterState::default();
        s.apply(&create("main", &[]), 1).unwrap();
        let before = s.clone();
        let refusals = [
            (create("main", &[]), CommandError::ClusterExists("main".into())),
            (
                create("bad name", &[]),
                CommandError::InvalidName("bad name".into()),
            ),
            (
                set("nope", &[("lease_ms", "2000")]),
                CommandError::UnknownCluster("nope".into()),
            ),
        ];
        for (cmd, want) in refusals {
            assert_eq!(s.apply(&cmd, 9).unwrap_err(), want);
        }
        let e = s.apply(&set("main", &[("lease_ms", "10")]), 9).unwrap_err();
        assert!(
            matches!(e, CommandError::Policy(ref p) if p.field == "lease_ms"),
            "{e}"
        );
        assert!(s.apply(&create("other", &[("sync_mode", "maybe")]), 9).is_err());
        assert_eq!(s, before);
    }

    #[test]
    fn history_is_bounded() {
        let mut s = ClusterState::default();
        s.apply(&create("main", &[]), 1).unwrap();
        for i in 0..(cluster::HISTORY_LIMIT as u64 + 10) {
            let value = if i % 2 == 0 { "true" } else { "false" };
            s.apply(&set("main", &[("maintenance", value)]), i + 2).unwrap();
        }
        let c = s.cluster("main").unwrap();
        assert_eq!(c.history.len(), cluster::HISTORY_LIMIT);
        assert_eq!(
            c.history.back().unwrap().log_index,
            cluster::HISTORY_LIMIT as u64 + 11
        );
    }

    fn member(name: &str) -> Member {
        Member {
            name: name.into(),
            region: "us-west-2".into(),
            host: "127.0.0.1".into(),
            port: 5432,
            workload: "general".into(),
            priority: 100,
            nofailover: false,
            sync_eligible: true,
            agent_addr: String::new(),
        }
    }

    fn register(name: &str) -> Command {
        Command::RegisterMember {
            cluster: "main".into(),
            member: member(name),
            at_ms: 3,
        }
    }

    #[test]
    fn a_cluster_is_bootstrapped_once_even_while_it_has_no_primary() {
        let mut s = ClusterState::default();
        s.apply(&create("main", &[]), 1).unwrap();
        s.apply(&register("node1"), 2).unwrap();
        s.apply(&register("node2"), 3).unwrap();
        let claim = |node: &str| Command::ClaimBootstrap {
            cluster: "main".into(),
            node: node.into(),
            at_ms: 5,
        };
        let identify = |node: &str, id: u64| Command::RecordSystemIdentifier {
            cluster: "main".into(),
            node: node.into(),
            system_identifier: id,
            at_ms: 6,
        };
        s.apply(&claim("node1"), 4).unwrap();
        assert!(
            matches!(
                s.apply(&identify("node2", 77), 5),
                Err(CommandError::InvalidMember { .. })
            ),
            "only the primary's identifier counts"
        );
        s.apply(&identify("node1", 77), 5).unwrap();
        s.apply(&identify("node1", 77), 6).unwrap();
        assert!(matches!(
            s.apply(&identify("node1", 78), 7),
            Err(CommandError::ForeignSystemIdentifier {
                recorded: 77,
                reported: 78,
                ..
            })
        ));
        // A failover in flight: no primary, yet no second bootstrap.
        s.clusters.get_mut("main").unwrap().primary = None;
        assert!(matches!(
            s.apply(&claim("node2"), 8),
            Err(CommandError::AlreadyBootstrapped { .. })
        ));
        assert_eq!(s.cluster("main").unwrap().system_identifier, Some(77));
    }

    #[test]
    fn members_bootstrap_once_and_sync_set_is_compare_and_set() {
        let mut s = ClusterState::default();
        s.apply(&create("main", &[]), 1).unwrap();
        s.apply(&register("node1"), 2).unwrap();
        s.apply(&register("node2"), 3).unwrap();
        // Registering again unchanged records nothing.
        s.apply(&register("node2"), 4).unwrap();
        assert_eq!(s.cluster("main").unwrap().history.len(), 3);

        let claim = |node: &str| Command::ClaimBootstrap {
            cluster: "main".into(),
            node: node.into(),
            at_ms: 5,
        };
        assert_eq!(
            s.apply(&claim("ghost"), 5).unwrap_err(),
            CommandError::UnknownMember("ghost".into())
        );
        s.apply(&claim("node1"), 5).unwrap();
        let c = s.cluster("main").unwrap();
        assert_eq!((c.primary.as_deref(), c.epoch), (Some("node1"), 1));
        assert!(matches!(
            s.apply(&claim("node2"), 6),
            Err(CommandError::AlreadyBootstrapped { .. })
        ));

        let set = |expected: &[&str], to: &[&str]| Command::SetSyncSet {
            cluster: "main".into(),
            expected: expected.iter().map(|s| s.to_string()).collect(),
            sync_set: to.iter().map(|s| s.to_string()).collect(),
            reason: "test".into(),
            at_ms: 7,
        };
        s.apply(&set(&[], &["node2"]), 7).unwrap();
        assert!(matches!(
            s.apply(&set(&[], &["node2"]), 8),
            Err(CommandError::SyncSetChanged { .. })
        ));
        assert!(
            s.apply(&set(&["node2"], &["node1"]), 8).is_err(),
            "primary as its own standby"
        );
        assert!(s.apply(&set(&["node2"], &["ghost"]), 8).is_err());
        assert_eq!(s.cluster("main").unwrap().sync_set, ["node2"]);
    }

    #[test]
    fn bad_members_are_refused() {
        let mut s = ClusterState::default();
        s.apply(&create("main", &[]), 1).unwrap();
        for broken in [
            Member {
                workload: "batch".into(),
                ..member("a")
            },
            Member {
                port: 0,
                ..member("b")
            },
            Member {
                host: " ".into(),
                ..member("c")
            },
            Member {
                name: "no spaces".into(),
                ..member("d")
            },
        ] {
            let cmd = Command::RegisterMember {
                cluster: "main".into(),
                member: broken,
                at_ms: 1,
            };
            assert!(matches!(
                s.apply(&cmd, 2),
                Err(CommandError::InvalidMember { .. })
            ));
        }
        assert!(s.cluster("main").unwrap().members.is_empty());
    }

    #[test]
    fn drain_takes_a_member_out_of_reads_and_always_publishes() {
        let mut s = ClusterState::default();
        s.apply(&create("main", &[]), 1).unwrap();
        s.apply(&register("node2"), 2).unwrap();
        let drain = |member: &str, drained: bool| Command::SetDrain {
            cluster: "main".into(),
            member: member.into(),
            drained,
            actor: "test".into(),
            at_ms: 3,
        };
        let before = s.clone();
        assert_eq!(
            s.apply(&drain("ghost", true), 3).unwrap_err(),
            CommandError::UnknownMember("ghost".into())
        );
        assert_eq!(s, before, "a refused drain changes nothing");
        let version = |s: &ClusterState| s.cluster("main").unwrap().endpoint_version;
        let v0 = version(&s);
        s.apply(&drain("node2", true), 4).unwrap();
        s.apply(&drain("node2", true), 5).unwrap();
        let c = s.cluster("main").unwrap();
        assert!(c.drained.contains("node2"));
        assert_eq!(c.endpoint_version, v0 + 2, "every drain is a new map version");
        let map = crate::observe::routes::endpoint_map(c);
        let node2 = map.replicas.iter().find(|e| e.name == "node2").unwrap();
        assert!(node2.drained && !node2.readable);
        s.apply(&drain("node2", false), 6).unwrap();
        let c = s.cluster("main").unwrap();
        assert!(c.drained.is_empty());
        let kinds: Vec<&str> = c.history.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(
            kinds[kinds.len() - 2..],
            ["drained", "undrained"],
            "a repeat records nothing"
        );
    }

    /// node1..node3 registered, node1 the primary of epoch 1.
    fn primary_node1() -> ClusterState {
        let mut s = ClusterState::default();
        s.apply(&create("main", &[]), 1).unwrap();
        for (i, n) in ["node1", "node2", "node3"].iter().enumerate() {
            s.apply(&register(n), 2 + i as u64).unwrap();
        }
        let claim = Command::ClaimBootstrap {
            cluster: "main".into(),
            node: "node1".into(),
            at_ms: 5,
        };
        s.apply(&claim, 5).unwrap();
        s
    }

    #[test]
    fn a_switchover_is_scheduled_once_in_the_future_and_any_start_drops_it() {
        let mut s = primary_node1();
        let schedule = |due_ms| Command::ScheduleSwitchover {
            cluster: "main".into(),
            due_ms,
            to: Some("node2".into()),
            actor: "ops".into(),
            at_ms: 1_000,
        };
        assert!(matches!(
            s.apply(&schedule(1_000), 6),
            Err(CommandError::Schedule { .. })
        ));
        s.apply(&schedule(60_000), 7).unwrap();
        assert!(
            matches!(s.apply(&schedule(70_000), 8), Err(CommandError::Schedule { .. })),
            "one at a time"
        );
        let start = |reason: &str| Command::StartFailover {
            cluster: "main".into(),
            from_epoch: 1,
            old_primary: "node1".into(),
            candidate: None,
            accept_data_loss: false,
            kind: "failover".into(),
            reason: reason.into(),
            actor: "coordinator".into(),
            at_ms: 2_000,
            scheduled: None,
        };
        let mut stale = start("scheduled");
        if let Command::StartFailover { scheduled, .. } = &mut stale {
            *scheduled = Some(6);
        }
        assert!(
            s.apply(&stale, 9).is_err(),
            "a start naming another schedule (cancelled, replaced) is refused"
        );
        s.apply(&start("node1 silent"), 9).unwrap();
        let c = &s.clusters["main"];
        assert_eq!(c.scheduled_switchover, None);
        assert!(c.history.iter().any(|e| e.kind == "switchover_unscheduled"));
        let cancel = Command::CancelSwitchover {
            cluster: "main".into(),
            why: "ops".into(),
            actor: "ops".into(),
            at_ms: 3_000,
        };
        assert!(
            matches!(s.apply(&cancel, 10), Err(CommandError::Schedule { .. })),
            "none left"
        );
    }

    #[test]
    fn a_rebuild_is_asked_of_a_standby_and_cleared_by_its_own_token_only() {
        let mut s = primary_node1();
        let ask = |member: &str| Command::AskNode {
            cluster: "main".into(),
            member: member.into(),
            order: Order::Reinit,
            actor: "ops".into(),
            at_ms: 100,
        };
        let done = |token| Command::NodeDone {
            cluster: "main".into(),
            member: "node3".into(),
            order: Order::Reinit,
            token,
            at_ms: 900,
        };
        let before = s.clone();
        assert!(matches!(
            s.apply(&ask("node1"), 6),
            Err(CommandError::NoOrder { .. })
        ));
        assert_eq!(s, before, "the primary is never rebuilt");
        s.apply(&ask("node3"), 7).unwrap();
        s.apply(&ask("node3"), 8).unwrap();
        assert_eq!(
            s.clusters["main"].pending("node3", Order::Reinit),
            8,
            "the newest request"
        );
        s.apply(&done(7), 9).unwrap();
        assert!(
            s.clusters["main"].pending("node3", Order::Reinit) == 8,
            "an older rebuild is not this one"
        );
        s.apply(&done(8), 10).unwrap();
        let c = &s.clusters["main"];
        assert!(c.orders.is_empty());
        let last = c.history.back().unwrap();
        assert_eq!((last.kind.as_str(), last.duration_ms), ("reinit_done", Some(800)));
    }

    #[test]
    fn maintenance_is_refused_for_the_primary_and_takes_a_standby_out_of_reads() {
        let mut s = primary_node1();
        let set = |member: &str, on| Command::SetMaintenance {
            cluster: "main".into(),
            member: member.into(),
            on,
            actor: "ops".into(),
            at_ms: 100,
        };
        let before = s.clone();
        assert!(matches!(
            s.apply(&set("node1", true), 6),
            Err(CommandError::NoMaintenance { .. })
        ));
        assert_eq!(s, before);
        let v0 = s.clusters["main"].endpoint_version;
        s.apply(&set("node2", true), 7).unwrap();
        let c = &s.clusters["main"];
        assert!(c.in_maintenance("node2") && c.out_of_reads("node2"));
        assert_eq!(c.endpoint_version, v0 + 1);
        let to_node2 = Command::StartFailover {
            cluster: "main".into(),
            from_epoch: 1,
            old_primary: "node1".into(),
            candidate: Some("node2".into()),
            accept_data_loss: false,
            kind: "switchover".into(),
            reason: "ops".into(),
            actor: "ops".into(),
            at_ms: 8,
            scheduled: None,
        };
        assert!(
            matches!(s.apply(&to_node2, 8), Err(CommandError::FailoverStep(_))),
            "never promoted in maintenance, however the request raced it"
        );
        s.apply(&set("node2", false), 8).unwrap();
        assert!(!s.clusters["main"].out_of_reads("node2"));
        let kinds: Vec<&str> = s.clusters["main"]
            .history
            .iter()
            .map(|e| e.kind.as_str())
            .collect();
        assert!(
            kinds.ends_with(&["maintenance_on", "maintenance_off"]),
            "{kinds:?}"
        );
    }

    #[test]
    fn a_removed_member_is_forgotten_its_slot_remembered_until_it_registers_again() {
        let mut s = primary_node1();
        let remove = |member: &str| Command::RemoveMember {
            cluster: "main".into(),
            member: member.into(),
            actor: "ops".into(),
            at_ms: 9,
        };
        assert!(
            matches!(
                s.apply(&remove("node1"), 6),
                Err(CommandError::NotRemovable { .. })
            ),
            "the primary"
        );
        s.clusters.get_mut("main").unwrap().sync_set = vec!["node2".into()];
        assert!(
            matches!(
                s.apply(&remove("node2"), 6),
                Err(CommandError::NotRemovable { .. })
            ),
            "sync"
        );
        assert!(matches!(
            s.apply(&remove("node9"), 6),
            Err(CommandError::UnknownMember(_))
        ));
        let version = s.clusters["main"].endpoint_version;
        s.apply(&remove("node3"), 7).unwrap();
        let c = &s.clusters["main"];
        assert!(!c.members.contains_key("node3"));
        assert_eq!(c.removed, ["node3"]);
        assert!(!c.primary_roster.as_ref().unwrap().contains("node3"));
        assert_eq!(c.endpoint_version, version + 1, "routers learn of it");
        assert_eq!(c.history.back().unwrap().kind, "member_removed");
        s.apply(&register("node3"), 8).unwrap();
        assert!(
            s.clusters["main"].removed.is_empty(),
            "back as a new member: its slot is kept"
        );
    }

    #[test]
    fn the_primarys_roster_starts_with_every_member_and_grows_by_its_reports() {
        let mut s = primary_node1();
        let roster = |s: &ClusterState| s.clusters["main"].primary_roster.clone();
        assert_eq!(
            roster(&s),
            Some(["node2".to_string(), "node3".to_string()].into())
        );
        s.apply(&register("node4"), 6).unwrap();
        assert!(!s.clusters["main"].on_primary_roster("node4"), "joined after");
        let ack = |primary: &str, epoch: u64| Command::AckRoster {
            cluster: "main".into(),
            epoch,
            primary: primary.into(),
            roster: vec!["node2".into(), "node4".into(), "node9".into()],
        };
        assert!(s.apply(&ack("node2", 1), 7).is_err(), "only from the primary");
        assert!(s.apply(&ack("node1", 2), 7).is_err(), "only in its epoch");
        s.apply(&ack("node1", 1), 7).unwrap();
        assert_eq!(
            roster(&s),
            Some(["node2", "node3", "node4"].map(String::from).into()),
            "grows; non-members are not recorded"
        );
    }

    #[test]
    fn a_re_formed_group_holds_every_member_until_readmitted() {
        let mut s = primary_node1();
        let record = Command::RecordGroup {
            group: "g1-c3-1".into(),
            previous: "g0".into(),
            formed_by: 3,
            reason: "us-west-2 lost".into(),
            actor: "ops".into(),
            at_ms: 9,
        };
        let (epoch, version) = (s.clusters["main"].epoch, s.clusters["main"].endpoint_version);
        s.apply(&record, 10).unwrap();
        assert_eq!(s.group, "g1-c3-1");
        assert_eq!(s.replaced, vec!["g0".to_string()]);
        let c = &s.clusters["main"];
        assert_eq!(
            c.epoch,
            epoch + GROUP_EPOCH_JUMP,
            "the old group's epochs are stale now"
        );
        assert_eq!(c.endpoint_version, version + GROUP_EPOCH_JUMP);
        assert_eq!(c.held, c.members.keys().cloned().collect());
        assert!(matches!(c.admits("node1"), Err(CommandError::Held { .. })));
        assert_eq!(c.history.back().map(|e| e.kind.as_str()), Some("group_reformed"));
        let before = s.clone();
        s.apply(&record, 11).unwrap();
        assert_eq!(s, before, "recording the same group again changes nothing");

        let readmit = |member: &str| Command::Readmit {
            cluster: "main".into(),
            member: member.into(),
            actor: "ops".into(),
            at_ms: 12,
        };
        s.apply(&readmit("node3"), 12).unwrap();
        let c = &s.clusters["main"];
        assert!(c.admits("node3").is_ok());
        assert!(c.admits("node1").is_err(), "the others stay held");
        assert!(matches!(
            s.apply(&readmit("node3"), 13),
            Err(CommandError::NotHeld { .. })
        ));
        assert!(matches!(
            s.apply(&readmit("node9"), 13),
            Err(CommandError::UnknownMember(_))
        ));
    }

    /// An automatic failover away from node1 (epoch 1 -> 2).
    fn start_from_node1() -> Command {
        Command::StartFailover {
            cluster: "main".into(),
            from_epoch: 1,
            old_primary: "node1".into(),
            candidate: None,
            accept_data_loss: false,
            kind: "failover".into(),
            reason: "test".into(),
            actor: "test".into(),
            at_ms: 6,
            scheduled: None,
        }
    }

    #[test]
    fn an_abandoned_candidate_restarts_the_failover_one_epoch_on() {
        let mut s = primary_node1();
        s.apply(&start_from_node1(), 6).unwrap();
        let abandon = |candidate: &str, to_epoch: u64| Command::AbandonCandidate {
            cluster: "main".into(),
            to_epoch,
            candidate: candidate.into(),
            reason: "silent".into(),
            at_ms: 8,
        };
        let before = s.clone();
        assert!(s.apply(&abandon("node2", 2), 7).is_err(), "nothing chosen yet");
        assert_eq!(s, before);
        s.apply(
            &Command::ChooseCandidate {
                cluster: "main".into(),
                to_epoch: 2,
                candidate: "node2".into(),
                lsn: "0/5000000".into(),
                fenced_by: "test".into(),
                sync_set: vec!["node3".into()],
                at_ms: 7,
            },
            7,
        )
        .unwrap();
        assert!(s.apply(&abandon("node3", 2), 8).is_err(), "not the candidate");
        assert!(s.apply(&abandon("node2", 1), 8).is_err(), "not its epoch");
        s.apply(&abandon("node2", 2), 8).unwrap();
        let c = s.cluster("main").unwrap();
        let f = c.failover.as_ref().unwrap();
        assert_eq!((c.epoch, c.primary.as_deref()), (3, None));
        assert_eq!(
            (
                f.step.as_str(),
                f.from_epoch,
                f.to_epoch,
                f.old_primary.as_str(),
                f.candidate.as_str()
            ),
            ("started", 2, 3, "node2", "")
        );
        assert_eq!(
            c.sync_set,
            ["node3"],
            "the next choice comes from the committed sync set"
        );
        assert!(s.apply(&abandon("node2", 2), 9).is_err(), "applied once only");
    }

    #[test]
    fn an_operator_overrides_only_a_failover_that_has_not_chosen() {
        let mut s = primary_node1();
        let override_to = |candidate: &str| Command::OverrideCandidate {
            cluster: "main".into(),
            to_epoch: 2,
            candidate: candidate.into(),
            actor: "test".into(),
            at_ms: 9,
        };
        assert!(
            s.apply(&override_to("node3"), 5).is_err(),
            "no failover in flight"
        );
        s.apply(&start_from_node1(), 6).unwrap();
        let before = s.clone();
        assert!(s.apply(&override_to("node1"), 7).is_err(), "not the old primary");
        assert!(s.apply(&override_to("ghost"), 7).is_err());
        assert_eq!(s, before);
        s.apply(&override_to("node3"), 7).unwrap();
        let f = s.cluster("main").unwrap().failover.clone().unwrap();
        assert_eq!(
            (f.candidate.as_str(), f.accept_data_loss, f.step.as_str()),
            ("node3", true, "started")
        );
        assert_eq!(
            s.cluster("main").unwrap().history.back().unwrap().kind,
            "candidate_overridden"
        );
    }

    #[test]
    fn a_no_op_change_records_nothing() {
        let mut s = ClusterState::default();
        s.apply(&create("main", &[]), 1).unwrap();
        s.apply(&set("main", &[("lease_ms", "1000")]), 2).unwrap();
        assert_eq!(s.cluster("main").unwrap().history.len(), 1);
    }
}
