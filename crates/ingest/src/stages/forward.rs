//! The `forward` stage: one per aggregator shard, it delivers that shard's log to the aggregator.
//!
//! The forwarder reads the ingest log from the oldest record still held, up to the last seq the
//! `log` stage has on disk, takes its shard's deltas out of each record, and sends them as one
//! batch (sequence number = log seq, producer id = this ingest's persistent id + shard) through
//! the client stack (concurrency limit, retry budget, circuit breaker, timeout) to the
//! [`ApplyLink`](super::link::ApplyLink). A record with nothing for this shard is still sent,
//! empty, so that the aggregator sees every seq and its "applied through" watermark advances.
//! Up to `concurrency` batches are in flight at once.
//!
//! At start the forwarder first asks (a probe) what the aggregator already holds durably of this
//! producer and starts after it: the log is trimmed by whole segments, so after a restart it
//! still holds records the aggregator's checkpoint has.
//!
//! Acks carry the aggregator's `durable_through` (what its newest checkpoint holds), which the
//! forwarder publishes so the log stage can trim, and its `incarnation`. A new incarnation means
//! the aggregator restarted from its checkpoint and lost what it applied after it: the forwarder
//! rewinds to the new `durable_through + 1` and sends those batches again (the aggregator
//! applies each (producer, seq) once, so batches it does have are acknowledged as duplicates).
//! If the aggregator came back holding *less* than it had reported durable (its data directory
//! or checkpoint lost, or it forgot this producer), the forwarder lowers what it publishes to
//! what the aggregator now holds, so the log keeps the records being resent, and resends every
//! record the log still holds after it.
//!
//! Every batch (and probe) also says which seq the log starts at (`first_kept_seq`): the records
//! before it were trimmed and will never be sent again. An aggregator that holds less than that
//! of this producer reports those batches as lost and moves on, instead of waiting below a gap
//! that can never fill (which used to stop it from ever reporting anything durable again, so
//! ingest stopped trimming and, once the log budget was full, refused every write).
//!
//! An aggregator at its key limit refuses a batch whose new keys do not fit, whole (the ack
//! carries `key_limit_refusal`; nothing of the batch was applied). That is treated like an
//! unavailable aggregator: the batch is retried with the same backoff, the log keeps it and
//! everything after it, and once the log reaches its budget clients get `RESOURCE_EXHAUSTED`
//! "aggregator key limit reached on shard N: …" (the reason is shared with the log stage
//! through [`KeyLimits`]). When keys age out of the aggregator's retention, or it restarts with
//! a higher limit, the retry goes through and the backlog drains. Shown by
//! `hitcounter_ingest_aggregator_key_limit_reached{shard}` (1 while refused),
//! `hitcounter_ingest_forward_failures_total{kind="key_limit"}` and an error log at most once
//! a minute per shard.
//!
//! A failed delivery is retried with capped backoff for as long as it takes (while the breaker is
//! open each attempt fails at once, cheaply); nothing is ever dropped here, because the log keeps
//! every batch until the aggregator holds it durably. At shutdown the forwarder stops once it has
//! delivered everything on disk, or at the drain deadline: what is left stays in the log and is
//! sent after the next start.

use std::{sync::Arc, time::Duration};

use futures::{stream::FuturesUnordered, StreamExt};
use hitcounter_proto::aggregator::v1::ApplyResponse;
use hitcounter_stack::{ClientStack, StackError};
use hitcounter_telemetry::CancellationToken;
use hitcounter_wal::LogReader;
use tokio::sync::watch;
use tower::ServiceExt;

use super::{
    encoded::EncodedBatch,
    log::{lock, KeyLimits, SharedLogs},
};
use crate::error::IngestError;

/// Longest pause between two delivery attempts of one batch.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How often an idle forwarder asks the aggregator for its durable progress.
const PROBE_EVERY: Duration = Duration::from_millis(500);
/// Records read from the log per blocking read.
const READ_CHUNK: usize = 64;

