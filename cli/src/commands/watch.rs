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
                "{}[{} {} {}ms{}]",
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
    while let Some(map) = maps.next().await {
        let map = map?;
        emit_line(ctx.json, &map_json(&map), || map_line(&map));
    }
    Ok(())
}
