//! The Raft log and vote, stored in one sled tree.
//!
//! Keys: `v` the vote, `c` the committed log id, `p` the last purged log id, and
//! `l` + big-endian index for each entry (big-endian so sled's byte order is log order).
//! One tree means one `Batch` can purge entries and record `p` atomically, so a crash
//! can never leave a hole or forget how far the log was purged (openraft#118).
//!
//! Durability contract: `save_vote`, `truncate` and `purge` return, and `append` signals
//! its callback, only once the write is on stable storage: sled flushed and then
//! `fdatasync` on sled's files ([`Durable::flush`]). sled's own flush is not enough: on
//! Linux it ends in `sync_file_range`, which survives a process crash but not a power cut
//! (it flushes neither the disk's write cache nor the file size; see [`super::durable`]).
//! A coordinator that acknowledged a vote or an entry and then lost it could vote twice
//! in one term or lose a committed write; openraft's own storage suite cannot detect
//! that, and the kill -9 tests in `tests/` only catch a missing flush, not a missing
//! fdatasync; the unit tests below check that each acknowledgement follows a data sync.
//! `save_committed` is not flushed: an fsync per commit doubled commit latency and put
//! its p99 near 80 ms. The persisted committed index may therefore lag after a crash;
//! the one place that matters — a leader that resumes leadership from its persisted
//! vote after a whole-group restart, without a new no-op entry, and would serve
//! read-index reads up to that lagging index — is handled where reads are served
//! (`grpc::proposer`: a barrier entry first).

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, StorageIOError};

use super::codec::{decode, encode};
use super::durable::Durable;
use super::{Entry, LogId, StorageError, TypeConfig, Vote};

const KEY_VOTE: &[u8] = b"v";
const KEY_COMMITTED: &[u8] = b"c";
const KEY_PURGED: &[u8] = b"p";
const LOG_PREFIX: u8 = b'l';

fn log_key(index: u64) -> [u8; 9] {
    let mut k = [LOG_PREFIX; 9];
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

/// Handle on the log; cheap to clone (replication tasks each get a clone as reader).
#[derive(Clone)]
pub struct LogStore {
    tree: sled::Tree,
    durable: Durable,
}

impl LogStore {
    /// `durable` must be the files of `db`.
    pub fn open(db: &sled::Db, durable: Durable) -> Result<LogStore, sled::Error> {
        Ok(LogStore {
            tree: db.open_tree("raft_log")?,
            durable,
        })
    }

    fn read_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        let Some(bytes) = self.tree.get(key).map_err(|e| StorageIOError::read(&e))? else {
            return Ok(None);
        };
        decode(&bytes)
            .map(Some)
            .map_err(|e| StorageIOError::read(&e).into())
    }

    /// Returns once everything written so far is on stable storage.
    async fn flush(&self) -> io::Result<()> {
        self.durable.flush(&self.tree).await
    }

    /// [`RaftLogStorage::append`] with the acknowledgement as a closure, which a unit
    /// test can observe (it cannot build openraft's `LogFlushed`).
    async fn append_then_ack<I>(
        &self,
        entries: I,
        ack: impl FnOnce(io::Result<()>),
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry>,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            batch.insert(&log_key(entry.log_id.index), encode(&entry));
        }
        self.tree
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        // Entries are readable now (the contract for returning); they are acknowledged
        // only once on stable storage.
        let flushed = self.flush().await;
        let failed = flushed.as_ref().err().map(StorageIOError::write_logs);
        ack(flushed);
        match failed {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }
}

