//! The lease guard: a small process beside the agent that stops a primary Postgres when
//! its lease runs out — also when the agent has been killed, has crashed, is frozen, or
//! restarted without reaching a coordinator (DESIGN.md: "the lease outlives the agent").
//!
//! - The agent writes each lease deadline it is granted to the *lease file* next to the
//!   data directory, already less its safety margin, on `CLOCK_BOOTTIME` (time a
//!   host spends in system suspend counts, so a deadline passes meanwhile; a
//!   hypervisor pause that stops the guest's clocks does not: docs/leases.md), with
//!   the boot id (a deadline from an earlier boot is no lease).
//! - The guard reads that file every [`POLL`] and, once the deadline has passed while a
//!   postmaster runs on a primary's data directory (no `standby.signal`), kills the
//!   postmaster and each of its processes with SIGKILL
//!   ([`crate::postgres::ctl::kill_instance`]): at once, also for a frozen server, and
//!   crash-safe (Postgres recovers from WAL on the next start).
//! - No lease file, or one that cannot be read, means no lease: a primary found
//!   running without one is stopped. So an agent that restarts and finds a running
//!   primary counts its lease as expired unless a coordinator granted one (the guard
//!   keeps the last deadline across agent restarts).
//! - The guard never starts anything, and runs in its own process group: killing the
//!   agent (or its group; systemd with `KillMode=process`) leaves it running. The agent
//!   starts one when none runs (pid file next to the data directory). It exits on its
//!   own when the node's directory is gone, or when no postmaster has run and no
//!   agent has written the lease file for [`IDLE_EXIT`].
//!
//! What it covers: agent kill -9, crash loop, SIGSTOP of the agent, an agent restarted
//! without coordinators. What it does not: the guard and the agent both killed while
//! Postgres runs on (two failures; the coordinators still wait out the lease before
//! promoting, so the old primary is then fenced only by synchronous replication and
//! the routers); a host frozen as a whole (guard included) is stopped within one
//! [`POLL`] of thawing — meanwhile the commit-time check inside Postgres
//! ([`crate::postgres::commit_check`]) refuses what its thawed backends would commit.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::time::{clock_gettime, ClockId};

use crate::postgres::ctl::{kill_instance, kill_leftovers, postmaster_pid};

/// How often the guard looks at the deadline: the fence fires at most this late.
pub const POLL: Duration = Duration::from_millis(10);
/// How often, without a lease and without a postmaster, the guard looks for processes
/// a dead postmaster left behind.
const LEFTOVER_SCAN: Duration = Duration::from_secs(1);
/// With nothing to guard for this long, the guard exits.
pub const IDLE_EXIT: Duration = Duration::from_secs(30);

