//! Reading the state of the local Postgres through one kept-open connection.
//!
//! One connection, reused every heartbeat: opening a backend per probe would cost the
//! server a fork each time. Every query runs under a timeout, because a frozen server
//! keeps its TCP connection open and would otherwise hang the agent; after any error
//! the connection is dropped and opened again on the next round.

use pgquorum_client::pb;
use tokio_postgres::{Client, SimpleQueryMessage};

use super::ctl::{quote, QUERY_TIMEOUT};
use crate::config::PostgresConfig;
use crate::error::{Error, Result};

pub struct Observer {
    cfg: PostgresConfig,
    client: Option<Client>,
}

/// Runs a query whose single row is read as text columns (NULL as empty).
/// How long a promotion waits for the end of recovery before the agent goes on (the
/// next rounds see it end, if it takes longer).
const PROMOTE_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

async fn row(client: &Client, sql: &str) -> std::result::Result<Vec<String>, String> {
    let messages = tokio::time::timeout(QUERY_TIMEOUT, client.simple_query(sql))
        .await
        .map_err(|_| format!("query timed out after {} ms", QUERY_TIMEOUT.as_millis()))?
        .map_err(|e| e.to_string())?;
    Ok(rows(&messages).into_iter().next().unwrap_or_default())
}

async fn all_rows(client: &Client, sql: &str) -> std::result::Result<Vec<Vec<String>>, String> {
    let messages = tokio::time::timeout(QUERY_TIMEOUT, client.simple_query(sql))
        .await
        .map_err(|_| format!("query timed out after {} ms", QUERY_TIMEOUT.as_millis()))?
        .map_err(|e| e.to_string())?;
    Ok(rows(&messages))
}

fn rows(messages: &[SimpleQueryMessage]) -> Vec<Vec<String>> {
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or_default().to_string())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

fn num(s: &str) -> u64 {
    opt_num(s).unwrap_or(0)
}

/// A number Postgres may have shown as NULL (sent as ''): None then.
fn opt_num(s: &str) -> Option<u64> {
    s.trim().parse::<f64>().ok().map(|f| f.max(0.0) as u64)
}

const ROLE: &str = "SELECT pg_is_in_recovery(), (SELECT system_identifier FROM pg_control_system())";

/// Whether the commit-time lease check is loaded (its setting is defined — a
/// placeholder set only by the config file is not listed in `pg_settings` — and names
/// a file), and whether a changed `shared_preload_libraries` waits for a restart.
const COMMIT_CHECK: &str = "SELECT EXISTS (SELECT 1 FROM pg_settings \
       WHERE name = 'pgquorum.lease_file' AND setting <> ''), \
     (SELECT pending_restart FROM pg_settings WHERE name = 'shared_preload_libraries')";

const PRIMARY: &str = "SELECT pg_current_wal_lsn(), \
     ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int, \
     current_setting('synchronous_standby_names')";

// replay_lag is NULL when the walsender has no sample to measure against (caught up
// and idle, or replaying WAL older than its first sample): sent as '' and read as
// absent, never as 0.
const REPLICAS: &str = "SELECT application_name, state, coalesce(sync_state, ''), \
     coalesce(sent_lsn::text, ''), coalesce(flush_lsn::text, ''), coalesce(replay_lsn::text, ''), \
     coalesce((extract(epoch FROM replay_lag) * 1000)::text, '') FROM pg_stat_replication";

// The standby reports positions and raw ages only; the coordinator, which also sees
// the primary, turns them into lag (coordinator/src/observe/lag.rs). The age of the
// last replayed commit is NULL until a commit is replayed after start: '' (absent).
const STANDBY: &str = "SELECT coalesce(pg_last_wal_receive_lsn()::text, ''), \
     coalesce(pg_last_wal_replay_lsn()::text, ''), \
     coalesce((extract(epoch FROM now() - pg_last_xact_replay_timestamp()) * 1000)::text, ''), \
     pg_get_wal_replay_pause_state() <> 'not paused', \
     (SELECT timeline_id FROM pg_control_checkpoint())";

const WAL_RECEIVER: &str =
    "SELECT status, coalesce(sender_host, ''), coalesce(sender_port, 0), received_tli FROM pg_stat_wal_receiver";

/// What [`Observer::commit_check`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitCheckState {
    pub loaded: bool,
    pub pending_restart: bool,
}

impl Observer {
    pub fn new(cfg: PostgresConfig) -> Observer {
        Observer { cfg, client: None }
    }

