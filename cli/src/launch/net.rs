//! A network per host, for tests and benchmarks that cut, split and heal links.
//!
//! [`Network::create`] makes a private switch: a network namespace holding a bridge,
//! and one namespace per host (a coordinator, or a node's agent with its Postgres and
//! lease guard), each joined to the bridge by a veth pair and given its own address in
//! a `/24` that only this network uses. This machine (the test, the router, the CLI)
//! joins the bridge too, at `.1`, as the clients' side: cutting a host off from the
//! other hosts leaves its clients reaching it, as when a database host loses its
//! cluster network but not its application network.
//!
//! Faults are nftables rules inside a host's namespace (table `inet pgquorum_fault`):
//! packets to or from the hosts it is cut from are dropped, so TCP connections hang
//! and time out as on a real cut. Namespaces have no route beyond their `/24`: no
//! packet of a test leaves for an address this network did not create.
//!
//! Everything is removed when the value is dropped, also when a test panics; names
//! are derived from a number the caller picks (its port base), so networks of tests
//! running in parallel never meet (a subnet already routed here is refused). A run
//! killed before its cleanup leaves an owner file (`/run/pgquorum-net/<prefix>`) that
//! its process held locked (`flock`, released by the kernel when the process dies):
//! the next network created on this machine removes what an unlocked file names.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::error::{Error, Result};

/// Where a process runs: its network namespace and its address there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    /// The namespace's file (`/run/netns/<ns>`), entered before the process starts.
    pub netns: PathBuf,
    pub ip: Ipv4Addr,
}

impl Host {
    /// Makes `cmd` start inside this host's network namespace. Children it starts
    /// (Postgres under an agent) inherit it.
    pub fn enter(&self, cmd: &mut Command) -> Result<()> {
        let ns = std::fs::File::open(&self.netns)
            .map_err(|e| Error::Launch(format!("cannot open {}: {e}", self.netns.display())))?;
        // SAFETY: the closure runs in the forked child before exec and only makes the
        // setns(2) system call, which is async-signal-safe; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
        Ok(())
    }
}

/// What is dropped at one host: packets from and to these addresses.
#[derive(Clone, Debug, Default)]
struct Blocked {
    from: BTreeSet<Ipv4Addr>,
    to: BTreeSet<Ipv4Addr>,
}

/// A switch with hosts on it; see the module documentation.
pub struct Network {
    /// Prefix of every name this network creates (`pq<id>`).
    prefix: String,
    /// The first three octets of its `/24`.
    subnet: [u8; 3],
    hosts: BTreeMap<String, Host>,
    blocked: BTreeMap<String, Blocked>,
    /// The owner file, locked while this network exists.
    owner: Option<nix::fcntl::Flock<std::fs::File>>,
}

/// Where owner files live (one per network, named by its prefix, holding the
/// creator's pid for people; the lock is what counts).
const OWNERS: &str = "/run/pgquorum-net";

/// Runs `ip` or `nft` (optionally inside `ns`), failing with what the tool said.
fn run(program: &str, args: &[&str], ns: Option<&Host>, stdin: Option<&str>) -> Result<()> {
    run_output(program, args, ns, stdin).map(drop)
}

