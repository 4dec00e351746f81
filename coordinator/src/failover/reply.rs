//! What a heartbeat reply tells an agent, from the committed state and the reports.
//! Pure, and shared by the gRPC handler and the simulation, so the simulation checks
//! the same orders the agents receive.

use pgquorum_client::pb;

use super::decide::choose;
use crate::observe::health::node_statuses;
use crate::observe::ClusterReports;
use crate::state::{Cluster, Order};
use crate::sync::plan;

/// The reply to `name`'s heartbeat. When `lease_ms` is non-zero the caller must note
/// the grant (the fence waits for it to run out).
pub fn heartbeat_reply(
    cluster: &Cluster,
    reports: &ClusterReports,
    name: &str,
    initializing: bool,
) -> pb::HeartbeatReply {
    let primary = cluster.primary.as_ref().and_then(|p| cluster.members.get(p));
    let is_primary = primary.is_some_and(|p| p.name == name);
    let promote = cluster
        .failover
        .as_ref()
        .is_some_and(|f| f.step == "candidate_chosen" && f.candidate == name);
    let synchronous_standby_names = if is_primary {
        plan(cluster, reports).synchronous_standby_names
    } else if promote {
        // Set before promoting, so the new primary acknowledges no commit before a
        // committed sync standby holds it.
        let mut next = cluster.clone();
        next.primary = Some(name.to_string());
        next.sync_set.retain(|s| s != name);
        plan(&next, reports).synchronous_standby_names
    } else {
        String::new()
    };
    let observed = reports.nodes.get(name);
    let stopped = observed.is_some_and(|o| !o.report.postgres_up && o.report.role == "stopped");
    // A stopped primary is started again only if this leader never saw it running
    // (a cold start of the cluster) or nobody could take over from it.
    let start_primary = is_primary
        && cluster.failover.is_none()
        && stopped
        && !initializing
        && (observed.is_none_or(|o| o.up_ago.is_none()) || choose(cluster, reports, name).is_err());
    let bootstrap = initializing && is_primary && cluster.system_identifier.is_none();
    // A candidate told to promote holds a lease too: if it is then lost, the failover
    // can move on to another candidate once that lease has certainly run out. A primary
    // whose agent says it is stopped (or has no data) gets one only with an order to
    // start: its agent's next "stopped" then shows the failover it did not start,
    // without waiting for a lease it had no use for (see `decide::fenced`). Under
    // maintenance no failover starts by itself, and an operator who stopped the primary
    // (to load a library, say) must be able to start it again: it keeps its lease.
    let idle = initializing || (stopped && !cluster.policy.maintenance);
    let lease_ms =
        if (is_primary && cluster.failover.is_none() && (!idle || start_primary || bootstrap)) || promote {
            cluster.policy.lease_ms
        } else {
            0
        };
    // With a lease, who must promise for the primary to write past it (the failsafe).
    let failsafe_peers = if is_primary && lease_ms > 0 {
        failsafe_roster(cluster, name)
            .map(|m| pb::FailsafePeer {
                name: m.name.clone(),
                agent_addr: m.agent_addr.clone(),
            })
            .collect()
    } else {
        Vec::new()
    };
    let standby_slots = if is_primary || promote {
        cluster
            .members
            .keys()
            .filter(|m| m.as_str() != name)
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    let seen = node_statuses(cluster, reports)
        .into_iter()
        .find(|s| s.name == name);
    pb::HeartbeatReply {
        sync_state: seen.as_ref().map_or("none", |s| s.sync_state).to_string(),
        lag_ms: seen.as_ref().filter(|s| s.lag_source.exact()).map(|s| s.lag_ms),
        drained: cluster.drained.contains(name),
        maintenance: cluster.in_maintenance(name),
        // A rebuild gives the node's data up: only once no failover may need it and
        // the coordinators took it out of the sync set (its commits are elsewhere).
        reinit: if cluster.failover.is_none() && !cluster.sync_set.iter().any(|s| s == name) {
            cluster.pending(name, Order::Reinit)
        } else {
            0
        },
        restart: if cluster.failover.is_none() {
            cluster.pending(name, Order::Restart)
        } else {
            0
        },
        reload: cluster.pending(name, Order::Reload),
        parameters: cluster.parameters.clone().into_iter().collect(),
        parameters_version: cluster.parameters_version,
        drop_slots: if is_primary || promote {
            cluster.removed.clone()
        } else {
            Vec::new()
        },
        epoch: cluster.epoch,
        primary: primary.map(|p| pb::PostgresEndpoint {
            name: p.name.clone(),
            host: p.host.clone(),
            port: p.port.into(),
        }),
        // Only before the cluster's database is known: a primary whose data is gone
        // must not start an empty one; it is failed over and rebuilt from a standby.
        bootstrap,
        synchronous_standby_names,
        heartbeat_interval_ms: cluster.policy.heartbeat_interval_ms,
        lease_ms,
        promote,
        standby_slots,
        start_primary,
        // Set by the gRPC handler, which owns the leader's clock.
        reply_mark: 0,
        stop_cleanly: cluster
            .failover
            .as_ref()
            .is_some_and(|f| f.kind == "switchover" && f.step == "started" && f.old_primary == name),
        failsafe_peers,
    }
}

/// Whose promises a primary needs to write past its lease while no leader answers it
/// (the failsafe, docs/leases.md): everyone who could be promoted in its place — by an
/// automatic failover (in `strict` mode only the sync set) *or by an operator*, whose
/// `failover --to NODE --accept-data-loss` may pick any running standby, `nofailover`
/// and other regions included. So every other member, as in Patroni's failsafe mode: a
/// node that never promised must never be promoted while the primary may still write
/// on promises. The cost: during an outage, one member down or unreachable from the
/// primary ends the failsafe (the primary then stops at its lease's end, as without).
pub fn failsafe_roster<'a>(
    cluster: &'a Cluster,
    primary: &'a str,
) -> impl Iterator<Item = &'a crate::state::Member> + 'a {
    cluster.members.values().filter(move |m| m.name != primary)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::observe::health::tests::{cluster, primary, reports, standby, stopped};

    #[test]
    fn a_stopped_primary_gets_a_lease_only_with_an_order_to_start() {
        let mut c = cluster();
        c.sync_set = vec!["node2".into()];
        let mut r = reports(vec![
            ("node1", stopped(), 10),
            ("node2", standby("0/5000000", 0), 10),
        ]);
        // Seen running by this leader, and node2 could take over: no start, no lease.
        r.nodes.get_mut("node1").unwrap().up_ago = Some(Duration::from_millis(500));
        let reply = heartbeat_reply(&c, &r, "node1", false);
        assert!(!reply.start_primary);
        assert_eq!(reply.lease_ms, 0);
        // Under maintenance an operator's stop keeps the lease, so the operator can start
        // it again (review finding: its own guard killed it).
        let mut paused = c.clone();
        paused.policy.maintenance = true;
        let reply = heartbeat_reply(&paused, &r, "node1", false);
        assert!(!reply.start_primary);
        assert_eq!(reply.lease_ms, c.policy.lease_ms);
        // Nobody could take over: started again, under a lease.
        r.nodes.remove("node2");
        let reply = heartbeat_reply(&c, &r, "node1", false);
        assert!(reply.start_primary);
        assert_eq!(reply.lease_ms, c.policy.lease_ms);
        // A running primary is granted one at every heartbeat.
        let r = reports(vec![("node1", primary("0/5000000", "", vec![]), 10)]);
        assert_eq!(
            heartbeat_reply(&c, &r, "node1", false).lease_ms,
            c.policy.lease_ms
        );
    }

    #[test]
    fn a_rebuild_is_ordered_only_outside_the_sync_set_and_any_failover() {
        let mut c = cluster();
        c.sync_set = vec!["node2".into()];
        for node in ["node2", "node3"] {
            c.orders
                .entry(node.into())
                .or_default()
                .insert(Order::Reinit, crate::state::cluster::Asked { token: 5, at_ms: 0 });
        }
        let r = reports(vec![
            ("node2", standby("0/5000000", 0), 10),
            ("node3", standby("0/5000000", 0), 10),
        ]);
        assert_eq!(
            heartbeat_reply(&c, &r, "node2", false).reinit,
            0,
            "still in the sync set"
        );
        assert_eq!(heartbeat_reply(&c, &r, "node3", false).reinit, 5);
        c.failover = Some(crate::observe::health::tests::started_from_node1());
        assert_eq!(
            heartbeat_reply(&c, &r, "node3", false).reinit,
            0,
            "a failover may need it"
        );
    }

    #[test]
    fn a_lease_grant_names_every_other_member_as_a_failsafe_peer() {
        let mut c = cluster();
        c.sync_set = vec!["node2".into()];
        c.members.get_mut("node3").unwrap().nofailover = true;
        c.members.get_mut("node3").unwrap().agent_addr = "10.0.0.3:7201".into();
        let r = reports(vec![
            ("node1", primary("0/5000000", "", vec![]), 10),
            ("node2", standby("0/5000000", 0), 10),
        ]);
        let reply = heartbeat_reply(&c, &r, "node1", false);
        assert!(reply.lease_ms > 0);
        // Not only the sync set: an operator's override may pick any running standby.
        assert_eq!(
            reply.failsafe_peers,
            [
                pb::FailsafePeer {
                    name: "node2".into(),
                    agent_addr: String::new()
                },
                pb::FailsafePeer {
                    name: "node3".into(),
                    agent_addr: "10.0.0.3:7201".into()
                }
            ]
        );
        let standby_reply = heartbeat_reply(&c, &r, "node2", false);
        assert!(standby_reply.failsafe_peers.is_empty(), "only the lease holder");
    }

    #[test]
    fn a_primary_without_data_gets_a_lease_only_to_bootstrap_the_cluster() {
        let mut c = cluster();
        let mut empty = stopped();
        empty.initializing = true;
        let r = reports(vec![("node1", empty, 10)]);
        let reply = heartbeat_reply(&c, &r, "node1", true);
        assert!(reply.bootstrap && reply.lease_ms > 0, "the cluster's first start");
        c.system_identifier = Some(7);
        let reply = heartbeat_reply(&c, &r, "node1", true);
        assert!(!reply.bootstrap && !reply.start_primary);
        assert_eq!(reply.lease_ms, 0, "its data is gone: failed over, never renewed");
    }
}
