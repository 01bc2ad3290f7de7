//! Remembers which (producer, sequence) batches were applied, so a batch that ingest resends
//! after a timeout or a broken stream is applied once.
//!
//! Ingest's forwarder never has more than a few batches unacknowledged, and a resend always
//! concerns one of those, so remembering the last `window` sequence numbers per producer is
//! enough. Both dimensions are bounded: `window` sequences per producer, `max_producers`
//! producers (the least recently seen is forgotten).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

/// Bounded memory of applied batches.
pub(crate) struct AppliedBatches {
    producers: Mutex<HashMap<u64, Recent>>,
    window: usize,
    max_producers: usize,
}

struct Recent {
    seen: HashSet<u64>,
    order: VecDeque<u64>,
    last_used: u64,
}

impl AppliedBatches {
    pub(crate) fn new(window: usize, max_producers: usize) -> Self {
        Self {
            producers: Mutex::new(HashMap::new()),
            window: window.max(1),
            max_producers: max_producers.max(1),
        }
    }

    /// Marks (producer, seq) as applied; false when it already was (a resend).
    pub(crate) fn first_time(&self, producer: u64, seq: u64, tick: u64) -> bool {
        // A poisoned lock only means another thread panicked mid-update of this bookkeeping;
        // the sets are still consistent enough to use.
        let mut producers = self.producers.lock().unwrap_or_else(|e| e.into_inner());
        if !producers.contains_key(&producer) && producers.len() >= self.max_producers {
            if let Some(oldest) = producers
                .iter()
                .min_by_key(|(_, r)| r.last_used)
                .map(|(p, _)| *p)
            {
                producers.remove(&oldest);
            }
        }
        let recent = producers.entry(producer).or_insert_with(|| Recent {
            seen: HashSet::new(),
            order: VecDeque::new(),
            last_used: tick,
        });
        recent.last_used = tick;
        if !recent.seen.insert(seq) {
            return false;
        }
        recent.order.push_back(seq);
        if recent.order.len() > self.window {
            if let Some(old) = recent.order.pop_front() {
                recent.seen.remove(&old);
            }
        }
        true
    }
}

impl AppliedBatches {
    /// Forgets (producer, seq), for a batch that was marked but could not be applied.
    pub(crate) fn forget(&self, producer: u64, seq: u64) {
        let mut producers = self.producers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(recent) = producers.get_mut(&producer) {
            if recent.seen.remove(&seq) {
                recent.order.retain(|s| *s != seq);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resends_are_detected_within_the_window() {
        let applied = AppliedBatches::new(3, 2);
        assert!(applied.first_time(1, 10, 0));
        assert!(!applied.first_time(1, 10, 1));
        assert!(applied.first_time(2, 10, 2), "producers are independent");
        for seq in 11..14 {
            assert!(applied.first_time(1, seq, 3));
        }
        // 10 fell out of producer 1's window of 3.
        assert!(applied.first_time(1, 10, 4));
        // A third producer evicts the least recently used one (2).
        assert!(applied.first_time(3, 1, 5));
        assert!(applied.first_time(2, 10, 6));
    }
}
