//! The leader's table of latest heartbeat reports.
//!
//! The table belongs to one Raft term: [`Reports::lead`] starts it afresh whenever this
//! node leads in a term it did not lead in before, so "leader since", the reports, the
//! lease grants and the reply marks never carry over from an earlier leadership
//! (DESIGN.md: a new leader starts from nothing). Every method takes the time as
//! `now`, read once at the gRPC or loop edge, so the rules are testable with any clock.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgquorum_client::lsn::Lsn;
use pgquorum_client::{pb, sync_names};

use super::lag::{WalClock, WalSample};

/// One node's latest report and how old it is.
#[derive(Clone, Debug)]
pub struct Observed {
    pub report: pb::NodeReport,
    pub age: Duration,
    /// Since a report last said its Postgres answers; None: not while we lead.
    pub up_ago: Option<Duration>,
    /// When the latest-ending primary lease this leader granted the node ends (with
    /// its margin): a lease shortened by policy still leaves earlier, longer grants to
    /// run out, and only those.
    pub own_lease: OwnLease,
    /// The observation is younger than this: it was made after the node received a
    /// reply this leader built that long ago (see [`Reports::reply_mark`]). None: no
    /// such reply (not yet, or from another leader).
    pub seen_reply_ago: Option<Duration>,
    /// Since this leader last granted the node a primary lease (dated like a reply
    /// mark); None: never. A reply with a lease may order a start or a promotion, so
    /// only an observation made after it says what the node does now.
    pub last_grant_ago: Option<Duration>,
    /// Since the first of the unbroken run of reports with this report's role and
    /// Postgres state (so a stop was reported at least this long ago). A lease granted
    /// between two reports breaks the run: the node may have started in between.
    pub role_for: Duration,
    /// Since the observation was made: `age` plus how long the agent took from
    /// observing to sending (what lag is dated by).
    pub observed_ago: Duration,
}

impl Observed {
    /// Whether the observation was made after the node received this leader's latest
    /// lease-carrying reply (and any reply of this leader at all): only then does it
    /// show what the node did with the start or promotion that reply may have ordered.
    pub fn followed_last_grant(&self) -> bool {
        self.seen_reply_ago
            .is_some_and(|seen| self.last_grant_ago.is_none_or(|grant| seen <= grant))
    }
}

/// How old an agent may say its observation was on sending; more is a bad report,
/// counted as this.
const MAX_OBSERVED_AGO: Duration = Duration::from_secs(10);

fn observed_ago(report: &pb::NodeReport) -> Duration {
    Duration::from_millis(report.observed_ago_ms).min(MAX_OBSERVED_AGO)
}

/// What a primary reported it waits for, and its WAL position when that started.
///
/// A standby may leave the committed sync set only once the primary has stopped
/// waiting for it *and* the standbys it waits for now hold everything the old one
/// might have acknowledged: all WAL up to `since`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedSync {
    pub node: String,
    pub names: Vec<String>,
    pub since: Lsn,
}

/// Reports of one cluster, by node name, as of one moment.
#[derive(Clone, Debug, Default)]
pub struct ClusterReports {
    pub nodes: BTreeMap<String, Observed>,
    pub applied_sync: Option<AppliedSync>,
    /// How long this coordinator has been collecting reports (leading).
    pub leader_for: Duration,
    /// The `synchronous_standby_names` this leader last told each node to run with.
    pub told_sync_names: BTreeMap<String, String>,
    /// When the node that last reported as primary reached each WAL position.
    pub wal_clock: Option<WalClock>,
    /// Slack a new leader adds to its wait for a previous leader's leases (an
    /// election timeout; see [`crate::failover::decide::lease_expired`]).
    pub grant_window: Duration,
    /// The log index of the cluster's `lease_ms_settling` as this leader first applied
    /// it, and how long ago: since then every lease it grants has the lowered length.
    pub settling_seen_for: Option<(u64, Duration)>,
}

impl ClusterReports {
    /// Why this leader cannot tell a dead agent from a live one yet, if it cannot: it
    /// has listened for less than a failure timeout (a new leader has heard nobody).
    pub fn not_listened_enough(&self, failure_timeout_ms: u64) -> Option<String> {
        let listening = Duration::from_millis(failure_timeout_ms);
        (self.leader_for < listening).then(|| {
            format!(
                "this leader has listened to the agents for {} ms only; ask again after {} ms",
                self.leader_for.as_millis(),
                listening.as_millis()
            )
        })
    }

