//! The agent's decisions, without I/O: what to do with a heartbeat reply, given what
//! the agent sees of its own node.
//!
//! [`receive`] judges the reply itself (a stale epoch is ignored, a new one persisted
//! first) and what it does to the lease; [`plan`] turns the reply, the report the
//! heartbeat carried and the node's [`Local`] state into the [`Action`]s to carry out,
//! in order. The loop in [`crate::agent`] observes, asks these two and executes; the
//! coordinators' seeded simulation (`coordinator/tests/failover_simulation.rs`) calls
//! the same two functions against its modelled Postgres, so the agent it checks is
//! this one.
//!
//! What the agent does depends on what the data directory is and what the
//! coordinators say, never on what the agent remembers alone:
//!
//! - no cluster on disk: initdb when granted the bootstrap, else clone the primary;
//! - a primary's data, but not this epoch's primary: stop Postgres (fence; a clean
//!   stop for a switchover), then, once a new primary is published, rejoin as its
//!   standby;
//! - told to promote: only a running standby, under a lease the lease file holds, with
//!   the commit-time lease check loaded;
//! - this epoch's primary: apply the sync standbys and slots decided; restart a
//!   stopped Postgres only when the coordinators say so (otherwise they are failing
//!   over);
//! - a standby: follow the published primary, keep Postgres running.

use std::time::{Duration, Instant};

use pgquorum_client::lsn::Lsn;
use pgquorum_client::pb;

use crate::postgres::ctl::{slot_name, Upstream};

/// What a reply means before anything is done about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reception {
    /// From an epoch older than one already seen (a stale coordinator): ignored whole.
    Stale { reply_epoch: u64, seen_epoch: u64 },
    /// To act on, once `new_epoch` (if any) is persisted — an epoch that cannot be
    /// persisted must not be acted on.
    Accept {
        new_epoch: Option<u64>,
        lease: LeaseChange,
    },
}

/// What a reply does to the primary lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseChange {
    /// A grant: the lease now ends this long after the heartbeat was sent (already
    /// less the margin, so it ends before the coordinators count it as over).
    Grant(Duration),
    /// Another node is the primary, or none is being promoted here: no lease.
    Drop,
    /// Ours, but not renewed (a failover in flight), or a switchover's clean stop:
    /// the old deadline runs out by itself.
    Keep,
}

/// Judges a reply against the newest epoch this agent has seen.
pub fn receive(me: &str, seen_epoch: u64, reply: &pb::HeartbeatReply) -> Reception {
    if reply.epoch < seen_epoch {
        return Reception::Stale {
            reply_epoch: reply.epoch,
            seen_epoch,
        };
    }
    let is_primary = is_primary(me, reply);
    let lease = if (is_primary || reply.promote) && reply.lease_ms > 0 {
        let length = Duration::from_millis(reply.lease_ms);
        LeaseChange::Grant(length.saturating_sub(pgquorum_client::lease::margin(length)))
    } else if !is_primary && !reply.promote && !reply.stop_cleanly {
        LeaseChange::Drop
    } else {
        LeaseChange::Keep
    };
    Reception::Accept {
        new_epoch: (reply.epoch > seen_epoch).then_some(reply.epoch),
        lease,
    }
}

fn is_primary(me: &str, reply: &pb::HeartbeatReply) -> bool {
    reply.primary.as_ref().is_some_and(|p| p.name == me)
}

/// What the agent knows of its own node when it acts on a reply (the reply's lease
/// change already applied).
#[derive(Clone, Debug, Default)]
pub struct Local {
    /// This node's member name.
    pub me: String,
    /// A cluster exists in the data directory.
    pub initialized: bool,
    /// A postmaster runs (perhaps frozen).
    pub running: bool,
    /// The data directory is a standby's (`standby.signal`).
    pub standby_data: bool,
    /// The promotion marker exists: the data counts as a primary's, whatever
    /// `standby.signal` says.
    pub promoting: bool,
    /// A primary lease is held and has not run out.
    pub lease_valid: bool,
    /// The lease file holds the granted lease (the guard and Postgres's commit check
    /// read it: a primary under a lease they cannot see would be stopped).
    pub lease_file_current: bool,
    /// The commit-time lease check is not required, or is loaded in the running
    /// postmaster.
    pub commit_check_ok: bool,
    /// The upstream this standby's configuration points at, once written.
    pub following: Option<Upstream>,
    /// How long this running standby has been seen without streaming (zero while it
    /// streams).
    pub not_streaming_for: Duration,
    /// Since this agent last checked the standby for divergence; None: never.
    pub divergence_checked_ago: Option<Duration>,
    /// A failsafe promise this node gave still runs, this much longer: it must not be
    /// promoted before it ends ([`crate::failsafe`]).
    pub promised_for: Option<Duration>,
    /// The newest orders carried out (their tokens).
    pub reinit_done: u64,
    pub restart_done: u64,
    pub reload_done: u64,
    /// The version of the cluster's parameters written to this node's configuration.
    pub parameters_version: u64,
}

