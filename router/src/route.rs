//! Where a new connection goes, from the latest endpoint map. Pure.
//!
//! - read-write: the primary, if the map names one (during a failover it does not,
//!   and the connection waits);
//! - read-only for a class: the least-loaded readable replica of that class; else
//!   the least-loaded readable replica of any class (never a backup replica); else the
//!   primary. `general` takes the least-loaded readable replica of any class.

use std::collections::HashMap;

use pgquorum_client::pb;

/// A Postgres server a connection is sent to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub name: String,
    pub addr: String,
}

fn backend(e: &pb::Endpoint) -> Backend {
    Backend {
        name: e.name.clone(),
        addr: format!("{}:{}", e.host, e.port),
    }
}

pub fn primary(map: &pb::EndpointMap) -> Option<Backend> {
    map.primary.as_ref().map(backend)
}

/// `load`: open connections per backend name, to spread reads.
pub fn replica(map: &pb::EndpointMap, class: &str, load: &HashMap<String, usize>) -> Option<Backend> {
    let readable = || {
        map.replicas
            .iter()
            .filter(|r| r.readable && r.workload != "backup")
    };
    let least = |it: Vec<&pb::Endpoint>| {
        it.into_iter()
            .min_by_key(|r| (load.get(&r.name).copied().unwrap_or(0), r.lag_ms, r.name.clone()))
            .map(backend)
    };
    let own: Vec<&pb::Endpoint> = readable()
        .filter(|r| class == "general" || r.workload == class)
        .collect();
    least(own)
        .or_else(|| least(readable().collect()))
        .or_else(|| primary(map))
}

/// How far the router trusts its map, by how long ago a coordinator last vouched for
/// it. Pure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    Current,
    /// Kept and used, but flagged (metric, log).
    Stale,
    /// Stale past `stop_writes_after_ms`: no new read-write connection.
    WritesStopped,
}

pub fn freshness(
    unconfirmed_for: std::time::Duration,
    stale_after: std::time::Duration,
    stop_writes_after: Option<std::time::Duration>,
) -> Freshness {
    if stop_writes_after.is_some_and(|s| unconfirmed_for >= s) {
        Freshness::WritesStopped
    } else if unconfirmed_for >= stale_after {
        Freshness::Stale
    } else {
        Freshness::Current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(name: &str, workload: &str, readable: bool) -> pb::Endpoint {
        pb::Endpoint {
            name: name.into(),
            host: "h".into(),
            port: 1,
            workload: workload.into(),
            readable,
            ..Default::default()
        }
    }

    #[test]
    fn a_map_nobody_vouches_for_goes_stale_then_stops_writes() {
        let s = std::time::Duration::from_secs;
        assert_eq!(freshness(s(1), s(3), Some(s(30))), Freshness::Current);
        assert_eq!(freshness(s(3), s(3), Some(s(30))), Freshness::Stale);
        assert_eq!(freshness(s(30), s(3), Some(s(30))), Freshness::WritesStopped);
        assert_eq!(
            freshness(s(3600), s(3), None),
            Freshness::Stale,
            "never stops writes"
        );
    }

    #[test]
    fn class_then_any_then_primary() {
        let mut map = pb::EndpointMap {
            primary: Some(ep("p", "general", true)),
            replicas: vec![
                ep("rt", "realtime", true),
                ep("rep", "reporting", true),
                ep("bk", "backup", true),
            ],
            ..Default::default()
        };
        let none = HashMap::new();
        assert_eq!(replica(&map, "reporting", &none).unwrap().name, "rep");
        map.replicas[1].readable = false;
        assert_eq!(
            replica(&map, "reporting", &none).unwrap().name,
            "rt",
            "another readable replica"
        );
        map.replicas[0].readable = false;
        assert_eq!(
            replica(&map, "reporting", &none).unwrap().name,
            "p",
            "never the backup; then the primary"
        );
        map.replicas[0].readable = true;
        map.replicas[1].readable = true;
        let load = HashMap::from([("rt".to_string(), 3)]);
        assert_eq!(
            replica(&map, "general", &load).unwrap().name,
            "rep",
            "least loaded"
        );
        map.primary = None;
        assert_eq!(primary(&map), None);
    }
}
