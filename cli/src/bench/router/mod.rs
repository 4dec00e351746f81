//! `pgquorum bench router`: what the router costs and how fast it learns.
//!
//! Three parts on one sandbox, each its own file:
//! - [`tps`]: pgbench select-only TPS directly against the primary, through
//!   `pgquorum-router`, PgBouncer (session mode) and HAProxy (`mode tcp`),
//!   interleaved round by round so the machine's noise hits every target alike,
//!   with each proxy's CPU time per transaction read from `/proc`.
//! - [`watchers`]: 1000 endpoint watchers spread over the coordinators; an
//!   operator's drain publishes a new map, timed until every watcher holds it.
//! - [`connections`]: 2000 client connections held open through the router at
//!   once, and the latency it adds per query next to direct connections.

mod connections;
mod tps;
mod watchers;

use std::path::PathBuf;

use serde_json::json;

use crate::error::Result;
use crate::launch::{Sandbox, SandboxSpec};

#[derive(clap::Args, Debug)]
pub struct Options {
    /// pgbench rounds (each runs every target once).
    #[arg(long, default_value_t = 3)]
    pub rounds: u64,
    /// pgbench clients.
    #[arg(long, default_value_t = 8)]
    pub clients: u64,
    /// Seconds per pgbench run.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub seconds: u64,
    /// Endpoint watchers.
    #[arg(long, default_value_t = 1000)]
    pub watchers: usize,
    /// Map changes timed across the watchers.
    #[arg(long, default_value_t = 20)]
    pub map_changes: usize,
    /// Client connections held open through the router at once.
    #[arg(long, default_value_t = 2000)]
    pub connections: usize,
    /// Run only these parts (comma-separated: tps, watchers, connections).
    #[arg(long, value_delimiter = ',', default_value = "tps,watchers,connections")]
    pub parts: Vec<Part>,
    #[arg(long)]
    pub dir: Option<PathBuf>,
    #[arg(long, default_value_t = 26100, value_name = "BASE")]
    pub coordinator_base: u16,
    #[arg(long, default_value_t = 26110, value_name = "BASE")]
    pub postgres_base: u16,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Tps,
    Watchers,
    Connections,
}

pub async fn run(opts: Options) -> Result<()> {
    let (dir, _tmp) = super::work_dir(&opts.dir, "pgquorum-bench-router-")?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
    eprintln!("starting a sandbox in {}", dir.display());
    let mut spec = SandboxSpec::new(&dir, opts.coordinator_base, opts.postgres_base);
    // Every held connection is a Postgres backend; standbys need at least as many.
    let max_connections = (opts.connections + 200).max(100);
    spec.postgres_parameters = vec![("max_connections".into(), max_connections.to_string())];
    let sandbox = Sandbox::start(spec).await?;
    let mut result = serde_json::Map::new();
    result.insert("bench".into(), json!("router"));
    if opts.parts.contains(&Part::Tps) {
        result.insert("tps".into(), tps::run(&opts, &sandbox, &dir).await?);
    }
    if opts.parts.contains(&Part::Watchers) {
        result.insert("watchers".into(), watchers::run(&opts, &sandbox).await?);
    }
    if opts.parts.contains(&Part::Connections) {
        result.insert("connections".into(), connections::run(&opts, &sandbox).await?);
    }
    println!("{}", serde_json::Value::Object(result));
    Ok(())
}

/// The router's read-write port in the sandbox.
fn router_port(sandbox: &Sandbox) -> Result<u16> {
    sandbox
        .router_addrs()
        .and_then(|(rw, _)| rw.rsplit_once(':').and_then(|(_, p)| p.parse().ok()))
        .ok_or_else(|| crate::error::Error::Launch("the sandbox has no router".into()))
}
