//! Helpers shared by the end-to-end tests in `tests/`.
//!
//! The tests drive the real binaries (build them first: `cargo build --workspace`) and
//! start clusters only through [`pgquorum::launch`], the same code the sandbox and the
//! benchmarks use. Each test file picks its own port base, each test its own temporary
//! directory, so the runner may run them in parallel.

use std::process::{Command, Output};
use std::time::Duration;

use pgquorum::launch::{find_binary, CoordinatorGroup, GroupSpec, Sandbox, SandboxSpec};
use pgquorum_client::{pb, Coordinators, Timeouts};

/// Runs the `pgquorum` CLI with `args`, never reading the caller's environment for
/// coordinator addresses.
pub fn cli(args: &[&str]) -> Output {
    let bin = find_binary("pgquorum").expect("pgquorum binary (cargo build --workspace)");
    Command::new(bin)
        .args(args)
        .env_remove("PGQUORUM_COORDINATORS")
        .output()
        .expect("run pgquorum")
}

/// Runs the CLI with `args`; panics with its stderr unless it succeeded.
pub fn cli_ok(args: &[&str]) -> Output {
    let out = cli(args);
    assert!(
        out.status.success(),
        "pgquorum {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs the CLI with `--json` and parses its output; panics with stderr if it failed.
pub fn cli_json(args: &[&str]) -> serde_json::Value {
    let out = cli_ok(&[&["--json"][..], args].concat());
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

/// Something started in a temporary directory, which is removed only after the thing
/// itself is dropped (stopped): fields drop in declaration order.
pub struct InTempDir<T> {
    inner: T,
    dir: tempfile::TempDir,
    /// The coordinators' Raft stores, on tmpfs (see [`raft_store_dir`]).
    _raft_stores: Option<tempfile::TempDir>,
}

impl<T> InTempDir<T> {
    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl<T> std::ops::Deref for InTempDir<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T> std::ops::DerefMut for InTempDir<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

/// A fresh temporary directory, removed when dropped unless `PGQUORUM_KEEP_TEST_DIRS=1`
/// (to read a failed test's logs; the test prints nothing of it).
pub fn temp_dir(prefix: &str) -> tempfile::TempDir {
    temp_dir_in(prefix, &std::env::temp_dir())
}

fn temp_dir_in(prefix: &str, parent: &std::path::Path) -> tempfile::TempDir {
    let keep = std::env::var("PGQUORUM_KEEP_TEST_DIRS").is_ok_and(|v| v == "1");
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .disable_cleanup(keep)
        .tempdir_in(parent)
        .expect("tempdir");
    if keep {
        eprintln!("test directory kept: {}", dir.path().display());
    }
    dir
}

/// A directory on tmpfs (`/dev/shm`) for the coordinators' Raft stores, if the machine
/// has one. The test machine's one disk also serves up to six Postgres servers and
/// their writers, and a sync of the Raft store there was seen to stall for up to
/// 400 ms; openraft 0.9 waits for it with its whole core, so the leader sent no
/// heartbeats, lost its leadership, and the primary's 1 s lease ran out (a needless
/// failover in tests about something else). A coordinator host of its own, with a disk
/// that syncs in milliseconds (docs/faults.md, "Disks"), does not see that; tmpfs plays
/// that disk. The syncs still run, and their order is unit-tested in the coordinator.
pub fn raft_store_dir() -> Option<tempfile::TempDir> {
    let shm = std::path::Path::new("/dev/shm");
    shm.is_dir().then(|| temp_dir_in("pgquorum-raft-test-", shm))
}

/// A started three-node group in a fresh temporary directory.
pub async fn start_group(base_port: u16, spec: impl FnOnce(&mut GroupSpec)) -> InTempDir<CoordinatorGroup> {
    let dir = temp_dir("pgquorum-test-");
    let raft_stores = raft_store_dir();
    let mut s = GroupSpec::new(dir.path(), base_port, 3);
    s.raft_store_root = raft_stores.as_ref().map(|d| d.path().to_path_buf());
    spec(&mut s);
    let group = CoordinatorGroup::start(s).await.expect("start coordinator group");
    InTempDir {
        inner: group,
        dir,
        _raft_stores: raft_stores,
    }
}

/// A client that talks to exactly one coordinator, for checks of that node's state.
pub fn only(addr: &str) -> Coordinators {
    Coordinators::new(
        vec![addr.to_string()],
        Timeouts {
            overall: Duration::from_secs(5),
            ..Timeouts::default()
        },
    )
    .expect("one address")
}

pub async fn create_cluster(client: &Coordinators, name: &str) -> pb::Cluster {
    let name = name.to_string();
    client
        .call(|mut c| {
            let request = pb::CreateClusterRequest {
                name: name.clone(),
                ..Default::default()
            };
            async move { c.create_cluster(request).await }
        })
        .await
        .expect("create cluster")
        .cluster
        .expect("cluster in reply")
}

/// Sets one policy field through the group (following the leader).
pub async fn set_policy(client: &Coordinators, cluster: &str, field: &str, value: &str) -> pb::Policy {
    let request = pb::SetPolicyRequest {
        cluster: cluster.into(),
        settings: [(field.to_string(), value.to_string())].into(),
        actor: "test".into(),
    };
    client
        .call(|mut c| {
            let request = request.clone();
            async move { c.set_policy(request).await }
        })
        .await
        .expect("set policy")
        .policy
        .expect("policy in reply")
}

/// Reads a cluster from one node's applied state, without asking the leader.
pub async fn local_cluster(group: &CoordinatorGroup, id: u64, name: &str) -> pb::Cluster {
    let addr = group.addr_of(id);
    let request = pb::GetClusterRequest {
        name: name.into(),
        consistency: pb::ReadConsistency::Local as i32,
    };
    only(&addr)
        .call_at(&addr, |mut c| async move { c.get_cluster(request).await })
        .await
        .expect("local read")
        .cluster
        .expect("cluster in reply")
}

/// Reads a cluster linearizably through the group.
pub async fn read_cluster(client: &Coordinators, name: &str) -> pb::Cluster {
    let name = name.to_string();
    client
        .call(|mut c| {
            let request = pb::GetClusterRequest {
                name: name.clone(),
                consistency: 0,
            };
            async move { c.get_cluster(request).await }
        })
        .await
        .expect("linearizable read")
        .cluster
        .expect("cluster in reply")
}

/// A started sandbox (3 coordinators, 3 Postgres servers with agents, all HEALTHY) in
/// a fresh temporary directory.
pub async fn start_sandbox(coordinator_base: u16, postgres_base: u16) -> InTempDir<Sandbox> {
    start_sandbox_with(coordinator_base, postgres_base, |_| {}).await
}

/// Like [`start_sandbox`], with the spec adjusted by `spec` first (e.g. every host on a
/// network of its own, or policy settings).
pub async fn start_sandbox_with(
    coordinator_base: u16,
    postgres_base: u16,
    spec: impl FnOnce(&mut SandboxSpec),
) -> InTempDir<Sandbox> {
    let dir = temp_dir("pgquorum-sandbox-test-");
    let raft_stores = raft_store_dir();
    let mut s = SandboxSpec::new(dir.path(), coordinator_base, postgres_base);
    s.raft_store_root = raft_stores.as_ref().map(|d| d.path().to_path_buf());
    spec(&mut s);
    let sandbox = Sandbox::start(s).await.expect("start sandbox");
    InTempDir {
        inner: sandbox,
        dir,
        _raft_stores: raft_stores,
    }
}

/// A connection to one sandbox node's Postgres.
/// Commits a row into `table` (created if missing) on `node` every `every`, for at
/// most ten minutes; stops when dropped.
pub async fn keep_writing(sandbox: &Sandbox, node: &str, table: &str, every: Duration) -> Writer {
    let writer = pg(sandbox, node).await;
    writer
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (id serial PRIMARY KEY, at timestamptz DEFAULT now())"
        ))
        .await
        .unwrap();
    let insert = format!("INSERT INTO {table} DEFAULT VALUES");
    let rounds = (600_000 / every.as_millis().max(1)) as u64;
    Writer(tokio::spawn(async move {
        for _ in 0..rounds {
            if writer.execute(insert.as_str(), &[]).await.is_err() {
                break;
            }
            tokio::time::sleep(every).await;
        }
    }))
}

/// A writer started by [`keep_writing`]; aborted when dropped.
pub struct Writer(tokio::task::JoinHandle<()>);

impl Drop for Writer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Makes `replica` lag: pauses its replay while a writer keeps committing on
/// `primary` (every 25 ms). Resume with [`Lagging::catch_up`].
pub async fn make_lag(sandbox: &Sandbox, primary: &str, replica: &str) -> Lagging {
    let replica = pg(sandbox, replica).await;
    replica
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    let writes = keep_writing(sandbox, primary, "lag_writes", Duration::from_millis(25)).await;
    Lagging {
        replica,
        _writes: writes,
    }
}

/// A replica made to lag by [`make_lag`]; the writer stops when this is dropped.
pub struct Lagging {
    replica: tokio_postgres::Client,
    _writes: Writer,
}

impl Lagging {
    /// Resumes replay and stops the writer.
    pub async fn catch_up(self) {
        self.replica
            .batch_execute("SELECT pg_wal_replay_resume()")
            .await
            .unwrap();
    }
}

/// Panics if `old`'s last acknowledgement did not come before `new`'s first write was
/// even sent: two primaries acknowledged writes at overlapping times. (Comparing with
/// the send, not the reply, leaves no room between the new primary accepting writes
/// and the writer noticing.)
pub fn assert_no_overlap(old: &TimedWriter, new: &TimedWriter) {
    let Some(overlap_ms) = overlap(old, new) else {
        panic!(
            "both writers must have written: old {}, new {}",
            old.acks().len(),
            new.acks().len()
        );
    };
    assert!(
        overlap_ms < 0.0,
        "two writable primaries: the old one acknowledged a write {overlap_ms:.1} ms after the new one's first was sent"
    );
}

/// Writers with `synchronous_commit = local` on every node of a sandbox, started
/// before a fault: on standbys they are refused (and retried every millisecond) until
/// one is promoted, so whichever node acknowledges, and when, is on record.
pub struct WritersOnEveryNode(std::collections::BTreeMap<String, TimedWriter>);

impl WritersOnEveryNode {
    /// Creates the table, starts a writer on each node, waits until `primary`'s writes.
    pub async fn start(sandbox: &Sandbox, primary: &str, for_at_most: Duration) -> WritersOnEveryNode {
        create_writes_table(sandbox).await;
        let writers = sandbox
            .node_names()
            .into_iter()
            .map(|n| {
                let w = TimedWriter::start(sandbox, &n, "w", true, for_at_most).unwrap();
                (n, w)
            })
            .collect();
        let writers = WritersOnEveryNode(writers);
        let old = writers.on(primary);
        eventually(
            &format!("{primary}'s writer writing"),
            Duration::from_secs(30),
            || async { !old.acks().is_empty() },
        )
        .await;
        writers
    }

    pub fn on(&self, node: &str) -> &TimedWriter {
        &self.0[node]
    }

    /// Waits until `node`'s writer has a write acknowledged.
    pub async fn wait_writing(&self, node: &str) {
        let w = self.on(node);
        eventually(
            &format!("{node}'s writer writing"),
            Duration::from_secs(30),
            || async { !w.acks().is_empty() },
        )
        .await;
    }

    /// Panics unless the primaries took turns: `old`'s last acknowledgement came before
    /// `new`'s first write was sent ([`assert_no_overlap`]), and no other node ever
    /// acknowledged a write.
    pub fn assert_one_primary_at_a_time(&self, old: &str, new: &str) {
        assert_no_overlap(self.on(old), self.on(new));
        self.assert_only_acknowledged_by(&[old, new]);
    }

    /// Panics if a node outside `primaries` acknowledged a write.
    pub fn assert_only_acknowledged_by(&self, primaries: &[&str]) {
        for (name, w) in &self.0 {
            assert!(
                primaries.contains(&name.as_str()) || w.acks().is_empty(),
                "{name} was never primary, yet acknowledged a write"
            );
        }
    }

    /// Panics unless the nodes took turns ([`pgquorum::check::took_turns`]): whatever
    /// the number of failovers, no node acknowledged a write after another's turn began.
    pub fn assert_took_turns(&self) {
        let all: Vec<(String, Ack)> = self
            .0
            .iter()
            .flat_map(|(name, w)| w.all().into_iter().map(move |a| (name.clone(), a)))
            .collect();
        let overlaps = pgquorum::check::took_turns(&all);
        assert!(overlaps.is_empty(), "two primaries at once: {overlaps:?}");
    }
}

/// Waits until a node other than `old` is the primary of `epoch` (any: in prefer mode
/// the most caught-up standby wins, synchronous or not); returns its name.
pub async fn wait_new_primary(sandbox: &Sandbox, old: &str, epoch: u64, timeout: Duration) -> String {
    sandbox
        .wait_for(&format!("a new primary of epoch {epoch}"), timeout, |s| {
            s.epoch == epoch
                && !s.primary.is_empty()
                && s.primary != old
                && node_status(s, &s.primary).role == "primary"
        })
        .await
        .unwrap()
        .primary
}

/// Creates table `w` (every column with a default, for [`TimedWriter`]) on the
/// primary, node1.
pub async fn create_writes_table(sandbox: &Sandbox) {
    pg(sandbox, "node1")
        .await
        .batch_execute("CREATE TABLE w (id bigserial PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())")
        .await
        .unwrap();
}

/// One node's line of a status reply.
pub fn node_status<'a>(status: &'a pb::StatusReply, name: &str) -> &'a pb::NodeStatus {
    status
        .nodes
        .iter()
        .find(|n| n.name == name)
        .unwrap_or_else(|| panic!("{name} in {status:?}"))
}

