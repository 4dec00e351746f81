//! `pgquorum bench failover`: kill the primary (host or postmaster, kill -9) while a
//! writer runs, and measure how long until writes work again and what was lost.
//! `--kill switchover` kills nothing and asks for a switchover instead, timing the
//! planned handover the same way. `--kill cut` cuts the primary's host off from the
//! coordinators and the standbys (every host on a network of its own; needs root)
//! while its clients still reach it, and adds the fence figures:
//! - `fence_after_renewal_ms`: from the old primary's last lease renewal (the send of
//!   the heartbeat that earned it, read back from its lease file) to its first refused
//!   write, for a writer with `synchronous_commit = local` (which only the lease stops);
//!   the target is `lease_ms` + 100 ms;
//! - `overlap_ms`: the old primary's last acknowledged write less the send of the new
//!   primary's first acknowledged one (writers with `synchronous_commit = local` on
//!   every node from before the cut); above 0 means two primaries acknowledged writes
//!   at the same time.
//!
//! Each round, on a sandbox (the same one `pgquorum sandbox up` starts):
//! - a writer inserts sequential ids into the primary and records every
//!   acknowledged one;
//! - the primary is killed; a prober tries an insert on every other node every
//!   few milliseconds until one commits (`first_write_ms`), and the coordinators'
//!   status is polled until a standby is synchronous again (`sync_restored_ms`);
//! - the failover's own steps come from the history the coordinators committed
//!   (detection, fence + choice, promotion published), timed from the kill;
//! - every acknowledged id is looked up on the new primary (`lost_acked_writes`);
//! - the old primary's agent is restarted and the cluster healed for the next round.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pgquorum_client::pb;
use serde_json::json;
use tokio_postgres::{Client, NoTls};

use super::summary;
use crate::check::{self, TimedWriter};
use crate::error::{Error, Result};
use crate::launch::{Sandbox, SandboxSpec};
use crate::output::table;
use pgquorum_agent::guard::{boottime_ns, read_deadline, GuardFiles};

pub struct Options {
    pub rounds: u64,
    /// `host`: agent and Postgres die (host loss); `postgres`: only the postmaster.
    pub kill: Kill,
    pub dir: Option<PathBuf>,
    pub coordinator_base: u16,
    pub postgres_base: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kill {
    /// kill -9 of the agent, its lease guard and every Postgres process.
    Host,
    /// kill -9 of the postmaster and its processes; the agent lives.
    Postgres,
    /// Nothing dies: the operator asks for a switchover (`pgquorum switchover`).
    Switchover,
    /// The primary's host loses its links to the coordinators and standbys; its
    /// clients still reach it.
    Cut,
}

const NODES: [&str; 3] = ["node1", "node2", "node3"];
const WAIT: Duration = Duration::from_secs(60);

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn connect(sandbox: &Sandbox, node: &str) -> Option<Client> {
    let conninfo = format!("{} connect_timeout=1", sandbox.conninfo(node).ok()?);
    let (client, conn) = tokio::time::timeout(
        Duration::from_millis(500),
        tokio_postgres::connect(&conninfo, NoTls),
    )
    .await
    .ok()?
    .ok()?;
    tokio::spawn(conn);
    Some(client)
}

/// One round's measurements, in ms from the kill.
struct Round {
    detect: f64,
    fence: f64,
    promote: f64,
    first_write: f64,
    sync_restored: f64,
    lost: usize,
    /// `--kill cut` only: see the module documentation.
    fence_after_renewal: f64,
    overlap: f64,
}

pub async fn run(opts: Options) -> Result<()> {
    // `_tmp` is declared first so it is dropped last, after the processes are stopped.
    let (dir, _tmp) = super::work_dir(&opts.dir, "pgquorum-bench-failover-")?;
    eprintln!("starting a sandbox in {}", dir.display());
    let mut spec = SandboxSpec::new(&dir, opts.coordinator_base, opts.postgres_base);
    spec.network = opts.kill == Kill::Cut;
    let mut sandbox = Sandbox::start(spec).await?;
    let primary = sandbox.status().await?.primary;
    let client = connect(&sandbox, &primary)
        .await
        .ok_or_else(|| Error::Launch("cannot reach the primary".into()))?;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS bench_acked (id bigint PRIMARY KEY); \
             CREATE TABLE IF NOT EXISTS bench_local (id bigserial PRIMARY KEY)",
        )
        .await
        .map_err(|e| Error::Launch(format!("create table: {e}")))?;

    let mut rounds = Vec::new();
    let mut next_id = 1i64;
    for n in 1..=opts.rounds {
        let round = one_round(&mut sandbox, opts.kill, &mut next_id).await?;
        eprintln!(
            "round {n}: detect {:.0} ms, fence+choose {:.0} ms, promoted {:.0} ms, first write {:.0} ms, \
             sync restored {:.0} ms, lost acknowledged writes {}",
            round.detect, round.fence, round.promote, round.first_write, round.sync_restored, round.lost
        );
        if opts.kill == Kill::Cut {
            eprintln!(
                "round {n}: old primary refused writes {:.0} ms after its last renewal; overlap {:.0} ms",
                round.fence_after_renewal, round.overlap
            );
        }
        rounds.push(round);
        heal(&mut sandbox).await?;
    }

