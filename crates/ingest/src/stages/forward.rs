//! The `forward` stage: one per aggregator shard, it delivers that shard's delta batches.
//!
//! Each batch gets the next sequence number of this ingest process (its producer id is random
//! per process) and goes through the client stack (concurrency limit, retry budget, circuit
//! breaker, timeout) to the [`ApplyLink`](super::link::ApplyLink). Up to `concurrency` batches
//! are in flight at once. A batch whose hits were acknowledged to a client must not be dropped,
//! so a failed delivery is retried with capped backoff for as long as it takes (while the
//! breaker is open each attempt fails at once, cheaply), until the aggregator is back. Only when
//! the drain deadline of a shutdown passes does the stage give up, and then it logs and counts
//! exactly what it dropped.
//!
//! While deliveries stall, this stage stops taking batches, the forward channel fills, `combine`
//! waits, and the bounded hits buffer fills: memory stays bounded and callers see backpressure.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use futures::StreamExt;
use hitcounter_pipeline::StageReceiver;
use hitcounter_proto::aggregator::v1::{ApplyRequest, ApplyResponse, Delta};
use hitcounter_stack::{ClientStack, StackError};
use hitcounter_telemetry::CancellationToken;
use tower::ServiceExt;

/// Longest pause between two delivery attempts of one batch.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// What one forwarder needs.
pub(crate) struct Forwarder {
    pub(crate) shard: usize,
    pub(crate) producer_id: u64,
    pub(crate) stack: ClientStack<Arc<ApplyRequest>, ApplyResponse>,
    pub(crate) concurrency: usize,
    /// Cancelled when the drain deadline passes: stop retrying and drop what is left.
    pub(crate) abandon: CancellationToken,
}

impl Forwarder {
    /// Runs until the forward channel is closed and every batch taken from it is delivered (or
    /// abandoned at the drain deadline).
    pub(crate) async fn run(self, batches: StageReceiver<Vec<Delta>>) {
        // Sequence numbers start at 1: the aggregator tracks "applied through N" from 0.
        let next_seq = AtomicU64::new(1);
        let in_flight = metrics::gauge!(
            "hitcounter_ingest_forward_in_flight",
            "shard" => self.shard.to_string()
        );
        let this = &self;
        batches
            .into_stream()
            .for_each_concurrent(self.concurrency.max(1), |deltas| {
                let seq = next_seq.fetch_add(1, Ordering::Relaxed);
                let in_flight = in_flight.clone();
                async move {
                    in_flight.increment(1.0);
                    this.deliver(seq, deltas).await;
                    in_flight.decrement(1.0);
                }
            })
            .await;
        tracing::debug!(shard = self.shard, "forward drained");
    }

    async fn deliver(&self, seq: u64, deltas: Vec<Delta>) {
        let hits: u64 = deltas.iter().map(|d| d.count).sum();
        let batch = Arc::new(ApplyRequest {
            producer_id: self.producer_id,
            seq,
            deltas,
        });
        let shard = self.shard.to_string();
        let mut backoff = Duration::from_millis(10);
        let mut attempt = 0u64;
        loop {
            attempt += 1;
            let result = self.stack.clone().oneshot(Arc::clone(&batch)).await;
            match result {
                Ok(ack) => {
                    if ack.duplicate && attempt == 1 {
                        // A first attempt can only be a duplicate if another producer shares
                        // our id: that would silently drop hits, so say it loudly.
                        tracing::error!(
                            shard = self.shard,
                            seq,
                            "aggregator reported a first delivery as a duplicate"
                        );
                        metrics::counter!("hitcounter_ingest_unexpected_duplicates_total")
                            .increment(1);
                    }
                    metrics::counter!("hitcounter_ingest_forwarded_hits_total", "shard" => shard.clone())
                        .increment(hits);
                    if ack.dropped > 0 {
                        metrics::counter!("hitcounter_ingest_deltas_dropped_total", "reason" => "aggregator_key_limit")
                            .increment(ack.dropped);
                        tracing::error!(
                            shard = self.shard,
                            dropped = ack.dropped,
                            "aggregator at its key limit dropped deltas"
                        );
                    }
                    if attempt > 1 {
                        tracing::info!(
                            shard = self.shard,
                            seq,
                            attempt,
                            "batch delivered after retries"
                        );
                    }
                    return;
                }
                Err(error) => {
                    metrics::counter!(
                        "hitcounter_ingest_forward_failures_total",
                        "shard" => shard.clone(),
                        "kind" => failure_kind(&error)
                    )
                    .increment(1);
                    if attempt == 1 || attempt % 50 == 0 {
                        tracing::warn!(shard = self.shard, seq, attempt, %error, "delivery to the aggregator failed; retrying");
                    }
                }
            }
            tokio::select! {
                _ = self.abandon.cancelled() => {
                    metrics::counter!("hitcounter_ingest_hits_lost_total").increment(hits);
                    tracing::error!(shard = self.shard, seq, hits, "drain deadline passed: acknowledged hits dropped undelivered");
                    return;
                }
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

fn failure_kind(error: &StackError) -> &'static str {
    match error {
        StackError::CircuitOpen => "circuit_open",
        StackError::Timeout(_) => "timeout",
        StackError::Status(_) => "status",
        StackError::Other(_) | StackError::BadAddress { .. } => "other",
    }
}
