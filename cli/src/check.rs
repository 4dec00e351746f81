//! Checking clients: writers that record what each node acknowledged and when, for
//! the end-to-end tests and the benchmarks that judge a fault by its outcome (two
//! primaries acknowledging at overlapping times, writes lost).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::launch::Sandbox;

/// One acknowledged commit: when its INSERT was sent and when the reply came, the
/// row's id, and the port of the server that committed it (which node: a writer
/// through the router does not choose).
#[derive(Clone, Copy, Debug)]
pub struct Ack {
    pub sent: Instant,
    pub acked: Instant,
    pub id: i64,
    /// The server's port: which node committed it.
    pub port: u16,
    /// The timeline the server wrote it on: each promotion starts a new one, so it
    /// stands for the epoch the write was acknowledged in.
    pub timeline: u32,
}

#[derive(Default)]
struct Log {
    acks: Vec<Ack>,
    /// The first write that failed after the last acknowledged one.
    refused_since_last_ack: Option<Instant>,
    /// When each write failed (refused, or the connection lost or not made).
    refusals: Vec<Instant>,
}

/// A writer that records when each of its commits was sent and acknowledged. It
/// retries refused writes (on a standby, until it is promoted) every millisecond and
/// reconnects after a lost connection, for at most `for_at_most`; it stops when
/// dropped. Its blind spot: a primary that starts accepting writes is noticed within
/// a millisecond plus a round trip.
pub struct TimedWriter {
    log: Arc<Mutex<Log>>,
    task: tokio::task::JoinHandle<()>,
}

impl TimedWriter {
    /// Inserts into `table` (which must exist, with defaults for every column) on
    /// `node`, with `synchronous_commit = local` when `local` (any session may set
    /// it: only the lease then stops an old primary's acknowledgements).
    pub fn start(
        sandbox: &Sandbox,
        node: &str,
        table: &str,
        local: bool,
        for_at_most: Duration,
    ) -> crate::Result<TimedWriter> {
        Ok(TimedWriter::start_at(
            &sandbox.conninfo(node)?,
            table,
            local,
            for_at_most,
        ))
    }

