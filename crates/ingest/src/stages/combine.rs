//! The `combine` stage: pre-aggregation.
//!
//! Many hits share a (key, second), especially for hot keys; summing them here turns e.g. 1000
//! hits into a handful of deltas before they reach the disk and the network. The stage collects
//! requests for at most `interval` (which bounds the added latency) or until `max_deltas`
//! distinct (key, second) pairs are held (which bounds its memory), then flushes: deltas are
//! split by shard and handed, with the requests waiting for them, to the `log` stage. A full
//! flush channel makes the flush wait, and while it waits this stage reads nothing, so the hits
//! channel fills and the gRPC edge slows down: backpressure end to end.
//!
//! In clustered mode (`keep_apart`) a request with a batch id is summed on its own and kept
//! apart from the merged deltas (see `Flush::apart`), at most `max_apart` per flush (each
//! becomes a marker message of the flush's atomic batch, which holds at most 1000 messages).

use std::{collections::HashMap, time::Duration};

use hitcounter_pipeline::{StageReceiver, StageSender};
use hitcounter_proto::aggregator::v1::Delta;
use hitcounter_stack::shard::shard_of;
use tokio::time::Instant;

use super::{Apart, Durable, Flush, Pending};
use crate::error::IngestError;

/// Settings of the combine stage.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CombineSettings {
    pub(crate) max_deltas: usize,
    pub(crate) interval: Duration,
    /// Clustered mode: keep requests with a batch id apart.
    pub(crate) keep_apart: bool,
    /// Most requests kept apart in one flush.
    pub(crate) max_apart: usize,
}

type Merged = HashMap<(String, i64), u64, foldhash::fast::RandomState>;

