//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`; never part of a normal
//! build). They run the aggregator's own code on bytes nobody vouches for: the checkpoint loader
//! on a whole file, and the apply path (decode an `ApplyRequest`, skip resends per producer,
//! add the deltas to a window store) on a sequence of requests, with a checkpoint written and
//! loaded back at the end so a fuzzer also checks that what was applied survives a restart.
//!
//! The apply path here is [`crate::applier::Applier::apply`] without its tasks: one window store
//! instead of the owner tasks (which only split deltas by key hash and call the same
//! [`WindowStore::add`]), no apply gate and no metrics.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc};

use hitcounter_proto::aggregator::v1::ApplyRequest;
use hitcounter_wal::sim::SimStorage;
use hitcounter_window::{StoreError, StoreLimits, WindowStore};
use prost::Message;

use super::{decode_file, load_in, write_in, CheckpointError, State, FORMAT, HEADER, MAGIC};
use crate::dedup::AppliedBatches;

/// Every key's `(second, count)` counters, sorted: what a store holds, comparable.
pub type Counts = BTreeMap<String, Vec<(i64, u64)>>;

/// What a loaded checkpoint held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contents {
    /// Keys read from the file.
    pub keys: usize,
    /// `(key, second)` counters read from the file.
    pub counters: usize,
    /// Per producer: `(producer_id, applied_through, applied_above)`, sorted by producer.
    pub producers: Vec<(u64, u64, Vec<u64>)>,
    /// The counters of every key, over all owners' stores.
    pub counts: Counts,
}

fn counts_of<'a>(stores: impl IntoIterator<Item = &'a WindowStore>) -> Counts {
    let mut counts = Counts::new();
    for store in stores {
        for (key, counters) in store.iter() {
            counts.entry(key.to_owned()).or_default().extend(counters);
        }
    }
    for counters in counts.values_mut() {
        counters.sort_unstable();
    }
    counts
}

/// Checks and decodes `bytes` as a checkpoint file into `owners` stores of at most `max_keys`
/// keys each, exactly as the aggregator does at start.
///
/// # Errors
/// [`CheckpointError::Corrupt`] for anything the loader refuses.
pub fn load_checkpoint(
    bytes: &[u8],
    owners: usize,
    max_keys: usize,
) -> Result<Contents, CheckpointError> {
    let (loaded, stores) = decode_file(
        PathBuf::from("fuzz.ckpt"),
        bytes,
        owners,
        StoreLimits { max_keys },
    )?;
    let mut producers: Vec<_> = loaded
        .producers
        .into_iter()
        .map(|(id, p)| (id, p.through, p.above.into_iter().collect()))
        .collect();
    producers.sort_unstable();
    Ok(Contents {
        keys: loaded.keys,
        counters: loaded.counters,
        producers,
        counts: counts_of(&stores),
    })
}

/// `payload` framed as a checkpoint file with a valid header (magic, format, length,
/// checksum), so that a fuzzer's payloads get past the checksum to the protobuf decoding.
pub fn frame_checkpoint(payload: &[u8]) -> Vec<u8> {
    let mut file = Vec::with_capacity(HEADER + payload.len());
    file.extend_from_slice(MAGIC);
    file.extend_from_slice(&FORMAT.to_le_bytes());
    file.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    file.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    file.extend_from_slice(payload);
    file
}

/// What applying one request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Seq 0: applies nothing.
    Probe,
    /// The (producer, seq) was applied before: nothing changed.
    Duplicate,
    /// Applied; `dropped` deltas were not (key limit, or a second out of range).
    Fresh {
        /// Deltas not applied.
        dropped: u64,
    },
}

/// The aggregator's apply path over one window store, fed raw request bytes.
pub struct ApplyModel {
    applied: AppliedBatches,
    store: WindowStore,
    tick: u64,
}

impl ApplyModel {
    /// A fresh aggregator: `dedup_window` and `max_producers` as its flags of those names.
    pub fn new(dedup_window: usize, max_producers: usize, max_keys: usize) -> Self {
        Self {
            applied: AppliedBatches::new(dedup_window, max_producers),
            store: WindowStore::new(StoreLimits { max_keys }),
            tick: 0,
        }
    }

    /// Decodes `bytes` as an `ApplyRequest` and applies it the way `Applier::apply` does.
    ///
    /// # Errors
    /// The decode error, for bytes that are not an `ApplyRequest` (the stream then breaks).
    pub fn apply(&mut self, bytes: &[u8]) -> Result<Applied, prost::DecodeError> {
        let batch = ApplyRequest::decode(bytes)?;
        self.tick += 1;
        let (producer, seq) = (batch.producer_id, batch.seq);
        let _ = self
            .applied
            .skip_gone(producer, batch.first_kept_seq, self.tick);
        if seq == 0 {
            return Ok(Applied::Probe);
        }
        if !self.applied.first_time(producer, seq, self.tick) {
            return Ok(Applied::Duplicate);
        }
        let mut dropped = 0;
        for delta in &batch.deltas {
            match self.store.add(&delta.key, delta.second, delta.count) {
                Ok(()) => {}
                Err(StoreError::KeyLimit { .. } | StoreError::SecondOutOfRange { .. }) => {
                    dropped += 1
                }
            }
        }
        Ok(Applied::Fresh { dropped })
    }

    /// Every key's counters now.
    pub fn counts(&self) -> Counts {
        counts_of([&self.store])
    }

    /// Writes a checkpoint of the state (to an in-memory file system) and loads it back into
    /// `owners` stores, as a restart would.
    ///
    /// # Errors
    /// Whatever writing or loading the checkpoint fails with.
    pub fn checkpoint_round_trip(&self, owners: usize) -> Result<Contents, CheckpointError> {
        let storage = Arc::new(SimStorage::new());
        let dir = PathBuf::from("/checkpoints");
        let state = State {
            taken_at_ms: 0,
            producers: self.applied.snapshot(),
            positions: Vec::new(),
            stores: vec![self.store.image()],
        };
        write_in(storage.as_ref(), &dir, &state)?;
        let (loaded, stores) = load_in(storage.as_ref(), &dir, owners, self.store.limits())?
            .ok_or_else(|| CheckpointError::Corrupt {
                path: dir.clone(),
                reason: "the checkpoint just written is not there".into(),
            })?;
        let mut producers: Vec<_> = loaded
            .producers
            .into_iter()
            .map(|(id, p)| (id, p.through, p.above.into_iter().collect()))
            .collect();
        producers.sort_unstable();
        Ok(Contents {
            keys: loaded.keys,
            counters: loaded.counters,
            producers,
            counts: counts_of(&stores),
        })
    }

    /// Per producer: `(producer_id, applied_through, applied_above)`, sorted by producer.
    pub fn progress(&self) -> Vec<(u64, u64, Vec<u64>)> {
        let mut producers: Vec<_> = self
            .applied
            .snapshot()
            .into_iter()
            .map(|(id, p)| (id, p.through, p.above.into_iter().collect()))
            .collect();
        producers.sort_unstable();
        producers
    }
}
