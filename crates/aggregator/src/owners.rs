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
//!
//! # The key limit: a batch is applied whole or refused whole
//!
//! Each owner holds at most `ceil(--max-keys / owners)` keys (the limit is per aggregator, split
//! evenly; keys spread over owners by hash, so an owner can fill a little before the aggregator
//! holds `--max-keys` in all). A batch whose new keys do not fit is **refused whole**: nothing of
//! it is applied, and [`Owners::apply`] returns [`AggregatorError::KeyLimit`], so the caller
//! does not record it as applied and the producer sends it again later. Half a batch must never
//! be applied: a resend could not tell which half landed, and would count it twice.
//!
//! Owners apply their parts of a batch independently, so "does it fit" must be settled for every
//! owner before any applies anything, and must stay true while other batches (other streams,
//! other producers) are applied meanwhile. That is a *reservation*: before sending its parts,
//! [`Owners::apply`] reserves, in each owner the batch touches (in owner order), room for that
//! part's new keys: `held + reserved + new <= limit`, under the owner's `reserved` lock, reading
//! `held` from the store. If any owner refuses, the reservations already taken are released and
//! the batch is refused; otherwise the parts are sent and each owner releases its part's
//! reservation once it applied it. Why that never overshoots: keys are added only by applies
//! of batches holding a reservation, each adding at most the new keys it reserved for, plus keys
//! that were held at reservation time and evicted since (each such re-add follows the eviction
//! of the same key, so it does not raise the count above the reservation-time figure); an
//! apply raises `held` before its reservation is released, so two reservations never count the
//! same room twice. The store's own check ([`StoreError::KeyLimit`]) therefore never fires on
//! this path; if it ever did (a bug), the delta is counted as dropped and logged as an error.
//!
//! The reservation is cheap far from the limit: every delta of a part is taken to be a new key
//! (an upper bound, no lookups). Only when that bound does not fit are the part's keys looked up
//! in the store, and the exact number of distinct new keys reserved. Near the limit a refusal can
//! be conservative (two batches in flight that bring the same new key each reserve room for it);
//! the refused batch's retry then goes through.
//!
//! The refusal is visible to operators: `hitcounter_aggregator_key_limit_reached` is 1 while
//! batches were refused in the last [`KEY_LIMIT_GAUGE_HOLD`] (it is refreshed every second),
//! `hitcounter_aggregator_batches_total{outcome="refused_key_limit"}` counts refusals, and an
//! error is logged at most once a minute. Reads are unaffected (health stays `SERVING`).

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard,
    },
    time::Duration,
};

use hitcounter_pipeline::{StageReceiver, StageSender};
use hitcounter_proto::aggregator::v1::Delta;
use hitcounter_stack::shard::owner_of;
use hitcounter_window::{StoreError, StoreImage, StoreLimits, WindowStore};
use tokio::{sync::oneshot, task::JoinSet};
use tracing::Instrument;

use crate::error::{AggregatorError, KeyLimitRefusal};

/// How long `hitcounter_aggregator_key_limit_reached` stays 1 after the last refusal: a producer
/// retries a refused batch at least every second, so while the limit holds batches back the
/// gauge stays up, and it falls within seconds once they go through.
pub(crate) const KEY_LIMIT_GAUGE_HOLD: Duration = Duration::from_secs(10);

/// At most one error log per this many seconds about refused batches (a stuck producer retries
/// every second; one line a minute is enough to say it is still happening).
const KEY_LIMIT_LOG_EVERY_SECONDS: i64 = 60;

/// Deltas applied under one hold of the write lock. About 100 µs of work with a store of a
/// million keys: the longest a read waits for an apply, and long enough that taking the lock
/// costs nothing.
const APPLY_CHUNK: usize = 1024;

/// Buckets of the key table (at most 7 keys per 8) visited by eviction under one hold of the
/// write lock. A whole pass over 100k keys took 5–10 ms, a stall of every read behind it; a
/// step is a few hundred microseconds.
const EVICT_CHUNK_BUCKETS: usize = 4096;

/// A batch of deltas for one owner, the room reserved for its new keys (released by the owner
/// once applied), and where to report how many deltas it dropped.
struct Apply {
    deltas: Vec<Delta>,
    reserved: usize,
    done: oneshot::Sender<u64>,
}

