//! `pgquorum bench chaos --duration D --seed S`: faults drawn at random (from the
//! seed, so a run can be repeated) on a sandbox whose hosts each have a network of
//! their own (needs root, ip and nft), judged like the scenario tests by
//! [`Checker`]: a `synchronous_commit = local` writer on every node and a writer
//! through the router run throughout.
//!
//! Each fault hits the current primary or Raft leader, is held (until a failover
//! completes, for the faults that must cause one; 4 s for the others), then healed,
//! and the next starts once every node is healthy under one primary again. Per fault
//! it prints what happened and, for a failover, the time from the fault to the new
//! primary's first acknowledged write. The last line is JSON: `faults`,
//! `lost_acked_writes` (acknowledged through the router, missing at the end),
//! `split_brain_windows` (two nodes acknowledging as primaries at overlapping times),
//! `false_failovers` (a failover after a fault that must not cause one, a second one
//! after a fault that must cause one, or one between faults), `missed_failovers` (none
//! after a fault that must cause one), `unrecovered` and `failover_ms` (from the fault
//! to the first write the new primary acknowledged, to its local writer).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::json;

use super::summary;
use crate::check::{settled, Checker};
use crate::error::{Error, Result};
use crate::launch::{coordinator_host, Sandbox, SandboxSpec};

pub struct Options {
    pub duration: Duration,
    pub seed: u64,
    pub dir: Option<PathBuf>,
    pub coordinator_base: u16,
    pub postgres_base: u16,
    /// Where the coordinators keep their Raft stores (default: in the sandbox); a disk
    /// of their own, as coordinator hosts have (see docs/faults.md, "Disks").
    pub raft_store_root: Option<PathBuf>,
}

/// What a fault does to the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The primary's host loses every link; its clients still reach it.
    IsolatePrimary,
    /// The primary loses the coordinators only (it still streams to its standbys).
    CutPrimaryFromCoordinators,
    /// The primary loses its standbys only.
    CutPrimaryFromStandbys,
    /// The primary's packets to the coordinators are lost; theirs arrive.
    OneWayFromPrimary,
    /// The Raft leader loses every link.
    IsolateLeader,
    /// The Raft leader and the primary cut off together from the rest.
    LeaderWithPrimary,
    /// The primary's host loses every link for 300 ms, five times, 700 ms apart.
    Blips,
    /// kill -9 of the primary's agent, lease guard and Postgres; restarted on heal.
    KillPrimaryHost,
    /// kill -9 of a follower coordinator; restarted on heal.
    KillFollower,
}

impl Fault {
    pub const ALL: [Fault; 9] = [
        Fault::IsolatePrimary,
        Fault::CutPrimaryFromCoordinators,
        Fault::CutPrimaryFromStandbys,
        Fault::OneWayFromPrimary,
        Fault::IsolateLeader,
        Fault::LeaderWithPrimary,
        Fault::Blips,
        Fault::KillPrimaryHost,
        Fault::KillFollower,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::IsolatePrimary => "primary isolated",
            Fault::CutPrimaryFromCoordinators => "primary cut from the coordinators",
            Fault::CutPrimaryFromStandbys => "primary cut from its standbys",
            Fault::OneWayFromPrimary => "primary's packets to the coordinators lost",
            Fault::IsolateLeader => "raft leader isolated",
            Fault::LeaderWithPrimary => "raft leader and primary cut off together",
            Fault::Blips => "primary's links flapping (5 × 300 ms)",
            Fault::KillPrimaryHost => "primary host killed",
            Fault::KillFollower => "follower coordinator killed",
        }
    }

    /// Whether the fault must end in exactly one failover (else in none).
    pub fn fails_over(self) -> bool {
        matches!(
            self,
            Fault::IsolatePrimary
                | Fault::CutPrimaryFromCoordinators
                | Fault::OneWayFromPrimary
                | Fault::LeaderWithPrimary
                | Fault::KillPrimaryHost
        )
    }
}

/// What one fault led to.
#[derive(Debug)]
struct Outcome {
    fault: Fault,
    primary_before: String,
    /// Failovers completed from the fault until the cluster settled after the heal
    /// (from the history: an abandoned candidate moves the epoch twice in one).
    failovers: u64,
    /// Failovers completed between the previous fault's end and this one's start:
    /// nothing explains them.
    unexplained: u64,
    /// From the fault to the new primary's first acknowledged write.
    failover_ms: Option<f64>,
    recovered: bool,
}