    let pick = |f: fn(&Round) -> f64| summary(&rounds.iter().map(f).collect::<Vec<_>>());
    let lost: usize = rounds.iter().map(|r| r.lost).sum();
    let measures = [
        ("detection (ms)", pick(|r| r.detect)),
        ("fence + candidate chosen (ms)", pick(|r| r.fence)),
        ("promotion published (ms)", pick(|r| r.promote)),
        ("first write on new primary (ms)", pick(|r| r.first_write)),
        ("a standby synchronous again (ms)", pick(|r| r.sync_restored)),
        (
            "old primary refuses, from its last renewal (ms)",
            pick(|r| r.fence_after_renewal),
        ),
        (
            "overlap of the two primaries' acks (ms, <= 0)",
            pick(|r| r.overlap),
        ),
    ];
    let shown = if opts.kill == Kill::Cut { 7 } else { 5 };
    let mut rows: Vec<Vec<String>> = measures[..shown]
        .iter()
        .map(|(what, v)| {
            vec![
                what.to_string(),
                format!("p50 {}  p99 {}  max {}", v["p50"], v["p99"], v["max"]),
            ]
        })
        .collect();
    rows.push(vec!["acknowledged writes lost".into(), lost.to_string()]);
    println!(
        "{}",
        table(
            &[
                "MEASURE (from the kill)",
                &format!("{} rounds, kill {:?}", opts.rounds, opts.kill)
            ],
            rows
        )
    );
    let mut result = json!({
        "bench": "failover",
        "kill": format!("{:?}", opts.kill).to_lowercase(),
        "rounds": opts.rounds,
        "detect_ms": measures[0].1,
        "fence_ms": measures[1].1,
        "promote_ms": measures[2].1,
        "first_write_ms": measures[3].1,
        "sync_restored_ms": measures[4].1,
        "lost_acked_writes": lost,
    });
    if opts.kill == Kill::Cut {
        result["fence_after_renewal_ms"] = measures[5].1.clone();
        result["overlap_ms"] = measures[6].1.clone();
        result["lease_ms"] = json!(lease_ms(&sandbox).await?);
    }
    println!("{result}");
    Ok(())
}

