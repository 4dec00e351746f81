//! The writes the coordinator group replicates, and what applying one returns.
//!
//! A command carries everything its effect depends on, wall-clock time included, so
//! that applying it is a pure function of the state and the command: every coordinator
//! that applies the same log ends with the same state.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::cluster::{Cluster, Member, Order, ReplicaRoute};
use super::policy::{Policy, PolicyError};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Changes nothing; committing it makes a leader's read index cover everything
    /// before it (see `grpc::proposer::Proposer::ready_to_read`).
    Barrier,
    /// Start guarding a new database cluster.
    CreateCluster {
        name: String,
        /// Policy fields that differ from the defaults.
        settings: BTreeMap<String, String>,
        actor: String,
        at_ms: u64,
    },
    /// Forget a cluster for good (see `AdminService.DeleteCluster`).
    DeleteCluster { name: String, actor: String, at_ms: u64 },
    /// Change some fields of a cluster's policy.
    SetPolicy {
        cluster: String,
        settings: BTreeMap<String, String>,
        actor: String,
        at_ms: u64,
    },
    /// Add a Postgres member, or update how it describes itself (sent by its agent).
    RegisterMember {
        cluster: String,
        member: Member,
        at_ms: u64,
    },
    /// Let `node` create the cluster's first primary (initdb). Granted once per
    /// cluster, at epoch 0: it makes `node` the primary of epoch 1.
    ClaimBootstrap {
        cluster: String,
        node: String,
        at_ms: u64,
    },
    /// The system identifier of the data directory of `node`, the cluster's primary,
    /// becomes the cluster's: once recorded, no bootstrap is ever granted again.
    RecordSystemIdentifier {
        cluster: String,
        node: String,
        system_identifier: u64,
        at_ms: u64,
    },
    /// Every lease of the length `lease_ms_settling` names has ended: clear it, if no
    /// lease_ms change came after `since_log_index` (compare-and-set).
    SettleLease {
        cluster: String,
        since_log_index: u64,
        at_ms: u64,
    },
    /// Replace the committed sync set, if it still is `expected` (compare-and-set, so
    /// a decision made on a stale view is refused rather than applied).
    SetSyncSet {
        cluster: String,
        expected: Vec<String>,
        sync_set: Vec<String>,
        reason: String,
        at_ms: u64,
    },
    /// Step 1 of a failover: epoch+1, no primary until the promotion. Only from
    /// `from_epoch` with `old_primary` primary and no failover in flight, so a repeat
    /// (a new leader resuming) is refused instead of starting a second one.
    StartFailover {
        cluster: String,
        from_epoch: u64,
        old_primary: String,
        /// Set for a manual failover: the operator's choice.
        candidate: Option<String>,
        accept_data_loss: bool,
        kind: String,
        reason: String,
        actor: String,
        at_ms: u64,
        /// Set when the leader starts the scheduled switchover: the log index of its
        /// schedule, which must still be the one in the state (not cancelled).
        #[serde(default)]
        scheduled: Option<u64>,
    },
    /// Step 2: the old primary is fenced and the candidate chosen; `sync_set` is the
    /// committed sync set from now on (without the candidate).
    ChooseCandidate {
        cluster: String,
        to_epoch: u64,
        candidate: String,
        lsn: String,
        fenced_by: String,
        sync_set: Vec<String>,
        at_ms: u64,
    },
    /// Step 2b: the chosen candidate of `to_epoch` went silent before its promotion
    /// was published and its lease has certainly run out: give it up, move to epoch
    /// `to_epoch + 1` and fail over again with the lost candidate as the old primary
    /// (so it is fenced like one, and the next choice comes from the committed sync
    /// set, which no longer holds it).
    AbandonCandidate {
        cluster: String,
        to_epoch: u64,
        candidate: String,
        reason: String,
        at_ms: u64,
    },
    /// An operator's choice for a failover in flight that has not chosen yet (it
    /// waits for a candidate that may never come): promote `candidate`, accepting
    /// data loss. The old primary must still be fenced first.
    OverrideCandidate {
        cluster: String,
        to_epoch: u64,
        candidate: String,
        actor: String,
        at_ms: u64,
    },
    /// Publish the replicas' routing view (a new endpoint map version).
    PublishRoutes {
        cluster: String,
        routes: std::collections::BTreeMap<String, ReplicaRoute>,
    },
    /// Take a member out of read routing (`drained`), or put it back. Publishes a
    /// new endpoint map version even when nothing changed, so the caller can wait for
    /// that version.
    SetDrain {
        cluster: String,
        member: String,
        drained: bool,
        actor: String,
        at_ms: u64,
    },
    /// The coordinator group was re-formed by force-new-group on `formed_by`: record
    /// the new group and hold every member of every cluster until readmitted (their
    /// hosts may be in the lost region, with writes the survivors never saw). Applied
    /// once per group; a repeat changes nothing.
    RecordGroup {
        group: String,
        /// The group it replaced (the one the state named until now).
        #[serde(default)]
        previous: String,
        formed_by: u64,
        reason: String,
        actor: String,
        at_ms: u64,
    },
    /// The primary of `epoch` reported the members it asks for failsafe promises: add
    /// them to the recorded roster (it only grows: a grant names every member).
    AckRoster {
        cluster: String,
        epoch: u64,
        primary: String,
        roster: Vec<String>,
    },
    /// An operator forgets a member (see [`crate::state::Cluster::removable`]).
    RemoveMember {
        cluster: String,
        member: String,
        actor: String,
        at_ms: u64,
    },
    /// An operator puts a member into maintenance (`on`), or ends it (see
    /// [`crate::state::Cluster::maintenance`]). Publishes a new endpoint map version.
    SetMaintenance {
        cluster: String,
        member: String,
        on: bool,
        actor: String,
        at_ms: u64,
    },
    /// Change the cluster's Postgres parameters (see
    /// [`crate::state::parameters`]).
    SetParameters {
        cluster: String,
        set: BTreeMap<String, String>,
        unset: Vec<String>,
        actor: String,
        at_ms: u64,
    },
    /// An operator asks `order` of `member`'s agent (see
    /// [`crate::state::Cluster::orders`]). A repeat replaces an order not done yet.
    AskNode {
        cluster: String,
        member: String,
        order: Order,
        actor: String,
        at_ms: u64,
    },
    /// The agent of `member` reported `order` number `token` done.
    NodeDone {
        cluster: String,
        member: String,
        order: Order,
        token: u64,
        at_ms: u64,
    },
    /// An operator schedules a switchover for `due_ms` (see
    /// [`crate::state::Cluster::scheduled_switchover`]). One at a time.
    ScheduleSwitchover {
        cluster: String,
        due_ms: u64,
        to: Option<String>,
        actor: String,
        at_ms: u64,
    },
    /// Drop the scheduled switchover: an operator's `--cancel`, or the leader when it
    /// could not be started in its time (`why`).
    CancelSwitchover {
        cluster: String,
        why: String,
        actor: String,
        at_ms: u64,
    },
    /// An operator readmits a held member: its heartbeats are answered again.
    Readmit {
        cluster: String,
        member: String,
        actor: String,
        at_ms: u64,
    },
    /// The leader ran the STONITH hook for `node` (the failed primary before
    /// `epoch`): how it ended, for the history.
    RecordStonith {
        cluster: String,
        node: String,
        epoch: u64,
        outcome: String,
        at_ms: u64,
    },
    /// Step 3: the candidate runs as primary of `to_epoch`; publish it.
    CompletePromotion {
        cluster: String,
        to_epoch: u64,
        primary: String,
        at_ms: u64,
    },
}

