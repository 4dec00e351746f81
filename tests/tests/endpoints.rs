//! The endpoint map and its stream: every coordinator serves it, watchers ride out a
//! leader's death, readability follows replica lag.

use std::time::Duration;

use pgquorum_client::pb;
use pgquorum_client::watch::{watch_endpoints, EndpointWatch};
use pgquorum_tests::{cli, make_lag, next_map_where, readable, set_policy, start_group, start_sandbox};

const WAIT: Duration = Duration::from_secs(30);

async fn next_where(
    watch: &mut EndpointWatch,
    what: &str,
    want: impl Fn(&pb::EndpointMap) -> bool,
) -> pb::EndpointMap {
    next_map_where(watch, what, WAIT, want).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_on_a_follower_keeps_receiving_maps_when_the_leader_dies() {
    let mut sandbox = start_sandbox(24200, 24210).await;
    let leader = sandbox.coordinators().wait_for_leader(WAIT).await.unwrap();
    let follower = sandbox
        .coordinators()
        .ids()
        .into_iter()
        .find(|&id| id != leader)
        .unwrap();
    let mut watch = watch_endpoints(vec![sandbox.coordinators().addr_of(follower)], "main".into());

    // --- The current map comes first: primary node1, both replicas readable.
    let first = next_where(&mut watch, "the current map", |m| m.primary.is_some()).await;
    assert_eq!(
        (first.epoch, first.primary.as_ref().unwrap().name.as_str()),
        (1, "node1")
    );
    let first = if readable(&first, "node2") && readable(&first, "node3") {
        first
    } else {
        next_where(&mut watch, "readable replicas", |m| {
            readable(m, "node2") && readable(m, "node3")
        })
        .await
    };

    // --- The Raft leader dies, then the primary host: the follower's stream goes on.
    sandbox.coordinators().kill(leader).unwrap();
    sandbox.kill_host("node1").unwrap();
    let during = next_where(&mut watch, "no primary during the failover", |m| {
        m.primary.is_none()
    })
    .await;
    assert_eq!(during.epoch, 2);
    let after = next_where(&mut watch, "node2 published as primary", |m| {
        m.primary.as_ref().is_some_and(|p| p.name == "node2")
    })
    .await;
    assert!(
        after.version > during.version && during.version > first.version,
        "versions only grow"
    );
    assert_eq!(after.epoch, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_replica_stops_taking_reads_until_it_catches_up() {
    let sandbox = start_sandbox(24300, 24310).await;
    // node2 serves `realtime` (50 ms); under the writes below a loaded machine can put
    // even a synchronous standby past that for a moment. This test is about node3 not
    // disturbing the others, so node2 gets room that no scheduling hiccup uses up.
    set_policy(&sandbox.client(), "main", "lag_threshold_ms.realtime", "2000").await;
    let mut watch = watch_endpoints(sandbox.client().addrs().to_vec(), "main".into());
    next_where(&mut watch, "node3 readable", |m| readable(m, "node3")).await;

    let lag = make_lag(&sandbox, "node1", "node3").await;
    // node3 serves `reporting`, which allows 100 ms of lag.
    let lagging = next_where(&mut watch, "node3 not readable", |m| !readable(m, "node3")).await;
    assert!(readable(&lagging, "node2"), "the sync standby keeps taking reads");
    lag.catch_up().await;
    next_where(&mut watch, "node3 readable again", |m| readable(m, "node3")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watching_an_unknown_cluster_is_refused_by_name() {
    let group = start_group(24400, |_| {}).await;
    let mut watch = watch_endpoints(group.addrs(), "nope".into());
    let err = tokio::time::timeout(WAIT, watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("\"nope\" does not exist"), "{err}");
    let out = cli(&[
        "--coordinators",
        &group.addrs().join(","),
        "watch",
        "--cluster",
        "nope",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
}
