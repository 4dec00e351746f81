//! The agent's loop: check the lease, observe, report, act on the reply.
//!
//! Every heartbeat interval the agent reads its Postgres (and, on a standby, probes
//! the primary), sends the report to the coordinators and carries out what the reply
//! calls for. What that is, [`crate::plan`] decides without I/O; this module observes,
//! asks it and executes its [`Action`]s.
//!
//! **Leases.** A primary's agent holds a lease counted from when it *sent* the
//! heartbeat that earned it, less a margin ([`pgquorum_client::lease::margin`]), so it
//! runs out before the coordinators count it as over. Only a grant extends it: a reply
//! without one leaves the old deadline to run out. Each deadline goes to the lease
//! file, where the guard ([`crate::guard`], its own process) enforces it on its own
//! clock, whatever this loop is doing and whether or not this process still lives; the
//! agent also checks it first thing every round. No heartbeat waits past the lease
//! (one slow coordinator costs one short attempt, then all are asked at once), and
//! nothing is started or promoted as primary on a lease that ran out.
//!
//! **Failsafe.** A primary whose heartbeats no coordinator leader answers gives up on
//! them halfway through its lease and asks the standbys that could replace it for
//! promises ([`crate::failsafe`]); with every one it writes on until the earliest ends,
//! round after round, until a leader answers again. A standby answers from what its
//! own loop last saw ([`crate::peer::Book`]), and while a promise it gave runs it
//! reports it and refuses to be promoted.
//!
//! **Epochs.** The agent persists the newest epoch it has seen before acting on it and
//! ignores any reply from an older one.
//!
//! Errors are reported and retried on the next round, never fatal: a coordinator
//! outage, a primary still starting or an unknown cluster all heal by themselves or by
//! an operator's action, and the agent must be there when they do. Repeated errors are
//! logged when they change, not every round.

use std::time::{Duration, Instant};

use pgquorum_client::{pb, ClientError, Coordinators, Timeouts};
use tracing::{info, warn};

use crate::config::AgentConfig;
use crate::error::{Error, Result};
use crate::failsafe::{self, Standing};
use crate::guard::{self, GuardFiles};
use crate::peer::{Book, Peers, SharedBook};
use crate::plan::{self, Action, FenceReason, LeaseChange, Local, Reception};
use crate::postgres::ctl::{PostgresCtl, Upstream};
use crate::postgres::observe::Observer;
use crate::postgres::probe::PrimaryProbe;
use crate::state::{AgentState, StateFile};

pub struct Agent {
    config: AgentConfig,
    coordinators: Coordinators,
    ctl: PostgresCtl,
    observer: Observer,
    probe: PrimaryProbe,
    state_file: StateFile,
    state: AgentState,
    interval: Duration,
    /// This node's primary lease; None: it holds none.
    lease: Option<Lease>,
    /// Tells [`lease_timer`] each new deadline.
    lease_deadline: tokio::sync::watch::Sender<Option<Instant>>,
    /// The guard's files (lease deadline, pid).
    guard: GuardFiles,
    /// The primary published in the last reply.
    primary: Option<(String, Upstream)>,
    /// The upstream this standby's configuration points at, once written.
    following: Option<Upstream>,
    /// The last problem logged, to log each one once rather than every round.
    last_problem: Option<String>,
    /// `reply_mark` of the last reply, echoed in the next observation's report.
    reply_mark: u64,
    /// Random per process, and the number of the next report within it.
    incarnation: u64,
    /// The postmaster found running with the commit-time lease check loaded.
    commit_check_verified: Option<i32>,
    /// The postmaster last checked for it (once per postmaster).
    commit_check_seen: Option<i32>,
    seq: u64,
    /// Whether the lease file holds `lease` (written by this process, or found so).
    lease_file_synced: bool,
    /// Whether this running standby streams, over time.
    streaming: plan::StreamWatch,
    /// When this standby was last checked for divergence.
    divergence_checked_at: Option<Instant>,
    /// The promise this node gave (as a standby), and what it judges requests by.
    book: SharedBook,
    /// Channels to the standbys' agents, for asking promises (as a primary).
    peers: Peers,
    /// Whose promises this primary needs, from its last lease grant; and that grant's
    /// length as the coordinators count it.
    failsafe_peers: Vec<pb::FailsafePeer>,
    granted_ms: u64,
    /// The lease now rests on promises, not on a grant.
    failsafe: bool,
    /// When a coordinator leader last answered.
    leader_answered_at: Option<Instant>,
    /// What the HTTP endpoints answer from, current as of the last round.
    view: crate::http::SharedView,
    /// The round changed what Postgres is (a clean stop, a promotion): report it at
    /// once rather than after the interval, the next step of a handover waits for it.
    report_now: bool,
    /// What Postgres was at the last round, for the hooks (None: not looked yet).
    seen: Option<crate::hooks::Seen>,
    /// Slots of removed members this agent has dropped.
    slots_dropped: std::collections::BTreeSet<String>,
    /// Runs the operator's hooks, in order.
    hooks: crate::hooks::Runner,
    /// The version of the cluster's parameters written to this node's configuration
    /// (0 at start: the first reply's are written again), and when, until the
    /// server's settings were read once the reload had time to take effect.
    parameters_written: u64,
    parameters_written_at: Option<Instant>,
    /// The version reported: written, and the settings read since it took effect.
    parameters_version: u64,
    /// What pg_settings / pg_file_settings last said, and when they were read.
    settings: crate::postgres::observe::Settings,
    settings_checked_at: Option<Instant>,
}

/// How often a running server's pending-restart parameters and refused settings are
/// read again (and after every change).
const SETTINGS_EVERY: Duration = Duration::from_secs(5);

/// How long after a reload the server's settings are read to report it applied: the
/// postmaster handles the reload signal, then passes it to every backend, the
/// agent's own session included, in its own time.
const RELOAD_SETTLES: Duration = Duration::from_millis(500);

