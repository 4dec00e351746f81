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
}

#[derive(Default)]
struct ClusterEntry {
    nodes: HashMap<String, (pb::NodeReport, Instant)>,
    applied_sync: Option<AppliedSync>,
}

/// Shared, cheap to clone; each operation holds the lock briefly.
#[derive(Clone, Default)]
pub struct Reports(Arc<Mutex<HashMap<String, ClusterEntry>>>);

impl Reports {
    pub fn record(&self, cluster: &str, node: &str, report: pb::NodeReport) {
        let mut all = self.0.lock().expect("reports lock poisoned");
        let entry = all.entry(cluster.to_string()).or_default();
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
        entry.nodes.insert(node.to_string(), (report, Instant::now()));
    }

    pub fn cluster(&self, cluster: &str) -> ClusterReports {
        let all = self.0.lock().expect("reports lock poisoned");
        let Some(entry) = all.get(cluster) else {
            return ClusterReports::default();
        };
        let now = Instant::now();
        ClusterReports {
            nodes: entry
                .nodes
                .iter()
                .map(|(n, (r, at))| {
                    (
                        n.clone(),
                        Observed {
                            report: r.clone(),
                            age: now.saturating_duration_since(*at),
                        },
                    )
                })
                .collect(),
            applied_sync: entry.applied_sync.clone(),
        }
    }

    /// Forgets everything: a node that stops leading must not serve stale reports if it
    /// leads again later.
    pub fn clear(&self) {
        self.0.lock().expect("reports lock poisoned").clear();
    }
}
