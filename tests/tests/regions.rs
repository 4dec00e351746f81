//! Losing the primary region (issue 12): coordinators 1 and 2 and nodes node1 (the
//! primary) and node2 die; coordinator 3 and node3 survive in the other region.
//! `raft force-new-group` on coordinator 3 makes a group of its own state, an operator
//! readmits node3 and promotes it with `failover --to node3 --accept-data-loss`; nothing
//! node3 had is lost. When the old region comes back with its old data, its
//! coordinators are refused and learn their group was replaced (they answer no node),
//! its nodes are held (no lease: node1 acknowledges nothing), until each is re-added:
//! the coordinators with empty stores, the nodes by `cluster readmit`, after which the
//! old primary is rewound and follows node3. Writers with `synchronous_commit = local`
//! on every node record who acknowledged what, and when.

use std::time::{Duration, Instant};

use pgquorum::launch::Sandbox;
use pgquorum_tests::{
    cli, cli_ok, eventually, node_status as node, pg, set_policy, start_sandbox, WritersOnEveryNode,
};

const WAIT: Duration = Duration::from_secs(60);

/// `SELECT count(*), max(id) FROM w` on `node`.
async fn rows(sandbox: &Sandbox, node: &str) -> (i64, i64) {
    let row = pg(sandbox, node)
        .await
        .query_one("SELECT count(*), coalesce(max(id), 0) FROM w", &[])
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// Runs the CLI against `addrs`; panics with its stderr unless it succeeds.
fn run(addrs: &str, args: &[&str]) {
    cli_ok(&[&["--coordinators", addrs][..], args].concat());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_primary_region_is_recovered_with_force_new_group_and_refused_when_it_returns() {
    let mut sandbox = start_sandbox(27700, 27710).await;
    // As for a DR region: no node is ever promoted automatically (the sandbox's nodes
    // are all in us-west-2); the operator decides.
    set_policy(&sandbox.client(), "main", "auto_failover_regions", "us-east-1").await;
    sandbox
        .wait_for("all healthy", WAIT, |s| {
            s.nodes.iter().all(|n| n.health == "HEALTHY")
        })
        .await
        .unwrap();
    let writers = WritersOnEveryNode::start(&sandbox, "node1", Duration::from_secs(400)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let survivor = sandbox.coordinators().addr_of(3);

    // The primary region is lost: two of three coordinators, the primary and node2.
    sandbox.coordinators().kill(1).unwrap();
    sandbox.coordinators().kill(2).unwrap();
    sandbox.kill_host("node1").unwrap();
    sandbox.kill_host("node2").unwrap();
    let lost_at = Instant::now();
    // What the DR node had when the region went: all of it must survive.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (dr_count, dr_max) = rows(&sandbox, "node3").await;
    assert!(dr_count > 0, "node3 had replicated some writes");

    // Refused without the flag that names the risk; the message says what it is.
    let force = [
        "raft",
        "force-new-group",
        "--on",
        &survivor,
        "--reason",
        "us-west-2 lost",
    ];
    let out = cli(&[&["--coordinators", &survivor][..], &force].concat());
    let refusal = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && refusal.contains("split brain"),
        "{refusal}"
    );
    run(&survivor, &[&force[..], &["--accept-split-brain-risk"]].concat());
    // Coordinator 3 restarts (same pid) as the only voter of group g1.
    let group = &*sandbox.coordinators();
    eventually("coordinator 3 leads group g1", WAIT, || async {
        group
            .status_of(3)
            .await
            .is_ok_and(|s| s.state == "leader" && s.group.starts_with("g1-c3-"))
    })
    .await;
    let audit = std::fs::read_to_string(group.node_dir(3).join("coordinator.log")).unwrap_or_default();
    assert!(
        audit.contains("FORCED a new coordinator group"),
        "the log records it"
    );

    // Every node is held: node3 too, until an operator readmits it.
    let s = sandbox
        .wait_for("node1 and node3 held", WAIT, |s| {
            node(s, "node1").held && node(s, "node3").held
        })
        .await
        .unwrap();
    assert_eq!(
        s.primary, "node1",
        "the state is the survivor's: node1 was primary"
    );
    assert!(
        s.epoch > 1 << 20,
        "the new group's epochs are above anything the old one reached: {}",
        s.epoch
    );
    run(&survivor, &["cluster", "readmit", "main", "node3"]);
    // The DR node is a standby reporting again; promote it, accepting the loss of what
    // it never received.
    sandbox
        .wait_for("node3 reporting as a standby", WAIT, |s| {
            node(s, "node3").role == "standby" && !node(s, "node3").held
        })
        .await
        .unwrap();
    run(&survivor, &["failover", "--to", "node3", "--accept-data-loss"]);
    sandbox
        .wait_for("node3 primary", WAIT, |s| {
            s.primary == "node3" && s.failover.is_none() && node(s, "node3").role == "primary"
        })
        .await
        .unwrap();
    writers.wait_writing("node3").await;
    let (count, _) = {
        let row = pg(&sandbox, "node3")
            .await
            .query_one("SELECT count(*) FROM w WHERE id <= $1", &[&dr_max])
            .await
            .unwrap();
        (row.get::<_, i64>(0), ())
    };
    assert_eq!(count, dr_count, "every write node3 had survives its promotion");
    let lost = writers.on("node1").all().iter().filter(|a| a.id > dr_max).count();
    eprintln!("acknowledged by node1 but never received by node3 (accepted loss): {lost}");

    // The old region returns with its old data: its coordinators first. Two of the old
    // group's three, a majority of it: they may elect a leader, but coordinator 3
    // refuses them and they learn their group was replaced.
    sandbox.coordinators().start_node(1).unwrap();
    sandbox.coordinators().start_node(2).unwrap();
    let group = &*sandbox.coordinators();
    eventually("coordinators 1 and 2 know they were superseded", WAIT, || async {
        let mut all = true;
        for id in [1, 2] {
            all &= group.status_of(id).await.is_ok_and(|s| !s.superseded.is_empty());
        }
        all
    })
    .await;
    // Then its nodes: refused everywhere, node1 never becomes writable again.
    let returned = Instant::now();
    sandbox.start_agent("node1").unwrap();
    sandbox.start_agent("node2").unwrap();
    sandbox
        .wait_for("node1 and node2 held, not answered", WAIT, |s| {
            node(s, "node1").held && node(s, "node2").held && s.primary == "node3"
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(
        writers.on("node1").acked_since(lost_at).is_empty(),
        "node1 acknowledged a write after its region was lost"
    );
    let agent_log = std::fs::read_to_string(sandbox.path_of_agent_log("node1")).unwrap_or_default();
    assert!(
        agent_log.contains("held since the coordinator group was re-formed"),
        "node1's agent was told why it is refused"
    );

    // Re-added: the coordinators with empty stores, then the nodes.
    for id in [1u64, 2] {
        sandbox.coordinators().restart_empty(id).unwrap();
        let addr = sandbox.coordinators().addr_of(id);
        let region = pgquorum::launch::sandbox_region(id);
        let id = id.to_string();
        run(
            &survivor,
            &["raft", "add", "--id", &id, "--addr", &addr, "--region", region],
        );
        run(&survivor, &["raft", "promote", &id]);
    }
    let group = &*sandbox.coordinators();
    let status = group.status_of(3).await.unwrap();
    assert_eq!(status.members.iter().filter(|m| m.voter).count(), 3, "{status:?}");
    for id in [1, 2] {
        let s = group.status_of(id).await.unwrap();
        assert_eq!(s.group, status.group, "coordinator {id} joined the new group");
        assert!(s.superseded.is_empty());
    }
    run(&survivor, &["cluster", "readmit", "main", "node1"]);
    run(&survivor, &["cluster", "readmit", "main", "node2"]);
    sandbox
        .wait_for("node1 and node2 follow node3", WAIT, |s| {
            ["node1", "node2"].iter().all(|n| {
                let n = node(s, n);
                n.role == "standby" && n.health == "HEALTHY" && !n.held
            }) && s.primary == "node3"
        })
        .await
        .unwrap();
    assert!(
        writers.on("node1").acked_since(returned).is_empty(),
        "the old primary acknowledged nothing after it came back"
    );
    assert!(
        rows(&sandbox, "node1").await.0 >= dr_count,
        "node1 follows node3's history"
    );
    writers.assert_one_primary_at_a_time("node1", "node3");
}
