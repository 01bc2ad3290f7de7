//! Which aggregator shard owns a key.
//!
//! Ingest writes a key's deltas to one shard and query reads the key from the same shard, so both
//! must compute the same function in every process and across versions. That rules out the
//! standard library's randomly seeded hashers. The hash is FNV-1a (64-bit), tiny and stable,
//! followed by the MurmurHash3 64-bit finalizer: FNV alone is a poor choice for `% n`, because
//! its low bits depend only on the low bits of each byte (keys ending in the same digit then share
//! a shard), and its high bits were measured to spread `/page/{i}` keys 1110/90/1900/900 over four
//! owners. The finalizer mixes every input bit into every output bit. The high half places a key
//! on an owner task inside the aggregator, the whole hash picks its shard, so the two choices stay
//! independent.

/// The stable 64-bit FNV-1a hash of `key`.
pub fn key_hash(key: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    key.as_bytes().iter().fold(OFFSET, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(PRIME)
    })
}

/// The MurmurHash3 64-bit finalizer (`fmix64`): a bijection that avalanches every bit.
fn mix(mut hash: u64) -> u64 {
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

/// The placement hash of `key`: FNV-1a, then mixed.
pub fn placement_hash(key: &str) -> u64 {
    mix(key_hash(key))
}

/// The shard (0-based) of `key` among `shards` shards. `shards == 0` is treated as 1.
pub fn shard_of(key: &str, shards: usize) -> usize {
    (placement_hash(key) % shards.max(1) as u64) as usize
}

/// The owner task (0-based) of `key` among `owners` owners inside one aggregator. Uses the high
/// bits of the hash so that keys of one shard spread over all its owners.
pub fn owner_of(key: &str, owners: usize) -> usize {
    ((placement_hash(key) >> 32) % owners.max(1) as u64) as usize
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
    fn placement_is_stable() {
        // A change here would re-shard every deployment.
        assert_eq!(placement_hash("a"), mix(0xaf63_dc4c_8601_ec8c));
        // Computed independently (Python) from the FNV-1a and fmix64 definitions.
        assert_eq!(placement_hash("a"), 0x82a2_a958_a9be_ce5b);
        assert_eq!(shard_of("x", 0), 0);
    }

    #[test]
    fn shards_and_owners_spread_keys() {
        // Key shapes that defeat weak hashes: sequential numbers, keys sharing their last
        // character, and keys differing only in the high bits of one byte.
        let shapes: [fn(usize) -> String; 3] = [
            |i| format!("/page/{i}"),
            |i| format!("user-{i}0"),
            |i| format!("k{}{}", (b'A' + (i % 8) as u8 * 4) as char, i / 8),
        ];
        for shape in shapes {
            for n in [2usize, 3, 4, 8] {
                let mut shards = vec![0usize; n];
                let mut owners = vec![0usize; n];
                for i in 0..800 * n {
                    let key = shape(i);
                    shards[shard_of(&key, n)] += 1;
                    owners[owner_of(&key, n)] += 1;
                }
                // Within ±15 % of the mean of 800.
                for count in shards.iter().chain(owners.iter()) {
                    assert!(
                        (680..=920).contains(count),
                        "uneven spread over {n}: {shards:?} {owners:?} for keys like {}",
                        shape(1)
                    );
                }
            }
        }
    }
}
