//! The failsafe (issue 12): while no coordinator leader answers, a primary keeps
//! writing on promises from every standby that could replace it, so an outage of the
//! coordinator group costs a healthy primary nothing; with a promise missing it stops
//! within its lease. Writers with `synchronous_commit = local` on every node record
//! who acknowledged what, and when. (A primary cut off from the coordinators while its
//! standbys reach them is refused its promises and replaced: `partitions.rs`.)

use std::time::{Duration, Instant};

use pgquorum::launch::Sandbox;
use pgquorum_tests::{
    eventually, node_status as node, set_policy, start_sandbox, InTempDir, ThawOnDrop, WritersOnEveryNode,
};

const WAIT: Duration = Duration::from_secs(30);
const LEASE: Duration = Duration::from_millis(1000);

fn log_of(path: std::path::PathBuf) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The lines of a log that tell of a fence.
fn fences(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("fence"))
        .map(String::from)
        .collect()
}

/// node1's agent's and guard's fence lines so far (a start on a busy machine may
/// have had one).
fn node1_fences(sandbox: &Sandbox) -> (Vec<String>, Vec<String>) {
    (
        fences(&log_of(sandbox.path_of_agent_log("node1"))),
        fences(&log_of(sandbox.path_of_guard_log("node1"))),
    )
}

/// A sandbox in `sync_mode`, healthy, with node1's sync standby committed (so node1
/// knows whose promises it needs) and writers on every node.
async fn healthy(
    coordinator_base: u16,
    postgres_base: u16,
    sync_mode: &str,
) -> (InTempDir<Sandbox>, WritersOnEveryNode) {
    let sandbox = start_sandbox(coordinator_base, postgres_base).await;
    set_policy(&sandbox.client(), "main", "sync_mode", sync_mode).await;
    sandbox
        .wait_for("all healthy, a sync standby committed", WAIT, |s| {
            !s.sync_set.is_empty() && s.nodes.iter().all(|n| n.health == "HEALTHY")
        })
        .await
        .unwrap();
    let writers = WritersOnEveryNode::start(&sandbox, "node1", Duration::from_secs(180)).await;
    (sandbox, writers)
}

/// Panics unless node1 wrote throughout `from..to` (no write refused, writes
/// acknowledged), went on the failsafe, and was never fenced.
fn assert_wrote_throughout(
    sandbox: &Sandbox,
    writers: &WritersOnEveryNode,
    from: Instant,
    to: Instant,
    fences_before: &(Vec<String>, Vec<String>),
) {
    let node1 = writers.on("node1");
    let refused = node1.refused_between(from, to);
    assert!(
        refused.is_empty(),
        "node1 refused {} writes during the outage, the first {:?} into it",
        refused.len(),
        refused.first().map(|t| t.duration_since(from))
    );
    let acked = node1
        .acked_since(from)
        .into_iter()
        .filter(|a| a.acked <= to)
        .count();
    assert!(acked > 0, "node1 acknowledged writes during the outage");
    let agent = log_of(sandbox.path_of_agent_log("node1"));
    assert!(
        agent.contains("failsafe: no coordinator leader answers"),
        "node1 wrote on its standbys' promises"
    );
    let guard = log_of(sandbox.path_of_guard_log("node1"));
    assert_eq!(
        (fences(&agent), fences(&guard)),
        fences_before.clone(),
        "node1 was fenced during the outage (agent's and guard's fence lines)"
    );
}

/// After the outage: the coordinators answer again, node1 is still the primary of
/// epoch 1 on the same postmaster, and no other node ever acknowledged a write.
async fn assert_nothing_failed_over(
    sandbox: &Sandbox,
    writers: &WritersOnEveryNode,
    postmaster: Option<i32>,
) {
    let back = Instant::now();
    let s = sandbox
        .wait_for("the coordinators answering, node1 healthy", WAIT, |s| {
            node(s, "node1").health == "HEALTHY" && !s.failsafe
        })
        .await
        .unwrap();
    // Long enough for a failover the return caused to show.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = sandbox.status().await.unwrap_or(s);
    assert_eq!((s.epoch, s.primary.as_str()), (1, "node1"), "no failover");
    assert_eq!(
        sandbox.postmaster_pid("node1"),
        postmaster,
        "node1's Postgres never stopped"
    );
    assert!(
        !writers.on("node1").acked_since(back).is_empty(),
        "node1 writes after the coordinators returned"
    );
    writers.assert_only_acknowledged_by(&["node1"]);
}

