//! The agent's two hands on Postgres: [`ctl`] runs its tools (initdb, pg_basebackup,
//! pg_ctl) and [`observe`] asks it, over one kept-open connection, what it is doing.

pub mod commit_check;
pub mod ctl;
pub mod observe;
pub mod probe;

use tokio_postgres::{Client, NoTls};

use crate::config::PostgresConfig;
use crate::error::{Error, Result};

/// Opens a connection (TCP, short timeouts) and drives it on a background task.
pub async fn connect(cfg: &PostgresConfig, host: &str, port: u16, application_name: &str) -> Result<Client> {
    let mut pg = tokio_postgres::Config::new();
    pg.host(host)
        .port(port)
        .user(&cfg.superuser)
        .dbname(&cfg.database)
        .application_name(application_name)
        .connect_timeout(std::time::Duration::from_secs(1))
        .keepalives(true)
        .keepalives_idle(std::time::Duration::from_secs(5));
    if !cfg.password.is_empty() {
        pg.password(&cfg.password);
    }
    let target = format!("{host}:{port}");
    let (client, connection) = tokio::time::timeout(std::time::Duration::from_secs(2), pg.connect(NoTls))
        .await
        .map_err(|_| Error::Postgres {
            target: target.clone(),
            detail: "connect timed out".into(),
        })?
        .map_err(|e| Error::Postgres {
            target,
            detail: e.to_string(),
        })?;
    tokio::spawn(async move {
        // Ends when the client is dropped or the server goes away; the next query
        // then fails and the caller reconnects.
        let _ = connection.await;
    });
    Ok(client)
}
