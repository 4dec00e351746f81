//! How fast a new endpoint map reaches every watcher.
//!
//! `--watchers` watches (1000 by default), each its own gRPC connection as separate
//! routers would have, spread evenly over the coordinators (followers serve two
//! thirds of them). Each round drains or undrains a replica, which commits a new map
//! version, and times from the moment the request is sent until every watcher
//! holds that version. Measuring from the send includes the Raft commit itself
//! (reported apart as `commit`), so the delays are an upper bound on
//! commit-to-watcher.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pgquorum_client::watch::watch_endpoints;
use pgquorum_client::{pb, Coordinators};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::Options;
use crate::bench::summary;
use crate::error::{Error, Result};
use crate::launch::Sandbox;
use crate::output::table;

/// A replica whose drain toggles the map.
const TOGGLED: &str = "node3";

pub async fn run(opts: &Options, sandbox: &Sandbox) -> Result<Value> {
    let addrs = sandbox.client().addrs().to_vec();
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, u64, Instant)>();
    eprintln!("starting {} endpoint watchers", opts.watchers);
    let mut watches = Vec::with_capacity(opts.watchers);
    for id in 0..opts.watchers {
        let mut rotated = addrs.clone();
        rotated.rotate_left(id % addrs.len().max(1));
        let mut watch = watch_endpoints(rotated, sandbox.cluster().to_string());
        let tx = tx.clone();
        watches.push(tokio::spawn(async move {
            while let Some(Ok(map)) = watch.next().await {
                if tx.send((id, map.version, Instant::now())).is_err() {
                    return;
                }
            }
        }));
    }
    // Everyone holds some map before the first change.
    let mut latest: HashMap<usize, u64> = HashMap::new();
    collect(
        &mut rx,
        &mut latest,
        opts.watchers,
        0,
        Duration::from_secs(60),
        |_, _| {},
    )
    .await?;

    let client = sandbox.client();
    // Warm-up: the client's connection to the leader is made here, not in round 1,
    // and every watcher has settled on the resulting map before timing starts.
    let warm = drain(&client, sandbox.cluster(), false).await?;
    let settle = Duration::from_secs(10);
    collect(
        &mut rx,
        &mut latest,
        opts.watchers,
        warm.endpoint_version,
        settle,
        |_, _| {},
    )
    .await?;
    let mut delays = Vec::new();
    let mut last_watcher = Vec::new();
    let mut commits = Vec::new();
    for round in 0..opts.map_changes {
        let drained = round % 2 == 0;
        let sent = Instant::now();
        let reply = drain(&client, sandbox.cluster(), drained).await?;
        commits.push(ms(sent.elapsed()));
        let mut round_delays = Vec::with_capacity(opts.watchers);
        // Watcher `id` starts on coordinator `id % n`: the slowest delivery of each.
        let mut by_coordinator = vec![0f64; addrs.len()];
        collect(
            &mut rx,
            &mut latest,
            opts.watchers,
            reply.endpoint_version,
            Duration::from_secs(10),
            |id, at| {
                round_delays.push(ms(at - sent));
                let slowest = &mut by_coordinator[id % addrs.len()];
                *slowest = slowest.max(ms(at - sent));
            },
        )
        .await?;
        let last = round_delays.iter().copied().fold(0.0, f64::max);
        let per_coordinator: Vec<String> = by_coordinator.iter().map(|d| format!("{d:.1}")).collect();
        eprintln!(
            "change {:2}: committed in {:5.1} ms; every watcher holds version {} after {last:5.1} ms \
             (slowest per coordinator: {} ms)",
            round + 1,
            commits[round],
            reply.endpoint_version,
            per_coordinator.join(" / ")
        );
        last_watcher.push(last);
        delays.extend(round_delays);
    }
    drain(&client, sandbox.cluster(), false).await?;
    for w in watches {
        w.abort();
    }

    let (each, last, commit) = (summary(&delays), summary(&last_watcher), summary(&commits));
    let cell = |v: &Value, k: &str| format!("{:.1}", v[k].as_f64().unwrap_or(f64::NAN));
    println!(
        "{}",
        table(
            &[
                &format!(
                    "MAP DELIVERY, ms ({} watchers, {} changes)",
                    opts.watchers, opts.map_changes
                ),
                "P50",
                "P99",
                "MAX"
            ],
            [
                ("request -> each watcher holds it", &each),
                ("request -> the last watcher holds it", &last),
                ("request -> committed (drain acknowledged)", &commit),
            ]
            .iter()
            .map(|(what, v)| vec![what.to_string(), cell(v, "p50"), cell(v, "p99"), cell(v, "max")])
            .collect()
        )
    );
    Ok(json!({
        "watchers": opts.watchers, "changes": opts.map_changes,
        "each_ms": each, "last_ms": last, "commit_ms": commit,
    }))
}

/// Reads deliveries until every watcher holds `version` or newer; `on_arrival` sees
/// each watcher's first delivery at or past it.
async fn collect(
    rx: &mut mpsc::UnboundedReceiver<(usize, u64, Instant)>,
    latest: &mut HashMap<usize, u64>,
    watchers: usize,
    version: u64,
    limit: Duration,
    mut on_arrival: impl FnMut(usize, Instant),
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    let holding = |latest: &HashMap<usize, u64>| latest.values().filter(|v| **v >= version).count();
    while holding(latest) < watchers {
        let Ok(Some((id, v, at))) = tokio::time::timeout_at(deadline, rx.recv()).await else {
            return Err(Error::Launch(format!(
                "only {} of {watchers} watchers reached map version {version} within {limit:?}",
                holding(latest)
            )));
        };
        let before = latest.insert(id, v).unwrap_or(0);
        if before < version && v >= version {
            on_arrival(id, at);
        }
    }
    Ok(())
}

async fn drain(client: &Coordinators, cluster: &str, drained: bool) -> Result<pb::DrainReply> {
    let request = pb::DrainRequest {
        cluster: cluster.to_string(),
        node: TOGGLED.into(),
        drained,
        actor: "pgquorum bench router".into(),
    };
    Ok(client
        .call(|mut c| {
            let request = request.clone();
            async move { c.drain(request).await }
        })
        .await?)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
