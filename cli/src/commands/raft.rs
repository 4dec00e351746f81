//! `pgquorum raft status|add|promote|remove|force-new-group`: the coordinator group itself.

use std::time::Duration;

use pgquorum_client::{pb, Coordinators, Timeouts};
use serde_json::{json, Value};

use super::Ctx;
use crate::error::Result;
use crate::output::{emit, table};

/// One member as the status table shows it: the leader's view of membership and
/// replication, plus what the member says of itself when it answers.
struct Row {
    member: pb::RaftMember,
    own: Option<pb::RaftStatusReply>,
    error: Option<String>,
}

pub async fn status(ctx: &Ctx) -> Result<()> {
    // Any coordinator tells us the membership and who leads; the leader's own view
    // adds replication progress.
    let first = ctx
        .coordinators
        .call(|mut c| async move { c.raft_status(pb::RaftStatusRequest {}).await })
        .await?;
    let probe = Coordinators::new(
        vec![first.addr.clone()],
        Timeouts {
            connect: Duration::from_millis(300),
            request: Duration::from_secs(1),
            overall: Duration::from_secs(1),
            unreachable: None,
        },
    )?;
    let view = if first.state != "leader" && !first.leader_addr.is_empty() {
        probe
            .call_at(&first.leader_addr, |mut c| async move {
                c.raft_status(pb::RaftStatusRequest {}).await
            })
            .await
            .unwrap_or(first)
    } else {
        first
    };
    let mut rows = Vec::new();
    for member in &view.members {
        let own = probe
            .call_at(&member.addr, |mut c| async move {
                c.raft_status(pb::RaftStatusRequest {}).await
            })
            .await;
        let (own, error) = match own {
            Ok(s) if s.id == member.id => (Some(s), None),
            Ok(s) => (None, Some(format!("address answered as coordinator {}", s.id))),
            Err(e) => (None, Some(e.to_string())),
        };
        rows.push(Row {
            member: member.clone(),
            own,
            error,
        });
    }

    let value = json!({
        "leader": view.leader_id,
        "term": view.term,
        "group": view.group,

        "members": rows.iter().map(|r| json!({
            "id": r.member.id,
            "addr": r.member.addr,
            "region": r.member.region,
            "voter": r.member.voter,
            "role": role(r),
            "reachable": r.own.is_some(),
            "term": r.own.as_ref().map(|s| s.term),
            "last_log_index": r.own.as_ref().map(|s| s.last_log_index),
            "last_applied_index": r.own.as_ref().map(|s| s.last_applied_index),
            "snapshot_index": r.own.as_ref().map(|s| s.snapshot_index),
            "matched_index": r.member.matched_index,
            "group": r.own.as_ref().map(|s| s.group.clone()),
            "superseded": r.own.as_ref().map(|s| s.superseded.clone()).filter(|s| !s.is_empty()),
            "error": r.error,
        })).collect::<Vec<Value>>(),
    });
    emit(ctx.json, &value, || {
        let leader = view
            .leader_id
            .map(|l| l.to_string())
            .unwrap_or_else(|| "none".into());
        let body = rows
            .iter()
            .map(|r| {
                let own = r.own.as_ref();
                let num = |f: fn(&pb::RaftStatusReply) -> u64| {
                    own.map(|s| f(s).to_string()).unwrap_or_else(|| "-".into())
                };
                vec![
                    r.member.id.to_string(),
                    r.member.addr.clone(),
                    r.member.region.clone(),
                    role(r),
                    num(|s| s.term),
                    num(|s| s.last_log_index),
                    num(|s| s.last_applied_index),
                    r.member
                        .matched_index
                        .map(|m| m.to_string())
                        .unwrap_or_else(|| "-".into()),
                    match &r.error {
                        None => "yes".into(),
                        Some(e) => format!("no: {e}"),
                    },
                ]
            })
            .collect();
        let superseded: String = rows
            .iter()
            .filter_map(|r| r.own.as_ref().filter(|s| !s.superseded.is_empty()))
            .map(|s| format!("\ncoordinator {} is SUPERSEDED: {}", s.id, s.superseded))
            .collect();
        format!(
            "leader: {leader}   term: {}   group: {}\n{}{superseded}",
            view.term,
            view.group,
            table(
                &[
                    "ID",
                    "ADDRESS",
                    "REGION",
                    "ROLE",
                    "TERM",
                    "LAST LOG",
                    "APPLIED",
                    "REPLICATED",
                    "REACHABLE"
                ],
                body
            )
        )
    });
    Ok(())
}

