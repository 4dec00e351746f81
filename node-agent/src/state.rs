//! What the agent must remember across restarts: the newest epoch it has seen.
//!
//! The epoch is the fencing token (DESIGN.md, Invariant 1): an agent that has seen
//! epoch E refuses anything older, also after a restart, so a stale coordinator (or a
//! delayed reply) can never make it act for a past epoch. The file is replaced
//! atomically (write, fsync, rename, fsync of the directory) so a crash or power cut
//! leaves the old value or the new one.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentState {
    pub epoch: u64,
    /// The last agent process's incarnation: each start takes a larger one (see
    /// [`AgentState::next_incarnation`]), so coordinators can tell a late report of
    /// a killed agent from its successor's.
    #[serde(default)]
    pub incarnation: u64,
    /// The primary of `epoch` as the last reply named it (empty: none): a restarted
    /// agent judges failsafe promises by it until a coordinator answers.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub primary: String,
    /// The newest order of each kind (`pgquorum reinit`, `restart`, `reload`) this
    /// node carried out: its token, so an order is done once, also across restarts.
    #[serde(default)]
    pub reinit_done: u64,
    #[serde(default)]
    pub restart_done: u64,
    #[serde(default)]
    pub reload_done: u64,
}

impl AgentState {
    /// An incarnation above the last one this file saw and above every earlier one
    /// if the file was lost (milliseconds of the wall clock: larger at each start
    /// unless the clock went back, which the file covers). Persist it before reporting.
    pub fn next_incarnation(&self, unix_ms: u64) -> u64 {
        (self.incarnation + 1).max(unix_ms)
    }
}

/// A small TOML file the agent keeps across restarts, replaced atomically and durably.
pub struct StateFile<T = AgentState> {
    path: PathBuf,
    /// What the file holds, for the message when it cannot be read.
    holds: &'static str,
    _kind: std::marker::PhantomData<T>,
}

impl StateFile<AgentState> {
    /// Kept next to the data directory (not inside it: a base backup or rewind
    /// replaces the data directory, and the epoch must survive that).
    pub fn next_to(data_dir: &Path) -> StateFile<AgentState> {
        StateFile::named(data_dir, ".pgquorum-agent.toml", "the last epoch seen")
    }
}

impl<T: Serialize + DeserializeOwned + Default> StateFile<T> {
    /// `DATA_DIR` + `suffix`, next to the data directory.
    pub fn named(data_dir: &Path, suffix: &str, holds: &'static str) -> StateFile<T> {
        let mut name = data_dir.file_name().unwrap_or_default().to_os_string();
        name.push(suffix);
        StateFile {
            path: data_dir.with_file_name(name),
            holds,
            _kind: std::marker::PhantomData,
        }
    }

    /// What the file holds; the default when there is none.
    pub fn load(&self) -> Result<T> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => toml::from_str(&text).map_err(|e| Error::Config {
                path: self.path.display().to_string(),
                message: format!("agent state file is damaged ({e}); it holds {}", self.holds),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
            Err(e) => Err(e.into()),
        }
    }

    pub fn save(&self, state: &T) -> Result<()> {
        self.replace(state, true)
    }

    /// Like [`Self::save`], but left to the page cache: it survives the agent's
    /// process (a restart reads it back at once), not a crash of the host before the
    /// kernel writes it out. For what is written several times a second and matters
    /// only for as long as a crashed host takes to boot again.
    pub fn save_unsynced(&self, state: &T) -> Result<()> {
        self.replace(state, false)
    }

    fn replace(&self, state: &T, durable: bool) -> Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(toml::to_string(state).unwrap_or_default().as_bytes())?;
        if durable {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        // The rename itself is durable only once the directory is.
        if let (true, Some(dir)) = (durable, self.path.parent()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incarnations_only_grow() {
        let mut state = AgentState::default();
        let first = state.next_incarnation(1_000);
        assert_eq!(first, 1_000);
        state.incarnation = first;
        assert_eq!(state.next_incarnation(900), 1_001, "the clock went back");
        assert_eq!(state.next_incarnation(5_000), 5_000);
    }

    #[test]
    fn epoch_round_trips_and_starts_at_zero() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::next_to(&dir.path().join("data"));
        assert_eq!(file.load().unwrap().epoch, 0);
        file.save(&AgentState {
            epoch: 7,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(file.load().unwrap().epoch, 7);
        std::fs::write(&file.path, "epoch = 3\n").unwrap();
        assert_eq!(
            file.load().unwrap().incarnation,
            0,
            "a file from before incarnations"
        );
        std::fs::write(&file.path, "epoch = \"x\"").unwrap();
        assert!(file.load().is_err());
    }
}
