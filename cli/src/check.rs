//! Checking clients: writers that record what each node acknowledged and when, for
//! the end-to-end tests and the benchmarks that judge a fault by its outcome (two
//! primaries acknowledging at overlapping times, writes lost).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::launch::Sandbox;

/// One acknowledged commit: when its INSERT was sent and when the reply came.
#[derive(Clone, Copy, Debug)]
pub struct Ack {
    pub sent: Instant,
    pub acked: Instant,
}

#[derive(Default)]
struct Log {
    acks: Vec<Ack>,
    /// The first write that failed after the last acknowledged one.
    refused_since_last_ack: Option<Instant>,
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
        let log = Arc::new(Mutex::new(Log::default()));
        let record = log.clone();
        let conninfo = format!("{} connect_timeout=1", sandbox.conninfo(node)?);
        let insert = format!("INSERT INTO {table} DEFAULT VALUES");
        let refused = move |log: &Mutex<Log>| {
            let mut log = log.lock().expect("writer log lock");
            log.refused_since_last_ack.get_or_insert_with(Instant::now);
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
                    match client.execute(insert.as_str(), &[]).await {
                        Ok(_) => {
                            let mut log = record.lock().expect("writer log lock");
                            log.acks.push(Ack {
                                sent,
                                acked: Instant::now(),
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
        Ok(TimedWriter { log, task })
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
