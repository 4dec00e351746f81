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

    // --- Failover: PgBouncer's main follows to node2.
    sandbox.kill_host("node1").unwrap();
    let node2 = sandbox.port("node2").unwrap() as i32;
    eventually("PgBouncer's main to reach node2", WAIT, || async {
        server_port_via_pgbouncer(24980).await == Some(node2)
    })
    .await;
    let text = std::fs::read_to_string(&databases).unwrap();
    assert!(
        text.contains(&format!("main = host=127.0.0.1 port={node2}")),
        "{text}"
    );
}
