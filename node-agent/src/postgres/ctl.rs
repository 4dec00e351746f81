//! Managing the Postgres server as a process: create, start, stop, check.
//!
//! Everything goes through Postgres's own tools (initdb, pg_basebackup, pg_ctl), run as
//! the configured OS user when the agent runs as root, because Postgres refuses to run
//! as root. The postmaster is started detached (pg_ctl), so the agent can stop and
//! restart without disturbing it: Postgres is started and stopped only on purpose.
//!
//! Every node's own settings (port, addresses, replication) live in `pgquorum.conf`,
//! included from `postgresql.conf`. A base backup copies the primary's file; the clone
//! then writes its own over it.

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::kill;
use nix::unistd::{chown, Gid, Pid, Uid, User};
use tracing::info;

use super::commit_check;
use crate::config::PostgresConfig;
use crate::error::{Error, Result};
use crate::guard::GuardFiles;

/// The file with this node's settings, next to postgresql.conf.
const NODE_CONF: &str = "pgquorum.conf";
/// The cluster's parameters (`pgquorum config set`), included first from
/// [`NODE_CONF`]: the node's own settings come after and win.
const CLUSTER_CONF: &str = "pgquorum.cluster.conf";
const PRELOAD: &str = "shared_preload_libraries";

/// Who Postgres runs as: the agent's own user, or `os_user` when the agent is root.
#[derive(Clone, Copy, Debug)]
struct RunAs {
    uid: Uid,
    gid: Gid,
}

/// Where the standby streams from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub host: String,
    pub port: u16,
}

pub struct PostgresCtl {
    cfg: PostgresConfig,
    /// Set when the agent is root: the user Postgres must run as.
    run_as: Option<RunAs>,
    /// The member name: application_name and replication slot name.
    name: String,
}

/// Whether `pid` is a live process: it exists and is not a zombie (an exited
/// postmaster whose parent has not reaped it still answers signal 0).
pub fn process_alive(pid: i32) -> bool {
    match kill(Pid::from_raw(pid), None) {
        Ok(()) | Err(nix::errno::Errno::EPERM) => {}
        Err(_) => return false,
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

/// Every process whose parent is `pid` (a postmaster's backends and helpers).
pub fn children(pid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|child| {
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            // Fields after the parenthesised command name: state, ppid, …
            let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
            after
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<i32>().ok())
                == Some(pid)
        })
        .collect()
}

/// Kills a Postgres instance at once, frozen or not: the postmaster is stopped first
/// (so it forks no more), then every child and the postmaster get SIGKILL.
///
/// Every child of a postmaster runs in a session of its own (Postgres calls
/// `setsid()` in each), so no process-group signal reaches them; and a backend that
/// outlives its postmaster — one thawed after its postmaster was killed — still
/// finishes the commit it had started, and acknowledges it. So each is killed by pid.
/// Crash-safe: the next start recovers from WAL.
pub fn kill_instance(postmaster: i32) {
    use nix::sys::signal::Signal;
    let pm = Pid::from_raw(postmaster);
    let _ = kill(pm, Signal::SIGSTOP);
    for child in children(postmaster) {
        let _ = kill(Pid::from_raw(child), Signal::SIGKILL);
    }
    let _ = kill(pm, Signal::SIGKILL);
}

/// The pid of the postmaster running on `data_dir`, from `postmaster.pid`, if alive.
///
/// A standalone backend (`postgres --single`, as initdb and pg_rewind's crash recovery
/// run) writes its pid negated: it serves no client, and it is no postmaster; None.
/// A file left by a killed postmaster whose pid was reused by another process is
/// recognised by that process's working directory (a postmaster's is its data
/// directory), so nothing unrelated is ever signalled as "the postmaster".
pub fn postmaster_pid(data_dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    if pid <= 0 || !process_alive(pid) {
        return None;
    }
    // The same directory, by device and inode (a bind mount, a rename or another mount
    // namespace name it differently); unreadable (no permission): trust the file
    // rather than lose a live postmaster.
    use std::os::unix::fs::MetadataExt;
    let reused = match (
        std::fs::metadata(format!("/proc/{pid}/cwd")),
        std::fs::metadata(data_dir),
    ) {
        (Ok(cwd), Ok(dir)) => (cwd.dev(), cwd.ino()) != (dir.dev(), dir.ino()),
        _ => false,
    };
    (!reused).then_some(pid)
}

