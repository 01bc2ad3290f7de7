//! The aggregator service: owns the sliding-window state of one shard of the key space.
//!
//! ```text
//!   ingest forwarders ──Apply stream──▶ [dedup (producer, seq)] ──▶ owners[hash(key) % N]
//!                                                                     (one writer task each)
//!   query ──Count/Series/Top──▶ read each owner's store in place (read lock) ──▶ merge
//! ```
//!
//! Each owner is a task that is the only writer of its own [`hitcounter_window::WindowStore`],
//! fed by a bounded write mailbox; writes of different owners never contend. The store sits in
//! an `RwLock`: the owner takes it for writing in short steps, and reads take it for reading in
//! their gRPC handlers, so a read never queues behind the mailbox and waits at most one write
//! step (see [`owners`] for the measurements behind that choice). [`serve`] runs the gRPC
//! server (with health, reflection and `/metrics`) until the shutdown token is cancelled, then
//! stops reading apply streams, lets the owners drain their mailboxes, writes a last checkpoint
//! and returns.
//!
//! State survives restarts through checkpoints (see [`checkpoint`] and the `snapshot` stage):
//! on start the newest checkpoint is loaded, and ingest resends every batch the checkpoint does
//! not cover (its acks carry `durable_through`), which the per-producer progress applies once.

pub mod config;

mod applier;
pub mod checkpoint;
mod clock;
mod consume;
mod dedup;
mod error;
mod grpc;
mod hosting;
mod owners;
mod snapshot;

use std::{collections::HashMap, sync::Arc};

use hitcounter_proto::aggregator::v1::aggregator_server::AggregatorServer;
use hitcounter_telemetry::{CancellationToken, Listeners};
use tokio::task::JoinSet;
use tracing::Instrument;

pub use config::Config;
pub use error::{AggregatorError, KeyLimitRefusal};

use crate::{
    applier::Applier,
    dedup::AppliedBatches,
    grpc::AggregatorService,
    owners::{OwnerSettings, Owners},
};

/// Clustered mode: opens the cluster's log and works out where this node's partitions come
/// from (static placement, or the membership).
async fn open_cluster(
    config: &Config,
) -> Result<(hitcounter_cluster::HitStream, hosting::Layout), AggregatorError> {
    if config.node_id.is_none() && config.node_index >= config.nodes {
        return Err(AggregatorError::Startup(format!(
            "--node-index {} is not below --nodes {}: nodes are numbered 0..{}",
            config.node_index,
            config.nodes,
            config.nodes.saturating_sub(1)
        )));
    }
    if let Some(node_id) = &config.node_id {
        hitcounter_cluster::membership::check_node_id(node_id)
            .map_err(|e| AggregatorError::Startup(e.to_string()))?;
    }
    if config.checkpoint_interval_ms == 0 {
        tracing::warn!("clustered mode without checkpoints: every start rebuilds the counts from the whole log");
    }
    let max_age = hitcounter_cluster::log::max_age(
        config.retention_seconds,
        hitcounter_cluster::log::ASSUMED_FUTURE_SKEW_SECONDS,
    );
    let stream = hitcounter_cluster::HitStream::open(&config.cluster, max_age)
        .await
        .map_err(|e| AggregatorError::Startup(e.to_string()))?;
    let layout = match &config.node_id {
        Some(node_id) => {
            let membership = hitcounter_cluster::Membership::open(
                &stream,
                config.membership.ttl(),
                config.cluster.nats_replicas,
            )
            .await
            .map_err(|e| AggregatorError::Startup(e.to_string()))?;
            let members = membership.watch().await;
            let address = config.advertised_address();
            if let Some(other) = members
                .borrow()
                .get(node_id)
                .filter(|other| other.address != address)
            {
                // Either this node restarted somewhere else within a member TTL (harmless), or
                // two aggregators were given the same id (they would take turns announcing it).
                tracing::warn!(node = %node_id, %address, other = %other.address, "the membership already lists this --node-id at another address: if another aggregator runs with this id, give each its own");
            }
            tracing::info!(
                stream = stream.name(),
                node = %node_id,
                %address,
                members = members.borrow().len(),
                replicas = config.placement.replicas,
                partitions = stream.partitions(),
                "clustered: joining the membership"
            );
            hosting::Layout::Members {
                membership: Box::new(membership),
                members,
                node_id: node_id.clone(),
                address,
                replicas: config.placement.replicas,
            }
        }
        None => {
            let placement = hitcounter_cluster::Placement::new(
                stream.partitions(),
                config.nodes,
                config.placement.replicas,
            );
            tracing::info!(
                stream = stream.name(),
                node = config.node_index,
                nodes = config.nodes,
                replicas = placement.replicas,
                hosted = placement.partitions_of(config.node_index).len(),
                of = placement.partitions,
                "clustered: hosting partitions (static placement)"
            );
            hosting::Layout::Static {
                placement,
                node: config.node_index,
            }
        }
    };
    Ok((stream, layout))
}

