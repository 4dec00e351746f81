//! Builds `pg/pgquorum_lease.c`, the commit-time lease check Postgres loads
//! (`shared_preload_libraries`), against the PostgreSQL 15 server headers
//! (`pg_config --includedir-server`; Debian: postgresql-server-dev-15). The agent
//! carries the library and writes it beside the data directory, so nothing is
//! installed into Postgres's own directories.
//!
//! Without the headers the build fails, unless `PGQUORUM_NO_COMMIT_CHECK=1` says to
//! build the agent without it; such an agent refuses to start unless its config says
//! `postgres.commit_check = false` (an upgrade must not silently lose the check).

use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCE: &str = "pg/pgquorum_lease.c";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(commit_check)");
    println!("cargo::rerun-if-changed={SOURCE}");
    println!("cargo::rerun-if-env-changed=PGQUORUM_PG_CONFIG");
    println!("cargo::rerun-if-env-changed=PGQUORUM_NO_COMMIT_CHECK");
    let opted_out = std::env::var("PGQUORUM_NO_COMMIT_CHECK").is_ok_and(|v| v == "1");
    let pg_config =
        std::env::var("PGQUORUM_PG_CONFIG").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/pg_config".into());
    let include = Command::new(&pg_config)
        .arg("--includedir-server")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .unwrap_or_else(|| PathBuf::from("/usr/include/postgresql/15/server"));
    let header = include.join("postgres.h");
    // A missing file counts as changed: once the headers are installed, the next
    // build builds the library.
    println!("cargo::rerun-if-changed={}", header.display());
    if opted_out {
        println!(
            "cargo::warning=PGQUORUM_NO_COMMIT_CHECK=1: pgquorum-agent is built without the \
             commit-time lease check and needs postgres.commit_check = false to run"
        );
        return;
    }
    if !header.is_file() {
        panic!(
            "no PostgreSQL 15 server headers ({} missing): the agent's commit-time lease check \
             (pg/pgquorum_lease.c) is built against them. Install them (Debian: apt-get install \
             postgresql-server-dev-15), point PGQUORUM_PG_CONFIG at another pg_config, or build \
             without the check with PGQUORUM_NO_COMMIT_CHECK=1 (agents then need \
             postgres.commit_check = false)",
            header.display()
        );
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("pgquorum_lease.so");
    build(&include, &out);
    println!("cargo::rustc-cfg=commit_check");
    println!("cargo::rustc-env=PGQUORUM_COMMIT_CHECK_SO={}", out.display());
}

fn build(include: &Path, out: &Path) {
    let compiler = cc::Build::new().get_compiler();
    let mut cmd = compiler.to_command();
    cmd.args(["-shared", "-fPIC", "-O2", "-Wno-unused-parameter"])
        .arg("-I")
        .arg(include)
        .arg("-o")
        .arg(out)
        .arg(SOURCE);
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler for {SOURCE}: {e}"));
    if !output.status.success() {
        panic!(
            "building {SOURCE} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
