//! Starting pgquorum on this machine, as real processes on loopback.
//!
//! This is the one way pgquorum starts a local cluster: the sandbox, the benchmarks and
//! the end-to-end tests all go through [`CoordinatorGroup`] and [`Sandbox`], so what
//! the tests prove is what a newcomer runs. Every process gets its own directory and
//! port (from a port base the caller picks); two clusters with different directories
//! and port bases never collide, so tests can run in parallel.

mod coordinators;
mod net;
mod sandbox;

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub use coordinators::{sandbox_region, CoordinatorGroup, GroupSpec};
pub use net::{Host, Network};
pub use sandbox::{
    children, coordinator_host, postmaster_pid, runs, start_recorded_agent, stop_recorded, Sandbox,
    SandboxFile, SandboxSpec, AGENT_BIN, SANDBOX_FILE,
};

use crate::error::{Error, Result};

pub const COORDINATOR_BIN: &str = "pgquorum-coordinator";

/// A helper process (pgbench, PgBouncer, HAProxy, …) killed and reaped when dropped,
/// also when a benchmark or test fails half-way.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Finds a pgquorum binary: `$PGQUORUM_BIN_DIR`, else next to the running executable,
/// else one directory up (test executables live in `target/<profile>/deps/`).
pub fn find_binary(name: &str) -> Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("PGQUORUM_BIN_DIR") {
        candidates.push(PathBuf::from(dir).join(name));
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join(name));
            if let Some(up) = dir.parent() {
                candidates.push(up.join(name));
            }
        }
    }
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        Error::Launch(format!(
            "cannot find the {name} binary (looked in {}); build it with `cargo build --workspace` \
             or point PGQUORUM_BIN_DIR at the directory holding it",
            candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}

/// Starts `bin args…` with stdout and stderr appended to `log`, on `host`'s network
/// when given (else on this machine's).
fn spawn_logged(bin: &Path, args: &[&OsStr], log: &Path, host: Option<&Host>) -> Result<Child> {
    let file = OpenOptions::new().create(true).append(true).open(log)?;
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    if let Some(host) = host {
        host.enter(&mut cmd)?;
    }
    cmd.spawn()
        .map_err(|e| Error::Launch(format!("cannot start {}: {e}", bin.display())))
}

/// Prints the last lines of a process's log, for a failing test's output.
fn print_log_tail(what: &str, path: &Path) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    eprintln!("---- {what} log (last 40 lines of {}) ----", path.display());
    for line in &lines[lines.len().saturating_sub(40)..] {
        eprintln!("{line}");
    }
}

/// Sends `signal` to the child and reaps it, escalating to SIGKILL after `grace`.
fn signal_and_wait(child: &mut Child, signal: Signal, grace: Duration) -> Result<()> {
    let pid = Pid::from_raw(child.id() as i32);
    // The child may already have exited; reaping below handles that.
    let _ = kill(pid, signal);
    let deadline = Instant::now() + grace;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            child.wait()?;
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Fails early, naming the port, when something else already listens there.
pub fn ensure_port_free(port: u16) -> Result<()> {
    std::net::TcpListener::bind(("127.0.0.1", port))
        .map(drop)
        .map_err(|e| {
            Error::Launch(format!(
                "port {port} on 127.0.0.1 is not free ({e}); choose another port base"
            ))
        })
}
