//! The agent's TOML config file.
//!
//! ```toml
//! cluster = "main"                 # created beforehand: pgquorum cluster create main
//! name = "node1"                   # unique in the cluster; also the replication
//!                                  # application_name and slot name
//! region = "us-west-2"
//! workload = "general"             # realtime, reporting, analytics, backup, dr, general
//! priority = 100                   # higher wins among equally caught-up candidates
//! nofailover = false               # never promote this node automatically
//! sync_eligible = true             # may be chosen as a synchronous standby
//! coordinators = ["10.0.1.11:7101", "10.0.1.12:7101", "10.0.2.11:7101"]
//! heartbeat_interval_ms = 100      # until the cluster policy says otherwise
//! peer_address = "10.0.1.21:7201" # this agent's own gRPC service (the failsafe: a
//!                                  # primary that no coordinator leader answers asks
//!                                  # its standbys' agents here for promises); listened
//!                                  # on and advertised; absent: no failsafe with it
//! http = "10.0.1.21:8008"          # health endpoints for load balancers (/primary,
//!                                  # /replica?lag=MS, /sync, /async, /health) and
//!                                  # /metrics; absent: none
//!
//! [hooks]                          # optional; each run with EVENT ROLE CLUSTER EPOCH appended
//! on_role_change = ["/usr/local/bin/move-vip", "eth0"]
//! on_start = ["/usr/local/bin/notify"]
//! on_stop = ["/usr/local/bin/notify"]
//! timeout_ms = 10000
//!
//! [postgres]
//! bin_dir = "/usr/lib/postgresql/15/bin"
//! data_dir = "/var/lib/pgquorum/node1/data"   # absolute
//! port = 5432
//! listen_addresses = "10.0.1.21"
//! advertise_host = "10.0.1.21"     # how clients and other members reach it
//! os_user = "postgres"             # Postgres runs as this user when the agent is root
//! superuser = "postgres"
//! password = ""                    # empty: trust authentication (local sandboxes only)
//! database = "postgres"
//! # replication_user = "replicator"  # defaults to superuser
//! # log_file = "/var/log/pgquorum/node1-postgres.log"
//! # pg_hba = [                     # when given, pg_hba.conf holds exactly these lines
//! #   "host all all 10.0.0.0/16 scram-sha-256",        # (written with the node's settings)
//! #   "host replication replicator 10.0.0.0/16 scram-sha-256",
//! # ]
//! commit_check = true              # Postgres refuses commits once the lease ran out
//!                                  # (a library the agent loads; see docs/leases.md)
//! [postgres.parameters]            # extra postgresql.conf settings
//! shared_buffers = "1GB"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::Error;

