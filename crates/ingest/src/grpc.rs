//! The gRPC edge of ingest: the public `hitcounter.v1.Ingest` service.
//!
//! Every call runs the same steps: check the caller's role and key scope (the principal the
//! authentication layer attached), claim the batch id (if any) in the ledger, validate every
//! hit, take the hits from the caller's quota and the global limit, enqueue the batch on the
//! bounded hits channel, complete the claim, answer. The scope is checked before the ledger so
//! that a caller without the right learns nothing about batch ids; the quota after validation,
//! since it counts hits by their counts, and after the ledger, since a retried batch counts
//! nothing. A hit is acknowledged once it is in the pipeline. Unary calls wait at most the enqueue timeout for
//! room and then get `RESOURCE_EXHAUSTED`; `StreamHits` waits as long as it takes and, while it
//! waits, stops reading its stream, so HTTP/2 flow control slows the client down.

use std::{pin::Pin, sync::Arc, time::Duration};

use futures::{Stream, StreamExt};
use hitcounter_auth::{principal_of, Principal};
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
    ledger::{BatchLedger, Claim, ClaimGuard},
    stages::{Claimed, DurableError, Pending},
    validate::{self, TimeRules, ValidHit},
};

/// Implements the public ingest API.
#[derive(Clone)]
pub(crate) struct IngestService {
    pub(crate) hits: StageSender<Pending>,
    pub(crate) ledger: Arc<BatchLedger>,
    pub(crate) rules: TimeRules,
    pub(crate) enqueue_timeout: Duration,
    pub(crate) stream_response_capacity: usize,
    pub(crate) stream_window: usize,
    pub(crate) shutdown: CancellationToken,
}

/// What became of an enqueued request's hits.
enum Stored {
    /// Durable; counted.
    New,
    /// Clustered mode: its batch id was stored before through another ingest instance, with
    /// this many hits; nothing stored again.
    Duplicate(u64),
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
    /// Hands `hits` to the pipeline and waits until they are durable in the log.
    async fn enqueue(
        &self,
        hits: Vec<ValidHit>,
        batch_id: Option<Claimed>,
        wait: Wait,
    ) -> Result<Stored, IngestError> {
        let weight = hits.len();
        let (done, durable) = tokio::sync::oneshot::channel();
        let pending = Pending {
            hits,
            done,
            batch_id,
        };
        let sent = match wait {
            Wait::AtMost(timeout) => {
                self.hits
                    .send_weighted_timeout(pending, weight, timeout)
                    .await
            }
            Wait::UntilRoom => tokio::select! {
                sent = self.hits.send_weighted(pending, weight) => sent,
                _ = self.shutdown.cancelled() => return Err(IngestError::ShuttingDown),
            },
        };
        match sent {
            Ok(()) => {}
            Err(SendError::Full { .. }) => return Err(IngestError::BufferFull),
            Err(SendError::Closed { .. }) => return Err(IngestError::ShuttingDown),
        }
        // Once enqueued the hits are on their way to the disk; the answer comes from the log
        // stage (within the combine interval plus one fsync).
        match durable.await {
            Ok(Ok(())) => Ok(Stored::New),
            Ok(Err(DurableError::Duplicate { accepted })) => Ok(Stored::Duplicate(accepted)),
            Ok(Err(DurableError::Full { .. })) => Err(IngestError::LogFull),
            Ok(Err(DurableError::KeyLimit(why))) => Err(IngestError::AggregatorKeyLimit(why)),
            Ok(Err(error @ DurableError::DiskFull(_))) => {
                Err(IngestError::DiskFull(error.to_string()))
            }
            Ok(Err(DurableError::Io(message))) => Err(IngestError::Log(message)),
            Ok(Err(DurableError::ClusterFull)) => Err(IngestError::ClusterLogFull),
            Ok(Err(DurableError::Cluster(message))) => Err(IngestError::ClusterLog(message)),
            Err(_) => Err(IngestError::ShuttingDown),
        }
    }

