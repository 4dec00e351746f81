//! Connection workers: a fixed set of OS threads, each running its own
//! single-threaded tokio runtime, that pump bytes between a client and its backend.
//!
//! Why not the ordinary work-stealing runtime: on the data path a TCP proxy costs
//! its syscalls plus the scheduler's work per wake-up. Measured under pgbench
//! select-only, the multi-threaded runtime added about 0.4 futex calls per
//! transaction (threads parking and waking each other, tasks migrating between
//! cores), which put the router's CPU per transaction at HAProxy's level. A pipe
//! pinned to one single-threaded runtime is woken only by that thread's own epoll
//! loop: no cross-thread wake-ups, no stealing, no shared queue, no lock.
//!
//! Everything that is not byte pumping happens before a pipe gets here: the
//! listeners, routing, waiting for a primary and connecting the backend run on the
//! main runtime (so a port already in use fails start-up with "address in use",
//! which SO_REUSEPORT per worker would hide). That keeps the workers' runtimes down
//! to the I/O driver alone, with no timer wheel or child-process reaping to tend on
//! every wake-up.
//!
//! Closing connections to a replaced primary is also done here without touching the
//! data path: each worker keeps the abort handles of its read-write pipes by epoch,
//! and one task per worker aborts the stale ones when a map with a new epoch
//! arrives, instead of every pipe polling the map on each wake-up.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use metrics::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::proxy::Maps;

/// A connected client/backend pair to carry until either side closes.
struct Pipe {
    client: std::net::TcpStream,
    server: std::net::TcpStream,
    /// Set for a read-write pipe: the primary's epoch; the pipe is closed when
    /// the map's epoch moves past it.
    epoch: Option<u64>,
    /// Dropped when the pipe ends (counters, metrics).
    on_close: Box<dyn Send>,
    traffic: Traffic,
}

/// Where a pipe counts the bytes it carries, each way.
#[derive(Clone)]
pub struct Traffic {
    pub from_client: Counter,
    pub from_backend: Counter,
}

impl Traffic {
    /// Counted nowhere.
    pub fn none() -> Traffic {
        Traffic {
            from_client: Counter::noop(),
            from_backend: Counter::noop(),
        }
    }
}

/// A stream that counts what is read from it (an atomic add per read: nothing next
/// to the syscall).
struct Counted<S> {
    inner: S,
    read: Counter,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            self.read.increment((buf.filled().len() - before) as u64);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

struct Worker {
    pipes: mpsc::UnboundedSender<Pipe>,
    open: Arc<AtomicUsize>,
}

/// Read-write pipes of one worker: id -> (epoch, abort handle).
type Epochs = Arc<Mutex<HashMap<u64, (u64, AbortHandle)>>>;

/// Handle to the worker threads; cheap to clone.
#[derive(Clone)]
pub struct Workers(Arc<Vec<Worker>>);

impl Workers {
    /// Starts `count` worker threads (at least one) that follow `maps` for epochs.
    pub fn start(count: usize, maps: Maps) -> std::io::Result<Workers> {
        let mut workers = Vec::new();
        for i in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()?;
            let (tx, rx) = mpsc::unbounded_channel();
            let open = Arc::new(AtomicUsize::new(0));
            let (open2, maps) = (open.clone(), maps.clone());
            std::thread::Builder::new()
                .name(format!("router-worker-{i}"))
                .spawn(move || runtime.block_on(work(rx, open2, maps)))?;
            workers.push(Worker { pipes: tx, open });
        }
        Ok(Workers(Arc::new(workers)))
    }

