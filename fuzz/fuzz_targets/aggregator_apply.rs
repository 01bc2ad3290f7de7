//! Fuzz target: the aggregator's apply path on a stream of untrusted `ApplyRequest` bytes (as
//! an `Apply` stream delivers them): decode, skip resends per (producer, seq), add the deltas
//! to the window store. The input is a sequence of length-prefixed messages (a `u16` length,
//! little-endian, then the bytes). Nothing may panic; a resend or a probe changes no count; a
//! fresh batch adds exactly its deltas' counts; and a checkpoint written at the end loads back
//! to the same counts and the same per-producer progress.
#![no_main]

use std::collections::BTreeMap;

use hitcounter_aggregator::checkpoint::fuzzing::{Applied, ApplyModel};
use hitcounter_proto::aggregator::v1::ApplyRequest;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    // A small key limit some of the time, so that drops are exercised too.
    let max_keys = if mode & 1 == 0 { 1_000_000 } else { 2 };
    let dedup_window = usize::from(mode >> 1 & 7) + 1;
    let mut model = ApplyModel::new(dedup_window, 3, max_keys);
    // Expected counts while no delta was dropped (drops depend on arrival order of new keys).
    let mut expected: BTreeMap<(String, i64), u64> = BTreeMap::new();
    let mut exact = true;
    while let Some((len, tail)) = rest.split_first_chunk::<2>() {
        let len = usize::from(u16::from_le_bytes(*len)).min(tail.len());
        let (message, tail) = tail.split_at(len);
        rest = tail;
        let before = model.counts();
        match model.apply(message) {
            Err(_) => {}
            Ok(Applied::Probe | Applied::Duplicate) => {
                assert_eq!(
                    model.counts(),
                    before,
                    "a probe or a resend changes nothing"
                );
            }
            Ok(Applied::Fresh { dropped }) => {
                let request = ApplyRequest::decode(message).expect("it decoded once");
                let mut out_of_range = 0;
                for delta in request.deltas {
                    if u32::try_from(delta.second).is_err() {
                        out_of_range += 1;
                        continue;
                    }
                    if delta.count > 0 {
                        let slot = expected.entry((delta.key, delta.second)).or_default();
                        *slot = slot.saturating_add(delta.count);
                    }
                }
                assert!(dropped >= out_of_range);
                exact &= dropped == out_of_range;
            }
        }
    }
    let counts = model.counts();
    if exact {
        let mut flat: BTreeMap<(String, i64), u64> = BTreeMap::new();
        for (key, counters) in &counts {
            for &(second, count) in counters {
                flat.insert((key.clone(), second), count);
            }
        }
        assert_eq!(flat, expected, "every applied delta is counted once");
    }
    let owners = usize::from(mode >> 4 & 3) + 1;
    let restored = model
        .checkpoint_round_trip(owners)
        .expect("a checkpoint of applied state writes and loads");
    assert_eq!(restored.counts, counts, "a restart keeps every count");
    assert_eq!(
        restored.producers,
        model.progress(),
        "and every producer's progress"
    );
});
