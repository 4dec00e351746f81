//! What needs an operator's attention, with the thresholds of the replication design:
//! replay lag (in time, as [`super::lag`] measures it, a lower bound counting like a
//! measurement) over `alert_lag_warning_ms` (1 s) WARNING, over `alert_lag_critical_ms`
//! (5 s) CRITICAL, over `alert_lag_emergency_ms` (30 s) EMERGENCY; an expected member
//! that is not streaming CRITICAL; a strict-mode primary without a synchronous standby
//! CRITICAL (its commits wait). Pure.

use super::health::{NodeStatus, DISCONNECTED, HEALTHY};
use crate::state::{Cluster, SyncMode};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Warning,
    Critical,
    Emergency,
}

impl Severity {
    pub fn as_str(&self) -> &'static str {
        match self {
            Severity::Warning => "WARNING",
            Severity::Critical => "CRITICAL",
            Severity::Emergency => "EMERGENCY",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    pub severity: Severity,
    /// Empty for the cluster as a whole.
    pub node: String,
    pub message: String,
}

/// Why a node is not usable, in words.
fn why_down(cluster: &Cluster, s: &NodeStatus) -> String {
    match (&s.report, s.heartbeat_age_ms) {
        (None, None) => "its agent has never reported to this coordinator".into(),
        (None, Some(age)) => format!(
            "its agent has been silent for {age} ms (failure timeout {} ms)",
            cluster.policy.failure_timeout_ms
        ),
        (Some(r), _) if !r.postgres_up && r.role == "unknown" => {
            format!("Postgres does not answer: {}", r.error)
        }
        (Some(r), _) if !r.postgres_up => format!("Postgres is down: {}", r.error),
        (Some(r), _) if r.role == "primary" => "it runs as a primary but is not this epoch's primary".into(),
        (Some(r), _) if r.wal_receiver_status.is_empty() => "it has no WAL receiver".into(),
        (Some(r), _) => format!(
            "the primary does not list it (WAL receiver {})",
            r.wal_receiver_status
        ),
    }
}

/// The coordinator group itself cannot commit (`why`): CRITICAL, for the group.
pub fn no_quorum(why: String) -> Alert {
    Alert {
        severity: Severity::Critical,
        node: String::new(),
        message: format!("coordinator group without quorum: {why}"),
    }
}

/// `stuck`: why a needed failover cannot proceed on its own (from the decision).
pub fn alerts(cluster: &Cluster, statuses: &[NodeStatus], stuck: Option<String>) -> Vec<Alert> {
    let mut out = Vec::new();
    if let Some(why) = stuck {
        out.push(Alert {
            severity: Severity::Critical,
            node: String::new(),
            message: why,
        });
    }
    let p = &cluster.policy;
    let mut push = |severity, node: &str, message: String| {
        out.push(Alert {
            severity,
            node: node.into(),
            message,
        })
    };
    if p.maintenance {
        push(
            Severity::Warning,
            "",
            format!(
                "cluster {} is paused: no automatic failover (`pgquorum resume`)",
                cluster.name
            ),
        );
    }
    let Some(primary) = cluster.primary.as_deref() else {
        push(
            Severity::Critical,
            "",
            format!("cluster {} has no primary yet", cluster.name),
        );
        return out;
    };
    for s in statuses {
        if s.name == primary {
            if s.health != HEALTHY {
                push(
                    Severity::Critical,
                    &s.name,
                    format!("primary {} is not available: {}", s.name, why_down(cluster, s)),
                );
            }
            continue;
        }
        let waited_for = cluster.sync_set.iter().any(|m| m == &s.name);
        if cluster.in_maintenance(&s.name) && !(waited_for && s.health == DISCONNECTED) {
            // The operator is working on it: stopped or lagging is expected (unless
            // the primary may still wait for it: then it is said below as ever).
            push(
                Severity::Warning,
                &s.name,
                format!(
                    "{} is in maintenance: never promoted, out of the sync set and read routing \
                     (`pgquorum maintenance off {}`)",
                    s.name, s.name
                ),
            );
            continue;
        }
        if s.health == DISCONNECTED {
            push(
                Severity::Critical,
                &s.name,
                format!("{} is not streaming: {}", s.name, why_down(cluster, s)),
            );
            continue;
        }
        let lag = s.lag_ms;
        let level = [
            (p.alert_lag_emergency_ms, Severity::Emergency),
            (p.alert_lag_critical_ms, Severity::Critical),
            (p.alert_lag_warning_ms, Severity::Warning),
        ]
        .into_iter()
        .find(|(limit, _)| lag > *limit);
        if let Some((limit, severity)) = level {
            let at_least = if s.lag_source.exact() { "" } else { "at least " };
            push(
                severity,
                &s.name,
                format!(
                    "{} replay lag {at_least}{lag} ms ({} bytes) exceeds {limit} ms",
                    s.name, s.lag_bytes
                ),
            );
        }
    }
    let primary_up = statuses.iter().any(|s| s.name == primary && s.health == HEALTHY);
    if p.sync_mode == SyncMode::Strict && primary_up && !statuses.iter().any(|s| s.sync_state == "sync") {
        push(
            Severity::Critical,
            primary,
            format!("primary {primary} has no synchronous standby: its commits wait (strict sync mode)"),
        );
    }
    out.sort_by(|a, b| b.severity.cmp(&a.severity).then_with(|| a.node.cmp(&b.node)));
    out
}

#[cfg(test)]
mod tests {
    use super::super::health::node_statuses;
    use super::super::health::tests::{cluster, primary, replica, reports, standby};
    use super::*;

