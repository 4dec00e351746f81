//! The failsafe, without I/O: when may a standby promise a primary not to be promoted,
//! and how long may a primary write on the promises it got (DESIGN.md, "Detection";
//! the argument is in docs/leases.md, "Failsafe").
//!
//! A primary whose heartbeats no coordinator leader answers would stop at the end of
//! its lease, although with no leader nobody can be promoted either: an outage of the
//! coordinator group would take every database down with it. So before its lease runs
//! out it asks every standby that could be promoted in its place (the coordinators
//! name them in each lease grant: [`pb::HeartbeatReply::failsafe_peers`]) for a
//! promise: "I cannot reach a coordinator leader either, and I will not be promoted
//! before T". With all of them, it writes until the earliest T less the lease margin
//! ([`extension`]); with any missing, its lease runs out as it would have.
//!
//! Why no second primary can appear meanwhile (Invariant 1): a promotion needs an
//! order from a leader, to one of the standbys the primary asked (it asks every other
//! member: `reply::failsafe_roster`, since an operator may pick any). A standby that reaches
//! a leader refuses to promise ([`judge`]), and one that promised refuses to promote
//! before T (the planner waits), persists the promise first (a restarted agent keeps
//! it) and reports it, so the leader also counts the old primary as writing until T
//! before anything else counts it fenced. The primary counts its extension from
//! before it asked, so it ends before the earliest promise does.

use std::time::{Duration, Instant};

use pgquorum_client::pb;
use serde::{Deserialize, Serialize};

/// The longest promise given, whatever is asked: a bound on how long a mistaken
/// request can keep a standby from being promoted.
pub const MAX_PROMISE: Duration = Duration::from_secs(60);

/// What a standby's agent knows when a primary asks it for a promise; the agent's
/// loop updates it after every heartbeat.
#[derive(Clone, Debug, Default)]
pub struct Standing {
    pub cluster: String,
    pub me: String,
    /// The newest epoch seen, and the primary the last reply named.
    pub epoch: u64,
    pub primary: Option<String>,
    /// It is being promoted (told to, or the promotion marker is there). Any other
    /// node may promise, whatever its data: a stopped old primary, a node still being
    /// cloned or rewound can only be promoted as a standby later, and the promise
    /// holds it back until then.
    pub being_promoted: bool,
    /// When a coordinator leader last answered this agent (every heartbeat reply comes
    /// from the leader; followers forward).
    pub leader_answered_at: Option<Instant>,
    /// A leader that answered more recently than this counts as reachable.
    pub reach_window: Duration,
}

/// A promise given: not to be promoted before `until`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Promise {
    pub primary: String,
    pub epoch: u64,
    pub until: Instant,
}

impl Promise {
    /// How much longer it runs; None once it ran out.
    pub fn left(&self, now: Instant) -> Option<Duration> {
        let left = self.until.saturating_duration_since(now);
        (!left.is_zero()).then_some(left)
    }
}

/// Judges a primary's request at `now`: how long to promise, or why not.
pub fn judge(standing: &Standing, request: &pb::PromiseRequest, now: Instant) -> Result<Duration, String> {
    if request.cluster != standing.cluster {
        return Err(format!(
            "this is cluster {:?}, not {:?}",
            standing.cluster, request.cluster
        ));
    }
    if !request.member.is_empty() && request.member != standing.me {
        return Err(format!(
            "this is {}, not {} (the primary's roster has another address for it)",
            standing.me, request.member
        ));
    }
    if request.epoch != standing.epoch {
        return Err(format!(
            "asked for epoch {}, this node has seen epoch {}",
            request.epoch, standing.epoch
        ));
    }
    if standing.primary.as_deref() != Some(request.primary.as_str()) || request.primary == standing.me {
        return Err(format!(
            "{} is not the primary of epoch {} as this node knows it",
            request.primary, standing.epoch
        ));
    }
    if standing.being_promoted {
        return Err("this node is being promoted".into());
    }
    if standing
        .leader_answered_at
        .is_some_and(|at| now.saturating_duration_since(at) < standing.reach_window)
    {
        return Err("this node reaches a coordinator leader".into());
    }
    if request.for_ms == 0 {
        return Err("a promise of 0 ms".into());
    }
    Ok(Duration::from_millis(request.for_ms).min(MAX_PROMISE))
}

/// Gives `promise` on top of what is already promised: a promise is never shortened.
pub fn merge(held: Option<Promise>, promise: Promise) -> Promise {
    match held {
        Some(h) if h.until > promise.until => Promise {
            until: h.until,
            ..promise
        },
        _ => promise,
    }
}

/// How long after asking a primary may keep writing on the promises it got: until the
/// earliest ends, less the lease margin (clock-rate drift between the hosts). None when
/// nobody was asked or any promise is missing.
pub fn extension(granted: &[Option<Duration>]) -> Option<Duration> {
    let earliest = granted
        .iter()
        .copied()
        .collect::<Option<Vec<_>>>()?
        .into_iter()
        .min()?;
    Some(earliest.saturating_sub(pgquorum_client::lease::margin(earliest)))
}

/// A promise as the agent keeps it on disk (written before it is given), so an agent
/// that restarts keeps it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromiseRecord {
    pub primary: String,
    pub epoch: u64,
    /// The end on `CLOCK_BOOTTIME`, and the boot it counts in.
    pub until_boot_ns: u64,
    pub boot_id: String,
    /// The promise's length: after a reboot (another boot id, a clock that started
    /// again) it is counted again from the start, the safe side.
    pub length_ms: u64,
}

