//! The agent's loop: observe, report, act on the reply.
//!
//! Every heartbeat interval the agent reads its Postgres, sends the report to the
//! coordinators and does what the reply calls for:
//! - no cluster on disk yet: initdb when granted the bootstrap, else clone the primary;
//! - Postgres stopped though it should run: start it (nothing else starts it);
//! - primary: run with the `synchronous_standby_names` the coordinators decided.
//!
//! Errors are reported and retried on the next round, never fatal: a coordinator
//! outage, a primary still starting or an unknown cluster all heal by themselves or by
//! an operator's action, and the agent must be there when they do. Repeated errors are
//! logged when they change, not every round.

use std::time::{Duration, Instant};

use pgquorum_client::{pb, ClientError, Coordinators, Timeouts};
use tracing::{info, warn};

use crate::config::AgentConfig;
use crate::error::{Error, Result};
use crate::postgres::ctl::{PostgresCtl, Upstream};
use crate::postgres::observe::Observer;

pub struct Agent {
    config: AgentConfig,
    coordinators: Coordinators,
    ctl: PostgresCtl,
    observer: Observer,
    interval: Duration,
    /// The last problem logged, to log each one once rather than every round.
    last_problem: Option<String>,
}

impl Agent {
    pub fn new(config: AgentConfig) -> Result<Agent> {
        let addrs = config.coordinators.clone();
        let timeouts = Timeouts {
            connect: Duration::from_millis(300),
            request: Duration::from_secs(2),
            overall: Duration::from_secs(2),
        };
        let coordinators = Coordinators::new(addrs, timeouts).map_err(|e| Error::Config {
            path: "coordinators".into(),
            message: e.to_string(),
        })?;
        let ctl = PostgresCtl::new(config.postgres.clone(), &config.name)?;
        let observer = Observer::new(config.postgres.clone());
        let interval = Duration::from_millis(config.heartbeat_interval_ms);
        Ok(Agent {
            config,
            coordinators,
            ctl,
            observer,
            interval,
            last_problem: None,
        })
    }

    fn problem(&mut self, what: String) {
        if self.last_problem.as_ref() != Some(&what) {
            warn!("{what}");
            self.last_problem = Some(what);
        }
    }

    fn resolved(&mut self) {
        if let Some(p) = self.last_problem.take() {
            info!("resolved: {p}");
        }
    }

    /// Runs until `shutdown` completes. Leaves Postgres running: stopping the agent
    /// must not stop the database.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        info!(cluster = %self.config.cluster, name = %self.config.name, "agent started");
        tokio::pin!(shutdown);
        loop {
            let started = Instant::now();
            self.round().await;
            let pause = self.interval.saturating_sub(started.elapsed());
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        info!("agent stopped; postgres left as it is");
    }

    async fn round(&mut self) {
        let initialized = self.ctl.initialized();
        let report = if initialized {
            // A hung server must not silence the agent: observation gets a bounded
            // share of the round, so heartbeats keep flowing and say it hangs.
            let budget = (self.interval * 3).clamp(Duration::from_millis(300), Duration::from_secs(1));
            let running = self.ctl.running_pid().is_some();
            match tokio::time::timeout(budget, self.observer.observe(running)).await {
                Ok(report) => report,
                Err(_) => {
                    self.observer.reset();
                    pb::NodeReport {
                        postgres_up: false,
                        role: "unknown".into(),
                        error: format!(
                            "postgres runs but did not answer within {} ms",
                            budget.as_millis()
                        ),
                        ..Default::default()
                    }
                }
            }
        } else {
            pb::NodeReport {
                initializing: true,
                role: "stopped".into(),
                error: "not initialized yet".into(),
                ..Default::default()
            }
        };
        let request = pb::HeartbeatRequest {
            cluster: self.config.cluster.clone(),
            member: Some(self.config.member_spec()),
            report: Some(report.clone()),
            forwarded: false,
        };
        let reply = match self.coordinators.heartbeat(request).await {
            Ok(r) => r,
            Err(ClientError::Rejected {
                code: tonic_code,
                message,
            }) => {
                let hint = if message.contains("does not exist") {
                    format!(
                        "; create it with `pgquorum cluster create {}`",
                        self.config.cluster
                    )
                } else {
                    String::new()
                };
                self.problem(format!(
                    "coordinators refused the heartbeat ({tonic_code:?}): {message}{hint}"
                ));
                return;
            }
            Err(e) => {
                self.problem(format!("cannot reach the coordinators: {e}"));
                return;
            }
        };
        if reply.heartbeat_interval_ms >= 10 {
            self.interval = Duration::from_millis(reply.heartbeat_interval_ms);
        }
        match self.act(&reply, &report).await {
            Ok(()) => self.resolved(),
            Err(e) => self.problem(e.to_string()),
        }
    }

    async fn act(&mut self, reply: &pb::HeartbeatReply, report: &pb::NodeReport) -> Result<()> {
        let me = &self.config.name;
        if !self.ctl.initialized() {
            if reply.bootstrap {
                info!(
                    epoch = reply.epoch,
                    "granted the bootstrap: creating the cluster's first primary"
                );
                self.ctl.init_primary().await?;
                return self.ctl.start().await;
            }
            return match &reply.primary {
                Some(p) if &p.name != me => {
                    let port = u16::try_from(p.port).unwrap_or(0);
                    let upstream = Upstream {
                        host: p.host.clone(),
                        port,
                    };
                    info!(primary = %p.name, "cloning the primary into a new standby");
                    self.ctl.clone_from(&upstream).await?;
                    self.ctl.start().await
                }
                _ => {
                    self.problem("waiting for a primary to clone, or for the bootstrap grant".into());
                    Ok(())
                }
            };
        }
        if self.ctl.running_pid().is_none() {
            warn!("postgres is not running; starting it");
            return self.ctl.start().await;
        }
        let is_primary = reply.primary.as_ref().is_some_and(|p| &p.name == me);
        if is_primary
            && report.role == "primary"
            && report.synchronous_standby_names != reply.synchronous_standby_names
        {
            info!(
                from = %report.synchronous_standby_names,
                to = %reply.synchronous_standby_names,
                "applying synchronous_standby_names"
            );
            self.observer
                .set_synchronous_standby_names(&reply.synchronous_standby_names)
                .await?;
        }
        if report.role == "unknown" {
            return Err(Error::Postgres {
                target: "local server".into(),
                detail: report.error.clone(),
            });
        }
        Ok(())
    }
}