    /// First half of recording a batch, done in request order: check the id, claim it in the
    /// ledger, validate every hit. Nothing is enqueued yet, so a failure here counts nothing.
    async fn prepare(
        &self,
        principal: &Principal,
        hits: Vec<Hit>,
        batch_id: String,
        wait: Wait,
    ) -> Result<Prepared, IngestError> {
        let offered = hits.len() as u64;
        let result = async {
            validate::batch_id(&batch_id)?;
            principal.may_write("hits", hits.iter().map(|hit| hit.key.as_str()))?;
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
                        return Ok(Prepared::Answered(RecordHitsResponse {
                            accepted,
                            duplicate: true,
                            batch_id,
                        }));
                    }
                    Ok(Claim::New(guard)) => Some(guard),
                    Err(_) => return Err(IngestError::LedgerFull),
                }
            };
            let (hits, accepted) = validate::batch(hits, validate::now_ms(), self.rules)?;
            self.take_quota(principal, accepted, wait).await?;
            Ok(Prepared::Valid {
                hits,
                accepted,
                claim,
                batch_id,
            })
        }
        .await;
        if let Err(error) = &result {
            count_rejected(error, offered);
        }
        result
    }

    /// Takes `hits` from the caller's quota and the global limit: a unary call over either is
    /// refused with when it would fit; a stream waits until it fits.
    async fn take_quota(
        &self,
        principal: &Principal,
        hits: u64,
        wait: Wait,
    ) -> Result<(), IngestError> {
        match wait {
            Wait::AtMost(_) => Ok(principal.take_hits(hits)?),
            Wait::UntilRoom => tokio::select! {
                taken = principal.take_hits_waiting(hits) => Ok(taken?),
                _ = self.shutdown.cancelled() => Err(IngestError::ShuttingDown),
            },
        }
    }

    /// Second half: enqueue and wait until the hits are durable, then complete the claim.
    async fn commit(
        &self,
        prepared: Prepared,
        wait: Wait,
    ) -> Result<RecordHitsResponse, IngestError> {
        let (hits, accepted, claim, batch_id) = match prepared {
            Prepared::Answered(response) => return Ok(response),
            Prepared::Valid {
                hits,
                accepted,
                claim,
                batch_id,
            } => (hits, accepted, claim, batch_id),
        };
        let offered = hits.len() as u64;
        let claimed = claim.map(|guard| Claimed { guard, accepted });
        match self.enqueue(hits, claimed, wait).await {
            Ok(Stored::New) => {}
            Ok(Stored::Duplicate(accepted)) => {
                // Clustered mode: another ingest instance stored this batch id first.
                metrics::counter!("hitcounter_ingest_duplicate_batches_total").increment(1);
                return Ok(RecordHitsResponse {
                    accepted,
                    duplicate: true,
                    batch_id,
                });
            }
            Err(error) => {
                // A refused request drops its claim with it, which releases the id for a
                // retry; an accepted one had its claim completed by the log stage.
                count_rejected(&error, offered);
                return Err(error);
            }
        }
        metrics::counter!("hitcounter_ingest_hits_accepted_total").increment(accepted);
        Ok(RecordHitsResponse {
            accepted,
            duplicate: false,
            batch_id,
        })
    }
}

/// A batch that passed [`IngestService::prepare`].
enum Prepared {
    /// Nothing to record (a known batch id): this is the answer.
    Answered(RecordHitsResponse),
    /// Valid hits to record.
    Valid {
        hits: Vec<ValidHit>,
        accepted: u64,
        claim: Option<ClaimGuard>,
        batch_id: String,
    },
}