/// What one forwarder needs.
pub(crate) struct Forwarder {
    pub(crate) shard: usize,
    pub(crate) producer_id: u64,
    pub(crate) stack: ClientStack<EncodedBatch, ApplyResponse>,
    pub(crate) concurrency: usize,
    pub(crate) logs: SharedLogs,
    /// The last seq of the ingest log that is on disk.
    pub(crate) written: watch::Receiver<u64>,
    /// Where this forwarder publishes what the aggregator holds durably.
    pub(crate) durable: watch::Sender<u64>,
    /// Cancelled when the drain deadline passes: stop, leaving the rest in the log.
    pub(crate) abandon: CancellationToken,
    /// Where this forwarder says that its aggregator refuses batches at its key limit.
    pub(crate) key_limits: Arc<KeyLimits>,
}

impl Forwarder {
    /// A reader from `from`, or from the oldest record held if that is later; and the oldest
    /// seq the log holds.
    async fn open_reader(&self, from: u64) -> Result<(LogReader, u64), IngestError> {
        let logs = Arc::clone(&self.logs);
        tokio::task::spawn_blocking(move || {
            let logs = lock(&logs);
            let log = &logs.main;
            // Never before the oldest record held (the rest was trimmed).
            let first = log.first_seq();
            log.reader(from.max(first)).map(|reader| (reader, first))
        })
        .await
        .map_err(|e| IngestError::Log(e.to_string()))?
        .map_err(|e| IngestError::Log(e.to_string()))
    }

    /// Reads up to [`READ_CHUNK`] records up to seq `up_to`; also the oldest seq the log holds,
    /// when the log is not busy (it is only a hint for the aggregator: never wait for it).
    #[allow(clippy::type_complexity)]
    async fn read(
        &self,
        mut reader: LogReader,
        up_to: u64,
    ) -> Result<(LogReader, Vec<(u64, Vec<u8>)>, Option<u64>), IngestError> {
        let logs = Arc::clone(&self.logs);
        tokio::task::spawn_blocking(move || {
            let first_kept = logs.try_lock().ok().map(|logs| logs.main.first_seq());
            let mut records = Vec::new();
            while records.len() < READ_CHUNK {
                match reader.next(up_to)? {
                    Some(record) => records.push(record),
                    None => break,
                }
            }
            Ok((reader, records, first_kept))
        })
        .await
        .map_err(|e| IngestError::Log(e.to_string()))?
        .map_err(|e: hitcounter_wal::LogError| IngestError::Log(e.to_string()))
    }

