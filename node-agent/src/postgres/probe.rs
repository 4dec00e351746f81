//! A standby's agent watching the primary's Postgres directly.
//!
//! The coordinators must not mistake a silent agent for a dead primary, so every
//! standby's agent also queries the primary (a trivial `SELECT 1` on one kept-open
//! connection: a new backend per probe would cost the primary a fork each time) and
//! reports how long ago that last worked.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::ctl::Upstream;
use crate::config::PostgresConfig;

const PROBE_TIMEOUT: Duration = Duration::from_millis(300);

pub struct PrimaryProbe {
    cfg: PostgresConfig,
    target: Option<Upstream>,
    client: Option<Client>,
    last_ok: Option<Instant>,
}

impl PrimaryProbe {
    pub fn new(cfg: PostgresConfig) -> PrimaryProbe {
        PrimaryProbe {
            cfg,
            target: None,
            client: None,
            last_ok: None,
        }
    }

    /// Probes `target` once (bounded); returns ms since the last success, if any.
    pub async fn check(&mut self, target: Option<&Upstream>) -> Option<u64> {
        if self.target.as_ref() != target {
            self.target = target.cloned();
            self.client = None;
            self.last_ok = None;
        }
        let target = self.target.clone()?;
        let ok = tokio::time::timeout(PROBE_TIMEOUT, async {
            if self.client.as_ref().is_none_or(|c| c.is_closed()) {
                self.client = super::connect(&self.cfg, &target.host, target.port, "pgquorum-probe")
                    .await
                    .ok();
            }
            match &self.client {
                Some(c) => c.simple_query("SELECT 1").await.is_ok(),
                None => false,
            }
        })
        .await
        .unwrap_or(false);
        if ok {
            self.last_ok = Some(Instant::now());
        } else {
            self.client = None;
        }
        self.last_ok.map(|t| t.elapsed().as_millis() as u64)
    }
}
