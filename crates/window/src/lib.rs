//! The sliding-window store of the hit counter: exact hits per key per UTC
//! second, answering "how many hits did key K get in the last N seconds".
//!
//! # What it holds
//!
//! A [`WindowStore`] maps each key to the seconds (Unix seconds, `0..=u32::MAX`)
//! in which it had hits, and to the exact number of hits in each of those
//! seconds. Counts add with saturation at `u64::MAX`; a window sum saturates
//! the same way. Retention is the caller's business: it calls
//! [`WindowStore::evict_before`] periodically and the store forgets older
//! seconds.
//!
//! # Memory layout, and why
//!
//! Memory is proportional to the number of (key, second) pairs that actually
//! had hits, never to the retention: a key hit once an hour costs one counter,
//! not 3600 slots of a ring buffer. Keys with a handful of counters dominate
//! real hit counters, so the cost per key matters as much as the cost per
//! counter.
//!
//! * **One allocation per key**, holding everything about the key (the
//!   `entry` module): a one-byte tag (two flags and, below 63 bytes, the
//!   key's length; longer keys add a varint), the key's bytes, then its
//!   counters sorted by second, packed as little-endian words with no
//!   alignment. The number of counters is not stored: it follows from the
//!   allocation's length.
//! * **8-byte counters**, a `u32` second and a `u32` count, for as long as
//!   every count of the key fits in a `u32`. When one would not, the key's
//!   entry switches to 12-byte counters (second, low and high halves of a
//!   `u64` count), so counts stay exact, saturating at `u64::MAX`; it switches
//!   back once eviction leaves only small counts.
//! * **No spare capacity below 16 counters**: a new second grows the entry by
//!   exactly 8 bytes (a `realloc`, which the allocator does in place about
//!   half the time, its size classes being 16 bytes apart there). Longer
//!   series keep up to 1/16 spare on growth (at most 64 slots), so appending
//!   stays amortised O(1), and eviction shrinks an entry left with more than
//!   1/8 spare. A `Vec` doubling its capacity would leave a key with 10
//!   counters holding 16.
//! * **The key table** is a `hashbrown::HashTable` of the entries' pointers
//!   (`Box<[u8]>`, 16 bytes, plus hashbrown's control byte), hashed with
//!   `foldhash` over the key's bytes, split in [`SUB_TABLES`] tables by bits
//!   of that hash: a table that is full rehashes every key it holds in one
//!   `add` (measured with `examples/growth.rs`: 39–81 ms at 917k keys in one
//!   table, a stall of every read of the store), so each growth moves a
//!   sixteenth of the keys. The slots add up to what one table would have.
//!
//! For the benchmark's 1,000,000 keys of 16 bytes with 10 hits each at random
//! seconds over 300 s (9.85 counters per key), an entry is 1 + 16 + 9.85 × 8
//! ≈ 96 bytes, 112 once the allocator rounds it (11.4 bytes per counter), and
//! the table is 2^21 slots × 17 bytes = 35.7 MB (3.6 bytes per counter, at
//! 48% load: a million keys is just past what 2^20 slots take).
//! `examples/memory.rs` measures the growth of the process's RSS per counter:
//!
//! | load order, keys | glibc `malloc` | mimalloc (the aggregator's) | previous layout (glibc / mimalloc) |
//! | --- | --- | --- | --- |
//! | key after key (as `hitcounter-bench` loads), 1M | 15.0 | 15.0 | 33.0 / 30.0 |
//! | key after key, 100k | 13.6 | 12.6 | 29.8 / 27.6 |
//! | shuffled (all keys grow in turn, out of order), 1M | 18.0 | 23.8 | 41.7 / 39.1 |
//! | shuffled, 100k | 16.7 | 20.9 | 38.4 / 35.7 |
//!
//! The previous layout was a `HashMap<Box<str>, Vec<12-byte counter>>`: a
//! 40-byte map slot, a separate key allocation (32 bytes with glibc) and a
//! counter buffer doubling to 16 counters (192 bytes) for 10. The shuffled
//! load is the harsh case for any allocator: every entry moves through every
//! size class in turn, and the pages of the smaller classes stay pinned by the
//! few keys that stopped growing there.
//!
//! What exact growth costs in time (same runs, best of 3 to 5 on a shared
//! 2-core VM, keys visited in random order): an add in the newest second of a
//! key (the hot path: a key is hit many times per second) never reallocates,
//! and is as fast as before or faster (1.0 to 2.2 times), because one
//! allocation means one cache miss fewer, and because it reads the newest
//! counter at the end of the allocation, an address the CPU knows from the
//! table slot before the entry's header arrives. Window counts run at 0.9 to
//! 3 times their old speed: up to 32 counters are summed in one branch-free
//! pass, so the entry's cache lines are fetched in parallel. The first hit of
//! a new second calls the allocator: on its own, that path runs at 0.3 to 0.7
//! times its old speed (mimalloc does better than glibc, whose `realloc`
//! consolidates free lists). With four more hits in the same second, the mix
//! is on par with mimalloc (1M keys: 4.2 M adds/s, before 4.1) and 25% slower
//! with glibc (2.9 against 3.9).
//!
//! Reads need no unpacking: a narrow window sum adds the `u32` counts in one
//! `u64` (at most 2^32 counters below 2^32 each cannot overflow it); a wide
//! one adds the low and high halves in two `u64`s and recombines them once.
//!
//! Invariants of every entry: seconds strictly increasing (so no duplicate
//! seconds), no zero counts, never empty (an emptied key is removed), wide
//! only while some count needs it.
//!
//! # Snapshots
//!
//! [`WindowStore::image`] copies every entry, without its spare slots, into
//! one exact-size buffer: a [`StoreImage`], iterated like the store. It is
//! about the size of the entries alone (9.7 bytes per counter for the
//! benchmark above, 0.14 s for a million keys), where a deep `clone` makes an
//! allocation per key and a second table.
//!
//! # Complexity
//!
//! With `n` the counters of the key concerned, `w` the counters inside a
//! window, `K` the number of keys in the store and `B` the bytes of all
//! entries:
//!
//! | operation | time | extra memory |
//! | --- | --- | --- |
//! | [`add`](WindowStore::add), second equal to the key's newest (hot path) | O(1) + hashing the key | — |
//! | [`add`](WindowStore::add), new newest second | O(1) amortised + hashing; below 16 counters a `realloc` by 8 bytes (O(n) copy when not in place) | — |
//! | [`add`](WindowStore::add), older second | O(log n) search + O(n) shift, and the growth above | — |
//! | [`add`](WindowStore::add), a count passing `u32::MAX` | O(n) once, rewriting the entry wide | 4 bytes per counter |
//! | [`count`](WindowStore::count) | O(n) for n ≤ 32 (one branch-free pass), else O(log n + w) | — |
//! | [`series`](WindowStore::series) | O(log n + w + points) | the `points` result |
//! | [`top`](WindowStore::top) | O(K (prefix test + count) + K log limit) | O(limit) heap |
//! | [`evict_before`](WindowStore::evict_before) | O(K + counters dropped + counters moved) | — |
//! | [`evict_step`](WindowStore::evict_step) | O(buckets + counters dropped + counters moved) | — |
//! | [`key_count`](WindowStore::key_count), [`counter_count`](WindowStore::counter_count), [`approx_heap_bytes`](WindowStore::approx_heap_bytes) | O(1) | — |
//! | [`image`](WindowStore::image) | O(K + B) | one buffer of about B |
//!
//! # Windows
//!
//! A window of `N` seconds ending at `E` covers the seconds `s` with
//! `E - N < s <= E`: `N` seconds, `E` included. A window of 0 seconds covers
//! nothing. Query bounds are plain `i64`s and are never rejected: seconds
//! below 0 or above `u32::MAX` simply hold no hits.
//!
//! # Example
//!
//! ```
//! use hitcounter_window::{StoreLimits, WindowStore};
//!
//! let mut store = WindowStore::new(StoreLimits::default());
//! store.add("/home", 100, 3)?;
//! store.add("/home", 101, 2)?;
//! store.add("/about", 101, 1)?;
//!
//! assert_eq!(store.count("/home", 101, 2), 5); // seconds 100 and 101
//! assert_eq!(store.count("/home", 101, 1), 2); // second 101 only
//! assert_eq!(store.series("/home", 100, 1, 3), vec![3, 2, 0]);
//! assert_eq!(
//!     store.top(101, 60, 10, "/"),
//!     vec![("/home".to_owned(), 5), ("/about".to_owned(), 1)]
//! );
//! // A flat snapshot, for a checkpoint: the same items as `store.iter()`.
//! let image = store.image();
//! assert_eq!((image.key_count(), image.counter_count()), (2, 3));
//!
//! assert_eq!(store.evict_before(101), 1);
//! # Ok::<(), hitcounter_window::StoreError>(())
//! ```

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::hash::BuildHasher;

