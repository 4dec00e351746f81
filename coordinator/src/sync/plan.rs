//! Deciding the sync set. Pure.
//!
//! The committed sync set must always contain every standby the primary waits for, so
//! that a failover, which promotes only from the committed set, finds every
//! acknowledged commit there. Hence the order of changes:
//!
//! 1. **Add first.** A standby joins the committed set before the primary is told to
//!    wait for it: until the commit, the primary's wait list leaves it out.
//! 2. **Remove last.** A standby leaves the committed set only after the primary
//!    reports it no longer waits for it, and after every standby it now waits for has
//!    flushed all WAL up to where the primary was when it switched ([`AppliedSync`]):
//!    commits acknowledged by the leaving standby alone are then held by the others.
//!
//! Who is wanted: eligible standbys (`sync_eligible`, not the primary, not in
//! maintenance) that the primary
//! lists as streaming, whose agents report fresh, and — for a standby not yet in the
//! set — that have flushed past the last promotion's LSN (`sync_floor_lsn`: a failover
//! must never find a set member lacking a write acknowledged before it), preferring those already in the
//! set (no churn), then higher priority, then name. In `strict` mode the set is never
//! shrunk below `sync_standbys`: with too few healthy standbys the primary keeps waiting
//! for the ones it has (its commits stall; an alert says so) instead of acknowledging
//! commits no standby holds. `prefer` falls back to asynchronous; `off` is asynchronous.

use pgquorum_client::lsn::Lsn;
use pgquorum_client::sync_names;

use crate::observe::health::{fresh, primary_report, replication_of};
use crate::observe::{AppliedSync, ClusterReports};
use crate::state::{Cluster, SyncMode};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncPlan {
    /// A new committed sync set to propose, with the reason for the history.
    pub commit: Option<(Vec<String>, String)>,
    /// What the primary should run with now.
    pub synchronous_standby_names: String,
}

pub fn plan(cluster: &Cluster, reports: &ClusterReports) -> SyncPlan {
    let committed = &cluster.sync_set;
    let strict = cluster.policy.sync_mode == SyncMode::Strict;
    let k = wanted(cluster);
    let desired = desired(cluster, reports);

    let additions: Vec<&String> = desired.iter().filter(|d| !committed.contains(d)).collect();
    let names = |wait_for: &[String]| sync_names::format(k as u32, wait_for, strict);
    if !additions.is_empty() {
        let mut next = committed.clone();
        next.extend(additions.iter().map(|s| s.to_string()));
        // Until the commit, wait only for committed standbys (in strict mode still k of
        // them, the ones it waited for so far, rather than none).
        let mut wait_for: Vec<String> = desired
            .iter()
            .filter(|d| committed.contains(d))
            .cloned()
            .collect();
        if strict {
            for name in committed {
                if wait_for.len() < k && !wait_for.contains(name) {
                    wait_for.push(name.clone());
                }
            }
        }
        let added: Vec<&str> = additions.iter().map(|s| s.as_str()).collect();
        return SyncPlan {
            commit: Some((next, format!("add {}: streaming and eligible", added.join(", ")))),
            synchronous_standby_names: names(&wait_for),
        };
    }

    let removals: Vec<&String> = committed.iter().filter(|c| !desired.contains(c)).collect();
    let commit = if removals.is_empty() {
        None
    } else {
        safe_to_remove(cluster, reports, &desired, &removals).then(|| {
            let next: Vec<String> = committed
                .iter()
                .filter(|c| desired.contains(c))
                .cloned()
                .collect();
            let removed: Vec<&str> = removals.iter().map(|s| s.as_str()).collect();
            (
                next,
                format!(
                    "remove {}: the primary no longer waits for it",
                    removed.join(", ")
                ),
            )
        })
    };
    SyncPlan {
        commit,
        synchronous_standby_names: names(&desired),
    }
}

/// How many standbys the primary should wait for.
fn wanted(cluster: &Cluster) -> usize {
    if cluster.policy.sync_mode == SyncMode::Off {
        0
    } else {
        cluster.policy.sync_standbys as usize
    }
}

/// The standbys the primary should wait for (see the module docs).
fn desired(cluster: &Cluster, reports: &ClusterReports) -> Vec<String> {
    let committed = &cluster.sync_set;
    let k = wanted(cluster);
    let primary = primary_report(cluster, reports);
    let mut desired: Vec<String> = Vec::new();
    if let (Some(primary_name), Some(primary)) = (cluster.primary.as_deref(), primary) {
        let mut candidates: Vec<_> = cluster
            .members
            .values()
            .filter(|m| m.sync_eligible && m.name != primary_name && !cluster.out_of_service(&m.name))
            .filter(|m| replication_of(Some(primary), &m.name).is_some_and(|r| r.state == "streaming"))
            // A newcomer must hold every write acknowledged before the last promotion.
            .filter(|m| {
                committed.contains(&m.name)
                    || replication_of(Some(primary), &m.name)
                        .and_then(|r| Lsn::parse(&r.flush_lsn))
                        .is_some_and(|flushed| flushed.0 >= cluster.sync_floor_lsn)
            })
            .filter(|m| fresh(cluster, reports, &m.name).is_some_and(|o| o.report.postgres_up))
            .collect();
        candidates.sort_by(|a, b| {
            let rank = |name: &String| committed.iter().position(|c| c == name).unwrap_or(usize::MAX);
            rank(&a.name)
                .cmp(&rank(&b.name))
                .then(b.priority.cmp(&a.priority))
                .then(a.name.cmp(&b.name))
        });
        desired = candidates.into_iter().take(k).map(|m| m.name.clone()).collect();
    }
    if cluster.policy.sync_mode == SyncMode::Strict {
        // Keep waiting for committed standbys rather than for fewer than k.
        for name in committed {
            if desired.len() >= k {
                break;
            }
            if !desired.contains(name) {
                desired.push(name.clone());
            }
        }
    }
    desired
}