/// Whether the map lets `name` take reads of its class.
pub fn readable(map: &pb::EndpointMap, name: &str) -> bool {
    map.replicas
        .iter()
        .find(|r| r.name == name)
        .is_some_and(|r| r.readable)
}

/// The next endpoint map from `watch` satisfying `want`, failing after `timeout`.
pub async fn next_map_where(
    watch: &mut pgquorum_client::watch::EndpointWatch,
    what: &str,
    timeout: Duration,
    want: impl Fn(&pb::EndpointMap) -> bool,
) -> pb::EndpointMap {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let map = tokio::time::timeout_at(deadline, watch.next())
            .await
            .unwrap_or_else(|_| panic!("no map with {what} within {timeout:?}"))
            .expect("the watch ended")
            .expect("a map");
        if want(&map) {
            return map;
        }
    }
}

pub async fn pg(sandbox: &Sandbox, node: &str) -> tokio_postgres::Client {
    try_pg(sandbox, node)
        .await
        .unwrap_or_else(|| panic!("cannot connect to {node}'s Postgres"))
}

/// A connection to one sandbox node's Postgres, if it accepts one within a second.
pub async fn try_pg(sandbox: &Sandbox, node: &str) -> Option<tokio_postgres::Client> {
    let conninfo = format!("{} connect_timeout=1", sandbox.conninfo(node).ok()?);
    let (client, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Some(client)
}

/// Retries `check` every 100 ms until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + timeout;
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends SIGCONT to processes when dropped, so a test that froze them (SIGSTOP) never
/// leaves them frozen for the cleanup, also when it fails.
pub struct ThawOnDrop(pub Vec<i32>);

impl ThawOnDrop {
    /// Freezes the processes now; they are thawed on drop.
    pub fn freeze(pids: Vec<i32>) -> ThawOnDrop {
        for pid in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGSTOP,
            );
        }
        ThawOnDrop(pids)
    }
}

