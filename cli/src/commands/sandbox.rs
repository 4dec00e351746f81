//! `pgquorum sandbox up|down|status|kill|start`: a whole pgquorum cluster on this machine.

use std::path::Path;

use pgquorum_client::{Coordinators, Timeouts};

use super::status::status_json;
use super::Ctx;
use crate::error::{Error, Result};
use crate::launch::{
    children, postmaster_pid, runs, start_recorded_agent, stop_recorded, Sandbox, SandboxFile, SandboxSpec,
    AGENT_BIN, COORDINATOR_BIN, SANDBOX_FILE,
};

pub const DEFAULT_DIR: &str = "/tmp/pgquorum-sandbox";

fn addrs(file: &SandboxFile) -> String {
    file.coordinators
        .iter()
        .map(|c| c.grpc.clone())
        .collect::<Vec<_>>()
        .join(",")
}

fn alive(pid: u32) -> bool {
    pid != 0 && (runs(pid, AGENT_BIN) || runs(pid, COORDINATOR_BIN))
}

fn read_file(dir: &Path) -> Option<SandboxFile> {
    serde_json::from_str(&std::fs::read_to_string(dir.join(SANDBOX_FILE)).ok()?).ok()
}

pub async fn up(dir: &Path, coordinator_base: u16, postgres_base: u16, json: bool) -> Result<()> {
    if let Some(file) = read_file(dir) {
        if file.coordinators.iter().any(|c| alive(c.pid)) || file.nodes.iter().any(|n| alive(n.agent_pid)) {
            return Err(Error::Usage(format!(
                "a sandbox is already running from {}; stop it with `pgquorum sandbox down --dir {}`",
                dir.display(),
                dir.display()
            )));
        }
    }
    eprintln!(
        "starting the sandbox in {} (3 coordinators, 3 Postgres servers with agents)…",
        dir.display()
    );
    let sandbox = Sandbox::start(SandboxSpec::new(dir, coordinator_base, postgres_base)).await?;
    let status = sandbox.status().await?;
    let file = sandbox.detach()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&file).unwrap_or_default());
        return Ok(());
    }
    let coordinators = addrs(&file);
    let primary = file.nodes.iter().find(|n| n.name == status.primary);
    println!(
        "sandbox is up and healthy; everything is recorded in {}",
        dir.join(SANDBOX_FILE).display()
    );
    println!();
    println!("try:");
    println!("  export PGQUORUM_COORDINATORS={coordinators}");
    println!("  pgquorum status");
    println!("  pgquorum alerts");
    println!("  pgquorum cluster show main");
    if let Some(r) = &file.router {
        let (host, port) = r.rw.rsplit_once(':').unwrap_or((&r.rw, ""));
        println!("  psql \"host={host} port={port} user=postgres dbname=postgres\"   # through the router: always the primary");
        for (class, addr) in &r.ro {
            println!("  # read-only, {class}: {addr}");
        }
    }
    if let Some(p) = primary {
        println!(
            "  psql \"host={} port={} user={} dbname={}\"   # the primary",
            p.host, p.port, p.superuser, p.database
        );
    }
    println!("  pgquorum sandbox down");
    Ok(())
}

pub fn down(dir: &Path, clean: bool) -> Result<()> {
    let file = stop_recorded(dir)?;
    println!(
        "stopped {} agents, their Postgres servers and {} coordinators",
        file.nodes.len(),
        file.coordinators.len()
    );
    if clean {
        std::fs::remove_dir_all(dir)?;
        println!("removed {}", dir.display());
    }
    Ok(())
}

pub async fn status(dir: &Path, json: bool) -> Result<()> {
    let file = read_file(dir).ok_or_else(|| {
        Error::Usage(format!(
            "no sandbox in {} (no readable {SANDBOX_FILE})",
            dir.display()
        ))
    })?;
    let addrs: Vec<String> = file.coordinators.iter().map(|c| c.grpc.clone()).collect();
    let ctx = Ctx {
        coordinators: Coordinators::new(addrs, Timeouts::default())?,
        json,
    };
    if json {
        let reply = super::status::fetch(&ctx, &file.cluster).await?;
        let value = serde_json::json!({ "sandbox": file, "status": status_json(&reply) });
        println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
        return Ok(());
    }
    for c in &file.coordinators {
        println!(
            "coordinator {} at {}: pid {} {}",
            c.id,
            c.grpc,
            c.pid,
            if alive(c.pid) { "running" } else { "NOT RUNNING" }
        );
    }
    for n in &file.nodes {
        println!(
            "{} postgres {}:{} agent pid {} {}",
            n.name,
            n.host,
            n.port,
            n.agent_pid,
            if alive(n.agent_pid) {
                "running"
            } else {
                "NOT RUNNING"
            }
        );
    }
    super::status::status(&ctx, &file.cluster).await
}

/// `sandbox kill NODE`: a failover drill — kill -9 of the node's agent and Postgres
/// (host loss), or of its Postgres only.
pub fn kill(dir: &Path, node: &str, postgres_only: bool) -> Result<()> {
    let file = read_file(dir).ok_or_else(|| {
        Error::Usage(format!(
            "no sandbox in {} (no readable {SANDBOX_FILE})",
            dir.display()
        ))
    })?;
    let entry = file.nodes.iter().find(|n| n.name == node).ok_or_else(|| {
        let names: Vec<&str> = file.nodes.iter().map(|n| n.name.as_str()).collect();
        Error::Usage(format!(
            "no node {node:?} in the sandbox; nodes: {}",
            names.join(", ")
        ))
    })?;
    let mut killed = Vec::new();
    if !postgres_only && runs(entry.agent_pid, AGENT_BIN) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(entry.agent_pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        killed.push(format!("agent {}", entry.agent_pid));
    }
    if let Some(pm) = postmaster_pid(&entry.data_dir) {
        for pid in std::iter::once(pm).chain(children(pm)) {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        killed.push(format!("postgres {pm} and its processes"));
    }
    if killed.is_empty() {
        return Err(Error::Usage(format!("nothing of {node} is running")));
    }
    println!("killed (-9) {}: {}", node, killed.join(", "));
    if !postgres_only {
        println!(
            "bring the node back with: pgquorum sandbox start {node} --dir {}",
            dir.display()
        );
    }
    Ok(())
}

/// `pgquorum sandbox start NODE`.
pub fn start(dir: &Path, node: &str, json: bool) -> Result<()> {
    let pid = start_recorded_agent(dir, node)?;
    if json {
        println!("{}", serde_json::json!({ "node": node, "agent_pid": pid }));
    } else {
        println!(
            "started the agent of {node} (pid {pid}); it starts its Postgres (as a standby if another node \
             took over); follow it with `pgquorum sandbox status --dir {}`",
            dir.display()
        );
    }
    Ok(())
}
