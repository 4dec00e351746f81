//! Deterministic simulation of the failover controller, driving the real code.
//!
//! Three Postgres servers are modelled in memory (running or not, frozen, primary or
//! standby data, timeline and WAL position, whom they follow and wait for); everything
//! that decides is the project's own code:
//! - the agent: [`pgquorum_agent::plan::receive`] and [`pgquorum_agent::plan::plan`],
//!   whose actions the simulation carries out on its modelled Postgres as the agent's
//!   executor does on a real one;
//! - the leader: the real report table ([`Reports`], on the simulated clock), the real
//!   reply ([`heartbeat_reply`], [`Reports::answered`]), the real decisions
//!   ([`pgquorum_coordinator::leader::step`]) and the real state machine
//!   ([`ClusterState::apply`]); operators' switchovers and overrides go through
//!   [`manual::hand_over`], as the admin service's do.
//!
//! Each run is seeded and random, with a policy drawn per seed (`strict`, `prefer` or
//! `off`; one or two sync standbys). Faults: heartbeats lost, replies delayed past the
//! lease, old requests delivered again (duplicated or reordered), an agent cut off
//! from the coordinators while it still reaches its Postgres, hosts and postmasters
//! killed, agents killed with their Postgres left running or frozen, agents and
//! Postgres frozen (a paused clock), a Raft leader replaced in mid-lease (the new one
//! starts from an empty table) while the deposed one keeps answering for a while from
//! its stale state (it cannot grant a lease: it confirms its leadership first), an
//! outage of the whole coordinator group (no leader; the one after it starts afresh),
//! agents cut off from each other, and nodes revived. A primary no leader answers
//! asks the other agents for failsafe promises as `node-agent/src/agent.rs` does, judged
//! by the real [`pgquorum_agent::failsafe`] rules; a standby that promised reports it
//! and its planner refuses promotion until it ends. Each node's lease guard outlives its agent and fences at the
//! deadline, as `node-agent/src/guard.rs` does; Postgres's commit-time check refuses a
//! commit once the lease file's deadline has passed. Timelines fork at every
//! promotion: a standby past the fork point cannot follow until rewound.
//!
//! After every step the promises of DESIGN.md are checked:
//! 1. one writable primary: never two nodes that could acknowledge a write at the same
//!    instant (running as primary under a lease that has not run out), and no epoch
//!    promoted twice;
//! 2. no acknowledged write is lost in `strict` mode: a node is promoted only if its
//!    history holds the newest acknowledged write (unless an operator accepted data
//!    loss);
//! 3. the primary waits only for standbys in the committed sync set;
//! 4. the epoch never goes back; after the faults stop the cluster heals to exactly
//!    one running primary, every node on its timeline's history.
//!
//! A failure prints the seed and the last events; rerun one with `SIM_SEED=<seed>`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use pgquorum_agent::failsafe::{self, Promise, Standing};
use pgquorum_agent::plan::{self, Action, LeaseChange, Local, Reception, StreamWatch};
use pgquorum_agent::postgres::ctl::Upstream;
use pgquorum_client::{pb, sync_names};
use pgquorum_coordinator::failover::{heartbeat_reply, manual};
use pgquorum_coordinator::observe::Reports;
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

const NAMES: [&str; 3] = ["node1", "node2", "node3"];
const HOST: &str = "sim";
const FIRST_PORT: u16 = 5432;

fn port_of(name: &str) -> u16 {
    FIRST_PORT + NAMES.iter().position(|n| *n == name).expect("a node") as u16
}

fn name_of(up: &Upstream) -> String {
    NAMES[usize::from(up.port - FIRST_PORT)].to_string()
}

fn upstream_of(name: &str) -> Upstream {
    Upstream {
        host: HOST.into(),
        port: port_of(name),
    }
}

#[derive(Debug)]
struct Node {
    // Postgres
    up: bool,
    /// Postgres frozen (SIGSTOP) until then: it answers nothing, but is not dead.
    pg_frozen_until: u64,
    /// No `standby.signal`: the data is a primary's.
    primary_data: bool,
    timeline: u64,
    /// The timeline of the last restartpoint: what a standby without a WAL receiver
    /// reports (it lags `timeline` until the next restartpoint).
    restartpoint_timeline: u64,
    lsn: u64,
    follows: Option<String>,
    waits_for: Vec<String>,
    wait_k: usize,
    // Agent
    agent_alive: bool,
    /// The lease guard: started by the agent, outlives it, dies with the host.
    guard_alive: bool,
    /// A heartbeat reply on its way.
    in_flight: Option<InFlight>,
    /// The agent (its whole process, clock included) frozen until then.
    frozen_until: u64,
    /// The agent reaches no coordinator until then (it still reaches its Postgres).
    cut_until: u64,
    /// The agent reaches no other agent until then (the failsafe's links).
    peers_cut_until: u64,
    /// When a coordinator leader last answered the agent.
    leader_answered_at: Option<u64>,
    /// The primary (persisted with the epoch), and whether this node is told to
    /// promote, as the last reply said.
    known_primary: Option<String>,
    told_promote: bool,
    /// Whose promises the primary needs, and its last grant's length (ms), from its
    /// last reply; lost with the agent's memory.
    failsafe_peers: Vec<pb::FailsafePeer>,
    granted_ms: u64,
    /// A failsafe promise given; on disk, so it outlives the agent.
    promise: Option<Promise>,
    epoch: u64,
    /// The lease deadline, as in the lease file the guard and Postgres read.
    lease_until: Option<u64>,
    /// The promotion marker.
    promoting: bool,
    /// What the agent's configuration points at.
    following: Option<Upstream>,
    last_probe_ok: Option<u64>,
    /// `reply_mark` of the last reply, echoed by the next observation.
    reply_mark: u64,
    incarnation: u64,
    seq: u64,
    /// The last report sent, which the network may deliver again later.
    last_sent: Option<pb::NodeReport>,
    /// Whether the agent has seen this running standby stream, over time.
    streaming: StreamWatch,
    divergence_checked_at: Option<u64>,
}

