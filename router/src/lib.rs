//! pgquorum router: follows the coordinators' endpoint map and forwards client
//! connections to the current primary (read-write port) or a fitting replica
//! (read-only port per workload class). Any Postgres client works unchanged.
//!
//! # Layout
//! - [`config`]: the TOML config file.
//! - [`route`]: where a new connection goes (pure).
//! - [`proxy`]: listeners, routing, byte copying, closing old-primary connections.
//! - [`pgwire`]: a proper Postgres error for a client that cannot be served.
//! - [`workers`]: the threads that carry connections, one single-threaded runtime each.
//! - [`pgbouncer`]: PgBouncer mode, rewriting its `[databases]` on every map change.

pub mod config;
pub mod pgbouncer;
pub mod pgwire;
pub mod proxy;
pub mod route;
pub mod workers;

use std::time::{Duration, Instant};

use pgquorum_client::watch::watch_endpoints;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use config::RouterConfig;
use proxy::{Load, Port};

/// Logs a change of how far the map is trusted.
fn note_freshness(was: route::Freshness, now: route::Freshness, unconfirmed_for: Duration) {
    use route::Freshness::*;
    let secs = unconfirmed_for.as_secs();
    match now {
        Current => info!(was = ?was, "endpoint map confirmed again by a coordinator; routing as usual"),
        Stale => warn!(
            unconfirmed_s = secs,
            "endpoint map stale: no coordinator has confirmed it for {secs} s; still routing by it"
        ),
        WritesStopped => warn!(
            unconfirmed_s = secs,
            "endpoint map stale for {secs} s: refusing new read-write connections until a coordinator confirms it"
        ),
    }
}

/// HELP lines (and units) for every series the router exports.
fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, Unit};
    describe_counter!(
        "pgquorum_router_connections_total",
        "Client connections accepted, by listening port"
    );
    describe_gauge!(
        "pgquorum_router_connections_active",
        "Client connections open now, by listening port"
    );
    describe_counter!(
        "pgquorum_router_routes_total",
        "Connections sent to a backend, by port and backend node"
    );
    describe_counter!(
        "pgquorum_router_rejected_total",
        "Connections refused, by port and reason (no_primary, no_replica, stale_map, unreachable)"
    );
    describe_counter!(
        "pgquorum_router_fallbacks_total",
        "Read-only connections sent outside their class (to another replica or the primary), by port"
    );
    describe_counter!(
        "pgquorum_router_bytes_total",
        Unit::Bytes,
        "Bytes carried, by port, backend node and direction (from_client, from_backend)"
    );
    describe_gauge!(
        "pgquorum_router_map_age_seconds",
        Unit::Seconds,
        "Time since the endpoint map in use arrived (a new version)"
    );
    describe_gauge!("pgquorum_router_epoch", "Epoch of the endpoint map in use");
    describe_gauge!(
        "pgquorum_router_map_version",
        "Version of the endpoint map in use"
    );
    describe_gauge!(
        "pgquorum_router_map_stale",
        "1 while no coordinator has confirmed the map lately"
    );
    describe_gauge!(
        "pgquorum_router_map_unconfirmed_seconds",
        Unit::Seconds,
        "Time since a coordinator last confirmed the map"
    );
}

/// Binds every port, follows the map and serves until the process ends.
pub async fn run(config: RouterConfig) -> Result<(), String> {
    if let Some(addr) = &config.metrics {
        let addr: std::net::SocketAddr = addr.parse().map_err(|e| format!("metrics address: {e}"))?;
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .map_err(|e| format!("metrics listener on {addr}: {e}"))?;
        describe_metrics();
        // Counters exist from the start, at 0: an alert on their increase sees the first.
        for class in config.ro.keys() {
            for to in ["primary", "other_replica"] {
                metrics::counter!("pgquorum_router_fallbacks_total", "port" => format!("ro_{class}"), "to" => to)
                    .absolute(0);
            }
        }
    }
    let (tx, maps) = watch::channel(None);
    let mut ports = vec![(config.rw.clone(), Port::ReadWrite)];
    ports.extend(config.ro.iter().map(|(class, addr)| {
        let port = Port::ReadOnly {
            class: class.clone(),
            fallback: config.fallback_for(class),
        };
        (addr.clone(), port)
    }));
    let load = Load::default();
    let hold = Duration::from_millis(config.hold_ms);
    let (gate_tx, gate) = watch::channel(None);
    let workers = workers::Workers::start(config.worker_count(), maps.clone())
        .map_err(|e| format!("cannot start the worker threads: {e}"))?;
    for (addr, port) in ports {
        let listener = TcpListener::bind(&addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        info!(%addr, ?port, "listening");
        tokio::spawn(proxy::serve(
            listener,
            port,
            maps.clone(),
            load.clone(),
            hold,
            workers.clone(),
            gate.clone(),
        ));
    }
    let mut watch = watch_endpoints(config.coordinators.clone(), config.cluster.clone());
    let started = std::time::Instant::now();
    let stale_after = Duration::from_millis(config.stale_after_ms);
    let stop_writes_after =
        (config.stop_writes_after_ms > 0).then(|| Duration::from_millis(config.stop_writes_after_ms));
    let mut freshness = route::Freshness::Current;
    let mut map_arrived: Option<Instant> = None;
    let mut check = tokio::time::interval(Duration::from_millis(250));
    loop {
        let map = tokio::select! {
            map = watch.next() => match map {
                Some(map) => map,
                None => break,
            },
            _ = check.tick() => {
                let unconfirmed_for = watch.confirmed().unwrap_or(started).elapsed();
                metrics::gauge!("pgquorum_router_map_unconfirmed_seconds").set(unconfirmed_for.as_secs_f64());
                if let Some(at) = map_arrived {
                    metrics::gauge!("pgquorum_router_map_age_seconds").set(at.elapsed().as_secs_f64());
                }
                let now = route::freshness(unconfirmed_for, stale_after, stop_writes_after);
                if now != freshness {
                    note_freshness(freshness, now, unconfirmed_for);
                    freshness = now;
                }
                metrics::gauge!("pgquorum_router_map_stale").set(if now == route::Freshness::Current { 0.0 } else { 1.0 });
                gate_tx.send_replace((now == route::Freshness::WritesStopped).then(|| {
                    format!(
                        "no coordinator has confirmed the endpoint map for {} s; not routing writes",
                        unconfirmed_for.as_secs()
                    )
                }));
                continue;
            }
        };
        match map {
            Ok(map) => {
                info!(version = map.version, epoch = map.epoch, primary = ?map.primary.as_ref().map(|p| &p.name), "endpoint map");
                map_arrived = Some(Instant::now());
                metrics::gauge!("pgquorum_router_map_age_seconds").set(0.0);
                metrics::gauge!("pgquorum_router_map_version").set(map.version as f64);
                metrics::gauge!("pgquorum_router_epoch").set(map.epoch as f64);
                if let Some(b) = &config.pgbouncer {
                    if let Err(e) = pgbouncer::apply(b, &map, |class| config.fallback_for(class)) {
                        warn!("pgbouncer: {e}");
                    }
                }
                tx.send_replace(Some(map));
            }
            Err(e) => {
                warn!("endpoint watch ended: {e}");
                return Err(e.to_string());
            }
        }
    }
    Ok(())
}
