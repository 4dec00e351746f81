//! The agent's Prometheus metrics (served at `/metrics` by [`crate::http`]): its own
//! view of its node. Gauges are set after each round and, for what runs down with
//! time (the lease), at each scrape.

use std::time::Instant;

use metrics::{counter, describe_counter, describe_gauge, gauge, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::http::View;

/// Installs the process-wide recorder and describes every series; None when one is
/// installed already (a second agent in one process, in tests).
pub fn install() -> Option<PrometheusHandle> {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).ok()?;
    describe_gauge!(
        "pgquorum_agent_postgres_up",
        "1 while Postgres answers on this node"
    );
    describe_gauge!(
        "pgquorum_agent_primary",
        "1 while Postgres runs as a primary that holds a lease (what /primary answers 200 to)"
    );
    describe_gauge!("pgquorum_agent_standby", "1 while Postgres runs as a standby");
    describe_gauge!("pgquorum_agent_epoch", "The cluster epoch this agent has seen");
    describe_gauge!(
        "pgquorum_agent_lease_remaining_seconds",
        Unit::Seconds,
        "How long this primary may still write without a renewal (0: no lease)"
    );
    describe_gauge!(
        "pgquorum_agent_failsafe",
        "1 while this primary writes on its standbys' promises (no coordinator leader answers)"
    );
    describe_gauge!(
        "pgquorum_agent_replay_lag_seconds",
        Unit::Seconds,
        "This standby's replay lag as the coordinator leader measured it (absent when unknown)"
    );
    describe_gauge!(
        "pgquorum_agent_leader_answered_seconds",
        Unit::Seconds,
        "Time since a coordinator leader last answered this agent's heartbeat"
    );
    describe_counter!(
        "pgquorum_agent_fences_total",
        "Times this agent stopped its Postgres to fence it, by reason"
    );
    describe_counter!(
        "pgquorum_agent_heartbeat_failures_total",
        "Heartbeat rounds no coordinator answered"
    );
    // Counters exist from the start, at 0: an alert on their increase sees the first.
    for reason in FENCE_REASONS {
        counter!("pgquorum_agent_fences_total", "reason" => reason).absolute(0);
    }
    counter!("pgquorum_agent_heartbeat_failures_total").absolute(0);
    Some(handle)
}

fn flag(on: bool) -> f64 {
    if on {
        1.0
    } else {
        0.0
    }
}

/// After a round: what it observed and heard.
pub fn after_round(view: &View) {
    gauge!("pgquorum_agent_postgres_up").set(flag(view.postgres_up));
    gauge!("pgquorum_agent_standby").set(flag(view.postgres_up && view.role == "standby"));
    gauge!("pgquorum_agent_epoch").set(view.epoch as f64);
    gauge!("pgquorum_agent_failsafe").set(flag(view.failsafe));
    if let Some(lag) = view.lag_ms {
        gauge!("pgquorum_agent_replay_lag_seconds").set(lag as f64 / 1000.0);
    }
}

/// At a scrape: what runs down with time.
pub fn at_scrape(view: &View, now: Instant) {
    let left = view
        .lease_until
        .map_or(0.0, |u| u.saturating_duration_since(now).as_secs_f64());
    gauge!("pgquorum_agent_lease_remaining_seconds").set(left);
    gauge!("pgquorum_agent_primary").set(flag(crate::http::judge(crate::http::Check::Primary, view, now)));
    if let Some(at) = view.leader_answered_at {
        gauge!("pgquorum_agent_leader_answered_seconds").set(now.saturating_duration_since(at).as_secs_f64());
    }
}

/// Every `reason` label of `pgquorum_agent_fences_total`.
const FENCE_REASONS: [&str; 4] = [
    "lease_expired",
    "no_longer_candidate",
    "not_the_primary",
    "clean_stop_failed",
];

/// This agent stopped its Postgres to fence it.
pub fn fenced(reason: &'static str) {
    counter!("pgquorum_agent_fences_total", "reason" => reason).increment(1);
}

/// No coordinator answered a heartbeat round.
pub fn heartbeat_failed() {
    counter!("pgquorum_agent_heartbeat_failures_total").increment(1);
}
