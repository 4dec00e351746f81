//! One database cluster as the coordinator group remembers it.
//!
//! Everything here is replicated through Raft and identical on every coordinator that
//! has applied the same log. Heartbeat reports are deliberately absent: they change
//! several times a second and live only in the leader's memory (DESIGN.md).

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::policy::Policy;

/// How many history events a cluster keeps; older ones are dropped first.
pub const HISTORY_LIMIT: usize = 1000;

/// A Postgres host in a cluster, as registered by its agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    pub region: String,
    pub host: String,
    pub port: u16,
    /// Workload class (see [`super::policy::WORKLOADS`]).
    pub workload: String,
    /// Higher wins among equally caught-up candidates.
    pub priority: i32,
    /// Never promote this member automatically.
    pub nofailover: bool,
    /// May be chosen into the sync set.
    pub sync_eligible: bool,
    /// `host:port` of its agent's PeerService, which a primary asks for failsafe
    /// promises; empty: none.
    #[serde(default)]
    pub agent_addr: String,
}

/// Where an in-flight failover or switchover stands, so that a new Raft leader resumes
/// it instead of starting a second one (Invariant 4).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverRecord {
    /// `failover` (automatic), `manual` (`pgquorum failover --to`) or `switchover`.
    pub kind: String,
    /// The last step committed: `started`, then `candidate_chosen`; the promotion
    /// itself completes the record and clears it.
    pub step: String,
    pub from_epoch: u64,
    pub to_epoch: u64,
    pub old_primary: String,
    /// Chosen candidate; for a manual failover, the operator's choice from the start.
    pub candidate: String,
    pub reason: String,
    pub started_at_ms: u64,
    pub fenced_by: String,
    pub fenced_at_ms: u64,
    pub chosen_at_ms: u64,
    pub candidate_lsn: String,
    /// A manual failover that may lose acknowledged commits.
    pub accept_data_loss: bool,
}

/// A replica as routers see it: committed by the leader when its health or its
/// readability changes (not on every lag sample, which would flood the log).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRoute {
    pub health: String,
    pub lag_ms: u64,
    pub lag_bytes: u64,
    pub readable: bool,
}

/// One line of a cluster's history: who did what, when, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEvent {
    /// Wall-clock time chosen by the proposer (apply must not read clocks).
    pub at_ms: u64,
    pub epoch: u64,
    pub kind: String,
    pub detail: String,
    pub actor: String,
    /// Raft log index of the entry that recorded it.
    pub log_index: u64,
    /// How long it took, for what has a duration (a completed failover or switchover:
    /// from its start to the new primary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    pub name: String,
    pub policy: Policy,
    pub members: BTreeMap<String, Member>,
    /// Grows on every change of primary; the fencing token (Invariant 1).
    pub epoch: u64,
    /// Primary of the current epoch, once one is known.
    pub primary: Option<String>,
    /// Standbys the primary waits for, or is about to (Invariant 3).
    pub sync_set: Vec<String>,
    /// Bumped whenever what routers must know changes.
    pub endpoint_version: u64,
    pub failover: Option<FailoverRecord>,
    pub history: VecDeque<HistoryEvent>,
    pub created_at_ms: u64,
    /// WAL position at the last promotion (the chosen candidate's received LSN): every
    /// write acknowledged before it lies below it, so a standby joins the sync set
    /// only once it has flushed this far (see `sync::plan`).
    #[serde(default)]
    pub sync_floor_lsn: u64,
    /// The routing view of every replica, as last published.
    #[serde(default)]
    pub replica_routes: BTreeMap<String, ReplicaRoute>,
    /// Members an operator took out of read routing (`pgquorum drain`), like Patroni's
    /// `noloadbalance` tag. Kept apart from [`Member`], which its agent rewrites.
    #[serde(default)]
    pub drained: std::collections::BTreeSet<String>,
    /// The system identifier of the cluster's first primary, once it reported one:
    /// the database this cluster is. No bootstrap is granted after it is known, and a
    /// node with another one is never promoted.
    #[serde(default)]
    pub system_identifier: Option<u64>,
    /// Set when the policy lowered `lease_ms`: the longer lease in force before, which
    /// leases granted earlier may still run for. A new leader waits this long for an
    /// earlier leader's leases; cleared ([`crate::state::Command::SettleLease`]) once a
    /// leader has seen every lease of that length end.
    #[serde(default)]
    pub lease_ms_settling: Option<LeaseSettling>,
    /// Members held since the coordinator group was re-formed (force-new-group): their
    /// heartbeats are refused, so they get no lease and no orders, and none is
    /// promoted, until an operator readmits them (`pgquorum cluster readmit`).
    #[serde(default)]
    pub held: std::collections::BTreeSet<String>,
    /// The members the primary is known to ask for failsafe promises (it reported them
    /// after a grant; at a promotion, every member then: its first grant names them
    /// all). A member outside it joined after, may never have been asked, and is not
    /// promoted while this primary may write on promises. None: not recorded (state
    /// from before; every member counts).
    #[serde(default)]
    pub primary_roster: Option<std::collections::BTreeSet<String>>,
    /// Members an operator removed, newest last (at most [`REMOVED_KEPT`]): the
    /// primary drops their replication slots. One that registers again leaves it.
    #[serde(default)]
    pub removed: Vec<String>,
    /// Members an operator put into maintenance (`pgquorum maintenance on`): never
    /// promoted, out of the sync set and of read routing, and their agents leave
    /// Postgres as the operator leaves it. Never the primary.
    #[serde(default)]
    pub maintenance: std::collections::BTreeSet<String>,
    /// What operators asked of members' agents (`pgquorum reinit`, `restart`,
    /// `reload`), until the agents report it done.
    #[serde(default)]
    pub orders: BTreeMap<String, BTreeMap<Order, Asked>>,
    /// Postgres parameters for every node (`pgquorum config set`; see
    /// [`crate::state::parameters`]), and the log index of their last change.
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    #[serde(default)]
    pub parameters_version: u64,
    /// A switchover the leader starts at its time (`switchover --at`); dropped by any
    /// failover or switchover that starts first.
    #[serde(default)]
    pub scheduled_switchover: Option<ScheduledSwitchover>,
}

