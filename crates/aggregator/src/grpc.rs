//! The gRPC edge of the aggregator: the `hitcounter.aggregator.v1.Aggregator` service.
//!
//! `Apply` reads one ingest forwarder's stream of delta batches; each batch is deduplicated by
//! (producer, seq), applied through the owners, and acknowledged on the response stream, in the
//! order received. Up to `--apply-window` batches of a stream are applied at once, so decoding
//! the next batch overlaps with the owners applying the previous ones (counts add, so the order
//! in which batches land does not matter; a checkpoint waits for every batch in flight through
//! the apply gate). An apply that has started always runs to the end, also on shutdown or
//! when the stream breaks: stopping half-way would leave a batch partly applied but marked as
//! applied. Reads (`Count`, `Series`, `Top`) read the owners' stores in place and merge.

use std::{pin::Pin, sync::Arc};

use futures::{stream::FuturesOrdered, Stream, StreamExt};
use hitcounter_proto::aggregator::v1::{
    aggregator_server::Aggregator, ApplyRequest, ApplyResponse, CountRequest, CountResponse,
    KeyCount, SeriesRequest, SeriesResponse, TopRequest, TopResponse,
};
use hitcounter_telemetry::{rpc, CancellationToken};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::{applier::Applier, error::AggregatorError, hosting::Hosting, owners::Owners};

/// Most keys in one `Count` call (query sends at most 1000 per `GetHitsMany`).
const MAX_COUNT_KEYS: usize = 10_000;
/// Most points in one `Series` call (the public limit).
const MAX_SERIES_POINTS: u32 = 10_000;
/// Most keys in one `Top` answer (the public limit).
const MAX_TOP_LIMIT: u32 = 1000;

/// Implements the aggregator's gRPC API.
pub(crate) struct AggregatorService {
    pub(crate) owners: Owners,
    pub(crate) applier: Arc<Applier>,
    pub(crate) retention_seconds: u32,
    pub(crate) ack_capacity: usize,
    /// Batches of one stream applied at once.
    pub(crate) apply_window: usize,
    /// What this aggregator serves (clustered mode: the ready partitions; reads of other keys
    /// are refused).
    pub(crate) hosting: tokio::sync::watch::Receiver<Hosting>,
    pub(crate) shutdown: CancellationToken,
}

type AckStream = Pin<Box<dyn Stream<Item = Result<ApplyResponse, Status>> + Send>>;