fn role(r: &Row) -> String {
    match &r.own {
        Some(s) => s.state.clone(),
        None if r.member.voter => "voter (unreachable)".into(),
        None => "learner (unreachable)".into(),
    }
}

fn print_membership(ctx: &Ctx, what: &str, reply: &pb::MembershipReply) {
    let value = json!({
        "log_index": reply.log_index,
        "members": reply.members.iter().map(|m| json!({
            "id": m.id, "addr": m.addr, "region": m.region, "voter": m.voter,
        })).collect::<Vec<Value>>(),
    });
    emit(ctx.json, &value, || {
        let rows = reply
            .members
            .iter()
            .map(|m| {
                let kind = if m.voter { "voter" } else { "learner" };
                vec![
                    m.id.to_string(),
                    m.addr.clone(),
                    m.region.clone(),
                    kind.to_string(),
                ]
            })
            .collect();
        format!(
            "{what} (log index {})\n{}",
            reply.log_index,
            table(&["ID", "ADDRESS", "REGION", "KIND"], rows)
        )
    });
}

pub async fn add(ctx: &Ctx, id: u64, addr: &str, region: &str) -> Result<()> {
    let request = pb::AddLearnerRequest {
        id,
        addr: addr.to_string(),
        region: region.to_string(),
    };
    let reply = ctx
        .coordinators
        .call(|mut c| {
            let request = request.clone();
            async move { c.add_learner(request).await }
        })
        .await?;
    print_membership(
        ctx,
        &format!("coordinator {id} added as a learner and caught up"),
        &reply,
    );
    Ok(())
}

pub async fn promote(ctx: &Ctx, id: u64) -> Result<()> {
    let reply = ctx
        .coordinators
        .call(|mut c| async move { c.promote_voter(pb::PromoteVoterRequest { id }).await })
        .await?;
    print_membership(ctx, &format!("coordinator {id} is now a voter"), &reply);
    Ok(())
}

pub async fn remove(ctx: &Ctx, id: u64) -> Result<()> {
    let reply = ctx
        .coordinators
        .call(|mut c| async move { c.remove_node(pb::RemoveNodeRequest { id }).await })
        .await?;
    print_membership(
        ctx,
        &format!("coordinator {id} removed; it can be stopped now"),
        &reply,
    );
    Ok(())
}

pub async fn force_new_group(ctx: &Ctx, on: &str, reason: &str, accept_split_brain_risk: bool) -> Result<()> {
    let request = pb::ForceNewGroupRequest {
        accept_split_brain_risk,
        reason: reason.to_string(),
        actor: super::actor(),
    };
    let reply = ctx
        .coordinators
        .call_at(on, |mut c| {
            let request = request.clone();
            async move { c.force_new_group(request).await }
        })
        .await?;
    let value = json!({
        "group": reply.group,
        "previous_group": reply.previous_group,
        "formed_by": reply.formed_by,
        "previous_voters": reply.previous_voters,
        "reachable_voters": reply.reachable_voters,
    });
    emit(ctx.json, &value, || {
        format!(
            "coordinator {} restarts as the only voter of group {} (was {}, voters {:?}; answering: {:?}).\n\
             Every database node is held until readmitted: check each, then `pgquorum cluster readmit CLUSTER NODE`.\n\
             Other coordinators join only with an empty data_dir and no initial_members: `pgquorum raft add`, then `raft promote`.",
            reply.formed_by, reply.group, reply.previous_group, reply.previous_voters, reply.reachable_voters
        )
    });
    Ok(())
}