fn default_workload() -> String {
    "general".into()
}
fn default_priority() -> i32 {
    100
}
fn default_true() -> bool {
    true
}
fn default_heartbeat() -> u64 {
    100
}
fn default_bin_dir() -> PathBuf {
    PathBuf::from("/usr/lib/postgresql/15/bin")
}
fn default_localhost() -> String {
    "127.0.0.1".into()
}
fn default_postgres() -> String {
    "postgres".into()
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub cluster: String,
    pub name: String,
    pub region: String,
    #[serde(default = "default_workload")]
    pub workload: String,
    #[serde(default = "default_priority")]
    pub priority: i32,
    #[serde(default)]
    pub nofailover: bool,
    #[serde(default = "default_true")]
    pub sync_eligible: bool,
    pub coordinators: Vec<String>,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_interval_ms: u64,
    /// `ip:port` of this agent's PeerService (the failsafe), listened on and told to
    /// the coordinators: this host's address as the other members reach it. None: it
    /// serves none and cannot promise, so no primary can use the failsafe while this
    /// node is a member. Set it on every member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_address: Option<String>,
    /// `ip:port` of the HTTP health endpoints and `/metrics`. None: not served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    /// Commands run on start, stop and role change (see [`crate::hooks`]).
    #[serde(default, skip_serializing_if = "crate::hooks::HooksConfig::is_empty")]
    pub hooks: crate::hooks::HooksConfig,
    pub postgres: PostgresConfig,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    #[serde(default = "default_bin_dir")]
    pub bin_dir: PathBuf,
    pub data_dir: PathBuf,
    pub port: u16,
    #[serde(default = "default_localhost")]
    pub listen_addresses: String,
    #[serde(default = "default_localhost")]
    pub advertise_host: String,
    #[serde(default = "default_postgres")]
    pub os_user: String,
    #[serde(default = "default_postgres")]
    pub superuser: String,
    #[serde(default)]
    pub password: String,
    #[serde(default = "default_postgres")]
    pub database: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_file: Option<PathBuf>,
    /// The lines of `pg_hba.conf`, written whenever the agent writes the node's
    /// settings (after initdb, a base backup or a rewind, and on every repoint), as
    /// Patroni's `postgresql.pg_hba`; empty: the file is left as initdb or the base
    /// backup made it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pg_hba: Vec<String>,
    /// Load the commit-time lease check into Postgres (`shared_preload_libraries`,
    /// `pgquorum.lease_file`): a commit of a write is refused once the lease file's
    /// deadline has passed, and not acknowledged when it passed during the commit.
    /// Needs an agent built with the PostgreSQL 15 server headers.
    #[serde(default = "default_true")]
    pub commit_check: bool,
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
}

impl PostgresConfig {
    pub fn replication_user(&self) -> &str {
        self.replication_user.as_deref().unwrap_or(&self.superuser)
    }

    /// Where Postgres writes its server log: `log_file`, else next to the data directory.
    pub fn log_file(&self) -> PathBuf {
        self.log_file.clone().unwrap_or_else(|| {
            self.data_dir
                .parent()
                .unwrap_or(Path::new("/"))
                .join("postgres.log")
        })
    }
}

