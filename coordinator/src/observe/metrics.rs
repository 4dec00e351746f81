//! The coordinator's Prometheus metrics, served at `/metrics` on its `http` address.
//!
//! Everything but the handover histogram is computed at scrape time: Raft (term,
//! leader, log and applied index, quorum contact), each cluster's committed state
//! (epoch, paused, failover in flight) and, on the leader only (the reports live
//! there), every node's role, health, sync state, timeline, WAL position, lag and
//! heartbeat age. Series a scrape did not set for a minute are dropped (a removed
//! node, a lost leadership). Failovers and switchovers completed while this
//! coordinator ran are counted, with their durations, as they are applied.

use std::time::{Duration, Instant};

use metrics::{describe_gauge, describe_histogram, gauge, histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

use super::health::node_statuses;
use super::Reports;
use crate::raft::leadership::Leadership;
use crate::raft::state_machine::StateHandle;
use crate::raft::{NodeId, Raft};
use pgquorum_client::lsn::Lsn;

/// What a scrape reads.
#[derive(Clone)]
pub struct Sources {
    pub id: NodeId,
    pub raft: Raft,
    pub leadership: Leadership,
    pub state: StateHandle,
    pub reports: Reports,
}

/// Installs the process-wide recorder and describes every series; None when one is
/// installed already.
pub fn install() -> Option<PrometheusHandle> {
    let recorder = PrometheusBuilder::new()
        .idle_timeout(MetricKindMask::GAUGE, Some(Duration::from_secs(60)))
        .set_buckets_for_metric(
            Matcher::Full("pgquorum_handover_duration_seconds".into()),
            &[0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0],
        )
        .ok()?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).ok()?;
    for (name, help) in [
        ("pgquorum_raft_term", "Current Raft term"),
        (
            "pgquorum_raft_leader",
            "Id of the Raft leader this coordinator knows (0: none)",
        ),
        ("pgquorum_raft_is_leader", "1 on the Raft leader"),
        (
            "pgquorum_raft_last_log_index",
            "Index of the last entry in this coordinator's log",
        ),
        (
            "pgquorum_raft_applied_index",
            "Index of the last entry applied to the state",
        ),
        ("pgquorum_raft_voters", "Voters in the coordinator group"),
        ("pgquorum_cluster_epoch", "The cluster's epoch (one per primary)"),
        ("pgquorum_cluster_paused", "1 while automatic failover is paused"),
        (
            "pgquorum_cluster_failover_in_progress",
            "1 while a failover or switchover runs",
        ),
        (
            "pgquorum_cluster_members",
            "Database nodes registered in the cluster",
        ),
        (
            "pgquorum_node_primary",
            "1 for the cluster's primary (leader only)",
        ),
        (
            "pgquorum_node_healthy",
            "1 while the node is HEALTHY (leader only)",
        ),
        (
            "pgquorum_node_disconnected",
            "1 while the node is DISCONNECTED: not streaming, or its agent silent (leader only)",
        ),
        (
            "pgquorum_node_synchronous",
            "1 for a synchronous standby (leader only)",
        ),
        ("pgquorum_node_timeline", "The node's timeline (leader only)"),
        (
            "pgquorum_node_drained",
            "1 while an operator keeps the node out of read routing",
        ),
        (
            "pgquorum_node_held",
            "1 while the node is held after force-new-group",
        ),
        (
            "pgquorum_node_maintenance",
            "1 while an operator keeps the node in maintenance (never promoted, out of sync set and reads)",
        ),
    ] {
        describe_gauge!(name, help);
    }
    describe_gauge!(
        "pgquorum_raft_quorum_contact_age_seconds",
        Unit::Seconds,
        "On the leader: time since a quorum last acknowledged it"
    );
    describe_gauge!(
        "pgquorum_node_lag_seconds",
        Unit::Seconds,
        "Replay lag in time (leader only; a lower bound when not measured exactly)"
    );
    describe_gauge!(
        "pgquorum_node_lag_bytes",
        Unit::Bytes,
        "Replay lag in bytes behind the primary (leader only)"
    );
    describe_gauge!(
        "pgquorum_node_wal_position_bytes",
        Unit::Bytes,
        "The primary's current WAL position, a standby's replay position (leader only)"
    );
    describe_gauge!(
        "pgquorum_node_heartbeat_age_seconds",
        Unit::Seconds,
        "Time since the node's agent last reported (leader only)"
    );
    describe_gauge!(
        "pgquorum_node_lease_remaining_seconds",
        Unit::Seconds,
        "How long the primary lease this leader granted the node still runs, margin included; 0: none (leader only)"
    );
    describe_histogram!(
        "pgquorum_handover_duration_seconds",
        Unit::Seconds,
        "Failovers and switchovers completed while this coordinator ran: start to new primary"
    );
    Some(handle)
}

