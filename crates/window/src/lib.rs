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
//! not 3600 slots of a ring buffer.
//!
//! * The keys live in one `HashMap<Box<str>, KeySeries>` hashed with
//!   `foldhash`. A `Box<str>` is 16 bytes inline plus the key's bytes (no
//!   spare capacity, unlike a `String`).
//! * A `KeySeries` is a single `Vec` of 12-byte counters sorted by second:
//!   each counter is three `u32` words, the second and the count split into its
//!   low and high halves. So a map slot is 16 + 24 = 40 bytes (plus hashbrown's
//!   1 control byte and load-factor slack), and each counter is **12 bytes**.
//!
//! The obvious alternative, two parallel `Vec`s (`Vec<u32>` seconds and
//! `Vec<u64>` counts), is also 12 bytes per counter but doubles the per-key
//! overhead: 48 bytes of `Vec` headers instead of 24, and two heap allocations
//! (each with its allocator header and its own rounding) instead of one. Keys
//! with a handful of counters dominate real hit counters, so the per-key cost
//! matters as much as the per-counter cost. A `Vec<(u32, u64)>` would pad to 16
//! bytes per counter. Splitting the count into halves costs nothing on reads:
//! range sums add the halves in two separate `u64` accumulators (which cannot
//! overflow, see below) and recombine once, a branch-free loop.
//!
//! Invariants of every series: seconds strictly increasing (so no duplicate
//! seconds), no zero counts, never empty (an emptied key is removed).
//!
//! # Complexity
//!
//! With `n` the counters of the key concerned, `k` the keys, `w` the counters
//! inside a window and `K` the number of keys in the store:
//!
//! | operation | time | extra memory |
//! | --- | --- | --- |
//! | [`add`](WindowStore::add), second newest or equal to the newest (hot path) | O(1) amortised + hashing the key | — |
//! | [`add`](WindowStore::add), older second | O(log n) search + O(n) shift on insert | — |
//! | [`count`](WindowStore::count) | O(log n + w) | — |
//! | [`series`](WindowStore::series) | O(log n + w + points) | the `points` result |
//! | [`top`](WindowStore::top) | O(K (prefix test + log n + w) + K log limit) | O(limit) heap |
//! | [`evict_before`](WindowStore::evict_before) | O(K + counters dropped + counters moved) | — |
//! | [`key_count`](WindowStore::key_count), [`counter_count`](WindowStore::counter_count) | O(1) | — |
//! | [`approx_heap_bytes`](WindowStore::approx_heap_bytes) | O(K) | — |
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
//! assert_eq!(store.evict_before(101), 1);
//! # Ok::<(), hitcounter_window::StoreError>(())
//! ```

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::mem::size_of;

use series::KeySeries;

mod series;
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

/// The map type of the store.
type KeyMap = HashMap<Box<str>, KeySeries, foldhash::fast::RandomState>;

/// Exact per-second hit counts per key, sparse in time. See the
/// [crate docs](crate) for the layout and the cost of each operation.
///
/// `Clone` is a deep copy; the aggregator clones an owner's store to write a checkpoint from the
/// copy while the original keeps taking hits.
#[derive(Clone)]
pub struct WindowStore {
    limits: StoreLimits,
    keys: KeyMap,
    /// Total counters over all keys, kept up to date by `add` and `evict_before`.
    counters: usize,
}

impl WindowStore {
    /// An empty store with the given limits. Nothing is allocated up front.
    pub fn new(limits: StoreLimits) -> Self {
        Self {
            limits,
            keys: KeyMap::default(),
            counters: 0,
        }
    }

    /// The limits the store was made with.
    pub fn limits(&self) -> StoreLimits {
        self.limits
    }

