//! Network faults on a sandbox whose coordinators and nodes each have a network of
//! their own (namespaces on a private bridge, cut with nftables; see
//! `pgquorum::launch::Network`). Needs root, as CI runs. Each test has its own ports,
//! network and directory.

use std::time::{Duration, Instant};

use pgquorum_tests::{
    assert_no_overlap, eventually, node_status as node, pg, set_policy, start_sandbox_with, TimedWriter,
};

const WAIT: Duration = Duration::from_secs(30);

/// Issue 10, case 1: the primary's host is cut off from every coordinator and every
/// standby; its clients still reach it. Writers on both primaries, the old one with
/// `synchronous_commit = local`: the old primary's last acknowledged write must come
/// before the new primary's first. After the cut heals, the old primary rejoins as a
/// standby of the new one.
async fn primary_host_cut_off(coordinator_base: u16, postgres_base: u16, sync_mode: &str) {
    let mut sandbox = start_sandbox_with(coordinator_base, postgres_base, |s| s.network = true).await;
    set_policy(&sandbox.client(), "main", "sync_mode", sync_mode).await;
    pg(&sandbox, "node1")
        .await
        .batch_execute("CREATE TABLE w (id bigserial PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())")
        .await
        .unwrap();
    let old = TimedWriter::start(&sandbox, "node1", "w", true, Duration::from_secs(90));
    eventually("the old primary's writer writing", WAIT, || async {
        !old.acks().is_empty()
    })
    .await;

    let cut_at = Instant::now();
    sandbox.network().unwrap().isolate("node1").unwrap();
    sandbox
        .wait_for("node2 primary of epoch 2", WAIT, |s| {
            s.primary == "node2" && s.epoch == 2 && node(s, "node2").role == "primary"
        })
        .await
        .unwrap();
    let new = TimedWriter::start(&sandbox, "node2", "w", false, Duration::from_secs(90));
    eventually("the new primary's writer writing", WAIT, || async {
        !new.acks().is_empty()
    })
    .await;
    // Time for an old primary that was never fenced to show it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (last_old, first_new) = (old.acks().last().copied(), new.acks().first().copied());
    eprintln!(
        "cut → old primary's last ack {:?}, new primary's first ack {:?}",
        last_old.map(|t| t.duration_since(cut_at)),
        first_new.map(|t| t.duration_since(cut_at)),
    );
    assert_no_overlap(&old, &new);
    assert_eq!(
        sandbox.postmaster_pid("node1"),
        None,
        "the cut-off primary's Postgres was stopped at its lease's end"
    );

    sandbox.network().unwrap().heal_all().unwrap();
    sandbox
        .wait_for("node1 back as a standby of node2", WAIT, |s| {
            let n = node(s, "node1");
            n.role == "standby" && n.health == "HEALTHY" && s.primary == "node2"
        })
        .await
        .unwrap();
    assert_no_overlap(&old, &new);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_cut_off_stops_acknowledging_before_the_new_one_starts_strict() {
    primary_host_cut_off(26400, 26410, "strict").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_cut_off_stops_acknowledging_before_the_new_one_starts_prefer() {
    primary_host_cut_off(26500, 26510, "prefer").await;
}
