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

use std::{collections::HashMap, pin::Pin, sync::Arc};

use futures::{stream::FuturesOrdered, Stream, StreamExt};
use hitcounter_proto::aggregator::v1::{
    aggregator_server::Aggregator, ApplyRequest, ApplyResponse, CountRequest, CountResponse,
    KeyCount, SeriesRequest, SeriesResponse, TopRequest, TopResponse,
};
use hitcounter_telemetry::{rpc, CancellationToken};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::{dedup::AppliedBatches, error::AggregatorError, owners::Owners};

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
    pub(crate) shutdown: CancellationToken,
}

type AckStream = Pin<Box<dyn Stream<Item = Result<ApplyResponse, Status>> + Send>>;

impl AggregatorService {
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

/// What applying a batch needs, shared by every apply stream and the snapshot stage.
pub(crate) struct Applier {
    pub(crate) owners: Owners,
    pub(crate) applied: AppliedBatches,
    /// Applies hold it shared; a checkpoint holds it exclusively for the instant it copies the
    /// stores and the progress, so that the copy contains whole batches only.
    pub(crate) gate: tokio::sync::RwLock<()>,
    /// Per producer: every seq <= this is in the newest checkpoint on disk.
    pub(crate) durable: std::sync::Mutex<HashMap<u64, u64>>,
    /// Random per process: tells producers that we restarted.
    pub(crate) incarnation: u64,
}

impl Applier {
    fn durable_through(&self, producer: u64) -> u64 {
        let durable = self.durable.lock().unwrap_or_else(|e| e.into_inner());
        durable.get(&producer).copied().unwrap_or(0)
    }

    /// Applies one batch unless it is a resend; returns its ack.
    async fn apply(&self, batch: ApplyRequest) -> Result<ApplyResponse, AggregatorError> {
        let _applying = self.gate.read().await;
        let tick = crate::clock::now_second() as u64;
        let (producer, seq) = (batch.producer_id, batch.seq);
        let ack = |duplicate, dropped| ApplyResponse {
            seq,
            duplicate,
            dropped,
            durable_through: self.durable_through(producer),
            incarnation: self.incarnation,
        };
        if let Some((missing, gone)) = self.applied.skip_gone(producer, batch.first_kept_seq, tick)
        {
            // Under the gate, like an apply: a checkpoint holds the new watermark or the old.
            metrics::counter!("hitcounter_aggregator_lost_batches_total").increment(missing);
            tracing::error!(
                producer,
                first_gone = gone.start(),
                last_gone = gone.end(),
                missing,
                first_kept = batch.first_kept_seq,
                "batches of this producer that this aggregator does not hold are gone from the \
                 producer's log: their hits are lost (this aggregator lost its state, e.g. its \
                 data directory or checkpoint, or forgot the producer at --max-producers); \
                 going on from the producer's oldest kept batch"
            );
        }
        if seq == 0 {
            return Ok(ack(true, 0));
        }
        if !self.applied.first_time(producer, seq, tick) {
            metrics::counter!("hitcounter_aggregator_batches_total", "outcome" => "duplicate")
                .increment(1);
            return Ok(ack(true, 0));
        }
        let dropped = match self.owners.apply(batch.deltas).await {
            Ok(dropped) => dropped,
            Err(error) => {
                // Not applied: a resend must not be taken for a duplicate.
                self.applied.forget(producer, seq);
                return Err(error);
            }
        };
        metrics::counter!("hitcounter_aggregator_batches_total", "outcome" => "applied")
            .increment(1);
        Ok(ack(false, dropped))
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
                                        let ack = applier.apply(batch).await.map_err(Status::from);
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
            let keys = self
                .owners
                .top(
                    request.end_second,
                    request.window_seconds,
                    limit,
                    &request.prefix,
                )
                .into_iter()
                .map(|(key, count)| KeyCount { key, count })
                .collect();
            Ok(Response::new(TopResponse { keys }))
        })
        .await
    }
}