impl PromiseRecord {
    pub fn of(
        promise: &Promise,
        length: Duration,
        now: Instant,
        now_boot_ns: u64,
        boot_id: &str,
    ) -> PromiseRecord {
        PromiseRecord {
            primary: promise.primary.clone(),
            epoch: promise.epoch,
            until_boot_ns: now_boot_ns + promise.until.saturating_duration_since(now).as_nanos() as u64,
            boot_id: boot_id.to_string(),
            length_ms: length.as_millis() as u64,
        }
    }

    /// The promise this record still holds at `now`, if any.
    pub fn restore(&self, now: Instant, now_boot_ns: u64, boot_id: &str) -> Option<Promise> {
        if self.primary.is_empty() {
            return None;
        }
        let left = if self.boot_id == boot_id && !boot_id.is_empty() {
            Duration::from_nanos(self.until_boot_ns.saturating_sub(now_boot_ns))
        } else {
            Duration::from_millis(self.length_ms).min(MAX_PROMISE)
        };
        (!left.is_zero()).then(|| Promise {
            primary: self.primary.clone(),
            epoch: self.epoch,
            until: now + left,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standing(now: Instant) -> Standing {
        Standing {
            cluster: "main".into(),
            me: "node2".into(),
            epoch: 3,
            primary: Some("node1".into()),
            being_promoted: false,
            leader_answered_at: Some(now - Duration::from_millis(600)),
            reach_window: Duration::from_millis(400),
        }
    }

    fn ask() -> pb::PromiseRequest {
        pb::PromiseRequest {
            cluster: "main".into(),
            primary: "node1".into(),
            epoch: 3,
            for_ms: 1000,
            member: "node2".into(),
        }
    }

    #[test]
    fn a_standby_promises_only_the_primary_it_knows_and_only_without_a_leader() {
        let now = Instant::now();
        let s = standing(now);
        assert_eq!(judge(&s, &ask(), now), Ok(Duration::from_millis(1000)));
        let refused = |s: &Standing, r: &pb::PromiseRequest, why: &str| {
            let e = judge(s, r, now).unwrap_err();
            assert!(e.contains(why), "{e:?} should say {why:?}");
        };
        let mut reached = s.clone();
        reached.leader_answered_at = Some(now - Duration::from_millis(100));
        refused(&reached, &ask(), "reaches a coordinator leader");
        let mut newer = s.clone();
        newer.epoch = 4;
        refused(&newer, &ask(), "has seen epoch 4");
        let mut other = s.clone();
        other.primary = Some("node3".into());
        refused(&other, &ask(), "not the primary");
        let mut promoting = s.clone();
        promoting.being_promoted = true;
        refused(&promoting, &ask(), "being promoted");
        refused(
            &s,
            &pb::PromiseRequest {
                cluster: "other".into(),
                ..ask()
            },
            "cluster",
        );
        refused(
            &s,
            &pb::PromiseRequest {
                member: "node9".into(),
                ..ask()
            },
            "not node9",
        );
        refused(
            &s,
            &pb::PromiseRequest {
                primary: "node2".into(),
                ..ask()
            },
            "not the primary",
        );
        let mut never = s.clone();
        never.leader_answered_at = None;
        assert!(judge(&never, &ask(), now).is_ok(), "no leader since it started");
        assert!(
            judge(&Standing::default(), &ask(), now).is_err(),
            "an agent that knows nothing yet promises nothing"
        );
        let long = pb::PromiseRequest {
            for_ms: 3_600_000,
            ..ask()
        };
        assert_eq!(judge(&s, &long, now), Ok(MAX_PROMISE));
    }

    #[test]
    fn a_primary_writes_on_promises_only_with_all_of_them_and_until_the_first_ends() {
        let ms = Duration::from_millis;
        // The earliest, less its 2 % margin.
        assert_eq!(extension(&[Some(ms(1000)), Some(ms(800))]), Some(ms(784)));
        assert_eq!(extension(&[Some(ms(1000)), None]), None);
        assert_eq!(extension(&[]), None, "nobody to ask: no failsafe");
    }

    #[test]
    fn a_promise_is_never_shortened_and_survives_a_restart_and_a_reboot() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        let p = |until| Promise {
            primary: "node1".into(),
            epoch: 3,
            until,
        };
        assert_eq!(
            merge(Some(p(now + ms(900))), p(now + ms(500))).until,
            now + ms(900)
        );
        assert_eq!(
            merge(Some(p(now + ms(100))), p(now + ms(500))).until,
            now + ms(500)
        );
        let record = PromiseRecord::of(&p(now + ms(700)), ms(1000), now, 5_000_000_000, "boot-a");
        assert_eq!(record.until_boot_ns, 5_700_000_000);
        // The agent restarted 200 ms later, same boot: 500 ms left.
        let later = now + ms(200);
        assert_eq!(
            record.restore(later, 5_200_000_000, "boot-a"),
            Some(p(later + ms(500)))
        );
        assert_eq!(record.restore(later, 5_800_000_000, "boot-a"), None, "ran out");
        // Another boot: its clock says nothing; counted again in full.
        assert_eq!(record.restore(later, 1_000, "boot-b"), Some(p(later + ms(1000))));
        assert_eq!(PromiseRecord::default().restore(later, 1, "boot-a"), None);
    }
}
