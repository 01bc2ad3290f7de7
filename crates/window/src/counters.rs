//! Read-only views of packed counters: a run of one key's (second, count)
//! counters, sorted by strictly increasing second, stored as little-endian
//! bytes inside an entry (see [`crate::entry`]) or a [`crate::StoreImage`].
//!
//! Two widths exist. A *narrow* counter is 8 bytes, the second and the count as
//! two `u32` words; it is used while every count of the key fits in a `u32`,
//! which is all but always. A *wide* counter is 12 bytes, the second and the
//! count's low and high 32-bit halves, so counts stay exact `u64`s. All the
//! counters of one key have the same width.
//!
//! Words are read with `u32::from_le_bytes` from byte slices: there is no
//! alignment to respect (the counters follow the key's bytes), and safe code
//! cannot reinterpret bytes as structs anyway. On x86-64 and AArch64 each read
//! compiles to one unaligned load.

use std::slice::ChunksExact;

/// Bytes of a narrow counter: second and count, two `u32`s.
pub(crate) const NARROW_BYTES: usize = 8;
/// Bytes of a wide counter: second, low half and high half of the count.
pub(crate) const WIDE_BYTES: usize = 12;

/// The size of one counter of the given width.
#[inline]
pub(crate) fn counter_bytes(wide: bool) -> usize {
    if wide {
        WIDE_BYTES
    } else {
        NARROW_BYTES
    }
}

/// How many counters of the given width fit in `bytes` bytes. (Dividing by a
/// constant in each arm compiles to a multiplication, not a `div`.)
#[inline]
pub(crate) fn slot_count(bytes: usize, wide: bool) -> usize {
    if wide {
        bytes / WIDE_BYTES
    } else {
        bytes / NARROW_BYTES
    }
}

/// The little-endian `u32` at `at`. Offsets come from the store's own
/// layout, never from a caller, so an out-of-bounds read is a bug and panics.
pub(crate) fn read_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

/// Writes `value` as a little-endian `u32` at `at`.
pub(crate) fn write_u32(bytes: &mut [u8], at: usize, value: u32) {
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
}

/// The count of the counter starting at `at`.
fn read_count(bytes: &[u8], at: usize, wide: bool) -> u64 {
    let lo = u64::from(read_u32(bytes, at + 4));
    if wide {
        (u64::from(read_u32(bytes, at + 8)) << 32) | lo
    } else {
        lo
    }
}

/// Writes one counter at `at`. The caller guarantees that a narrow counter's
/// count fits in a `u32`; the high half is dropped otherwise.
pub(crate) fn write_counter(bytes: &mut [u8], at: usize, wide: bool, second: u32, count: u64) {
    debug_assert!(
        wide || u32::try_from(count).is_ok(),
        "narrow counter overflow"
    );
    write_u32(bytes, at, second);
    // Truncation is the point: the low half, then (wide only) the high half.
    write_u32(bytes, at + 4, count as u32);
    if wide {
        write_u32(bytes, at + 8, (count >> 32) as u32);
    }
}

/// Runs of up to this many counters are summed linearly by
/// [`Counters::sum_between`]: 32 narrow counters are 256 bytes, four or five
/// cache lines.
const LINEAR_SUM_MAX: usize = 32;

/// `(hi << 32) + lo`, saturated at `u64::MAX`: the total of counts whose low
/// and high halves were summed separately.
fn combine_halves(lo: u64, hi: u64) -> u64 {
    let total = (u128::from(hi) << 32) + u128::from(lo);
    u64::try_from(total).unwrap_or(u64::MAX)
}

/// A run of counters of one width, sorted by strictly increasing second.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Counters<'a> {
    /// Exactly `len * width` bytes.
    bytes: &'a [u8],
    wide: bool,
}

impl<'a> Counters<'a> {
    /// The counters packed in `bytes`, whose length must be a multiple of
    /// the width.
    pub(crate) fn new(bytes: &'a [u8], wide: bool) -> Self {
        debug_assert_eq!(bytes.len() % counter_bytes(wide), 0);
        Self { bytes, wide }
    }

    fn width(&self) -> usize {
        counter_bytes(self.wide)
    }