    /// How long the primary lease this leader last granted each node still runs
    /// (margin included), for the nodes whose lease runs.
    pub fn lease_left(&self) -> BTreeMap<String, Duration> {
        self.nodes
            .iter()
            .filter_map(|(name, o)| match o.own_lease {
                OwnLease::EndsIn(left) => Some((name.clone(), left)),
                _ => None,
            })
            .collect()
    }
}

/// How many WAL positions a [`WalClock`] keeps: under steady writes (a new position
/// every heartbeat of 50 ms) about 100 s, longer than the EMERGENCY lag threshold.
const WAL_CLOCK_SAMPLES: usize = 2048;

/// The WAL clock as recorded: positions with the instants they were first and last
/// reported.
struct WalClockEntry {
    node: String,
    timeline: u32,
    samples: std::collections::VecDeque<(Lsn, Instant, Instant)>,
}

impl WalClockEntry {
    /// Notes a primary's report of `lsn` at `now`; starts afresh on another node or
    /// timeline, or when the position went back (a rewound or re-created primary).
    fn record(slot: &mut Option<WalClockEntry>, node: &str, timeline: u32, lsn: Lsn, now: Instant) {
        let same = slot.as_ref().is_some_and(|c| {
            c.node == node && c.timeline == timeline && c.samples.back().is_none_or(|s| s.0 <= lsn)
        });
        if !same {
            *slot = Some(WalClockEntry {
                node: node.to_string(),
                timeline,
                samples: Default::default(),
            });
        }
        let clock = slot.as_mut().expect("just set");
        match clock.samples.back_mut() {
            Some(last) if last.0 == lsn => last.2 = now,
            _ => {
                if clock.samples.len() == WAL_CLOCK_SAMPLES {
                    clock.samples.pop_front();
                }
                clock.samples.push_back((lsn, now, now));
            }
        }
    }

    fn view(&self, now: Instant) -> WalClock {
        WalClock {
            node: self.node.clone(),
            timeline: self.timeline,
            samples: self
                .samples
                .iter()
                .map(|&(lsn, first, last)| WalSample {
                    lsn,
                    first_ago: now.saturating_duration_since(first),
                    last_ago: now.saturating_duration_since(last),
                })
                .collect(),
        }
    }
}

/// The end of the primary leases one leader granted a node, relative to now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OwnLease {
    /// This leader never granted the node a lease.
    Never,
    /// The latest end (lease plus margin) is still this far ahead.
    EndsIn(Duration),
    /// It passed this long ago.
    EndedAgo(Duration),
}

impl OwnLease {
    /// A lease of `length` granted `ago`, with the margin both sides agree on.
    pub fn granted(ago: Duration, length: Duration) -> OwnLease {
        OwnLease::ending(ago, length + pgquorum_client::lease::margin(length))
    }

    /// A lease `ago` that ends `until` after it (margin included).
    fn ending(ago: Duration, until: Duration) -> OwnLease {
        match until.checked_sub(ago) {
            Some(left) if !left.is_zero() => OwnLease::EndsIn(left),
            _ => OwnLease::EndedAgo(ago - until),
        }
    }

    /// How long ago it ended (`Duration::MAX`: never granted); None while it runs.
    pub fn over(self) -> Option<Duration> {
        match self {
            OwnLease::Never => Some(Duration::MAX),
            OwnLease::EndsIn(_) => None,
            OwnLease::EndedAgo(ago) => Some(ago),
        }
    }

    /// The later-ending of two.
    pub fn max(self, other: OwnLease) -> OwnLease {
        use OwnLease::*;
        match (self, other) {
            (Never, x) | (x, Never) => x,
            (EndsIn(a), EndsIn(b)) => EndsIn(a.max(b)),
            (EndsIn(a), EndedAgo(_)) | (EndedAgo(_), EndsIn(a)) => EndsIn(a),
            (EndedAgo(a), EndedAgo(b)) => EndedAgo(a.min(b)),
        }
    }
}

