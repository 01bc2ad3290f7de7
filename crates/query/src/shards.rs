//! Fan-out to the aggregator shards and fan-in of their answers.
//!
//! Every shard is reached through its own client stack (see `hitcounter_stack::stack`), so a
//! failing shard trips only its own breaker. A key's reads go to the shard that owns it; reads
//! over many keys are grouped by shard and sent concurrently; `Top` asks every shard for its own
//! top `limit` and merges (exact, since every key lives on exactly one shard). A read that needs
//! a shard which cannot answer fails as a whole with `UNAVAILABLE`: a partial sum would be a
//! wrong count.
//!
//! In clustered mode the aggregators host replicated partitions, as a `hitcounter_cluster::
//! Roster` describes them: fixed (`--aggregator` in node order, static placement) or watched
//! from the cluster's membership (`--membership`: aggregators join and leave, and each says
//! which partitions it can serve). A key is read from the first of its partition's readers
//! (its hosts that serve it, then a former host that still does), and when that one cannot
//! answer (its breaker is open, it timed out, it is still catching up with the log) from the
//! next, within the same call. `Top` asks every aggregator and merges by key (replicas of a
//! partition return the same keys; the highest count is the freshest), and is whole when the
//! partitions the answers say they cover include every partition.

use std::{collections::HashMap, sync::Arc};

use futures::future::{join_all, try_join_all};
use hitcounter_cluster::{partition_of, Members, Roster};
use hitcounter_proto::aggregator::v1::{
    aggregator_client::AggregatorClient, CountRequest, CountResponse, KeyCount, SeriesRequest,
    SeriesResponse, TopRequest, TopResponse,
};
use hitcounter_stack::{shard::shard_of, ClientArgs, ClientStack, StackConfig, StackError};
use tokio::sync::watch;
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

/// The aggregators as query sees them at one moment: a client stack per node (per shard on
/// one machine) and, in clustered mode, the roster the stacks line up with.
pub(crate) struct View {
    /// By node (roster order) or shard. `None`: the node's address is unusable (logged).
    stacks: Vec<Option<ClientStack<Read, Answer>>>,
    roster: Option<Roster>,
}

/// The shards, each behind its client stack.
#[derive(Clone)]
pub(crate) struct Shards {
    view: watch::Receiver<Arc<View>>,
}

fn unexpected() -> StackError {
    StackError::Other("aggregator answered a different call".into())
}

/// A client stack around `channel`.
fn stack_for(
    node: usize,
    channel: Channel,
    config: &StackConfig,
    max_message_bytes: usize,
) -> Result<ClientStack<Read, Answer>, StackError> {
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
    let (stack, _breaker) = hitcounter_stack::build("query", node, config, raw)?;
    Ok(stack)
}

impl Shards {
    /// Fixed aggregators: one per shard on one machine (`roster` `None`), or the static
    /// placement's nodes.
    pub(crate) fn new(
        channels: Vec<Channel>,
        config: &StackConfig,
        max_message_bytes: usize,
        roster: Option<Roster>,
    ) -> Result<Self, StackError> {
        let mut stacks = Vec::with_capacity(channels.len());
        for (shard, channel) in channels.into_iter().enumerate() {
            stacks.push(Some(stack_for(shard, channel, config, max_message_bytes)?));
        }
        let (_, view) = watch::channel(Arc::new(View { stacks, roster }));
        Ok(Self { view })
    }

