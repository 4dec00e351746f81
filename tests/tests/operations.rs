//! Day-two operations as an on-call engineer meets them: signals and log format,
//! alerts and their exit code, a group without quorum, pause and resume, the agents'
//! health endpoints and every daemon's metrics, agent identity. Each test has its own
//! ports (27800-27870, 29600-29670, 29700-29990, 30400-31870) and directory.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use pgquorum::launch::{find_binary, AGENT_BIN, COORDINATOR_BIN};
use pgquorum_coordinator::config::MemberConfig;
use pgquorum_coordinator::Config;
use pgquorum_tests::{
    cli, cli_json, create_cluster, eventually, http_get, metric, node_status as node, parse_metrics, pg,
    start_group, start_sandbox, wait_new_primary, WritersOnEveryNode,
};

const WAIT: Duration = Duration::from_secs(30);

/// `--log-format json` gives one JSON object a line; a SIGHUP is logged, not fatal
/// (its default action ends a process, and a router died of one).
#[test]
fn a_daemon_logs_json_on_request_and_outlives_a_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let addr = "127.0.0.1:29701".to_string();
    let config = Config {
        id: 1,
        region: "r1".into(),
        listen: addr.clone(),
        advertise: None,
        data_dir: dir.path().join("raft"),
        http: None,
        initial_members: vec![MemberConfig {
            id: 1,
            addr,
            region: "r1".into(),
        }],
        raft: Default::default(),
        stonith: None,
    };
    let path = dir.path().join("c.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    let mut child = Command::new(find_binary(COORDINATOR_BIN).unwrap())
        .args(["--log-format", "json", "--config"])
        .arg(&path)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = Pid::from_raw(child.id() as i32);
    struct KillOnDrop(Pid);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = kill(self.0, Signal::SIGKILL);
        }
    }
    let _guard = KillOnDrop(pid);
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let next_where = |what: &str, matches: &dyn Fn(&serde_json::Value) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no log line {what} within 30 s"));
            let value: serde_json::Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            for key in ["timestamp", "level", "target", "fields"] {
                assert!(!value[key].is_null(), "{key} in {line}");
            }
            if matches(&value) {
                return value;
            }
        }
    };
    next_where("saying it serves", &|v| {
        v["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("listening") || m.contains("serving"))
    });

    kill(pid, Signal::SIGHUP).unwrap();
    let logged = next_where("about the SIGHUP", &|v| {
        v["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("SIGHUP"))
    });
    assert_eq!(logged["level"], "WARN", "{logged}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the coordinator died of a SIGHUP"
    );

    kill(pid, Signal::SIGTERM).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM ends it cleanly");
}

/// gRPC health status of the coordinator at `addr` (`""`: the whole server).
async fn health_of(addr: &str) -> Option<i32> {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let channel = pgquorum_client::endpoint(addr).ok()?.connect().await.ok()?;
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()?;
    Some(reply.into_inner().status)
}

/// A leader whose followers are gone stays leader in openraft: health said SERVING,
/// `alerts` said "no alerts" (exit 0), and a refused read told the operator "the leader
/// is node N" on node N itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_without_quorum_is_not_serving_and_alerts_critical() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut group = start_group(29710, |_| {}).await;
    create_cluster(&group.client(), "main").await;
    let leader = group.wait_for_leader(WAIT).await.unwrap();
    let addr = group.addr_of(leader);
    eventually("every coordinator SERVING", WAIT, || async {
        let mut all = true;
        for a in group.addrs() {
            all &= health_of(&a).await == Some(ServingStatus::Serving as i32);
        }
        all
    })
    .await;
    let out = cli(&["--coordinators", &addr, "alerts", "--cluster", "main"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a cluster without a primary is CRITICAL"
    );

    // --- `raft add` of an address where nothing listens, or where another coordinator
    // answers, is refused (it printed "added as a learner and caught up").
    let other = group.ids().into_iter().find(|id| *id != leader).unwrap();
    let cases = [
        ("127.0.0.1:29799".to_string(), "4", "nothing answers"),
        (group.addr_of(other), "9", "not 9"),
    ];
    for (target, id, why) in cases {
        let out = cli(&[
            "--coordinators",
            &addr,
            "raft",
            "add",
            "--id",
            id,
            "--addr",
            &target,
            "--region",
            "r9",
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(why), "{err}");
    }
    let members = group.status_of(leader).await.unwrap().members;
    assert_eq!(members.len(), 3, "nothing added: {members:?}");

    for id in group.ids().into_iter().filter(|id| *id != leader) {
        group.kill(id).unwrap();
    }
    eventually("the lone leader NOT_SERVING", WAIT, || async {
        health_of(&addr).await == Some(ServingStatus::NotServing as i32)
    })
    .await;
    assert_eq!(
        group.status_of(leader).await.unwrap().leader_id,
        Some(leader),
        "openraft keeps it leader (the case under test)"
    );

    let all = group.addrs().join(",");
    let out = cli(&["--json", "--coordinators", &all, "--timeout", "8", "alerts"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let alerts: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let first = &alerts["alerts"][0];
    assert_eq!(first["severity"], "CRITICAL", "{alerts}");
    assert!(
        first["message"].as_str().unwrap().contains("without quorum"),
        "{alerts}"
    );

    let out = cli(&[
        "--coordinators",
        &addr,
        "--timeout",
        "5",
        "status",
        "--cluster",
        "main",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        !err.contains(&format!("the leader is node {leader}")),
        "node {leader} named itself as the leader to go to: {err}"
    );
    assert!(err.contains("cannot reach a quorum"), "{err}");
}

/// Nothing listening at any coordinator address: the error names each address once,
/// with the cause ("transport error", twice each, said nothing).
#[test]
fn an_unreachable_group_is_reported_once_per_address_with_the_cause() {
    let out = cli(&["--coordinators", "127.0.0.1:29798,127.0.0.1:29797", "status"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for addr in ["127.0.0.1:29798", "127.0.0.1:29797"] {
        assert_eq!(err.matches(addr).count(), 1, "{err}");
    }
    assert!(err.contains("Connection refused"), "{err}");
}

/// `pause` stops automatic failover (the primary's host dies and nothing happens, shown
/// in `status` and `alerts`); `resume` lets it run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_stops_a_failover_and_resume_lets_it_run() {
    let mut sandbox = start_sandbox(29800, 29810).await;
    let addrs = sandbox.client_addrs().join(",");
    let paused = cli_json(&["--coordinators", &addrs, "pause"]);
    assert_eq!(paused, serde_json::json!({"cluster": "main", "paused": true}));
    let status = cli_json(&["--coordinators", &addrs, "status"]);
    assert_eq!(status["paused"], true, "{status}");
    let epoch = status["epoch"].as_u64().unwrap();

    sandbox.kill_host("node1").unwrap();
    sandbox
        .wait_for("node1 seen down", WAIT, |s| node(s, "node1").health != "HEALTHY")
        .await
        .unwrap();
    // Well past the failure timeout and the lease: a failover would have started.
    let policy = cli_json(&["--coordinators", &addrs, "policy", "get", "main"]);
    let failure_timeout = policy["policy"]["failure_timeout_ms"].as_u64().unwrap();
    let lease = policy["policy"]["lease_ms"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_millis(3 * (failure_timeout + lease))).await;
    let s = sandbox.status().await.unwrap();
    assert_eq!((s.epoch, s.primary.as_str()), (epoch, "node1"), "{s:?}");
    assert!(s.failover.is_none(), "{:?}", s.failover);
    let out = cli(&["--json", "--coordinators", &addrs, "alerts"]);
    assert_eq!(out.status.code(), Some(1), "the primary is down: CRITICAL");
    let alerts: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let messages: Vec<&str> = alerts["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["message"].as_str())
        .collect();
    assert!(messages.iter().any(|m| m.contains("paused")), "{messages:?}");

    let resumed = cli_json(&["--coordinators", &addrs, "resume", "--cluster", "main"]);
    assert_eq!(resumed["paused"], false);
    let new = wait_new_primary(&sandbox, "node1", epoch + 1, WAIT).await;
    assert_eq!(new, "node2", "the synchronous standby");
    let history = cli_json(&["--coordinators", &addrs, "history"]);
    let details: Vec<String> = history["events"]
        .as_array()
        .map(|e| e.iter().map(|e| e["detail"].to_string()).collect())
        .unwrap_or_default();
    assert!(
        details.iter().any(|d| d.contains("maintenance: false -> true")),
        "pause is in the history: {history}"
    );
}

/// The agents' HTTP endpoints answer 200/503 as their names say, per role, and follow
/// a failover; every daemon's `/metrics` parses (HELP and TYPE for every series) and
/// the coordinator's agree with `status --json`; a SIGHUP ends no daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoints_per_role_and_metrics_that_agree_with_status() {
    let mut sandbox = start_sandbox(29900, 29910).await;
    let file = sandbox.file();
    let http: std::collections::BTreeMap<String, String> = file
        .nodes
        .iter()
        .map(|n| (n.name.clone(), n.http.clone()))
        .collect();
    let paths = [
        "/primary",
        "/replica",
        "/sync",
        "/async",
        "/health",
        "/replica?lag=60000",
    ];
    let codes = |node: &str| {
        let addr = http[node].clone();
        async move {
            let mut out = Vec::new();
            for p in paths {
                out.push(http_get(&addr, p).await.map(|(c, _)| c).unwrap_or(0));
            }
            out
        }
    };
    let expected = [
        ("node1", [200, 503, 503, 503, 200, 503]),
        ("node2", [503, 200, 200, 503, 200, 200]),
        ("node3", [503, 200, 503, 200, 200, 200]),
    ];
    eventually("every node's endpoints as its role says", WAIT, || async {
        let mut all = true;
        for (node, want) in expected {
            all &= codes(node).await == want;
        }
        all
    })
    .await;
    let (code, body) = http_get(&http["node2"], "/replica?lag=soon").await.unwrap();
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("lag"), "{body}");
    let (code, body) = http_get(&http["node1"], "/primary").await.unwrap();
    let view: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((code, view["role"].as_str()), (200, Some("primary")), "{body}");
    assert!(view["lease_remaining_ms"].as_u64().unwrap() > 0, "{body}");

    // --- Metrics: the coordinator leader's agree with `status --json`.
    let addrs = sandbox.client_addrs().join(",");
    let status = cli_json(&["--coordinators", &addrs, "status"]);
    let leader = status["raft"]["leader"].as_u64().unwrap();
    // The lease holder and what its lease has left, in `status` too.
    for n in status["nodes"].as_array().unwrap() {
        let holds = n["lease_left_ms"].as_u64().is_some_and(|ms| ms > 0);
        assert_eq!(holds, n["name"] == "node1", "{n}");
    }
    let leader_http = file
        .coordinators
        .iter()
        .find(|c| c.id == leader)
        .unwrap()
        .http
        .clone();
    let (code, text) = http_get(&leader_http, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    let m = parse_metrics(&text);
    let main = [("cluster", "main")];
    assert_eq!(metric(&m, "pgquorum_raft_is_leader", &[]), Some(1.0), "{text}");
    assert_eq!(metric(&m, "pgquorum_raft_leader", &[]), Some(leader as f64));
    assert_eq!(
        metric(&m, "pgquorum_raft_term", &[]),
        status["raft"]["term"].as_f64()
    );
    assert_eq!(
        metric(&m, "pgquorum_cluster_epoch", &main),
        status["epoch"].as_f64()
    );
    assert_eq!(metric(&m, "pgquorum_cluster_paused", &main), Some(0.0));
    for n in status["nodes"].as_array().unwrap() {
        let name = n["name"].as_str().unwrap();
        let l = [("cluster", "main"), ("node", name)];
        let is = |v: bool| Some(if v { 1.0 } else { 0.0 });
        assert_eq!(
            metric(&m, "pgquorum_node_primary", &l),
            is(n["role"] == "primary"),
            "{name}"
        );
        assert_eq!(
            metric(&m, "pgquorum_node_healthy", &l),
            is(n["health"] == "HEALTHY"),
            "{name}"
        );
        assert_eq!(
            metric(&m, "pgquorum_node_synchronous", &l),
            is(n["sync_state"] == "sync"),
            "{name}"
        );
        assert_eq!(
            metric(&m, "pgquorum_node_timeline", &l),
            n["timeline"].as_f64(),
            "{name}"
        );
        let lease = metric(&m, "pgquorum_node_lease_remaining_seconds", &l).unwrap();
        assert_eq!(lease > 0.0, n["role"] == "primary", "{name}: lease {lease}");
    }
    let follower = file.coordinators.iter().find(|c| c.id != leader).unwrap();
    let (_, text) = http_get(&follower.http, "/metrics").await.unwrap();
    let f = parse_metrics(&text);
    assert_eq!(metric(&f, "pgquorum_raft_is_leader", &[]), Some(0.0));
    assert_eq!(
        metric(&f, "pgquorum_cluster_epoch", &main),
        status["epoch"].as_f64()
    );
    assert_eq!(
        metric(&f, "pgquorum_node_primary", &[]),
        None,
        "only the leader has reports"
    );

    for (node, primary) in [("node1", 1.0), ("node2", 0.0)] {
        let (_, text) = http_get(&http[node], "/metrics").await.unwrap();
        let a = parse_metrics(&text);
        assert_eq!(
            metric(&a, "pgquorum_agent_primary", &[]),
            Some(primary),
            "{node}: {text}"
        );
        assert_eq!(metric(&a, "pgquorum_agent_postgres_up", &[]), Some(1.0), "{node}");
        let lease = metric(&a, "pgquorum_agent_lease_remaining_seconds", &[]).unwrap();
        assert_eq!(lease > 0.0, primary == 1.0, "{node}: lease {lease}");
    }
    let router = file.router.clone().unwrap();
    let (_, text) = http_get(&router.http, "/metrics").await.unwrap();
    let r = parse_metrics(&text);
    assert!(metric(&r, "pgquorum_router_map_version", &[]).is_some(), "{text}");
    // Bytes through the router, per port, backend and direction.
    let (host, port) = router.rw.rsplit_once(':').unwrap();
    let conninfo = format!("host={host} port={port} user=postgres dbname=postgres connect_timeout=3");
    let (through, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    through.simple_query("SELECT repeat('x', 10000)").await.unwrap();
    let rw_bytes = |direction: &'static str| {
        let http = router.http.clone();
        async move {
            let (_, text) = http_get(&http, "/metrics").await.unwrap();
            let r = parse_metrics(&text);
            assert!(
                metric(&r, "pgquorum_router_map_age_seconds", &[]).is_some(),
                "{text}"
            );
            metric(
                &r,
                "pgquorum_router_bytes_total",
                &[("port", "rw"), ("backend", "node1"), ("direction", direction)],
            )
            .unwrap_or(0.0)
        }
    };
    assert!(
        rw_bytes("from_backend").await > 10_000.0,
        "the reply went through"
    );
    assert!(rw_bytes("from_client").await > 0.0);
    drop(through);

    // --- SIGHUP: every daemon logs it and goes on.
    let pids: Vec<i32> = [sandbox.router_pid().map(|p| p as i32), sandbox.agent_pid("node3")]
        .into_iter()
        .flatten()
        .chain(file.coordinators.iter().map(|c| c.pid as i32))
        .collect();
    for pid in &pids {
        kill(Pid::from_raw(*pid), Signal::SIGHUP).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for pid in &pids {
        assert!(
            kill(Pid::from_raw(*pid), None).is_ok(),
            "pid {pid} died of a SIGHUP"
        );
    }
    let rw = router.rw.clone();
    assert!(
        tokio::net::TcpStream::connect(&rw).await.is_ok(),
        "the router still listens"
    );

    // --- A failover: the endpoints follow, the handover is counted with its duration.
    let epoch = status["epoch"].as_u64().unwrap();
    sandbox.kill_host("node1").unwrap();
    let new = wait_new_primary(&sandbox, "node1", epoch + 1, WAIT).await;
    eventually(&format!("{new} answers /primary"), WAIT, || async {
        http_get(&http[&new], "/primary")
            .await
            .map(|(c, _)| c)
            .unwrap_or(0)
            == 200
    })
    .await;
    let (code, _) = http_get(&http[&new], "/replica").await.unwrap();
    assert_eq!(code, 503, "a primary is no replica");
    eventually("the failover counted", WAIT, || async {
        let (_, text) = http_get(&leader_http, "/metrics").await.unwrap();
        let m = parse_metrics(&text);
        metric(
            &m,
            "pgquorum_handover_duration_seconds_count",
            &[("cluster", "main"), ("kind", "failover")],
        ) == Some(1.0)
    })
    .await;

    // --- The dashboard and the alert rules in deploy/ parse, and every metric they use
    // is one these daemons export.
    let mut exported = std::collections::BTreeSet::new();
    for addr in [
        leader_http.clone(),
        http["node2"].clone(),
        http["node3"].clone(),
        router.http.clone(),
    ] {
        let (_, text) = http_get(&addr, "/metrics").await.unwrap();
        for (series, _) in parse_metrics(&text) {
            exported.insert(series.split('{').next().unwrap().to_string());
        }
    }
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/monitoring");
    let rules: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(deploy.join("pgquorum-alerts.yml")).unwrap())
            .unwrap();
    let mut exprs: Vec<String> = Vec::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            assert!(rule["alert"].as_str().is_some(), "{rule:?}");
            assert!(rule["labels"]["severity"].as_str().is_some(), "{rule:?}");
            exprs.push(rule["expr"].as_str().expect("expr").to_string());
        }
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(deploy.join("grafana-dashboard.json")).unwrap())
            .unwrap();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            exprs.push(target["expr"].as_str().expect("expr").to_string());
        }
    }
    assert!(exprs.len() > 20, "{exprs:?}");
    for expr in &exprs {
        let used = expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("pgquorum_"));
        for name in used {
            assert!(
                exported.contains(name),
                "{name} (in {expr}) is not exported: {exported:?}"
            );
        }
    }
}

/// A second agent started with an existing node's name (a copied config, another
/// port) was accepted: the member's address flapped between the two. It is refused,
/// saying why, and the registered node keeps its address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_with_a_taken_name_is_refused() {
    let sandbox = start_sandbox(29600, 29610).await;
    let file = sandbox.file();
    let node3 = file.nodes.iter().find(|n| n.name == "node3").unwrap().clone();
    let node_dir = node3.data_dir.parent().unwrap().parent().unwrap().to_path_buf();
    let mut config: toml::Table =
        toml::from_str(&std::fs::read_to_string(node_dir.join("agent.toml")).unwrap()).unwrap();
    let copy = tempfile::Builder::new()
        .prefix("pgquorum-impostor-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(copy.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    config.remove("http");
    config.insert("peer_address".into(), "127.0.0.1:29659".into());
    let pg = config["postgres"].as_table_mut().unwrap();
    pg.insert("port".into(), 29619.into());
    pg.insert(
        "data_dir".into(),
        copy.path().join("data").display().to_string().into(),
    );
    let path = copy.path().join("agent.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    let log = copy.path().join("agent.log");
    let child = Command::new(find_binary(AGENT_BIN).unwrap())
        .arg("--config")
        .arg(&path)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _impostor = KillOnDrop(child);

    eventually("the impostor told why", WAIT, || async {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("claims the same name"))
    })
    .await;
    // Many heartbeats later, node3 is where it was and nothing changed hands.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = sandbox.status().await.unwrap();
    let n3 = node(&s, "node3");
    assert_eq!(
        (n3.port, n3.health.as_str()),
        (u32::from(node3.port), "HEALTHY"),
        "{s:?}"
    );
    let addrs = sandbox.client_addrs().join(",");
    let history = cli_json(&["--coordinators", &addrs, "history"]);
    assert!(
        !history.to_string().contains("member_changed"),
        "the name changed hands: {history}"
    );
}

/// `switchover --to` an asynchronous standby (refused "wait for it to catch up" even at
/// lag 0) goes through with `--wait`, which follows it to the end; every write node1
/// acknowledged, on a writer with `synchronous_commit = local` too, is on node3, and
/// the two primaries took turns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_to_an_async_standby_with_wait_loses_nothing() {
    let sandbox = start_sandbox(27800, 27810).await;
    let addrs = sandbox.client_addrs().join(",");
    sandbox
        .wait_for("node3 async", WAIT, |s| node(s, "node3").sync_state == "async")
        .await
        .unwrap();
    let writers = WritersOnEveryNode::start(&sandbox, "node1", Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let out = cli(&[
        "--json",
        "--coordinators",
        &addrs,
        "switchover",
        "--to",
        "node3",
        "--wait",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["primary"], "node3", "{done}");
    // Steps are shown as seen (a quick one may pass between two looks), the last always.
    assert!(
        stderr.contains("ms: done (node3 runs as primary)"),
        "steps shown: {stderr}"
    );
    writers.wait_writing("node3").await;
    writers.assert_one_primary_at_a_time("node1", "node3");

    let acked: Vec<i64> = writers.on("node1").all().iter().map(|a| a.id).collect();
    let new = pg(&sandbox, "node3").await;
    let rows = new
        .query("SELECT id FROM w WHERE id = ANY($1)", &[&acked])
        .await
        .unwrap();
    assert_eq!(rows.len(), acked.len(), "acknowledged by node1, missing on node3");
}

/// Hooks run with the event, role, cluster and epoch: every node's `on_start` at
/// first, and on a failover the new primary's `on_role_change` to primary (the
/// command Patroni users move a virtual IP with), once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_run_on_start_and_on_a_role_change_with_their_arguments() {
    let log = tempfile::Builder::new()
        .prefix("pgquorum-hooks-")
        .tempdir()
        .unwrap();
    let path = log.path().join("hooks.log");
    let script = format!("echo \"$PGQUORUM_NODE $*\" >> {}", path.display());
    let mut sandbox = pgquorum_tests::start_sandbox_with(27900, 27910, |s| {
        let hook = vec!["/bin/sh".to_string(), "-c".into(), script.clone(), "hook".into()];
        s.agent_hooks.on_start = hook.clone();
        s.agent_hooks.on_role_change = hook;
    })
    .await;
    let lines = || std::fs::read_to_string(&path).unwrap_or_default();
    eventually("every node's on_start", WAIT, || async {
        [
            "node1 on_start primary main 1",
            "node2 on_start standby main",
            "node3 on_start standby main",
        ]
        .iter()
        .all(|l| lines().contains(l))
    })
    .await;

    sandbox.kill_host("node1").unwrap();
    let new = wait_new_primary(&sandbox, "node1", 2, WAIT).await;
    let expected = format!("{new} on_role_change primary main 2");
    eventually(&expected, WAIT, || async { lines().contains(&expected) }).await;
    assert_eq!(lines().matches("on_role_change").count(), 1, "{}", lines());
}

/// `remove NODE`: a dead node raised CRITICAL forever and its slot kept WAL. Refused
/// for the primary, a sync standby, and a node whose agent reports; once its host is
/// gone it is forgotten: no alert, no member, its slot dropped on the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_forgets_a_dead_node_and_drops_its_slot() {
    let mut sandbox = start_sandbox(28500, 28510).await;
    let addrs = sandbox.client_addrs().join(",");
    let refused = |node: &str, why: &str| {
        let out = cli(&["--coordinators", &addrs, "remove", node]);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(2), "{node}: {err}");
        assert!(err.contains(why), "{node}: {err}");
    };
    refused("node1", "primary");
    refused("node2", "synchronous");
    refused("node3", "stop it");
    let primary = pg(&sandbox, "node1").await;
    async fn slots(p: &tokio_postgres::Client) -> i64 {
        p.query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'node3'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
    }
    assert_eq!(slots(&primary).await, 1, "node3's slot");

    sandbox.stop_node("node3").unwrap();
    sandbox
        .wait_for("node3 DISCONNECTED", WAIT, |s| {
            node(s, "node3").health == "DISCONNECTED"
        })
        .await
        .unwrap();
    // Its last report must first be older than the failure timeout.
    eventually("node3 removed", WAIT, || async {
        cli(&["--coordinators", &addrs, "remove", "node3"])
            .status
            .success()
    })
    .await;
    let status = cli_json(&["--coordinators", &addrs, "status"]);
    assert_eq!(status["nodes"].as_array().unwrap().len(), 2, "{status}");
    eventually("no alert about node3", WAIT, || async {
        !sandbox
            .alerts()
            .await
            .unwrap()
            .alerts
            .iter()
            .any(|a| a.node == "node3")
    })
    .await;
    eventually("node3's slot dropped", WAIT, || async {
        slots(&primary).await == 0
    })
    .await;
    let history = cli_json(&["--coordinators", &addrs, "history"]);
    assert!(history.to_string().contains("member_removed"), "{history}");
}

