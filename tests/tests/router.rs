//! pgquorum-router against a real sandbox: connections follow the primary through a
//! failover, old-primary connections are closed, reads follow replica lag.

use std::time::Duration;

use pgquorum::launch::Sandbox;
use std::io::Read;

use pgquorum_tests::{eventually, make_lag, pg, start_sandbox, KillOnDrop};

const WAIT: Duration = Duration::from_secs(30);

/// Connects through a router address; returns the client and the port of the Postgres
/// server it reached.
async fn via(addr: &str) -> Option<(tokio_postgres::Client, i32)> {
    let (host, port) = addr.rsplit_once(':')?;
    let conninfo = format!("host={host} port={port} user=postgres dbname=postgres connect_timeout=3");
    let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(conn);
    let port: i32 = client
        .query_one("SELECT inet_server_port()", &[])
        .await
        .ok()?
        .get(0);
    Some((client, port))
}

fn port_of(sandbox: &Sandbox, node: &str) -> i32 {
    sandbox.port(node).unwrap() as i32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_write_connections_follow_the_primary_through_a_failover() {
    let mut sandbox = start_sandbox(24500, 24510).await;
    let (rw, _) = sandbox.router_addrs().unwrap();
    eventually("the router routes to node1", WAIT, || async {
        via(&rw)
            .await
            .is_some_and(|(_, p)| p == port_of(&sandbox, "node1"))
    })
    .await;
    let (old, _) = via(&rw).await.unwrap();
    old.batch_execute("CREATE TABLE r (id int)").await.unwrap();

    sandbox.kill_host("node1").unwrap();
    // The connection to the old primary is closed, not left hanging.
    eventually("the old connection closed", WAIT, || async {
        old.is_closed() || old.simple_query("SELECT 1").await.is_err()
    })
    .await;
    // New connections reach the new primary, and only it.
    eventually("the router routes to node2", WAIT, || async {
        via(&rw)
            .await
            .is_some_and(|(_, p)| p == port_of(&sandbox, "node2"))
    })
    .await;
    for _ in 0..5 {
        let (c, p) = via(&rw).await.expect("a connection through the router");
        assert_eq!(p, port_of(&sandbox, "node2"), "never the fenced primary");
        c.execute("INSERT INTO r VALUES (1)", &[]).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_connections_avoid_a_replica_past_its_lag_threshold() {
    let sandbox = start_sandbox(24600, 24610).await;
    let (_, ro) = sandbox.router_addrs().unwrap();
    let reporting = ro["reporting"].clone();
    let node3 = port_of(&sandbox, "node3");
    eventually("reporting reads go to node3", WAIT, || async {
        via(&reporting).await.is_some_and(|(_, p)| p == node3)
    })
    .await;

    let lag = make_lag(&sandbox, "node1", "node3").await;
    eventually("reporting reads avoid the lagging node3", WAIT, || async {
        via(&reporting).await.is_some_and(|(_, p)| p != node3)
    })
    .await;
    lag.catch_up().await;
    eventually("reporting reads back on node3", WAIT, || async {
        via(&reporting).await.is_some_and(|(_, p)| p == node3)
    })
    .await;

    // An operator's drain moves reads off at once (the map carries it) and back.
    let coordinators = sandbox.client().addrs().join(",");
    let drained = pgquorum_tests::cli_json(&["--coordinators", &coordinators, "drain", "node3"]);
    assert_eq!(
        drained["drained_nodes"],
        serde_json::json!(["node3"]),
        "{drained}"
    );
    eventually("reporting reads avoid the drained node3", WAIT, || async {
        via(&reporting).await.is_some_and(|(_, p)| p != node3)
    })
    .await;
    for _ in 0..5 {
        let (_, p) = via(&reporting).await.expect("a read connection");
        assert_ne!(p, node3, "a drained replica takes no new reads");
    }
    pgquorum_tests::cli_json(&["--coordinators", &coordinators, "undrain", "node3"]);
    eventually("reporting reads back on the undrained node3", WAIT, || async {
        via(&reporting).await.is_some_and(|(_, p)| p == node3)
    })
    .await;
}

#[test]
fn a_router_config_naming_an_unknown_class_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("router.toml");
    std::fs::write(
        &path,
        "cluster = \"main\"\ncoordinators = [\"127.0.0.1:1\"]\nrw = \"127.0.0.1:24790\"\n[ro]\nbatch = \"127.0.0.1:24791\"\n",
    )
    .unwrap();
    let bin = pgquorum::launch::find_binary("pgquorum-router").unwrap();
    let out = std::process::Command::new(bin)
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ro.batch") && err.contains("unknown workload class"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_primary_new_connections_wait_then_get_a_postgres_error() {
    let mut sandbox = start_sandbox(24700, 24710).await;
    let (rw, _) = sandbox.router_addrs().unwrap();
    // A long lease keeps the failover waiting for the fence, with no primary published.
    pgquorum_tests::set_policy(&sandbox.client(), "main", "lease_ms", "30000").await;
    sandbox.kill_host("node1").unwrap();
    sandbox
        .wait_for("no primary", WAIT, |s| s.primary.is_empty())
        .await
        .unwrap();

    let (host, port) = rw.rsplit_once(':').unwrap();
    let conninfo = format!("host={host} port={port} user=postgres dbname=postgres connect_timeout=20");
    let started = std::time::Instant::now();
    let err = match tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await {
        Ok(_) => panic!("a connection without a primary"),
        Err(e) => e,
    };
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("a Postgres error, not {err}"));
    assert_eq!(db.code().code(), "57P03");
    assert!(db.message().contains("no primary available"), "{}", db.message());
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "held for the configured time first"
    );
}

