//! `pgquorum bench raft`: commit latency, write throughput and leader failover of a
//! three-node coordinator group with durable storage, on loopback.
//!
//! The writes are real policy changes through AdminService, so each one is a gRPC
//! round trip, a Raft commit (leader and a follower fsync) and an apply. Failover
//! rounds kill -9 the leader and time until a write is committed by its successor,
//! then restart the old leader and let it catch up before the next round.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgquorum_client::{pb, Coordinators, Timeouts};
use serde_json::json;

use super::summary;
use crate::error::{Error, Result};
use crate::launch::{CoordinatorGroup, GroupSpec};
use crate::output::table;

pub struct Options {
    /// Sequential writes for the latency figures.
    pub writes: u64,
    /// Concurrent writers for the throughput figure.
    pub concurrency: u64,
    pub throughput_secs: u64,
    /// Kill-the-leader rounds.
    pub rounds: u64,
    /// Where the group's files go; a temporary directory when absent.
    pub dir: Option<PathBuf>,
    pub base_port: u16,
}

const CLUSTER: &str = "bench";

fn write_request(n: u64) -> pb::SetPolicyRequest {
    pb::SetPolicyRequest {
        cluster: CLUSTER.into(),
        settings: [(
            "max_lag_on_failover_bytes".to_string(),
            (1_000_000 + n).to_string(),
        )]
        .into(),
        actor: "pgquorum bench raft".into(),
    }
}

async fn write(coordinators: &Coordinators, n: u64) -> Result<()> {
    let request = write_request(n);
    coordinators
        .call(|mut c| {
            let request = request.clone();
            async move { c.set_policy(request).await }
        })
        .await?;
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub async fn run(opts: Options) -> Result<()> {
    // `_tmp` is declared first so it is dropped last, after the processes are stopped.
    let (dir, _tmp) = super::work_dir(&opts.dir, "pgquorum-bench-raft-")?;
    eprintln!(
        "starting a 3-node coordinator group in {} (ports {}+)",
        dir.display(),
        opts.base_port + 1
    );
    let mut group = CoordinatorGroup::start(GroupSpec::new(&dir, opts.base_port, 3)).await?;
    let client = group.client();
    client
        .call(|mut c| async move {
            let request = pb::CreateClusterRequest {
                name: CLUSTER.into(),
                ..Default::default()
            };
            c.create_cluster(request).await
        })
        .await?;

    // Commit latency: one writer, one write at a time.
    eprintln!("commit latency: {} sequential writes", opts.writes);
    let mut latencies = Vec::with_capacity(opts.writes as usize);
    for n in 0..opts.writes {
        let start = Instant::now();
        write(&client, n).await?;
        latencies.push(ms(start.elapsed()));
    }

    // Throughput: many writers at once, for a fixed time.
    eprintln!(
        "throughput: {} concurrent writers for {} s",
        opts.concurrency, opts.throughput_secs
    );
    let client = Arc::new(client);
    let committed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(opts.throughput_secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..opts.concurrency {
        let (client, committed) = (client.clone(), committed.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = w << 32;
            while Instant::now() < deadline {
                write(&client, n).await?;
                committed.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
            Ok::<(), Error>(())
        }));
    }
    for t in tasks {
        t.await
            .map_err(|e| Error::Launch(format!("writer task: {e}")))??;
    }
    let writes_per_sec = committed.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();

    // Failover: kill -9 the leader, time until its successor commits a write.
    let mut failovers = Vec::new();
    let impatient = Coordinators::new(
        group.addrs(),
        Timeouts {
            connect: Duration::from_millis(100),
            request: Duration::from_millis(500),
            overall: Duration::from_secs(1),
            unreachable: None,
        },
    )?;
    for round in 1..=opts.rounds {
        let leader = group.wait_for_leader(Duration::from_secs(20)).await?;
        let index = group.status_of(leader).await?.last_log_index;
        for id in group.ids() {
            group.wait_applied(id, index, Duration::from_secs(20)).await?;
        }
        group.kill(leader)?;
        let killed = Instant::now();
        let mut n = 0;
        loop {
            n += 1;
            if write(&impatient, (round << 40) + n).await.is_ok() {
                break;
            }
            if killed.elapsed() > Duration::from_secs(30) {
                return Err(Error::Timeout(format!(
                    "round {round}: no write committed 30 s after killing the leader"
                )));
            }
        }
        let took = ms(killed.elapsed());
        eprintln!("round {round}: killed leader {leader}; a new leader committed a write after {took:.1} ms");
        failovers.push(took);
        group.start_node(leader)?;
    }

    let commit = summary(&latencies);
    let failover = summary(&failovers);
    let rows = vec![
        vec!["commit latency (ms)".into(), fmt3(&commit)],
        vec![
            "writes per second".into(),
            format!("{writes_per_sec:.0} ({} writers)", opts.concurrency),
        ],
        vec![
            "kill -9 leader -> first write (ms)".into(),
            format!("{} over {} rounds", fmt3(&failover), opts.rounds),
        ],
    ];
    println!("{}", table(&["MEASURE", "RESULT"], rows));
    let result = json!({
        "bench": "raft",
        "nodes": 3,
        "writes": opts.writes,
        "commit_ms": commit,
        "writes_per_sec": writes_per_sec.round(),
        "concurrency": opts.concurrency,
        "rounds": opts.rounds,
        "failover_ms": failover,
    });
    println!("{result}");
    Ok(())
}

fn fmt3(v: &serde_json::Value) -> String {
    format!("p50 {}  p99 {}  max {}", v["p50"], v["p99"], v["max"])
}
