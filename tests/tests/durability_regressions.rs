//! Regression tests for the durability bugs of issue 12, each end to end with the real services
//! in-process: a fresh ingest log reusing a producer identity the aggregator knows, and ingest
//! stalling after an aggregator lost the state below the producer's oldest kept record.

use std::time::Duration;

use hitcounter_integration_tests::{
    connect, eventually, now_ms, start_aggregator, start_ingest, start_query, Running,
};
use hitcounter_proto::v1::{
    ingest_client::IngestClient, query_client::QueryClient, GetHitsRequest, Hit, RecordHitsRequest,
};

async fn count(query: &Running, key: &str) -> anyhow::Result<u64> {
    let mut client = QueryClient::new(connect(query.addr).await?);
    Ok(client
        .get_hits(GetHitsRequest {
            key: key.into(),
            window_seconds: 3600,
            at_ms: 0,
        })
        .await?
        .into_inner()
        .count)
}

/// Waits until `key` counts `expected` hits; fails (naming the last count seen) if it does not
/// get there.
async fn until_count(query: &Running, key: &str, expected: u64) -> anyhow::Result<()> {
    let last = std::cell::Cell::new(None);
    let reached = eventually(
        Duration::from_secs(20),
        &format!("{key} to reach {expected}"),
        || async {
            let now = count(query, key).await.ok()?;
            last.set(Some(now));
            (now == expected).then_some(())
        },
    )
    .await;
    let last = last.get();
    reached.map_err(|e| anyhow::anyhow!("{e} (last count seen: {last:?})"))
}

/// Records one batch of `count` hits of `key`, one request per call (so one log record each:
/// the next request is sent only after this one is durable).
async fn record(ingest: &Running, key: &str, count: u64, id: &str) -> anyhow::Result<()> {
    let mut client = IngestClient::new(connect(ingest.addr).await?);
    let answer = client
        .record_hits(RecordHitsRequest {
            hits: vec![Hit {
                key: key.into(),
                timestamp_ms: now_ms(),
                count,
            }],
            batch_id: id.into(),
        })
        .await?
        .into_inner();
    anyhow::ensure!(
        answer.accepted == count && !answer.duplicate,
        "{id}: {answer:?}"
    );
    Ok(())
}

/// Issue 12, finding 1: the README's re-shard procedure moves ingest's `log/` away. The fresh log
/// starts again at seq 1; with the old producer id the aggregator, which still holds
/// "applied through 5" for it, took seqs 1..=5 for resends, acknowledged them as duplicates, and
/// ingest trimmed them: acknowledged hits never counted.
#[tokio::test]
async fn a_fresh_log_after_moving_log_away_counts_every_batch() -> anyhow::Result<()> {
    hitcounter_integration_tests::init_logging();
    let aggregator = start_aggregator(&[]).await?;
    let query = start_query(&[aggregator.addr], &[]).await?;
    let data = tempfile::tempdir()?;
    let dir = data.path().display().to_string();
    let ingest = start_ingest(&[aggregator.addr], &["--data-dir", &dir]).await?;
    for n in 0..5 {
        record(&ingest, "/before-move", 1, &format!("before-{n}")).await?;
    }
    until_count(&query, "/before-move", 5).await?;
    // A clean stop delivers everything; then the log goes away, as for a re-shard.
    ingest.stop().await.map_err(anyhow::Error::msg)?;
    std::fs::rename(data.path().join("log"), data.path().join("log.moved-away"))?;

    let ingest = start_ingest(&[aggregator.addr], &["--data-dir", &dir]).await?;
    for n in 0..5 {
        record(&ingest, "/after-move", 1, &format!("after-{n}")).await?;
    }
    until_count(&query, "/after-move", 5).await?;
    assert_eq!(count(&query, "/before-move").await?, 5);
    for service in [ingest, query, aggregator] {
        service.stop().await.map_err(anyhow::Error::msg)?;
    }
    Ok(())
}
