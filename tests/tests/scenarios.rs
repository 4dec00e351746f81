//! Fault scenarios on a sandbox whose coordinators and nodes each have a network of
//! their own (issue 11), judged like Jepsen by their outcome ([`Checker`]): a
//! `synchronous_commit = local` writer on every node and a writer through the router
//! run across the fault; after healing, no write acknowledged through the router is
//! lost, no two nodes acknowledged writes at overlapping times, the published maps
//! never went back an epoch nor named two primaries in one, and every node ends
//! healthy on the primary's timeline. Needs root, as CI runs.

use std::time::Duration;

use pgquorum::check::{settled, Checker, Verdict};
use pgquorum::launch::{coordinator_host, Sandbox, SandboxSpec};
use pgquorum_tests::{set_policy, start_sandbox_with, wait_new_primary, InTempDir};

const WAIT: Duration = Duration::from_secs(30);

/// One scenario at a time: each runs nine processes and three Postgres servers, and
/// two at once on two cores stretch Raft elections past what the lease allows (the
/// tests of the other files run while this file does not).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A sandbox on its own network, in `sync_mode`, with the checking clients running;
/// and this scenario's turn.
async fn begin(
    coordinator_base: u16,
    postgres_base: u16,
    sync_mode: &str,
) -> (tokio::sync::MutexGuard<'static, ()>, InTempDir<Sandbox>, Checker) {
    begin_with(coordinator_base, postgres_base, sync_mode, |_| {}).await
}

/// [`begin`] with the sandbox's spec adjusted by `spec` (e.g. five coordinators).
async fn begin_with(
    coordinator_base: u16,
    postgres_base: u16,
    sync_mode: &str,
    spec: impl FnOnce(&mut SandboxSpec),
) -> (tokio::sync::MutexGuard<'static, ()>, InTempDir<Sandbox>, Checker) {
    let turn = ONE_AT_A_TIME.lock().await;
    let sandbox = start_sandbox_with(coordinator_base, postgres_base, |s| {
        s.network = true;
        spec(s);
    })
    .await;
    set_policy(&sandbox.client(), "main", "sync_mode", sync_mode).await;
    let checker = Checker::start(&sandbox, "checked", Duration::from_secs(180))
        .await
        .unwrap();
    // The turn is dropped last, after the sandbox is gone.
    (turn, sandbox, checker)
}

/// Heals every fault, waits until every node is back and healthy, and judges the run;
/// panics with every broken rule.
async fn end(name: &str, sandbox: &mut Sandbox, checker: &Checker) -> Verdict {
    sandbox.network().unwrap().heal_all().unwrap();
    let back = settled;
    if let Err(e) = sandbox
        .wait_for(
            "every node healthy under one primary",
            Duration::from_secs(90),
            back,
        )
        .await
    {
        sandbox.print_logs();
        panic!("{name}: {e}");
    }
    // The writers' last words after the heal.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let status = sandbox.wait_for("still so", WAIT, back).await.unwrap();
    let verdict = checker.verdict(sandbox, &status).await.unwrap();
    for e in sandbox.cluster_state().await.unwrap().history {
        if e.kind.starts_with("failover") || e.kind == "candidate_chosen" {
            eprintln!("  {name}: epoch {} {}: {}", e.epoch, e.kind, e.detail);
        }
    }
    eprintln!(
        "scenario {name}: primaries {:?}, {} writes acknowledged, {} lost, {} overlaps",
        verdict.primaries,
        verdict.acked_writes,
        verdict.lost_acked_writes.len(),
        verdict.split_brain.len()
    );
    let problems = verdict.problems();
    assert!(problems.is_empty(), "{name}: {problems:#?}");
    verdict
}

/// node1 as it was before a fault: its postmaster, and how many fence lines its guard
/// and its agent had logged (a start on a busy machine may have had one: the first
/// primary's initdb can outlast its bootstrap lease).
struct Node1Before {
    postmaster: Option<i32>,
    fences: (usize, usize),
}

/// How many lines of node1's guard's and agent's logs tell of a fence.
fn node1_fences(sandbox: &Sandbox) -> (usize, usize) {
    let count = |p: std::path::PathBuf| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("fence"))
            .count()
    };
    (
        count(sandbox.path_of_guard_log("node1")),
        count(sandbox.path_of_agent_log("node1")),
    )
}

