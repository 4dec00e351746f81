//! Replication lag of a standby, in bytes and in time. Pure.
//!
//! *Bytes*: the primary's latest reported WAL position minus the standby's replay
//! position. *Time*: how long before the standby's observation the primary wrote the
//! oldest WAL the standby had not replayed (0 once it replayed everything the primary
//! reported). Time is what routing and alerts judge by; when it cannot be known
//! exactly it is given as a lower bound ([`LagSource::AtLeast`]), never as 0.
//!
//! The sources, in the order they win, and why:
//!
//! 1. **Caught up** — the replay position is at or past the primary's latest reported
//!    position: 0 ms, 0 bytes. So a standby of an idle primary stays at 0 instead of
//!    growing with the age of the last commit.
//! 2. **The leader's WAL clock** ([`WalClock`]) — when the primary was first and last
//!    reported at each WAL position, on the leader's one monotonic clock. It answers
//!    in every state the standby can be in (connected or not, replay paused, stuck
//!    behind a lock, restarted, catching up), mixes no two hosts' clocks, and depends
//!    on nothing the standby must send to the primary. Its resolution is one
//!    heartbeat, narrowed by interpolating on bytes between two samples; it reaches
//!    back only as far as its samples (since this leader was elected, or the cap).
//! 3. **The primary's `pg_stat_replication.replay_lag`** — Postgres' own measurement
//!    on the primary's clock, used when the replay position predates the WAL clock
//!    (a new leader, or a standby further behind than the clock remembers). NULL when
//!    the standby replays WAL older than the walsender's first sample (catching up
//!    after a base backup or a reconnect) or is not connected.
//! 4. **The standby's age of its last replayed commit** (`now() -
//!    pg_last_xact_replay_timestamp()`) — last, because it overstates after an idle
//!    spell (the last commit may be old while the missing WAL is new) and mixes the
//!    primary's clock at commit with the standby's clock now. NULL until a commit is
//!    replayed after start (the bug this module replaced read that as 0).
//! 5. **At least** — none of the above: the WAL clock's oldest sample already held WAL
//!    the standby lacks, so it is at least that old.
//!
//! Sources 3 and 4 are raised to the lower bound of 5 when that is higher: each can be
//! stale, the lower bound cannot be wrong.

use std::time::Duration;

use pgquorum_client::lsn::Lsn;
use pgquorum_client::pb;

/// One WAL position of the primary: when the leader first and last saw it reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalSample {
    pub lsn: Lsn,
    pub first_ago: Duration,
    pub last_ago: Duration,
}

/// The primary's WAL positions over time, as the leader saw them, oldest first.
/// Belongs to one primary on one timeline (LSNs only grow there).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WalClock {
    pub node: String,
    pub timeline: u32,
    pub samples: Vec<WalSample>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LagSource {
    Unknown,
    CaughtUp,
    WalClock,
    Primary,
    Standby,
    AtLeast,
}

impl LagSource {
    /// Whether `ms` is a measurement (or 0 for caught up) rather than a bound or a
    /// placeholder. Only an exact lag may let a replica take reads.
    pub fn exact(self) -> bool {
        !matches!(self, LagSource::Unknown | LagSource::AtLeast)
    }

