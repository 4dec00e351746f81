//! `pgquorum`: query and steer the coordinator group.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use pgquorum::bench;
use pgquorum::commands::{
    cluster, config, maintenance, orders, pause, policy, raft, sandbox, schedule, status, watch, Ctx,
};
use pgquorum_client::{parse_addrs, Coordinators, Timeouts, COORDINATORS_ENV};

#[derive(Parser)]
#[command(
    name = "pgquorum",
    version,
    about = "Operate pgquorum: PostgreSQL failover coordinated by Raft"
)]
struct Cli {
    /// Coordinator gRPC addresses, comma-separated; tried in turn until one answers.
    #[arg(long, global = true, env = COORDINATORS_ENV, value_name = "HOST:PORT,...")]
    coordinators: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Give up after this many seconds (retries and leader elections included).
    #[arg(long, global = true, default_value_t = 15, value_name = "SECONDS")]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every node of a cluster: role, health, lag, LSNs, sync state; Raft leader, epoch.
    Status {
        /// The cluster; may be left out when only one exists.
        #[arg(long, default_value = "")]
        cluster: String,
    },
    /// What needs attention: replication lag, nodes not streaming, no sync standby.
    Alerts {
        #[arg(long, default_value = "")]
        cluster: String,
    },
    /// Promote a chosen node now (the old primary is fenced first). Without
    /// --accept-data-loss only a node that holds every acknowledged commit is accepted.
    Failover {
        #[arg(long, default_value = "")]
        cluster: String,
        /// The node to promote.
        #[arg(long)]
        to: String,
        /// Promote it even if it may lack acknowledged commits.
        #[arg(long)]
        accept_data_loss: bool,
        /// Follow it step by step and say how it ended (exit 1 if another node was
        /// promoted, or it did not end within --wait-timeout).
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 60, value_name = "SECONDS")]
        wait_timeout: u64,
    },
    /// Planned handover: the primary stops cleanly (its standbys receive all of its
    /// WAL first), then --to (or the most caught-up synchronous standby) is promoted
    /// and the old primary follows it. Loses nothing.
    Switchover {
        #[arg(long, default_value = "")]
        cluster: String,
        /// The node to promote (default: the best candidate).
        #[arg(long, default_value = "")]
        to: String,
        /// Follow it step by step and say how it ended (exit 1 if another node was
        /// promoted, or it did not end within --wait-timeout).
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 60, value_name = "SECONDS")]
        wait_timeout: u64,
        /// Schedule it instead: a UTC time (2026-12-03T06:00:00Z) or +DURATION (+10m).
        /// The leader of the moment starts it then, with the checks of that moment.
        #[arg(long, value_name = "TIME", conflicts_with = "cancel")]
        at: Option<String>,
        /// Drop the scheduled switchover.
        #[arg(long)]
        cancel: bool,
    },
    /// No automatic failover until `resume` (whole cluster): for work on the hosts,
    /// Postgres restarts by hand, network maintenance. Switchover and failover by hand
    /// still work.
    Pause {
        #[arg(long, default_value = "")]
        cluster: String,
    },
    /// Automatic failover on again after `pause`.
    Resume {
        #[arg(long, default_value = "")]
        cluster: String,
    },
    /// One node out of the cluster's plans while you work on its host: never
    /// promoted, out of the sync set and read routing, its Postgres left as you leave
    /// it (a stopped server is not started again). Refused for the primary unless
    /// --allow-switchover, which switches over first.
    Maintenance {
        #[arg(value_enum)]
        state: OnOff,
        node: String,
        #[arg(long, default_value = "")]
        cluster: String,
        /// For the primary: switch over first (to the best candidate), then put it into
        /// maintenance.
        #[arg(long)]
        allow_switchover: bool,
        /// How long the switchover may take.
        #[arg(long, default_value_t = 60, value_name = "SECONDS")]
        wait_timeout: u64,
    },
    /// Rebuild a standby from a fresh base backup of the primary: its agent stops
    /// Postgres, replaces the data directory and starts it again. Refused for the
    /// primary.
    Reinit {
        node: String,
        #[arg(long, default_value = "")]
        cluster: String,
        /// Follow it until the node streams again (exit 1 if not within
        /// --wait-timeout).
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 300, value_name = "SECONDS")]
        wait_timeout: u64,
    },
    /// Restart Postgres, rolling: standbys one at a time (each back before the next),
    /// the primary last by switchover (--switchover; without it the primary is left
    /// out). Nodes in maintenance are left alone.
    Restart {
        /// The nodes (or --all).
        nodes: Vec<String>,
        #[arg(long)]
        all: bool,
        /// Only nodes whose Postgres waits for a restart (parameters changed); without
        /// node names, every such node.
        #[arg(long)]
        pending: bool,
        /// Restart the primary too, by switching over first (to the best candidate).
        #[arg(long)]
        switchover: bool,
        #[arg(long, default_value = "")]
        cluster: String,
        /// How long each step may take.
        #[arg(long, default_value_t = 120, value_name = "SECONDS")]
        wait_timeout: u64,
    },
    /// Reload Postgres's configuration on the nodes named (or --all).
    Reload {
        nodes: Vec<String>,
        #[arg(long)]
        all: bool,
        #[arg(long, default_value = "")]
        cluster: String,
    },
    /// The cluster's Postgres parameters (in the coordinators, applied by every agent).
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Forget a member for good (its host retired or lost): its alerts end, its
    /// replication slot is dropped on the primary. Refused for the primary, a sync
    /// standby, a node in a failover, and while its agent reports (stop it first).
    Remove {
        node: String,
        #[arg(long, default_value = "")]
        cluster: String,
    },
    /// Take a node out of read routing (routers stop sending new read-only
    /// connections to it; open ones stay), e.g. before maintenance or a long query.
    Drain {
        /// The node.
        node: String,
        #[arg(long, default_value = "")]
        cluster: String,
    },
    /// Put a drained node back into read routing.
    Undrain {
        node: String,
        #[arg(long, default_value = "")]
        cluster: String,
    },
    /// Print every endpoint map as it arrives (primary, replicas, readability).
    Watch {
        #[arg(long, default_value = "")]
        cluster: String,
    },
    /// A cluster's events: failovers (reason, primaries, epochs, LSN, step durations),
    /// sync-set and policy changes, members.
    History {
        #[arg(long, default_value = "")]
        cluster: String,
        /// Show at most this many of the newest events.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// A whole local cluster on loopback: 3 coordinators, 3 Postgres servers with agents.
    #[command(subcommand)]
    Sandbox(SandboxCommand),
    /// The coordinator group: status and membership.
    #[command(subcommand)]
    Raft(RaftCommand),
    /// Database clusters guarded by the group.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// A cluster's failover policy.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Benchmarks on local processes; the last output line is JSON.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// The parameters, and per node: applied, pending restart, refused by Postgres.
    Show {
        #[arg(long, default_value = "")]
        cluster: String,
    },
    /// Set parameters (NAME=VALUE…) and/or remove some (--unset NAME); shows the diff,
    /// then what waits for a restart and what Postgres refused.
    Set {
        settings: Vec<String>,
        #[arg(long, value_name = "NAME")]
        unset: Vec<String>,
        #[arg(long, default_value = "")]
        cluster: String,
    },
    /// Edit the parameters in $VISUAL / $EDITOR (vi) as TOML.
    Edit {
        #[arg(long, default_value = "")]
        cluster: String,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Subcommand)]
