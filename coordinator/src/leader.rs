//! The Raft leader's control loop: every few tens of milliseconds, for every cluster,
//! commit what the pure decisions call for — the next failover step
//! ([`crate::failover::decide`]) and sync-set changes ([`crate::sync::plan`]).
//!
//! Every step is a compare-and-set on the replicated state, so a step decided on a
//! stale view, or repeated by a new leader, is refused and decided again.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

use crate::failover::{decide, lease_expired, Step};
use crate::observe::Reports;
use crate::raft::state_machine::StateHandle;
use crate::raft::{NodeId, Raft};
use crate::state::{Cluster, Command, CommandError};
use crate::sync::plan;

/// How often the leader reconsiders every cluster. Short: detection and each failover
/// step wait for this loop.
const INTERVAL: Duration = Duration::from_millis(25);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The command the failover decision calls for, if any.
fn failover_command(cluster: &Cluster, step: Step) -> Option<Command> {
    let name = cluster.name.clone();
    let at_ms = now_ms();
    match step {
        Step::Wait | Step::Stuck(_) => None,
        Step::Start { old_primary, reason } => Some(Command::StartFailover {
            cluster: name,
            from_epoch: cluster.epoch,
            old_primary,
            candidate: None,
            accept_data_loss: false,
            kind: "failover".into(),
            reason,
            actor: "coordinator".into(),
            at_ms,
        }),
        Step::Choose {
            candidate,
            lsn,
            fenced_by,
        } => Some(Command::ChooseCandidate {
            cluster: name,
            to_epoch: cluster.epoch,
            candidate,
            lsn,
            fenced_by,
            at_ms,
        }),
        Step::Complete { primary } => Some(Command::CompletePromotion {
            cluster: name,
            to_epoch: cluster.epoch,
            primary,
            at_ms,
        }),
    }
}

pub async fn run(id: NodeId, raft: Raft, state: StateHandle, reports: Reports) {
    let mut was_leader = false;
    let mut stuck: HashMap<String, String> = HashMap::new();
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
        let mut commands = Vec::new();
        {
            let applied = state.read();
            for c in applied.state.clusters.values() {
                let r = reports.cluster(&c.name);
                let old = c
                    .failover
                    .as_ref()
                    .map(|f| f.old_primary.clone())
                    .or_else(|| c.primary.clone());
                let expired = old.is_some_and(|o| lease_expired(c, &r, &o));
                let step = decide(c, &r, expired);
                if let Step::Stuck(why) = &step {
                    if stuck.get(&c.name) != Some(why) {
                        warn!(cluster = %c.name, "{why}");
                        stuck.insert(c.name.clone(), why.clone());
                    }
                } else {
                    stuck.remove(&c.name);
                }
                if let Some(cmd) = failover_command(c, step) {
                    commands.push(cmd);
                } else if let Some((next, reason)) = plan(c, &r).commit {
                    commands.push(Command::SetSyncSet {
                        cluster: c.name.clone(),
                        expected: c.sync_set.clone(),
                        sync_set: next,
                        reason,
                        at_ms: now_ms(),
                    });
                }
            }
        }
        for command in commands {
            match raft.client_write(command.clone()).await {
                Ok(r) => match r.data {
                    Ok(_) => info!(?command, "committed"),
                    // Someone moved first; the next round decides again.
                    Err(CommandError::SyncSetChanged { .. } | CommandError::FailoverStep(_)) => {}
                    Err(e) => warn!(?command, "refused: {e}"),
                },
                Err(e) => warn!(?command, "not committed: {e}"),
            }
        }
    }
}
