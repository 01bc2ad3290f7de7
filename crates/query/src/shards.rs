//! Fan-out to the aggregator shards and fan-in of their answers.
//!
//! Every shard is reached through its own client stack (see `hitcounter_stack::stack`), so a
//! failing shard trips only its own breaker. A key's reads go to the shard that owns it; reads
//! over many keys are grouped by shard and sent concurrently; `Top` asks every shard for its own
//! top `limit` and merges (exact, since every key lives on exactly one shard). A read that needs
//! a shard which cannot answer fails as a whole with `UNAVAILABLE`: a partial sum would be a
//! wrong count.
//!
//! In clustered mode the aggregators host replicated partitions (`hitcounter_cluster::
//! Placement`): a key is read from the first host of its partition, and when that host cannot
//! answer (its breaker is open, it timed out, it is still catching up with the log) from the
//! next, within the same call. `Top` asks every aggregator and merges by key (replicas of a
//! partition return the same keys; the highest count is the freshest), and is whole when the
//! aggregators that answered host every partition between them.

use futures::future::{join_all, try_join_all};
use hitcounter_cluster::{partition_of, Placement};
use hitcounter_proto::aggregator::v1::{
    aggregator_client::AggregatorClient, CountRequest, CountResponse, KeyCount, SeriesRequest,
    SeriesResponse, TopRequest, TopResponse,
};
use hitcounter_stack::{shard::shard_of, ClientStack, StackConfig, StackError};
use tonic::{transport::Channel, Status};
use tower::ServiceExt;

/// One read call to a shard.
#[derive(Debug, Clone)]
pub(crate) enum Read {
    Count(CountRequest),
    Series(SeriesRequest),
    Top(TopRequest),
}

/// The answer to a [`Read`].
#[derive(Debug)]
pub(crate) enum Answer {
    Count(CountResponse),
    Series(SeriesResponse),
    Top(TopResponse),
}

/// The shards, each behind its client stack.
#[derive(Clone)]
pub(crate) struct Shards {
    stacks: Vec<ClientStack<Read, Answer>>,
    /// Clustered mode: which aggregators host which partitions. `None`: one shard per key.
    placement: Option<Placement>,
}

fn unexpected() -> StackError {
    StackError::Other("aggregator answered a different call".into())
}

impl Shards {
    pub(crate) fn new(
        channels: Vec<Channel>,
        config: &StackConfig,
        max_message_bytes: usize,
        placement: Option<Placement>,
    ) -> Result<Self, StackError> {
        let mut stacks = Vec::with_capacity(channels.len());
        for (shard, channel) in channels.into_iter().enumerate() {
            let client = AggregatorClient::new(channel)
                .max_decoding_message_size(max_message_bytes)
                .max_encoding_message_size(max_message_bytes);
            let raw = tower::service_fn(move |read: Read| {
                let mut client = client.clone();
                async move {
                    Ok::<_, Status>(match read {
                        Read::Count(r) => Answer::Count(client.count(r).await?.into_inner()),
                        Read::Series(r) => Answer::Series(client.series(r).await?.into_inner()),
                        Read::Top(r) => Answer::Top(client.top(r).await?.into_inner()),
                    })
                }
            });
            // The breaker's state is published as a metric by the stack itself.
            let (stack, _breaker) = hitcounter_stack::build("query", shard, config, raw)?;
            stacks.push(stack);
        }
        Ok(Self { stacks, placement })
    }

    /// Clustered mode: the hosts of `key`'s partition, preferred first.
    fn hosts_of(placement: &Placement, key: &str) -> Vec<usize> {
        placement
            .hosts(partition_of(key, placement.partitions))
            .collect()
    }

    /// Clustered mode: counts of `keys`, each from the first host of its partition that
    /// answers.
    async fn count_replicated(
        &self,
        placement: &Placement,
        keys: &[String],
        end_second: i64,
        window_seconds: u32,
    ) -> Result<Vec<u64>, StackError> {
        let hosts: Vec<Vec<usize>> = keys
            .iter()
            .map(|key| Self::hosts_of(placement, key))
            .collect();
        let mut counts = vec![0; keys.len()];
        let mut open: Vec<usize> = (0..keys.len()).collect();
        let mut last_error = None;
        for round in 0..placement.replicas {
            if open.is_empty() {
                break;
            }
            let mut groups: Vec<Vec<usize>> = vec![Vec::new(); self.stacks.len()];
            for &index in &open {
                groups[hosts[index][round]].push(index);
            }
            let calls = groups
                .into_iter()
                .enumerate()
                .filter(|(_, indexes)| !indexes.is_empty())
                .map(|(node, indexes)| async move {
                    let read = Read::Count(CountRequest {
                        keys: indexes.iter().map(|&i| keys[i].clone()).collect(),
                        end_second,
                        window_seconds,
                    });
                    let answer = match self.call(node, read).await {
                        Ok(Answer::Count(answer)) if answer.counts.len() == indexes.len() => {
                            Ok(answer.counts)
                        }
                        Ok(_) => Err(unexpected()),
                        Err(error) => Err(error),
                    };
                    (indexes, answer)
                });
            open.clear();
            for (indexes, answer) in join_all(calls).await {
                match answer {
                    Ok(answer) => {
                        for (index, count) in indexes.into_iter().zip(answer) {
                            counts[index] = count;
                        }
                    }
                    Err(error) => {
                        if round + 1 < placement.replicas {
                            metrics::counter!("hitcounter_query_replica_failovers_total")
                                .increment(1);
                        }
                        last_error = Some(error);
                        open.extend(indexes);
                    }
                }
            }
        }
        match (open.is_empty(), last_error) {
            (false, Some(error)) => Err(error),
            _ => Ok(counts),
        }
    }