    /// Number of counters.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        slot_count(self.bytes.len(), self.wide)
    }

    /// The second of counter `index`.
    #[inline]
    pub(crate) fn second(&self, index: usize) -> u32 {
        read_u32(self.bytes, index * self.width())
    }

    /// The count of counter `index`.
    pub(crate) fn count(&self, index: usize) -> u64 {
        read_count(self.bytes, index * self.width(), self.wide)
    }

    /// The second of the newest counter, if any.
    pub(crate) fn last_second(&self) -> Option<u32> {
        self.len().checked_sub(1).map(|last| self.second(last))
    }

    /// The index of the first counter whose second fails `is_before`, for a
    /// predicate true on a prefix of the run (as `slice::partition_point`).
    ///
    /// Branch-free like the standard library's binary search: the halving
    /// step is a conditional move, so a lookup does not stall on a
    /// mispredicted branch while the counters' cache lines arrive, and
    /// lookups of different keys overlap their memory accesses.
    pub(crate) fn partition_point(&self, is_before: impl Fn(u32) -> bool) -> usize {
        let mut size = self.len();
        if size == 0 {
            return 0;
        }
        let mut base = 0;
        while size > 1 {
            let half = size / 2;
            let middle = base + half;
            base = std::hint::select_unpredictable(is_before(self.second(middle)), middle, base);
            size -= half;
        }
        base + usize::from(is_before(self.second(base)))
    }

    /// `Ok(index)` of the counter of `second`, or `Err(index)` where it
    /// would be inserted.
    pub(crate) fn search(&self, second: u32) -> Result<usize, usize> {
        let at = self.partition_point(|s| s < second);
        if at < self.len() && self.second(at) == second {
            Ok(at)
        } else {
            Err(at)
        }
    }

    /// The counters whose second `s` satisfies `first <= s <= last`.
    ///
    /// Both bounds are `i64` so callers never have to clamp to the `u32`
    /// range: a bound below 0 or above `u32::MAX` simply selects nothing or
    /// everything on that side.
    pub(crate) fn range(&self, first: i64, last: i64) -> Counters<'a> {
        if first > last {
            return Self::new(&[], self.wide);
        }
        let start = self.partition_point(|s| i64::from(s) < first);
        let end = self.partition_point(|s| i64::from(s) <= last);
        let width = self.width();
        Self::new(&self.bytes[start * width..end * width], self.wide)
    }

    /// The counters from index `start` on.
    pub(crate) fn tail(&self, start: usize) -> Counters<'a> {
        Self::new(&self.bytes[start * self.width()..], self.wide)
    }

    /// Exact sum of the counts with `first <= second <= last`, saturated at
    /// `u64::MAX`: `self.range(first, last).sum()`.
    ///
    /// Runs of up to [`LINEAR_SUM_MAX`] counters (nearly every key) are
    /// summed in one branch-free pass over all of them instead: the
    /// addresses of all their loads are known as soon as the entry's header
    /// is, so the entry's cache lines are fetched in parallel, where a binary
    /// search would fetch them one after another.
    pub(crate) fn sum_between(&self, first: i64, last: i64) -> u64 {
        if self.len() > LINEAR_SUM_MAX {
            return self.range(first, last).sum();
        }
        let inside = |counter: &[u8]| {
            let second = i64::from(read_u32(counter, 0));
            u64::from(first <= second && second <= last)
        };
        if self.wide {
            // As in `sum`: halves summed separately cannot overflow.
            let (mut lo, mut hi) = (0u64, 0u64);
            for counter in self.bytes.chunks_exact(WIDE_BYTES) {
                let keep = inside(counter);
                lo += keep * u64::from(read_u32(counter, 4));
                hi += keep * u64::from(read_u32(counter, 8));
            }
            combine_halves(lo, hi)
        } else {
            self.bytes
                .chunks_exact(NARROW_BYTES)
                .map(|counter| inside(counter) * u64::from(read_u32(counter, 4)))
                .sum()
        }
    }

    /// Exact sum of the counts, saturated at `u64::MAX`.
    ///
    /// Narrow counts are summed in one `u64`: seconds are distinct `u32`s, so
    /// a run holds at most 2^32 counters, each below 2^32, and
    /// 2^32 * (2^32 - 1) < 2^64 cannot overflow. Wide counts sum their low and
    /// high halves separately, by the same bound, and recombine them once, in
    /// `u128`, clamped. Either way the loop is plain additions with no
    /// saturation check, which the compiler can unroll and vectorise.
    pub(crate) fn sum(&self) -> u64 {
        if self.wide {
            let (mut lo, mut hi) = (0u64, 0u64);
            for counter in self.bytes.chunks_exact(WIDE_BYTES) {
                lo += u64::from(read_u32(counter, 4));
                hi += u64::from(read_u32(counter, 8));
            }
            combine_halves(lo, hi)
        } else {
            self.bytes
                .chunks_exact(NARROW_BYTES)
                .map(|counter| u64::from(read_u32(counter, 4)))
                .sum()
        }
    }

    /// Whether every count fits in a `u32`, so the run could be narrow.
    pub(crate) fn fits_narrow(&self) -> bool {
        !self.wide
            || self
                .bytes
                .chunks_exact(WIDE_BYTES)
                .all(|counter| read_u32(counter, 8) == 0)
    }

    /// The counters as `(second, count)`, in increasing second order.
    pub(crate) fn iter(&self) -> CounterIter<'a> {
        CounterIter {
            chunks: self.bytes.chunks_exact(self.width()),
            wide: self.wide,
        }
    }
}

