//! pgbench select-only TPS against the primary directly, through `pgquorum-router`,
//! through PgBouncer (session mode) and through HAProxy (plain `mode tcp`),
//! interleaved round by round so the machine's noise hits every target alike. Same
//! client count, same duration, same machine.
//!
//! On a small machine every proxy takes CPU from pgbench and Postgres, so TPS alone
//! hides how much each one spends; each proxy's CPU time (user + system, from
//! `/proc/PID/stat`) per transaction is reported beside it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use super::Options;
use crate::bench::summary;
use crate::error::{Error, Result};
use crate::launch::{KillOnDrop, Sandbox};
use crate::output::table;

const PGBENCH: &str = "/usr/lib/postgresql/15/bin/pgbench";
const PGBOUNCER: &str = "/usr/sbin/pgbouncer";
const HAPROXY: &str = "/usr/sbin/haproxy";

fn spawn(cmd: &mut Command, what: &str) -> Result<KillOnDrop> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd.spawn()
        .map(KillOnDrop)
        .map_err(|e| Error::Launch(format!("cannot start {what}: {e} (apt-get install {what})")))
}

fn pgbench(args: &[&str], port: u16) -> Result<String> {
    let out = Command::new(PGBENCH)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(args)
        .arg("postgres")
        .output()
        .map_err(|e| Error::Launch(format!("pgbench: {e}")))?;
    if !out.status.success() {
        return Err(Error::Launch(format!(
            "pgbench on port {port}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The "tps = N (without initial connection time)" figure of a pgbench run.
fn tps(output: &str) -> Option<f64> {
    output
        .lines()
        .find(|l| l.starts_with("tps = "))?
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

/// The "number of transactions actually processed: N" figure of a pgbench run.
fn transactions(output: &str) -> Option<u64> {
    output
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))?
        .split('/')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// CPU time (user + system, all threads) a process has used, in microseconds.
fn cpu_us(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let per_sec = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    Some(ticks * 1_000_000 / per_sec as u64)
}

fn start_pgbouncer(dir: &Path, port: u16, primary: u16) -> Result<KillOnDrop> {
    std::fs::write(dir.join("userlist.txt"), "\"postgres\" \"\"\n")?;
    let ini = dir.join("pgbouncer.ini");
    std::fs::write(
        &ini,
        format!(
            "[databases]\npostgres = host=127.0.0.1 port={primary} dbname=postgres\n[pgbouncer]\n\
             listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\nauth_type = trust\n\
             auth_file = {d}/userlist.txt\npool_mode = session\nmax_client_conn = 5000\ndefault_pool_size = 100\n\
             pidfile = {d}/pgbouncer.pid\nlogfile = {d}/pgbouncer.log\n",
            d = dir.display()
        ),
    )?;
    let mut cmd = Command::new(PGBOUNCER);
    if nix::unistd::Uid::effective().is_root() {
        cmd.args(["-u", "postgres"]);
    }
    spawn(cmd.arg(&ini), "pgbouncer")
}

fn start_haproxy(dir: &Path, port: u16, primary: u16) -> Result<KillOnDrop> {
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 5000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n\
             listen postgres\n  bind 127.0.0.1:{port}\n  server primary 127.0.0.1:{primary}\n"
        ),
    )?;
    spawn(Command::new(HAPROXY).arg("-db").arg("-f").arg(&cfg), "haproxy")
}

/// One target of the interleaved run; `pid` is the proxy's (none for direct).
struct Target {
    name: &'static str,
    port: u16,
    pid: Option<u32>,
    tps: Vec<f64>,
    cpu_us_per_tx: Vec<f64>,
}

pub async fn run(opts: &Options, sandbox: &Sandbox, dir: &Path) -> Result<Value> {
    let primary = sandbox.port("node1")?;
    let router = super::router_port(sandbox)?;
    let helpers = dir.join("helpers");
    std::fs::create_dir_all(&helpers)?;
    std::fs::set_permissions(&helpers, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
    let (bouncer_port, haproxy_port) = (opts.postgres_base + 40, opts.postgres_base + 41);
    let bouncer = start_pgbouncer(&helpers, bouncer_port, primary)?;
    let haproxy = start_haproxy(&helpers, haproxy_port, primary)?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    eprintln!("pgbench -i -s 10 on the primary");
    pgbench(&["-i", "-s", "10", "-q"], primary)?;
    let target = |name, port, pid| Target {
        name,
        port,
        pid,
        tps: Vec::new(),
        cpu_us_per_tx: Vec::new(),
    };
    let mut targets = [
        target("direct", primary, None),
        target("pgquorum-router", router, sandbox.router_pid()),
        target("pgbouncer", bouncer_port, Some(bouncer.0.id())),
        target("haproxy", haproxy_port, Some(haproxy.0.id())),
    ];
    let (c, t) = (opts.clients.to_string(), opts.seconds.to_string());
    for round in 1..=opts.rounds {
        for target in targets.iter_mut() {
            let before = target.pid.and_then(cpu_us);
            let out = pgbench(&["-S", "-n", "-c", &c, "-j", "2", "-T", &t], target.port)?;
            let after = target.pid.and_then(cpu_us);
            let name = target.name;
            let v = tps(&out).ok_or_else(|| Error::Launch(format!("no tps in pgbench output for {name}")))?;
            target.tps.push(v);
            let per_tx = match (before, after, transactions(&out)) {
                (Some(b), Some(a), Some(n)) if n > 0 => Some((a - b) as f64 / n as f64),
                _ => None,
            };
            if let Some(us) = per_tx {
                target.cpu_us_per_tx.push(us);
            }
            let cpu = per_tx
                .map(|us| format!("  {us:5.2} µs CPU/tx"))
                .unwrap_or_default();
            eprintln!("round {round}: {name:16} {v:9.0} tps{cpu}");
        }
    }
    let median = |v: &[f64]| summary(v)["p50"].as_f64().unwrap_or(f64::NAN);
    let direct = median(&targets[0].tps);
    let rows = targets
        .iter()
        .map(|t| {
            let m = median(&t.tps);
            let cpu = if t.cpu_us_per_tx.is_empty() {
                "-".to_string()
            } else {
                format!("{:.2}", median(&t.cpu_us_per_tx))
            };
            vec![
                t.name.to_string(),
                format!("{m:.0}"),
                format!("{:.2}", m / direct),
                cpu,
            ]
        })
        .collect();
    println!(
        "{}",
        table(
            &[
                "TARGET",
                &format!("MEDIAN TPS ({} rounds, -S -c {c} -T {t})", opts.rounds),
                "VS DIRECT",
                "PROXY CPU µs/TX",
            ],
            rows
        )
    );
    let per_target = |f: &dyn Fn(&Target) -> Value| -> serde_json::Map<String, Value> {
        targets.iter().map(|t| (t.name.to_string(), f(t))).collect()
    };
    Ok(json!({
        "rounds": opts.rounds, "clients": opts.clients, "seconds": opts.seconds,
        "median_tps": per_target(&|t| json!(median(&t.tps))),
        "median_cpu_us_per_tx": per_target(&|t| json!(if t.cpu_us_per_tx.is_empty() { None } else { Some(median(&t.cpu_us_per_tx)) })),
    }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_pgbench_tps() {
        let out = "latency average = 0.5 ms\ninitial connection time = 3.2 ms\ntps = 16034.123456 (without initial connection time)\n";
        assert_eq!(super::tps(out), Some(16034.123456));
        assert_eq!(super::tps("nothing"), None);
        let out = "number of transactions actually processed: 412345/412345\n";
        assert_eq!(super::transactions(out), Some(412345));
    }

    #[test]
    fn reads_own_cpu_time() {
        assert!(super::cpu_us(std::process::id()).is_some());
    }
}
