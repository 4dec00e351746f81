//! PgBouncer mode end to end, with Debian's real PgBouncer: the router rewrites its
//! `[databases]` and reloads it, so clients pooled by PgBouncer follow a failover.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use pgquorum::launch::find_binary;
use pgquorum_router::config::{PgBouncerConfig, RouterConfig};
use pgquorum_tests::{eventually, start_sandbox, KillOnDrop};

const WAIT: Duration = Duration::from_secs(30);
const PGBOUNCER: &str = "/usr/sbin/pgbouncer";

async fn server_port_via_pgbouncer(port: u16) -> Option<i32> {
    let conninfo = format!("host=127.0.0.1 port={port} user=postgres dbname=main connect_timeout=2");
    let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(conn);
    client
        .query_one("SELECT inet_server_port()", &[])
        .await
        .ok()
        .map(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_follows_the_primary_through_a_failover() {
    assert!(
        std::path::Path::new(PGBOUNCER).exists(),
        "PgBouncer is not installed (.ci/run installs it)"
    );
    let mut sandbox = start_sandbox(24900, 24910).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
    let databases = d.join("databases.ini");

    // --- The router in PgBouncer mode writes the [databases] file.
    let router_cfg = RouterConfig {
        cluster: "main".into(),
        coordinators: sandbox.client().addrs().to_vec(),
        rw: "127.0.0.1:24990".into(),
        ro: Default::default(),
        hold_ms: 1000,
        metrics: None,
        workers: None,
        stale_after_ms: 3000,
        stop_writes_after_ms: 30_000,
        fallback: Default::default(),
        pgbouncer: Some(PgBouncerConfig {
            databases_file: databases.clone(),
            pidfile: d.join("pgbouncer.pid"),
            database: "main".into(),
            dbname: "postgres".into(),
        }),
    };
    let router_toml = d.join("router.toml");
    std::fs::write(&router_toml, toml::to_string(&router_cfg).unwrap()).unwrap();
    let _router = KillOnDrop(
        Command::new(find_binary("pgquorum-router").unwrap())
            .arg("--config")
            .arg(&router_toml)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("router.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    eventually("the router to write the databases file", WAIT, || async {
        std::fs::read_to_string(&databases).is_ok_and(|t| t.contains("main = "))
    })
    .await;

    // --- A real PgBouncer including it (as the postgres user when we are root).
    std::fs::write(d.join("userlist.txt"), "\"postgres\" \"\"\n").unwrap();
    let ini = d.join("pgbouncer.ini");
    std::fs::write(
        &ini,
        format!(
            "[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = 24980\nunix_socket_dir =\nauth_type = trust\n\
             auth_file = {d}/userlist.txt\npool_mode = session\npidfile = {d}/pgbouncer.pid\n\
             logfile = {d}/pgbouncer.log\nserver_lifetime = 5\n%include {d}/databases.ini\n",
            d = d.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(PGBOUNCER);
    if nix::unistd::Uid::effective().is_root() {
        cmd.args(["-u", "postgres"]);
    }
    let _pgbouncer = KillOnDrop(
        cmd.arg(&ini)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let node1 = sandbox.port("node1").unwrap() as i32;
    eventually("PgBouncer's main to reach node1", WAIT, || async {
        server_port_via_pgbouncer(24980).await == Some(node1)
    })
    .await;

    // --- Switchover node1 -> node2: main follows, and a session on the read-only alias
    // of node3, which the switchover does not involve, goes on (every alias was dropped
    // while the map had no primary: "FATAL: database removed").
    let node3 = sandbox.port("node3").unwrap() as i32;
    let conninfo = "host=127.0.0.1 port=24980 user=postgres dbname=main_reporting connect_timeout=2";
    let (reader, conn) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let on = |r: tokio_postgres::Row| r.get::<_, i32>(0);
    assert_eq!(
        on(reader.query_one("SELECT inet_server_port()", &[]).await.unwrap()),
        node3
    );
    let addrs = sandbox.client_addrs().join(",");
    let out = pgquorum_tests::cli(&["--coordinators", &addrs, "switchover", "--to", "node2", "--wait"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let node2 = sandbox.port("node2").unwrap() as i32;
    eventually("PgBouncer's main to reach node2", WAIT, || async {
        server_port_via_pgbouncer(24980).await == Some(node2)
    })
    .await;
    let still = reader.query_one("SELECT inet_server_port()", &[]).await;
    assert_eq!(
        still.map(on).map_err(|e| e.to_string()),
        Ok(node3),
        "the reporting session goes on"
    );

    // --- Failover: PgBouncer's main follows to whoever is promoted.
    let epoch = sandbox.status().await.unwrap().epoch;
    sandbox.kill_host("node2").unwrap();
    let new = pgquorum_tests::wait_new_primary(&sandbox, "node2", epoch + 1, WAIT).await;
    let new_port = sandbox.port(&new).unwrap() as i32;
    eventually("PgBouncer's main to reach the new primary", WAIT, || async {
        server_port_via_pgbouncer(24980).await == Some(new_port)
    })
    .await;
    let text = std::fs::read_to_string(&databases).unwrap();
    assert!(
        text.contains(&format!("main = host=127.0.0.1 port={new_port}")),
        "{text}"
    );
}