/// `maintenance on|off NODE`: refused for the primary without --allow-switchover; a
/// standby in maintenance is one WARNING, never a switchover target, out of reads and
/// metrics say so, and its agent leaves its stopped Postgres stopped until maintenance
/// ends; with --allow-switchover the primary is switched over first, then leaves the
/// sync set to a standby not in maintenance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_leaves_a_node_to_the_operator_and_switches_a_primary_over_first() {
    let sandbox = start_sandbox(30400, 30410).await;
    let addrs = sandbox.client_addrs().join(",");
    let out = cli(&["--coordinators", &addrs, "maintenance", "on", "node1"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("primary") && err.contains("--allow-switchover"),
        "{err}"
    );

    let on = cli_json(&["--coordinators", &addrs, "maintenance", "on", "node3"]);
    assert_eq!(on["in_maintenance"], serde_json::json!(["node3"]), "{on}");
    let status = cli_json(&["--coordinators", &addrs, "status"]);
    let node3 = &status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "node3")
        .unwrap();
    assert_eq!(node3["maintenance"], true, "{status}");
    let alerts = sandbox.alerts().await.unwrap().alerts;
    assert!(
        alerts
            .iter()
            .any(|a| a.node == "node3" && a.severity == "WARNING" && a.message.contains("maintenance")),
        "{alerts:?}"
    );
    let http = sandbox.file().coordinators[0].http.clone();
    let (_, text) = http_get(&http, "/metrics").await.unwrap();
    let samples = parse_metrics(&text);
    let flag = |node: &str| metric(&samples, "pgquorum_node_maintenance", &[("node", node)]);
    assert_eq!((flag("node3"), flag("node2")), (Some(1.0), Some(0.0)), "{text}");
    let map = sandbox.cluster_state().await.unwrap();
    assert!(map.maintenance.contains(&"node3".to_string()));
    let out = cli(&["--coordinators", &addrs, "switchover", "--to", "node3"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success() && err.contains("maintenance"), "{err}");

    // The operator stops its Postgres: left stopped over many heartbeats.
    sandbox.stop_postgres("node3").unwrap();
    sandbox
        .wait_for("node3 stopped", WAIT, |s| node(s, "node3").role == "stopped")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        sandbox.postmaster_pid("node3"),
        None,
        "the agent started it in maintenance"
    );
    assert_eq!(node(&sandbox.status().await.unwrap(), "node3").role, "stopped");
    cli_json(&["--coordinators", &addrs, "maintenance", "off", "node3"]);
    sandbox
        .wait_for("node3 streams again", WAIT, |s| {
            let n = node(s, "node3");
            n.role == "standby" && n.health == "HEALTHY" && !n.maintenance
        })
        .await
        .unwrap();

    let on = cli_json(&[
        "--coordinators",
        &addrs,
        "maintenance",
        "on",
        "node1",
        "--allow-switchover",
    ]);
    assert_eq!(on["switched_over_to"], "node2", "the sync standby: {on}");
    assert_eq!(on["in_maintenance"], serde_json::json!(["node1"]), "{on}");
    let s = sandbox
        .wait_for("node3 replaces node1 in the sync set", WAIT, |s| {
            s.sync_set == ["node3"] && node(s, "node1").role == "standby"
        })
        .await
        .unwrap();
    assert_eq!(s.primary, "node2");
    let history = cli_json(&["--coordinators", &addrs, "history"]).to_string();
    assert!(
        history.contains("maintenance_on") && history.contains("maintenance_off"),
        "{history}"
    );
}

