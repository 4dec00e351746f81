//! One module per command group. Each command asks the coordinators through
//! [`pgquorum_client::Coordinators`] and prints through [`crate::output`].

pub mod cluster;
pub mod config;
pub mod maintenance;
pub mod orders;
pub mod pause;
pub mod policy;
pub mod raft;
pub mod sandbox;
pub mod schedule;
pub mod status;
pub mod watch;

use pgquorum_client::{pb, Coordinators};

use crate::error::{Error, Result};

/// What every command needs: the coordinators and how to print.
pub struct Ctx {
    pub coordinators: Coordinators,
    pub json: bool,
}

/// `--local` on reads: serve from the first coordinator's applied state, without
/// confirming with the leader (works when there is no leader; may be stale).
pub fn consistency(local: bool) -> i32 {
    if local {
        pb::ReadConsistency::Local as i32
    } else {
        pb::ReadConsistency::Linearizable as i32
    }
}

/// Parses `field=value` arguments.
pub fn parse_settings(args: &[String]) -> Result<std::collections::HashMap<String, String>> {
    args.iter()
        .map(|a| match a.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
            _ => Err(Error::Usage(format!("expected field=value, got {a:?}"))),
        })
        .collect()
}

/// Who is running the command, for the coordinators' history.
pub fn actor() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{user}@{} (pgquorum cli)", host.trim())
}
