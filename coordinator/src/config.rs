//! The coordinator's TOML config file.
//!
//! ```toml
//! id = 1
//! region = "us-west-2"
//! listen = "0.0.0.0:7101"        # where to accept gRPC (Raft, admin, agents, routers)
//! advertise = "10.0.1.11:7101"   # how others reach this node; defaults to `listen`
//! data_dir = "/var/lib/pgquorum/coordinator"
//! http = "0.0.0.0:7161"           # optional: Prometheus /metrics
//!
//! # Only read on the very first start of a brand-new group, by each founding member.
//! # A node that joins a running group leaves this out and is added with
//! # `pgquorum raft add` instead.
//! [[initial_members]]
//! id = 1
//! addr = "10.0.1.11:7101"
//! region = "us-west-2"
//!
//! [raft]                          # optional; LAN defaults shown
//! heartbeat_interval_ms = 50
//! election_timeout_min_ms = 80
//! election_timeout_max_ms = 160
//! snapshot_every_logs = 5000
//! logs_kept_after_snapshot = 1000
//! ```
//!
//! Unknown keys are refused (a typo must not silently fall back to a default), and every
//! refusal names the file and the field.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::raft::NodeId;
use crate::state::policy::is_valid_name;
use crate::Error;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub id: NodeId,
    pub region: String,
    pub listen: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    pub data_dir: PathBuf,
    /// `ip:port` serving `/metrics` (Prometheus text). None: not served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    #[serde(default)]
    pub initial_members: Vec<MemberConfig>,
    #[serde(default)]
    pub raft: RaftTuning,
    /// The STONITH hook the leader runs for a failed primary whose agent is
    /// unreachable (see [`crate::failover::stonith`]). None: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stonith: Option<crate::failover::stonith::StonithConfig>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    pub id: NodeId,
    pub addr: String,
    pub region: String,
}

/// Raft timing. The defaults suit one region; across regions size them from the
/// round-trip time (e.g. heartbeat 200–300 ms, election 1–2 s) and measure with
/// `pgquorum bench raft`.
///
/// They bound how long a leader change leaves the primary without renewals: after
/// the leader goes, openraft's followers wait out their leader lease
/// (`election_timeout_max_ms`) and a random election timeout (checked on a tick), a
/// split vote costs another timeout, a candidate whose log is behind another's waits
/// `2 × election_timeout_max_ms` more, and the new leader then commits once and runs
/// a quorum round before it grants: about 300–500 ms with these defaults, past 700 ms
/// on a loaded machine. The cluster's `lease_ms` must outlast that with room to spare
/// (at least `4 × election_timeout_max_ms` plus a heartbeat), or a leader change costs
/// a failover (see docs/faults.md). openraft
/// also gives each AppendEntries `heartbeat_interval_ms` to complete, a follower's
/// fsync included: keep it above the disks' sync time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftTuning {
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many entries since the last one.
    pub snapshot_every_logs: u64,
    /// Entries kept behind a snapshot, so a briefly absent follower catches up from the
    /// log instead of needing the whole snapshot.
    pub logs_kept_after_snapshot: u64,
}

impl Default for RaftTuning {
    fn default() -> Self {
        RaftTuning {
            heartbeat_interval_ms: 50,
            election_timeout_min_ms: 80,
            election_timeout_max_ms: 160,
            snapshot_every_logs: 5000,
            logs_kept_after_snapshot: 1000,
        }
    }
}