/// `reinit NODE`: refused for the primary; a standby is stopped, its data directory
/// replaced by a fresh base backup (a file only its old directory had is gone), and it
/// streams again with every row; the history dates the request and the rebuild.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reinit_rebuilds_a_standby_from_a_fresh_base_backup() {
    let sandbox = start_sandbox(30600, 30610).await;
    let addrs = sandbox.client_addrs().join(",");
    let out = cli(&["--coordinators", &addrs, "reinit", "node1"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("primary"), "{err}");

    let primary = pg(&sandbox, "node1").await;
    primary
        .batch_execute("CREATE TABLE kept (v int); INSERT INTO kept SELECT generate_series(1, 1000)")
        .await
        .unwrap();
    let marker = sandbox
        .data_dir("node3")
        .unwrap()
        .join("only-in-the-old-directory");
    std::fs::write(&marker, "x").unwrap();
    let old_pid = sandbox.postmaster_pid("node3").unwrap();

    let done = cli_json(&[
        "--coordinators",
        &addrs,
        "reinit",
        "node3",
        "--wait",
        "--wait-timeout",
        "60",
    ]);
    assert_eq!(done["reinit_pending"], false, "{done}");
    assert!(!marker.exists(), "the data directory was not replaced");
    assert_ne!(sandbox.postmaster_pid("node3"), Some(old_pid), "not restarted");
    primary
        .execute("INSERT INTO kept VALUES (1001)", &[])
        .await
        .unwrap();
    eventually("node3 has every row", WAIT, || async {
        let Some(c) = pgquorum_tests::try_pg(&sandbox, "node3").await else {
            return false;
        };
        c.query_one("SELECT count(*) FROM kept", &[])
            .await
            .is_ok_and(|r| r.get::<_, i64>(0) == 1001)
    })
    .await;
    let history = cli_json(&["--coordinators", &addrs, "history"]);
    let events = history["events"].as_array().unwrap();
    let done = events
        .iter()
        .find(|e| e["kind"] == "reinit_done")
        .expect("reinit_done");
    assert!(done["duration_ms"].as_u64().is_some(), "{done}");
    assert!(
        events.iter().any(|e| e["kind"] == "reinit_requested"),
        "{history}"
    );
    let s = sandbox.status().await.unwrap();
    assert!(!node(&s, "node3").reinit_pending);
}

