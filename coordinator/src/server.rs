//! Starting and stopping one coordinator: storage, Raft node, gRPC server, bootstrap.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgquorum_proto::v1::admin_service_server::AdminServiceServer;
use pgquorum_proto::v1::agent_service_server::AgentServiceServer;
use pgquorum_proto::v1::endpoint_service_server::EndpointServiceServer;
use pgquorum_proto::v1::raft_service_server::RaftServiceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::{info, warn};

use crate::config::Config;
use crate::grpc::admin_service::AdminServiceImpl;
use crate::grpc::agent_service::AgentServiceImpl;
use crate::grpc::endpoint_service::EndpointServiceImpl;
use crate::grpc::proposer::Proposer;
use crate::grpc::raft_service::RaftServiceImpl;
use crate::observe::Reports;
use crate::raft::group::{Group, GroupId};
use crate::raft::leadership::Leadership;
use crate::raft::log_store::LogStore;
use crate::raft::network::Network;
use crate::raft::state_machine::StateMachineStore;
use crate::raft::{CoordinatorNode, Raft};
use crate::{Error, Result};

/// How long a lease grant waits for a quorum round (see `AgentServiceImpl`): well over
/// a follower's fsync stall, under the 1 s default lease.
const CONFIRM_LEADERSHIP_WITHIN: Duration = Duration::from_millis(500);

/// How a coordinator's run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// Shut down as asked.
    Stopped,
    /// A forced re-forming was recorded (`pgquorum raft force-new-group`): start the
    /// process again (same arguments), which carries it out before Raft runs.
    Restart,
}

/// Runs a coordinator until `shutdown` completes, then stops Raft and flushes storage.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<Exit> {
    std::fs::create_dir_all(&config.data_dir).map_err(|e| Error::Config {
        path: config.data_dir.display().to_string(),
        message: format!("field `data_dir`: cannot create: {e}"),
    })?;
    let sled_path = config.data_dir.join("raft.sled");
    let db = sled::Config::new()
        .path(&sled_path)
        // Every write that must be durable is flushed explicitly before it is
        // acknowledged (see raft::log_store). sled's own periodic flush on top only
        // collided with those: an explicit fsync queued behind it now and then.
        .flush_every_ms(None)
        .open()
        .map_err(|e| match e {
            sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock => Error::Config {
                path: config.data_dir.display().to_string(),
                message: "data_dir is in use by another running coordinator".into(),
            },
            e => Error::Storage(e),
        })?;
    // sled's own flush does not survive a power cut: see raft::durable.
    let durable = crate::raft::durable::Durable::open(&sled_path)?;
    let mut log_store = LogStore::open(&db, durable.clone())?;
    let state_machine = StateMachineStore::open(&db, durable.clone())?;
    let state = state_machine.handle();
    let group = open_group(&config, &db, durable, &mut log_store).await?;

    let raft_config = Arc::new(config.openraft_config()?);
    let raft = Raft::new(
        config.id,
        raft_config,
        Network::new(group.clone()),
        log_store,
        state_machine,
    )
    .await
    .map_err(|e| Error::Raft(e.to_string()))?;

    let listener = TcpListener::bind(&config.listen)
        .await
        .map_err(|source| Error::Listen {
            addr: config.listen.clone(),
            source,
        })?;
    info!(id = config.id, listen = %config.listen, advertise = config.advertise_addr(), "coordinator listening");

    bootstrap(&config, &raft).await?;

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pgquorum_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Raft(format!("reflection: {e}")))?;

    let proposer = Proposer {
        id: config.id,
        raft: raft.clone(),
        state: state.clone(),
        group: group.clone(),
    };
    let restart = Arc::new(tokio::sync::Notify::new());
    // Slack a new leader adds before counting an earlier leader's leases as over (see
    // `failover::decide::lease_over_for`); grants themselves follow a quorum round.
    let grant_window = Duration::from_millis(config.raft.election_timeout_min_ms);
    let reports = Reports::new(grant_window, Instant::now());
    let leadership = Leadership::watch(config.id, &raft);
    let endpoints = EndpointServiceServer::new(EndpointServiceImpl::new(
        state.clone(),
        leadership.clone(),
        group.clone(),
    ));
    let health = tokio::spawn(crate::grpc::health::keep_current(
        health_reporter,
        raft.clone(),
        leadership.clone(),
        group.clone(),
    ));
    let metrics = match &config.http {
        Some(addr) => Some(serve_metrics(addr, &raft, &leadership, &state, &reports, config.id).await?),
        None => None,
    };
    let leader_loop = tokio::spawn(crate::leader::run(
        raft.clone(),
        leadership.clone(),
        state.clone(),
        reports.clone(),
        group.clone(),
        config.stonith.clone(),
    ));

    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(pgquorum_client::SERVER_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(pgquorum_client::SERVER_KEEPALIVE_TIMEOUT))
        .add_service(health_service)
        .add_service(endpoints)
        .add_service(reflection)
        .add_service(RaftServiceServer::new(RaftServiceImpl::new(
            config.id,
            raft.clone(),
            group,
            state.clone(),
        )))
        .add_service(AdminServiceServer::new(AdminServiceImpl::new(
            proposer.clone(),
            reports.clone(),
            restart.clone(),
        )))
        .add_service(AgentServiceServer::new(AgentServiceImpl::new(
            proposer,
            reports,
            leadership,
            CONFIRM_LEADERSHIP_WITHIN,
        )))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown);
    // A restart does not wait for open streams (routers' watches) to end: the process
    // is replaced, which closes them.
    let (served, exit) = tokio::select! {
        served = server => (served, Exit::Stopped),
        _ = restart.notified() => (Ok(()), Exit::Restart),
    };

    info!(?exit, "shutting down");
    leader_loop.abort();
    health.abort();
    for task in metrics.into_iter().flatten() {
        task.abort();
    }
    if let Err(e) = raft.shutdown().await {
        warn!("raft shutdown: {e}");
    }
    db.flush_async().await?;
    served.map_err(|e| Error::Raft(format!("gRPC server: {e}")))?;
    Ok(exit)
}

