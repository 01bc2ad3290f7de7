//! One key and all its counters in a single heap allocation.
//!
//! An [`Entry`] is a `Box<[u8]>` laid out as
//!
//! ```text
//! tag | [key length varint] | key bytes | counter 0 | counter 1 | ... | [spare slots]
//! ```
//!
//! * `tag`, one byte: bit 0 is the *wide* flag (12-byte counters instead of
//!   8-byte ones, see [`crate::counters`]), bit 1 the *spare* flag, and bits
//!   2..=7 the key's length when it is below 63. The value 63 there means the
//!   length is 63 or more and follows as a LEB128 varint of `length - 63`.
//!   Real keys are short, so the whole header is usually this one byte.
//! * The key's bytes (valid UTF-8: they are only ever copied from a `&str`).
//! * The counters, sorted by strictly increasing second, never a zero count,
//!   never none (an emptied key is removed from the store).
//! * With the spare flag, one or more unused counter slots at the end. The
//!   last slot's second word holds how many there are, so the number of
//!   counters is always known from the allocation's length alone: no count
//!   field costs every key a few bytes.
//!
//! Why one allocation: every allocation costs an allocator header and/or the
//! rounding up to its size class (glibc: an 8-byte header and 16-byte steps;
//! mimalloc: classes 16 bytes apart between 64 and 128 bytes), and a separate
//! key allocation would also cost a pointer in the table slot.
//!
//! Why no spare capacity below 16 counters: such entries are the bulk of a
//! real store, so every spare slot costs real memory, and the copy on growth
//! is small. The price is an allocator call for the first hit of each new
//! second of a key; [`Entry::add`] keeps that path short and the path of
//! further hits in the newest second free of it. Longer series keep up to
//! 1/16 spare on growth (at most [`MAX_SPARE_ON_GROWTH`] slots), so that
//! appending to them stays amortised O(1), and eviction leaves freed slots
//! as spare up to 1/8 (twice what growth leaves), so that a series sliding
//! through time, one counter evicted and one appended each second, does not
//! reallocate.

use crate::counters::{
    counter_bytes, read_u32, slot_count, write_counter, write_u32, Counters, NARROW_BYTES,
};

/// Tag bit: the counters are wide (12 bytes).
const WIDE_FLAG: u8 = 0b01;
/// Tag bit: unused counter slots follow the counters.
const SPARE_FLAG: u8 = 0b10;
/// Key lengths below this live in the tag; this value in the tag means the
/// length follows as a varint of `length - LONG_KEY`.
const LONG_KEY: usize = 63;
/// Most spare slots a growth leaves (a long series keeps growing in steps of
/// 1/16 of its length, up to this many counters).
pub(crate) const MAX_SPARE_ON_GROWTH: usize = 64;
/// Most bytes a varint of a (64-bit) `usize` takes.
const MAX_VARINT_BYTES: usize = 10;

/// Spare slots to leave when a series of `counters` counters has to grow.
///
/// Below 16 counters none: such entries are small, so the copy on growth is
/// cheap, and they are the bulk of a real store, so spare slots would cost
/// real memory.
pub(crate) fn spare_on_growth(counters: usize) -> usize {
    (counters / 16).min(MAX_SPARE_ON_GROWTH)
}

/// Whether an entry of `counters` counters with `spare` spare slots, after
/// eviction, holds too many to keep. Twice what growth leaves, so that a
/// series sliding through time (one counter evicted, one appended, every
/// second) reuses the evicted slot instead of shrinking and regrowing.
fn too_much_spare(counters: usize, spare: usize) -> bool {
    spare > 2 * spare_on_growth(counters)
}