/// Checks that `addr` is `host:port` with a usable port; names `field` if not.
pub fn check_host_port(field: &str, addr: &str) -> Result<(), (String, String)> {
    let bad = |m: String| Err((field.to_string(), m));
    let Some((host, port)) = addr.rsplit_once(':') else {
        return bad(format!("expected host:port, got {addr:?}"));
    };
    if host.is_empty() {
        return bad(format!("missing host in {addr:?}"));
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => bad(format!("port must be 1-65535, got {port:?} in {addr:?}")),
        Ok(_) => Ok(()),
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let where_ = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            path: where_.clone(),
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(&text).map_err(|message| Error::Config {
            path: where_,
            message,
        })
    }

    /// Parses and validates config text; the error names the offending field.
    pub fn parse(text: &str) -> Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|e| e.to_string().trim().to_string())?;
        config
            .validate()
            .map_err(|(field, message)| format!("field `{field}`: {message}"))?;
        Ok(config)
    }

    /// The address other coordinators and clients use for this node.
    pub fn advertise_addr(&self) -> &str {
        self.advertise.as_deref().unwrap_or(&self.listen)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let bad = |field: &str, m: String| Err((field.to_string(), m));
        if self.id == 0 {
            return bad("id", "must be a positive integer (0 is reserved)".into());
        }
        if !is_valid_name(&self.region) {
            return bad(
                "region",
                format!(
                    "{:?} is not a region name (letters, digits, '-', '_', '.')",
                    self.region
                ),
            );
        }
        if self.listen.parse::<SocketAddr>().is_err() {
            return bad(
                "listen",
                format!("expected ip:port such as 0.0.0.0:7101, got {:?}", self.listen),
            );
        }
        if let Some(a) = &self.advertise {
            check_host_port("advertise", a)?;
        }
        if let Some(h) = &self.http {
            if h.parse::<std::net::SocketAddr>().is_err() {
                return bad(
                    "http",
                    format!("expected ip:port such as 0.0.0.0:7161, got {h:?}"),
                );
            }
        }
        if self.data_dir.as_os_str().is_empty() {
            return bad("data_dir", "must not be empty".into());
        }
        if let Some(s) = &self.stonith {
            if s.command.trim().is_empty() {
                return bad(
                    "stonith.command",
                    "must not be empty (leave [stonith] out for none)".into(),
                );
            }
            if !(1..=600_000).contains(&s.timeout_ms) {
                return bad(
                    "stonith.timeout_ms",
                    format!("must be 1-600000, got {}", s.timeout_ms),
                );
            }
        }
        let mut ids = BTreeSet::new();
        for (i, m) in self.initial_members.iter().enumerate() {
            let field = format!("initial_members[{i}]");
            if m.id == 0 {
                return bad(&format!("{field}.id"), "must be a positive integer".into());
            }
            if !ids.insert(m.id) {
                return bad(
                    &format!("{field}.id"),
                    format!("node id {} is listed twice", m.id),
                );
            }
            check_host_port(&format!("{field}.addr"), &m.addr)?;
            if !is_valid_name(&m.region) {
                return bad(
                    &format!("{field}.region"),
                    format!("{:?} is not a region name", m.region),
                );
            }
        }
        if !self.initial_members.is_empty() {
            match self.initial_members.iter().find(|m| m.id == self.id) {
                None => {
                    return bad(
                        "initial_members",
                        format!(
                            "does not list this node (id {}); a founding member must list itself",
                            self.id
                        ),
                    )
                }
                Some(me) if me.addr != self.advertise_addr() => {
                    return bad(
                        "initial_members",
                        format!(
                            "lists this node at {:?} but it advertises {:?}; they must match",
                            me.addr,
                            self.advertise_addr()
                        ),
                    )
                }
                Some(_) => {}
            }
        }
        let r = &self.raft;
        if r.heartbeat_interval_ms == 0 {
            return bad("raft.heartbeat_interval_ms", "must be greater than 0".into());
        }
        if r.election_timeout_min_ms <= r.heartbeat_interval_ms {
            return bad(
                "raft.election_timeout_min_ms",
                format!(
                    "must be greater than raft.heartbeat_interval_ms ({}), got {}",
                    r.heartbeat_interval_ms, r.election_timeout_min_ms
                ),
            );
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return bad(
                "raft.election_timeout_max_ms",
                format!(
                    "must be greater than raft.election_timeout_min_ms ({}), got {}",
                    r.election_timeout_min_ms, r.election_timeout_max_ms
                ),
            );
        }
        if r.snapshot_every_logs == 0 {
            return bad("raft.snapshot_every_logs", "must be greater than 0".into());
        }
        Ok(())
    }

    /// openraft's config from the tuning section.
    pub fn openraft_config(&self) -> Result<openraft::Config, Error> {
        let r = &self.raft;
        let config = openraft::Config {
            cluster_name: "pgquorum".to_string(),
            heartbeat_interval: r.heartbeat_interval_ms,
            election_timeout_min: r.election_timeout_min_ms,
            election_timeout_max: r.election_timeout_max_ms,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(r.snapshot_every_logs),
            max_in_snapshot_log_to_keep: r.logs_kept_after_snapshot,
            install_snapshot_timeout: 2_000.max(r.election_timeout_max_ms),
            ..Default::default()
        };
        config.validate().map_err(|e| Error::Config {
            path: "raft".into(),
            message: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        id = 1
        region = "us-west-2"
        listen = "127.0.0.1:7101"
        data_dir = "/tmp/x"
        [[initial_members]]
        id = 1
        addr = "127.0.0.1:7101"
        region = "us-west-2"
        [[initial_members]]
        id = 2
        addr = "127.0.0.1:7102"
        region = "us-east-1"
    "#;

    #[test]
    fn good_config_parses() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.initial_members.len(), 2);
        assert_eq!(c.raft, RaftTuning::default());
        c.openraft_config().unwrap();
    }

    /// The shipped examples must stay loadable (parsed only: their addresses are not
    /// this machine's).
    #[test]
    fn deploy_examples_parse() {
        for (example, regions) in [("two-region", 2), ("two-region-tiebreaker", 3)] {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../deploy")
                .join(example);
            let mut n = 0;
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                let c = Config::parse(&std::fs::read_to_string(&path).unwrap())
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert_eq!(c.initial_members.len(), 5);
                let mut seen: Vec<&str> = c.initial_members.iter().map(|m| m.region.as_str()).collect();
                seen.sort();
                seen.dedup();
                assert_eq!(seen.len(), regions, "{}", path.display());
                n += 1;
            }
            assert_eq!(n, 5, "{example}");
        }
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                GOOD.replace("id = 1\n        region", "id = 0\n        region"),
                "`id`",
            ),
            (
                GOOD.replace(
                    "127.0.0.1:7101\"\n        data_dir",
                    "localhost\"\n        data_dir",
                ),
                "`listen`",
            ),
            (
                GOOD.replace("us-west-2\"\n        listen", "us west\"\n        listen"),
                "`region`",
            ),
            (GOOD.replace("id = 2", "id = 1"), "initial_members[1].id"),
            (
                GOOD.replace("127.0.0.1:7102", "127.0.0.1"),
                "initial_members[1].addr",
            ),
            (
                GOOD.replace("addr = \"127.0.0.1:7101\"", "addr = \"127.0.0.1:7109\""),
                "`initial_members`",
            ),
            (
                format!("{GOOD}\n[raft]\nelection_timeout_min_ms = 10"),
                "raft.election_timeout_min_ms",
            ),
            (GOOD.replace("data_dir", "datadir"), "datadir"),
            (format!("{GOOD}\n[stonith]\ncommand = \" \""), "stonith.command"),
            (
                format!("{GOOD}\n[stonith]\ncommand = \"/bin/true\"\ntimeout_ms = 0"),
                "stonith.timeout_ms",
            ),
            (format!("{GOOD}\n[stonith]\ncmd = \"/bin/true\""), "cmd"),
            (
                GOOD.replace("id = 1\n        region", "id = \"one\"\n        region"),
                "id",
            ),
        ];
        for (text, needle) in cases {
            let e = Config::parse(&text).unwrap_err();
            assert!(e.contains(needle), "expected {needle} in: {e}");
        }
    }
}
