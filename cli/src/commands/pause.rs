//! `pgquorum pause` / `pgquorum resume`: no automatic failover while paused (Patroni's
//! `patronictl pause`). Postgres keeps running and replicating; an operator's
//! switchover or failover still works; the primary keeps its lease even when its
//! Postgres is stopped by hand, so it can be started again. Recorded in the cluster's
//! history (a policy change of `maintenance`), shown by `status`, `alerts` and metrics.

use serde_json::json;

use super::{actor, status, Ctx};
use crate::error::Result;
use crate::output::emit;
use pgquorum_client::pb;

pub async fn pause(ctx: &Ctx, cluster: &str, paused: bool) -> Result<()> {
    // `--cluster` may be left out when there is one: the leader names it.
    let cluster = match cluster {
        "" => status::fetch(ctx, "").await?.cluster,
        named => named.to_string(),
    };
    let request = pb::SetPolicyRequest {
        cluster: cluster.clone(),
        settings: [("maintenance".to_string(), paused.to_string())].into(),
        actor: actor(),
    };
    ctx.coordinators
        .call(|mut c| {
            let request = request.clone();
            async move { c.set_policy(request).await }
        })
        .await?;
    let value = json!({ "cluster": cluster, "paused": paused });
    emit(ctx.json, &value, || {
        if paused {
            format!(
                "cluster {cluster} paused: no automatic failover until `pgquorum resume` \
                 (switchover and failover by hand still work)"
            )
        } else {
            format!("cluster {cluster} resumed: automatic failover is on")
        }
    });
    Ok(())
}
