//! The `Apply` link: a tower `Service` that sends one delta batch over a long-lived gRPC stream
//! to an aggregator and resolves when that batch's ack comes back.
//!
//! One bidirectional `Apply` stream per shard carries every batch, so a batch costs one HTTP/2
//! DATA frame instead of a whole RPC. Acks are matched to batches by sequence number. When the
//! stream breaks, every batch waiting for an ack fails with `UNAVAILABLE` and the next call opens
//! a new stream; the client stack around this service retries, and the aggregator applies a
//! resent (producer, seq) only once.
//!
//! Batches travel pre-encoded ([`EncodedBatch`], see `encoded.rs`): the stream is opened with
//! tonic's generic client and [`ApplyCodec`] instead of the generated stub, whose codec would
//! want an `ApplyRequest` message (and a deep copy of it per attempt).

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use hitcounter_pipeline::StageSender;
use hitcounter_proto::aggregator::v1::ApplyResponse;
use tokio::sync::oneshot;
use tonic::{
    client::Grpc, codegen::http::uri::PathAndQuery, transport::Channel, Status, Streaming,
};

use super::encoded::{ApplyCodec, EncodedBatch};

/// The method the stream calls.
const APPLY_PATH: &str = "/hitcounter.aggregator.v1.Aggregator/Apply";

type AckSender = oneshot::Sender<Result<ApplyResponse, Status>>;

/// Sends batches on the shard's current `Apply` stream, opening one when needed.
#[derive(Clone)]
pub(crate) struct ApplyLink {
    client: Grpc<Channel>,
    session: Arc<tokio::sync::Mutex<Option<Arc<Session>>>>,
    capacity: usize,
}

/// One open `Apply` stream.
struct Session {
    requests: StageSender<Bytes>,
    pending: Mutex<HashMap<u64, AckSender>>,
    closed: AtomicBool,
}

impl Session {
    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, AckSender>> {
        // Only inserts and removes happen under this lock; a poisoned map is still usable.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the stream dead and fails every batch still waiting for its ack.
    fn close(&self, why: &str) {
        self.closed.store(true, Ordering::Release);
        self.requests.close();
        for (_, ack) in self.pending().drain() {
            let _ = ack.send(Err(Status::unavailable(format!("apply stream: {why}"))));
        }
    }
}

/// Removes a batch's ack slot when its call ends early (timeout, cancellation).
struct PendingSlot<'a> {
    session: &'a Session,
    seq: u64,
}

impl Drop for PendingSlot<'_> {
    fn drop(&mut self) {
        self.session.pending().remove(&self.seq);
    }
}

impl ApplyLink {
    /// A link over `channel`; `capacity` batches may be queued on the stream.
    pub(crate) fn new(channel: Channel, max_message_bytes: usize, capacity: usize) -> Self {
        Self {
            client: Grpc::new(channel)
                .max_encoding_message_size(max_message_bytes)
                .max_decoding_message_size(max_message_bytes),
            session: Arc::new(tokio::sync::Mutex::new(None)),
            capacity: capacity.max(1),
        }
    }

    async fn session(&self) -> Result<Arc<Session>, Status> {
        let mut slot = self.session.lock().await;
        if let Some(session) = slot.as_ref() {
            if !session.closed.load(Ordering::Acquire) {
                return Ok(Arc::clone(session));
            }
        }
        let (requests, outbound) =
            hitcounter_pipeline::channel("ingest_apply_stream", self.capacity);
        let mut client = self.client.clone();
        client
            .ready()
            .await
            .map_err(|e| Status::unavailable(format!("aggregator not ready: {e}")))?;
        let acks = client
            .streaming(
                tonic::Request::new(outbound.into_stream()),
                PathAndQuery::from_static(APPLY_PATH),
                ApplyCodec,
            )
            .await?
            .into_inner();
        let session = Arc::new(Session {
            requests,
            pending: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
        });
        tokio::spawn(read_acks(Arc::clone(&session), acks));
        tracing::debug!("apply stream opened");
        *slot = Some(Arc::clone(&session));
        Ok(session)
    }

    /// Ends the current stream, if any, so the aggregator sees a clean end of stream.
    pub(crate) async fn close(&self) {
        if let Some(session) = self.session.lock().await.take() {
            session.close("closed by ingest");
        }
    }

    async fn send(self, batch: EncodedBatch) -> Result<ApplyResponse, Status> {
        let session = self.session().await?;
        let (ack_tx, ack_rx) = oneshot::channel();
        let seq = batch.seq;
        session.pending().insert(seq, ack_tx);
        let _slot = PendingSlot {
            session: &session,
            seq,
        };
        // The bytes are shared (reference counted) with the retry layer's copy.
        if session.requests.send(batch.bytes).await.is_err() {
            return Err(Status::unavailable("apply stream closed"));
        }
        match ack_rx.await {
            Ok(ack) => ack,
            Err(_) => Err(Status::unavailable("apply stream closed before the ack")),
        }
    }
}

async fn read_acks(session: Arc<Session>, mut acks: Streaming<ApplyResponse>) {
    let why = loop {
        match acks.message().await {
            Ok(Some(ack)) => {
                if let Some(waiting) = session.pending().remove(&ack.seq) {
                    let _ = waiting.send(Ok(ack));
                }
            }
            Ok(None) => break "ended by the aggregator".to_owned(),
            Err(status) => break status.message().to_owned(),
        }
    };
    tracing::debug!(%why, "apply stream closed");
    session.close(&why);
}

impl tower::Service<EncodedBatch> for ApplyLink {
    type Response = ApplyResponse;
    type Error = Status;
    type Future = Pin<Box<dyn Future<Output = Result<ApplyResponse, Status>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        // Readiness is decided by the stack's concurrency limit; the stream itself queues.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, batch: EncodedBatch) -> Self::Future {
        Box::pin(self.clone().send(batch))
    }
}
