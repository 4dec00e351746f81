//! Domain types to protobuf, in one place so each mapping is written once.

use pgquorum_proto::v1 as pb;

use crate::state::{Cluster, FailoverRecord, HistoryEvent, Member, Order, Policy, ScheduledSwitchover};

impl From<&Policy> for pb::Policy {
    fn from(p: &Policy) -> pb::Policy {
        pb::Policy {
            heartbeat_interval_ms: p.heartbeat_interval_ms,
            failure_timeout_ms: p.failure_timeout_ms,
            lease_ms: p.lease_ms,
            sync_mode: p.sync_mode.as_str().to_string(),
            sync_standbys: p.sync_standbys,
            max_lag_on_failover_bytes: p.max_lag_on_failover_bytes,
            lag_threshold_ms: p.lag_threshold_ms.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            alert_lag_warning_ms: p.alert_lag_warning_ms,
            alert_lag_critical_ms: p.alert_lag_critical_ms,
            alert_lag_emergency_ms: p.alert_lag_emergency_ms,
            auto_failover_regions: p.auto_failover_regions.clone(),
            maintenance: p.maintenance,
        }
    }
}

impl From<&Member> for pb::Member {
    fn from(m: &Member) -> pb::Member {
        pb::Member {
            name: m.name.clone(),
            region: m.region.clone(),
            host: m.host.clone(),
            port: m.port.into(),
            workload: m.workload.clone(),
            priority: m.priority,
            nofailover: m.nofailover,
            sync_eligible: m.sync_eligible,
            agent_addr: m.agent_addr.clone(),
        }
    }
}

impl From<&FailoverRecord> for pb::FailoverRecord {
    fn from(f: &FailoverRecord) -> pb::FailoverRecord {
        pb::FailoverRecord {
            kind: f.kind.clone(),
            step: f.step.clone(),
            from_epoch: f.from_epoch,
            to_epoch: f.to_epoch,
            old_primary: f.old_primary.clone(),
            candidate: f.candidate.clone(),
            reason: f.reason.clone(),
            started_at_ms: f.started_at_ms,
            fenced_by: f.fenced_by.clone(),
            fenced_at_ms: f.fenced_at_ms,
            chosen_at_ms: f.chosen_at_ms,
            candidate_lsn: f.candidate_lsn.clone(),
        }
    }
}

/// The members with `order` asked and not done.
fn pending(c: &Cluster, order: Order) -> Vec<String> {
    c.members
        .keys()
        .filter(|m| c.pending(m, order) > 0)
        .cloned()
        .collect()
}

impl From<&ScheduledSwitchover> for pb::ScheduledSwitchover {
    fn from(s: &ScheduledSwitchover) -> pb::ScheduledSwitchover {
        pb::ScheduledSwitchover {
            at_ms: s.at_ms,
            to: s.to.clone().unwrap_or_default(),
            from: s.from.clone(),
            actor: s.actor.clone(),
            asked_at_ms: s.asked_at_ms,
        }
    }
}

impl From<&HistoryEvent> for pb::HistoryEvent {
    fn from(e: &HistoryEvent) -> pb::HistoryEvent {
        pb::HistoryEvent {
            at_ms: e.at_ms,
            epoch: e.epoch,
            kind: e.kind.clone(),
            detail: e.detail.clone(),
            actor: e.actor.clone(),
            log_index: e.log_index,
            duration_ms: e.duration_ms,
        }
    }
}

impl From<&Cluster> for pb::Cluster {
    fn from(c: &Cluster) -> pb::Cluster {
        pb::Cluster {
            name: c.name.clone(),
            policy: Some((&c.policy).into()),
            members: c.members.values().map(Into::into).collect(),
            epoch: c.epoch,
            primary: c.primary.clone().unwrap_or_default(),
            sync_set: c.sync_set.clone(),
            endpoint_version: c.endpoint_version,
            failover: c.failover.as_ref().map(Into::into),
            history: c.history.iter().map(Into::into).collect(),
            created_at_ms: c.created_at_ms,
            drained: c.drained.iter().cloned().collect(),
            held: c.held.iter().cloned().collect(),
            maintenance: c.maintenance.iter().cloned().collect(),
            reinit_pending: pending(c, Order::Reinit),
            restart_pending: pending(c, Order::Restart),
            reload_pending: pending(c, Order::Reload),
            parameters: c.parameters.clone().into_iter().collect(),
            parameters_version: c.parameters_version,
            scheduled_switchover: c.scheduled_switchover.as_ref().map(Into::into),
        }
    }
}
