//! The `apply` stage: owner tasks that each hold one window store, and the reads of those
//! stores.
//!
//! The key space is split by hash over N owners (see `hitcounter_stack::shard::owner_of`). Each
//! owner is the only writer of its [`WindowStore`]: a task that drains its bounded write
//! mailbox and applies batches there, so writes of a key are serialized without any lock
//! between writers. Writes are partitioned and sent to the owners of their keys; a full
//! mailbox makes the caller wait, which propagates backpressure up the apply stream to ingest.
//!
//! Reads do not go through the owner: the store sits in an `RwLock` that the owner takes for
//! writing only in short steps ([`APPLY_CHUNK`] deltas, [`EVICT_CHUNK_BUCKETS`] buckets of an
//! eviction pass), and a `Count` takes it for reading right in its gRPC handler. Measured
//! (docs/performance.md): sending each read to the owner task and its answer back cost two task
//! wake-ups per `GetHits`, and a read queued behind a checkpoint copy made on the owner waited
//! for the copy's step; now a read waits at most for one write step, and a checkpoint copies the
//! stores under a read lock on a thread of its own ([`Owners::snapshot`]), beside the reads. A
//! read may see part of a batch being applied, as it may see a batch applied by one owner and
//! not yet by another: reads are never older than the last completed apply.
//!
//! A read that finds the lock taken blocks its worker thread until the write step ends. That is
//! cheaper than a hand-off for the usual wait (at most one chunk). The longest step is a chunk
//! that grows one of the store's key tables: a sixteenth of the keys rehashed at once, 4.6 ms
//! at 1M keys (`crates/window/examples/growth.rs`).
//!
//! Each owner also evicts seconds that fell out of retention, so memory follows the seconds that
//! actually had hits. Eviction visits every key of the owner (with a million keys, tens of
//! milliseconds of work), so it runs every `retention / 64` seconds (at least every second)
//! rather than every second: the store holds at most 1/64 more seconds than the retention, and
//! those are never read (a query window never reaches before the retention). A pass is made in
//! steps, with the lock released between them. An eviction step that falls inside a checkpoint
//! copy (applies are paused then, so nothing else writes) waits for the copy of that owner to
//! end, blocking its worker thread that long (milliseconds); reads arriving meanwhile wait too,
//! as the lock lets a waiting writer go first.

use std::{
    sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard},
    time::Duration,
};

use hitcounter_pipeline::{StageReceiver, StageSender};
use hitcounter_proto::aggregator::v1::Delta;
use hitcounter_stack::shard::owner_of;
use hitcounter_window::{StoreError, StoreImage, StoreLimits, WindowStore};
use tokio::{sync::oneshot, task::JoinSet};
use tracing::Instrument;

use crate::error::AggregatorError;

/// Deltas applied under one hold of the write lock. About 100 µs of work with a store of a
/// million keys: the longest a read waits for an apply, and long enough that taking the lock
/// costs nothing.
const APPLY_CHUNK: usize = 1024;

/// Buckets of the key table (at most 7 keys per 8) visited by eviction under one hold of the
/// write lock. A whole pass over 100k keys took 5–10 ms, a stall of every read behind it; a
/// step is a few hundred microseconds.
const EVICT_CHUNK_BUCKETS: usize = 4096;

/// A batch of deltas for one owner, and where to report how many it dropped.
struct Apply {
    deltas: Vec<Delta>,
    done: oneshot::Sender<u64>,
}

/// One owner's store: written by its owner task only, read by anyone.
#[derive(Clone)]
struct Owner {
    writes: StageSender<Apply>,
    store: Arc<RwLock<WindowStore>>,
}

impl Owner {
    fn read(&self) -> RwLockReadGuard<'_, WindowStore> {
        read(&self.store)
    }
}

// A panic while the lock was held (there is no `unwrap` of caller input under it) would leave
// at worst part of one delta chunk applied; refusing every later read and write would be worse.
fn read(store: &RwLock<WindowStore>) -> RwLockReadGuard<'_, WindowStore> {
    store.read().unwrap_or_else(|e| e.into_inner())
}

fn write(store: &RwLock<WindowStore>) -> RwLockWriteGuard<'_, WindowStore> {
    store.write().unwrap_or_else(|e| e.into_inner())
}

