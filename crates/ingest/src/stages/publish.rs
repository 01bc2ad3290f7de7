//! The `publish` stage (clustered mode): stores each flush in the cluster's replicated log.
//!
//! One flush is one atomic batch on the JetStream stream (`hitcounter_cluster::log`): a message
//! per partition it touches and a marker per batch id, all stored or none. Requests are
//! acknowledged once the servers committed the batch (replicated to a quorum and, with
//! `sync_interval: always`, fsynced), so this instance holds nothing that is not already
//! replicated: it can die at any moment.
//!
//! Each publisher (`--publish-lanes` of them share the flush channel) is a producer: a random
//! id, and per partition a sequence number without gaps. The message of partition p carries
//! the producer id with p in its low bits (`hitcounter_cluster::topology::producer_id`, so an
//! aggregator knows which producers belong to a partition it gives up) and that partition's
//! next number, so aggregators deduplicate each
//! partition's messages exactly as they deduplicate a forwarder's batches on one machine. The
//! numbers advance only when a batch is known stored: a batch refused for sure (a batch id
//! stored before, a full log) is rebuilt with the same numbers, and a batch retried after a
//! timeout keeps its content, so the stream may hold it twice but never two different batches
//! under one number. When the outcome stays unknown after the retries, the flush's callers get
//! `UNAVAILABLE` (a retry with the same batch id is safe) and the publisher takes a new producer
//! id, so that whatever the last attempt did never shares a number with what follows.
//!
//! Batch ids: a marker publish fails the whole batch if the id was stored before (through any
//! ingest instance, within the dedup horizon). The publisher then reads the markers of its
//! flush: a marker of its own flush means an earlier attempt did commit (success); a marker of
//! someone else's means that request is a duplicate, answered with the first call's
//! `accepted` and taken out of the flush, which is published again without it.

use std::time::Duration;

use hitcounter_cluster::{log::MAX_BATCH_MESSAGES, HitStream, Marker, PublishError};
use hitcounter_pipeline::StageReceiver;
use hitcounter_proto::aggregator::v1::{ApplyRequest, Delta};

use super::{Apart, DurableError, Flush};
use crate::error::IngestError;

/// How often a publish whose outcome is unknown is tried again before its callers are told.
const UNKNOWN_OUTCOME_ATTEMPTS: u32 = 3;

/// One publisher: a producer of atomic batches on the cluster's log.
pub(crate) struct Publisher {
    /// The stream.
    pub(crate) stream: HitStream,
    /// How long batch-id markers are kept (the dedup horizon).
    pub(crate) horizon: Duration,
    /// This publisher's producer id (partition p's messages carry `producer_id(producer, p)`).
    producer: u64,
    /// Per partition: the number of the next message.
    next_seq: Vec<u64>,
    /// Flushes published, numbering the markers (so an attempt's own markers are known).
    flushes: u64,
}

impl Publisher {
    /// A publisher with a fresh producer id.
    pub(crate) fn new(stream: HitStream, horizon: Duration) -> Self {
        let partitions = stream.partitions() as usize;
        Self {
            stream,
            horizon,
            producer: rand::random(),
            next_seq: vec![1; partitions],
            flushes: 0,
        }
    }

    /// Starts over as a new producer: whatever an attempt of unknown outcome stored can then
    /// never share a (producer, seq) with a later batch.
    fn renew(&mut self) {
        self.producer = rand::random();
        self.next_seq.iter_mut().for_each(|seq| *seq = 1);
        metrics::counter!("hitcounter_ingest_publisher_renewed_total").increment(1);
    }

    /// Stores one flush and answers its requests.
    async fn store(&mut self, flush: Flush) {
        let Flush {
            shards,
            waiters,
            batch_ids,
            mut apart,
        } = flush;
        let started = std::time::Instant::now();
        // Markers numbered from here on are this flush's own attempts.
        let first_no = self.flushes + 1;
        let outcome = loop {
            self.flushes += 1;
            let flush_no = self.flushes;
            let (messages, touched) = self.messages(&shards, &apart, flush_no);
            if messages.is_empty() {
                break Ok(());
            }
            match self.publish_retrying(messages).await {
                Ok(()) => {
                    for p in touched {
                        self.next_seq[p] += 1;
                    }
                    break Ok(());
                }
                Err(PublishError::Conflict) => match self.resolve(&mut apart, first_no).await {
                    // An earlier attempt of this flush committed.
                    Ok(true) => {
                        for p in touched {
                            self.next_seq[p] += 1;
                        }
                        break Ok(());
                    }
                    // Duplicates taken out: publish the rest, same numbers.
                    Ok(false) => continue,
                    Err(error) => break Err(DurableError::Cluster(error.to_string())),
                },
                Err(PublishError::Full) => break Err(DurableError::ClusterFull),
                Err(PublishError::Refused(message)) => break Err(DurableError::Cluster(message)),
                Err(PublishError::Unknown(message)) => {
                    self.renew();
                    break Err(DurableError::Cluster(format!(
                        "{message}; the hits may or may not be stored: retry with the same batch_id to have them counted once"
                    )));
                }
            }
        };
        metrics::histogram!("hitcounter_ingest_publish_seconds")
            .record(started.elapsed().as_secs_f64());
        let result = match &outcome {
            Ok(()) => "stored",
            Err(DurableError::ClusterFull) => "full",
            Err(_) => "failed",
        };
        metrics::counter!("hitcounter_ingest_flushes_published_total", "result" => result)
            .increment(1);
        for claimed in batch_ids {
            match outcome {
                Ok(()) => claimed.guard.complete(claimed.accepted),
                // Dropping the claim releases the id for a retry.
                Err(_) => drop(claimed),
            }
        }
        for done in waiters {
            let _ = done.send(outcome.clone());
        }
        for Apart { done, claimed, .. } in apart {
            match outcome {
                Ok(()) => claimed.guard.complete(claimed.accepted),
                Err(_) => drop(claimed),
            }
            let _ = done.send(outcome.clone());
        }
    }

