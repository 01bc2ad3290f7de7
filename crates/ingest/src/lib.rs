//! The ingest service: the public write path of hitcounter.
//!
//! ```text
//!  RecordHit / RecordHits / StreamHits
//!        │ validate + batch-id ledger (gRPC handlers)
//!        ▼
//!  [ingest_hits: bounded, in hits] ──▶ combine ──▶ [ingest_flushes: bounded] ──▶ log ──▶ forward
//!                                   (sum per key                              (one record  (per shard:
//!                                    and second,                               per flush,   tail the log,
//!                                    split by shard)                           fsync, ack)  one Apply stream)
//! ```
//!
//! A request is acknowledged only once its hits are in the durable log (`hitcounter-wal`):
//! under `--fsync always` after the fsync that covers them (one fsync for every request of a
//! flush), under `interval`/`never` after the write. Forwarders send the log's records to the
//! aggregators as (producer id, sequence number), so a resent record applies once, and the log
//! is trimmed only up to what the aggregators' checkpoints hold: a crash of any process loses
//! nothing acknowledged. Every stage-to-stage hand-off is a bounded channel, so a slow disk
//! pushes back (`RESOURCE_EXHAUSTED` for unary calls after the enqueue timeout, flow control for
//! streams); a slow or unavailable aggregator does not, up to the log's disk budget. [`serve`]
//! runs until the shutdown token is cancelled, then stops accepting, delivers what it can to the
//! aggregators (up to the drain deadline) and returns; what is left stays in the log for the
//! next start.

pub mod config;
pub mod validate;

mod error;
mod grpc;
mod ledger;
mod stages;
mod state;

use std::sync::Arc;

use hitcounter_proto::v1::ingest_server::IngestServer;
use hitcounter_telemetry::{CancellationToken, Listeners};
use tokio::task::JoinSet;
use tracing::Instrument;

pub use config::Config;
pub use error::IngestError;

use crate::{
    grpc::IngestService,
    ledger::BatchLedger,
    stages::{
        combine::{self, CombineSettings},
        forward::Forwarder,
        link::ApplyLink,
        log::{LogStage, SharedLogs},
        publish::Publisher,
    },
    validate::TimeRules,
};

