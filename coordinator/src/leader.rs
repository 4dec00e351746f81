//! The Raft leader's control loop: every few tens of milliseconds, for every cluster,
//! commit what the pure decisions call for — the next failover step
//! ([`crate::failover::decide`]) and sync-set changes ([`crate::sync::plan`]).
//!
//! Every step is a compare-and-set on the replicated state, so a step decided on a
//! stale view, or repeated by a new leader, is refused and decided again.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

use crate::failover::stonith::{self, StonithConfig};
use crate::failover::{decide, lease_expired, Step};
use crate::observe::health::node_statuses;
use crate::observe::routes::{routes, worth_publishing};
use crate::observe::{ClusterReports, Reports};
use crate::raft::group::{Group, GroupId, Reform};
use crate::raft::leadership::Leadership;
use crate::raft::state_machine::StateHandle;
use crate::raft::Raft;
use crate::state::{Cluster, Command, CommandError, Order};
use crate::sync::plan;

/// How often the leader reconsiders every cluster. Short: detection and each failover
/// step wait for this loop.
const INTERVAL: Duration = Duration::from_millis(25);

/// A timer this late means the coordinator was paused (SIGSTOP, a VM pause, starved of
/// CPU): every report it holds is that much older than its age says, and a primary
/// would look silent. It starts afresh then, as a new leader does: it counts no lease
/// as expired and no node as silent for a full lease (DESIGN.md, "a new leader starts
/// from nothing"). A quarter of the default failure timeout.
const PAUSED: Duration = Duration::from_millis(250);

/// How often [`PauseWatch`] looks at the clock.
const TICK: Duration = Duration::from_millis(10);

