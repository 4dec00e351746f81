//! The leader's table of latest heartbeat reports.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgquorum_client::lsn::Lsn;
use pgquorum_client::{pb, sync_names};

/// One node's latest report and how old it is.
#[derive(Clone, Debug)]
pub struct Observed {
    pub report: pb::NodeReport,
    pub age: Duration,
    /// Since a report last said its Postgres answers; None: not while we lead.
    pub up_ago: Option<Duration>,
    /// Since this leader last granted the node a primary lease; None: never.
    pub lease_granted_ago: Option<Duration>,
}

/// What a primary reported it waits for, and its WAL position when that started.
///
/// A standby may leave the committed sync set only once the primary has stopped
/// waiting for it *and* the standbys it waits for now hold everything the old one
/// might have acknowledged: all WAL up to `since`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedSync {
    pub node: String,
    pub names: Vec<String>,
    pub since: Lsn,
}

/// Reports of one cluster, by node name, as of one moment.
#[derive(Clone, Debug, Default)]
pub struct ClusterReports {
    pub nodes: BTreeMap<String, Observed>,
    pub applied_sync: Option<AppliedSync>,
    /// How long this coordinator has been collecting reports (leading).
    pub leader_for: Duration,
    /// The `synchronous_standby_names` this leader last told each node to run with.
    pub told_sync_names: BTreeMap<String, String>,
}

struct NodeEntry {
    report: pb::NodeReport,
    at: Instant,
    last_up: Option<Instant>,
    lease_granted: Option<Instant>,
}

#[derive(Default)]
struct ClusterEntry {
    nodes: HashMap<String, NodeEntry>,
    applied_sync: Option<AppliedSync>,
    told_sync_names: BTreeMap<String, String>,
}

struct Table {
    clusters: HashMap<String, ClusterEntry>,
    since: Instant,
}

/// Shared, cheap to clone; each operation holds the lock briefly.
#[derive(Clone)]
pub struct Reports(Arc<Mutex<Table>>);

impl Default for Reports {
    fn default() -> Self {
        Reports(Arc::new(Mutex::new(Table {
            clusters: HashMap::new(),
            since: Instant::now(),
        })))
    }
}

impl Reports {
    pub fn record(&self, cluster: &str, node: &str, report: pb::NodeReport) {
        let mut all = self.0.lock().expect("reports lock poisoned");
        let entry = all.clusters.entry(cluster.to_string()).or_default();
        if report.role == "primary" && report.postgres_up {
            let names = sync_names::parse(&report.synchronous_standby_names);
            let changed = entry
                .applied_sync
                .as_ref()
                .is_none_or(|a| a.node != node || a.names != names);
            if changed {
                let since = Lsn::parse(&report.current_lsn).unwrap_or_default();
                entry.applied_sync = Some(AppliedSync {
                    node: node.to_string(),
                    names,
                    since,
                });
            }
        }
        let now = Instant::now();
        let previous = entry.nodes.remove(node);
        let last_up = if report.postgres_up {
            Some(now)
        } else {
            previous.as_ref().and_then(|p| p.last_up)
        };
        let lease_granted = previous.and_then(|p| p.lease_granted);
        entry.nodes.insert(
            node.to_string(),
            NodeEntry {
                report,
                at: now,
                last_up,
                lease_granted,
            },
        );
    }

    /// Notes the `synchronous_standby_names` just sent to a primary.
    pub fn told_sync_names(&self, cluster: &str, node: &str, names: &str) {
        let mut all = self.0.lock().expect("reports lock poisoned");
        let entry = all.clusters.entry(cluster.to_string()).or_default();
        entry.told_sync_names.insert(node.to_string(), names.to_string());
    }

    /// Notes that the node was just granted a primary lease.
    pub fn lease_granted(&self, cluster: &str, node: &str) {
        let mut all = self.0.lock().expect("reports lock poisoned");
        if let Some(n) = all.clusters.get_mut(cluster).and_then(|c| c.nodes.get_mut(node)) {
            n.lease_granted = Some(Instant::now());
        }
    }

    pub fn cluster(&self, cluster: &str) -> ClusterReports {
        let all = self.0.lock().expect("reports lock poisoned");
        let now = Instant::now();
        let leader_for = now.saturating_duration_since(all.since);
        let Some(entry) = all.clusters.get(cluster) else {
            return ClusterReports {
                leader_for,
                ..Default::default()
            };
        };
        let ago = |t: Option<Instant>| t.map(|t| now.saturating_duration_since(t));
        ClusterReports {
            nodes: entry
                .nodes
                .iter()
                .map(|(name, n)| {
                    let observed = Observed {
                        report: n.report.clone(),
                        age: now.saturating_duration_since(n.at),
                        up_ago: ago(n.last_up),
                        lease_granted_ago: ago(n.lease_granted),
                    };
                    (name.clone(), observed)
                })
                .collect(),
            applied_sync: entry.applied_sync.clone(),
            leader_for,
            told_sync_names: entry.told_sync_names.clone(),
        }
    }

    /// Forgets everything: a node that stops leading must not serve stale reports if it
    /// leads again later.
    pub fn clear(&self) {
        let mut all = self.0.lock().expect("reports lock poisoned");
        all.clusters.clear();
        all.since = Instant::now();
    }
}
