//! The agent's HTTP endpoints, for load balancers and probes (HAProxy `option httpchk`,
//! keepalived, Kubernetes), as Patroni's REST API has them:
//!
//! | path | 200 when |
//! |---|---|
//! | `/primary` | Postgres runs as a primary, this node is the epoch's primary and its lease (or failsafe extension) has not run out |
//! | `/replica` | Postgres runs as a standby and the node is neither drained nor in maintenance; `?lag=MS`: its measured replay lag is at most MS |
//! | `/sync` | a standby the leader counts as synchronous |
//! | `/async` | a standby the leader counts as asynchronous |
//! | `/health` | Postgres runs (any role) |
//!
//! Everything else answers 503, with the agent's view as JSON either way; `/metrics`
//! is Prometheus text. [`judge`] is pure; the server reads the view the agent's
//! rounds keep current.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

/// How recently the leader must have answered for its lag and sync state to count in
/// `/replica?lag=`, `/sync` and `/async`.
pub const SEEN_FRESH: Duration = Duration::from_secs(5);

/// What the agent knows, as of its last round.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub name: String,
    pub cluster: String,
    pub epoch: u64,
    pub postgres_up: bool,
    /// Postgres's own role: "primary", "standby", "stopped", "unknown".
    pub role: String,
    /// This node is the epoch's primary by the coordinators.
    pub is_epoch_primary: bool,
    pub lease_until: Option<Instant>,
    pub failsafe: bool,
    /// From the leader's last reply.
    pub sync_state: String,
    pub lag_ms: Option<u64>,
    pub drained: bool,
    /// In maintenance (`pgquorum maintenance on`): out of read routing like drained.
    pub maintenance: bool,
    pub leader_answered_at: Option<Instant>,
}

/// One endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    Primary,
    Replica { max_lag_ms: Option<u64> },
    Sync,
    Async,
    Health,
}

impl Check {
    /// The check a request asks for; `Err` names what is wrong with it.
    pub fn parse(path: &str, query: Option<&str>) -> Result<Check, String> {
        let check = match path.trim_end_matches('/') {
            "/primary" | "/leader" | "/master" | "/read-write" => Check::Primary,
            "/replica" | "/read-only" => Check::Replica { max_lag_ms: None },
            "/sync" | "/synchronous" => Check::Sync,
            "/async" | "/asynchronous" => Check::Async,
            "/health" | "/liveness" => Check::Health,
            other => return Err(format!("no such endpoint {other:?}")),
        };
        let mut max_lag_ms = None;
        for pair in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("lag", ms)) => {
                    let ms = ms
                        .trim_end_matches("ms")
                        .parse::<u64>()
                        .map_err(|_| format!("lag={ms:?}: expected milliseconds, e.g. lag=500"))?;
                    max_lag_ms = Some(ms);
                }
                _ => return Err(format!("unknown query parameter {pair:?} (known: lag=MS)")),
            }
        }
        match (check, max_lag_ms) {
            (Check::Replica { .. }, lag) => Ok(Check::Replica { max_lag_ms: lag }),
            (_, Some(_)) => Err("lag=MS applies to /replica only".into()),
            (check, None) => Ok(check),
        }
    }
}

/// Whether `view` passes `check` at `now`.
pub fn judge(check: Check, view: &View, now: Instant) -> bool {
    let standby = view.postgres_up && view.role == "standby";
    let seen_lately = view
        .leader_answered_at
        .is_some_and(|at| now.saturating_duration_since(at) <= SEEN_FRESH);
    match check {
        Check::Health => view.postgres_up,
        Check::Primary => {
            view.postgres_up
                && view.role == "primary"
                && view.is_epoch_primary
                && view.lease_until.is_some_and(|until| until > now)
        }
        Check::Replica { max_lag_ms } => {
            standby
                && !view.drained
                && !view.maintenance
                && max_lag_ms.is_none_or(|max| seen_lately && view.lag_ms.is_some_and(|lag| lag <= max))
        }
        Check::Sync => standby && seen_lately && view.sync_state == "sync",
        Check::Async => standby && seen_lately && view.sync_state == "async",
    }
}

/// The view as JSON (the body of every answer).
fn body(view: &View, now: Instant) -> serde_json::Value {
    json!({
        "name": view.name,
        "cluster": view.cluster,
        "epoch": view.epoch,
        "postgres_up": view.postgres_up,
        "role": view.role,
        "sync_state": view.sync_state,
        "lag_ms": view.lag_ms,
        "drained": view.drained,
        "maintenance": view.maintenance,
        "failsafe": view.failsafe,
        "lease_remaining_ms": view.lease_until.map(|u| u.saturating_duration_since(now).as_millis() as u64),
        "leader_answered_ms_ago": view.leader_answered_at.map(|at| now.saturating_duration_since(at).as_millis() as u64),
    })
}

/// Shared between the agent (writes after each round) and the server (reads).
pub type SharedView = Arc<Mutex<View>>;

#[derive(Clone)]
struct Served {
    view: SharedView,
    metrics: PrometheusHandle,
}

