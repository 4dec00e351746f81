//! What a heartbeat reply tells an agent, from the committed state and the reports.
//! Pure, and shared by the gRPC handler and the simulation, so the simulation checks
//! the same orders the agents receive.

use pgquorum_client::pb;

use super::decide::choose;
use crate::observe::ClusterReports;
use crate::state::Cluster;
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
    // A candidate told to promote holds a lease too: if it is then lost, the failover
    // can move on to another candidate once that lease has certainly run out.
    let lease_ms = if (is_primary && cluster.failover.is_none()) || promote {
        cluster.policy.lease_ms
    } else {
        0
    };
    let observed = reports.nodes.get(name);
    let stopped = observed.is_some_and(|o| !o.report.postgres_up && o.report.role == "stopped");
    // A stopped primary is started again only if this leader never saw it running
    // (a cold start of the cluster) or nobody could take over from it.
    let start_primary = is_primary
        && cluster.failover.is_none()
        && stopped
        && (observed.is_none_or(|o| o.up_ago.is_none()) || choose(cluster, reports, name).is_err());
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
    pb::HeartbeatReply {
        epoch: cluster.epoch,
        primary: primary.map(|p| pb::PostgresEndpoint {
            name: p.name.clone(),
            host: p.host.clone(),
            port: p.port.into(),
        }),
        // Only before the cluster's database is known: a primary whose data is gone
        // must not start an empty one; it is failed over and rebuilt from a standby.
        bootstrap: initializing && is_primary && cluster.system_identifier.is_none(),
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
    }
}