    /// Runs until the log stage is done and everything on disk is delivered, or until the drain
    /// deadline.
    pub(crate) async fn run(self) -> Result<(), IngestError> {
        // A local handle: the deliveries in flight borrow `self` while we wait on it.
        let mut written = self.written.clone();
        let first = {
            let logs = lock(&self.logs);
            logs.main.first_seq()
        };
        let (opened, mut first_kept) = self.open_reader(first).await?;
        let mut reader = Some(opened);
        let mut next = first_kept;
        let mut durable = first.saturating_sub(1);
        let mut incarnation: Option<u64> = None;
        let mut log_open = true;
        let mut in_flight = FuturesUnordered::new();
        // Seqs being delivered: after a rewind the reader passes them again, and a second
        // delivery of one seq at the same time would collide on the link's ack slot.
        let mut sending = std::collections::HashSet::new();
        // While batches are delivered but not yet durable at the aggregator and nothing else is
        // in flight, a probe (seq 0) asks for its progress: acks are the only way it reports,
        // and an idle forwarder must still learn what to trim and whether the aggregator
        // restarted (and lost batches after its checkpoint).
        let mut probe = tokio::time::interval(PROBE_EVERY);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Before sending anything, ask what the aggregator already holds durably of this
        // producer: the log is trimmed by whole segments, so after any restart (even a clean
        // stop of both) it still holds records the aggregator's checkpoint has, and sending
        // them all again would only have them acknowledged as duplicates.
        let mut asked = false;
        in_flight.push(self.deliver(EncodedBatch::probe(self.producer_id, first_kept)));
        let in_flight_gauge = metrics::gauge!(
            "hitcounter_ingest_forward_in_flight",
            "shard" => self.shard.to_string()
        );
        let backlog_gauge = metrics::gauge!(
            "hitcounter_ingest_forward_backlog_batches",
            "shard" => self.shard.to_string()
        );
        loop {
            let on_disk = *written.borrow_and_update();
            // Fill the window from the log.
            let mut buffered = std::collections::VecDeque::new();
            while asked
                && in_flight.len() + buffered.len() < self.concurrency.max(1)
                && next <= on_disk
            {
                let Some(current) = reader.take() else { break };
                let (current, records, first) = self.read(current, on_disk).await?;
                reader = Some(current);
                if let Some(first) = first {
                    first_kept = first_kept.max(first);
                }
                if records.is_empty() {
                    break;
                }
                for (seq, payload) in records {
                    next = seq + 1;
                    buffered.push_back((seq, payload));
                }
            }
            for (seq, payload) in buffered {
                if !sending.insert(seq) {
                    continue;
                }
                let batch = EncodedBatch::from_record(
                    &payload,
                    self.shard,
                    self.producer_id,
                    seq,
                    first_kept,
                )
                .map_err(|e| IngestError::Log(format!("log record {seq}: {e}")))?;
                in_flight.push(self.deliver(batch));
            }
            in_flight_gauge.set(in_flight.len() as f64);
            backlog_gauge.set(on_disk.saturating_sub(durable) as f64);

            if in_flight.is_empty() && next > on_disk && !log_open {
                break;
            }
            tokio::select! {
                delivered = in_flight.next(), if !in_flight.is_empty() => {
                    let Some(Some(ack)) = delivered else {
                        // Abandoned at the drain deadline.
                        if self.abandon.is_cancelled() { break; }
                        continue;
                    };
                    sending.remove(&ack.seq);
                    if !asked {
                        // The first answer is the start-up probe's: start after what the
                        // aggregator holds durably (never past what is on disk: a producer id
                        // names one log, so it cannot hold more of it than was written).
                        asked = true;
                        let from = ack.durable_through.saturating_add(1).min(on_disk + 1);
                        if from > next {
                            tracing::info!(
                                shard = self.shard,
                                skipped = from - next,
                                from,
                                "the aggregator holds the log's older records durably: sending from here"
                            );
                            let (opened, first) = self.open_reader(from).await?;
                            reader = Some(opened);
                            first_kept = first_kept.max(first);
                            next = from.max(first);
                        }
                    }
                    if ack.durable_through > durable {
                        // Never past our own reader: the log stage trims up to `durable`, and a
                        // reader whose segment is deleted under it could not go on (after a
                        // restart the aggregator can be far ahead of where we read).
                        durable = ack.durable_through.min(on_disk).min(next.saturating_sub(1));
                        self.durable.send_replace(durable);
                    }
                    match incarnation {
                        None => incarnation = Some(ack.incarnation),
                        Some(known) if known != ack.incarnation => {
                            incarnation = Some(ack.incarnation);
                            // The aggregator restarted from its checkpoint: send again what it
                            // may have lost. Its new `durable_through` is where its state ends,
                            // even below what it reported before (its state was lost): the
                            // records after it that the log still holds must all go again.
                            let from = ack.durable_through + 1;
                            tracing::warn!(
                                shard = self.shard,
                                from,
                                to = next.saturating_sub(1),
                                "aggregator restarted: resending batches after its checkpoint"
                            );
                            metrics::counter!("hitcounter_ingest_forward_rewinds_total").increment(1);
                            if from < next {
                                let (opened, first) = self.open_reader(from).await?;
                                reader = Some(opened);
                                first_kept = first_kept.max(first);
                                next = from.max(first);
                            }
                            // Publish no more than the aggregator now holds, so that the log
                            // keeps what is being resent until it is durable again.
                            let holds = ack.durable_through.max(first_kept.saturating_sub(1));
                            if holds < durable {
                                tracing::error!(
                                    shard = self.shard,
                                    reported = durable,
                                    holds,
                                    "aggregator came back holding less than it had reported durable: its state was lost"
                                );
                                durable = holds;
                                self.durable.send_replace(durable);
                            }
                        }
                        Some(_) => {}
                    }
                }
                changed = written.changed(), if log_open => {
                    if changed.is_err() {
                        // The log stage finished: deliver what is on disk, then stop.
                        log_open = false;
                    }
                }
                _ = probe.tick(), if in_flight.is_empty() && durable + 1 < next => {
                    in_flight.push(self.deliver(EncodedBatch::probe(self.producer_id, first_kept)));
                }
                _ = self.abandon.cancelled() => break,
            }
        }
        if next <= *written.borrow() || !in_flight.is_empty() {
            tracing::warn!(
                shard = self.shard,
                from = durable + 1,
                "drain deadline passed: undelivered batches stay in the log for the next start"
            );
        }
        tracing::debug!(shard = self.shard, "forward drained");
        Ok(())
    }

