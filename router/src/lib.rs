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

use std::time::Duration;

use pgquorum_client::watch::watch_endpoints;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use config::RouterConfig;
use proxy::{Load, Port};

/// Binds every port, follows the map and serves until the process ends.
pub async fn run(config: RouterConfig) -> Result<(), String> {
    if let Some(addr) = &config.metrics {
        let addr: std::net::SocketAddr = addr.parse().map_err(|e| format!("metrics address: {e}"))?;
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .map_err(|e| format!("metrics listener on {addr}: {e}"))?;
    }
    let (tx, maps) = watch::channel(None);
    let mut ports = vec![(config.rw.clone(), Port::ReadWrite)];
    ports.extend(
        config
            .ro
            .iter()
            .map(|(class, addr)| (addr.clone(), Port::ReadOnly(class.clone()))),
    );
    let load = Load::default();
    let hold = Duration::from_millis(config.hold_ms);
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
        ));
    }
    let mut watch = watch_endpoints(config.coordinators.clone(), config.cluster.clone());
    while let Some(map) = watch.next().await {
        match map {
            Ok(map) => {
                info!(version = map.version, epoch = map.epoch, primary = ?map.primary.as_ref().map(|p| &p.name), "endpoint map");
                metrics::gauge!("pgquorum_router_map_version").set(map.version as f64);
                metrics::gauge!("pgquorum_router_epoch").set(map.epoch as f64);
                if let Some(b) = &config.pgbouncer {
                    if let Err(e) = pgbouncer::apply(b, &map) {
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
