//! Fuzz target: ingest's request path before anything is counted: arbitrary bytes through the
//! protobuf decoding of `RecordHitsRequest` (or `RecordHitRequest`) and the validation of
//! `crates/ingest/src/validate.rs`. It must never panic, and what it accepts must keep the
//! contract: 1 to 10,000 hits, keys of 1 to 256 bytes of UTF-8, counts of 1 to 10^9 summing
//! to the acknowledged total, seconds inside the retention.
#![no_main]

use hitcounter_ingest::validate::{fuzzing, MAX_BATCH_HITS, MAX_COUNT, MAX_KEY_BYTES};
use libfuzzer_sys::fuzz_target;

const NOW_MS: i64 = 1_700_000_000_123;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let outcome = if mode & 1 == 0 {
        fuzzing::record_hits(rest, NOW_MS)
    } else {
        fuzzing::record_hit(rest, NOW_MS)
    };
    let Ok((hits, total)) = outcome else {
        return;
    };
    assert!((1..=MAX_BATCH_HITS).contains(&hits.len()));
    let mut sum = 0u64;
    for (key, second, count) in &hits {
        assert!(
            (1..=MAX_KEY_BYTES).contains(&key.len()),
            "{} bytes",
            key.len()
        );
        assert!((1..=MAX_COUNT).contains(count));
        assert!((NOW_MS / 1000 - 3601..=NOW_MS / 1000 + 60).contains(second));
        sum += count;
    }
    assert_eq!(sum, total);
});
