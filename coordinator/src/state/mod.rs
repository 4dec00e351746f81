//! The replicated state machine's contents and the pure function that changes them.
//!
//! [`ClusterState::apply`] is the only way state changes. It does no I/O, reads no
//! clock and never panics on bad input: a command that cannot be applied returns a
//! [`CommandError`] that every coordinator computes identically. The Raft storage layer
//! ([`crate::raft::state_machine`]) feeds it committed entries and snapshots it.

pub mod cluster;
pub mod command;
pub mod policy;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use cluster::{Cluster, FailoverRecord, HistoryEvent, Member};
pub use command::{Command, CommandError, CommandOutput, CommandResult};
pub use policy::{Policy, PolicyError, SyncMode};

/// Every database cluster the coordinator group guards, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub clusters: BTreeMap<String, Cluster>,
}

fn settings_iter(settings: &BTreeMap<String, String>) -> impl Iterator<Item = (&str, &str)> {
    settings.iter().map(|(k, v)| (k.as_str(), v.as_str()))
}

impl ClusterState {
    pub fn cluster(&self, name: &str) -> Result<&Cluster, CommandError> {
        self.clusters
            .get(name)
            .ok_or_else(|| CommandError::UnknownCluster(name.to_string()))
    }

    /// Checks a command against the current state without changing it. The gRPC layer
    /// calls this before proposing, so most bad requests are refused without a Raft
    /// round trip; `apply` checks again, because the state may move in between.
    pub fn check(&self, command: &Command) -> Result<(), CommandError> {
        self.clone().apply(command, 0).map(|_| ())
    }

    /// Applies one committed command. `log_index` is the Raft index of its entry.
    pub fn apply(&mut self, command: &Command, log_index: u64) -> CommandResult {
        match command {
            Command::CreateCluster {
                name,
                settings,
                actor,
                at_ms,
            } => {
                if !policy::is_valid_name(name) {
                    return Err(CommandError::InvalidName(name.clone()));
                }
                if self.clusters.contains_key(name) {
                    return Err(CommandError::ClusterExists(name.clone()));
                }
                let policy = Policy::default()
                    .with_settings(settings_iter(settings))
                    .map_err(CommandError::Policy)?;
                let mut cluster = Cluster::new(name.clone(), policy, *at_ms);
                cluster.record(HistoryEvent {
                    at_ms: *at_ms,
                    epoch: 0,
                    kind: "cluster_created".into(),
                    detail: describe_settings(settings),
                    actor: actor.clone(),
                    log_index,
                });
                self.clusters.insert(name.clone(), cluster.clone());
                Ok(CommandOutput::Cluster(Box::new(cluster)))
            }
            Command::SetPolicy {
                cluster,
                settings,
                actor,
                at_ms,
            } => {
                let c = self
                    .clusters
                    .get_mut(cluster)
                    .ok_or_else(|| CommandError::UnknownCluster(cluster.clone()))?;
                let next = c
                    .policy
                    .with_settings(settings_iter(settings))
                    .map_err(CommandError::Policy)?;
                let before = c.policy.to_settings();
                let changes: Vec<String> = next
                    .to_settings()
                    .into_iter()
                    .filter(|(k, v)| before.get(k) != Some(v))
                    .map(|(k, v)| format!("{k}: {} -> {v}", before.get(&k).map(String::as_str).unwrap_or("")))
                    .collect();
                c.policy = next;
                if !changes.is_empty() {
                    c.record(HistoryEvent {
                        at_ms: *at_ms,
                        epoch: 0,
                        kind: "policy_changed".into(),
                        detail: changes.join(", "),
                        actor: actor.clone(),
                        log_index,
                    });
                }
                Ok(CommandOutput::Policy(Box::new(c.policy.clone())))
            }
        }
    }
}

fn describe_settings(settings: &BTreeMap<String, String>) -> String {
    if settings.is_empty() {
        "default policy".to_string()
    } else {
        settings
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(name: &str, settings: &[(&str, &str)]) -> Command {
        Command::CreateCluster {
            name: name.into(),
            settings: settings
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            actor: "test".into(),
            at_ms: 1,
        }
    }

    fn set(cluster: &str, settings: &[(&str, &str)]) -> Command {
        Command::SetPolicy {
            cluster: cluster.into(),
            settings: settings
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            actor: "test".into(),
            at_ms: 2,
        }
    }

    #[test]
    fn create_then_set_policy_records_history() {
        let mut s = ClusterState::default();
        s.apply(&create("main", &[("lease_ms", "2000")]), 1).unwrap();
        assert_eq!(s.cluster("main").unwrap().policy.lease_ms, 2000);
        s.apply(&set("main", &[("maintenance", "true")]), 2).unwrap();
        let c = s.cluster("main").unwrap();
        assert!(c.policy.maintenance);
        let kinds: Vec<&str> = c.history.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["cluster_created", "policy_changed"]);
        assert_eq!(c.history[1].detail, "maintenance: false -> true");
        assert_eq!(c.history[1].log_index, 2);
    }

    #[test]
    fn refused_commands_leave_state_untouched() {
        let mut s = ClusterState::default();
        s.apply(&create("main", &[]), 1).unwrap();
        let before = s.clone();
        let refusals = [
            (create("main", &[]), CommandError::ClusterExists("main".into())),
            (
                create("bad name", &[]),
                CommandError::InvalidName("bad name".into()),
            ),
            (
                set("nope", &[("lease_ms", "2000")]),
                CommandError::UnknownCluster("nope".into()),
            ),
        ];
        for (cmd, want) in refusals {
            assert_eq!(s.apply(&cmd, 9).unwrap_err(), want);
        }
        let e = s.apply(&set("main", &[("lease_ms", "10")]), 9).unwrap_err();
        assert!(
            matches!(e, CommandError::Policy(ref p) if p.field == "lease_ms"),
            "{e}"
        );
        assert!(s.apply(&create("other", &[("sync_mode", "maybe")]), 9).is_err());
        assert_eq!(s, before);
    }

    #[test]
    fn history_is_bounded() {
        let mut s = ClusterState::default();
        s.apply(&create("main", &[]), 1).unwrap();
        for i in 0..(cluster::HISTORY_LIMIT as u64 + 10) {
            let value = if i % 2 == 0 { "true" } else { "false" };
            s.apply(&set("main", &[("maintenance", value)]), i + 2).unwrap();
        }
        let c = s.cluster("main").unwrap();
        assert_eq!(c.history.len(), cluster::HISTORY_LIMIT);
        assert_eq!(
            c.history.back().unwrap().log_index,
            cluster::HISTORY_LIMIT as u64 + 11
        );
    }

    #[test]
    fn a_no_op_change_records_nothing() {
        let mut s = ClusterState::default();
        s.apply(&create("main", &[]), 1).unwrap();
        s.apply(&set("main", &[("lease_ms", "1000")]), 2).unwrap();
        assert_eq!(s.cluster("main").unwrap().history.len(), 1);
    }
}
