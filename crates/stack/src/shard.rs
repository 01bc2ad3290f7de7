//! Which aggregator shard owns a key.
//!
//! Ingest writes a key's deltas to one shard and query reads the key from the same shard, so both
//! must compute the same function in every process and across versions. That rules out the
//! standard library's randomly seeded hashers; FNV-1a (64-bit) is tiny, stable, and spreads short
//! keys well enough for modulo sharding. The same hash, shifted, places a key on an owner task
//! inside the aggregator, so shard and owner choices stay independent.

/// The stable 64-bit FNV-1a hash of `key`.
pub fn key_hash(key: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    key.as_bytes().iter().fold(OFFSET, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(PRIME)
    })
}

/// The shard (0-based) of `key` among `shards` shards. `shards == 0` is treated as 1.
pub fn shard_of(key: &str, shards: usize) -> usize {
    (key_hash(key) % shards.max(1) as u64) as usize
}

/// The owner task (0-based) of `key` among `owners` owners inside one aggregator. Uses the high
/// bits of the hash so that keys of one shard spread over all its owners.
pub fn owner_of(key: &str, owners: usize) -> usize {
    ((key_hash(key) >> 32) % owners.max(1) as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable_fnv1a() {
        // Reference values of 64-bit FNV-1a; a change here would re-shard every deployment.
        assert_eq!(key_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(key_hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(key_hash("foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn shards_and_owners_spread_keys() {
        let mut shards = [0usize; 4];
        let mut owners = [0usize; 4];
        for i in 0..4000 {
            let key = format!("/page/{i}");
            shards[shard_of(&key, 4)] += 1;
            owners[owner_of(&key, 4)] += 1;
        }
        for n in shards.iter().chain(owners.iter()) {
            assert!(
                (800..1200).contains(n),
                "uneven spread: {shards:?} {owners:?}"
            );
        }
        assert_eq!(shard_of("x", 0), 0);
    }
}
