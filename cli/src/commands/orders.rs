//! What an operator asks of one node's agent, carried out once: `pgquorum reinit NODE`
//! (rebuild a standby from a fresh base backup of the primary, Patroni's `reinit`),
//! `pgquorum reload [NODE…|--all]` (reload Postgres's configuration) and `pgquorum
//! restart [NODE…|--all] [--pending] [--switchover]` (a rolling restart: standbys one
//! at a time, the primary last, in place under its lease or after a switchover).
//! Orders are replicated: one asked of a node whose agent is down is carried out when
//! it is back. Each is followed until the node reports it done (and runs again).

use std::time::{Duration, Instant};

use serde_json::json;

use super::{actor, status, Ctx};
use crate::error::{Error, Result};
use crate::output::emit;
use pgquorum_client::pb;

/// Asks `order` of `node`.
async fn ask(ctx: &Ctx, cluster: &str, node: &str, order: pb::NodeOrder) -> Result<pb::Cluster> {
    let request = pb::OrderNodeRequest {
        cluster: cluster.to_string(),
        node: node.to_string(),
        order: order as i32,
        actor: actor(),
    };
    let reply = ctx
        .coordinators
        .call(|mut c| {
            let request = request.clone();
            async move { c.order_node(request).await }
        })
        .await?;
    Ok(reply.cluster.unwrap_or_default())
}

/// Whether `n` has carried out `order` and runs again as `role` (any role if None).
fn done(n: &pb::NodeStatus, order: pb::NodeOrder, role: Option<&str>) -> bool {
    let pending = match order {
        pb::NodeOrder::Reinit => n.reinit_pending,
        pb::NodeOrder::Restart => n.restart_requested,
        pb::NodeOrder::Reload => n.reload_requested,
        pb::NodeOrder::Unspecified => false,
    };
    !pending && n.health == "HEALTHY" && role.is_none_or(|r| n.role == r)
}