    /// Every key with its counters as `(second, count)` in increasing second order, keys in no
    /// particular order. For writing snapshots; restore with [`WindowStore::add`].
    pub fn iter(&self) -> impl Iterator<Item = (&str, impl Iterator<Item = (i64, u64)> + '_)> + '_ {
        self.keys.iter().map(|(key, series)| {
            let counters = series
                .counters()
                .iter()
                .map(|c| (i64::from(c.second()), c.count()));
            (&**key, counters)
        })
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
        let created = match self.keys.get_mut(key) {
            Some(series) => series.add(second, count),
            None => {
                if self.keys.len() >= self.limits.max_keys {
                    return Err(StoreError::KeyLimit {
                        limit: self.limits.max_keys,
                    });
                }
                let mut series = KeySeries::default();
                let created = series.add(second, count);
                self.keys.insert(Box::from(key), series);
                created
            }
        };
        if created {
            self.counters += 1;
        }
        Ok(())
    }

    /// Sum of the counts of `key`'s seconds `s` with
    /// `end_second - window_seconds < s <= end_second`, saturated at
    /// `u64::MAX`. An unknown key, or a window of 0 seconds, gives 0.
    pub fn count(&self, key: &str, end_second: i64, window_seconds: u32) -> u64 {
        match self.keys.get(key) {
            Some(series) => window_sum(series, end_second, window_seconds),
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
        let Some(series) = self.keys.get(key) else {
            return sums;
        };
        let step = i128::from(step_seconds.max(1));
        let start = i128::from(start_second);
        // Last second covered: start + points * step - 1, computed in i128
        // (points * step can reach 2^64) and clamped to i64 for the search.
        let last = start + i128::from(points) * step - 1;
        let last = i64::try_from(last).unwrap_or(i64::MAX);
        for counter in series.range(start_second, last) {
            let offset = i128::from(counter.second()) - start;
            // 0 <= offset / step < points, by the range bounds.
            let Ok(point) = usize::try_from(offset / step) else {
                continue;
            };
            if let Some(sum) = sums.get_mut(point) {
                *sum = sum.saturating_add(counter.count());
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
        if limit == 0 || window_seconds == 0 {
            return Vec::new();
        }
        // An entry orders higher when it ranks better: higher count, then
        // smaller key. Reverse makes the max-heap a min-heap, so the root is
        // the worst entry kept, the one a better candidate evicts.
        let mut heap: BinaryHeap<Reverse<(u64, Reverse<&str>)>> =
            BinaryHeap::with_capacity(limit.min(self.keys.len()));
        for (key, series) in &self.keys {
            if !key.starts_with(prefix) {
                continue;
            }
            let count = window_sum(series, end_second, window_seconds);
            if count == 0 {
                continue;
            }
            let entry = Reverse((count, Reverse(&**key)));
            if heap.len() < limit {
                heap.push(entry);
            } else if let Some(mut worst) = heap.peek_mut() {
                // `entry < *worst` means the candidate ranks better.
                if entry < *worst {
                    *worst = entry;
                }
            }
        }
        // Ascending order of Reverse(rank) is best rank first.
        heap.into_sorted_vec()
            .into_iter()
            .map(|Reverse((count, Reverse(key)))| (key.to_owned(), count))
            .collect()
    }

    /// Drops every counter with second < `min_second`, and every key left
    /// with none. Returns how many counters were dropped.
    ///
    /// Buffers left less than a quarter full are shrunk, and so is the key
    /// map, so that memory follows live data after a burst.
    pub fn evict_before(&mut self, min_second: i64) -> usize {
        if min_second <= 0 || self.counters == 0 {
            return 0;
        }
        let mut dropped = 0;
        self.keys.retain(|_, series| {
            dropped += series.evict_before(min_second);
            !series.is_empty()
        });
        self.counters -= dropped;
        if self.keys.len() < self.keys.capacity() / 4 {
            self.keys.shrink_to_fit();
        }
        dropped
    }

    /// Number of keys held (every key held has at least one counter).
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Number of (key, second) counters held.
    pub fn counter_count(&self) -> usize {
        self.counters
    }

    /// Rough heap bytes held, capacity-based, for a metric: the map's slots
    /// and control bytes, the keys' bytes and the counter buffers. Allocator
    /// overhead is not counted.
    pub fn approx_heap_bytes(&self) -> usize {
        let slot = size_of::<(Box<str>, KeySeries)>() + 1;
        let map = self.keys.capacity() * slot;
        let data: usize = self
            .keys
            .iter()
            .map(|(key, series)| key.len() + series.heap_bytes())
            .sum();
        map + data
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

/// Sum of `series` over the window `end - window < s <= end`.
fn window_sum(series: &KeySeries, end_second: i64, window_seconds: u32) -> u64 {
    if window_seconds == 0 {
        return 0;
    }
    // first = end - window + 1; saturating keeps it sane for end near i64::MIN
    // (nothing is stored there anyway).
    let first = end_second
        .saturating_sub(i64::from(window_seconds))
        .saturating_add(1);
    series.sum(first, end_second)
}

#[cfg(test)]
impl WindowStore {
    /// Panics unless every internal invariant holds.
    pub(crate) fn check_invariants(&self) {
        let mut total = 0;
        for (key, series) in &self.keys {
            let counters = series.counters();
            assert!(!counters.is_empty(), "key {key:?} is empty");
            assert!(
                counters.windows(2).all(|w| w[0].second() < w[1].second()),
                "key {key:?} is not strictly increasing"
            );
            assert!(
                counters.iter().all(|c| c.count() > 0),
                "key {key:?} holds a zero count"
            );
            total += series.len();
        }
        assert_eq!(total, self.counters, "counter total is stale");
        assert!(
            self.keys.len() <= self.limits.max_keys,
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

    #[test]
    fn evict_releases_memory() -> Result<(), StoreError> {
        let mut s = store();
        for key in 0..1000 {
            for second in 0..20 {
                s.add(&format!("key-{key}"), second, 1)?;
            }
        }
        let full = s.approx_heap_bytes();
        // 20 000 counters at 12 bytes, plus per-key overhead.
        assert!(full >= 20_000 * 12, "{full}");
        s.evict_before(19);
        assert_eq!(s.counter_count(), 1000);
        assert!(
            s.approx_heap_bytes() < full / 2,
            "{}",
            s.approx_heap_bytes()
        );
        s.evict_before(20);
        assert_eq!(s.key_count(), 0);
        assert!(s.approx_heap_bytes() < 1024, "{}", s.approx_heap_bytes());
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

    #[test]
    fn iter_then_add_rebuilds_an_equal_store() {
        let mut store = WindowStore::default();
        store.add("a", 10, 1).unwrap();
        store.add("a", 12, u64::from(u32::MAX) + 7).unwrap();
        store.add("b", 11, 3).unwrap();
        let copy = store.clone();
        store.add("a", 13, 1).unwrap();
        let mut rebuilt = WindowStore::default();
        for (key, counters) in copy.iter() {
            for (second, count) in counters {
                rebuilt.add(key, second, count).unwrap();
            }
        }
        assert_eq!(
            rebuilt.counter_count(),
            3,
            "the clone is unaffected by later adds"
        );
        assert_eq!(rebuilt.count("a", 13, 10), 1 + u64::from(u32::MAX) + 7);
        assert_eq!(rebuilt.count("b", 11, 1), 3);
        assert_eq!(rebuilt.key_count(), 2);
    }
}