/// Like [`run`], returning what the tool printed.
fn run_output(program: &str, args: &[&str], ns: Option<&Host>, stdin: Option<&str>) -> Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(host) = ns {
        host.enter(&mut cmd)?;
    }
    let mut child = cmd.spawn().map_err(|e| {
        Error::Launch(format!(
            "cannot run {program} ({e}); the network test bed needs root and the iproute2 and \
             nftables packages"
        ))
    })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Launch(format!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl Network {
    /// Creates the switch and this machine's port on it. `id` (e.g. a port base)
    /// names everything and picks the subnet: `10.(200 + id/100/256).(id/100 % 256).0/24`.
    pub fn create(id: u16) -> Result<Network> {
        let slot = id / 100;
        let prefix = format!("pq{id}");
        // Claiming an owner file and sweeping the dead ones exclude each other: else a
        // sweep (by another test in this process, or another process) could lock a file
        // its new owner has opened but not locked yet, and the owner would see it in use.
        let claiming = owners_lock()?;
        sweep_dead_owners();
        // Locked before `net` exists: dropping it would remove the owner's network.
        let path = std::path::Path::new(OWNERS).join(&prefix);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        let owner = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock);
        drop(claiming);
        let owner = match owner {
            Ok(owner) => owner,
            Err(_) => {
                let by = std::fs::read_to_string(&path).unwrap_or_default();
                return Err(Error::Launch(format!(
                    "network id {id} is in use (by process {}); pick another port base",
                    by.trim()
                )));
            }
        };
        owner.set_len(0)?;
        (&*owner).write_all(std::process::id().to_string().as_bytes())?;
        let net = Network {
            prefix,
            subnet: [10, 200 + (slot / 256) as u8, (slot % 256) as u8],
            hosts: BTreeMap::new(),
            blocked: BTreeMap::new(),
            owner: Some(owner),
        };
        net.remove_leftovers();
        let cidr = net.cidr();
        let routed = run_output("ip", &["-4", "route", "show", &cidr], None, None)?;
        if !routed.trim().is_empty() {
            return Err(Error::Launch(format!(
                "subnet {cidr} (for network id {id}) is already routed on this machine ({}); \
                 pick a port base in another hundred",
                routed.trim()
            )));
        }
        let switch = net.switch_ns();
        run("ip", &["netns", "add", &switch], None, None)?;
        run(
            "ip",
            &["-n", &switch, "link", "add", "br0", "type", "bridge"],
            None,
            None,
        )?;
        run("ip", &["-n", &switch, "link", "set", "br0", "up"], None, None)?;
        let uplink = net.prefix.clone();
        run(
            "ip",
            &[
                "link", "add", &uplink, "type", "veth", "peer", "name", "up0", "netns", &switch,
            ],
            None,
            None,
        )?;
        run(
            "ip",
            &["-n", &switch, "link", "set", "up0", "master", "br0", "up"],
            None,
            None,
        )?;
        let client = format!("{}/24", net.client_ip());
        run("ip", &["addr", "add", &client, "dev", &uplink], None, None)?;
        run("ip", &["link", "set", &uplink, "up"], None, None)?;
        Ok(net)
    }

    fn switch_ns(&self) -> String {
        format!("{}-sw", self.prefix)
    }

    /// This machine's address on the switch: where clients connect from.
    pub fn client_ip(&self) -> Ipv4Addr {
        self.ip(1)
    }

    fn ip(&self, last: u8) -> Ipv4Addr {
        Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], last)
    }

    /// The subnet in CIDR form, e.g. for pg_hba.conf.
    pub fn cidr(&self) -> String {
        format!("{}/24", self.ip(0))
    }

    /// Adds a host (`.10 + n` for the n-th host) with its namespace, and returns it.
    pub fn add_host(&mut self, name: &str) -> Result<Host> {
        if let Some(h) = self.hosts.get(name) {
            return Ok(h.clone());
        }
        let n = self.hosts.len() as u8;
        if n >= 200 {
            return Err(Error::Launch("a test network holds at most 200 hosts".into()));
        }
        let ns = format!("{}-{name}", self.prefix);
        let host = Host {
            name: name.into(),
            netns: PathBuf::from("/run/netns").join(&ns),
            ip: self.ip(10 + n),
        };
        let switch = self.switch_ns();
        let port = format!("h{n}");
        run("ip", &["netns", "add", &ns], None, None)?;
        run(
            "ip",
            &[
                "-n", &switch, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
            None,
            None,
        )?;
        run(
            "ip",
            &["-n", &switch, "link", "set", &port, "master", "br0", "up"],
            None,
            None,
        )?;
        run("ip", &["-n", &ns, "link", "set", "lo", "up"], None, None)?;
        run(
            "ip",
            &[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", host.ip),
                "dev",
                "eth0",
            ],
            None,
            None,
        )?;
        run("ip", &["-n", &ns, "link", "set", "eth0", "up"], None, None)?;
        self.hosts.insert(name.into(), host.clone());
        Ok(host)
    }

    pub fn host(&self, name: &str) -> Result<&Host> {
        self.hosts
            .get(name)
            .ok_or_else(|| Error::Launch(format!("no host {name} on this network")))
    }

    /// Every host's name.
    pub fn host_names(&self) -> Vec<String> {
        self.hosts.keys().cloned().collect()
    }

    /// Cuts `host` off from each of `others`, both ways (rules on `host`'s side).
    pub fn cut(&mut self, host: &str, others: &[&str]) -> Result<()> {
        self.drop_packets(host, others, true, true)
    }

    /// Loses what `host` sends to `others` (their replies and traffic to `host` pass).
    pub fn drop_outgoing(&mut self, host: &str, others: &[&str]) -> Result<()> {
        self.drop_packets(host, others, false, true)
    }

    /// Cuts `host` off from every other host; its clients (this machine) still reach it.
    pub fn isolate(&mut self, host: &str) -> Result<()> {
        let others: Vec<String> = self.hosts.keys().filter(|h| *h != host).cloned().collect();
        let others: Vec<&str> = others.iter().map(String::as_str).collect();
        self.cut(host, &others)
    }

    /// Splits the hosts into two groups that cannot reach each other.
    pub fn split(&mut self, side_a: &[&str], side_b: &[&str]) -> Result<()> {
        for a in side_a {
            self.cut(a, side_b)?;
        }
        Ok(())
    }

    /// Splits `group` from every other host (e.g. the Raft leader and the primary
    /// together from the rest).
    pub fn split_off(&mut self, group: &[&str]) -> Result<()> {
        let rest: Vec<String> = self
            .hosts
            .keys()
            .filter(|h| !group.contains(&h.as_str()))
            .cloned()
            .collect();
        let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
        self.split(group, &rest)
    }

    fn drop_packets(&mut self, host: &str, others: &[&str], from: bool, to: bool) -> Result<()> {
        let ips: Vec<Ipv4Addr> = others
            .iter()
            .map(|o| self.host(o).map(|h| h.ip))
            .collect::<Result<_>>()?;
        let blocked = self.blocked.entry(host.into()).or_default();
        if from {
            blocked.from.extend(&ips);
        }
        if to {
            blocked.to.extend(&ips);
        }
        self.apply(host)
    }

    /// Heals every fault at `host`.
    pub fn heal(&mut self, host: &str) -> Result<()> {
        self.blocked.remove(host);
        self.apply(host)
    }

    /// Heals every fault.
    pub fn heal_all(&mut self) -> Result<()> {
        let faulty: Vec<String> = self.blocked.keys().cloned().collect();
        for host in faulty {
            self.heal(&host)?;
        }
        Ok(())
    }

    /// Replaces `host`'s rules, atomically, by what `blocked` says.
    fn apply(&self, host: &str) -> Result<()> {
        let h = self.host(host)?;
        let blocked = self.blocked.get(host).cloned().unwrap_or_default();
        let set =
            |ips: &BTreeSet<Ipv4Addr>| ips.iter().map(|ip| ip.to_string()).collect::<Vec<_>>().join(", ");
        let mut rules = String::from("table inet pgquorum_fault {}\ndelete table inet pgquorum_fault\n");
        if !blocked.from.is_empty() || !blocked.to.is_empty() {
            rules.push_str("table inet pgquorum_fault {\n");
            rules.push_str("  chain input {\n    type filter hook input priority -10; policy accept;\n");
            if !blocked.from.is_empty() {
                rules.push_str(&format!("    ip saddr {{ {} }} drop\n", set(&blocked.from)));
            }
            rules.push_str(
                "  }\n  chain output {\n    type filter hook output priority -10; policy accept;\n",
            );
            if !blocked.to.is_empty() {
                rules.push_str(&format!("    ip daddr {{ {} }} drop\n", set(&blocked.to)));
            }
            rules.push_str("  }\n}\n");
        }
        run("nft", &["-f", "-"], Some(h), Some(&rules))
    }

    /// Deletes what an earlier run with the same id left (it was killed before its
    /// cleanup ran): namespaces with this network's prefix and its uplink.
    fn remove_leftovers(&self) {
        remove_network(&self.prefix);
    }
}