/// Runs the aggregator on `listeners` until `shutdown` is cancelled, then drains and returns.
///
/// # Errors
/// Fails when the server cannot start, when the gRPC server fails, or when a stage fails (the
/// process should then exit non-zero so that its orchestrator restarts it).
pub async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), AggregatorError> {
    let metrics = hitcounter_telemetry::metrics::recorder()
        .map_err(|e| AggregatorError::Startup(e.to_string()))?;
    let settings = OwnerSettings {
        owners: config.owner_count(),
        mailbox: config.owner_mailbox,
        max_keys: config.max_keys,
        retention_seconds: config.retention_seconds,
    };
    let checkpoints = config.checkpoint_interval_ms > 0;
    let _data_dir_lock = if checkpoints {
        Some(
            hitcounter_telemetry::lock_data_dir(&config.data_dir)
                .map_err(AggregatorError::Startup)?,
        )
    } else {
        None
    };
    // Clustered mode: the cluster's log and the partitions this node hosts, checked before
    // anything else starts (a wrong --node-index or --partitions must not get far).
    let cluster = if config.cluster.enabled() {
        Some(open_cluster(&config).await?)
    } else {
        None
    };
    let applied = AppliedBatches::new(config.dedup_window, config.max_producers);
    let mut durable = HashMap::new();
    let mut positions = std::collections::BTreeMap::new();
    let mut stores = Vec::new();
    if checkpoints {
        // Recovery: the newest checkpoint, if any. Ingest resends what came after it.
        let started = std::time::Instant::now();
        let dir = config.data_dir.clone();
        let (owner_count, limits) = (settings.owners, settings.store_limits());
        let loaded =
            tokio::task::spawn_blocking(move || checkpoint::load(&dir, owner_count, limits))
                .await
                .map_err(|e| AggregatorError::Startup(e.to_string()))?
                .map_err(|e| AggregatorError::Startup(e.to_string()))?;
        if let Some((loaded, restored)) = loaded {
            let took = started.elapsed();
            tracing::info!(
                file = %loaded.path.display(),
                keys = loaded.keys,
                counters = loaded.counters,
                producers = loaded.producers.len(),
                seconds = took.as_secs_f64(),
                "recovered from checkpoint"
            );
            metrics::gauge!("hitcounter_aggregator_recovery_seconds").set(took.as_secs_f64());
            metrics::gauge!("hitcounter_aggregator_recovered_counters").set(loaded.counters as f64);
            durable = loaded
                .producers
                .iter()
                .map(|(p, progress)| (*p, progress.through))
                .collect();
            applied.restore(loaded.producers);
            positions = loaded.positions.into_iter().collect();
            stores = restored;
        } else {
            tracing::info!(dir = %config.data_dir.display(), "no checkpoint: starting empty");
        }
    }
    let mut stages = JoinSet::new();
    let owners = Owners::spawn(&settings, stores, &mut stages);
    let applier = Arc::new(Applier {
        owners: owners.clone(),
        applied,
        gate: tokio::sync::RwLock::new(()),
        durable: std::sync::Mutex::new(durable),
        incarnation: rand::random(),
        positions: std::sync::Mutex::new(positions),
    });
    // Clustered mode: the hosting controller reads the log and says which partitions are
    // served; on one machine every key is served as soon as the checkpoint is loaded.
    let (hosting_tx, hosting_rx) = tokio::sync::watch::channel(match &cluster {
        // Nothing is served until the controller says so.
        Some((stream, _)) => hosting::Hosting {
            partitions: stream.partitions(),
            ..hosting::Hosting::default()
        },
        None => hosting::Hosting::local(),
    });
    let consumer_stop = CancellationToken::new();
    // The server stops once the node may stop serving: at once on one machine or with static
    // placement, after the handoff with membership (see `hosting`).
    let serving = if cluster.is_some() {
        CancellationToken::new()
    } else {
        shutdown.clone()
    };
    if let Some((stream, layout)) = cluster {
        let held: std::collections::BTreeSet<u32> =
            applier.lock_positions().keys().copied().collect();
        let initial = match &layout {
            hosting::Layout::Static { placement, node } => {
                // Static placement never hands over: what the checkpoint holds beyond this
                // node's partitions (after --nodes changed) goes now.
                let target: std::collections::BTreeSet<u32> =
                    placement.partitions_of(*node).into_iter().collect();
                let extra: std::collections::BTreeSet<u32> =
                    held.difference(&target).copied().collect();
                if !extra.is_empty() {
                    let keys = applier.drop_partitions(&extra, stream.partitions()).await;
                    tracing::info!(partitions = ?extra, keys, "dropped partitions no longer placed here");
                }
                target
            }
            hosting::Layout::Members { .. } => held,
        };
        let controller = hosting::Controller {
            applier: Arc::clone(&applier),
            stream,
            layout,
            hosting: hosting_tx,
            max_building: config.max_building_partitions.max(1),
            handoff_timeout: std::time::Duration::from_secs(config.handoff_timeout_seconds),
        };
        stages.spawn(
            controller
                .run(
                    initial,
                    shutdown.clone(),
                    serving.clone(),
                    consumer_stop.clone(),
                )
                .instrument(tracing::info_span!("hosting")),
        );
    }
    let service = AggregatorService {
        owners,
        applier: Arc::clone(&applier),
        retention_seconds: config.retention_seconds,
        ack_capacity: config.ack_channel_capacity,
        apply_window: config.apply_window,
        hosting: hosting_rx,
        shutdown: serving.clone(),
    };
    // The snapshot stage: periodic checkpoints until shutdown, then a last one after the server
    // has stopped (see below).
    let snapshot_stop = CancellationToken::new();
    let snapshot = checkpoints.then(|| {
        tokio::spawn(
            snapshot::run(
                Arc::clone(&applier),
                config.data_dir.clone(),
                std::time::Duration::from_millis(config.checkpoint_interval_ms),
                snapshot_stop.clone(),
            )
            .instrument(tracing::info_span!("snapshot")),
        )
    });

    let service = AggregatorServer::new(service)
        .max_decoding_message_size(config.service.max_message_bytes)
        .max_encoding_message_size(config.service.max_message_bytes);
    tracing::info!(
        addr = ?listeners.grpc.local_addr().ok(),
        owners = config.owner_count(),
        "aggregator serving"
    );
    let server = hitcounter_telemetry::server::serve(service, listeners, metrics, serving.clone());

    // Watch the stages while serving: an owner that fails takes the service down.
    let stage_watch = async {
        while let Some(result) = stages.join_next().await {
            match result {
                Ok(Ok(())) => {}
                Ok(Err(error)) => return Err(error),
                Err(join) => {
                    return Err(AggregatorError::Startup(format!(
                        "owner task failed: {join}"
                    )))
                }
            }
        }
        Ok(())
    };
    let drain = tokio::select! {
        served = server => served.map_err(|e| AggregatorError::Startup(e.to_string())),
        failed = stage_watch => {
            shutdown.cancel();
            let error = failed.err().unwrap_or(AggregatorError::OwnerStopped);
            tracing::error!(%error, "a stage stopped; shutting down");
            return Err(error);
        }
    };
    // The server is gone: the log consumer stops (between two messages), the snapshot stage
    // writes a last checkpoint, so a clean restart replays nothing; then every `Owners` handle
    // is gone and the owners drain and stop.
    consumer_stop.cancel();
    snapshot_stop.cancel();
    if let Some(snapshot) = snapshot {
        match snapshot.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!(%error, "last checkpoint failed"),
            Err(error) => tracing::error!(%error, "snapshot stage failed"),
        }
    }
    drop(applier);
    let drained = tokio::time::timeout(config.service.drain_timeout(), async {
        while stages.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("owners did not drain before the deadline");
    }
    tracing::info!("aggregator stopped");
    drain
}