struct NodeEntry {
    report: pb::NodeReport,
    at: Instant,
    last_up: Option<Instant>,
    /// When the latest-ending lease this leader granted the node ends (margin included).
    lease_ends: Option<Instant>,
    /// When this leader last granted the node a lease, rounded down like a reply mark.
    last_grant: Option<Instant>,
    /// When this leader built the reply the report's observation followed.
    seen_reply: Option<Instant>,
    /// When the current role and Postgres state were first reported.
    role_since: Instant,
}

#[derive(Default)]
struct ClusterEntry {
    nodes: HashMap<String, NodeEntry>,
    applied_sync: Option<AppliedSync>,
    told_sync_names: BTreeMap<String, String>,
    wal_clock: Option<WalClockEntry>,
    /// The log index of the cluster's `lease_ms_settling`, and when this leader first
    /// saw it.
    settling_seen: Option<(u64, Instant)>,
}

struct Table {
    clusters: HashMap<String, ClusterEntry>,
    /// The term whose leadership the contents belong to; None: not leading.
    term: Option<u64>,
    /// When this node was first seen leading in `term`.
    since: Instant,
    grant_window: Duration,
    /// High bits of every reply mark this table issues, random per table (and per
    /// `clear`), so marks of another leader or an earlier term never decode here.
    mark_base: u64,
}

/// Longer than any heartbeat stays in flight (the agent's deadline, a follower's
/// forward): a report of an earlier agent incarnation cannot arrive later than this
/// after the newer one last reported.
const MAX_IN_FLIGHT: Duration = Duration::from_secs(5);

/// Reply marks: `mark_base | milliseconds since the table's `since``.
const MARK_MS_BITS: u32 = 40;
const MARK_MS_MASK: u64 = (1 << MARK_MS_BITS) - 1;

fn new_mark_base() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    // Never zero: agents send 0 when they have no mark.
    (random & !MARK_MS_MASK) | (1 << MARK_MS_BITS)
}

impl Table {
    fn decode_mark(&self, mark: u64) -> Option<Instant> {
        (mark & !MARK_MS_MASK == self.mark_base)
            .then(|| self.since + Duration::from_millis(mark & MARK_MS_MASK))
    }

    fn mark(&self, now: Instant) -> u64 {
        let ms = now.saturating_duration_since(self.since).as_millis() as u64;
        self.mark_base | (ms & MARK_MS_MASK)
    }
}

/// Shared, cheap to clone; each operation holds the lock briefly.
#[derive(Clone)]
pub struct Reports(Arc<Mutex<Table>>);

impl Reports {
    /// An empty table; `grant_window` as in [`ClusterReports::grant_window`].
    pub fn new(grant_window: Duration, now: Instant) -> Reports {
        Reports(Arc::new(Mutex::new(Table {
            clusters: HashMap::new(),
            term: None,
            since: now,
            grant_window,
            mark_base: new_mark_base(),
        })))
    }

    /// This node leads in `term` as of `now`: if that is a term the table does not
    /// belong to, it starts afresh, "leader since" counting from `now`.
    pub fn lead(&self, term: u64, now: Instant) {
        let mut all = self.0.lock().expect("reports lock poisoned");
        if all.term != Some(term) {
            all.reset(Some(term), now);
        }
    }

    /// This node does not lead (any more): forget everything, so nothing stale is
    /// served if it leads again later.
    pub fn clear(&self, now: Instant) {
        self.0.lock().expect("reports lock poisoned").reset(None, now);
    }