use counters::Counters;
use entry::Entry;
pub use image::StoreImage;

mod counters;
mod entry;
mod image;
#[cfg(test)]
mod tests;

/// Limits of a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreLimits {
    /// Most distinct keys the store holds at once; adding hits for a new key
    /// beyond it fails with [`StoreError::KeyLimit`].
    pub max_keys: usize,
}

impl StoreLimits {
    /// The default [`max_keys`](Self::max_keys): ten million.
    pub const DEFAULT_MAX_KEYS: usize = 10_000_000;
}

impl Default for StoreLimits {
    fn default() -> Self {
        Self {
            max_keys: Self::DEFAULT_MAX_KEYS,
        }
    }
}

/// Why [`WindowStore::add`] refused hits. Nothing was changed when it does.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    /// The hits were for a new key and the store already holds
    /// [`StoreLimits::max_keys`] keys.
    #[error("key limit of {limit} keys reached")]
    KeyLimit {
        /// The limit in force.
        limit: usize,
    },
    /// The second is below 0 or above `u32::MAX`.
    #[error("second {second} is out of range")]
    SecondOutOfRange {
        /// The second given.
        second: i64,
    },
}

/// The hash state of a store's table: `foldhash`, seeded at random per store. The seedable
/// variant (16 bytes instead of 8, once per store) lets tests replay a seed: how keys fall into
/// buckets decides when tables grow and shrink, and a bug there showed for 1 seed in 40.
type HashState = foldhash::fast::SeedableRandomState;

/// Tables the keys are split over (see the [crate docs](crate)); a power of two.
pub const SUB_TABLES: usize = 16;

/// The table of a key's hash. hashbrown takes a bucket from the low bits and a
/// tag from the top 7; bits 40–43 are neither, so the keys of one table are
/// still spread over all its buckets.
fn sub_table(hash: u64) -> usize {
    (hash >> 40) as usize & (SUB_TABLES - 1)
}

