//! Remembers which (producer, seq) batches are applied, so that a batch ingest resends (after a
//! timeout, a broken stream, its own restart or ours) is applied exactly once.
//!
//! A producer numbers its batches 1, 2, 3, … without gaps, so its progress is a watermark
//! `through` (every seq <= it is applied) plus the few seqs applied above it while an earlier one
//! is still in flight. That state is small, is what checkpoints store, and is what the aggregator
//! reports back as "durable through" so ingest can trim its log.
//!
//! Bounded: at most `max_above` seqs above the watermark per producer (a gap that never fills is
//! given up on, loudly) and at most `max_producers` producers (the least recently seen is
//! forgotten).
//!
//! A producer also says which seq its log starts at; seqs below it will never come again. If
//! the watermark is lower (this aggregator lost its state, or forgot the producer), the batches
//! in between are lost for good: [`AppliedBatches::skip_gone`] moves the watermark over them and
//! reports them, so the producer's later batches make progress instead of waiting on a gap that
//! cannot fill.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};

/// The progress of one producer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Progress {
    /// Every seq <= `through` is applied.
    pub(crate) through: u64,
    /// Applied seqs above `through + 1`.
    pub(crate) above: BTreeSet<u64>,
}

impl Progress {
    fn contains(&self, seq: u64) -> bool {
        seq <= self.through || self.above.contains(&seq)
    }

    fn insert(&mut self, seq: u64) {
        self.above.insert(seq);
        self.advance();
    }

    /// Moves `through` up over the applied seqs that directly follow it. Stops at `u64::MAX`,
    /// which has no successor: a producer can get there (its seqs and `first_kept_seq` come
    /// off the wire), and `through + 1` would overflow.
    fn advance(&mut self) {
        while let Some(next) = self.through.checked_add(1) {
            if self.above.first() != Some(&next) {
                break;
            }
            self.above.pop_first();
            self.through = next;
        }
    }
}

struct Entry {
    progress: Progress,
    last_used: u64,
}

/// Bounded memory of applied batches.
pub(crate) struct AppliedBatches {
    producers: Mutex<HashMap<u64, Entry>>,
    max_above: usize,
    max_producers: usize,
}

