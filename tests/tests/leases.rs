//! Leases against frozen and killed coordinators (issue 10): a frozen follower costs
//! the primary nothing; with every coordinator frozen and no standby able to promise
//! (the failsafe, `failsafe.rs`) the primary stops within its lease; a new Raft leader
//! never promotes before the old primary's lease has ended.
//! Bounds asserted here are safety bounds (the latest a write may be acknowledged, the
//! earliest a promotion may happen), which a slow machine cannot make fail.

use std::time::{Duration, Instant};

use pgquorum::launch::Sandbox;
use pgquorum_tests::{
    create_writes_table, eventually, node_status as node, set_policy, start_sandbox, wait_new_primary,
    ThawOnDrop, TimedWriter, WritersOnEveryNode,
};

const WAIT: Duration = Duration::from_secs(30);

async fn writing_on_node1(sandbox: &Sandbox) -> TimedWriter {
    create_writes_table(sandbox).await;
    let writer = TimedWriter::start(sandbox, "node1", "w", true, Duration::from_secs(120)).unwrap();
    eventually("node1's writer writing", WAIT, || async {
        !writer.acks().is_empty()
    })
    .await;
    writer
}

/// Whether the node's lease was enforced: by its guard, or by its agent's lease timer
/// (both fire at the deadline; whichever kills first, the other finds nothing to do).
fn fenced_by_lease(sandbox: &Sandbox, name: &str) -> bool {
    [sandbox.path_of_guard_log(name), sandbox.path_of_agent_log(name)]
        .into_iter()
        .any(|log| std::fs::read_to_string(log).is_ok_and(|log| log.contains("fence")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_follower_coordinator_first_in_every_agent_s_list_costs_the_primary_nothing() {
    let mut sandbox = start_sandbox(26100, 26110).await;
    // Coordinator 1 is first in every agent's list; make sure it is a follower.
    // While it leads: stop it until another is elected, then bring it back (it can
    // win again: an election it starts on returning may elect it).
    let group = sandbox.coordinators();
    let mut tries = 0;
    while group.wait_for_leader(WAIT).await.unwrap() == 1 {
        tries += 1;
        assert!(tries <= 5, "coordinator 1 keeps winning the election");
        group.kill(1).unwrap();
        group.wait_for_leader(WAIT).await.unwrap();
        group.start_node(1).unwrap();
        group.wait_applied(1, 1, WAIT).await.unwrap();
    }
    sandbox
        .wait_for("all healthy", WAIT, |s| {
            s.nodes.iter().all(|n| n.health == "HEALTHY")
        })
        .await
        .unwrap();
    let postmaster = sandbox.postmaster_pid("node1").unwrap();
    let writer = writing_on_node1(&sandbox).await;

    let pid = sandbox.coordinators().pid(1).unwrap() as i32;
    let frozen = ThawOnDrop::freeze(vec![pid]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let acks_while_frozen = writer.acks().len();
    drop(frozen);

    let s = sandbox.status().await.unwrap();
    assert_eq!((s.epoch, s.primary.as_str()), (1, "node1"), "no failover");
    assert_eq!(sandbox.postmaster_pid("node1"), Some(postmaster), "not fenced");
    assert!(!fenced_by_lease(&sandbox, "node1"), "never fenced");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        writer.acks().len() > acks_while_frozen,
        "node1 still takes writes"
    );
}

/// Issue 10, case 2: every coordinator frozen, and (since the failsafe of issue 12
/// would otherwise keep the primary writing on its standbys' promises) the standbys'
/// agents too: no promise can be had. The primary stops within its lease; once they
/// thaw there is a primary again, and (writers with `synchronous_commit = local` on
/// every node) never two at a time.
async fn every_coordinator_frozen(coordinator_base: u16, postgres_base: u16, sync_mode: &str) {
    let mut sandbox = start_sandbox(coordinator_base, postgres_base).await;
    set_policy(&sandbox.client(), "main", "sync_mode", sync_mode).await;
    let writers = WritersOnEveryNode::start(&sandbox, "node1", Duration::from_secs(120)).await;
    let lease = Duration::from_millis(1000);

    let mut pids = sandbox.coordinators().pids();
    pids.extend(["node2", "node3"].iter().filter_map(|n| sandbox.agent_pid(n)));
    let frozen_at = Instant::now();
    let frozen = ThawOnDrop::freeze(pids);
    eventually("node1's Postgres stopped by its guard", WAIT, || async {
        sandbox.postmaster_pid("node1").is_none()
    })
    .await;
    // The last grant came before the freeze, so the lease ended by frozen_at + lease;
    // the slack covers the kill taking effect and the client noting the ack.
    let last = writers.on("node1").last().unwrap().acked;
    let after = last.saturating_duration_since(frozen_at);
    assert!(
        after < lease + Duration::from_millis(300),
        "node1 acknowledged a write {after:?} after the coordinators froze (lease {lease:?})"
    );
    assert!(fenced_by_lease(&sandbox, "node1"), "stopped by its lease");
    let thawed_at = Instant::now();
    drop(frozen);

    // The coordinators back, the cluster has a writable primary again: node1 restarted
    // or another promoted, one at a time.
    let primary = sandbox
        .wait_for("a primary again", WAIT, |s| {
            !s.primary.is_empty() && node(s, &s.primary).health == "HEALTHY"
        })
        .await
        .unwrap()
        .primary;
    writers.wait_writing(&primary).await;
    if primary == "node1" {
        let again = writers.on("node1").acked_since(thawed_at);
        assert!(!again.is_empty(), "node1 writes again");
        writers.assert_only_acknowledged_by(&["node1"]);
    } else {
        writers.assert_one_primary_at_a_time("node1", &primary);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_coordinator_and_every_standby_agent_frozen_the_primary_stops_within_its_lease_strict() {
    every_coordinator_frozen(26200, 26210, "strict").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_coordinator_and_every_standby_agent_frozen_the_primary_stops_within_its_lease_prefer() {
    every_coordinator_frozen(28000, 28010, "prefer").await;
}

/// Issue 10, case 4: a long lease, the primary host frozen, the Raft leader killed
/// 2.5 s later. The new leader must wait out the old primary's lease, counted from its
/// own election, not from when its process started. Writers with
/// `synchronous_commit = local` on every node from before the freeze: thawed after the
/// promotion, the old primary must not acknowledge anything sent after the freeze.
async fn new_leader_waits_out_the_lease(coordinator_base: u16, postgres_base: u16, sync_mode: &str) {
    let mut sandbox = start_sandbox(coordinator_base, postgres_base).await;
    set_policy(&sandbox.client(), "main", "sync_mode", sync_mode).await;
    set_policy(&sandbox.client(), "main", "lease_ms", "8000").await;
    let lease = Duration::from_millis(8000);
    let writers = WritersOnEveryNode::start(&sandbox, "node1", Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // a grant of the long lease

    let old_postmaster = sandbox.postmaster_pid("node1");
    assert!(old_postmaster.is_some());
    let frozen_at = Instant::now();
    let frozen = ThawOnDrop::freeze(sandbox.host_pids("node1").unwrap());
    let all_frozen_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let leader = sandbox.coordinators().wait_for_leader(WAIT).await.unwrap();
    sandbox.coordinators().kill(leader).unwrap();

    let promoted = wait_new_primary(&sandbox, "node1", 2, Duration::from_secs(60)).await;
    let promoted_after = frozen_at.elapsed();
    // The last grant to node1 came at most one heartbeat before the freeze.
    assert!(
        promoted_after >= lease - Duration::from_millis(100),
        "{promoted} was promoted {promoted_after:?} after node1 froze, inside node1's lease of {lease:?}"
    );
    writers.wait_writing(&promoted).await;
    let thawed_at = Instant::now();
    drop(frozen);
    // Time for a thawed old primary to acknowledge what its clients still send.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The whole host was frozen, its guard too: on thawing, its backends run as early
    // as the guard, and only the commit-time check inside Postgres stops them from
    // answering. What it cannot stop is a reply to a write that was past that check
    // when the host froze (a reply delayed, as by the network): so every write the old
    // primary acknowledged after the new primary's first was sent before the freeze,
    // at most one per connection (one writer here).
    let first_new = writers.on(&promoted).first().unwrap();
    let late = writers.on("node1").acked_since(first_new.sent);
    eprintln!("acknowledged by the thawed old primary: {late:?} (frozen by {all_frozen_at:?}, thawed at {thawed_at:?})");
    assert!(
        late.len() <= 1 && late.iter().all(|a| a.sent < all_frozen_at),
        "the old primary acknowledged writes sent after its host froze, after the new \
         primary's first write: {late:?}"
    );
    writers.assert_only_acknowledged_by(&["node1", &promoted]);
    // Its agent, thawed too, may already have brought it back as a standby (a fresh run
    // saw pg_rewind and a new postmaster within the 2 s): the old server must be gone.
    assert_ne!(
        sandbox.postmaster_pid("node1"),
        old_postmaster,
        "the old primary's server was fenced on thawing"
    );
    assert!(
        fenced_by_lease(&sandbox, "node1"),
        "fenced by its guard or its agent's lease timer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_waits_out_the_old_primary_s_lease_from_its_own_election_strict() {
    new_leader_waits_out_the_lease(26300, 26310, "strict").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_waits_out_the_old_primary_s_lease_from_its_own_election_prefer() {
    new_leader_waits_out_the_lease(28100, 28110, "prefer").await;
}

/// A lease lowered by policy (8 s to 1 s), then the primary host frozen and the Raft
/// leader killed at once: grants of 8 s from before the lowering may still run, so the
/// new leader waits them out (`lease_ms_settling`), counted from its election, and
/// then records the lowering as settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_lease_still_waits_out_the_longer_grants_across_a_leader_change() {
    let mut sandbox = start_sandbox(28200, 28210).await;
    set_policy(&sandbox.client(), "main", "lease_ms", "8000").await;
    let writers = WritersOnEveryNode::start(&sandbox, "node1", Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // a grant of the long lease
    let lowered_at = Instant::now();
    set_policy(&sandbox.client(), "main", "lease_ms", "1000").await;

    let frozen = ThawOnDrop::freeze(sandbox.host_pids("node1").unwrap());
    let all_frozen_at = Instant::now();
    let leader = sandbox.coordinators().wait_for_leader(WAIT).await.unwrap();
    sandbox.coordinators().kill(leader).unwrap();

    let promoted = wait_new_primary(&sandbox, "node1", 2, Duration::from_secs(60)).await;
    let promoted_after = lowered_at.elapsed();
    // The last 8 s grant was asked for at most a heartbeat before the lowering.
    assert!(
        promoted_after >= Duration::from_millis(8000 - 100),
        "{promoted} was promoted {promoted_after:?} after the lease was lowered, inside an 8 s grant"
    );
    writers.wait_writing(&promoted).await;
    drop(frozen);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let first_new = writers.on(&promoted).first().unwrap();
    let late = writers.on("node1").acked_since(first_new.sent);
    assert!(
        late.len() <= 1 && late.iter().all(|a| a.sent < all_frozen_at),
        "the old primary acknowledged writes sent after its host froze: {late:?}"
    );
    writers.assert_only_acknowledged_by(&["node1", &promoted]);
    sandbox.coordinators().start_node(leader).unwrap();

    // Settled: the new leader clears lease_ms_settling once it has led, granting only
    // 1 s, for 8 s and the margin; from then on only its own grants count (when the
    // next failover may start is unit-tested in failover/decide.rs and
    // observe/reports.rs).
    eventually("the lowering settled", WAIT, || async {
        sandbox
            .cluster_state()
            .await
            .is_ok_and(|c| c.history.iter().any(|e| e.kind == "lease_settled"))
    })
    .await;
}