/// The processes a postmaster started on `data_dir` (backends and helpers), found by
/// their working directory (the data directory) and their process title (`postgres:
/// …`, which only a postmaster's children set) — also once their postmaster is gone,
/// when a backend can still finish, and acknowledge, the commit it was doing. Not a
/// standalone backend (`postgres --single`, run by initdb and by pg_rewind's crash
/// recovery), which keeps its command line and serves no client.
pub fn instance_pids(data_dir: &Path) -> Vec<i32> {
    let Ok(dir) = data_dir.canonicalize() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == dir))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.starts_with(b"postgres: "))
        })
        .filter(|&pid| process_alive(pid))
        .collect()
}

/// Kills what is left of an instance whose postmaster is gone (SIGKILL, by pid), and
/// returns how many processes were left.
pub fn kill_leftovers(data_dir: &Path) -> usize {
    let left = instance_pids(data_dir);
    for pid in &left {
        let _ = kill(Pid::from_raw(*pid), nix::sys::signal::Signal::SIGKILL);
    }
    left.len()
}

/// Whether a node on `timeline` at `lsn` went past where the history (a `.history`
/// file: `parent_tli<TAB>switchpoint<TAB>reason` per line) left `timeline`. A timeline
/// absent from the history is not an ancestor at all: diverged.
pub fn diverged(history: &str, timeline: u32, lsn: pgquorum_client::lsn::Lsn) -> bool {
    let switchpoint = history.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let tli: u32 = fields.next()?.parse().ok()?;
        let at = pgquorum_client::lsn::Lsn::parse(fields.next()?)?;
        (tli == timeline).then_some(at)
    });
    match switchpoint {
        Some(at) => lsn > at,
        None => true,
    }
}