impl IngestService {
    /// Serves one `StreamHits` stream. Requests are read, claimed and validated in order; up to
    /// `stream_window` of them then wait for the disk at once (so one stream is not limited to
    /// one fsync per request), and their responses go out in request order. An invalid request
    /// ends the stream with its status after the responses of the requests before it; nothing
    /// after it was enqueued. A failure while waiting for the disk (log full, shutting down) also
    /// ends the stream; requests after that one may then have been counted without an answer,
    /// as with any broken stream: give batches a `batch_id` to retry them safely.
    async fn run_stream(
        &self,
        principal: Principal,
        mut requests: Streaming<RecordHitsRequest>,
        responses: StageSender<Result<RecordHitsResponse, Status>>,
    ) {
        let numbered = |index: u64, error: IngestError| {
            let status = Status::from(error);
            Status::new(
                status.code(),
                format!("request #{index} of this stream: {}", status.message()),
            )
        };
        let mut window = futures::stream::FuturesOrdered::new();
        let mut reading = true;
        let mut ending: Option<Status> = None;
        let mut index = 0u64;
        // Sends one finished request's answer; false when the stream must end.
        let answer = |(i, started, result): (
            u64,
            std::time::Instant,
            Result<RecordHitsResponse, IngestError>,
        )| {
            let response = result.map_err(|e| numbered(i, e));
            rpc::record("ingest", "StreamHits.batch", &response, started);
            let failed = response.is_err();
            let responses = responses.clone();
            async move {
                // A full response channel (client not reading) stops us reading too.
                responses.send(response).await.is_ok() && !failed
            }
        };
        loop {
            if !reading && window.is_empty() {
                break;
            }
            tokio::select! {
                biased;
                done = window.next(), if !window.is_empty() => {
                    let Some(done) = done else { continue };
                    if !answer(done).await {
                        return;
                    }
                }
                next = requests.message(), if reading && window.len() < self.stream_window => {
                    let request = match next {
                        Ok(Some(request)) => request,
                        Ok(None) => { reading = false; continue; }
                        // A request that does not decode (e.g. a key that is not UTF-8) is
                        // invalid like any other: it ends the stream with its status and index.
                        Err(status) if status.code() == tonic::Code::InvalidArgument => {
                            ending = Some(Status::invalid_argument(format!(
                                "request #{index} of this stream: {}",
                                status.message()
                            )));
                            reading = false;
                            continue;
                        }
                        Err(status) => {
                            tracing::debug!(%status, "hit stream broke");
                            reading = false;
                            continue;
                        }
                    };
                    // A batch id still in flight in this very window would wait for an answer
                    // that only this loop can produce: finish the window first.
                    if !request.batch_id.is_empty() && self.ledger.is_pending(&request.batch_id) {
                        while let Some(done) = window.next().await {
                            if !answer(done).await {
                                return;
                            }
                        }
                    }
                    let started = std::time::Instant::now();
                    // Preparing may wait (for the ledger, or for the caller's quota): answer the
                    // requests already in the window meanwhile, so their acks are not held back.
                    let prepare =
                        self.prepare(&principal, request.hits, request.batch_id, Wait::UntilRoom);
                    tokio::pin!(prepare);
                    let prepared = loop {
                        tokio::select! {
                            biased;
                            prepared = &mut prepare => break prepared,
                            Some(done) = window.next(), if !window.is_empty() => {
                                if !answer(done).await {
                                    return;
                                }
                            }
                        }
                    };
                    match prepared {
                        Ok(prepared) => {
                            let i = index;
                            window.push_back(async move {
                                (i, started, self.commit(prepared, Wait::UntilRoom).await)
                            });
                            index += 1;
                        }
                        Err(error) => {
                            ending = Some(numbered(index, error));
                            reading = false;
                        }
                    }
                }
                // Stop reading on shutdown; what is in the window still gets its answer, then
                // the stream ends with UNAVAILABLE naming the first request not read, so that a
                // client still sending learns to resend the rest elsewhere (a clean end would
                // read as "all answered").
                _ = self.shutdown.cancelled(), if reading => {
                    reading = false;
                    ending = Some(numbered(index, IngestError::ShuttingDown));
                }
            }
        }
        if let Some(status) = ending {
            let _ = responses.send(Err(status)).await;
        }
    }
}

fn count_rejected(error: &IngestError, hits: u64) {
    metrics::counter!("hitcounter_ingest_hits_rejected_total", "reason" => error.reason())
        .increment(hits);
    if let IngestError::Refused(refusal) = error {
        hitcounter_auth::metrics::rejected_hits(refusal.reason(), &refusal.token, hits);
    }
}

#[tonic::async_trait]
impl Ingest for IngestService {
    async fn record_hit(
        &self,
        request: Request<RecordHitRequest>,
    ) -> Result<Response<RecordHitResponse>, Status> {
        rpc::observe("ingest", "RecordHit", async {
            let principal = principal_of(&request)?;
            let request = request.into_inner();
            let result = async {
                principal.may_write("key", [request.key.as_str()])?;
                let hit = validate::hit(
                    None,
                    request.key,
                    request.timestamp_ms,
                    request.count,
                    validate::now_ms(),
                    self.rules,
                )?;
                let accepted = hit.count;
                principal.take_hits(accepted)?;
                self.enqueue(vec![hit], None, Wait::AtMost(self.enqueue_timeout))
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
            let principal = principal_of(&request)?;
            let request = request.into_inner();
            let wait = Wait::AtMost(self.enqueue_timeout);
            let prepared = self
                .prepare(&principal, request.hits, request.batch_id, wait)
                .await?;
            Ok(Response::new(self.commit(prepared, wait).await?))
        })
        .await
    }

    type StreamHitsStream = ResponseStream;

    async fn stream_hits(
        &self,
        request: Request<Streaming<RecordHitsRequest>>,
    ) -> Result<Response<Self::StreamHitsStream>, Status> {
        let principal = principal_of(&request)?;
        let requests = request.into_inner();
        let (responses_tx, responses_rx) =
            hitcounter_pipeline::channel("ingest_stream_responses", self.stream_response_capacity);
        let service = self.clone();
        tokio::spawn(
            async move {
                service.run_stream(principal, requests, responses_tx).await;
            }
            .instrument(tracing::debug_span!("stream_hits")),
        );
        Ok(Response::new(responses_rx.into_stream().boxed()))
    }
}