/// Two of three coordinators killed for `hold`, then started again: no quorum meanwhile.
/// With `leader_too`, the leader is among them (no leader at all); without, the leader
/// lives on alone (openraft keeps it leader, but it cannot confirm anything). Either
/// way the primary writes throughout on its standbys' promises, and nothing fails over
/// when the two return.
async fn two_coordinators_killed(
    coordinator_base: u16,
    postgres_base: u16,
    leader_too: bool,
    hold: Duration,
) {
    let (mut sandbox, writers) = healthy(coordinator_base, postgres_base, "strict").await;
    let postmaster = sandbox.postmaster_pid("node1");
    let leader = sandbox.coordinators().wait_for_leader(WAIT).await.unwrap();
    let followers: Vec<u64> = sandbox
        .coordinators()
        .ids()
        .into_iter()
        .filter(|id| *id != leader)
        .collect();
    let killed = if leader_too {
        vec![leader, followers[0]]
    } else {
        followers
    };
    let fences_before = node1_fences(&sandbox);
    let from = Instant::now();
    for id in &killed {
        sandbox.coordinators().kill(*id).unwrap();
    }
    tokio::time::sleep(hold).await;
    let to = Instant::now();
    assert_wrote_throughout(&sandbox, &writers, from, to, &fences_before);
    for standby in ["node2", "node3"] {
        assert!(
            log_of(sandbox.path_of_agent_log(standby)).contains("promised the primary not to be promoted"),
            "{standby} gave a promise"
        );
    }
    for id in killed {
        sandbox.coordinators().start_node(id).unwrap();
    }
    assert_nothing_failed_over(&sandbox, &writers, postmaster).await;
}

/// Issue 12: two of three coordinators (the leader among them) killed for a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_of_three_coordinators_killed_for_a_minute_cost_the_primary_nothing() {
    two_coordinators_killed(27100, 27110, true, Duration::from_secs(60)).await;
}

/// Review finding: the leader's two followers killed. The leader, alone, still took
/// heartbeats and answered the standbys, which then refused to promise ("I reach a
/// leader"), and the primary stopped although nothing could be committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_lost_both_followers_costs_the_primary_nothing() {
    two_coordinators_killed(27400, 27410, false, Duration::from_secs(15)).await;
}

/// Issue 12: every coordinator frozen (SIGSTOP) for 20 s, in `prefer` mode (both
/// standbys must promise). Thawed, the old leader's reports are 20 s old: it must not
/// take the primary for silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_coordinator_frozen_costs_the_primary_nothing() {
    let (mut sandbox, writers) = healthy(27200, 27210, "prefer").await;
    let postmaster = sandbox.postmaster_pid("node1");
    let pids = sandbox.coordinators().pids();
    let fences_before = node1_fences(&sandbox);
    let from = Instant::now();
    let frozen = ThawOnDrop::freeze(pids);
    tokio::time::sleep(Duration::from_secs(20)).await;
    let to = Instant::now();
    drop(frozen);
    assert_wrote_throughout(&sandbox, &writers, from, to, &fences_before);
    for standby in ["node2", "node3"] {
        assert!(
            log_of(sandbox.path_of_agent_log(standby)).contains("promised the primary not to be promoted"),
            "{standby} gave a promise"
        );
    }
    assert_nothing_failed_over(&sandbox, &writers, postmaster).await;
}