/// Nanoseconds on `CLOCK_BOOTTIME`: monotonic, and counting time the host was
/// suspended.
pub fn boottime_ns() -> u64 {
    clock_gettime(ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Where the guard of the node whose data directory is `data_dir` keeps its files.
#[derive(Clone, Debug)]
pub struct GuardFiles {
    pub data_dir: PathBuf,
    pub lease: PathBuf,
    pub pid: PathBuf,
    pub log: PathBuf,
    /// Present from the moment the agent asks for a promotion until the node is the
    /// committed primary or told to follow another: while it is, the data counts as a
    /// primary's whatever `standby.signal` says (a promotion can finish at any time).
    pub promoting: PathBuf,
    /// The commit-time lease check Postgres loads ([`crate::postgres::commit_check`]).
    pub library: PathBuf,
}

impl GuardFiles {
    /// Next to the data directory (a base backup or rewind replaces the directory).
    pub fn next_to(data_dir: &Path) -> GuardFiles {
        let beside = |suffix: &str| {
            let mut name = data_dir.file_name().unwrap_or_default().to_os_string();
            name.push(suffix);
            data_dir.with_file_name(name)
        };
        GuardFiles {
            data_dir: data_dir.to_path_buf(),
            lease: beside(".pgquorum-lease"),
            pid: beside(".pgquorum-guard.pid"),
            log: beside(".pgquorum-guard.log"),
            promoting: beside(".pgquorum-promoting"),
            library: beside(".pgquorum-lease.so"),
        }
    }

    /// Whether the data directory belongs to a standby that is not being promoted:
    /// such a server takes no writes, so no lease is needed to run it.
    pub fn standby_data(&self) -> bool {
        self.data_dir.join("standby.signal").exists() && !self.promoting.exists()
    }
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`; empty when unreadable).
/// `CLOCK_BOOTTIME` starts again at zero on a reboot, so a deadline is only meaningful
/// in the boot it was written in.
pub fn boot_id() -> &'static str {
    static BOOT_ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BOOT_ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
}

/// The lease deadline as the agent writes and the guard (and the commit-time check
/// inside Postgres, `pg/pgquorum_lease.c`) reads it: `CLOCK_BOOTTIME` nanoseconds (0:
/// no lease), their complement as a check so a torn or foreign file reads as none,
/// and the boot id. Readable by all (Postgres, another OS user, reads it at every
/// commit), whatever the umask.
pub fn write_deadline(path: &Path, deadline_ns: u64) -> std::io::Result<()> {
    let text = format!("{deadline_ns} {} {}\n", !deadline_ns, boot_id());
    replace_readable_by_all(path, &path.with_extension("tmp"), text.as_bytes(), false)
}

/// Replaces `path` with `bytes`, mode 0644 whatever the umask (Postgres, another OS
/// user, reads it): written to `tmp` (synced first when `sync`), then renamed, so a
/// reader sees the old file or the new one, and a process that mapped the old keeps it.
pub fn replace_readable_by_all(path: &Path, tmp: &Path, bytes: &[u8], sync: bool) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(tmp)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
    f.write_all(bytes)?;
    if sync {
        f.sync_all()?;
    }
    drop(f);
    std::fs::rename(tmp, path)
}

/// The deadline in the lease file; None when there is none, it cannot be read, or it
/// was written in an earlier boot.
pub fn read_deadline(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut parts = text.split_whitespace();
    let deadline: u64 = parts.next()?.parse().ok()?;
    let check: u64 = parts.next()?.parse().ok()?;
    let boot = parts.next()?;
    (check == !deadline
        && deadline > 0
        && !boot_id().is_empty()
        && boot == boot_id()
        && parts.next().is_none())
    .then_some(deadline)
}

/// Whether to fence now: a postmaster runs on a primary's data directory and no lease
/// covers `now`. Pure.
pub fn must_fence(deadline_ns: Option<u64>, now_ns: u64, postmaster_runs: bool, standby_data: bool) -> bool {
    postmaster_runs && !standby_data && deadline_ns.is_none_or(|d| now_ns >= d)
}

/// The guard's loop; returns when there is nothing left to guard.
pub fn run(files: &GuardFiles) {
    let node_dir = files.data_dir.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut idle_since = boottime_ns();
    let mut last_lease_write = std::fs::metadata(&files.lease).and_then(|m| m.modified()).ok();
    // When leftovers of a dead postmaster were last looked for (a /proc scan: not
    // every poll), and whether since the lease ran out.
    let mut leftovers_scanned: Option<u64> = None;
    eprintln!(
        "pgquorum guard {} watching {}",
        std::process::id(),
        files.data_dir.display()
    );
    loop {
        if !node_dir.is_dir() {
            eprintln!("node directory {} is gone; guard exits", node_dir.display());
            return;
        }
        let now = boottime_ns();
        let running = postmaster_pid(&files.data_dir);
        let deadline = read_deadline(&files.lease);
        let standby = files.standby_data();
        let covered = deadline.is_some_and(|d| now < d);
        if covered {
            leftovers_scanned = None;
        } else if running.is_none()
            && !standby
            && leftovers_scanned.is_none_or(|at| now.saturating_sub(at) >= LEFTOVER_SCAN.as_nanos() as u64)
        {
            // No lease and no postmaster: backends it left behind may still finish
            // a commit. Looked for at once when the lease runs out, then every second.
            let left = kill_leftovers(&files.data_dir);
            if left > 0 {
                eprintln!("killed {left} leftover processes of a dead postmaster (fence)");
            }
            leftovers_scanned = Some(now);
        }
        if let Some(pid) = running {
            if must_fence(deadline, now, true, standby) {
                let late_ms = deadline.map(|d| (now.saturating_sub(d)) / 1_000_000);
                eprintln!(
                    "primary lease {}: killing postmaster {pid} and its processes (fence)",
                    late_ms.map_or("absent".to_string(), |ms| format!("ran out {ms} ms ago"))
                );
                kill_instance(pid);
                // Until it is gone (a frozen process dies on SIGKILL, but not in no
                // time), rather than fence it again every round.
                for _ in 0..100 {
                    if postmaster_pid(&files.data_dir).is_none() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        let written = std::fs::metadata(&files.lease).and_then(|m| m.modified()).ok();
        if running.is_some() || written != last_lease_write {
            idle_since = now;
            last_lease_write = written;
        } else if now.saturating_sub(idle_since) > IDLE_EXIT.as_nanos() as u64 {
            eprintln!("no postmaster and no agent for {IDLE_EXIT:?}; guard exits");
            return;
        }
        std::thread::sleep(POLL);
    }
}

/// The pid in the guard's pid file, if that process runs a guard.
pub fn running_guard(files: &GuardFiles) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(&files.pid).ok()?.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let is_guard = cmdline.split(|&b| b == 0).any(|arg| arg == b"guard");
    is_guard.then_some(pid)
}

/// Starts a guard for `files` unless one runs; returns its pid.
pub fn ensure_running(files: &GuardFiles) -> std::io::Result<i32> {
    if let Some(pid) = running_guard(files) {
        return Ok(pid);
    }
    use std::os::unix::process::CommandExt;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&files.log)?;
    let child = std::process::Command::new(std::env::current_exe()?)
        .arg("guard")
        .arg("--data-dir")
        .arg(&files.data_dir)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: signals to the agent's group do not reach it.
        .process_group(0)
        .spawn()?;
    let pid = child.id() as i32;
    let tmp = files.pid.with_extension("tmp");
    std::fs::write(&tmp, format!("{pid}\n"))?;
    std::fs::rename(&tmp, &files.pid)?;
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_running_primary_without_a_live_lease_is_fenced() {
        let now = 5_000;
        assert!(must_fence(Some(4_999), now, true, false), "expired");
        assert!(must_fence(Some(5_000), now, true, false), "expires now");
        assert!(must_fence(None, now, true, false), "no lease at all");
        assert!(!must_fence(Some(5_001), now, true, false), "still covered");
        assert!(!must_fence(None, now, true, true), "a standby takes no writes");
        assert!(!must_fence(None, now, false, false), "nothing runs");
    }

    #[test]
    fn the_lease_file_round_trips_and_damage_reads_as_no_lease() {
        let dir = tempfile::tempdir().unwrap();
        let files = GuardFiles::next_to(&dir.path().join("data"));
        assert_eq!(read_deadline(&files.lease), None, "missing");
        write_deadline(&files.lease, 123_456).unwrap();
        assert_eq!(read_deadline(&files.lease), Some(123_456));
        write_deadline(&files.lease, 0).unwrap();
        assert_eq!(read_deadline(&files.lease), None, "0 is no lease");
        std::fs::write(&files.lease, "999 1\n").unwrap();
        assert_eq!(read_deadline(&files.lease), None, "check does not match");
        std::fs::write(&files.lease, "12").unwrap();
        assert_eq!(read_deadline(&files.lease), None, "torn");
        std::fs::write(&files.lease, format!("123456 {}", !123_456u64)).unwrap();
        assert_eq!(read_deadline(&files.lease), None, "no boot id");
        std::fs::write(&files.lease, format!("123456 {} 0000-another-boot", !123_456u64)).unwrap();
        assert_eq!(read_deadline(&files.lease), None, "written in another boot");
        std::fs::write(&files.lease, format!("123456 {} {}", !123_456u64, boot_id())).unwrap();
        assert_eq!(read_deadline(&files.lease), Some(123_456), "this boot");
        // Readable by the Postgres user whatever the umask.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let written = write_deadline(&files.lease, 7);
        nix::sys::stat::umask(old);
        written.unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&files.lease).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
    }

    #[test]
    fn boottime_moves_forward() {
        let a = boottime_ns();
        std::thread::sleep(Duration::from_millis(2));
        assert!(boottime_ns() >= a + 2_000_000);
    }
}