impl AppliedBatches {
    pub(crate) fn new(max_above: usize, max_producers: usize) -> Self {
        Self {
            producers: Mutex::new(HashMap::new()),
            max_above: max_above.max(1),
            max_producers: max_producers.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Entry>> {
        // Updates are single steps on plain maps; a poisoned lock leaves them usable.
        self.producers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The entry of `producer`, made (forgetting the least recently seen producer if there are
    /// too many) if it has none.
    fn entry<'a>(
        &self,
        producers: &'a mut HashMap<u64, Entry>,
        producer: u64,
        tick: u64,
    ) -> &'a mut Entry {
        if !producers.contains_key(&producer) && producers.len() >= self.max_producers {
            if let Some(oldest) = producers
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(p, _)| *p)
            {
                tracing::warn!(
                    producer = oldest,
                    "forgetting the least recently seen producer"
                );
                producers.remove(&oldest);
            }
        }
        let entry = producers.entry(producer).or_insert_with(|| Entry {
            progress: Progress::default(),
            last_used: tick,
        });
        entry.last_used = tick;
        entry
    }

    /// The producer's log starts at `first_kept`: every seq below it that is not applied can
    /// never arrive. Moves the watermark up to `first_kept - 1` if it is lower, and returns how
    /// many seqs were given up and the range they lie in (`None` if none was).
    pub(crate) fn skip_gone(
        &self,
        producer: u64,
        first_kept: u64,
        tick: u64,
    ) -> Option<(u64, std::ops::RangeInclusive<u64>)> {
        // Nothing can be gone below seq 1 (and 0 means the producer did not say).
        let last_gone = first_kept.checked_sub(1).filter(|&last| last > 0)?;
        let mut producers = self.lock();
        let progress = &mut self.entry(&mut producers, producer, tick).progress;
        if progress.through >= last_gone {
            return None;
        }
        let gone = progress.through + 1..=last_gone;
        let applied_in_gap = progress.above.range(gone.clone()).count() as u64;
        let missing = (last_gone - progress.through) - applied_in_gap;
        progress.above = progress.above.split_off(&first_kept);
        progress.through = last_gone;
        progress.advance();
        (missing > 0).then_some((missing, gone))
    }

    /// Marks (producer, seq) as applied; false when it already was (a resend).
    pub(crate) fn first_time(&self, producer: u64, seq: u64, tick: u64) -> bool {
        let mut producers = self.lock();
        let progress = &mut self.entry(&mut producers, producer, tick).progress;
        if progress.contains(seq) {
            return false;
        }
        progress.insert(seq);
        if progress.above.len() > self.max_above {
            // A gap that stays open this long means a batch the producer will never resend.
            // Move past it so memory stays bounded; a late resend of it would now be ignored.
            if let Some(&first) = progress.above.first() {
                tracing::error!(
                    producer,
                    missing_from = progress.through + 1,
                    missing_to = first - 1,
                    "giving up on batches that never arrived"
                );
                progress.through = first - 1;
                progress.insert(first);
            }
        }
        true
    }

    /// Unmarks (producer, seq), for a batch that was marked but could not be applied.
    /// Forgets every producer for which `forget` is true (a clustered aggregator giving up a
    /// partition forgets its producers, so that building it again applies everything again).
    pub(crate) fn forget_producers(&self, forget: impl Fn(u64) -> bool) {
        self.lock().retain(|producer, _| !forget(*producer));
    }

    pub(crate) fn forget(&self, producer: u64, seq: u64) {
        let mut producers = self.lock();
        let Some(entry) = producers.get_mut(&producer) else {
            return;
        };
        let progress = &mut entry.progress;
        if seq > progress.through {
            progress.above.remove(&seq);
        } else if seq > 0 {
            // The watermark passed it: lower the watermark below it, keep what was above.
            progress.above.extend(seq + 1..=progress.through);
            progress.through = seq - 1;
        }
    }

    /// A copy of every producer's progress, for a checkpoint.
    pub(crate) fn snapshot(&self) -> Vec<(u64, Progress)> {
        self.lock()
            .iter()
            .map(|(producer, entry)| (*producer, entry.progress.clone()))
            .collect()
    }

    /// Replaces all progress with what a checkpoint recorded.
    pub(crate) fn restore(&self, progress: Vec<(u64, Progress)>) {
        let mut producers = self.lock();
        producers.clear();
        for (producer, progress) in progress {
            producers.insert(
                producer,
                Entry {
                    progress,
                    last_used: 0,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found while writing the `aggregator_apply` fuzz target: a producer that says its log starts at
    /// `u64::MAX` and then sends that seq moved the watermark to `u64::MAX`, and the next
    /// step of the loop that advances it computed `u64::MAX + 1` (a panic in a debug build,
    /// which ends the apply stream; a wrap to 0 in a release build).
    #[test]
    fn the_watermark_reaches_the_last_seq_without_overflow() {
        let applied = AppliedBatches::new(100, 10);
        assert_eq!(
            applied.skip_gone(1, u64::MAX, 0),
            Some((u64::MAX - 1, 1..=u64::MAX - 1))
        );
        assert!(applied.first_time(1, u64::MAX, 0));
        assert!(
            !applied.first_time(1, u64::MAX, 0),
            "a resend of the last seq"
        );
        assert!(!applied.first_time(1, 5, 0));
        let snapshot: HashMap<_, _> = applied.snapshot().into_iter().collect();
        assert_eq!(snapshot[&1].through, u64::MAX);

        // The same through `skip_gone` alone: seqs applied above a gap that is given up.
        let applied = AppliedBatches::new(100, 10);
        assert!(applied.first_time(2, u64::MAX, 0));
        assert_eq!(
            applied.skip_gone(2, u64::MAX, 0),
            Some((u64::MAX - 1, 1..=u64::MAX - 1))
        );
        assert!(!applied.first_time(2, u64::MAX, 0));
    }

    #[test]
    fn resends_are_detected_in_and_out_of_order() {
        let applied = AppliedBatches::new(100, 10);
        assert!(applied.first_time(1, 1, 0));
        assert!(applied.first_time(1, 3, 0));
        assert!(!applied.first_time(1, 1, 0));
        assert!(!applied.first_time(1, 3, 0));
        assert!(applied.first_time(2, 1, 0), "producers are independent");
        assert!(applied.first_time(1, 2, 0));
        let snapshot: HashMap<_, _> = applied.snapshot().into_iter().collect();
        assert_eq!(
            snapshot[&1],
            Progress {
                through: 3,
                above: BTreeSet::new()
            }
        );
        assert!(!applied.first_time(1, 2, 0));
    }

    #[test]
    fn forget_undoes_a_mark_even_below_the_watermark() {
        let applied = AppliedBatches::new(100, 10);
        for seq in 1..=3 {
            assert!(applied.first_time(7, seq, 0));
        }
        applied.forget(7, 2);
        assert!(applied.first_time(7, 2, 0), "2 can be applied again");
        assert!(!applied.first_time(7, 3, 0), "3 is still applied");
        applied.forget(7, 9);
        assert!(applied.first_time(7, 4, 0));
    }

    #[test]
    fn bounded_gaps_and_producers() {
        let applied = AppliedBatches::new(2, 2);
        // Seq 1 never arrives; after more than 2 seqs above the gap it is given up.
        for seq in 2..=4 {
            assert!(applied.first_time(1, seq, 0));
        }
        let snapshot: HashMap<_, _> = applied.snapshot().into_iter().collect();
        assert_eq!(snapshot[&1].through, 4);
        // A third producer evicts the least recently used one.
        assert!(applied.first_time(2, 1, 1));
        assert!(applied.first_time(3, 1, 2));
        assert!(applied.first_time(1, 1, 3), "producer 1 was forgotten");
    }

    #[test]
    fn seqs_below_the_producer_s_log_are_given_up_once() {
        let applied = AppliedBatches::new(100, 10);
        // State lost: nothing known of producer 4, whose log now starts at 11.
        assert_eq!(applied.skip_gone(4, 11, 0), Some((10, 1..=10)));
        assert_eq!(applied.skip_gone(4, 11, 0), None, "reported once");
        assert!(
            !applied.first_time(4, 10, 0),
            "a seq below the log cannot be applied late"
        );
        assert!(applied.first_time(4, 11, 0));
        // Seqs applied above a gap are not counted as lost, and the watermark runs over them.
        assert!(applied.first_time(4, 14, 0));
        assert!(applied.first_time(4, 16, 0));
        assert_eq!(applied.skip_gone(4, 15, 0), Some((2, 12..=14)));
        let snapshot: HashMap<_, _> = applied.snapshot().into_iter().collect();
        assert_eq!(
            snapshot[&4],
            Progress {
                through: 14,
                above: [16].into()
            }
        );
        // A producer that says nothing (0) or whose log starts right after the watermark.
        assert_eq!(applied.skip_gone(4, 0, 0), None);
        assert_eq!(applied.skip_gone(4, 15, 0), None);
    }

    #[test]
    fn restore_replaces_progress() {
        let applied = AppliedBatches::new(100, 10);
        applied.first_time(5, 1, 0);
        applied.restore(vec![(
            9,
            Progress {
                through: 10,
                above: [12].into(),
            },
        )]);
        assert!(applied.first_time(5, 1, 0), "5 was not in the checkpoint");
        assert!(!applied.first_time(9, 10, 0));
        assert!(!applied.first_time(9, 12, 0));
        assert!(applied.first_time(9, 11, 0));
    }
}