impl LogStore {
    /// Carries out a forced re-forming (see [`super::group`]): after everything this
    /// log holds, committed or not, one membership entry makes `reform.formed_by` the
    /// only voter, in a term above any this node has seen, and the vote moves to that
    /// term (uncommitted: the node wins its own election at start). Returns the index
    /// of that entry. Run before openraft opens the store.
    pub async fn reform(&mut self, reform: &super::group::Reform) -> Result<u64, StorageError> {
        use openraft::{CommittedLeaderId, EntryPayload, Membership};
        let state = self.get_log_state().await?;
        let vote = self.read_vote().await?;
        let seen = vote
            .map(|v| v.leader_id().term)
            .into_iter()
            .chain(state.last_log_id.map(|l| l.leader_id.term))
            .max()
            .unwrap_or(0);
        let term = seen + 1;
        let index = state.last_log_id.map_or(0, |l| l.index + 1);
        let voters = std::collections::BTreeSet::from([reform.formed_by]);
        let nodes = std::collections::BTreeMap::from([(reform.formed_by, reform.node.clone())]);
        let entry = Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, reform.formed_by), index),
            payload: EntryPayload::Membership(Membership::new(vec![voters], nodes)),
        };
        self.save_vote(&Vote::new(term, reform.formed_by)).await?;
        self.append_then_ack([entry], |_| {}).await?;
        Ok(index)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let mut entries = Vec::new();
        for item in self.tree.range(log_key(start)..) {
            let (key, value) = item.map_err(|e| StorageIOError::read_logs(&e))?;
            if key.first() != Some(&LOG_PREFIX) {
                break;
            }
            let entry: Entry = decode(&value).map_err(|e| StorageIOError::read_logs(&e))?;
            if !range.contains(&entry.log_id.index) {
                break;
            }
            entries.push(entry);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.read_meta(KEY_PURGED)?;
        let last = self
            .tree
            .scan_prefix([LOG_PREFIX])
            .next_back()
            .transpose()
            .map_err(|e| StorageIOError::read_logs(&e))?;
        let last_log_id = match last {
            Some((_, value)) => Some(
                decode::<Entry>(&value)
                    .map_err(|e| StorageIOError::read_logs(&e))?
                    .log_id,
            ),
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.tree
            .insert(KEY_VOTE, encode(vote))
            .map_err(|e| StorageIOError::write_vote(&e))?;
        self.flush().await.map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.read_meta(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.tree
            .insert(KEY_COMMITTED, encode(&committed))
            .map_err(|e| StorageIOError::write(&e))?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.read_meta::<Option<LogId>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.append_then_ack(entries, |flushed| callback.log_io_completed(flushed))
            .await
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for key in self.tree.range(log_key(log_id.index)..).keys() {
            let key = key.map_err(|e| StorageIOError::write_logs(&e))?;
            if key.first() != Some(&LOG_PREFIX) {
                break;
            }
            batch.remove(key);
        }
        self.tree
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        self.flush().await.map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        batch.insert(KEY_PURGED, encode(&log_id));
        for key in self.tree.range(log_key(0)..=log_key(log_id.index)).keys() {
            batch.remove(key.map_err(|e| StorageIOError::write_logs(&e))?);
        }
        self.tree
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        self.flush().await.map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use openraft::testing::{blank_ent, log_id};

    use super::*;

    /// A log store in a fresh sled directory, which lives as long as the returned `TempDir`.
    fn store() -> (tempfile::TempDir, LogStore, Durable) {
        let (dir, db, durable) = super::super::durable::test_store();
        let store = LogStore::open(&db, durable.clone()).unwrap();
        (dir, store, durable)
    }

    /// Each acknowledgement openraft relies on comes after a data sync of sled's file:
    /// without [`Durable::flush`] (sled's flush alone) the counter would not move.
    #[tokio::test]
    async fn every_acknowledgement_follows_a_data_sync() {
        let (_dir, mut store, durable) = store();

        tracing::info!("save_vote(term 1, node 1) returns only after a data sync");
        let before = durable.data_syncs();
        store.save_vote(&Vote::new(1, 1)).await.unwrap();
        assert!(
            durable.data_syncs() > before,
            "save_vote returned before a data sync"
        );
        assert_eq!(store.read_vote().await.unwrap(), Some(Vote::new(1, 1)));

        tracing::info!("append of entries 1..=3 acknowledges them only after a data sync");
        let before = durable.data_syncs();
        let mut syncs_at_ack = None;
        store
            .append_then_ack((1..=3).map(|i| blank_ent::<TypeConfig>(1, 1, i)), |flushed| {
                flushed.unwrap();
                syncs_at_ack = Some(durable.data_syncs());
            })
            .await
            .unwrap();
        let syncs_at_ack = syncs_at_ack.expect("append never acknowledged");
        assert!(syncs_at_ack > before, "append acknowledged before a data sync");

        tracing::info!("truncate from index 3 returns only after a data sync");
        let before = durable.data_syncs();
        store.truncate(log_id(1, 1, 3)).await.unwrap();
        assert!(
            durable.data_syncs() > before,
            "truncate returned before a data sync"
        );

        tracing::info!("purge up to index 1 returns only after a data sync");
        let before = durable.data_syncs();
        store.purge(log_id(1, 1, 1)).await.unwrap();
        assert!(durable.data_syncs() > before, "purge returned before a data sync");

        tracing::info!("what is left is entry 2 alone, with index 1 recorded as purged");
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 1, 1)));
        assert_eq!(state.last_log_id, Some(log_id(1, 1, 2)));
        let entries = store.try_get_log_entries(0..10).await.unwrap();
        assert_eq!(
            entries.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
            vec![2]
        );
    }

    /// A forced re-forming keeps every entry, appends a membership of the one survivor
    /// after them in a term above any seen, and moves the vote there.
    #[tokio::test]
    async fn reform_appends_a_single_voter_membership_in_a_new_term() {
        let (_dir, mut store, _durable) = store();
        store.save_vote(&Vote::new(7, 1)).await.unwrap();
        store
            .append_then_ack((1..=3).map(|i| blank_ent::<TypeConfig>(5, 1, i)), |_| {})
            .await
            .unwrap();
        let node = super::super::CoordinatorNode {
            addr: "10.0.0.3:7000".into(),
            region: "us-east-1".into(),
        };
        let reform = super::super::group::Reform {
            previous_group: super::super::group::GroupId::founding(),
            group: super::super::group::GroupId::founding().next(3, 1),
            formed_by: 3,
            node: node.clone(),
            previous_voters: vec![1, 2, 3],
            actor: "ops".into(),
            reason: "region lost".into(),
            at_ms: 1,
            last_log_index: None,
        };
        assert_eq!(store.reform(&reform).await.unwrap(), 4);
        assert_eq!(store.read_vote().await.unwrap(), Some(Vote::new(8, 3)));
        let entries = store.try_get_log_entries(0..10).await.unwrap();
        assert_eq!(entries.len(), 4, "every earlier entry is kept");
        let last = entries.last().unwrap();
        assert_eq!(last.log_id, log_id(8, 3, 4));
        let openraft::EntryPayload::Membership(m) = &last.payload else {
            panic!("not a membership entry: {last:?}");
        };
        assert_eq!(m.voter_ids().collect::<Vec<_>>(), vec![3]);
        assert_eq!(m.get_node(&3), Some(&node));
    }
}