    /// The atomic batch of a flush: one message per partition with deltas, one marker per
    /// request kept apart; and the partitions touched.
    fn messages(
        &self,
        shards: &[Vec<Delta>],
        apart: &[Apart],
        flush_no: u64,
    ) -> (
        Vec<async_nats::jetstream::message::OutboundMessage>,
        Vec<usize>,
    ) {
        let partitions = self.next_seq.len();
        let mut by_partition: Vec<Vec<Delta>> = vec![Vec::new(); partitions];
        for (p, deltas) in shards.iter().enumerate().take(partitions) {
            by_partition[p].extend(deltas.iter().cloned());
        }
        for request in apart {
            for delta in &request.deltas {
                let p = hitcounter_cluster::partition_of(&delta.key, partitions as u32) as usize;
                by_partition[p].push(delta.clone());
            }
        }
        let mut messages = Vec::with_capacity(partitions + apart.len());
        let mut touched = Vec::new();
        for (p, deltas) in by_partition.into_iter().enumerate() {
            if deltas.is_empty() {
                continue;
            }
            let batch = ApplyRequest {
                producer_id: hitcounter_cluster::topology::producer_id(self.producer, p as u32),
                seq: self.next_seq[p],
                deltas,
                first_kept_seq: 0,
            };
            messages.push(self.stream.partition_message(p as u32, &batch));
            touched.push(p);
        }
        for request in apart {
            let marker = Marker {
                batch_id: request.claimed.guard.id().to_owned(),
                accepted: request.claimed.accepted,
                producer: self.producer,
                flush: flush_no,
            };
            messages.push(self.stream.marker_message(&marker, self.horizon));
        }
        debug_assert!(messages.len() <= MAX_BATCH_MESSAGES);
        (messages, touched)
    }

    /// Publishes, trying again (same content) while the outcome is unknown.
    async fn publish_retrying(
        &self,
        messages: Vec<async_nats::jetstream::message::OutboundMessage>,
    ) -> Result<(), PublishError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.stream.publish(&messages).await {
                Ok(_) => return Ok(()),
                Err(PublishError::Unknown(message)) if attempt < UNKNOWN_OUTCOME_ATTEMPTS => {
                    tracing::warn!(attempt, %message, "publish outcome unknown; trying again with the same content");
                    metrics::counter!("hitcounter_ingest_publish_retries_total").increment(1);
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// After a conflict: reads the markers of the requests kept apart. Returns `true` when
    /// they are this flush's own (numbered `first_no` or later: an earlier attempt committed);
    /// otherwise answers and removes the requests whose batch id another flush stored.
    async fn resolve(
        &mut self,
        apart: &mut Vec<Apart>,
        first_no: u64,
    ) -> Result<bool, hitcounter_cluster::ClusterError> {
        let mut kept = Vec::with_capacity(apart.len());
        let mut ours = false;
        let mut duplicates = 0u64;
        for request in apart.drain(..) {
            match self.stream.marker(request.claimed.guard.id()).await? {
                Some(marker) if marker.producer == self.producer && marker.flush >= first_no => {
                    ours = true;
                    kept.push(request);
                }
                Some(marker) => {
                    duplicates += 1;
                    request.claimed.guard.complete(marker.accepted);
                    let _ = request.done.send(Err(DurableError::Duplicate {
                        accepted: marker.accepted,
                    }));
                }
                None => kept.push(request),
            }
        }
        *apart = kept;
        if duplicates > 0 {
            metrics::counter!("hitcounter_ingest_cluster_duplicate_batches_total")
                .increment(duplicates);
        }
        if !ours && duplicates == 0 {
            // A conflict with no marker to show for it: the marker expired in between. Publish
            // again; the check is made anew.
            tracing::warn!("a batch-id conflict without a stored marker; publishing again");
        }
        Ok(ours)
    }
}

impl super::DurableLog for Publisher {
    async fn run(mut self, flushes: StageReceiver<Flush>) -> Result<(), IngestError> {
        tracing::info!(producer = self.producer, "publisher ready");
        while let Some(flush) = flushes.recv().await {
            self.store(flush).await;
        }
        tracing::debug!("publisher drained");
        Ok(())
    }
}