/// Deletes the uplink and the namespaces of the network named `prefix` (deleting the
/// switch's namespace deletes the bridge and every veth pair).
fn remove_network(prefix: &str) {
    let _ = run("ip", &["link", "del", prefix], None, None);
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        let mine = format!("{prefix}-");
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with(&mine) {
                let _ = run("ip", &["netns", "del", &name], None, None);
            }
        }
    }
}

/// The lock taken while an owner file is claimed or the dead ones swept (`OWNERS/.lock`).
fn owners_lock() -> Result<nix::fcntl::Flock<std::fs::File>> {
    std::fs::create_dir_all(OWNERS)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::path::Path::new(OWNERS).join(OWNERS_LOCK))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| Error::Launch(format!("cannot lock {OWNERS}/{OWNERS_LOCK}: {e}")))
}

const OWNERS_LOCK: &str = ".lock";

/// Removes the networks whose creating process is gone (killed before its cleanup).
/// Call with [`owners_lock`] held.
fn sweep_dead_owners() {
    let Ok(entries) = std::fs::read_dir(OWNERS) else {
        return;
    };
    for e in entries.flatten().filter(|e| e.file_name() != OWNERS_LOCK) {
        let Ok(file) = std::fs::OpenOptions::new().write(true).open(e.path()) else {
            continue;
        };
        // Unlocked: its owner is gone (locked: alive, or just creating it).
        if let Ok(_dead) = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            remove_network(&e.file_name().to_string_lossy());
            let _ = std::fs::remove_file(e.path());
        }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.remove_leftovers();
        let _ = std::fs::remove_file(std::path::Path::new(OWNERS).join(&self.prefix));
        // The lock goes last, with `owner`.
        self.owner.take();
    }
}