impl AggregatorService {
    /// Refuses reads of keys whose partition this aggregator does not serve now (clustered
    /// mode: catching up with the log, or not placed here).
    fn check_ready<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a String>,
    ) -> Result<(), AggregatorError> {
        let hosting = self.hosting.borrow();
        for key in keys {
            if let Err(partition) = hosting.serves(key) {
                return Err(AggregatorError::CatchingUp {
                    partition,
                    applied: self.applier.highest_position(),
                });
            }
        }
        Ok(())
    }

    fn check_window(&self, window_seconds: u32) -> Result<(), AggregatorError> {
        if window_seconds == 0 || window_seconds > self.retention_seconds {
            return Err(AggregatorError::InvalidArgument(format!(
                "window_seconds must be 1..={}, got {window_seconds}",
                self.retention_seconds
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Aggregator for AggregatorService {
    type ApplyStream = AckStream;

    async fn apply(
        &self,
        request: Request<Streaming<ApplyRequest>>,
    ) -> Result<Response<Self::ApplyStream>, Status> {
        let mut batches = request.into_inner();
        let (acks_tx, acks_rx) =
            hitcounter_pipeline::channel("aggregator_apply_acks", self.ack_capacity);
        let applier = Arc::clone(&self.applier);
        let shutdown = self.shutdown.clone();
        let window = self.apply_window.max(1);
        tokio::spawn(
            async move {
                tracing::debug!("apply stream opened");
                let mut applying = FuturesOrdered::new();
                let (mut reading, mut acking) = (true, true);
                while reading || !applying.is_empty() {
                    tokio::select! {
                        // On shutdown stop reading: unacked batches are resent by ingest.
                        _ = shutdown.cancelled(), if reading => reading = false,
                        next = batches.message(), if reading && applying.len() < window => {
                            match next {
                                Ok(Some(batch)) => {
                                    let applier = Arc::clone(&applier);
                                    applying.push_back(async move {
                                        let started = std::time::Instant::now();
                                        let (producer, seq) = (batch.producer_id, batch.seq);
                                        // A key-limit refusal is an answer, not a broken stream:
                                        // the ack says so and the stream goes on.
                                        let ack = match applier.apply(batch).await {
                                            Err(AggregatorError::KeyLimit(refusal)) => {
                                                Ok(applier.refusal_ack(producer, seq, &refusal))
                                            }
                                            applied => applied.map_err(Status::from),
                                        };
                                        rpc::record("aggregator", "Apply", &ack, started);
                                        ack
                                    });
                                }
                                Ok(None) => reading = false,
                                Err(status) => {
                                    tracing::debug!(%status, "apply stream broke");
                                    reading = false;
                                }
                            }
                        }
                        Some(ack) = applying.next() => {
                            let failed = ack.is_err();
                            // The ack channel is bounded: if the forwarder stops reading acks,
                            // we stop reading batches. Applies already started still finish.
                            if acking && (acks_tx.send(ack).await.is_err() || failed) {
                                acking = false;
                                reading = false;
                            }
                        }
                    }
                }
                tracing::debug!("apply stream closed");
            }
            .instrument(tracing::debug_span!("apply_stream")),
        );
        Ok(Response::new(acks_rx.into_stream().boxed()))
    }

    async fn count(
        &self,
        request: Request<CountRequest>,
    ) -> Result<Response<CountResponse>, Status> {
        rpc::observe("aggregator", "Count", async {
            let request = request.into_inner();
            self.check_window(request.window_seconds)?;
            if request.keys.len() > MAX_COUNT_KEYS {
                return Err(AggregatorError::InvalidArgument(format!(
                    "at most {MAX_COUNT_KEYS} keys per call, got {}",
                    request.keys.len()
                ))
                .into());
            }
            self.check_ready(&request.keys)?;
            let counts =
                self.owners
                    .count(&request.keys, request.end_second, request.window_seconds);
            Ok(Response::new(CountResponse { counts }))
        })
        .await
    }

    async fn series(
        &self,
        request: Request<SeriesRequest>,
    ) -> Result<Response<SeriesResponse>, Status> {
        rpc::observe("aggregator", "Series", async {
            let request = request.into_inner();
            self.check_ready([&request.key])?;
            if request.points > MAX_SERIES_POINTS || request.step_seconds == 0 {
                return Err(AggregatorError::InvalidArgument(format!(
                    "points must be at most {MAX_SERIES_POINTS} and step_seconds at least 1"
                ))
                .into());
            }
            let counts = self.owners.series(
                &request.key,
                request.start_second,
                request.step_seconds,
                request.points,
            );
            Ok(Response::new(SeriesResponse { counts }))
        })
        .await
    }

    async fn top(&self, request: Request<TopRequest>) -> Result<Response<TopResponse>, Status> {
        rpc::observe("aggregator", "Top", async {
            let request = request.into_inner();
            self.check_window(request.window_seconds)?;
            let limit = request.limit.clamp(1, MAX_TOP_LIMIT) as usize;
            // Only the partitions served now, and the answer says which they are: query
            // checks that the answers it merges cover every partition.
            let hosting = self.hosting.borrow().clone();
            let keys = self
                .owners
                .top(
                    request.end_second,
                    request.window_seconds,
                    limit,
                    &request.prefix,
                    |key| hosting.serves(key).is_ok(),
                )
                .into_iter()
                .map(|(key, count)| KeyCount { key, count })
                .collect();
            Ok(Response::new(TopResponse {
                keys,
                partitions: hosting.ready.iter().copied().collect(),
            }))
        })
        .await
    }
}