/// A primary lease's deadline (already less the margin), on this process's clock and on
/// the guard's (`CLOCK_BOOTTIME`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Lease {
    until: Instant,
    until_boot_ns: u64,
}

impl Lease {
    fn left(&self, now: Instant) -> Duration {
        self.until.saturating_duration_since(now)
    }
}

/// Fences at the lease's deadline, on its own timer: the agent's rounds can be held up
/// (a slow heartbeat, a Postgres that does not answer) and the guard may be dead or
/// stopped, so the deadline is enforced here too, to the millisecond, whatever the
/// loop is doing. Like the guard, it leaves a standby's data alone (not one being
/// promoted), but once a lease has run out or been taken away it keeps looking, every
/// 10 ms until a new lease: a promotion can finish at any time. Before the first lease
/// of this process it does nothing: a running primary may hold a lease granted to the
/// agent before this one, which the guard enforces from the lease file. (A frozen
/// agent's timer is frozen too: that is what the guard is for.)
async fn lease_timer(mut deadlines: tokio::sync::watch::Receiver<Option<Instant>>, files: GuardFiles) {
    let mut armed = false;
    loop {
        let deadline = *deadlines.borrow_and_update();
        match deadline {
            None if !armed => {
                if deadlines.changed().await.is_err() {
                    return;
                }
                continue;
            }
            None => {}
            Some(until) => {
                armed = true;
                tokio::select! {
                    changed = deadlines.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        continue;
                    }
                    _ = tokio::time::sleep_until(until.into()) => {}
                }
            }
        }
        // Run out or taken away: fence whatever runs as a primary until a new lease.
        loop {
            let standby = files.standby_data();
            if let Some(pm) = crate::postgres::ctl::postmaster_pid(&files.data_dir).filter(|_| !standby) {
                warn!(
                    postmaster = pm,
                    "no primary lease: killing postgres (fence, lease timer)"
                );
                crate::postgres::ctl::kill_instance(pm);
            }
            tokio::select! {
                changed = deadlines.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    break;
                }
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
    }
}

/// How long one coordinator may take to answer a heartbeat before all are asked.
fn attempt_timeout(interval: Duration) -> Duration {
    (interval * 4).clamp(Duration::from_millis(150), Duration::from_millis(500))
}

/// How long asking the primary whether this standby diverged may take.
const DIVERGENCE_CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a primary waits for its standbys' promises at most.
const PROMISE_TIMEOUT: Duration = Duration::from_millis(300);
/// Below this much lease left, no point in asking.
const PROMISE_MIN: Duration = Duration::from_millis(20);
/// How many times a round asks for promises at most.
const PROMISE_TRIES: u32 = 2;
/// Between two asks for promises when one was missing.
const PROMISE_RETRY: Duration = Duration::from_millis(20);

/// A heartbeat's whole budget when nothing is at stake.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(2);

impl Agent {
    pub fn new(config: AgentConfig) -> Result<Agent> {
        let timeouts = Timeouts {
            connect: Duration::from_millis(300),
            request: Duration::from_secs(2),
            overall: Duration::from_secs(2),
            unreachable: None,
        };
        let coordinators =
            Coordinators::new(config.coordinators.clone(), timeouts).map_err(|e| Error::Config {
                path: "coordinators".into(),
                message: e.to_string(),
            })?;
        let ctl = PostgresCtl::new(config.postgres.clone(), &config.name)?;
        // Before the state file is written next to the data directory.
        ctl.prepare_dirs()?;
        let observer = Observer::new(config.postgres.clone());
        let probe = PrimaryProbe::new(config.postgres.clone());
        let state_file = StateFile::next_to(&config.postgres.data_dir);
        let mut state = state_file.load()?;
        // Persisted before the first report: a later start must take a larger one.
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        state.incarnation = state.next_incarnation(unix_ms);
        if let Err(e) = state_file.save(&state) {
            // Not fatal: a full or read-only disk must not keep a primary's agent from
            // renewing its lease. The next start may then reuse a number, which the
            // coordinators take after the old one's silence.
            warn!("cannot persist this agent's incarnation ({e}); going on without");
        }
        let incarnation = state.incarnation;
        let interval = Duration::from_millis(config.heartbeat_interval_ms);
        let guard = GuardFiles::next_to(&config.postgres.data_dir);
        let book = Book::open(&config.postgres.data_dir)?;
        let config_hooks = config.hooks.clone();
        Ok(Agent {
            config,
            coordinators,
            ctl,
            observer,
            probe,
            state_file,
            state,
            interval,
            lease: None,
            lease_deadline: tokio::sync::watch::Sender::new(None),
            guard,
            primary: None,
            following: None,
            last_problem: None,
            reply_mark: 0,
            incarnation,
            commit_check_verified: None,
            commit_check_seen: None,
            seq: 0,
            lease_file_synced: false,
            streaming: plan::StreamWatch::default(),
            divergence_checked_at: None,
            book,
            peers: Peers::default(),
            failsafe_peers: Vec::new(),
            granted_ms: 0,
            failsafe: false,
            leader_answered_at: None,
            view: Default::default(),
            report_now: false,
            seen: None,
            slots_dropped: Default::default(),
            hooks: crate::hooks::Runner::new(config_hooks),
            parameters_written: 0,
            parameters_written_at: None,
            parameters_version: 0,
            settings: Default::default(),
            settings_checked_at: None,
        })
    }

    fn problem(&mut self, what: String) {
        if self.last_problem.as_ref() != Some(&what) {
            warn!("{what}");
            self.last_problem = Some(what);
        }
    }

    fn resolved(&mut self) {
        if let Some(p) = self.last_problem.take() {
            info!("resolved: {p}");
        }
    }

