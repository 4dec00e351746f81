//! `pgquorum switchover --at TIME` (Patroni's `--scheduled`) and `--cancel`. The
//! schedule is in the replicated state: the leader of the moment starts the switchover
//! at its time, with the checks of a switchover asked then, and drops it (with the
//! reason in the history) when it cannot start within a grace period, or when another
//! failover or switchover came first.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;

use super::{actor, status, Ctx};
use crate::error::{Error, Result};
use crate::output::{emit, timestamp};
use pgquorum_client::pb;

/// `--at`: an RFC 3339 time in UTC (`2026-12-03T06:00:00Z`, or with a space and no
/// `Z`), or `+DURATION` from `now_ms` (`+90s`, `+10m`, `+1h 30m`). Unix ms.
pub fn parse_at(text: &str, now_ms: u64) -> Result<u64> {
    let text = text.trim();
    let bad = |why: String| Error::Usage(format!("--at {text:?}: {why}"));
    if let Some(rest) = text.strip_prefix('+') {
        let d = humantime::parse_duration(rest.trim()).map_err(|e| bad(format!("{e} (e.g. +10m)")))?;
        return Ok(now_ms + d.as_millis() as u64);
    }
    let t = humantime::parse_rfc3339_weak(text).map_err(|e| {
        bad(format!(
            "{e}: give a UTC time like 2026-12-03T06:00:00Z, or +DURATION like +10m"
        ))
    })?;
    let ms = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
    if ms <= now_ms {
        return Err(bad(format!("{} UTC is not in the future", timestamp(ms))));
    }
    Ok(ms)
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// Schedules the switchover; with `wait`, waits for its time, then follows it (see
/// [`status::follow`]) for up to `wait` from then.
pub async fn schedule(ctx: &Ctx, cluster: &str, to: &str, at_ms: u64, wait: Option<Duration>) -> Result<()> {
    let reply = status::start_switchover(ctx, cluster, to, at_ms).await?;
    let s = reply.scheduled.clone().unwrap_or_default();
    let target = if s.to.is_empty() {
        "the best candidate then".to_string()
    } else {
        s.to.clone()
    };
    if wait.is_none() || !ctx.json {
        let value = json!({
            "cluster": reply.cluster, "scheduled": {"at_ms": s.at_ms, "to": s.to, "from": s.from, "actor": s.actor},
        });
        emit(ctx.json, &value, || {
            format!(
                "switchover of {} from {} to {target} scheduled at {} UTC (in {} s); `pgquorum switchover \
                 --cancel` drops it",
                reply.cluster,
                s.from,
                timestamp(s.at_ms),
                s.at_ms.saturating_sub(now_ms()) / 1000
            )
        });
    }
    let Some(within) = wait else {
        return Ok(());
    };
    // Until its time (and the leader's start), the schedule stays in the state.
    let started = loop {
        let st = status::fetch(ctx, &reply.cluster).await?;
        if st.scheduled_switchover.is_none() {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let Some(f) = started
        .failover
        .clone()
        .filter(|f| f.kind == "switchover" && f.from_epoch == reply.epoch)
    else {
        if started.epoch > reply.epoch {
            // Started and already done between two looks.
            let value =
                json!({"cluster": started.cluster, "epoch": started.epoch, "primary": started.primary});
            emit(ctx.json, &value, || {
                format!(
                    "done: {} is the primary of epoch {}",
                    started.primary, started.epoch
                )
            });
            return Ok(());
        }
        return Err(Error::Outcome(format!(
            "the scheduled switchover of {} was dropped (see `pgquorum history` for why)",
            reply.cluster
        )));
    };
    let as_started = pb::FailoverReply {
        cluster: started.cluster.clone(),
        epoch: started.epoch,
        failover: Some(f),
        scheduled: None,
    };
    status::wait_for_outcome(ctx, &as_started, within).await
}

/// `switchover --cancel`.
pub async fn cancel(ctx: &Ctx, cluster: &str) -> Result<()> {
    let request = pb::CancelSwitchoverRequest {
        cluster: cluster.to_string(),
        actor: actor(),
    };
    let reply = ctx
        .coordinators
        .call(|mut c| {
            let request = request.clone();
            async move { c.cancel_switchover(request).await }
        })
        .await?;
    let c = reply.cluster.unwrap_or_default();
    emit(ctx.json, &json!({"cluster": c.name, "scheduled": null}), || {
        format!("the scheduled switchover of {} is cancelled", c.name)
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_at;

    #[test]
    fn times_parse_in_utc_or_from_now_and_must_be_ahead() {
        let now = 1_796_000_000_000;
        assert_eq!(parse_at("+10m", now).unwrap(), now + 600_000);
        assert_eq!(parse_at("+1h 30m", now).unwrap(), now + 5_400_000);
        assert_eq!(parse_at("2027-01-01T06:00:00Z", now).unwrap(), 1_798_783_200_000);
        assert_eq!(parse_at("2027-01-01 06:00:00", now).unwrap(), 1_798_783_200_000);
        let past = parse_at("2020-01-01T00:00:00Z", now).unwrap_err().to_string();
        assert!(past.contains("not in the future"), "{past}");
        let bad = parse_at("tomorrow", now).unwrap_err().to_string();
        assert!(bad.contains("--at") && bad.contains("+DURATION"), "{bad}");
    }
}