/// Appends `value` as a LEB128 varint.
pub(crate) fn write_varint(out: &mut Vec<u8>, mut value: usize) {
    while value >= 0x80 {
        out.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Reads the LEB128 varint at the start of `bytes`: the value and how many
/// bytes it took. The bytes were written by [`write_varint`].
pub(crate) fn read_varint(bytes: &[u8]) -> (usize, usize) {
    let mut value = 0usize;
    for (i, &byte) in bytes.iter().enumerate().take(MAX_VARINT_BYTES) {
        value |= usize::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            return (value, i + 1);
        }
    }
    unreachable!("malformed varint in the store's own bytes")
}

/// Bytes of the varint of `value`.
fn varint_len(value: usize) -> usize {
    // 7 bits per byte; at least one byte.
    (usize::BITS - value.leading_zeros()).div_ceil(7).max(1) as usize
}

/// Bytes of the header of an entry whose key is `key_len` bytes long.
fn header_len(key_len: usize) -> usize {
    if key_len < LONG_KEY {
        1
    } else {
        1 + varint_len(key_len - LONG_KEY)
    }
}

/// Appends an entry's header: the tag and, for long keys, the length varint.
fn write_header(out: &mut Vec<u8>, key_len: usize, wide: bool) {
    let short = key_len.min(LONG_KEY);
    let flags = if wide { WIDE_FLAG } else { 0 };
    // short <= 63, so short << 2 fits in the byte.
    out.push((short as u8) << 2 | flags);
    if key_len >= LONG_KEY {
        write_varint(out, key_len - LONG_KEY);
    }
}

/// The key start and length of a header with a long key (out of line: keys
/// of 63 bytes or more are rare, and the hot path stays small).
#[cold]
fn long_key_length(bytes: &[u8]) -> (usize, usize) {
    let (extra, used) = read_varint(&bytes[1..]);
    (1 + used, LONG_KEY + extra)
}

/// Where the parts of an entry lie, decoded from its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    /// Offset of the key's first byte.
    pub(crate) key_start: usize,
    /// Offset just past the key: where the counters start.
    pub(crate) key_end: usize,
    /// Counters are 12 bytes rather than 8.
    pub(crate) wide: bool,
    /// Spare slots follow the counters.
    spare: bool,
}

impl Header {
    /// Decodes the header at the start of `bytes` (an entry or an image
    /// record, which share the format).
    #[inline]
    pub(crate) fn parse(bytes: &[u8]) -> Self {
        let tag = bytes[0];
        let short = usize::from(tag >> 2);
        let (key_start, key_len) = if short < LONG_KEY {
            (1, short)
        } else {
            long_key_length(bytes)
        };
        Self {
            key_start,
            key_end: key_start + key_len,
            wide: tag & WIDE_FLAG != 0,
            spare: tag & SPARE_FLAG != 0,
        }
    }

    /// Bytes per counter.
    #[inline]
    pub(crate) fn width(&self) -> usize {
        counter_bytes(self.wide)
    }
}

/// The decoded shape of an entry: its header, how many counters it holds and
/// how many spare slots follow them.
#[derive(Clone, Copy, Debug)]
struct Shape {
    header: Header,
    len: usize,
    spare: usize,
}

impl Shape {
    /// Offset of counter (or slot) `index`.
    #[inline]
    fn offset(&self, index: usize) -> usize {
        self.header.key_end + index * self.header.width()
    }

    /// The counters of the entry `bytes` of this shape.
    #[inline]
    fn counters<'a>(&self, bytes: &'a [u8]) -> Counters<'a> {
        Counters::new(
            &bytes[self.header.key_end..self.offset(self.len)],
            self.header.wide,
        )
    }
}

/// What [`Entry::evict_before`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Eviction {
    /// Counters dropped.
    pub(crate) dropped: usize,
    /// Counters left; when 0 the entry was left untouched and the caller
    /// must remove it.
    pub(crate) left: usize,
}

/// One key with its counters; see the [module docs](self).
#[derive(Clone)]
pub(crate) struct Entry {
    bytes: Box<[u8]>,
}