/// Upper bound of the count varint that prefixes each image record: a key
/// holds at most 2^32 counters (one per `u32` second), 5 varint bytes.
const IMAGE_COUNT_VARINT_BYTES: usize = 5;

/// Exact per-second hit counts per key, sparse in time. See the
/// [crate docs](crate) for the layout and the cost of each operation.
///
/// `Clone` is a deep copy (one allocation per key); to write a checkpoint
/// while the store keeps taking hits, [`image`](Self::image) is cheaper.
#[derive(Clone)]
pub struct WindowStore {
    limits: StoreLimits,
    /// One [`Entry`] per key, found by the hash of the key's bytes, in the
    /// table [`sub_table`] of that hash picks ([`SUB_TABLES`] of them).
    tables: Box<[hashbrown::HashTable<Entry>]>,
    hash_state: HashState,
    /// Total counters over all keys, kept up to date by `add` and `evict_before`.
    counters: usize,
    /// Total bytes of all entries, kept up to date wherever an entry is
    /// created, resized or removed, so `approx_heap_bytes` is O(1).
    entry_bytes: usize,
}

impl WindowStore {
    /// An empty store with the given limits. Nothing is allocated up front.
    pub fn new(limits: StoreLimits) -> Self {
        Self {
            limits,
            tables: (0..SUB_TABLES)
                .map(|_| hashbrown::HashTable::new())
                .collect(),
            hash_state: HashState::random(),
            counters: 0,
            entry_bytes: 0,
        }
    }

    /// An empty store whose key hashes come from `seed` instead of a random seed, so that a
    /// test sees the same table layout on every run.
    #[cfg(test)]
    pub(crate) fn with_hash_seed(limits: StoreLimits, seed: u64) -> Self {
        Self {
            hash_state: HashState::with_seed(seed, foldhash::SharedSeed::global_fixed()),
            ..Self::new(limits)
        }
    }

    /// The limits the store was made with.
    pub fn limits(&self) -> StoreLimits {
        self.limits
    }

    fn hash(&self, key: &[u8]) -> u64 {
        self.hash_state.hash_one(key)
    }

    /// The entry of `key`, if the store holds it.
    fn find_entry(&self, key: &str) -> Option<&Entry> {
        let key = key.as_bytes();
        let hash = self.hash(key);
        self.tables[sub_table(hash)].find(hash, |entry| entry.key() == key)
    }

