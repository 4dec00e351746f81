//! `pgquorum cluster create|list|show|readmit`.

use serde_json::{json, Value};

use super::{actor, consistency, parse_settings, Ctx};
use crate::error::{Error, Result};
use crate::output::{emit, table, timestamp};
use pgquorum_client::pb;

pub async fn create(ctx: &Ctx, name: &str, settings: &[String]) -> Result<()> {
    let settings = parse_settings(settings)?;
    let request = pb::CreateClusterRequest {
        name: name.to_string(),
        settings,
        actor: actor(),
    };
    let reply = ctx
        .coordinators
        .call(|mut c| {
            let request = request.clone();
            async move { c.create_cluster(request).await }
        })
        .await?;
    let cluster = reply.cluster.unwrap_or_default();
    emit(ctx.json, &cluster_json(&cluster), || {
        format!("created cluster {}\n{}", cluster.name, cluster_table(&cluster))
    });
    Ok(())
}

pub async fn list(ctx: &Ctx, local: bool) -> Result<()> {
    let request = pb::ListClustersRequest {
        consistency: consistency(local),
    };
    let reply = ctx
        .coordinators
        .call(|mut c| async move { c.list_clusters(request).await })
        .await?;
    let value = Value::Array(reply.clusters.iter().map(cluster_json).collect());
    emit(ctx.json, &value, || {
        let rows = reply
            .clusters
            .iter()
            .map(|c| {
                vec![
                    c.name.clone(),
                    c.epoch.to_string(),
                    if c.primary.is_empty() {
                        "-".into()
                    } else {
                        c.primary.clone()
                    },
                    c.members.len().to_string(),
                    c.policy.as_ref().map(|p| p.sync_mode.clone()).unwrap_or_default(),
                    c.policy
                        .as_ref()
                        .map(|p| p.maintenance.to_string())
                        .unwrap_or_default(),
                ]
            })
            .collect();
        table(
            &[
                "CLUSTER",
                "EPOCH",
                "PRIMARY",
                "MEMBERS",
                "SYNC MODE",
                "MAINTENANCE",
            ],
            rows,
        )
    });
    Ok(())
}

pub async fn show(ctx: &Ctx, name: &str, local: bool) -> Result<()> {
    let cluster = fetch(ctx, name, local).await?;
    emit(ctx.json, &cluster_json(&cluster), || cluster_table(&cluster));
    Ok(())
}

/// One cluster, read linearizably (or from the first coordinator's state, `local`).
pub async fn fetch(ctx: &Ctx, name: &str, local: bool) -> Result<pb::Cluster> {
    let request = pb::GetClusterRequest {
        name: name.to_string(),
        consistency: consistency(local),
    };
    let reply = ctx
        .coordinators
        .call(|mut c| {
            let request = request.clone();
            async move { c.get_cluster(request).await }
        })
        .await?;
    Ok(reply.cluster.unwrap_or_default())
}

/// `pgquorum remove NODE`: forget a member whose host is retired or lost for good.
pub async fn remove(ctx: &Ctx, cluster: &str, node: &str) -> Result<()> {
    let request = pb::RemoveMemberRequest {
        cluster: cluster.to_string(),
        node: node.to_string(),
        actor: actor(),
    };
    let reply = ctx
        .coordinators
        .call(|mut c| {
            let request = request.clone();
            async move { c.remove_member(request).await }
        })
        .await?;
    let cluster = reply.cluster.unwrap_or_default();
    emit(ctx.json, &cluster_json(&cluster), || {
        format!(
            "{node} removed from {} (its replication slot is dropped on the primary; an agent started \
             again under that name registers as a new member)\n{}",
            cluster.name,
            cluster_table(&cluster)
        )
    });
    Ok(())
}

/// `pgquorum cluster delete NAME --yes-i-am-sure`.
pub async fn delete(ctx: &Ctx, name: &str, sure: bool) -> Result<()> {
    if !sure {
        return Err(Error::Usage(format!(
            "deleting cluster {name:?} forgets its state, history and endpoint map for good; stop its \
             agents, then add --yes-i-am-sure"
        )));
    }
    let request = pb::DeleteClusterRequest {
        name: name.to_string(),
        actor: actor(),
    };
    let reply = ctx
        .coordinators
        .call(|mut c| {
            let request = request.clone();
            async move { c.delete_cluster(request).await }
        })
        .await?;
    let gone = reply.cluster.unwrap_or_default();
    emit(
        ctx.json,
        &json!({"deleted": gone.name, "epoch": gone.epoch}),
        || {
            format!(
                "cluster {} deleted (it was at epoch {}, primary {})",
                gone.name,
                gone.epoch,
                if gone.primary.is_empty() {
                    "-"
                } else {
                    &gone.primary
                }
            )
        },
    );
    Ok(())
}

pub async fn readmit(ctx: &Ctx, cluster: &str, node: &str) -> Result<()> {
    let request = pb::ReadmitNodeRequest {
        cluster: cluster.to_string(),
        node: node.to_string(),
        actor: actor(),
    };
    let reply = ctx
        .coordinators
        .call(|mut c| {
            let request = request.clone();
            async move { c.readmit_node(request).await }
        })
        .await?;
    let cluster = reply.cluster.unwrap_or_default();
    emit(ctx.json, &cluster_json(&cluster), || {
        format!("{node} readmitted\n{}", cluster_table(&cluster))
    });
    Ok(())
}

