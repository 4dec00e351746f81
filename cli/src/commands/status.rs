//! `pgquorum status` and `pgquorum alerts`: the live state of a cluster's nodes.

use pgquorum_client::pb;
use serde_json::{json, Value};

use super::Ctx;
use crate::error::{Error, Result};
use crate::output::{emit, table};

pub async fn status(ctx: &Ctx, cluster: &str) -> Result<()> {
    let reply = fetch(ctx, cluster).await?;
    emit(ctx.json, &status_json(&reply), || status_table(&reply));
    Ok(())
}

/// The live status of a cluster (from the Raft leader, which holds the reports).
pub async fn fetch(ctx: &Ctx, cluster: &str) -> Result<pb::StatusReply> {
    let request = pb::StatusRequest {
        cluster: cluster.to_string(),
    };
    Ok(ctx
        .coordinators
        .call(|mut c| {
            let request = request.clone();
            async move { c.status(request).await }
        })
        .await?)
}

/// The JSON of `status --json` (keys fixed by DESIGN.md; add, never rename).
pub fn status_json(s: &pb::StatusReply) -> Value {
    let raft = s.raft.clone().unwrap_or_default();
    json!({
        "cluster": s.cluster,
        "epoch": s.epoch,
        "primary": if s.primary.is_empty() { Value::Null } else { Value::from(s.primary.clone()) },
        "maintenance": s.maintenance,
        "paused": s.maintenance,
        "failsafe": s.failsafe,
        "sync_mode": s.sync_mode,
        "sync_set": s.sync_set,
        "failover": s.failover.as_ref().map(|f| json!({
            "kind": f.kind, "step": f.step, "from_epoch": f.from_epoch, "to_epoch": f.to_epoch,
            "old_primary": f.old_primary, "candidate": f.candidate, "reason": f.reason,
        })),
        "scheduled_switchover": s.scheduled_switchover.as_ref().map(|w| json!({
            "at_ms": w.at_ms, "to": if w.to.is_empty() { Value::Null } else { Value::from(w.to.clone()) },
            "from": w.from, "actor": w.actor,
        })),
        "raft": {
            "leader": raft.leader_id,
            "term": raft.term,
            "members": raft.members.iter().map(|m| json!({
                "id": m.id,
                "role": if Some(m.id) == raft.leader_id { "leader" } else if m.voter { "follower" } else { "learner" },
                "region": m.region,
                "addr": m.addr,
            })).collect::<Vec<_>>(),
        },
        "nodes": s.nodes.iter().map(|n| json!({
            "name": n.name,
            "role": n.role,
            "health": n.health,
            "sync_state": n.sync_state,
            "timeline": n.timeline,
            "lag_ms": n.lag_ms,
            "lag_bytes": n.lag_bytes,
            "lag_source": lag_source(n),
            "workload": n.workload,
            "region": n.region,
            "heartbeat_age_ms": n.heartbeat_age_ms,
            "host": n.host,
            "port": n.port,
            "current_lsn": n.current_lsn,
            "receive_lsn": n.receive_lsn,
            "replay_lsn": n.replay_lsn,
            "replay_paused": n.replay_paused,
            "in_sync_set": n.in_sync_set,
            "drained": n.drained,
            "held": n.held,
            "maintenance": n.maintenance,
            "reinit_pending": n.reinit_pending,
            "restart_requested": n.restart_requested,
            "reload_requested": n.reload_requested,
            "pending_restart": n.pending_restart,
            "pending_restart_parameters": n.pending_restart_parameters,
            "parameters_version": n.parameters_version,
            "parameter_errors": n.parameter_errors,
            "lease_left_ms": n.lease_left_ms,
            "error": n.error,
        })).collect::<Vec<_>>(),
    })
}

/// `lag_source` in `--json`: how `lag_ms` was measured (`at_least`: a lower bound).
fn lag_source(n: &pb::NodeStatus) -> &'static str {
    match n.lag_source() {
        pb::LagSource::Unknown => "unknown",
        pb::LagSource::CaughtUp => "caught_up",
        pb::LagSource::WalClock => "wal_clock",
        pb::LagSource::Primary => "primary",
        pb::LagSource::Standby => "standby",
        pb::LagSource::AtLeast => "at_least",
    }
}

