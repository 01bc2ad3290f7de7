//! A flat, read-only snapshot of a store, for writing checkpoints.
//!
//! A deep [`Clone`] of a [`WindowStore`](crate::WindowStore) makes one
//! allocation per key and a new hash table: it roughly doubles the store's
//! RSS while the checkpoint is written, and costs a `malloc` per key. A
//! [`StoreImage`] is instead one exact-size buffer holding every key's entry
//! back to back, each in the store's own entry format (see [`crate::entry`])
//! without spare slots and prefixed with its number of counters:
//!
//! ```text
//! counters varint | tag | [key length varint] | key bytes | counters ... | next record ...
//! ```
//!
//! Building it is a copy of each entry's bytes into one buffer, so it is about
//! the size of the entries themselves (no table slots, no allocator headers or
//! rounding), and reading it walks the buffer front to back.

use std::fmt;

use crate::counters::Counters;
use crate::entry::{read_varint, Header};

/// A flat snapshot of a [`WindowStore`](crate::WindowStore)'s keys and
/// counters, made by [`WindowStore::image`](crate::WindowStore::image).
///
/// It holds the same keys and counters as the store did, as one buffer, and
/// does not change when the store does. Iterate it with [`iter`](Self::iter),
/// exactly as [`WindowStore::iter`](crate::WindowStore::iter).
#[derive(Clone, Default)]
pub struct StoreImage {
    /// The records, back to back; see the [module docs](self).
    records: Box<[u8]>,
    keys: usize,
    counters: usize,
}

impl StoreImage {
    /// An image of `keys` keys and `counters` counters in `records`.
    pub(crate) fn new(records: Box<[u8]>, keys: usize, counters: usize) -> Self {
        Self {
            records,
            keys,
            counters,
        }
    }

    /// Every key with its counters as `(second, count)` in increasing second
    /// order, keys in no particular order: the same items as
    /// [`WindowStore::iter`](crate::WindowStore::iter) gave when the image
    /// was made.
    pub fn iter(&self) -> impl Iterator<Item = (&str, impl Iterator<Item = (i64, u64)> + '_)> + '_ {
        Records {
            rest: &self.records,
            left: self.keys,
        }
        .map(|(key, counters)| {
            let counters = counters
                .iter()
                .map(|(second, count)| (i64::from(second), count));
            (key, counters)
        })
    }

    /// Number of keys in the image.
    pub fn key_count(&self) -> usize {
        self.keys
    }

    /// Number of (key, second) counters in the image.
    pub fn counter_count(&self) -> usize {
        self.counters
    }

    /// Heap bytes the image holds (its one buffer, exactly).
    pub fn heap_bytes(&self) -> usize {
        self.records.len()
    }
}

impl fmt::Debug for StoreImage {
    /// A summary: the sizes, not the contents.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreImage")
            .field("keys", &self.keys)
            .field("counters", &self.counters)
            .field("bytes", &self.records.len())
            .finish()
    }
}

/// Walks the records of an image.
struct Records<'a> {
    rest: &'a [u8],
    left: usize,
}

impl<'a> Iterator for Records<'a> {
    type Item = (&'a str, Counters<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        self.left = self.left.checked_sub(1)?;
        let (len, used) = read_varint(self.rest);
        let record = &self.rest[used..];
        let header = Header::parse(record);
        let end = header.key_end + len * header.width();
        let key = crate::key_text(&record[header.key_start..header.key_end]);
        let counters = Counters::new(&record[header.key_end..end], header.wide);
        self.rest = &record[end..];
        Some((key, counters))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}