/// Names of members, clusters, regions: what the coordinators accept.
fn is_valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<AgentConfig, Error> {
        let where_ = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            path: where_.clone(),
            message: format!("cannot read: {e}"),
        })?;
        AgentConfig::parse(&text).map_err(|message| Error::Config {
            path: where_,
            message,
        })
    }

    pub fn parse(text: &str) -> Result<AgentConfig, String> {
        let c: AgentConfig = toml::from_str(text).map_err(|e| e.to_string().trim().to_string())?;
        c.validate()
            .map_err(|(field, m)| format!("field `{field}`: {m}"))?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let bad = |f: &str, m: String| Err((f.to_string(), m));
        for (field, value) in [
            ("cluster", &self.cluster),
            ("name", &self.name),
            ("region", &self.region),
        ] {
            if !is_valid_name(value) {
                return bad(
                    field,
                    format!("{value:?} is not a valid name (1-63 letters, digits, '-', '_', '.')"),
                );
            }
        }
        if !pgquorum_client::WORKLOADS.contains(&self.workload.as_str()) {
            return bad(
                "workload",
                format!(
                    "unknown workload {:?}; known: {}",
                    self.workload,
                    pgquorum_client::WORKLOADS.join(", ")
                ),
            );
        }
        if let Err(e) = pgquorum_client::parse_addrs(&self.coordinators.join(",")) {
            return bad("coordinators", e.to_string());
        }
        if let Some(addr) = &self.http {
            if let Err(e) = addr.parse::<std::net::SocketAddr>() {
                return bad(
                    "http",
                    format!("{addr:?} is not an IP address and port (e.g. \"10.0.1.21:8008\"): {e}"),
                );
            }
        }
        if let Some(addr) = &self.peer_address {
            if let Err(e) = addr.parse::<std::net::SocketAddr>() {
                return bad(
                    "peer_address",
                    format!("{addr:?} is not an IP address and port (e.g. \"10.0.1.21:7201\"): {e}"),
                );
            }
        }
        if self.heartbeat_interval_ms < 10 {
            return bad(
                "heartbeat_interval_ms",
                format!("at least 10, got {}", self.heartbeat_interval_ms),
            );
        }
        let pg = &self.postgres;
        if pg.port == 0 {
            return bad("postgres.port", "must be 1-65535".into());
        }
        if !pg.data_dir.is_absolute() {
            return bad(
                "postgres.data_dir",
                format!("must be an absolute path, got {}", pg.data_dir.display()),
            );
        }
        for tool in ["initdb", "pg_ctl", "pg_basebackup", "postgres"] {
            if !pg.bin_dir.join(tool).is_file() {
                return bad(
                    "postgres.bin_dir",
                    format!("{} has no {tool}", pg.bin_dir.display()),
                );
            }
        }
        for (field, value) in [
            ("postgres.superuser", &pg.superuser),
            ("postgres.database", &pg.database),
        ] {
            if value.is_empty() || value.contains(['\'', '"', ' ']) {
                return bad(field, format!("{value:?} is not a plain Postgres identifier"));
            }
        }
        if pg.commit_check && !crate::postgres::commit_check::built() {
            return bad(
                "postgres.commit_check",
                crate::postgres::commit_check::NOT_BUILT.into(),
            );
        }
        if pg.advertise_host.is_empty() {
            return bad("postgres.advertise_host", "must not be empty".into());
        }
        for (i, line) in pg.pg_hba.iter().enumerate() {
            if line.trim().is_empty() || line.contains(['\n', '\r']) {
                return bad(
                    &format!("postgres.pg_hba[{i}]"),
                    format!("{line:?} is not one pg_hba.conf line"),
                );
            }
        }
        Ok(())
    }

    /// The member description sent with every heartbeat.
    pub fn member_spec(&self) -> pgquorum_client::pb::MemberSpec {
        pgquorum_client::pb::MemberSpec {
            name: self.name.clone(),
            region: self.region.clone(),
            host: self.postgres.advertise_host.clone(),
            port: self.postgres.port.into(),
            workload: self.workload.clone(),
            priority: self.priority,
            nofailover: self.nofailover,
            sync_eligible: self.sync_eligible,
            agent_addr: self.peer_address.clone().unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> String {
        r#"
cluster = "main"
name = "node1"
region = "us-west-2"
coordinators = ["127.0.0.1:7101"]
[postgres]
data_dir = "/tmp/pgq/node1/data"
port = 25001
"#
        .to_string()
    }

    #[test]
    fn defaults_and_errors() {
        let c = AgentConfig::parse(&good()).unwrap();
        assert_eq!(
            (c.workload.as_str(), c.priority, c.sync_eligible),
            ("general", 100, true)
        );
        assert_eq!(c.postgres.replication_user(), "postgres");
        assert_eq!(
            c.postgres.log_file(),
            PathBuf::from("/tmp/pgq/node1/postgres.log")
        );
        let cases = [
            (good().replace("node1\"\nregion", "node 1\"\nregion"), "`name`"),
            (
                good().replace(
                    "region = \"us-west-2\"",
                    "region = \"us-west-2\"\nworkload = \"batch\"",
                ),
                "`workload`",
            ),
            (good().replace("127.0.0.1:7101", "127.0.0.1"), "`coordinators`"),
            (
                good().replace("/tmp/pgq/node1/data", "data"),
                "`postgres.data_dir`",
            ),
            (good().replace("port = 25001", "port = 0"), "`postgres.port`"),
            (
                good().replace("port = 25001", "port = 25001\nbin_dir = \"/nonexistent\""),
                "`postgres.bin_dir`",
            ),
            (good().replace("port = 25001", "prot = 25001"), "prot"),
            (
                good().replace(
                    "port = 25001",
                    "port = 25001\npg_hba = [\"host all all ::1/128 trust\", \" \"]",
                ),
                "`postgres.pg_hba[1]`",
            ),
        ];
        for (text, needle) in cases {
            let e = AgentConfig::parse(&text).unwrap_err();
            assert!(e.contains(needle), "expected {needle} in {e}");
        }
    }
}
