//! Commands the operator runs on a node's events (Patroni's callbacks): moving a
//! virtual IP with the primary, telling a service discovery, paging. `on_start` when
//! Postgres comes up, `on_stop` when it goes down, `on_role_change` when it runs as a
//! primary after a standby or the other way round. Each runs as the command given
//! followed by `EVENT ROLE CLUSTER EPOCH` (also in `PGQUORUM_EVENT`, `PGQUORUM_ROLE`,
//! `PGQUORUM_CLUSTER`, `PGQUORUM_EPOCH`, `PGQUORUM_NODE`), one at a time in order, in
//! the background: a slow hook never holds up a heartbeat (the lease); past
//! `timeout_ms` it is killed. Every outcome is logged. Which events fire is
//! [`events`], pure.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// `[hooks]` in the agent's config: each a command and its first arguments.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HooksConfig {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_start: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_stop: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_role_change: Vec<String>,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
}

fn default_timeout() -> u64 {
    10_000
}

impl Default for HooksConfig {
    fn default() -> Self {
        HooksConfig {
            on_start: Vec::new(),
            on_stop: Vec::new(),
            on_role_change: Vec::new(),
            timeout_ms: default_timeout(),
        }
    }
}

/// A node event a hook may run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    Start,
    Stop,
    RoleChange,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Start => "on_start",
            Event::Stop => "on_stop",
            Event::RoleChange => "on_role_change",
        }
    }
}

/// What Postgres was at one observation: up or not, and its role.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    pub up: bool,
    /// "primary" or "standby" while up.
    pub role: String,
}

/// Whether an observation says anything: a server that did not answer in time (role
/// "unknown": busy, or hung) is not known to have stopped, and changes nothing.
pub fn tells(seen: &Seen) -> bool {
    seen.role != "unknown"
}

/// The events between two observations, each with the role it is reported with.
/// The first observation (`before` None) fires `on_start` if Postgres is up.
/// Demotion goes through a stop: `on_stop` with the role it had, then `on_start`
/// with the new one.
pub fn events(before: Option<&Seen>, now: &Seen) -> Vec<(Event, String)> {
    if !tells(now) {
        return Vec::new();
    }
    let Some(before) = before else {
        return if now.up {
            vec![(Event::Start, now.role.clone())]
        } else {
            Vec::new()
        };
    };
    match (before.up, now.up) {
        (false, true) => vec![(Event::Start, now.role.clone())],
        (true, false) => vec![(Event::Stop, before.role.clone())],
        (true, true) if before.role != now.role => vec![(Event::RoleChange, now.role.clone())],
        _ => Vec::new(),
    }
}

impl HooksConfig {
    /// No hook configured.
    pub fn is_empty(&self) -> bool {
        self.on_start.is_empty() && self.on_stop.is_empty() && self.on_role_change.is_empty()
    }

    fn command(&self, event: Event) -> &[String] {
        match event {
            Event::Start => &self.on_start,
            Event::Stop => &self.on_stop,
            Event::RoleChange => &self.on_role_change,
        }
    }

    /// The command line of `event`'s hook with its arguments and variables, if one is
    /// configured.
    fn command_for(&self, event: Event, role: &str, node: &str, cluster: &str, epoch: u64) -> Option<Run> {
        let (program, first) = self.command(event).split_first()?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(first)
            .args([event.as_str(), role, cluster, &epoch.to_string()])
            .env("PGQUORUM_EVENT", event.as_str())
            .env("PGQUORUM_ROLE", role)
            .env("PGQUORUM_CLUSTER", cluster)
            .env("PGQUORUM_EPOCH", epoch.to_string())
            .env("PGQUORUM_NODE", node)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        Some(Run {
            cmd,
            program: program.clone(),
            event,
            role: role.to_string(),
            timeout: Duration::from_millis(self.timeout_ms),
        })
    }
}

/// One hook to run.
pub struct Run {
    cmd: tokio::process::Command,
    program: String,
    event: Event,
    role: String,
    timeout: Duration,
}

/// Runs hooks one at a time, in the order they were fired, on a task of its own.
pub struct Runner {
    config: HooksConfig,
    queue: Option<tokio::sync::mpsc::UnboundedSender<Run>>,
}

impl Runner {
    pub fn new(config: HooksConfig) -> Runner {
        Runner { config, queue: None }
    }

    /// Queues the hook of `event`, if one is configured.
    pub fn fire(&mut self, event: Event, role: &str, node: &str, cluster: &str, epoch: u64) {
        let Some(run) = self.config.command_for(event, role, node, cluster, epoch) else {
            return;
        };
        let queue = self.queue.get_or_insert_with(|| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(run_in_order(rx));
            tx
        });
        let _ = queue.send(run);
    }
}

async fn run_in_order(mut queue: tokio::sync::mpsc::UnboundedReceiver<Run>) {
    while let Some(mut run) = queue.recv().await {
        let started = std::time::Instant::now();
        let outcome = match tokio::time::timeout(run.timeout, run.cmd.output()).await {
            Err(_) => Err(format!("killed after {} ms", run.timeout.as_millis())),
            Ok(Err(e)) => Err(format!("cannot run: {e}")),
            Ok(Ok(out)) if out.status.success() => Ok(()),
            Ok(Ok(out)) => Err(format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        };
        let (hook, role, program) = (run.event.as_str(), &run.role, &run.program);
        let ms = started.elapsed().as_millis() as u64;
        match outcome {
            Ok(()) => info!(hook, %role, %program, ms, "hook ran"),
            Err(why) => warn!(hook, %role, %program, ms, "hook failed: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(up: bool, role: &str) -> Seen {
        Seen {
            up,
            role: role.into(),
        }
    }

    #[test]
    fn starts_stops_and_role_changes_fire_once_each() {
        assert_eq!(
            events(None, &seen(true, "standby")),
            [(Event::Start, "standby".into())]
        );
        assert_eq!(events(None, &seen(false, "stopped")), []);
        let standby = seen(true, "standby");
        assert_eq!(events(Some(&standby), &standby), [], "nothing changed");
        assert_eq!(
            events(Some(&standby), &seen(true, "primary")),
            [(Event::RoleChange, "primary".into())],
            "promoted"
        );
        assert_eq!(
            events(Some(&seen(true, "primary")), &seen(false, "stopped")),
            [(Event::Stop, "primary".into())],
            "fenced or stopped: the role it had"
        );
        assert_eq!(
            events(Some(&seen(false, "stopped")), &seen(true, "standby")),
            [(Event::Start, "standby".into())],
            "rejoined"
        );
        let busy = seen(false, "unknown");
        assert_eq!(
            events(Some(&seen(true, "primary")), &busy),
            [],
            "too slow to answer is not a stop"
        );
        assert!(!tells(&busy));
    }
}