    /// Keeps `report` as the node's latest, unless it is older than the one kept: from
    /// an earlier agent incarnation (they only grow: the agent persists its own before
    /// it reports), or from the same with a sequence number not above it. Returns
    /// whether it was kept.
    pub fn record(&self, cluster: &str, node: &str, report: pb::NodeReport, now: Instant) -> bool {
        let mut all = self.0.lock().expect("reports lock poisoned");
        let seen_reply = all.decode_mark(report.reply_mark_seen);
        let entry = all.clusters.entry(cluster.to_string()).or_default();
        if let Some(previous) = entry.nodes.get(node) {
            let (inc, prev_inc) = (report.incarnation, previous.report.incarnation);
            if inc != 0 && prev_inc != 0 && (inc, report.seq) <= (prev_inc, previous.report.seq) {
                // A lower incarnation after the kept one has been silent longer than any
                // report stays in flight is an agent whose count went back (one from
                // before incarnations grew, or a lost state file and a clock behind):
                // kept, or that node would look silent for the rest of the term.
                let silent = now.saturating_duration_since(previous.at);
                if inc == prev_inc || silent <= MAX_IN_FLIGHT {
                    return false;
                }
                tracing::warn!(
                    cluster,
                    node,
                    incarnation = inc,
                    kept = prev_inc,
                    "an agent incarnation below the last one, after {} ms of silence: taken as a restart",
                    silent.as_millis()
                );
            }
        }
        if report.role == "primary" && report.postgres_up {
            if let Some(lsn) = Lsn::parse(&report.current_lsn) {
                let observed = now.checked_sub(observed_ago(&report)).unwrap_or(now);
                WalClockEntry::record(&mut entry.wal_clock, node, report.timeline, lsn, observed);
            }
            let names = sync_names::parse(&report.synchronous_standby_names);
            let changed = entry
                .applied_sync
                .as_ref()
                .is_none_or(|a| a.node != node || a.names != names);
            if changed {
                let since = Lsn::parse(&report.current_lsn).unwrap_or_default();
                entry.applied_sync = Some(AppliedSync {
                    node: node.to_string(),
                    names,
                    since,
                });
            }
        }
        let previous = entry.nodes.remove(node);
        let last_up = if report.postgres_up {
            Some(now)
        } else {
            previous.as_ref().and_then(|p| p.last_up)
        };
        let role_since = previous
            .as_ref()
            .filter(|p| p.report.role == report.role && p.report.postgres_up == report.postgres_up)
            .filter(|p| p.last_grant.is_none_or(|g| g + Duration::from_millis(1) <= p.at))
            .map_or(now, |p| p.role_since);
        let lease_ends = previous.as_ref().and_then(|p| p.lease_ends);
        let last_grant = previous.as_ref().and_then(|p| p.last_grant);
        entry.nodes.insert(
            node.to_string(),
            NodeEntry {
                report,
                at: now,
                last_up,
                lease_ends,
                last_grant,
                seen_reply,
                role_since,
            },
        );
        true
    }

    /// A mark for a reply built now: an agent echoes it in reports it observes after
    /// receiving the reply, which dates those observations on this leader's clock.
    /// Rounded down, so a decoded mark is never later than the reply.
    pub fn reply_mark(&self, now: Instant) -> u64 {
        self.0.lock().expect("reports lock poisoned").mark(now)
    }

    /// Notes the cluster's `lease_ms_settling` as applied here now (None: nothing
    /// settles), so [`ClusterReports::settling_seen_for`] can tell how long ago this
    /// leader started granting only the lowered lease.
    pub fn note_settling(&self, cluster: &str, settling_since_log_index: Option<u64>, now: Instant) {
        let mut all = self.0.lock().expect("reports lock poisoned");
        let entry = all.clusters.entry(cluster.to_string()).or_default();
        entry.settling_seen = match (settling_since_log_index, entry.settling_seen) {
            (None, _) => None,
            (Some(v), Some((seen, at))) if seen == v => Some((seen, at)),
            (Some(v), _) => Some((v, now)),
        };
    }

    /// Notes the `synchronous_standby_names` just sent to a primary.
    pub fn told_sync_names(&self, cluster: &str, node: &str, names: &str) {
        let mut all = self.0.lock().expect("reports lock poisoned");
        let entry = all.clusters.entry(cluster.to_string()).or_default();
        entry.told_sync_names.insert(node.to_string(), names.to_string());
    }

    /// Notes that the node was granted a primary lease of `length` at `now`: it ends,
    /// with the margin, at the latest of the ends of every grant (never moved back:
    /// replies to two requests may finish out of order, and a lease lowered by policy
    /// leaves the longer grants before it to run out).
    pub fn lease_granted(&self, cluster: &str, node: &str, length: Duration, now: Instant) {
        let mut all = self.0.lock().expect("reports lock poisoned");
        // Dated as the reply's mark is, so a report that echoes that mark follows it.
        let granted = all.decode_mark(all.mark(now));
        if let Some(n) = all.clusters.get_mut(cluster).and_then(|c| c.nodes.get_mut(node)) {
            let ends = now + length + pgquorum_client::lease::margin(length);
            n.lease_ends = n.lease_ends.max(Some(ends));
            n.last_grant = n.last_grant.max(granted);
        }
    }

