//! One key's hits: a sparse, sorted run of per-second counters.

use std::mem::size_of;

/// One (second, count) counter packed into three `u32` words: 12 bytes with
/// 4-byte alignment, so a `Vec<Counter>` holds 12 bytes per counter with no
/// padding. A `(u32, u64)` pair would be padded to 16 bytes.
///
/// The count is split into its low and high 32-bit halves; see
/// [`sum_counts`] for why that split also makes range sums cheap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Counter {
    /// Unix second of the hits.
    second: u32,
    /// Low 32 bits of the count.
    lo: u32,
    /// High 32 bits of the count.
    hi: u32,
}

/// Bytes one counter takes inside a series' buffer.
pub(crate) const COUNTER_BYTES: usize = size_of::<Counter>();

// The layout promise of the crate docs: 12 bytes per counter.
const _: () = assert!(COUNTER_BYTES == 12);

impl Counter {
    fn new(second: u32, count: u64) -> Self {
        let mut counter = Self {
            second,
            lo: 0,
            hi: 0,
        };
        counter.set_count(count);
        counter
    }

    /// The counter's second.
    pub(crate) fn second(&self) -> u32 {
        self.second
    }

    /// The counter's count.
    pub(crate) fn count(&self) -> u64 {
        (u64::from(self.hi) << 32) | u64::from(self.lo)
    }

    fn set_count(&mut self, count: u64) {
        // Truncation is the point: keep the low half, then the high half.
        self.lo = count as u32;
        self.hi = (count >> 32) as u32;
    }

    fn add(&mut self, count: u64) {
        self.set_count(self.count().saturating_add(count));
    }
}

/// Exact sum of the counts of `counters`, saturated at `u64::MAX`.
///
/// The low and high halves are summed separately into `u64` accumulators.
/// This cannot overflow: seconds are distinct `u32`s, so a slice holds at most
/// 2^32 counters, each half is below 2^32, and 2^32 * (2^32 - 1) < 2^64. The
/// loop is two plain additions per counter (no saturation check, so the
/// compiler can vectorise it); the halves are recombined once, in `u128`, and
/// clamped.
pub(crate) fn sum_counts(counters: &[Counter]) -> u64 {
    let (mut lo, mut hi) = (0u64, 0u64);
    for counter in counters {
        lo += u64::from(counter.lo);
        hi += u64::from(counter.hi);
    }
    let total = (u128::from(hi) << 32) + u128::from(lo);
    u64::try_from(total).unwrap_or(u64::MAX)
}

/// The counters of one key, sorted by strictly increasing second, with no
/// duplicate seconds and no zero counts.
#[derive(Clone, Debug, Default)]
pub(crate) struct KeySeries {
    counters: Vec<Counter>,
}

impl KeySeries {
    /// Adds `count` (> 0) hits in `second`. Returns `true` when a new counter
    /// was created, `false` when an existing one was increased.
    pub(crate) fn add(&mut self, second: u32, count: u64) -> bool {
        debug_assert!(count > 0, "zero counts are never stored");
        // Hot path: hits arrive with (mostly) non-decreasing seconds.
        match self.counters.last_mut() {
            None => {}
            Some(last) if last.second < second => {}
            Some(last) if last.second == second => {
                last.add(count);
                return false;
            }
            Some(_) => {
                // Out of order: binary search the place.
                return match self.counters.binary_search_by_key(&second, Counter::second) {
                    Ok(found) => {
                        self.counters[found].add(count);
                        false
                    }
                    Err(at) => {
                        self.counters.insert(at, Counter::new(second, count));
                        true
                    }
                };
            }
        }
        self.counters.push(Counter::new(second, count));
        true
    }

    /// The counters whose second `s` satisfies `first <= s <= last`.
    ///
    /// Both bounds are `i64` so callers never have to clamp to the `u32`
    /// range: a bound below 0 or above `u32::MAX` simply selects nothing or
    /// everything on that side.
    pub(crate) fn range(&self, first: i64, last: i64) -> &[Counter] {
        if first > last {
            return &[];
        }
        let start = self
            .counters
            .partition_point(|c| i64::from(c.second) < first);
        let end = start + self.counters[start..].partition_point(|c| i64::from(c.second) <= last);
        &self.counters[start..end]
    }

    /// Sum of the counts with `first <= second <= last`, saturated.
    pub(crate) fn sum(&self, first: i64, last: i64) -> u64 {
        sum_counts(self.range(first, last))
    }

    /// All counters, sorted by second.
    pub(crate) fn counters(&self) -> &[Counter] {
        &self.counters
    }

    /// Drops the counters with second < `min_second`, returning how many.
    ///
    /// When the buffer ends up less than a quarter full it is shrunk to fit,
    /// so memory follows live data; the factor-of-4 gap keeps a series that
    /// oscillates around one size from reallocating on every call.
    pub(crate) fn evict_before(&mut self, min_second: i64) -> usize {
        let cut = self
            .counters
            .partition_point(|c| i64::from(c.second) < min_second);
        if cut == 0 {
            return 0;
        }
        self.counters.drain(..cut);
        if self.counters.len() < self.counters.capacity() / 4 {
            self.counters.shrink_to_fit();
        }
        cut
    }

    /// Number of counters.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.counters.len()
    }

    /// Whether the series holds no counter.
    pub(crate) fn is_empty(&self) -> bool {
        self.counters.is_empty()
    }

    /// Heap bytes of the counter buffer (capacity-based).
    pub(crate) fn heap_bytes(&self) -> usize {
        self.counters.capacity() * COUNTER_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_round_trips_counts() {
        for count in [0, 1, u64::from(u32::MAX), 1 << 32, u64::MAX - 1, u64::MAX] {
            assert_eq!(Counter::new(7, count).count(), count);
        }
    }

    #[test]
    fn counter_add_saturates() {
        let mut counter = Counter::new(7, u64::MAX - 2);
        counter.add(5);
        assert_eq!(counter.count(), u64::MAX);
    }

    #[test]
    fn sum_carries_between_halves_and_saturates() {
        let c = |count| Counter::new(0, count);
        assert_eq!(sum_counts(&[]), 0);
        assert_eq!(
            sum_counts(&[c(u64::from(u32::MAX)), c(1)]),
            u64::from(u32::MAX) + 1
        );
        assert_eq!(sum_counts(&[c(u64::MAX), c(1)]), u64::MAX);
        assert_eq!(
            sum_counts(&[c(u64::MAX / 2 + 1), c(u64::MAX / 2)]),
            u64::MAX
        );
        assert_eq!(
            sum_counts(&[c(u64::MAX / 2), c(u64::MAX / 2)]),
            u64::MAX - 1
        );
    }

    #[test]
    fn range_handles_out_of_u32_bounds() {
        let mut series = KeySeries::default();
        for second in [0, 5, u32::MAX] {
            series.add(second, 1);
        }
        assert_eq!(series.range(i64::MIN, i64::MAX).len(), 3);
        assert_eq!(series.range(-10, 0).len(), 1);
        assert_eq!(series.range(1, 4).len(), 0);
        assert_eq!(series.range(6, 1 << 40).len(), 1);
        assert_eq!(series.range(5, 4).len(), 0);
    }

    #[test]
    fn evict_shrinks_mostly_empty_buffers() {
        let mut series = KeySeries::default();
        for second in 0..1000 {
            series.add(second, 1);
        }
        let before = series.heap_bytes();
        assert_eq!(series.evict_before(990), 990);
        assert_eq!(series.len(), 10);
        assert!(series.heap_bytes() < before / 4);
        assert_eq!(series.counters()[0].second(), 990);
    }
}