/// Lag in the table: `>=N` for a lower bound, `-` when unknown.
fn lag_ms(n: &pb::NodeStatus) -> String {
    match n.lag_source() {
        pb::LagSource::Unknown if n.role != "primary" => "-".into(),
        pb::LagSource::AtLeast => format!(">={}", n.lag_ms),
        _ => n.lag_ms.to_string(),
    }
}

fn status_table(s: &pb::StatusReply) -> String {
    let raft = s.raft.clone().unwrap_or_default();
    let rows = s
        .nodes
        .iter()
        .map(|n| {
            let lsn = match n.role.as_str() {
                "primary" => n.current_lsn.clone(),
                _ if !n.replay_lsn.is_empty() => format!("{} / {}", n.receive_lsn, n.replay_lsn),
                _ => "-".into(),
            };
            let mut health = n.health.clone();
            let flags = [
                (n.replay_paused, " (replay paused)"),
                (n.held, " (held)"),
                (n.drained, " (drained)"),
                (n.maintenance, " (MAINTENANCE)"),
                (n.reinit_pending, " (REINIT)"),
                (n.restart_requested, " (RESTARTING)"),
                (n.pending_restart, " (PENDING RESTART)"),
                (!n.parameter_errors.is_empty(), " (BAD PARAMETER)"),
            ];
            for (_, flag) in flags.iter().filter(|(on, _)| *on) {
                health.push_str(flag);
            }
            if let Some(left) = n.lease_left_ms {
                health.push_str(&format!(" (lease {left} ms)"));
            }
            vec![
                n.name.clone(),
                format!("{}:{}", n.host, n.port),
                n.role.clone(),
                health,
                n.sync_state.clone(),
                lag_ms(n),
                n.lag_bytes.to_string(),
                lsn,
                n.timeline.to_string(),
                n.workload.clone(),
                n.region.clone(),
                n.heartbeat_age_ms
                    .map(|a| format!("{a} ms"))
                    .unwrap_or_else(|| "never".into()),
            ]
        })
        .collect();
    let in_flight = s
        .failover
        .as_ref()
        .map(|f| {
            format!(
                "{} IN FLIGHT: epoch {} -> {}, step {}, old primary {}, candidate {} ({})\n",
                if f.kind == "switchover" {
                    "SWITCHOVER"
                } else {
                    "FAILOVER"
                },
                f.from_epoch,
                f.to_epoch,
                f.step,
                f.old_primary,
                if f.candidate.is_empty() {
                    "not chosen yet"
                } else {
                    &f.candidate
                },
                f.reason
            )
        })
        .unwrap_or_default();
    let scheduled =
        s.scheduled_switchover
            .as_ref()
            .map(|w| {
                format!(
                "switchover scheduled at {} UTC: {} -> {} (asked by {}; `pgquorum switchover --cancel`)\n",
                crate::output::timestamp(w.at_ms),
                w.from,
                if w.to.is_empty() { "the best candidate then" } else { &w.to },
                w.actor
            )
            })
            .unwrap_or_default();
    format!(
        "cluster {}   epoch {}   primary {}   sync {} {:?}{}{}   raft leader {} (term {})\n{in_flight}{scheduled}{}",
        s.cluster,
        s.epoch,
        if s.primary.is_empty() { "-" } else { &s.primary },
        s.sync_mode,
        s.sync_set,
        if s.maintenance {
            "   PAUSED (no automatic failover; `pgquorum resume`)"
        } else {
            ""
        },
        if s.failsafe {
            "   FAILSAFE (the primary wrote on its standbys' promises)"
        } else {
            ""
        },
        raft.leader_id
            .map(|l| l.to_string())
            .unwrap_or_else(|| "-".into()),
        raft.term,
        table(
            &[
                "NODE",
                "ADDRESS",
                "ROLE",
                "HEALTH",
                "SYNC",
                "LAG MS",
                "LAG BYTES",
                "LSN (RECEIVED / REPLAYED)",
                "TL",
                "WORKLOAD",
                "REGION",
                "HEARTBEAT",
            ],
            rows
        )
    )
}

