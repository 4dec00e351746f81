//! The commit-time lease check inside a real PostgreSQL 15 (`pg/pgquorum_lease.c`,
//! loaded as the agent configures it): a write commits only while the lease file
//! holds a deadline in the future; a commit during which the lease ran out is not
//! acknowledged. Postgres is started by the agent's own `PostgresCtl`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use pgquorum_agent::config::AgentConfig;
use pgquorum_agent::guard::{boottime_ns, write_deadline, GuardFiles};
use pgquorum_agent::postgres::ctl::{kill_instance, postmaster_pid, PostgresCtl};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

const PORT: u16 = 26800;

/// Kills the instance on drop, also when the test fails.
struct KillOnDrop<'a>(&'a Path);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(pid) = postmaster_pid(self.0) {
            kill_instance(pid);
        }
    }
}

async fn try_connect() -> Option<Client> {
    let conninfo = format!("host=127.0.0.1 port={PORT} user=postgres dbname=postgres connect_timeout=2");
    let (client, conn) = tokio_postgres::connect(&conninfo, NoTls).await.ok()?;
    tokio::spawn(conn);
    Some(client)
}

async fn connect() -> Client {
    try_connect().await.expect("connect to the test server")
}

fn lease_for(files: &GuardFiles, ms: i64) {
    let deadline = (boottime_ns() as i64 + ms * 1_000_000).max(1) as u64;
    write_deadline(&files.lease, deadline).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_commits_a_write_only_under_a_live_lease() {
    let dir = tempfile::tempdir().unwrap();
    // The Postgres OS user must reach the data directory's parent.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data_dir = dir.path().join("pg").join("data");
    let config = AgentConfig::parse(&format!(
        "cluster = \"main\"\nname = \"node1\"\nregion = \"r\"\ncoordinators = [\"127.0.0.1:1\"]\n\
         [postgres]\ndata_dir = {:?}\nport = {PORT}\n\
         [postgres.parameters]\nmax_prepared_transactions = \"4\"\n",
        data_dir.display().to_string()
    ))
    .unwrap();
    assert!(config.postgres.commit_check, "on unless switched off");
    let files = GuardFiles::next_to(&data_dir);
    let ctl = PostgresCtl::new(config.postgres, "node1").unwrap();
    ctl.prepare_dirs().unwrap();
    ctl.init_primary().await.unwrap();
    let _kill = KillOnDrop(&data_dir);
    lease_for(&files, 60_000);
    ctl.start().await.unwrap();

    let db = connect().await;
    let preload: String = db
        .query_one("SHOW shared_preload_libraries", &[])
        .await
        .unwrap()
        .get(0);
    assert!(preload.contains(".pgquorum-lease.so"), "{preload}");
    db.batch_execute("CREATE TABLE t (id int)").await.unwrap();
    db.execute("INSERT INTO t VALUES (1)", &[]).await.unwrap();

    // Run out, zero (no lease), missing, damaged: every commit of a write refused,
    // as on a standby; reads and transactions that wrote nothing go on.
    let refused = |why: &'static str| {
        let db = &db;
        async move {
            let err = db.execute("INSERT INTO t VALUES (2)", &[]).await.expect_err(why);
            assert_eq!(
                err.code(),
                Some(&SqlState::READ_ONLY_SQL_TRANSACTION),
                "{why}: {err:?}"
            );
            let n: i64 = db.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
            assert_eq!(n, 1, "{why}: the refused row is not there");
        }
    };
    lease_for(&files, -1);
    refused("lease run out").await;
    write_deadline(&files.lease, 0).unwrap();
    refused("no lease").await;
    std::fs::remove_file(&files.lease).unwrap();
    refused("no lease file").await;
    std::fs::write(&files.lease, "99999999999999999999 0\n").unwrap();
    refused("a damaged lease file").await;
    let future = boottime_ns() + 60_000_000_000;
    std::fs::write(&files.lease, format!("{future} {} 0000-another-boot\n", !future)).unwrap();
    refused("a lease from another boot").await;
    db.batch_execute("BEGIN; SELECT 1; COMMIT").await.unwrap();

    lease_for(&files, 60_000);
    db.execute("INSERT INTO t VALUES (3)", &[]).await.unwrap();

    // A prepared transaction is finished only under a live lease.
    db.batch_execute("BEGIN; INSERT INTO t VALUES (5); PREPARE TRANSACTION 'p'")
        .await
        .unwrap();
    lease_for(&files, -1);
    let err = db
        .batch_execute("COMMIT PREPARED 'p'")
        .await
        .expect_err("no lease");
    assert_eq!(err.code(), Some(&SqlState::READ_ONLY_SQL_TRANSACTION), "{err:?}");
    lease_for(&files, 60_000);
    db.batch_execute("COMMIT PREPARED 'p'").await.unwrap();

    // A commit during which the lease runs out: it waits for a synchronous standby
    // that is not there; the lease ends; the wait is released. The commit is durable
    // here but must not be acknowledged: the backend ends without replying.
    let set_sync = |names: &'static str| {
        let db = &db;
        async move {
            let sql = format!("ALTER SYSTEM SET synchronous_standby_names = '{names}'");
            db.batch_execute(&sql).await.unwrap();
            db.batch_execute("SELECT pg_reload_conf()").await.unwrap();
        }
    };
    set_sync("nobody").await;
    let waiting = loop {
        // A new session reads the reloaded configuration when it starts.
        let c = connect().await;
        let names: String = c
            .query_one("SHOW synchronous_standby_names", &[])
            .await
            .unwrap()
            .get(0);
        if names == "nobody" {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let commit = tokio::spawn(async move { waiting.execute("INSERT INTO t VALUES (4)", &[]).await });
    let mut waits = false;
    for _ in 0..500 {
        let row = db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'",
                &[],
            )
            .await
            .unwrap();
        if row.get::<_, i64>(0) == 1 {
            waits = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        waits && !commit.is_finished(),
        "the commit waits for the synchronous standby"
    );
    lease_for(&files, -1);
    set_sync("").await;
    let outcome = tokio::time::timeout(Duration::from_secs(10), commit)
        .await
        .unwrap()
        .unwrap();
    let err = outcome.expect_err("a commit that ended after the lease must not be acknowledged");
    assert_eq!(err.code(), None, "no reply at all, the connection ended: {err:?}");

    // It was committed locally (the server restarts after the backend's end and
    // recovers it): durable, never acknowledged.
    let mut count = None;
    for _ in 0..300 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Some(c) = try_connect().await {
            if let Ok(row) = c.query_one("SELECT count(*) FROM t WHERE id = 4", &[]).await {
                count = Some(row.get::<_, i64>(0));
                break;
            }
        }
    }
    assert_eq!(
        count,
        Some(1),
        "the unacknowledged commit is in the recovered server"
    );

    // NOTIFY takes its transaction id only after the first check: the second one
    // still ends the session before it is told of the commit.
    let db = connect().await;
    let err = db.batch_execute("NOTIFY pgquorum").await.expect_err("no lease");
    assert_eq!(err.code(), None, "no reply at all, the connection ended: {err:?}");
}
