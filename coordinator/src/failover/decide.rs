//! The failover decision: given the replicated state and the latest reports, what is
//! the next step? Pure: no I/O, no clock (ages come in the reports), so it is tested
//! exhaustively and driven by the simulation in `tests`.
//!
//! A failover moves through steps committed in the cluster's failover record, so a new
//! Raft leader resumes it where it stands and never starts a second one:
//!
//! 1. **Detect** — the primary counts as failed when
//!    - its agent is alive and reports Postgres stopped after this leader saw it
//!      running (*fast path*: the agent's report is the fence), or
//!    - its agent reports Postgres not answering for `failure_timeout`, or its agent
//!      is silent for `failure_timeout`, **and** no standby's agent reached the
//!      primary's Postgres within `failure_timeout` either (a silent agent on a
//!      healthy primary raises an alert, not a failover).
//!
//!    A failover starts only if a candidate exists (below); otherwise the cluster
//!    keeps its epoch and primary and an alert asks for an operator.
//! 2. **Start** — commit epoch+1 with no primary: the old primary's agent, on its
//!    next reply, learns it is no longer primary and stops Postgres.
//! 3. **Fence, then choose** — wait until the old primary is certainly not taking
//!    writes: its agent reports Postgres stopped, or its lease has certainly run out
//!    (`lease_expired`, computed by the caller from the last grant and, for a new
//!    leader, one full lease from its election). Then commit the candidate.
//! 4. **Promote** — the candidate's agent promotes on its next heartbeat reply; when it
//!    reports itself primary, commit the promotion (new primary, endpoint version).
//!
//! Choosing (Invariant 2): in `strict` mode only members of the committed sync set
//! qualify, and only after hearing the received LSN of n − k + 1 of its n members
//! (with the primary waiting for k), so that one of them holds every acknowledged
//! commit; the most caught up wins, then priority, then name. A candidate must not be
//! `nofailover` and must be in an allowed region; if the most caught-up member is not
//! allowed, promoting a less caught-up one could lose commits, so nobody is chosen.

use std::time::Duration;

use pgquorum_client::lsn::Lsn;

use crate::observe::health::fresh;
use crate::observe::{ClusterReports, Observed, OwnLease};
use crate::state::{Cluster, Member, SyncMode};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do now (healthy, or waiting for a fence or a promotion).
    Wait,
    Start {
        old_primary: String,
        reason: String,
    },
    /// `sync_set`: the committed sync set from the promotion on (see [`sync_set_after`]).
    Choose {
        candidate: String,
        lsn: String,
        fenced_by: String,
        sync_set: Vec<String>,
    },
    Complete {
        primary: String,
    },
    /// The chosen candidate is lost (silent, lease run out): fail over again.
    Abandon {
        candidate: String,
        reason: String,
    },
    /// A failover is needed (or in flight) but cannot proceed on its own.
    Stuck(String),
}

/// A promotable member and the LSN it has received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    pub lsn: Lsn,
}

/// Whether `node` acknowledges every commit: it is in the committed sync set, and the
/// primary waits for all of the set's members (k of k).
fn acks_every_commit(cluster: &Cluster, node: &str) -> bool {
    let n = cluster.sync_set.len();
    cluster.sync_set.iter().any(|s| s == node) && (cluster.policy.sync_standbys as usize) >= n
}

fn standby_up(o: &Observed) -> bool {
    o.report.postgres_up && o.report.role == "standby"
}

/// Whether the node's data is this cluster's database (or the cluster has not
/// recorded which database it is yet).
fn same_database(cluster: &Cluster, o: &Observed) -> bool {
    cluster
        .system_identifier
        .is_none_or(|id| o.report.system_identifier == id)
}

/// Whether some standby's agent reached the primary's Postgres within `limit`.
fn a_standby_reaches_primary(
    cluster: &Cluster,
    reports: &ClusterReports,
    primary: &str,
    limit: Duration,
) -> bool {
    cluster.members.keys().filter(|m| m.as_str() != primary).any(|m| {
        fresh(cluster, reports, m)
            .and_then(|o| o.report.primary_probe_age_ms)
            .is_some_and(|age| Duration::from_millis(age) < limit)
    })
}

/// Why the primary counts as failed, if it does.
pub fn detect(cluster: &Cluster, reports: &ClusterReports) -> Option<String> {
    let primary = cluster.primary.as_deref()?;
    let limit = Duration::from_millis(cluster.policy.failure_timeout_ms);
    let reached = a_standby_reaches_primary(cluster, reports, primary, limit);
    match fresh(cluster, reports, primary) {
        Some(o) if o.report.postgres_up => None,
        Some(o) if o.report.role == "stopped" => {
            // Only a stop seen happening counts: after a restart of the whole
            // cluster the primary is simply not started yet.
            o.up_ago
                .map(|_| format!("Postgres on {primary} stopped (its agent confirms)"))
        }
        Some(o) => {
            let hung_for = o.up_ago.unwrap_or(reports.leader_for);
            (hung_for >= limit && !reached).then(|| {
                format!(
                    "Postgres on {primary} has not answered for {} ms and no standby reaches it ({})",
                    hung_for.as_millis(),
                    o.report.error
                )
            })
        }
        None => {
            let silent_for = reports
                .nodes
                .get(primary)
                .map(|o| o.age)
                .unwrap_or(reports.leader_for);
            (silent_for >= limit && !reached).then(|| {
                format!(
                    "the agent of {primary} has been silent for {} ms and no standby reaches its Postgres",
                    silent_for.as_millis()
                )
            })
        }
    }
}

