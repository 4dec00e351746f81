//! Replication lag as reported in `status`, the endpoint map and alerts, in each state
//! a standby can be in: a primary idle or under steady writes; a standby freshly
//! restarted with replay paused, stuck behind a lock, or without a WAL receiver.
//! Each test runs on its own sandbox and walks through several states in turn.
//!
//! Bounds here are on what the lag *is* (it grows as fast as time passes while replay
//! stands still, and never exceeds the age of the WAL the standby lacks), with slack
//! for a loaded machine; no test asserts how fast anything happens.

use std::time::{Duration, Instant};

use pgquorum::launch::Sandbox;
use pgquorum_client::pb;
use pgquorum_client::watch::watch_endpoints;
use pgquorum_tests::{
    cli_json, eventually, keep_writing, next_map_where, node_status as node, pg, readable, start_sandbox,
    try_pg,
};

const WAIT: Duration = Duration::from_secs(30);

async fn lag_alert(sandbox: &Sandbox, name: &str, severity: &str) -> Option<pb::Alert> {
    sandbox
        .alerts()
        .await
        .unwrap()
        .alerts
        .into_iter()
        .find(|a| a.node == name && a.severity == severity && a.message.contains("replay lag"))
}

/// ALTER SYSTEM (one statement per call: it refuses to run in a transaction block,
/// which several statements in one call are), then a reload.
async fn set_and_reload(client: &tokio_postgres::Client, statements: &[&str]) {
    for statement in statements.iter().chain(&["SELECT pg_reload_conf()"]) {
        client.batch_execute(statement).await.unwrap();
    }
}

