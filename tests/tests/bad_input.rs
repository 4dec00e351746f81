//! Bad input gets a clear error that names what is wrong, a non-zero exit, and no
//! change of state: config files, CLI arguments, gRPC requests, the wrong coordinator.

use std::process::Command;

use pgquorum::launch::{find_binary, COORDINATOR_BIN};
use pgquorum_client::pb;
use pgquorum_tests::{cli, create_cluster, only, read_cluster, start_group};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_malformed_coordinator_config_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "id = 1\nregion = \"r\"\nlisten = \"nonsense\"\ndata_dir = \"d\"\n",
            "`listen`",
        ),
        (
            "id = 1\nregion = \"r\"\nlisten = \"127.0.0.1:1\"\ndata_dir = \"d\"\nlissen = 3\n",
            "lissen",
        ),
        ("id = 1\nregion = \"r\"\nlisten = \"127.0.0.1:1\"\n", "data_dir"),
        ("id = = 1", "TOML"),
    ];
    for (i, (text, needle)) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = Command::new(find_binary(COORDINATOR_BIN).unwrap())
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "case {i}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains(needle) || (needle == "TOML" && err.contains("expected")),
            "case {i}: {err}"
        );
        assert!(
            err.contains(&path.display().to_string()),
            "case {i} names the file: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    let out = Command::new(find_binary(COORDINATOR_BIN).unwrap())
        .arg("--config")
        .arg("/nonexistent.toml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("cannot read"), "{}", stderr(&out));
}

#[test]
fn bad_cli_arguments_are_refused_before_anything_is_sent() {
    let out = cli(&["cluster", "list"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("PGQUORUM_COORDINATORS"), "{}", stderr(&out));

    let out = cli(&["--coordinators", "127.0.0.1", "cluster", "list"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("\"127.0.0.1\""), "{}", stderr(&out));

    let out = cli(&["raft", "add", "--id", "four", "--addr", "x:1", "--region", "r"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--id"), "{}", stderr(&out));

    let out = cli(&[
        "--coordinators",
        "127.0.0.1:1",
        "policy",
        "set",
        "main",
        "lease_ms",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("field=value"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_name_the_problem_and_change_nothing() {
    let group = start_group(21600, |_| {}).await;
    let client = group.client();
    create_cluster(&client, "main").await;
    let before = read_cluster(&client, "main").await;
    let addrs = group.addrs().join(",");

    // --- An invalid policy value names the field; an impossible combination too.
    let out = cli(&["--coordinators", &addrs, "policy", "set", "main", "lease_ms=soon"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("lease_ms"), "{}", stderr(&out));
    let out = cli(&[
        "--coordinators",
        &addrs,
        "policy",
        "set",
        "main",
        "failure_timeout_ms=5000",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("lease_ms") && stderr(&out).contains("failure_timeout_ms"),
        "{}",
        stderr(&out)
    );
    let out = cli(&[
        "--coordinators",
        &addrs,
        "cluster",
        "create",
        "other",
        "--set",
        "sync_mode=sometimes",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("sync_mode"), "{}", stderr(&out));

    // --- An unknown cluster is named.
    let out = cli(&["--coordinators", &addrs, "cluster", "show", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("\"nope\" does not exist"),
        "{}",
        stderr(&out)
    );
    let out = cli(&["--coordinators", &addrs, "cluster", "create", "main"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));

    // --- Draining a node that is not a member names it.
    let out = cli(&["--coordinators", &addrs, "drain", "ghost", "--cluster", "main"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("\"ghost\" is not a member"),
        "{}",
        stderr(&out)
    );

    // --- None of it changed anything.
    assert_eq!(read_cluster(&client, "main").await, before);
    let clusters = pgquorum_tests::cli_json(&["--coordinators", &addrs, "cluster", "list"]);
    assert_eq!(clusters.as_array().unwrap().len(), 1, "{clusters}");

    // --- A write sent to a follower is refused with the leader's name and address...
    let leader = group
        .wait_for_leader(std::time::Duration::from_secs(20))
        .await
        .unwrap();
    let follower = group.ids().into_iter().find(|&id| id != leader).unwrap();
    let faddr = group.addr_of(follower);
    let mut raw = only(&faddr).connect(&faddr).await.unwrap();
    let status = raw
        .create_cluster(pb::CreateClusterRequest {
            name: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status.message().contains(&format!("the leader is node {leader}")),
        "{}",
        status.message()
    );
    let hint = status
        .metadata()
        .get(pgquorum_client::metadata::LEADER_ADDR)
        .unwrap();
    assert_eq!(hint.to_str().unwrap(), group.addr_of(leader));
    // ...and so is a linearizable read, while a local read is served.
    let status = raw
        .get_cluster(pb::GetClusterRequest {
            name: "main".into(),
            consistency: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    let index = group.status_of(leader).await.unwrap().last_log_index;
    group
        .wait_applied(follower, index, std::time::Duration::from_secs(20))
        .await
        .unwrap();
    let local = raw
        .get_cluster(pb::GetClusterRequest {
            name: "main".into(),
            consistency: pb::ReadConsistency::Local as i32,
        })
        .await
        .unwrap();
    assert_eq!(local.into_inner().cluster.unwrap().name, "main");

    // --- The CLI, given only the follower, follows the redirect and succeeds.
    let out = cli(&[
        "--coordinators",
        &faddr,
        "policy",
        "set",
        "main",
        "lease_ms=3000",
        "failure_timeout_ms=2000",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let policy = pgquorum_tests::cli_json(&["--coordinators", &faddr, "policy", "get", "main"]);
    assert_eq!(policy["policy"]["lease_ms"], 3000);
    assert_eq!(policy["policy"]["failure_timeout_ms"], 2000);
}