    /// Every entry, table after table.
    fn entries(&self) -> impl Iterator<Item = &Entry> + '_ {
        self.tables.iter().flat_map(|table| table.iter())
    }

    /// Every key with its counters as `(second, count)` in increasing second order, keys in no
    /// particular order. For writing snapshots; restore with [`WindowStore::add`].
    pub fn iter(&self) -> impl Iterator<Item = (&str, impl Iterator<Item = (i64, u64)> + '_)> + '_ {
        self.entries().map(|entry| {
            let counters = entry
                .counters()
                .iter()
                .map(|(second, count)| (i64::from(second), count));
            (key_text(entry.key()), counters)
        })
    }

    /// A flat snapshot of every key and counter, for writing a checkpoint
    /// while the store keeps taking hits: one exact-size buffer about the
    /// size of the keys and counters themselves, instead of the one
    /// allocation per key of a [`clone`](Clone::clone). Iterating it gives
    /// the same items as [`iter`](Self::iter).
    pub fn image(&self) -> StoreImage {
        // Each record is the entry without its spare slots, plus a count
        // varint, so this bounds the total; the boxing below trims the rest.
        let keys = self.key_count();
        let bound = self.entry_bytes + keys * IMAGE_COUNT_VARINT_BYTES;
        let mut records = Vec::with_capacity(bound);
        for entry in self.entries() {
            entry.write_image_record(&mut records);
        }
        StoreImage::new(records.into_boxed_slice(), keys, self.counters)
    }

    /// Adds `count` hits of `key` in `second`.
    ///
    /// # Errors
    ///
    /// * [`StoreError::SecondOutOfRange`] when `second < 0` or
    ///   `second > u32::MAX` (checked first).
    /// * [`StoreError::KeyLimit`] when `key` is new and the store already holds
    ///   [`StoreLimits::max_keys`] keys. Keys already held keep accepting hits.
    ///
    /// Nothing is changed on error. A `count` of 0 is valid and changes
    /// nothing either: it creates neither a key nor a counter (so it never
    /// hits the key limit).
    pub fn add(&mut self, key: &str, second: i64, count: u64) -> Result<(), StoreError> {
        let second = u32::try_from(second).map_err(|_| StoreError::SecondOutOfRange { second })?;
        if count == 0 {
            return Ok(());
        }
        let key_bytes = key.as_bytes();
        let hash = self.hash(key_bytes);
        let table = sub_table(hash);
        if let Some(entry) = self.tables[table].find_mut(hash, |entry| entry.key() == key_bytes) {
            let before = entry.heap_bytes();
            if entry.add(second, count) {
                self.counters += 1;
            }
            self.entry_bytes = self.entry_bytes - before + entry.heap_bytes();
            return Ok(());
        }
        if self.key_count() >= self.limits.max_keys {
            return Err(StoreError::KeyLimit {
                limit: self.limits.max_keys,
            });
        }
        let entry = Entry::new(key, second, count);
        self.entry_bytes += entry.heap_bytes();
        self.counters += 1;
        let hash_state = &self.hash_state;
        self.tables[table].insert_unique(hash, entry, |entry| hash_state.hash_one(entry.key()));
        Ok(())
    }

    /// Sum of the counts of `key`'s seconds `s` with
    /// `end_second - window_seconds < s <= end_second`, saturated at
    /// `u64::MAX`. An unknown key, or a window of 0 seconds, gives 0.
    pub fn count(&self, key: &str, end_second: i64, window_seconds: u32) -> u64 {
        match self.find_entry(key) {
            Some(entry) => window_sum(entry.counters(), end_second, window_seconds),
            None => 0,
        }
    }

    /// `points` dense sums of `key`'s hits: point `i` covers the seconds
    /// `[start_second + i * step, start_second + (i + 1) * step)`, with
    /// `step = max(step_seconds, 1)`. Each sum saturates at `u64::MAX`. An
    /// unknown key gives `points` zeros.
    ///
    /// The result is `points` words long whatever the store holds, so callers
    /// facing untrusted input should bound `points`.
    pub fn series(&self, key: &str, start_second: i64, step_seconds: u32, points: u32) -> Vec<u64> {
        let mut sums = vec![0u64; points as usize];
        let Some(entry) = self.find_entry(key) else {
            return sums;
        };
        let step = i128::from(step_seconds.max(1));
        let start = i128::from(start_second);
        // Last second covered: start + points * step - 1, computed in i128
        // (points * step can reach 2^64) and clamped to i64 for the search.
        let last = start + i128::from(points) * step - 1;
        let last = i64::try_from(last).unwrap_or(i64::MAX);
        for (second, count) in entry.counters().range(start_second, last).iter() {
            let offset = i128::from(second) - start;
            // 0 <= offset / step < points, by the range bounds.
            let Ok(point) = usize::try_from(offset / step) else {
                continue;
            };
            if let Some(sum) = sums.get_mut(point) {
                *sum = sum.saturating_add(count);
            }
        }
        sums
    }

    /// Up to `limit` `(key, count)` pairs, for the keys starting with `prefix`
    /// (an empty prefix selects every key) whose count in the window
    /// (the same window as [`count`](Self::count)) is above 0; sorted by count
    /// descending, then key ascending. Exact.
    ///
    /// Every selected key is summed, but only the best `limit` so far are kept,
    /// in a bounded min-heap: memory is O(`limit`), not O(keys).
    pub fn top(
        &self,
        end_second: i64,
        window_seconds: u32,
        limit: usize,
        prefix: &str,
    ) -> Vec<(String, u64)> {
        self.top_where(end_second, window_seconds, limit, prefix, |_| true)
    }

    /// [`top`](Self::top) among the keys for which `keep` is true (a clustered aggregator
    /// answers only for the partitions it can serve).
    pub fn top_where(
        &self,
        end_second: i64,
        window_seconds: u32,
        limit: usize,
        prefix: &str,
        keep: impl Fn(&str) -> bool,
    ) -> Vec<(String, u64)> {
        if limit == 0 || window_seconds == 0 {
            return Vec::new();
        }
        let prefix = prefix.as_bytes();
        // An entry orders higher when it ranks better: higher count, then
        // smaller key. Reverse makes the max-heap a min-heap, so the root is
        // the worst entry kept, the one a better candidate evicts. Keys are
        // compared as bytes, which is how `str` orders too.
        let mut heap: BinaryHeap<Reverse<Ranked<'_>>> =
            BinaryHeap::with_capacity(limit.min(self.key_count()));
        for entry in self.entries() {
            let key = entry.key();
            if !key.starts_with(prefix) || !keep(key_text(key)) {
                continue;
            }
            let count = window_sum(entry.counters(), end_second, window_seconds);
            if count == 0 {
                continue;
            }
            let candidate = Reverse((count, Reverse(key)));
            if heap.len() < limit {
                heap.push(candidate);
            } else if let Some(mut worst) = heap.peek_mut() {
                // `candidate < *worst` means the candidate ranks better.
                if candidate < *worst {
                    *worst = candidate;
                }
            }
        }
        // Ascending order of Reverse(rank) is best rank first.
        heap.into_sorted_vec()
            .into_iter()
            .map(|Reverse((count, Reverse(key)))| (key_text(key).to_owned(), count))
            .collect()
    }

    /// Drops every counter with second < `min_second`, and every key left
    /// with none. Returns how many counters were dropped.
    ///
    /// Entries left with many spare slots are shrunk (see the crate docs), and
    /// the key table is shrunk when less than a quarter full, so that memory
    /// follows live data after a burst. This is one whole
    /// [`eviction`](Self::eviction) pass; a caller that must stay responsive
    /// with many keys runs the pass in steps instead.
    pub fn evict_before(&mut self, min_second: i64) -> usize {
        let mut pass = self.eviction(min_second);
        while !self.evict_step(&mut pass, usize::MAX) {}
        pass.dropped
    }

    /// Starts an eviction pass of the counters with second < `min_second`, to
    /// be run by [`evict_step`](Self::evict_step) until it returns `true`.
    ///
    /// The pass walks the key tables, one after the other, by bucket index.
    /// Removing a key does not move the others, so reads between steps are
    /// fine. Adding keys between steps may grow a table and reorder it; the
    /// pass then still ends, but may miss keys, which the next pass evicts.
    pub fn eviction(&self, min_second: i64) -> EvictionPass {
        EvictionPass {
            min_second,
            next_table: 0,
            next_bucket: 0,
            dropped: 0,
        }
    }

    /// Runs the next `buckets` buckets of the key tables through `pass`;
    /// returns `true` when the pass is over (each table is shrunk once the
    /// pass is through it, if it is less than a quarter full).
    ///
    /// A step costs O(`buckets`) plus the counters it drops or moves; a table
    /// holds at most 7 keys per 8 buckets.
    pub fn evict_step(&mut self, pass: &mut EvictionPass, buckets: usize) -> bool {
        if pass.min_second <= 0 || self.counters == 0 {
            return true;
        }
        let mut budget = buckets;
        while pass.next_table < self.tables.len() {
            let table = &mut self.tables[pass.next_table];
            let end = pass
                .next_bucket
                .saturating_add(budget)
                .min(table.num_buckets());
            budget -= end - pass.next_bucket;
            for bucket in pass.next_bucket..end {
                let Some(entry) = table.get_bucket_mut(bucket) else {
                    continue;
                };
                let before = entry.heap_bytes();
                let eviction = entry.evict_before(pass.min_second);
                let after = entry.heap_bytes();
                pass.dropped += eviction.dropped;
                self.counters -= eviction.dropped;
                self.entry_bytes -= before;
                if eviction.left == 0 {
                    if let Ok(empty) = table.get_bucket_entry(bucket) {
                        empty.remove();
                    }
                } else {
                    self.entry_bytes += after;
                }
            }
            pass.next_bucket = end;
            if end < table.num_buckets() {
                return false;
            }
            // This table is done: shrink it if less than a quarter of its buckets
            // hold a key (that reorders it, and nothing of it is visited again in
            // this pass). Compared with the buckets, not `capacity()`: hashbrown's
            // capacity leaves out the slots of removed keys, so a nearly full table
            // emptied by eviction has capacity 0 and would keep its memory.
            if table.len() < table.num_buckets() / 4 {
                let hash_state = &self.hash_state;
                table.shrink_to_fit(|entry| hash_state.hash_one(entry.key()));
            }
            pass.next_table += 1;
            pass.next_bucket = 0;
            if budget == 0 {
                return pass.next_table == self.tables.len();
            }
        }
        true
    }

    /// Removes every key for which `remove` is true, with its counters; returns how many keys
    /// were removed. One pass over every key (a clustered aggregator giving up partitions);
    /// the key tables are shrunk when less than a quarter full, as after eviction.
    pub fn remove_keys_where(&mut self, remove: impl Fn(&str) -> bool) -> usize {
        let mut removed = 0;
        let hash_state = &self.hash_state;
        for table in self.tables.iter_mut() {
            table.retain(|entry| {
                if !remove(key_text(entry.key())) {
                    return true;
                }
                removed += 1;
                self.counters -= entry.counters().len();
                self.entry_bytes -= entry.heap_bytes();
                false
            });
            if table.len() < table.num_buckets() / 4 {
                table.shrink_to_fit(|entry| hash_state.hash_one(entry.key()));
            }
        }
        removed
    }

    /// Whether the store holds `key` (a key is held while it has at least one counter): adding
    /// hits of a key held never meets the key limit.
    pub fn contains_key(&self, key: &str) -> bool {
        self.find_entry(key).is_some()
    }

    /// Number of keys held (every key held has at least one counter).
    pub fn key_count(&self) -> usize {
        self.tables.iter().map(hashbrown::HashTable::len).sum()
    }

    /// Number of (key, second) counters held.
    pub fn counter_count(&self) -> usize {
        self.counters
    }

    /// Rough heap bytes held, for a metric: the key table's allocation (slots
    /// and control bytes) and the entries' bytes (keys, counters and spare
    /// slots). Allocator overhead (headers and size-class rounding, about
    /// 15 bytes per key with glibc) is not counted. O(1).
    pub fn approx_heap_bytes(&self) -> usize {
        self.tables
            .iter()
            .map(hashbrown::HashTable::allocation_size)
            .sum::<usize>()
            + self.entry_bytes
    }
}