fn flag(on: bool) -> f64 {
    if on {
        1.0
    } else {
        0.0
    }
}

/// Sets every gauge from `s` as of `now`.
pub fn scrape(s: &Sources, now: Instant) {
    let m = s.raft.metrics().borrow().clone();
    let leads = m.current_leader == Some(s.id);
    gauge!("pgquorum_raft_term").set(m.current_term as f64);
    gauge!("pgquorum_raft_leader").set(m.current_leader.unwrap_or(0) as f64);
    gauge!("pgquorum_raft_is_leader").set(flag(leads));
    gauge!("pgquorum_raft_last_log_index").set(m.last_log_index.unwrap_or(0) as f64);
    gauge!("pgquorum_raft_applied_index").set(m.last_applied.map_or(0, |l| l.index) as f64);
    gauge!("pgquorum_raft_voters").set(m.membership_config.membership().voter_ids().count() as f64);
    if let Some(at) = s.leadership.current().and_then(|l| l.quorum_acked_at) {
        gauge!("pgquorum_raft_quorum_contact_age_seconds")
            .set(now.saturating_duration_since(at).as_secs_f64());
    }
    let applied = s.state.read();
    for c in applied.state.clusters.values() {
        let cl = [("cluster", c.name.clone())];
        gauge!("pgquorum_cluster_epoch", &cl).set(c.epoch as f64);
        gauge!("pgquorum_cluster_paused", &cl).set(flag(c.policy.maintenance));
        gauge!("pgquorum_cluster_failover_in_progress", &cl).set(flag(c.failover.is_some()));
        gauge!("pgquorum_cluster_members", &cl).set(c.members.len() as f64);
        for name in c.members.keys() {
            let l = [("cluster", c.name.clone()), ("node", name.clone())];
            gauge!("pgquorum_node_drained", &l).set(flag(c.drained.contains(name)));
            gauge!("pgquorum_node_held", &l).set(flag(c.held.contains(name)));
            gauge!("pgquorum_node_maintenance", &l).set(flag(c.in_maintenance(name)));
        }
        if !leads {
            continue;
        }
        let reports = s.reports.cluster(&c.name, now);
        let lease_left = reports.lease_left();
        for n in node_statuses(c, &reports) {
            let l = [("cluster", c.name.clone()), ("node", n.name.clone())];
            let left = lease_left.get(&n.name).copied().unwrap_or_default();
            gauge!("pgquorum_node_lease_remaining_seconds", &l).set(left.as_secs_f64());
            gauge!("pgquorum_node_primary", &l).set(flag(c.primary.as_deref() == Some(n.name.as_str())));
            gauge!("pgquorum_node_healthy", &l).set(flag(n.health == super::health::HEALTHY));
            gauge!("pgquorum_node_disconnected", &l).set(flag(n.health == super::health::DISCONNECTED));
            gauge!("pgquorum_node_synchronous", &l).set(flag(n.sync_state == "sync"));
            gauge!("pgquorum_node_timeline", &l).set(f64::from(n.timeline));
            gauge!("pgquorum_node_lag_seconds", &l).set(n.lag_ms as f64 / 1000.0);
            gauge!("pgquorum_node_lag_bytes", &l).set(n.lag_bytes as f64);
            if let Some(age) = n.heartbeat_age_ms {
                gauge!("pgquorum_node_heartbeat_age_seconds", &l).set(age as f64 / 1000.0);
            }
            let position = n.report.as_ref().and_then(|r| {
                let lsn = if n.role == "primary" {
                    &r.current_lsn
                } else {
                    &r.replay_lsn
                };
                Lsn::parse(lsn)
            });
            if let Some(Lsn(bytes)) = position {
                gauge!("pgquorum_node_wal_position_bytes", &l).set(bytes as f64);
            }
        }
    }
}

/// Observes every failover and switchover completed (applied) after `since_index`.
pub async fn count_handovers(state: StateHandle, mut since_index: u64) {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let applied = state.read();
        let mut newest = since_index;
        for c in applied.state.clusters.values() {
            for e in c.history.iter().filter(|e| e.log_index > since_index) {
                newest = newest.max(e.log_index);
                let (Some(kind), Some(ms)) = (e.kind.strip_suffix("_completed"), e.duration_ms) else {
                    continue;
                };
                histogram!(
                    "pgquorum_handover_duration_seconds",
                    "cluster" => c.name.clone(),
                    "kind" => kind.to_string()
                )
                .record(ms as f64 / 1000.0);
            }
        }
        since_index = newest;
    }
}

/// Serves `/metrics` on `listener` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    sources: Sources,
) -> std::io::Result<()> {
    use axum::response::IntoResponse;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            let sources = sources.clone();
            async move {
                scrape(&sources, Instant::now());
                ([("content-type", "text/plain; version=0.0.4")], handle.render()).into_response()
            }
        }),
    );
    axum::serve(listener, app).await
}