/// How long a standby pointed at the primary may go without streaming before it is
/// checked for divergence, and how often at most. A healthy one whose connection
/// dropped reconnects within a second (`wal_retrieve_retry_interval`, 100 ms as the
/// agent configures it) once the primary answers; a check costs the primary a
/// connection and, when it finds divergence, the standby a restart.
pub const DIVERGENCE_PATIENCE: Duration = Duration::from_secs(10);

/// One step of carrying out a reply. [`plan`] returns them in order; the executor
/// stops at the first that fails (reported, retried next round).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// initdb as the cluster's first primary, then start it under the lease.
    InitPrimary,
    /// Base backup from the primary, then start as its standby.
    Clone(Upstream),
    /// Stop Postgres at once: this node's data must not run as a primary.
    Fence(FenceReason),
    /// Remove the promotion marker: the promotion is over, or not ours any more.
    ClearPromoting,
    /// A switchover's old primary: stop cleanly (bounded), fence if that fails.
    StopCleanly,
    /// pg_rewind (or a fresh base backup) onto the new primary, then start as its
    /// standby.
    Rejoin(Upstream),
    /// Start Postgres where it may run as a primary: only under a live lease, which is
    /// checked again once it runs.
    StartUnderLease(&'static str),
    /// Promote this standby: wait for these standbys, create their slots.
    Promote {
        synchronous_standby_names: String,
        slots: Vec<String>,
    },
    /// The primary applies the sync standbys decided.
    SetSyncNames(String),
    /// The primary creates missing replication slots.
    EnsureSlots(Vec<String>),
    /// The primary drops the slots of removed members (those no standby streams from).
    DropSlots(Vec<String>),
    /// Point this standby at the primary (slot, primary_conninfo, reload when it
    /// runs); a running standby first checks whether it went past the primary's fork
    /// point and rewinds if so.
    Follow {
        primary: Upstream,
        check_divergence: Option<DivergenceCheck>,
        reload: bool,
    },
    /// A standby that follows the primary but does not stream from it: rewind it if
    /// it went past the primary's fork point.
    CheckDivergence {
        primary: Upstream,
        check: DivergenceCheck,
    },
    /// Start a stopped standby.
    StartStandby,
    /// An operator asked to rebuild this standby (token): stop Postgres, a fresh base
    /// backup from the primary, start it as its standby.
    Reinit { primary: Upstream, token: u64 },
    /// Write the cluster's parameters (and reload a running server).
    ApplyParameters {
        parameters: std::collections::BTreeMap<String, String>,
        version: u64,
    },
    /// An operator asked to restart this standby's Postgres (token): stop, then start.
    /// (The coordinators restart a primary by switchover: its agent could not renew
    /// its lease meanwhile.)
    Restart { token: u64 },
    /// An operator asked to reload Postgres's configuration (token).
    Reload(u64),
    /// Nothing can be done yet; the reason is reported to the log (and the next
    /// report tells the coordinators what they need to know).
    Wait { what: &'static str, why: String },
    /// The local server is unwell (observation failed): reported.
    Unhealthy(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FenceReason {
    /// A half-promoted node that is no longer the candidate.
    NoLongerCandidate,
    /// A primary's data, but another node is this epoch's primary (or none is).
    NotThePrimary,
}

impl FenceReason {
    /// As a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            FenceReason::NoLongerCandidate => "no_longer_candidate",
            FenceReason::NotThePrimary => "not_the_primary",
        }
    }
}

/// Where the standby's WAL ends, to compare with the new primary's fork point. The
/// timeline is the one it reports, which without a WAL receiver is its last
/// restartpoint's: the executor takes the newest it holds WAL of, if newer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DivergenceCheck {
    pub timeline: u32,
    pub lsn: Option<Lsn>,
}