/// The iterator of [`Counters::iter`].
#[derive(Clone, Debug)]
pub(crate) struct CounterIter<'a> {
    chunks: ChunksExact<'a, u8>,
    wide: bool,
}

impl Iterator for CounterIter<'_> {
    type Item = (u32, u64);

    fn next(&mut self) -> Option<Self::Item> {
        let counter = self.chunks.next()?;
        Some((read_u32(counter, 0), read_count(counter, 0, self.wide)))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.chunks.size_hint()
    }
}

impl ExactSizeIterator for CounterIter<'_> {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packs `(second, count)` pairs at the given width.
    fn pack(counters: &[(u32, u64)], wide: bool) -> Vec<u8> {
        let width = counter_bytes(wide);
        let mut bytes = vec![0; counters.len() * width];
        for (i, &(second, count)) in counters.iter().enumerate() {
            write_counter(&mut bytes, i * width, wide, second, count);
        }
        bytes
    }

    #[test]
    fn counters_round_trip_at_both_widths() {
        let narrow = [(0, 1), (7, u64::from(u32::MAX)), (u32::MAX, 3)];
        let bytes = pack(&narrow, false);
        assert_eq!(bytes.len(), 3 * NARROW_BYTES);
        let view = Counters::new(&bytes, false);
        assert_eq!(view.iter().collect::<Vec<_>>(), narrow);
        assert_eq!(view.iter().len(), 3);
        assert!(view.fits_narrow());

        let wide = [
            (0, 1),
            (5, 1 << 32),
            (6, u64::MAX - 1),
            (u32::MAX, u64::MAX),
        ];
        let bytes = pack(&wide, true);
        let view = Counters::new(&bytes, true);
        assert_eq!(view.iter().collect::<Vec<_>>(), wide);
        assert_eq!(view.count(1), 1 << 32);
        assert!(!view.fits_narrow());
        assert!(Counters::new(&pack(&narrow, true), true).fits_narrow());
    }

    #[test]
    fn sum_carries_between_halves_and_saturates() {
        let sum = |counts: &[u64], wide: bool| {
            let counters: Vec<(u32, u64)> = counts
                .iter()
                .enumerate()
                .map(|(i, &c)| (i as u32, c))
                .collect();
            Counters::new(&pack(&counters, wide), wide).sum()
        };
        let max32 = u64::from(u32::MAX);
        assert_eq!(sum(&[], false), 0);
        assert_eq!(sum(&[], true), 0);
        assert_eq!(sum(&[max32, max32, 1], false), 2 * max32 + 1);
        assert_eq!(sum(&[max32, 1], true), max32 + 1);
        assert_eq!(sum(&[u64::MAX, 1], true), u64::MAX);
        assert_eq!(sum(&[u64::MAX / 2 + 1, u64::MAX / 2], true), u64::MAX);
        assert_eq!(sum(&[u64::MAX / 2, u64::MAX / 2], true), u64::MAX - 1);
    }

    #[test]
    fn search_and_range_handle_out_of_u32_bounds() {
        let bytes = pack(&[(0, 1), (5, 2), (u32::MAX, 3)], false);
        let view = Counters::new(&bytes, false);
        assert_eq!(view.search(5), Ok(1));
        assert_eq!(view.search(3), Err(1));
        assert_eq!(view.search(6), Err(2));
        assert_eq!(view.last_second(), Some(u32::MAX));
        assert_eq!(view.range(i64::MIN, i64::MAX).len(), 3);
        assert_eq!(view.range(-10, 0).len(), 1);
        assert_eq!(view.range(1, 4).len(), 0);
        assert_eq!(view.range(6, 1 << 40).sum(), 3);
        assert_eq!(view.range(5, 4).len(), 0);
        assert_eq!(Counters::new(&[], true).last_second(), None);
    }
}