async fn one_round(sandbox: &mut Sandbox, kill: Kill, next_id: &mut i64) -> Result<Round> {
    let before = sandbox.status().await?;
    let old = before.primary.clone();

    // The writer: sequential ids on the old primary, recording each acknowledgement.
    let acked = Arc::new(Mutex::new(Vec::new()));
    let writer = {
        let client = connect(sandbox, &old)
            .await
            .ok_or_else(|| Error::Launch(format!("cannot reach {old}")))?;
        let acked = acked.clone();
        let mut id = *next_id;
        tokio::spawn(async move {
            loop {
                match client
                    .execute("INSERT INTO bench_acked (id) VALUES ($1)", &[&id])
                    .await
                {
                    Ok(_) => acked.lock().expect("acked lock").push(id),
                    Err(_) => return id,
                }
                id += 1;
            }
        })
    };
    // `--kill cut`: writers with `synchronous_commit = local` on every node, from
    // before the cut (refused on the standbys until one is promoted).
    let local: Vec<(String, TimedWriter)> = if kill == Kill::Cut {
        NODES
            .iter()
            .map(|n| {
                Ok((
                    n.to_string(),
                    TimedWriter::start(sandbox, n, "bench_local", true, WAIT * 2)?,
                ))
            })
            .collect::<Result<_>>()?
    } else {
        Vec::new()
    };
    let lease_file = GuardFiles::next_to(&sandbox.data_dir(&old)?).lease;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let killed_at = Instant::now();
    let killed_ms = wall_ms();
    // The last lease renewal before the cut: its deadline as the agent wrote it.
    let last_deadline = Arc::new(Mutex::new(None));
    let sampler = {
        let last = last_deadline.clone();
        tokio::spawn(async move {
            loop {
                if let Some(d) = read_deadline(&lease_file) {
                    *last.lock().expect("deadline lock") = Some(d);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    match kill {
        Kill::Cut => sandbox.network()?.isolate(&old)?,
        Kill::Host => sandbox.kill_host(&old)?,
        Kill::Postgres => sandbox.kill_postgres(&old)?,
        Kill::Switchover => {
            let request = pb::SwitchoverRequest {
                cluster: "main".into(),
                to: String::new(),
                actor: "pgquorum bench failover".into(),
                at_ms: 0,
            };
            sandbox
                .client()
                .call(|mut c| {
                    let request = request.clone();
                    async move { c.switchover(request).await }
                })
                .await?;
        }
    }
    // The writer stops at its first error: an old primary that is never fenced (a
    // cut one waiting forever for its standbys) is the failure to report, not a hang.
    *next_id = tokio::time::timeout(WAIT, writer)
        .await
        .map_err(|_| {
            Error::Timeout(format!(
                "the writer on {old} still had no error {WAIT:?} after the {kill:?}: it was never fenced"
            ))
        })?
        .map_err(|e| Error::Launch(format!("writer: {e}")))?
        + 1_000_000;
    sampler.abort();

    // First write anywhere else.
    let mut first_write = None;
    let mut probe_id = -(*next_id);
    while first_write.is_none() {
        if killed_at.elapsed() > WAIT {
            return Err(Error::Timeout(format!(
                "no write committed {WAIT:?} after killing {old}"
            )));
        }
        for node in NODES.iter().filter(|n| **n != old) {
            if let Some(c) = connect(sandbox, node).await {
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&probe_id];
                let insert = c.execute("INSERT INTO bench_acked (id) VALUES ($1)", &params);
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(500), insert).await {
                    first_write = Some(killed_at.elapsed());
                    break;
                }
            }
            probe_id -= 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // A synchronous standby again under the new primary.
    let after = sandbox
        .wait_for("a synchronous standby under the new primary", WAIT, |s| {
            s.epoch > before.epoch && !s.primary.is_empty() && s.nodes.iter().any(|n| n.sync_state == "sync")
        })
        .await?;
    let sync_restored = killed_at.elapsed();

    // The failover's steps, as the coordinators committed them.
    let cluster = sandbox.cluster_state().await?;
    let at = |kind: &str| {
        cluster
            .history
            .iter()
            .rev()
            .find(|e| e.kind == kind && e.at_ms >= killed_ms)
            .map(|e| e.at_ms.saturating_sub(killed_ms) as f64)
            .unwrap_or(f64::NAN)
    };

    // Every acknowledged id must be on the new primary.
    let new = connect(sandbox, &after.primary)
        .await
        .ok_or_else(|| Error::Launch("cannot reach the new primary".into()))?;
    let ids: Vec<i64> = acked.lock().expect("acked lock").clone();
    let present: i64 = match (ids.first(), ids.last()) {
        (Some(lo), Some(hi)) => new
            .query_one(
                "SELECT count(*) FROM bench_acked WHERE id BETWEEN $1 AND $2",
                &[lo, hi],
            )
            .await
            .map_err(|e| Error::Launch(format!("count: {e}")))?
            .get(0),
        _ => 0,
    };
    let kind = if kill == Kill::Switchover {
        "switchover"
    } else {
        "failover"
    };
    let (mut fence_after_renewal, mut overlap) = (f64::NAN, f64::NAN);
    let writer_on = |node: &str| local.iter().find(|(n, _)| n == node).map(|(_, w)| w);
    if let (Some(old_writer), Some(new_writer)) = (writer_on(&old), writer_on(&after.primary)) {
        overlap = check::overlap(old_writer, new_writer).ok_or_else(|| {
            Error::Launch(format!(
                "the overlap of {old} and {} could not be measured: a writer never wrote",
                after.primary
            ))
        })?;
        let lease = Duration::from_millis(lease_ms(sandbox).await?);
        let usable = lease.saturating_sub(pgquorum_client::lease::margin(lease));
        let deadline = *last_deadline.lock().expect("deadline lock");
        if let (Some(deadline), Some(refused)) = (deadline, old_writer.refused_since_last_ack()) {
            // The refusal on the lease file's clock (CLOCK_BOOTTIME).
            let refused_ns = boottime_ns().saturating_sub(refused.elapsed().as_nanos() as u64);
            let renewed = deadline.saturating_sub(usable.as_nanos() as u64);
            fence_after_renewal = (refused_ns as f64 - renewed as f64) / 1e6;
        }
    }
    Ok(Round {
        detect: at(&format!("{kind}_started")),
        fence: at("candidate_chosen"),
        promote: at(&format!("{kind}_completed")),
        first_write: first_write.map(|d| d.as_secs_f64() * 1000.0).unwrap_or(f64::NAN),
        sync_restored: sync_restored.as_secs_f64() * 1000.0,
        lost: ids.len().saturating_sub(present as usize),
        fence_after_renewal,
        overlap,
    })
}

/// The cluster's lease length.
async fn lease_ms(sandbox: &Sandbox) -> Result<u64> {
    let cluster = sandbox.cluster_state().await?;
    Ok(cluster.policy.unwrap_or_default().lease_ms)
}

/// Brings every node back: links heal, the old primary's agent restarts and rejoins it.
async fn heal(sandbox: &mut Sandbox) -> Result<()> {
    if let Ok(net) = sandbox.network() {
        net.heal_all()?;
    }
    for node in NODES {
        if sandbox.host_pids(node)?.is_empty() || !sandbox.agent_running(node) {
            sandbox.start_agent(node)?;
        }
    }
    sandbox
        .wait_for("every node HEALTHY with a sync standby", WAIT, |s| {
            s.nodes.iter().all(|n| n.health == "HEALTHY") && s.nodes.iter().any(|n| n.sync_state == "sync")
        })
        .await?;
    Ok(())
}