    /// Runs until `shutdown` completes. Leaves Postgres as it is: stopping the agent
    /// must not stop the database. Fails only at the start, when its PeerService
    /// cannot listen.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        let peer_server = match &self.config.peer_address {
            Some(addr) => {
                let server = crate::peer::bind(addr, self.book.clone()).await?;
                Some(tokio::spawn(async move {
                    if let Err(e) = server.await {
                        warn!("the failsafe's PeerService stopped: {e}");
                    }
                }))
            }
            None => None,
        };
        let http_server = match &self.config.http {
            Some(addr) => Some(self.serve_http(addr).await?),
            None => None,
        };
        // Until a coordinator answers, promises are judged by what was persisted.
        self.book().set_standing(Standing {
            cluster: self.config.cluster.clone(),
            me: self.config.name.clone(),
            epoch: self.state.epoch,
            primary: Some(self.state.primary.clone()).filter(|p| !p.is_empty()),
            being_promoted: self.guard.promoting.exists(),
            leader_answered_at: None,
            reach_window: attempt_timeout(self.interval),
        });
        info!(cluster = %self.config.cluster, name = %self.config.name, epoch = self.state.epoch, "agent started");
        let timer = tokio::spawn(lease_timer(self.lease_deadline.subscribe(), self.guard.clone()));
        tokio::pin!(shutdown);
        loop {
            let started = Instant::now();
            let epoch = self.state.epoch;
            self.round().await;
            // After the round: a first start gets its lease before the guard looks.
            self.ensure_guard();
            self.publish_view();
            // A new epoch means a failover in flight: report again at once, since the
            // choice of a candidate waits for observations made after this reply; so
            // does a clean stop or a promotion (the handover's next step waits for it).
            let pause = if self.state.epoch > epoch || std::mem::take(&mut self.report_now) {
                Duration::ZERO
            } else {
                self.interval.saturating_sub(started.elapsed())
            };
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        timer.abort();
        for server in [peer_server, http_server].into_iter().flatten() {
            server.abort();
        }
        info!("agent stopped; postgres left as it is");
        Ok(())
    }

    /// Listens on `addr` and serves the health endpoints and metrics from [`Self::view`].
    async fn serve_http(&self, addr: &str) -> Result<tokio::task::JoinHandle<()>> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::Config {
                path: "http".into(),
                message: format!("cannot listen on {addr}: {e}"),
            })?;
        let metrics = crate::metrics::install().unwrap_or_else(|| {
            // Another recorder in this process: serve an empty page rather than fail.
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .build_recorder()
                .handle()
        });
        let view = self.view.clone();
        info!(%addr, "serving health endpoints and /metrics");
        Ok(tokio::spawn(async move {
            if let Err(e) = crate::http::serve(listener, view, metrics).await {
                warn!("the HTTP endpoints stopped: {e}");
            }
        }))
    }

    /// Hands the HTTP endpoints and metrics what this round left.
    fn publish_view(&mut self) {
        let mut view = self.view.lock().expect("view lock poisoned");
        view.name.clone_from(&self.config.name);
        view.cluster.clone_from(&self.config.cluster);
        view.epoch = self.state.epoch;
        view.is_epoch_primary = self.state.primary == self.config.name;
        view.lease_until = self.lease.map(|l| l.until);
        view.failsafe = self.failsafe;
        view.leader_answered_at = self.leader_answered_at;
        crate::metrics::after_round(&view);
        let now = crate::hooks::Seen {
            up: view.postgres_up,
            role: view.role.clone(),
        };
        drop(view);
        if !crate::hooks::tells(&now) {
            return;
        }
        for (event, role) in crate::hooks::events(self.seen.as_ref(), &now) {
            info!(event = event.as_str(), %role, epoch = self.state.epoch, "node event");
            self.hooks.fire(
                event,
                &role,
                &self.config.name,
                &self.config.cluster,
                self.state.epoch,
            );
        }
        self.seen = Some(now);
    }

    /// Whether this node holds a primary lease that has not run out.
    fn lease_valid(&self) -> bool {
        self.lease
            .is_some_and(|l| l.left(Instant::now()) > Duration::ZERO)
    }

    /// Replaces the lease and tells the guard (a deadline it cannot read counts as
    /// none, so a failed write fences rather than extends).
    /// The first call of a process writes the file whatever it holds: "no lease" from
    /// a new agent must also reach a deadline an earlier one left there.
    fn set_lease(&mut self, lease: Option<Lease>) {
        if self.lease == lease && self.lease_file_synced {
            return;
        }
        if self.lease != lease {
            self.lease = lease;
            self.lease_deadline.send_replace(lease.map(|l| l.until));
        }
        let deadline = lease.map_or(0, |l| l.until_boot_ns);
        self.lease_file_synced = match guard::write_deadline(&self.guard.lease, deadline) {
            Ok(()) => true,
            Err(e) => {
                self.problem(format!(
                    "cannot write the lease file {}: {e}",
                    self.guard.lease.display()
                ));
                false
            }
        };
    }

    /// Makes sure a guard enforces the lease file.
    fn ensure_guard(&mut self) {
        if let Err(e) = guard::ensure_running(&self.guard) {
            self.problem(format!("cannot start the lease guard: {e}"));
        }
    }

    /// Stops a primary whose lease has run out (the guard does too, on its own).
    /// Returns whether it fenced.
    async fn enforce_lease(&mut self) -> bool {
        let Some(lease) = self.lease else {
            return false;
        };
        if lease.left(Instant::now()) > Duration::ZERO
            || self.ctl.is_standby_data()
            || self.ctl.running_pid().is_none()
        {
            return false;
        }
        warn!("primary lease ran out without renewal: stopping postgres (fence)");
        crate::metrics::fenced("lease_expired");
        self.set_lease(None);
        match self.ctl.fence().await {
            Ok(()) => true,
            Err(e) => {
                self.problem(format!("fencing after lease expiry failed: {e}"));
                false
            }
        }
    }

    async fn observe(&mut self) -> pb::NodeReport {
        // Taken before observing: the observation below is younger than that reply.
        let reply_mark_seen = self.reply_mark;
        if !self.ctl.initialized() {
            return pb::NodeReport {
                initializing: true,
                role: "stopped".into(),
                error: "not initialized yet".into(),
                epoch: self.state.epoch,
                reply_mark_seen,
                ..Default::default()
            };
        }
        // A hung server must not silence the agent: observation gets a bounded share
        // of the round, so heartbeats keep flowing and say it hangs.
        let budget = (self.interval * 3).clamp(Duration::from_millis(300), Duration::from_secs(1));
        let running = self.ctl.running_pid().is_some();
        if !running {
            // A postmaster killed alone leaves backends that can still acknowledge
            // the commit they were doing: "stopped" only once none is left.
            let left = crate::postgres::ctl::kill_leftovers(&self.config.postgres.data_dir);
            if left > 0 {
                warn!(left, "postmaster gone, its processes not: killed them");
                return pb::NodeReport {
                    postgres_up: false,
                    role: "unknown".into(),
                    error: format!("killed {left} leftover processes of a dead postmaster"),
                    epoch: self.state.epoch,
                    reply_mark_seen,
                    ..Default::default()
                };
            }
        }
        let probe_target = match &self.primary {
            Some((name, up)) if name != &self.config.name => Some(up.clone()),
            _ => None,
        };
        let (observed, probe_age) = tokio::join!(
            tokio::time::timeout(budget, self.observer.observe(running)),
            self.probe.check(probe_target.as_ref())
        );
        let mut report = match observed {
            Ok(report) => report,
            Err(_) => {
                self.observer.reset();
                pb::NodeReport {
                    postgres_up: false,
                    role: "unknown".into(),
                    error: format!(
                        "postgres runs but did not answer within {} ms",
                        budget.as_millis()
                    ),
                    ..Default::default()
                }
            }
        };
        report.primary_probe_age_ms = probe_age;
        report.epoch = self.state.epoch;
        report.data_is_standby = self.ctl.is_standby_data();
        report.reply_mark_seen = reply_mark_seen;
        report.reinit_done = self.state.reinit_done;
        report.restart_done = self.state.restart_done;
        report.reload_done = self.state.reload_done;
        // What waits for a restart, and what Postgres refused: re-read now and then
        // (pg_file_settings parses the files), after a restart, and once a reload of
        // new parameters has taken effect (which then counts as applied).
        let settled = self
            .parameters_written_at
            .filter(|at| at.elapsed() >= RELOAD_SETTLES);
        let due = self
            .settings_checked_at
            .is_none_or(|at| at.elapsed() >= SETTINGS_EVERY)
            || settled.is_some();
        if report.postgres_up && due {
            // Within the observation's share of the round: a slow server must not
            // hold up the heartbeat that renews the lease.
            let budget = (self.interval * 2).clamp(Duration::from_millis(100), Duration::from_millis(500));
            match tokio::time::timeout(budget, self.observer.settings()).await {
                Err(_) => {
                    self.observer.reset();
                    warn!(
                        "reading pg_settings took over {} ms; next round",
                        budget.as_millis()
                    );
                }
                Ok(Ok(seen)) => {
                    self.settings = seen;
                    if settled.is_some() {
                        self.parameters_version = self.parameters_written;
                        self.parameters_written_at = None;
                    }
                }
                Ok(Err(e)) => warn!("reading pg_settings: {e}"),
            }
            self.settings_checked_at = Some(Instant::now());
        }
        report.parameters_version = self.parameters_version;
        report.pending_restart = self.settings.pending_restart.clone();
        report.parameter_errors = self.settings.errors.clone();
        report
    }

    async fn round(&mut self) {
        // First, before anything else (this may be the first instant after a freeze).
        self.enforce_lease().await;
        let observed_at = Instant::now();
        let mut report = self.observe().await;
        // The lease counts from here (no later than the send) and the report says
        // how old its observation is by then.
        let sent_at = Instant::now();
        let sent_boot_ns = guard::boottime_ns();
        self.streaming.observe(
            (report.role == "standby").then_some(report.wal_receiver_status == "streaming"),
            observed_at,
        );
        report.observed_ago_ms = sent_at.duration_since(observed_at).as_millis() as u64;
        {
            let mut view = self.view.lock().expect("view lock poisoned");
            view.postgres_up = report.postgres_up;
            view.role.clone_from(&report.role);
        }
        self.seq += 1;
        report.incarnation = self.incarnation;
        report.seq = self.seq;
        report.failsafe = self.failsafe;
        report.failsafe_roster = self.failsafe_peers.iter().map(|p| p.name.clone()).collect();
        report.promise = self.book().held(sent_at).map(|(p, left)| pb::PromiseHeld {
            primary: p.primary,
            epoch: p.epoch,
            left_ms: left.as_millis() as u64,
        });
        let request = pb::HeartbeatRequest {
            cluster: self.config.cluster.clone(),
            member: Some(self.config.member_spec()),
            report: Some(report.clone()),
            forwarded: false,
        };
        // A lease holder waits no longer than its lease: past it, it is fenced anyway.
        // One that could ask for promises waits only until half a lease is left (so a
        // round on promises asks about every half lease; a coordinator back after an
        // outage gets that long to confirm its leadership and grant).
        let can_ask =
            !self.failsafe_peers.is_empty() && self.failsafe_peers.iter().all(|p| !p.agent_addr.is_empty());
        let reserve = if can_ask {
            Duration::from_millis(self.granted_ms / 2)
        } else {
            Duration::ZERO
        };
        let overall = self
            .lease
            .map_or(HEARTBEAT_TIMEOUT, |l| {
                l.left(sent_at).saturating_sub(reserve).min(HEARTBEAT_TIMEOUT)
            })
            .max(attempt_timeout(self.interval));
        let reply = match self
            .coordinators
            .heartbeat_within(request, attempt_timeout(self.interval), overall)
            .await
        {
            Ok(r) => r,
            Err(ClientError::Rejected { code, message }) => {
                // A final refusal comes from the leader (e.g. a node held since the
                // group was re-formed): this node reaches one, so it gives no failsafe
                // promise (a primary its peers still reach must not go on writing).
                let now = Instant::now();
                self.leader_answered_at = Some(now);
                self.book().leader_answered(now);
                let hint = if message.contains("does not exist") {
                    format!(
                        "; create it with `pgquorum cluster create {}`",
                        self.config.cluster
                    )
                } else {
                    String::new()
                };
                self.problem(format!(
                    "coordinators refused the heartbeat ({code:?}): {message}{hint}"
                ));
                return;
            }
            Err(e) => {
                crate::metrics::heartbeat_failed();
                self.problem(format!("cannot reach the coordinators: {e}"));
                self.keep_writing_on_promises().await;
                return;
            }
        };
        self.leader_answered_at = Some(Instant::now());
        self.reply_mark = reply.reply_mark;
        {
            let mut view = self.view.lock().expect("view lock poisoned");
            view.sync_state.clone_from(&reply.sync_state);
            view.lag_ms = reply.lag_ms;
            view.drained = reply.drained;
            view.maintenance = reply.maintenance;
        }
        let lease = match plan::receive(&self.config.name, self.state.epoch, &reply) {
            Reception::Stale {
                reply_epoch,
                seen_epoch,
            } => {
                return self.problem(format!(
                    "ignoring a reply for epoch {reply_epoch} older than epoch {seen_epoch} already seen (stale coordinator)"
                ))
            }
            Reception::Accept { new_epoch, lease } => {
                let primary = reply.primary.as_ref().map(|p| p.name.clone()).unwrap_or_default();
                if new_epoch.is_some() || primary != self.state.primary {
                    let epoch = new_epoch.unwrap_or(self.state.epoch);
                    let next = AgentState {
                        epoch,
                        primary,
                        ..self.state.clone()
                    };
                    if let Err(e) = self.state_file.save(&next) {
                        return self.problem(format!("cannot persist epoch {epoch}: {e}; not acting on it"));
                    }
                    if new_epoch.is_some() {
                        info!(from = self.state.epoch, to = epoch, "new epoch");
                    }
                    self.state = next;
                }
                lease
            }
        };
        if reply.heartbeat_interval_ms >= 10 {
            self.interval = Duration::from_millis(reply.heartbeat_interval_ms);
        }
        match lease {
            LeaseChange::Grant(usable) => {
                if self.failsafe {
                    info!("failsafe over: a coordinator leader answers again and granted the lease");
                    self.failsafe = false;
                }
                self.granted_ms = reply.lease_ms;
                self.set_lease(Some(Lease {
                    until: sent_at + usable,
                    until_boot_ns: sent_boot_ns + usable.as_nanos() as u64,
                }))
            }
            LeaseChange::Drop => self.set_lease(None),
            LeaseChange::Keep => {}
        }
        self.failsafe_peers = reply.failsafe_peers.clone();
        self.primary = reply
            .primary
            .as_ref()
            .map(|p| (p.name.clone(), plan::upstream(p)));
        // Reported once per postmaster; a promotion is refused by the plan.
        if self.ctl.initialized() {
            self.verify_commit_check(&report).await;
        }
        // Before planning: a node told to promote gives no promise from here on, and
        // one given before this point is in `local`, so the plan waits for it to end.
        self.publish_standing(&reply);
        let local = self.local();
        let mut result = Ok(());
        for action in plan::plan(&local, &report, &reply) {
            result = self.execute(action, &reply).await;
            if result.is_err() {
                break;
            }
        }
        match result {
            Ok(()) => self.resolved(),
            Err(e) => self.problem(e.to_string()),
        }
        // What the actions made of the data counts from now on.
        self.publish_standing(&reply);
    }

    /// Tells the PeerService what this node now is, for judging promises.
    fn publish_standing(&self, reply: &pb::HeartbeatReply) {
        let standing = Standing {
            cluster: self.config.cluster.clone(),
            me: self.config.name.clone(),
            epoch: self.state.epoch,
            primary: self.primary.as_ref().map(|(name, _)| name.clone()),
            being_promoted: self.guard.promoting.exists() || reply.promote,
            leader_answered_at: self.leader_answered_at,
            reach_window: attempt_timeout(self.interval),
        };
        self.book().set_standing(standing);
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().expect("promise book lock poisoned")
    }

    /// The failsafe, as a primary no coordinator leader answered: asks every standby
    /// that could replace it for a promise and, with all of them, extends the lease to
    /// the earliest one's end. Without, the lease runs out as granted.
    async fn keep_writing_on_promises(&mut self) {
        if self.failsafe_peers.is_empty() {
            return;
        }
        let request = pb::PromiseRequest {
            cluster: self.config.cluster.clone(),
            primary: self.config.name.clone(),
            epoch: self.state.epoch,
            for_ms: self.granted_ms,
            // Each peer's own name, filled in per peer (`Peers::ask_all`).
            member: String::new(),
        };
        let peers = self.failsafe_peers.clone();
        // Asked once more at once after an answer that did not come (a slow disk, a
        // lost packet), while the lease leaves time; then back to heartbeats, which the
        // next round tries again. Not after a "no": a standby that reaches a leader
        // says so again, and a heartbeat is the thing to retry (chaos: a 300 ms blip,
        // the primary's heartbeat stalled behind a TCP retransmission, and it asked
        // over and over until its lease ended).
        let mut tries = 0;
        let (asked_at, asked_boot_ns, usable, lease) = loop {
            tries += 1;
            let Some(lease) = self.lease else {
                return;
            };
            let asked_at = Instant::now();
            let asked_boot_ns = guard::boottime_ns();
            let within = lease.left(asked_at).min(PROMISE_TIMEOUT);
            if within < PROMISE_MIN {
                return;
            }
            let answers = self.peers.ask_all(&peers, &request, within).await;
            if let Some(usable) = failsafe::extension(&answers.granted) {
                break (asked_at, asked_boot_ns, usable, lease);
            }
            self.problem(format!(
                "failsafe: not every other member promised ({}); the lease ends as granted unless they do",
                answers.refusals.join("; ")
            ));
            if answers.said_no || tries >= PROMISE_TRIES {
                return;
            }
            tokio::time::sleep(PROMISE_RETRY).await;
        };
        if asked_at + usable <= lease.until {
            return;
        }
        if !self.failsafe {
            warn!(
                epoch = self.state.epoch,
                standbys = %peers.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(","),
                "failsafe: no coordinator leader answers; writing on the standbys' promises"
            );
            self.failsafe = true;
        }
        self.set_lease(Some(Lease {
            until: asked_at + usable,
            until_boot_ns: asked_boot_ns + usable.as_nanos() as u64,
        }));
    }

    /// What the planner needs to know of this node, read now.
    fn local(&self) -> Local {
        let pid = self.ctl.running_pid();
        Local {
            me: self.config.name.clone(),
            initialized: self.ctl.initialized(),
            running: pid.is_some(),
            standby_data: self.ctl.is_standby_data(),
            promoting: self.guard.promoting.exists(),
            lease_valid: self.lease_valid(),
            lease_file_current: guard::read_deadline(&self.guard.lease)
                == self.lease.map(|l| l.until_boot_ns),
            commit_check_ok: !self.config.postgres.commit_check
                || (pid.is_some() && self.commit_check_verified == pid),
            following: self.following.clone(),
            not_streaming_for: self.streaming.not_streaming_for(Instant::now()),
            divergence_checked_ago: self.divergence_checked_at.map(|t| t.elapsed()),
            promised_for: self.book().held(Instant::now()).map(|(_, left)| left),
            reinit_done: self.state.reinit_done,
            restart_done: self.state.restart_done,
            reload_done: self.state.reload_done,
            parameters_version: self.parameters_written,
        }
    }

    /// Carries out one step of the plan.
    async fn execute(&mut self, action: Action, reply: &pb::HeartbeatReply) -> Result<()> {
        let epoch = reply.epoch;
        match action {
            Action::InitPrimary => {
                info!(
                    epoch,
                    "granted the bootstrap: creating the cluster's first primary"
                );
                self.ctl.init_primary().await?;
                self.start_under_lease("start the first primary").await
            }
            Action::Clone(up) => {
                info!(primary = ?up, "cloning the primary into a new standby");
                self.ctl.clone_from(&up).await?;
                self.following = Some(up);
                self.ctl.start().await
            }
            Action::Fence(reason) => {
                match reason {
                    FenceReason::NoLongerCandidate => {
                        warn!(
                            epoch,
                            "no longer the promotion candidate: stopping postgres (fence)"
                        )
                    }
                    FenceReason::NotThePrimary => {
                        warn!(
                            epoch,
                            "this node is no longer the primary: stopping postgres (fence)"
                        )
                    }
                }
                crate::metrics::fenced(reason.as_str());
                self.ctl.fence().await
            }
            Action::ClearPromoting => Ok(std::fs::remove_file(&self.guard.promoting)?),
            Action::StopCleanly => {
                info!(epoch, "switchover: stopping postgres cleanly");
                // Bounded: a shutdown stuck on a standby that never confirms must not
                // hold up the handover (the coordinators fence by lease meanwhile).
                self.report_now = true;
                match tokio::time::timeout(Duration::from_secs(5), self.ctl.stop()).await {
                    Ok(Ok(())) => return Ok(()),
                    Ok(Err(e)) => warn!("switchover: the clean stop failed ({e}); fencing"),
                    Err(_) => warn!("switchover: the clean stop takes over 5 s; fencing"),
                }
                crate::metrics::fenced("clean_stop_failed");
                self.ctl.fence().await
            }
            Action::Reinit { primary, token } => {
                warn!(primary = ?primary, token, "rebuilding this standby from a fresh base backup (pgquorum reinit)");
                if self.ctl.running_pid().is_some() {
                    self.ctl.stop().await?;
                }
                self.ctl.reinit_from(&primary).await?;
                self.following = Some(primary);
                // Done once the copy is complete: a start that fails is the next
                // rounds' to retry (StartStandby), not a reason for another copy.
                self.mark_done(|s| s.reinit_done = token)?;
                info!(token, "rebuilt");
                self.ctl.start().await
            }
            Action::ApplyParameters { parameters, version } => {
                // Never in the way of what follows (a repoint, a start): a failure is
                // logged and tried again next round.
                info!(
                    version,
                    count = parameters.len(),
                    "applying the cluster's parameters"
                );
                if let Err(e) = self.ctl.write_cluster_parameters(&parameters) {
                    warn!(version, "writing the cluster's parameters: {e}");
                    return Ok(());
                }
                if self.ctl.running_pid().is_some() {
                    if let Err(e) = self.ctl.reload().await {
                        warn!(version, "reloading postgres: {e}");
                    }
                }
                self.parameters_written = version;
                self.parameters_written_at = Some(Instant::now());
                Ok(())
            }
            Action::Reload(token) => {
                info!(token, "reloading postgres's configuration (pgquorum reload)");
                if self.ctl.running_pid().is_some() {
                    self.ctl.reload().await?;
                }
                self.parameters_written_at = Some(Instant::now());
                self.mark_done(|s| s.reload_done = token)?;
                self.settings_checked_at = None;
                Ok(())
            }
            Action::Restart { token } => {
                warn!(token, "restarting this standby's postgres (pgquorum restart)");
                if self.ctl.running_pid().is_some() {
                    self.ctl.stop().await?;
                }
                self.observer.reset();
                let started = self.ctl.start().await;
                // Done either way: a failed start is reported, and the next rounds
                // start it (StartStandby) as after any stop.
                self.mark_done(|s| s.restart_done = token)?;
                self.settings_checked_at = None;
                started
            }
            Action::Rejoin(up) => {
                info!(primary = ?up, "rejoining as a standby of the new primary");
                self.rejoin_onto(&up).await
            }
            Action::StartUnderLease(what) => {
                warn!(epoch, "postgres is stopped: {what}");
                self.start_under_lease(what).await
            }
            Action::Promote {
                synchronous_standby_names,
                slots,
            } => {
                // Checked again at the last moment: the plan read the lease a moment ago.
                self.check_lease("promote")?;
                info!(epoch, "promoting to primary");
                // From here the data counts as a primary's for the guard and the lease
                // timer, whatever standby.signal says: the promotion may end at any time.
                std::fs::write(&self.guard.promoting, "")?;
                self.observer.promote(&synchronous_standby_names).await?;
                self.observer.ensure_slots(&slots).await?;
                self.following = None;
                self.report_now = true;
                info!(epoch, "promoted");
                Ok(())
            }
            Action::SetSyncNames(names) => {
                info!(to = %names, "applying synchronous_standby_names");
                self.observer.set_synchronous_standby_names(&names).await
            }
            Action::EnsureSlots(slots) => {
                for s in &slots {
                    self.slots_dropped.remove(s);
                }
                self.observer.ensure_slots(&slots).await
            }
            Action::DropSlots(slots) => {
                // Once per slot and agent: the order repeats in every reply.
                let new: Vec<String> = slots
                    .into_iter()
                    .filter(|s| !self.slots_dropped.contains(s))
                    .collect();
                if new.is_empty() {
                    return Ok(());
                }
                let gone = self.observer.drop_slots(&new).await?;
                if !gone.is_empty() {
                    info!(slots = ?gone, "dropped the replication slots of removed members");
                }
                self.slots_dropped.extend(gone);
                Ok(())
            }
            Action::Follow {
                primary,
                check_divergence,
                reload,
            } => {
                // A standby that got further than the new primary's fork point (WAL of
                // the old primary the new one never had) must be rewound first.
                if let Some(check) = check_divergence {
                    if self.rewind_if_diverged(&primary, check).await? {
                        return Ok(());
                    }
                }
                info!(primary = ?primary, "following the primary");
                self.ctl.ensure_slot_on(&primary).await?;
                self.ctl.repoint(&primary)?;
                if reload {
                    self.observer.reload().await?;
                }
                self.following = Some(primary);
                Ok(())
            }
            Action::CheckDivergence { primary, check } => {
                info!(
                    primary = ?primary,
                    not_streaming_s = self.streaming.not_streaming_for(Instant::now()).as_secs(),
                    "this standby does not stream from the primary: checking whether it went past the primary's fork point"
                );
                self.rewind_if_diverged(&primary, check).await?;
                Ok(())
            }
            Action::StartStandby => {
                warn!("postgres (standby) is not running; starting it");
                self.ctl.start().await
            }
            Action::Wait { what, why } => Err(Error::Tool {
                tool: what.into(),
                detail: why,
            }),
            Action::Unhealthy(detail) => Err(Error::Postgres {
                target: "local server".into(),
                detail,
            }),
        }
    }

    /// Whether this standby went past `primary`'s fork point; if so it is stopped,
    /// rewound onto `primary` and started again as its standby.
    async fn rewind_if_diverged(&mut self, primary: &Upstream, check: plan::DivergenceCheck) -> Result<bool> {
        let lsn = check.lsn.map(|l| l.to_string()).unwrap_or_default();
        // The timeline it reports may be its last restartpoint's: the newest it holds
        // WAL of is the one it is on.
        let timeline = check.timeline.max(self.ctl.newest_wal_timeline().unwrap_or(0));
        self.divergence_checked_at = Some(Instant::now());
        // Bounded: a primary that accepts the connection and then hangs must not
        // silence this agent.
        let diverged = tokio::time::timeout(
            DIVERGENCE_CHECK_TIMEOUT,
            self.ctl.diverged_from(primary, timeline, &lsn),
        )
        .await
        .map_err(|_| Error::Postgres {
            target: format!("{}:{}", primary.host, primary.port),
            detail: format!(
                "no answer within {} ms to the divergence check",
                DIVERGENCE_CHECK_TIMEOUT.as_millis()
            ),
        })??;
        if !diverged {
            return Ok(false);
        }
        warn!(primary = ?primary, %lsn, timeline, "this standby went past the primary's fork point: rewinding");
        self.ctl.stop().await?;
        self.rejoin_onto(primary).await?;
        Ok(true)
    }

    /// pg_rewind (or a fresh base backup) of the stopped server onto `primary`, then
    /// starts it as its standby.
    async fn rejoin_onto(&mut self, primary: &Upstream) -> Result<()> {
        let how = self.ctl.rejoin(primary).await?;
        info!("rejoined by {how}");
        self.following = Some(primary.clone());
        self.ctl.start().await
    }

    /// Refuses `what` (something only a lease holder may do) once the lease ran out,
    /// or while the lease file does not hold it (the guard and Postgres's own check
    /// read the file: a primary under a lease they cannot see would be stopped).
    fn check_lease(&self, what: &str) -> Result<()> {
        if !self.lease_valid() {
            return Err(Error::Tool {
                tool: what.into(),
                detail: "no primary lease, or it ran out: waiting for a coordinator to grant one".into(),
            });
        }
        let written = guard::read_deadline(&self.guard.lease);
        if written != self.lease.map(|l| l.until_boot_ns) {
            return Err(Error::Tool {
                tool: what.into(),
                detail: format!(
                    "the lease file {} does not hold the granted lease (it could not be written)",
                    self.guard.lease.display()
                ),
            });
        }
        Ok(())
    }

    /// Checks, once per postmaster, that the commit-time lease check is loaded
    /// (`postgres.commit_check`). A standby where a changed `shared_preload_libraries`
    /// waits for a restart (an agent upgraded under a running server) is restarted; a
    /// server still without it (the setting overridden, e.g. by ALTER SYSTEM in
    /// `postgresql.auto.conf`) is reported, and never promoted.
    async fn verify_commit_check(&mut self, report: &pb::NodeReport) {
        let pid = self.ctl.running_pid();
        if !self.config.postgres.commit_check
            || pid.is_none()
            || self.commit_check_seen == pid
            || !report.postgres_up
        {
            return;
        }
        let state = match self.observer.commit_check().await {
            Ok(s) => s,
            Err(e) => return warn!("cannot tell whether the commit-time lease check is loaded: {e}"),
        };
        self.commit_check_seen = pid;
        if state.loaded {
            self.commit_check_verified = pid;
            return;
        }
        if report.role == "standby" && state.pending_restart && !self.guard.promoting.exists() {
            info!("restarting this standby to load the commit-time lease check");
            let restarted = match self.ctl.stop().await {
                Ok(()) => self.ctl.start().await,
                Err(e) => Err(e),
            };
            if let Err(e) = restarted {
                warn!("restarting this standby to load the commit-time lease check: {e}");
            }
            return;
        }
        warn!(
            role = %report.role,
            "Postgres runs without the commit-time lease check although postgres.commit_check is on: \
             shared_preload_libraries is overridden (ALTER SYSTEM? see postgresql.auto.conf){}; it will \
             not be promoted",
            if state.pending_restart { " or waits for a restart" } else { "" }
        );
    }

    /// Starts Postgres where it may run as a primary, only under a live lease (the
    /// guard would stop it at once otherwise); and checks again once it runs, since
    /// starting can take longer than the lease.
    /// Records an order carried out (see [`AgentState`]) and reports at once. Kept in
    /// memory even when the file cannot be written (a full disk), so it is not done
    /// again and again; only a restart of the agent then forgets it.
    fn mark_done(&mut self, done: impl FnOnce(&mut AgentState)) -> Result<()> {
        let mut next = self.state.clone();
        done(&mut next);
        if let Err(e) = self.state_file.save(&next) {
            warn!("cannot persist an order done: {e}");
        }
        self.state = next;
        self.report_now = true;
        Ok(())
    }

    async fn start_under_lease(&mut self, what: &str) -> Result<()> {
        self.check_lease(what)?;
        self.ctl.start().await?;
        if !self.lease_valid() {
            warn!("{what}: the lease ran out while starting; fencing");
            self.enforce_lease().await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};

    /// A stand-in "postmaster": a process whose pid is in `data/postmaster.pid`, running
    /// in `cwd` (a postmaster's is its data directory).
    fn fake_postmaster(data: &std::path::Path, cwd: &std::path::Path) -> Child {
        let child = Command::new("sleep").arg("30").current_dir(cwd).spawn().unwrap();
        std::fs::write(data.join("postmaster.pid"), format!("{}\n", child.id())).unwrap();
        child
    }

    async fn killed(child: &mut Child) -> bool {
        for _ in 0..100 {
            if child.try_wait().unwrap().is_some() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        false
    }

    #[tokio::test]
    async fn the_lease_timer_fences_at_the_deadline_unless_renewed_or_a_standby() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let files = GuardFiles::next_to(&data);
        let deadlines = tokio::sync::watch::Sender::new(None);
        let timer = tokio::spawn(lease_timer(deadlines.subscribe(), files.clone()));
        let ms = Duration::from_millis;

        // Before this process's first lease: left to the guard (an earlier agent's
        // lease may still run).
        let mut pm = fake_postmaster(&data, &data);
        tokio::time::sleep(ms(100)).await;
        assert!(pm.try_wait().unwrap().is_none(), "not armed before a first lease");

        // Renewed before it runs out: not fenced at the first deadline.
        let start = Instant::now();
        deadlines.send_replace(Some(start + ms(200)));
        tokio::time::sleep(ms(20)).await;
        deadlines.send_replace(Some(start + ms(700)));
        tokio::time::sleep_until((start + ms(450)).into()).await;
        assert!(pm.try_wait().unwrap().is_none(), "renewed in time");
        // Not renewed: fenced.
        tokio::time::sleep_until((start + ms(700)).into()).await;
        assert!(killed(&mut pm).await, "fenced at the deadline");

        // A standby's data is left alone, until its promotion finishes late (the
        // signal file goes) with the lease run out.
        std::fs::write(data.join("standby.signal"), "").unwrap();
        let mut standby = fake_postmaster(&data, &data);
        deadlines.send_replace(Some(Instant::now() + ms(20)));
        tokio::time::sleep(ms(150)).await;
        assert!(standby.try_wait().unwrap().is_none(), "a standby is not fenced");
        std::fs::remove_file(data.join("standby.signal")).unwrap();
        assert!(killed(&mut standby).await, "promoted after the lease: fenced");

        // Being promoted, a standby's data is a primary's: a lease taken away (the
        // candidate abandoned) fences it even before its promotion ends.
        std::fs::write(data.join("standby.signal"), "").unwrap();
        std::fs::write(&files.promoting, "").unwrap();
        let mut candidate = fake_postmaster(&data, &data);
        deadlines.send_replace(Some(Instant::now() + ms(5_000)));
        tokio::time::sleep(ms(50)).await;
        assert!(candidate.try_wait().unwrap().is_none(), "under its lease");
        deadlines.send_replace(None);
        assert!(
            killed(&mut candidate).await,
            "lease taken away while promoting: fenced"
        );
        std::fs::remove_file(&files.promoting).unwrap();

        // A pid left in postmaster.pid and reused by another process: never signalled.
        let elsewhere = tempfile::tempdir().unwrap();
        let mut stranger = fake_postmaster(&data, elsewhere.path());
        tokio::time::sleep(ms(100)).await;
        assert!(
            stranger.try_wait().unwrap().is_none(),
            "not a postmaster of this data"
        );
        stranger.kill().unwrap();
        stranger.wait().unwrap();
        timer.abort();
    }
}