impl Default for WindowStore {
    /// An empty store with [`StoreLimits::default`].
    fn default() -> Self {
        Self::new(StoreLimits::default())
    }
}

impl fmt::Debug for WindowStore {
    /// A summary: the limits and sizes, not the contents.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WindowStore")
            .field("limits", &self.limits)
            .field("keys", &self.key_count())
            .field("counters", &self.counter_count())
            .finish_non_exhaustive()
    }
}

/// A candidate of [`WindowStore::top`]: its window count and its key's bytes,
/// ordered so that a better rank is greater.
type Ranked<'a> = (u64, Reverse<&'a [u8]>);

/// A stored key's bytes as text.
///
/// Keys are only ever stored by copying a `&str`, and the layout code never
/// splits them, so this cannot fail; it is still checked because safe code
/// cannot skip the check (short keys make it cheap).
fn key_text(key: &[u8]) -> &str {
    std::str::from_utf8(key).expect("stored keys are copies of &str")
}

/// An eviction pass in progress (see [`WindowStore::eviction`]).
#[derive(Debug, Clone)]
pub struct EvictionPass {
    min_second: i64,
    /// The table, and the bucket in it, where the next step starts.
    next_table: usize,
    next_bucket: usize,
    dropped: usize,
}

impl EvictionPass {
    /// Counters dropped so far by this pass.
    pub fn dropped(&self) -> usize {
        self.dropped
    }
}