impl Node1Before {
    fn take(sandbox: &Sandbox) -> Node1Before {
        Node1Before {
            postmaster: sandbox.postmaster_pid("node1"),
            fences: node1_fences(sandbox),
        }
    }
}

/// Panics unless node1 kept its lease throughout: the same postmaster, neither its
/// guard nor its agent's lease timer fenced since `before`, still epoch 1.
fn assert_kept_its_lease(sandbox: &Sandbox, before: &Node1Before, verdict: &Verdict) {
    let (guard, agent) = node1_fences(sandbox);
    assert_eq!(guard, before.fences.0, "the guard fenced node1");
    assert_eq!(agent, before.fences.1, "node1's agent fenced it");
    assert_eq!(
        sandbox.postmaster_pid("node1"),
        before.postmaster,
        "node1's Postgres was restarted"
    );
    assert_eq!(verdict.primaries, vec!["node1"], "no failover");
}

/// The primary loses its standbys but not the coordinators: it stays the primary (its
/// clients and the coordinators reach it; in strict mode synchronous commits wait),
/// and no standby takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_cut_from_its_standbys_only_stays_the_only_primary() {
    let (_turn, mut sandbox, checker) = begin(28600, 28610, "strict").await;
    let before = Node1Before::take(&sandbox);
    sandbox
        .network()
        .unwrap()
        .cut("node1", &["node2", "node3"])
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let acks_before = checker.on("node1").unwrap().all().len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        checker.on("node1").unwrap().all().len() > acks_before,
        "node1 still acknowledges local commits"
    );
    let verdict = end("primary cut from its standbys", &mut sandbox, &checker).await;
    assert_kept_its_lease(&sandbox, &before, &verdict);
}

/// The Raft leader cut off alone: the others elect a new one, which renews the
/// primary's lease in time. No fence, no failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_raft_leader_costs_the_primary_nothing() {
    let (_turn, mut sandbox, checker) = begin(28700, 28710, "strict").await;
    let before = Node1Before::take(&sandbox);
    let leader = sandbox.coordinators().wait_for_leader(WAIT).await.unwrap();
    sandbox
        .network()
        .unwrap()
        .isolate(&coordinator_host(leader))
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let verdict = end("raft leader isolated", &mut sandbox, &checker).await;
    assert_kept_its_lease(&sandbox, &before, &verdict);
}

/// The Raft leader and the primary cut off together from the rest: the old leader
/// cannot renew the lease (no quorum), the majority elects a leader that waits the
/// lease out and promotes a standby; one primary at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_raft_leader_and_the_primary_cut_off_together_fail_over_once() {
    let (_turn, mut sandbox, checker) = begin(28800, 28810, "strict").await;
    let leader = sandbox.coordinators().wait_for_leader(WAIT).await.unwrap();
    let leader_host = coordinator_host(leader);
    sandbox
        .network()
        .unwrap()
        .split_off(&[leader_host.as_str(), "node1"])
        .unwrap();
    fails_over_once("raft leader and primary cut off", &mut sandbox, &checker, |_| {}).await;
}

/// Only the primary's outgoing packets to the coordinators are lost (it still hears
/// them): its heartbeats never arrive, so it is fenced by its lease and replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_whose_heartbeats_are_lost_one_way_is_replaced_once() {
    let (_turn, mut sandbox, checker) = begin(28900, 28910, "prefer").await;
    sandbox
        .network()
        .unwrap()
        .drop_outgoing("node1", &["coord1", "coord2", "coord3"])
        .unwrap();
    fails_over_once("one-way loss from the primary", &mut sandbox, &checker, |_| {}).await;
}

/// The primary's host and the Raft leader killed together: the new leader waits out
/// the lease from its election, then promotes; the killed ones come back and follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_and_the_raft_leader_lost_together_fail_over_once() {
    let (_turn, mut sandbox, checker) = begin(29000, 29010, "strict").await;
    let leader = sandbox.coordinators().wait_for_leader(WAIT).await.unwrap();
    sandbox.kill_host("node1").unwrap();
    sandbox.coordinators().kill(leader).unwrap();
    fails_over_once("primary and raft leader killed", &mut sandbox, &checker, |s| {
        s.coordinators().start_node(leader).unwrap();
        s.start_agent("node1").unwrap();
    })
    .await;
}