    async fn client(&mut self) -> Result<&Client> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            let host = if self.cfg.listen_addresses == "*" || self.cfg.listen_addresses.contains(',') {
                "127.0.0.1".to_string()
            } else {
                self.cfg.listen_addresses.clone()
            };
            self.client = Some(super::connect(&self.cfg, &host, self.cfg.port, "pgquorum-agent").await?);
        }
        Ok(self.client.as_ref().expect("just connected"))
    }

    /// Drops the connection (after a timeout left it in an unknown state).
    pub fn reset(&mut self) {
        self.client = None;
    }

    /// What Postgres is doing now. `running` says whether a postmaster process exists.
    pub async fn observe(&mut self, running: bool) -> pb::NodeReport {
        if !running {
            self.client = None;
            return pb::NodeReport {
                postgres_up: false,
                role: "stopped".into(),
                error: "postgres is not running".into(),
                ..Default::default()
            };
        }
        match self.query().await {
            Ok(report) => report,
            Err(error) => {
                self.client = None;
                pb::NodeReport {
                    postgres_up: false,
                    role: "unknown".into(),
                    error,
                    ..Default::default()
                }
            }
        }
    }

    async fn query(&mut self) -> std::result::Result<pb::NodeReport, String> {
        let client = self.client().await.map_err(|e| e.to_string())?;
        let role = row(client, ROLE).await?;
        let in_recovery = role.first().is_some_and(|v| v == "t");
        let mut r = pb::NodeReport {
            postgres_up: true,
            system_identifier: role.get(1).and_then(|s| s.trim().parse().ok()).unwrap_or(0),
            ..Default::default()
        };
        if in_recovery {
            r.role = "standby".into();
            let s = row(client, STANDBY).await?;
            r.receive_lsn = s[0].clone();
            r.replay_lsn = s[1].clone();
            r.last_replay_age_ms = opt_num(&s[2]);
            r.replay_paused = s[3] == "t";
            r.timeline = num(&s[4]) as u32;
            if let Some(w) = all_rows(client, WAL_RECEIVER).await?.into_iter().next() {
                r.wal_receiver_status = w[0].clone();
                r.upstream_host = w[1].clone();
                r.upstream_port = num(&w[2]) as u32;
                if num(&w[3]) > 0 {
                    r.timeline = num(&w[3]) as u32;
                }
            }
        } else {
            r.role = "primary".into();
            let p = row(client, PRIMARY).await?;
            r.current_lsn = p[0].clone();
            r.timeline = num(&p[1]) as u32;
            r.synchronous_standby_names = p[2].clone();
            r.replicas = all_rows(client, REPLICAS)
                .await?
                .into_iter()
                .map(|x| pb::ReplicationInfo {
                    application_name: x[0].clone(),
                    state: x[1].clone(),
                    sync_state: x[2].clone(),
                    sent_lsn: x[3].clone(),
                    flush_lsn: x[4].clone(),
                    replay_lsn: x[5].clone(),
                    replay_lag_ms: opt_num(&x[6]),
                })
                .collect();
        }
        Ok(r)
    }

    /// Whether the running server has the commit-time lease check loaded, and whether
    /// a restart would load it (`shared_preload_libraries` changed since the start).
    pub async fn commit_check(&mut self) -> Result<CommitCheckState> {
        let target = format!("local postgres port {}", self.cfg.port);
        let client = self.client().await?;
        let r = row(client, COMMIT_CHECK)
            .await
            .map_err(|detail| Error::Postgres { target, detail })?;
        Ok(CommitCheckState {
            loaded: r.first().is_some_and(|v| v == "t"),
            pending_restart: r.get(1).is_some_and(|v| v == "t"),
        })
    }

    /// The parameters waiting for a restart, and the settings of the cluster's file
    /// Postgres refused ("name: error"; a changed parameter that waits for a restart
    /// is not refused, though pg_file_settings says it "could not be applied").
    pub async fn settings(&mut self) -> Result<Settings> {
        let target = format!("local postgres port {}", self.cfg.port);
        let client = self.client().await?;
        let fail = |e: tokio_postgres::Error| Error::Postgres {
            target: target.clone(),
            detail: e.to_string(),
        };
        let names = |rows: Vec<tokio_postgres::Row>| rows.iter().map(|r| r.get::<_, String>(0)).collect();
        let pending = tokio::time::timeout(
            QUERY_TIMEOUT,
            client.query(
                "SELECT name FROM pg_settings WHERE pending_restart ORDER BY name",
                &[],
            ),
        )
        .await
        .map_err(|_| Error::Postgres {
            target: target.clone(),
            detail: "pg_settings: timed out".into(),
        })?
        .map_err(fail)?;
        let errors = tokio::time::timeout(
            QUERY_TIMEOUT,
            client.query(
                "SELECT coalesce(name, '(line ' || sourceline || ')') || ': ' || error FROM pg_file_settings \
                 WHERE error IS NOT NULL AND sourcefile LIKE '%/pgquorum.cluster.conf' \
                 AND NOT (error = 'setting could not be applied' \
                          AND name IN (SELECT name FROM pg_settings WHERE pending_restart)) \
                 ORDER BY sourceline",
                &[],
            ),
        )
        .await
        .map_err(|_| Error::Postgres {
            target: target.clone(),
            detail: "pg_file_settings: timed out".into(),
        })?
        .map_err(fail)?;
        Ok(Settings {
            pending_restart: names(pending),
            errors: names(errors),
        })
    }

    /// Makes the primary wait for exactly these standbys: ALTER SYSTEM, then reload.
    pub async fn set_synchronous_standby_names(&mut self, value: &str) -> Result<()> {
        let sql = format!("ALTER SYSTEM SET synchronous_standby_names = {}", quote(value));
        self.exec(&[sql.as_str(), "SELECT pg_reload_conf()"], QUERY_TIMEOUT)
            .await
    }
}

