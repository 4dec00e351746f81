//! This node's leadership as the lease rules need it: the term it leads in, and when a
//! quorum last acknowledged it.
//!
//! openraft does not make a leader step down when it loses its followers, so "I am the
//! leader" alone cannot justify a lease (DESIGN.md, "Only a leader with a live quorum
//! grants leases"). openraft's metrics carry `millis_since_quorum_ack`, computed when
//! the metrics are sent; a task here turns each value into an instant on arrival, so
//! the time since that contact keeps growing here even when openraft sends no more
//! metrics (a stalled core), instead of freezing at the last small number.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{NodeId, Raft};

/// How recently a quorum must have acknowledged a leader for it to count as leading a
/// working group (vouching for its endpoint map, gRPC health, alerts): several Raft
/// heartbeats (`raft.heartbeat_interval_ms` is well under it).
pub const QUORUM_RECENT: Duration = Duration::from_secs(2);

/// This node leads in `term`; a quorum acknowledged it at `quorum_acked_at` (None: not
/// yet in this term).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lead {
    pub term: u64,
    pub quorum_acked_at: Option<Instant>,
}

/// Shared, cheap to clone; kept current by [`Leadership::watch`].
#[derive(Clone, Default)]
pub struct Leadership(Arc<Mutex<Option<Lead>>>);

impl Leadership {
    /// Starts following `raft`'s metrics for node `id`.
    pub fn watch(id: NodeId, raft: &Raft) -> Leadership {
        let leadership = Leadership::default();
        let shared = leadership.clone();
        let mut metrics = raft.metrics();
        tokio::spawn(async move {
            loop {
                let lead = {
                    let m = metrics.borrow_and_update();
                    let now = Instant::now();
                    (m.current_leader == Some(id)).then(|| Lead {
                        term: m.current_term,
                        quorum_acked_at: m
                            .millis_since_quorum_ack
                            .and_then(|ms| now.checked_sub(Duration::from_millis(ms))),
                    })
                };
                shared.set(lead);
                if metrics.changed().await.is_err() {
                    shared.set(None);
                    return;
                }
            }
        });
        leadership
    }

    fn set(&self, lead: Option<Lead>) {
        let mut current = self.0.lock().expect("leadership lock poisoned");
        // Within one term the quorum contact only moves forward: a metrics update that
        // says nothing new must not erase it.
        *current = match (lead, *current) {
            (Some(next), Some(prev)) if next.term == prev.term => Some(Lead {
                term: next.term,
                quorum_acked_at: next.quorum_acked_at.max(prev.quorum_acked_at),
            }),
            (next, _) => next,
        };
    }

    /// The current lead, if this node leads.
    pub fn current(&self) -> Option<Lead> {
        *self.0.lock().expect("leadership lock poisoned")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorum_contact_only_moves_forward_within_a_term_and_resets_with_it() {
        let l = Leadership::default();
        let t0 = Instant::now();
        let at = |ms| Some(t0 + Duration::from_millis(ms));
        l.set(Some(Lead {
            term: 3,
            quorum_acked_at: at(100),
        }));
        l.set(Some(Lead {
            term: 3,
            quorum_acked_at: at(50),
        }));
        l.set(Some(Lead {
            term: 3,
            quorum_acked_at: None,
        }));
        assert_eq!(l.current().unwrap().quorum_acked_at, at(100));
        l.set(Some(Lead {
            term: 4,
            quorum_acked_at: None,
        }));
        assert_eq!(
            l.current(),
            Some(Lead {
                term: 4,
                quorum_acked_at: None
            })
        );
        l.set(None);
        assert_eq!(l.current(), None);
    }
}
