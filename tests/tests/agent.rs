//! The agent facing bad input and broken surroundings: a bad config, a cluster that
//! does not exist, a Postgres that hangs. It says clearly what is wrong and keeps
//! going where going on makes sense.

use std::process::{Command, Stdio};
use std::time::Duration;

use pgquorum::launch::{children, find_binary};
use pgquorum_tests::{eventually, start_group, start_sandbox, KillOnDrop, ThawOnDrop};

const WAIT: Duration = Duration::from_secs(30);

fn agent_config(cluster: &str, coordinators: &[String], data_dir: &std::path::Path, port: u16) -> String {
    let coordinators: Vec<String> = coordinators.iter().map(|a| format!("{a:?}")).collect();
    format!(
        "cluster = {cluster:?}\nname = \"node1\"\nregion = \"us-west-2\"\ncoordinators = [{}]\n\
         [postgres]\ndata_dir = {:?}\nport = {port}\n",
        coordinators.join(", "),
        data_dir.display().to_string()
    )
}

#[test]
fn a_bad_agent_config_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let good = agent_config("main", &["127.0.0.1:1".into()], &dir.path().join("data"), 22790);
    let cases = [
        (good.replace("name = \"node1\"", "name = \"node 1\""), "`name`"),
        (
            good.replace(
                "region = \"us-west-2\"",
                "region = \"us-west-2\"\nworkload = \"batch\"",
            ),
            "`workload`",
        ),
        (good.replace("127.0.0.1:1", "nowhere"), "`coordinators`"),
        (good.replace("port = 22790", "port = 70000"), "port"),
        (
            good.replace("[postgres]", "[postgres]\nbin_dir = \"/nonexistent\""),
            "`postgres.bin_dir`",
        ),
        (good.replace("cluster = ", "clutser = "), "clutser"),
    ];
    for (i, (text, needle)) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("agent{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = Command::new(find_binary("pgquorum-agent").unwrap())
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "case {i}: {err}");
        assert!(
            err.contains(needle) && err.contains(&path.display().to_string()),
            "case {i}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_of_an_unknown_cluster_says_so_and_keeps_trying() {
    let group = start_group(22700, |_| {}).await;
    let data_dir = group.path().join("node1").join("data");
    let config = group.path().join("agent.toml");
    std::fs::write(&config, agent_config("nope", &group.addrs(), &data_dir, 22711)).unwrap();
    let log_path = group.path().join("agent.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut agent = KillOnDrop(
        Command::new(find_binary("pgquorum-agent").unwrap())
            .arg("--config")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    eventually("the agent to name the missing cluster", WAIT, || async {
        read_log().contains("cluster \"nope\" does not exist")
            && read_log().contains("pgquorum cluster create nope")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let still_running = agent.0.try_wait().unwrap().is_none();
    drop(agent);
    assert!(still_running, "the agent gave up: {}", read_log());
    assert!(
        !data_dir.exists(),
        "nothing was created for a cluster that does not exist"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_postgres_is_reported_and_left_alone() {
    let sandbox = start_sandbox(22800, 22810).await;
    let postmaster = sandbox.postmaster_pid("node3").unwrap();
    let mut pids = vec![postmaster];
    pids.extend(children(postmaster));

    // --- Every process of node3's Postgres frozen: its queries time out.
    let frozen = ThawOnDrop::freeze(pids);
    let status = sandbox
        .wait_for("node3 reported unreachable", WAIT, |s| {
            s.nodes
                .iter()
                .any(|n| n.name == "node3" && n.role == "unknown" && !n.error.is_empty())
        })
        .await
        .unwrap();
    let n3 = status.nodes.iter().find(|n| n.name == "node3").unwrap();
    assert_eq!(n3.health, "DISCONNECTED");
    assert!(
        n3.heartbeat_age_ms.unwrap() < 1000,
        "the agent itself keeps reporting: {n3:?}"
    );
    let alerts = sandbox.alerts().await.unwrap().alerts;
    assert!(
        alerts.iter().any(|a| a.node == "node3"
            && a.severity == "CRITICAL"
            && a.message.contains("Postgres does not answer")),
        "{alerts:?}"
    );
    // The agent does not restart a Postgres that runs but hangs.
    assert_eq!(sandbox.postmaster_pid("node3"), Some(postmaster));

    // --- Thawed, it serves and streams again: same postmaster.
    drop(frozen);
    sandbox
        .wait_for("node3 HEALTHY", WAIT, |s| {
            s.nodes.iter().any(|n| n.name == "node3" && n.health == "HEALTHY")
        })
        .await
        .unwrap();
    assert_eq!(sandbox.postmaster_pid("node3"), Some(postmaster));
}