fn region_allowed(cluster: &Cluster, member: &Member, old_primary: &str) -> bool {
    let allowed = &cluster.policy.auto_failover_regions;
    if allowed.is_empty() {
        cluster
            .members
            .get(old_primary)
            .is_none_or(|p| p.region == member.region)
    } else {
        allowed.contains(&member.region)
    }
}

/// Whether an observation was made after the old primary was fenced `fenced_ago`
/// (None: no fence to be after). Until the old primary stops, its standbys keep
/// receiving, and acknowledging, WAL: a report observed earlier can understate what a
/// standby holds, so comparing it with others' could pick one that lacks acknowledged
/// writes, or admit a lagging standby into the next sync set. Observations are dated
/// by the reply they followed (`Observed::seen_reply_ago`), on this leader's clock.
pub fn after_fence(o: &Observed, fenced_ago: Option<Duration>) -> bool {
    fenced_ago.is_none_or(|f| o.seen_reply_ago.is_some_and(|r| r <= f))
}

/// The member to promote in place of `old_primary`, or why there is none, on the
/// reports as they are (whether a failover could proceed at all).
pub fn choose(cluster: &Cluster, reports: &ClusterReports, old_primary: &str) -> Result<Candidate, String> {
    choose_after_fence(cluster, reports, old_primary, None)
}

