//! Accepting client connections and piping them to the chosen backend.
//!
//! Each listener hands every connection its own task. A connection is routed once,
//! from the newest endpoint map, then bytes are copied both ways with no parsing
//! (tokio's `copy_bidirectional`: one buffer per direction, no allocation per
//! message). A read-write connection also watches the map and is closed the moment
//! the epoch moves: nothing may keep talking to a primary that has been replaced.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgquorum_client::pb;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::pgwire::reject;
use crate::route::{self, Backend};

/// What a listener serves.
#[derive(Clone, Debug)]
pub enum Port {
    ReadWrite,
    ReadOnly(String),
}

impl Port {
    fn label(&self) -> String {
        match self {
            Port::ReadWrite => "rw".into(),
            Port::ReadOnly(class) => format!("ro_{class}"),
        }
    }
}

/// The latest map (None until the first arrives).
pub type Maps = watch::Receiver<Option<pb::EndpointMap>>;

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

pub async fn serve(listener: TcpListener, port: Port, maps: Maps, load: Load, hold: Duration) {
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
        tokio::spawn(handle(client, port.clone(), maps.clone(), load.clone(), hold));
    }
}

fn pick(port: &Port, maps: &Maps, load: &Load) -> Option<(Backend, u64)> {
    let map = maps.borrow();
    let map = map.as_ref()?;
    let backend = match port {
        Port::ReadWrite => route::primary(map)?,
        Port::ReadOnly(class) => route::replica(map, class, &load.snapshot())?,
    };
    Some((backend, map.epoch))
}

async fn handle(mut client: TcpStream, port: Port, mut maps: Maps, load: Load, hold: Duration) {
    let label = port.label();
    metrics::counter!("pgquorum_router_connections_total", "port" => label.clone()).increment(1);
    let deadline = tokio::time::Instant::now() + hold;
    let (backend, epoch) = loop {
        if let Some(choice) = pick(&port, &maps, &load) {
            break choice;
        }
        // No primary (failover in flight) or no map yet: wait for the next map.
        if tokio::time::timeout_at(deadline, maps.changed()).await.is_err() {
            metrics::counter!("pgquorum_router_rejected_total", "port" => label.clone()).increment(1);
            let why = format!(
                "pgquorum-router: no primary available after {} ms (failover in progress?)",
                hold.as_millis()
            );
            reject(&mut client, &why).await;
            return;
        }
    };
    let mut server =
        match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(&backend.addr)).await {
            Ok(Ok(s)) => s,
            _ => {
                metrics::counter!("pgquorum_router_rejected_total", "port" => label.clone()).increment(1);
                reject(
                    &mut client,
                    &format!(
                        "pgquorum-router: cannot reach {} at {}",
                        backend.name, backend.addr
                    ),
                )
                .await;
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
    let watch_epoch = matches!(port, Port::ReadWrite);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = epoch_moved(maps, epoch), if watch_epoch => {
            debug!(backend = %backend.name, "epoch moved: closing a connection to the old primary");
        }
    }
    load.add(&backend.name, -1);
    active.decrement(1.0);
}

/// Completes once a map with another epoch arrives (or the map source is gone).
async fn epoch_moved(mut maps: Maps, epoch: u64) {
    loop {
        if maps.changed().await.is_err() {
            return;
        }
        if maps.borrow().as_ref().is_some_and(|m| m.epoch != epoch) {
            return;
        }
    }
}