impl Outcome {
    fn false_failovers(&self) -> u64 {
        let expected = u64::from(self.fault.fails_over());
        self.failovers.saturating_sub(expected) + self.unexplained
    }

    /// A fault that must cause a failover caused none.
    fn missed(&self) -> bool {
        self.fault.fails_over() && self.failovers == 0
    }
}

/// Failovers completed into an epoch in `after..=upto`, from the committed history
/// (its oldest entries go first, so only recent ranges are asked for).
async fn failovers_between(sandbox: &Sandbox, after: u64, upto: u64) -> Result<u64> {
    let history = sandbox.cluster_state().await?.history;
    Ok(history
        .iter()
        .filter(|e| e.kind == "failover_completed" && e.epoch > after && e.epoch <= upto)
        .count() as u64)
}

const WAIT: Duration = Duration::from_secs(60);
const HOLD: Duration = Duration::from_secs(4);

/// Runs the faults; returns the summary printed as the last line, or an error naming
/// the seed when a rule was broken.
pub async fn run(opts: Options) -> Result<serde_json::Value> {
    let (dir, _tmp) = super::work_dir(&opts.dir, "pgquorum-bench-chaos-")?;
    let mut spec = SandboxSpec::new(&dir, opts.coordinator_base, opts.postgres_base);
    spec.network = true;
    spec.raft_store_root = opts.raft_store_root.clone();
    let mut sandbox = Sandbox::start(spec).await?;
    let checker = Checker::start(&sandbox, "chaos", opts.duration + Duration::from_secs(600)).await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let started = Instant::now();
    let mut outcomes = Vec::new();
    let mut epoch = sandbox.status().await?.epoch;
    while started.elapsed() < opts.duration {
        let fault = Fault::ALL[rng.random_range(0..Fault::ALL.len())];
        let outcome = inflict(&mut sandbox, &checker, fault, &mut epoch)
            .await
            .map_err(|e| Error::Launch(format!("seed {}, {}: {e}", opts.seed, fault.name())))?;
        println!(
            "{:>4.0}s  {:<45} {:<6} → {}{}{}",
            started.elapsed().as_secs_f64(),
            fault.name(),
            outcome.primary_before,
            match (outcome.failovers, outcome.missed()) {
                (0, true) => "NO FAILOVER".to_string(),
                (0, false) => "no failover".to_string(),
                (1, _) => "one failover".to_string(),
                (n, _) => format!("{n} failovers"),
            },
            outcome
                .failover_ms
                .map_or(String::new(), |ms| format!(", first write after {ms:.0} ms")),
            match (outcome.unexplained, outcome.recovered) {
                (0, true) => String::new(),
                (n, true) => format!(", {n} failover(s) before it that nothing caused"),
                (_, false) => ", NOT RECOVERED".to_string(),
            },
        );
        let recovered = outcome.recovered;
        outcomes.push(outcome);
        if !recovered {
            break;
        }
    }
    let status = sandbox.status().await?;
    let verdict = checker.verdict(&sandbox, &status).await?;
    let failover_ms: Vec<f64> = outcomes.iter().filter_map(|o| o.failover_ms).collect();
    let false_failovers: u64 = outcomes.iter().map(Outcome::false_failovers).sum();
    let unrecovered = outcomes.iter().filter(|o| !o.recovered).count();
    let missed_failovers = outcomes.iter().filter(|o| o.missed()).count();
    let problems = verdict.problems();
    for p in &problems {
        println!("problem: {p}");
    }
    let report = json!({
            "seed": opts.seed,
            "duration_s": opts.duration.as_secs(),
            "faults": outcomes.len(),
            "failovers": outcomes.iter().map(|o| o.failovers).sum::<u64>(),
            "acked_writes": verdict.acked_writes,
            "lost_acked_writes": verdict.lost_acked_writes.len(),
            "split_brain_windows": verdict.split_brain.len(),
            "false_failovers": false_failovers,
            "missed_failovers": missed_failovers,
            "unrecovered": unrecovered,
            "published_violations": verdict.published.len(),
            "stragglers": verdict.stragglers.len(),
            "epochs_back": verdict.epochs_back.len(),
            "failover_ms": summary(&failover_ms),
    });
    println!("{report}");
    let mut broken = problems;
    for (count, what) in [
        (false_failovers, "needless failovers"),
        (missed_failovers as u64, "missed failovers"),
        (unrecovered as u64, "faults not recovered from"),
    ] {
        if count > 0 {
            broken.push(format!("{count} {what}"));
        }
    }
    if !broken.is_empty() {
        return Err(Error::Launch(format!(
            "chaos run with seed {} broke a rule: {}",
            opts.seed,
            broken.join("; ")
        )));
    }
    Ok(report)
}

