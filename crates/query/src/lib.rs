//! The query service: the public read path of hitcounter.
//!
//! ```text
//!  GetHits / GetHitsMany / GetSeries / TopKeys / WatchHits
//!        │ resolve defaults, validate, then the caller's role, key scope and quota
//!        ▼ (gRPC handlers; the token was checked by the server's authentication layer)
//!  fan out by shard ──▶ [client stack per shard] ──▶ aggregator[i] ──▶ fan in (merge)
//! ```
//!
//! Each shard is called through its own tower stack (concurrency limit, retry budget, circuit
//! breaker, timeout): while a shard's breaker is open, reads that need it fail at once with
//! `UNAVAILABLE` ("aggregator unavailable: circuit open") instead of piling up. [`serve`] runs
//! until the shutdown token is cancelled; watches then end cleanly and the server drains.

pub mod config;
pub mod grpc;

mod error;
mod shards;

use std::sync::Arc;

use hitcounter_proto::v1::query_server::QueryServer;
use hitcounter_telemetry::{CancellationToken, Listeners};
use tokio::sync::Semaphore;

pub use config::Config;
pub use error::QueryError;

use crate::{grpc::QueryService, shards::Shards};

/// Runs query on `listeners` until `shutdown` is cancelled, then drains and returns.
///
/// # Errors
/// Fails when the service cannot start (bad aggregator address, metrics recorder) or when the
/// gRPC server fails.
pub async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), QueryError> {
    let metrics = hitcounter_telemetry::metrics::recorder()
        .map_err(|e| QueryError::Startup(e.to_string()))?;
    let max_message = config.service.max_message_bytes;
    // Clustered mode: the partition count comes from the cluster's log itself, so query can
    // never route with a different one than ingest wrote with.
    let stream = if config.cluster.enabled() {
        let max_age = hitcounter_cluster::log::max_age(
            config.retention_seconds,
            hitcounter_cluster::log::ASSUMED_FUTURE_SKEW_SECONDS,
        );
        Some(
            hitcounter_cluster::HitStream::open(&config.cluster, max_age)
                .await
                .map_err(|e| QueryError::Startup(e.to_string()))?,
        )
    } else {
        None
    };
    let shards = match stream {
        Some(stream) if config.membership => {
            let membership = hitcounter_cluster::Membership::open(
                &stream,
                config.membership_args.ttl(),
                config.cluster.nats_replicas,
            )
            .await
            .map_err(|e| QueryError::Startup(e.to_string()))?;
            let members = membership.watch().await;
            tracing::info!(
                partitions = stream.partitions(),
                aggregators = members.borrow().len(),
                replicas = config.placement.replicas,
                "clustered: reading partitions from the aggregators in the membership"
            );
            Shards::discover(
                members,
                stream.partitions(),
                config.placement.replicas,
                config.client.clone(),
                max_message,
            )
        }
        stream => {
            let channels = config
                .client
                .channels()
                .map_err(|e| QueryError::Startup(e.to_string()))?;
            let roster = stream.map(|stream| {
                let placement = hitcounter_cluster::Placement::new(
                    stream.partitions(),
                    channels.len(),
                    config.placement.replicas,
                );
                tracing::info!(
                    partitions = placement.partitions,
                    aggregators = placement.nodes,
                    replicas = placement.replicas,
                    "clustered: reading partitions from their replicas (static placement)"
                );
                hitcounter_cluster::Roster::fixed(placement, &config.client.aggregators)
            });
            Shards::new(channels, &config.client.stack_config(), max_message, roster)
                .map_err(|e| QueryError::Startup(e.to_string()))?
        }
    };
    if config.membership && !config.cluster.enabled() {
        return Err(QueryError::Startup(
            "--membership finds aggregators in a cluster's membership: it needs --nats".into(),
        ));
    }
    let authority = hitcounter_auth::Authority::new(&config.auth, "query", config.global_limit())
        .map_err(|e| QueryError::Startup(e.to_string()))?;
    let service = QueryService {
        shards,
        retention_seconds: config.retention_seconds,
        watches: Arc::new(Semaphore::new(config.max_watches)),
        max_watches: config.max_watches,
        watch_capacity: config.watch_channel_capacity,
        shutdown: shutdown.clone(),
    };

    let service = QueryServer::new(service)
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    tracing::info!(addr = ?listeners.grpc.local_addr().ok(), "query serving");
    let served = hitcounter_telemetry::server::serve_public(
        service, listeners, metrics, shutdown, authority,
    )
    .await;
    tracing::info!("query stopped");
    served.map_err(|e| QueryError::Startup(e.to_string()))
}