impl Drop for ThawOnDrop {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGCONT,
            );
        }
    }
}

pub use pgquorum::check::{overlap, Ack, TimedWriter};
pub use pgquorum::launch::KillOnDrop;

/// `GET path` over HTTP/1.1 at `addr`: the status code and the body.
pub async fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr)).await??;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut answer)).await??;
    let code = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {answer:?}")))?;
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    Ok((code, body))
}

/// Prometheus text, checked: every sample's family has `# HELP` and `# TYPE`, every
/// sample line is `name{labels} value` with a number. Returns the samples as
/// (`name{labels}`, value).
pub fn parse_metrics(text: &str) -> Vec<(String, f64)> {
    let mut helped = std::collections::BTreeSet::new();
    let mut typed = std::collections::BTreeSet::new();
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.insert(rest.split_whitespace().next().unwrap_or_default().to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.insert(rest.split_whitespace().next().unwrap_or_default().to_string());
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment: {line}");
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("not a number: {line}"));
        let name = series.split('{').next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
            .unwrap_or(name);
        assert!(helped.contains(family), "no # HELP for {family}");
        assert!(typed.contains(family), "no # TYPE for {family}");
        samples.push((series.to_string(), value));
    }
    samples
}

/// The value of the sample `name` whose labels include every one of `labels`.
pub fn metric(samples: &[(String, f64)], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples.iter().find_map(|(series, value)| {
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        (n == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))).then_some(*value)
    })
}