/// Runs ingest on `listeners` until `shutdown` is cancelled, then drains and returns.
///
/// # Errors
/// Fails when the service cannot start (bad aggregator address, metrics recorder), when the gRPC
/// server fails, or when a pipeline stage stops unexpectedly: the process should then exit
/// non-zero so that its orchestrator restarts it.
pub async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), IngestError> {
    let metrics = hitcounter_telemetry::metrics::recorder()
        .map_err(|e| IngestError::Startup(e.to_string()))?;
    if config.cluster.enabled() {
        return serve_clustered(config, listeners, shutdown).await;
    }
    let channels = config
        .client
        .channels()
        .map_err(|e| IngestError::Startup(e.to_string()))?;
    if config.max_buffer_bytes < 2 * config.segment_bytes {
        // The active segment is never trimmed: a budget below two segments could fill with
        // data that is already delivered and refuse every write.
        return Err(IngestError::Startup(format!(
            "--max-buffer-bytes ({}) must be at least twice --segment-bytes ({})",
            config.max_buffer_bytes, config.segment_bytes
        )));
    }
    let authority = hitcounter_auth::Authority::new(&config.auth, "ingest", config.global_limit())
        .map_err(|e| IngestError::Startup(e.to_string()))?;
    let stack_config = config.client.stack_config();
    let max_message = config.service.max_message_bytes;
    let abandon = CancellationToken::new();
    let shards = channels.len();

    // Recovery: open the data directory (logs, ledger, producer id) before serving.
    let ledger = BatchLedger::new(config.dedup_horizon(), config.dedup_capacity);
    let opened = {
        let (dir, fsync, segment) = (
            config.data_dir.clone(),
            config.fsync_policy(),
            config.segment_bytes,
        );
        let (ledger, horizon) = (Arc::clone(&ledger), config.dedup_horizon());
        tokio::task::spawn_blocking(move || {
            state::open(&dir, shards, fsync, segment, &ledger, horizon)
        })
        .await
        .map_err(|e| IngestError::Startup(e.to_string()))??
    };
    let producer_id = opened.producer_id;
    let _data_dir_lock = opened.lock;
    let logs: SharedLogs = Arc::new(std::sync::Mutex::new(opened.logs));

    let (hits_tx, hits_rx) = hitcounter_pipeline::channel("ingest_hits", config.buffer_hits);
    let (flush_tx, flush_rx) =
        hitcounter_pipeline::channel("ingest_flushes", config.flush_channel_capacity);
    let mut forwarders = JoinSet::new();
    let mut links = Vec::with_capacity(shards);
    let (first, on_disk) = {
        let logs = stages::log::lock(&logs);
        (logs.main.first_seq(), logs.main.durable_seq())
    };
    if on_disk >= first {
        // The log is trimmed by whole segments, and only up to what the aggregators'
        // checkpoints hold, so records delivered before the last stop (even a clean one) are
        // still here; each forwarder first asks its aggregator what it holds durably and sends
        // only the rest. Said here so that a log full of records does not look like lost work.
        tracing::info!(
            records = on_disk - first + 1,
            first,
            last = on_disk,
            "the log holds records from before the last stop; each forwarder sends only those \
             its aggregator does not hold durably"
        );
    }
    let (written_tx, written_rx) = tokio::sync::watch::channel(on_disk);
    let mut durable_rxs = Vec::with_capacity(shards);
    for (shard, channel) in channels.into_iter().enumerate() {
        let link = ApplyLink::new(channel, max_message, config.forward_concurrency * 2);
        let (stack, _breaker) =
            hitcounter_stack::build("ingest", shard, &stack_config, link.clone())
                .map_err(|e| IngestError::Startup(e.to_string()))?;
        let (durable_tx, durable_rx) = tokio::sync::watch::channel(0);
        let forwarder = Forwarder {
            shard,
            // Sequence numbers count per shard, so each shard's stream is its own producer:
            // two shard addresses that reach the same aggregator must not look like resends.
            producer_id: producer_id.wrapping_add(shard as u64),
            stack,
            concurrency: config.forward_concurrency,
            logs: Arc::clone(&logs),
            written: written_rx.clone(),
            durable: durable_tx,
            abandon: abandon.clone(),
            key_limits: Arc::clone(&stages::log::lock(&logs).key_limits),
        };
        forwarders.spawn(
            forwarder
                .run()
                .instrument(tracing::info_span!("forward", shard)),
        );
        durable_rxs.push(durable_rx);
        links.push(link);
    }
    let log_stage = LogStage {
        logs: Arc::clone(&logs),
        budget: config.max_buffer_bytes,
        written: written_tx,
        durable: durable_rxs,
        ledger_times: opened.ledger_times,
        horizon: config.dedup_horizon(),
        background_sync: (config.fsync == config::FsyncMode::Never)
            .then_some(std::time::Duration::from_millis(100)),
        last_background_sync: std::sync::Mutex::new(std::time::Instant::now()),
        disk_full_logged: std::sync::Mutex::new(None),
    };
    let mut log_task = tokio::spawn(
        log_stage
            .run(flush_rx)
            .instrument(tracing::info_span!("log")),
    );
    let mut combine = start_combine(&config, hits_rx, flush_tx, shards, None);

    let service = edge(&config, hits_tx.clone(), ledger, &shutdown);
    tracing::info!(
        addr = ?listeners.grpc.local_addr().ok(),
        shards = links.len(),
        producer_id,
        "ingest serving"
    );
    let server = hitcounter_telemetry::server::serve_public(
        service,
        listeners,
        metrics,
        shutdown.clone(),
        authority,
    );
    let served = tokio::select! {
        served = server => served.map_err(|e| IngestError::Startup(e.to_string())),
        stopped = &mut combine => {
            return Err(stage_failed(&shutdown, "combine", stopped));
        }
        stopped = &mut log_task => {
            return Err(stage_failed(&shutdown, "log", stopped));
        }
        Some(stopped) = forwarders.join_next() => {
            return Err(stage_failed(&shutdown, "forward", stopped));
        }
    };

    // The edge is closed: let the pipeline drain, front to back. Everything acknowledged is in
    // the log already; draining delivers it now rather than after the next start.
    hits_tx.close();
    drop(hits_tx);
    let drain = async {
        let combined = (&mut combine).await;
        let logged = (&mut log_task).await;
        while forwarders.join_next().await.is_some() {}
        (combined, logged)
    };
    match tokio::time::timeout(config.service.drain_timeout(), drain).await {
        Ok((Ok(Ok(())), Ok(Ok(())))) => tracing::info!("pipeline drained"),
        Ok((combined, logged)) => {
            tracing::error!(?combined, ?logged, "a stage failed while draining")
        }
        Err(_) => {
            tracing::warn!(
                "drain deadline passed; undelivered batches stay in the log for the next start"
            );
            abandon.cancel();
            while forwarders.join_next().await.is_some() {}
            combine.abort();
            log_task.abort();
        }
    }
    for link in &links {
        link.close().await;
    }
    tracing::info!("ingest stopped");
    served
}