impl Node {
    /// A new agent process: it remembers only what it persists (the epoch) and what
    /// it reads from disk; its lease comes back from the lease file.
    fn restart_agent(&mut self) {
        self.agent_alive = true;
        self.in_flight = None;
        self.following = None;
        self.reply_mark = 0;
        self.incarnation += 1;
        self.seq = 0;
        self.streaming = StreamWatch::default();
        self.divergence_checked_at = None;
        self.leader_answered_at = None;
        // The primary is persisted with the epoch.
        self.told_promote = false;
        self.failsafe_peers = Vec::new();
        self.granted_ms = 0;
    }
}

#[derive(Clone, Debug)]
struct InFlight {
    at: u64,
    sent: u64,
    report: pb::NodeReport,
    reply: pb::HeartbeatReply,
}

/// A Raft leader as far as agents see it: its applied state and its report table.
struct Leader {
    term: u64,
    state: ClusterState,
    reports: Reports,
}

/// What a timeline forked from: its parent and the WAL position of the fork.
#[derive(Clone, Copy, Debug)]
struct Fork {
    parent: u64,
    at: u64,
}

struct Sim {
    rng: Rng,
    t: u64,
    base: Instant,
    nodes: BTreeMap<String, Node>,
    /// The current leader; its state is the committed state.
    leader: Leader,
    /// A deposed leader that does not know it yet: it answers heartbeats from its
    /// stale state until then.
    deposed: Option<(Leader, u64)>,
    log_index: u64,
    timelines: BTreeMap<u64, Fork>,
    /// The newest acknowledged write: (timeline, lsn).
    acked: (u64, u64),
    promoted: BTreeMap<u64, String>,
    last_epoch: u64,
    trace: Vec<String>,
    /// Whether faults are being injected in this step.
    faults: bool,
    /// No coordinator leader exists until then (a lost quorum, every coordinator
    /// frozen): nothing is answered or committed.
    outage_until: Option<u64>,
    /// Invariant 2 holds in `strict` sync mode (DESIGN.md); `prefer` and `off` may
    /// promote a standby without the newest acknowledged write, by design.
    strict: bool,
}

