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

/// Clustered mode: opens the cluster's log and works out the partitions this node hosts.
async fn open_cluster(
    config: &Config,
) -> Result<(hitcounter_cluster::HitStream, Vec<u32>), AggregatorError> {
    if config.node_index >= config.nodes {
        return Err(AggregatorError::Startup(format!(
            "--node-index {} is not below --nodes {}: nodes are numbered 0..{}",
            config.node_index,
            config.nodes,
            config.nodes.saturating_sub(1)
        )));
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
    let placement = hitcounter_cluster::Placement::new(
        stream.partitions(),
        config.nodes,
        config.placement.replicas,
    );
    let partitions = placement.partitions_of(config.node_index);
    tracing::info!(
        stream = stream.name(),
        node = config.node_index,
        nodes = config.nodes,
        replicas = placement.replicas,
        hosted = partitions.len(),
        of = placement.partitions,
        "clustered: hosting partitions"
    );
    metrics::gauge!("hitcounter_aggregator_hosted_partitions").set(partitions.len() as f64);
    Ok((stream, partitions))
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
    // Reads wait for the log consumer to catch up (clustered mode); on one machine the state
    // is whole as soon as the checkpoint is loaded.
    let (caught_up, ready) = tokio::sync::watch::channel(cluster.is_none());
    let consumer_stop = CancellationToken::new();
    if let Some((stream, partitions)) = cluster {
        let consumer = consume::LogConsumer {
            applier: Arc::clone(&applier),
            stream,
            partitions,
            caught_up,
        };
        stages.spawn(
            consumer
                .run(consumer_stop.clone())
                .instrument(tracing::info_span!("consume")),
        );
    }
    let service = AggregatorService {
        owners,
        applier: Arc::clone(&applier),
        retention_seconds: config.retention_seconds,
        ack_capacity: config.ack_channel_capacity,
        apply_window: config.apply_window,
        ready,
        shutdown: shutdown.clone(),
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
    let server = hitcounter_telemetry::server::serve(service, listeners, metrics, shutdown.clone());

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
