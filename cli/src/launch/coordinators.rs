//! A coordinator group as real processes on loopback.
//!
//! Each node gets its own directory (`coord-N/` with its config, data and log) and its
//! own port (`base_port + N`), on loopback or on a host of a test [`super::Network`].
//! Processes are killed when the group is dropped, also
//! when a test panics (then the tail of every node's log is printed, since that is
//! what one needs to see).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use pgquorum_client::{pb, Coordinators, Timeouts};
use pgquorum_coordinator::config::{Config, MemberConfig, RaftTuning};

use super::{
    ensure_port_free, find_binary, print_log_tail, signal_and_wait, spawn_logged, Host, COORDINATOR_BIN,
};
use crate::error::{Error, Result};

/// The region a sandbox node is placed in: two in the primary region, the rest in the
/// DR region, as in DESIGN.md's two-region layout.
pub fn sandbox_region(id: u64) -> &'static str {
    if id <= 2 {
        "us-west-2"
    } else {
        "us-east-1"
    }
}

/// What group to start.
#[derive(Clone, Debug)]
pub struct GroupSpec {
    /// Parent directory for every node's files.
    pub dir: PathBuf,
    /// Node N listens on 127.0.0.1:(base_port + N), serves /metrics on base_port + 60 + N.
    pub base_port: u16,
    /// Number of founding voters (ids 1..=size).
    pub size: u64,
    pub raft: RaftTuning,
    /// Node N runs on `hosts[N]`'s network and address when given (see
    /// [`super::Network`]); else on loopback.
    pub hosts: BTreeMap<u64, Host>,
    /// Node N keeps its Raft store in `raft_store_root/coord-N` when given, else in
    /// `coord-N/data`. Tests put it on tmpfs: on a machine whose one disk also serves
    /// several Postgres servers, a sync can stall for hundreds of milliseconds, which a
    /// coordinator host of its own would not see (docs/faults.md, "Disks").
    pub raft_store_root: Option<PathBuf>,
    /// Every node's STONITH hook (see `pgquorum_coordinator::failover::stonith`).
    pub stonith: Option<pgquorum_coordinator::failover::stonith::StonithConfig>,
}

impl GroupSpec {
    pub fn new(dir: impl Into<PathBuf>, base_port: u16, size: u64) -> GroupSpec {
        GroupSpec {
            dir: dir.into(),
            base_port,
            size,
            raft: RaftTuning::default(),
            hosts: BTreeMap::new(),
            raft_store_root: None,
            stonith: None,
        }
    }
}

struct NodeProcess {
    config_path: PathBuf,
    log_path: PathBuf,
    addr: String,
    child: Option<Child>,
}

/// A running coordinator group whose processes this value owns.
pub struct CoordinatorGroup {
    spec: GroupSpec,
    bin: PathBuf,
    nodes: BTreeMap<u64, NodeProcess>,
    /// Whether dropping the group kills its processes (false after [`Self::detach`]).
    owned: bool,
}

impl CoordinatorGroup {
    /// Writes configs for nodes 1..=size, starts them and waits for a leader.
    pub async fn start(spec: GroupSpec) -> Result<CoordinatorGroup> {
        let bin = find_binary(COORDINATOR_BIN)?;
        std::fs::create_dir_all(&spec.dir)?;
        let mut group = CoordinatorGroup {
            spec,
            bin,
            nodes: BTreeMap::new(),
            owned: true,
        };
        let founders: Vec<MemberConfig> = (1..=group.spec.size)
            .map(|id| MemberConfig {
                id,
                addr: group.addr_of(id),
                region: sandbox_region(id).into(),
            })
            .collect();
        for id in 1..=group.spec.size {
            group.create_node(id, founders.clone())?;
        }
        for id in 1..=group.spec.size {
            group.start_node(id)?;
        }
        group.wait_for_leader(Duration::from_secs(20)).await?;
        Ok(group)
    }

    pub fn addr_of(&self, id: u64) -> String {
        let ip = self
            .spec
            .hosts
            .get(&id)
            .map_or("127.0.0.1".to_string(), |h| h.ip.to_string());
        format!("{ip}:{}", self.spec.base_port as u64 + id)
    }

    /// Where node `id` serves `/metrics`: its address, port `base_port + 60 + id`.
    pub fn http_of(&self, id: u64) -> String {
        let addr = self.addr_of(id);
        let ip = addr.rsplit_once(':').map_or("127.0.0.1", |(ip, _)| ip);
        format!("{ip}:{}", self.spec.base_port as u64 + 60 + id)
    }

    pub fn node_dir(&self, id: u64) -> PathBuf {
        self.spec.dir.join(format!("coord-{id}"))
    }

