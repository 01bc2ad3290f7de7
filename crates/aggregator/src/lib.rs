//! The aggregator service: owns the sliding-window state of one shard of the key space.
//!
//! ```text
//!   ingest forwarders ──Apply stream──▶ [dedup (producer, seq)] ──▶ owners[hash(key) % N] ──┐
//!   query ──Count/Series/Top──▶ fan out to owners ──▶ fan in ◀──────────────────────────────┘
//! ```
//!
//! Each owner is a task with its own [`hitcounter_window::WindowStore`] and bounded mailbox (see
//! [`owners`]); nothing on the hot path takes a lock. [`serve`] runs the gRPC server (with health,
//! reflection and `/metrics`) until the shutdown token is cancelled, then stops reading apply
//! streams, lets the owners drain their mailboxes and returns.
//!
//! State is in memory only for now: a restarted aggregator starts empty.

pub mod config;

mod clock;
mod dedup;
mod error;
mod grpc;
mod owners;

use std::sync::Arc;

use hitcounter_proto::aggregator::v1::aggregator_server::AggregatorServer;
use hitcounter_telemetry::{CancellationToken, Listeners};
use tokio::task::JoinSet;
use tracing::Instrument;

pub use config::Config;
pub use error::AggregatorError;

use crate::{
    dedup::AppliedBatches,
    grpc::AggregatorService,
    owners::{OwnerSettings, Owners},
};

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
    let mut stages = JoinSet::new();
    let owners = Owners::spawn(
        &OwnerSettings {
            owners: config.owner_count(),
            mailbox: config.owner_mailbox,
            max_keys: config.max_keys,
            retention_seconds: config.retention_seconds,
        },
        &mut stages,
    );
    let service = AggregatorService {
        owners,
        applied: Arc::new(AppliedBatches::new(
            config.dedup_window,
            config.max_producers,
        )),
        retention_seconds: config.retention_seconds,
        ack_capacity: config.ack_channel_capacity,
        shutdown: shutdown.clone(),
    };

    if let Some(listener) = listeners.metrics {
        tokio::spawn(hitcounter_telemetry::metrics::serve(
            listener,
            metrics,
            shutdown.clone(),
        ));
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    let (reflection_v1, reflection_v1alpha) = hitcounter_proto::reflection_services()
        .map_err(|e| AggregatorError::Startup(e.to_string()))?;
    let grpc_addr = listeners.grpc.local_addr().ok();
    let max_message = config.service.max_message_bytes;
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            AggregatorServer::new(service)
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
        )
        .serve_with_incoming_shutdown(
            hitcounter_telemetry::grpc_incoming(listeners.grpc),
            shutdown.clone().cancelled_owned(),
        );
    health
        .set_serving::<AggregatorServer<AggregatorService>>()
        .await;
    tracing::info!(addr = ?grpc_addr, owners = config.owner_count(), "aggregator serving");

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
    let not_serving = async {
        shutdown.cancelled().await;
        health
            .set_not_serving::<AggregatorServer<AggregatorService>>()
            .await;
        // The overall status ("") is what orchestrators probe.
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
    };
    let drain = tokio::select! {
        (served, ()) = async { tokio::join!(server.instrument(tracing::info_span!("grpc")), not_serving) } => {
            served.map_err(|e| AggregatorError::Startup(e.to_string()))
        }
        failed = stage_watch => {
            shutdown.cancel();
            let error = failed.err().unwrap_or(AggregatorError::OwnerStopped);
            tracing::error!(%error, "a stage stopped; shutting down");
            return Err(error);
        }
    };
    // The server (and with it every `Owners` handle) is gone: the owners drain and stop.
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