/// Inflicts `fault`, holds it, heals it and waits for the cluster to settle.
/// `epoch` is the cluster's epoch when the previous fault ended; it is moved on to
/// this one's end.
async fn inflict(sandbox: &mut Sandbox, checker: &Checker, fault: Fault, epoch: &mut u64) -> Result<Outcome> {
    let before = sandbox.wait_for("a settled cluster", WAIT, settled).await?;
    let unexplained = failovers_between(sandbox, *epoch, before.epoch).await?;
    let primary = before.primary.clone();
    // The last fault's coordinator must be back in the group, or this one is a second.
    let leader = sandbox.coordinators().wait_whole(WAIT).await?;
    let leader_host = coordinator_host(leader);
    let coordinators: Vec<String> = sandbox
        .coordinators()
        .ids()
        .into_iter()
        .map(coordinator_host)
        .collect();
    let coordinators: Vec<&str> = coordinators.iter().map(String::as_str).collect();
    let standbys: Vec<String> = sandbox
        .node_names()
        .into_iter()
        .filter(|n| *n != primary)
        .collect();
    let standbys: Vec<&str> = standbys.iter().map(String::as_str).collect();
    let at = Instant::now();
    let mut killed_follower = None;
    {
        let net = sandbox.network()?;
        match fault {
            Fault::IsolatePrimary => net.isolate(&primary)?,
            Fault::CutPrimaryFromCoordinators => net.cut(&primary, &coordinators)?,
            Fault::CutPrimaryFromStandbys => net.cut(&primary, &standbys)?,
            Fault::OneWayFromPrimary => net.drop_outgoing(&primary, &coordinators)?,
            Fault::IsolateLeader => net.isolate(&leader_host)?,
            Fault::LeaderWithPrimary => net.split_off(&[leader_host.as_str(), primary.as_str()])?,
            Fault::Blips => {
                for _ in 0..5 {
                    net.isolate(&primary)?;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    net.heal_all()?;
                    tokio::time::sleep(Duration::from_millis(700)).await;
                }
            }
            Fault::KillPrimaryHost | Fault::KillFollower => {}
        }
    }
    match fault {
        Fault::KillPrimaryHost => sandbox.kill_host(&primary)?,
        Fault::KillFollower => {
            let follower = sandbox.coordinators().ids().into_iter().find(|id| *id != leader);
            if let Some(id) = follower {
                sandbox.coordinators().kill(id)?;
                killed_follower = Some(id);
            }
        }
        _ => {}
    }
    let mut failover_ms = None;
    if fault.fails_over() {
        let next = before.epoch + 1;
        let promoted = sandbox
            .wait_for(&format!("a new primary of epoch {next}"), WAIT, |s| {
                s.epoch >= next && !s.primary.is_empty() && s.primary != primary
            })
            .await;
        if let Ok(s) = promoted {
            let deadline = Instant::now() + WAIT;
            while Instant::now() < deadline {
                let first = checker
                    .on(&s.primary)
                    .and_then(|w| w.acked_since(at).first().cloned());
                if let Some(ack) = first {
                    failover_ms = Some(ack.acked.duration_since(at).as_secs_f64() * 1000.0);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    } else {
        tokio::time::sleep(HOLD).await;
    }
    sandbox.network()?.heal_all()?;
    if fault == Fault::KillPrimaryHost {
        sandbox.start_agent(&primary)?;
    }
    if let Some(id) = killed_follower {
        sandbox.coordinators().start_node(id)?;
    }
    let after = sandbox
        .wait_for("every node healthy under one primary", WAIT, settled)
        .await;
    *epoch = match &after {
        Ok(s) => s.epoch,
        Err(_) => sandbox.status().await.map_or(before.epoch, |s| s.epoch),
    };
    Ok(Outcome {
        fault,
        primary_before: primary,
        failovers: failovers_between(sandbox, before.epoch, *epoch).await?,
        unexplained,
        failover_ms,
        recovered: after.is_ok(),
    })
}
