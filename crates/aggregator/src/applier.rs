//! Applying delta batches exactly once: the domain logic behind the aggregator's `Apply` RPC,
//! kept out of the gRPC edge so that any source of batches (the `Apply` stream today, a log
//! consumer in clustered mode) applies them the same way.
//!
//! A batch is identified by (producer, seq). [`Applier::apply`] skips a resend
//! ([`AppliedBatches`]), applies the rest through the owners, and answers with what the producer
//! may trim (`durable_through`, from the newest checkpoint). Applies hold the apply gate shared;
//! a checkpoint holds it exclusively for the instant it copies the stores and the progress, so a
//! checkpoint never contains half a batch.
//!
//! A batch whose new keys do not fit under `--max-keys` is refused whole
//! ([`AggregatorError::KeyLimit`], see "The key limit" in the `owners` module): nothing of it is
//! applied and it is not recorded as applied, so the same batch sent again later (once keys age
//! out of the retention, or after a restart with a higher limit) is applied then, once. Every
//! caller must treat that outcome as "not now": keep the batch and retry it, never skip it. The
//! `Apply` stream answers it with an ack carrying `key_limit_refusal` (the stream stays open),
//! ingest's forwarder retries with backoff, and its log keeps the backlog meanwhile.

use std::collections::HashMap;

use hitcounter_proto::aggregator::v1::{ApplyRequest, ApplyResponse};

use crate::{
    dedup::AppliedBatches,
    error::{AggregatorError, KeyLimitRefusal},
    owners::Owners,
};

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
    /// Clustered mode: per hosted partition, the stream position applied through (see
    /// `consume`). Empty on one machine.
    pub(crate) positions: std::sync::Mutex<std::collections::BTreeMap<u32, u64>>,
}

impl Applier {
    pub(crate) fn durable_through(&self, producer: u64) -> u64 {
        let durable = self.durable.lock().unwrap_or_else(|e| e.into_inner());
        durable.get(&producer).copied().unwrap_or(0)
    }

    /// Applies one batch unless it is a resend; returns its ack.
    ///
    /// # Errors
    /// [`AggregatorError::KeyLimit`]: the batch was refused whole at the key limit (not applied,
    /// not recorded): retry the same batch later. [`AggregatorError::OwnerStopped`]: shutting
    /// down (not recorded as applied either).
    pub(crate) async fn apply(
        &self,
        batch: ApplyRequest,
    ) -> Result<ApplyResponse, AggregatorError> {
        let _applying = self.gate.read().await;
        let tick = crate::clock::now_second() as u64;
        let (producer, seq) = (batch.producer_id, batch.seq);
        let ack = |duplicate, dropped| ApplyResponse {
            seq,
            duplicate,
            dropped,
            durable_through: self.durable_through(producer),
            incarnation: self.incarnation,
            key_limit_refusal: String::new(),
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
                if matches!(error, AggregatorError::KeyLimit(_)) {
                    metrics::counter!("hitcounter_aggregator_batches_total", "outcome" => "refused_key_limit")
                        .increment(1);
                }
                return Err(error);
            }
        };
        metrics::counter!("hitcounter_aggregator_batches_total", "outcome" => "applied")
            .increment(1);
        Ok(ack(false, dropped))
    }

    /// The ack of a batch refused at the key limit: neither applied nor a duplicate, with the
    /// reason for operators; the producer keeps the batch and sends it again.
    pub(crate) fn refusal_ack(
        &self,
        producer: u64,
        seq: u64,
        refusal: &KeyLimitRefusal,
    ) -> ApplyResponse {
        ApplyResponse {
            seq,
            duplicate: false,
            dropped: 0,
            durable_through: self.durable_through(producer),
            incarnation: self.incarnation,
            key_limit_refusal: refusal.to_string(),
        }
    }
}
