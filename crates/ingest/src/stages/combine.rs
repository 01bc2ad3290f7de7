//! The `combine` stage: pre-aggregation.
//!
//! Many hits share a (key, second), especially for hot keys; summing them here turns e.g. 1000
//! hits into a handful of deltas before they cross the network. The stage collects batches for
//! at most `interval` (which bounds the added visibility delay) or until `max_deltas` distinct
//! (key, second) pairs are held (which bounds its memory), then flushes: deltas are split by
//! shard and sent to each shard's forwarder. A full forward channel makes the flush wait, and
//! while it waits this stage reads nothing, so the hits channel fills and the gRPC edge slows
//! down: backpressure end to end.

use std::{collections::HashMap, time::Duration};

use hitcounter_pipeline::{StageReceiver, StageSender};
use hitcounter_proto::aggregator::v1::Delta;
use hitcounter_stack::shard::shard_of;
use tokio::time::Instant;

use crate::{error::IngestError, validate::ValidHit};

/// Settings of the combine stage.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CombineSettings {
    pub(crate) max_deltas: usize,
    pub(crate) interval: Duration,
}

type Pending = HashMap<(String, i64), u64, foldhash::fast::RandomState>;

/// Runs until the hits channel is closed and drained, then flushes what is left and returns,
/// which closes the forward channels.
pub(crate) async fn run(
    hits: StageReceiver<Vec<ValidHit>>,
    shards: Vec<StageSender<Vec<Delta>>>,
    settings: CombineSettings,
) -> Result<(), IngestError> {
    let mut pending = Pending::default();
    let hits_in = metrics::counter!("hitcounter_ingest_combined_hits_total");
    let deltas_out = metrics::counter!("hitcounter_ingest_combined_deltas_total");
    let max_deltas = settings.max_deltas.max(1);
    let mut open = true;
    while open {
        let Some(batch) = hits.recv().await else {
            break;
        };
        hits_in.increment(batch.len() as u64);
        merge(&mut pending, batch);
        let deadline = Instant::now() + settings.interval;
        // The deadline is checked on every turn: with input always ready, `select!` alone could
        // keep taking batches and never see the timer fire.
        while pending.len() < max_deltas && Instant::now() < deadline {
            tokio::select! {
                next = hits.recv() => match next {
                    Some(batch) => {
                        hits_in.increment(batch.len() as u64);
                        merge(&mut pending, batch);
                    }
                    None => {
                        open = false;
                        break;
                    }
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        deltas_out.increment(pending.len() as u64);
        flush(&mut pending, &shards).await?;
    }
    tracing::debug!("combine drained");
    Ok(())
}

fn merge(pending: &mut Pending, batch: Vec<ValidHit>) {
    for hit in batch {
        let slot = pending.entry((hit.key, hit.second)).or_insert(0);
        *slot = slot.saturating_add(hit.count);
    }
}

async fn flush(
    pending: &mut Pending,
    shards: &[StageSender<Vec<Delta>>],
) -> Result<(), IngestError> {
    let mut parts: Vec<Vec<Delta>> = shards.iter().map(|_| Vec::new()).collect();
    for ((key, second), count) in pending.drain() {
        let shard = shard_of(&key, shards.len());
        parts[shard].push(Delta { key, second, count });
    }
    for (shard, deltas) in parts.into_iter().enumerate() {
        if deltas.is_empty() {
            continue;
        }
        shards[shard]
            .send(deltas)
            .await
            .map_err(|_| IngestError::StageStopped("forward"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(key: &str, second: i64, count: u64) -> ValidHit {
        ValidHit {
            key: key.into(),
            second,
            count,
        }
    }

    #[tokio::test]
    async fn merges_by_key_and_second_and_splits_by_shard() {
        let (hits_tx, hits_rx) = hitcounter_pipeline::channel("test_combine_hits", 16);
        let (a_tx, a_rx) = hitcounter_pipeline::channel("test_combine_a", 16);
        let (b_tx, b_rx) = hitcounter_pipeline::channel("test_combine_b", 16);
        let settings = CombineSettings {
            max_deltas: 1000,
            interval: Duration::from_millis(5),
        };
        let stage = tokio::spawn(run(hits_rx, vec![a_tx, b_tx], settings));
        hits_tx
            .send(vec![hit("x", 1, 2), hit("x", 1, 3), hit("x", 2, 1)])
            .await
            .unwrap();
        hits_tx
            .send(vec![hit("y", 1, 4), hit("x", 1, 1)])
            .await
            .unwrap();
        hits_tx.close();
        stage.await.unwrap().unwrap();
        let mut deltas = Vec::new();
        for rx in [a_rx, b_rx] {
            while let Some(batch) = rx.try_recv() {
                for d in batch {
                    assert_eq!(
                        shard_of(&d.key, 2),
                        if rx.name() == "test_combine_a" { 0 } else { 1 }
                    );
                    deltas.push((d.key, d.second, d.count));
                }
            }
        }
        deltas.sort();
        assert_eq!(
            deltas,
            vec![("x".into(), 1, 6), ("x".into(), 2, 1), ("y".into(), 1, 4)]
        );
    }
}
