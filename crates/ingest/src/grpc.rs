//! The gRPC edge of ingest: the public `hitcounter.v1.Ingest` service.
//!
//! Every call runs the same steps: claim the batch id (if any) in the ledger, validate every
//! hit, enqueue the batch on the bounded hits channel, complete the claim, answer. A hit is
//! acknowledged once it is in the pipeline. Unary calls wait at most the enqueue timeout for
//! room and then get `RESOURCE_EXHAUSTED`; `StreamHits` waits as long as it takes and, while it
//! waits, stops reading its stream, so HTTP/2 flow control slows the client down.

use std::{pin::Pin, sync::Arc, time::Duration};

use futures::{Stream, StreamExt};
use hitcounter_pipeline::{SendError, StageSender};
use hitcounter_proto::v1::{
    ingest_server::Ingest, Hit, RecordHitRequest, RecordHitResponse, RecordHitsRequest,
    RecordHitsResponse,
};
use hitcounter_telemetry::{rpc, CancellationToken};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::{
    error::IngestError,
    ledger::{BatchLedger, Claim},
    validate::{self, TimeRules, ValidHit},
};

/// Implements the public ingest API.
#[derive(Clone)]
pub(crate) struct IngestService {
    pub(crate) hits: StageSender<Vec<ValidHit>>,
    pub(crate) ledger: Arc<BatchLedger>,
    pub(crate) rules: TimeRules,
    pub(crate) enqueue_timeout: Duration,
    pub(crate) stream_response_capacity: usize,
    pub(crate) shutdown: CancellationToken,
}

/// How long an enqueue may wait.
#[derive(Clone, Copy)]
enum Wait {
    /// Unary: at most this long, then `RESOURCE_EXHAUSTED`.
    AtMost(Duration),
    /// Streaming: as long as it takes (backpressure), unless the service shuts down.
    UntilRoom,
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<RecordHitsResponse, Status>> + Send>>;

impl IngestService {
    async fn enqueue(&self, hits: Vec<ValidHit>, wait: Wait) -> Result<(), IngestError> {
        let weight = hits.len();
        let sent = match wait {
            Wait::AtMost(timeout) => self.hits.send_weighted_timeout(hits, weight, timeout).await,
            Wait::UntilRoom => tokio::select! {
                sent = self.hits.send_weighted(hits, weight) => sent,
                _ = self.shutdown.cancelled() => return Err(IngestError::ShuttingDown),
            },
        };
        match sent {
            Ok(()) => Ok(()),
            Err(SendError::Full { .. }) => Err(IngestError::BufferFull),
            Err(SendError::Closed { .. }) => Err(IngestError::ShuttingDown),
        }
    }

    /// Records one batch: dedup, validate, enqueue. Returns the response to send.
    async fn record_batch(
        &self,
        hits: Vec<Hit>,
        batch_id: String,
        wait: Wait,
    ) -> Result<RecordHitsResponse, IngestError> {
        let offered = hits.len() as u64;
        let result = async {
            validate::batch_id(&batch_id)?;
            let claim = if batch_id.is_empty() {
                None
            } else {
                let claim = match wait {
                    Wait::AtMost(timeout) => {
                        tokio::time::timeout(timeout, self.ledger.claim(&batch_id))
                            .await
                            .map_err(|_| IngestError::BatchInFlight)?
                    }
                    Wait::UntilRoom => self.ledger.claim(&batch_id).await,
                };
                match claim {
                    Ok(Claim::Duplicate(accepted)) => {
                        metrics::counter!("hitcounter_ingest_duplicate_batches_total").increment(1);
                        return Ok(RecordHitsResponse {
                            accepted,
                            duplicate: true,
                            batch_id: batch_id.clone(),
                        });
                    }
                    Ok(Claim::New(guard)) => Some(guard),
                    Err(_) => return Err(IngestError::LedgerFull),
                }
            };
            let (valid, accepted) = validate::batch(hits, validate::now_ms(), self.rules)?;
            self.enqueue(valid, wait).await?;
            if let Some(guard) = claim {
                guard.complete(accepted);
            }
            metrics::counter!("hitcounter_ingest_hits_accepted_total").increment(accepted);
            Ok(RecordHitsResponse {
                accepted,
                duplicate: false,
                batch_id: batch_id.clone(),
            })
        }
        .await;
        if let Err(error) = &result {
            count_rejected(error, offered);
        }
        result
    }
}

fn count_rejected(error: &IngestError, hits: u64) {
    metrics::counter!("hitcounter_ingest_hits_rejected_total", "reason" => error.reason())
        .increment(hits);
}

#[tonic::async_trait]
impl Ingest for IngestService {
    async fn record_hit(
        &self,
        request: Request<RecordHitRequest>,
    ) -> Result<Response<RecordHitResponse>, Status> {
        rpc::observe("ingest", "RecordHit", async {
            let request = request.into_inner();
            let result = async {
                let hit = validate::hit(
                    None,
                    request.key,
                    request.timestamp_ms,
                    request.count,
                    validate::now_ms(),
                    self.rules,
                )?;
                let accepted = hit.count;
                self.enqueue(vec![hit], Wait::AtMost(self.enqueue_timeout))
                    .await?;
                metrics::counter!("hitcounter_ingest_hits_accepted_total").increment(accepted);
                Ok(accepted)
            }
            .await;
            match result {
                Ok(accepted) => Ok(Response::new(RecordHitResponse { accepted })),
                Err(error) => {
                    count_rejected(&error, 1);
                    Err(Status::from(error))
                }
            }
        })
        .await
    }

    async fn record_hits(
        &self,
        request: Request<RecordHitsRequest>,
    ) -> Result<Response<RecordHitsResponse>, Status> {
        rpc::observe("ingest", "RecordHits", async {
            let request = request.into_inner();
            let response = self
                .record_batch(
                    request.hits,
                    request.batch_id,
                    Wait::AtMost(self.enqueue_timeout),
                )
                .await?;
            Ok(Response::new(response))
        })
        .await
    }

    type StreamHitsStream = ResponseStream;

    async fn stream_hits(
        &self,
        request: Request<Streaming<RecordHitsRequest>>,
    ) -> Result<Response<Self::StreamHitsStream>, Status> {
        let mut requests = request.into_inner();
        let (responses_tx, responses_rx) =
            hitcounter_pipeline::channel("ingest_stream_responses", self.stream_response_capacity);
        let service = self.clone();
        tokio::spawn(
            async move {
                let mut index = 0u64;
                loop {
                    let started = std::time::Instant::now();
                    let next = tokio::select! {
                        // Stop reading on shutdown; what was acknowledged is already queued.
                        _ = service.shutdown.cancelled() => break,
                        next = requests.message() => next,
                    };
                    let request = match next {
                        Ok(Some(request)) => request,
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(%status, "hit stream broke");
                            break;
                        }
                    };
                    let response = service
                        .record_batch(request.hits, request.batch_id, Wait::UntilRoom)
                        .await
                        .map_err(|error| {
                            // Ends the stream: the responses received so far tell the client
                            // which batches were counted.
                            let status = Status::from(error);
                            Status::new(
                                status.code(),
                                format!("request #{index} of this stream: {}", status.message()),
                            )
                        });
                    rpc::record("ingest", "StreamHits.batch", &response, started);
                    let failed = response.is_err();
                    // A full response channel (client not reading) stops us reading too.
                    if responses_tx.send(response).await.is_err() || failed {
                        break;
                    }
                    index += 1;
                }
            }
            .instrument(tracing::debug_span!("stream_hits")),
        );
        Ok(Response::new(responses_rx.into_stream().boxed()))
    }
}
