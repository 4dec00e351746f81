//! An operator's failover or switchover, as a pure function: the checks that keep it
//! safe and the commands that carry it out. The admin service proposes what
//! [`hand_over`] returns, in order; the seeded simulation calls it too.

use pgquorum_client::lsn::Lsn;

use super::decide::{choose, lease_expired};
use crate::observe::health::fresh;
use crate::observe::ClusterReports;
use crate::state::{Cluster, Command, CommandError, FailoverRecord};
use crate::Error;

/// What the operator asked for.
#[derive(Clone, Debug)]
pub struct Request {
    /// The node to promote; None: the best candidate (a switchover only).
    pub to: Option<String>,
    /// Promote `to` even if it may lack acknowledged commits (a manual failover only).
    pub accept_data_loss: bool,
    pub kind: Kind,
    /// Who asked, for the history.
    pub actor: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `pgquorum failover`: the old primary is fenced like a failed one.
    Manual,
    /// `pgquorum switchover`: the old primary stops cleanly first.
    Switchover,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Manual => "manual",
            Kind::Switchover => "switchover",
        }
    }
}

/// The commands that start the hand-over `request` asks for, after checking that it
/// can finish and, unless `accept_data_loss`, that `to` holds every acknowledged
/// commit. With a failover in flight only an operator's override with
/// `accept_data_loss` is taken (it may first give up a lost candidate).
pub fn hand_over(
    cluster: &Cluster,
    reports: &ClusterReports,
    request: Request,
    now_ms: u64,
) -> Result<Vec<Command>, Error> {
    let Request {
        to,
        accept_data_loss,
        kind,
        actor,
    } = request;
    if let Some(f) = &cluster.failover {
        return match to {
            Some(to) if accept_data_loss && kind == Kind::Manual => {
                override_in_flight(cluster, reports, f, to, actor, now_ms)
            }
            _ => Err(Error::Command(CommandError::FailoverStep(format!(
                "a {} to epoch {} is in flight (step {}, candidate {:?}); wait for it, or if it cannot \
                 finish, take over with `pgquorum failover --to NODE --accept-data-loss`",
                f.kind, f.to_epoch, f.step, f.candidate
            )))),
        };
    }
    let Some(old_primary) = cluster.primary.clone() else {
        return Err(invalid(
            "cluster",
            "the cluster has no primary yet (not bootstrapped)",
        ));
    };
    let to = match to {
        Some(to) => to,
        None => {
            choose(cluster, reports, &old_primary)
                .map_err(|why| {
                    Error::Command(CommandError::FailoverStep(format!(
                        "no standby to hand over to: {why}"
                    )))
                })?
                .name
        }
    };
    if !cluster.members.contains_key(&to) {
        return Err(Error::Command(CommandError::UnknownMember(to)));
    }
    if old_primary == to {
        return Err(invalid("to", format!("{to} is already the primary")));
    }
    running_standby(cluster, reports, &to)?;
    if !accept_data_loss {
        let safe = choose(cluster, reports, &old_primary);
        let to_lsn = fresh(cluster, reports, &to).and_then(|o| Lsn::parse(&o.report.receive_lsn));
        // A switchover stops the primary cleanly, and a streaming standby receives all
        // of its WAL as it stops (the choice after the stop checks it): any standby
        // caught up within `max_lag_on_failover_bytes` will do. A failover fences, so
        // only one that holds every acknowledged commit now.
        let streaming =
            fresh(cluster, reports, &to).is_some_and(|o| o.report.wal_receiver_status == "streaming");
        let slack = cluster.policy.max_lag_on_failover_bytes;
        let why = match safe {
            Ok(best) if Some(best.lsn) == to_lsn && (cluster.sync_set.contains(&to) || best.name == to) => {
                None
            }
            Ok(best)
                if kind == Kind::Switchover
                    && streaming
                    && to_lsn.is_some_and(|lsn| lsn.0.saturating_add(slack) >= best.lsn.0) =>
            {
                None
            }
            Ok(best) => Some(format!("{} is more caught up or in the sync set", best.name)),
            Err(e) => Some(e),
        };
        if let Some(why) = why {
            let hint = match kind {
                Kind::Switchover => {
                    "; switch over to a synchronous standby, or to a streaming one within max_lag_on_failover_bytes"
                }
                Kind::Manual => "; to promote it anyway, add --accept-data-loss",
            };
            return Err(Error::Command(CommandError::FailoverStep(format!(
                "{to} may lack acknowledged commits ({why}){hint}"
            ))));
        }
    }
    let reason = match (kind, accept_data_loss) {
        (Kind::Switchover, _) => format!("operator asked for a switchover to {to}"),
        (_, true) => format!("operator asked for {to} accepting data loss"),
        _ => format!("operator asked for {to}"),
    };
    Ok(vec![Command::StartFailover {
        cluster: cluster.name.clone(),
        from_epoch: cluster.epoch,
        old_primary,
        candidate: Some(to),
        accept_data_loss,
        kind: kind.as_str().into(),
        reason,
        actor,
        at_ms: now_ms,
        scheduled: None,
    }])
}