/// `switchover --at`: a schedule shows in `status`, can be cancelled, and otherwise the
/// leader starts it at its time (`--wait` follows it to the end); the history says it
/// was scheduled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_switchover_runs_at_its_time_or_is_cancelled() {
    let sandbox = start_sandbox(30800, 30810).await;
    let addrs = sandbox.client_addrs().join(",");
    let out = cli(&[
        "--coordinators",
        &addrs,
        "switchover",
        "--at",
        "2020-01-01T00:00:00Z",
    ]);
    assert_eq!(out.status.code(), Some(2), "a past time is refused");

    cli_json(&[
        "--coordinators",
        &addrs,
        "switchover",
        "--to",
        "node2",
        "--at",
        "+1h",
    ]);
    let status = cli_json(&["--coordinators", &addrs, "status"]);
    assert_eq!(status["scheduled_switchover"]["to"], "node2", "{status}");
    let again = cli(&["--coordinators", &addrs, "switchover", "--at", "+2h"]);
    assert_eq!(again.status.code(), Some(2), "one at a time");
    cli_json(&["--coordinators", &addrs, "switchover", "--cancel"]);
    let status = cli_json(&["--coordinators", &addrs, "status"]);
    assert!(status["scheduled_switchover"].is_null(), "{status}");

    let asked = Instant::now();
    let done = cli_json(&[
        "--coordinators",
        &addrs,
        "switchover",
        "--to",
        "node2",
        "--at",
        "+3s",
        "--wait",
    ]);
    assert_eq!(done["primary"], "node2", "{done}");
    assert!(
        asked.elapsed() >= Duration::from_millis(2_500),
        "started before its time"
    );
    let history = cli_json(&["--coordinators", &addrs, "history"]);
    let events = history["events"].as_array().unwrap();
    let started = events
        .iter()
        .find(|e| e["kind"] == "switchover_started")
        .expect("switchover_started");
    assert!(
        started["detail"].as_str().unwrap().contains("scheduled"),
        "{started}"
    );
    assert!(
        events.iter().any(|e| e["kind"] == "switchover_unscheduled"),
        "the cancel: {history}"
    );
}

