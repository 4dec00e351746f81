//! Many connections held open through the router, and the latency it adds.
//!
//! Opens `--connections` client connections (2000 by default; the platform this
//! grew out of expects 1000+) through the read-write port and keeps them all open,
//! checks on the primary that that many backends really exist at once, then sends
//! `SELECT 1` on every one of them in turn, each query alone on the wire,
//! alternating with the same query on a direct connection, so both see the same
//! server with the same number of backends. The added latency is the router's
//! percentile minus the direct one.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_postgres::{Client, NoTls};

use super::Options;
use crate::bench::summary;
use crate::error::{Error, Result};
use crate::launch::Sandbox;
use crate::output::table;

/// Direct connections for the baseline.
const DIRECT: usize = 50;
/// Queries per held connection.
const PASSES: usize = 3;
/// Connections opened at a time (each is a Postgres fork).
const OPENING: usize = 32;

async fn connect(port: u16) -> Result<Client> {
    let conninfo = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=10");
    let (client, conn) = tokio_postgres::connect(&conninfo, NoTls)
        .await
        .map_err(|e| Error::Launch(format!("connect to port {port}: {e}")))?;
    tokio::spawn(conn);
    Ok(client)
}

/// Opens `n` connections to `port`, `OPENING` at a time.
async fn open_many(port: u16, n: usize) -> Result<Vec<Client>> {
    let mut clients = Vec::with_capacity(n);
    while clients.len() < n {
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..(n - clients.len()).min(OPENING) {
            batch.spawn(connect(port));
        }
        while let Some(opened) = batch.join_next().await {
            clients.push(opened.map_err(|e| Error::Launch(format!("connect task: {e}")))??);
        }
    }
    Ok(clients)
}

async fn timed(client: &Client) -> Result<f64> {
    let start = Instant::now();
    client
        .simple_query("SELECT 1")
        .await
        .map_err(|e| Error::Launch(format!("SELECT 1: {e}")))?;
    Ok(start.elapsed().as_secs_f64() * 1000.0)
}

pub async fn run(opts: &Options, sandbox: &Sandbox) -> Result<Value> {
    let primary = sandbox.port("node1")?;
    let router = super::router_port(sandbox)?;
    eprintln!("opening {} connections through the router", opts.connections);
    let opening = Instant::now();
    let held = open_many(router, opts.connections).await?;
    let open_secs = opening.elapsed().as_secs_f64();
    let direct = open_many(primary, DIRECT).await?;
    let backends: i64 = direct[0]
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'",
            &[],
        )
        .await
        .map_err(|e| Error::Launch(format!("count backends: {e}")))?
        .get(0);
    if (backends as usize) < opts.connections {
        return Err(Error::Launch(format!(
            "only {backends} backends on the primary while {} connections were held",
            opts.connections
        )));
    }
    let (mut via_router, mut direct_ms) = (Vec::new(), Vec::new());
    for _ in 0..PASSES {
        for (i, client) in held.iter().enumerate() {
            via_router.push(timed(client).await?);
            direct_ms.push(timed(&direct[i % DIRECT]).await?);
        }
    }
    // Still all open at the end: none was dropped while the others were used.
    if let Some(closed) = held.iter().position(Client::is_closed) {
        return Err(Error::Launch(format!("held connection {closed} was closed")));
    }
    let (r, d) = (summary(&via_router), summary(&direct_ms));
    let at = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN) * 1000.0;
    let added = json!({
        "p50": ((at(&r, "p50") - at(&d, "p50")) * 10.0).round() / 10.0,
        "p99": ((at(&r, "p99") - at(&d, "p99")) * 10.0).round() / 10.0,
    });
    let row =
        |what: &str, p50: f64, p99: f64| vec![what.to_string(), format!("{p50:.1}"), format!("{p99:.1}")];
    println!(
        "{}",
        table(
            &[
                &format!(
                    "SELECT 1 latency, µs ({} held through the router, opened in {open_secs:.1} s; {} queries each)",
                    opts.connections,
                    opts.connections * PASSES
                ),
                "P50",
                "P99"
            ],
            vec![
                row("through pgquorum-router", at(&r, "p50"), at(&r, "p99")),
                row("direct", at(&d, "p50"), at(&d, "p99")),
                row(
                    "added by the router",
                    at(&r, "p50") - at(&d, "p50"),
                    at(&r, "p99") - at(&d, "p99")
                ),
            ]
        )
    );
    drop(held);
    // Give Postgres a moment to reap the backends before anything else runs.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(json!({
        "held": opts.connections, "open_secs": open_secs, "backends_seen": backends,
        "router_ms": r, "direct_ms": d, "added_us": added,
    }))
}