pub async fn alerts(ctx: &Ctx, cluster: &str) -> Result<()> {
    let request = pb::AlertsRequest {
        cluster: cluster.to_string(),
    };
    let reply = ctx
        .coordinators
        .call(|mut c| {
            let request = request.clone();
            async move { c.alerts(request).await }
        })
        .await?;
    let value = json!({
        "cluster": reply.cluster,
        "alerts": reply.alerts.iter().map(|a| json!({
            "severity": a.severity, "node": a.node, "message": a.message,
        })).collect::<Vec<_>>(),
    });
    emit(ctx.json, &value, || {
        if reply.alerts.is_empty() {
            return format!("cluster {}: no alerts", reply.cluster);
        }
        let rows = reply
            .alerts
            .iter()
            .map(|a| vec![a.severity.clone(), a.node.clone(), a.message.clone()])
            .collect();
        table(&["SEVERITY", "NODE", "MESSAGE"], rows)
    });
    // Exit 1 when anything is CRITICAL or worse, so a cron job or a check script can
    // page on the exit code alone (WARNING alone exits 0).
    let serious = reply
        .alerts
        .iter()
        .filter(|a| matches!(a.severity.as_str(), "CRITICAL" | "EMERGENCY"))
        .count();
    if serious > 0 {
        return Err(Error::Outcome(format!(
            "{serious} alert(s) CRITICAL or worse in cluster {}",
            reply.cluster
        )));
    }
    Ok(())
}

pub async fn failover(
    ctx: &Ctx,
    cluster: &str,
    to: &str,
    accept_data_loss: bool,
    wait: Option<std::time::Duration>,
) -> Result<()> {
    let request = pb::FailoverRequest {
        cluster: cluster.to_string(),
        to: to.to_string(),
        accept_data_loss,
        actor: super::actor(),
    };
    let reply = ctx
        .coordinators
        .call(|mut c| {
            let request = request.clone();
            async move { c.failover(request).await }
        })
        .await?;
    if wait.is_none() || !ctx.json {
        started(ctx, &reply, "the old primary {old} is fenced first");
    }
    match wait {
        Some(within) => wait_for_outcome(ctx, &reply, within).await,
        None => Ok(()),
    }
}

/// `pgquorum switchover`.
pub async fn switchover(ctx: &Ctx, cluster: &str, to: &str, wait: Option<std::time::Duration>) -> Result<()> {
    let reply = start_switchover(ctx, cluster, to, 0).await?;
    if wait.is_none() || !ctx.json {
        started(
            ctx,
            &reply,
            "the old primary {old} stops cleanly first, then follows",
        );
    }
    match wait {
        Some(within) => wait_for_outcome(ctx, &reply, within).await,
        None => Ok(()),
    }
}

/// Asks for a switchover (to the best candidate when `to` is empty), now or, with
/// `at_ms` (unix ms, 0: now), at that time.
pub async fn start_switchover(ctx: &Ctx, cluster: &str, to: &str, at_ms: u64) -> Result<pb::FailoverReply> {
    let request = pb::SwitchoverRequest {
        cluster: cluster.to_string(),
        to: to.to_string(),
        actor: super::actor(),
        at_ms,
    };
    Ok(ctx
        .coordinators
        .call(|mut c| {
            let request = request.clone();
            async move { c.switchover(request).await }
        })
        .await?)
}

/// `--wait`: follows a started failover or switchover step by step (see [`follow`])
/// and says how it ended; an error when it ended with another primary than asked for,
/// or not within `within`.
pub async fn wait_for_outcome(
    ctx: &Ctx,
    reply: &pb::FailoverReply,
    within: std::time::Duration,
) -> Result<()> {
    let f = reply.failover.clone().unwrap_or_default();
    let (s, ms) = follow(ctx, reply, within).await?;
    let value = json!({
        "cluster": s.cluster, "epoch": s.epoch, "primary": s.primary,
        "asked_for": f.candidate, "waited_ms": ms,
    });
    emit(ctx.json, &value, || {
        format!(
            "done: {} is the primary of epoch {} ({ms} ms)",
            s.primary, s.epoch
        )
    });
    if !f.candidate.is_empty() && s.primary != f.candidate {
        return Err(Error::Outcome(format!(
            "{} was promoted instead of {} (see `pgquorum history` for why)",
            s.primary, f.candidate
        )));
    }
    Ok(())
}

