//! Accepting client connections, routing them and connecting their backend.
//!
//! A connection is routed from the newest endpoint map: while there is no primary (a
//! failover in flight), or the backend it names does not answer (a primary that died
//! before the coordinators noticed), it waits for the next map or retries, up to
//! `hold_ms`, then gets a proper Postgres error. Once its backend is connected
//! the pair goes to a worker thread ([`crate::workers`]) that copies bytes both ways
//! with no parsing (one buffer per direction, no allocation per message) and closes
//! read-write pairs the moment the epoch moves: nothing may keep talking to a
//! primary that has been replaced.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgquorum_client::pb;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::pgwire::reject;
use crate::route::{self, Backend, Fallback, Via};
use crate::workers::{Traffic, Workers};

/// What a listener serves.
#[derive(Clone, Debug)]
pub enum Port {
    ReadWrite,
    ReadOnly { class: String, fallback: Fallback },
}

impl Port {
    fn label(&self) -> String {
        match self {
            Port::ReadWrite => "rw".into(),
            Port::ReadOnly { class, .. } => format!("ro_{class}"),
        }
    }
}

/// The latest map (None until the first arrives).
pub type Maps = watch::Receiver<Option<pb::EndpointMap>>;

/// Why new read-write connections are refused now (the map went stale); None: they
/// are not.
pub type WriteGate = watch::Receiver<Option<String>>;

/// Open connections per backend, for least-loaded read routing.
#[derive(Clone, Default)]
pub struct Load(Arc<Mutex<HashMap<String, usize>>>);

impl Load {
    fn snapshot(&self) -> HashMap<String, usize> {
        self.0.lock().expect("load lock").clone()
    }
    fn add(&self, name: &str, delta: isize) {
        let mut l = self.0.lock().expect("load lock");
        let n = l.entry(name.to_string()).or_default();
        *n = n.saturating_add_signed(delta);
    }
}