/// The successful outcome of a command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandOutput {
    /// The cluster as it stands after the command.
    Cluster(Box<Cluster>),
    Policy(Box<Policy>),
    /// Raft-internal entries (blank, membership) that carry no command.
    None,
}

/// A command refused deterministically: every coordinator reaches the same verdict, so
/// the refusal goes back to the client and the state stays as it was.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CommandError {
    #[error("cluster {0:?} does not exist")]
    UnknownCluster(String),
    #[error("cluster {0:?} already exists")]
    ClusterExists(String),
    #[error("invalid cluster name {0:?}: use 1-63 letters, digits, '-', '_' or '.'")]
    InvalidName(String),
    #[error("{0}")]
    Policy(PolicyError),
    #[error("invalid member {name:?}: {message}")]
    InvalidMember { name: String, message: String },
    #[error("cluster {cluster:?} already has a primary ({primary}) at epoch {epoch}")]
    AlreadyBootstrapped {
        cluster: String,
        primary: String,
        epoch: u64,
    },
    #[error("{0:?} is not a member of the cluster")]
    UnknownMember(String),
    #[error(
        "cluster {cluster:?} is the database with system identifier {recorded}; {node} reports {reported}"
    )]
    ForeignSystemIdentifier {
        cluster: String,
        node: String,
        recorded: u64,
        reported: u64,
    },
    #[error("the sync set changed meanwhile (now {actual:?}); decide again")]
    SyncSetChanged { actual: Vec<String> },
    /// A failover step that does not fit the committed record (already done, or
    /// another failover in flight); a resuming leader treats it as "move on".
    #[error("failover step refused: {0}")]
    FailoverStep(String),
    #[error(
        "node {member} of cluster {cluster:?} is held since the coordinator group was re-formed \
         (force-new-group): it gets no lease and no orders until an operator readmits it; check \
         it (a returning old primary may hold writes the new primary never had), then run \
         `pgquorum cluster readmit {cluster} {member}`"
    )]
    Held { cluster: String, member: String },
    #[error("{member:?} of cluster {cluster:?} is not held; nothing to readmit")]
    NotHeld { cluster: String, member: String },
    /// A member that may not go into maintenance now; says why.
    #[error("{member:?} of cluster {cluster:?} cannot go into maintenance: {why}")]
    NoMaintenance {
        cluster: String,
        member: String,
        why: String,
    },
    /// A switchover that cannot be scheduled (or cancelled); says why.
    #[error("cluster {cluster:?}: {why}")]
    Schedule { cluster: String, why: String },
    /// A cluster that may not be deleted now; says why.
    #[error("cluster {cluster:?} cannot be deleted: {why}")]
    NotDeletable { cluster: String, why: String },
    /// A parameter change refused; says why, naming the parameter.
    #[error("cluster {cluster:?}: {why}")]
    Parameters { cluster: String, why: String },
    /// An order a member may not be given now; says why.
    #[error("{member:?} of cluster {cluster:?}: no {order} now: {why}")]
    NoOrder {
        cluster: String,
        member: String,
        order: String,
        why: String,
    },
    /// A member that may not be removed now; says why.
    #[error("{member:?} of cluster {cluster:?} cannot be removed: {why}")]
    NotRemovable {
        cluster: String,
        member: String,
        why: String,
    },
}

/// What applying one log entry returned; travels back to the proposer.
pub type CommandResult = Result<CommandOutput, CommandError>;
