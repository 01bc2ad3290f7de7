//! The `apply` stage: owner tasks that hold the window state, actor style.
//!
//! The key space is split by hash over N owners (see `hitcounter_stack::shard::owner_of`). Each
//! owner is a task that owns one [`WindowStore`] and drains its own two bounded mailboxes, so
//! the hot path takes no lock: writes and reads for a key are serialized by its owner. Writes
//! are partitioned and sent to the owners of their keys; reads fan out to the owners involved
//! and their answers are merged (fan-in). A full mailbox makes the caller wait, which
//! propagates backpressure up the apply stream to ingest.
//!
//! Reads have their own mailbox and go first. A write batch can hold tens of thousands of
//! deltas (one ingest flush) and takes milliseconds to apply; a `GetHits` queued behind it
//! would wait that long. So the owner prefers its read mailbox, and inside a long apply it
//! answers the reads that arrived every [`APPLY_CHUNK`] deltas and yields to the runtime (so
//! the gRPC tasks that carry the answers get a worker). Copying the store for a checkpoint is
//! done the same way, [`IMAGE_CHUNK_KEYS`] keys at a time. A read may therefore see part of a
//! batch that is being applied, as it may see a batch applied by one owner and not yet by
//! another: reads are never older than the last completed apply.
//!
//! Each owner also evicts seconds that fell out of retention, so memory follows the seconds that
//! actually had hits. Eviction visits every key of the owner (with a million keys, tens of
//! milliseconds of work), so it runs every `retention / 64` seconds (at least every second)
//! rather than every second: the store holds at most 1/64 more seconds than the retention, and
//! those are never read (a query window never reaches before the retention). Like a checkpoint
//! copy, a pass is made in steps of [`EVICT_CHUNK_BUCKETS`] with waiting reads answered between.

use std::{sync::Arc, time::Duration};

use hitcounter_pipeline::{StageReceiver, StageSender};
use hitcounter_proto::aggregator::v1::Delta;
use hitcounter_stack::shard::owner_of;
use hitcounter_window::{StoreError, StoreImage, StoreLimits, WindowStore};
use tokio::{sync::oneshot, task::JoinSet};
use tracing::Instrument;

use crate::error::AggregatorError;

/// Deltas applied between two looks at the read mailbox. About 100 µs of work with a store of
/// a million keys: short enough to keep reads fast, long enough that the look costs nothing.
const APPLY_CHUNK: usize = 1024;

/// Buckets of the key table (at most 7 keys per 8) visited by eviction between two looks at
/// the read mailbox. A whole pass over 100k keys took 5–10 ms, a stall of every read behind it;
/// a step is a few hundred microseconds.
const EVICT_CHUNK_BUCKETS: usize = 4096;

/// Keys copied into a checkpoint image between two looks at the read mailbox (about 0.5 ms).
const IMAGE_CHUNK_KEYS: usize = 4096;

/// A change to one owner's store, or a copy of it; in the order sent.
enum Write {
    Apply {
        deltas: Vec<Delta>,
        done: oneshot::Sender<u64>,
    },
    Snapshot {
        reply: oneshot::Sender<StoreImage>,
    },
}

/// A read of one owner's store.
enum Read {
    Count {
        keys: Vec<(usize, String)>,
        end_second: i64,
        window_seconds: u32,
        reply: oneshot::Sender<Vec<(usize, u64)>>,
    },
    Series {
        key: String,
        start_second: i64,
        step_seconds: u32,
        points: u32,
        reply: oneshot::Sender<Vec<u64>>,
    },
    Top {
        end_second: i64,
        window_seconds: u32,
        limit: usize,
        prefix: Arc<str>,
        reply: oneshot::Sender<Vec<(String, u64)>>,
    },
}