/// Replication slot name for a member: Postgres allows lower-case letters, digits
/// and underscores only.
pub fn slot_name(member: &str) -> String {
    member
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// Quotes a value as a SQL literal (standard_conforming_strings: a backslash is
/// itself).
pub fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Quotes a value for a configuration file, where a backslash escapes (a value ending
/// in one would leave the string open, and the whole file be refused).
pub fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

impl PostgresCtl {
    pub fn new(cfg: PostgresConfig, name: &str) -> Result<PostgresCtl> {
        let run_as = if Uid::effective().is_root() {
            let user = User::from_name(&cfg.os_user)
                .map_err(|e| Error::Config { path: "postgres.os_user".into(), message: e.to_string() })?
                .ok_or_else(|| Error::Config {
                    path: "postgres.os_user".into(),
                    message: format!(
                        "the agent runs as root, so Postgres must run as another user, but no user {:?} exists",
                        cfg.os_user
                    ),
                })?;
            Some(RunAs {
                uid: user.uid,
                gid: user.gid,
            })
        } else {
            None
        };
        Ok(PostgresCtl {
            cfg,
            run_as,
            name: name.to_string(),
        })
    }

    pub fn data_dir(&self) -> &Path {
        &self.cfg.data_dir
    }

    fn incomplete_marker(&self) -> PathBuf {
        let mut name = self.cfg.data_dir.file_name().unwrap_or_default().to_os_string();
        name.push(".pgquorum-incomplete");
        self.cfg.data_dir.with_file_name(name)
    }

    /// Whether the data directory holds a complete Postgres cluster.
    pub fn initialized(&self) -> bool {
        self.cfg.data_dir.join("PG_VERSION").is_file() && !self.incomplete_marker().exists()
    }

    /// The postmaster's pid, if one runs on this data directory.
    pub fn running_pid(&self) -> Option<i32> {
        postmaster_pid(&self.cfg.data_dir)
    }

    fn command(&self, tool: &str) -> Command {
        let mut cmd = Command::new(self.cfg.bin_dir.join(tool));
        cmd.stdin(Stdio::null());
        if let Some(r) = self.run_as {
            cmd.uid(r.uid.as_raw()).gid(r.gid.as_raw());
        }
        if !self.cfg.password.is_empty() {
            cmd.env("PGPASSWORD", &self.cfg.password);
        }
        // Tools must not pick up a client environment meant for something else.
        cmd.env_remove("PGHOST")
            .env_remove("PGPORT")
            .env_remove("PGDATA")
            .env_remove("PGSERVICE");
        cmd
    }

    async fn run(&self, tool: &str, cmd: Command) -> Result<()> {
        let mut cmd = tokio::process::Command::from(cmd);
        let out = cmd.output().await.map_err(|e| Error::Tool {
            tool: tool.into(),
            detail: format!("cannot run: {e}"),
        })?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let detail = format!("{} ({})", stderr.trim(), out.status).replace('\n', " | ");
        let detail = if stderr.trim().is_empty() {
            format!("{} ({})", stdout.trim(), out.status)
        } else {
            detail
        };
        Err(Error::Tool {
            tool: tool.into(),
            detail,
        })
    }

    /// Makes `dir` exist, owned by the Postgres user.
    fn make_dir(&self, dir: &Path, mode: u32) -> Result<()> {
        let fail = |e: std::io::Error| Error::Tool {
            tool: "prepare data_dir".into(),
            detail: format!("{}: {e}", dir.display()),
        };
        std::fs::create_dir_all(dir).map_err(fail)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(fail)?;
        if let Some(r) = self.run_as {
            chown(dir, Some(r.uid), Some(r.gid)).map_err(|e| fail(e.into()))?;
        }
        Ok(())
    }

    /// An empty data directory (and its parent, for the log file), owned by the
    /// Postgres user. Leftovers of a failed attempt are removed first.
    ///
    /// A directory with other contents is never wiped: only one this agent left
    /// behind, marked by `<data_dir>.pgquorum-incomplete` while it was being created.
    fn fresh_data_dir(&self) -> Result<()> {
        let dir = &self.cfg.data_dir;
        let marker = self.incomplete_marker();
        let empty = std::fs::read_dir(dir)
            .map(|mut d| d.next().is_none())
            .unwrap_or(true);
        if dir.exists() && !empty {
            if !marker.exists() {
                return Err(Error::Config {
                    path: "postgres.data_dir".into(),
                    message: format!(
                        "{} is not empty but holds no Postgres cluster; move its contents away or choose another data_dir",
                        dir.display()
                    ),
                });
            }
            std::fs::remove_dir_all(dir)?;
        }

        self.prepare_dirs()?;
        std::fs::write(&marker, "pgquorum-agent is creating this data directory\n").map_err(|e| {
            Error::Tool {
                tool: "prepare data_dir".into(),
                detail: format!("{}: {e}", marker.display()),
            }
        })?;
        self.make_dir(dir, 0o700)
    }

    /// Creates the data directory's parent and the log's directory, owned by the
    /// Postgres user, if they are missing.
    pub fn prepare_dirs(&self) -> Result<()> {
        let log_file = self.cfg.log_file();
        for dir in [self.cfg.data_dir.parent(), log_file.parent()]
            .into_iter()
            .flatten()
        {
            if !dir.exists() {
                self.make_dir(dir, 0o755)?;
            }
        }
        self.install_commit_check()
    }

    /// Writes the commit-time lease check's library beside the data directory (when
    /// `commit_check`): before every start, so a library removed meanwhile cannot keep
    /// Postgres from starting.
    fn install_commit_check(&self) -> Result<()> {
        if !self.cfg.commit_check {
            return Ok(());
        }
        let library = GuardFiles::next_to(&self.cfg.data_dir).library;
        commit_check::install(&library).map_err(|e| Error::Tool {
            tool: "commit check".into(),
            detail: format!("cannot write {}: {e}", library.display()),
        })
    }

    /// Creates a new cluster for a first primary: initdb with data checksums, so that
    /// pg_rewind can work on it later, then this node's settings.
    pub async fn init_primary(&self) -> Result<()> {
        self.fresh_data_dir()?;
        let mut cmd = self.command("initdb");
        cmd.arg("-D")
            .arg(&self.cfg.data_dir)
            .args(["--data-checksums", "--encoding=UTF8", "--locale=C"]);
        cmd.arg(format!("--username={}", self.cfg.superuser));
        let pwfile = self.cfg.data_dir.with_extension("pwfile");
        if self.cfg.password.is_empty() {
            cmd.arg("--auth=trust");
        } else {
            std::fs::write(&pwfile, &self.cfg.password)?;
            if let Some(r) = self.run_as {
                chown(&pwfile, Some(r.uid), Some(r.gid)).map_err(std::io::Error::from)?;
            }
            cmd.args(["--auth-local=peer", "--auth-host=scram-sha-256"])
                .arg(format!("--pwfile={}", pwfile.display()));
        }
        let result = self.run("initdb", cmd).await;
        let _ = std::fs::remove_file(&pwfile);
        result?;
        self.include_node_conf()?;
        self.write_node_conf(None)?;
        std::fs::remove_file(self.incomplete_marker())?;
        info!(data_dir = %self.cfg.data_dir.display(), "initialized a new cluster");
        Ok(())
    }

    /// Clones the primary with pg_basebackup, streaming from a replication slot that
    /// is created first, so the primary keeps WAL for this standby from the start.
    pub async fn clone_from(&self, upstream: &Upstream) -> Result<()> {
        self.ensure_slot_on(upstream).await?;
        self.fresh_data_dir()?;
        let mut cmd = self.command("pg_basebackup");
        cmd.arg("-D")
            .arg(&self.cfg.data_dir)
            .args([
                "-h",
                &upstream.host,
                "-p",
                &upstream.port.to_string(),
                "-U",
                self.cfg.replication_user(),
            ])
            .args([
                "-X",
                "stream",
                "-c",
                "fast",
                "-S",
                &slot_name(&self.name),
                "--no-password",
            ]);
        self.run("pg_basebackup", cmd).await?;
        self.write_node_conf(Some(upstream))?;
        std::fs::remove_file(self.incomplete_marker())?;
        info!(upstream = ?upstream, "cloned from the primary");
        Ok(())
    }

    /// Writes the cluster's parameters (`pgquorum config set`) to their file, and makes
    /// sure this node's settings include it (a data directory from before has them
    /// without): reload to apply.
    pub fn write_cluster_parameters(
        &self,
        parameters: &std::collections::BTreeMap<String, String>,
    ) -> Result<()> {
        let mut text =
            String::from("# The cluster's parameters, written by pgquorum-agent from `pgquorum config`.\n");
        for (k, v) in parameters {
            let _ = writeln!(text, "{k} = {}", conf_quote(v));
        }
        let path = self.cfg.data_dir.join(CLUSTER_CONF);
        let tmp = path.with_extension("conf.tmp");
        std::fs::write(&tmp, text)?;
        if let Some(r) = self.run_as {
            chown(&tmp, Some(r.uid), Some(r.gid)).map_err(std::io::Error::from)?;
        }
        std::fs::rename(&tmp, &path)?;
        let node_conf = self.cfg.data_dir.join(NODE_CONF);
        let include = format!("include_if_exists = '{CLUSTER_CONF}'");
        if let Ok(current) = std::fs::read_to_string(&node_conf) {
            if !current.contains(&include) {
                std::fs::write(&node_conf, format!("{include}\n{current}"))?;
            }
        }
        Ok(())
    }

    /// Replaces the data directory of the stopped server with a fresh base backup of
    /// `upstream` (`pgquorum reinit`). The marker written first makes a rebuild cut
    /// short (a crash, a failed backup) start over rather than run a half copy.
    pub async fn reinit_from(&self, upstream: &Upstream) -> Result<()> {
        std::fs::write(
            self.incomplete_marker(),
            "rebuilding from a base backup (reinit)\n",
        )?;
        self.clone_from(upstream).await
    }

    pub async fn ensure_slot_on(&self, upstream: &Upstream) -> Result<()> {
        let client = super::connect(&self.cfg, &upstream.host, upstream.port, "pgquorum-agent").await?;
        let slot = slot_name(&self.name);
        let sql = format!(
            "SELECT pg_create_physical_replication_slot({0}) WHERE NOT EXISTS \
             (SELECT 1 FROM pg_replication_slots WHERE slot_name = {0})",
            quote(&slot)
        );
        client.simple_query(&sql).await.map_err(|e| Error::Postgres {
            target: format!("{}:{}", upstream.host, upstream.port),
            detail: format!("creating replication slot {slot}: {e}"),
        })?;
        Ok(())
    }

    fn include_node_conf(&self) -> Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.cfg.data_dir.join("postgresql.conf"))?;
        writeln!(
            f,
            "\n# Settings of this node, managed by pgquorum-agent.\ninclude_if_exists = '{NODE_CONF}'"
        )?;
        Ok(())
    }

    /// Writes this node's settings; with an upstream, also what makes it a standby
    /// (`standby.signal`). Only for a server that is not running: see [`Self::repoint`].
    pub fn write_node_conf(&self, upstream: Option<&Upstream>) -> Result<()> {
        self.write_settings(upstream)?;
        if upstream.is_some() {
            let signal = self.cfg.data_dir.join("standby.signal");
            std::fs::write(&signal, "")?;
            if let Some(r) = self.run_as {
                chown(&signal, Some(r.uid), Some(r.gid)).map_err(std::io::Error::from)?;
            }
        }
        Ok(())
    }

    /// Points a standby at `upstream` (settings only; reload to apply). Never creates
    /// `standby.signal`: a server whose promotion finished since it was observed as a
    /// standby has just removed it, and a primary carrying it would look like a standby
    /// to its lease guard and never be fenced.
    pub fn repoint(&self, upstream: &Upstream) -> Result<()> {
        self.write_settings(Some(upstream))
    }

    fn write_settings(&self, upstream: Option<&Upstream>) -> Result<()> {
        let c = &self.cfg;
        let mut s = format!(
            "# Written by pgquorum-agent; changes are overwritten.\n# The cluster's parameters (pgquorum config set); this node's own below win.\ninclude_if_exists = '{CLUSTER_CONF}'\n"
        );
        let mut set = |k: &str, v: &str| {
            let _ = writeln!(s, "{k} = {}", conf_quote(v));
        };
        set("listen_addresses", &c.listen_addresses);
        set("port", &c.port.to_string());
        // TCP only: socket paths would depend on directories the OS user may not own.
        set("unix_socket_directories", "");
        set("cluster_name", &self.name);
        set("wal_level", "replica");
        set("max_wal_senders", "16");
        set("max_replication_slots", "16");
        set("hot_standby", "on");
        set("hot_standby_feedback", "on");
        set("wal_log_hints", "on");
        set("wal_keep_size", "256MB");
        // How long a standby waits before retrying a lost WAL source; PG 15 sleeps it
        // out even when asked to promote, so the default 5 s would add 5 s to every
        // failover.
        set("wal_retrieve_retry_interval", "100ms");
        if let Some(up) = upstream {
            let conninfo = format!(
                "host={} port={} user={} application_name={} connect_timeout=2",
                up.host,
                up.port,
                c.replication_user(),
                self.name
            );
            set("primary_conninfo", &conninfo);
            set("primary_slot_name", &slot_name(&self.name));
        }
        if c.commit_check {
            let files = GuardFiles::next_to(&c.data_dir);
            let configured = c.parameters.get(PRELOAD).map(String::as_str);
            set(
                PRELOAD,
                &commit_check::preload_libraries(&files.library, configured),
            );
            set("pgquorum.lease_file", &files.lease.display().to_string());
        }
        for (k, v) in &c.parameters {
            if !(c.commit_check && k == PRELOAD) {
                set(k, v);
            }
        }
        let path = c.data_dir.join(NODE_CONF);
        std::fs::write(&path, s)?;
        if let Some(r) = self.run_as {
            chown(&path, Some(r.uid), Some(r.gid)).map_err(std::io::Error::from)?;
        }
        if !c.pg_hba.is_empty() {
            let hba = c.data_dir.join("pg_hba.conf");
            let text = format!(
                "# Written by pgquorum-agent from postgres.pg_hba; changes are overwritten.\n{}\n",
                c.pg_hba.join("\n")
            );
            std::fs::write(&hba, text)?;
            if let Some(r) = self.run_as {
                chown(&hba, Some(r.uid), Some(r.gid)).map_err(std::io::Error::from)?;
            }
        }
        Ok(())
    }

    /// Asks the postmaster to re-read its configuration files (`pg_ctl reload`: a
    /// signal, no connection needed).
    pub async fn reload(&self) -> Result<()> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D").arg(&self.cfg.data_dir).arg("reload");
        self.run("pg_ctl reload", cmd).await
    }

    /// Starts the postmaster, detached, and waits until it accepts connections.
    pub async fn start(&self) -> Result<()> {
        self.install_commit_check()?;
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.cfg.data_dir)
            .arg("-l")
            .arg(self.cfg.log_file())
            .args(["-w", "-t", "60", "start"]);
        // The postmaster must not die with the agent's process group (Ctrl-C, a test
        // harness killing the agent): start it in its own session.
        unsafe {
            cmd.pre_exec(|| nix::unistd::setsid().map(drop).map_err(std::io::Error::from));
        }
        self.run("pg_ctl start", cmd).await?;
        info!(port = self.cfg.port, "postgres started");
        Ok(())
    }

    /// The newest timeline among the WAL segments in `pg_wal`: the timeline a standby
    /// has received WAL on. Without a WAL receiver a standby reports its last
    /// restartpoint's timeline, which stays older than the one it replays until its
    /// next restartpoint; taken for its own, it would make a standby that streamed
    /// the new timeline past the fork point look diverged.
    pub fn newest_wal_timeline(&self) -> Option<u32> {
        let dir = std::fs::read_dir(self.cfg.data_dir.join("pg_wal")).ok()?;
        dir.filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|name| name.len() == 24 && name.chars().all(|c| c.is_ascii_hexdigit()))
            .filter_map(|name| u32::from_str_radix(&name[..8], 16).ok())
            .max()
    }

    /// Whether the data directory is a standby's (it has `standby.signal`).
    pub fn is_standby_data(&self) -> bool {
        self.cfg.data_dir.join("standby.signal").exists()
    }

    /// Fences: kills every process of the instance at once ([`kill_instance`]; like
    /// `pg_ctl stop -m immediate`, no checkpoint, but without waiting on a server that
    /// is frozen or slow to answer), then waits until the postmaster is gone.
    pub async fn fence(&self) -> Result<()> {
        for _ in 0..100 {
            let Some(pid) = self.running_pid() else {
                return Ok(());
            };
            kill_instance(pid);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        match self.running_pid() {
            None => Ok(()),
            Some(pid) => Err(Error::Tool {
                tool: "fence".into(),
                detail: format!("postmaster {pid} survives SIGKILL"),
            }),
        }
    }

    /// Turns a former primary into a standby of `upstream`: pg_rewind against it (which
    /// runs crash recovery first when the server was not shut down cleanly), falling
    /// back to a fresh base backup when rewinding cannot work.
    pub async fn rejoin(&self, upstream: &Upstream) -> Result<&'static str> {
        let source = format!(
            "host={} port={} user={} dbname={} connect_timeout=5",
            upstream.host, upstream.port, self.cfg.superuser, self.cfg.database
        );
        // A just-promoted primary's control file still names the old timeline until
        // its end-of-recovery checkpoint is done, and pg_rewind would then see nothing
        // to rewind: make it checkpoint first.
        let client = super::connect(&self.cfg, &upstream.host, upstream.port, "pgquorum-agent").await?;
        client
            .simple_query("CHECKPOINT")
            .await
            .map_err(|e| Error::Postgres {
                target: format!("{}:{}", upstream.host, upstream.port),
                detail: format!("CHECKPOINT before pg_rewind: {e}"),
            })?;
        // A postmaster.pid left by a killed server whose pid is not a live postmaster
        // (an unreaped zombie, or reused) would make pg_rewind's crash recovery refuse
        // to start.
        let pid_file = self.cfg.data_dir.join("postmaster.pid");
        if pid_file.exists() && self.running_pid().is_none() {
            std::fs::remove_file(&pid_file)?;
        }
        let mut cmd = self.command("pg_rewind");
        cmd.arg("-D")
            .arg(&self.cfg.data_dir)
            .arg(format!("--source-server={source}"));
        match self.run("pg_rewind", cmd).await {
            Ok(()) => {
                self.ensure_slot_on(upstream).await?;
                self.write_node_conf(Some(upstream))?;
                Ok("pg_rewind")
            }
            Err(e) => {
                tracing::warn!("{e}; falling back to a fresh base backup");
                std::fs::write(self.incomplete_marker(), "rebuilding from a base backup\n")?;
                self.clone_from(upstream).await?;
                Ok("base backup")
            }
        }
    }

    /// Whether this node's WAL went past the point where `upstream`'s timeline forked
    /// off its own: then it cannot stream from `upstream` and must be rewound. `timeline`
    /// and `lsn` are this node's (the highest of received and replayed).
    pub async fn diverged_from(&self, upstream: &Upstream, timeline: u32, lsn: &str) -> Result<bool> {
        let target = format!("{}:{}", upstream.host, upstream.port);
        let client = super::connect(&self.cfg, &upstream.host, upstream.port, "pgquorum-agent").await?;
        let fail = |e: tokio_postgres::Error| Error::Postgres {
            target: target.clone(),
            detail: e.to_string(),
        };
        let row = client
            .query_one(
                "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int",
                &[],
            )
            .await
            .map_err(fail)?;
        let upstream_tli: i32 = row.get(0);
        if upstream_tli as u32 == timeline || timeline == 0 {
            return Ok(false);
        }
        let history_file = format!("pg_wal/{upstream_tli:08X}.history");
        let row = client
            .query_one("SELECT pg_read_file($1)", &[&history_file])
            .await
            .map_err(fail)?;
        let history: String = row.get(0);
        let mine = pgquorum_client::lsn::Lsn::parse(lsn).unwrap_or_default();
        Ok(diverged(&history, timeline, mine))
    }

    /// Stops the postmaster (`fast`: roll back sessions, checkpoint, exit).
    /// A clean (fast) shutdown, as `pg_ctl stop -m fast` does (SIGINT to the
    /// postmaster), waited for here in 10 ms steps: `pg_ctl -w` looks every 100 ms,
    /// which a switchover's write gap pays for. Up to 60 s.
    pub async fn stop(&self) -> Result<()> {
        let Some(pid) = self.running_pid() else {
            return Ok(());
        };
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGINT).map_err(
            |e| Error::Tool {
                tool: "stop".into(),
                detail: format!("cannot signal postmaster {pid}: {e}"),
            },
        )?;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while process_alive(pid) {
            if std::time::Instant::now() >= deadline {
                return Err(Error::Tool {
                    tool: "stop".into(),
                    detail: format!("postmaster {pid} still runs 60 s after a fast shutdown was asked"),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    pub fn log_file(&self) -> PathBuf {
        self.cfg.log_file()
    }
}

/// How long an observation query may take before Postgres counts as hung.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divergence_from_a_timeline_history() {
        use pgquorum_client::lsn::Lsn;
        let history =
            "1\t0/3000148\tno recovery target specified\n\n2\t0/5000000\tno recovery target specified\n";
        assert!(!diverged(history, 2, Lsn::parse("0/5000000").unwrap()));
        assert!(diverged(history, 2, Lsn::parse("0/5000001").unwrap()));
        assert!(!diverged(history, 1, Lsn::parse("0/3000000").unwrap()));
        assert!(
            diverged(history, 4, Lsn::parse("0/1").unwrap()),
            "not an ancestor"
        );
    }

    #[test]
    fn slot_names_and_quoting() {
        assert_eq!(slot_name("Node-2.a"), "node_2_a");
        assert_eq!(quote("it's"), "'it''s'");
        assert_eq!(conf_quote("C:\\x\\"), "'C:\\\\x\\\\'");
        assert_eq!(conf_quote("it's"), "'it''s'");
    }
}