/// A coordinator minority (one of three, a follower) killed while a failover is under
/// way: the failover completes, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_during_a_failover_leaves_one_promotion() {
    let (_turn, mut sandbox, checker) = begin(29100, 29110, "strict").await;
    sandbox.kill_host("node1").unwrap();
    sandbox
        .wait_for("the failover started", WAIT, |s| s.epoch == 2)
        .await
        .unwrap();
    let leader = sandbox.coordinators().wait_for_leader(WAIT).await.unwrap();
    let follower = sandbox
        .coordinators()
        .ids()
        .into_iter()
        .find(|id| *id != leader)
        .unwrap();
    sandbox.coordinators().kill(follower).unwrap();
    fails_over_once("coordinator killed mid-failover", &mut sandbox, &checker, |s| {
        s.coordinators().start_node(follower).unwrap();
        s.start_agent("node1").unwrap();
    })
    .await;
}

/// A region split 3 | 2 on a sandbox with five coordinators: `minority` and
/// `majority` are the hosts on each side (coordinators `coordN`, nodes `nodeN`).
fn split_regions(sandbox: &mut Sandbox, minority: &[&str], majority: &[&str]) {
    let net = sandbox.network().unwrap();
    let mut all: Vec<&str> = minority.iter().chain(majority).copied().collect();
    all.sort();
    let mut hosts = net.host_names();
    hosts.sort();
    assert_eq!(all, hosts, "every host on one side");
    net.split(minority, majority).unwrap();
}

/// Region split 3 | 2, the primary on the minority side (the primary region with two
/// of five coordinators, cut from the DR region's three and the standbys): the
/// minority cannot renew its lease, so node1 stops taking writes before the majority,
/// which waits the lease out, promotes node2; one primary at a time, nothing lost.
/// This is also the 2 + 2 + 1 placement losing its primary region (coordinators 1
/// and 2 and the primary cut off; the DR region's two and the tiebreaker, 3 of 5,
/// fail over by themselves).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_split_with_the_primary_in_the_minority_fails_over_once() {
    let (_turn, mut sandbox, checker) = begin_with(29200, 29210, "strict", |s| s.coordinators = 5).await;
    split_regions(
        &mut sandbox,
        &["coord1", "coord2", "node1"],
        &["coord3", "coord4", "coord5", "node2", "node3"],
    );
    fails_over_once(
        "region split, primary in the minority",
        &mut sandbox,
        &checker,
        |_| {},
    )
    .await;
}

/// Region split 3 | 2, the primary on the majority side with its sync standby: it
/// keeps its lease and its postmaster, nobody fails over; the cut-off standby and the
/// two coordinators come back after the heal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_split_with_the_primary_in_the_majority_costs_nothing() {
    let (_turn, mut sandbox, checker) = begin_with(29300, 29310, "strict", |s| s.coordinators = 5).await;
    let before = Node1Before::take(&sandbox);
    split_regions(
        &mut sandbox,
        &["coord4", "coord5", "node3"],
        &["coord1", "coord2", "coord3", "node1", "node2"],
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let verdict = end("region split, primary in the majority", &mut sandbox, &checker).await;
    assert_kept_its_lease(&sandbox, &before, &verdict);
}

/// Expects exactly one failover away from node1: waits for the new primary and its
/// first write, lets `restore` bring back what the fault killed, heals, and judges.
async fn fails_over_once(
    name: &str,
    sandbox: &mut Sandbox,
    checker: &Checker,
    restore: impl FnOnce(&mut Sandbox),
) {
    let promoted = wait_new_primary(sandbox, "node1", 2, WAIT).await;
    checker_waits_for(checker, &promoted).await;
    restore(sandbox);
    let verdict = end(name, sandbox, checker).await;
    assert_eq!(verdict.primaries, vec!["node1".to_string(), promoted], "{name}");
}

/// Waits until the writer on `node` has written (a new primary took writes).
async fn checker_waits_for(checker: &Checker, node: &str) {
    let writer = checker.on(node).unwrap();
    pgquorum_tests::eventually(&format!("{node}'s writer writing"), WAIT, || async {
        writer.last().is_some()
    })
    .await;
}