/// One owner's store: written by its owner task only, read by anyone.
#[derive(Clone)]
struct Owner {
    index: usize,
    writes: StageSender<Apply>,
    store: Arc<RwLock<WindowStore>>,
    /// Room promised to parts admitted but not yet applied (see "The key limit" above).
    reserved: Arc<Mutex<usize>>,
    /// The most keys this owner may hold.
    max_keys: usize,
}

impl Owner {
    fn read(&self) -> RwLockReadGuard<'_, WindowStore> {
        read(&self.store)
    }

    fn reserved(&self) -> std::sync::MutexGuard<'_, usize> {
        lock_reserved(&self.reserved)
    }

    /// Reserves room for the new keys of `part`; returns how much was reserved.
    fn reserve(&self, part: &[Delta]) -> Result<usize, KeyLimitRefusal> {
        let mut reserved = self.reserved();
        // Far from the limit: take every delta for a new key (an upper bound, no lookups).
        let bound = part.iter().filter(|delta| delta.count > 0).count();
        let held = self.read().key_count();
        if held + *reserved + bound <= self.max_keys {
            *reserved += bound;
            return Ok(bound);
        }
        // Near it: the exact number of distinct keys the store does not hold.
        let (held, new) = {
            let store = self.read();
            let new: HashSet<&str> = part
                .iter()
                .filter(|delta| delta.count > 0 && !store.contains_key(&delta.key))
                .map(|delta| delta.key.as_str())
                .collect();
            (store.key_count(), new.len())
        };
        if held + *reserved + new <= self.max_keys {
            *reserved += new;
            return Ok(new);
        }
        Err(KeyLimitRefusal {
            owner: self.index,
            limit: self.max_keys,
            held,
            reserved: *reserved,
            new,
        })
    }

    fn release(&self, room: usize) {
        release(&self.reserved, room);
    }
}

fn lock_reserved(reserved: &Mutex<usize>) -> std::sync::MutexGuard<'_, usize> {
    // Only additions and subtractions happen under it: a poisoned count is still right.
    reserved.lock().unwrap_or_else(|e| e.into_inner())
}

fn release(reserved: &Mutex<usize>, room: usize) {
    let mut reserved = lock_reserved(reserved);
    *reserved = reserved.saturating_sub(room);
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
    /// Key-limit refusals, for the gauge and the rate-limited log.
    refusals: Arc<Refusals>,
}