/// The actions that carry out `reply`, given the report the heartbeat carried and
/// the local state. A node in maintenance keeps to what protects the data (fence,
/// follow, stop cleanly) and leaves Postgres's running or not to the operator: no
/// start, clone or rejoin.
pub fn plan(local: &Local, report: &pb::NodeReport, reply: &pb::HeartbeatReply) -> Vec<Action> {
    let actions = orders(local, report, reply);
    if !reply.maintenance {
        return actions;
    }
    actions
        .into_iter()
        .map(|a| match a {
            Action::InitPrimary
            | Action::Clone(_)
            | Action::Rejoin(_)
            | Action::StartStandby
            | Action::Reinit { .. }
            | Action::Restart { .. } => wait(
                "maintenance",
                "in maintenance: postgres is left as the operator left it (`pgquorum maintenance off`)",
            ),
            other => other,
        })
        .collect()
}

fn orders(local: &Local, report: &pb::NodeReport, reply: &pb::HeartbeatReply) -> Vec<Action> {
    let me = local.me.as_str();
    let is_primary = is_primary(me, reply);
    let other_primary = reply.primary.as_ref().filter(|p| p.name != me).map(upstream);
    if !local.initialized {
        return vec![create(reply, other_primary)];
    }
    let mut actions = Vec::new();
    let running = local.running;
    if local.promoting && (is_primary || !reply.promote) {
        if !is_primary && running {
            // No longer the candidate, perhaps half promoted: fence before anything
            // else. What the data is now (the promotion may have ended meanwhile) is
            // read again next round, which rejoins it as a standby.
            return vec![
                Action::Fence(FenceReason::NoLongerCandidate),
                Action::ClearPromoting,
            ];
        }
        actions.push(Action::ClearPromoting);
    }
    // A rebuild asked for: not the primary nor a candidate, and never of a server
    // running with a primary's data (fenced first, above all).
    if reply.reinit > local.reinit_done && !is_primary && !reply.promote && (local.standby_data || !running) {
        if let Some(up) = other_primary {
            actions.push(Action::Reinit {
                primary: up,
                token: reply.reinit,
            });
            return actions;
        }
    }
    if !local.standby_data && !is_primary && !reply.promote {
        actions.push(if running && reply.stop_cleanly {
            Action::StopCleanly
        } else if running {
            Action::Fence(FenceReason::NotThePrimary)
        } else {
            match other_primary {
                Some(up) => Action::Rejoin(up),
                None => wait("rejoin", "fenced; waiting for the new primary to be published"),
            }
        });
        return actions;
    }
    if reply.promote {
        actions.extend(promote(local, report, reply, running));
        return actions;
    }
    if reply.parameters_version != local.parameters_version {
        actions.push(Action::ApplyParameters {
            parameters: reply.parameters.clone().into_iter().collect(),
            version: reply.parameters_version,
        });
    }
    if reply.reload > local.reload_done {
        actions.push(Action::Reload(reply.reload));
    }
    // A restart of a standby (never of a primary, nor of a server with a primary's data).
    if reply.restart > local.restart_done && !is_primary && local.standby_data {
        actions.push(Action::Restart { token: reply.restart });
        return actions;
    }
    if is_primary {
        if !running {
            actions.push(if reply.start_primary {
                Action::StartUnderLease("start as primary")
            } else {
                wait(
                    "primary",
                    "postgres is stopped; reported to the coordinators, who decide to fail over or restart it",
                )
            });
            return actions;
        }
        if report.role == "primary" {
            if report.synchronous_standby_names != reply.synchronous_standby_names {
                actions.push(Action::SetSyncNames(reply.synchronous_standby_names.clone()));
            }
            let missing: Vec<String> = reply
                .standby_slots
                .iter()
                .map(|s| slot_name(s))
                .filter(|s| !report_has_slot(report, s))
                .collect();
            if !missing.is_empty() {
                actions.push(Action::EnsureSlots(missing));
            }
            // Never a slot a member still needs: names that differ may share a slot
            // name ("pg-3" and "pg_3").
            let kept: Vec<String> = reply.standby_slots.iter().map(|s| slot_name(s)).collect();
            let removed: Vec<String> = reply
                .drop_slots
                .iter()
                .map(|s| slot_name(s))
                .filter(|s| !report_has_slot(report, s) && !kept.contains(s))
                .collect();
            if !removed.is_empty() {
                actions.push(Action::DropSlots(removed));
            }
        }
    } else if let Some(up) = other_primary {
        let check = (running && report.role == "standby").then(|| DivergenceCheck {
            timeline: report.timeline,
            lsn: Lsn::parse(&report.receive_lsn).max(Lsn::parse(&report.replay_lsn)),
        });
        if local.following.as_ref() != Some(&up) {
            actions.push(Action::Follow {
                primary: up,
                check_divergence: check,
                reload: running && report.postgres_up,
            });
        } else if let Some(check) = check.filter(|_| due_for_divergence_check(local, report)) {
            // Pointed at the primary but not streaming from it: perhaps it was started
            // (after a crash or a reboot) with WAL past the primary's fork point, which
            // it could not be checked for while stopped; Postgres would retry forever.
            actions.push(Action::CheckDivergence { primary: up, check });
        }
    }
    if !running && local.standby_data {
        actions.push(Action::StartStandby);
        return actions;
    }
    if report.role == "unknown" {
        actions.push(Action::Unhealthy(report.error.clone()));
    }
    actions
}