    pub fn config_path(&self, id: u64) -> PathBuf {
        self.node_dir(id).join("coordinator.toml")
    }

    /// Addresses of every node this group has created, running or not.
    pub fn addrs(&self) -> Vec<String> {
        self.nodes.values().map(|n| n.addr.clone()).collect()
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    /// A client over every node of the group.
    pub fn client(&self) -> Coordinators {
        Coordinators::new(self.addrs(), Timeouts::default()).expect("a group has at least one node")
    }

    pub fn pid(&self, id: u64) -> Option<u32> {
        self.nodes.get(&id)?.child.as_ref().map(Child::id)
    }

    /// The pids of every running node (e.g. to freeze the whole group).
    pub fn pids(&self) -> Vec<i32> {
        self.ids()
            .into_iter()
            .filter_map(|id| self.pid(id))
            .map(|p| p as i32)
            .collect()
    }

    /// Where node `id` keeps its Raft store.
    pub fn data_dir(&self, id: u64) -> PathBuf {
        match &self.spec.raft_store_root {
            Some(root) => root.join(format!("coord-{id}")),
            None => self.node_dir(id).join("data"),
        }
    }

    /// The way back for a coordinator of a replaced group (force-new-group): kill it,
    /// empty its Raft store, rewrite its config without founders and start it, ready
    /// for `pgquorum raft add`.
    pub fn restart_empty(&mut self, id: u64) -> Result<()> {
        self.kill(id)?;
        let data_dir = self.data_dir(id);
        if data_dir.exists() {
            std::fs::remove_dir_all(&data_dir)?;
        }
        self.create_node(id, Vec::new())?;
        self.start_node(id)
    }

    /// Writes a node's config. `founders` empty: the node joins a running group later.
    pub fn create_node(&mut self, id: u64, founders: Vec<MemberConfig>) -> Result<()> {
        let dir = self.node_dir(id);
        std::fs::create_dir_all(&dir)?;
        let addr = self.addr_of(id);
        let data_dir = self.data_dir(id);
        // A new node must start from nothing: a store left by an earlier group would
        // bring that group's state back (its clusters, its epoch).
        let used = std::fs::read_dir(&data_dir).is_ok_and(|mut d| d.next().is_some());
        if used {
            return Err(Error::Launch(format!(
                "the Raft store {} already holds a coordinator's state (an earlier run's?); remove it \
                 (`pgquorum sandbox down --clean` for a stopped sandbox) or give another directory",
                data_dir.display()
            )));
        }
        let config = Config {
            id,
            region: sandbox_region(id).into(),
            listen: addr.clone(),
            advertise: None,
            data_dir,
            http: Some(self.http_of(id)),
            initial_members: founders,
            raft: self.spec.raft.clone(),
            stonith: self.spec.stonith.clone(),
        };
        let text =
            toml::to_string(&config).map_err(|e| Error::Launch(format!("config for node {id}: {e}")))?;
        let config_path = self.config_path(id);
        std::fs::write(&config_path, text)?;
        let log_path = dir.join("coordinator.log");
        self.nodes.insert(
            id,
            NodeProcess {
                config_path,
                log_path,
                addr,
                child: None,
            },
        );
        Ok(())
    }

    /// Starts (or restarts) a node's process from its config.
    pub fn start_node(&mut self, id: u64) -> Result<()> {
        let bin = self.bin.clone();
        let node = self
            .nodes
            .get_mut(&id)
            .ok_or_else(|| Error::Launch(format!("no node {id} in this group")))?;
        if node.child.is_some() {
            return Err(Error::Launch(format!("node {id} is already running")));
        }
        let host = self.spec.hosts.get(&id);
        if host.is_none() {
            let port: u16 = node
                .addr
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse().ok())
                .unwrap_or(0);
            ensure_port_free(port)?;
        }
        let args = [std::ffi::OsStr::new("--config"), node.config_path.as_os_str()];
        let child = spawn_logged(&bin, &args, &node.log_path, host)?;
        node.child = Some(child);
        Ok(())
    }

    /// kill -9: the node dies with no chance to flush or say goodbye.
    pub fn kill(&mut self, id: u64) -> Result<()> {
        self.stop(id, Signal::SIGKILL)
    }

    /// SIGTERM and wait: a clean shutdown.
    pub fn terminate(&mut self, id: u64) -> Result<()> {
        self.stop(id, Signal::SIGTERM)
    }

    fn stop(&mut self, id: u64, signal: Signal) -> Result<()> {
        let node = self
            .nodes
            .get_mut(&id)
            .ok_or_else(|| Error::Launch(format!("no node {id} in this group")))?;
        let Some(mut child) = node.child.take() else {
            return Ok(());
        };
        signal_and_wait(&mut child, signal, Duration::from_secs(10))
    }