/// `config set` + pending restart + a rolling restart, `reload`: parameters reach
/// every node (reloaded), a managed one is refused and a bad value is reported; one
/// that needs a restart is pending on every node until `restart --pending` restarts
/// the standbys first and the primary last, in place (no failover, a new postmaster).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_set_then_a_rolling_restart_of_what_is_pending() {
    let sandbox = start_sandbox(31200, 31210).await;
    let addrs = sandbox.client_addrs().join(",");
    let show = |node: &'static str, name: &'static str| {
        let sandbox = &sandbox;
        async move {
            let c = pgquorum_tests::try_pg(sandbox, node).await?;
            let row = c.query_one(&format!("SHOW {name}"), &[]).await.ok()?;
            Some(row.get::<_, String>(0))
        }
    };
    let set = cli_json(&["--coordinators", &addrs, "config", "set", "work_mem=16MB"]);
    assert_eq!(
        set["changed"],
        serde_json::json!(["work_mem: (unset) -> \"16MB\""]),
        "{set}"
    );
    for node in ["node1", "node2", "node3"] {
        eventually(&format!("{node} has work_mem 16MB"), WAIT, || async {
            show(node, "work_mem").await.as_deref() == Some("16MB")
        })
        .await;
    }
    let out = cli(&["--coordinators", &addrs, "config", "set", "port=6000"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("port is managed"), "{err}");
    let out = cli(&[
        "--json",
        "--coordinators",
        &addrs,
        "config",
        "set",
        "work_mem=banana",
    ]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "Postgres refuses it: {err}");
    assert!(err.contains("work_mem"), "{err}");
    assert!(err.contains("reverted"), "{err}");
    let shown = cli_json(&["--coordinators", &addrs, "config", "show"]);
    assert_eq!(shown["parameters"]["work_mem"], "16MB", "put back: {shown}");
    assert_eq!(
        show("node1", "work_mem").await.as_deref(),
        Some("16MB"),
        "the old value stays"
    );
    cli_json(&["--coordinators", &addrs, "config", "set", "work_mem=32MB"]);

    let epoch = sandbox.status().await.unwrap().epoch;
    let primary_pid = sandbox.postmaster_pid("node1");
    let set = cli_json(&[
        "--coordinators",
        &addrs,
        "config",
        "set",
        "max_locks_per_transaction=128",
    ]);
    assert_eq!(
        set["pending_restart"],
        serde_json::json!(["node1", "node2", "node3"]),
        "{set}"
    );
    let s = sandbox.status().await.unwrap();
    assert!(node(&s, "node2")
        .pending_restart_parameters
        .contains(&"max_locks_per_transaction".to_string()));
    let done = cli_json(&["--coordinators", &addrs, "restart", "--pending"]);
    assert_eq!(
        done["restarted"],
        serde_json::json!(["node2", "node3"]),
        "standbys: {done}"
    );
    assert_eq!(
        done["skipped"],
        serde_json::json!(["node1"]),
        "the primary needs --switchover"
    );
    let s = sandbox.status().await.unwrap();
    assert_eq!((s.epoch, s.primary.as_str()), (epoch, "node1"), "no failover");
    assert!(node(&s, "node1").pending_restart && !node(&s, "node2").pending_restart);
    let done = cli_json(&["--coordinators", &addrs, "restart", "--pending", "--switchover"]);
    assert_eq!(done["restarted"], serde_json::json!(["node1"]), "{done}");
    assert_eq!(done["switched_over_to"], "node2", "the sync standby");
    for node in ["node1", "node2", "node3"] {
        assert_eq!(
            show(node, "max_locks_per_transaction").await.as_deref(),
            Some("128"),
            "{node}"
        );
    }
    assert_ne!(sandbox.postmaster_pid("node1"), primary_pid, "a new postmaster");
    let s = sandbox
        .wait_for("nothing pending", WAIT, |s| {
            s.nodes.iter().all(|n| !n.pending_restart)
        })
        .await
        .unwrap();
    assert_eq!(s.primary, "node2");
    let again = cli_json(&["--coordinators", &addrs, "restart", "--pending"]);
    assert_eq!(
        again["restarted"],
        serde_json::json!([]),
        "nothing pending any more"
    );

    let reloaded = cli_json(&["--coordinators", &addrs, "reload", "--all"]);
    assert_eq!(reloaded["reloaded"].as_array().unwrap().len(), 3, "{reloaded}");
    let history = cli_json(&["--coordinators", &addrs, "history", "--limit", "100"]).to_string();
    for kind in ["config_changed", "restart_done", "reload_done"] {
        assert!(history.contains(kind), "{kind}: {history}");
    }
}

