//! `pgquorum bench router`: pgbench select-only TPS against the primary directly,
//! through `pgquorum-router`, through PgBouncer (session mode) and through HAProxy
//! (plain `mode tcp`), interleaved round by round so the machine's noise hits every
//! target alike. Same client count, same duration, same machine.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;

use super::summary;
use crate::error::{Error, Result};
use crate::launch::{Sandbox, SandboxSpec};
use crate::output::table;

pub struct Options {
    pub rounds: u64,
    pub clients: u64,
    pub seconds: u64,
    pub dir: Option<std::path::PathBuf>,
    pub coordinator_base: u16,
    pub postgres_base: u16,
}

const PGBENCH: &str = "/usr/lib/postgresql/15/bin/pgbench";
const PGBOUNCER: &str = "/usr/sbin/pgbouncer";
const HAPROXY: &str = "/usr/sbin/haproxy";

/// Kills a helper process on drop.
struct Helper(Child);

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &mut Command, what: &str) -> Result<Helper> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd.spawn()
        .map(Helper)
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

fn start_pgbouncer(dir: &Path, port: u16, primary: u16) -> Result<Helper> {
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

fn start_haproxy(dir: &Path, port: u16, primary: u16) -> Result<Helper> {
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

pub async fn run(opts: Options) -> Result<()> {
    let (dir, _tmp) = super::work_dir(&opts.dir, "pgquorum-bench-router-")?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
    eprintln!("starting a sandbox in {}", dir.display());
    let sandbox = Sandbox::start(SandboxSpec::new(&dir, opts.coordinator_base, opts.postgres_base)).await?;
    let primary = sandbox.port("node1")?;
    let router: u16 = sandbox
        .router_addrs()
        .and_then(|(rw, _)| rw.rsplit_once(':').and_then(|(_, p)| p.parse().ok()))
        .ok_or_else(|| Error::Launch("the sandbox has no router".into()))?;
    let helpers = dir.join("helpers");
    std::fs::create_dir_all(&helpers)?;
    std::fs::set_permissions(&helpers, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
    let (bouncer_port, haproxy_port) = (opts.postgres_base + 40, opts.postgres_base + 41);
    let _bouncer = start_pgbouncer(&helpers, bouncer_port, primary)?;
    let _haproxy = start_haproxy(&helpers, haproxy_port, primary)?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    eprintln!("pgbench -i -s 10 on the primary");
    pgbench(&["-i", "-s", "10", "-q"], primary)?;
    let targets = [
        ("direct", primary),
        ("pgquorum-router", router),
        ("pgbouncer", bouncer_port),
        ("haproxy", haproxy_port),
    ];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    let (c, t) = (opts.clients.to_string(), opts.seconds.to_string());
    for round in 1..=opts.rounds {
        for (i, (name, port)) in targets.iter().enumerate() {
            let out = pgbench(&["-S", "-n", "-c", &c, "-j", "2", "-T", &t], *port)?;
            let v = tps(&out).ok_or_else(|| Error::Launch(format!("no tps in pgbench output for {name}")))?;
            eprintln!("round {round}: {name:16} {v:9.0} tps");
            results[i].push(v);
        }
    }
    let median = |v: &[f64]| summary(v)["p50"].as_f64().unwrap_or(f64::NAN);
    let direct = median(&results[0]);
    let rows = targets
        .iter()
        .zip(&results)
        .map(|((name, _), v)| {
            let m = median(v);
            vec![name.to_string(), format!("{m:.0}"), format!("{:.2}", m / direct)]
        })
        .collect();
    println!(
        "{}",
        table(
            &[
                "TARGET",
                &format!("MEDIAN TPS ({} rounds, -S -c {c} -T {t})", opts.rounds),
                "VS DIRECT"
            ],
            rows
        )
    );
    let tps_json: serde_json::Map<String, serde_json::Value> = targets
        .iter()
        .zip(&results)
        .map(|((name, _), v)| (name.to_string(), json!(median(v))))
        .collect();
    println!(
        "{}",
        json!({"bench": "router", "rounds": opts.rounds, "clients": opts.clients, "seconds": opts.seconds, "tps": tps_json})
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_pgbench_tps() {
        let out = "latency average = 0.5 ms\ninitial connection time = 3.2 ms\ntps = 16034.123456 (without initial connection time)\n";
        assert_eq!(super::tps(out), Some(16034.123456));
        assert_eq!(super::tps("nothing"), None);
    }
}