/// [`choose`] counting only observations made after the fence (see [`after_fence`]):
/// what the actual choice is made on.
pub fn choose_after_fence(
    cluster: &Cluster,
    reports: &ClusterReports,
    old_primary: &str,
    fenced_ago: Option<Duration>,
) -> Result<Candidate, String> {
    let policy = &cluster.policy;
    let heard = |name: &String| {
        fresh(cluster, reports, name)
            .filter(|o| standby_up(o) && same_database(cluster, o))
            .filter(|o| after_fence(o, fenced_ago))
    };
    let lsn_of =
        |o: &Observed| Lsn::parse(&o.report.receive_lsn).or_else(|| Lsn::parse(&o.report.replay_lsn));

    let pool: Vec<&String> = if policy.sync_mode == SyncMode::Strict {
        let n = cluster.sync_set.len();
        if n == 0 {
            return Err("strict sync mode and the committed sync set is empty".into());
        }
        let k = (policy.sync_standbys as usize).clamp(1, n);
        let heard_count = cluster.sync_set.iter().filter(|s| heard(s).is_some()).count();
        if heard_count < n - k + 1 {
            return Err(format!(
                "strict sync mode: heard {heard_count} of the sync set [{}], need {} to be sure of every \
                 acknowledged commit",
                cluster.sync_set.join(", "),
                n - k + 1
            ));
        }
        cluster.sync_set.iter().collect()
    } else {
        cluster
            .members
            .keys()
            .filter(|m| m.as_str() != old_primary)
            .collect()
    };
    let mut heard_lsns: Vec<(&String, Lsn)> = pool
        .into_iter()
        .filter_map(|name| heard(name).and_then(|o| lsn_of(o).map(|l| (name, l))))
        .collect();
    if heard_lsns.is_empty() {
        return Err("no standby that could take over is reporting".into());
    }
    heard_lsns.sort_by_key(|(_, lsn)| std::cmp::Reverse(*lsn));
    let best = heard_lsns[0].1;
    if policy.sync_mode != SyncMode::Strict {
        let last_primary = reports
            .nodes
            .get(old_primary)
            .and_then(|o| Lsn::parse(&o.report.current_lsn))
            .unwrap_or_default();
        if last_primary.bytes_since(best) > policy.max_lag_on_failover_bytes {
            return Err(format!(
                "the most caught-up standby is {} bytes behind the primary's last known position, more than \
                 max_lag_on_failover_bytes ({})",
                last_primary.bytes_since(best),
                policy.max_lag_on_failover_bytes
            ));
        }
    }
    let mut eligible: Vec<&Member> = heard_lsns
        .iter()
        .filter(|(_, lsn)| *lsn == best)
        .filter_map(|(name, _)| cluster.members.get(*name))
        .filter(|m| !m.nofailover && !cluster.out_of_service(&m.name))
        .filter(|m| region_allowed(cluster, m, old_primary))
        .filter(|m| cluster.on_primary_roster(&m.name))
        .collect();
    eligible.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.name.cmp(&b.name)));
    match eligible.first() {
        Some(m) => Ok(Candidate {
            name: m.name.clone(),
            lsn: best,
        }),
        None => Err(format!(
            "the most caught-up standby ({}) may not be promoted automatically (nofailover, maintenance or \
             reinit, region, or not yet named by the primary's failsafe roster)",
            heard_lsns
                .iter()
                .filter(|(_, l)| *l == best)
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// How the old primary is known not to take writes, if it is, and for how long at
/// least it has not been taking any.
fn fenced(
    cluster: &Cluster,
    reports: &ClusterReports,
    old_primary: &str,
    lease_expired: bool,
) -> Option<(String, Duration)> {
    // Its agent's word counts only for an observation made after the latest reply
    // that granted it a lease (which may have ordered a start or a promotion that an
    // earlier "stopped" knows nothing of), and never while its data directory is
    // missing (the agent cannot see a postmaster that runs without one).
    if let Some(o) =
        fresh(cluster, reports, old_primary).filter(|o| o.followed_last_grant() && !o.report.initializing)
    {
        // It stopped before the first report of the unbroken run saying so.
        if !o.report.postgres_up && o.report.role == "stopped" {
            return Some(("its agent confirmed Postgres stopped".into(), o.role_for));
        }
        if o.report.postgres_up && o.report.role == "standby" {
            return Some(("it runs as a standby".into(), o.role_for));
        }
    }
    lease_expired.then(|| {
        (
            "its lease expired".into(),
            lease_over_for(cluster, reports, old_primary).unwrap_or_default(),
        )
    })
}

/// The sync set the new primary starts with: up to `sync_standbys` running, eligible
/// standbys that have received everything the candidate has (so every acknowledged
/// write), members of the old set first, then by priority and name.
///
/// Members of the old set that lag the candidate leave the set here: they may lack
/// writes the old primary acknowledged, and once the candidate (which holds them all)
/// leaves the set, a later failover could otherwise pick them. No primary waits for
/// anything at this point (the old one is fenced), so changing the set is safe.
/// Committing it with the candidate lets the new primary wait for a real standby from
/// its first moment, instead of for a placeholder until a later sync-set change.
///
/// The candidate's position is read from an observation made after the fence (see
/// [`after_fence`]); without one nobody joins. The others' may be older: a standby's
/// position only grows, so an older report can only leave it out.
pub fn sync_set_after(
    cluster: &Cluster,
    reports: &ClusterReports,
    candidate: &str,
    old_primary: &str,
    fenced_ago: Duration,
) -> Vec<String> {
    let k = if cluster.policy.sync_mode == SyncMode::Off {
        0
    } else {
        cluster.policy.sync_standbys as usize
    };
    let Some(floor) = fresh(cluster, reports, candidate)
        .filter(|o| after_fence(o, Some(fenced_ago)))
        .and_then(|o| Lsn::parse(&o.report.receive_lsn))
    else {
        return Vec::new();
    };
    let mut eligible: Vec<&Member> = cluster
        .members
        .values()
        .filter(|m| m.sync_eligible && m.name != candidate && m.name != old_primary)
        .filter(|m| !cluster.out_of_service(&m.name))
        .filter(|m| {
            fresh(cluster, reports, &m.name)
                .filter(|o| standby_up(o))
                .and_then(|o| Lsn::parse(&o.report.receive_lsn))
                .is_some_and(|l| l >= floor)
        })
        .collect();
    let rank = |name: &String| {
        cluster
            .sync_set
            .iter()
            .position(|s| s == name)
            .unwrap_or(usize::MAX)
    };
    eligible.sort_by(|a, b| {
        rank(&a.name)
            .cmp(&rank(&b.name))
            .then(b.priority.cmp(&a.priority))
            .then(a.name.cmp(&b.name))
    });
    eligible.into_iter().take(k).map(|m| m.name.clone()).collect()
}

/// Whether `node`'s primary lease has certainly run out by this coordinator's clock.
///
/// - Granted by this leader: a lease (plus the margin both sides agree on,
///   [`pgquorum_client::lease::margin`]) since the last grant.
/// - Granted by an earlier leader: that leader granted only after a quorum round that
///   started after the agent sent its heartbeat (the lease counts from that send), and
///   this leader's election came after that round started (a voter of that quorum
///   voted for it later), so every such lease ends within a lease of this election.
///   Hence a lease, the margin and, as slack, the grant window (an election timeout)
///   since this node leads in its term (`leader_for`).
pub fn lease_expired(cluster: &Cluster, reports: &ClusterReports, node: &str) -> bool {
    lease_over_for(cluster, reports, node).is_some()
}

/// How long ago `node`'s lease ran out at the latest; None while it may still run.
///
/// A primary that no leader answered may also write on its standbys' failsafe
/// promises: until the last one reported to it has run out (plus the margin).
fn lease_over_for(cluster: &Cluster, reports: &ClusterReports, node: &str) -> Option<Duration> {
    let lease = Duration::from_millis(cluster.policy.lease_ms);
    let over_own = reports
        .nodes
        .get(node)
        .map_or(OwnLease::Never, |o| o.own_lease)
        .over();
    let over_promises = promised_to(reports, node).over();
    // An earlier leader may have granted a longer lease before the policy lowered it.
    let earlier = lease.max(Duration::from_millis(
        cluster.lease_ms_settling.map_or(0, |s| s.lease_ms),
    ));
    let over_earlier = reports
        .leader_for
        .checked_sub(earlier + pgquorum_client::lease::margin(earlier) + reports.grant_window);
    Some(over_own?.min(over_earlier?).min(over_promises?))
}

/// The latest end (margin included) of the failsafe promises standbys report having
/// given `primary`. Each was counted by the standby from when it answered, which was
/// before it sent the report saying how much was left: ending it that long after the
/// report arrived errs late, the safe side.
pub fn promised_to(reports: &ClusterReports, primary: &str) -> OwnLease {
    reports
        .nodes
        .values()
        .filter_map(|o| {
            let p = o.report.promise.as_ref().filter(|p| p.primary == primary)?;
            Some(OwnLease::granted(o.age, Duration::from_millis(p.left_ms)))
        })
        .fold(OwnLease::Never, OwnLease::max)
}

/// The next step for `cluster`. `lease_expired`: the old primary's lease has certainly
/// run out by this coordinator's clock.
pub fn decide(cluster: &Cluster, reports: &ClusterReports, lease_expired: bool) -> Step {
    let Some(f) = &cluster.failover else {
        if cluster.policy.maintenance {
            return Step::Wait;
        }
        let Some(reason) = detect(cluster, reports) else {
            return Step::Wait;
        };
        let primary = cluster.primary.clone().unwrap_or_default();
        return match choose(cluster, reports, &primary) {
            Ok(_) => Step::Start {
                old_primary: primary,
                reason,
            },
            Err(why) => Step::Stuck(format!(
                "primary {primary} failed ({reason}) but no failover is possible: {why}"
            )),
        };
    };
    match f.step.as_str() {
        "started" => {
            let Some((fenced_by, fenced_ago)) = fenced(cluster, reports, &f.old_primary, lease_expired)
            else {
                return Step::Wait;
            };
            if !f.candidate.is_empty() {
                // The operator's choice: checked when it was made; its WAL position is
                // read from an observation made after the fence.
                let Some(o) =
                    fresh(cluster, reports, &f.candidate).filter(|o| after_fence(o, Some(fenced_ago)))
                else {
                    return Step::Wait;
                };
                // Unless data loss was accepted, it must hold what the safe choice
                // holds (every acknowledged commit): an asynchronous standby chosen for
                // a switchover receives the old primary's last WAL as it stops, so it
                // is waited for, for a failure timeout; if it is still behind (it was
                // not streaming), the safe choice is promoted instead.
                let patience = Duration::from_millis(cluster.policy.failure_timeout_ms);
                let safe = match f.accept_data_loss {
                    true => None,
                    false => match choose_after_fence(cluster, reports, &f.old_primary, Some(fenced_ago)) {
                        Ok(best) => Some(best),
                        // Nothing to compare with (yet): only a member of a sync set
                        // whose every member acknowledges each commit (k of k) is
                        // known to hold them all; with ANY k of n (k < n, e.g. while
                        // the set grows before it shrinks) another member may hold
                        // commits it lacks.
                        Err(_) if acks_every_commit(cluster, &f.candidate) => None,
                        Err(_) if fenced_ago < patience => return Step::Wait,
                        Err(why) => {
                            return Step::Stuck(format!(
                                "{} may lack acknowledged commits and no synchronous standby can be \
                                 compared with it ({why}); promote one with `pgquorum failover --to NODE \
                                 --accept-data-loss` after checking what it holds",
                                f.candidate
                            ))
                        }
                    },
                };
                let behind = safe
                    .as_ref()
                    .filter(|best| Lsn::parse(&o.report.receive_lsn).is_none_or(|lsn| lsn < best.lsn));
                let candidate = match behind {
                    None => f.candidate.clone(),
                    Some(_) if fenced_ago < patience => return Step::Wait,
                    Some(best) => best.name.clone(),
                };
                let lsn = match behind {
                    None => o.report.receive_lsn.clone(),
                    Some(best) => best.lsn.to_string(),
                };
                return Step::Choose {
                    sync_set: sync_set_after(cluster, reports, &candidate, &f.old_primary, fenced_ago),
                    candidate,
                    lsn,
                    fenced_by,
                };
            }
            match choose_after_fence(cluster, reports, &f.old_primary, Some(fenced_ago)) {
                Ok(c) => Step::Choose {
                    sync_set: sync_set_after(cluster, reports, &c.name, &f.old_primary, fenced_ago),
                    candidate: c.name,
                    lsn: c.lsn.to_string(),
                    fenced_by,
                },
                // Possible on earlier reports: wait for the standbys' next ones.
                Err(_) if choose(cluster, reports, &f.old_primary).is_ok() => Step::Wait,
                Err(why) => Step::Stuck(format!("failover from {} has no candidate: {why}", f.old_primary)),
            }
        }
        "candidate_chosen" => match fresh(cluster, reports, &f.candidate) {
            Some(o) if o.report.postgres_up && o.report.role == "primary" && o.report.epoch >= f.to_epoch => {
                Step::Complete {
                    primary: f.candidate.clone(),
                }
            }
            Some(_) => Step::Wait,
            // Silent for a failure timeout, and whatever it was told (promote carries a
            // lease) has certainly run out: it cannot be serving as a primary now.
            // Only when another candidate can be chosen right away: otherwise waiting
            // for the lost one to come back is the only way forward (the simulation
            // found a cluster left without any candidate after an early abandon).
            None if self::lease_expired(cluster, reports, &f.candidate)
                && choose(cluster, reports, &f.candidate).is_ok() =>
            {
                Step::Abandon {
                    candidate: f.candidate.clone(),
                    reason: format!(
                        "no report for {} ms and its lease ran out",
                        cluster.policy.failure_timeout_ms
                    ),
                }
            }
            None => Step::Wait,
        },
        other => Step::Stuck(format!("unknown failover step {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::health::tests::{cluster, primary, reports, standby, started_from_node1, stopped};
    use pgquorum_client::pb;

    fn probing(mut r: pb::NodeReport, age_ms: u64) -> pb::NodeReport {
        r.primary_probe_age_ms = Some(age_ms);
        r
    }

    /// A failover from node1 (epoch 1) to epoch 2, just started.
    fn strict() -> Cluster {
        let mut c = cluster();
        c.sync_set = vec!["node2".into()];
        c
    }

    #[test]
    fn a_silent_agent_on_a_reachable_primary_is_not_a_failure() {
        let c = strict();
        let r = reports(vec![
            ("node1", primary("0/5000000", "", vec![]), 5_000),
            ("node2", probing(standby("0/5000000", 0), 50), 10),
            ("node3", probing(standby("0/5000000", 0), 50), 10),
        ]);
        assert_eq!(decide(&c, &r, true), Step::Wait);
    }

    #[test]
    fn silence_everywhere_starts_a_failover_to_the_sync_standby() {
        let c = strict();
        let r = reports(vec![
            ("node1", primary("0/5000000", "", vec![]), 1_500),
            ("node2", probing(standby("0/5000000", 0), 1_400), 10),
            ("node3", probing(standby("0/6000000", 0), 1_400), 10),
        ]);
        let step = decide(&c, &r, false);
        assert!(
            matches!(step, Step::Start { ref old_primary, .. } if old_primary == "node1"),
            "{step:?}"
        );
        // node3 is further ahead but not in the sync set: strict mode picks node2.
        assert_eq!(choose(&c, &r, "node1").unwrap().name, "node2");
    }

    #[test]
    fn the_fast_path_needs_a_stop_seen_happening() {
        let c = strict();
        let mut r = reports(vec![
            ("node1", stopped(), 10),
            ("node2", standby("0/5000000", 0), 10),
        ]);
        assert_eq!(decide(&c, &r, false), Step::Wait, "never seen up by this leader");
        r.nodes.get_mut("node1").unwrap().up_ago = Some(Duration::from_millis(150));
        assert!(matches!(decide(&c, &r, false), Step::Start { .. }));
    }

    #[test]
    fn strict_without_the_sync_standby_is_stuck() {
        let c = strict();
        let r = reports(vec![("node3", probing(standby("0/5000000", 0), 5_000), 10)]);
        let step = decide(&c, &r, true);
        assert!(
            matches!(&step, Step::Stuck(m) if m.contains("heard 0 of the sync set")),
            "{step:?}"
        );
    }

    /// A member the primary never named in its failsafe roster (it joined after the
    /// primary's last report) may never have been asked for a promise: not chosen,
    /// however caught up, until the primary reports it.
    #[test]
    fn a_member_off_the_primarys_roster_is_not_chosen() {
        let mut c = strict();
        c.epoch = 2;
        c.primary = None;
        c.failover = Some(started_from_node1());
        c.primary_roster = Some(["node3".to_string()].into());
        let r = reports(vec![("node2", standby("0/5000000", 0), 10)]);
        let step = decide(&c, &r, true);
        assert!(matches!(step, Step::Stuck(_)), "{step:?}");
        c.primary_roster = Some(["node2".to_string(), "node3".to_string()].into());
        assert!(matches!(decide(&c, &r, true), Step::Choose { .. }));
        // A cluster without a recorded roster (state from before) counts everyone.
        c.primary_roster = None;
        assert!(matches!(decide(&c, &r, true), Step::Choose { .. }));
    }

    #[test]
    fn fence_then_choose_then_complete() {
        let mut c = strict();
        c.epoch = 2;
        c.primary = None;
        c.failover = Some(started_from_node1());
        let r = reports(vec![("node2", standby("0/5000000", 0), 10)]);
        assert_eq!(decide(&c, &r, false), Step::Wait, "not fenced yet");
        let step = decide(&c, &r, true);
        assert_eq!(
            step,
            Step::Choose {
                candidate: "node2".into(),
                lsn: "0/5000000".into(),
                fenced_by: "its lease expired".into(),
                sync_set: vec![],
            }
        );
        // node3 joins the sync set with the promotion only if it has all node2 has.
        let lagging = reports(vec![
            ("node2", standby("0/5000000", 0), 10),
            ("node3", standby("0/4000000", 0), 10),
        ]);
        assert_eq!(
            sync_set_after(&c, &lagging, "node2", "node1", Duration::MAX),
            Vec::<String>::new()
        );
        let level = reports(vec![
            ("node2", standby("0/5000000", 0), 10),
            ("node3", standby("0/5000000", 0), 10),
        ]);
        assert_eq!(
            sync_set_after(&c, &level, "node2", "node1", Duration::MAX),
            vec!["node3".to_string()]
        );
        let f = c.failover.as_mut().unwrap();
        f.step = "candidate_chosen".into();
        f.candidate = "node2".into();
        assert_eq!(decide(&c, &r, true), Step::Wait, "not promoted yet");
        // The candidate goes silent: given up only once its promote lease ran out.
        let silent = reports(vec![
            ("node2", standby("0/5000000", 0), 60_000),
            ("node3", standby("0/5000000", 0), 10),
        ]);
        assert_eq!(
            decide(&c, &silent, true),
            Step::Wait,
            "no other candidate in the committed sync set: wait for node2"
        );
        // As ChooseCandidate commits it: node3 had everything node2 had.
        c.sync_set = vec!["node3".into()];
        assert!(matches!(
            decide(&c, &silent, true),
            Step::Abandon { ref candidate, .. } if candidate == "node2"
        ));
        let mut granted = silent.clone();
        granted.nodes.get_mut("node2").unwrap().own_lease =
            OwnLease::granted(Duration::from_millis(100), Duration::from_millis(1000));
        assert_eq!(decide(&c, &granted, true), Step::Wait, "its lease may still run");
        let mut promoted = primary("0/5000100", "", vec![]);
        promoted.epoch = 2;
        let r = reports(vec![("node2", promoted, 10)]);
        assert_eq!(
            decide(&c, &r, true),
            Step::Complete {
                primary: "node2".into()
            }
        );
    }

    #[test]
    fn an_operators_candidate_behind_the_safe_choice_is_waited_for_then_replaced() {
        let mut c = strict();
        let mut f = started_from_node1();
        f.kind = "switchover".into();
        f.candidate = "node3".into();
        c.failover = Some(f);
        let behind = |age_ms| {
            reports(vec![
                ("node1", stopped(), 10),
                ("node2", standby("0/5000000", 0), age_ms),
                ("node3", standby("0/4000000", 0), age_ms),
            ])
        };
        // Just fenced (the clean stop): the async candidate may still receive the rest.
        assert_eq!(decide(&c, &behind(10), true), Step::Wait);
        let caught_up = reports(vec![
            ("node1", stopped(), 10),
            ("node2", standby("0/5000000", 0), 10),
            ("node3", standby("0/5000000", 0), 10),
        ]);
        assert!(matches!(
            decide(&c, &caught_up, true),
            Step::Choose { ref candidate, .. } if candidate == "node3"
        ));
        // Still behind a failure timeout after the fence: the sync standby instead.
        let mut late = behind(10);
        late.nodes.get_mut("node1").unwrap().role_for = Duration::from_secs(60);
        assert!(matches!(
            decide(&c, &late, true),
            Step::Choose { ref candidate, ref lsn, .. } if candidate == "node2" && lsn == "0/5000000"
        ));
        // ANY 1 of [node2, node3] and only node2 heard after the fence: node2 may lack
        // what node3 acknowledged; it is not promoted on its sync-set membership.
        let mut quorum = strict();
        quorum.sync_set = vec!["node2".into(), "node3".into()];
        let mut f = started_from_node1();
        f.candidate = "node2".into();
        f.kind = "manual".into();
        quorum.failover = Some(f);
        let node2_only = reports(vec![
            ("node1", stopped(), 10),
            ("node2", standby("0/5000000", 0), 10),
        ]);
        assert_eq!(decide(&quorum, &node2_only, true), Step::Wait);
        let mut later = node2_only.clone();
        later.nodes.get_mut("node1").unwrap().role_for = Duration::from_secs(60);
        assert!(
            matches!(decide(&quorum, &later, true), Step::Stuck(ref why) if why.contains("accept-data-loss"))
        );
        quorum.sync_set = vec!["node2".into()];
        assert!(
            matches!(decide(&quorum, &node2_only, true), Step::Choose { ref candidate, .. } if candidate == "node2"),
            "1 of 1: node2 acknowledged every commit"
        );
        // Data loss accepted: the operator's choice stands.
        c.failover.as_mut().unwrap().accept_data_loss = true;
        assert!(matches!(
            decide(&c, &behind(10), true),
            Step::Choose { ref candidate, .. } if candidate == "node3"
        ));
    }

    #[test]
    fn quorum_sync_sets_need_n_minus_k_plus_one_and_take_the_highest() {
        let mut c = cluster();
        c.sync_set = vec!["node2".into(), "node3".into()];
        // ANY 1 of 2: need both heard.
        let r = reports(vec![("node2", standby("0/5000000", 0), 10)]);
        assert!(choose(&c, &r, "node1").is_err());
        let r = reports(vec![
            ("node2", standby("0/5000000", 0), 10),
            ("node3", standby("0/6000000", 0), 10),
        ]);
        assert_eq!(choose(&c, &r, "node1").unwrap().name, "node3");
        // The most caught up may not be promoted: nobody is.
        c.members.get_mut("node3").unwrap().nofailover = true;
        assert!(choose(&c, &r, "node1").is_err());
        // Another region is allowed only when the policy says so.
        c.members.get_mut("node3").unwrap().nofailover = false;
        c.members.get_mut("node3").unwrap().region = "us-east-1".into();
        assert!(choose(&c, &r, "node1").is_err());
        c.policy.auto_failover_regions = vec!["us-west-2".into(), "us-east-1".into()];
        assert_eq!(choose(&c, &r, "node1").unwrap().name, "node3");
    }

    #[test]
    fn only_observations_made_after_the_fence_choose() {
        // ANY 1 of {node2, node3}: a write may be on either one only.
        let mut c = cluster();
        c.sync_set = vec!["node2".into(), "node3".into()];
        c.epoch = 2;
        c.primary = None;
        c.failover = Some(started_from_node1());
        let mut r = reports(vec![
            ("node1", stopped(), 10),
            ("node2", standby("0/5000000", 0), 10),
            ("node3", standby("0/5000100", 0), 10),
        ]);
        // node1 has been reporting "stopped" for 500 ms; node2's report was observed
        // before that (it kept receiving WAL until the stop), node3's after.
        r.nodes.get_mut("node1").unwrap().role_for = Duration::from_millis(500);
        r.nodes.get_mut("node2").unwrap().seen_reply_ago = Some(Duration::from_millis(800));
        r.nodes.get_mut("node3").unwrap().seen_reply_ago = Some(Duration::from_millis(100));
        assert_eq!(
            choose(&c, &r, "node1").unwrap().name,
            "node3",
            "on all reports node3 looks most caught up"
        );
        assert_eq!(
            decide(&c, &r, false),
            Step::Wait,
            "node2's position is not final yet: wait for its next report"
        );
        // Its report after the fence shows what it really holds.
        let n2 = r.nodes.get_mut("node2").unwrap();
        n2.report = standby("0/5000200", 0);
        n2.seen_reply_ago = Some(Duration::from_millis(90));
        assert!(matches!(
            decide(&c, &r, false),
            Step::Choose { ref candidate, ref fenced_by, .. }
                if candidate == "node2" && fenced_by.contains("confirmed")
        ));
    }

    #[test]
    fn a_stop_counts_as_a_fence_only_if_observed_after_the_latest_grant() {
        // Review finding: a leader answers node1's "stopped" with an order to start and
        // a lease; node1's agent then spends a while in `pg_ctl start` (crash recovery)
        // and reports nothing. Its earlier "stopped" must not fence it: it is about to
        // run as primary, with that lease.
        let ms = Duration::from_millis;
        let c = {
            let mut c = cluster();
            c.failover = Some(started_from_node1());
            c
        };
        let mut r = reports(vec![("node1", stopped(), 10)]);
        let n1 = r.nodes.get_mut("node1").unwrap();
        n1.seen_reply_ago = Some(ms(300));
        n1.last_grant_ago = Some(ms(100));
        assert_eq!(fenced(&c, &r, "node1", false), None, "observed before the grant");
        assert!(
            fenced(&c, &r, "node1", true).is_some_and(|(how, _)| how.contains("lease")),
            "its lease running out still fences it"
        );
        // Its next report, observed after that reply, says what became of the start.
        let n1 = r.nodes.get_mut("node1").unwrap();
        n1.seen_reply_ago = Some(ms(60));
        assert!(fenced(&c, &r, "node1", false).is_some_and(|(how, _)| how.contains("confirmed")));
        // An observation that followed no reply of this leader proves nothing either: an
        // earlier leader's order to start may be under way.
        r.nodes.get_mut("node1").unwrap().seen_reply_ago = None;
        assert_eq!(fenced(&c, &r, "node1", false), None);
    }

    #[test]
    fn a_node_without_its_data_directory_is_never_fenced_by_its_word() {
        // Review finding: the data directory removed (or unmounted) under a running
        // Postgres; the agent sees no postmaster.pid and reports "stopped, initializing",
        // while the server and its sessions keep committing. Only the lease fences it.
        let c = {
            let mut c = cluster();
            c.failover = Some(started_from_node1());
            c
        };
        let mut gone = stopped();
        gone.initializing = true;
        let r = reports(vec![("node1", gone, 10)]);
        assert_eq!(fenced(&c, &r, "node1", false), None);
        assert!(fenced(&c, &r, "node1", true).is_some());
    }

    #[test]
    fn maintenance_pauses_detection() {
        let mut c = strict();
        c.policy.maintenance = true;
        let r = reports(vec![("node2", standby("0/5000000", 0), 10)]);
        assert_eq!(decide(&c, &r, true), Step::Wait);
    }

    #[test]
    fn a_lease_is_over_only_past_its_margin_and_for_a_new_leader_past_the_grant_window() {
        let c = cluster();
        let ms = Duration::from_millis;
        // Lease 1000 ms, margin 20 ms, grant window 150 ms (the test reports' default).
        let mut r = reports(vec![("node1", stopped(), 10)]);
        r.leader_for = ms(3_600_000);
        let grant = |r: &mut ClusterReports, ago, length| {
            let own = &mut r.nodes.get_mut("node1").unwrap().own_lease;
            *own = own.max(OwnLease::granted(ago, length));
        };
        let granted = |r: &mut ClusterReports, ago| {
            r.nodes.get_mut("node1").unwrap().own_lease = OwnLease::Never;
            grant(r, ago, ms(1000));
        };
        granted(&mut r, ms(1_019));
        assert!(!lease_expired(&c, &r, "node1"), "not yet lease + margin");
        granted(&mut r, ms(1_020));
        assert!(lease_expired(&c, &r, "node1"));
        // Never granted by this leader, elected 1169 ms ago: an earlier leader may have
        // granted it up to its last quorum contact plus the grant window.
        r.nodes.get_mut("node1").unwrap().own_lease = OwnLease::Never;
        r.leader_for = ms(1_169);
        assert!(!lease_expired(&c, &r, "node1"));
        r.leader_for = ms(1_170);
        assert!(lease_expired(&c, &r, "node1"));
        // Granted by this leader too: the later of the two ends counts.
        granted(&mut r, ms(500));
        assert!(!lease_expired(&c, &r, "node1"));
        // The policy lowered the lease after a 10 s grant: that grant still runs, past
        // the 1 s grants after it; once it ended, only the 1 s grants count.
        r.leader_for = ms(3_600_000);
        granted(&mut r, ms(5_000));
        grant(&mut r, ms(5_000), ms(10_000));
        grant(&mut r, ms(100), ms(1_000));
        assert!(!lease_expired(&c, &r, "node1"), "a 10 s grant 5 s ago");
        granted(&mut r, ms(10_200));
        grant(&mut r, ms(10_200), ms(10_000));
        grant(&mut r, ms(1_020), ms(1_000));
        assert!(
            lease_expired(&c, &r, "node1"),
            "the 10 s grant ended 0 ms ago, the 1 s one too"
        );
        grant(&mut r, ms(100), ms(1_000));
        assert!(!lease_expired(&c, &r, "node1"), "a 1 s grant after it");
    }

    #[test]
    fn a_failsafe_promise_to_the_old_primary_keeps_it_unfenced_until_it_ran_out() {
        let c = cluster();
        let ms = Duration::from_millis;
        let promised = |to: &str, left_ms, age_ms| {
            let mut s = standby("0/5000000", 0);
            s.promise = Some(pb::PromiseHeld {
                primary: to.into(),
                epoch: c.epoch,
                left_ms,
            });
            reports(vec![("node1", stopped(), 5_000), ("node2", s, age_ms)])
        };
        // No grant from this leader, elected an hour ago: over, but for the promise.
        assert!(
            lease_expired(&c, &promised("node3", 1_000, 10), "node1"),
            "a promise to another node"
        );
        // 1000 ms left when sent, plus a 20 ms margin, counted from the report's arrival.
        assert!(!lease_expired(&c, &promised("node1", 1_000, 1_019), "node1"));
        assert!(lease_expired(&c, &promised("node1", 1_000, 1_020), "node1"));
        assert_eq!(
            promised_to(&promised("node1", 1_000, 20), "node1"),
            OwnLease::EndsIn(ms(1_000))
        );
        // A failover waits for it like for a lease.
        let mut failing = c.clone();
        failing.failover = Some(started_from_node1());
        let r = promised("node1", 1_000, 500);
        assert_eq!(
            fenced(&failing, &r, "node1", lease_expired(&failing, &r, "node1")),
            None
        );
    }

    #[test]
    fn a_new_leader_waits_out_the_longer_lease_until_a_lowering_settles() {
        let mut c = cluster();
        let ms = Duration::from_millis;
        // lease_ms lowered from 8000 to 1000; an earlier leader may have granted 8 s.
        c.lease_ms_settling = Some(crate::state::LeaseSettling {
            lease_ms: 8_000,
            since_log_index: 7,
        });
        let mut r = reports(vec![("node1", stopped(), 10)]);
        // 8000 + margin 160 + grant window 150.
        r.leader_for = ms(8_309);
        assert!(!lease_expired(&c, &r, "node1"));
        r.leader_for = ms(8_310);
        assert!(lease_expired(&c, &r, "node1"));
        c.lease_ms_settling = None;
        r.leader_for = ms(1_170);
        assert!(lease_expired(&c, &r, "node1"), "settled: the lowered lease alone");
    }
}
