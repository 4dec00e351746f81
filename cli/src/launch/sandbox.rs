//! The sandbox: three coordinators and three Postgres servers with their agents, on
//! loopback, as DESIGN.md describes it.
//!
//! `node1` becomes the primary (it is started first and asks for the bootstrap), `node2`
//! the synchronous standby (started next, so it is the first eligible standby to
//! stream), `node3` an asynchronous standby for the `reporting` workload that may step
//! in as synchronous standby. Everything lives under one directory:
//!
//! ```text
//! DIR/sandbox.json            addresses, ports, data dirs and pids (DESIGN.md keys)
//! DIR/coord-N/                coordinator config, data, log
//! DIR/nodeN/agent.toml        agent config; agent.log next to it
//! DIR/nodeN/pg/data           Postgres data directory; pg/postgres.log its log
//! ```
//!
//! When run as root, Postgres runs as the `postgres` user (it refuses root); the
//! directories it needs are created for that user by its agent.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::{Pid, Uid};
use pgquorum_agent::config::{AgentConfig, PostgresConfig};
use pgquorum_agent::guard::{running_guard, GuardFiles};
use pgquorum_agent::postgres::ctl::process_alive;
pub use pgquorum_agent::postgres::ctl::{children, postmaster_pid};
use pgquorum_client::{pb, Coordinators};
use pgquorum_router::config::RouterConfig;
use serde::{Deserialize, Serialize};

use super::{
    ensure_port_free, find_binary, print_log_tail, signal_and_wait, spawn_logged, CoordinatorGroup,
    GroupSpec, Network,
};
use crate::error::{Error, Result};

pub const AGENT_BIN: &str = "pgquorum-agent";
pub const ROUTER_BIN: &str = "pgquorum-router";
pub const SANDBOX_FILE: &str = "sandbox.json";

/// How long a node may take to come up (initdb or a base backup included).
const NODE_START_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Clone, Debug)]
pub struct SandboxSpec {
    pub dir: PathBuf,
    /// Coordinator N listens on 127.0.0.1:(coordinator_base + N).
    pub coordinator_base: u16,
    /// nodeN's Postgres listens on 127.0.0.1:(postgres_base + N), its agent's
    /// PeerService on postgres_base + 20 + N, the router from postgres_base + 30, the
    /// agent's HTTP endpoints on postgres_base + 40 + N.
    pub postgres_base: u16,
    pub cluster: String,
    /// Policy settings for the cluster, if it is created.
    pub settings: Vec<(String, String)>,
    /// postgresql.conf settings for every node, over the sandbox's own (small)
    /// defaults; e.g. a larger `max_connections` for a benchmark.
    pub postgres_parameters: Vec<(String, String)>,
    /// Each coordinator and each node (agent, guard, Postgres) on a host of its own
    /// [`Network`], named `coordN` and `nodeN`, so links can be cut; needs root. The
    /// router and the caller stay on this machine, the hosts' clients.
    pub network: bool,
    /// Where the coordinators keep their Raft stores (see
    /// [`GroupSpec::raft_store_root`]); by default in their directories.
    pub raft_store_root: Option<PathBuf>,
    /// How many coordinators (1 to 9; 3 by default, 5 for a region split 3 | 2).
    /// Coordinators 1 and 2 are in the primary region, the rest in the DR region
    /// ([`super::sandbox_region`]).
    pub coordinators: u64,
    /// The router refuses new read-write connections once no coordinator has vouched
    /// for its map this long (`stop_writes_after_ms`; 30 s by default).
    pub router_stop_writes_after: Duration,
    /// The agents' hooks (every node the same; `PGQUORUM_NODE` tells them apart).
    pub agent_hooks: pgquorum_agent::hooks::HooksConfig,
    /// The coordinators' STONITH hook.
    pub stonith: Option<pgquorum_coordinator::failover::stonith::StonithConfig>,
}

impl SandboxSpec {
    /// nodeN's agent serves its PeerService (the failsafe) on `postgres_base + 20 + N`.
    pub fn peer_port(&self, index: u16) -> u16 {
        self.postgres_base + 20 + index
    }

