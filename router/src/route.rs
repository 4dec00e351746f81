//! Where a new connection goes, from the latest endpoint map. Pure.
//!
//! - read-write: the primary, if the map names one (during a failover it does not,
//!   and the connection waits);
//! - read-only for a class: the least-loaded readable replica of that class; then, as
//!   the class's [`Fallback`] allows, the least-loaded readable replica of any class
//!   (never a backup replica), then the primary. `general` takes the least-loaded
//!   readable replica of any class.

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

/// Where a read-only class's connections go when no replica of the class is readable
/// (lagging past its threshold, drained, down).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// Another class's readable replica, then the primary (reads may load the primary).
    #[default]
    Primary,
    /// Another class's readable replica, never the primary.
    AnyReplica,
    /// Nowhere: the connection waits for a replica of its class, then is refused
    /// (analytics' long scans must not land on the primary).
    Refuse,
}

impl Fallback {
    /// The default of a class: `refuse` for analytics, `primary` for the others.
    pub fn default_for(class: &str) -> Fallback {
        if class == "analytics" {
            Fallback::Refuse
        } else {
            Fallback::Primary
        }
    }
}

/// Where a read-only connection went, against its class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// A replica of its class (for `general`: any replica).
    Own,
    /// Another class's replica.
    OtherReplica,
    /// The primary.
    Primary,
}

/// `load`: open connections per backend name, to spread reads.
pub fn replica(
    map: &pb::EndpointMap,
    class: &str,
    fallback: Fallback,
    load: &HashMap<String, usize>,
) -> Option<(Backend, Via)> {
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
    let own = least(own).map(|b| (b, Via::Own));
    match fallback {
        Fallback::Refuse => own,
        Fallback::AnyReplica => own.or_else(|| least(readable().collect()).map(|b| (b, Via::OtherReplica))),
        Fallback::Primary => own
            .or_else(|| least(readable().collect()).map(|b| (b, Via::OtherReplica)))
            .or_else(|| primary(map).map(|b| (b, Via::Primary))),
    }
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
        let name = |map: &pb::EndpointMap, class: &str, load: &HashMap<String, usize>| {
            replica(map, class, Fallback::Primary, load).map(|(b, _)| b.name)
        };
        assert_eq!(name(&map, "reporting", &none).unwrap(), "rep");
        map.replicas[1].readable = false;
        assert_eq!(
            name(&map, "reporting", &none).unwrap(),
            "rt",
            "another readable replica"
        );
        map.replicas[0].readable = false;
        assert_eq!(
            name(&map, "reporting", &none).unwrap(),
            "p",
            "never the backup; then the primary"
        );
        map.replicas[0].readable = true;
        map.replicas[1].readable = true;
        let load = HashMap::from([("rt".to_string(), 3)]);
        assert_eq!(name(&map, "general", &load).unwrap(), "rep", "least loaded");
        map.primary = None;
        assert_eq!(primary(&map), None);
    }

    #[test]
    fn each_fallback_goes_no_further_than_it_says() {
        let map = pb::EndpointMap {
            primary: Some(ep("p", "general", true)),
            replicas: vec![ep("rt", "realtime", true), ep("an", "analytics", false)],
            ..Default::default()
        };
        let none = HashMap::new();
        let via = |fallback| replica(&map, "analytics", fallback, &none).map(|(b, v)| (b.name, v));
        assert_eq!(via(Fallback::Refuse), None);
        assert_eq!(via(Fallback::AnyReplica), Some(("rt".into(), Via::OtherReplica)));
        assert_eq!(via(Fallback::Primary), Some(("rt".into(), Via::OtherReplica)));
        let mut drained = map.clone();
        drained.replicas[0].readable = false;
        let via = |fallback| replica(&drained, "analytics", fallback, &none).map(|(b, v)| (b.name, v));
        assert_eq!(via(Fallback::AnyReplica), None);
        assert_eq!(via(Fallback::Primary), Some(("p".into(), Via::Primary)));
        assert_eq!(Fallback::default_for("analytics"), Fallback::Refuse);
        assert_eq!(Fallback::default_for("reporting"), Fallback::Primary);
    }
}
