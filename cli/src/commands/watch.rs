//! `pgquorum watch`: print each endpoint map as it arrives (a line per map in JSON).

use pgquorum_client::pb;
use pgquorum_client::watch::watch_endpoints;
use serde_json::{json, Value};

use super::Ctx;
use crate::error::Result;
use crate::output::{emit_line, timestamp};

fn endpoint_json(e: &pb::Endpoint) -> Value {
    json!({
        "name": e.name, "host": e.host, "port": e.port, "region": e.region, "workload": e.workload,
        "health": e.health, "lag_ms": e.lag_ms, "lag_bytes": e.lag_bytes, "readable": e.readable,
        "drained": e.drained,
    })
}

/// The JSON of one endpoint map (keys may be added, never renamed).
pub fn map_json(m: &pb::EndpointMap) -> Value {
    json!({
        "cluster": m.cluster,
        "version": m.version,
        "epoch": m.epoch,
        "primary": m.primary.as_ref().map(endpoint_json),
        "replicas": m.replicas.iter().map(endpoint_json).collect::<Vec<_>>(),
    })
}

fn map_line(m: &pb::EndpointMap) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64);
    let primary = m
        .primary
        .as_ref()
        .map(|p| format!("{} ({}:{})", p.name, p.host, p.port));
    let replicas: Vec<String> = m
        .replicas
        .iter()
        .map(|r| {
            format!(
                "{}[{} {} lag {}ms when published{}]",
                r.name,
                r.workload,
                r.health,
                r.lag_ms,
                match (r.drained, r.readable) {
                    (true, _) => " drained",
                    (false, true) => "",
                    (false, false) => " no reads",
                }
            )
        })
        .collect();
    format!(
        "{}  v{} epoch {}  primary {}  replicas {}",
        timestamp(now.unwrap_or(0)),
        m.version,
        m.epoch,
        primary.unwrap_or_else(|| "NONE (failover in flight)".into()),
        replicas.join(" ")
    )
}

pub async fn watch(ctx: &Ctx, cluster: &str) -> Result<()> {
    let cluster = if cluster.is_empty() {
        super::cluster::only_cluster(ctx).await?
    } else {
        cluster.to_string()
    };
    let mut maps = watch_endpoints(ctx.coordinators.addrs().to_vec(), cluster);
    let mut last = None;
    while let Some(map) = maps.next().await {
        let map = map?;
        // The stream repeats the current map every second as a confirmation; printed
        // again, its lag (taken when the map was published, which happens on a change
        // of readability, not on every lag sample) looked like a live value that froze.
        if should_print(&mut last, &map) {
            emit_line(ctx.json, &map_json(&map), || map_line(&map));
        }
    }
    Ok(())
}

/// Whether `map` is news after `last` (its version and epoch, updated).
fn should_print(last: &mut Option<(u64, u64)>, map: &pb::EndpointMap) -> bool {
    let key = (map.epoch, map.version);
    if *last == Some(key) {
        return false;
    }
    *last = Some(key);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_map_is_printed_once_and_its_lag_says_when_it_was_taken() {
        let map = pb::EndpointMap {
            version: 7,
            epoch: 2,
            replicas: vec![pb::Endpoint {
                name: "node3".into(),
                lag_ms: 40,
                readable: true,
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut last = None;
        assert!(should_print(&mut last, &map));
        assert!(!should_print(&mut last, &map), "a confirmation, not news");
        let next = pb::EndpointMap {
            version: 8,
            ..map.clone()
        };
        assert!(should_print(&mut last, &next));
        assert!(
            map_line(&map).contains("lag 40ms when published"),
            "{}",
            map_line(&map)
        );
    }
}