    /// Aggregators found in the cluster's membership, followed as they join, leave and
    /// announce what they serve. A node keeps its client stack (and its breaker) for as long
    /// as it keeps its address.
    pub(crate) fn discover(
        mut members: watch::Receiver<Members>,
        partitions: u32,
        replicas: usize,
        client: ClientArgs,
        max_message_bytes: usize,
    ) -> Self {
        let config = client.stack_config();
        let build = move |members: &Members,
                          known: &mut HashMap<String, ClientStack<Read, Answer>>,
                          next_id: &mut usize| {
            let roster = Roster::from_members(partitions, replicas, members);
            let stacks = roster
                .nodes
                .iter()
                .map(|node| {
                    if let Some(stack) = known.get(&node.address) {
                        return Some(stack.clone());
                    }
                    let made = client
                        .channel(&node.address)
                        .and_then(|channel| stack_for(*next_id, channel, &config, max_message_bytes));
                    match made {
                        Ok(stack) => {
                            *next_id += 1;
                            known.insert(node.address.clone(), stack.clone());
                            Some(stack)
                        }
                        Err(error) => {
                            tracing::warn!(node = %node.id, address = %node.address, %error, "cannot reach this aggregator: leaving it out");
                            None
                        }
                    }
                })
                .collect();
            // Only the nodes still listed keep their stacks.
            known.retain(|address, _| roster.nodes.iter().any(|n| &n.address == address));
            metrics::gauge!("hitcounter_query_aggregators").set(roster.nodes.len() as f64);
            Arc::new(View {
                stacks,
                roster: Some(roster),
            })
        };
        let mut known = HashMap::new();
        let mut next_id = 0;
        let first = build(&members.borrow_and_update(), &mut known, &mut next_id);
        let (sender, view) = watch::channel(first);
        tokio::spawn(async move {
            while members.changed().await.is_ok() {
                let next = build(&members.borrow_and_update(), &mut known, &mut next_id);
                if sender.send(next).is_err() {
                    break;
                }
            }
        });
        Self { view }
    }

    fn view(&self) -> Arc<View> {
        Arc::clone(&self.view.borrow())
    }

    /// Clustered mode: the nodes to read `key` from, in order.
    fn readers_of(roster: &Roster, key: &str) -> Vec<usize> {
        roster.readers(partition_of(key, roster.partitions))
    }

    /// Clustered mode: no node serves `key`'s partition now.
    fn no_reader(roster: &Roster, key: &str) -> StackError {
        StackError::Other(format!(
            "no aggregator serves partition {} now (all its replicas are down, building, or not yet announced)",
            partition_of(key, roster.partitions)
        ))
    }

