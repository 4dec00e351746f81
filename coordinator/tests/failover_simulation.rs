//! Deterministic simulation of the failover controller.
//!
//! Three Postgres nodes with their agents, modelled in memory, and the coordinators'
//! replicated state driven by the real pure functions: the same heartbeat replies
//! (`failover::heartbeat_reply`), the same leader decisions (`leader::next_command`),
//! the same state machine (`ClusterState::apply`). Each run is seeded and random:
//! heartbeats lost, replies delayed past the lease, clocks advanced, hosts and
//! postmasters killed, agents killed with their Postgres left running, agents frozen,
//! Raft leaders replaced in mid-lease (the new leader forgets every report), nodes
//! revived. Each node's lease guard outlives its agent and fences at the deadline, as
//! `node-agent/src/guard.rs` does. After every step the promises of DESIGN.md are
//! checked:
//!
//! 1. one writable primary per epoch: a write is acknowledged only by the newest
//!    promoted primary — also a `synchronous_commit = local` one, which only the lease
//!    stops — and no epoch is promoted twice;
//! 2. no acknowledged write is lost: a node promotes only holding every
//!    acknowledged LSN;
//! 3. the primary waits only for standbys in the committed sync set;
//! 4. the epoch never goes back, and after the faults stop the cluster heals to
//!    exactly one running primary.
//!
//! A failure prints the seed; rerun one with `SIM_SEED=<seed>`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use pgquorum_client::{pb, sync_names};
use pgquorum_coordinator::failover::heartbeat_reply;
use pgquorum_coordinator::leader::next_command;
use pgquorum_coordinator::observe::{ClusterReports, Observed, OwnLease};
use pgquorum_coordinator::state::{ClusterState, Command, Member};

/// SplitMix64: small, seedable, good enough to pick events.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Primary,
    Standby,
}

#[derive(Debug)]
struct Node {
    // Postgres
    up: bool,
    /// Postgres frozen (SIGSTOP) until then: it answers nothing, but is not dead.
    pg_frozen_until: u64,
    role: Role,
    lsn: u64,
    follows: Option<String>,
    waits_for: Vec<String>,
    wait_k: usize,
    // Agent
    agent_alive: bool,
    /// The lease guard: started by the agent, outlives it, dies with the host.
    guard_alive: bool,
    /// A heartbeat reply on its way: (delivered at, sent at, reply).
    in_flight: Option<(u64, u64, pb::HeartbeatReply)>,
    frozen_until: u64,
    epoch: u64,
    lease_until: Option<u64>,
    last_probe_ok: Option<u64>,
    /// The leader generation and time of the last reply the agent received: its next
    /// report echoes it (`reply_mark_seen`).
    reply_seen: Option<(u64, u64)>,
}

/// What the leader remembers of one node (lost on a leader change).
struct Seen {
    report: pb::NodeReport,
    at: u64,
    last_up: Option<u64>,
    /// When this leader last granted a lease, and its length (ms).
    lease_granted: Option<(u64, u64)>,
    /// When this leader sent the reply the report's observation followed.
    seen_reply: Option<u64>,
    /// First report of the unbroken run with this role and Postgres state.
    role_since: u64,
}

struct Sim {
    rng: Rng,
    t: u64,
    nodes: BTreeMap<String, Node>,
    state: ClusterState,
    log_index: u64,
    seen: HashMap<String, Seen>,
    leader_since: u64,
    /// Bumped when the Raft leader is replaced: reply marks of an earlier leader
    /// mean nothing to the new one.
    leader_gen: u64,
    told: BTreeMap<String, String>,
    acked_max: u64,
    promoted: BTreeMap<u64, String>,
    newest_primary: String,
    last_epoch: u64,
    trace: Vec<String>,
    /// Whether faults are being injected in this step.
    faults: bool,
}

const LSN_HI: u64 = 0;
/// The default policy's lease and its margin (`pgquorum_client::lease::margin`).
const LEASE_MS: u64 = 1000;
const MARGIN_MS: u64 = 20;

