//! Makes what sled has flushed survive a power cut, not only a crash.
//!
//! sled 0.34.7's `flush`/`flush_async` on Linux ends in `write_to_log`
//! (`src/pagecache/iobuf.rs`), which writes each buffer with `pwrite` and then calls
//! `sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER)` on it; it calls `sync_all` only
//! if that syscall is missing (`ENOSYS`) or off Linux. `sync_file_range` hands the pages
//! to the device but flushes neither the device's volatile write cache nor the file's
//! metadata (its size, which grows as the log grows), so a flushed write survives a
//! process crash but not a power cut. [`Durable::flush`] therefore follows sled's flush
//! with `fdatasync` (`File::sync_data`) on the data file.
//!
//! What sled 0.34.7 writes under its directory, and what this does for each:
//! - `db`: the log, every write. `sync_data` after every flush (fdatasync also writes
//!   the file's size when it grew). The file is opened once and kept open: fdatasync
//!   acts on the file, whichever descriptor wrote it.
//! - `blobs/<lsn>`: any page too big for a quarter of a 512 KiB log segment (a big value
//!   such as a large snapshot), in a new file written with plain `write` and never synced
//!   by sled, while the log only points at it. Every flush first syncs each blob file not
//!   yet synced at its current length, and `blobs/` itself when a file appeared.
//! - `conf`: written once when the store is created and never synced; synced on open.
//! - `snap.<lsn>`: sled's page table snapshot, written only while sled opens (synced by
//!   sled, but renamed into place without syncing the directory). The store's directory
//!   is synced on open, which also records `db`, `conf` and `blobs/` created in it, and
//!   so is its parent, in which sled created the store's directory.
//!
//! Removals are not synced: a removed file that comes back after a power cut is a blob
//! sled no longer points to or an older `snap.*` it skips.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// A sync that takes this long is logged: Raft waits for it, and a heartbeat interval is
/// of the same order.
const SLOW_SYNC: std::time::Duration = std::time::Duration::from_millis(50);

/// The sled store's files, kept open to sync them after each flush; cheap to clone (the
/// log store and the state machine share one, as they share one `sled::Db`).
#[derive(Clone)]
pub struct Durable {
    files: Arc<Files>,
}

struct Files {
    db: File,
    blob_dir: PathBuf,
    /// Blob files synced so far, with the length each had then: a blob another writer
    /// was still writing when listed is synced again once longer.
    synced_blobs: Mutex<HashMap<OsString, u64>>,
    /// Set by the first failed sync. After a failed fsync the kernel may have dropped the
    /// dirty pages and report the next one as a success, so every later flush fails too
    /// (the coordinator must restart and recover from what is on disk).
    failed: AtomicBool,
    /// Successful `sync_data` calls on `db`, in the order they completed (tests check
    /// that an acknowledgement comes after one).
    data_syncs: AtomicU64,
}

impl Durable {
    /// Opens the files of the sled store in `path`, which sled must already have opened,
    /// and makes all of it durable as it is now (including what an earlier run or sled's
    /// recovery wrote without syncing).
    pub fn open(path: &Path) -> io::Result<Durable> {
        Durable::open_files(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("syncing the Raft store in {}: {e}", path.display()),
            )
        })
    }

    fn open_files(path: &Path) -> io::Result<Durable> {
        let db = File::open(path.join("db"))?;
        db.sync_all()?;
        File::open(path.join("conf"))?.sync_all()?;
        let files = Files {
            db,
            blob_dir: path.join("blobs"),
            synced_blobs: Mutex::default(),
            failed: AtomicBool::new(false),
            data_syncs: AtomicU64::new(0),
        };
        files.sync_new_blobs()?;
        sync_dir(&files.blob_dir)?;
        sync_dir(path)?;
        match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent)?,
            _ => sync_dir(Path::new("."))?,
        }
        Ok(Durable {
            files: Arc::new(files),
        })
    }

    /// Flushes `tree`'s sled store and returns only once everything written to it before
    /// the call is on stable storage. Blocking I/O, run off the async runtime.
    pub async fn flush(&self, tree: &sled::Tree) -> io::Result<()> {
        let files = self.files.clone();
        let tree = tree.clone();
        let started = std::time::Instant::now();
        let flushed = tokio::task::spawn_blocking(move || files.flush(&tree))
            .await
            .map_err(io::Error::other)?;
        let took = started.elapsed();
        if took >= SLOW_SYNC {
            tracing::warn!(
                took_ms = took.as_millis() as u64,
                "slow sync of the Raft store: Raft waits for it (a disk this slow delays \
                 heartbeats and can cost an election; see docs/faults.md)"
            );
        }
        flushed
    }

    /// How many `sync_data` calls on `db` have succeeded so far.
    #[cfg(test)]
    pub(crate) fn data_syncs(&self) -> u64 {
        self.files.data_syncs.load(Ordering::SeqCst)
    }
}