/// Serves the endpoints on `listener` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    view: SharedView,
    metrics: PrometheusHandle,
) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(metrics_text))
        .fallback(check)
        .with_state(Served { view, metrics });
    axum::serve(listener, app).await
}

async fn check(State(s): State<Served>, uri: Uri) -> Response {
    let now = Instant::now();
    let view = s.view.lock().expect("view lock poisoned").clone();
    match Check::parse(uri.path(), uri.query()) {
        Err(why) => json_response(StatusCode::NOT_FOUND, json!({ "error": why })),
        Ok(c) => {
            let code = if judge(c, &view, now) {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json_response(code, body(&view, now))
        }
    }
}

fn json_response(code: StatusCode, value: serde_json::Value) -> Response {
    (code, [("content-type", "application/json")], value.to_string()).into_response()
}

async fn metrics_text(State(s): State<Served>) -> Response {
    let now = Instant::now();
    {
        let view = s.view.lock().expect("view lock poisoned");
        crate::metrics::at_scrape(&view, now);
    }
    (
        [("content-type", "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(role: &str) -> (View, Instant) {
        let now = Instant::now();
        (
            View {
                name: "node1".into(),
                postgres_up: true,
                role: role.into(),
                is_epoch_primary: role == "primary",
                lease_until: Some(now + Duration::from_secs(1)),
                sync_state: if role == "primary" { "primary" } else { "sync" }.into(),
                lag_ms: Some(20),
                leader_answered_at: Some(now),
                ..View::default()
            },
            now,
        )
    }

    fn codes(v: &View, now: Instant) -> Vec<(&'static str, bool)> {
        [
            ("primary", Check::Primary),
            ("replica", Check::Replica { max_lag_ms: None }),
            ("sync", Check::Sync),
            ("async", Check::Async),
            ("health", Check::Health),
        ]
        .into_iter()
        .map(|(n, c)| (n, judge(c, v, now)))
        .collect()
    }

    #[test]
    fn each_role_passes_exactly_its_endpoints() {
        let (p, now) = view("primary");
        assert_eq!(
            codes(&p, now),
            [
                ("primary", true),
                ("replica", false),
                ("sync", false),
                ("async", false),
                ("health", true)
            ]
        );
        let (s, now) = view("standby");
        assert_eq!(
            codes(&s, now),
            [
                ("primary", false),
                ("replica", true),
                ("sync", true),
                ("async", false),
                ("health", true)
            ]
        );
        let (mut a, now) = view("standby");
        a.sync_state = "async".into();
        assert!(judge(Check::Async, &a, now) && !judge(Check::Sync, &a, now));
        let (mut down, now) = view("standby");
        down.postgres_up = false;
        assert!(codes(&down, now).iter().all(|(_, ok)| !ok));
    }

    #[test]
    fn a_primary_without_a_lease_or_not_the_epochs_is_not_primary() {
        let (mut p, now) = view("primary");
        p.lease_until = Some(now - Duration::from_millis(1));
        assert!(
            !judge(Check::Primary, &p, now),
            "lease ran out: about to be fenced"
        );
        let (mut p, now) = view("primary");
        p.is_epoch_primary = false;
        assert!(!judge(Check::Primary, &p, now), "an old primary still running");
    }

    #[test]
    fn replica_lag_needs_a_recent_measurement_under_the_limit() {
        let (s, now) = view("standby");
        assert!(judge(Check::Replica { max_lag_ms: Some(20) }, &s, now));
        assert!(!judge(Check::Replica { max_lag_ms: Some(19) }, &s, now));
        let (mut unknown, now) = view("standby");
        unknown.lag_ms = None;
        assert!(!judge(
            Check::Replica {
                max_lag_ms: Some(10_000)
            },
            &unknown,
            now
        ));
        assert!(judge(Check::Replica { max_lag_ms: None }, &unknown, now));
        let (mut old, now) = view("standby");
        old.leader_answered_at = Some(now - SEEN_FRESH - Duration::from_millis(1));
        assert!(
            !judge(
                Check::Replica {
                    max_lag_ms: Some(100)
                },
                &old,
                now
            ),
            "lag no longer known"
        );
        let (mut drained, now) = view("standby");
        drained.drained = true;
        assert!(!judge(Check::Replica { max_lag_ms: None }, &drained, now));
        let (mut maintenance, now) = view("standby");
        maintenance.maintenance = true;
        assert!(!judge(Check::Replica { max_lag_ms: None }, &maintenance, now));
    }

    #[test]
    fn requests_parse_with_clear_errors() {
        assert_eq!(Check::parse("/primary", None), Ok(Check::Primary));
        assert_eq!(
            Check::parse("/replica", Some("lag=500")),
            Ok(Check::Replica {
                max_lag_ms: Some(500)
            })
        );
        assert_eq!(Check::parse("/async/", None), Ok(Check::Async));
        assert!(Check::parse("/replica", Some("lag=soon"))
            .unwrap_err()
            .contains("lag"));
        assert!(Check::parse("/primary", Some("lag=5")).is_err());
        assert!(Check::parse("/nope", None).unwrap_err().contains("/nope"));
        assert!(Check::parse("/replica", Some("x=1")).unwrap_err().contains("x=1"));
    }
}