/// See [`Cluster::scheduled_switchover`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduledSwitchover {
    /// Unix time in ms to start it at.
    pub at_ms: u64,
    /// None: the best candidate then.
    pub to: Option<String>,
    /// The primary when it was asked: another primary by then drops it.
    pub from: String,
    pub actor: String,
    pub asked_at_ms: u64,
    /// The log index of the request: what the start names (see
    /// [`crate::state::Command::StartFailover`]).
    #[serde(default)]
    pub log_index: u64,
}

/// How the reason of a switchover the leader started on schedule begins.
pub const SCHEDULED: &str = "scheduled";

/// Something an operator asks of one member's agent, carried out once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Order {
    /// Rebuild a standby from a fresh base backup of the primary.
    Reinit,
    /// Restart Postgres (a primary in place, under its lease).
    Restart,
    /// Reload Postgres's configuration.
    Reload,
}

impl Order {
    pub fn as_str(self) -> &'static str {
        match self {
            Order::Reinit => "reinit",
            Order::Restart => "restart",
            Order::Reload => "reload",
        }
    }
}

/// An order as asked: its token (the log index of the request, which the agent
/// reports back once done) and when.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Asked {
    pub token: u64,
    pub at_ms: u64,
}

/// How many removed members a cluster remembers (for dropping their slots).
pub const REMOVED_KEPT: usize = 16;

/// A longer lease that may still run after a lowering, and the log index of the last
/// lease_ms change since (what a settlement must name: a lowering, raising and
/// lowering again restarts the count).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseSettling {
    pub lease_ms: u64,
    pub since_log_index: u64,
}

impl Cluster {
    pub fn new(name: String, policy: Policy, created_at_ms: u64) -> Cluster {
        Cluster {
            name,
            policy,
            members: BTreeMap::new(),
            epoch: 0,
            primary: None,
            sync_set: Vec::new(),
            endpoint_version: 0,
            failover: None,
            sync_floor_lsn: 0,
            system_identifier: None,
            lease_ms_settling: None,
            replica_routes: BTreeMap::new(),
            drained: Default::default(),
            held: Default::default(),
            primary_roster: None,
            removed: Vec::new(),
            maintenance: Default::default(),
            orders: BTreeMap::new(),
            parameters: BTreeMap::new(),
            parameters_version: 0,
            scheduled_switchover: None,
            history: VecDeque::new(),
            created_at_ms,
        }
    }