impl Files {
    fn flush(&self, tree: &sled::Tree) -> io::Result<()> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(io::Error::other(
                "an earlier sync of the Raft store failed; restart the coordinator",
            ));
        }
        let synced = self.sync(tree);
        if synced.is_err() {
            self.failed.store(true, Ordering::SeqCst);
        }
        synced
    }

    fn sync(&self, tree: &sled::Tree) -> io::Result<()> {
        // Blobs first: sled's log should point to a blob only once the blob is durable.
        // (sled may already have written the pointer when its buffer filled, which this
        // cannot prevent; but nothing pointing to it is acknowledged before this ends.)
        self.sync_new_blobs()?;
        tree.flush().map_err(|e| match e {
            sled::Error::Io(e) => e,
            e => io::Error::other(e),
        })?;
        self.db.sync_data()?;
        self.data_syncs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Syncs each blob file that is new or longer than when last synced, then `blobs/`
    /// if a file appeared in it. Usually the directory is empty and this is one listing.
    fn sync_new_blobs(&self) -> io::Result<()> {
        // The map only records syncs that completed, so it is sound after a panic too.
        let mut synced = self.synced_blobs.lock().unwrap_or_else(PoisonError::into_inner);
        let mut present = HashMap::new();
        let mut appeared = false;
        for entry in fs::read_dir(&self.blob_dir)? {
            let entry = entry?;
            // sled removes blobs it no longer needs at any time.
            let len = match entry.metadata() {
                Ok(meta) => meta.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let name = entry.file_name();
            let known = synced.get(&name).copied();
            if known != Some(len) {
                match File::open(entry.path()) {
                    Ok(file) => file.sync_data()?,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                appeared |= known.is_none();
            }
            present.insert(name, len);
        }
        if appeared {
            sync_dir(&self.blob_dir)?;
        }
        *synced = present;
        Ok(())
    }
}

/// Makes the entries of directory `dir` (files created, renamed or removed in it) durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A sled store as the coordinator opens it, with its `Durable`, in a fresh directory
/// that lives as long as the returned `TempDir`.
#[cfg(test)]
pub(crate) fn test_store() -> (tempfile::TempDir, sled::Db, Durable) {
    let dir = tempfile::tempdir().unwrap();
    let (db, durable) = test_store_at(&dir.path().join("raft.sled"));
    (dir, db, durable)
}

/// A sled store at `path` (new or reopened) with its [`Durable`], for tests.
#[cfg(test)]
pub(crate) fn test_store_at(path: &Path) -> (sled::Db, Durable) {
    let db = sled::Config::new()
        .path(path)
        .flush_every_ms(None)
        .open()
        .unwrap();
    let durable = Durable::open(path).unwrap();
    (db, durable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_blob_is_synced_before_the_flush_returns() {
        let (dir, db, durable) = test_store();
        let path = dir.path().join("raft.sled");
        let tree = db.open_tree("t").unwrap();

        tracing::info!("a small value lives in the log: no blob, one data sync");
        tree.insert(b"small", vec![1u8; 100]).unwrap();
        durable.flush(&tree).await.unwrap();
        assert_eq!(durable.data_syncs(), 1);
        assert!(durable.files.synced_blobs.lock().unwrap().is_empty());

        tracing::info!("a value over a quarter of a 512 KiB segment goes to a blob file");
        tree.insert(b"big", vec![2u8; 200 * 1024]).unwrap();
        durable.flush(&tree).await.unwrap();
        assert_eq!(durable.data_syncs(), 2);
        let on_disk: HashMap<OsString, u64> = fs::read_dir(path.join("blobs"))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.file_name(), e.metadata().unwrap().len())
            })
            .collect();
        assert!(
            !on_disk.is_empty(),
            "sled wrote no blob; the test no longer covers blobs"
        );
        assert_eq!(*durable.files.synced_blobs.lock().unwrap(), on_disk);
    }
}