/// `cluster delete`: refused without --yes-i-am-sure and while agents report; once
/// every node is stopped the cluster is forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_is_deleted_only_once_its_agents_are_stopped() {
    let mut sandbox = start_sandbox(31600, 31610).await;
    let addrs = sandbox.client_addrs().join(",");
    let refused = |args: &[&str], why: &str| {
        let mut all = vec!["--coordinators", &addrs, "cluster", "delete", "main"];
        all.extend_from_slice(args);
        let out = cli(&all);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(why), "{err}");
    };
    refused(&[], "--yes-i-am-sure");
    refused(&["--yes-i-am-sure"], "still report");
    for node in ["node1", "node2", "node3"] {
        sandbox.stop_node(node).unwrap();
    }
    eventually("the cluster deleted", WAIT, || async {
        cli(&[
            "--coordinators",
            &addrs,
            "cluster",
            "delete",
            "main",
            "--yes-i-am-sure",
        ])
        .status
        .success()
    })
    .await;
    let list = cli_json(&["--coordinators", &addrs, "cluster", "list"]);
    assert_eq!(list, serde_json::json!([]), "no cluster left");
}

/// The STONITH hook: the leader runs it with CLUSTER NODE HOST PORT EPOCH when it
/// fails over from a primary whose agent is unreachable (its host killed), and the
/// history says how it ended; the failover goes on as ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stonith_hook_runs_for_a_primary_whose_host_is_gone() {
    let shot = tempfile::tempdir().unwrap();
    let out = shot.path().join("shot");
    let script = shot.path().join("stonith.sh");
    std::fs::write(&script, format!("#!/bin/sh\necho \"$@\" >> {}\n", out.display())).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let command = script.display().to_string();
    let mut sandbox = pgquorum_tests::start_sandbox_with(31800, 31810, |s| {
        s.stonith = Some(pgquorum_coordinator::failover::stonith::StonithConfig {
            command,
            timeout_ms: 5_000,
        });
    })
    .await;
    let addrs = sandbox.client_addrs().join(",");
    let port = sandbox.port("node1").unwrap();
    let epoch = sandbox.status().await.unwrap().epoch;
    sandbox.kill_host("node1").unwrap();
    let new = wait_new_primary(&sandbox, "node1", epoch + 1, WAIT).await;
    assert_eq!(new, "node2");
    eventually("the hook recorded", WAIT, || async {
        cli_json(&["--coordinators", &addrs, "history"])
            .to_string()
            .contains("STONITH hook for node1")
    })
    .await;
    let said = std::fs::read_to_string(&out).unwrap();
    assert_eq!(
        said,
        format!("main node1 127.0.0.1 {port} {}\n", epoch + 1),
        "run once, with its arguments"
    );
    let history = cli_json(&["--coordinators", &addrs, "history"]).to_string();
    assert!(history.contains("succeeded"), "{history}");
}