impl Read {
    /// Answers from `store`. The caller may have gone away; the answer is dropped then.
    fn answer(self, store: &WindowStore) {
        match self {
            Read::Count {
                keys,
                end_second,
                window_seconds,
                reply,
            } => {
                let counts = keys
                    .into_iter()
                    .map(|(i, key)| (i, store.count(&key, end_second, window_seconds)))
                    .collect();
                let _ = reply.send(counts);
            }
            Read::Series {
                key,
                start_second,
                step_seconds,
                points,
                reply,
            } => {
                let _ = reply.send(store.series(&key, start_second, step_seconds, points));
            }
            Read::Top {
                end_second,
                window_seconds,
                limit,
                prefix,
                reply,
            } => {
                let _ = reply.send(store.top(end_second, window_seconds, limit, &prefix));
            }
        }
    }
}

/// One owner's two mailboxes.
#[derive(Clone)]
struct Mailboxes {
    writes: StageSender<Write>,
    reads: StageSender<Read>,
}

/// Handle to the owner tasks: partitions requests, sends them, merges the answers.
#[derive(Clone)]
pub(crate) struct Owners {
    mailboxes: Vec<Mailboxes>,
}

/// Settings of the owner tasks.
pub(crate) struct OwnerSettings {
    pub(crate) owners: usize,
    pub(crate) mailbox: usize,
    pub(crate) max_keys: usize,
    pub(crate) retention_seconds: u32,
}

impl OwnerSettings {
    /// The limits of each owner's store: the key limit is per aggregator, each owner gets an
    /// equal share of it.
    pub(crate) fn store_limits(&self) -> StoreLimits {
        StoreLimits {
            max_keys: self.max_keys.div_ceil(self.owners.max(1)).max(1),
        }
    }
}

impl Owners {
    /// Starts the owners on `tasks`, owner `i` with `stores[i]` (restored from a checkpoint) or
    /// an empty store. They run until every [`Owners`] handle is dropped and their mailboxes are
    /// drained.
    pub(crate) fn spawn(
        settings: &OwnerSettings,
        stores: Vec<WindowStore>,
        tasks: &mut JoinSet<Result<(), AggregatorError>>,
    ) -> Self {
        let owners = settings.owners.max(1);
        let limits = settings.store_limits();
        let mut stores = stores.into_iter();
        let mailboxes = (0..owners)
            .map(|index| {
                let (writes, write_mailbox) =
                    hitcounter_pipeline::channel("aggregator_owner_mailbox", settings.mailbox);
                let (reads, read_mailbox) =
                    hitcounter_pipeline::channel("aggregator_owner_reads", settings.mailbox);
                let store = stores.next().unwrap_or_else(|| WindowStore::new(limits));
                let retention = i64::from(settings.retention_seconds);
                tasks.spawn(
                    run_owner(index, store, write_mailbox, read_mailbox, retention)
                        .instrument(tracing::info_span!("apply", owner = index)),
                );
                Mailboxes { writes, reads }
            })
            .collect();
        Self { mailboxes }
    }

    async fn write(&self, owner: usize, write: Write) -> Result<(), AggregatorError> {
        self.mailboxes[owner]
            .writes
            .send(write)
            .await
            .map_err(|_| AggregatorError::OwnerStopped)
    }

    async fn read(&self, owner: usize, read: Read) -> Result<(), AggregatorError> {
        self.mailboxes[owner]
            .reads
            .send(read)
            .await
            .map_err(|_| AggregatorError::OwnerStopped)
    }

    /// Applies deltas; returns how many were dropped at the key limit.
    pub(crate) async fn apply(&self, deltas: Vec<Delta>) -> Result<u64, AggregatorError> {
        let n = self.mailboxes.len();
        let mut parts: Vec<Vec<Delta>> = (0..n).map(|_| Vec::new()).collect();
        for delta in deltas {
            parts[owner_of(&delta.key, n)].push(delta);
        }
        let mut waits = Vec::with_capacity(n);
        for (owner, deltas) in parts.into_iter().enumerate() {
            if deltas.is_empty() {
                continue;
            }
            let (done, wait) = oneshot::channel();
            self.write(owner, Write::Apply { deltas, done }).await?;
            waits.push(wait);
        }
        let mut dropped = 0;
        for wait in waits {
            dropped += wait.await.map_err(|_| AggregatorError::OwnerStopped)?;
        }
        Ok(dropped)
    }