/// The gRPC edge in front of the pipeline's hits channel: the same in both modes.
fn edge(
    config: &Config,
    hits: hitcounter_pipeline::StageSender<stages::Pending>,
    ledger: Arc<BatchLedger>,
    shutdown: &CancellationToken,
) -> IngestServer<IngestService> {
    let service = IngestService {
        hits,
        ledger,
        rules: TimeRules {
            retention_seconds: config.retention_seconds,
            max_future_skew_seconds: config.max_future_skew_seconds,
        },
        enqueue_timeout: config.enqueue_timeout(),
        stream_response_capacity: config.stream_response_capacity,
        stream_window: config.stream_window.max(1),
        shutdown: shutdown.clone(),
    };
    let max_message = config.service.max_message_bytes;
    IngestServer::new(service)
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message)
}

/// Starts the `combine` stage splitting deltas into `parts` (shards, or partitions in clustered
/// mode, where requests with a batch id are kept apart, at most `keep_apart` per flush).
fn start_combine(
    config: &Config,
    hits: hitcounter_pipeline::StageReceiver<stages::Pending>,
    flushes: hitcounter_pipeline::StageSender<stages::Flush>,
    parts: usize,
    keep_apart: Option<usize>,
) -> tokio::task::JoinHandle<Result<(), IngestError>> {
    let settings = CombineSettings {
        max_deltas: config.combine_max_deltas,
        interval: std::time::Duration::from_millis(config.combine_interval_ms),
        keep_apart: keep_apart.is_some(),
        max_apart: keep_apart
            .unwrap_or(0)
            .min(config.combine_max_deltas.max(1)),
    };
    tokio::spawn(
        combine::run(hits, flushes, parts, settings).instrument(tracing::info_span!("combine")),
    )
}