/// Accepts on `listener` and hands each connection to a worker thread.
pub async fn serve(
    listener: TcpListener,
    port: Port,
    maps: Maps,
    load: Load,
    hold: Duration,
    workers: Workers,
    gate: WriteGate,
) {
    loop {
        let (client, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!("accept on {}: {e}", port.label());
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = client.set_nodelay(true);
        tokio::spawn(handle(
            client,
            port.clone(),
            maps.clone(),
            load.clone(),
            hold,
            workers.clone(),
            gate.clone(),
        ));
    }
}

/// How long one connect to a backend may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How soon a held connection tries again when no new map came.
const RETRY_EVERY: Duration = Duration::from_millis(200);

/// The backend for a new connection on `port`; a read-only port avoids `avoid` (just
/// found unreachable) when it has another choice.
fn pick(port: &Port, maps: &Maps, load: &Load, avoid: Option<&str>) -> Option<(Backend, u64, Via)> {
    let map = maps.borrow();
    let map = map.as_ref()?;
    let (backend, via) = match port {
        Port::ReadWrite => (route::primary(map)?, Via::Own),
        Port::ReadOnly { class, fallback } => {
            let mut load = load.snapshot();
            if let Some(name) = avoid {
                load.insert(name.to_string(), usize::MAX / 2);
            }
            route::replica(map, class, *fallback, &load)?
        }
    };
    Some((backend, map.epoch, via))
}

/// Closes the books on a carried connection when its pipe ends.
struct Carried {
    backend: String,
    load: Load,
    active: metrics::Gauge,
}

impl Drop for Carried {
    fn drop(&mut self) {
        self.load.add(&self.backend, -1);
        self.active.decrement(1.0);
    }
}

async fn handle(
    mut client: TcpStream,
    port: Port,
    mut maps: Maps,
    load: Load,
    hold: Duration,
    workers: Workers,
    gate: WriteGate,
) {
    let label = port.label();
    metrics::counter!("pgquorum_router_connections_total", "port" => label.clone()).increment(1);
    // Read-write only: refused while the map is stale past stop_writes_after_ms (asked
    // again before every attempt: a connection may be held a while).
    let refused = || {
        matches!(port, Port::ReadWrite)
            .then(|| gate.borrow().clone())
            .flatten()
    };
    // Held until a backend answers, for up to `hold`: during a failover the map names
    // no primary, and before the failure is detected it names one that is gone (its
    // connect fails); either way the next map, or a retry, may bring one that works.
    let deadline = tokio::time::Instant::now() + hold;
    let mut unreachable: Option<Backend> = None;
    let (backend, epoch, server) = loop {
        if let Some(why) = refused() {
            metrics::counter!("pgquorum_router_rejected_total", "port" => label.clone(), "reason" => "stale_map")
                .increment(1);
            reject(&mut client, &format!("pgquorum-router: {why}")).await;
            return;
        }
        let avoid = unreachable.as_ref().map(|b| b.name.as_str());
        if let Some((backend, epoch, via)) = pick(&port, &maps, &load, avoid) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let connect = TcpStream::connect(&backend.addr);
            if let Ok(Ok(server)) = tokio::time::timeout(CONNECT_TIMEOUT.min(left), connect).await {
                if via != Via::Own {
                    // Not silent: reads of a class landing elsewhere (on the primary,
                    // say) is what an operator wants to see.
                    let to = if via == Via::Primary {
                        "primary"
                    } else {
                        "other_replica"
                    };
                    metrics::counter!("pgquorum_router_fallbacks_total", "port" => label.clone(), "to" => to)
                        .increment(1);
                    debug!(port = %label, backend = %backend.name, to, "no readable replica of the class: fallback");
                }
                break (backend, epoch, server);
            }
            unreachable = Some(backend);
        }
        // Wait for the next map, or retry shortly (a restarting backend, a dropped SYN).
        let retry = (tokio::time::Instant::now() + RETRY_EVERY).min(deadline);
        tokio::select! {
            _ = maps.changed() => {}
            _ = tokio::time::sleep_until(retry) => {}
        }
        if tokio::time::Instant::now() >= deadline {
            let (reason, why) = match &unreachable {
                Some(b) => (
                    "unreachable",
                    format!(
                        "pgquorum-router: cannot reach {} at {} (held {} ms)",
                        b.name,
                        b.addr,
                        hold.as_millis()
                    ),
                ),
                None => match &port {
                    Port::ReadWrite => (
                        "no_primary",
                        format!(
                            "pgquorum-router: no primary available after {} ms (failover in progress?)",
                            hold.as_millis()
                        ),
                    ),
                    Port::ReadOnly { class, fallback } => (
                        "no_replica",
                        format!(
                            "pgquorum-router: no readable {class} replica after {} ms, and its fallback is \
                             {fallback:?} (all lagging, drained or down?)",
                            hold.as_millis()
                        ),
                    ),
                },
            };
            metrics::counter!("pgquorum_router_rejected_total", "port" => label.clone(), "reason" => reason)
                .increment(1);
            reject(&mut client, &why).await;
            return;
        }
    };
    let _ = server.set_nodelay(true);
    metrics::counter!("pgquorum_router_routes_total", "port" => label.clone(), "backend" => backend.name.clone())
        .increment(1);
    let active = metrics::gauge!("pgquorum_router_connections_active", "port" => label.clone());
    active.increment(1.0);
    load.add(&backend.name, 1);
    debug!(port = %label, backend = %backend.name, "routed");
    let epoch = matches!(port, Port::ReadWrite).then_some(epoch);
    let carried = Carried {
        backend: backend.name,
        load,
        active,
    };
    let traffic = Traffic {
        from_client: metrics::counter!("pgquorum_router_bytes_total", "port" => label.clone(), "backend" => carried.backend.clone(), "direction" => "from_client"),
        from_backend: metrics::counter!("pgquorum_router_bytes_total", "port" => label.clone(), "backend" => carried.backend.clone(), "direction" => "from_backend"),
    };
    workers.carry(client, server, epoch, carried, traffic);
}
