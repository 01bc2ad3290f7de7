//! The `consume` stage (clustered mode): reads partitions from the cluster's log and applies
//! each message exactly once, by its position. The `hosting` controller decides which
//! partitions are read, by which reader, and when they can serve reads.
//!
//! Per hosted partition the aggregator keeps the stream position it has applied through; it is
//! written into every checkpoint together with the counts it produced (both copied under the
//! apply gate, so they always agree). After a restart reading resumes after the lowest position
//! of the hosted partitions, and a message at or below its partition's position is skipped:
//! what JetStream delivers again, or what the restart reads twice, is never applied twice. The
//! producer's (id, seq) check runs as well, for the other source of repeats: a publish retried
//! after a timeout stores the same batch at two positions.
//!
//! Until a reader has reached the end of the log (a consumer with nothing pending), the counts
//! of its partitions are behind: it reports when it has caught up ([`ReaderProgress`]), and
//! until then `hosting` refuses reads of them with `UNAVAILABLE` ("catching up"), so query
//! asks another replica instead of showing a count that goes back in time. A read error (a NATS server or leader change the client could not
//! ride out) reopens the reader from the positions after a pause. So does a message refused
//! whole at the key limit (`--max-keys`): it stays in the log and is read again until it fits,
//! exactly as a forwarder retries it on one machine.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use futures::StreamExt;
use hitcounter_cluster::{partition_of, topology::partition_of_producer, HitStream, LoggedBatch};
use hitcounter_telemetry::CancellationToken;

use crate::{applier::Applier, error::AggregatorError};

/// Messages applied between two raises of every hosted partition's position (see
/// [`Applier::raise_positions`]).
const RAISE_EVERY: u64 = 256;

/// Pause before reading a message the key limit refused again.
const KEY_LIMIT_PAUSE: Duration = Duration::from_secs(1);

/// Pause before reopening the reader after a read error.
const REOPEN_PAUSE: Duration = Duration::from_millis(500);

/// What a reader shares with whoever started it (the `hosting` controller).
#[derive(Default)]
pub(crate) struct ReaderProgress {
    /// Set once the reader has had nothing pending: its partitions are caught up.
    pub(crate) caught_up: AtomicBool,
    /// Messages the reader has yet to deliver, as of its last message.
    pub(crate) pending: AtomicU64,
    /// Messages it has applied (or skipped as applied before).
    pub(crate) applied: AtomicU64,
}

/// Reads a set of partitions and applies them.
pub(crate) struct PartitionReader {
    pub(crate) applier: Arc<Applier>,
    pub(crate) stream: HitStream,
    /// The partitions read.
    pub(crate) partitions: Vec<u32>,
    /// For the logs and the lag gauge: `ready` or `building`.
    pub(crate) role: &'static str,
    pub(crate) progress: Arc<ReaderProgress>,
}

impl PartitionReader {
    /// Runs until `stop` is cancelled (between two messages). Fails only when applying fails
    /// (an owner stopped).
    pub(crate) async fn run(self, stop: CancellationToken) -> Result<(), AggregatorError> {
        let lag = metrics::gauge!("hitcounter_aggregator_log_pending", "reader" => self.role);
        while !stop.is_cancelled() {
            let from = self.applier.resume_position(&self.partitions) + 1;
            let (pending, mut messages) = match self.stream.read(&self.partitions, from).await {
                Ok(reader) => reader,
                Err(error) => {
                    tracing::warn!(%error, from, "cannot read the cluster's log; trying again");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(REOPEN_PAUSE) => continue,
                    }
                }
            };
            tracing::info!(
                from,
                pending,
                partitions = self.partitions.len(),
                reader = self.role,
                "reading the cluster's log"
            );
            let mut applied = 0u64;
            self.set_pending(&lag, pending);
            loop {
                let next = tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    next = messages.next() => next,
                };
                match next {
                    Some(Ok(logged)) => {
                        let (pending, sequence) = (logged.pending, logged.sequence);
                        match self.applier.apply_logged(logged).await {
                            Ok(()) => {}
                            // Not applied, position not advanced: read it again after a pause
                            // (keys age out, or the limit is raised and the aggregator
                            // restarted). The log keeps it; nothing is dropped. Owners log it
                            // and set the key-limit gauge.
                            Err(AggregatorError::KeyLimit(_)) => {
                                metrics::counter!("hitcounter_aggregator_log_messages_total", "outcome" => "refused_key_limit")
                                    .increment(1);
                                tokio::select! {
                                    _ = stop.cancelled() => return Ok(()),
                                    _ = tokio::time::sleep(KEY_LIMIT_PAUSE) => {}
                                }
                                break;
                            }
                            Err(error) => return Err(error),
                        }
                        applied += 1;
                        self.progress.applied.fetch_add(1, Ordering::Relaxed);
                        if pending == 0 || applied.is_multiple_of(RAISE_EVERY) {
                            self.applier.raise_positions(&self.partitions, sequence);
                        }
                        self.set_pending(&lag, pending);
                    }
                    Some(Err(error)) => {
                        tracing::warn!(%error, "reading the cluster's log failed; reopening");
                        metrics::counter!("hitcounter_aggregator_log_reopened_total").increment(1);
                        break;
                    }
                    None => break,
                }
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(REOPEN_PAUSE) => {}
            }
        }
        Ok(())
    }

    fn set_pending(&self, lag: &metrics::Gauge, pending: u64) {
        lag.set(pending as f64);
        self.progress.pending.store(pending, Ordering::Relaxed);
        if pending == 0 && !self.progress.caught_up.swap(true, Ordering::AcqRel) {
            tracing::info!(
                applied_through = self.applier.resume_position(&self.partitions),
                partitions = self.partitions.len(),
                reader = self.role,
                "caught up with the cluster's log"
            );
        }
    }
}