    pub fn to_proto(self) -> pb::LagSource {
        match self {
            LagSource::Unknown => pb::LagSource::Unknown,
            LagSource::CaughtUp => pb::LagSource::CaughtUp,
            LagSource::WalClock => pb::LagSource::WalClock,
            LagSource::Primary => pb::LagSource::Primary,
            LagSource::Standby => pb::LagSource::Standby,
            LagSource::AtLeast => pb::LagSource::AtLeast,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lag {
    pub ms: u64,
    pub bytes: u64,
    pub source: LagSource,
}

impl Lag {
    pub const UNKNOWN: Lag = Lag {
        ms: 0,
        bytes: 0,
        source: LagSource::Unknown,
    };
    const CAUGHT_UP: Lag = Lag {
        ms: 0,
        bytes: 0,
        source: LagSource::CaughtUp,
    };
}

/// What one standby's lag is judged from.
pub struct StandbyView<'a> {
    /// Its own report, and how long ago its agent observed it.
    pub report: &'a pb::NodeReport,
    pub age: Duration,
    /// The primary's row for it in `pg_stat_replication`, if any.
    pub replication: Option<&'a pb::ReplicationInfo>,
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// The lag of a standby behind `primary_lsn` (the committed primary's latest report),
/// with `clock` the WAL clock of that primary (None when the leader has none for it).
pub fn standby_lag(primary_lsn: Option<Lsn>, clock: Option<&WalClock>, standby: &StandbyView) -> Lag {
    let (Some(primary_lsn), Some(replay)) = (primary_lsn, Lsn::parse(&standby.report.replay_lsn)) else {
        return Lag::UNKNOWN;
    };
    let newest = clock
        .and_then(|c| c.samples.last())
        .map_or(primary_lsn, |s| s.lsn.max(primary_lsn));
    if replay >= newest {
        return Lag::CAUGHT_UP;
    }
    let bytes = primary_lsn.bytes_since(replay).max(1);
    let lag = |ms, source| Lag { ms, bytes, source };
    let samples = clock.map_or(&[][..], |c| &c.samples[..]);
    // The first position the primary was seen past the replay position.
    let after = samples.iter().position(|s| s.lsn > replay);
    if let Some(i) = after.filter(|&i| i > 0) {
        // The WAL just past `replay` was written after the primary was last seen at
        // sample i-1 and by the time it was first seen at sample i: interpolate on
        // bytes between the two.
        let (before, past) = (&samples[i - 1], &samples[i]);
        let span = past.lsn.bytes_since(before.lsn) as f64;
        let frac = replay.bytes_since(before.lsn) as f64 / span;
        let window = before.last_ago.saturating_sub(past.first_ago).as_secs_f64();
        let written_ago = before.last_ago.as_secs_f64() - frac * window;
        let ms = ((written_ago - standby.age.as_secs_f64()) * 1000.0).max(0.0) as u64;
        return lag(ms, LagSource::WalClock);
    }
    // The missing WAL predates every sample (or there are none): at least as old as
    // the oldest one, and Postgres' own measurements may say how much older.
    let at_least = samples
        .first()
        .map_or(0, |s| ms(s.first_ago.saturating_sub(standby.age)));
    if let Some(m) = standby.replication.and_then(|r| r.replay_lag_ms) {
        return lag(m.max(at_least), LagSource::Primary);
    }
    if let Some(m) = standby.report.last_replay_age_ms {
        return lag(m.max(at_least), LagSource::Standby);
    }
    lag(at_least, LagSource::AtLeast)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lsn(s: &str) -> Lsn {
        Lsn::parse(s).unwrap()
    }

    /// Samples `(lsn, first seen ms ago, last seen ms ago)`.
    fn clock(samples: &[(&str, u64, u64)]) -> WalClock {
        WalClock {
            node: "node1".into(),
            timeline: 1,
            samples: samples
                .iter()
                .map(|&(l, first, last)| WalSample {
                    lsn: lsn(l),
                    first_ago: Duration::from_millis(first),
                    last_ago: Duration::from_millis(last),
                })
                .collect(),
        }
    }

    fn standby(replay: &str, last_replay_age_ms: Option<u64>) -> pb::NodeReport {
        pb::NodeReport {
            postgres_up: true,
            role: "standby".into(),
            receive_lsn: replay.into(),
            replay_lsn: replay.into(),
            last_replay_age_ms,
            ..Default::default()
        }
    }

    fn row(replay_lag_ms: Option<u64>) -> pb::ReplicationInfo {
        pb::ReplicationInfo {
            application_name: "node2".into(),
            state: "streaming".into(),
            replay_lag_ms,
            ..Default::default()
        }
    }

    fn judge(
        primary: &str,
        clock: Option<&WalClock>,
        report: &pb::NodeReport,
        age_ms: u64,
        replication: Option<&pb::ReplicationInfo>,
    ) -> Lag {
        standby_lag(
            Lsn::parse(primary),
            clock,
            &StandbyView {
                report,
                age: Duration::from_millis(age_ms),
                replication,
            },
        )
    }

    /// Steady writes: 0x1000 bytes every 100 ms for the last second.
    fn steady() -> WalClock {
        let samples: Vec<(String, u64, u64)> = (0..=10u64)
            .map(|k| {
                (
                    format!("0/{:X}", 0x100_0000 + k * 0x1000),
                    1000 - k * 100,
                    1000 - k * 100,
                )
            })
            .collect();
        let refs: Vec<(&str, u64, u64)> = samples.iter().map(|(l, a, b)| (l.as_str(), *a, *b)).collect();
        clock(&refs)
    }

    #[test]
    fn an_idle_primary_s_standby_is_caught_up_and_stays_so() {
        // The primary wrote last 10 minutes ago; its standby's last replayed commit is
        // as old, which the old measurement would have shown as ever-growing lag.
        let c = clock(&[("0/3000000", 600_000, 10)]);
        for age in [10, 5_000] {
            let l = judge(
                "0/3000000",
                Some(&c),
                &standby("0/3000000", Some(600_000)),
                age,
                None,
            );
            assert_eq!(l, Lag::CAUGHT_UP);
        }
    }

    #[test]
    fn steady_writes_a_close_follower_lags_a_few_ms() {
        let c = steady();
        // Replayed up to halfway between the last two samples, observed just now.
        let l = judge("0/100A000", Some(&c), &standby("0/1009800", Some(3)), 0, None);
        assert_eq!((l.source, l.bytes), (LagSource::WalClock, 0x800));
        assert!((45..=55).contains(&l.ms), "{l:?}");
    }

    #[test]
    fn replay_paused_with_writes_grows_with_the_missing_wal_s_age() {
        let c = steady();
        // Replay stopped at the position the primary held 700 ms ago; the standby's own
        // view says nothing (no commit replayed since it started).
        let l = judge("0/100A000", Some(&c), &standby("0/1003000", None), 20, None);
        assert_eq!(l.source, LagSource::WalClock);
        assert_eq!(l.bytes, 0x7000);
        assert!((660..=700).contains(&l.ms), "{l:?}");
    }

    #[test]
    fn the_wal_receiver_disconnected_still_measured_from_the_primary_side() {
        // Stuck at 0/1005000 without a WAL receiver: the primary has no row for it.
        let l = judge("0/100A000", Some(&steady()), &standby("0/1005000", None), 0, None);
        assert_eq!((l.source, l.bytes), (LagSource::WalClock, 0x5000));
        assert!((490..=500).contains(&l.ms), "{l:?}");
    }

    #[test]
    fn a_write_after_an_idle_spell_counts_from_the_write_not_the_idle_spell() {
        // Idle at 0/3000000 from 60 s ago until 300 ms ago; then a write, seen 250 ms ago.
        let c = clock(&[("0/3000000", 60_000, 300), ("0/3000200", 250, 0)]);
        let l = judge(
            "0/3000200",
            Some(&c),
            &standby("0/3000000", Some(60_000)),
            0,
            None,
        );
        assert_eq!(l.source, LagSource::WalClock);
        assert!((250..=300).contains(&l.ms), "{l:?}");
    }

    #[test]
    fn behind_every_sample_postgres_measurements_count_but_never_below_the_bound() {
        // A new leader remembers 400 ms of WAL; the standby lacks older WAL.
        let c = clock(&[("0/5000000", 400, 300), ("0/5001000", 200, 0)]);
        let report = standby("0/4000000", None);
        let l = judge("0/5001000", Some(&c), &report, 0, None);
        assert_eq!((l.ms, l.source), (400, LagSource::AtLeast), "lower bound only");
        let l = judge("0/5001000", Some(&c), &report, 0, Some(&row(Some(9_000))));
        assert_eq!((l.ms, l.source), (9_000, LagSource::Primary));
        let l = judge("0/5001000", Some(&c), &report, 0, Some(&row(Some(5))));
        assert_eq!(l.ms, 400, "a stale primary measurement is raised to the bound");
        // Catching up after a base backup: the walsender shows NULL, the standby's
        // last replayed commit is 20 s old.
        let l = judge(
            "0/5001000",
            Some(&c),
            &standby("0/4000000", Some(20_000)),
            0,
            Some(&row(None)),
        );
        assert_eq!((l.ms, l.source), (20_000, LagSource::Standby));
        assert!(!LagSource::AtLeast.exact() && LagSource::Standby.exact());
    }

    #[test]
    fn unknown_without_a_primary_or_a_replay_position() {
        let c = steady();
        assert_eq!(
            judge("", Some(&c), &standby("0/1000000", None), 0, None),
            Lag::UNKNOWN
        );
        assert_eq!(
            judge("0/100A000", Some(&c), &standby("", None), 0, None),
            Lag::UNKNOWN
        );
        // No clock at all (it belongs to another primary): bytes still count, time is
        // not taken as 0.
        let l = judge("0/100A000", None, &standby("0/1000000", None), 0, None);
        assert_eq!((l.bytes, l.source), (0xA000, LagSource::AtLeast));
    }
}