/// Why taking `member` out of service (maintenance, a rebuild) would stall the
/// primary's commits, if it would: in strict mode the primary waits for
/// `sync_standbys` standbys, so there must be that many others it could wait for (a
/// sync standby leaves the set only for a replacement; one that is not in the set yet
/// may be the only one that could join it).
pub fn leaving_stalls(cluster: &Cluster, reports: &ClusterReports, member: &str) -> Option<String> {
    // A member that may never be a sync standby (a DR or backup replica) leaves no gap.
    let eligible = cluster.members.get(member).is_some_and(|m| m.sync_eligible);
    if cluster.policy.sync_mode != SyncMode::Strict || !eligible {
        return None;
    }
    let k = wanted(cluster);
    let mut after = cluster.clone();
    after.maintenance.insert(member.to_string());
    let wanted_after = desired(&after, reports);
    let others = wanted_after.iter().filter(|n| *n != member).count();
    (others < k).then(|| {
        format!(
            "strict sync mode needs {k} synchronous standby(s) and without {member} only {others} other \
             streaming standby(s) could be one: the primary's commits would wait for it; add a standby, \
             lower sync_standbys or use sync_mode=prefer first"
        )
    })
}

/// Whether the primary has stopped waiting for `removals` and the standbys it waits
/// for hold all WAL up to the switch (see the module docs).
fn safe_to_remove(
    cluster: &Cluster,
    reports: &ClusterReports,
    wait_for: &[String],
    removals: &[&String],
) -> bool {
    let (Some(primary_name), Some(primary)) = (cluster.primary.as_deref(), primary_report(cluster, reports))
    else {
        return false;
    };
    let Some(AppliedSync { node, names, since }) = &reports.applied_sync else {
        return false;
    };
    if node != primary_name {
        return false;
    }
    // The report must show the list this leader last told the primary: a report sent
    // before the primary applied a newer list (one that waits for a standby about to
    // be removed) must not count as "stopped waiting".
    let told = reports.told_sync_names.get(primary_name);
    if told != Some(&primary.synchronous_standby_names) {
        return false;
    }
    let applied_matches = names.len() == wait_for.len() && wait_for.iter().all(|w| names.contains(w));
    let stopped_waiting = removals.iter().all(|r| !names.contains(r));
    let caught_up = wait_for.iter().all(|w| {
        replication_of(Some(primary), w)
            .and_then(|r| Lsn::parse(&r.flush_lsn))
            .is_some_and(|flushed| flushed >= *since)
    });
    applied_matches && stopped_waiting && caught_up
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::health::tests::{cluster, primary, replica, reports, standby};
    use crate::state::Policy;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn a_new_standby_is_committed_before_the_primary_waits_for_it() {
        let c = cluster();
        let r = reports(vec![
            (
                "node1",
                primary(
                    "0/3000000",
                    "",
                    vec![replica("node2", "streaming", "async", "0/3000000")],
                ),
                10,
            ),
            ("node2", standby("0/3000000", 0), 10),
        ]);
        let p = plan(&c, &r);
        assert_eq!(p.commit.as_ref().unwrap().0, s(&["node2"]));
        // Not committed yet: strict mode waits for nobody real.
        assert_eq!(
            sync_names::parse(&p.synchronous_standby_names),
            Vec::<String>::new()
        );
        assert!(p.synchronous_standby_names.contains(sync_names::NO_STANDBY));

        let mut c = c;
        c.sync_set = s(&["node2"]);
        let p = plan(&c, &r);
        assert_eq!(p.commit, None);
        assert_eq!(p.synchronous_standby_names, "ANY 1 (\"node2\")");
    }

    #[test]
    fn a_lost_sync_standby_is_replaced_add_first_remove_last() {
        let mut c = cluster();
        c.sync_set = s(&["node2"]);
        // node2 is gone; node3 streams.
        let mut r = reports(vec![
            (
                "node1",
                primary(
                    "0/5000000",
                    "ANY 1 (\"node2\")",
                    vec![replica("node3", "streaming", "async", "0/4000000")],
                ),
                10,
            ),
            ("node3", standby("0/4000000", 0), 10),
        ]);
        let p = plan(&c, &r);
        assert_eq!(
            p.commit.as_ref().unwrap().0,
            s(&["node2", "node3"]),
            "add node3 first"
        );
        // The primary keeps waiting for node2 until node3 is committed.
        assert_eq!(p.synchronous_standby_names, "ANY 1 (\"node2\")");

        c.sync_set = s(&["node2", "node3"]);
        let p = plan(&c, &r);
        assert_eq!(p.synchronous_standby_names, "ANY 1 (\"node3\")");
        assert_eq!(
            p.commit, None,
            "node2 stays until the primary stopped waiting for it"
        );

        // The primary now waits for node3 only, since WAL position 0/5000000...
        r.nodes.get_mut("node1").unwrap().report.synchronous_standby_names = "ANY 1 (\"node3\")".into();
        r.applied_sync = Some(AppliedSync {
            node: "node1".into(),
            names: s(&["node3"]),
            since: Lsn(0x5000000),
        });
        r.told_sync_names
            .insert("node1".into(), "ANY 1 (\"node3\")".into());
        assert_eq!(
            plan(&c, &r).commit,
            None,
            "node3 has not flushed up to the switch yet"
        );
        // ...and once node3 has flushed past it, node2 may go.
        r.nodes.get_mut("node1").unwrap().report.replicas[0].flush_lsn = "0/5000000".into();
        assert_eq!(plan(&c, &r).commit.clone().unwrap().0, s(&["node3"]));
        // Not if the leader has since told the primary something else.
        r.told_sync_names
            .insert("node1".into(), "ANY 1 (\"node2\")".into());
        assert_eq!(plan(&c, &r).commit, None);
    }

    #[test]
    fn strict_keeps_waiting_prefer_falls_back_off_is_async() {
        let mut c = cluster();
        c.sync_set = s(&["node2"]);
        let r = reports(vec![(
            "node1",
            primary("0/3000000", "ANY 1 (\"node2\")", vec![]),
            10,
        )]);
        let p = plan(&c, &r);
        assert_eq!(
            (p.commit, p.synchronous_standby_names.as_str()),
            (None, "ANY 1 (\"node2\")")
        );

        c.policy = Policy::default()
            .with_settings([("sync_mode", "prefer")])
            .unwrap();
        let p = plan(&c, &r);
        assert_eq!(p.synchronous_standby_names, "");

        c.policy = Policy::default()
            .with_settings([("sync_mode", "off"), ("sync_standbys", "0")])
            .unwrap();
        assert_eq!(plan(&c, &r).synchronous_standby_names, "");
    }

    #[test]
    fn preference_is_committed_then_priority_then_name() {
        let mut c = cluster();
        c.members.get_mut("node3").unwrap().priority = 200;
        let r = reports(vec![
            (
                "node1",
                primary(
                    "0/3000000",
                    "",
                    vec![
                        replica("node2", "streaming", "async", "0/3000000"),
                        replica("node3", "streaming", "async", "0/3000000"),
                    ],
                ),
                10,
            ),
            ("node2", standby("0/3000000", 0), 10),
            ("node3", standby("0/3000000", 0), 10),
        ]);
        assert_eq!(plan(&c, &r).commit.unwrap().0, s(&["node3"]), "higher priority");
        c.sync_set = s(&["node2"]);
        assert_eq!(plan(&c, &r).commit, None, "the committed one stays");
    }

    #[test]
    fn a_sync_standby_in_maintenance_is_replaced_and_alone_would_stall() {
        let mut c = cluster();
        c.sync_set = s(&["node2"]);
        let both = reports(vec![
            (
                "node1",
                primary(
                    "0/3000000",
                    "ANY 1 (\"node2\")",
                    vec![
                        replica("node2", "streaming", "sync", "0/3000000"),
                        replica("node3", "streaming", "async", "0/3000000"),
                    ],
                ),
                10,
            ),
            ("node2", standby("0/3000000", 0), 10),
            ("node3", standby("0/3000000", 0), 10),
        ]);
        assert_eq!(leaving_stalls(&c, &both, "node2"), None, "node3 can replace it");
        assert_eq!(leaving_stalls(&c, &both, "node3"), None, "node2 stays");
        c.maintenance.insert("node2".into());
        assert_eq!(
            plan(&c, &both).commit.unwrap().0,
            s(&["node2", "node3"]),
            "replaced, add first"
        );
        c.maintenance.clear();
        let alone = reports(vec![
            (
                "node1",
                primary(
                    "0/3000000",
                    "ANY 1 (\"node2\")",
                    vec![replica("node2", "streaming", "sync", "0/3000000")],
                ),
                10,
            ),
            ("node2", standby("0/3000000", 0), 10),
        ]);
        let why = leaving_stalls(&c, &alone, "node2").expect("no replacement: the primary would wait");
        assert!(why.contains("strict"), "{why}");
        // Not in the set yet, but the only one that could join it (a switchover's old
        // primary, say): the primary would wait for nobody.
        let mut fresh_set = c.clone();
        fresh_set.sync_set.clear();
        assert!(leaving_stalls(&fresh_set, &alone, "node2").is_some());
        c.policy = Policy::default()
            .with_settings([("sync_mode", "prefer")])
            .unwrap();
        assert_eq!(leaving_stalls(&c, &alone, "node2"), None, "prefer falls back");
    }
}
