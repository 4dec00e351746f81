//! Network faults on a sandbox whose coordinators and nodes each have a network of
//! their own (namespaces on a private bridge, cut with nftables; see
//! `pgquorum::launch::Network`). Needs root, as CI runs. Each test has its own ports,
//! network and directory.

use std::time::{Duration, Instant};

use pgquorum_tests::{
    create_writes_table, eventually, node_status as node, pg, set_policy, start_sandbox_with,
    wait_new_primary, TimedWriter, WritersOnEveryNode,
};

const WAIT: Duration = Duration::from_secs(30);

/// Who the primary (node1) loses: everyone, or the coordinators only (it still
/// streams to its standbys).
#[derive(Clone, Copy, PartialEq)]
enum Cut {
    Everyone,
    CoordinatorsOnly,
}

/// Issue 10, case 1 (and issue 11's "primary isolated from the coordinators only"):
/// the primary's host is cut off; its clients still reach it. Writers with
/// `synchronous_commit = local` run on every node from before the cut (on the
/// standbys they are refused until one is promoted): the old primary's last
/// acknowledged write must come before the first write the new primary acknowledges
/// was sent, and no third node ever acknowledges. After the cut heals, the old
/// primary rejoins as a standby of the new one.
async fn primary_cut_off(coordinator_base: u16, postgres_base: u16, sync_mode: &str, cut: Cut) {
    let mut sandbox = start_sandbox_with(coordinator_base, postgres_base, |s| s.network = true).await;
    set_policy(&sandbox.client(), "main", "sync_mode", sync_mode).await;
    let writers = WritersOnEveryNode::start(&sandbox, "node1", Duration::from_secs(90)).await;
    let old = writers.on("node1");

    let cut_at = Instant::now();
    let net = sandbox.network().unwrap();
    match cut {
        Cut::Everyone => net.isolate("node1").unwrap(),
        Cut::CoordinatorsOnly => net.cut("node1", &["coord1", "coord2", "coord3"]).unwrap(),
    }
    let promoted = wait_new_primary(&sandbox, "node1", 2, WAIT).await;
    writers.wait_writing(&promoted).await;
    let new = writers.on(&promoted);
    // Time for an old primary that was never fenced to show it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (last_old, first_new) = (old.last().unwrap(), new.first().unwrap());
    eprintln!(
        "cut → old primary's last ack {:?}, {promoted}'s first acknowledged write sent {:?}",
        last_old.acked.duration_since(cut_at),
        first_new.sent.duration_since(cut_at),
    );
    assert!(
        last_old.acked > cut_at,
        "the old primary's clients still reach it after the cut, and it acknowledges until its lease ends"
    );
    writers.assert_one_primary_at_a_time("node1", &promoted);
    assert_eq!(
        sandbox.postmaster_pid("node1"),
        None,
        "the cut-off primary's Postgres was stopped at its lease's end"
    );
    if cut == Cut::CoordinatorsOnly {
        // Issue 12: it asked its standbys for failsafe promises, and they refused:
        // they still reach a coordinator leader.
        let log = std::fs::read_to_string(sandbox.path_of_agent_log("node1")).unwrap_or_default();
        assert!(
            log.contains("reaches a coordinator leader"),
            "node1's standbys refused it a failsafe promise because they reach a leader"
        );
    }

    sandbox.network().unwrap().heal_all().unwrap();
    let s = sandbox
        .wait_for("node1 back as a standby", WAIT, |s| {
            let n = node(s, "node1");
            n.role == "standby" && n.health == "HEALTHY" && !s.primary.is_empty()
        })
        .await
        .unwrap();
    // A heal costs no second failover. (Runs on a busy machine once saw one: Raft store
    // syncs and heartbeats stalled on the shared disk and CPU; docs/faults.md.)
    assert_eq!(
        (s.primary.as_str(), s.epoch),
        (promoted.as_str(), 2),
        "one failover, none after the heal"
    );
    writers.assert_took_turns();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_cut_off_stops_acknowledging_before_the_new_one_starts_strict() {
    primary_cut_off(26400, 26410, "strict", Cut::Everyone).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_cut_off_stops_acknowledging_before_the_new_one_starts_prefer() {
    primary_cut_off(26500, 26510, "prefer", Cut::Everyone).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_cut_from_the_coordinators_only_is_fenced_before_a_standby_takes_over() {
    primary_cut_off(26600, 26610, "strict", Cut::CoordinatorsOnly).await;
}

/// Issue 11: a flapping link. The primary's host loses every link for 300 ms at a
/// time, well under `failure_timeout_ms` (1 s) and the lease, five times: no failover,
/// no fence, and an ordinary (synchronous) writer loses nothing it was told was
/// committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blips_shorter_than_the_failure_timeout_cost_no_failover() {
    let mut sandbox = start_sandbox_with(26700, 26710, |s| s.network = true).await;
    create_writes_table(&sandbox).await;
    let writer = TimedWriter::start(&sandbox, "node1", "w", false, Duration::from_secs(60)).unwrap();
    eventually("the writer writing", WAIT, || async { !writer.acks().is_empty() }).await;
    let postmaster = sandbox.postmaster_pid("node1");
    for _ in 0..5 {
        sandbox.network().unwrap().isolate("node1").unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        sandbox.network().unwrap().heal_all().unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    // Long enough for a failover the blips caused to show.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = sandbox.status().await.unwrap();
    assert_eq!(
        (status.epoch, status.primary.as_str()),
        (1, "node1"),
        "no failover"
    );
    assert_eq!(sandbox.postmaster_pid("node1"), postmaster, "never fenced");
    let before = writer.acks().len();
    eventually("the writer writing after the blips", WAIT, || async {
        writer.acks().len() > before
    })
    .await;
    drop(writer);
    let acked = writer_count(&sandbox).await;
    assert!(
        acked >= before as i64,
        "{before} acknowledged, {acked} rows on the primary"
    );
}

async fn writer_count(sandbox: &pgquorum::launch::Sandbox) -> i64 {
    pg(sandbox, "node1")
        .await
        .query_one("SELECT count(*) FROM w", &[])
        .await
        .unwrap()
        .get(0)
}

/// The test bed itself: a network id in use or a subnet already routed is refused
/// (never taking over another test's network), everything goes when dropped, and what
/// a killed run left is removed by the next network created.
#[test]
fn test_networks_never_collide_and_leave_nothing_behind() {
    use pgquorum::launch::Network;
    let exists = |ns: &str| std::path::Path::new("/run/netns").join(ns).exists();
    let mut net = Network::create(27000).unwrap();
    net.add_host("a").unwrap();
    let again = Network::create(27000)
        .err()
        .expect("the same id twice")
        .to_string();
    assert!(again.contains("in use"), "{again}");
    assert!(exists("pq27000-a"), "the refused second network removed nothing");
    let same_subnet = Network::create(27050).err().expect("the same /24").to_string();
    assert!(same_subnet.contains("already routed"), "{same_subnet}");
    drop(net);
    assert!(!exists("pq27000-a") && !exists("pq27000-sw"));

    // A run killed before its cleanup: its owner (a process that has exited) is gone.
    let mut dead = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    std::fs::create_dir_all("/run/pgquorum-net").unwrap();
    std::fs::write("/run/pgquorum-net/pq27100", dead_pid.to_string()).unwrap();
    let status = std::process::Command::new("ip")
        .args(["netns", "add", "pq27100-sw"])
        .status()
        .unwrap();
    assert!(status.success());
    let net = Network::create(27200).unwrap();
    assert!(!exists("pq27100-sw"), "a dead owner's leftovers are removed");
    drop(net);
}
