//! `pgquorum bench outage`: what an outage of the whole coordinator group costs a
//! healthy primary, which the failsafe (docs/leases.md) is there to make nothing.
//!
//! Each round, on one sandbox:
//! - a writer (ordinary commits, so also waiting for the sync standby) runs on the
//!   primary; every coordinator is frozen (SIGSTOP; `--how kill`: two of three killed,
//!   a lost quorum) for `--duration` seconds, then thawed (restarted);
//!   `refused_writes` counts the writes refused meanwhile (the target is none),
//!   `max_write_gap_ms` is the longest wait between two acknowledged writes, and
//!   `false_failovers` counts rounds after which the primary was not the same;
//! - then the price of the promises: every coordinator frozen for 3 s (the primary
//!   goes on its standbys' promises), the primary's host killed, the coordinators
//!   thawed at once; `failover_after_outage_ms` is from the kill to the first write a
//!   new primary acknowledges (compare `bench failover --kill host`: the new leader
//!   starts afresh and the standbys' promises to the dead primary must run out).
//!   The killed host is then started again and rejoins.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;

use super::summary;
use crate::check::TimedWriter;
use crate::error::{Error, Result};
use crate::launch::{Sandbox, SandboxSpec};
use crate::output::table;

#[derive(Clone, Debug, clap::Args)]
pub struct Options {
    #[arg(long, default_value_t = 3)]
    pub rounds: u64,
    /// How long each outage lasts.
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    pub duration: u64,
    /// What the outage is: every coordinator frozen, or two of three killed.
    #[arg(long, value_enum, default_value = "freeze")]
    pub how: How,
    /// Keep the sandbox here (default: a temporary directory, removed after).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Coordinator N listens on BASE + N.
    #[arg(long, default_value_t = 29600, value_name = "BASE")]
    pub coordinator_base: u16,
    /// nodeN's Postgres on BASE + N; its agent's PeerService on BASE + 20 + N.
    #[arg(long, default_value_t = 29610, value_name = "BASE")]
    pub postgres_base: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum How {
    /// SIGSTOP of every coordinator, SIGCONT after.
    Freeze,
    /// kill -9 of the Raft leader and one follower, restarted after.
    Kill,
}

const WAIT: Duration = Duration::from_secs(60);

/// An outage in progress; [`Outage::end`] brings the coordinators back (and so does
/// dropping it, for the frozen ones).
struct Outage {
    frozen: Vec<i32>,
    killed: Vec<u64>,
}

impl Outage {
    async fn begin(sandbox: &mut Sandbox, how: How) -> Result<Outage> {
        let group = sandbox.coordinators();
        match how {
            How::Freeze => {
                let frozen = group.pids();
                for pid in &frozen {
                    let _ = kill(Pid::from_raw(*pid), Signal::SIGSTOP);
                }
                Ok(Outage {
                    frozen,
                    killed: Vec::new(),
                })
            }
            How::Kill => {
                let leader = group.wait_for_leader(WAIT).await?;
                let other = group
                    .ids()
                    .into_iter()
                    .find(|id| *id != leader)
                    .ok_or_else(|| Error::Launch("a group of one coordinator".into()))?;
                for id in [leader, other] {
                    group.kill(id)?;
                }
                Ok(Outage {
                    frozen: Vec::new(),
                    killed: vec![leader, other],
                })
            }
        }
    }

    fn end(mut self, sandbox: &mut Sandbox) -> Result<()> {
        self.thaw();
        for id in std::mem::take(&mut self.killed) {
            sandbox.coordinators().start_node(id)?;
        }
        Ok(())
    }

    fn thaw(&mut self) {
        for pid in self.frozen.drain(..) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
        }
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        self.thaw();
    }
}

/// Waits until the coordinators answer again with every node healthy, a sync standby
/// committed and no failsafe promise running.
async fn settled(sandbox: &Sandbox) -> Result<pgquorum_client::pb::StatusReply> {
    sandbox
        .wait_for("every node healthy, no failsafe", WAIT, |s| {
            !s.failsafe && !s.sync_set.is_empty() && s.nodes.iter().all(|n| n.health == "HEALTHY")
        })
        .await
}

struct Round {
    refused: usize,
    acked: usize,
    max_gap_ms: f64,
    false_failover: bool,
    failover_after_outage_ms: f64,
}