/// An operator's candidate for a failover in flight that cannot finish on its own:
/// one still waiting for a candidate (`started`), or one whose chosen candidate is
/// lost (silent, its promote lease certainly over), which is given up first.
fn override_in_flight(
    cluster: &Cluster,
    reports: &ClusterReports,
    f: &FailoverRecord,
    to: String,
    actor: String,
    now_ms: u64,
) -> Result<Vec<Command>, Error> {
    running_standby(cluster, reports, &to)?;
    let mut commands = Vec::new();
    let mut to_epoch = f.to_epoch;
    if f.step == "candidate_chosen" {
        let lost =
            fresh(cluster, reports, &f.candidate).is_none() && lease_expired(cluster, reports, &f.candidate);
        if !lost {
            return Err(Error::Command(CommandError::FailoverStep(format!(
                "{} is being promoted (or its lease may still run); wait for it",
                f.candidate
            ))));
        }
        commands.push(Command::AbandonCandidate {
            cluster: cluster.name.clone(),
            to_epoch,
            candidate: f.candidate.clone(),
            reason: format!("the operator takes over with {to}"),
            at_ms: now_ms,
        });
        to_epoch += 1;
    }
    commands.push(Command::OverrideCandidate {
        cluster: cluster.name.clone(),
        to_epoch,
        candidate: to,
        actor,
        at_ms: now_ms,
    });
    Ok(commands)
}

/// A target must be a standby whose Postgres runs and whose agent reports.
/// `to` may be promoted: not held (force-new-group), not in maintenance, running as a
/// standby that reports.
fn running_standby(cluster: &Cluster, reports: &ClusterReports, to: &str) -> Result<(), Error> {
    cluster.admits(to)?;
    if cluster.in_maintenance(to) {
        return Err(Error::Command(CommandError::FailoverStep(format!(
            "{to} is in maintenance; end it first (pgquorum maintenance off {to})"
        ))));
    }
    if cluster.out_of_service(to) {
        return Err(Error::Command(CommandError::FailoverStep(format!(
            "{to} is to be rebuilt (pgquorum reinit); choose another standby"
        ))));
    }
    if !cluster.on_primary_roster(to) {
        return Err(Error::Command(CommandError::FailoverStep(format!(
            "{to} joined after the primary's last reported failsafe roster: the primary may be writing on \
             promises it never asked {to} for; wait until the primary reports again (one heartbeat), \
             or choose another standby"
        ))));
    }
    let running =
        fresh(cluster, reports, to).is_some_and(|o| o.report.postgres_up && o.report.role == "standby");
    if running {
        return Ok(());
    }
    Err(Error::Command(CommandError::FailoverStep(format!(
        "{to} is not a running standby reporting to the coordinators"
    ))))
}

fn invalid(field: &str, message: impl Into<String>) -> Error {
    Error::InvalidArgument {
        field: field.to_string(),
        message: message.into(),
    }
}
