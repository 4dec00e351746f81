//! PgBouncer mode: keep a PgBouncer's `[databases]` pointing where the map says.

use std::collections::BTreeMap;
use std::collections::HashMap;

use pgquorum_client::pb;

use crate::config::{PgBouncerConfig, READ_CLASSES};
use crate::route::{self, Fallback};

/// The `[databases]` section for a map; `fallback` says where each read-only class
/// goes without a readable replica of its own (a refused class has no alias then).
pub fn databases(
    cfg: &PgBouncerConfig,
    map: &pb::EndpointMap,
    fallback: impl Fn(&str) -> Fallback,
) -> String {
    let mut entries = BTreeMap::new();
    let line = |b: &route::Backend| {
        let (host, port) = b.addr.rsplit_once(':').unwrap_or((&b.addr, "5432"));
        format!("host={host} port={port} dbname={}", cfg.dbname)
    };
    if let Some(p) = route::primary(map) {
        entries.insert(cfg.database.clone(), line(&p));
    }
    for class in READ_CLASSES {
        if let Some((r, _)) = route::replica(map, class, fallback(class), &HashMap::new()) {
            entries.insert(format!("{}_{class}", cfg.database), line(&r));
        }
    }
    let mut out = format!(
        "; written by pgquorum-router for map version {} (epoch {})\n[databases]\n",
        map.version, map.epoch
    );
    for (alias, target) in entries {
        out.push_str(&format!("{alias} = {target}\n"));
    }
    out
}

/// Writes the file (atomically) and asks PgBouncer to reload it.
pub fn apply(
    cfg: &PgBouncerConfig,
    map: &pb::EndpointMap,
    fallback: impl Fn(&str) -> Fallback,
) -> Result<(), String> {
    let text = databases(cfg, map, fallback);
    let tmp = cfg.databases_file.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &cfg.databases_file)
        .map_err(|e| format!("replacing {}: {e}", cfg.databases_file.display()))?;
    match std::fs::read_to_string(&cfg.pidfile) {
        Ok(pid) => sighup(pid.trim()).map_err(|e| format!("reloading PgBouncer (pid {}): {e}", pid.trim())),
        // Not running yet: it reads the file when it starts.
        Err(_) => Ok(()),
    }
}

/// Sends SIGHUP to the pid in a pid file's text.
fn sighup(pid: &str) -> Result<(), String> {
    let pid: i32 = pid
        .parse()
        .map_err(|_| format!("pid file holds {pid:?}, not a pid"))?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGHUP)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_follow_the_map() {
        let cfg = PgBouncerConfig {
            databases_file: "/x".into(),
            pidfile: "/y".into(),
            database: "main".into(),
            dbname: "postgres".into(),
        };
        let ep = |name: &str, port: u32, workload: &str| pb::Endpoint {
            name: name.into(),
            host: "127.0.0.1".into(),
            port,
            workload: workload.into(),
            readable: true,
            ..Default::default()
        };
        let mut map = pb::EndpointMap {
            version: 3,
            epoch: 2,
            primary: Some(ep("node2", 5002, "general")),
            replicas: vec![ep("node3", 5003, "reporting")],
            ..Default::default()
        };
        let text = databases(&cfg, &map, Fallback::default_for);
        assert!(
            text.contains("main = host=127.0.0.1 port=5002 dbname=postgres"),
            "{text}"
        );
        assert!(
            text.contains("main_reporting = host=127.0.0.1 port=5003"),
            "{text}"
        );
        map.primary = None;
        assert!(
            !databases(&cfg, &map, Fallback::default_for).contains("main = "),
            "no primary alias during a failover"
        );
    }
}