impl Entry {
    /// An entry for `key` holding one counter. `count` must be above 0.
    pub(crate) fn new(key: &str, second: u32, count: u64) -> Self {
        debug_assert!(count > 0, "zero counts are never stored");
        let wide = u32::try_from(count).is_err();
        let width = counter_bytes(wide);
        // Exact capacity, so that boxing does not reallocate.
        let mut bytes = Vec::with_capacity(header_len(key.len()) + key.len() + width);
        write_header(&mut bytes, key.len(), wide);
        bytes.extend_from_slice(key.as_bytes());
        let at = bytes.len();
        bytes.resize(at + width, 0);
        write_counter(&mut bytes, at, wide, second, count);
        Self {
            bytes: bytes.into_boxed_slice(),
        }
    }

    #[inline]
    fn shape(&self) -> Shape {
        let header = Header::parse(&self.bytes);
        let width = header.width();
        let slots = slot_count(self.bytes.len() - header.key_end, header.wide);
        let spare = if header.spare {
            // The spare count is a u32 in the last slot's second word.
            read_u32(&self.bytes, self.bytes.len() - width) as usize
        } else {
            0
        };
        Shape {
            header,
            len: slots - spare,
            spare,
        }
    }

    /// The key's bytes.
    #[inline]
    pub(crate) fn key(&self) -> &[u8] {
        let header = Header::parse(&self.bytes);
        &self.bytes[header.key_start..header.key_end]
    }

