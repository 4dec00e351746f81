//! The commit-time lease check: `pg/pgquorum_lease.c`, a library Postgres loads
//! (`shared_preload_libraries`) that reads the lease file before each commit of a
//! transaction that wrote and again before acknowledging it. The guard stops a
//! primary whose lease ran out within 10 ms; this covers what the guard cannot,
//! a host frozen as a whole and thawed: its backends run again as early as the guard
//! and would answer their clients before its kill lands (docs/leases.md).
//!
//! `build.rs` compiles it when the PostgreSQL 15 server headers are present; the agent
//! carries it and writes it beside the data directory.

use std::path::Path;

#[cfg(commit_check)]
const LIBRARY: Option<&[u8]> = Some(include_bytes!(env!("PGQUORUM_COMMIT_CHECK_SO")));
#[cfg(not(commit_check))]
const LIBRARY: Option<&[u8]> = None;

/// Why an agent built without the library cannot run with `commit_check` on.
pub const NOT_BUILT: &str = "this agent was built without the commit-time lease check \
    (PGQUORUM_NO_COMMIT_CHECK=1); rebuild it with the PostgreSQL 15 server headers, or set this \
    to false to run without it (a host frozen as a whole may then acknowledge writes for a \
    moment after its lease ran out)";

/// Whether this agent carries the library.
pub fn built() -> bool {
    LIBRARY.is_some()
}

/// Writes the library to `path` (readable by all, as the Postgres OS user must load
/// it) unless it already holds these bytes. Written aside and renamed: a running
/// Postgres keeps the file it mapped.
pub fn install(path: &Path) -> std::io::Result<()> {
    let Some(bytes) = LIBRARY else {
        return Err(std::io::Error::other(NOT_BUILT));
    };
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    crate::guard::replace_readable_by_all(path, &path.with_extension("so.tmp"), bytes, true)
}

/// `shared_preload_libraries` with the library first, then what the operator set.
pub fn preload_libraries(library: &Path, configured: Option<&str>) -> String {
    let mut list = library.display().to_string();
    if let Some(more) = configured.map(str::trim).filter(|s| !s.is_empty()) {
        list.push(',');
        list.push_str(more);
    }
    list
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn the_library_comes_first_and_keeps_the_operator_s() {
        let lib = Path::new("/var/lib/pgquorum/node1/data.pgquorum-lease.so");
        assert_eq!(
            preload_libraries(lib, Some("pg_stat_statements, auto_explain")),
            "/var/lib/pgquorum/node1/data.pgquorum-lease.so,pg_stat_statements, auto_explain"
        );
        assert_eq!(preload_libraries(lib, Some("  ")), lib.display().to_string());
        assert_eq!(preload_libraries(lib, None), lib.display().to_string());
    }

    #[test]
    fn install_writes_once_and_readable_by_all() {
        if !built() {
            assert!(install(Path::new("/nonexistent/x.so")).is_err());
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lib.so");
        install(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o644);
        assert_eq!(std::fs::read(&path).unwrap(), LIBRARY.unwrap());
        install(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().modified().unwrap(),
            meta.modified().unwrap()
        );
    }
}