    /// Hands the processes over: dropping the group no longer stops them. For the
    /// sandbox, whose cluster outlives the command that started it.
    pub fn detach(mut self) -> Vec<(u64, u32)> {
        self.release()
    }

    /// Like [`Self::detach`], for an owner that keeps the value.
    pub fn release(&mut self) -> Vec<(u64, u32)> {
        self.owned = false;
        self.nodes
            .iter()
            .filter_map(|(id, n)| n.child.as_ref().map(|c| (*id, c.id())))
            .collect()
    }

    /// This node's own view of the group.
    pub async fn status_of(&self, id: u64) -> Result<pb::RaftStatusReply> {
        let addr = self.addr_of(id);
        let client = Coordinators::new(
            vec![addr.clone()],
            Timeouts {
                connect: Duration::from_millis(300),
                request: Duration::from_secs(2),
                overall: Duration::from_secs(2),
                unreachable: None,
            },
        )?;
        Ok(client
            .call_at(&addr, |mut c| async move {
                c.raft_status(pb::RaftStatusRequest {}).await
            })
            .await?)
    }

    /// Waits until every running voter agrees on one leader, which knows it leads.
    /// Returns the leader's id.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.agreed_leader().await {
                Ok(id) => return Ok(id),
                Err(why) if Instant::now() >= deadline => {
                    return Err(Error::Timeout(format!(
                        "no agreed leader within {timeout:?}: {why}"
                    )))
                }
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the group is whole: every running voter follows one leader in its
    /// term and holds the log the leader had applied when asked (a node back from a
    /// partition or a restart has caught up). A fault injected before that hits a
    /// group still short of a member: a second fault, not the one meant. Returns the
    /// leader's id.
    pub async fn wait_whole(&self, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let leader = self
                .wait_for_leader(deadline.saturating_duration_since(Instant::now()))
                .await?;
            let why = match self.behind(leader).await {
                Ok(None) => return Ok(leader),
                Ok(Some(why)) => why,
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(Error::Timeout(format!(
                    "the coordinator group is not whole within {timeout:?}: {why}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A running voter that is not in `leader`'s term or that the leader does not
    /// know to hold what it has applied.
    async fn behind(&self, leader: u64) -> Result<Option<String>> {
        let l = self.status_of(leader).await?;
        for (&id, node) in &self.nodes {
            if node.child.is_none() || id == leader {
                continue;
            }
            let s = self.status_of(id).await?;
            if s.state == "learner" {
                continue;
            }
            let matched = l
                .members
                .iter()
                .find(|m| m.id == id)
                .and_then(|m| m.matched_index);
            if s.term != l.term || matched.is_none_or(|m| m < l.last_applied_index) {
                return Ok(Some(format!(
                    "node {id} is at term {}, matched {matched:?}; the leader {leader} at term {} applied {}",
                    s.term, l.term, l.last_applied_index
                )));
            }
        }
        Ok(None)
    }

    async fn agreed_leader(&self) -> std::result::Result<u64, String> {
        let mut leader = None;
        for (&id, node) in &self.nodes {
            if node.child.is_none() {
                continue;
            }
            let s = self.status_of(id).await.map_err(|e| format!("node {id}: {e}"))?;
            if s.state == "learner" {
                continue;
            }
            let l = s.leader_id.ok_or_else(|| format!("node {id} knows no leader"))?;
            if *leader.get_or_insert(l) != l {
                return Err(format!(
                    "nodes disagree on the leader ({} vs {l})",
                    leader.unwrap_or_default()
                ));
            }
        }
        let l = leader.ok_or("no running voter")?;
        let s = self.status_of(l).await.map_err(|e| format!("leader {l}: {e}"))?;
        if s.state != "leader" {
            return Err(format!("node {l} is named leader but is {}", s.state));
        }
        Ok(l)
    }

    /// Waits until node `id` has applied at least `index`.
    pub async fn wait_applied(&self, id: u64, index: u64, timeout: Duration) -> Result<pb::RaftStatusReply> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status_of(id).await;
            if let Ok(s) = &status {
                if s.last_applied_index >= index {
                    return status;
                }
            }
            if Instant::now() >= deadline {
                let seen = match status {
                    Ok(s) => format!("applied {}", s.last_applied_index),
                    Err(e) => e.to_string(),
                };
                return Err(Error::Timeout(format!(
                    "node {id} did not apply index {index} within {timeout:?} ({seen})"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn print_logs(&self) {
        for (id, node) in &self.nodes {
            print_log_tail(&format!("coordinator {id}"), &node.log_path);
        }
    }
}

impl Drop for CoordinatorGroup {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        if std::thread::panicking() {
            self.print_logs();
        }
        for node in self.nodes.values_mut() {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
