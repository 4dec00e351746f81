//! Leases against frozen and killed coordinators (issue 10): a frozen follower costs
//! the primary nothing; with every coordinator frozen the primary stops within its
//! lease; a new Raft leader never promotes before the old primary's lease has ended.
//! Bounds asserted here are safety bounds (the latest a write may be acknowledged, the
//! earliest a promotion may happen), which a slow machine cannot make fail.

use std::time::{Duration, Instant};

use pgquorum::launch::Sandbox;
use pgquorum_tests::{
    create_writes_table, eventually, node_status as node, set_policy, start_sandbox, ThawOnDrop, TimedWriter,
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

fn guard_fenced(sandbox: &Sandbox, name: &str) -> bool {
    std::fs::read_to_string(sandbox.path_of_guard_log(name)).is_ok_and(|log| log.contains("fence"))
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
    assert!(!guard_fenced(&sandbox, "node1"), "the guard never fenced");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        writer.acks().len() > acks_while_frozen,
        "node1 still takes writes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_coordinator_frozen_the_primary_stops_within_its_lease() {
    let mut sandbox = start_sandbox(26200, 26210).await;
    let writer = writing_on_node1(&sandbox).await;
    let lease = Duration::from_millis(1000);

    let pids = sandbox
        .coordinators()
        .ids()
        .into_iter()
        .filter_map(|id| sandbox.coordinators().pid(id))
        .map(|p| p as i32)
        .collect();
    let frozen_at = Instant::now();
    let frozen = ThawOnDrop::freeze(pids);
    eventually("node1's Postgres stopped by its guard", WAIT, || async {
        sandbox.postmaster_pid("node1").is_none()
    })
    .await;
    // The last grant came before the freeze, so the lease ended by frozen_at + lease;
    // the slack covers the kill taking effect and the client noting the ack.
    let last = *writer.acks().last().unwrap();
    let after = last.saturating_duration_since(frozen_at);
    assert!(
        after < lease + Duration::from_millis(300),
        "node1 acknowledged a write {after:?} after the coordinators froze (lease {lease:?})"
    );
    assert!(guard_fenced(&sandbox, "node1"));
    drop(frozen);

    // The coordinators back, the cluster has a writable primary again.
    sandbox
        .wait_for("a primary again", WAIT, |s| {
            !s.primary.is_empty() && node(s, &s.primary).health == "HEALTHY"
        })
        .await
        .unwrap();
}

/// Issue 10, case 4: a long lease, the primary host frozen, the Raft leader killed
/// 2.5 s later. The new leader must wait out the old primary's lease, counted from its
/// own election, not from when its process started. Writers with
/// `synchronous_commit = local` on every node from before the freeze: thawed after the
/// promotion, the old primary must not acknowledge anything sent after the freeze.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_waits_out_the_old_primary_s_lease_from_its_own_election() {
    let mut sandbox = start_sandbox(26300, 26310).await;
    set_policy(&sandbox.client(), "main", "lease_ms", "8000").await;
    let lease = Duration::from_millis(8000);
    let old = writing_on_node1(&sandbox).await;
    let new = TimedWriter::start(&sandbox, "node2", "w", true, Duration::from_secs(120)).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // a grant of the long lease

    let frozen_at = Instant::now();
    let frozen = ThawOnDrop::freeze(sandbox.host_pids("node1").unwrap());
    let all_frozen_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let leader = sandbox.coordinators().wait_for_leader(WAIT).await.unwrap();
    sandbox.coordinators().kill(leader).unwrap();

    sandbox
        .wait_for("node2 promoted", Duration::from_secs(60), |s| {
            s.primary == "node2" && s.epoch == 2 && node(s, "node2").role == "primary"
        })
        .await
        .unwrap();
    let promoted_after = frozen_at.elapsed();
    // The last grant to node1 came at most one heartbeat before the freeze.
    assert!(
        promoted_after >= lease - Duration::from_millis(100),
        "node2 was promoted {promoted_after:?} after node1 froze, inside node1's lease of {lease:?}"
    );
    eventually("the new primary's writer writing", WAIT, || async {
        !new.acks().is_empty()
    })
    .await;
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
    let first_new = new.first().unwrap();
    let late = old.acked_since(first_new.sent);
    eprintln!("acknowledged by the thawed old primary: {late:?} (frozen by {all_frozen_at:?}, thawed at {thawed_at:?})");
    assert!(
        late.len() <= 1 && late.iter().all(|a| a.sent < all_frozen_at),
        "the old primary acknowledged writes sent after its host froze, after the new \
         primary's first write: {late:?}"
    );
    assert_eq!(
        sandbox.postmaster_pid("node1"),
        None,
        "the guard fenced it on thawing"
    );
}