/// Follows a started failover or switchover, a line per step (on stderr with
/// `--json`), until its epoch has a running primary: the status then and how long it
/// took in ms. An error when that takes longer than `within`.
pub async fn follow(
    ctx: &Ctx,
    reply: &pb::FailoverReply,
    within: std::time::Duration,
) -> Result<(pb::StatusReply, u64)> {
    let f = reply.failover.clone().unwrap_or_default();
    let started = std::time::Instant::now();
    let deadline = started + within;
    let mut last_step = String::new();
    loop {
        let s = fetch(ctx, &reply.cluster).await?;
        let step = match &s.failover {
            Some(now) if now.to_epoch >= f.to_epoch => format!("{} (candidate {})", now.step, now.candidate),
            _ if s.epoch >= f.to_epoch
                && s.nodes.iter().any(|n| n.name == s.primary && n.role == "primary") =>
            {
                let ms = started.elapsed().as_millis() as u64;
                // The last step, however quickly the others went by (people get
                // the outcome from the caller).
                if ctx.json {
                    eprintln!("{ms} ms: done ({} runs as primary)", s.primary);
                }
                return Ok((s, ms));
            }
            _ => "completing".to_string(),
        };
        if step != last_step {
            let line = format!("{} ms: {step}", started.elapsed().as_millis());
            if ctx.json {
                eprintln!("{line}");
            } else {
                println!("{line}");
            }
            last_step = step;
        }
        if std::time::Instant::now() >= deadline {
            return Err(Error::Timeout(format!(
                "the {} to epoch {} did not finish within {} s (last step: {last_step}); it goes on: \
                 follow it with `pgquorum status`",
                f.kind,
                f.to_epoch,
                within.as_secs()
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Prints a started failover or switchover; `how` may name the old primary as `{old}`.
fn started(ctx: &Ctx, reply: &pb::FailoverReply, how: &str) {
    let f = reply.failover.clone().unwrap_or_default();
    let value = json!({
        "cluster": reply.cluster, "epoch": reply.epoch,
        "failover": {"kind": f.kind, "step": f.step, "old_primary": f.old_primary, "candidate": f.candidate,
                     "from_epoch": f.from_epoch, "to_epoch": f.to_epoch, "reason": f.reason},
    });
    emit(ctx.json, &value, || {
        format!(
            "{} of {} to {} started (epoch {} -> {}); {}.\n\
             follow it with `pgquorum status` and `pgquorum cluster show {}`",
            if f.kind == "switchover" {
                "switchover"
            } else {
                "failover"
            },
            reply.cluster,
            f.candidate,
            f.from_epoch,
            f.to_epoch,
            how.replace("{old}", &f.old_primary),
            reply.cluster
        )
    });
}

/// `pgquorum drain` / `undrain`.
pub async fn drain(ctx: &Ctx, cluster: &str, node: &str, drained: bool) -> Result<()> {
    let request = pb::DrainRequest {
        cluster: cluster.to_string(),
        node: node.to_string(),
        drained,
        actor: super::actor(),
    };
    let reply = ctx
        .coordinators
        .call(|mut c| {
            let request = request.clone();
            async move { c.drain(request).await }
        })
        .await?;
    let value = json!({
        "cluster": reply.cluster, "node": node, "drained": drained,
        "endpoint_version": reply.endpoint_version, "drained_nodes": reply.drained,
    });
    emit(ctx.json, &value, || {
        format!(
            "{node} is {} read routing of {} (endpoint map version {}); drained now: {}",
            if drained { "out of" } else { "back in" },
            reply.cluster,
            reply.endpoint_version,
            if reply.drained.is_empty() {
                "none".to_string()
            } else {
                reply.drained.join(", ")
            }
        )
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failover_in_flight_is_shown_first() {
        let mut s = pb::StatusReply {
            cluster: "main".into(),
            epoch: 3,
            ..Default::default()
        };
        assert!(!status_table(&s).contains("IN FLIGHT"));
        s.failover = Some(pb::FailoverRecord {
            kind: "failover".into(),
            step: "started".into(),
            from_epoch: 2,
            to_epoch: 3,
            old_primary: "node1".into(),
            reason: "Postgres on node1 stopped".into(),
            ..Default::default()
        });
        let table = status_table(&s);
        assert!(
            table.contains(
                "FAILOVER IN FLIGHT: epoch 2 -> 3, step started, old primary node1, candidate not chosen yet"
            ),
            "{table}"
        );
        assert_eq!(status_json(&s)["failover"]["step"], "started");
    }
}
