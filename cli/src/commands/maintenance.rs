//! `pgquorum maintenance on|off NODE`: one node out of the cluster's plans while an
//! operator works on its host (pg_auto_failover's `enable maintenance`). In
//! maintenance a node is never promoted, leaves the sync set (the coordinators replace
//! it first) and read routing, and its agent leaves Postgres as the operator leaves it:
//! a stopped server is not started again. Refused for the primary; with
//! `--allow-switchover` the primary is switched over first (to the best candidate),
//! then put into maintenance. Shown in `status`, `alerts` and metrics; recorded in the
//! history.

use std::time::Duration;

use serde_json::json;

use super::{actor, status, Ctx};
use crate::error::Result;
use crate::output::emit;
use pgquorum_client::pb;

pub async fn maintenance(
    ctx: &Ctx,
    cluster: &str,
    node: &str,
    on: bool,
    allow_switchover: Option<Duration>,
) -> Result<()> {
    let mut switched_to = None;
    if let (true, Some(within)) = (on, allow_switchover) {
        let s = status::fetch(ctx, cluster).await?;
        if s.primary == node {
            if !ctx.json {
                println!("{node} is the primary: switching over first");
            }
            let started = status::start_switchover(ctx, &s.cluster, "", 0).await?;
            let (after, ms) = status::follow(ctx, &started, within).await?;
            if !ctx.json {
                println!(
                    "{} is the primary of epoch {} ({ms} ms)",
                    after.primary, after.epoch
                );
            }
            switched_to = Some(after.primary);
            // It rejoins as a standby first: in maintenance its agent would leave it
            // stopped where the switchover left it.
            super::orders::wait_for(ctx, &s.cluster, node, "rejoin as a standby", within, |n| {
                n.role == "standby" && n.health == "HEALTHY"
            })
            .await?;
        }
    }
    let request = pb::MaintenanceRequest {
        cluster: cluster.to_string(),
        node: node.to_string(),
        on,
        actor: actor(),
    };
    let reply = ctx
        .coordinators
        .call(|mut c| {
            let request = request.clone();
            async move { c.set_maintenance(request).await }
        })
        .await?;
    let c = reply.cluster.unwrap_or_default();
    let value = json!({
        "cluster": c.name, "node": node, "maintenance": on,
        "in_maintenance": c.maintenance, "switched_over_to": switched_to,
        "endpoint_version": c.endpoint_version,
    });
    emit(ctx.json, &value, || {
        if on {
            format!(
                "{node} of {} is in maintenance: never promoted, out of the sync set and read routing; \
                 its agent leaves Postgres as you leave it (`pgquorum maintenance off {node}` ends it)",
                c.name
            )
        } else {
            format!("{node} of {} is out of maintenance", c.name)
        }
    });
    Ok(())
}
