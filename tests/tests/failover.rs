//! Automatic failover with fencing, against real Postgres and real faults: kill -9 of
//! hosts, postmasters, agents and the Raft leader, frozen processes. Each test has
//! its own ports and directory.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use pgquorum::launch::Sandbox;
use pgquorum_client::pb;
use pgquorum_tests::{
    assert_no_overlap, cli, cli_json, create_writes_table, eventually, node_status as node, pg, read_cluster,
    set_policy, start_sandbox, try_pg, wait_new_primary, ThawOnDrop, TimedWriter, WritersOnEveryNode,
};

const WAIT: Duration = Duration::from_secs(30);

/// Whether a node's Postgres answers and is writable (not in recovery).
async fn writable(sandbox: &Sandbox, name: &str) -> Option<bool> {
    let client = try_pg(sandbox, name).await?;
    let row = tokio::time::timeout(
        Duration::from_secs(2),
        client.query_one("SELECT pg_is_in_recovery()", &[]),
    );
    row.await.ok()?.ok().map(|r| !r.get::<_, bool>(0))
}

/// The history events of the cluster, as (kind, detail).
async fn history(sandbox: &Sandbox) -> Vec<(String, String)> {
    read_cluster(&sandbox.client(), "main")
        .await
        .history
        .into_iter()
        .map(|e| (e.kind, e.detail))
        .collect()
}

/// Inserts sequential ids into `acked` on `node` until stopped; records each id whose
/// commit was acknowledged.
fn start_writer(sandbox: &Sandbox, node: &str) -> (Arc<Mutex<Vec<i64>>>, tokio::task::JoinHandle<()>) {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let conninfo = sandbox.conninfo(node).unwrap();
    let record = acked.clone();
    let task = tokio::spawn(async move {
        let Ok((client, conn)) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await else {
            return;
        };
        tokio::spawn(conn);
        for id in 1i64.. {
            match client.execute("INSERT INTO acked (id) VALUES ($1)", &[&id]).await {
                Ok(_) => record.lock().unwrap().push(id),
                Err(_) => return,
            }
        }
    });
    (acked, task)
}

async fn wait_promoted(sandbox: &Sandbox, to: &str, epoch: u64) -> pb::StatusReply {
    sandbox
        .wait_for(&format!("{to} primary of epoch {epoch}"), WAIT, |s| {
            s.primary == to && s.epoch == epoch && node(s, to).role == "primary"
        })
        .await
        .unwrap()
}