fn lsn_text(lsn: u64) -> String {
    format!("{LSN_HI:X}/{lsn:X}")
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut state = ClusterState::default();
        let mut log_index = 0;
        let mut apply = |state: &mut ClusterState, cmd: Command| {
            log_index += 1;
            state.apply(&cmd, log_index).expect("setup command");
        };
        apply(
            &mut state,
            Command::CreateCluster {
                name: "main".into(),
                settings: Default::default(),
                actor: "sim".into(),
                at_ms: 0,
            },
        );
        for (i, name) in ["node1", "node2", "node3"].iter().enumerate() {
            let member = Member {
                name: name.to_string(),
                region: "r1".into(),
                host: "sim".into(),
                port: 5432 + i as u16,
                workload: "general".into(),
                priority: 100,
                nofailover: false,
                sync_eligible: true,
            };
            apply(
                &mut state,
                Command::RegisterMember {
                    cluster: "main".into(),
                    member,
                    at_ms: 0,
                },
            );
        }
        apply(
            &mut state,
            Command::ClaimBootstrap {
                cluster: "main".into(),
                node: "node1".into(),
                at_ms: 0,
            },
        );
        let mut nodes = BTreeMap::new();
        for name in ["node1", "node2", "node3"] {
            let primary = name == "node1";
            nodes.insert(
                name.to_string(),
                Node {
                    up: true,
                    pg_frozen_until: 0,
                    role: if primary { Role::Primary } else { Role::Standby },
                    lsn: 100,
                    follows: (!primary).then(|| "node1".to_string()),
                    waits_for: Vec::new(),
                    wait_k: 1,
                    agent_alive: true,
                    guard_alive: true,
                    in_flight: None,
                    frozen_until: 0,
                    epoch: 1,
                    // The bootstrap's grant.
                    lease_until: primary.then_some(LEASE_MS - MARGIN_MS),
                    last_probe_ok: Some(0),
                    reply_seen: None,
                },
            );
        }
        Sim {
            rng: Rng(seed),
            t: 0,
            nodes,
            state,
            log_index,
            seen: HashMap::new(),
            leader_since: 0,
            leader_gen: 0,
            told: BTreeMap::new(),
            acked_max: 100,
            promoted: BTreeMap::from([(1, "node1".to_string())]),
            newest_primary: "node1".into(),
            last_epoch: 1,
            trace: Vec::new(),
            faults: false,
        }
    }

    fn note(&mut self, what: String) {
        self.trace.push(format!("t={} {what}", self.t));
    }

    fn reports(&self) -> ClusterReports {
        let ms = |d: u64| Duration::from_millis(d);
        ClusterReports {
            nodes: self
                .seen
                .iter()
                .map(|(name, s)| {
                    let o = Observed {
                        report: s.report.clone(),
                        age: ms(self.t - s.at),
                        up_ago: s.last_up.map(|u| ms(self.t - u)),
                        own_lease: s.lease_granted.map_or(OwnLease::Never, |(at, length)| {
                            OwnLease::granted(ms(self.t - at), ms(length))
                        }),
                        seen_reply_ago: s.seen_reply.map(|r| ms(self.t - r)),
                        last_grant_ago: s.lease_granted.map(|(at, _)| ms(self.t - at)),
                        role_for: ms(self.t - s.role_since),
                        observed_ago: ms(self.t - s.at),
                    };
                    (name.clone(), o)
                })
                .collect(),
            applied_sync: None,
            leader_for: ms(self.t - self.leader_since),
            told_sync_names: self.told.clone(),
            wal_clock: None,
            grant_window: Duration::ZERO,
            settling_seen_for: None,
        }
        .with_applied_sync(&self.seen)
    }

    fn report_of(&self, name: &str) -> pb::NodeReport {
        let n = &self.nodes[name];
        let mut r = pb::NodeReport {
            epoch: n.epoch,
            ..Default::default()
        };
        if !n.up {
            r.role = "stopped".into();
            return r;
        }
        if self.t < n.pg_frozen_until {
            // The agent's queries time out.
            r.role = "unknown".into();
            return r;
        }
        r.postgres_up = true;
        match n.role {
            Role::Primary => {
                r.role = "primary".into();
                r.current_lsn = lsn_text(n.lsn);
                r.synchronous_standby_names = sync_names::format(n.wait_k as u32, &n.waits_for, true);
                r.replicas = self
                    .nodes
                    .iter()
                    .filter(|(_, s)| s.up && s.role == Role::Standby && s.follows.as_deref() == Some(name))
                    .map(|(sname, s)| pb::ReplicationInfo {
                        application_name: sname.clone(),
                        state: "streaming".into(),
                        sync_state: if n.waits_for.contains(sname) {
                            "quorum".into()
                        } else {
                            "async".into()
                        },
                        flush_lsn: lsn_text(s.lsn),
                        replay_lsn: lsn_text(s.lsn),
                        ..Default::default()
                    })
                    .collect();
            }
            Role::Standby => {
                r.role = "standby".into();
                r.receive_lsn = lsn_text(n.lsn);
                r.replay_lsn = lsn_text(n.lsn);
                r.wal_receiver_status = "streaming".into();
                r.data_is_standby = true;
                r.primary_probe_age_ms = n.last_probe_ok.map(|ok| self.t - ok);
            }
        }
        r
    }

    /// One heartbeat from `name`'s agent, the leader's reply, and the agent acting on it.
    fn heartbeat(&mut self, name: &str) {
        // The standby's probe of the published primary.
        let published = self.state.clusters["main"].primary.clone();
        if let Some(p) = &published {
            if p != name && self.nodes[p].up && self.t >= self.nodes[p].pg_frozen_until {
                self.nodes.get_mut(name).unwrap().last_probe_ok = Some(self.t);
            }
        }
        let report = self.report_of(name);
        let prev = self.seen.remove(name);
        let last_up = if report.postgres_up {
            Some(self.t)
        } else {
            prev.as_ref().and_then(|p| p.last_up)
        };
        let role_since = prev
            .as_ref()
            .filter(|p| p.report.role == report.role && p.report.postgres_up == report.postgres_up)
            .map_or(self.t, |p| p.role_since);
        let lease_granted = prev.and_then(|p| p.lease_granted);
        let seen_reply = self.nodes[name]
            .reply_seen
            .filter(|(generation, _)| *generation == self.leader_gen)
            .map(|(_, at)| at);
        self.seen.insert(
            name.to_string(),
            Seen {
                report,
                at: self.t,
                last_up,
                lease_granted,
                seen_reply,
                role_since,
            },
        );
        let reply = heartbeat_reply(&self.state.clusters["main"], &self.reports(), name, false);
        self.nodes.get_mut(name).unwrap().reply_seen = Some((self.leader_gen, self.t));
        if reply.lease_ms > 0 {
            self.seen.get_mut(name).unwrap().lease_granted = Some((self.t, reply.lease_ms));
        }
        if self.state.clusters["main"].primary.as_deref() == Some(name) {
            self.told
                .insert(name.to_string(), reply.synchronous_standby_names.clone());
        }
        // Most replies arrive at once; some take up to two leases (a slow network or
        // coordinator): the lease still counts from the send.
        let delay = if self.faults && self.rng.chance(5) {
            self.rng.below(2 * LEASE_MS)
        } else {
            0
        };
        let sent = self.t;
        if delay == 0 {
            self.act(name, sent, &reply);
        } else {
            self.nodes.get_mut(name).unwrap().in_flight = Some((sent + delay, sent, reply));
        }
    }

    /// Delivers a delayed reply that has arrived; a reply the agent stopped waiting
    /// for (it waits no longer than its lease) is dropped. Returns whether the agent
    /// is still waiting.
    fn deliver(&mut self, name: &str) -> bool {
        let Some((at, sent, reply)) = self.nodes[name].in_flight.clone() else {
            return false;
        };
        if self.t < at {
            let lease_left = self.nodes[name].lease_until.map_or(0, |u| u.saturating_sub(sent));
            if self.t - sent <= lease_left.max(500) {
                return true;
            }
            self.nodes.get_mut(name).unwrap().in_flight = None;
            return false;
        }
        self.nodes.get_mut(name).unwrap().in_flight = None;
        self.act(name, sent, &reply);
        false
    }

    /// The agent's side (see node-agent/src/agent.rs for the real one), for a reply to
    /// the heartbeat sent at `sent`.
    fn act(&mut self, name: &str, sent: u64, reply: &pb::HeartbeatReply) {
        let t = self.t;
        let primary_name = reply.primary.as_ref().map(|p| p.name.clone());
        let primary_lsn = primary_name.as_ref().map(|p| self.nodes[p].lsn);
        let n = self.nodes.get_mut(name).unwrap();
        if reply.epoch < n.epoch {
            return;
        }
        n.epoch = reply.epoch;
        let is_primary = primary_name.as_deref() == Some(name);
        // Counted from the send, less the margin; only a grant extends it, and only a
        // reply naming another primary ends it.
        if (is_primary || reply.promote) && reply.lease_ms > 0 {
            n.lease_until = Some(sent + reply.lease_ms - MARGIN_MS);
        } else if !is_primary && !reply.promote {
            n.lease_until = None;
        }
        let lease_valid = n.lease_until.is_some_and(|u| t < u);
        let mut note = None;
        if n.role == Role::Primary && !is_primary && !reply.promote {
            if n.up {
                n.up = false;
                note = Some(format!("{name} fenced (epoch {})", reply.epoch));
            } else if let (Some(p), Some(plsn)) = (&primary_name, primary_lsn) {
                // pg_rewind: back to where the new primary's history forked.
                n.role = Role::Standby;
                n.lsn = n.lsn.min(plsn);
                n.follows = Some(p.clone());
                n.up = true;
                note = Some(format!("{name} rejoined {p}"));
            }
        } else if reply.promote && !lease_valid {
            // A promotion order that outlived its lease is not carried out.
        } else if reply.promote && !n.up {
            n.up = true;
        } else if reply.promote {
            if n.up && n.role == Role::Standby {
                n.role = Role::Primary;
                n.follows = None;
                n.waits_for = sync_names::parse(&reply.synchronous_standby_names);
                n.wait_k = wait_k(&reply.synchronous_standby_names);
                note = Some(format!("{name} promoted at epoch {} lsn {}", reply.epoch, n.lsn));
                let lsn = n.lsn;
                assert!(
                    lsn >= self.acked_max,
                    "Invariant 2: {name} promoted with lsn {lsn} < acknowledged {}",
                    self.acked_max
                );
                if let Some(other) = self.promoted.insert(reply.epoch, name.to_string()) {
                    assert_eq!(other, name, "Invariant 1: epoch {} promoted twice", reply.epoch);
                }
                self.newest_primary = name.to_string();
            }
        } else if is_primary {
            if n.up && n.role == Role::Primary {
                n.waits_for = sync_names::parse(&reply.synchronous_standby_names);
                n.wait_k = wait_k(&reply.synchronous_standby_names);
            } else if !n.up && reply.start_primary && lease_valid {
                n.up = true;
                note = Some(format!("{name} restarted as primary"));
            }
        } else if n.role == Role::Standby {
            if let Some(p) = &primary_name {
                n.follows = Some(p.clone());
            }
            if !n.up {
                n.up = true;
            }
        }
        if let Some(what) = note {
            self.note(what);
        }
    }

    /// The leader's loop: commit what the decisions call for.
    fn lead(&mut self) {
        let (command, _) = next_command(&self.state.clusters["main"], &self.reports(), self.t);
        if let Some(cmd) = command {
            self.log_index += 1;
            if self.state.apply(&cmd, self.log_index).is_ok() {
                self.note(format!("committed {}", describe(&cmd)));
            }
        }
        let epoch = self.state.clusters["main"].epoch;
        assert!(epoch >= self.last_epoch, "Invariant 4: epoch went back");
        self.last_epoch = epoch;
    }

    /// The primary's write; acknowledged once k standbys it waits for have it.
    fn write(&mut self) {
        let writers: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.up && n.role == Role::Primary && self.t >= n.pg_frozen_until)
            .map(|(k, _)| k.clone())
            .collect();
        for w in writers {
            // A `synchronous_commit = local` session: acknowledged at once.
            assert_eq!(
                w, self.newest_primary,
                "Invariant 1: {w} acknowledged a local commit while {} is the newest primary",
                self.newest_primary
            );
            let lsn = self.nodes[&w].lsn + 1;
            self.nodes.get_mut(&w).unwrap().lsn = lsn;
            let (waits, k) = (self.nodes[&w].waits_for.clone(), self.nodes[&w].wait_k);
            let mut holders = 0;
            for s in &waits {
                let sn = self.nodes.get_mut(s).unwrap();
                if sn.up && sn.role == Role::Standby && sn.follows.as_deref() == Some(w.as_str()) {
                    sn.lsn = sn.lsn.max(lsn);
                    holders += 1;
                }
            }
            if k > 0 && holders >= k {
                assert_eq!(
                    w, self.newest_primary,
                    "Invariant 1: {w} acknowledged a write while {} is the newest primary",
                    self.newest_primary
                );
                self.acked_max = self.acked_max.max(lsn);
            }
        }
    }

    fn replicate(&mut self) {
        let t = self.t;
        let lsns: HashMap<String, u64> = self.nodes.iter().map(|(k, n)| (k.clone(), n.lsn)).collect();
        let ups: HashMap<String, bool> = self
            .nodes
            .iter()
            .map(|(k, n)| (k.clone(), n.up && t >= n.pg_frozen_until))
            .collect();
        for n in self.nodes.values_mut() {
            if let Some(p) = n.follows.clone() {
                if n.up && t >= n.pg_frozen_until && n.role == Role::Standby && ups[&p] {
                    n.lsn = n.lsn.max(lsns[&p]);
                }
            }
        }
    }

    /// Invariant 3: the committed primary waits only for committed sync standbys.
    fn check_sync_set(&self) {
        let c = &self.state.clusters["main"];
        if let Some(p) = &c.primary {
            let n = &self.nodes[p];
            if n.up && n.role == Role::Primary {
                for w in &n.waits_for {
                    assert!(
                        c.sync_set.contains(w),
                        "Invariant 3: {p} waits for {w} outside {:?}",
                        c.sync_set
                    );
                }
            }
        }
    }

    fn fault(&mut self) {
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        let victim = names[self.rng.below(3) as usize].clone();
        let n = self.nodes.get_mut(&victim).unwrap();
        let what = match self.rng.below(8) {
            0 => {
                n.up = false;
                n.agent_alive = false;
                n.guard_alive = false;
                n.in_flight = None;
                "host killed"
            }
            6 => {
                n.agent_alive = false;
                n.in_flight = None;
                "agent killed, its postgres left running"
            }
            7 => {
                n.agent_alive = false;
                n.in_flight = None;
                n.pg_frozen_until = self.t + 200 + self.rng.below(4000);
                "agent killed, its postgres frozen"
            }
            1 => {
                n.up = false;
                "postmaster killed"
            }
            2 => {
                n.frozen_until = self.t + 200 + self.rng.below(3000);
                "agent frozen"
            }
            3 => {
                n.agent_alive = true;
                n.frozen_until = 0;
                "agent revived"
            }
            4 => {
                self.seen.clear();
                self.told.clear();
                self.leader_since = self.t;
                self.leader_gen += 1;
                "Raft leader replaced"
            }
            _ => "nothing",
        };
        self.note(format!("fault: {victim} {what}"));
    }

    fn step(&mut self, faults: bool) {
        self.t += 10 + self.rng.below(140);
        // Leases are enforced first, by the guard (which outlives the agent) or the
        // agent's own timer: a primary's data runs only under a lease.
        for n in self.nodes.values_mut() {
            let active = n.agent_alive && self.t >= n.frozen_until;
            let enforced = n.guard_alive || active;
            if enforced && n.role == Role::Primary && n.up && n.lease_until.is_none_or(|u| self.t >= u) {
                n.up = false;
            }
            if active {
                n.guard_alive = true;
            }
        }
        if faults && self.rng.chance(3) {
            self.fault();
        }
        self.faults = faults;
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for name in names {
            let n = &self.nodes[&name];
            if !n.agent_alive || self.t < n.frozen_until || self.deliver(&name) {
                continue;
            }
            if self.rng.chance(if faults { 85 } else { 100 }) {
                self.heartbeat(&name);
            }
        }
        self.lead();
        if self.rng.chance(60) {
            self.write();
        }
        if self.rng.chance(70) {
            self.replicate();
        }
        self.check_sync_set();
    }
}

