//! Fan-out to the aggregator shards and fan-in of their answers.
//!
//! Every shard is reached through its own client stack (see `hitcounter_stack::stack`), so a
//! failing shard trips only its own breaker. A key's reads go to the shard that owns it; reads
//! over many keys are grouped by shard and sent concurrently; `Top` asks every shard for its own
//! top `limit` and merges (exact, since every key lives on exactly one shard). A read that needs
//! a shard which cannot answer fails as a whole with `UNAVAILABLE`: a partial sum would be a
//! wrong count.

use futures::future::try_join_all;
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
}

fn unexpected() -> StackError {
    StackError::Other("aggregator answered a different call".into())
}

impl Shards {
    pub(crate) fn new(
        channels: Vec<Channel>,
        config: &StackConfig,
        max_message_bytes: usize,
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
        Ok(Self { stacks })
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
        let shard = shard_of(&key, self.stacks.len());
        let read = Read::Series(SeriesRequest {
            key,
            start_second,
            step_seconds,
            points,
        });
        match self.call(shard, read).await? {
            Answer::Series(answer) if answer.counts.len() == points as usize => Ok(answer.counts),
            _ => Err(unexpected()),
        }
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
        let mut merged: Vec<KeyCount> = try_join_all(calls).await?.into_iter().flatten().collect();
        merged.sort_unstable_by(|a, b| b.count.cmp(&a.count).then_with(|| a.key.cmp(&b.key)));
        merged.truncate(limit as usize);
        Ok(merged)
    }
}
