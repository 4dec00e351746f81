//! Judging each node from the replicated state and the latest reports. Pure.
//!
//! A report counts only while it is fresher than the cluster's `failure_timeout_ms`;
//! an older one says nothing about now, so the node shows as `unknown`/DISCONNECTED.
//! A standby is HEALTHY when the primary lists it as streaming and its replay lag is
//! under the WARNING threshold; streaming but behind is CATCHING_UP; anything else
//! (agent silent, Postgres down, not connected to the primary) is DISCONNECTED. Lag
//! comes from [`super::lag`].

use std::time::Duration;

use pgquorum_client::lsn::Lsn;
use pgquorum_client::pb;

use super::lag::{standby_lag, Lag, LagSource, StandbyView};
use super::reports::{ClusterReports, Observed};
use crate::state::Cluster;

pub const HEALTHY: &str = "HEALTHY";
pub const CATCHING_UP: &str = "CATCHING_UP";
pub const DISCONNECTED: &str = "DISCONNECTED";

/// One node as `pgquorum status` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeStatus {
    pub name: String,
    pub role: String,
    pub health: &'static str,
    pub sync_state: &'static str,
    pub timeline: u32,
    pub lag_ms: u64,
    pub lag_bytes: u64,
    /// Where `lag_ms` comes from; a bound or a placeholder unless `exact()`.
    pub lag_source: LagSource,
    pub heartbeat_age_ms: Option<u64>,
    /// The report it was judged from, when fresh.
    pub report: Option<pb::NodeReport>,
    pub in_sync_set: bool,
}

/// The report of `node`, if it is fresh enough to judge by.
pub fn fresh<'a>(cluster: &Cluster, reports: &'a ClusterReports, node: &str) -> Option<&'a Observed> {
    let limit = Duration::from_millis(cluster.policy.failure_timeout_ms);
    reports.nodes.get(node).filter(|o| o.age <= limit)
}

/// The primary's fresh report, if the committed primary reports as one.
pub fn primary_report<'a>(cluster: &Cluster, reports: &'a ClusterReports) -> Option<&'a pb::NodeReport> {
    let primary = cluster.primary.as_deref()?;
    fresh(cluster, reports, primary)
        .map(|o| &o.report)
        .filter(|r| r.postgres_up && r.role == "primary")
}

/// The primary's view of one standby (pg_stat_replication), if it has a connection.
pub fn replication_of<'a>(
    primary: Option<&'a pb::NodeReport>,
    node: &str,
) -> Option<&'a pb::ReplicationInfo> {
    primary?
        .replicas
        .iter()
        .find(|r| r.application_name.eq_ignore_ascii_case(node))
}

