//! pgquorum-router against a real sandbox: connections follow the primary through a
//! failover, old-primary connections are closed, reads follow replica lag.

use std::time::Duration;

use pgquorum::launch::Sandbox;
use pgquorum_tests::{cli, eventually, pg, start_sandbox};

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

    let primary = pg(&sandbox, "node1").await;
    primary
        .batch_execute("CREATE TABLE w (id serial PRIMARY KEY)")
        .await
        .unwrap();
    let replica = pg(&sandbox, "node3").await;
    replica
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    let writer = tokio::spawn(async move {
        for _ in 0..600 {
            if primary
                .execute("INSERT INTO w DEFAULT VALUES", &[])
                .await
                .is_err()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    });
    eventually("reporting reads avoid the lagging node3", WAIT, || async {
        via(&reporting).await.is_some_and(|(_, p)| p != node3)
    })
    .await;
    replica
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    writer.abort();
    eventually("reporting reads back on node3", WAIT, || async {
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
    let addrs = sandbox.client().addrs().join(",");
    let out = cli(&[
        "--coordinators",
        &addrs,
        "policy",
        "set",
        "main",
        "lease_ms=30000",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
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