/// Runs until the hits channel is closed and drained, then flushes what is left and returns,
/// which closes the forward channels.
pub(crate) async fn run(
    hits: StageReceiver<Pending>,
    flushes: StageSender<Flush>,
    shards: usize,
    settings: CombineSettings,
) -> Result<(), IngestError> {
    let mut pending = Merged::default();
    let mut waiters = Vec::new();
    let mut batch_ids = Vec::new();
    let mut apart = Vec::new();
    let hits_in = metrics::counter!("hitcounter_ingest_combined_hits_total");
    let deltas_out = metrics::counter!("hitcounter_ingest_combined_deltas_total");
    let max_deltas = settings.max_deltas.max(1);
    let mut open = true;
    while open {
        let Some(request) = hits.recv().await else {
            break;
        };
        hits_in.increment(request.hits.len() as u64);
        let mut held = take(
            &mut pending,
            &mut waiters,
            &mut batch_ids,
            &mut apart,
            request,
            settings.keep_apart,
        );
        let deadline = Instant::now() + settings.interval;
        // The deadline is checked on every turn: with input always ready, `select!` alone could
        // keep taking batches and never see the timer fire.
        while pending.len() + held < max_deltas
            && apart.len() < settings.max_apart.max(1)
            && Instant::now() < deadline
        {
            tokio::select! {
                next = hits.recv() => match next {
                    Some(request) => {
                        hits_in.increment(request.hits.len() as u64);
                        held += take(&mut pending, &mut waiters, &mut batch_ids, &mut apart, request, settings.keep_apart);
                    }
                    None => {
                        open = false;
                        break;
                    }
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        deltas_out.increment((pending.len() + held) as u64);
        let flush = Flush {
            shards: split(&mut pending, shards),
            waiters: std::mem::take(&mut waiters),
            batch_ids: std::mem::take(&mut batch_ids),
            apart: std::mem::take(&mut apart),
        };
        flushes
            .send(flush)
            .await
            .map_err(|_| IngestError::StageStopped("log"))?;
    }
    tracing::debug!("combine drained");
    Ok(())
}

/// Takes one request into the flush being built; returns the deltas it added apart from
/// `pending` (clustered mode's requests with a batch id).
fn take(
    pending: &mut Merged,
    waiters: &mut Vec<Durable>,
    batch_ids: &mut Vec<super::Claimed>,
    apart: &mut Vec<Apart>,
    request: Pending,
    keep_apart: bool,
) -> usize {
    let Pending {
        hits,
        done,
        batch_id,
    } = request;
    let batch_id = match batch_id {
        Some(claimed) if keep_apart => {
            let mut own = Merged::default();
            for hit in hits {
                let slot = own.entry((hit.key, hit.second)).or_insert(0);
                *slot = slot.saturating_add(hit.count);
            }
            let deltas: Vec<Delta> = own
                .into_iter()
                .map(|((key, second), count)| Delta { key, second, count })
                .collect();
            let added = deltas.len();
            apart.push(Apart {
                deltas,
                done,
                claimed,
            });
            return added;
        }
        batch_id => batch_id,
    };
    for hit in hits {
        let slot = pending.entry((hit.key, hit.second)).or_insert(0);
        *slot = slot.saturating_add(hit.count);
    }
    waiters.push(done);
    batch_ids.extend(batch_id);
    0
}

fn split(pending: &mut Merged, shards: usize) -> Vec<Vec<Delta>> {
    let mut parts: Vec<Vec<Delta>> = (0..shards.max(1)).map(|_| Vec::new()).collect();
    for ((key, second), count) in pending.drain() {
        let shard = shard_of(&key, parts.len());
        parts[shard].push(Delta { key, second, count });
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::ValidHit;

    fn hit(key: &str, second: i64, count: u64) -> ValidHit {
        ValidHit {
            key: key.into(),
            second,
            count,
        }
    }

    async fn request(
        ledger: &std::sync::Arc<crate::ledger::BatchLedger>,
        hits: Vec<ValidHit>,
        id: Option<&str>,
    ) -> (
        Pending,
        tokio::sync::oneshot::Receiver<Result<(), super::super::DurableError>>,
    ) {
        let (done, wait) = tokio::sync::oneshot::channel();
        let mut batch_id = None;
        if let Some(id) = id {
            let Ok(crate::ledger::Claim::New(guard)) = ledger.claim(id).await else {
                panic!("a fresh ledger has no {id}");
            };
            let accepted = hits.iter().map(|h| h.count).sum();
            batch_id = Some(super::super::Claimed { guard, accepted });
        }
        (
            Pending {
                hits,
                done,
                batch_id,
            },
            wait,
        )
    }

    #[tokio::test]
    async fn merges_by_key_and_second_and_splits_by_shard() {
        let (hits_tx, hits_rx) = hitcounter_pipeline::channel("test_combine_hits", 16);
        let (flush_tx, flush_rx) = hitcounter_pipeline::channel("test_combine_flushes", 16);
        let settings = CombineSettings {
            max_deltas: 1000,
            interval: Duration::from_millis(5),
            keep_apart: false,
            max_apart: 1,
        };
        let stage = tokio::spawn(run(hits_rx, flush_tx, 2, settings));
        let ledger = crate::ledger::BatchLedger::new(Duration::from_secs(600), 10);
        let (first, _w1) = request(
            &ledger,
            vec![hit("x", 1, 2), hit("x", 1, 3), hit("x", 2, 1)],
            Some("b1"),
        )
        .await;
        let (second, _w2) = request(&ledger, vec![hit("y", 1, 4), hit("x", 1, 1)], None).await;
        hits_tx.send(first).await.unwrap();
        hits_tx.send(second).await.unwrap();
        hits_tx.close();
        stage.await.unwrap().unwrap();
        let mut deltas = Vec::new();
        let (mut waiters, mut ids) = (0, Vec::new());
        while let Some(flush) = flush_rx.try_recv() {
            assert_eq!(flush.shards.len(), 2);
            for (shard, part) in flush.shards.into_iter().enumerate() {
                for d in part {
                    assert_eq!(shard_of(&d.key, 2), shard);
                    deltas.push((d.key, d.second, d.count));
                }
            }
            waiters += flush.waiters.len();
            ids.extend(
                flush
                    .batch_ids
                    .into_iter()
                    .map(|c| (c.guard.id().to_owned(), c.accepted)),
            );
        }
        deltas.sort();
        assert_eq!(
            deltas,
            vec![("x".into(), 1, 6), ("x".into(), 2, 1), ("y".into(), 1, 4)]
        );
        assert_eq!(waiters, 2);
        assert_eq!(ids, vec![("b1".to_owned(), 6)]);
    }
}
