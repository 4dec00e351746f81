//! The STONITH hook: a command the leader runs when it starts a failover from a
//! primary whose agent is unreachable (Shoot The Other Node In The Head: power off the
//! host through its BMC, a cloud API, a PDU). It runs before the failover counts on
//! the old primary's lease, in addition to it: whatever the hook answers, the lease
//! still has to run out before anything is promoted (a hook that reports success can
//! be wrong). Its outcome goes to the log and the cluster's history.
//!
//! The command is run by `sh -c` with the arguments `CLUSTER NODE HOST PORT EPOCH`
//! (EPOCH: the failover's new epoch) and the same as `PGQUORUM_*` variables.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::observe::health::fresh;
use crate::observe::ClusterReports;
use crate::state::{Cluster, Command};

/// `[stonith]` in the coordinator's config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StonithConfig {
    /// Run by `sh -c`, with CLUSTER NODE HOST PORT EPOCH as arguments.
    pub command: String,
    /// Killed past this.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    10_000
}

/// The node a failover's start asks to be shot, if the hook applies to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub cluster: String,
    pub node: String,
    pub host: String,
    pub port: u16,
    pub epoch: u64,
}

/// The target of `command` proposed for `cluster` (as it is before the command): the
/// old primary of a failover (not a switchover: its agent stops it cleanly) whose agent
/// does not report. Pure.
pub fn target(cluster: &Cluster, reports: &ClusterReports, command: &Command) -> Option<Target> {
    let Command::StartFailover {
        old_primary,
        from_epoch,
        kind,
        ..
    } = command
    else {
        return None;
    };
    if kind == "switchover" || fresh(cluster, reports, old_primary).is_some() {
        return None;
    }
    let m = cluster.members.get(old_primary)?;
    Some(Target {
        cluster: cluster.name.clone(),
        node: old_primary.clone(),
        host: m.host.clone(),
        port: m.port,
        epoch: from_epoch + 1,
    })
}

/// Runs the hook for `target`; how it ended, in words for the history.
pub async fn run(config: &StonithConfig, target: &Target) -> String {
    let started = Instant::now();
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(format!("{} \"$@\"", config.command))
        .arg("stonith")
        .args([
            &target.cluster,
            &target.node,
            &target.host,
            &target.port.to_string(),
            &target.epoch.to_string(),
        ])
        .env("PGQUORUM_CLUSTER", &target.cluster)
        .env("PGQUORUM_NODE", &target.node)
        .env("PGQUORUM_HOST", &target.host)
        .env("PGQUORUM_PORT", target.port.to_string())
        .env("PGQUORUM_EPOCH", target.epoch.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return format!("could not be started: {e}"),
    };
    let limit = Duration::from_millis(config.timeout_ms);
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Err(_) => format!("killed after {} ms (timeout_ms)", config.timeout_ms),
        Ok(Err(e)) => format!("failed: {e}"),
        Ok(Ok(out)) => {
            let said = String::from_utf8_lossy(&out.stderr);
            let said = said.lines().next().unwrap_or("").trim();
            let ms = started.elapsed().as_millis();
            match (out.status.success(), said.is_empty()) {
                (true, _) => format!("succeeded in {ms} ms"),
                (false, true) => format!("failed ({}) in {ms} ms", out.status),
                (false, false) => format!("failed ({}) in {ms} ms: {said}", out.status),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::health::tests::{cluster, reports, standby, stopped};

    fn start(kind: &str) -> Command {
        Command::StartFailover {
            cluster: "main".into(),
            from_epoch: 1,
            old_primary: "node1".into(),
            candidate: None,
            accept_data_loss: false,
            kind: kind.into(),
            reason: "test".into(),
            actor: "coordinator".into(),
            at_ms: 0,
            scheduled: None,
        }
    }

    #[test]
    fn only_a_failover_from_a_primary_whose_agent_is_silent_is_shot() {
        let c = cluster();
        let silent = reports(vec![("node2", standby("0/3000000", 0), 10)]);
        let t = target(&c, &silent, &start("failover")).expect("its agent is silent");
        assert_eq!((t.node.as_str(), t.epoch), ("node1", 2));
        assert_eq!(target(&c, &silent, &start("switchover")), None, "stopped cleanly");
        let reporting = reports(vec![("node1", stopped(), 10)]);
        assert_eq!(
            target(&c, &reporting, &start("failover")),
            None,
            "its agent fences it"
        );
    }

    #[tokio::test]
    async fn the_hook_gets_its_arguments_and_its_outcome_is_told() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("args");
        let t = Target {
            cluster: "main".into(),
            node: "node1".into(),
            host: "10.0.0.1".into(),
            port: 5432,
            epoch: 2,
        };
        let script = dir.path().join("stonith.sh");
        std::fs::write(
            &script,
            format!("#!/bin/sh\necho \"$@ $PGQUORUM_EPOCH\" > {}\n", out.display()),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let ok = StonithConfig {
            command: script.display().to_string(),
            timeout_ms: 5_000,
        };
        assert!(run(&ok, &t).await.starts_with("succeeded"));
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "main node1 10.0.0.1 5432 2 2\n"
        );
        let failing = StonithConfig {
            command: "sh -c 'echo BMC unreachable >&2; exit 3'".into(),
            timeout_ms: 5_000,
        };
        let said = run(&failing, &t).await;
        assert!(
            said.contains("failed") && said.contains("BMC unreachable"),
            "{said}"
        );
        let slow = StonithConfig {
            command: "sleep 5; true".into(),
            timeout_ms: 100,
        };
        assert!(run(&slow, &t).await.contains("killed after 100 ms"));
    }
}