pub fn node_statuses(cluster: &Cluster, reports: &ClusterReports) -> Vec<NodeStatus> {
    let primary = primary_report(cluster, reports);
    let primary_lsn = primary.and_then(|p| Lsn::parse(&p.current_lsn));
    // The WAL clock counts only while it belongs to the committed primary.
    let clock = reports
        .wal_clock
        .as_ref()
        .filter(|c| primary.is_some() && cluster.primary.as_deref() == Some(c.node.as_str()));
    cluster
        .members
        .keys()
        .map(|name| {
            let observed = reports.nodes.get(name);
            let heartbeat_age_ms = observed.map(|o| o.age.as_millis() as u64);
            let report = fresh(cluster, reports, name).map(|o| o.report.clone());
            let in_sync_set = cluster.sync_set.contains(name);
            let Some(r) = report else {
                return NodeStatus {
                    name: name.clone(),
                    role: "unknown".into(),
                    health: DISCONNECTED,
                    sync_state: "none",
                    timeline: 0,
                    lag_ms: 0,
                    lag_bytes: 0,
                    lag_source: LagSource::Unknown,
                    heartbeat_age_ms,
                    report: None,
                    in_sync_set,
                };
            };
            // `stopped` (no postmaster) or `unknown` (runs, does not answer) as reported.
            let role = if !r.postgres_up && r.role.is_empty() {
                "stopped".to_string()
            } else {
                r.role.clone()
            };
            let is_primary = role == "primary";
            let replication = replication_of(primary, name);
            let streaming = replication.is_some_and(|s| s.state == "streaming");
            let lag = if is_primary {
                Lag {
                    ms: 0,
                    bytes: 0,
                    source: LagSource::CaughtUp,
                }
            } else {
                let view = StandbyView {
                    report: &r,
                    age: observed.map_or(Duration::ZERO, |o| o.observed_ago),
                    replication,
                };
                standby_lag(primary_lsn, clock, &view)
            };
            let lag_ms = lag.ms;
            let health = if is_primary {
                if cluster.primary.as_deref() == Some(name.as_str()) {
                    HEALTHY
                } else {
                    // A node that says "primary" but is not the committed one is not a
                    // usable member of this cluster.
                    DISCONNECTED
                }
            } else if role != "standby" || !streaming {
                DISCONNECTED
            } else if replication.is_some_and(|s| s.state == "catchup")
                || lag_ms > cluster.policy.alert_lag_warning_ms
            {
                CATCHING_UP
            } else {
                HEALTHY
            };
            let sync_state = if is_primary {
                "primary"
            } else {
                match replication.map(|s| s.sync_state.as_str()) {
                    Some("sync" | "quorum") => "sync",
                    Some(_) => "async",
                    None => "none",
                }
            };
            NodeStatus {
                name: name.clone(),
                role,
                health,
                sync_state,
                timeline: r.timeline,
                lag_ms,
                lag_bytes: lag.bytes,
                lag_source: lag.source,
                heartbeat_age_ms,
                report: Some(r),
                in_sync_set,
            }
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::observe::OwnLease;
    use crate::state::{Member, Policy};

    pub fn member(name: &str, eligible: bool) -> Member {
        Member {
            name: name.into(),
            region: "us-west-2".into(),
            host: "127.0.0.1".into(),
            port: 5432,
            workload: "general".into(),
            priority: 100,
            nofailover: false,
            sync_eligible: eligible,
            agent_addr: String::new(),
        }
    }

    /// node1 primary, node2 and node3 standbys, all eligible.
    /// A failover from node1 (epoch 1 -> 2) that has not chosen yet.
    pub fn started_from_node1() -> crate::state::FailoverRecord {
        crate::state::FailoverRecord {
            kind: "failover".into(),
            step: "started".into(),
            from_epoch: 1,
            to_epoch: 2,
            old_primary: "node1".into(),
            candidate: String::new(),
            reason: "test".into(),
            started_at_ms: 0,
            fenced_by: String::new(),
            fenced_at_ms: 0,
            chosen_at_ms: 0,
            candidate_lsn: String::new(),
            accept_data_loss: false,
        }
    }

    pub fn cluster() -> Cluster {
        let mut c = Cluster::new("main".into(), Policy::default(), 0);
        for (n, e) in [("node1", true), ("node2", true), ("node3", true)] {
            c.members.insert(n.into(), member(n, e));
        }
        c.primary = Some("node1".into());
        c.epoch = 1;
        c
    }

    pub fn replica(name: &str, state: &str, sync_state: &str, flush: &str) -> pb::ReplicationInfo {
        pb::ReplicationInfo {
            application_name: name.into(),
            state: state.into(),
            sync_state: sync_state.into(),
            flush_lsn: flush.into(),
            replay_lsn: flush.into(),
            ..Default::default()
        }
    }

    pub fn primary(lsn: &str, names: &str, replicas: Vec<pb::ReplicationInfo>) -> pb::NodeReport {
        pb::NodeReport {
            postgres_up: true,
            role: "primary".into(),
            timeline: 1,
            current_lsn: lsn.into(),
            synchronous_standby_names: names.into(),
            replicas,
            ..Default::default()
        }
    }

    /// A node whose agent reports Postgres stopped.
    pub fn stopped() -> pb::NodeReport {
        pb::NodeReport {
            role: "stopped".into(),
            ..Default::default()
        }
    }

    /// A standby replayed up to `replay`, whose last replayed commit is `lag_ms` old:
    /// that is its lag when it is behind the primary (the reports of these tests carry
    /// no WAL clock), none when it is not.
    pub fn standby(replay: &str, lag_ms: u64) -> pb::NodeReport {
        pb::NodeReport {
            postgres_up: true,
            role: "standby".into(),
            timeline: 1,
            receive_lsn: replay.into(),
            replay_lsn: replay.into(),
            last_replay_age_ms: Some(lag_ms),
            wal_receiver_status: "streaming".into(),
            ..Default::default()
        }
    }

    pub fn reports(entries: Vec<(&str, pb::NodeReport, u64)>) -> ClusterReports {
        let mut nodes = BTreeMap::new();
        for (name, report, age_ms) in entries {
            let age = Duration::from_millis(age_ms);
            let up_ago = report.postgres_up.then_some(age);
            nodes.insert(
                name.to_string(),
                Observed {
                    report,
                    age,
                    up_ago,
                    own_lease: OwnLease::Never,
                    // Observed right after a reply it got just before: as fresh as it is.
                    seen_reply_ago: Some(age),
                    last_grant_ago: None,
                    role_for: age,
                    observed_ago: age,
                },
            );
        }
        ClusterReports {
            nodes,
            applied_sync: None,
            leader_for: Duration::from_secs(3600),
            told_sync_names: Default::default(),
            wal_clock: None,
            grant_window: Duration::from_millis(150),
            settling_seen_for: None,
        }
    }

    #[test]
    fn healthy_catching_up_disconnected_and_unknown() {
        let mut c = cluster();
        c.members.insert("node4".into(), member("node4", false));
        c.sync_set = vec!["node2".into()];
        let r = reports(vec![
            (
                "node1",
                primary(
                    "0/3000100",
                    "ANY 1 (\"node2\")",
                    vec![
                        replica("node2", "streaming", "quorum", "0/3000100"),
                        replica("node3", "streaming", "async", "0/3000000"),
                    ],
                ),
                50,
            ),
            ("node2", standby("0/3000100", 0), 50),
            ("node3", standby("0/3000000", 2500), 50),
            ("node4", standby("0/3000000", 0), 5_000),
        ]);
        let s = node_statuses(&c, &r);
        let by = |n: &str| s.iter().find(|x| x.name == n).unwrap().clone();
        assert_eq!(
            (
                by("node1").role.as_str(),
                by("node1").health,
                by("node1").sync_state
            ),
            ("primary", HEALTHY, "primary")
        );
        assert_eq!(
            (
                by("node2").health,
                by("node2").sync_state,
                by("node2").in_sync_set
            ),
            (HEALTHY, "sync", true)
        );
        assert_eq!(
            (by("node3").health, by("node3").sync_state, by("node3").lag_bytes),
            (CATCHING_UP, "async", 0x100)
        );
        assert_eq!(
            (
                by("node4").role.as_str(),
                by("node4").health,
                by("node4").heartbeat_age_ms
            ),
            ("unknown", DISCONNECTED, Some(5000))
        );
    }

    #[test]
    fn a_standby_the_primary_does_not_list_is_disconnected() {
        let c = cluster();
        let r = reports(vec![
            ("node1", primary("0/3000100", "", vec![]), 10),
            ("node2", standby("0/3000100", 0), 10),
            (
                "node3",
                pb::NodeReport {
                    postgres_up: false,
                    error: "connection refused".into(),
                    ..Default::default()
                },
                10,
            ),
        ]);
        let s = node_statuses(&c, &r);
        assert_eq!(s[1].health, DISCONNECTED);
        assert_eq!((s[2].role.as_str(), s[2].health), ("stopped", DISCONNECTED));
    }
}