/// Sum of `counters` over the window `end - window < s <= end`.
fn window_sum(counters: Counters<'_>, end_second: i64, window_seconds: u32) -> u64 {
    if window_seconds == 0 {
        return 0;
    }
    // first = end - window + 1; saturating keeps it sane for end near i64::MIN
    // (nothing is stored there anyway).
    let first = end_second
        .saturating_sub(i64::from(window_seconds))
        .saturating_add(1);
    counters.sum_between(first, end_second)
}

#[cfg(test)]
impl WindowStore {
    /// Panics unless every internal invariant holds.
    pub(crate) fn check_invariants(&self) {
        let mut total = 0;
        let mut bytes = 0;
        for entry in self.entries() {
            entry.check_invariants();
            let found = self.find_entry(key_text(entry.key()));
            assert!(
                found.is_some_and(|found| std::ptr::eq(found, entry)),
                "key {:?} is not found under its own hash",
                key_text(entry.key())
            );
            total += entry.counters().len();
            bytes += entry.heap_bytes();
        }
        assert_eq!(total, self.counters, "counter total is stale");
        assert_eq!(bytes, self.entry_bytes, "entry byte total is stale");
        assert!(
            self.key_count() <= self.limits.max_keys,
            "key limit exceeded"
        );
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    fn store() -> WindowStore {
        WindowStore::new(StoreLimits::default())
    }

    fn pairs(items: &[(&str, u64)]) -> Vec<(String, u64)> {
        items.iter().map(|&(k, c)| (k.to_owned(), c)).collect()
    }

    #[test]
    fn keys_spread_over_every_sub_table() {
        let mut s = store();
        for i in 0..16_000 {
            s.add(&format!("/page/{i}"), 1, 1).unwrap();
        }
        // A growth rehashes one table: none may hold much more than its share.
        for (i, table) in s.tables.iter().enumerate() {
            assert!(
                (500..=1500).contains(&table.len()),
                "table {i} holds {} of 16000 keys",
                table.len()
            );
        }
        assert_eq!(s.key_count(), 16_000);
        // An eviction pass in steps of one bucket walks every table.
        let mut pass = s.eviction(2);
        let mut steps = 0;
        while !s.evict_step(&mut pass, 1) {
            steps += 1;
        }
        assert!(steps >= 16_000, "{steps} steps");
        assert_eq!(pass.dropped(), 16_000);
        assert_eq!(s.key_count(), 0);
        s.check_invariants();
    }

    #[test]
    fn default_limits() {
        assert_eq!(StoreLimits::default().max_keys, 10_000_000);
        assert_eq!(WindowStore::default().limits(), StoreLimits::default());
    }

    #[test]
    fn window_excludes_start_and_includes_end() -> Result<(), StoreError> {
        let mut s = store();
        s.add("k", 10, 1)?;
        s.add("k", 11, 10)?;
        s.add("k", 20, 100)?;
        // Window 10 ending at 20: 10 < s <= 20.
        assert_eq!(s.count("k", 20, 10), 110);
        // Window 11 ending at 20 takes in second 10.
        assert_eq!(s.count("k", 20, 11), 111);
        // Ending just before the hit at 20 excludes it.
        assert_eq!(s.count("k", 19, 10), 11);
        assert_eq!(s.count("k", 19, 9), 10);
        assert_eq!(s.count("k", 20, 1), 100);
        assert_eq!(s.count("k", 10, 1), 1);
        assert_eq!(s.count("k", 9, 100), 0);
        Ok(())
    }

    #[test]
    fn zero_window_and_unknown_key_count_nothing() -> Result<(), StoreError> {
        let mut s = store();
        s.add("k", 10, 1)?;
        assert_eq!(s.count("k", 10, 0), 0);
        assert_eq!(s.count("other", 10, 100), 0);
        assert!(s.top(10, 0, 10, "").is_empty());
        Ok(())
    }

    #[test]
    fn extreme_query_bounds_are_clamped() -> Result<(), StoreError> {
        let mut s = store();
        s.add("k", 0, 1)?;
        s.add("k", i64::from(u32::MAX), 2)?;
        assert_eq!(s.count("k", i64::MAX, u32::MAX), 0);
        assert_eq!(s.count("k", i64::from(u32::MAX) + 1, u32::MAX), 2);
        assert_eq!(s.count("k", i64::from(u32::MAX), u32::MAX), 2);
        assert_eq!(s.count("k", i64::from(u32::MAX), u32::MAX - 1), 2);
        assert_eq!(s.count("k", i64::from(u32::MAX) - 1, u32::MAX), 1);
        assert_eq!(s.count("k", 0, u32::MAX), 1);
        assert_eq!(s.count("k", -1, u32::MAX), 0);
        assert_eq!(s.count("k", i64::MIN, u32::MAX), 0);
        assert_eq!(s.series("k", i64::MIN, u32::MAX, 3), vec![0, 0, 0]);
        assert_eq!(s.series("k", -1, u32::MAX, 2), vec![1, 2]);
        Ok(())
    }

    #[test]
    fn out_of_range_seconds_are_rejected() {
        let mut s = store();
        for second in [-1, i64::MIN, i64::from(u32::MAX) + 1, i64::MAX] {
            assert_eq!(
                s.add("k", second, 1),
                Err(StoreError::SecondOutOfRange { second })
            );
        }
        assert_eq!(s.key_count(), 0);
        assert_eq!(s.add("k", i64::from(u32::MAX), 1), Ok(()));
        assert_eq!(s.add("k", 0, 1), Ok(()));
        assert_eq!(s.counter_count(), 2);
    }

    #[test]
    fn out_of_order_inserts_keep_order_and_merge() -> Result<(), StoreError> {
        let mut s = store();
        for (second, count) in [
            (50, 1),
            (10, 2),
            (30, 3),
            (10, 4),
            (60, 5),
            (20, 6),
            (50, 7),
        ] {
            s.add("k", second, count)?;
        }
        s.check_invariants();
        assert_eq!(s.counter_count(), 5);
        assert_eq!(s.series("k", 10, 10, 6), vec![6, 6, 3, 0, 8, 5]);
        assert_eq!(s.count("k", 30, 21), 6 + 6 + 3);
        Ok(())
    }

    #[test]
    fn zero_count_adds_change_nothing() -> Result<(), StoreError> {
        let mut s = WindowStore::new(StoreLimits { max_keys: 0 });
        s.add("k", 5, 0)?;
        assert_eq!((s.key_count(), s.counter_count()), (0, 0));
        assert_eq!(
            s.add("k", -5, 0),
            Err(StoreError::SecondOutOfRange { second: -5 })
        );
        Ok(())
    }

    #[test]
    fn counts_and_sums_saturate() -> Result<(), StoreError> {
        let mut s = store();
        s.add("k", 1, u64::MAX - 1)?;
        s.add("k", 1, 5)?;
        assert_eq!(s.count("k", 1, 1), u64::MAX);
        s.add("k", 2, u64::MAX / 2)?;
        s.add("j", 2, u64::MAX / 2)?;
        assert_eq!(s.count("k", 2, 2), u64::MAX);
        assert_eq!(s.series("k", 1, 2, 1), vec![u64::MAX]);
        assert_eq!(
            s.top(2, 2, 5, ""),
            pairs(&[("k", u64::MAX), ("j", u64::MAX / 2)])
        );
        Ok(())
    }

    #[test]
    fn key_limit_rejects_only_new_keys() -> Result<(), StoreError> {
        let mut s = WindowStore::new(StoreLimits { max_keys: 2 });
        s.add("a", 1, 1)?;
        s.add("b", 1, 1)?;
        assert_eq!(s.add("c", 1, 1), Err(StoreError::KeyLimit { limit: 2 }));
        assert_eq!(s.key_count(), 2);
        assert_eq!(s.count("c", 1, 1), 0);
        // Existing keys still accept hits, new seconds included.
        s.add("a", 1, 1)?;
        s.add("b", 2, 1)?;
        assert_eq!(s.count("a", 1, 1), 2);
        assert_eq!(s.counter_count(), 3);
        // Evicting a key frees its place.
        s.evict_before(2);
        assert_eq!(s.key_count(), 1);
        s.add("c", 3, 1)?;
        assert_eq!(s.key_count(), 2);
        Ok(())
    }

    #[test]
    fn evict_drops_old_counters_and_empty_keys() -> Result<(), StoreError> {
        let mut s = store();
        s.add("old", 1, 1)?;
        s.add("old", 2, 1)?;
        s.add("mixed", 2, 1)?;
        s.add("mixed", 5, 1)?;
        s.add("new", 5, 1)?;
        assert_eq!(s.evict_before(0), 0);
        assert_eq!(s.evict_before(2), 1);
        assert_eq!(s.key_count(), 3);
        assert_eq!(s.evict_before(3), 2);
        assert_eq!(s.key_count(), 2);
        assert_eq!(s.counter_count(), 2);
        assert_eq!(s.count("old", 10, 100), 0);
        assert_eq!(s.count("mixed", 10, 100), 1);
        assert!(s.top(10, 100, 10, "o").is_empty());
        assert_eq!(s.evict_before(i64::MAX), 2);
        assert_eq!((s.key_count(), s.counter_count()), (0, 0));
        s.check_invariants();
        Ok(())
    }

    /// Memory follows live data: after evicting most counters the store holds less than half,
    /// and after evicting every key almost nothing. How keys fall into buckets decides how full
    /// each key table got and how many deleted slots eviction leaves in it, so the test runs
    /// over a fixed set of hash seeds instead of one random seed per run. Seeds 88, 122, 129, 134,
    /// 221 and 254 of these 256 left an emptied key table with its whole allocation while the shrink
    /// condition compared with `capacity()`, which does not count deleted slots as free.
    #[test]
    fn evict_releases_memory() -> Result<(), StoreError> {
        for seed in 0..256 {
            let mut s = WindowStore::with_hash_seed(StoreLimits::default(), seed);
            for key in 0..1000 {
                for second in 0..20 {
                    s.add(&format!("key-{key}"), second, 1)?;
                }
            }
            let full = s.approx_heap_bytes();
            // 20 000 counters at 8 bytes, plus per-key overhead.
            assert!(full >= 20_000 * 8, "seed {seed}: {full}");
            s.evict_before(19);
            assert_eq!(s.counter_count(), 1000);
            assert!(
                s.approx_heap_bytes() < full / 2,
                "seed {seed}: {}",
                s.approx_heap_bytes()
            );
            s.evict_before(20);
            assert_eq!(s.key_count(), 0);
            assert!(
                s.approx_heap_bytes() < 1024,
                "seed {seed}: {}",
                s.approx_heap_bytes()
            );
        }
        Ok(())
    }

    #[test]
    fn top_orders_by_count_then_key() -> Result<(), StoreError> {
        let mut s = store();
        s.add("b", 10, 5)?;
        s.add("a", 10, 5)?;
        s.add("c", 10, 7)?;
        s.add("d", 10, 1)?;
        s.add("e", 3, 100)?; // outside the window: count 0, excluded
        assert_eq!(
            s.top(10, 5, 10, ""),
            pairs(&[("c", 7), ("a", 5), ("b", 5), ("d", 1)])
        );
        // The limit keeps the best, ties broken by key.
        assert_eq!(s.top(10, 5, 2, ""), pairs(&[("c", 7), ("a", 5)]));
        assert_eq!(s.top(10, 5, 1, ""), pairs(&[("c", 7)]));
        assert!(s.top(10, 5, 0, "").is_empty());
        assert_eq!(s.top(10, 100, 1, ""), pairs(&[("e", 100)]));
        Ok(())
    }

    #[test]
    fn top_limit_keeps_smallest_keys_among_ties() -> Result<(), StoreError> {
        let mut s = store();
        for key in ["m", "z", "b", "y", "a", "n"] {
            s.add(key, 1, 3)?;
        }
        assert_eq!(s.top(1, 1, 3, ""), pairs(&[("a", 3), ("b", 3), ("m", 3)]));
        Ok(())
    }

    #[test]
    fn top_filters_by_prefix() -> Result<(), StoreError> {
        let mut s = store();
        s.add("/api/users", 1, 3)?;
        s.add("/api/orders", 1, 4)?;
        s.add("/apix", 1, 9)?;
        s.add("/home", 1, 10)?;
        s.add("", 1, 1)?;
        assert_eq!(
            s.top(1, 1, 10, "/api/"),
            pairs(&[("/api/orders", 4), ("/api/users", 3)])
        );
        assert_eq!(
            s.top(1, 1, 10, "/api"),
            pairs(&[("/apix", 9), ("/api/orders", 4), ("/api/users", 3)])
        );
        assert_eq!(s.top(1, 1, 10, "").len(), 5);
        assert!(s.top(1, 1, 10, "/nope").is_empty());
        Ok(())
    }

    #[test]
    fn series_with_steps() -> Result<(), StoreError> {
        let mut s = store();
        for second in 100..110 {
            s.add("k", second, second as u64)?;
        }
        // Step 3 from 99: [99,102) [102,105) [105,108) [108,111)
        assert_eq!(
            s.series("k", 99, 3, 4),
            vec![100 + 101, 102 + 103 + 104, 105 + 106 + 107, 108 + 109]
        );
        // Step 0 is treated as 1.
        assert_eq!(s.series("k", 108, 0, 3), vec![108, 109, 0]);
        assert_eq!(s.series("k", 108, 1, 3), vec![108, 109, 0]);
        // Points before the data, and none at all.
        assert_eq!(
            s.series("k", 90, 5, 3),
            vec![0, 0, 100 + 101 + 102 + 103 + 104]
        );
        assert!(s.series("k", 100, 1, 0).is_empty());
        assert_eq!(s.series("unknown", 100, 1, 2), vec![0, 0]);
        Ok(())
    }

    #[test]
    fn debug_is_a_summary() -> Result<(), StoreError> {
        let mut s = WindowStore::new(StoreLimits { max_keys: 3 });
        s.add("secret-key", 1, 1)?;
        let shown = format!("{s:?}");
        assert!(shown.contains("keys: 1"), "{shown}");
        assert!(!shown.contains("secret-key"), "{shown}");
        Ok(())
    }

    #[test]
    fn errors_display() {
        assert_eq!(
            StoreError::KeyLimit { limit: 3 }.to_string(),
            "key limit of 3 keys reached"
        );
        assert_eq!(
            StoreError::SecondOutOfRange { second: -1 }.to_string(),
            "second -1 is out of range"
        );
    }
}

#[cfg(test)]
mod snapshot_tests {
    use super::*;