    /// Hands a connected pair to the least-busy worker. `epoch`: see [`Pipe`];
    /// `on_close` is dropped when the pipe ends; bytes are counted in `traffic`.
    pub fn carry(
        &self,
        client: TcpStream,
        server: TcpStream,
        epoch: Option<u64>,
        on_close: impl Send + 'static,
        traffic: Traffic,
    ) {
        let (Ok(client), Ok(server)) = (client.into_std(), server.into_std()) else {
            return;
        };
        let worker = self
            .0
            .iter()
            .min_by_key(|w| w.open.load(Ordering::Relaxed))
            .expect("at least one worker");
        worker.open.fetch_add(1, Ordering::Relaxed);
        let pipe = Pipe {
            client,
            server,
            epoch,
            on_close: Box::new(on_close),
            traffic,
        };
        if worker.pipes.send(pipe).is_err() {
            worker.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// One worker's loop: start each pipe it is given; close stale read-write pipes.
async fn work(mut pipes: mpsc::UnboundedReceiver<Pipe>, open: Arc<AtomicUsize>, maps: Maps) {
    let epochs: Epochs = Arc::default();
    tokio::spawn(close_stale(maps.clone(), epochs.clone()));
    let mut next_id = 0u64;
    while let Some(pipe) = pipes.recv().await {
        next_id += 1;
        let id = next_id;
        let Pipe {
            client,
            server,
            epoch,
            on_close,
            traffic,
        } = pipe;
        let (open, epochs2) = (open.clone(), epochs.clone());
        let task = tokio::spawn(async move {
            let _done = Done {
                id,
                open,
                epochs: epochs2,
                _on_close: on_close,
            };
            // Registering with this thread's reactor fails only if it is shutting down.
            let (Ok(client), Ok(server)) = (TcpStream::from_std(client), TcpStream::from_std(server)) else {
                return;
            };
            let mut client = Counted {
                inner: client,
                read: traffic.from_client,
            };
            let mut server = Counted {
                inner: server,
                read: traffic.from_backend,
            };
            // The pipe yields whenever a socket has nothing to read; it never needs
            // the scheduler's budget to be fair to the other pipes.
            let _ = tokio::task::unconstrained(tokio::io::copy_bidirectional(&mut client, &mut server)).await;
        });
        if let Some(e) = epoch {
            let current = maps.borrow().as_ref().map(|m| m.epoch);
            if current.is_some_and(|c| c != e) {
                // The epoch moved while this pipe was being connected.
                task.abort();
            } else {
                lock(&epochs).insert(id, (e, task.abort_handle()));
            }
        }
    }
}

/// Aborts every read-write pipe whose epoch is not the map's.
async fn close_stale(mut maps: Maps, epochs: Epochs) {
    while maps.changed().await.is_ok() {
        let Some(epoch) = maps.borrow_and_update().as_ref().map(|m| m.epoch) else {
            continue;
        };
        let mut stale = Vec::new();
        lock(&epochs).retain(|_, (e, handle)| {
            let keep = *e == epoch;
            if !keep {
                stale.push(handle.clone());
            }
            keep
        });
        // Aborted outside the lock: a pipe's bookkeeping takes it when it ends.
        for handle in stale {
            tracing::debug!(
                new = epoch,
                "epoch moved: closing a connection to the old primary"
            );
            handle.abort();
        }
    }
}

fn lock(epochs: &Epochs) -> std::sync::MutexGuard<'_, HashMap<u64, (u64, AbortHandle)>> {
    // Only this worker's thread takes the lock; poisoning would need a panic there.
    epochs.lock().unwrap_or_else(|e| e.into_inner())
}

/// Bookkeeping when a pipe ends, however it ends (finished or aborted).
struct Done {
    id: u64,
    open: Arc<AtomicUsize>,
    epochs: Epochs,
    _on_close: Box<dyn Send>,
}

impl Drop for Done {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        lock(&self.epochs).remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use pgquorum_client::pb;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::watch;

    use super::{Traffic, Workers};

    /// A connected pair over loopback: (the end we keep, the end we hand over).
    async fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let addr = listener.local_addr().unwrap();
        let (connected, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (connected.unwrap(), accepted.unwrap().0)
    }

    /// The router closed the client's connection (end of stream), rather than leave
    /// it hanging.
    async fn assert_closed(client: &mut TcpStream) {
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("the client's connection is closed, not left hanging")
            .unwrap_or(0);
        assert_eq!(n, 0, "end of stream for the client");
    }

    fn map(epoch: u64) -> Option<pb::EndpointMap> {
        Some(pb::EndpointMap {
            epoch,
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn pipes_bytes_and_closes_read_write_pipes_when_the_epoch_moves() {
        let (tx, maps) = watch::channel(map(1));
        let workers = Workers::start(2, maps).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        // client <-> [router side a | router side b] <-> backend
        let (mut client, router_a) = pair(&listener).await;
        let (router_b, mut backend) = pair(&listener).await;
        let (dropped_tx, mut dropped) = tokio::sync::mpsc::unbounded_channel::<()>();
        struct Dropped(tokio::sync::mpsc::UnboundedSender<()>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                let _ = self.0.send(());
            }
        }
        let (bytes_in, bytes_out) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let counted = Traffic {
            from_client: metrics::Counter::from_arc(bytes_in.clone()),
            from_backend: metrics::Counter::from_arc(bytes_out.clone()),
        };
        workers.carry(router_a, router_b, Some(1), Dropped(dropped_tx.clone()), counted);
        // A read-only pipe (no epoch) on the same worker set stays open.
        let (mut ro_client, ro_a) = pair(&listener).await;
        let (ro_b, mut ro_backend) = pair(&listener).await;
        workers.carry(ro_a, ro_b, None, Dropped(dropped_tx), Traffic::none());

        let mut buf = [0u8; 5];
        client.write_all(b"query").await.unwrap();
        backend.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"query");
        backend.write_all(b"reply").await.unwrap();
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"reply");
        assert_eq!(
            (
                bytes_in.load(Ordering::Relaxed),
                bytes_out.load(Ordering::Relaxed)
            ),
            (5, 5),
            "bytes each way"
        );

        // A map of the same epoch changes nothing; a new epoch closes the rw pipe at
        // once, although the (old) backend is still there and silent.
        tx.send_replace(map(1));
        tx.send_replace(map(2));
        assert_closed(&mut client).await;
        tokio::time::timeout(Duration::from_secs(5), dropped.recv())
            .await
            .expect("the pipe's bookkeeping runs when it is closed");

        ro_client.write_all(b"still").await.unwrap();
        ro_backend.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"still", "read-only pipes do not follow the epoch");
    }

    #[tokio::test]
    async fn a_pipe_connected_under_an_old_epoch_is_closed_on_arrival() {
        let (_tx, maps) = watch::channel(map(3));
        let workers = Workers::start(1, maps).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (mut client, a) = pair(&listener).await;
        let (b, _backend) = pair(&listener).await;
        workers.carry(a, b, Some(2), (), Traffic::none());
        assert_closed(&mut client).await;
    }
}
