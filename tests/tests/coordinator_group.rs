//! The coordinator group as a user deploys it: three (or four) `pgquorum-coordinator`
//! processes on loopback, each with its own sled store, killed and restarted for real.
//!
//! Each test has its own port base so the runner can run them in parallel.

use std::time::Duration;

use pgquorum_client::pb;
use pgquorum_tests::{create_cluster, local_cluster, read_cluster, set_policy, start_group};

const WAIT: Duration = Duration::from_secs(20);

/// The values of `max_lag_on_failover_bytes` this test wrote, in order.
fn lag_values(c: &pb::Cluster) -> Vec<String> {
    c.history
        .iter()
        .filter(|e| e.kind == "policy_changed")
        .filter_map(|e| e.detail.split(" -> ").nth(1).map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_a_leader_commit_and_all_apply() {
    let group = start_group(21100, |_| {}).await;
    let client = group.client();

    // --- A write through any node reaches the leader and is committed.
    let cluster = create_cluster(&client, "main").await;
    assert_eq!(cluster.epoch, 0);
    let policy = set_policy(&client, "main", "failure_timeout_ms", "800").await;
    assert_eq!(policy.failure_timeout_ms, 800);

    // --- Every node applies it: each one's own state, read locally, shows the value.
    let leader = group.wait_for_leader(WAIT).await.unwrap();
    let index = group.status_of(leader).await.unwrap().last_log_index;
    for id in group.ids() {
        group.wait_applied(id, index, WAIT).await.unwrap();
        let c = local_cluster(&group, id, "main").await;
        assert_eq!(c.policy.unwrap().failure_timeout_ms, 800, "node {id}");
        assert_eq!(c.history.len(), 2, "node {id}: created + policy change");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_loses_no_committed_write_and_it_rejoins() {
    let mut group = start_group(21200, |_| {}).await;
    let client = group.client();
    create_cluster(&client, "main").await;
    let mut written = Vec::new();
    for i in 0..20 {
        let v = (1_000_000 + i).to_string();
        set_policy(&client, "main", "max_lag_on_failover_bytes", &v).await;
        written.push(v);
    }

    // --- kill -9 the leader: the others elect a new one.
    let old = group.wait_for_leader(WAIT).await.unwrap();
    group.kill(old).unwrap();
    let new = group.wait_for_leader(WAIT).await.unwrap();
    assert_ne!(new, old);

    // --- Every write acknowledged before the kill is there, in order.
    let c = read_cluster(&client, "main").await;
    assert_eq!(lag_values(&c), written);

    // --- Writes continue under the new leader.
    for i in 20..30 {
        let v = (1_000_000 + i).to_string();
        set_policy(&client, "main", "max_lag_on_failover_bytes", &v).await;
        written.push(v);
    }

    // --- The old leader restarts, rejoins as a follower and catches up.
    group.start_node(old).unwrap();
    let index = group.status_of(new).await.unwrap().last_log_index;
    let status = group.wait_applied(old, index, WAIT).await.unwrap();
    assert_eq!(status.state, "follower");
    assert_eq!(status.leader_id, Some(new));
    assert_eq!(lag_values(&local_cluster(&group, old, "main").await), written);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_a_purged_log_catches_up_from_a_snapshot() {
    let mut group = start_group(21300, |s| {
        s.raft.snapshot_every_logs = 20;
        s.raft.logs_kept_after_snapshot = 0;
    })
    .await;
    let client = group.client();
    create_cluster(&client, "main").await;
    let leader = group.wait_for_leader(WAIT).await.unwrap();
    let follower = group.ids().into_iter().find(|&id| id != leader).unwrap();

    // --- Stop a follower, then write enough that the others snapshot and purge past it.
    let behind = group.status_of(follower).await.unwrap().last_log_index;
    group.kill(follower).unwrap();
    for i in 0..100 {
        set_policy(
            &client,
            "main",
            "max_lag_on_failover_bytes",
            &(2_000_000 + i).to_string(),
        )
        .await;
    }
    // A leader purges after the snapshot, and only once no replication in flight still
    // reads those entries (openraft retries when replication makes progress): the
    // stopped follower's last request can hold it back, so keep writing until it did.
    let deadline = std::time::Instant::now() + WAIT;
    let mut last = 2_000_099;
    let leader_status = loop {
        let leader = group.wait_for_leader(WAIT).await.unwrap();
        let status = group.status_of(leader).await.unwrap();
        if status.purged_index > behind {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the leader purged only up to {} in {WAIT:?}, the stopped follower had {behind}",
            status.purged_index
        );
        last += 1;
        set_policy(&client, "main", "max_lag_on_failover_bytes", &last.to_string()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // --- Restarted, it can only catch up by installing the leader's snapshot.
    group.start_node(follower).unwrap();
    let status = group
        .wait_applied(follower, leader_status.last_log_index, WAIT)
        .await
        .unwrap();
    assert!(
        status.snapshot_index > behind,
        "follower snapshot index {} <= {behind}",
        status.snapshot_index
    );
    let c = local_cluster(&group, follower, "main").await;
    assert_eq!(c.policy.unwrap().max_lag_on_failover_bytes, last);

    // --- And it keeps the installed state over its own restart.
    group.kill(follower).unwrap();
    group.start_node(follower).unwrap();
    group
        .wait_applied(follower, leader_status.last_log_index, WAIT)
        .await
        .unwrap();
    assert_eq!(
        local_cluster(&group, follower, "main")
            .await
            .policy
            .unwrap()
            .max_lag_on_failover_bytes,
        last
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_group_restarted_keeps_its_state() {
    let mut group = start_group(21400, |s| {
        // Snapshot now and then, so the restart reads both a snapshot and a log tail.
        s.raft.snapshot_every_logs = 7;
        s.raft.logs_kept_after_snapshot = 2;
    })
    .await;
    let client = group.client();
    create_cluster(&client, "main").await;
    create_cluster(&client, "reporting").await;
    for i in 0..10 {
        set_policy(
            &client,
            "main",
            "max_lag_on_failover_bytes",
            &(3_000_000 + i).to_string(),
        )
        .await;
    }
    let before = read_cluster(&client, "main").await;

    // --- A clean stop of every node (SIGTERM), then all restarted.
    for id in group.ids() {
        group.terminate(id).unwrap();
    }
    for id in group.ids() {
        group.start_node(id).unwrap();
    }
    group.wait_for_leader(WAIT).await.unwrap();
    assert_eq!(read_cluster(&client, "main").await, before);
    set_policy(&client, "main", "lease_ms", "1500").await;
    let before = read_cluster(&client, "main").await;

    // --- kill -9 of every node at once: only what was fsynced survives, and every
    // acknowledged write was.
    for id in group.ids() {
        group.kill(id).unwrap();
    }
    for id in group.ids() {
        group.start_node(id).unwrap();
    }
    group.wait_for_leader(WAIT).await.unwrap();
    assert_eq!(read_cluster(&client, "main").await, before);
    assert_eq!(read_cluster(&client, "reporting").await.name, "reporting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_grows_and_shrinks_while_the_group_keeps_committing() {
    let mut group = start_group(21500, |_| {}).await;
    let client = group.client();
    create_cluster(&client, "main").await;
    let addrs = group.addrs().join(",");

    // --- A fourth coordinator, started with no initial members, waits to be added.
    group.create_node(4, Vec::new()).unwrap();
    group.start_node(4).unwrap();
    let addr4 = group.addr_of(4);
    let added = pgquorum_tests::cli_json(&[
        "--coordinators",
        &addrs,
        "raft",
        "add",
        "--id",
        "4",
        "--addr",
        &addr4,
        "--region",
        "us-east-1",
    ]);
    let four = added["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == 4)
        .unwrap()
        .clone();
    assert_eq!(four["voter"], false);
    assert_eq!(four["region"], "us-east-1");

    // --- Promoted to voter: four voters, and it has the state.
    let promoted = pgquorum_tests::cli_json(&["--coordinators", &addrs, "raft", "promote", "4"]);
    let voters = promoted["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["voter"] == true)
        .count();
    assert_eq!(voters, 4);
    // Caught up means replicated; a local read needs it applied too (reads of a
    // node's own state may lag, by design).
    let leader = group.wait_for_leader(WAIT).await.unwrap();
    let index = group.status_of(leader).await.unwrap().last_log_index;
    group.wait_applied(4, index, WAIT).await.unwrap();
    assert_eq!(local_cluster(&group, 4, "main").await.name, "main");

    // --- Remove a follower that is not the new node; stop it once removed.
    let leader = group.wait_for_leader(WAIT).await.unwrap();
    let gone = (1..=3).find(|&id| id != leader).unwrap();
    let removed = pgquorum_tests::cli_json(&["--coordinators", &addrs, "raft", "remove", &gone.to_string()]);
    assert!(removed["members"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["id"] != gone));
    group.kill(gone).unwrap();

    // --- The remaining three keep committing, and `raft status` shows them.
    let addrs = group
        .ids()
        .into_iter()
        .filter(|&id| id != gone)
        .map(|id| group.addr_of(id))
        .collect::<Vec<_>>();
    let remaining = pgquorum_client::Coordinators::new(addrs.clone(), Default::default()).unwrap();
    set_policy(&remaining, "main", "lease_ms", "2500").await;
    let status = pgquorum_tests::cli_json(&["--coordinators", &addrs.join(","), "raft", "status"]);
    let members = status["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    assert!(
        members
            .iter()
            .all(|m| m["reachable"] == true && m["voter"] == true),
        "{status}"
    );
    assert_eq!(
        members.iter().filter(|m| m["role"] == "leader").count(),
        1,
        "{status}"
    );
    let leader = group.wait_for_leader(WAIT).await.unwrap();
    let index = group.status_of(leader).await.unwrap().last_log_index;
    for id in group.ids().into_iter().filter(|&id| id != gone) {
        group.wait_applied(id, index, WAIT).await.unwrap();
        assert_eq!(
            local_cluster(&group, id, "main").await.policy.unwrap().lease_ms,
            2500
        );
    }
}