pub async fn run(opts: Options) -> Result<()> {
    // `_tmp` is declared first so it is dropped last, after the processes are stopped.
    let (dir, _tmp) = super::work_dir(&opts.dir, "pgquorum-bench-outage-")?;
    eprintln!("starting a sandbox in {}", dir.display());
    let spec = SandboxSpec::new(&dir, opts.coordinator_base, opts.postgres_base);
    let mut sandbox = Sandbox::start(spec).await?;
    let primary = sandbox.status().await?.primary;
    let conninfo = format!("{} connect_timeout=2", sandbox.conninfo(&primary)?);
    let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .map_err(|e| Error::Launch(format!("cannot reach {primary}: {e}")))?;
    tokio::spawn(conn);
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS bench_outage (id bigserial PRIMARY KEY)")
        .await
        .map_err(|e| Error::Launch(format!("create table: {e}")))?;
    let mut rounds = Vec::new();
    for n in 1..=opts.rounds {
        let round = one_round(&mut sandbox, &opts).await?;
        eprintln!(
            "round {n}: {} writes refused, {} acknowledged, longest wait {:.0} ms{}; failover after an outage {:.0} ms",
            round.refused,
            round.acked,
            round.max_gap_ms,
            if round.false_failover { ", FAILED OVER" } else { "" },
            round.failover_after_outage_ms
        );
        rounds.push(round);
    }
    let gaps: Vec<f64> = rounds.iter().map(|r| r.max_gap_ms).collect();
    let failovers: Vec<f64> = rounds.iter().map(|r| r.failover_after_outage_ms).collect();
    let refused: usize = rounds.iter().map(|r| r.refused).sum();
    let false_failovers = rounds.iter().filter(|r| r.false_failover).count();
    println!(
        "{}",
        table(
            &["measure", "p50", "p99", "max"],
            [
                ("max_write_gap_ms", &gaps),
                ("failover_after_outage_ms", &failovers)
            ]
            .iter()
            .map(|(name, samples)| {
                let s = summary(samples);
                vec![
                    name.to_string(),
                    s["p50"].to_string(),
                    s["p99"].to_string(),
                    s["max"].to_string(),
                ]
            })
            .collect()
        )
    );
    println!(
        "{}",
        json!({
            "rounds": opts.rounds,
            "outage_s": opts.duration,
            "how": format!("{:?}", opts.how).to_lowercase(),
            "refused_writes": refused,
            "false_failovers": false_failovers,
            "max_write_gap_ms": summary(&gaps),
            "failover_after_outage_ms": summary(&failovers),
        })
    );
    Ok(())
}

async fn one_round(sandbox: &mut Sandbox, opts: &Options) -> Result<Round> {
    let before = settled(sandbox).await?;
    let primary = before.primary.clone();
    let postmaster = sandbox.postmaster_pid(&primary);
    let outage_for = Duration::from_secs(opts.duration);
    let writer = TimedWriter::start(sandbox, &primary, "bench_outage", false, outage_for + WAIT)?;
    let writing = Instant::now();
    while writer.acks().is_empty() {
        if writing.elapsed() > WAIT {
            return Err(Error::Launch(format!("no write acknowledged by {primary}")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let from = Instant::now();
    let outage = Outage::begin(sandbox, opts.how).await?;
    tokio::time::sleep(outage_for).await;
    let to = Instant::now();
    outage.end(sandbox)?;
    let refused = writer.refused_between(from, to).len();
    let acks: Vec<Instant> = writer.acks();
    let in_window: Vec<Instant> = acks.iter().copied().filter(|a| *a >= from && *a <= to).collect();
    let mut max_gap = Duration::ZERO;
    let mut previous = acks.iter().copied().rfind(|a| *a < from).unwrap_or(from);
    for a in in_window.iter().copied().chain(std::iter::once(to)) {
        max_gap = max_gap.max(a.saturating_duration_since(previous));
        previous = a;
    }
    drop(writer);
    let after = settled(sandbox).await?;
    let false_failover = after.epoch != before.epoch
        || after.primary != primary
        || sandbox.postmaster_pid(&primary) != postmaster;

    // The price of the promises: an outage, the primary lost in it, the coordinators back.
    let others: Vec<(String, TimedWriter)> = sandbox
        .node_names()
        .into_iter()
        .filter(|n| *n != after.primary)
        .map(|n| TimedWriter::start(sandbox, &n, "bench_outage", true, WAIT).map(|w| (n, w)))
        .collect::<Result<_>>()?;
    let outage = Outage::begin(sandbox, How::Freeze).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let killed = Instant::now();
    sandbox.kill_host(&after.primary)?;
    outage.end(sandbox)?;
    let first_write = loop {
        if let Some(first) = others
            .iter()
            .filter_map(|(_, w)| w.first())
            .map(|a| a.acked)
            .min()
        {
            break first;
        }
        if killed.elapsed() > WAIT {
            return Err(Error::Launch("no new primary after the outage".into()));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    drop(others);
    sandbox.start_agent(&after.primary)?;
    Ok(Round {
        refused,
        acked: in_window.len(),
        max_gap_ms: max_gap.as_secs_f64() * 1000.0,
        false_failover,
        failover_after_outage_ms: first_write.duration_since(killed).as_secs_f64() * 1000.0,
    })
}