    /// A store with a wide counter, and one added after the copy is taken by `copy`; checks
    /// that the copy, replayed with `add`, holds exactly what was there when it was taken.
    fn check_copy<C>(
        copy: impl FnOnce(&WindowStore) -> C,
        replay: impl FnOnce(&C, &mut WindowStore),
    ) {
        let mut store = WindowStore::default();
        store.add("a", 10, 1).unwrap();
        store.add("a", 12, u64::from(u32::MAX) + 7).unwrap();
        store.add("b", 11, 3).unwrap();
        let taken = copy(&store);
        store.add("a", 13, 1).unwrap();
        let mut rebuilt = WindowStore::default();
        replay(&taken, &mut rebuilt);
        assert_eq!(
            rebuilt.counter_count(),
            3,
            "the copy is unaffected by later adds"
        );
        assert_eq!(rebuilt.count("a", 13, 10), 1 + u64::from(u32::MAX) + 7);
        assert_eq!(rebuilt.count("b", 11, 1), 3);
        assert_eq!(rebuilt.key_count(), 2);
    }

    #[test]
    fn iter_of_a_clone_rebuilds_an_equal_store() {
        check_copy(WindowStore::clone, |copy, rebuilt| {
            for (key, counters) in copy.iter() {
                for (second, count) in counters {
                    rebuilt.add(key, second, count).unwrap();
                }
            }
        });
    }

    #[test]
    fn iter_of_an_image_rebuilds_an_equal_store() {
        check_copy(WindowStore::image, |image, rebuilt| {
            for (key, counters) in image.iter() {
                for (second, count) in counters {
                    rebuilt.add(key, second, count).unwrap();
                }
            }
        });
    }
}