/// This node's group (see [`crate::raft::group`]); carries out a recorded forced
/// re-forming first.
async fn open_group(
    config: &Config,
    db: &sled::Db,
    durable: crate::raft::durable::Durable,
    log_store: &mut LogStore,
) -> Result<Group> {
    use openraft::storage::RaftLogStorage;
    let raft_err = |e: crate::raft::StorageError| Error::Raft(e.to_string());
    let initialized = log_store.read_vote().await.map_err(raft_err)?.is_some()
        || log_store
            .get_log_state()
            .await
            .map_err(raft_err)?
            .last_log_id
            .is_some();
    let group = Group::open(db, durable, initialized)?;
    if group.id().is_none() && !config.initial_members.is_empty() {
        group.join(GroupId::founding()).await?;
    }
    if let Some(mut reform) = group.pending_reform()? {
        if reform.formed_by != config.id {
            return Err(Error::Config {
                path: config.data_dir.display().to_string(),
                message: format!(
                    "data_dir holds a force-new-group request for coordinator {}, this is coordinator {}",
                    reform.formed_by, config.id
                ),
            });
        }
        let index = log_store.reform(&reform).await.map_err(raft_err)?;
        reform.last_log_index = index.checked_sub(1);
        group.reform_done(&reform).await?;
        warn!(
            group = %reform.group,
            previous_group = %reform.previous_group,
            previous_voters = ?reform.previous_voters,
            kept_through_log_index = ?reform.last_log_index,
            actor = %reform.actor,
            reason = %reform.reason,
            "FORCED a new coordinator group: this coordinator is its only voter; re-add others with empty data_dirs"
        );
    }
    Ok(group)
}

/// Forms a new group on first start: every founding member initializes with the same
/// membership, which openraft allows. A node with any Raft state skips this, so a
/// restart never re-forms a group.
async fn bootstrap(config: &Config, raft: &Raft) -> Result<()> {
    if config.initial_members.is_empty() {
        info!("no initial_members: waiting to be added to a running group (`pgquorum raft add`)");
        return Ok(());
    }
    if raft
        .is_initialized()
        .await
        .map_err(|e| Error::Raft(e.to_string()))?
    {
        return Ok(());
    }
    let members: BTreeMap<_, _> = config
        .initial_members
        .iter()
        .map(|m| {
            (
                m.id,
                CoordinatorNode {
                    addr: m.addr.clone(),
                    region: m.region.clone(),
                },
            )
        })
        .collect();
    info!(?members, "forming a new coordinator group");
    match raft.initialize(members).await {
        Ok(()) => Ok(()),
        // Another founding member's log already reached us: the group exists.
        Err(openraft::error::RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(()),
        Err(e) => Err(Error::Raft(format!("initialize: {e}"))),
    }
}

/// Listens on `addr` and serves `/metrics`; counts handovers applied from now on.
async fn serve_metrics(
    addr: &str,
    raft: &Raft,
    leadership: &Leadership,
    state: &crate::raft::state_machine::StateHandle,
    reports: &Reports,
    id: crate::raft::NodeId,
) -> Result<[tokio::task::JoinHandle<()>; 2]> {
    use crate::observe::metrics;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen {
            addr: addr.to_string(),
            source,
        })?;
    let handle = metrics::install().unwrap_or_else(|| {
        // Another recorder in this process (tests): an empty page rather than none.
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle()
    });
    let sources = metrics::Sources {
        id,
        raft: raft.clone(),
        leadership: leadership.clone(),
        state: state.clone(),
        reports: reports.clone(),
    };
    // Entries already in the log were applied before this process counted.
    let since = raft.metrics().borrow().last_log_index.unwrap_or(0);
    info!(%addr, "serving /metrics");
    Ok([
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(listener, handle, sources).await {
                tracing::warn!("/metrics stopped: {e}");
            }
        }),
        tokio::spawn(metrics::count_handovers(state.clone(), since)),
    ])
}
