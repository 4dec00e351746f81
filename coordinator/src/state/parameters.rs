//! The cluster's Postgres parameters (`pgquorum config set`), checked before they
//! are committed. Pure.
//!
//! Names are Postgres's (case-insensitive, kept in lower case; a dotted name is an
//! extension's). Whether a value suits its parameter only Postgres knows: each agent
//! reports what its server refused (`parameter_errors` in `status`). Refused here:
//! what the agents manage themselves (addresses, replication, the lease check,
//! `synchronous_standby_names`), since a cluster-wide value there would break a node
//! or the failover; and values that cannot be written to a configuration file.

use std::collections::BTreeMap;

/// Parameters the agents set for each node (or the coordinators decide): refused.
pub const MANAGED: &[&str] = &[
    "listen_addresses",
    "port",
    "unix_socket_directories",
    "data_directory",
    "config_file",
    "hba_file",
    "ident_file",
    "external_pid_file",
    "cluster_name",
    "hot_standby",
    "primary_conninfo",
    "primary_slot_name",
    "promote_trigger_file",
    "synchronous_standby_names",
    "shared_preload_libraries",
    "wal_level",
    "max_wal_senders",
    "max_replication_slots",
    "wal_log_hints",
    "hot_standby_feedback",
    "wal_keep_size",
    "wal_retrieve_retry_interval",
    // What the failover's promises rest on: every acknowledged commit durable on the
    // sync standbys, standbys that replay at once, rewinds that work, slots kept.
    "fsync",
    "full_page_writes",
    "recovery_min_apply_delay",
    "max_slot_wal_keep_size",
    // A file of its own would bypass every check here.
    "include",
    "include_if_exists",
    "include_dir",
];

/// Values a parameter may take cluster-wide, where others would break a promise: a
/// commit acknowledged before its sync standbys hold it is lost by a failover.
const ONLY: &[(&str, &[&str])] = &[("synchronous_commit", &["on", "remote_apply"])];

/// Longest value accepted.
const MAX_VALUE: usize = 4096;

/// The parameters after `set` and `unset`, or what is wrong, naming the parameter.
pub fn change(
    current: &BTreeMap<String, String>,
    set: &BTreeMap<String, String>,
    unset: &[String],
) -> Result<BTreeMap<String, String>, String> {
    let mut next = current.clone();
    for name in unset {
        let name = checked_name(name)?;
        if next.remove(&name).is_none() {
            return Err(format!("{name} is not set cluster-wide; nothing to unset"));
        }
    }
    for (name, value) in set {
        let name = checked_name(name)?;
        if value.chars().any(|c| c == '\n' || c == '\r' || c == '\0') {
            return Err(format!("{name}: a value cannot hold a line break or NUL"));
        }
        if value.trim().is_empty() {
            return Err(format!("{name}: empty value; to remove it, unset it"));
        }
        if value.len() > MAX_VALUE {
            return Err(format!("{name}: value longer than {MAX_VALUE} bytes"));
        }
        if let Some((_, allowed)) = ONLY.iter().find(|(n, _)| *n == name) {
            if !allowed.contains(&value.trim().to_ascii_lowercase().as_str()) {
                return Err(format!(
                    "{name}: only {} cluster-wide (others acknowledge commits a failover can lose; a \
                     session may still choose for itself)",
                    allowed.join(" or ")
                ));
            }
        }
        next.insert(name, value.clone());
    }
    Ok(next)
}

fn checked_name(name: &str) -> Result<String, String> {
    let name = name.trim().to_ascii_lowercase();
    // Postgres's grammar: an identifier, or an extension's `prefix.name`.
    let part = |p: &str| {
        p.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && p.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$')
    };
    let parts: Vec<&str> = name.split('.').collect();
    let valid = name.len() <= 63 && parts.len() <= 2 && parts.iter().all(|p| part(p));
    if !valid {
        return Err(format!(
            "{name:?} is not a Postgres parameter name (letters, digits, '_', '.' for an extension's)"
        ));
    }
    if MANAGED.contains(&name.as_str())
        || name.starts_with("pgquorum.")
        || name.starts_with("recovery_target")
    {
        return Err(format!(
            "{name} is managed by pgquorum for each node (set it in the agent's [postgres] config if at all)"
        ));
    }
    Ok(name)
}

/// What changed, for the history and the CLI: `name: old -> new` per parameter.
pub fn diff(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> Vec<String> {
    let mut names: Vec<&String> = before.keys().chain(after.keys()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .filter(|n| before.get(*n) != after.get(*n))
        .map(|n| {
            let show = |v: Option<&String>| v.map_or("(unset)".to_string(), |v| format!("{v:?}"));
            format!("{n}: {} -> {}", show(before.get(n)), show(after.get(n)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn names_are_checked_managed_ones_refused_and_the_diff_says_what_moved() {
        let now = map(&[("work_mem", "4MB")]);
        let next = change(
            &now,
            &map(&[("Work_Mem", "16MB"), ("pg_stat_statements.max", "5000")]),
            &[],
        )
        .unwrap();
        assert_eq!(
            next,
            map(&[("pg_stat_statements.max", "5000"), ("work_mem", "16MB")])
        );
        assert_eq!(
            diff(&now, &next),
            [
                "pg_stat_statements.max: (unset) -> \"5000\"",
                "work_mem: \"4MB\" -> \"16MB\""
            ]
        );
        let err = change(&now, &map(&[("port", "5433")]), &[]).unwrap_err();
        assert!(err.contains("port is managed"), "{err}");
        for bad in ["work mem", "a.b.c", "foo.", "x.1y", ""] {
            let err = change(&now, &map(&[(bad, "1")]), &[]).unwrap_err();
            assert!(err.contains("not a Postgres parameter name"), "{bad}: {err}");
        }
        let err = change(&now, &map(&[("include", "other.conf")]), &[]).unwrap_err();
        assert!(err.contains("managed"), "{err}");
        let err = change(&now, &map(&[("synchronous_commit", "local")]), &[]).unwrap_err();
        assert!(err.contains("only on or remote_apply"), "{err}");
        assert!(change(&now, &map(&[("synchronous_commit", "remote_apply")]), &[]).is_ok());
        let err = change(&now, &map(&[("work_mem", "1\nport = 1")]), &[]).unwrap_err();
        assert!(err.contains("line break"), "{err}");
        let err = change(&now, &BTreeMap::new(), &["shared_buffers".into()]).unwrap_err();
        assert!(err.contains("nothing to unset"), "{err}");
        assert_eq!(
            change(&now, &BTreeMap::new(), &["work_mem".into()]).unwrap(),
            BTreeMap::new()
        );
    }
}
