//! `pgquorum reinit NODE`: rebuild a standby from a fresh base backup of the primary
//! (Patroni's `patronictl reinit`), e.g. after its data directory was damaged or it
//! fell too far behind. Its agent stops Postgres, replaces the data directory, starts
//! it as a standby of the primary and reports the rebuild done. Refused for the
//! primary (switch over first), a node a failover involves, and in strict sync mode a
//! sync standby no other standby can replace. `--wait` follows it to the end.

use std::time::{Duration, Instant};

use serde_json::json;

use super::{actor, status, Ctx};
use crate::error::{Error, Result};
use crate::output::emit;
use pgquorum_client::pb;

pub async fn reinit(ctx: &Ctx, cluster: &str, node: &str, wait: Option<Duration>) -> Result<()> {
    let request = pb::ReinitRequest {
        cluster: cluster.to_string(),
        node: node.to_string(),
        actor: actor(),
    };
    let reply = ctx
        .coordinators
        .call(|mut c| {
            let request = request.clone();
            async move { c.reinit(request).await }
        })
        .await?;
    let c = reply.cluster.unwrap_or_default();
    let Some(within) = wait else {
        let value = json!({ "cluster": c.name, "node": node, "reinit_pending": c.reinit_pending });
        emit(ctx.json, &value, || {
            format!(
                "{node} of {} is rebuilt from a fresh base backup by its agent; follow it with `pgquorum \
                 status` (REINIT until done) or ask with --wait",
                c.name
            )
        });
        return Ok(());
    };
    let started = Instant::now();
    loop {
        let s = status::fetch(ctx, &c.name).await?;
        let n = s.nodes.iter().find(|n| n.name == node);
        if n.is_some_and(|n| !n.reinit_pending && n.role == "standby" && n.health == "HEALTHY") {
            let ms = started.elapsed().as_millis() as u64;
            let value = json!({ "cluster": c.name, "node": node, "reinit_pending": false, "waited_ms": ms });
            emit(ctx.json, &value, || {
                format!("{node} rebuilt and streaming again ({ms} ms)")
            });
            return Ok(());
        }
        if started.elapsed() >= within {
            return Err(Error::Timeout(format!(
                "{node} was not rebuilt and streaming within {} s; it goes on: follow it with `pgquorum status`",
                within.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