    /// A flat copy of every owner's store, in owner order, each taken between two of its
    /// writes.
    pub(crate) async fn snapshot(&self) -> Result<Vec<StoreImage>, AggregatorError> {
        let mut waits = Vec::with_capacity(self.mailboxes.len());
        for owner in 0..self.mailboxes.len() {
            let (reply, wait) = oneshot::channel();
            self.write(owner, Write::Snapshot { reply }).await?;
            waits.push(wait);
        }
        let mut stores = Vec::with_capacity(waits.len());
        for wait in waits {
            stores.push(wait.await.map_err(|_| AggregatorError::OwnerStopped)?);
        }
        Ok(stores)
    }

    /// Window counts of `keys`, in the order given.
    pub(crate) async fn count(
        &self,
        keys: Vec<String>,
        end_second: i64,
        window_seconds: u32,
    ) -> Result<Vec<u64>, AggregatorError> {
        let n = self.mailboxes.len();
        let total = keys.len();
        let mut parts: Vec<Vec<(usize, String)>> = (0..n).map(|_| Vec::new()).collect();
        for (index, key) in keys.into_iter().enumerate() {
            parts[owner_of(&key, n)].push((index, key));
        }
        let mut waits = Vec::with_capacity(n);
        for (owner, keys) in parts.into_iter().enumerate() {
            if keys.is_empty() {
                continue;
            }
            let (reply, wait) = oneshot::channel();
            let command = Read::Count {
                keys,
                end_second,
                window_seconds,
                reply,
            };
            self.read(owner, command).await?;
            waits.push(wait);
        }
        let mut counts = vec![0; total];
        for wait in waits {
            for (index, count) in wait.await.map_err(|_| AggregatorError::OwnerStopped)? {
                counts[index] = count;
            }
        }
        Ok(counts)
    }

    /// Dense per-step counts of one key.
    pub(crate) async fn series(
        &self,
        key: String,
        start_second: i64,
        step_seconds: u32,
        points: u32,
    ) -> Result<Vec<u64>, AggregatorError> {
        let owner = owner_of(&key, self.mailboxes.len());
        let (reply, wait) = oneshot::channel();
        let command = Read::Series {
            key,
            start_second,
            step_seconds,
            points,
            reply,
        };
        self.read(owner, command).await?;
        wait.await.map_err(|_| AggregatorError::OwnerStopped)
    }

    /// The top `limit` keys over every owner: each owner answers its own top `limit` (a key
    /// lives in exactly one owner, so the global top is among them) and the lists are merged.
    pub(crate) async fn top(
        &self,
        end_second: i64,
        window_seconds: u32,
        limit: usize,
        prefix: &str,
    ) -> Result<Vec<(String, u64)>, AggregatorError> {
        let prefix: Arc<str> = Arc::from(prefix);
        let mut waits = Vec::with_capacity(self.mailboxes.len());
        for owner in 0..self.mailboxes.len() {
            let (reply, wait) = oneshot::channel();
            let command = Read::Top {
                end_second,
                window_seconds,
                limit,
                prefix: Arc::clone(&prefix),
                reply,
            };
            self.read(owner, command).await?;
            waits.push(wait);
        }
        let mut merged = Vec::new();
        for wait in waits {
            merged.extend(wait.await.map_err(|_| AggregatorError::OwnerStopped)?);
        }
        Ok(merge_top(merged, limit))
    }
}

/// Orders by count descending, then key ascending, and keeps the first `limit`.
pub(crate) fn merge_top(mut keys: Vec<(String, u64)>, limit: usize) -> Vec<(String, u64)> {
    keys.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    keys.truncate(limit);
    keys
}