/// Issue 12: during an outage of every coordinator the sync standby's host dies: its
/// promise is not renewed, and the primary stops before the last one it gave ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_lost_during_an_outage_stops_the_primary_within_its_lease() {
    let (mut sandbox, writers) = healthy(27300, 27310, "strict").await;
    let pids = sandbox.coordinators().pids();
    let frozen = ThawOnDrop::freeze(pids);
    // On the failsafe by now (its lease alone would have ended).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let on_failsafe = Instant::now() - Duration::from_secs(1);
    assert!(
        !writers.on("node1").acked_since(on_failsafe).is_empty(),
        "node1 writes on its standby's promise"
    );
    let killed = Instant::now();
    sandbox.kill_host("node2").unwrap();
    eventually("node1's Postgres stopped", WAIT, || async {
        sandbox.postmaster_pid("node1").is_none()
    })
    .await;
    // Its last promise was asked for before the kill and lasts a lease; the slack
    // covers the kill taking effect and the client noting the acknowledgement.
    let last = writers.on("node1").last().unwrap().acked;
    let after = last.saturating_duration_since(killed);
    assert!(
        after < LEASE + Duration::from_millis(300),
        "node1 acknowledged a write {after:?} after its only promising standby died (promises last {LEASE:?})"
    );
    drop(frozen);
    // Back: a primary again (node1: strict, its only sync standby gone), never two.
    sandbox
        .wait_for("a primary again", WAIT, |s| {
            !s.primary.is_empty() && node(s, &s.primary).health == "HEALTHY"
        })
        .await
        .unwrap();
    writers.assert_took_turns();
}

/// Whether a new connection through the router's read-write port is let through to a
/// primary that takes a write; Err: the message it was refused with.
async fn write_through_router(rw: &str) -> Result<(), String> {
    let (host, port) = rw.rsplit_once(':').unwrap();
    let conninfo = format!("host={host} port={port} user=postgres dbname=postgres connect_timeout=3");
    let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .map_err(|e| e.as_db_error().map_or(e.to_string(), |d| d.message().to_string()))?;
    tokio::spawn(conn);
    client
        .batch_execute("SET synchronous_commit = local; INSERT INTO w DEFAULT VALUES")
        .await
        .map_err(|e| e.to_string())
}

/// Issue 12: a router whose map no coordinator vouches for (every coordinator frozen)
/// keeps routing writes to the primary, which writes on promises, until
/// `stop_writes_after_ms` (Stolon's proxy rule), then refuses new read-write
/// connections saying why, and routes them again once the coordinators are back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_without_coordinators_stops_routing_writes_after_its_limit_and_resumes() {
    let mut sandbox = pgquorum_tests::start_sandbox_with(27500, 27510, |s| {
        s.router_stop_writes_after = Duration::from_secs(4)
    })
    .await;
    sandbox
        .wait_for("all healthy", WAIT, |s| {
            s.nodes.iter().all(|n| n.health == "HEALTHY")
        })
        .await
        .unwrap();
    pgquorum_tests::create_writes_table(&sandbox).await;
    let (rw, _) = sandbox.router_addrs().unwrap();
    write_through_router(&rw).await.unwrap();
    let pids = sandbox.coordinators().pids();
    let frozen_at = Instant::now();
    let frozen = ThawOnDrop::freeze(pids);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    write_through_router(&rw)
        .await
        .expect("writes still routed while the map is recent");
    // Until the gate closes (other errors, e.g. a write the primary refused, are
    // not the router's doing and are retried).
    let mut last = Ok(());
    while frozen_at.elapsed() < Duration::from_secs(12) {
        last = write_through_router(&rw).await;
        if last.as_ref().is_err_and(|why| why.contains("not routing writes")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        last.as_ref().is_err_and(|why| why.contains("not routing writes")),
        "12 s into the outage (limit 4 s) the router should refuse writes saying why; last: {last:?}"
    );
    drop(frozen);
    eventually("writes routed again", WAIT, || async {
        write_through_router(&rw).await.is_ok()
    })
    .await;
}