trait WithAppliedSync {
    fn with_applied_sync(self, seen: &HashMap<String, Seen>) -> Self;
}

impl WithAppliedSync for ClusterReports {
    /// What the primary reports it waits for, since the WAL position it reports now: a
    /// conservative stand-in for the leader's record of when the list last changed.
    fn with_applied_sync(mut self, seen: &HashMap<String, Seen>) -> Self {
        self.applied_sync = seen
            .iter()
            .find(|(_, s)| s.report.role == "primary")
            .map(|(name, s)| pgquorum_coordinator::observe::AppliedSync {
                node: name.clone(),
                names: sync_names::parse(&s.report.synchronous_standby_names),
                since: pgquorum_client::lsn::Lsn::parse(&s.report.current_lsn).unwrap_or_default(),
            });
        self
    }
}

fn wait_k(names: &str) -> usize {
    names
        .trim()
        .strip_prefix("ANY ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|k| k.parse().ok())
        .unwrap_or(0)
}

fn describe(cmd: &Command) -> String {
    match cmd {
        Command::StartFailover {
            old_primary,
            from_epoch,
            ..
        } => format!("StartFailover({old_primary}, from {from_epoch})"),
        Command::ChooseCandidate {
            candidate, fenced_by, ..
        } => format!("ChooseCandidate({candidate}, {fenced_by})"),
        Command::CompletePromotion {
            primary, to_epoch, ..
        } => format!("CompletePromotion({primary}, {to_epoch})"),
        Command::SetSyncSet { sync_set, .. } => format!("SetSyncSet({sync_set:?})"),
        other => format!("{other:?}"),
    }
}

fn run(seed: u64) {
    let mut sim = Sim::new(seed);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for _ in 0..300 {
            sim.step(true);
        }
        // Faults stop; everything comes back; the cluster must heal.
        for n in sim.nodes.values_mut() {
            n.agent_alive = true;
            n.frozen_until = 0;
            n.pg_frozen_until = 0;
        }
        for _ in 0..300 {
            sim.step(false);
        }
        let c = &sim.state.clusters["main"];
        let primary = c
            .primary
            .clone()
            .unwrap_or_else(|| panic!("no primary after healing: {:?}", c.failover));
        let running: Vec<&String> = sim
            .nodes
            .iter()
            .filter(|(_, n)| n.up && n.role == Role::Primary)
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            running,
            [&primary],
            "exactly the committed primary runs as primary after healing"
        );
    }));
    if let Err(e) = outcome {
        let tail: Vec<&String> = sim
            .trace
            .iter()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        eprintln!("seed {seed} failed; last events:");
        for line in tail {
            eprintln!("  {line}");
        }
        std::panic::resume_unwind(e);
    }
}

#[test]
fn thousands_of_seeded_runs_keep_the_invariants() {
    if let Some(seed) = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        return run(seed);
    }
    let runs: u64 = std::env::var("SIM_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    for seed in 0..runs {
        run(seed);
    }
}