fn grant_window() -> Duration {
    // The coordinators' default election_timeout_min_ms.
    Duration::from_millis(150)
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed);
        let sync_mode = ["strict", "strict", "prefer", "off"][rng.below(4) as usize];
        let sync_standbys = if rng.chance(25) { "2" } else { "1" };
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
                settings: BTreeMap::from([
                    ("sync_mode".to_string(), sync_mode.to_string()),
                    ("sync_standbys".to_string(), sync_standbys.to_string()),
                ]),
                actor: "sim".into(),
                at_ms: 0,
            },
        );
        for name in NAMES {
            let member = Member {
                name: name.to_string(),
                region: "r1".into(),
                host: HOST.into(),
                port: port_of(name),
                workload: "general".into(),
                priority: 100,
                nofailover: false,
                sync_eligible: true,
                agent_addr: format!("{HOST}:{}", port_of(name) + 20),
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
        for name in NAMES {
            let primary = name == "node1";
            nodes.insert(
                name.to_string(),
                Node {
                    up: true,
                    pg_frozen_until: 0,
                    primary_data: primary,
                    timeline: 1,
                    restartpoint_timeline: 1,
                    lsn: 100,
                    follows: (!primary).then(|| "node1".to_string()),
                    waits_for: Vec::new(),
                    wait_k: 0,
                    agent_alive: true,
                    guard_alive: true,
                    in_flight: None,
                    frozen_until: 0,
                    cut_until: 0,
                    peers_cut_until: 0,
                    leader_answered_at: None,
                    known_primary: Some("node1".into()),
                    told_promote: false,
                    failsafe_peers: Vec::new(),
                    granted_ms: 0,
                    promise: None,
                    epoch: 1,
                    // The bootstrap's grant.
                    lease_until: primary.then_some(900),
                    promoting: false,
                    following: (!primary).then(|| upstream_of("node1")),
                    last_probe_ok: Some(0),
                    reply_mark: 0,
                    incarnation: 1,
                    seq: 0,
                    last_sent: None,
                    streaming: StreamWatch::default(),
                    divergence_checked_at: None,
                },
            );
        }
        let base = Instant::now();
        let reports = Reports::new(grant_window(), base);
        reports.lead(1, base);
        Sim {
            rng,
            t: 0,
            base,
            nodes,
            leader: Leader {
                term: 1,
                state,
                reports,
            },
            deposed: None,
            log_index,
            timelines: BTreeMap::new(),
            acked: (1, 100),
            promoted: BTreeMap::from([(1, "node1".to_string())]),
            last_epoch: 1,
            trace: vec![format!("sync_mode={sync_mode} sync_standbys={sync_standbys}")],
            faults: false,
            outage_until: None,
            strict: sync_mode == "strict",
        }
    }

    fn now(&self) -> Instant {
        self.base + Duration::from_millis(self.t)
    }

    fn note(&mut self, what: String) {
        self.trace.push(format!("t={} {what}", self.t));
    }

    fn cluster(&self) -> &pgquorum_coordinator::state::Cluster {
        &self.leader.state.clusters["main"]
    }

    /// Whether a server at `node` (timeline, lsn) holds the write at `write`: the
    /// write is on its timeline's history, before its position and every fork since.
    fn holds(&self, node: (u64, u64), write: (u64, u64)) -> bool {
        let (mut t, mut limit) = node;
        loop {
            if t == write.0 {
                return write.1 <= limit;
            }
            match self.timelines.get(&t) {
                Some(f) => {
                    limit = limit.min(f.at);
                    t = f.parent;
                }
                None => return false,
            }
        }
    }

    /// Whether a server at `from` holds nothing a server on timeline `to` lacks, so
    /// it can stream from it.
    fn on_history(&self, from: (u64, u64), to: u64) -> bool {
        self.holds((to, u64::MAX), from)
    }

    fn report_of(&self, name: &str) -> pb::NodeReport {
        let n = &self.nodes[name];
        let mut r = pb::NodeReport {
            epoch: n.epoch,
            reply_mark_seen: n.reply_mark,
            data_is_standby: !n.primary_data,
            failsafe_roster: n.failsafe_peers.iter().map(|p| p.name.clone()).collect(),
            promise: n.promise.as_ref().and_then(|p| {
                let left = p.left(self.now())?;
                Some(pb::PromiseHeld {
                    primary: p.primary.clone(),
                    epoch: p.epoch,
                    left_ms: left.as_millis() as u64,
                })
            }),
            ..Default::default()
        };
        if !n.up {
            r.role = "stopped".into();
            return r;
        }
        if self.t < n.pg_frozen_until {
            // The agent's queries time out.
            r.role = "unknown".into();
            r.error = "postgres runs but did not answer".into();
            return r;
        }
        r.postgres_up = true;
        r.timeline = if n.primary_data || self.streams(name) {
            n.timeline
        } else {
            n.restartpoint_timeline
        } as u32;
        if n.primary_data {
            r.role = "primary".into();
            r.current_lsn = lsn_text(n.lsn);
            r.synchronous_standby_names = if n.wait_k == 0 {
                String::new()
            } else {
                sync_names::format(n.wait_k as u32, &n.waits_for, true)
            };
            r.replicas = self
                .nodes
                .iter()
                .filter(|(_, s)| s.up && !s.primary_data && s.follows.as_deref() == Some(name))
                .filter(|(_, s)| s.timeline == n.timeline)
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
        } else {
            r.role = "standby".into();
            r.receive_lsn = lsn_text(n.lsn);
            r.replay_lsn = lsn_text(n.lsn);
            // A receiver that cannot follow (past the fork point) still streams the old
            // timeline for a moment each time it retries.
            if self.streams(name) || (self.diverged(name) && self.t % 50 < 5) {
                r.wal_receiver_status = "streaming".into();
            }
            r.primary_probe_age_ms = n.last_probe_ok.map(|ok| self.t - ok);
        }
        r
    }

    /// The leader's side of a heartbeat, as the agent service does it: keep the
    /// report, build the reply, note what it grants. None: no reply (a deposed leader
    /// cannot confirm its leadership for a lease).
    fn answer(
        leader: &Leader,
        name: &str,
        report: pb::NodeReport,
        now: Instant,
        deposed: bool,
    ) -> Option<pb::HeartbeatReply> {
        leader.reports.record("main", name, report, now);
        let cluster = &leader.state.clusters["main"];
        let mut reply = heartbeat_reply(cluster, &leader.reports.cluster("main", now), name, false);
        if deposed && reply.lease_ms > 0 {
            return None;
        }
        leader.reports.answered("main", name, &mut reply, now);
        Some(reply)
    }

    /// One heartbeat from `name`'s agent: the leader's reply, now or later.
    fn heartbeat(&mut self, name: &str) {
        // The standby's probe of the published primary.
        let published = self.cluster().primary.clone();
        if let Some(p) = &published {
            if p != name && self.nodes[p].up && self.t >= self.nodes[p].pg_frozen_until {
                self.nodes.get_mut(name).unwrap().last_probe_ok = Some(self.t);
            }
        }
        // The agent's own lease check comes first in its round.
        self.enforce_lease(name);
        let mut report = self.report_of(name);
        {
            let now = self.now();
            let n = self.nodes.get_mut(name).unwrap();
            n.streaming.observe(
                (report.role == "standby").then_some(report.wal_receiver_status == "streaming"),
                now,
            );
            n.seq += 1;
            report.incarnation = n.incarnation;
            report.seq = n.seq;
            n.last_sent = Some(report.clone());
        }
        if self.t < self.nodes[name].cut_until || self.outage_until.is_some() {
            return self.failsafe(name);
        }
        let now = self.now();
        let to_deposed =
            self.deposed.as_ref().is_some_and(|(_, until)| self.t < *until) && self.rng.chance(40);
        let reply = if to_deposed {
            let (old, _) = self.deposed.as_ref().unwrap();
            Self::answer(old, name, report.clone(), now, true)
        } else {
            Self::answer(&self.leader, name, report.clone(), now, false)
        };
        let Some(reply) = reply else {
            return;
        };
        // Most replies arrive at once; some take up to two leases (a slow network or
        // coordinator): the lease still counts from the send.
        let delay = if self.faults && self.rng.chance(5) {
            self.rng.below(2 * 1000)
        } else {
            0
        };
        let flight = InFlight {
            at: self.t + delay,
            sent: self.t,
            report,
            reply,
        };
        if delay == 0 {
            self.act(name, flight);
        } else {
            self.nodes.get_mut(name).unwrap().in_flight = Some(flight);
        }
    }

    /// A primary whose heartbeat no leader answered, as its agent does once half its
    /// lease is left: asks every peer its last grant named for a promise, judged by
    /// the real rules on what that peer's agent knows, and writes on the earliest.
    fn failsafe(&mut self, name: &str) {
        let t = self.t;
        let now = self.now();
        let n = &self.nodes[name];
        let Some(until) = n.lease_until.filter(|u| *u > t) else {
            return;
        };
        if n.failsafe_peers.is_empty() || until - t > n.granted_ms / 2 {
            return;
        }
        let request = pb::PromiseRequest {
            cluster: "main".into(),
            primary: name.into(),
            epoch: n.epoch,
            for_ms: n.granted_ms,
            member: String::new(),
        };
        let asker_cut = t < n.peers_cut_until;
        let mut granted = Vec::new();
        for peer in n.failsafe_peers.clone() {
            let p = &self.nodes[&peer.name];
            if asker_cut || !p.agent_alive || t < p.frozen_until || t < p.peers_cut_until {
                granted.push(None);
                continue;
            }
            let standing = Standing {
                cluster: "main".into(),
                me: peer.name.clone(),
                epoch: p.epoch,
                primary: p.known_primary.clone(),
                being_promoted: p.promoting || p.told_promote,
                leader_answered_at: p.leader_answered_at.map(|a| self.base + Duration::from_millis(a)),
                reach_window: Duration::from_millis(200),
            };
            let request = pb::PromiseRequest {
                member: peer.name.clone(),
                ..request.clone()
            };
            match failsafe::judge(&standing, &request, now) {
                Ok(length) => {
                    let held = p.promise.clone().filter(|h| h.left(now).is_some());
                    let promise = failsafe::merge(
                        held,
                        Promise {
                            primary: name.into(),
                            epoch: request.epoch,
                            until: now + length,
                        },
                    );
                    self.nodes.get_mut(&peer.name).unwrap().promise = Some(promise);
                    granted.push(Some(length));
                }
                Err(_) => granted.push(None),
            }
        }
        if let Some(usable) = failsafe::extension(&granted) {
            let extended = t + usable.as_millis() as u64;
            if extended > until {
                self.nodes.get_mut(name).unwrap().lease_until = Some(extended);
                self.note(format!("{name} writes on promises until t={extended}"));
            }
        }
    }

    /// The network delivers an old request of `name` again (a duplicate, or one that
    /// took the long way): the leader keeps it only if it is the newest, and answers
    /// into the void (the agent stopped waiting), noting any lease it grants.
    fn redeliver(&mut self, name: &str) {
        if let Some(old) = self.nodes[name].last_sent.clone() {
            let now = self.now();
            let _ = Self::answer(&self.leader, name, old, now, false);
            self.note(format!("{name}'s last request delivered again"));
        }
    }

    /// Delivers a delayed reply that has arrived; a reply the agent stopped waiting
    /// for (it waits no longer than its lease) is dropped. Returns whether the agent
    /// is still waiting.
    fn deliver(&mut self, name: &str) -> bool {
        let Some(flight) = self.nodes[name].in_flight.clone() else {
            return false;
        };
        if self.t < flight.at {
            let lease_left = self.nodes[name]
                .lease_until
                .map_or(0, |u| u.saturating_sub(flight.sent));
            if self.t - flight.sent <= lease_left.max(500) {
                return true;
            }
            self.nodes.get_mut(name).unwrap().in_flight = None;
            return false;
        }
        self.nodes.get_mut(name).unwrap().in_flight = None;
        self.act(name, flight);
        false
    }

    /// The agent's lease check at the start of its round (the guard's is in `step`).
    fn enforce_lease(&mut self, name: &str) {
        let t = self.t;
        let n = self.nodes.get_mut(name).unwrap();
        if n.up && (n.primary_data || n.promoting) && n.lease_until.is_some_and(|u| t >= u) {
            n.up = false;
            n.lease_until = None;
            self.note(format!("{name} fenced by its agent: lease over"));
        }
    }

    /// The agent's side: the real planner's decisions on the reply to the heartbeat
    /// sent at `flight.sent`, carried out on the modelled Postgres.
    fn act(&mut self, name: &str, flight: InFlight) {
        let InFlight {
            sent, report, reply, ..
        } = flight;
        let t = self.t;
        let now = self.now();
        let n = self.nodes.get_mut(name).unwrap();
        n.reply_mark = reply.reply_mark;
        n.leader_answered_at = Some(t);
        let lease = match plan::receive(name, n.epoch, &reply) {
            Reception::Stale { .. } => return,
            Reception::Accept { new_epoch, lease } => {
                if let Some(e) = new_epoch {
                    n.epoch = e;
                }
                lease
            }
        };
        match lease {
            LeaseChange::Grant(usable) => {
                n.lease_until = Some(sent + usable.as_millis() as u64);
                n.granted_ms = reply.lease_ms;
            }
            LeaseChange::Drop => n.lease_until = None,
            LeaseChange::Keep => {}
        }
        n.known_primary = reply.primary.as_ref().map(|p| p.name.clone());
        n.told_promote = reply.promote;
        n.failsafe_peers = reply.failsafe_peers.clone();
        let local = Local {
            me: name.to_string(),
            initialized: true,
            running: n.up,
            standby_data: !n.primary_data,
            promoting: n.promoting,
            lease_valid: n.lease_until.is_some_and(|u| t < u),
            lease_file_current: true,
            commit_check_ok: true,
            following: n.following.clone(),
            not_streaming_for: n
                .streaming
                .not_streaming_for(self.base + Duration::from_millis(t)),
            divergence_checked_ago: n.divergence_checked_at.map(|at| Duration::from_millis(t - at)),
            promised_for: n.promise.as_ref().and_then(|p| p.left(now)),
            reinit_done: 0,
            restart_done: 0,
            reload_done: 0,
            // The simulated cluster has no parameters (version 0).
            parameters_version: 0,
        };
        for action in plan::plan(&local, &report, &reply) {
            if !self.execute(name, action, &reply) {
                break;
            }
        }
    }

    /// Carries out one action on the modelled node, as the agent's executor does;
    /// false where the real one returns an error (the rest of the plan is skipped).
    fn execute(&mut self, name: &str, action: Action, reply: &pb::HeartbeatReply) -> bool {
        let t = self.t;
        let lease_valid = self.nodes[name].lease_until.is_some_and(|u| t < u);
        match action {
            Action::InitPrimary | Action::Clone(_) => panic!("{name}: {action:?} on an initialized node"),
            Action::Reinit { .. }
            | Action::Restart { .. }
            | Action::Reload(_)
            | Action::ApplyParameters { .. } => {
                panic!("{name}: {action:?}, which no simulated operator asks for")
            }
            Action::Fence(reason) => {
                self.nodes.get_mut(name).unwrap().up = false;
                self.note(format!("{name} fenced ({reason:?}, epoch {})", reply.epoch));
            }
            Action::StopCleanly => {
                self.nodes.get_mut(name).unwrap().up = false;
                self.note(format!("{name} stopped cleanly (epoch {})", reply.epoch));
            }
            Action::ClearPromoting => self.nodes.get_mut(name).unwrap().promoting = false,
            Action::Rejoin(up) => {
                let p = name_of(&up);
                if !self.answers(&p) {
                    return false;
                }
                self.rewind(name, &p);
                let n = self.nodes.get_mut(name).unwrap();
                n.up = true;
                self.note(format!("{name} rejoined {p}"));
            }
            Action::StartUnderLease(what) => {
                if !lease_valid {
                    return false;
                }
                self.nodes.get_mut(name).unwrap().up = true;
                self.note(format!("{name}: {what}"));
            }
            Action::Promote {
                synchronous_standby_names,
                ..
            } => {
                if !lease_valid {
                    return false;
                }
                self.promote(name, reply.epoch, &synchronous_standby_names);
            }
            Action::SetSyncNames(names) => {
                let n = self.nodes.get_mut(name).unwrap();
                n.waits_for = sync_names::parse(&names);
                n.wait_k = wait_k(&names);
            }
            Action::EnsureSlots(_) | Action::DropSlots(_) => {}
            Action::Follow {
                primary,
                check_divergence,
                ..
            } => {
                let p = name_of(&primary);
                if let Some(check) = check_divergence {
                    match self.rewind_if_diverged(name, &p, check) {
                        None => return false,
                        Some(true) => return true,
                        Some(false) => {}
                    }
                }
                let n = self.nodes.get_mut(name).unwrap();
                n.follows = Some(p);
                n.following = Some(primary);
            }
            Action::CheckDivergence { primary, check } => {
                let p = name_of(&primary);
                if self.rewind_if_diverged(name, &p, check).is_none() {
                    return false;
                }
            }
            Action::StartStandby => self.nodes.get_mut(name).unwrap().up = true,
            Action::Wait { .. } | Action::Unhealthy(_) => return false,
        }
        true
    }

    /// The agent's divergence check against `primary`, as its executor makes it: the
    /// reported position, on the newer of the reported timeline and the newest one
    /// in `pg_wal` (the node's own). Rewinds if diverged; None: the primary did not
    /// answer (an error).
    fn rewind_if_diverged(
        &mut self,
        name: &str,
        primary: &str,
        check: plan::DivergenceCheck,
    ) -> Option<bool> {
        self.nodes.get_mut(name).unwrap().divergence_checked_at = Some(self.t);
        if !self.answers(primary) {
            return None;
        }
        let n = &self.nodes[name];
        let timeline = u64::from(check.timeline).max(n.timeline);
        let lsn = check.lsn.map_or(0, |l| l.0);
        let to = self.nodes[primary].timeline;
        if self.on_history((timeline, lsn), to) {
            return Some(false);
        }
        assert!(
            !self.on_history((n.timeline, n.lsn), to),
            "{name} on its primary's history (timeline {}, lsn {}) taken for diverged: a needless rewind",
            n.timeline,
            n.lsn
        );
        self.rewind(name, primary);
        self.note(format!("{name} went past {primary}'s fork point: rewound"));
        Some(true)
    }

    /// Whether `name`'s Postgres answers (a rewind or a divergence check asks it).
    fn answers(&self, name: &str) -> bool {
        let n = &self.nodes[name];
        n.up && self.t >= n.pg_frozen_until
    }

    /// pg_rewind onto `primary`'s history (or a fresh base backup): a standby of it,
    /// holding what it holds.
    fn rewind(&mut self, name: &str, primary: &str) {
        let (tl, lsn) = (self.nodes[primary].timeline, self.nodes[primary].lsn);
        let n = self.nodes.get_mut(name).unwrap();
        n.primary_data = false;
        n.timeline = tl;
        n.restartpoint_timeline = tl;
        n.lsn = lsn;
        n.follows = Some(primary.to_string());
        n.following = Some(upstream_of(primary));
    }

    fn promote(&mut self, name: &str, epoch: u64, names: &str) {
        let (tl, lsn) = (self.nodes[name].timeline, self.nodes[name].lsn);
        let accepted_loss = self
            .cluster()
            .failover
            .as_ref()
            .is_some_and(|f| f.accept_data_loss);
        if self.strict && !accepted_loss {
            assert!(
                self.holds((tl, lsn), self.acked),
                "Invariant 2: {name} promoted at epoch {epoch} on (timeline {tl}, lsn {lsn}) without the acknowledged write {:?}",
                self.acked
            );
        }
        if let Some(other) = self.promoted.insert(epoch, name.to_string()) {
            assert_eq!(other, name, "Invariant 1: epoch {epoch} promoted twice");
        }
        let new_tl = self.timelines.keys().last().copied().unwrap_or(1).max(1) + 1;
        self.timelines.insert(new_tl, Fork { parent: tl, at: lsn });
        let n = self.nodes.get_mut(name).unwrap();
        n.promoting = true;
        n.primary_data = true;
        n.timeline = new_tl;
        n.follows = None;
        n.following = None;
        n.waits_for = sync_names::parse(names);
        n.wait_k = wait_k(names);
        if !self.holds((new_tl, lsn), self.acked) {
            // Lost as the policy or the operator allowed: what counts from here is
            // the new primary's history.
            self.acked = (new_tl, lsn);
        }
        self.note(format!(
            "{name} promoted at epoch {epoch}: timeline {new_tl} from lsn {lsn}"
        ));
    }

    /// The leader's loop: commit what the decisions call for.
    fn lead(&mut self) {
        if self.outage_until.is_some() {
            return;
        }
        let now = self.now();
        let (command, _) =
            pgquorum_coordinator::leader::step(self.cluster(), &self.leader.reports, now, self.t);
        if let Some(cmd) = command {
            self.commit(cmd);
        }
        let epoch = self.cluster().epoch;
        assert!(epoch >= self.last_epoch, "Invariant 4: epoch went back");
        self.last_epoch = epoch;
    }

    fn commit(&mut self, cmd: Command) {
        self.log_index += 1;
        if self.leader.state.apply(&cmd, self.log_index).is_ok() {
            self.note(format!("committed {}", describe(&cmd)));
        }
    }

    /// An operator's switchover or override, through the admin service's checks.
    fn operator(&mut self) {
        if self.outage_until.is_some() {
            return;
        }
        let target = NAMES[self.rng.below(3) as usize].to_string();
        let switchover = self.rng.chance(70);
        let request = manual::Request {
            to: if switchover && self.rng.chance(50) {
                None
            } else {
                Some(target)
            },
            accept_data_loss: !switchover,
            kind: if switchover {
                manual::Kind::Switchover
            } else {
                manual::Kind::Manual
            },
            actor: "sim".into(),
        };
        let what = format!("operator: {request:?}");
        let reports = self.leader.reports.cluster("main", self.now());
        match manual::hand_over(self.cluster(), &reports, request, self.t) {
            Ok(commands) => {
                self.note(what);
                for c in commands {
                    self.commit(c);
                }
            }
            Err(e) => self.note(format!("{what} refused: {e}")),
        }
    }

    /// Primaries acknowledge writes: `synchronous_commit = local` sessions at once,
    /// others once k standbys they wait for have them. Postgres's commit-time check
    /// refuses a commit once the lease file's deadline has passed.
    fn write(&mut self) {
        let t = self.t;
        let writers: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.up && n.primary_data && t >= n.pg_frozen_until)
            .filter(|(_, n)| n.lease_until.is_some_and(|u| t < u))
            .map(|(k, _)| k.clone())
            .collect();
        for w in writers {
            let lsn = self.nodes[&w].lsn + 1;
            let tl = self.nodes[&w].timeline;
            self.nodes.get_mut(&w).unwrap().lsn = lsn;
            let (waits, k) = (self.nodes[&w].waits_for.clone(), self.nodes[&w].wait_k);
            let mut holders = 0;
            for s in &waits {
                let sn = self.nodes.get_mut(s).unwrap();
                let streaming = sn.up && t >= sn.pg_frozen_until && !sn.primary_data && sn.timeline == tl;
                if streaming && sn.follows.as_deref() == Some(w.as_str()) {
                    sn.lsn = sn.lsn.max(lsn);
                    holders += 1;
                }
            }
            if k > 0 && holders >= k {
                self.acked = (tl, lsn);
            }
        }
    }

    /// Whether the standby `name` can stream from whom it follows: both run, and its
    /// WAL is on that server's history.
    fn streams(&self, name: &str) -> bool {
        let t = self.t;
        let n = &self.nodes[name];
        let Some(p) = &n.follows else { return false };
        let src = &self.nodes[p];
        n.up && t >= n.pg_frozen_until
            && !n.primary_data
            && src.up
            && t >= src.pg_frozen_until
            && self.on_history((n.timeline, n.lsn), src.timeline)
    }

    /// Whether the standby `name` went past the fork point of whom it follows.
    fn diverged(&self, name: &str) -> bool {
        let n = &self.nodes[name];
        n.follows
            .as_ref()
            .is_some_and(|p| !self.on_history((n.timeline, n.lsn), self.nodes[p].timeline))
    }

    /// Standbys stream from whom they follow, if their WAL is on its history.
    fn replicate(&mut self) {
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for name in names {
            if self.streams(&name) {
                let p = self.nodes[&name].follows.clone().expect("follows");
                let src = &self.nodes[&p];
                let (tl, lsn) = (src.timeline, src.lsn);
                let restartpoint = self.rng.chance(5);
                let n = self.nodes.get_mut(&name).unwrap();
                n.timeline = tl;
                n.lsn = n.lsn.max(lsn);
                if restartpoint {
                    n.restartpoint_timeline = tl;
                }
            }
        }
    }

    /// Invariant 1: never two nodes that could acknowledge a write at this instant.
    fn check_one_writer(&self) {
        let t = self.t;
        let writers: Vec<&String> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.up && n.primary_data && n.lease_until.is_some_and(|u| t < u))
            .map(|(k, _)| k)
            .collect();
        assert!(
            writers.len() <= 1,
            "Invariant 1: {writers:?} could all acknowledge a write at t={t}"
        );
    }

    /// Invariant 3: the committed primary waits only for committed sync standbys.
    fn check_sync_set(&self) {
        let c = self.cluster();
        if let Some(p) = &c.primary {
            let n = &self.nodes[p];
            if n.up && n.primary_data {
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
        let victim = NAMES[self.rng.below(3) as usize].to_string();
        let t = self.t;
        let pause = 200 + self.rng.below(3000);
        let n = self.nodes.get_mut(&victim).unwrap();
        let what = match self.rng.below(16) {
            0 => {
                n.up = false;
                n.agent_alive = false;
                n.guard_alive = false;
                n.in_flight = None;
                "host killed"
            }
            1 => {
                n.up = false;
                "postmaster killed"
            }
            2 => {
                n.frozen_until = t + pause;
                "agent frozen"
            }
            3 => {
                n.restart_agent();
                n.frozen_until = 0;
                "agent restarted"
            }
            4 => {
                n.agent_alive = false;
                n.in_flight = None;
                "agent killed, its postgres left running"
            }
            5 => {
                n.agent_alive = false;
                n.in_flight = None;
                n.pg_frozen_until = t + 200 + pause;
                "agent killed, its postgres frozen"
            }
            6 => {
                n.pg_frozen_until = t + pause;
                "postgres frozen"
            }
            7 => {
                n.frozen_until = t + pause;
                n.pg_frozen_until = t + pause;
                "whole host frozen"
            }
            8 => {
                n.cut_until = t + pause;
                "agent cut from the coordinators"
            }
            9 => {
                self.redeliver(&victim);
                return;
            }
            10 => {
                self.replace_leader();
                return;
            }
            12 => {
                n.peers_cut_until = t + pause;
                "agent cut from the other agents"
            }
            14 => {
                // A region cut off from the coordinators: every agent but one (or all),
                // each healing at its own moment.
                let spared = self.rng.below(4) as usize;
                for (i, name) in NAMES.iter().enumerate() {
                    if i != spared {
                        let until = t + pause + self.rng.below(1500);
                        self.nodes.get_mut(*name).unwrap().cut_until = until;
                    }
                }
                self.note(format!(
                    "fault: every agent but {:?} cut from the coordinators",
                    NAMES.get(spared)
                ));
                return;
            }
            13 => {
                let until = t + 500 + self.rng.below(5000);
                self.outage_until = Some(self.outage_until.map_or(until, |u| u.max(until)));
                self.note(format!("fault: no coordinator leader until t={until}"));
                return;
            }
            11 => {
                self.operator();
                return;
            }
            _ => "nothing",
        };
        self.note(format!("fault: {victim} {what}"));
    }

    /// A new Raft leader with an empty report table; the old one keeps answering from
    /// its state for a while, not knowing it was deposed.
    fn replace_leader(&mut self) {
        let term = self.leader.term + 1;
        let now = self.now();
        let reports = Reports::new(grant_window(), now);
        reports.lead(term, now);
        let state = self.leader.state.clone();
        let old = std::mem::replace(&mut self.leader, Leader { term, state, reports });
        let until = self.t + self.rng.below(1500);
        self.deposed = Some((old, until));
        self.note(format!(
            "Raft leader replaced (term {term}); the old one answers until t={until}"
        ));
    }

    /// A leader with an empty report table, and no deposed one answering.
    fn replace_leader_afresh(&mut self) {
        let term = self.leader.term + 1;
        let now = self.now();
        let reports = Reports::new(grant_window(), now);
        reports.lead(term, now);
        self.leader = Leader {
            term,
            state: self.leader.state.clone(),
            reports,
        };
        self.deposed = None;
        self.note(format!("coordinators back: leader of term {term} starts afresh"));
    }

    fn step(&mut self, faults: bool) {
        self.t += 10 + self.rng.below(140);
        if self.outage_until.is_some_and(|u| self.t >= u) {
            // Back: a new leader, or the old one thawed; either starts afresh.
            self.outage_until = None;
            self.replace_leader_afresh();
        }
        // Leases are enforced first, by the guard (which outlives the agent) or the
        // agent's own timer: a primary's data runs only under a lease.
        let t = self.t;
        for n in self.nodes.values_mut() {
            let active = n.agent_alive && t >= n.frozen_until;
            let enforced = n.guard_alive || active;
            let primary = n.primary_data || n.promoting;
            if enforced && primary && n.up && n.lease_until.is_none_or(|u| t >= u) {
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
        for name in NAMES {
            let n = &self.nodes[name];
            if !n.agent_alive || self.t < n.frozen_until || self.deliver(name) {
                continue;
            }
            if self.rng.chance(if faults { 85 } else { 100 }) {
                self.heartbeat(name);
            }
        }
        self.lead();
        if self.rng.chance(60) {
            self.write();
        }
        if self.rng.chance(70) {
            self.replicate();
        }
        self.check_one_writer();
        self.check_sync_set();
    }

    /// After healing: one running primary, the committed one, and every other node a
    /// running standby of it on its history.
    fn check_healed(&self) {
        let c = self.cluster();
        let primary = c
            .primary
            .clone()
            .unwrap_or_else(|| panic!("no primary after healing: {:?}", c.failover));
        let running: Vec<&String> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.up && n.primary_data)
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            running,
            [&primary],
            "exactly the committed primary runs as primary after healing"
        );
        let p = &self.nodes[&primary];
        for (name, n) in &self.nodes {
            if *name != primary {
                assert!(
                    n.up && n.follows.as_deref() == Some(primary.as_str()) && n.timeline == p.timeline,
                    "{name} is not a running standby of {primary} on timeline {} after healing: {n:?}",
                    p.timeline
                );
            }
        }
    }
}

fn lsn_text(lsn: u64) -> String {
    format!("0/{lsn:X}")
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
            kind,
            candidate,
            ..
        } => format!("StartFailover({kind}, {old_primary}, from {from_epoch}, to {candidate:?})"),
        Command::ChooseCandidate {
            candidate, fenced_by, ..
        } => format!("ChooseCandidate({candidate}, {fenced_by})"),
        Command::CompletePromotion {
            primary, to_epoch, ..
        } => format!("CompletePromotion({primary}, {to_epoch})"),
        Command::SetSyncSet { sync_set, .. } => format!("SetSyncSet({sync_set:?})"),
        Command::PublishRoutes { .. } => "PublishRoutes".into(),
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
            if !n.agent_alive {
                n.restart_agent();
            }
            n.frozen_until = 0;
            n.pg_frozen_until = 0;
            n.cut_until = 0;
            n.peers_cut_until = 0;
        }
        sim.deposed = None;
        if sim.outage_until.is_some() {
            sim.outage_until = Some(sim.t);
        }
        for _ in 0..400 {
            sim.step(false);
        }
        sim.check_healed();
    }));
    if let Err(e) = outcome {
        let tail: Vec<&String> = sim
            .trace
            .iter()
            .rev()
            .take(50)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        eprintln!("seed {seed} failed ({}); last events:", sim.trace[0]);
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
    // Seeds are independent: shared out among the cores.
    let next = std::sync::atomic::AtomicU64::new(0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let seed = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if seed >= runs {
                    break;
                }
                if std::panic::catch_unwind(|| run(seed)).is_err() {
                    // The others stop too: the first failure is the one to read.
                    next.store(runs, std::sync::atomic::Ordering::Relaxed);
                    panic!("seed {seed} failed");
                }
            });
        }
    });
}