const PGBENCH: &str = "/usr/lib/postgresql/15/bin/pgbench";

/// Runs pgbench with `args` through `port`; returns whether it succeeded and its output.
fn pgbench(port: u16, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(PGBENCH)
        .args(["-n", "-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(args)
        .arg("postgres")
        .output()
        .expect("run pgbench");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The router's count of read-write connections routed to `node`, from its metrics.
fn rw_routes_to(metrics: &str, node: &str) -> u64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(metrics).expect("router metrics");
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines()
        .filter(|l| l.starts_with("pgquorum_router_routes_total{"))
        .filter(|l| l.contains("port=\"rw\"") && l.contains(&format!("backend=\"{node}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_through_the_read_write_port_follows_a_host_failover() {
    let mut sandbox = start_sandbox(25100, 25110).await;
    let (rw, _) = sandbox.router_addrs().unwrap();
    let rw_port: u16 = rw.rsplit_once(':').unwrap().1.parse().unwrap();
    let metrics = format!("127.0.0.1:{}", rw_port + 5);
    let node2 = port_of(&sandbox, "node2");
    pg(&sandbox, "node1")
        .await
        .batch_execute("CREATE TABLE ledger (id bigserial PRIMARY KEY, phase int, port int)")
        .await
        .unwrap();
    let script = sandbox.path().join("ledger.sql");
    std::fs::write(
        &script,
        "INSERT INTO ledger (phase, port) VALUES (:phase, inet_server_port());\n",
    )
    .unwrap();
    let script = script.to_str().unwrap().to_string();

    // Phase 1: a long pgbench run through the router; the primary's host dies under it.
    let mut bench = KillOnDrop(
        std::process::Command::new(PGBENCH)
            .args([
                "-n",
                "-h",
                "127.0.0.1",
                "-p",
                &rw_port.to_string(),
                "-U",
                "postgres",
            ])
            .args(["-c", "4", "-T", "60", "-D", "phase=1", "-f", &script, "postgres"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start pgbench"),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    sandbox.kill_host("node1").unwrap();
    // Its connections are closed, not left hanging: pgbench ends long before -T 60.
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = bench.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "pgbench still runs 40 s after its primary died: connections left hanging"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut out = String::new();
    for pipe in [
        bench
            .0
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read>),
        bench
            .0
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read>),
    ]
    .into_iter()
    .flatten()
    {
        let mut pipe = pipe;
        pipe.read_to_string(&mut out).unwrap();
    }
    assert!(
        !status.success(),
        "pgbench lost its primary yet reported success:\n{out}"
    );
    assert!(out.contains("aborted"), "clients should be aborted:\n{out}");

    // Phase 2: new connections (one per transaction) reach the new primary, and only it.
    eventually("the router routes to node2", WAIT, || async {
        via(&rw).await.is_some_and(|(_, p)| p == node2)
    })
    .await;
    let to_old_after_move = rw_routes_to(&metrics, "node1");
    let (ok, out) = pgbench(
        rw_port,
        &["-C", "-c", "2", "-t", "50", "-D", "phase=2", "-f", &script],
    );
    assert!(ok, "pgbench through the router after the failover:\n{out}");
    assert!(out.contains("number of failed transactions: 0"), "{out}");

    // Phase 3: the old primary comes back (as a standby); the read-write port still
    // never sends anyone to it.
    sandbox.start_agent("node1").unwrap();
    sandbox
        .wait_for("node1 back as a healthy standby", WAIT, |s| {
            s.nodes
                .iter()
                .any(|n| n.name == "node1" && n.role == "standby" && n.health == "HEALTHY")
        })
        .await
        .unwrap();
    let (ok, out) = pgbench(
        rw_port,
        &["-C", "-c", "2", "-t", "50", "-D", "phase=3", "-f", &script],
    );
    assert!(
        ok,
        "pgbench through the router after the old primary rejoined:\n{out}"
    );
    assert_eq!(
        rw_routes_to(&metrics, "node1"),
        to_old_after_move,
        "a read-write connection reached the fenced primary after the map moved"
    );
    let rows = pg(&sandbox, "node2")
        .await
        .query(
            "SELECT phase, port, count(*) FROM ledger WHERE phase > 1 GROUP BY phase, port ORDER BY phase",
            &[],
        )
        .await
        .unwrap();
    let seen: Vec<(i32, i32, i64)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(
        seen,
        [(2, node2, 100), (3, node2, 100)],
        "every write landed on node2"
    );
}

/// A primary that died before the coordinators noticed: a new read-write connection
/// was answered at once with "FATAL: cannot reach node1". It is held, and reaches the
/// new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_during_failure_detection_is_held_until_the_new_primary() {
    let mut sandbox = start_sandbox(23900, 23910).await;
    let (rw, _) = sandbox.router_addrs().unwrap();
    eventually("the router routes to node1", WAIT, || async {
        via(&rw)
            .await
            .is_some_and(|(_, p)| p == port_of(&sandbox, "node1"))
    })
    .await;
    sandbox.kill_host("node1").unwrap();
    // At once, before any coordinator can have noticed (failure timeout).
    let (host, port) = rw.rsplit_once(':').unwrap();
    let conninfo = format!("host={host} port={port} user=postgres dbname=postgres connect_timeout=10");
    let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .expect("held, not refused");
    tokio::spawn(conn);
    let reached: i32 = client
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(reached, port_of(&sandbox, "node2"), "the new primary");
}

/// With every replica drained, every read-only port sent reads to the primary, the
/// analytics port included. Analytics now refuses (its default fallback), saying why;
/// the general port still falls back to the primary, counted in the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_replica_drained_analytics_refuses_and_general_falls_back_to_the_primary() {
    let sandbox = start_sandbox(24800, 24810).await;
    let (_, ro) = sandbox.router_addrs().unwrap();
    let addrs = sandbox.client().addrs().join(",");
    for node in ["node2", "node3"] {
        pgquorum_tests::cli_ok(&["--coordinators", &addrs, "drain", node]);
    }
    let primary = port_of(&sandbox, "node1");
    eventually("general reads on the primary", WAIT, || async {
        via(&ro["general"]).await.is_some_and(|(_, p)| p == primary)
    })
    .await;
    let (host, port) = ro["analytics"].rsplit_once(':').unwrap();
    let conninfo = format!("host={host} port={port} user=postgres dbname=postgres connect_timeout=30");
    let err = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .err()
        .expect("analytics refused, not sent to the primary");
    let message = err
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(message.contains("no readable analytics replica"), "{err:?}");
    let metrics = sandbox.file().router.unwrap().http;
    let (_, text) = pgquorum_tests::http_get(&metrics, "/metrics").await.unwrap();
    let m = pgquorum_tests::parse_metrics(&text);
    assert!(
        pgquorum_tests::metric(
            &m,
            "pgquorum_router_fallbacks_total",
            &[("port", "ro_general"), ("to", "primary")]
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );
}