/// Counts this process's pauses: a task of its own that should wake every [`TICK`]
/// and woke more than [`PAUSED`] late. Apart from the loop, so the loop's own waits
/// (a slow commit) are not taken for one, and a pause during them is.
struct PauseWatch {
    pauses: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl PauseWatch {
    fn start() -> PauseWatch {
        let pauses = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = pauses.clone();
        let task = tokio::spawn(async move {
            loop {
                let before = Instant::now();
                tokio::time::sleep(TICK).await;
                let late = before.elapsed().saturating_sub(TICK);
                if late > PAUSED {
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    warn!(late_ms = late.as_millis() as u64, "this coordinator was paused");
                }
            }
        });
        PauseWatch { pauses, task }
    }

    fn count(&self) -> u64 {
        self.pauses.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for PauseWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What the leader should commit for `cluster` now — the next failover step, else a
/// sync-set change — and why a needed failover is stuck, if it is. Pure.
pub fn next_command(
    cluster: &Cluster,
    reports: &ClusterReports,
    at_ms: u64,
) -> (Option<Command>, Option<String>) {
    let name = cluster.name.clone();
    let old = cluster
        .failover
        .as_ref()
        .map(|f| f.old_primary.clone())
        .or_else(|| cluster.primary.clone());
    let expired = old.is_some_and(|o| lease_expired(cluster, reports, &o));
    // Before anything else: a failover stuck on a member the primary has not named yet
    // gets going once it has (see `ack_roster`).
    if let Some(ack) = ack_roster(cluster, reports) {
        return (Some(ack), None);
    }
    let step = decide(cluster, reports, expired);
    let command = match step {
        Step::Stuck(why) => return (None, Some(why)),
        Step::Wait => None,
        Step::Start { old_primary, reason } => Some(Command::StartFailover {
            cluster: name.clone(),
            from_epoch: cluster.epoch,
            old_primary,
            candidate: None,
            accept_data_loss: false,
            kind: "failover".into(),
            reason,
            actor: "coordinator".into(),
            at_ms,
            scheduled: None,
        }),
        Step::Choose {
            candidate,
            lsn,
            fenced_by,
            sync_set,
        } => Some(Command::ChooseCandidate {
            cluster: name.clone(),
            to_epoch: cluster.epoch,
            candidate,
            lsn,
            fenced_by,
            sync_set,
            at_ms,
        }),
        Step::Abandon { candidate, reason } => Some(Command::AbandonCandidate {
            cluster: name.clone(),
            to_epoch: cluster.epoch,
            candidate,
            reason,
            at_ms,
        }),
        Step::Complete { primary } => Some(Command::CompletePromotion {
            cluster: name.clone(),
            to_epoch: cluster.epoch,
            primary,
            at_ms,
        }),
    };
    let command = command
        .or_else(|| scheduled_switchover(cluster, reports, at_ms))
        .or_else(|| {
            plan(cluster, reports)
                .commit
                .map(|(next, reason)| Command::SetSyncSet {
                    cluster: name.clone(),
                    expected: cluster.sync_set.clone(),
                    sync_set: next,
                    reason,
                    at_ms,
                })
        })
        .or_else(|| settle_lease(cluster, reports, at_ms))
        .or_else(|| orders_done(cluster, reports, at_ms))
        .or_else(|| {
            // A new leader first collects reports for a failure timeout; until then
            // every replica would look disconnected. So would they during a handover
            // (no primary, then one that has not reported as primary yet): the view
            // published before stands until the new primary reports (routers and
            // PgBouncer aliases of replicas it does not involve are left alone).
            if reports.leader_for < Duration::from_millis(cluster.policy.failure_timeout_ms)
                || cluster.failover.is_some()
                || crate::observe::health::primary_report(cluster, reports).is_none()
            {
                return None;
            }
            let next = routes(cluster, &node_statuses(cluster, reports));
            worth_publishing(cluster, &next).then_some(Command::PublishRoutes {
                cluster: name,
                routes: next,
            })
        });
    (command, None)
}

/// Records the members the primary reports it would ask for failsafe promises, when
/// it names one not recorded yet (see [`Cluster::primary_roster`]). Pure.
fn ack_roster(cluster: &Cluster, reports: &ClusterReports) -> Option<Command> {
    let primary = cluster.primary.as_ref()?;
    let report = &crate::observe::health::fresh(cluster, reports, primary)?.report;
    let known = cluster.primary_roster.as_ref();
    let new = report
        .failsafe_roster
        .iter()
        .any(|m| m != primary && cluster.members.contains_key(m) && known.is_none_or(|k| !k.contains(m)));
    new.then(|| Command::AckRoster {
        cluster: cluster.name.clone(),
        epoch: cluster.epoch,
        primary: primary.clone(),
        roster: report.failsafe_roster.clone(),
    })
}

/// How long past its time a scheduled switchover that cannot start yet (its target
/// not reporting for a moment) is retried before it is dropped.
pub const SCHEDULE_GRACE: Duration = Duration::from_secs(30);

/// Starts the scheduled switchover once it is due, with the checks of a switchover
/// asked then; drops it when the primary changed meanwhile, or when it still cannot
/// start [`SCHEDULE_GRACE`] past its time. A new leader first listens to the agents
/// for a failure timeout (until then nobody looks like a running standby). Pure.
fn scheduled_switchover(cluster: &Cluster, reports: &ClusterReports, at_ms: u64) -> Option<Command> {
    let s = cluster.scheduled_switchover.as_ref()?;
    if at_ms < s.at_ms
        || cluster.failover.is_some()
        || reports.leader_for < Duration::from_millis(cluster.policy.failure_timeout_ms)
    {
        return None;
    }
    let cancel = |why: String| Command::CancelSwitchover {
        cluster: cluster.name.clone(),
        why,
        actor: "coordinator".into(),
        at_ms,
    };
    if cluster.policy.maintenance {
        return Some(cancel("the cluster is paused".into()));
    }
    if cluster.primary.as_deref() != Some(s.from.as_str()) {
        return Some(cancel(format!("{} is no longer the primary", s.from)));
    }
    let request = crate::failover::manual::Request {
        to: s.to.clone(),
        accept_data_loss: false,
        kind: crate::failover::manual::Kind::Switchover,
        actor: s.actor.clone(),
    };
    match crate::failover::manual::hand_over(cluster, reports, request, at_ms) {
        Ok(commands) => commands.into_iter().next().map(|mut c| {
            if let Command::StartFailover {
                reason, scheduled, ..
            } = &mut c
            {
                *reason = format!("{}: {reason}", crate::state::SCHEDULED);
                *scheduled = Some(s.log_index);
            }
            c
        }),
        Err(e) if at_ms < s.at_ms + SCHEDULE_GRACE.as_millis() as u64 => {
            tracing::debug!(cluster = %cluster.name, "scheduled switchover cannot start yet: {e}");
            None
        }
        Err(e) => Some(cancel(format!(
            "it could not start within {} s of its time: {e}",
            SCHEDULE_GRACE.as_secs()
        ))),
    }
}

/// Runs the STONITH hook for `target` and records how it ended.
async fn shoot_the_other_node(raft: Raft, config: StonithConfig, target: stonith::Target) {
    warn!(cluster = %target.cluster, node = %target.node, epoch = target.epoch, "running the STONITH hook");
    let outcome = stonith::run(&config, &target).await;
    warn!(cluster = %target.cluster, node = %target.node, epoch = target.epoch, %outcome, "STONITH hook");
    let record = Command::RecordStonith {
        cluster: target.cluster,
        node: target.node,
        epoch: target.epoch,
        outcome,
        at_ms: now_ms(),
    };
    if let Err(e) = raft.client_write(record).await {
        warn!("the STONITH outcome was not recorded: {e}");
    }
}

/// Clears an order once the member's agent reports it done. Pure.
fn orders_done(cluster: &Cluster, reports: &ClusterReports, at_ms: u64) -> Option<Command> {
    cluster.orders.iter().find_map(|(member, orders)| {
        let r = &crate::observe::health::fresh(cluster, reports, member)?.report;
        orders.iter().find_map(|(order, asked)| {
            let done = match order {
                Order::Reinit => r.reinit_done,
                Order::Restart => r.restart_done,
                Order::Reload => r.reload_done,
            };
            (done >= asked.token).then(|| Command::NodeDone {
                cluster: cluster.name.clone(),
                member: member.clone(),
                order: *order,
                token: asked.token,
                at_ms,
            })
        })
    })
}

/// Clears `lease_ms_settling` once no lease of that length can still run: an earlier
/// leader's ended within that long (plus margin and slack) of this leader's election,
/// and this leader has granted only shorter ones for that long. Pure.
fn settle_lease(cluster: &Cluster, reports: &ClusterReports, at_ms: u64) -> Option<Command> {
    let settling = cluster.lease_ms_settling?;
    let (seen, seen_for) = reports.settling_seen_for?;
    let longest = Duration::from_millis(settling.lease_ms);
    let wait = longest + pgquorum_client::lease::margin(longest);
    let settled = seen == settling.since_log_index
        && seen_for >= wait
        && reports.leader_for >= wait + reports.grant_window;
    settled.then(|| Command::SettleLease {
        cluster: cluster.name.clone(),
        since_log_index: settling.since_log_index,
        at_ms,
    })
}

/// One round of the leader's loop for `cluster` at `now`: notes what it applied, then
/// decides on the reports as of `now` ([`next_command`]).
pub fn step(
    cluster: &Cluster,
    reports: &Reports,
    now: Instant,
    at_ms: u64,
) -> (Option<Command>, Option<String>) {
    reports.note_settling(
        &cluster.name,
        cluster.lease_ms_settling.map(|s| s.since_log_index),
        now,
    );
    next_command(cluster, &reports.cluster(&cluster.name, now), at_ms)
}

/// What the leader must commit before anything else: the group a force-new-group
/// made of this coordinator (the replicated state still names the old one), which
/// holds every database node until readmitted. Pure.
pub fn record_group(
    state_group: &str,
    local: Option<&GroupId>,
    audit: Option<&Reform>,
    at_ms: u64,
) -> Option<Command> {
    let local = local?;
    let recorded = recorded_group(state_group)?;
    if &recorded == local {
        return None;
    }
    let reform = audit.filter(|r| &r.group == local);
    Some(Command::RecordGroup {
        group: local.to_string(),
        previous: recorded.to_string(),
        formed_by: reform.map_or(0, |r| r.formed_by),
        reason: reform.map_or_else(String::new, |r| r.reason.clone()),
        actor: reform.map_or_else(|| "coordinator".into(), |r| r.actor.clone()),
        at_ms,
    })
}

/// The group the replicated state names (empty: the founding group); None if
/// unreadable.
fn recorded_group(state_group: &str) -> Option<GroupId> {
    if state_group.is_empty() {
        Some(GroupId::founding())
    } else {
        GroupId::parse(state_group)
    }
}

/// Whether this coordinator's group (`local`) is not the one the replicated state
/// names yet: a force-new-group whose record the leader has still to commit.
pub fn group_unrecorded(state_group: &str, local: Option<&GroupId>) -> bool {
    local.is_some_and(|l| recorded_group(state_group).is_some_and(|r| &r != l))
}

pub async fn run(
    raft: Raft,
    leadership: Leadership,
    state: StateHandle,
    reports: Reports,
    group: Group,
    stonith: Option<StonithConfig>,
) {
    let mut was_leader = false;
    let mut stuck: HashMap<String, String> = HashMap::new();
    let pauses = PauseWatch::start();
    let mut pauses_seen = pauses.count();
    loop {
        tokio::time::sleep(INTERVAL).await;
        if pauses.count() != pauses_seen {
            pauses_seen = pauses.count();
            if was_leader {
                warn!("its reports are stale after the pause: starting afresh as a new leader would");
                reports.clear(Instant::now());
            }
        }
        // Leadership first, then the clock: read the other way round, a pause between
        // the two would date "leader since" before the election.
        let Some(lead) = leadership.current() else {
            if was_leader {
                reports.clear(Instant::now());
            }
            was_leader = false;
            continue;
        };
        let now = Instant::now();
        was_leader = true;
        reports.lead(lead.term, now);
        let pending_group = {
            let applied = state.read();
            let audit = group.audit().unwrap_or_default();
            record_group(&applied.state.group, group.id().as_ref(), audit.last(), now_ms())
        };
        if let Some(command) = pending_group {
            // Until it is committed, nothing else: no node is held yet.
            match raft.client_write(command.clone()).await {
                Ok(_) => info!(?command, "committed"),
                Err(e) => warn!(?command, "not committed: {e}"),
            }
            continue;
        }
        let mut commands = Vec::new();
        {
            let applied = state.read();
            for c in applied.state.clusters.values() {
                let (command, why) = step(c, &reports, now, now_ms());
                match why {
                    Some(why) if stuck.get(&c.name) != Some(&why) => {
                        warn!(cluster = %c.name, "{why}");
                        stuck.insert(c.name.clone(), why);
                    }
                    Some(_) => {}
                    None => {
                        stuck.remove(&c.name);
                    }
                }
                let shoot = match (&stonith, &command) {
                    (Some(_), Some(cmd)) => stonith::target(c, &reports.cluster(&c.name, now), cmd),
                    _ => None,
                };
                commands.extend(command.map(|cmd| (cmd, shoot)));
            }
        }
        for (command, shoot) in commands {
            match raft.client_write(command.clone()).await {
                Ok(r) => match r.data {
                    Ok(_) => {
                        info!(?command, "committed");
                        if let (Some(config), Some(target)) = (stonith.clone(), shoot) {
                            tokio::spawn(shoot_the_other_node(raft.clone(), config, target));
                        }
                    }
                    // Someone moved first; the next round decides again.
                    Err(CommandError::SyncSetChanged { .. } | CommandError::FailoverStep(_)) => {}
                    Err(e) => warn!(?command, "refused: {e}"),
                },
                Err(e) => warn!(?command, "not committed: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_primarys_reported_roster_is_recorded_when_it_names_someone_new() {
        use crate::observe::health::tests::{cluster, primary, reports};
        let mut c = cluster();
        c.primary_roster = Some(["node2".to_string()].into());
        let mut report = primary("0/5000000", "", vec![]);
        report.failsafe_roster = vec!["node2".into(), "node3".into()];
        let r = reports(vec![("node1", report.clone(), 10)]);
        assert_eq!(
            ack_roster(&c, &r),
            Some(Command::AckRoster {
                cluster: "main".into(),
                epoch: 1,
                primary: "node1".into(),
                roster: vec!["node2".into(), "node3".into()],
            })
        );
        assert!(
            matches!(next_command(&c, &r, 0).0, Some(Command::AckRoster { .. })),
            "recorded before any other step is decided"
        );
        c.primary_roster = Some(["node2".to_string(), "node3".to_string()].into());
        assert_eq!(ack_roster(&c, &r), None, "nothing new");
        report.failsafe_roster = vec!["node9".into()];
        let r = reports(vec![("node1", report, 10)]);
        assert_eq!(ack_roster(&c, &r), None, "not a member");
    }
    use crate::state::Policy;

    #[test]
    fn routes_are_published_only_while_a_primary_reports_as_such() {
        use crate::observe::health::tests::{cluster, primary, replica, reports, standby};
        let mut c = cluster();
        // Neither a failover nor a sync-set change to decide first.
        c.policy = Policy::default()
            .with_settings([
                ("sync_mode", "off"),
                ("sync_standbys", "0"),
                ("maintenance", "true"),
            ])
            .unwrap();
        let with_primary = |p: bool| {
            let mut entries = vec![("node2", standby("0/5000000", 0), 10)];
            if p {
                entries.push((
                    "node1",
                    primary(
                        "0/5000000",
                        "",
                        vec![replica("node2", "streaming", "async", "0/5000000")],
                    ),
                    10,
                ));
            }
            let mut r = reports(entries);
            r.leader_for = Duration::from_secs(60);
            r
        };
        let publishes = |c: &Cluster, r: &ClusterReports| {
            matches!(next_command(c, r, 0).0, Some(Command::PublishRoutes { .. }))
        };
        assert!(publishes(&c, &with_primary(true)));
        assert!(
            !publishes(&c, &with_primary(false)),
            "every replica would look disconnected"
        );
        c.failover = Some(crate::state::FailoverRecord {
            kind: "switchover".into(),
            candidate: "node2".into(),
            ..crate::observe::health::tests::started_from_node1()
        });
        assert!(!publishes(&c, &with_primary(true)), "not during a handover");
    }

    #[test]
    fn a_scheduled_switchover_starts_at_its_time_and_is_dropped_when_it_cannot() {
        use crate::observe::health::tests::{cluster, primary, replica, reports, standby};
        let mut c = cluster();
        c.sync_set = vec!["node2".into()];
        c.scheduled_switchover = Some(crate::state::ScheduledSwitchover {
            at_ms: 10_000,
            to: Some("node2".into()),
            from: "node1".into(),
            actor: "ops".into(),
            asked_at_ms: 1_000,
            log_index: 4,
        });
        let mut r = reports(vec![
            (
                "node1",
                primary(
                    "0/5000000",
                    "ANY 1 (\"node2\")",
                    vec![replica("node2", "streaming", "sync", "0/5000000")],
                ),
                10,
            ),
            ("node2", standby("0/5000000", 0), 10),
        ]);
        r.leader_for = Duration::from_secs(60);
        assert_eq!(scheduled_switchover(&c, &r, 9_999), None, "not yet");
        match scheduled_switchover(&c, &r, 10_000) {
            Some(Command::StartFailover {
                kind,
                candidate,
                reason,
                ..
            }) => {
                assert_eq!(
                    (kind.as_str(), candidate.as_deref()),
                    ("switchover", Some("node2"))
                );
                assert!(reason.starts_with(crate::state::SCHEDULED), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        r.leader_for = Duration::from_millis(100);
        assert_eq!(
            scheduled_switchover(&c, &r, 10_000),
            None,
            "a new leader listens first"
        );
        r.leader_for = Duration::from_secs(60);

        let silent = reports(vec![("node1", primary("0/5000000", "", vec![]), 10)]);
        let mut silent = silent;
        silent.leader_for = Duration::from_secs(60);
        assert_eq!(
            scheduled_switchover(&c, &silent, 10_000),
            None,
            "retried for a while"
        );
        assert!(matches!(
            scheduled_switchover(&c, &silent, 10_000 + SCHEDULE_GRACE.as_millis() as u64),
            Some(Command::CancelSwitchover { .. })
        ));
        c.primary = Some("node3".into());
        assert!(matches!(
            scheduled_switchover(&c, &r, 10_000),
            Some(Command::CancelSwitchover { why, .. }) if why.contains("no longer the primary")
        ));
    }

    #[test]
    fn a_lowered_lease_settles_only_once_no_longer_lease_can_run() {
        let mut c = Cluster::new("main".into(), Policy::default(), 0);
        let ms = Duration::from_millis;
        let mut r = ClusterReports {
            grant_window: ms(150),
            ..Default::default()
        };
        assert!(settle_lease(&c, &r, 1).is_none(), "nothing settles");
        c.lease_ms_settling = Some(crate::state::LeaseSettling {
            lease_ms: 8_000,
            since_log_index: 7,
        });
        // 8000 + margin 160: since this leader first applied it, and since its election
        // plus the grant window.
        r.settling_seen_for = Some((7, ms(8_159)));
        r.leader_for = ms(60_000);
        assert!(
            settle_lease(&c, &r, 1).is_none(),
            "this leader may have granted 8 s"
        );
        r.settling_seen_for = Some((7, ms(8_160)));
        r.leader_for = ms(8_309);
        assert!(
            settle_lease(&c, &r, 1).is_none(),
            "an earlier leader may have granted 8 s"
        );
        r.leader_for = ms(8_310);
        assert!(matches!(
            settle_lease(&c, &r, 1),
            Some(Command::SettleLease {
                since_log_index: 7,
                ..
            })
        ));
        r.settling_seen_for = Some((5, ms(60_000)));
        assert!(settle_lease(&c, &r, 1).is_none(), "seen for an earlier change");
    }
}
