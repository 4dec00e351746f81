//! Helpers shared by the end-to-end tests in `tests/`.
//!
//! The tests drive the real binaries (build them first: `cargo build --workspace`) and
//! start clusters only through [`pgquorum::launch`], the same code the sandbox and the
//! benchmarks use. Each test file picks its own port base, each test its own temporary
//! directory, so the runner may run them in parallel.

use std::process::{Command, Output};
use std::time::Duration;

use pgquorum::launch::{find_binary, CoordinatorGroup, GroupSpec};
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

/// Runs the CLI with `--json` and parses its output; panics with stderr if it failed.
pub fn cli_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = cli(&all);
    assert!(
        out.status.success(),
        "pgquorum {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

/// A started three-node group in a fresh temporary directory.
pub async fn start_group(
    base_port: u16,
    spec: impl FnOnce(&mut GroupSpec),
) -> (CoordinatorGroup, tempfile::TempDir) {
    let dir = tempfile::Builder::new()
        .prefix("pgquorum-test-")
        .tempdir()
        .expect("tempdir");
    let mut s = GroupSpec::new(dir.path(), base_port, 3);
    spec(&mut s);
    let group = CoordinatorGroup::start(s).await.expect("start coordinator group");
    (group, dir)
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
