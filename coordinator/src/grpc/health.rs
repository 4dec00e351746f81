//! The standard gRPC health service, kept true: SERVING only while this coordinator
//! belongs to a working group. A leader that lost its followers stays leader in
//! openraft and answered SERVING while nothing could be committed; a load balancer or
//! Kubernetes probe would have kept sending it requests.

use std::time::{Duration, Instant};

use openraft::ServerState;
use pgquorum_proto::v1::admin_service_server::AdminServiceServer;
use tonic_health::server::HealthReporter;

use super::admin_service::AdminServiceImpl;
use crate::raft::group::Group;
use crate::raft::leadership::{Lead, Leadership, QUORUM_RECENT};
use crate::raft::{NodeId, Raft};

/// How often the status is recomputed.
const EVERY: Duration = Duration::from_millis(250);

/// What the health status is computed from (one snapshot).
#[derive(Clone, Debug)]
pub struct View {
    pub state: ServerState,
    pub leader: Option<NodeId>,
    pub voters: usize,
    pub lead: Option<Lead>,
    pub superseded: bool,
}

/// Whether a coordinator in `view` serves: a leader heard by a quorum within
/// [`QUORUM_RECENT`] (or the only voter), a follower or learner that knows a leader;
/// never a candidate, a coordinator without a leader, or one whose group was replaced.
pub fn serving(view: &View, now: Instant) -> bool {
    if view.superseded {
        return false;
    }
    match view.state {
        ServerState::Leader => {
            view.voters == 1
                || view
                    .lead
                    .and_then(|l| l.quorum_acked_at)
                    .is_some_and(|at| now.saturating_duration_since(at) < QUORUM_RECENT)
        }
        ServerState::Follower | ServerState::Learner => view.leader.is_some(),
        ServerState::Candidate | ServerState::Shutdown => false,
    }
}

/// Keeps the overall status ("") and the AdminService's current until the process ends.
pub async fn keep_current(reporter: HealthReporter, raft: Raft, leadership: Leadership, group: Group) {
    let mut last = None;
    loop {
        let view = {
            let m = raft.metrics().borrow().clone();
            View {
                state: m.state,
                leader: m.current_leader,
                voters: m.membership_config.membership().voter_ids().count(),
                lead: leadership.current(),
                superseded: group.superseded().is_some(),
            }
        };
        let now = serving(&view, Instant::now());
        if last != Some(now) {
            let status = if now {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            reporter.set_service_status("", status).await;
            if now {
                reporter
                    .set_serving::<AdminServiceServer<AdminServiceImpl>>()
                    .await;
            } else {
                reporter
                    .set_not_serving::<AdminServiceServer<AdminServiceImpl>>()
                    .await;
            }
            tracing::info!(serving = now, state = ?view.state, leader = ?view.leader, "gRPC health");
            last = Some(now);
        }
        tokio::time::sleep(EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(
        state: ServerState,
        leader: Option<NodeId>,
        voters: usize,
        acked_ago: Option<u64>,
    ) -> (View, Instant) {
        let now = Instant::now() + Duration::from_secs(60);
        let lead = (state == ServerState::Leader).then(|| Lead {
            term: 3,
            quorum_acked_at: acked_ago.map(|ms| now - Duration::from_millis(ms)),
        });
        (
            View {
                state,
                leader,
                voters,
                lead,
                superseded: false,
            },
            now,
        )
    }

    #[test]
    fn a_leader_serves_only_with_a_recent_quorum_unless_it_is_the_only_voter() {
        let (v, now) = view(ServerState::Leader, Some(1), 3, Some(100));
        assert!(serving(&v, now));
        let (v, now) = view(ServerState::Leader, Some(1), 3, Some(5_000));
        assert!(!serving(&v, now), "lost its followers");
        let (v, now) = view(ServerState::Leader, Some(1), 3, None);
        assert!(!serving(&v, now), "no quorum yet in this term");
        let (v, now) = view(ServerState::Leader, Some(1), 1, None);
        assert!(serving(&v, now), "a group of one is its own quorum");
    }

    #[test]
    fn followers_serve_while_they_know_a_leader_and_no_superseded_node_serves() {
        let (v, now) = view(ServerState::Follower, Some(2), 3, None);
        assert!(serving(&v, now));
        let (v, now) = view(ServerState::Follower, None, 3, None);
        assert!(!serving(&v, now));
        let (v, now) = view(ServerState::Candidate, None, 3, None);
        assert!(!serving(&v, now));
        let (v, now) = view(ServerState::Learner, Some(2), 3, None);
        assert!(serving(&v, now));
        let (mut v, now) = view(ServerState::Leader, Some(1), 3, Some(100));
        v.superseded = true;
        assert!(!serving(&v, now));
    }
}