enum RaftCommand {
    /// Leader, term, and each member's role, region, log and applied index, reachability.
    Status,
    /// Add a coordinator as a learner (it must be running, started without initial_members).
    Add {
        #[arg(long)]
        id: u64,
        /// Its gRPC address, as other coordinators reach it.
        #[arg(long, value_name = "HOST:PORT")]
        addr: String,
        #[arg(long)]
        region: String,
    },
    /// Make a caught-up learner a voter.
    Promote { id: u64 },
    /// Remove a coordinator from the group (stop it afterwards).
    Remove { id: u64 },
    /// After the majority of the group is lost for good (its region gone): make the
    /// coordinator at --on the only voter of a new group, from its own state. It
    /// restarts to do so; every database node is then held until `cluster readmit`.
    /// Refused while a majority of the old group answers, and without
    /// --accept-split-brain-risk. Run it on the survivor with the highest LAST LOG in
    /// `raft status`. See docs/regions.md.
    ForceNewGroup {
        /// The surviving coordinator (this command is sent there only, never forwarded).
        #[arg(long, value_name = "HOST:PORT")]
        on: String,
        /// Why (kept in its audit record and every cluster's history).
        #[arg(long)]
        reason: String,
        /// If the old majority still runs (a partition, not a loss), two groups will
        /// each decide failovers and may each promote a primary.
        #[arg(long)]
        accept_split_brain_risk: bool,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Start guarding a new database cluster.
    Create {
        name: String,
        /// Policy fields that differ from the defaults, e.g. --set failure_timeout_ms=1500.
        #[arg(long = "set", value_name = "FIELD=VALUE")]
        settings: Vec<String>,
    },
    /// Every cluster with its epoch and primary.
    List {
        /// Read this coordinator's applied state without asking the leader (may be stale).
        #[arg(long)]
        local: bool,
    },
    /// One cluster: members, epoch, sync set, failover in flight, recent history.
    Show {
        name: String,
        #[arg(long)]
        local: bool,
    },
    /// Forget a cluster for good (its databases retired): state, history, endpoint
    /// map. Refused while any of its agents reports: stop them first.
    Delete {
        name: String,
        /// Say you mean it: nothing of the cluster is kept.
        #[arg(long)]
        yes_i_am_sure: bool,
    },
    /// Answer a node held since force-new-group again (check it first: a returning old
    /// primary may hold writes the new primary never had; readmitted, it is rewound).
    Readmit { cluster: String, node: String },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Print a cluster's policy.
    Get {
        cluster: String,
        #[arg(long)]
        local: bool,
    },
    /// Change policy fields: `pgquorum policy set main failure_timeout_ms=1500 lease_ms=2000`.
    Set {
        cluster: String,
        #[arg(value_name = "FIELD=VALUE", required = true)]
        settings: Vec<String>,
    },
}

#[derive(Subcommand)]
enum SandboxCommand {
    /// Start the sandbox and return once every node is healthy.
    Up {
        #[arg(long, default_value = sandbox::DEFAULT_DIR)]
        dir: PathBuf,
        /// Coordinator N listens on 127.0.0.1:(BASE + N).
        #[arg(long, default_value_t = 7100, value_name = "BASE")]
        coordinator_base: u16,
        /// nodeN's Postgres listens on 127.0.0.1:(BASE + N).
        #[arg(long, default_value_t = 25000, value_name = "BASE")]
        postgres_base: u16,
    },
    /// Stop everything the sandbox started (by pid).
    Down {
        #[arg(long, default_value = sandbox::DEFAULT_DIR)]
        dir: PathBuf,
        /// Also delete its directory (data, logs, configs).
        #[arg(long)]
        clean: bool,
    },
    /// A failover drill: kill -9 a node's agent and Postgres (host loss).
    Kill {
        node: String,
        #[arg(long, default_value = sandbox::DEFAULT_DIR)]
        dir: PathBuf,
        /// Kill only its Postgres; the agent stays (the fast path).
        #[arg(long)]
        postgres_only: bool,
    },
    /// Bring back a node that `sandbox kill` took down: starts its agent (which starts
    /// its Postgres), tracked by `sandbox status` and `sandbox down`.
    Start {
        node: String,
        #[arg(long, default_value = sandbox::DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// Which sandbox processes run, and the cluster's status.
    Status {
        #[arg(long, default_value = sandbox::DEFAULT_DIR)]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The router: pgbench TPS and CPU against direct, PgBouncer and HAProxy; map
    /// delivery to 1000 watchers; added latency with 2000 connections held open.
    Router(bench::router::Options),
    /// Kill the sandbox's primary while a writer runs; time the failover, count losses.
    /// With `--kill cut` also the fence (fence_after_renewal_ms) and the overlap of the
    /// two primaries' acknowledged writes (overlap_ms, must be below 0).
    Failover {
        #[arg(long, default_value_t = 5)]
        rounds: u64,
        /// What ends the primary: the whole host dies (agent + Postgres), only the
        /// postmaster, nothing (a switchover), or its links (cut: every host in a
        /// network namespace of its own; needs root, ip and nft).
        #[arg(long, value_enum, default_value = "host")]
        kill: bench::failover::Kill,
        /// Keep the sandbox here (default: a temporary directory, removed after).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Coordinator N listens on BASE + N.
        #[arg(long, default_value_t = 24100, value_name = "BASE")]
        coordinator_base: u16,
        /// nodeN's Postgres on BASE + N; the router from BASE + 30.
        #[arg(long, default_value_t = 24110, value_name = "BASE")]
        postgres_base: u16,
    },
    /// Faults drawn at random (from the seed) on a sandbox with a network of its own
    /// (needs root, ip and nft), judged by a checker: lost acknowledged writes, two
    /// primaries at once, needless failovers; failover times.
    Chaos {
        /// How long to keep drawing faults.
        #[arg(long, default_value_t = 300, value_name = "SECONDS")]
        duration: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Keep the sandbox here (default: a temporary directory, removed after).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Coordinator N listens on BASE + N (and names the test network).
        #[arg(long, default_value_t = 29400, value_name = "BASE")]
        coordinator_base: u16,
        /// nodeN's Postgres on BASE + N; the router from BASE + 30.
        #[arg(long, default_value_t = 29410, value_name = "BASE")]
        postgres_base: u16,
        /// Keep the coordinators' Raft stores here (e.g. on tmpfs: on one machine the
        /// disk is shared with every Postgres, which a coordinator host's is not).
        #[arg(long, value_name = "DIR")]
        raft_store_dir: Option<PathBuf>,
    },
    /// An outage of every coordinator (frozen, or two of three killed) while a writer
    /// runs on the primary: writes refused (the failsafe's target: none), the longest
    /// wait, and the failover time when the primary dies during an outage.
    Outage(bench::outage::Options),
    /// Commit latency, throughput and leader failover of a local 3-node group.
    Raft {
        #[arg(long, default_value_t = 2000)]
        writes: u64,
        #[arg(long, default_value_t = 32)]
        concurrency: u64,
        #[arg(long, default_value_t = 5, value_name = "SECONDS")]
        throughput_secs: u64,
        #[arg(long, default_value_t = 7)]
        rounds: u64,
        /// Keep the group's files here instead of a temporary directory.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Coordinator N listens on 127.0.0.1:(PORT_BASE + N).
        #[arg(long, default_value_t = 21900)]
        port_base: u16,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pgquorum: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgquorum: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

async fn run(cli: Cli) -> pgquorum::Result<()> {
    // Only commands that talk to a running group need coordinator addresses.
    let (coordinators, json, timeout) = (cli.coordinators, cli.json, cli.timeout);
    let ctx = || -> pgquorum::Result<Ctx> {
        let addrs = parse_addrs(coordinators.as_deref().unwrap_or_default())?;
        let timeouts = Timeouts {
            overall: Duration::from_secs(timeout),
            // An operator with wrong addresses, or a group that is down, hears so
            // in seconds; a restarting coordinator is back within them.
            unreachable: Some(Duration::from_secs(3).min(Duration::from_secs(timeout))),
            ..Timeouts::default()
        };
        Ok(Ctx {
            coordinators: Coordinators::new(addrs, timeouts)?,
            json,
        })
    };
    match cli.command {
        Command::Status { cluster } => status::status(&ctx()?, &cluster).await,
        Command::Alerts { cluster } => status::alerts(&ctx()?, &cluster).await,
        Command::Watch { cluster } => watch::watch(&ctx()?, &cluster).await,
        Command::History { cluster, limit } => cluster::history(&ctx()?, &cluster, limit).await,
        Command::Failover {
            cluster,
            to,
            accept_data_loss,
            wait,
            wait_timeout,
        } => {
            let wait = wait.then(|| Duration::from_secs(wait_timeout));
            status::failover(&ctx()?, &cluster, &to, accept_data_loss, wait).await
        }
        Command::Switchover {
            cluster,
            to,
            wait,
            wait_timeout,
            at,
            cancel,
        } => {
            let wait = wait.then(|| Duration::from_secs(wait_timeout));
            match (at, cancel) {
                (_, true) => schedule::cancel(&ctx()?, &cluster).await,
                (Some(at), false) => {
                    let at_ms = schedule::parse_at(&at, schedule::now_ms())?;
                    schedule::schedule(&ctx()?, &cluster, &to, at_ms, wait).await
                }
                (None, false) => status::switchover(&ctx()?, &cluster, &to, wait).await,
            }
        }
        Command::Pause { cluster } => pause::pause(&ctx()?, &cluster, true).await,
        Command::Resume { cluster } => pause::pause(&ctx()?, &cluster, false).await,
        Command::Maintenance {
            state,
            node,
            cluster,
            allow_switchover,
            wait_timeout,
        } => {
            let switchover = allow_switchover.then(|| Duration::from_secs(wait_timeout));
            maintenance::maintenance(&ctx()?, &cluster, &node, state == OnOff::On, switchover).await
        }
        Command::Reinit {
            node,
            cluster,
            wait,
            wait_timeout,
        } => {
            let wait = wait.then(|| Duration::from_secs(wait_timeout));
            orders::reinit(&ctx()?, &cluster, &node, wait).await
        }
        Command::Restart {
            nodes,
            all,
            pending,
            switchover,
            cluster,
            wait_timeout,
        } => {
            let within = Duration::from_secs(wait_timeout);
            orders::restart(&ctx()?, &cluster, &nodes, all, pending, switchover, within).await
        }
        Command::Reload { nodes, all, cluster } => {
            orders::reload(&ctx()?, &cluster, &nodes, all, Duration::from_secs(30)).await
        }
        Command::Config(c) => match c {
            ConfigCommand::Show { cluster } => config::show(&ctx()?, &cluster).await,
            ConfigCommand::Set {
                settings,
                unset,
                cluster,
            } => config::set(&ctx()?, &cluster, &settings, &unset).await,
            ConfigCommand::Edit { cluster } => config::edit(&ctx()?, &cluster).await,
        },
        Command::Remove { node, cluster } => cluster::remove(&ctx()?, &cluster, &node).await,
        Command::Drain { node, cluster } => status::drain(&ctx()?, &cluster, &node, true).await,
        Command::Undrain { node, cluster } => status::drain(&ctx()?, &cluster, &node, false).await,
        Command::Sandbox(c) => match c {
            SandboxCommand::Up {
                dir,
                coordinator_base,
                postgres_base,
            } => sandbox::up(&dir, coordinator_base, postgres_base, json).await,
            SandboxCommand::Down { dir, clean } => sandbox::down(&dir, clean),
            SandboxCommand::Status { dir } => sandbox::status(&dir, json).await,
            SandboxCommand::Start { node, dir } => sandbox::start(&dir, &node, json),
            SandboxCommand::Kill {
                node,
                dir,
                postgres_only,
            } => sandbox::kill(&dir, &node, postgres_only),
        },
        Command::Bench(BenchCommand::Failover {
            rounds,
            kill,
            dir,
            coordinator_base,
            postgres_base,
        }) => {
            let opts = bench::failover::Options {
                rounds,
                kill,
                dir,
                coordinator_base,
                postgres_base,
            };
            bench::failover::run(opts).await
        }
        Command::Bench(BenchCommand::Router(opts)) => bench::router::run(opts).await,
        Command::Bench(BenchCommand::Outage(opts)) => bench::outage::run(opts).await,
        Command::Bench(BenchCommand::Chaos {
            duration,
            seed,
            dir,
            coordinator_base,
            postgres_base,
            raft_store_dir,
        }) => {
            let opts = bench::chaos::Options {
                duration: Duration::from_secs(duration),
                seed,
                dir,
                coordinator_base,
                postgres_base,
                raft_store_root: raft_store_dir,
            };
            bench::chaos::run(opts).await.map(drop)
        }
        Command::Bench(BenchCommand::Raft {
            writes,
            concurrency,
            throughput_secs,
            rounds,
            dir,
            port_base,
        }) => {
            let opts = bench::raft::Options {
                writes,
                concurrency,
                throughput_secs,
                rounds,
                dir,
                base_port: port_base,
            };
            bench::raft::run(opts).await
        }
        Command::Raft(c) => match c {
            RaftCommand::Status => raft::status(&ctx()?).await,
            RaftCommand::Add { id, addr, region } => raft::add(&ctx()?, id, &addr, &region).await,
            RaftCommand::Promote { id } => raft::promote(&ctx()?, id).await,
            RaftCommand::Remove { id } => raft::remove(&ctx()?, id).await,
            RaftCommand::ForceNewGroup {
                on,
                reason,
                accept_split_brain_risk,
            } => raft::force_new_group(&ctx()?, &on, &reason, accept_split_brain_risk).await,
        },
        Command::Cluster(c) => match c {
            ClusterCommand::Create { name, settings } => cluster::create(&ctx()?, &name, &settings).await,
            ClusterCommand::Delete { name, yes_i_am_sure } => {
                cluster::delete(&ctx()?, &name, yes_i_am_sure).await
            }
            ClusterCommand::List { local } => cluster::list(&ctx()?, local).await,
            ClusterCommand::Show { name, local } => cluster::show(&ctx()?, &name, local).await,
            ClusterCommand::Readmit { cluster, node } => cluster::readmit(&ctx()?, &cluster, &node).await,
        },
        Command::Policy(c) => match c {
            PolicyCommand::Get { cluster, local } => policy::get(&ctx()?, &cluster, local).await,
            PolicyCommand::Set { cluster, settings } => policy::set(&ctx()?, &cluster, &settings).await,
        },
    }
}