/// Two status samples `apart`, both showing `name` behind: while its replay stands
/// still, its time lag grows about as fast as time passes (half of it, for a loaded
/// machine's late heartbeats) and is measured (not a bound), and so are its bytes.
async fn assert_lag_grows(sandbox: &Sandbox, name: &str, apart: Duration) -> pb::NodeStatus {
    let first = sandbox
        .wait_for(&format!("{name} behind"), WAIT, |s| {
            let n = node(s, name);
            n.lag_ms > 0 && n.lag_bytes > 0
        })
        .await
        .unwrap();
    tokio::time::sleep(apart).await;
    let second = sandbox.status().await.unwrap();
    let (a, b) = (node(&first, name), node(&second, name).clone());
    assert!(
        b.lag_ms >= a.lag_ms + apart.as_millis() as u64 / 2,
        "{name}'s lag did not grow with time: {} ms, then {} ms {apart:?} later",
        a.lag_ms,
        b.lag_ms
    );
    assert!(b.lag_bytes >= a.lag_bytes && b.lag_bytes > 0, "{a:?} then {b:?}");
    assert_eq!(b.lag_source(), pb::LagSource::WalClock, "{b:?}");
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_standby_with_replay_paused_stops_taking_realtime_reads_and_alerts() {
    let mut sandbox = start_sandbox(25600, 25610).await;
    let addrs = sandbox.client().addrs().to_vec();
    let mut watch = watch_endpoints(addrs.clone(), "main".into());
    next_map_where(&mut watch, "node2 readable", WAIT, |m| readable(m, "node2")).await;

    // --- An idle primary: one commit, then none. The standbys' last replayed commit
    // ages, their lag does not.
    let primary = pg(&sandbox, "node1").await;
    primary
        .batch_execute("CREATE TABLE idle (id int); INSERT INTO idle VALUES (1)")
        .await
        .unwrap();
    sandbox
        .wait_for("both standbys caught up", WAIT, |s| {
            ["node2", "node3"]
                .iter()
                .all(|n| node(s, n).lag_bytes == 0 && node(s, n).health == "HEALTHY")
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for _ in 0..5 {
        let s = sandbox.status().await.unwrap();
        for name in ["node2", "node3"] {
            let n = node(&s, name);
            // Idle clusters still write a little WAL now and then (running-xacts
            // records), which a busy standby may trail for a moment; but the lag is not
            // the age of the last replayed commit, over 2 s by now.
            assert!(
                n.lag_ms < 1_000 && n.lag_source().exact_or_caught_up(),
                "idle: {n:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }

    // --- node2 (realtime, 50 ms) restarts cleanly: it has replayed no commit since,
    // which the old measurement took for "no lag". (A standby restarts replay at the
    // primary's last checkpoint, so one comes first: no commit lies after it.)
    primary.batch_execute("CHECKPOINT").await.unwrap();
    sandbox
        .wait_for("node2 has the checkpoint", WAIT, |s| {
            node(s, "node2").lag_bytes == 0
        })
        .await
        .unwrap();
    sandbox.stop_node("node2").unwrap();
    sandbox.start_agent("node2").unwrap();
    // Its Postgres answering first: the status may still show the HEALTHY from before
    // the stop, and a connection while it starts is refused ("the database system is
    // starting up"; a fresh-clone run failed so).
    eventually("node2's Postgres answering again", WAIT, || async {
        try_pg(&sandbox, "node2").await.is_some()
    })
    .await;
    sandbox
        .wait_for("node2 streaming again", WAIT, |s| {
            node(s, "node2").health == "HEALTHY"
        })
        .await
        .unwrap();
    let node2 = pg(&sandbox, "node2").await;
    let never_replayed: bool = node2
        .query_one("SELECT pg_last_xact_replay_timestamp() IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        never_replayed,
        "node2 replayed a commit since its restart: not the state under test"
    );

    // --- Replay paused, writes on the primary.
    node2.batch_execute("SELECT pg_wal_replay_pause()").await.unwrap();
    let paused_at = Instant::now();
    let writes = keep_writing(&sandbox, "node1", "w", Duration::from_millis(20)).await;
    // The map says why: node2 out of realtime reads with its lag over 50 ms, in time
    // and in bytes. (Whether node3 keeps its reads at that moment depends on how busy
    // the machine is: it may trail by more than its 100 ms too.)
    next_map_where(&mut watch, "node2 not readable, lagging in the map", WAIT, |m| {
        let n2 = m.replicas.iter().find(|r| r.name == "node2");
        !readable(m, "node2") && n2.is_some_and(|r| r.lag_ms > 50 && r.lag_bytes > 0)
    })
    .await;

    let n2 = assert_lag_grows(&sandbox, "node2", Duration::from_secs(2)).await;
    assert!(n2.replay_paused, "{n2:?}");
    assert!(
        n2.lag_ms <= paused_at.elapsed().as_millis() as u64 + 500,
        "lag {} ms exceeds the age of the oldest WAL node2 lacks ({:?})",
        n2.lag_ms,
        paused_at.elapsed()
    );
    let json = cli_json(&["--coordinators", &addrs.join(","), "status"]);
    let j2 = json["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "node2")
        .unwrap()
        .clone();
    assert_eq!(j2["lag_source"], "wal_clock", "{j2}");
    assert!(j2["lag_bytes"].as_u64() > Some(0), "{j2}");

    eventually("a WARNING for node2's lag", WAIT, || async {
        lag_alert(&sandbox, "node2", "WARNING").await.is_some()
    })
    .await;
    let alert = lag_alert(&sandbox, "node2", "WARNING").await;
    assert!(
        alert.as_ref().is_some_and(|a| a.message.contains("bytes)")),
        "the alert gives bytes too: {alert:?}"
    );

    // --- Resumed: readable again, and the alert clears.
    node2
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    next_map_where(&mut watch, "node2 readable again", WAIT, |m| readable(m, "node2")).await;
    eventually("node2's lag alert cleared", WAIT, || async {
        lag_alert(&sandbox, "node2", "WARNING").await.is_none()
    })
    .await;
    drop(writes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_under_steady_writes_behind_a_lock_and_without_a_wal_receiver() {
    let sandbox = start_sandbox(25700, 25710).await;
    let mut watch = watch_endpoints(sandbox.client().addrs().to_vec(), "main".into());
    let primary = pg(&sandbox, "node1").await;
    primary
        .batch_execute("CREATE TABLE locked (id int)")
        .await
        .unwrap();
    let writes = keep_writing(&sandbox, "node1", "w", Duration::from_millis(10)).await;

    // --- Steady writes: both standbys keep up, measured, well under the WARNING line.
    sandbox
        .wait_for("node3 has the table", WAIT, |s| {
            node(s, "node3").lag_bytes < 1 << 20
        })
        .await
        .unwrap();
    for _ in 0..10 {
        let s = sandbox.status().await.unwrap();
        for name in ["node2", "node3"] {
            let n = node(&s, name);
            assert!(
                n.lag_ms < 1_000 && n.lag_source().exact_or_caught_up(),
                "steady writes: {n:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // --- node3's replay stuck behind a lock a query of its own holds.
    let node3 = pg(&sandbox, "node3").await;
    set_and_reload(&node3, &["ALTER SYSTEM SET max_standby_streaming_delay = -1"]).await;
    let reader = pg(&sandbox, "node3").await;
    eventually("the table on node3", WAIT, || async {
        reader.query_opt("SELECT 1 FROM locked", &[]).await.is_ok()
    })
    .await;
    reader
        .batch_execute("BEGIN; SELECT count(*) FROM locked")
        .await
        .unwrap();
    primary
        .batch_execute("BEGIN; LOCK TABLE locked IN ACCESS EXCLUSIVE MODE; COMMIT")
        .await
        .unwrap();
    next_map_where(&mut watch, "node3 not readable", WAIT, |m| !readable(m, "node3")).await;
    let n3 = assert_lag_grows(&sandbox, "node3", Duration::from_secs(2)).await;
    assert!(!n3.replay_paused, "stuck, not paused: {n3:?}");
    eventually("a WARNING for node3's lag", WAIT, || async {
        lag_alert(&sandbox, "node3", "WARNING").await.is_some()
    })
    .await;
    reader.batch_execute("COMMIT").await.unwrap();
    next_map_where(&mut watch, "node3 readable again", WAIT, |m| readable(m, "node3")).await;

    // --- node3 without a WAL receiver: it cannot know what it misses, the leader can.
    set_and_reload(&node3, &["ALTER SYSTEM SET primary_conninfo = ''"]).await;
    sandbox
        .wait_for("node3 disconnected", WAIT, |s| {
            node(s, "node3").health == "DISCONNECTED"
        })
        .await
        .unwrap();
    let n3 = assert_lag_grows(&sandbox, "node3", Duration::from_secs(2)).await;
    assert_eq!(n3.role, "standby", "{n3:?}");
    let alerts = sandbox.alerts().await.unwrap().alerts;
    assert!(
        alerts
            .iter()
            .any(|a| a.node == "node3" && a.severity == "CRITICAL" && a.message.contains("not streaming")),
        "{alerts:?}"
    );
    set_and_reload(
        &node3,
        &[
            "ALTER SYSTEM RESET primary_conninfo",
            "ALTER SYSTEM RESET max_standby_streaming_delay",
        ],
    )
    .await;
    sandbox
        .wait_for("node3 streaming and caught up", WAIT, |s| {
            let n = node(s, "node3");
            n.health == "HEALTHY" && n.lag_ms < 1_000
        })
        .await
        .unwrap();
    drop(writes);
}

trait ExactOrCaughtUp {
    fn exact_or_caught_up(self) -> bool;
}

impl ExactOrCaughtUp for pb::LagSource {
    /// A measurement: neither unknown nor only a lower bound.
    fn exact_or_caught_up(self) -> bool {
        !matches!(self, pb::LagSource::Unknown | pb::LagSource::AtLeast)
    }
}