    /// Notes what `reply`, built for `node` now, grants and tells (its lease, the sync
    /// standbys a primary must run with) and gives it this leader's reply mark.
    pub fn answered(&self, cluster: &str, node: &str, reply: &mut pb::HeartbeatReply, now: Instant) {
        reply.reply_mark = self.reply_mark(now);
        if reply.lease_ms > 0 {
            self.lease_granted(cluster, node, Duration::from_millis(reply.lease_ms), now);
        }
        if reply.primary.as_ref().is_some_and(|p| p.name == node) {
            self.told_sync_names(cluster, node, &reply.synchronous_standby_names);
        }
    }

    pub fn cluster(&self, cluster: &str, now: Instant) -> ClusterReports {
        let all = self.0.lock().expect("reports lock poisoned");
        let leader_for = now.saturating_duration_since(all.since);
        let Some(entry) = all.clusters.get(cluster) else {
            return ClusterReports {
                leader_for,
                grant_window: all.grant_window,
                ..Default::default()
            };
        };
        let ago = |t: Option<Instant>| t.map(|t| now.saturating_duration_since(t));
        ClusterReports {
            nodes: entry
                .nodes
                .iter()
                .map(|(name, n)| {
                    let observed = Observed {
                        report: n.report.clone(),
                        age: now.saturating_duration_since(n.at),
                        up_ago: ago(n.last_up),
                        own_lease: match n.lease_ends {
                            None => OwnLease::Never,
                            Some(end) if end > now => OwnLease::EndsIn(end - now),
                            Some(end) => OwnLease::EndedAgo(now - end),
                        },
                        seen_reply_ago: ago(n.seen_reply),
                        last_grant_ago: ago(n.last_grant),
                        role_for: now.saturating_duration_since(n.role_since),
                        observed_ago: now.saturating_duration_since(n.at) + observed_ago(&n.report),
                    };
                    (name.clone(), observed)
                })
                .collect(),
            applied_sync: entry.applied_sync.clone(),
            leader_for,
            told_sync_names: entry.told_sync_names.clone(),
            wal_clock: entry.wal_clock.as_ref().map(|c| c.view(now)),
            grant_window: all.grant_window,
            settling_seen_for: entry
                .settling_seen
                .map(|(v, at)| (v, now.saturating_duration_since(at))),
        }
    }
}