    /// Clustered mode: counts of `keys`, each from the first reader of its partition that
    /// answers.
    async fn count_replicated(
        &self,
        view: &View,
        roster: &Roster,
        keys: &[String],
        end_second: i64,
        window_seconds: u32,
    ) -> Result<Vec<u64>, StackError> {
        let readers: Vec<Vec<usize>> = keys
            .iter()
            .map(|key| Self::readers_of(roster, key))
            .collect();
        if let Some(index) = readers.iter().position(Vec::is_empty) {
            return Err(Self::no_reader(roster, &keys[index]));
        }
        let rounds = readers.iter().map(Vec::len).max().unwrap_or(0);
        let mut counts = vec![0; keys.len()];
        let mut open: Vec<usize> = (0..keys.len()).collect();
        let mut last_error = None;
        for round in 0..rounds {
            if open.is_empty() {
                break;
            }
            let mut groups: Vec<Vec<usize>> = vec![Vec::new(); view.stacks.len()];
            let mut left = Vec::new();
            for &index in &open {
                match readers[index].get(round) {
                    Some(&node) => groups[node].push(index),
                    None => left.push(index),
                }
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
                    let answer = match view.call(node, read).await {
                        Ok(Answer::Count(answer)) if answer.counts.len() == indexes.len() => {
                            Ok(answer.counts)
                        }
                        Ok(_) => Err(unexpected()),
                        Err(error) => Err(error),
                    };
                    (indexes, answer)
                });
            open = left;
            for (indexes, answer) in join_all(calls).await {
                match answer {
                    Ok(answer) => {
                        for (index, count) in indexes.into_iter().zip(answer) {
                            counts[index] = count;
                        }
                    }
                    Err(error) => {
                        if round + 1 < rounds {
                            metrics::counter!("hitcounter_query_replica_failovers_total")
                                .increment(1);
                        }
                        last_error = Some(error);
                        open.extend(indexes);
                    }
                }
            }
        }
        match (open.first(), last_error) {
            (None, _) => Ok(counts),
            (Some(_), Some(error)) => Err(error),
            (Some(&index), None) => Err(Self::no_reader(roster, &keys[index])),
        }
    }

    /// Window counts of `keys`, in order.
    pub(crate) async fn count(
        &self,
        keys: &[String],
        end_second: i64,
        window_seconds: u32,
    ) -> Result<Vec<u64>, StackError> {
        let view = self.view();
        if let Some(roster) = &view.roster {
            return self
                .count_replicated(&view, roster, keys, end_second, window_seconds)
                .await;
        }
        let view = &view;
        let n = view.stacks.len();
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
                match view.call(shard, read).await? {
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
        let view = self.view();
        let hosts = match &view.roster {
            Some(roster) => Self::readers_of(roster, &key),
            None => vec![shard_of(&key, view.stacks.len())],
        };
        let mut last_error = match &view.roster {
            Some(roster) => Self::no_reader(roster, &key),
            None => unexpected(),
        };
        let read = Read::Series(SeriesRequest {
            key,
            start_second,
            step_seconds,
            points,
        });
        for node in hosts {
            match view.call(node, read.clone()).await {
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
        let view = self.view();
        let view = &view;
        let calls = prefixes.iter().flat_map(|prefix| {
            (0..view.stacks.len()).map(move |shard| {
                let read = Read::Top(TopRequest {
                    end_second,
                    window_seconds,
                    limit,
                    prefix: prefix.clone(),
                });
                async move {
                    match view.call(shard, read).await? {
                        Answer::Top(answer) => Ok(answer),
                        _ => Err(unexpected()),
                    }
                }
            })
        });
        let mut merged: Vec<KeyCount> = match &view.roster {
            None => try_join_all(calls)
                .await?
                .into_iter()
                .flat_map(|answer| answer.keys)
                .collect(),
            Some(roster) => {
                // Every aggregator answers for the partitions it serves now, and says which;
                // between them the answers must cover every partition.
                let answers = join_all(calls).await;
                let per_prefix = view.stacks.len().max(1);
                let mut covered = vec![vec![false; roster.partitions as usize]; prefixes.len()];
                let mut best: std::collections::HashMap<String, u64> =
                    std::collections::HashMap::new();
                let mut last_error = None;
                for (index, answer) in answers.into_iter().enumerate() {
                    let prefix = index / per_prefix;
                    match answer {
                        Ok(answer) => {
                            for p in answer.partitions {
                                if let Some(slot) = covered[prefix].get_mut(p as usize) {
                                    *slot = true;
                                }
                            }
                            for KeyCount { key, count } in answer.keys {
                                let slot = best.entry(key).or_insert(0);
                                *slot = (*slot).max(count);
                            }
                        }
                        Err(error) => last_error = Some(error),
                    }
                }
                if let Some(missing) = covered
                    .iter()
                    .flat_map(|c| c.iter().enumerate())
                    .find(|(_, c)| !**c)
                    .map(|(p, _)| p)
                {
                    return Err(last_error.unwrap_or_else(|| {
                        StackError::Other(format!(
                            "no aggregator serves partition {missing} now (all its replicas are down, building, or not yet announced)"
                        ))
                    }));
                }
                if last_error.is_some() {
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

impl View {
    async fn call(&self, node: usize, read: Read) -> Result<Answer, StackError> {
        match self.stacks.get(node).and_then(Option::as_ref) {
            Some(stack) => stack.clone().oneshot(read).await,
            None => Err(StackError::Other(format!(
                "aggregator {} has no usable address",
                self.roster
                    .as_ref()
                    .and_then(|r| r.nodes.get(node))
                    .map_or_else(|| node.to_string(), |n| n.id.clone())
            ))),
        }
    }
}