async fn run_owner(
    index: usize,
    mut store: WindowStore,
    writes: StageReceiver<Write>,
    reads: StageReceiver<Read>,
    retention_seconds: i64,
) -> Result<(), AggregatorError> {
    let label = index.to_string();
    let keys_gauge = metrics::gauge!("hitcounter_aggregator_keys", "owner" => label.clone());
    let counters_gauge =
        metrics::gauge!("hitcounter_aggregator_counters", "owner" => label.clone());
    let bytes_gauge = metrics::gauge!("hitcounter_aggregator_store_bytes", "owner" => label);
    let applied = metrics::counter!("hitcounter_aggregator_deltas_applied_total");
    let dropped_total =
        metrics::counter!("hitcounter_aggregator_deltas_dropped_total", "reason" => "key_limit");
    // Gauges every second; eviction every `evict_every` seconds (see the module docs).
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let evict_every = (retention_seconds / 64).max(1);
    let mut evicted_at = i64::MIN;
    let (mut reads_open, mut writes_open) = (true, true);
    while reads_open || writes_open {
        tokio::select! {
            // Reads first, see the module docs.
            biased;
            read = reads.recv(), if reads_open => match read {
                Some(read) => read.answer(&store),
                None => reads_open = false,
            },
            write = writes.recv(), if writes_open => match write {
                Some(Write::Apply { deltas, done }) => {
                    let total = deltas.len() as u64;
                    let dropped = apply(&mut store, deltas, &reads).await;
                    applied.increment(total - dropped);
                    dropped_total.increment(dropped);
                    // The caller may have gone away; the deltas are applied either way.
                    let _ = done.send(dropped);
                }
                Some(Write::Snapshot { reply }) => {
                    // A big store takes a while to copy: answer reads in between (they only
                    // read, and nothing writes while the copy is made).
                    let mut image = store.image_builder();
                    while !image.step(IMAGE_CHUNK_KEYS) {
                        let_reads_in(&store, &reads).await;
                    }
                    let _ = reply.send(image.finish());
                }
                None => writes_open = false,
            },
            _ = tick.tick() => {
                let now = crate::clock::now_second();
                if now.saturating_sub(evicted_at) >= evict_every {
                    // Keep one extra second beyond retention so a window of exactly `retention`
                    // seconds ending now is always complete. In steps, with reads answered in
                    // between (they only read, and nothing writes during the pass).
                    let mut pass = store.eviction(now - retention_seconds);
                    while !store.evict_step(&mut pass, EVICT_CHUNK_BUCKETS) {
                        let_reads_in(&store, &reads).await;
                    }
                    evicted_at = now;
                }
                keys_gauge.set(store.key_count() as f64);
                counters_gauge.set(store.counter_count() as f64);
                bytes_gauge.set(store.approx_heap_bytes() as f64);
            }
        }
    }
    tracing::debug!(owner = index, "owner stopped");
    Ok(())
}

/// A pause inside a long write or copy: answers the reads waiting in the mailbox, then yields
/// to the runtime so the gRPC tasks that carry the answers get a worker.
async fn let_reads_in(store: &WindowStore, reads: &StageReceiver<Read>) {
    while let Some(read) = reads.try_recv() {
        read.answer(store);
    }
    tokio::task::yield_now().await;
}

/// Applies `deltas` to `store`, answering waiting reads every [`APPLY_CHUNK`] deltas; returns
/// how many were dropped (key limit, or a second out of range).
async fn apply(store: &mut WindowStore, deltas: Vec<Delta>, reads: &StageReceiver<Read>) -> u64 {
    let mut dropped = 0u64;
    for (n, delta) in deltas.into_iter().enumerate() {
        if n > 0 && n % APPLY_CHUNK == 0 {
            let_reads_in(store, reads).await;
        }
        match store.add(&delta.key, delta.second, delta.count) {
            Ok(()) => {}
            Err(StoreError::KeyLimit { limit }) => {
                dropped += 1;
                if dropped == 1 {
                    tracing::error!(
                        limit,
                        "key limit reached: dropping deltas of new keys; raise --max-keys or add shards"
                    );
                }
            }
            Err(error) => {
                dropped += 1;
                tracing::warn!(%error, "delta not applied");
            }
        }
    }
    dropped
}