    /// Delivers one batch, retrying until it is acknowledged; `None` if abandoned.
    async fn deliver(&self, batch: EncodedBatch) -> Option<ApplyResponse> {
        let hits = batch.hits;
        let shard = self.shard.to_string();
        let mut backoff = Duration::from_millis(10);
        let mut attempt = 0u64;
        let mut refused = false;
        let reached = metrics::gauge!(
            "hitcounter_ingest_aggregator_key_limit_reached",
            "shard" => shard.clone()
        );
        loop {
            attempt += 1;
            match self.stack.clone().oneshot(batch.clone()).await {
                Ok(ack) if !ack.key_limit_refusal.is_empty() => {
                    // Not applied: keep it and try again, like an unavailable aggregator.
                    refused = true;
                    reached.set(1.0);
                    metrics::counter!(
                        "hitcounter_ingest_forward_failures_total",
                        "shard" => shard.clone(),
                        "kind" => "key_limit"
                    )
                    .increment(1);
                    if self.key_limits.should_log(self.shard) {
                        tracing::error!(
                            shard = self.shard,
                            seq = batch.seq,
                            why = %ack.key_limit_refusal,
                            "the aggregator refuses batches at its key limit: they stay in the \
                             log and are retried; clients get RESOURCE_EXHAUSTED once the log is \
                             full (raise its --max-keys, add shards, or wait for keys to age \
                             out; logged at most once a minute)"
                        );
                    }
                    self.key_limits.set(self.shard, Some(ack.key_limit_refusal));
                }
                Ok(ack) => {
                    if refused {
                        self.key_limits.set(self.shard, None);
                        reached.set(0.0);
                        tracing::info!(
                            shard = self.shard,
                            seq = batch.seq,
                            attempt,
                            "a batch refused at the aggregator's key limit went through"
                        );
                    }
                    metrics::counter!("hitcounter_ingest_forwarded_hits_total", "shard" => shard)
                        .increment(if ack.duplicate { 0 } else { hits });
                    if ack.dropped > 0 {
                        // Only deltas that can never apply (a second out of range, which
                        // validation rules out): the key limit refuses instead of dropping.
                        metrics::counter!("hitcounter_ingest_deltas_dropped_total", "reason" => "aggregator_invalid")
                            .increment(ack.dropped);
                        tracing::error!(
                            shard = self.shard,
                            dropped = ack.dropped,
                            "the aggregator dropped deltas it cannot apply"
                        );
                    }
                    if attempt > 1 {
                        tracing::info!(
                            shard = self.shard,
                            seq = batch.seq,
                            attempt,
                            "batch delivered after retries"
                        );
                    }
                    return Some(ack);
                }
                Err(error) => {
                    metrics::counter!(
                        "hitcounter_ingest_forward_failures_total",
                        "shard" => shard.clone(),
                        "kind" => failure_kind(&error)
                    )
                    .increment(1);
                    if attempt == 1 || attempt.is_multiple_of(50) {
                        tracing::warn!(shard = self.shard, seq = batch.seq, attempt, %error, "delivery to the aggregator failed; retrying");
                    }
                }
            }
            tokio::select! {
                _ = self.abandon.cancelled() => return None,
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
