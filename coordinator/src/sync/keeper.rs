//! The leader's loop that commits sync-set decisions.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

use super::plan;
use crate::observe::Reports;
use crate::raft::state_machine::StateHandle;
use crate::raft::{NodeId, Raft};
use crate::state::{Command, CommandError};

/// How often the leader reconsiders every cluster's sync set. Short, so that a lost
/// sync standby is replaced within a heartbeat or two.
const INTERVAL: Duration = Duration::from_millis(50);

pub async fn run(id: NodeId, raft: Raft, state: StateHandle, reports: Reports) {
    let mut was_leader = false;
    loop {
        tokio::time::sleep(INTERVAL).await;
        let is_leader = raft.metrics().borrow().current_leader == Some(id);
        if !is_leader {
            if was_leader {
                reports.clear();
            }
            was_leader = false;
            continue;
        }
        was_leader = true;
        let decisions: Vec<(String, Vec<String>, Vec<String>, String)> = {
            let applied = state.read();
            applied
                .state
                .clusters
                .values()
                .filter_map(|c| {
                    let p = plan(c, &reports.cluster(&c.name));
                    p.commit
                        .map(|(next, reason)| (c.name.clone(), c.sync_set.clone(), next, reason))
                })
                .collect()
        };
        for (cluster, expected, sync_set, reason) in decisions {
            let at_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            let command = Command::SetSyncSet {
                cluster: cluster.clone(),
                expected,
                sync_set,
                reason,
                at_ms,
            };
            match raft.client_write(command.clone()).await {
                Ok(r) => match r.data {
                    Ok(_) => info!(%cluster, ?command, "sync set changed"),
                    // Someone changed it first; the next round decides again.
                    Err(CommandError::SyncSetChanged { .. }) => {}
                    Err(e) => warn!(%cluster, "sync set change refused: {e}"),
                },
                Err(e) => warn!(%cluster, "sync set change not committed: {e}"),
            }
        }
    }
}