/// Whether a standby streams, as seen in its reports over time. A standby that went
/// past its primary's fork point still shows "streaming" now and then: its WAL
/// receiver connects, streams the old timeline up to the fork, and is cut off, every
/// `wal_retrieve_retry_interval`. So only streaming that lasts ends a spell without.
#[derive(Clone, Copy, Debug, Default)]
pub struct StreamWatch {
    not_streaming_since: Option<Instant>,
    streaming_since: Option<Instant>,
}

/// How long streaming must last to count.
const STREAMING_SETTLES: Duration = Duration::from_secs(1);

impl StreamWatch {
    /// Notes one observation: a running standby that does (`Some(true)`) or does not
    /// (`Some(false)`) stream; None: not a running standby.
    pub fn observe(&mut self, streaming: Option<bool>, now: Instant) {
        match streaming {
            None => *self = StreamWatch::default(),
            Some(true) => {
                let since = *self.streaming_since.get_or_insert(now);
                if now.saturating_duration_since(since) >= STREAMING_SETTLES {
                    self.not_streaming_since = None;
                }
            }
            Some(false) => {
                self.streaming_since = None;
                self.not_streaming_since.get_or_insert(now);
            }
        }
    }

    /// How long the standby has gone without lasting streaming.
    pub fn not_streaming_for(&self, now: Instant) -> Duration {
        self.not_streaming_since
            .map_or(Duration::ZERO, |since| now.saturating_duration_since(since))
    }
}

/// A running standby pointed at the primary that has not streamed for a while, and
/// was not checked lately.
fn due_for_divergence_check(local: &Local, report: &pb::NodeReport) -> bool {
    report.wal_receiver_status != "streaming"
        && local.not_streaming_for >= DIVERGENCE_PATIENCE
        && local
            .divergence_checked_ago
            .is_none_or(|ago| ago >= DIVERGENCE_PATIENCE)
}

/// No cluster on disk yet.
fn create(reply: &pb::HeartbeatReply, primary: Option<Upstream>) -> Action {
    if reply.bootstrap {
        return Action::InitPrimary;
    }
    match primary {
        Some(up) => Action::Clone(up),
        None => wait(
            "create",
            "waiting for a primary to clone, or for the bootstrap grant",
        ),
    }
}

/// Told to promote (this node is the failover's or switchover's candidate); nothing
/// once promoted, while the coordinators have not committed it yet.
fn promote(
    local: &Local,
    report: &pb::NodeReport,
    reply: &pb::HeartbeatReply,
    running: bool,
) -> Option<Action> {
    if report.role == "primary" {
        return None;
    }
    if let Some(left) = local.promised_for {
        return Some(wait(
            "promote",
            format!(
                "promised the old primary (failsafe) not to be promoted for {} ms more",
                left.as_millis()
            ),
        ));
    }
    Some(promote_standby(local, report, reply, running))
}