/// Handle to the owners: partitions writes and sends them, reads the stores and merges the
/// answers.
#[derive(Clone)]
pub(crate) struct Owners {
    owners: Vec<Owner>,
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
        let owners = (0..owners)
            .map(|index| {
                let (writes, mailbox) =
                    hitcounter_pipeline::channel("aggregator_owner_mailbox", settings.mailbox);
                let store = stores.next().unwrap_or_else(|| WindowStore::new(limits));
                let store = Arc::new(RwLock::new(store));
                let retention = i64::from(settings.retention_seconds);
                tasks.spawn(
                    run_owner(index, Arc::clone(&store), mailbox, retention)
                        .instrument(tracing::info_span!("apply", owner = index)),
                );
                Owner { writes, store }
            })
            .collect();
        Self { owners }
    }

    /// Applies deltas; returns how many were dropped at the key limit.
    pub(crate) async fn apply(&self, deltas: Vec<Delta>) -> Result<u64, AggregatorError> {
        let n = self.owners.len();
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
            self.owners[owner]
                .writes
                .send(Apply { deltas, done })
                .await
                .map_err(|_| AggregatorError::OwnerStopped)?;
            waits.push(wait);
        }
        let mut dropped = 0;
        for wait in waits {
            dropped += wait.await.map_err(|_| AggregatorError::OwnerStopped)?;
        }
        Ok(dropped)
    }

    /// A flat copy of every owner's store, in owner order, each taken under its read lock
    /// (reads go on meanwhile; writes of that owner wait). Blocking: call it off the runtime.
    pub(crate) fn snapshot(&self) -> Vec<StoreImage> {
        self.owners
            .iter()
            .map(|owner| owner.read().image())
            .collect()
    }

    /// Window counts of `keys`, in the order given.
    pub(crate) fn count(&self, keys: &[String], end_second: i64, window_seconds: u32) -> Vec<u64> {
        let n = self.owners.len();
        let mut by_owner: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (index, key) in keys.iter().enumerate() {
            by_owner[owner_of(key, n)].push(index);
        }
        let mut counts = vec![0; keys.len()];
        for (owner, indexes) in self.owners.iter().zip(by_owner) {
            if indexes.is_empty() {
                continue;
            }
            let store = owner.read();
            for index in indexes {
                counts[index] = store.count(&keys[index], end_second, window_seconds);
            }
        }
        counts
    }

    /// Dense per-step counts of one key.
    pub(crate) fn series(
        &self,
        key: &str,
        start_second: i64,
        step_seconds: u32,
        points: u32,
    ) -> Vec<u64> {
        let owner = &self.owners[owner_of(key, self.owners.len())];
        owner.read().series(key, start_second, step_seconds, points)
    }

    /// The top `limit` keys over every owner: each owner's own top `limit` (a key lives in
    /// exactly one owner, so the global top is among them), merged. Visits every key, each
    /// owner under its read lock.
    pub(crate) fn top(
        &self,
        end_second: i64,
        window_seconds: u32,
        limit: usize,
        prefix: &str,
    ) -> Vec<(String, u64)> {
        let mut merged = Vec::new();
        for owner in &self.owners {
            merged.extend(owner.read().top(end_second, window_seconds, limit, prefix));
        }
        merge_top(merged, limit)
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
    store: Arc<RwLock<WindowStore>>,
    writes: StageReceiver<Apply>,
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
    loop {
        tokio::select! {
            write = writes.recv() => match write {
                Some(Apply { deltas, done }) => {
                    let total = deltas.len() as u64;
                    let dropped = apply(&store, &deltas).await;
                    applied.increment(total - dropped);
                    dropped_total.increment(dropped);
                    // The caller may have gone away; the deltas are applied either way.
                    let _ = done.send(dropped);
                }
                None => break,
            },
            _ = tick.tick() => {
                let now = crate::clock::now_second();
                if now.saturating_sub(evicted_at) >= evict_every {
                    // Keep one extra second beyond retention so a window of exactly `retention`
                    // seconds ending now is always complete. In steps: between two, this task
                    // (the only writer) does nothing else, so only reads see the store.
                    let mut pass = read(&store).eviction(now - retention_seconds);
                    while !write(&store).evict_step(&mut pass, EVICT_CHUNK_BUCKETS) {
                        tokio::task::yield_now().await;
                    }
                    evicted_at = now;
                }
                let store = read(&store);
                keys_gauge.set(store.key_count() as f64);
                counters_gauge.set(store.counter_count() as f64);
                bytes_gauge.set(store.approx_heap_bytes() as f64);
            }
        }
    }
    tracing::debug!(owner = index, "owner stopped");
    Ok(())
}