/// Waits until `node` satisfies `ready`; its status then and the ms waited.
pub(crate) async fn wait_for(
    ctx: &Ctx,
    cluster: &str,
    node: &str,
    what: &str,
    within: Duration,
    ready: impl Fn(&pb::NodeStatus) -> bool,
) -> Result<(pb::NodeStatus, u64)> {
    let started = Instant::now();
    loop {
        let s = status::fetch(ctx, cluster).await?;
        if let Some(n) = s.nodes.iter().find(|n| n.name == node).filter(|n| ready(n)) {
            return Ok((n.clone(), started.elapsed().as_millis() as u64));
        }
        if started.elapsed() >= within {
            return Err(Error::Timeout(format!(
                "{node}: {what} not done within {} s; it goes on: follow it with `pgquorum status`",
                within.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn progress(ctx: &Ctx, line: String) {
    if ctx.json {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
}

/// `pgquorum reinit NODE [--wait]`.
pub async fn reinit(ctx: &Ctx, cluster: &str, node: &str, wait: Option<Duration>) -> Result<()> {
    let c = ask(ctx, cluster, node, pb::NodeOrder::Reinit).await?;
    let Some(within) = wait else {
        let value = json!({ "cluster": c.name, "node": node, "reinit_pending": c.reinit_pending });
        emit(ctx.json, &value, || {
            format!(
                "{node} of {} is rebuilt from a fresh base backup by its agent (once it is out of the sync \
                 set); follow it with `pgquorum status` (REINIT until done) or ask with --wait",
                c.name
            )
        });
        return Ok(());
    };
    let (_, ms) = wait_for(ctx, &c.name, node, "reinit", within, |n| {
        done(n, pb::NodeOrder::Reinit, Some("standby"))
    })
    .await?;
    let value = json!({ "cluster": c.name, "node": node, "reinit_pending": false, "waited_ms": ms });
    emit(ctx.json, &value, || {
        format!("{node} rebuilt and streaming again ({ms} ms)")
    });
    Ok(())
}

/// The nodes named, or every node with `all` (empty names and no `all`: a usage error).
fn targets(s: &pb::StatusReply, names: &[String], all: bool) -> Result<Vec<String>> {
    if all {
        return Ok(s.nodes.iter().map(|n| n.name.clone()).collect());
    }
    if names.is_empty() {
        return Err(Error::Usage("name the nodes, or --all".into()));
    }
    for name in names {
        if !s.nodes.iter().any(|n| &n.name == name) {
            return Err(Error::Usage(format!("{name:?} is not a member of {}", s.cluster)));
        }
    }
    Ok(names.to_vec())
}

/// `pgquorum reload [NODE…|--all]`: every node named reloads; waits until each says so.
pub async fn reload(ctx: &Ctx, cluster: &str, names: &[String], all: bool, within: Duration) -> Result<()> {
    let s = status::fetch(ctx, cluster).await?;
    let nodes = targets(&s, names, all)?;
    for node in &nodes {
        ask(ctx, &s.cluster, node, pb::NodeOrder::Reload).await?;
    }
    for node in &nodes {
        wait_for(ctx, &s.cluster, node, "reload", within, |n| !n.reload_requested).await?;
    }
    let value = json!({ "cluster": s.cluster, "reloaded": nodes });
    emit(ctx.json, &value, || format!("reloaded: {}", nodes.join(", ")));
    Ok(())
}

/// `pgquorum restart`: standbys one at a time, each back and healthy before the next,
/// the primary last, by switchover (`switchover`; without it the primary is left out,
/// with a note: its agent could not renew its lease while Postgres stops and starts).
/// With `pending`, only nodes whose Postgres waits for a restart. Nodes in maintenance
/// are left alone; nothing starts while any node reports a parameter Postgres refused
/// (it would not start again).
pub async fn restart(
    ctx: &Ctx,
    cluster: &str,
    names: &[String],
    all: bool,
    pending: bool,
    switchover: bool,
    within: Duration,
) -> Result<()> {
    let s = status::fetch(ctx, cluster).await?;
    let cluster = s.cluster.clone();
    let refused = super::config::refused(&s);
    if !refused.is_empty() {
        return Err(Error::Outcome(format!(
            "Postgres refuses parameters ({}); a restarted server would not start: fix them with \
             `pgquorum config set` first",
            refused.join(" | ")
        )));
    }
    let mut nodes = targets(&s, names, all || (pending && names.is_empty()))?;
    if pending {
        nodes.retain(|name| s.nodes.iter().any(|n| &n.name == name && n.pending_restart));
    }
    nodes.retain(|name| {
        let kept = !s.nodes.iter().any(|n| &n.name == name && n.maintenance);
        if !kept {
            progress(ctx, format!("{name} is in maintenance: left alone"));
        }
        kept
    });
    // Standbys first (by name), the primary last.
    nodes.sort_by_key(|n| (*n == s.primary, n.clone()));
    let mut restarted = Vec::new();
    let mut skipped = Vec::new();
    let mut switched_to = None;
    for node in &nodes {
        // Asked again each time: a failover meanwhile makes another node the primary.
        let primary = status::fetch(ctx, &cluster).await?.primary;
        if *node == primary {
            if !switchover {
                progress(
                    ctx,
                    format!("{node} is the primary: not restarted (add --switchover to switch over first)"),
                );
                skipped.push(node.clone());
                continue;
            }
            progress(ctx, format!("{node} is the primary: switching over first"));
            let started = status::start_switchover(ctx, &cluster, "", 0).await?;
            let (after, ms) = status::follow(ctx, &started, within).await?;
            progress(ctx, format!("{} is the primary ({ms} ms)", after.primary));
            switched_to = Some(after.primary);
            // Its clean stop and rejoin restarted it.
            wait_for(ctx, &cluster, node, "rejoin as a standby", within, |n| {
                n.role == "standby" && n.health == "HEALTHY"
            })
            .await?;
            restarted.push(node.clone());
            continue;
        }
        progress(ctx, format!("restarting {node}"));
        ask(ctx, &cluster, node, pb::NodeOrder::Restart).await?;
        let (n, ms) = wait_for(ctx, &cluster, node, "restart", within, |n| {
            done(n, pb::NodeOrder::Restart, Some("standby"))
        })
        .await?;
        progress(ctx, format!("{node} is back ({ms} ms)"));
        if !n.parameter_errors.is_empty() {
            return Err(Error::Outcome(format!(
                "{node} runs, but Postgres refused: {}; the rest is not restarted",
                n.parameter_errors.join("; ")
            )));
        }
        restarted.push(node.clone());
    }
    let value = json!({
        "cluster": cluster, "restarted": restarted, "skipped": skipped, "switched_over_to": switched_to,
    });
    emit(ctx.json, &value, || {
        if restarted.is_empty() {
            "nothing restarted".to_string()
        } else {
            format!("restarted: {}", restarted.join(", "))
        }
    });
    Ok(())
}
