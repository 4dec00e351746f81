//! The replicated state machine: [`ClusterState`] in memory, snapshots in sled.
//!
//! The state is small, so it lives in memory and `apply` does no I/O. What makes it
//! durable is the snapshot: built from a copy of the state, written with its metadata
//! as one sled value and on stable storage ([`Durable::flush`]) before openraft is told
//! it exists (and so before the log behind it may be purged). On start the state is the last snapshot, and openraft
//! re-applies the committed entries after it; `applied_state` therefore reports the
//! snapshot's log id, whose effects are certainly on disk.
//!
//! Readers (gRPC handlers) share the state through [`StateHandle`]: a std `RwLock`
//! held only to copy out what they need, never across an await.

use std::io::Cursor;
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError};
use serde::{Deserialize, Serialize};

use super::codec::{decode, encode};
use super::durable::Durable;
use super::{Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig};
use crate::state::{ClusterState, CommandOutput, CommandResult};

const KEY_SNAPSHOT: &[u8] = b"current";

/// What the state machine has applied so far.
#[derive(Clone, Debug, Default)]
pub struct Applied {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    pub state: ClusterState,
}

/// Shared read access to the applied state, and a signal on every change (the
/// endpoint watchers wait on it).
#[derive(Clone)]
pub struct StateHandle {
    state: Arc<RwLock<Applied>>,
    changes: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for StateHandle {
    fn default() -> Self {
        StateHandle {
            state: Arc::default(),
            changes: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }
}

impl StateHandle {
    pub fn read(&self) -> RwLockReadGuard<'_, Applied> {
        // A poisoned lock means a panic mid-apply: the in-memory state can no longer be
        // trusted, and serving it would be worse than stopping.
        self.state.read().expect("state machine lock poisoned")
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Applied> {
        self.state.write().expect("state machine lock poisoned")
    }

    /// Wakes on every applied change; the value is the last applied log index.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        let index = self.read().last_applied.map(|l| l.index).unwrap_or(0);
        self.changes.send_replace(index);
    }
}

/// A snapshot as stored: metadata plus the encoded [`ClusterState`].
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

pub struct StateMachineStore {
    state: StateHandle,
    tree: sled::Tree,
    durable: Durable,
}

impl StateMachineStore {
    /// Opens the snapshot tree and loads the last snapshot, if any, as the state.
    /// `durable` must be the files of `db`.
    pub fn open(db: &sled::Db, durable: Durable) -> Result<StateMachineStore, crate::Error> {
        let tree = db.open_tree("raft_snapshot")?;
        let store = StateMachineStore {
            state: StateHandle::default(),
            tree,
            durable,
        };
        if let Some(snap) = store.load()? {
            let state: ClusterState = decode(&snap.data)?;
            *store.state.write() = Applied {
                last_applied: snap.meta.last_log_id,
                membership: snap.meta.last_membership,
                state,
            };
        }
        Ok(store)
    }

    pub fn handle(&self) -> StateHandle {
        self.state.clone()
    }

    fn load(&self) -> Result<Option<StoredSnapshot>, crate::Error> {
        match self.tree.get(KEY_SNAPSHOT)? {
            Some(bytes) => Ok(Some(decode(&bytes)?)),
            None => Ok(None),
        }
    }
}

/// Writes the snapshot and returns once it is on stable storage; openraft may purge the
/// log behind it afterwards.
async fn save_snapshot(
    tree: &sled::Tree,
    durable: &Durable,
    snap: &StoredSnapshot,
) -> Result<(), StorageError> {
    let sig = Some(snap.meta.signature());
    tree.insert(KEY_SNAPSHOT, encode(snap))
        .map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?;
    durable
        .flush(tree)
        .await
        .map_err(|e| StorageIOError::write_snapshot(sig, &e))?;
    Ok(())
}

/// Builds a snapshot from a copy of the state taken when the build was requested.
pub struct SnapshotBuilder {
    applied: Applied,
    tree: sled::Tree,
    durable: Durable,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let snapshot_id = match self.applied.last_applied {
            Some(id) => format!("{}-{}-{millis}", id.leader_id.term, id.index),
            None => format!("0-0-{millis}"),
        };
        let meta = SnapshotMeta {
            last_log_id: self.applied.last_applied,
            last_membership: self.applied.membership.clone(),
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: encode(&self.applied.state),
        };
        save_snapshot(&self.tree, &self.durable, &stored).await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let a = self.state.read();
        Ok((a.last_applied, a.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut a = self.state.write();
        let mut results = Vec::new();
        for entry in entries {
            a.last_applied = Some(entry.log_id);
            let result = match entry.payload {
                EntryPayload::Blank => Ok(CommandOutput::None),
                EntryPayload::Normal(command) => a.state.apply(&command, entry.log_id.index),
                EntryPayload::Membership(m) => {
                    a.membership = StoredMembership::new(Some(entry.log_id), m);
                    Ok(CommandOutput::None)
                }
            };
            results.push(result);
        }
        drop(a);
        self.state.changed();
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        SnapshotBuilder {
            applied: self.state.read().clone(),
            tree: self.tree.clone(),
            durable: self.durable.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let state: ClusterState =
            decode(&data).map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        // Durable first: if we crash between the two steps, the restart loads this
        // snapshot, which is what openraft was told is installed.
        save_snapshot(
            &self.tree,
            &self.durable,
            &StoredSnapshot {
                meta: meta.clone(),
                data,
            },
        )
        .await?;
        *self.state.write() = Applied {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            state,
        };
        self.state.changed();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let stored = self.load().map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(stored.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot openraft is told about (built or installed) has had a data sync first.
    #[tokio::test]
    async fn a_snapshot_is_synced_before_it_is_reported() {
        let (_dir, db, durable) = super::super::durable::test_store();
        let mut store = StateMachineStore::open(&db, durable.clone()).unwrap();

        tracing::info!("build_snapshot of the empty state returns only after a data sync");
        let before = durable.data_syncs();
        let built = store.get_snapshot_builder().await.build_snapshot().await.unwrap();
        assert!(
            durable.data_syncs() > before,
            "build_snapshot returned before a data sync"
        );

        tracing::info!("install_snapshot of that snapshot returns only after a data sync");
        let before = durable.data_syncs();
        store.install_snapshot(&built.meta, built.snapshot).await.unwrap();
        assert!(
            durable.data_syncs() > before,
            "install_snapshot returned before a data sync"
        );
        let current = store
            .get_current_snapshot()
            .await
            .unwrap()
            .expect("no snapshot stored");
        assert_eq!(current.meta, built.meta);
    }
}