impl Applier {
    /// The position reading resumes after: the lowest applied-through of `partitions` (0 when
    /// one of them has nothing applied yet).
    pub(crate) fn resume_position(&self, partitions: &[u32]) -> u64 {
        let positions = self.lock_positions();
        partitions
            .iter()
            .map(|p| positions.get(p).copied().unwrap_or(0))
            .min()
            .unwrap_or(0)
    }

    /// Raises the position of every partition in `partitions` to `through`: the reader
    /// delivers the hosted partitions' messages in stream order, so once the message at
    /// `through` is applied, every hosted partition holds everything up to it, including a
    /// partition that had no message at all (whose position would otherwise stay 0 and make
    /// every restart read the whole log again). Needs no gate: either value is true at any
    /// moment after that message was applied.
    pub(crate) fn raise_positions(&self, partitions: &[u32], through: u64) {
        let mut positions = self.lock_positions();
        for &p in partitions {
            let position = positions.entry(p).or_insert(0);
            *position = (*position).max(through);
        }
    }

    /// Gives up `partitions` (of `total`): their keys, positions and producers are forgotten,
    /// under the apply gate held exclusively, so a checkpoint holds all of a partition or none
    /// of it. Building one of them again later starts from the log's beginning and applies
    /// everything again. Returns how many keys were removed.
    pub(crate) async fn drop_partitions(&self, partitions: &BTreeSet<u32>, total: u32) -> usize {
        let _exclusive = self.gate.write().await;
        self.lock_positions()
            .retain(|partition, _| !partitions.contains(partition));
        self.applied
            .forget_producers(|producer| partitions.contains(&partition_of_producer(producer)));
        let owners = self.owners.clone();
        let dropped = partitions.clone();
        tokio::task::spawn_blocking(move || {
            owners.remove_keys_where(|key| dropped.contains(&partition_of(key, total)))
        })
        .await
        .unwrap_or_default()
    }

    /// The highest position applied in any partition.
    pub(crate) fn highest_position(&self) -> u64 {
        self.lock_positions().values().copied().max().unwrap_or(0)
    }

    pub(crate) fn lock_positions(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, u64>> {
        // Single-step updates on a plain map: a poisoned lock leaves it usable.
        self.positions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies one message of the log unless its position (or its producer's seq) says it
    /// was applied before. Under the apply gate, so a checkpoint holds the message's counts
    /// and its position, or neither.
    pub(crate) async fn apply_logged(&self, logged: LoggedBatch) -> Result<(), AggregatorError> {
        let _applying = self.gate.read().await;
        let LoggedBatch {
            sequence,
            partition,
            batch,
            ..
        } = logged;
        let applied_through = self.lock_positions().get(&partition).copied().unwrap_or(0);
        if sequence <= applied_through {
            metrics::counter!("hitcounter_aggregator_log_messages_total", "outcome" => "replayed")
                .increment(1);
            return Ok(());
        }
        let tick = crate::clock::now_second() as u64;
        let (producer, seq) = (batch.producer_id, batch.seq);
        if self.applied.first_time(producer, seq, tick) {
            if let Err(error) = self.owners.apply(batch.deltas).await {
                self.applied.forget(producer, seq);
                return Err(error);
            }
            metrics::counter!("hitcounter_aggregator_log_messages_total", "outcome" => "applied")
                .increment(1);
        } else {
            metrics::counter!("hitcounter_aggregator_log_messages_total", "outcome" => "duplicate")
                .increment(1);
        }
        self.lock_positions().insert(partition, sequence);
        Ok(())
    }
}