/// Applies `deltas` to `store`, [`APPLY_CHUNK`] at a time under the write lock, yielding to the
/// runtime between chunks; returns how many were dropped (key limit, or a second out of range).
async fn apply(store: &RwLock<WindowStore>, deltas: &[Delta]) -> u64 {
    let mut dropped = 0u64;
    for chunk in deltas.chunks(APPLY_CHUNK) {
        {
            let mut store = write(store);
            for delta in chunk {
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
        }
        if deltas.len() > APPLY_CHUNK {
            tokio::task::yield_now().await;
        }
    }
    dropped
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn settings(owners: usize) -> OwnerSettings {
        OwnerSettings {
            owners,
            mailbox: 4,
            max_keys: 1000,
            retention_seconds: 3600,
        }
    }

    fn delta(key: &str, second: i64, count: u64) -> Delta {
        Delta {
            key: key.into(),
            second,
            count,
        }
    }

    fn start(owners: usize) -> (Owners, JoinSet<Result<(), AggregatorError>>) {
        let mut tasks = JoinSet::new();
        let owners = Owners::spawn(&settings(owners), Vec::new(), &mut tasks);
        (owners, tasks)
    }

    #[tokio::test]
    async fn reads_merge_every_owner_in_the_order_asked() {
        let (owners, _tasks) = start(4);
        let now = crate::clock::now_second();
        let keys: Vec<String> = (0..50).map(|i| format!("page-{i}")).collect();
        let deltas = keys
            .iter()
            .enumerate()
            .flat_map(|(i, key)| [delta(key, now - 1, i as u64 + 1), delta(key, now, 100)])
            .collect();
        assert_eq!(owners.apply(deltas).await.unwrap(), 0);
        let asked: Vec<String> = keys
            .iter()
            .rev()
            .cloned()
            .chain(["absent".into()])
            .collect();
        let counts = owners.count(&asked, now, 60);
        let expected: Vec<u64> = (0..50u64).rev().map(|i| i + 1 + 100).chain([0]).collect();
        assert_eq!(counts, expected);
        assert_eq!(owners.count(&asked[..1], now, 1), vec![100]);
        assert_eq!(owners.series("page-7", now - 1, 1, 2), vec![8, 100]);
        let top = owners.top(now, 60, 3, "page-");
        assert_eq!(
            top,
            vec![
                ("page-49".to_string(), 150),
                ("page-48".to_string(), 149),
                ("page-47".to_string(), 148)
            ]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn while_the_stores_are_copied_reads_go_on_and_writes_wait() {
        let (owners, _tasks) = start(2);
        let now = crate::clock::now_second();
        owners.apply(vec![delta("a", now, 1)]).await.unwrap();
        // What a checkpoint copy holds, on a thread of its own: every owner's read lock.
        let (held, release) = (
            std::sync::mpsc::sync_channel(1),
            std::sync::mpsc::sync_channel::<()>(1),
        );
        let copier = owners.clone();
        let copy = std::thread::spawn(move || {
            let _copying: Vec<_> = copier.owners.iter().map(Owner::read).collect();
            held.0.send(()).unwrap();
            release.1.recv().unwrap();
        });
        held.1.recv().unwrap();
        // A read is answered meanwhile.
        assert_eq!(owners.count(&["a".to_string()], now, 60), vec![1]);
        // A write waits for the copy...
        let writer = owners.clone();
        let write = tokio::spawn(async move { writer.apply(vec![delta("a", now, 1)]).await });
        // (A plain sleep, not a tokio timer: the owner blocks a worker while it waits, and the
        // timers are driven by the workers.)
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !write.is_finished(),
            "an apply finished while the store was being copied"
        );
        // ...and lands once the copy is done.
        release.0.send(()).unwrap();
        copy.join().unwrap();
        assert_eq!(write.await.unwrap().unwrap(), 0);
        assert_eq!(owners.count(&["a".to_string()], now, 60), vec![2]);
    }
}