/// The operator's override to node3: refused without `--accept-data-loss` (returns
/// that refusal's message), then done with it; waits until node3 is a writable
/// primary of epoch 2.
async fn force_failover_to_node3(sandbox: &Sandbox) -> String {
    let addrs = sandbox.client().addrs().join(",");
    let out = cli(&["--coordinators", &addrs, "failover", "--to", "node3"]);
    assert_eq!(out.status.code(), Some(2));
    let refused = String::from_utf8_lossy(&out.stderr).into_owned();
    let forced = [
        "--coordinators",
        &addrs,
        "failover",
        "--to",
        "node3",
        "--accept-data-loss",
    ];
    let out = cli(&forced);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_promoted(sandbox, "node3", 2).await;
    assert_eq!(writable(sandbox, "node3").await, Some(true));
    refused
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_loss_promotes_the_sync_standby_without_losing_an_acknowledged_write() {
    let mut sandbox = start_sandbox(23200, 23210).await;
    pg(&sandbox, "node1")
        .await
        .batch_execute("CREATE TABLE acked (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    let (acked, writer) = start_writer(&sandbox, "node1");
    eventually("some acknowledged writes", WAIT, || async {
        acked.lock().unwrap().len() > 50
    })
    .await;

    // --- Host loss: agent and every Postgres process of the primary, kill -9.
    sandbox.kill_host("node1").unwrap();
    let status = wait_promoted(&sandbox, "node2", 2).await;
    let _ = writer.await;

    // --- The async standby follows the new primary; exactly one node is writable.
    sandbox
        .wait_for("node3 streaming from node2", WAIT, |s| {
            node(s, "node3").health == "HEALTHY"
        })
        .await
        .unwrap();
    assert_eq!(status.epoch, 2, "the epoch grew by one");
    assert_eq!(writable(&sandbox, "node1").await, None, "the old primary is down");
    assert_eq!(writable(&sandbox, "node2").await, Some(true));
    assert_eq!(writable(&sandbox, "node3").await, Some(false));

    // --- Every acknowledged id is on the new primary.
    let acked: Vec<i64> = acked.lock().unwrap().clone();
    let new_primary = pg(&sandbox, "node2").await;
    let present: Vec<i64> = new_primary
        .query("SELECT id FROM acked ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let lost: Vec<&i64> = acked
        .iter()
        .filter(|id| present.binary_search(id).is_err())
        .collect();
    assert!(lost.is_empty(), "{} acknowledged ids lost: {lost:?}", lost.len());

    // --- History records the failover with its reason and steps.
    let h = history(&sandbox).await;
    let done = h
        .iter()
        .find(|(k, _)| k == "failover_completed")
        .expect("a completed failover");
    assert!(
        done.1.contains("node1 -> node2") && done.1.contains("epoch 1 -> 2"),
        "{}",
        done.1
    );
    assert_eq!(h.iter().filter(|(k, _)| k == "failover_completed").count(), 1);
    let addrs = sandbox.client().addrs().join(",");
    let cli_history = cli_json(&["--coordinators", &addrs, "history"]);
    let events = cli_history["events"].as_array().unwrap();
    let done = events
        .iter()
        .find(|e| e["kind"] == "failover_completed")
        .expect("in `pgquorum history`");
    assert_eq!(done["epoch"], 2);
    let detail = done["detail"].as_str().unwrap();
    for needle in [
        "node1 -> node2",
        "LSN 0/",
        "fenced by",
        "promoted after",
        "total",
        "silent",
    ] {
        assert!(detail.contains(needle), "{needle:?} in {detail}");
    }

    // --- The old primary, restarted, rejoins as a standby and catches up.
    sandbox.start_agent("node1").unwrap();
    sandbox
        .wait_for("node1 HEALTHY standby", WAIT, |s| {
            node(s, "node1").role == "standby" && node(s, "node1").health == "HEALTHY"
        })
        .await
        .unwrap();
    new_primary
        .execute("INSERT INTO acked (id) VALUES (-1)", &[])
        .await
        .unwrap();
    eventually("node1 replays the new primary's writes", WAIT, || async {
        // A fresh connection each time: the agent may still restart its Postgres.
        let Some(old) = try_pg(&sandbox, "node1").await else {
            return false;
        };
        old.query_opt("SELECT 1 FROM acked WHERE id = -1", &[])
            .await
            .ok()
            .flatten()
            .is_some()
    })
    .await;
    assert_eq!(writable(&sandbox, "node1").await, Some(false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_postmaster_with_a_live_agent_takes_the_fast_path() {
    let sandbox = start_sandbox(23300, 23310).await;
    sandbox.kill_postgres("node1").unwrap();
    wait_promoted(&sandbox, "node2", 2).await;
    let h = history(&sandbox).await;
    let started = h.iter().find(|(k, _)| k == "failover_started").unwrap();
    assert!(started.1.contains("its agent confirms"), "{}", started.1);
    let chosen = h.iter().find(|(k, _)| k == "candidate_chosen").unwrap();
    assert!(
        chosen.1.contains("agent confirmed Postgres stopped"),
        "not waiting for the lease: {}",
        chosen.1
    );
    // The old primary's agent rejoins it as a standby on its own.
    sandbox
        .wait_for("node1 rejoined", WAIT, |s| {
            node(s, "node1").role == "standby" && node(s, "node1").health == "HEALTHY"
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_raft_leader_mid_failover_yields_exactly_one_promotion() {
    let mut sandbox = start_sandbox(23400, 23410).await;
    // A long lease keeps the failover waiting for the fence long enough to act.
    let addrs = sandbox.client().addrs().join(",");
    let out = cli(&["--coordinators", &addrs, "policy", "set", "main", "lease_ms=4000"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    sandbox.kill_host("node1").unwrap();
    let client = sandbox.client();
    eventually("the failover to start", WAIT, || async {
        read_cluster(&client, "main").await.failover.is_some()
    })
    .await;
    let leader = sandbox.coordinators().wait_for_leader(WAIT).await.unwrap();
    sandbox.coordinators().kill(leader).unwrap();

    let status = sandbox
        .wait_for("a new primary", Duration::from_secs(60), |s| {
            !s.primary.is_empty() && s.epoch == 2
        })
        .await
        .unwrap();
    let promoted = status.primary.clone();
    assert!(
        promoted == "node2",
        "strict mode promotes the sync standby, got {promoted}"
    );
    let h = history(&sandbox).await;
    assert_eq!(
        h.iter().filter(|(k, _)| k == "failover_started").count(),
        1,
        "{h:?}"
    );
    assert_eq!(
        h.iter().filter(|(k, _)| k == "failover_completed").count(),
        1,
        "{h:?}"
    );
    let mut writable_nodes = Vec::new();
    for name in ["node1", "node2", "node3"] {
        if writable(&sandbox, name).await == Some(true) {
            writable_nodes.push(name);
        }
    }
    assert_eq!(writable_nodes, [promoted.as_str()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_without_primary_and_sync_standby_waits_for_an_operator() {
    let mut sandbox = start_sandbox(23500, 23510).await;
    sandbox.kill_host("node2").unwrap();
    sandbox.kill_host("node1").unwrap();

    // --- No automatic promotion; a CRITICAL alert says why.
    eventually("a CRITICAL alert about the failed primary", WAIT, || async {
        sandbox.alerts().await.unwrap().alerts.iter().any(|a| {
            a.severity == "CRITICAL"
                && a.message.contains("no failover is possible")
                && a.message.contains("sync set")
        })
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = sandbox.status().await.unwrap();
    assert_eq!(
        (s.epoch, s.primary.as_str()),
        (1, "node1"),
        "no automatic promotion"
    );
    assert_eq!(writable(&sandbox, "node3").await, Some(false));

    // --- The operator's override: refused without accepting data loss, done with it.
    let refused = force_failover_to_node3(&sandbox).await;
    assert!(refused.contains("--accept-data-loss"), "{refused}");
    let h = history(&sandbox).await;
    assert!(
        h.iter()
            .any(|(k, d)| k == "manual_started" && d.contains("accepting data loss")),
        "{h:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_primary_is_replaced_only_after_its_lease_and_never_acknowledges_again() {
    let sandbox = start_sandbox(23600, 23610).await;
    pg(&sandbox, "node1")
        .await
        .batch_execute("CREATE TABLE acked (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    let old = pg(&sandbox, "node1").await;

    // --- Freeze the whole primary host: agent and every Postgres process.
    let frozen = ThawOnDrop::freeze(sandbox.host_pids("node1").unwrap());
    wait_promoted(&sandbox, "node2", 2).await;
    let h = history(&sandbox).await;
    let chosen = h.iter().find(|(k, _)| k == "candidate_chosen").unwrap();
    assert!(
        chosen.1.contains("lease expired"),
        "promoted only once the lease ran out: {}",
        chosen.1
    );

    // --- Thawed: the old primary acknowledges no write, and its agent fences it.
    drop(frozen);
    let insert = old.execute("INSERT INTO acked (id) VALUES (1)", &[]);
    if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(5), insert).await {
        panic!("the old primary acknowledged a write after the failover");
    }
    let new = pg(&sandbox, "node2").await;
    assert!(new
        .query_opt("SELECT 1 FROM acked WHERE id = 1", &[])
        .await
        .unwrap()
        .is_none());
    sandbox
        .wait_for("node1 rejoined as a standby", WAIT, |s| {
            node(s, "node1").role == "standby" && node(s, "node1").health == "HEALTHY"
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_back_within_the_lease_costs_nothing_one_gone_longer_is_fenced_by_its_guard() {
    let mut sandbox = start_sandbox(23700, 23710).await;
    let agent = sandbox.host_pids("node1").unwrap()[1];
    let postmaster = sandbox.postmaster_pid("node1").unwrap();
    assert!(sandbox.guard_pid("node1").is_some(), "the agent started a guard");

    // --- Short freezes of the primary's agent, well within the lease.
    for _ in 0..3 {
        kill(Pid::from_raw(agent), Signal::SIGSTOP).unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        kill(Pid::from_raw(agent), Signal::SIGCONT).unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let s = sandbox.status().await.unwrap();
    assert_eq!((s.epoch, s.primary.as_str()), (1, "node1"));

    // --- The agent crashes and is restarted at once (a service manager's restart):
    // the guard kept the lease, the new agent renews it, Postgres is not restarted.
    sandbox.kill_agent("node1").unwrap();
    sandbox.start_agent("node1").unwrap();
    sandbox
        .wait_for("node1 HEALTHY", WAIT, |s| node(s, "node1").health == "HEALTHY")
        .await
        .unwrap();
    assert_eq!(sandbox.postmaster_pid("node1"), Some(postmaster));
    assert_eq!(sandbox.status().await.unwrap().epoch, 1);

    // --- The agent stays dead: nothing renews the lease, so the guard stops Postgres
    // when it runs out, and the failover follows.
    sandbox.kill_agent("node1").unwrap();
    wait_promoted(&sandbox, "node2", 2).await;
    assert_eq!(sandbox.postmaster_pid("node1"), None, "fenced by the guard");
    let guard_log = std::fs::read_to_string(sandbox.path_of_guard_log("node1")).unwrap();
    assert!(guard_log.contains("fence"), "{guard_log}");

    // --- Restarted, the agent rejoins its node as a standby of node2.
    sandbox.start_agent("node1").unwrap();
    sandbox
        .wait_for("node1 rejoined as a standby", WAIT, |s| {
            node(s, "node1").role == "standby" && node(s, "node1").health == "HEALTHY"
        })
        .await
        .unwrap();
}

/// Issue 10, case 3: the primary's agent is killed and its Postgres frozen through
/// the failover, then thawed. Writers on both primaries, the old one with
/// `synchronous_commit = local`: the old primary's last acknowledged write must come
/// before the new primary's first.
async fn old_primary_frozen_without_its_agent(coordinator_base: u16, postgres_base: u16, sync_mode: &str) {
    let mut sandbox = start_sandbox(coordinator_base, postgres_base).await;
    set_policy(&sandbox.client(), "main", "sync_mode", sync_mode).await;
    create_writes_table(&sandbox).await;
    let old = TimedWriter::start(&sandbox, "node1", "w", true, Duration::from_secs(60)).unwrap();
    eventually("the old primary's writer writing", WAIT, || async {
        !old.acks().is_empty()
    })
    .await;

    sandbox.kill_agent("node1").unwrap();
    let postmaster = sandbox.postmaster_pid("node1").unwrap();
    let mut postgres = vec![postmaster];
    postgres.extend(pgquorum::launch::children(postmaster));
    let frozen = ThawOnDrop::freeze(postgres);

    let promoted = wait_new_primary(&sandbox, "node1", 2, WAIT).await;
    let new = TimedWriter::start(&sandbox, &promoted, "w", false, Duration::from_secs(60)).unwrap();
    eventually("the new primary's writer writing", WAIT, || async {
        !new.acks().is_empty()
    })
    .await;
    drop(frozen);
    // Time for a thawed old primary to acknowledge what its clients still send.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let guard_log = std::fs::read_to_string(sandbox.path_of_guard_log("node1")).unwrap_or_default();
    eprintln!("guard log:\n{guard_log}");
    assert_no_overlap(&old, &new);
    assert_eq!(sandbox.postmaster_pid("node1"), None, "the guard stopped it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_primary_without_its_agent_never_acknowledges_next_to_the_new_one_strict() {
    old_primary_frozen_without_its_agent(25800, 25810, "strict").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_primary_without_its_agent_never_acknowledges_next_to_the_new_one_prefer() {
    old_primary_frozen_without_its_agent(25900, 25910, "prefer").await;
}

/// Issue 10, case 5: the primary's data directory is lost while its agent lives. No
/// empty database may become the primary: the cluster fails over, and node1 is rebuilt
/// as a standby of the new primary, from it. Writers with `synchronous_commit = local`
/// on every node from before the loss: one primary at a time, node1 never again.
async fn primary_loses_its_data(coordinator_base: u16, postgres_base: u16, sync_mode: &str) {
    let sandbox = start_sandbox(coordinator_base, postgres_base).await;
    set_policy(&sandbox.client(), "main", "sync_mode", sync_mode).await;
    pg(&sandbox, "node1")
        .await
        .batch_execute("CREATE TABLE kept (id int); INSERT INTO kept VALUES (1)")
        .await
        .unwrap();
    let identifier = |client: tokio_postgres::Client| async move {
        client
            .query_one("SELECT system_identifier FROM pg_control_system()", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let database = identifier(pg(&sandbox, "node1").await).await;
    eventually("the cluster's database recorded", WAIT, || async {
        history(&sandbox)
            .await
            .iter()
            .any(|(k, _)| k == "system_identifier")
    })
    .await;
    let writers = WritersOnEveryNode::start(&sandbox, "node1", Duration::from_secs(120)).await;

    sandbox.kill_postgres("node1").unwrap();
    std::fs::remove_dir_all(sandbox.data_dir("node1").unwrap()).unwrap();

    let promoted = wait_new_primary(&sandbox, "node1", 2, WAIT).await;
    writers.wait_writing(&promoted).await;
    sandbox
        .wait_for("node1 rebuilt as a standby", WAIT, |s| {
            node(s, "node1").role == "standby" && node(s, "node1").health == "HEALTHY"
        })
        .await
        .unwrap();
    let node1 = pg(&sandbox, "node1").await;
    let kept: i32 = node1.query_one("SELECT id FROM kept", &[]).await.unwrap().get(0);
    assert_eq!(kept, 1, "node1 holds the cluster's data again");
    assert_eq!(
        identifier(node1).await,
        database,
        "the same database, not a new one"
    );
    let bootstraps = history(&sandbox)
        .await
        .into_iter()
        .filter(|(k, _)| k == "bootstrap")
        .count();
    assert_eq!(bootstraps, 1, "bootstrapped once");
    let s = sandbox.status().await.unwrap();
    assert_eq!((s.epoch, s.primary.as_str()), (2, promoted.as_str()));
    writers.assert_one_primary_at_a_time("node1", &promoted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_lost_its_data_is_rebuilt_as_a_standby_never_bootstrapped_again_strict() {
    primary_loses_its_data(26000, 26010, "strict").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_lost_its_data_is_rebuilt_as_a_standby_never_bootstrapped_again_prefer() {
    primary_loses_its_data(28300, 28310, "prefer").await;
}

/// A standby whose Postgres runs without the commit-time lease check (its
/// `shared_preload_libraries` overridden in `postgresql.auto.conf`, which is read last)
/// is reported by its agent and never promoted: a primary without it could answer
/// writes after its lease, were its host frozen and thawed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_without_the_commit_check_is_reported_and_never_promoted() {
    let mut sandbox = start_sandbox(28400, 28410).await;
    let auto_conf = sandbox.data_dir("node2").unwrap().join("postgresql.auto.conf");
    let mut text = std::fs::read_to_string(&auto_conf).unwrap();
    text.push_str("shared_preload_libraries = ''\n");
    std::fs::write(&auto_conf, text).unwrap();
    sandbox.stop_postgres("node2").unwrap(); // its agent starts it again
    let agent_log = sandbox.path_of_agent_log("node2");
    eventually("node2's agent reports the missing check", WAIT, || async {
        std::fs::read_to_string(&agent_log)
            .is_ok_and(|l| l.contains("runs without the commit-time lease check"))
    })
    .await;
    // node2 the only candidate: node3 gone, node2 the synchronous standby.
    sandbox.stop_node("node3").unwrap();
    sandbox
        .wait_for("node2 the synchronous standby", WAIT, |s| {
            node(s, "node2").sync_state == "sync"
        })
        .await
        .unwrap();

    sandbox.kill_host("node1").unwrap();
    eventually("node2 asked to promote, and refusing", WAIT, || async {
        std::fs::read_to_string(&agent_log)
            .is_ok_and(|l| l.contains("refused: the commit-time lease check is not loaded"))
    })
    .await;
    let s = sandbox.status().await.unwrap();
    assert_eq!(node(&s, "node2").role, "standby", "never promoted: {s:?}");
    assert_ne!(s.primary, "node2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failovers_in_a_row_leave_every_node_following_the_last_primary() {
    let mut sandbox = start_sandbox(23800, 23810).await;
    pg(&sandbox, "node1")
        .await
        .batch_execute("CREATE TABLE acked (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    let mut primary = "node1".to_string();
    for epoch in 2..=4u64 {
        // A writer on the primary, so standbys may hold WAL the next primary lacks.
        let (acked, writer) = start_writer(&sandbox, &primary);
        eventually("writes", WAIT, || async { acked.lock().unwrap().len() > 20 }).await;
        sandbox.kill_host(&primary).unwrap();
        let status = sandbox
            .wait_for(&format!("epoch {epoch}"), WAIT, |s| {
                s.epoch == epoch && !s.primary.is_empty()
            })
            .await
            .unwrap();
        let _ = writer.await;
        let next = status.primary.clone();
        assert_ne!(next, primary);
        sandbox.start_agent(&primary).unwrap();
        sandbox
            .wait_for("every node HEALTHY under the new primary", WAIT, |s| {
                s.primary == next && s.nodes.iter().all(|n| n.health == "HEALTHY")
            })
            .await
            .unwrap();
        let ids: Vec<i64> = acked.lock().unwrap().clone();
        let new = pg(&sandbox, &next).await;
        let n: i64 = new
            .query_one("SELECT count(*) FROM acked WHERE id = ANY($1)", &[&ids])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n as usize, ids.len(), "acknowledged writes lost at epoch {epoch}");
        new.execute("DELETE FROM acked", &[]).await.unwrap();
        primary = next;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_stops_the_primary_cleanly_and_loses_nothing() {
    let sandbox = start_sandbox(25200, 25210).await;
    let old = pg(&sandbox, "node1").await;
    old.batch_execute(
        "CREATE TABLE handed (id bigint PRIMARY KEY);
         INSERT INTO handed SELECT generate_series(1, 1000);
         -- A commit no standby acknowledged: a clean stop still hands it over.
         SET synchronous_commit = local;
         INSERT INTO handed VALUES (1001);",
    )
    .await
    .unwrap();
    let addrs = sandbox.client().addrs().join(",");

    let out = cli(&["--coordinators", &addrs, "switchover", "--to", "node1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already the primary"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Without --to: the synchronous standby.
    let started = cli_json(&["--coordinators", &addrs, "switchover"]);
    assert_eq!(started["failover"]["kind"], "switchover", "{started}");
    assert_eq!(started["failover"]["candidate"], "node2", "{started}");
    wait_promoted(&sandbox, "node2", 2).await;
    sandbox
        .wait_for("node1 follows node2", WAIT, |s| {
            node(s, "node1").role == "standby" && node(s, "node1").health == "HEALTHY"
        })
        .await
        .unwrap();

    let new = pg(&sandbox, "node2").await;
    let count: i64 = new
        .query_one("SELECT count(*) FROM handed", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        count, 1001,
        "every commit handed over, the unacknowledged one too"
    );
    let h = history(&sandbox).await;
    assert!(h.iter().any(|(k, _)| k == "switchover_started"), "{h:?}");
    let chosen = h.iter().find(|(k, _)| k == "candidate_chosen").unwrap();
    assert!(
        chosen.1.contains("confirmed Postgres stopped"),
        "chosen after the clean stop, not a lease expiry: {}",
        chosen.1
    );
    let log = std::fs::read_to_string(sandbox.path().join("node1").join("agent.log")).unwrap();
    assert!(log.contains("stopping postgres cleanly"), "{log}");
    assert!(!log.contains("base backup"), "rejoined without a new copy: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_takes_over_a_failover_that_lost_its_only_candidate() {
    let mut sandbox = start_sandbox(25300, 25310).await;
    // A long lease: the failover waits for it before choosing, time enough to lose the
    // only synchronous standby after the failover started.
    pgquorum_tests::set_policy(&sandbox.client(), "main", "lease_ms", "6000").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    sandbox.kill_host("node1").unwrap();
    sandbox
        .wait_for("a failover started", WAIT, |s| {
            s.failover.as_ref().is_some_and(|f| f.step == "started")
        })
        .await
        .unwrap();
    sandbox.kill_host("node2").unwrap();
    eventually("an alert that the failover has no candidate", WAIT, || async {
        sandbox
            .alerts()
            .await
            .is_ok_and(|a| a.alerts.iter().any(|a| a.message.contains("has no candidate")))
    })
    .await;

    let refused = force_failover_to_node3(&sandbox).await;
    assert!(
        refused.contains("in flight") && refused.contains("--accept-data-loss"),
        "{refused}"
    );
    let h = history(&sandbox).await;
    assert!(h.iter().any(|(k, _)| k == "candidate_overridden"), "{h:?}");
}

/// The standby's WAL position (received or replayed, the higher).
async fn standby_lsn(sandbox: &Sandbox, node: &str) -> String {
    pg(sandbox, node)
        .await
        .query_one(
            "SELECT greatest(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::text",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Found by the simulation once it drove the real agent: a standby that is down when
/// the primary changes, and holds WAL past the new primary's fork point, must be
/// rewound when it comes back, though its agent repoints it while it is stopped (no
/// divergence check is possible then) and then sees it already following the right
/// primary. Before the fix it ran forever without streaming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_back_with_wal_past_the_new_primarys_fork_point_is_rewound() {
    let mut sandbox = start_sandbox(29500, 29510).await;
    let settled = sandbox
        .wait_for("a sync standby", WAIT, |s| {
            s.sync_set.len() == 1 && s.nodes.iter().all(|n| n.health == "HEALTHY")
        })
        .await
        .unwrap();
    let old = settled.primary.clone();
    let sync = settled.sync_set[0].clone();
    let other = sandbox
        .node_names()
        .into_iter()
        .find(|n| *n != old && *n != sync)
        .unwrap();
    let primary = pg(&sandbox, &old).await;
    primary
        .batch_execute("CREATE TABLE fork (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    // The primary stops sending to the sync standby (its WAL sender frozen: what it
    // sent before sits in the socket, so the receiver is not the one to stop);
    // `synchronous_commit = local` writes reach only the other standby, which then
    // holds WAL the next primary never gets.
    let sender: i32 = primary
        .query_one(
            "SELECT pid FROM pg_stat_replication WHERE application_name = $1",
            &[&sync],
        )
        .await
        .unwrap()
        .get(0);
    let frozen = ThawOnDrop::freeze(vec![sender]);
    primary
        .batch_execute("SET synchronous_commit = local; INSERT INTO fork SELECT generate_series(1, 1000)")
        .await
        .unwrap();
    let end: String = primary
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let lsn = |text: &str| pgquorum_client::lsn::Lsn::parse(text).unwrap();
    eventually("the other standby holding the local writes", WAIT, || async {
        lsn(&standby_lsn(&sandbox, &other).await) >= lsn(&end)
    })
    .await;
    let sync_at = standby_lsn(&sandbox, &sync).await;
    assert!(
        lsn(&sync_at) < lsn(&end),
        "the sync standby received the local writes ({sync_at} ≥ {end}): no fork to test"
    );
    // The other standby's host goes down, then the primary's (its frozen WAL sender
    // with it).
    sandbox.kill_host(&other).unwrap();
    sandbox.kill_host(&old).unwrap();
    drop(frozen);
    let promoted = wait_new_primary(&sandbox, &old, 2, WAIT).await;
    assert_eq!(promoted, sync);
    // The other host comes back: stopped, on the old timeline, past the fork.
    sandbox.start_agent(&other).unwrap();
    // Checked after 10 s without streaming (`DIVERGENCE_PATIENCE`), then rewound.
    sandbox
        .wait_for(
            "the returning standby streaming from the new primary",
            WAIT * 2,
            |s| {
                let timeline = node(s, &promoted).timeline;
                let back = node(s, &other);
                s.primary == promoted && back.health == "HEALTHY" && back.timeline == timeline
            },
        )
        .await
        .unwrap();
    let log = std::fs::read_to_string(sandbox.path_of_agent_log(&other)).unwrap_or_default();
    assert!(
        log.contains("does not stream from the primary: checking")
            && log.contains("went past the primary's fork point: rewinding"),
        "{other} was not found diverged and rewound:\n{log}"
    );
}