/// When batches were last refused at the key limit (Unix seconds; `i64::MIN`: never).
struct Refusals {
    last: AtomicI64,
    logged: AtomicI64,
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
        let refusals = Arc::new(Refusals {
            last: AtomicI64::new(i64::MIN),
            logged: AtomicI64::new(i64::MIN),
        });
        let mut stores = stores.into_iter();
        let owners = (0..owners)
            .map(|index| {
                let (writes, mailbox) =
                    hitcounter_pipeline::channel("aggregator_owner_mailbox", settings.mailbox);
                let store = stores.next().unwrap_or_else(|| WindowStore::new(limits));
                let store = Arc::new(RwLock::new(store));
                let reserved = Arc::new(Mutex::new(0));
                let retention = i64::from(settings.retention_seconds);
                let task = OwnerTask {
                    index,
                    store: Arc::clone(&store),
                    reserved: Arc::clone(&reserved),
                    refusals: (index == 0).then(|| Arc::clone(&refusals)),
                };
                tasks.spawn(
                    run_owner(task, mailbox, retention)
                        .instrument(tracing::info_span!("apply", owner = index)),
                );
                Owner {
                    index,
                    writes,
                    store,
                    reserved,
                    max_keys: limits.max_keys,
                }
            })
            .collect();
        Self { owners, refusals }
    }

    /// Applies a batch of deltas whole, or nothing of it; returns how many deltas were dropped
    /// because they can never be applied (a second out of range: ingest never sends one).
    ///
    /// # Errors
    /// [`AggregatorError::KeyLimit`] when the batch's new keys do not fit under the key limit:
    /// nothing of it was applied (see "The key limit" in the module docs), send it again later.
    /// [`AggregatorError::OwnerStopped`] when an owner is gone (shutting down).
    pub(crate) async fn apply(&self, deltas: Vec<Delta>) -> Result<u64, AggregatorError> {
        let n = self.owners.len();
        let mut parts: Vec<Vec<Delta>> = (0..n).map(|_| Vec::new()).collect();
        for delta in deltas {
            parts[owner_of(&delta.key, n)].push(delta);
        }
        // Reserve room in every owner the batch touches before any of them applies anything.
        let mut rooms = vec![0; n];
        for (owner, part) in parts.iter().enumerate() {
            if part.is_empty() {
                continue;
            }
            match self.owners[owner].reserve(part) {
                Ok(room) => rooms[owner] = room,
                Err(refusal) => {
                    for (owner, room) in rooms.iter().enumerate().take(owner) {
                        self.owners[owner].release(*room);
                    }
                    self.refused(&refusal);
                    return Err(AggregatorError::KeyLimit(refusal));
                }
            }
        }
        let mut waits = Vec::with_capacity(n);
        let mut parts = parts.into_iter().enumerate();
        while let Some((owner, deltas)) = parts.next() {
            if deltas.is_empty() {
                continue;
            }
            let (done, wait) = oneshot::channel();
            let reserved = rooms[owner];
            if self.owners[owner]
                .writes
                .send(Apply {
                    deltas,
                    reserved,
                    done,
                })
                .await
                .is_err()
            {
                // Shutting down: give back what the parts not sent reserved.
                self.owners[owner].release(reserved);
                for (owner, _) in parts {
                    self.owners[owner].release(rooms[owner]);
                }
                return Err(AggregatorError::OwnerStopped);
            }
            waits.push(wait);
        }
        let mut dropped = 0;
        for wait in waits {
            dropped += wait.await.map_err(|_| AggregatorError::OwnerStopped)?;
        }
        Ok(dropped)
    }

    /// Notes a refusal: the gauge now, an error log at most once a minute.
    fn refused(&self, refusal: &KeyLimitRefusal) {
        let now = crate::clock::now_second();
        self.refusals.last.store(now, Ordering::Relaxed);
        metrics::gauge!("hitcounter_aggregator_key_limit_reached").set(1.0);
        let logged = self.refusals.logged.load(Ordering::Relaxed);
        if now.saturating_sub(logged) >= KEY_LIMIT_LOG_EVERY_SECONDS
            && self
                .refusals
                .logged
                .compare_exchange(logged, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::error!(
                %refusal,
                "key limit reached: refusing batches with new keys (not applied; producers keep \
                 and resend them, and ingest fills its buffer): raise --max-keys, add shards, or \
                 wait for keys to age out of the retention (logged at most once a minute)"
            );
        }
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
        keep: impl Fn(&str) -> bool,
    ) -> Vec<(String, u64)> {
        let mut merged = Vec::new();
        for owner in &self.owners {
            merged.extend(
                owner
                    .read()
                    .top_where(end_second, window_seconds, limit, prefix, &keep),
            );
        }
        merge_top(merged, limit)
    }

    /// Removes every key for which `remove` is true from every owner's store (a clustered
    /// aggregator giving up partitions); returns how many. Each owner's store is held for
    /// writing for its whole pass: its reads and writes wait meanwhile. Blocking: call it off
    /// the runtime.
    pub(crate) fn remove_keys_where(&self, remove: impl Fn(&str) -> bool) -> usize {
        self.owners
            .iter()
            .map(|owner| write(&owner.store).remove_keys_where(&remove))
            .sum()
    }
}

/// Orders by count descending, then key ascending, and keeps the first `limit`.
pub(crate) fn merge_top(mut keys: Vec<(String, u64)>, limit: usize) -> Vec<(String, u64)> {
    keys.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    keys.truncate(limit);
    keys
}

/// What an owner task holds.
struct OwnerTask {
    index: usize,
    store: Arc<RwLock<WindowStore>>,
    reserved: Arc<Mutex<usize>>,
    /// Owner 0 only: it refreshes the aggregator-wide key-limit gauge.
    refusals: Option<Arc<Refusals>>,
}