/// Clustered mode: runs ingest stateless on the cluster's replicated log. No data directory,
/// no forwarders: flushes are published to the JetStream stream, from which the aggregators
/// read, and a request is acknowledged once the stream committed it.
async fn serve_clustered(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), IngestError> {
    let metrics = hitcounter_telemetry::metrics::recorder()
        .map_err(|e| IngestError::Startup(e.to_string()))?;
    let authority = hitcounter_auth::Authority::new(&config.auth, "ingest", config.global_limit())
        .map_err(|e| IngestError::Startup(e.to_string()))?;
    let max_age =
        hitcounter_cluster::log::max_age(config.retention_seconds, config.max_future_skew_seconds);
    let stream = hitcounter_cluster::HitStream::open(&config.cluster, max_age)
        .await
        .map_err(|e| IngestError::Startup(e.to_string()))?;
    let partitions = stream.partitions() as usize;
    // An atomic batch holds at most 1000 messages: one per partition, the rest markers.
    let max_apart = hitcounter_cluster::log::MAX_BATCH_MESSAGES.saturating_sub(partitions);
    if max_apart == 0 {
        return Err(IngestError::Startup(format!(
            "--partitions {partitions} leaves no room for batch ids in an atomic batch of at most {} messages: use at most 512 partitions",
            hitcounter_cluster::log::MAX_BATCH_MESSAGES
        )));
    }
    let ledger = BatchLedger::new(config.dedup_horizon(), config.dedup_capacity);
    let (hits_tx, hits_rx) = hitcounter_pipeline::channel("ingest_hits", config.buffer_hits);
    let (flush_tx, flush_rx) =
        hitcounter_pipeline::channel("ingest_flushes", config.flush_channel_capacity);
    let mut publishers = JoinSet::new();
    for lane in 0..config.publish_lanes.max(1) {
        let publisher = Publisher::new(stream.clone(), config.dedup_horizon());
        publishers.spawn(
            stages::DurableLog::run(publisher, flush_rx.clone())
                .instrument(tracing::info_span!("publish", lane)),
        );
    }
    drop(flush_rx);
    let mut combine = start_combine(&config, hits_rx, flush_tx, partitions, Some(max_apart));
    let service = edge(&config, hits_tx.clone(), ledger, &shutdown);
    tracing::info!(
        addr = ?listeners.grpc.local_addr().ok(),
        stream = stream.name(),
        partitions,
        lanes = config.publish_lanes.max(1),
        "ingest serving (clustered: stateless, on the cluster's log)"
    );
    let server = hitcounter_telemetry::server::serve_public(
        service,
        listeners,
        metrics,
        shutdown.clone(),
        authority,
    );
    let served = tokio::select! {
        served = server => served.map_err(|e| IngestError::Startup(e.to_string())),
        stopped = &mut combine => {
            return Err(stage_failed(&shutdown, "combine", stopped));
        }
        Some(stopped) = publishers.join_next() => {
            return Err(stage_failed(&shutdown, "publish", stopped));
        }
    };
    // The edge is closed: publish what the pipeline holds (its callers are still waiting).
    hits_tx.close();
    drop(hits_tx);
    let drain = async {
        let combined = (&mut combine).await;
        while publishers.join_next().await.is_some() {}
        combined
    };
    match tokio::time::timeout(config.service.drain_timeout(), drain).await {
        Ok(Ok(Ok(()))) => tracing::info!("pipeline drained"),
        Ok(combined) => tracing::error!(?combined, "a stage failed while draining"),
        Err(_) => {
            // Nothing acknowledged is lost: what was acknowledged is in the cluster's log, and
            // the callers still waiting get an error (they were not acknowledged).
            tracing::warn!("drain deadline passed; unpublished requests were not acknowledged");
            publishers.abort_all();
            combine.abort();
        }
    }
    tracing::info!("ingest stopped");
    served
}

/// Logs a stage that stopped while the service was serving, and shuts the service down: a
/// half-alive ingest must not keep acknowledging, so the process exits non-zero and its
/// orchestrator restarts it (the logs make that safe).
fn stage_failed(
    shutdown: &CancellationToken,
    stage: &'static str,
    stopped: Result<Result<(), IngestError>, tokio::task::JoinError>,
) -> IngestError {
    shutdown.cancel();
    let error = match stopped {
        Ok(Err(error)) => error,
        _ => IngestError::StageStopped(stage),
    };
    tracing::error!(stage, %error, "a pipeline stage stopped; shutting down");
    error
}
