//! The router's TOML config file.
//!
//! ```toml
//! cluster = "main"
//! coordinators = ["10.0.1.11:7101", "10.0.1.12:7101", "10.0.2.11:7101"]
//! rw = "0.0.0.0:6543"                  # read-write: always the current primary
//! hold_ms = 5000                       # how long a new read-write connection waits for
//!                                      # a primary during a failover before an error
//! metrics = "127.0.0.1:9187"           # Prometheus /metrics (optional)
//! stale_after_ms = 3000                # no coordinator vouched for the map this long:
//!                                      # it is stale (metric, log)
//! stop_writes_after_ms = 30000         # stale this long: new read-write connections
//!                                      # are refused (Stolon's proxy rule); 0: never
//! workers = 2                          # threads carrying connections (default: half the cores)
//! [ro]                                 # read-only ports, per workload class
//! realtime = "0.0.0.0:6544"
//! reporting = "0.0.0.0:6545"
//! analytics = "0.0.0.0:6546"
//! general = "0.0.0.0:6547"
//! [fallback]                           # no readable replica of the class: primary,
//! analytics = "refuse"                 # any_replica or refuse (defaults: analytics
//! reporting = "any_replica"            # refuse, the others primary)
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::route::Fallback;

/// Workload classes with a read-only port (backup replicas are never routed; `dr`
/// replicas take reads through the other classes' fallbacks).
pub const READ_CLASSES: &[&str] = &["realtime", "reporting", "analytics", "general"];

fn default_hold() -> u64 {
    5000
}
fn default_stale_after() -> u64 {
    3000
}
fn default_stop_writes_after() -> u64 {
    30_000
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    pub cluster: String,
    pub coordinators: Vec<String>,
    pub rw: String,
    #[serde(default)]
    pub ro: BTreeMap<String, String>,
    #[serde(default = "default_hold")]
    pub hold_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
    /// Threads carrying client connections (see [`crate::workers`]). Unset: half
    /// the cores, at least one — a router usually shares its host with the clients
    /// or Postgres, and one worker already carries 40,000+ small transactions a
    /// second (measured: one worker used less CPU per transaction than two on 2 cores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// Drive a PgBouncer as well (see [`PgBouncerConfig`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgbouncer: Option<PgBouncerConfig>,
    /// The map counts as stale once no coordinator has vouched for it this long (the
    /// Raft leader repeats it every second while it has a quorum; so `coordinators`
    /// must list every voting coordinator).
    #[serde(default = "default_stale_after")]
    pub stale_after_ms: u64,
    /// Stale this long, new read-write connections are refused until a coordinator
    /// vouches again (Stolon's proxy rule: a primary the router cannot hear about may
    /// have been replaced); 0: never. Read-only ports keep routing.
    #[serde(default = "default_stop_writes_after")]
    pub stop_writes_after_ms: u64,
    /// Per read-only class, where its connections go when none of its replicas is
    /// readable: `primary`, `any_replica` or `refuse` (see [`Fallback`]). Unset:
    /// `refuse` for analytics, `primary` for the others.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fallback: BTreeMap<String, Fallback>,
}

impl RouterConfig {
    /// The fallback of a read-only class.
    pub fn fallback_for(&self, class: &str) -> Fallback {
        self.fallback
            .get(class)
            .copied()
            .unwrap_or_else(|| Fallback::default_for(class))
    }
}

/// PgBouncer mode: on every map change the router rewrites a `[databases]` file that
/// `pgbouncer.ini` includes (`%include FILE`) and tells PgBouncer to reload (SIGHUP),
/// for users who already pool with PgBouncer.
///
/// It defines `<database>` for the primary (absent while a failover is in flight, so
/// no new connection reaches a fenced primary) and `<database>_<class>` for each
/// read-only class, routed like the router's own read-only ports.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgBouncerConfig {
    pub databases_file: std::path::PathBuf,
    /// PgBouncer's pid file (its `pidfile` setting).
    pub pidfile: std::path::PathBuf,
    /// The alias clients use.
    pub database: String,
    /// The real database on the Postgres servers.
    #[serde(default = "default_dbname")]
    pub dbname: String,
}

fn default_dbname() -> String {
    "postgres".into()
}