    /// nodeN's agent serves its HTTP endpoints (health, metrics) on `postgres_base + 40 + N`.
    pub fn agent_http_port(&self, index: u16) -> u16 {
        self.postgres_base + 40 + index
    }

    pub fn new(dir: impl Into<PathBuf>, coordinator_base: u16, postgres_base: u16) -> SandboxSpec {
        SandboxSpec {
            dir: dir.into(),
            coordinator_base,
            postgres_base,
            cluster: "main".into(),
            settings: Vec::new(),
            postgres_parameters: Vec::new(),
            network: false,
            raft_store_root: None,
            coordinators: 3,
            router_stop_writes_after: Duration::from_secs(30),
            agent_hooks: Default::default(),
            stonith: None,
        }
    }
}

/// One Postgres member of the sandbox.
struct NodePlan {
    name: &'static str,
    workload: &'static str,
    priority: i32,
}

const NODES: [NodePlan; 3] = [
    NodePlan {
        name: "node1",
        workload: "general",
        priority: 100,
    },
    NodePlan {
        name: "node2",
        workload: "realtime",
        priority: 100,
    },
    NodePlan {
        name: "node3",
        workload: "reporting",
        priority: 50,
    },
];

/// `DIR/sandbox.json`: what a script needs to find every part (keys per DESIGN.md).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SandboxFile {
    pub cluster: String,
    pub coordinators: Vec<CoordinatorEntry>,
    pub nodes: Vec<NodeEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<RouterEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RouterEntry {
    pub pid: u32,
    pub rw: String,
    pub ro: BTreeMap<String, String>,
    /// Its `/metrics`.
    #[serde(default)]
    pub http: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CoordinatorEntry {
    pub id: u64,
    pub grpc: String,
    /// Its `/metrics`.
    #[serde(default)]
    pub http: String,
    pub pid: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeEntry {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub data_dir: PathBuf,
    pub agent_pid: u32,
    /// The agent's HTTP endpoints (`/primary`, `/replica`, …, `/metrics`).
    #[serde(default)]
    pub http: String,
    pub os_user: String,
    pub superuser: String,
    pub database: String,
}

struct AgentProcess {
    config: AgentConfig,
    config_path: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
}

/// A running sandbox whose processes this value owns (until [`Sandbox::detach`]).
pub struct Sandbox {
    spec: SandboxSpec,
    group: CoordinatorGroup,
    agents: BTreeMap<String, AgentProcess>,
    router: Option<RouterProcess>,
    owned: bool,
    /// Declared last: removed after every process on it has stopped.
    network: Option<Network>,
}

struct RouterProcess {
    config: RouterConfig,
    child: Option<Child>,
    log_path: PathBuf,
}

/// The OS user Postgres runs as: `postgres` when we are root, else ourselves.
fn os_user() -> String {
    if Uid::effective().is_root() {
        return "postgres".into();
    }
    std::env::var("USER").unwrap_or_else(|_| "postgres".into())
}

impl Sandbox {
    /// Starts coordinators, creates the cluster (unless it exists), then starts the
    /// three nodes one at a time, each waited for; returns once all are HEALTHY.
    /// A directory from an earlier `up` is reused: the cluster resumes where it was.
    pub async fn start(spec: SandboxSpec) -> Result<Sandbox> {
        std::fs::create_dir_all(&spec.dir)?;
        // Postgres may run as another user, who must be able to reach its directory.
        std::fs::set_permissions(&spec.dir, std::fs::Permissions::from_mode(0o755))?;
        let agent_bin = find_binary(AGENT_BIN)?;
        if !(1..=9).contains(&spec.coordinators) {
            return Err(Error::Launch(format!(
                "a sandbox has 1 to 9 coordinators (ports coordinator_base + 1..9), not {}",
                spec.coordinators
            )));
        }
        let mut group_spec = GroupSpec::new(&spec.dir, spec.coordinator_base, spec.coordinators);
        group_spec.stonith = spec.stonith.clone();
        group_spec.raft_store_root = spec.raft_store_root.clone();
        let mut network = None;
        if spec.network {
            let mut net = Network::create(spec.coordinator_base)?;
            for id in 1..=group_spec.size {
                group_spec.hosts.insert(id, net.add_host(&coordinator_host(id))?);
            }
            for plan in &NODES {
                net.add_host(plan.name)?;
            }
            network = Some(net);
        }
        // On failure the network (if any) is removed after the group's processes stop.
        let group = match CoordinatorGroup::start(group_spec).await {
            Ok(g) => g,
            Err(e) => {
                drop(network);
                return Err(e);
            }
        };
        let mut sandbox = Sandbox {
            spec,
            group,
            agents: BTreeMap::new(),
            router: None,
            owned: true,
            network,
        };
        sandbox.ensure_cluster().await?;
        for (i, plan) in NODES.iter().enumerate() {
            sandbox.create_agent(i as u16 + 1, plan)?;
        }
        for plan in &NODES {
            sandbox.start_agent_with(plan.name, &agent_bin)?;
            let name = plan.name;
            let ready = |s: &pb::StatusReply| {
                let node = s.nodes.iter().find(|n| n.name == name);
                let healthy = node.is_some_and(|n| n.health == "HEALTHY");
                match name {
                    "node1" => healthy && s.primary == "node1",
                    "node2" => healthy && node.is_some_and(|n| n.sync_state == "sync"),
                    _ => healthy,
                }
            };
            if let Err(e) = sandbox
                .wait_for(&format!("{name} to be ready"), NODE_START_TIMEOUT, ready)
                .await
            {
                sandbox.print_logs();
                return Err(e);
            }
        }
        sandbox.start_router()?;
        sandbox.wait_router_listening(Duration::from_secs(20)).await?;
        Ok(sandbox)
    }

    /// Waits until every port of the router (read-write, read-only, metrics) accepts
    /// connections: the sandbox is ready only then.
    async fn wait_router_listening(&self, timeout: Duration) -> Result<()> {
        let Some(r) = &self.router else {
            return Ok(());
        };
        let addrs: Vec<String> = std::iter::once(r.config.rw.clone())
            .chain(r.config.ro.values().cloned())
            .chain(r.config.metrics.clone())
            .collect();
        let deadline = Instant::now() + timeout;
        for addr in addrs {
            while tokio::net::TcpStream::connect(&addr).await.is_err() {
                if Instant::now() >= deadline {
                    print_log_tail("router", &r.log_path);
                    return Err(Error::Launch(format!(
                        "the router does not listen on {addr} after {} s (log: {})",
                        timeout.as_secs(),
                        r.log_path.display()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    /// Starts the router: read-write on `postgres_base + 30`, then one read-only port
    /// per class (realtime, reporting, analytics, general), metrics after them.
    fn start_router(&mut self) -> Result<()> {
        let base = self.spec.postgres_base + 30;
        let at = |offset: u16| format!("127.0.0.1:{}", base + offset);
        let config = RouterConfig {
            cluster: self.spec.cluster.clone(),
            coordinators: self.group.addrs(),
            rw: at(0),
            ro: ["realtime", "reporting", "analytics", "general"]
                .iter()
                .enumerate()
                .map(|(i, class)| (class.to_string(), at(i as u16 + 1)))
                .collect(),
            hold_ms: 5000,
            metrics: Some(at(5)),
            workers: None,
            pgbouncer: None,
            stale_after_ms: 3000,
            stop_writes_after_ms: self.spec.router_stop_writes_after.as_millis() as u64,
            fallback: Default::default(),
        };
        for offset in 0..=5 {
            ensure_port_free(base + offset)?;
        }
        let dir = self.spec.dir.join("router");
        std::fs::create_dir_all(&dir)?;
        let text = toml::to_string(&config).map_err(|e| Error::Launch(format!("router config: {e}")))?;
        let config_path = dir.join("router.toml");
        std::fs::write(&config_path, text)?;
        let log_path = dir.join("router.log");
        let args = [std::ffi::OsStr::new("--config"), config_path.as_os_str()];
        let child = spawn_logged(&find_binary(ROUTER_BIN)?, &args, &log_path, None)?;
        self.router = Some(RouterProcess {
            config,
            child: Some(child),
            log_path,
        });
        Ok(())
    }

    /// The router's read-write address, and read-only addresses by class.
    pub fn router_addrs(&self) -> Option<(String, BTreeMap<String, String>)> {
        self.router
            .as_ref()
            .map(|r| (r.config.rw.clone(), r.config.ro.clone()))
    }

    /// The router's pid, while it runs.
    pub fn router_pid(&self) -> Option<u32> {
        self.router.as_ref()?.child.as_ref().map(Child::id)
    }

    async fn ensure_cluster(&self) -> Result<()> {
        let request = pb::CreateClusterRequest {
            name: self.spec.cluster.clone(),
            settings: self.spec.settings.iter().cloned().collect(),
            actor: "pgquorum sandbox".into(),
        };
        let created = self
            .client()
            .call(|mut c| {
                let request = request.clone();
                async move { c.create_cluster(request).await }
            })
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(tonic::Code::AlreadyExists) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn node_dir(&self, name: &str) -> PathBuf {
        self.spec.dir.join(name)
    }

    fn create_agent(&mut self, index: u16, plan: &NodePlan) -> Result<()> {
        let dir = self.node_dir(plan.name);
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        // On a host of its own: reachable at its address from the other hosts and
        // this machine (trust on the test network only), at 127.0.0.1 by its agent.
        let (listen_addresses, advertise_host, pg_hba) = match &self.network {
            Some(net) => {
                let ip = net.host(plan.name)?.ip;
                let cidr = net.cidr();
                let hba = ["127.0.0.1/32", cidr.as_str()]
                    .iter()
                    .flat_map(|from| {
                        [
                            format!("host all all {from} trust"),
                            format!("host replication all {from} trust"),
                        ]
                    })
                    .collect();
                (format!("127.0.0.1,{ip}"), ip.to_string(), hba)
            }
            None => ("127.0.0.1".to_string(), "127.0.0.1".to_string(), Vec::new()),
        };
        let config = AgentConfig {
            cluster: self.spec.cluster.clone(),
            name: plan.name.into(),
            region: "us-west-2".into(),
            workload: plan.workload.into(),
            priority: plan.priority,
            nofailover: false,
            sync_eligible: true,
            coordinators: self.group.addrs(),
            heartbeat_interval_ms: 100,
            peer_address: Some(format!("{advertise_host}:{}", self.spec.peer_port(index))),
            http: Some(format!("{advertise_host}:{}", self.spec.agent_http_port(index))),
            hooks: self.spec.agent_hooks.clone(),
            postgres: PostgresConfig {
                bin_dir: PathBuf::from("/usr/lib/postgresql/15/bin"),
                data_dir: dir.join("pg").join("data"),
                port: self.spec.postgres_base + index,
                listen_addresses,
                advertise_host,
                os_user: os_user(),
                superuser: "postgres".into(),
                password: String::new(),
                database: "postgres".into(),
                replication_user: None,
                log_file: None,
                pg_hba,
                commit_check: true,
                parameters: [
                    ("shared_buffers", "32MB"),
                    ("max_connections", "100"),
                    ("fsync", "on"),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .chain(self.spec.postgres_parameters.iter().cloned())
                .collect(),
            },
        };
        let text = toml::to_string(&config).map_err(|e| Error::Launch(format!("agent config: {e}")))?;
        let config_path = dir.join("agent.toml");
        std::fs::write(&config_path, text)?;
        let log_path = dir.join("agent.log");
        self.agents.insert(
            plan.name.into(),
            AgentProcess {
                config,
                config_path,
                log_path,
                child: None,
            },
        );
        Ok(())
    }

    fn agent(&self, name: &str) -> Result<&AgentProcess> {
        self.agents
            .get(name)
            .ok_or_else(|| Error::Launch(format!("no node {name} in this sandbox")))
    }

    fn agent_mut(&mut self, name: &str) -> Result<&mut AgentProcess> {
        self.agents
            .get_mut(name)
            .ok_or_else(|| Error::Launch(format!("no node {name} in this sandbox")))
    }

    /// Starts (or restarts) a node's agent, which starts its Postgres if needed.
    pub fn start_agent(&mut self, name: &str) -> Result<()> {
        let bin = find_binary(AGENT_BIN)?;
        self.start_agent_with(name, &bin)
    }

    fn start_agent_with(&mut self, name: &str, bin: &Path) -> Result<()> {
        let host = match &self.network {
            Some(net) => Some(net.host(name)?.clone()),
            None => None,
        };
        let agent = self.agent_mut(name)?;
        if agent.child.is_some() {
            return Err(Error::Launch(format!("the agent of {name} is already running")));
        }
        if host.is_none() && !agent.config.postgres.data_dir.join("postmaster.pid").exists() {
            ensure_port_free(agent.config.postgres.port)?;
        }
        let args = [std::ffi::OsStr::new("--config"), agent.config_path.as_os_str()];
        agent.child = Some(spawn_logged(bin, &args, &agent.log_path, host.as_ref())?);
        Ok(())
    }

    /// Whether the node's agent process (started by this sandbox) is alive.
    pub fn agent_running(&mut self, name: &str) -> bool {
        self.agent_mut(name)
            .ok()
            .and_then(|a| a.child.as_mut())
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// kill -9 a node's agent (its Postgres keeps running).
    pub fn kill_agent(&mut self, name: &str) -> Result<()> {
        if let Some(mut child) = self.agent_mut(name)?.child.take() {
            signal_and_wait(&mut child, Signal::SIGKILL, Duration::from_secs(5))?;
        }
        Ok(())
    }

    /// The pid of a node's postmaster, if it runs.
    pub fn postmaster_pid(&self, name: &str) -> Option<i32> {
        postmaster_pid(&self.agent(name).ok()?.config.postgres.data_dir)
    }

    /// Stops a node's Postgres (fast shutdown) and waits until it is gone. Stop its
    /// agent first, or the agent starts it again.
    pub fn stop_postgres(&self, name: &str) -> Result<()> {
        stop_postmaster(&self.agent(name)?.config.postgres.data_dir, Signal::SIGINT)
    }

    /// Host loss for one node: its agent, its lease guard and its Postgres stop.
    pub fn stop_node(&mut self, name: &str) -> Result<()> {
        self.kill_agent(name)?;
        stop_guard(&self.agent(name)?.config.postgres.data_dir);
        self.stop_postgres(name)
    }

    /// A node's Postgres data directory.
    pub fn data_dir(&self, name: &str) -> Result<PathBuf> {
        Ok(self.agent(name)?.config.postgres.data_dir.clone())
    }

    /// The log of a node's agent.
    pub fn path_of_agent_log(&self, name: &str) -> PathBuf {
        self.agent(name).map(|a| a.log_path.clone()).unwrap_or_default()
    }

    /// The log of a node's lease guard.
    pub fn path_of_guard_log(&self, name: &str) -> PathBuf {
        self.agent(name)
            .map(|a| GuardFiles::next_to(&a.config.postgres.data_dir).log)
            .unwrap_or_default()
    }

    /// The pid of a node's lease guard (started by its agent), if one runs.
    pub fn guard_pid(&self, name: &str) -> Option<i32> {
        running_guard(&GuardFiles::next_to(
            &self.agent(name).ok()?.config.postgres.data_dir,
        ))
    }

    /// kill -9 of a node's postmaster and every process under it.
    pub fn kill_postgres(&self, name: &str) -> Result<()> {
        if let Some(pid) = self.postmaster_pid(name) {
            for p in std::iter::once(pid).chain(children(pid)) {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while process_alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }

    /// Sudden host loss: kill -9 of the agent, its lease guard and every Postgres
    /// process.
    pub fn kill_host(&mut self, name: &str) -> Result<()> {
        self.kill_agent(name)?;
        stop_guard(&self.agent(name)?.config.postgres.data_dir);
        self.kill_postgres(name)
    }

    /// The node's agent's pid, while the agent this sandbox started runs.
    pub fn agent_pid(&self, name: &str) -> Option<i32> {
        self.agent(name).ok()?.child.as_ref().map(|c| c.id() as i32)
    }

    /// The pids of a node's processes (lease guard first, then agent, then Postgres),
    /// e.g. to freeze the host: thawed in this order, the guard runs first.
    pub fn host_pids(&self, name: &str) -> Result<Vec<i32>> {
        let agent = self.agent(name)?;
        let mut pids: Vec<i32> = self.guard_pid(name).into_iter().collect();
        pids.extend(agent.child.iter().map(|c| c.id() as i32));
        if let Some(pm) = self.postmaster_pid(name) {
            pids.push(pm);
            pids.extend(children(pm));
        }
        Ok(pids)
    }

    /// The nodes' names (node1, node2, …).
    pub fn node_names(&self) -> Vec<String> {
        self.agents.keys().cloned().collect()
    }

    pub fn port(&self, name: &str) -> Result<u16> {
        Ok(self.agent(name)?.config.postgres.port)
    }

    /// A libpq connection string for a node's Postgres.
    pub fn conninfo(&self, name: &str) -> Result<String> {
        let pg = &self.agent(name)?.config.postgres;
        Ok(format!(
            "host={} port={} user={} dbname={}",
            pg.advertise_host, pg.port, pg.superuser, pg.database
        ))
    }

    pub fn client(&self) -> Coordinators {
        self.group.client()
    }

    /// The coordinators' gRPC addresses.
    pub fn client_addrs(&self) -> Vec<String> {
        self.group.addrs()
    }

    pub fn coordinators(&mut self) -> &mut CoordinatorGroup {
        &mut self.group
    }

    /// The hosts' network, when started with [`SandboxSpec::network`]: to cut links.
    pub fn network(&mut self) -> Result<&mut Network> {
        self.network
            .as_mut()
            .ok_or_else(|| Error::Launch("this sandbox was started without a network of its own".into()))
    }

    pub fn cluster(&self) -> &str {
        &self.spec.cluster
    }

    pub async fn status(&self) -> Result<pb::StatusReply> {
        let request = pb::StatusRequest {
            cluster: self.spec.cluster.clone(),
        };
        Ok(self
            .client()
            .call(|mut c| {
                let request = request.clone();
                async move { c.status(request).await }
            })
            .await?)
    }

    /// The cluster's replicated state (policy, history, …), read linearizably.
    pub async fn cluster_state(&self) -> Result<pb::Cluster> {
        let request = pb::GetClusterRequest {
            name: self.spec.cluster.clone(),
            consistency: 0,
        };
        Ok(self
            .client()
            .call(|mut c| {
                let request = request.clone();
                async move { c.get_cluster(request).await }
            })
            .await?
            .cluster
            .unwrap_or_default())
    }

    pub async fn alerts(&self) -> Result<pb::AlertsReply> {
        let request = pb::AlertsRequest {
            cluster: self.spec.cluster.clone(),
        };
        Ok(self
            .client()
            .call(|mut c| {
                let request = request.clone();
                async move { c.alerts(request).await }
            })
            .await?)
    }

    /// Polls `status` until `ready` holds; on timeout says what it last saw.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        ready: impl Fn(&pb::StatusReply) -> bool,
    ) -> Result<pb::StatusReply> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status().await;
            if let Ok(s) = &status {
                if ready(s) {
                    return status;
                }
            }
            if Instant::now() >= deadline {
                let seen = match status {
                    Ok(s) => s
                        .nodes
                        .iter()
                        .map(|n| format!("{} {} {} {} {}", n.name, n.role, n.health, n.sync_state, n.error))
                        .collect::<Vec<_>>()
                        .join("; "),
                    Err(e) => e.to_string(),
                };
                return Err(Error::Timeout(format!(
                    "waiting for {what} ({timeout:?}); last seen: {seen}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What `sandbox.json` records.
    pub fn file(&self) -> SandboxFile {
        let pids: BTreeMap<u64, u32> = self
            .group
            .ids()
            .into_iter()
            .filter_map(|id| Some((id, self.group.pid(id)?)))
            .collect();
        SandboxFile {
            cluster: self.spec.cluster.clone(),
            coordinators: pids
                .iter()
                .map(|(id, pid)| CoordinatorEntry {
                    id: *id,
                    grpc: self.group.addr_of(*id),
                    http: self.group.http_of(*id),
                    pid: *pid,
                })
                .collect(),
            nodes: self
                .agents
                .iter()
                .map(|(name, a)| {
                    let pg = &a.config.postgres;
                    NodeEntry {
                        name: name.clone(),
                        host: pg.advertise_host.clone(),
                        port: pg.port,
                        data_dir: std::path::absolute(&pg.data_dir).unwrap_or_else(|_| pg.data_dir.clone()),
                        agent_pid: a.child.as_ref().map(Child::id).unwrap_or(0),
                        http: a.config.http.clone().unwrap_or_default(),
                        os_user: pg.os_user.clone(),
                        superuser: pg.superuser.clone(),
                        database: pg.database.clone(),
                    }
                })
                .collect(),
            router: self.router.as_ref().map(|r| RouterEntry {
                pid: r.child.as_ref().map(Child::id).unwrap_or(0),
                rw: r.config.rw.clone(),
                ro: r.config.ro.clone(),
                http: r.config.metrics.clone().unwrap_or_default(),
            }),
        }
    }

    /// Writes `sandbox.json` and hands the processes over: they keep running after
    /// this value (and the command that started them) is gone.
    pub fn detach(mut self) -> Result<SandboxFile> {
        if self.network.is_some() {
            return Err(Error::Launch(
                "a sandbox on a network of its own cannot outlive its command".into(),
            ));
        }
        let file = self.file();
        let text = serde_json::to_string_pretty(&file).map_err(|e| Error::Launch(e.to_string()))?;
        std::fs::write(self.spec.dir.join(SANDBOX_FILE), text + "\n")?;
        self.owned = false;
        for agent in self.agents.values_mut() {
            agent.child = None;
        }
        if let Some(r) = self.router.as_mut() {
            r.child = None;
        }
        self.group.release();
        Ok(file)
    }

    pub fn print_logs(&self) {
        self.group.print_logs();
        if let Some(r) = &self.router {
            print_log_tail("router", &r.log_path);
        }
        for (name, a) in &self.agents {
            print_log_tail(&format!("agent {name}"), &a.log_path);
            print_log_tail(&format!("postgres {name}"), &a.config.postgres.log_file());
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        if std::thread::panicking() {
            self.print_logs();
        }
        if let Some(mut child) = self.router.as_mut().and_then(|r| r.child.take()) {
            let _ = signal_and_wait(&mut child, Signal::SIGKILL, Duration::from_secs(5));
        }
        // Agents first, or they would start Postgres again.
        for agent in self.agents.values_mut() {
            if let Some(mut child) = agent.child.take() {
                let _ = signal_and_wait(&mut child, Signal::SIGKILL, Duration::from_secs(5));
            }
        }
        for agent in self.agents.values() {
            stop_guard(&agent.config.postgres.data_dir);
            let _ = stop_postmaster(&agent.config.postgres.data_dir, Signal::SIGQUIT);
        }
    }
}

/// The name of coordinator `id`'s host on a sandbox's [`Network`].
pub fn coordinator_host(id: u64) -> String {
    format!("coord{id}")
}

/// Stops the lease guard an agent started for `data_dir`, if one runs.
fn stop_guard(data_dir: &Path) {
    if let Some(pid) = running_guard(&GuardFiles::next_to(data_dir)) {
        let pid = Pid::from_raw(pid);
        let _ = kill(pid, Signal::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(5);
        while process_alive(pid.as_raw()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Signals the postmaster of `data_dir` (SIGINT fast shutdown, SIGQUIT immediate) and
/// waits until it has exited, escalating to SIGKILL after 30 s.
fn stop_postmaster(data_dir: &Path, signal: Signal) -> Result<()> {
    let Some(pid) = postmaster_pid(data_dir) else {
        return Ok(());
    };
    let pid = Pid::from_raw(pid);
    let _ = kill(pid, signal);
    let deadline = Instant::now() + Duration::from_secs(30);
    while process_alive(pid.as_raw()) {
        if Instant::now() >= deadline {
            let _ = kill(pid, Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Whether `pid` runs the program `name` (guards against pid reuse before a signal).
pub fn runs(pid: u32, name: &str) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|exe| {
            exe.file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with(name))
        })
        .unwrap_or(false)
}

fn terminate_pid(pid: u32, name: &str) {
    if pid == 0 || !runs(pid, name) {
        return;
    }
    let p = Pid::from_raw(pid as i32);
    let _ = kill(p, Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while runs(pid, name) {
        if Instant::now() >= deadline {
            let _ = kill(p, Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `sandbox start NODE`: starts the agent of a node that `sandbox kill` took down, from
/// its config in `dir`, appending to its log (the agent then starts its Postgres, as a
/// standby if another node took over); records the new pid in `sandbox.json`, so
/// `sandbox status` and `sandbox down` keep tracking it. Returns the pid.
pub fn start_recorded_agent(dir: &Path, node: &str) -> Result<u32> {
    let path = dir.join(SANDBOX_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Error::Usage(format!(
            "no sandbox in {}: cannot read {}: {e}",
            dir.display(),
            path.display()
        ))
    })?;
    let mut file: SandboxFile = serde_json::from_str(&text)
        .map_err(|e| Error::Launch(format!("{} is not a sandbox file: {e}", path.display())))?;
    let names: Vec<String> = file.nodes.iter().map(|n| n.name.clone()).collect();
    let entry = file.nodes.iter_mut().find(|n| n.name == node).ok_or_else(|| {
        Error::Usage(format!(
            "no node {node:?} in the sandbox; nodes: {}",
            names.join(", ")
        ))
    })?;
    if entry.agent_pid != 0 && runs(entry.agent_pid, AGENT_BIN) {
        return Err(Error::Usage(format!(
            "the agent of {node} already runs (pid {})",
            entry.agent_pid
        )));
    }
    let node_dir = dir.join(node);
    let config = node_dir.join("agent.toml");
    let args = [std::ffi::OsStr::new("--config"), config.as_os_str()];
    let child = spawn_logged(&find_binary(AGENT_BIN)?, &args, &node_dir.join("agent.log"), None)?;
    entry.agent_pid = child.id();
    let text =
        serde_json::to_string_pretty(&file).map_err(|e| Error::Launch(format!("sandbox file: {e}")))?;
    std::fs::write(&path, text + "\n")?;
    Ok(child.id())
}

/// `sandbox down`: stops what `sandbox.json` in `dir` records — agents, then Postgres,
/// then coordinators — by pid, never by name.
pub fn stop_recorded(dir: &Path) -> Result<SandboxFile> {
    let path = dir.join(SANDBOX_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Error::Usage(format!(
            "no sandbox in {}: cannot read {}: {e}",
            dir.display(),
            path.display()
        ))
    })?;
    let file: SandboxFile = serde_json::from_str(&text)
        .map_err(|e| Error::Launch(format!("{} is not a sandbox file: {e}", path.display())))?;
    for node in &file.nodes {
        terminate_pid(node.agent_pid, AGENT_BIN);
    }
    for node in &file.nodes {
        stop_guard(&node.data_dir);
        stop_postmaster(&node.data_dir, Signal::SIGINT)?;
    }
    if let Some(r) = &file.router {
        terminate_pid(r.pid, ROUTER_BIN);
    }
    for c in &file.coordinators {
        terminate_pid(c.pid, super::COORDINATOR_BIN);
    }
    Ok(file)
}