/// What [`Observer::settings`] read.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    pub pending_restart: Vec<String>,
    pub errors: Vec<String>,
}

impl Observer {
    async fn exec(&mut self, statements: &[&str], timeout: std::time::Duration) -> Result<()> {
        let target = format!("local postgres port {}", self.cfg.port);
        let client = self.client().await?;
        for statement in statements {
            tokio::time::timeout(timeout, client.simple_query(statement))
                .await
                .map_err(|_| Error::Postgres {
                    target: target.clone(),
                    detail: format!("{statement}: timed out"),
                })?
                .map_err(|e| Error::Postgres {
                    target: target.clone(),
                    detail: format!("{statement}: {e}"),
                })?;
        }
        Ok(())
    }

    /// Re-reads the configuration files (a changed primary_conninfo restarts the WAL
    /// receiver; no restart of Postgres needed).
    pub async fn reload(&mut self) -> Result<()> {
        self.exec(&["SELECT pg_reload_conf()"], QUERY_TIMEOUT).await
    }

    /// Promotes this standby: first the standbys to wait for (effective once it is
    /// primary), then `pg_promote`, waiting until it accepts writes.
    /// Asks for a promotion and returns at once: the end of recovery can take a while
    /// (WAL left to replay), and the agent must keep renewing its lease meanwhile; the
    /// next rounds see the role change.
    pub async fn promote(&mut self, synchronous_standby_names: &str) -> Result<()> {
        let names = format!(
            "ALTER SYSTEM SET synchronous_standby_names = {}",
            quote(synchronous_standby_names)
        );
        self.exec(&[names.as_str(), "SELECT pg_reload_conf()"], QUERY_TIMEOUT)
            .await?;
        self.exec(&["SELECT pg_promote(wait => false)"], QUERY_TIMEOUT)
            .await?;
        // A short wait for the end of recovery (usually tens of milliseconds), so the
        // report that follows says "primary" a heartbeat sooner; bounded, as above.
        let until = std::time::Instant::now() + PROMOTE_WAIT;
        while std::time::Instant::now() < until {
            let client = self.client().await?;
            let in_recovery = row(client, "SELECT pg_is_in_recovery()").await;
            if in_recovery.is_ok_and(|r| r.first().is_some_and(|v| v == "f")) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Drops these replication slots where they exist and no one streams from them;
    /// returns those that are gone now (a slot in use stays, and is asked again).
    pub async fn drop_slots(&mut self, slots: &[String]) -> Result<Vec<String>> {
        let statements: Vec<String> = slots
            .iter()
            .map(|s| {
                format!(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                     WHERE slot_name = {} AND NOT active",
                    quote(s)
                )
            })
            .collect();
        let refs: Vec<&str> = statements.iter().map(String::as_str).collect();
        self.exec(&refs, QUERY_TIMEOUT).await?;
        let target = format!("local postgres port {}", self.cfg.port);
        let client = self.client().await?;
        let left = all_rows(client, "SELECT slot_name FROM pg_replication_slots")
            .await
            .map_err(|detail| Error::Postgres { target, detail })?;
        let left: Vec<&str> = left
            .iter()
            .filter_map(|r| r.first().map(String::as_str))
            .collect();
        Ok(slots
            .iter()
            .filter(|s| !left.contains(&s.as_str()))
            .cloned()
            .collect())
    }

    /// Makes sure a physical replication slot exists for each standby.
    pub async fn ensure_slots(&mut self, slots: &[String]) -> Result<()> {
        let statements: Vec<String> = slots
            .iter()
            .map(|s| {
                format!(
                    "SELECT pg_create_physical_replication_slot({0}) WHERE NOT EXISTS \
                     (SELECT 1 FROM pg_replication_slots WHERE slot_name = {0})",
                    quote(s)
                )
            })
            .collect();
        let refs: Vec<&str> = statements.iter().map(String::as_str).collect();
        self.exec(&refs, QUERY_TIMEOUT).await
    }
}