impl RouterConfig {
    pub fn worker_count(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get() / 2)
                .unwrap_or(1)
                .max(1)
        })
    }

    pub fn load(path: &Path) -> Result<RouterConfig, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("config {}: cannot read: {e}", path.display()))?;
        RouterConfig::parse(&text).map_err(|e| format!("config {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<RouterConfig, String> {
        let c: RouterConfig = toml::from_str(text).map_err(|e| e.to_string().trim().to_string())?;
        let addr = |field: &str, v: &str| {
            v.parse::<SocketAddr>()
                .map(drop)
                .map_err(|_| format!("field `{field}`: expected ip:port, got {v:?}"))
        };
        addr("rw", &c.rw)?;
        for class in c.fallback.keys() {
            if !READ_CLASSES.contains(&class.as_str()) {
                return Err(format!(
                    "field `fallback.{class}`: unknown workload class {class:?}; read-only ports exist for {}",
                    READ_CLASSES.join(", ")
                ));
            }
        }
        for (class, listen) in &c.ro {
            if !READ_CLASSES.contains(&class.as_str()) {
                return Err(format!(
                    "field `ro.{class}`: unknown workload class {class:?}; read-only ports exist for {}",
                    READ_CLASSES.join(", ")
                ));
            }
            addr(&format!("ro.{class}"), listen)?;
        }
        if let Some(b) = &c.pgbouncer {
            let plain =
                |v: &str| !v.is_empty() && v.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_');
            if !plain(&b.database) {
                return Err(format!(
                    "field `pgbouncer.database`: {:?} is not a plain name",
                    b.database
                ));
            }
            if !plain(&b.dbname) {
                return Err(format!(
                    "field `pgbouncer.dbname`: {:?} is not a plain name",
                    b.dbname
                ));
            }
        }
        if c.workers == Some(0) || c.workers.is_some_and(|n| n > 1024) {
            return Err(format!(
                "field `workers`: {} threads; give 1 to 1024 (or leave it out: one per core)",
                c.workers.unwrap_or_default()
            ));
        }
        if let Some(m) = &c.metrics {
            addr("metrics", m)?;
        }
        if c.stale_after_ms < 1500 {
            return Err(format!(
                "field `stale_after_ms`: {} ms; at least 1500 (coordinators vouch for the map every second)",
                c.stale_after_ms
            ));
        }
        if c.stop_writes_after_ms != 0 && c.stop_writes_after_ms < c.stale_after_ms {
            return Err(format!(
                "field `stop_writes_after_ms`: {} ms is less than stale_after_ms ({} ms); 0 turns it off",
                c.stop_writes_after_ms, c.stale_after_ms
            ));
        }
        pgquorum_client::parse_addrs(&c.coordinators.join(","))
            .map_err(|e| format!("field `coordinators`: {e}"))?;
        if c.cluster.is_empty() {
            return Err("field `cluster`: must not be empty".into());
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_classes_and_bad_addresses_are_named() {
        let good = "cluster = \"main\"\ncoordinators = [\"127.0.0.1:7101\"]\nrw = \"127.0.0.1:6543\"\n[ro]\nreporting = \"127.0.0.1:6545\"\n";
        RouterConfig::parse(good).unwrap();
        let e = RouterConfig::parse(&good.replace("reporting", "batch")).unwrap_err();
        assert!(e.contains("ro.batch"), "{e}");
        let e = RouterConfig::parse(&good.replace("127.0.0.1:6543", "6543")).unwrap_err();
        assert!(e.contains("`rw`"), "{e}");
        let e = RouterConfig::parse(&good.replace("[\"127.0.0.1:7101\"]", "[]")).unwrap_err();
        assert!(e.contains("`coordinators`"), "{e}");
        let e = RouterConfig::parse(&format!("workers = 0\n{good}")).unwrap_err();
        assert!(e.contains("`workers`"), "{e}");
        let e = RouterConfig::parse(&format!("stale_after_ms = 100\n{good}")).unwrap_err();
        assert!(e.contains("`stale_after_ms`"), "{e}");
        let e = RouterConfig::parse(&format!("stop_writes_after_ms = 2000\n{good}")).unwrap_err();
        assert!(e.contains("`stop_writes_after_ms`"), "{e}");
        RouterConfig::parse(&format!("stop_writes_after_ms = 0\n{good}")).unwrap();
        let c = RouterConfig::parse(&format!("{good}[fallback]\nreporting = \"refuse\"\n")).unwrap();
        assert_eq!(c.fallback_for("reporting"), Fallback::Refuse);
        assert_eq!(c.fallback_for("analytics"), Fallback::Refuse, "the default");
        assert_eq!(c.fallback_for("realtime"), Fallback::Primary, "the default");
        let e = RouterConfig::parse(&format!("{good}[fallback]\nbatch = \"refuse\"\n")).unwrap_err();
        assert!(e.contains("fallback.batch"), "{e}");
        let e = RouterConfig::parse(&format!("{good}[fallback]\nreporting = \"sometimes\"\n")).unwrap_err();
        assert!(e.contains("sometimes") && e.contains("any_replica"), "{e}");
        assert_eq!(
            RouterConfig::parse(&format!("workers = 3\n{good}"))
                .unwrap()
                .worker_count(),
            3
        );
    }

    /// The shipped example must stay loadable (parsed only: its addresses are not
    /// this machine's).
    #[test]
    fn the_deploy_example_parses() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/router/router.toml");
        let c = RouterConfig::load(&path).unwrap();
        assert_eq!(c.ro.len(), 4);
    }
}