    /// Why `member` may not be removed now, if it may not: the primary, a member of
    /// the sync set (it may hold commits no other standby has; the coordinators
    /// replace a lost sync standby first), or one a failover involves.
    pub fn removable(&self, member: &str) -> Result<(), String> {
        if self.primary.as_deref() == Some(member) {
            return Err("it is the primary; switch over first".into());
        }
        if self.sync_set.iter().any(|s| s == member) {
            return Err(
                "it is in the synchronous standby set; wait until the coordinators replace it".into(),
            );
        }
        if let Some(f) = &self.failover {
            if f.old_primary == member || f.candidate == member {
                return Err(format!("the {} in flight involves it", f.kind));
            }
        }
        Ok(())
    }

    /// Why `member` may not go into maintenance now, if it may not: the primary (switch
    /// over first), or a node the failover in flight involves.
    pub fn may_enter_maintenance(&self, member: &str) -> Result<(), String> {
        if self.primary.as_deref() == Some(member) {
            return Err(
                "it is the primary; switch over first (pgquorum maintenance on --allow-switchover does)"
                    .into(),
            );
        }
        if let Some(f) = &self.failover {
            return Err(format!(
                "a {} to epoch {} is in flight; ask again once it is done",
                f.kind, f.to_epoch
            ));
        }
        Ok(())
    }

    /// Why `order` may not be asked of `member` now, if it may not: a rebuild or a
    /// restart of the primary, of a node in maintenance, or while a failover runs (a
    /// reload is always fine).
    pub fn may_order(&self, member: &str, order: Order) -> Result<(), String> {
        if order == Order::Reload {
            return Ok(());
        }
        if order == Order::Reinit && self.primary.as_deref() == Some(member) {
            return Err("it is the primary; switch over first".into());
        }
        if order == Order::Restart && self.primary.as_deref() == Some(member) {
            return Err(
                "it is the primary; restart it by switchover (pgquorum restart --switchover): its agent \
                 cannot renew its lease while it waits for Postgres to stop and start"
                    .into(),
            );
        }
        if self.in_maintenance(member) {
            return Err(format!(
                "it is in maintenance (its agent leaves its Postgres alone); end it first: pgquorum \
                 maintenance off {member}"
            ));
        }
        if let Some(f) = &self.failover {
            return Err(format!(
                "a {} to epoch {} is in flight; ask again once it is done",
                f.kind, f.to_epoch
            ));
        }
        Ok(())
    }

    /// Whether `member` is in maintenance (`pgquorum maintenance on`).
    pub fn in_maintenance(&self, member: &str) -> bool {
        self.maintenance.contains(member)
    }

    /// Whether an operator took `member` out of service: in maintenance, or to be
    /// rebuilt (its data may be about to go). Such a member is never promoted and
    /// never joins the sync set (the coordinators replace it there first).
    pub fn out_of_service(&self, member: &str) -> bool {
        self.in_maintenance(member) || self.pending(member, Order::Reinit) > 0
    }

    /// The token of the `order` asked of `member` and not done yet (0: none).
    pub fn pending(&self, member: &str, order: Order) -> u64 {
        self.orders
            .get(member)
            .and_then(|o| o.get(&order))
            .map_or(0, |a| a.token)
    }

    /// Whether an operator took `member` out of read routing: drained, or in
    /// maintenance.
    pub fn out_of_reads(&self, member: &str) -> bool {
        self.drained.contains(member) || self.maintenance.contains(member)
    }

    /// Whether `member`'s agent may be answered: refused while it is held.
    pub fn admits(&self, member: &str) -> Result<(), super::CommandError> {
        if self.held.contains(member) {
            return Err(super::CommandError::Held {
                cluster: self.name.clone(),
                member: member.to_string(),
            });
        }
        Ok(())
    }

    /// Whether `member` is on the roster the primary asks for failsafe promises (see
    /// [`Cluster::primary_roster`]): only such a member may be promoted.
    pub fn on_primary_roster(&self, member: &str) -> bool {
        self.primary_roster.as_ref().is_none_or(|r| r.contains(member))
    }

    /// Every member but `primary`: the roster of `primary`'s first grant.
    pub fn roster_without(&self, primary: &str) -> std::collections::BTreeSet<String> {
        self.members
            .keys()
            .filter(|m| m.as_str() != primary)
            .cloned()
            .collect()
    }

    /// Appends to the bounded history.
    pub fn record(&mut self, mut event: HistoryEvent) {
        event.epoch = self.epoch;
        if self.history.len() == HISTORY_LIMIT {
            self.history.pop_front();
        }
        self.history.push_back(event);
    }
}