fn promote_standby(
    local: &Local,
    report: &pb::NodeReport,
    reply: &pb::HeartbeatReply,
    running: bool,
) -> Action {
    if !running {
        // Chosen while down, or down since promoting (before the coordinators
        // committed it): start it; as the epoch's candidate it may run as primary.
        return Action::StartUnderLease("start the promotion candidate");
    }
    if report.role != "standby" {
        return wait(
            "promote",
            format!("asked to promote but postgres is {}", report.role),
        );
    }
    if !local.lease_valid {
        return wait(
            "promote",
            "no primary lease, or it ran out: waiting for a coordinator to grant one",
        );
    }
    if !local.lease_file_current {
        return wait(
            "promote",
            "the lease file does not hold the granted lease (it could not be written)",
        );
    }
    if !local.commit_check_ok {
        return wait(
            "promote",
            "refused: the commit-time lease check is not loaded in this Postgres (see the agent's log)",
        );
    }
    Action::Promote {
        synchronous_standby_names: reply.synchronous_standby_names.clone(),
        slots: reply.standby_slots.iter().map(|s| slot_name(s)).collect(),
    }
}

fn wait(what: &'static str, why: impl Into<String>) -> Action {
    Action::Wait {
        what,
        why: why.into(),
    }
}

pub fn upstream(p: &pb::PostgresEndpoint) -> Upstream {
    Upstream {
        host: p.host.clone(),
        port: u16::try_from(p.port).unwrap_or(0),
    }
}

