//! The routing view of replicas, and the endpoint map routers receive. Pure.
//!
//! A replica is readable for its workload when it streams from the primary, its
//! replay lag is known (not only a lower bound, see [`super::lag`]) and within its
//! class's threshold (`lag_threshold_ms.<workload>`, the `general` one for classes
//! without their own) and it is not a backup replica. The
//! leader publishes the view through Raft only when some replica's health or
//! readability changes, so routers learn of every change that matters to them without
//! a Raft write per lag sample. An operator's drain (`pgquorum drain`) is applied on
//! top, in the map, so the leader's view of health never has to know about it.

use std::collections::BTreeMap;

use pgquorum_client::pb;

use super::health::{NodeStatus, DISCONNECTED};
use crate::state::{Cluster, ReplicaRoute};

/// Each replica's route as the statuses show it now.
pub fn routes(cluster: &Cluster, statuses: &[NodeStatus]) -> BTreeMap<String, ReplicaRoute> {
    let primary = cluster.primary.as_deref();
    statuses
        .iter()
        .filter(|s| Some(s.name.as_str()) != primary)
        .filter_map(|s| {
            let member = cluster.members.get(&s.name)?;
            let threshold = cluster
                .policy
                .lag_threshold_ms
                .get(&member.workload)
                .or_else(|| cluster.policy.lag_threshold_ms.get("general"))
                .copied()
                .unwrap_or(0);
            let readable = s.health != DISCONNECTED
                && s.role == "standby"
                && member.workload != "backup"
                && s.lag_source.exact()
                && s.lag_ms <= threshold;
            let route = ReplicaRoute {
                health: s.health.to_string(),
                lag_ms: s.lag_ms,
                lag_bytes: s.lag_bytes,
                readable,
            };
            Some((s.name.clone(), route))
        })
        .collect()
}

/// Whether `next` differs from the published view in what routers act on.
pub fn worth_publishing(cluster: &Cluster, next: &BTreeMap<String, ReplicaRoute>) -> bool {
    let now = &cluster.replica_routes;
    now.len() != next.len()
        || next.iter().any(|(name, r)| {
            now.get(name)
                .is_none_or(|p| p.health != r.health || p.readable != r.readable)
        })
}

fn endpoint(cluster: &Cluster, name: &str) -> Option<pb::Endpoint> {
    let m = cluster.members.get(name)?;
    let route = cluster.replica_routes.get(name);
    Some(pb::Endpoint {
        name: m.name.clone(),
        host: m.host.clone(),
        port: m.port.into(),
        region: m.region.clone(),
        workload: m.workload.clone(),
        health: route.map(|r| r.health.clone()).unwrap_or_default(),
        lag_ms: route.map(|r| r.lag_ms).unwrap_or(0),
        lag_bytes: route.map(|r| r.lag_bytes).unwrap_or(0),
        readable: route.is_some_and(|r| r.readable) && !cluster.out_of_reads(name),
        drained: cluster.drained.contains(name),
    })
}

/// The endpoint map of the committed state.
pub fn endpoint_map(cluster: &Cluster) -> pb::EndpointMap {
    let primary = cluster.primary.as_deref().and_then(|p| {
        let mut e = endpoint(cluster, p)?;
        e.health = "HEALTHY".into();
        e.readable = true;
        Some(e)
    });
    pb::EndpointMap {
        cluster: cluster.name.clone(),
        version: cluster.endpoint_version,
        epoch: cluster.epoch,
        primary,
        replicas: cluster
            .members
            .keys()
            .filter(|n| Some(n.as_str()) != cluster.primary.as_deref())
            .filter_map(|n| endpoint(cluster, n))
            .collect(),
        // Set by the watch stream that sends it.
        vouched: false,
    }
}

#[cfg(test)]
mod tests {
    use super::super::health::node_statuses;
    use super::super::health::tests::{cluster, primary, replica, reports, standby};
    use super::*;

    #[test]
    fn lag_over_the_class_threshold_makes_a_replica_unreadable() {
        let mut c = cluster();
        c.members.get_mut("node3").unwrap().workload = "reporting".into();
        let mk = |lag| {
            reports(vec![
                (
                    "node1",
                    primary(
                        "0/3000100",
                        "",
                        vec![
                            replica("node2", "streaming", "async", "0/3000100"),
                            replica("node3", "streaming", "async", "0/3000000"),
                        ],
                    ),
                    10,
                ),
                ("node2", standby("0/3000100", 0), 10),
                ("node3", standby("0/3000000", lag), 10),
            ])
        };
        let r = routes(&c, &node_statuses(&c, &mk(50)));
        assert!(r["node2"].readable && r["node3"].readable);
        assert!(worth_publishing(&c, &r), "nothing published yet");
        c.replica_routes = r;
        let r = routes(&c, &node_statuses(&c, &mk(80)));
        assert!(
            !worth_publishing(&c, &r),
            "a lag change alone is not worth a Raft write"
        );
        let r = routes(&c, &node_statuses(&c, &mk(150)));
        assert!(!r["node3"].readable, "reporting allows 100 ms");
        assert!(worth_publishing(&c, &r));

        c.replica_routes = r;
        c.endpoint_version = 7;
        let map = endpoint_map(&c);
        assert_eq!(
            (map.version, map.epoch, map.primary.unwrap().name.as_str()),
            (7, 1, "node1")
        );
        let readable: Vec<(&str, bool)> = map
            .replicas
            .iter()
            .map(|e| (e.name.as_str(), e.readable))
            .collect();
        assert_eq!(readable, [("node2", true), ("node3", false)]);
    }
}