    async fn call(&self, shard: usize, read: Read) -> Result<Answer, StackError> {
        self.stacks[shard].clone().oneshot(read).await
    }

    /// Window counts of `keys`, in order.
    pub(crate) async fn count(
        &self,
        keys: &[String],
        end_second: i64,
        window_seconds: u32,
    ) -> Result<Vec<u64>, StackError> {
        if let Some(placement) = &self.placement {
            return self
                .count_replicated(placement, keys, end_second, window_seconds)
                .await;
        }
        let n = self.stacks.len();
        let mut groups: Vec<(Vec<usize>, Vec<String>)> = vec![(Vec::new(), Vec::new()); n];
        for (index, key) in keys.iter().enumerate() {
            let group = &mut groups[shard_of(key, n)];
            group.0.push(index);
            group.1.push(key.clone());
        }
        let calls = groups
            .into_iter()
            .enumerate()
            .filter(|(_, (indexes, _))| !indexes.is_empty())
            .map(|(shard, (indexes, keys))| async move {
                let read = Read::Count(CountRequest {
                    keys,
                    end_second,
                    window_seconds,
                });
                match self.call(shard, read).await? {
                    Answer::Count(answer) if answer.counts.len() == indexes.len() => {
                        Ok((indexes, answer.counts))
                    }
                    _ => Err(unexpected()),
                }
            });
        let mut counts = vec![0; keys.len()];
        for (indexes, answer) in try_join_all(calls).await? {
            for (index, count) in indexes.into_iter().zip(answer) {
                counts[index] = count;
            }
        }
        Ok(counts)
    }

    /// Dense per-step counts of one key.
    pub(crate) async fn series(
        &self,
        key: String,
        start_second: i64,
        step_seconds: u32,
        points: u32,
    ) -> Result<Vec<u64>, StackError> {
        let hosts = match &self.placement {
            Some(placement) => Self::hosts_of(placement, &key),
            None => vec![shard_of(&key, self.stacks.len())],
        };
        let read = Read::Series(SeriesRequest {
            key,
            start_second,
            step_seconds,
            points,
        });
        let mut last_error = unexpected();
        for node in hosts {
            match self.call(node, read.clone()).await {
                Ok(Answer::Series(answer)) if answer.counts.len() == points as usize => {
                    return Ok(answer.counts)
                }
                Ok(_) => last_error = unexpected(),
                Err(error) => {
                    metrics::counter!("hitcounter_query_replica_failovers_total").increment(1);
                    last_error = error;
                }
            }
        }
        Err(last_error)
    }

    /// The top `limit` keys over every shard, among the keys starting with any of `prefixes`
    /// (disjoint key spaces: no key is counted twice).
    pub(crate) async fn top(
        &self,
        end_second: i64,
        window_seconds: u32,
        limit: u32,
        prefixes: &[String],
    ) -> Result<Vec<KeyCount>, StackError> {
        let calls = prefixes.iter().flat_map(|prefix| {
            (0..self.stacks.len()).map(move |shard| {
                let read = Read::Top(TopRequest {
                    end_second,
                    window_seconds,
                    limit,
                    prefix: prefix.clone(),
                });
                async move {
                    match self.call(shard, read).await? {
                        Answer::Top(answer) => Ok(answer.keys),
                        _ => Err(unexpected()),
                    }
                }
            })
        });
        let mut merged: Vec<KeyCount> = match &self.placement {
            None => try_join_all(calls).await?.into_iter().flatten().collect(),
            Some(placement) => {
                // Every aggregator answers for the partitions it hosts; what the ones that
                // answered host between them must be every partition.
                let answers = join_all(calls).await;
                let per_prefix = self.stacks.len();
                let mut covered = vec![vec![false; placement.partitions as usize]; prefixes.len()];
                let mut best: std::collections::HashMap<String, u64> =
                    std::collections::HashMap::new();
                let mut last_error = None;
                for (index, answer) in answers.into_iter().enumerate() {
                    let (prefix, node) = (index / per_prefix, index % per_prefix);
                    match answer {
                        Ok(keys) => {
                            for p in placement.partitions_of(node) {
                                covered[prefix][p as usize] = true;
                            }
                            for KeyCount { key, count } in keys {
                                let slot = best.entry(key).or_insert(0);
                                *slot = (*slot).max(count);
                            }
                        }
                        Err(error) => last_error = Some(error),
                    }
                }
                if let Some(error) = last_error {
                    if covered.iter().flatten().any(|c| !c) {
                        return Err(error);
                    }
                    metrics::counter!("hitcounter_query_replica_failovers_total").increment(1);
                }
                best.into_iter()
                    .map(|(key, count)| KeyCount { key, count })
                    .collect()
            }
        };
        merged.sort_unstable_by(|a, b| b.count.cmp(&a.count).then_with(|| a.key.cmp(&b.key)));
        merged.truncate(limit as usize);
        Ok(merged)
    }
}
