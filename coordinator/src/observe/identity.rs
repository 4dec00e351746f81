//! Is the agent that heartbeats as node N the node registered as N? Pure.
//!
//! A second agent started with an existing node's name (a copied config) was taken
//! for an address change: the member's address flapped between the two, every flap a
//! `member_changed` event and a new endpoint map, the standbys re-cloned from one
//! another. The name is checked against what the leader knows: a member whose agent
//! still reports (within the failure timeout) under another incarnation keeps its
//! address, and a database whose system identifier is not the cluster's is not this
//! cluster's, whatever its name.

use pgquorum_client::pb;

use super::health::fresh;
use super::ClusterReports;
use crate::state::{Cluster, Member};

/// Why the agent that sent `report` for `member` is refused, if it is.
pub fn conflict(
    cluster: &Cluster,
    reports: &ClusterReports,
    member: &Member,
    report: &pb::NodeReport,
) -> Option<String> {
    let name = &member.name;
    if let (Some(ours), theirs) = (cluster.system_identifier, report.system_identifier) {
        if theirs != 0 && theirs != ours {
            return Some(format!(
                "node {name}'s database has system identifier {theirs}, cluster {}'s is {ours}: it is another \
                 database (initdb'd on its own, or the wrong data_dir); point the agent at this cluster's data \
                 or remove the data directory so it is cloned from the primary",
                cluster.name
            ));
        }
    }
    let registered = cluster.members.get(name)?;
    if (registered.host.as_str(), registered.port) == (member.host.as_str(), member.port) {
        return None;
    }
    let live = fresh(cluster, reports, name)?;
    if live.report.incarnation == report.incarnation {
        return None;
    }
    Some(format!(
        "node {name} is registered at {}:{} and its agent there reported {} ms ago; this agent at {}:{} claims \
         the same name: give one of them another name (names are unique in a cluster), or stop the other \
         (a moved node is taken once the old one has been silent for {} ms)",
        registered.host,
        registered.port,
        live.age.as_millis(),
        member.host,
        member.port,
        cluster.policy.failure_timeout_ms
    ))
}

#[cfg(test)]
mod tests {
    use super::super::health::tests::{cluster, reports, standby};
    use super::*;

    fn report(incarnation: u64, system_identifier: u64) -> pb::NodeReport {
        pb::NodeReport {
            incarnation,
            system_identifier,
            ..standby("0/3000000", 0)
        }
    }

    fn with_reports(age_ms: u64, incarnation: u64) -> ClusterReports {
        let mut r = reports(vec![("node3", standby("0/3000000", 0), age_ms)]);
        r.nodes.get_mut("node3").unwrap().report.incarnation = incarnation;
        r
    }

    #[test]
    fn a_second_agent_under_a_live_nodes_name_is_refused_and_a_moved_node_is_taken_once_the_old_is_silent() {
        let c = cluster();
        let mut elsewhere = c.members["node3"].clone();
        elsewhere.port += 100;
        let live = with_reports(10, 7);
        let why = conflict(&c, &live, &elsewhere, &report(9, 0)).expect("two agents, one name");
        assert!(why.contains("claims the same name"), "{why}");
        // The registered agent itself, restarted (new incarnation) at the same address.
        assert_eq!(conflict(&c, &live, &c.members["node3"], &report(9, 0)), None);
        // The same agent process moved (same incarnation): an address change.
        assert_eq!(conflict(&c, &live, &elsewhere, &report(7, 0)), None);
        // The registered one silent past the failure timeout: the node moved.
        let silent = with_reports(c.policy.failure_timeout_ms + 1, 7);
        assert_eq!(conflict(&c, &silent, &elsewhere, &report(9, 0)), None);
    }

    #[test]
    fn another_database_is_refused_whatever_its_name() {
        let mut c = cluster();
        let r = with_reports(10, 7);
        let me = c.members["node3"].clone();
        assert_eq!(
            conflict(&c, &r, &me, &report(7, 42)),
            None,
            "no identifier recorded yet"
        );
        c.system_identifier = Some(41);
        let why = conflict(&c, &r, &me, &report(7, 42)).expect("another database");
        assert!(why.contains("42") && why.contains("41"), "{why}");
        assert_eq!(conflict(&c, &r, &me, &report(7, 41)), None);
        assert_eq!(
            conflict(&c, &r, &me, &report(7, 0)),
            None,
            "not known yet (no data)"
        );
    }
}