fn cluster_table(c: &pb::Cluster) -> String {
    let mut out = table(
        &[
            "CLUSTER",
            "EPOCH",
            "PRIMARY",
            "SYNC SET",
            "ENDPOINT VERSION",
            "CREATED",
        ],
        vec![vec![
            c.name.clone(),
            c.epoch.to_string(),
            if c.primary.is_empty() {
                "-".into()
            } else {
                c.primary.clone()
            },
            if c.sync_set.is_empty() {
                "-".into()
            } else {
                c.sync_set.join(",")
            },
            c.endpoint_version.to_string(),
            timestamp(c.created_at_ms),
        ]],
    );
    if !c.members.is_empty() {
        let rows = c
            .members
            .iter()
            .map(|m| {
                vec![
                    m.name.clone(),
                    format!("{}:{}", m.host, m.port),
                    m.region.clone(),
                    m.workload.clone(),
                    m.priority.to_string(),
                    m.nofailover.to_string(),
                    m.sync_eligible.to_string(),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table(
            &[
                "MEMBER",
                "ADDRESS",
                "REGION",
                "WORKLOAD",
                "PRIORITY",
                "NOFAILOVER",
                "SYNC ELIGIBLE",
            ],
            rows,
        ));
    }
    if !c.held.is_empty() {
        out.push_str(&format!(
            "\nheld since force-new-group (no lease, no orders until `pgquorum cluster readmit {} NODE`): {}",
            c.name,
            c.held.join(", ")
        ));
    }
    if let Some(f) = &c.failover {
        out.push_str(&format!(
            "\nin-flight {}: step {}, epoch {} -> {}, {} -> {} ({})",
            f.kind, f.step, f.from_epoch, f.to_epoch, f.old_primary, f.candidate, f.reason
        ));
    }
    out.push_str("\nrecent history (newest first):\n");
    out.push_str(&history_table(c.history.iter().rev().take(10)));

    out
}

/// History events as a table, in the order given.
fn history_table<'a>(events: impl Iterator<Item = &'a pb::HistoryEvent>) -> String {
    let rows = events
        .map(|e| {
            vec![
                timestamp(e.at_ms),
                e.epoch.to_string(),
                e.kind.clone(),
                e.detail.clone(),
                e.actor.clone(),
            ]
        })
        .collect();
    table(&["AT (UTC)", "EPOCH", "EVENT", "DETAIL", "BY"], rows)
}

pub fn policy_json(p: &pb::Policy) -> Value {
    json!({
        "heartbeat_interval_ms": p.heartbeat_interval_ms,
        "failure_timeout_ms": p.failure_timeout_ms,
        "lease_ms": p.lease_ms,
        "sync_mode": p.sync_mode,
        "sync_standbys": p.sync_standbys,
        "max_lag_on_failover_bytes": p.max_lag_on_failover_bytes,
        "lag_threshold_ms": p.lag_threshold_ms.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "alert_lag_warning_ms": p.alert_lag_warning_ms,
        "alert_lag_critical_ms": p.alert_lag_critical_ms,
        "alert_lag_emergency_ms": p.alert_lag_emergency_ms,
        "auto_failover_regions": p.auto_failover_regions,
        "maintenance": p.maintenance,
    })
}

fn cluster_json(c: &pb::Cluster) -> Value {
    json!({
        "cluster": c.name,
        "epoch": c.epoch,
        "primary": if c.primary.is_empty() { Value::Null } else { Value::from(c.primary.clone()) },
        "sync_set": c.sync_set,
        "endpoint_version": c.endpoint_version,
        "created_at_ms": c.created_at_ms,
        "held": c.held,
        "policy": c.policy.as_ref().map(policy_json),
        "members": c.members.iter().map(|m| json!({
            "name": m.name, "region": m.region, "host": m.host, "port": m.port,
            "workload": m.workload, "priority": m.priority, "nofailover": m.nofailover,
            "sync_eligible": m.sync_eligible,
        })).collect::<Vec<_>>(),
        "failover": c.failover.as_ref().map(|f| json!({
            "kind": f.kind, "step": f.step, "from_epoch": f.from_epoch, "to_epoch": f.to_epoch,
            "old_primary": f.old_primary, "candidate": f.candidate, "reason": f.reason,
            "started_at_ms": f.started_at_ms,
        })),
        "history": c.history.iter().map(event_json).collect::<Vec<_>>(),
    })
}

/// A history event in `--json`.
fn event_json(e: &pb::HistoryEvent) -> Value {
    json!({
        "at_ms": e.at_ms, "epoch": e.epoch, "kind": e.kind, "detail": e.detail,
        "actor": e.actor, "log_index": e.log_index, "duration_ms": e.duration_ms,
    })
}

/// `pgquorum history`: a cluster's events, newest last — failovers with their reason,
/// old and new primary, epochs, LSN and step durations; sync-set and policy changes.
pub async fn history(ctx: &Ctx, name: &str, limit: usize) -> Result<()> {
    let name = if name.is_empty() {
        only_cluster(ctx).await?
    } else {
        name.to_string()
    };
    let cluster = fetch(ctx, &name, false).await?;
    let events: Vec<&pb::HistoryEvent> = cluster
        .history
        .iter()
        .skip(cluster.history.len().saturating_sub(limit))
        .collect();
    let value = json!({
        "cluster": cluster.name,
        "events": events.iter().map(|e| event_json(e)).collect::<Vec<_>>(),
    });
    emit(ctx.json, &value, || history_table(events.iter().copied()));
    Ok(())
}

/// The name of the only cluster, or an error asking to name one.
pub async fn only_cluster(ctx: &Ctx) -> Result<String> {
    let request = pb::ListClustersRequest {
        consistency: consistency(false),
    };
    let reply = ctx
        .coordinators
        .call(|mut c| async move { c.list_clusters(request).await })
        .await?;
    match reply.clusters.as_slice() {
        [only] => Ok(only.name.clone()),
        [] => Err(crate::error::Error::Usage("no cluster exists yet".into())),
        many => Err(crate::error::Error::Usage(format!(
            "several clusters exist ({}); name one with --cluster",
            many.iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}