async fn run_owner(
    task: OwnerTask,
    writes: StageReceiver<Apply>,
    retention_seconds: i64,
) -> Result<(), AggregatorError> {
    let OwnerTask {
        index,
        store,
        reserved,
        refusals,
    } = task;
    let label = index.to_string();
    let keys_gauge = metrics::gauge!("hitcounter_aggregator_keys", "owner" => label.clone());
    let counters_gauge =
        metrics::gauge!("hitcounter_aggregator_counters", "owner" => label.clone());
    let bytes_gauge = metrics::gauge!("hitcounter_aggregator_store_bytes", "owner" => label);
    let applied = metrics::counter!("hitcounter_aggregator_deltas_applied_total");
    let reached_gauge = metrics::gauge!("hitcounter_aggregator_key_limit_reached");
    let hold = KEY_LIMIT_GAUGE_HOLD.as_secs() as i64;
    // Gauges every second; eviction every `evict_every` seconds (see the module docs).
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let evict_every = (retention_seconds / 64).max(1);
    let mut evicted_at = i64::MIN;
    loop {
        tokio::select! {
            write = writes.recv() => match write {
                Some(Apply { deltas, reserved: room, done }) => {
                    let total = deltas.len() as u64;
                    let dropped = apply(&store, &deltas).await;
                    // After the keys are in the store (see "The key limit" above).
                    release(&reserved, room);
                    applied.increment(total - dropped);
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
                if let Some(refusals) = &refusals {
                    let last = refusals.last.load(Ordering::Relaxed);
                    let recent = now.saturating_sub(last) < hold;
                    reached_gauge.set(if recent { 1.0 } else { 0.0 });
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
/// runtime between chunks; returns how many were dropped (a second out of range; the key limit
/// cannot drop anything here, the batch reserved room for its new keys).
async fn apply(store: &RwLock<WindowStore>, deltas: &[Delta]) -> u64 {
    let mut dropped = 0u64;
    for chunk in deltas.chunks(APPLY_CHUNK) {
        {
            let mut store = write(store);
            for delta in chunk {
                match store.add(&delta.key, delta.second, delta.count) {
                    Ok(()) => {}
                    Err(StoreError::KeyLimit { limit }) => {
                        // Never happens: the batch reserved room (see the module docs).
                        dropped += 1;
                        metrics::counter!("hitcounter_aggregator_deltas_dropped_total", "reason" => "key_limit_bug")
                            .increment(1);
                        tracing::error!(
                            limit,
                            key = %delta.key,
                            "BUG: a delta met the key limit despite its batch's reservation; dropped"
                        );
                    }
                    Err(error) => {
                        dropped += 1;
                        metrics::counter!("hitcounter_aggregator_deltas_dropped_total", "reason" => "second_out_of_range")
                            .increment(1);
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
        let top = owners.top(now, 60, 3, "page-", |_| true);
        assert_eq!(
            top,
            vec![
                ("page-49".to_string(), 150),
                ("page-48".to_string(), 149),
                ("page-47".to_string(), 148)
            ]
        );
    }

    /// A batch whose new keys do not fit in one owner is refused whole: the other owner's part
    /// is not applied either, and the same batch goes through once there is room.
    #[tokio::test]
    async fn a_batch_is_applied_whole_or_refused_whole_at_the_key_limit() {
        let mut tasks = JoinSet::new();
        let settings = OwnerSettings {
            max_keys: 4,
            ..settings(2)
        };
        let owners = Owners::spawn(&settings, Vec::new(), &mut tasks);
        let now = crate::clock::now_second();
        // Keys of owner 0 until it is full (2 keys each), and one key of owner 1.
        let of = |owner: usize| {
            (0..)
                .map(|i| format!("k{i}"))
                .filter(move |k| owner_of(k, 2) == owner)
        };
        let full: Vec<Delta> = of(0).take(2).map(|k| delta(&k, now, 1)).collect();
        assert_eq!(owners.apply(full.clone()).await.unwrap(), 0);
        let other = of(1).next().unwrap();
        let new_in_full = of(0).nth(2).unwrap();
        let batch = vec![delta(&other, now, 5), delta(&new_in_full, now, 7)];
        let refused = owners.apply(batch.clone()).await;
        assert!(
            matches!(&refused, Err(AggregatorError::KeyLimit(r)) if r.owner == 0 && r.new == 1),
            "{refused:?}"
        );
        assert_eq!(
            owners.count(std::slice::from_ref(&other), now, 60),
            vec![0],
            "half applied"
        );
        // Keys already held still take hits.
        assert_eq!(owners.apply(full).await.unwrap(), 0);
        // Room again (the old keys age out): the same batch applies, once.
        for owner in &owners.owners {
            write(&owner.store).evict_before(now + 1);
        }
        assert_eq!(owners.apply(batch).await.unwrap(), 0);
        assert_eq!(owners.count(&[other, new_in_full], now, 60), vec![5, 7]);
        assert_eq!(*owners.owners[0].reserved(), 0, "reservations released");
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