    /// Like [`TimedWriter::start`], to any server: `conninfo` may name a router.
    /// `table` needs a `bigserial` column `id`.
    pub fn start_at(conninfo: &str, table: &str, local: bool, for_at_most: Duration) -> TimedWriter {
        let log = Arc::new(Mutex::new(Log::default()));
        let record = log.clone();
        let conninfo = format!("{conninfo} connect_timeout=1");
        let insert = format!(
            "INSERT INTO {table} DEFAULT VALUES RETURNING id, inet_server_port(), \
             ('x' || substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8))::bit(32)::int"
        );
        let refused = move |log: &Mutex<Log>| {
            let mut log = log.lock().expect("writer log lock");
            let now = Instant::now();
            log.refused_since_last_ack.get_or_insert(now);
            log.refusals.push(now);
        };
        let task = tokio::spawn(async move {
            let end = Instant::now() + for_at_most;
            while Instant::now() < end {
                let Ok((client, conn)) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await
                else {
                    refused(&record);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                tokio::spawn(conn);
                if local
                    && client
                        .batch_execute("SET synchronous_commit = local")
                        .await
                        .is_err()
                {
                    continue;
                }
                // The refusals on a standby are expected: keep them out of its log.
                let _ = client.batch_execute("SET log_min_messages = fatal").await;
                while Instant::now() < end && !client.is_closed() {
                    let sent = Instant::now();
                    match client.query_one(insert.as_str(), &[]).await {
                        Ok(row) => {
                            let acked = Instant::now();
                            let mut log = record.lock().expect("writer log lock");
                            log.acks.push(Ack {
                                sent,
                                acked,
                                id: row.get(0),
                                port: row.try_get::<_, Option<i32>>(1).ok().flatten().unwrap_or(0) as u16,
                                timeline: row.try_get::<_, i32>(2).unwrap_or(0) as u32,
                            });
                            log.refused_since_last_ack = None;
                        }
                        // Refused (read-only standby) or lost: try again shortly.
                        Err(_) => {
                            refused(&record);
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
            }
        });
        TimedWriter { log, task }
    }

    fn read<T>(&self, f: impl FnOnce(&Log) -> T) -> T {
        f(&self.log.lock().expect("writer log lock"))
    }

    /// When each acknowledged commit returned, in order.
    pub fn acks(&self) -> Vec<Instant> {
        self.read(|l| l.acks.iter().map(|a| a.acked).collect())
    }

    /// The first acknowledged commit, if any.
    pub fn first(&self) -> Option<Ack> {
        self.read(|l| l.acks.first().copied())
    }

    /// The last acknowledged commit, if any.
    pub fn last(&self) -> Option<Ack> {
        self.read(|l| l.acks.last().copied())
    }

    /// Every acknowledged commit whose reply came at or after `t`.
    pub fn acked_since(&self, t: Instant) -> Vec<Ack> {
        self.read(|l| l.acks.iter().filter(|a| a.acked >= t).copied().collect())
    }

    /// Every acknowledged commit, in order.
    pub fn all(&self) -> Vec<Ack> {
        self.read(|l| l.acks.clone())
    }

    /// When each write that failed between `from` and `to` failed.
    pub fn refused_between(&self, from: Instant, to: Instant) -> Vec<Instant> {
        self.read(|l| {
            l.refusals
                .iter()
                .filter(|t| **t >= from && **t <= to)
                .copied()
                .collect()
        })
    }

    /// When the first write after the last acknowledged one failed, if one did.
    pub fn refused_since_last_ack(&self) -> Option<Instant> {
        self.read(|l| l.refused_since_last_ack)
    }
}

impl Drop for TimedWriter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How long `old`'s last acknowledgement came after `new`'s first write was sent
/// (negative: a gap, as it must be; comparing with the send, not the reply, leaves
/// only the writer's blind spot between the new primary accepting writes and the
/// writer noticing). None until both have written.
pub fn overlap(old: &TimedWriter, new: &TimedWriter) -> Option<f64> {
    let (last_old, first_new) = (old.last()?, new.first()?);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Some(if last_old.acked >= first_new.sent {
        ms(last_old.acked - first_new.sent)
    } else {
        -ms(first_new.sent - last_old.acked)
    })
}

/// Two nodes acknowledging writes as primaries at overlapping times: `from`'s
/// acknowledgement came `overlap_ms` after `to`'s first write of its turn was sent.
#[derive(Clone, Debug, PartialEq)]
pub struct SplitBrain {
    pub from: String,
    pub to: String,
    pub overlap_ms: f64,
}

/// Whether the nodes took turns: every acknowledged write of every writer (on a node,
/// through a router), ordered by its reply, forms runs of one node each; between two
/// runs, the old node's last reply must come before the new node's first write was
/// sent. Returns each turn where it did not. Pure.
pub fn took_turns(acks: &[(String, Ack)]) -> Vec<SplitBrain> {
    turns(acks)
        .windows(2)
        .filter(|pair| pair[0].last_acked >= pair[1].first_sent)
        .map(|pair| SplitBrain {
            from: pair[0].node.clone(),
            to: pair[1].node.clone(),
            overlap_ms: (pair[0].last_acked - pair[1].first_sent).as_secs_f64() * 1000.0,
        })
        .collect()
}

/// Where an acknowledgement came on an older timeline than one before it (in reply
/// order): a write taken by a primary of an older epoch — through a router that
/// went back to it, or directly. Pure.
pub fn epochs_went_back(acks: &[(String, Ack)]) -> Vec<String> {
    let mut sorted: Vec<&(String, Ack)> = acks.iter().collect();
    sorted.sort_by_key(|(_, a)| a.acked);
    let mut newest: Option<&(String, Ack)> = None;
    let mut found = Vec::new();
    for entry in sorted {
        let (node, ack) = entry;
        match newest {
            Some((n, a)) if ack.timeline < a.timeline => found.push(format!(
                "write {} acknowledged by {node} on timeline {} after write {} by {n} on timeline {}",
                ack.id, ack.timeline, a.id, a.timeline
            )),
            Some((_, a)) if ack.timeline == a.timeline => {}
            _ => newest = Some(entry),
        }
    }
    found
}

/// One node's unbroken run of acknowledgements, in reply order.
#[derive(Clone, Debug)]
pub struct Turn {
    pub node: String,
    /// The earliest send among the run's writes.
    pub first_sent: Instant,
    pub last_acked: Instant,
}

/// The runs of one node each that every acknowledged write, ordered by its reply,
/// falls into. Pure.
pub fn turns(acks: &[(String, Ack)]) -> Vec<Turn> {
    let mut sorted: Vec<&(String, Ack)> = acks.iter().collect();
    sorted.sort_by_key(|(_, a)| a.acked);
    let mut runs: Vec<Turn> = Vec::new();
    for (node, ack) in sorted {
        match runs.last_mut() {
            Some(run) if run.node == *node => {
                run.first_sent = run.first_sent.min(ack.sent);
                run.last_acked = ack.acked;
            }
            _ => runs.push(Turn {
                node: node.clone(),
                first_sent: ack.sent,
                last_acked: ack.acked,
            }),
        }
    }
    runs
}

/// Whether the nodes took writes in an order the coordinators published: `taken` (one
/// entry per turn) is a subsequence of `published` (a primary that took no write is
/// skipped; one that took writes out of turn is not). Pure.
pub fn in_published_order(taken: &[String], published: &[String]) -> bool {
    let mut rest = published.iter();
    taken.iter().all(|t| rest.any(|p| p == t))
}

/// What the coordinators published, as a router sees it: every endpoint map's
/// (version, epoch, primary), in the order received.
#[derive(Clone, Debug, Default)]
pub struct Published(pub Vec<(u64, u64, Option<String>)>);

impl Published {
    /// Where the maps break the rules: a newer map with an older epoch, or one epoch
    /// naming two primaries. Pure.
    pub fn violations(&self) -> Vec<String> {
        let mut found = Vec::new();
        let mut primary_of: std::collections::BTreeMap<u64, String> = Default::default();
        for pair in self.0.windows(2) {
            let ((v1, e1, _), (v2, e2, _)) = (&pair[0], &pair[1]);
            if e2 < e1 {
                found.push(format!(
                    "map version {v2} has epoch {e2}, older than version {v1}'s {e1}"
                ));
            }
        }
        for (v, e, p) in &self.0 {
            if let Some(p) = p {
                match primary_of.get(e) {
                    Some(q) if q != p => found.push(format!(
                        "epoch {e} names two primaries: {q}, then {p} (version {v})"
                    )),
                    _ => {
                        primary_of.insert(*e, p.clone());
                    }
                }
            }
        }
        found
    }

    /// The primaries in the order they were published (each once per turn).
    pub fn primaries(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for p in self.0.iter().filter_map(|(_, _, p)| p.clone()) {
            if out.last() != Some(&p) {
                out.push(p);
            }
        }
        out
    }
}

/// Runs the checking clients of a fault scenario — a `synchronous_commit = local`
/// writer on every node, a writer through the router (synchronous commit as the
/// cluster's policy has it), and a watch of the published endpoint maps — and judges
/// the outcome once the faults are healed ([`Checker::verdict`]).
pub struct Checker {
    nodes: std::collections::BTreeMap<String, TimedWriter>,
    router: Option<TimedWriter>,
    ports: std::collections::BTreeMap<u16, String>,
    published: Arc<Mutex<Published>>,
    watch: tokio::task::JoinHandle<()>,
    table: String,
}

/// Whether the cluster is settled: a primary, and every node healthy on its timeline
/// (what a fault scenario waits for after healing).
pub fn settled(s: &pgquorum_client::pb::StatusReply) -> bool {
    let primary_timeline = s.nodes.iter().find(|p| p.name == s.primary).map(|p| p.timeline);
    !s.primary.is_empty()
        && s.nodes
            .iter()
            .all(|n| n.health == "HEALTHY" && Some(n.timeline) == primary_timeline)
}

/// A scenario's outcome.
#[derive(Clone, Debug, Default)]
pub struct Verdict {
    /// Writes acknowledged by all writers.
    pub acked_writes: usize,
    /// Acknowledged through the router (synchronous commit) but not on the primary at
    /// the end.
    pub lost_acked_writes: Vec<i64>,
    pub split_brain: Vec<SplitBrain>,
    /// Endpoint maps that broke the rules ([`Published::violations`]), and nodes that
    /// took writes out of the published order.
    pub published: Vec<String>,
    /// The primaries in turn, as published.
    pub primaries: Vec<String>,
    /// Nodes not on the final primary's timeline, or not healthy, at the end.
    pub stragglers: Vec<String>,
    /// Writes acknowledged on an older timeline than one before them
    /// ([`epochs_went_back`]).
    pub epochs_back: Vec<String>,
}

impl Verdict {
    /// Every broken rule, for an assertion message; empty when the scenario passed.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.lost_acked_writes.is_empty() {
            out.push(format!("acknowledged writes lost: {:?}", self.lost_acked_writes));
        }
        out.extend(self.split_brain.iter().map(|s| format!("two primaries: {s:?}")));
        out.extend(self.published.iter().cloned());
        out.extend(self.stragglers.iter().cloned());
        out.extend(self.epochs_back.iter().cloned());
        out
    }
}

impl Checker {
    /// Creates `table` on the primary (its `id` a random key, never reused as a
    /// sequence's values are when a promoted standby lacked the old primary's last
    /// WAL), starts the writers and the watch; returns once the primary's writer has
    /// written.
    pub async fn start(sandbox: &Sandbox, table: &str, for_at_most: Duration) -> crate::Result<Checker> {
        let status = sandbox.status().await?;
        let primary = status.primary.clone();
        let (client, conn) = tokio_postgres::connect(&sandbox.conninfo(&primary)?, tokio_postgres::NoTls)
            .await
            .map_err(|e| crate::Error::Launch(format!("connect to {primary}: {e}")))?;
        tokio::spawn(conn);
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {table} (id bigserial PRIMARY KEY)"
            ))
            .await
            .map_err(|e| crate::Error::Launch(format!("create {table}: {e}")))?;
        let mut nodes = std::collections::BTreeMap::new();
        let mut ports = std::collections::BTreeMap::new();
        for name in sandbox.node_names() {
            ports.insert(sandbox.port(&name)?, name.clone());
            nodes.insert(
                name.clone(),
                TimedWriter::start(sandbox, &name, table, true, for_at_most)?,
            );
        }
        let router = sandbox.router_addrs().map(|(rw, _)| {
            let (host, port) = rw.rsplit_once(':').unwrap_or((rw.as_str(), "5432"));
            let conninfo = format!("host={host} port={port} user=postgres dbname=postgres");
            TimedWriter::start_at(&conninfo, table, false, for_at_most)
        });
        let published = Arc::new(Mutex::new(Published::default()));
        let record = published.clone();
        let mut maps =
            pgquorum_client::watch::watch_endpoints(sandbox.client_addrs(), sandbox.cluster().to_string());
        let watch = tokio::spawn(async move {
            while let Some(Ok(map)) = maps.next().await {
                let primary = map.primary.map(|p| p.name);
                record
                    .lock()
                    .expect("published lock")
                    .0
                    .push((map.version, map.epoch, primary));
            }
        });
        let checker = Checker {
            nodes,
            router,
            ports,
            published,
            watch,
            table: table.to_string(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while checker.nodes[&primary].last().is_none() {
            if Instant::now() > deadline {
                return Err(crate::Error::Launch(format!(
                    "{primary}'s writer wrote nothing in 30 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(checker)
    }

    /// The writer on `node`.
    pub fn on(&self, node: &str) -> Option<&TimedWriter> {
        self.nodes.get(node)
    }

    /// Every acknowledged write, by the node that committed it.
    fn all_acks(&self) -> Vec<(String, Ack)> {
        let mut all = Vec::new();
        for w in self.nodes.values().chain(self.router.as_ref()) {
            for a in w.all() {
                let node = self
                    .ports
                    .get(&a.port)
                    .cloned()
                    .unwrap_or_else(|| format!("port {}", a.port));
                all.push((node, a));
            }
        }
        all
    }

    /// Judges the run: call after healing, with the status that showed the cluster
    /// back (a healthy primary, every node back: `sandbox.wait_for`).
    pub async fn verdict(
        &self,
        sandbox: &Sandbox,
        status: &pgquorum_client::pb::StatusReply,
    ) -> crate::Result<Verdict> {
        let all = self.all_acks();
        let primary = status.primary.clone();
        let mut v = Verdict {
            acked_writes: all.len(),
            split_brain: took_turns(&all),
            epochs_back: epochs_went_back(&all),
            ..Default::default()
        };
        let published = self.published.lock().expect("published lock").clone();
        v.published = published.violations();
        v.primaries = published.primaries();
        let taken: Vec<String> = turns(&all).into_iter().map(|t| t.node).collect();
        if !in_published_order(&taken, &v.primaries) {
            v.published.push(format!(
                "nodes took writes in the order {taken:?}, not as published: {:?}",
                v.primaries
            ));
        }
        let primary_timeline = status
            .nodes
            .iter()
            .find(|n| n.name == primary)
            .map(|n| n.timeline);
        for n in &status.nodes {
            if n.health != "HEALTHY" || Some(n.timeline) != primary_timeline {
                v.stragglers.push(format!(
                    "{} ends {} on timeline {} (primary {primary} on {primary_timeline:?})",
                    n.name, n.health, n.timeline
                ));
            }
        }
        if let Some(router) = &self.router {
            let acked: Vec<i64> = router.all().iter().map(|a| a.id).collect();
            let (client, conn) = tokio_postgres::connect(&sandbox.conninfo(&primary)?, tokio_postgres::NoTls)
                .await
                .map_err(|e| crate::Error::Launch(format!("connect to {primary}: {e}")))?;
            tokio::spawn(conn);
            let rows = client
                .query(
                    &format!("SELECT id FROM {} WHERE id = ANY($1)", self.table),
                    &[&acked],
                )
                .await
                .map_err(|e| crate::Error::Launch(format!("read {}: {e}", self.table)))?;
            let present: std::collections::BTreeSet<i64> = rows.iter().map(|r| r.get(0)).collect();
            v.lost_acked_writes = acked.into_iter().filter(|id| !present.contains(id)).collect();
        }
        Ok(v)
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.watch.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(t0: Instant, sent: u64, acked: u64) -> Ack {
        Ack {
            sent: t0 + Duration::from_millis(sent),
            acked: t0 + Duration::from_millis(acked),
            id: 0,
            port: 0,
            timeline: 1,
        }
    }

    #[test]
    fn turns_are_taken_only_with_a_gap_between_the_old_reply_and_the_new_send() {
        let t0 = Instant::now();
        let n = |s: &str| s.to_string();
        let clean = vec![
            (n("node1"), ack(t0, 0, 1)),
            (n("node1"), ack(t0, 2, 3)),
            (n("node2"), ack(t0, 10, 11)),
            (n("node2"), ack(t0, 12, 13)),
            (n("node1"), ack(t0, 20, 21)),
        ];
        assert!(took_turns(&clean).is_empty());
        // node2's first write of its turn was sent (at 2.5) before node1's last reply.
        let mut overlapping = clean.clone();
        overlapping.push((n("node2"), ack(t0, 2, 9)));
        let found = took_turns(&overlapping);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!((found[0].from.as_str(), found[0].to.as_str()), ("node1", "node2"));
        assert!((found[0].overlap_ms - 1.0).abs() < 0.01, "{found:?}");
        // Interleaved replies are two turns each way.
        let interleaved = vec![
            (n("node1"), ack(t0, 0, 1)),
            (n("node2"), ack(t0, 0, 2)),
            (n("node1"), ack(t0, 0, 3)),
        ];
        assert_eq!(took_turns(&interleaved).len(), 2);
        // Back and forth with gaps is only right when published so.
        let taken: Vec<String> = turns(&clean).into_iter().map(|t| t.node).collect();
        assert_eq!(taken, vec!["node1", "node2", "node1"]);
        let published = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(in_published_order(
            &taken,
            &published(&["node1", "node2", "node1"])
        ));
        assert!(in_published_order(
            &taken,
            &published(&["node1", "node3", "node2", "node1"])
        ));
        assert!(!in_published_order(&taken, &published(&["node1", "node2"])));
    }

    #[test]
    fn an_acknowledgement_on_an_older_timeline_after_a_newer_one_is_found() {
        let t0 = Instant::now();
        let on = |node: &str, tl: u32, sent: u64, acked: u64| {
            (
                node.to_string(),
                Ack {
                    timeline: tl,
                    id: acked as i64,
                    ..ack(t0, sent, acked)
                },
            )
        };
        let ordered = vec![
            on("node1", 1, 0, 1),
            on("node2", 2, 10, 11),
            on("node2", 2, 12, 13),
            on("node1", 3, 20, 21),
        ];
        assert!(epochs_went_back(&ordered).is_empty());
        // The old primary (timeline 2) acknowledged once more after timeline 3 began.
        let mut back = ordered.clone();
        back.push(on("node2", 2, 21, 22));
        let found = epochs_went_back(&back);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].contains(
                "write 22 acknowledged by node2 on timeline 2 after write 21 by node1 on timeline 3"
            ),
            "{found:?}"
        );
    }

    #[test]
    fn published_maps_never_go_back_an_epoch_nor_name_two_primaries_in_one() {
        let p = |s: &str| Some(s.to_string());
        let good = Published(vec![
            (1, 1, p("node1")),
            (2, 2, None),
            (3, 2, p("node2")),
            (4, 2, p("node2")),
        ]);
        assert!(good.violations().is_empty());
        assert_eq!(good.primaries(), vec!["node1", "node2"]);
        let back = Published(vec![(1, 2, p("node2")), (2, 1, p("node1"))]);
        assert_eq!(back.violations().len(), 1, "{:?}", back.violations());
        let two = Published(vec![(1, 2, p("node2")), (2, 2, p("node3"))]);
        assert_eq!(two.violations().len(), 1, "{:?}", two.violations());
    }
}
