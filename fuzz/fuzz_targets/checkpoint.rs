//! Fuzz target: the aggregator's checkpoint loader, as it runs at start on the newest file.
//! Half the inputs are whole files (header included), the other half payloads framed with a
//! valid header, so that they reach the protobuf decoding behind the checksum. Loading must
//! never panic, and whatever it accepts must be consistent: the counters it counts are the ones
//! in the stores, within the key limit.
#![no_main]

use hitcounter_aggregator::checkpoint::fuzzing::{frame_checkpoint, load_checkpoint};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let file = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        frame_checkpoint(rest)
    };
    let owners = usize::from(mode >> 1 & 3) + 1;
    let max_keys = if mode & 0x80 == 0 { 1_000_000 } else { 3 };
    if let Ok(contents) = load_checkpoint(&file, owners, max_keys) {
        assert!(contents.counts.len() <= contents.keys);
        assert!(contents.counts.len() <= max_keys * owners);
        let stored: usize = contents.counts.values().map(Vec::len).sum();
        assert!(stored <= contents.counters);
        for counters in contents.counts.values() {
            assert!(
                counters.windows(2).all(|w| w[0].0 < w[1].0),
                "one counter per second"
            );
            assert!(counters.iter().all(|&(_, count)| count > 0));
        }
    }
});