    #[test]
    fn lag_levels_disconnection_and_missing_sync_standby() {
        let c = cluster();
        let r = reports(vec![
            (
                "node1",
                primary(
                    "0/3000100",
                    "",
                    vec![replica("node2", "streaming", "async", "0/3000000")],
                ),
                10,
            ),
            ("node2", standby("0/3000000", 6_000), 10),
            ("node3", standby("0/3000000", 0), 60_000),
        ]);
        let a = alerts(&c, &node_statuses(&c, &r), None);
        let summary: Vec<(&str, &str)> = a.iter().map(|a| (a.severity.as_str(), a.node.as_str())).collect();
        assert_eq!(
            summary,
            [
                ("CRITICAL", "node1"),
                ("CRITICAL", "node2"),
                ("CRITICAL", "node3")
            ],
            "{a:#?}"
        );
        assert!(a[0].message.contains("no synchronous standby"));
        assert!(
            a[1].message.contains("6000 ms (256 bytes) exceeds 5000 ms"),
            "{}",
            a[1].message
        );
        assert!(a[2].message.contains("silent for 60000 ms"));
    }

    #[test]
    fn a_node_in_maintenance_is_one_warning_whatever_its_state() {
        let mut c = cluster();
        c.maintenance.insert("node3".into());
        let r = reports(vec![
            ("node1", primary("0/3000100", "", vec![]), 10),
            ("node3", standby("0/3000000", 60_000), 60_000),
        ]);
        let a = alerts(&c, &node_statuses(&c, &r), None);
        let node3: Vec<(&str, &str)> = a
            .iter()
            .filter(|a| a.node == "node3")
            .map(|a| (a.severity.as_str(), a.message.as_str()))
            .collect();
        assert_eq!(node3.len(), 1, "{a:#?}");
        assert_eq!(node3[0].0, "WARNING");
        assert!(node3[0].1.contains("maintenance"), "{}", node3[0].1);
    }

    #[test]
    fn a_healthy_cluster_has_no_alerts_and_warning_starts_past_one_second() {
        let c = cluster();
        let mk = |lag| {
            reports(vec![
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
                    10,
                ),
                ("node2", standby("0/3000100", 0), 10),
                ("node3", standby("0/3000000", lag), 10),
            ])
        };
        assert_eq!(alerts(&c, &node_statuses(&c, &mk(1_000)), None), vec![]);
        let a = alerts(&c, &node_statuses(&c, &mk(1_001)), None);
        assert_eq!(
            (a.len(), a[0].severity, a[0].node.as_str()),
            (1, Severity::Warning, "node3")
        );
        let a = alerts(&c, &node_statuses(&c, &mk(30_001)), None);
        assert_eq!(a[0].severity, Severity::Emergency);

        // Paused: a warning for the cluster, nothing else changes.
        let mut paused = c.clone();
        paused.policy.maintenance = true;
        let a = alerts(&paused, &node_statuses(&paused, &mk(0)), None);
        assert_eq!(
            (a.len(), a[0].severity, a[0].node.as_str()),
            (1, Severity::Warning, "")
        );
        assert!(a[0].message.contains("paused"), "{}", a[0].message);
    }
}