    /// The counters, sorted by second.
    #[inline]
    pub(crate) fn counters(&self) -> Counters<'_> {
        self.shape().counters(&self.bytes)
    }

    /// Heap bytes of the entry (its allocation's requested size).
    pub(crate) fn heap_bytes(&self) -> usize {
        self.bytes.len()
    }

    /// Adds `count` (> 0) hits in `second`. Returns `true` when a new counter
    /// was created, `false` when an existing one was increased.
    #[inline]
    pub(crate) fn add(&mut self, second: u32, count: u64) -> bool {
        debug_assert!(count > 0, "zero counts are never stored");
        // Hot path: another hit in the newest second of a narrow entry with
        // no spare slot (nearly every add). The newest counter is then the
        // entry's last 8 bytes, an address known from the table slot's
        // pointer and length alone, so the CPU fetches its cache line while
        // the header's is still on its way instead of after it.
        let header = Header::parse(&self.bytes);
        if !header.wide && !header.spare {
            let at = self.bytes.len() - NARROW_BYTES;
            let newest = read_u32(&self.bytes, at);
            if newest == second {
                let total = u64::from(read_u32(&self.bytes, at + 4)).saturating_add(count);
                if let Ok(total) = u32::try_from(total) {
                    write_u32(&mut self.bytes, at + 4, total);
                    return false;
                }
            } else if newest < second {
                // Next hottest: the first hit of a new newest second.
                let counters = slot_count(self.bytes.len() - header.key_end, false);
                if let (Ok(count), 0) = (u32::try_from(count), spare_on_growth(counters + 1)) {
                    self.append_exact(second, count);
                    return true;
                }
            }
        }
        self.add_slow(second, count)
    }

    /// Appends a narrow counter to a narrow entry with no spare slot, growing
    /// the allocation by exactly its 8 bytes: the shortest growth path.
    fn append_exact(&mut self, second: u32, count: u32) {
        let mut bytes = Vec::from(std::mem::take(&mut self.bytes));
        bytes.reserve_exact(NARROW_BYTES);
        bytes.extend_from_slice(&second.to_le_bytes());
        bytes.extend_from_slice(&count.to_le_bytes());
        // Capacity equals length: no second reallocation.
        self.bytes = bytes.into_boxed_slice();
    }

    /// [`add`](Self::add) for everything but its hot path.
    fn add_slow(&mut self, second: u32, count: u64) -> bool {
        let shape = self.shape();
        let counters = shape.counters(&self.bytes);
        // Seconds arrive mostly in order: try the newest counter first.
        let found = match counters.last_second() {
            Some(last) if last < second => Err(shape.len),
            Some(last) if last == second => Ok(shape.len - 1),
            Some(_) => counters.search(second),
            None => Err(0),
        };
        match found {
            Ok(index) => {
                let total = counters.count(index).saturating_add(count);
                self.set_count(shape, index, total);
                false
            }
            Err(index) => {
                self.insert(shape, index, second, count);
                true
            }
        }
    }

    /// Sets the count of counter `index`, widening the entry first if the
    /// count does not fit a narrow counter.
    fn set_count(&mut self, mut shape: Shape, index: usize, count: u64) {
        if !shape.header.wide && u32::try_from(count).is_err() {
            shape = self.rebuild(shape, true, 0);
        }
        let at = shape.offset(index);
        let second = read_u32(&self.bytes, at);
        write_counter(&mut self.bytes, at, shape.header.wide, second, count);
    }

    /// Inserts a new counter at `index`, growing the entry if no slot is
    /// spare and widening it if `count` needs it.
    fn insert(&mut self, mut shape: Shape, index: usize, second: u32, count: u64) {
        if !shape.header.wide && u32::try_from(count).is_err() {
            shape = self.rebuild(shape, true, 0);
        }
        if shape.spare == 0 {
            shape = self.resize(shape, spare_on_growth(shape.len + 1) + 1);
        }
        let width = shape.header.width();
        let at = shape.offset(index);
        self.bytes
            .copy_within(at..shape.offset(shape.len), at + width);
        write_counter(&mut self.bytes, at, shape.header.wide, second, count);
        self.set_spare(Shape {
            len: shape.len + 1,
            spare: shape.spare - 1,
            ..shape
        });
    }

    /// Drops the counters with second < `min_second`.
    ///
    /// The survivors move to the front. The freed slots become spare ones,
    /// unless that is more than [`too_much_spare`] allows, in which case the
    /// allocation shrinks to what growth would leave; a wide entry whose
    /// remaining counts all fit in `u32` turns narrow again.
    pub(crate) fn evict_before(&mut self, min_second: i64) -> Eviction {
        let shape = self.shape();
        let counters = shape.counters(&self.bytes);
        let cut = counters.partition_point(|s| i64::from(s) < min_second);
        let left = shape.len - cut;
        if cut == 0 || left == 0 {
            return Eviction { dropped: cut, left };
        }
        // Checked before the survivors move over the evicted counters.
        let can_narrow = shape.header.wide && counters.tail(cut).fits_narrow();
        self.bytes.copy_within(
            shape.offset(cut)..shape.offset(shape.len),
            shape.header.key_end,
        );
        let shape = Shape {
            len: left,
            spare: shape.spare + cut,
            ..shape
        };
        if can_narrow {
            self.rebuild(shape, false, spare_on_growth(left));
        } else if too_much_spare(left, shape.spare) {
            self.resize(shape, spare_on_growth(left));
        } else {
            self.set_spare(shape);
        }
        Eviction { dropped: cut, left }
    }

    /// Reallocates the entry to hold its counters plus `spare` spare slots,
    /// exactly, and returns the new shape.
    fn resize(&mut self, shape: Shape, spare: usize) -> Shape {
        let new_len = shape.offset(shape.len + spare);
        let mut bytes = Vec::from(std::mem::take(&mut self.bytes));
        if new_len > bytes.len() {
            bytes.reserve_exact(new_len - bytes.len());
            bytes.resize(new_len, 0);
        } else {
            bytes.truncate(new_len);
        }
        // Capacity equals length here, so this does not reallocate again
        // (except when shrinking, where it is the point).
        self.bytes = bytes.into_boxed_slice();
        let shape = Shape { spare, ..shape };
        self.set_spare(shape);
        shape
    }

    /// Rewrites the entry with counters of the given width and `spare` spare
    /// slots, and returns the new shape. Narrowing requires every count to
    /// fit in a `u32`.
    fn rebuild(&mut self, shape: Shape, wide: bool, spare: usize) -> Shape {
        let key = &self.bytes[shape.header.key_start..shape.header.key_end];
        let width = counter_bytes(wide);
        let mut bytes =
            Vec::with_capacity(shape.header.key_start + key.len() + (shape.len + spare) * width);
        write_header(&mut bytes, key.len(), wide);
        bytes.extend_from_slice(key);
        let key_end = bytes.len();
        bytes.resize(key_end + (shape.len + spare) * width, 0);
        let old = shape.counters(&self.bytes);
        for (index, (second, count)) in old.iter().enumerate() {
            write_counter(&mut bytes, key_end + index * width, wide, second, count);
        }
        self.bytes = bytes.into_boxed_slice();
        let shape = Shape {
            header: Header::parse(&self.bytes),
            len: shape.len,
            spare,
        };
        self.set_spare(shape);
        shape
    }

    /// Records `shape.spare` in the tag and, when above 0, in the last slot.
    fn set_spare(&mut self, shape: Shape) {
        if shape.spare == 0 {
            self.bytes[0] &= !SPARE_FLAG;
        } else {
            self.bytes[0] |= SPARE_FLAG;
            let last_slot = self.bytes.len() - shape.header.width();
            // At most 2 * MAX_SPARE_ON_GROWTH (see too_much_spare), far below
            // u32::MAX; saturate anyway.
            let spare = u32::try_from(shape.spare).unwrap_or(u32::MAX);
            write_u32(&mut self.bytes, last_slot, spare);
        }
    }

    /// Appends the entry to a [`crate::StoreImage`] buffer: the number of
    /// counters as a varint, then the entry without its spare slots.
    pub(crate) fn write_image_record(&self, out: &mut Vec<u8>) {
        let shape = self.shape();
        write_varint(out, shape.len);
        let tag_at = out.len();
        out.extend_from_slice(&self.bytes[..shape.offset(shape.len)]);
        out[tag_at] &= !SPARE_FLAG;
    }

    /// Spare slots after the counters.
    #[cfg(test)]
    pub(crate) fn spare(&self) -> usize {
        self.shape().spare
    }

    /// Panics unless the entry is well formed.
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        let shape = self.shape();
        let header = shape.header;
        let key = self.key();
        assert!(std::str::from_utf8(key).is_ok(), "key is not UTF-8");
        let mut canonical = Vec::new();
        write_header(&mut canonical, key.len(), header.wide);
        assert_eq!(
            canonical.len(),
            header.key_start,
            "header is not the shortest encoding"
        );
        assert_eq!(
            (self.bytes.len() - header.key_end) % header.width(),
            0,
            "allocation is not a whole number of slots"
        );
        assert_eq!(
            header.spare,
            shape.spare > 0,
            "spare flag and count disagree"
        );
        assert!(shape.len > 0, "entry is empty");
        assert!(
            shape.spare <= 2 * spare_on_growth(shape.len),
            "too many spare slots: {} for {} counters",
            shape.spare,
            shape.len
        );
        let counters = self.counters();
        assert_eq!(counters.len(), shape.len);
        let pairs: Vec<(u32, u64)> = counters.iter().collect();
        assert!(
            pairs.windows(2).all(|w| w[0].0 < w[1].0),
            "seconds are not strictly increasing"
        );
        assert!(pairs.iter().all(|&(_, c)| c > 0), "zero count");
        assert_eq!(
            header.wide,
            pairs.iter().any(|&(_, c)| u32::try_from(c).is_err()),
            "wide flag does not match the counts"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(entry: &Entry) -> Vec<(u32, u64)> {
        entry.counters().iter().collect()
    }

    #[test]
    fn varints_round_trip() {
        for value in [
            0,
            1,
            0x7f,
            0x80,
            0x3fff,
            0x4000,
            u32::MAX as usize,
            usize::MAX,
        ] {
            let mut bytes = Vec::new();
            write_varint(&mut bytes, value);
            assert_eq!(read_varint(&bytes), (value, bytes.len()));
        }
    }

    #[test]
    fn keys_of_every_length_round_trip() {
        for len in (0..=300).chain([1000, 16_383, 16_384, 16_447, 16_448, 70_000]) {
            let key: String = (0..len)
                .map(|i| char::from(b'a' + (i % 26) as u8))
                .collect();
            let mut entry = Entry::new(&key, 9, 2);
            assert_eq!(entry.key(), key.as_bytes(), "len {len}");
            entry.add(8, 1);
            entry.add(10, u64::MAX);
            entry.check_invariants();
            assert_eq!(pairs(&entry), [(8, 1), (9, 2), (10, u64::MAX)]);
            let header_bytes = Header::parse(&entry.bytes).key_start;
            let expected = if len < LONG_KEY {
                1
            } else if len < LONG_KEY + 128 {
                2
            } else {
                3
            };
            assert!(header_bytes <= expected.max(4), "len {len}: {header_bytes}");
            if len < LONG_KEY + 16_384 {
                assert_eq!(header_bytes, expected, "len {len}");
            }
        }
        let entry = Entry::new("héllo wörld ✓", 1, 1);
        assert_eq!(entry.key(), "héllo wörld ✓".as_bytes());
        entry.check_invariants();
    }

    #[test]
    fn narrow_entry_is_exactly_header_key_and_counters() {
        let mut entry = Entry::new("bench-0000123456", 100, 1);
        for second in 101..110 {
            entry.add(second, 1);
        }
        entry.check_invariants();
        // 1 tag byte + 16 key bytes + 10 counters of 8 bytes, no spare.
        assert_eq!(entry.heap_bytes(), 1 + 16 + 10 * 8);
        assert_eq!(entry.spare(), 0);
    }

    #[test]
    fn wide_switch_at_the_u32_boundary() {
        let max32 = u64::from(u32::MAX);
        let mut entry = Entry::new("k", 5, max32 - 1);
        entry.add(6, 1);
        entry.add(5, 1);
        assert!(!Header::parse(&entry.bytes).wide, "u32::MAX fits");
        assert_eq!(pairs(&entry), [(5, max32), (6, 1)]);
        entry.add(5, 1);
        assert!(Header::parse(&entry.bytes).wide, "u32::MAX + 1 does not");
        entry.check_invariants();
        assert_eq!(pairs(&entry), [(5, max32 + 1), (6, 1)]);
        assert_eq!(entry.heap_bytes(), 2 + 2 * 12);
        // Counts stay exact past the boundary and saturate at u64::MAX.
        entry.add(6, u64::MAX - 5);
        entry.add(6, 10);
        entry.add(4, 3);
        assert_eq!(pairs(&entry), [(4, 3), (5, max32 + 1), (6, u64::MAX)]);
        entry.check_invariants();
        // Evicting the big counts makes the entry narrow again.
        assert_eq!(
            entry.evict_before(6),
            Eviction {
                dropped: 2,
                left: 1
            }
        );
        assert!(Header::parse(&entry.bytes).wide, "u64::MAX is still there");
        entry.add(7, 1);
        assert_eq!(
            entry.evict_before(7),
            Eviction {
                dropped: 1,
                left: 1
            }
        );
        assert!(!Header::parse(&entry.bytes).wide);
        assert_eq!(pairs(&entry), [(7, 1)]);
        assert_eq!(entry.heap_bytes(), 2 + 8);
        entry.check_invariants();
    }

    #[test]
    fn a_new_big_counter_widens_a_narrow_entry() {
        let mut entry = Entry::new("k", 5, 1);
        entry.add(3, 1 << 32);
        entry.check_invariants();
        assert_eq!(pairs(&entry), [(3, 1 << 32), (5, 1)]);
        let mut entry = Entry::new("k", 5, 1);
        entry.add(9, u64::MAX);
        entry.check_invariants();
        assert_eq!(pairs(&entry), [(5, 1), (9, u64::MAX)]);
        let entry = Entry::new("k", 5, u64::from(u32::MAX) + 1);
        entry.check_invariants();
        assert!(Header::parse(&entry.bytes).wide);
    }

    #[test]
    fn long_series_grow_with_bounded_spare() {
        let mut entry = Entry::new("k", 0, 1);
        for second in 1..5000 {
            assert!(entry.add(second, 1));
            entry.check_invariants();
            let len = second as usize + 1;
            assert!(
                entry.spare() <= spare_on_growth(len),
                "{len}: {}",
                entry.spare()
            );
        }
        // Same-second hits never grow the entry.
        let bytes = entry.heap_bytes();
        assert!(!entry.add(4999, 7));
        assert!(!entry.add(2500, 7));
        assert_eq!(entry.heap_bytes(), bytes);
        assert_eq!(entry.counters().count(2500), 8);
        assert_eq!(entry.counters().count(4999), 8);
    }

    #[test]
    fn out_of_order_inserts_use_spare_slots() {
        let mut entry = Entry::new("k", 1000, 1);
        for second in (0..1000).rev() {
            entry.add(second * 2, 1);
            entry.check_invariants();
        }
        let seconds: Vec<u32> = entry.counters().iter().map(|(s, _)| s).collect();
        let expected: Vec<u32> = (0..1000).map(|s| s * 2).collect();
        assert_eq!(seconds, expected);
        assert_eq!(entry.counters().count(500), 2, "second 1000 was hit twice");
    }

    #[test]
    fn eviction_shrinks_entries() {
        let mut entry = Entry::new("key", 0, 1);
        for second in 1..1000 {
            entry.add(second, 1);
        }
        let full = entry.heap_bytes();
        assert_eq!(
            entry.evict_before(990),
            Eviction {
                dropped: 990,
                left: 10
            }
        );
        entry.check_invariants();
        assert_eq!(entry.spare(), 0);
        assert_eq!(entry.heap_bytes(), 1 + 3 + 10 * 8);
        assert!(entry.heap_bytes() < full / 50);
        assert_eq!(entry.counters().second(0), 990);
        // Nothing to drop: untouched. Everything to drop: untouched, left 0.
        assert_eq!(
            entry.evict_before(990),
            Eviction {
                dropped: 0,
                left: 10
            }
        );
        assert_eq!(
            entry.evict_before(5000),
            Eviction {
                dropped: 10,
                left: 0
            }
        );
        assert_eq!(entry.counters().len(), 10);
    }

    #[test]
    fn sliding_series_reuses_evicted_slots() {
        // A key hit every second with a 100-second retention: one counter
        // evicted and one appended each second.
        let mut entry = Entry::new("k", 0, 1);
        for second in 1..100 {
            entry.add(second, 1);
        }
        let mut sizes = std::collections::BTreeSet::new();
        for second in 100..1000 {
            entry.evict_before(i64::from(second) - 99);
            entry.add(second, 1);
            entry.check_invariants();
            assert_eq!(entry.counters().len(), 100);
            sizes.insert(entry.heap_bytes());
        }
        assert_eq!(sizes.len(), 1, "no reallocation while sliding: {sizes:?}");
    }

    #[test]
    fn image_records_drop_spare_slots() {
        let mut entry = Entry::new("key", 0, 1);
        for second in 1..39 {
            entry.add(second, 1);
        }
        assert_eq!(entry.spare(), 1);
        let mut record = Vec::new();
        entry.write_image_record(&mut record);
        let (len, used) = read_varint(&record);
        assert_eq!(len, 39);
        let header = Header::parse(&record[used..]);
        assert!(!header.spare);
        assert_eq!(record.len(), used + 1 + 3 + 39 * 8);
    }
}