impl Table {
    fn reset(&mut self, term: Option<u64>, now: Instant) {
        self.clusters.clear();
        self.term = term;
        self.since = now;
        self.mark_base = new_mark_base();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(mark: u64, role: &str) -> pb::NodeReport {
        pb::NodeReport {
            role: role.into(),
            postgres_up: role != "stopped",
            reply_mark_seen: mark,
            ..Default::default()
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn table(t0: Instant) -> Reports {
        let reports = Reports::new(ms(150), t0);
        reports.lead(1, t0);
        reports
    }

    #[test]
    fn reply_marks_date_observations_on_this_leader_only() {
        let t0 = Instant::now();
        let reports = table(t0);
        let mark = reports.reply_mark(t0 + ms(5));
        let now = t0 + ms(25);
        reports.record("main", "node2", report(mark, "standby"), now);
        reports.record("main", "node3", report(mark ^ (1 << 50), "standby"), now);
        reports.record("main", "node4", report(0, "standby"), now);
        let seen = reports.cluster("main", now);
        assert_eq!(
            seen.nodes["node2"].seen_reply_ago,
            Some(ms(20)),
            "our own mark decodes"
        );
        assert_eq!(seen.nodes["node3"].seen_reply_ago, None, "another leader's mark");
        assert_eq!(seen.nodes["node4"].seen_reply_ago, None, "no mark");
        // A leader that stepped down and leads again issued that mark in another term.
        reports.clear(now);
        reports.lead(3, now);
        reports.record("main", "node2", report(mark, "standby"), now);
        assert_eq!(reports.cluster("main", now).nodes["node2"].seen_reply_ago, None);
    }

    #[test]
    fn only_an_observation_after_the_latest_grant_follows_it_and_a_grant_breaks_a_run() {
        let t0 = Instant::now();
        let reports = table(t0);
        let node1 = |at| reports.cluster("main", at).nodes["node1"].clone();
        let mark = reports.reply_mark(t0 + ms(10));
        reports.record("main", "node1", report(mark, "stopped"), t0 + ms(20));
        assert!(node1(t0 + ms(20)).followed_last_grant(), "no grant yet");
        // The reply to that report starts it, with a lease.
        let grant_mark = reports.reply_mark(t0 + ms(30));
        reports.lease_granted("main", "node1", ms(1000), t0 + ms(30));
        let seen = node1(t0 + ms(40));
        assert_eq!(seen.last_grant_ago, Some(ms(10)));
        assert!(!seen.followed_last_grant(), "observed before the order to start");
        // A report still observed before it (sent before the reply came) changes nothing,
        // and the run of "stopped" reports is broken: it may have run in between.
        reports.record("main", "node1", report(mark, "stopped"), t0 + ms(50));
        let seen = node1(t0 + ms(60));
        assert!(!seen.followed_last_grant());
        assert_eq!(
            seen.role_for,
            ms(10),
            "a new run since the report after the grant"
        );
        // The first observation after that reply does follow it.
        reports.record("main", "node1", report(grant_mark, "stopped"), t0 + ms(70));
        assert!(node1(t0 + ms(80)).followed_last_grant());
    }

    #[test]
    fn the_lease_end_is_the_latest_of_every_grant_and_a_lowered_lease_counts_once_they_ended() {
        let t0 = Instant::now();
        let reports = Reports::new(ms(150), t0);
        reports.lead(3, t0);
        reports.record("main", "node1", report(0, "primary"), t0);
        let own = |at| reports.cluster("main", at).nodes["node1"].own_lease;
        assert_eq!(own(t0), OwnLease::Never);
        // 8 s granted, then the policy lowers the lease to 1 s: the 8 s grant still runs.
        reports.lease_granted("main", "node1", ms(8000), t0);
        reports.lease_granted("main", "node1", ms(1000), t0 + ms(100));
        assert_eq!(own(t0 + ms(100)), OwnLease::EndsIn(ms(8060)), "8000 + 160 margin");
        // Once it ended, the 1 s grants alone count (not 8 s for the rest of the term).
        reports.lease_granted("main", "node1", ms(1000), t0 + ms(8200));
        assert_eq!(own(t0 + ms(8200)), OwnLease::EndsIn(ms(1020)));
        assert_eq!(own(t0 + ms(9300)), OwnLease::EndedAgo(ms(80)));
        // A reply finishing late never moves the end back.
        reports.lease_granted("main", "node1", ms(1000), t0 + ms(100));
        assert_eq!(own(t0 + ms(9300)), OwnLease::EndedAgo(ms(80)));
        assert_eq!(OwnLease::granted(ms(1020), ms(1000)), OwnLease::EndedAgo(ms(0)));
        assert_eq!(OwnLease::granted(ms(0), ms(1000)), OwnLease::EndsIn(ms(1020)));
    }

    #[test]
    fn a_new_term_starts_from_nothing_and_the_same_term_keeps_everything() {
        let t0 = Instant::now();
        // Started long ago as a follower: "leader since" must not count from then.
        let reports = Reports::new(ms(150), t0);
        let elected = t0 + ms(60_000);
        reports.lead(7, elected);
        reports.record("main", "node1", report(0, "primary"), elected + ms(10));
        reports.lease_granted("main", "node1", ms(1000), elected + ms(10));
        let later = elected + ms(500);
        reports.lead(7, later);
        let seen = reports.cluster("main", later);
        assert_eq!(
            seen.leader_for,
            ms(500),
            "counted from the election, not the start"
        );
        // 1000 ms + 20 ms margin from elected + 10 ms, seen 500 ms after the election.
        assert_eq!(seen.nodes["node1"].own_lease, OwnLease::EndsIn(ms(530)));
        assert_eq!(seen.grant_window, ms(150));
        // Leadership lost and regained in a later term without any report in between.
        reports.lead(9, later + ms(100));
        let seen = reports.cluster("main", later + ms(300));
        assert!(seen.nodes.is_empty(), "no report or grant carries over");
        assert_eq!(seen.leader_for, ms(200));
    }

    #[test]
    fn the_wal_clock_follows_one_primary_on_one_timeline_and_is_bounded() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut clock = None;
        let lsns = |c: &Option<WalClockEntry>| -> Vec<u64> {
            c.as_ref().unwrap().samples.iter().map(|s| s.0 .0).collect()
        };
        WalClockEntry::record(&mut clock, "node1", 1, Lsn(100), at(0));
        WalClockEntry::record(&mut clock, "node1", 1, Lsn(100), at(50));
        WalClockEntry::record(&mut clock, "node1", 1, Lsn(200), at(100));
        assert_eq!(lsns(&clock), [100, 200]);
        let first = clock.as_ref().unwrap().samples[0];
        assert_eq!((first.1, first.2), (at(0), at(50)), "first and last seen at 100");
        // Another timeline, another node, or a position that went back: start afresh.
        WalClockEntry::record(&mut clock, "node1", 2, Lsn(300), at(150));
        assert_eq!(lsns(&clock), [300]);
        WalClockEntry::record(&mut clock, "node2", 2, Lsn(400), at(200));
        assert_eq!(lsns(&clock), [400]);
        WalClockEntry::record(&mut clock, "node2", 2, Lsn(350), at(250));
        assert_eq!(lsns(&clock), [350]);
        for k in 0..(WAL_CLOCK_SAMPLES as u64 + 10) {
            WalClockEntry::record(&mut clock, "node2", 2, Lsn(1_000 + k), at(300 + k));
        }
        let kept = lsns(&clock);
        assert_eq!(kept.len(), WAL_CLOCK_SAMPLES);
        assert_eq!(kept[0], 1_010, "the oldest go first");
    }

    #[test]
    fn a_late_or_repeated_report_never_replaces_a_newer_one() {
        let t0 = Instant::now();
        let reports = table(t0);
        let numbered = |incarnation, seq, role: &str| pb::NodeReport {
            incarnation,
            seq,
            ..report(0, role)
        };
        assert!(reports.record("main", "node1", numbered(7, 2, "primary"), t0));
        assert!(
            !reports.record("main", "node1", numbered(7, 1, "stopped"), t0),
            "late"
        );
        assert!(
            !reports.record("main", "node1", numbered(7, 2, "stopped"), t0),
            "twice"
        );
        assert!(reports.record("main", "node1", numbered(7, 3, "primary"), t0));
        // The agent restarted: a new, higher incarnation counts from 1; the old one's
        // late reports are ignored, also when they come in first (review finding: a
        // late report of the killed agent shut the new one out for the whole term).
        assert!(reports.record("main", "node1", numbered(9, 1, "primary"), t0));
        assert!(
            !reports.record("main", "node1", numbered(7, 4, "stopped"), t0),
            "an earlier incarnation"
        );
        assert!(reports.record("main", "node1", numbered(9, 2, "primary"), t0));
        // An agent whose count went back (state file lost, clock behind; or one from
        // before incarnations grew) is taken once the kept one has been silent for long.
        let later = t0 + MAX_IN_FLIGHT + ms(1);
        assert!(reports.record("main", "node1", numbered(8, 1, "primary"), later));
        assert!(
            reports.record("main", "node1", numbered(0, 0, "primary"), t0),
            "unnumbered"
        );
        let kept = &reports.cluster("main", t0).nodes["node1"].report;
        assert_eq!(kept.role, "primary");
    }

    #[test]
    fn role_for_counts_from_the_first_report_of_an_unbroken_run() {
        let t0 = Instant::now();
        let reports = table(t0);
        reports.record("main", "node1", report(0, "stopped"), t0);
        reports.record("main", "node1", report(0, "stopped"), t0 + ms(20));
        let o = &reports.cluster("main", t0 + ms(25)).nodes["node1"];
        assert_eq!((o.role_for, o.age), (ms(25), ms(5)));
        reports.record("main", "node1", report(0, "standby"), t0 + ms(30));
        let o = &reports.cluster("main", t0 + ms(35)).nodes["node1"];
        assert_eq!(o.role_for, ms(5), "a new role starts a new run");
    }
}
