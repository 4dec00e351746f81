//! The agent and the sandbox against real Postgres: streaming replication, health,
//! lag, the sync set, agent restarts. Each test has its own ports and directory.

use std::time::Duration;

use pgquorum_tests::{cli, cli_json, eventually, node_status as node, pg, start_sandbox};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_replicates_to_both_standbys_and_reports_them_healthy() {
    let sandbox = start_sandbox(22100, 22110).await;

    // --- A row written on the primary is readable on both standbys.
    let primary = pg(&sandbox, "node1").await;
    primary
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (42)")
        .await
        .unwrap();
    for standby in ["node2", "node3"] {
        let client = pg(&sandbox, standby).await;
        eventually(&format!("row on {standby}"), WAIT, || async {
            client
                .query_opt("SELECT id FROM t WHERE id = 42", &[])
                .await
                .ok()
                .flatten()
                .is_some()
        })
        .await;
        let in_recovery: bool = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .unwrap()
            .get(0);
        assert!(in_recovery, "{standby} is a standby");
    }

    // --- `status --json` shows the roles, the sync state and HEALTHY everywhere.
    let addrs = sandbox.client().addrs().join(",");
    let status = cli_json(&["--coordinators", &addrs, "status"]);
    assert_eq!(status["cluster"], "main");
    assert_eq!(status["primary"], "node1");
    assert_eq!(status["epoch"], 1);
    assert!(status["raft"]["leader"].is_u64(), "{status}");
    let nodes = status["nodes"].as_array().unwrap();
    let by = |n: &str| nodes.iter().find(|x| x["name"] == n).unwrap().clone();
    assert_eq!(
        (by("node1")["role"].as_str(), by("node1")["sync_state"].as_str()),
        (Some("primary"), Some("primary"))
    );
    assert_eq!(
        (by("node2")["role"].as_str(), by("node2")["sync_state"].as_str()),
        (Some("standby"), Some("sync"))
    );
    assert_eq!(
        (by("node3")["role"].as_str(), by("node3")["sync_state"].as_str()),
        (Some("standby"), Some("async"))
    );
    for n in nodes {
        assert_eq!(n["health"], "HEALTHY", "{n}");
        assert_eq!(n["timeline"], 1, "{n}");
        for key in [
            "lag_ms",
            "lag_bytes",
            "lag_source",
            "workload",
            "region",
            "heartbeat_age_ms",
        ] {
            assert!(!n[key].is_null(), "{key} in {n}");
        }
    }
    // The primary really waits for the committed sync standby.
    let names: String = primary
        .query_one("SHOW synchronous_standby_names", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(names, "ANY 1 (\"node2\")");
    let alerts = cli_json(&["--coordinators", &addrs, "alerts"]);
    assert_eq!(alerts["alerts"].as_array().unwrap().len(), 0, "{alerts}");

    // --- sandbox.json carries the keys DESIGN.md fixes.
    let file = serde_json::to_value(sandbox.file()).unwrap();
    assert_eq!(file["coordinators"].as_array().unwrap().len(), 3);
    for key in ["id", "grpc", "pid"] {
        assert!(!file["coordinators"][0][key].is_null(), "{key}");
    }
    for key in [
        "name",
        "host",
        "port",
        "data_dir",
        "agent_pid",
        "os_user",
        "superuser",
        "database",
    ] {
        assert!(!file["nodes"][0][key].is_null(), "{key}");
    }
    let data_dir = file["nodes"][0]["data_dir"].as_str().unwrap();
    let pid_line = std::fs::read_to_string(format!("{data_dir}/postmaster.pid")).unwrap();
    assert_eq!(
        Some(pid_line.lines().next().unwrap().parse::<i32>().unwrap()),
        sandbox.postmaster_pid("node1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_standby_is_disconnected_and_critical_until_it_returns() {
    let mut sandbox = start_sandbox(22200, 22210).await;

    // --- node3's host goes down: agent and Postgres.
    sandbox.stop_node("node3").unwrap();
    sandbox
        .wait_for("node3 DISCONNECTED", WAIT, |s| {
            node(s, "node3").health == "DISCONNECTED"
        })
        .await
        .unwrap();
    let alerts = sandbox.alerts().await.unwrap();
    let a = alerts
        .alerts
        .iter()
        .find(|a| a.node == "node3")
        .expect("an alert for node3");
    assert_eq!(a.severity, "CRITICAL", "{alerts:?}");
    assert!(a.message.contains("not streaming"), "{}", a.message);

    // --- Back up: the agent starts Postgres, which streams again.
    sandbox.start_agent("node3").unwrap();
    sandbox
        .wait_for("node3 HEALTHY", WAIT, |s| node(s, "node3").health == "HEALTHY")
        .await
        .unwrap();
    eventually("no alerts", WAIT, || async {
        sandbox.alerts().await.unwrap().alerts.is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_replay_shows_growing_lag_and_a_warning() {
    let sandbox = start_sandbox(22300, 22310).await;
    let primary = pg(&sandbox, "node1").await;
    primary
        .batch_execute("CREATE TABLE w (id serial PRIMARY KEY, at timestamptz DEFAULT now())")
        .await
        .unwrap();
    let node3 = pg(&sandbox, "node3").await;
    eventually("table on node3", WAIT, || async {
        node3.query_opt("SELECT 1 FROM w", &[]).await.is_ok()
    })
    .await;

    // --- Pause replay on node3 while writes go on: its lag grows past 1 s.
    node3.batch_execute("SELECT pg_wal_replay_pause()").await.unwrap();
    let writer = {
        let primary = pg(&sandbox, "node1").await;
        tokio::spawn(async move {
            for _ in 0..200 {
                if primary
                    .execute("INSERT INTO w DEFAULT VALUES", &[])
                    .await
                    .is_err()
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let status = sandbox
        .wait_for("node3 lagging over 1 s", WAIT, |s| {
            node(s, "node3").lag_ms > 1_000
        })
        .await
        .unwrap();
    let n3 = node(&status, "node3");
    assert!(n3.replay_paused, "{n3:?}");
    assert!(n3.lag_bytes > 0, "{n3:?}");
    // Keeps up: measured, and far from node3 (not 0: under steady writes replay
    // trails by a few ms, and a loaded machine can make that more).
    let n2 = node(&status, "node2");
    assert!(
        n2.lag_ms < 1_000 && n2.health == "HEALTHY",
        "node2 keeps up: {n2:?}"
    );
    eventually("a WARNING for node3", WAIT, || async {
        let alerts = sandbox.alerts().await.unwrap().alerts;
        alerts
            .iter()
            .any(|a| a.node == "node3" && a.severity == "WARNING" && a.message.contains("replay lag"))
    })
    .await;

    // --- Resumed: it catches up and the warning clears.
    node3
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    writer.abort();
    sandbox
        .wait_for("node3 caught up", WAIT, |s| node(s, "node3").health == "HEALTHY")
        .await
        .unwrap();
    eventually("no alerts", WAIT, || async {
        sandbox.alerts().await.unwrap().alerts.is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_sync_standby_makes_another_synchronous_in_the_safe_order() {
    let mut sandbox = start_sandbox(22400, 22410).await;
    let primary = pg(&sandbox, "node1").await;
    primary.batch_execute("CREATE TABLE s (id int)").await.unwrap();

    // --- The synchronous standby's host goes down.
    sandbox.stop_node("node2").unwrap();
    let status = sandbox
        .wait_for("node3 synchronous", WAIT, |s| {
            s.sync_set == ["node3"] && node(s, "node3").sync_state == "sync"
        })
        .await
        .unwrap();
    assert_eq!(node(&status, "node2").health, "DISCONNECTED");

    // --- Commits are acknowledged again, now by node3.
    let insert = tokio::time::timeout(
        Duration::from_secs(10),
        primary.execute("INSERT INTO s VALUES (1)", &[]),
    );
    assert_eq!(insert.await.expect("commit not stuck").unwrap(), 1);
    let names: String = primary
        .query_one("SHOW synchronous_standby_names", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(names, "ANY 1 (\"node3\")");

    // --- The committed order: node3 added to the set before node2 left it.
    let addrs = sandbox.client().addrs().join(",");
    let cluster = cli_json(&["--coordinators", &addrs, "cluster", "show", "main"]);
    let changes: Vec<String> = cluster["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "sync_set_changed")
        .map(|e| {
            e["detail"]
                .as_str()
                .unwrap()
                .split(':')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        changes,
        [
            "[] -> [node2]",
            "[node2] -> [node2, node3]",
            "[node2, node3] -> [node3]"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_an_agent_leaves_its_postgres_alone() {
    let mut sandbox = start_sandbox(22500, 22510).await;
    let started_at = |client: tokio_postgres::Client| async move {
        let row = client
            .query_one("SELECT pg_postmaster_start_time()::text", &[])
            .await
            .unwrap();
        row.get::<_, String>(0)
    };
    let mut before = Vec::new();
    for name in ["node1", "node2"] {
        before.push((
            sandbox.postmaster_pid(name).unwrap(),
            started_at(pg(&sandbox, name).await).await,
        ));
    }

    for name in ["node1", "node2"] {
        sandbox.kill_agent(name).unwrap();
        sandbox.start_agent(name).unwrap();
    }
    // The new agents report (fresh heartbeats) and all is HEALTHY as before.
    tokio::time::sleep(Duration::from_millis(500)).await;
    sandbox
        .wait_for("all healthy after agent restarts", WAIT, |s| {
            s.nodes
                .iter()
                .all(|n| n.health == "HEALTHY" && n.heartbeat_age_ms.is_some_and(|a| a < 400))
        })
        .await
        .unwrap();
    for (i, name) in ["node1", "node2"].into_iter().enumerate() {
        let after = (
            sandbox.postmaster_pid(name).unwrap(),
            started_at(pg(&sandbox, name).await).await,
        );
        assert_eq!(after, before[i], "{name}'s postmaster was restarted");
    }
}

#[test]
fn sandbox_up_and_down_from_the_cli_leave_nothing_running() {
    let dir = tempfile::Builder::new()
        .prefix("pgquorum-cli-sandbox-")
        .tempdir()
        .unwrap();
    let d = dir.path().to_str().unwrap();
    let out = cli(&[
        "sandbox",
        "up",
        "--dir",
        d,
        "--coordinator-base",
        "22600",
        "--postgres-base",
        "22610",
    ]);
    let file: serde_json::Value = match std::fs::read_to_string(dir.path().join("sandbox.json")) {
        Ok(text) => serde_json::from_str(&text).unwrap(),
        Err(e) => panic!(
            "no sandbox.json ({e}); up said: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    };
    // Stop it whatever happens below.
    struct Down(String);
    impl Drop for Down {
        fn drop(&mut self) {
            let _ = cli(&["sandbox", "down", "--dir", &self.0]);
        }
    }
    let down = Down(d.to_string());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("PGQUORUM_COORDINATORS="));

    assert!(
        file["router"]["rw"].is_string() && file["router"]["ro"]["reporting"].is_string(),
        "{file}"
    );
    let mut pids: Vec<u64> = file["coordinators"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["pid"].as_u64().unwrap())
        .collect();
    pids.extend(
        file["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["agent_pid"].as_u64().unwrap()),
    );
    for n in file["nodes"].as_array().unwrap() {
        let pidfile =
            std::fs::read_to_string(format!("{}/postmaster.pid", n["data_dir"].as_str().unwrap())).unwrap();
        pids.push(pidfile.lines().next().unwrap().parse().unwrap());
    }
    let running = |pid: &u64| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok();
    assert!(pids.iter().all(running), "everything runs after up");

    let out = cli(&["sandbox", "status", "--dir", d, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The drill: kill the primary host; node2 takes over.
    let out = cli(&["sandbox", "kill", "node1", "--dir", d]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let addrs: Vec<String> = file["coordinators"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["grpc"].as_str().unwrap().to_string())
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = cli(&["--coordinators", &addrs.join(","), "--json", "status"]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if status["primary"] == "node2" && status["epoch"] == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no failover to node2: {status}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = cli(&["sandbox", "kill", "nodeX", "--dir", d]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no node \"nodeX\""));

    // --- Back: `sandbox start` brings node1 back as node2's standby, tracked by the file.
    let out = cli(&["sandbox", "start", "node1", "--dir", d]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("sandbox.json")).unwrap()).unwrap();
    let node1 = file["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "node1")
        .unwrap();
    let agent = node1["agent_pid"].as_u64().unwrap();
    assert!(running(&agent) && !pids.contains(&agent), "a new agent: {file}");
    pids.push(agent);
    loop {
        let out = cli(&["--coordinators", &addrs.join(","), "--json", "status"]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let n1 = status["nodes"]
            .as_array()
            .and_then(|n| n.iter().find(|n| n["name"] == "node1").cloned());
        if n1.is_some_and(|n| n["role"] == "standby" && n["health"] == "HEALTHY") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline + Duration::from_secs(60),
            "node1 not back: {status}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = cli(&["sandbox", "start", "node1", "--dir", d]);
    assert_eq!(out.status.code(), Some(2), "already runs");
    let pidfile =
        std::fs::read_to_string(format!("{}/postmaster.pid", node1["data_dir"].as_str().unwrap())).unwrap();
    pids.push(pidfile.lines().next().unwrap().parse().unwrap());

    let out = cli(&["sandbox", "down", "--dir", d]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let left: Vec<&u64> = pids.iter().filter(|p| running(p)).collect();
    assert!(left.is_empty(), "still running after down: {left:?}");
    drop(down);
}