/// Whether the primary's report shows a standby connected through `slot` — then the
/// slot certainly exists and no query is needed.
fn report_has_slot(report: &pb::NodeReport, slot: &str) -> bool {
    report
        .replicas
        .iter()
        .any(|r| slot_name(&r.application_name) == slot)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(name: &str, port: u32) -> pb::PostgresEndpoint {
        pb::PostgresEndpoint {
            name: name.into(),
            host: "10.0.0.1".into(),
            port,
        }
    }

    fn up(port: u16) -> Upstream {
        Upstream {
            host: "10.0.0.1".into(),
            port,
        }
    }

    /// A reply of epoch 2 naming `primary` (port 5432 for node1, 5433 for node2).
    fn reply(primary: Option<&str>) -> pb::HeartbeatReply {
        pb::HeartbeatReply {
            epoch: 2,
            primary: primary.map(|p| endpoint(p, if p == "node1" { 5432 } else { 5433 })),
            ..Default::default()
        }
    }

    fn running_primary() -> Local {
        Local {
            me: "node1".into(),
            initialized: true,
            running: true,
            lease_valid: true,
            lease_file_current: true,
            commit_check_ok: true,
            ..Default::default()
        }
    }

    fn running_standby() -> Local {
        Local {
            standby_data: true,
            lease_valid: false,
            following: Some(up(5433)),
            ..running_primary()
        }
    }

    fn report(role: &str) -> pb::NodeReport {
        pb::NodeReport {
            role: role.into(),
            postgres_up: role != "stopped",
            ..Default::default()
        }
    }

    #[test]
    fn a_reply_from_an_older_epoch_is_ignored_whole() {
        let mut r = reply(Some("node1"));
        r.lease_ms = 1000;
        assert_eq!(
            receive("node1", 3, &r),
            Reception::Stale {
                reply_epoch: 2,
                seen_epoch: 3
            }
        );
    }

    #[test]
    fn only_a_grant_extends_the_lease_and_only_another_primary_ends_it() {
        let mut r = reply(Some("node1"));
        r.lease_ms = 1000;
        let Reception::Accept {
            new_epoch,
            lease: LeaseChange::Grant(usable),
        } = receive("node1", 1, &r)
        else {
            panic!("a grant")
        };
        assert_eq!(new_epoch, Some(2));
        assert!(
            usable < Duration::from_millis(1000),
            "less the margin: {usable:?}"
        );
        // Ours but not renewed: a failover is in flight, the old deadline runs out.
        r.lease_ms = 0;
        assert!(matches!(
            receive("node1", 2, &r),
            Reception::Accept {
                new_epoch: None,
                lease: LeaseChange::Keep
            }
        ));
        // A switchover's clean stop keeps the deadline: the guard must not kill it.
        let mut other = reply(Some("node2"));
        other.stop_cleanly = true;
        assert!(matches!(
            receive("node1", 2, &other),
            Reception::Accept {
                lease: LeaseChange::Keep,
                ..
            }
        ));
        other.stop_cleanly = false;
        assert!(matches!(
            receive("node1", 2, &other),
            Reception::Accept {
                lease: LeaseChange::Drop,
                ..
            }
        ));
        // A promotion order with a grant carries the candidate's lease.
        let mut promote = reply(Some("node2"));
        promote.promote = true;
        promote.lease_ms = 1000;
        assert!(matches!(
            receive("node1", 2, &promote),
            Reception::Accept {
                lease: LeaseChange::Grant(_),
                ..
            }
        ));
    }

    #[test]
    fn a_primary_that_is_not_the_epochs_primary_is_fenced_then_rejoins() {
        let r = reply(Some("node2"));
        assert_eq!(
            plan(&running_primary(), &report("primary"), &r),
            [Action::Fence(FenceReason::NotThePrimary)]
        );
        let stopped = Local {
            running: false,
            ..running_primary()
        };
        assert_eq!(plan(&stopped, &report("stopped"), &r), [Action::Rejoin(up(5433))]);
        // No new primary yet: it waits, fenced.
        assert!(matches!(
            plan(&stopped, &report("stopped"), &reply(None))[..],
            [Action::Wait { what: "rejoin", .. }]
        ));
        // A frozen or hung primary is fenced all the same.
        assert_eq!(
            plan(&running_primary(), &report("unknown"), &reply(None)),
            [Action::Fence(FenceReason::NotThePrimary)]
        );
        // A switchover asks for a clean stop instead.
        let mut r = reply(Some("node2"));
        r.stop_cleanly = true;
        assert_eq!(
            plan(&running_primary(), &report("primary"), &r),
            [Action::StopCleanly]
        );
    }

    #[test]
    fn a_half_promoted_node_that_is_no_longer_the_candidate_is_fenced_before_it_rejoins() {
        // With primary data, and even with standby data (the promotion may be ending
        // as it is fenced): what the data is gets read again next round.
        let half_promoted = Local {
            promoting: true,
            standby_data: false,
            ..running_primary()
        };
        let not_begun = Local {
            promoting: true,
            ..running_standby()
        };
        for (local, role) in [(half_promoted, "primary"), (not_begun, "standby")] {
            assert_eq!(
                plan(&local, &report(role), &reply(Some("node2"))),
                [
                    Action::Fence(FenceReason::NoLongerCandidate),
                    Action::ClearPromoting
                ],
                "{role}"
            );
        }
        // Fenced: rejoined next round.
        let fenced = Local {
            running: false,
            ..running_primary()
        };
        assert_eq!(
            plan(&fenced, &report("stopped"), &reply(Some("node2"))),
            [Action::Rejoin(up(5433))]
        );
        // Committed as the primary: the marker goes, nothing else.
        let local = Local {
            promoting: true,
            ..running_primary()
        };
        assert_eq!(
            plan(&local, &report("primary"), &reply(Some("node1"))),
            [Action::ClearPromoting]
        );
    }

    #[test]
    fn a_promotion_needs_a_running_standby_a_written_lease_and_the_commit_check() {
        let mut r = reply(None);
        r.promote = true;
        r.synchronous_standby_names = "ANY 1 (\"node3\")".into();
        r.standby_slots = vec!["node3".into()];
        let granted = Local {
            lease_valid: true,
            ..running_standby()
        };
        assert_eq!(
            plan(&granted, &report("standby"), &r),
            [Action::Promote {
                synchronous_standby_names: "ANY 1 (\"node3\")".into(),
                slots: vec!["node3".into()]
            }]
        );
        for (local, why) in [
            (running_standby(), "no primary lease"),
            (
                Local {
                    lease_file_current: false,
                    ..granted.clone()
                },
                "lease file",
            ),
            (
                Local {
                    commit_check_ok: false,
                    ..granted.clone()
                },
                "commit-time lease check",
            ),
            (
                Local {
                    promised_for: Some(Duration::from_millis(400)),
                    ..granted.clone()
                },
                "promised the old primary (failsafe) not to be promoted for 400 ms more",
            ),
            (
                Local {
                    promised_for: Some(Duration::from_millis(400)),
                    running: false,
                    ..granted.clone()
                },
                "promised the old primary",
            ),
        ] {
            match &plan(&local, &report("standby"), &r)[..] {
                [Action::Wait {
                    what: "promote",
                    why: w,
                }] => assert!(w.contains(why), "{w}"),
                other => panic!("{why}: {other:?}"),
            }
        }
        // A hung server is not promoted.
        assert!(matches!(
            plan(&granted, &report("unknown"), &r)[..],
            [Action::Wait { what: "promote", .. }]
        ));
        // Down: started first (as the candidate); promoted already: nothing.
        let down = Local {
            running: false,
            ..granted.clone()
        };
        assert_eq!(
            plan(&down, &report("stopped"), &r),
            [Action::StartUnderLease("start the promotion candidate")]
        );
        assert_eq!(plan(&granted, &report("primary"), &r), []);
    }

    #[test]
    fn in_maintenance_a_stopped_node_is_left_stopped_but_a_rogue_primary_is_still_fenced() {
        let mut r = reply(Some("node2"));
        r.maintenance = true;
        let stopped = Local {
            running: false,
            ..running_standby()
        };
        assert!(matches!(
            plan(&stopped, &report("stopped"), &r)[..],
            [Action::Wait {
                what: "maintenance",
                ..
            }]
        ));
        let old_primary = Local {
            running: false,
            ..running_primary()
        };
        assert!(matches!(
            plan(&old_primary, &report("stopped"), &r)[..],
            [Action::Wait {
                what: "maintenance",
                ..
            }]
        ));
        assert_eq!(
            plan(&running_primary(), &report("primary"), &r),
            [Action::Fence(FenceReason::NotThePrimary)]
        );
        r.maintenance = false;
        assert_eq!(plan(&stopped, &report("stopped"), &r), [Action::StartStandby]);
    }

    #[test]
    fn a_rebuild_is_done_once_and_never_of_the_primary_or_a_running_primarys_data() {
        let mut r = reply(Some("node2"));
        r.reinit = 7;
        assert_eq!(
            plan(&running_standby(), &report("standby"), &r),
            [Action::Reinit {
                primary: up(5433),
                token: 7
            }]
        );
        let done = Local {
            reinit_done: 7,
            ..running_standby()
        };
        assert_eq!(plan(&done, &report("standby"), &r), []);
        assert_eq!(
            plan(&running_primary(), &report("primary"), &r),
            [Action::Fence(FenceReason::NotThePrimary)],
            "a running old primary is fenced first"
        );
        let mut mine = reply(Some("node1"));
        mine.reinit = 7;
        assert!(!plan(&running_primary(), &report("primary"), &mine)
            .iter()
            .any(|a| matches!(a, Action::Reinit { .. })));
    }

    #[test]
    fn a_stopped_primary_starts_only_when_the_coordinators_ask() {
        let local = Local {
            running: false,
            ..running_primary()
        };
        assert!(matches!(
            plan(&local, &report("stopped"), &reply(Some("node1")))[..],
            [Action::Wait { what: "primary", .. }]
        ));
        let mut r = reply(Some("node1"));
        r.start_primary = true;
        assert_eq!(
            plan(&local, &report("stopped"), &r),
            [Action::StartUnderLease("start as primary")]
        );
    }

    #[test]
    fn the_primary_applies_the_sync_standbys_and_slots_decided() {
        let mut r = reply(Some("node1"));
        r.synchronous_standby_names = "ANY 1 (\"node2\")".into();
        r.standby_slots = vec!["node2".into(), "Node-3".into()];
        let mut rep = report("primary");
        rep.replicas = vec![pb::ReplicationInfo {
            application_name: "node2".into(),
            ..Default::default()
        }];
        assert_eq!(
            plan(&running_primary(), &rep, &r),
            [
                Action::SetSyncNames("ANY 1 (\"node2\")".into()),
                Action::EnsureSlots(vec!["node_3".into()])
            ]
        );
        rep.synchronous_standby_names = r.synchronous_standby_names.clone();
        rep.replicas.push(pb::ReplicationInfo {
            application_name: "Node-3".into(),
            ..Default::default()
        });
        assert_eq!(plan(&running_primary(), &rep, &r), []);
    }

    #[test]
    fn a_standby_follows_the_published_primary_and_is_kept_running() {
        let mut rep = report("standby");
        rep.timeline = 2;
        rep.receive_lsn = "0/3000100".into();
        rep.replay_lsn = "0/3000000".into();
        let r = reply(Some("node1"));
        let me = Local {
            me: "node2".into(),
            ..running_standby()
        };
        assert_eq!(
            plan(&me, &rep, &r),
            [Action::Follow {
                primary: up(5432),
                check_divergence: Some(DivergenceCheck {
                    timeline: 2,
                    lsn: Lsn::parse("0/3000100")
                }),
                reload: true
            }]
        );
        let down = Local {
            running: false,
            ..me.clone()
        };
        assert_eq!(
            plan(&down, &report("stopped"), &r),
            [
                Action::Follow {
                    primary: up(5432),
                    check_divergence: None,
                    reload: false
                },
                Action::StartStandby
            ]
        );
        let following = Local {
            following: Some(up(5432)),
            ..me
        };
        rep.wal_receiver_status = "streaming".into();
        assert_eq!(plan(&following, &rep, &r), []);
        // Following, but not streaming (started with WAL past the fork point?): checked
        // once it has not streamed for a while, and not again soon.
        rep.wal_receiver_status = "waiting".into();
        let following = Local {
            not_streaming_for: DIVERGENCE_PATIENCE - Duration::from_millis(1),
            ..following
        };
        assert_eq!(plan(&following, &rep, &r), []);
        let following = Local {
            not_streaming_for: DIVERGENCE_PATIENCE,
            divergence_checked_ago: Some(DIVERGENCE_PATIENCE - Duration::from_millis(1)),
            ..following
        };
        assert_eq!(plan(&following, &rep, &r), []);
        let following = Local {
            divergence_checked_ago: Some(DIVERGENCE_PATIENCE),
            ..following
        };
        assert_eq!(
            plan(&following, &rep, &r),
            [Action::CheckDivergence {
                primary: up(5432),
                check: DivergenceCheck {
                    timeline: 2,
                    lsn: Lsn::parse("0/3000100")
                }
            }]
        );
        assert!(matches!(
            plan(&following, &report("unknown"), &r)[..],
            [Action::Unhealthy(_)]
        ));
    }

    #[test]
    fn only_lasting_streaming_ends_a_spell_without() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut w = StreamWatch::default();
        w.observe(Some(true), at(0));
        assert_eq!(w.not_streaming_for(at(50)), Duration::ZERO);
        w.observe(Some(false), at(100));
        // A diverged standby's receiver streams the old timeline for a moment.
        w.observe(Some(true), at(5_000));
        w.observe(Some(false), at(5_050));
        w.observe(Some(true), at(10_000));
        assert_eq!(w.not_streaming_for(at(10_100)), Duration::from_millis(10_000));
        // Streaming that lasts a second ends it.
        w.observe(Some(true), at(11_000));
        assert_eq!(w.not_streaming_for(at(11_000)), Duration::ZERO);
        // Not a running standby: forgotten.
        w.observe(Some(false), at(12_000));
        w.observe(None, at(13_000));
        assert_eq!(w.not_streaming_for(at(20_000)), Duration::ZERO);
    }

    #[test]
    fn an_empty_data_directory_is_created_by_the_bootstrap_grant_or_a_clone() {
        let empty = Local {
            me: "node2".into(),
            ..Default::default()
        };
        let mut r = reply(None);
        assert!(matches!(
            plan(&empty, &report("stopped"), &r)[..],
            [Action::Wait { what: "create", .. }]
        ));
        r.bootstrap = true;
        assert_eq!(plan(&empty, &report("stopped"), &r), [Action::InitPrimary]);
        assert_eq!(
            plan(&empty, &report("stopped"), &reply(Some("node1"))),
            [Action::Clone(up(5432))]
        );
    }
}
