//! Regression tests for the durability bugs of issue 12, each end to end with the real services
//! in-process: a fresh ingest log reusing a producer identity the aggregator knows, and ingest
//! stalling after an aggregator lost the state below the producer's oldest kept record.

use std::time::Duration;

use hitcounter_integration_tests::{
    connect, eventually, metric_value, now_ms, scrape, start_aggregator, start_aggregator_on,
    start_ingest, start_query, Running,
};
use hitcounter_proto::v1::{ingest_client::IngestClient, Hit, RecordHitsRequest};

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

/// Records batch `n` of `prefix`: one hit of `{prefix}/all` and one of `{prefix}/{n}`.
async fn record_numbered(ingest: &Running, prefix: &str, n: usize) -> anyhow::Result<()> {
    let mut client = IngestClient::new(connect(ingest.addr).await?);
    let hit = |key: String| Hit {
        key,
        timestamp_ms: now_ms(),
        count: 1,
    };
    client
        .record_hits(RecordHitsRequest {
            hits: vec![hit(format!("{prefix}/all")), hit(format!("{prefix}/{n}"))],
            batch_id: format!("{prefix}-{n}"),
        })
        .await?;
    Ok(())
}

/// The oldest seq ingest's log still holds: the name of its oldest segment file.
fn first_kept_seq(log_dir: &std::path::Path) -> anyhow::Result<u64> {
    let mut oldest = None;
    for entry in std::fs::read_dir(log_dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(seq) = name
            .strip_suffix(".log")
            .and_then(|n| n.parse::<u64>().ok())
        {
            oldest = Some(oldest.map_or(seq, |o: u64| o.min(seq)));
        }
    }
    oldest.ok_or_else(|| anyhow::anyhow!("no segment in {}", log_dir.display()))
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
    query.until_count("/before-move", 5).await?;
    // A clean stop delivers everything; then the log goes away, as for a re-shard.
    ingest.stop().await.map_err(anyhow::Error::msg)?;
    std::fs::rename(data.path().join("log"), data.path().join("log.moved-away"))?;

    let ingest = start_ingest(&[aggregator.addr], &["--data-dir", &dir]).await?;
    for n in 0..5 {
        record(&ingest, "/after-move", 1, &format!("after-{n}")).await?;
    }
    query.until_count("/after-move", 5).await?;
    assert_eq!(query.count("/before-move").await?, 5);
    for service in [ingest, query, aggregator] {
        service.stop().await.map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

/// Issue 12, finding 2: an aggregator that lost its state (here: restarted on an empty data
/// directory) while ingest had trimmed the start of its log. The batches that were only in the
/// lost state are gone for good: the aggregator must say so (a metric; an error in its log) and
/// move on, applying everything ingest still holds. Before the fix, its watermark for the
/// producer stayed at 0 below a gap no one would ever fill, so it never reported anything
/// durable, ingest never trimmed again, and writes would end in `RESOURCE_EXHAUSTED` for good.
#[tokio::test]
async fn an_aggregator_that_lost_its_state_catches_up_and_ingest_trims_again() -> anyhow::Result<()>
{
    hitcounter_integration_tests::init_logging();
    let checkpoints = ["--checkpoint-interval-ms", "50"];
    let aggregator = start_aggregator(&checkpoints).await?;
    let query = start_query(&[aggregator.addr], &["--breaker-cooldown-ms", "100"]).await?;
    let data = tempfile::tempdir()?;
    let dir = data.path().display().to_string();
    let log_dir = data.path().join("log");
    // Small segments (about a dozen records each) so that trimming happens early.
    let args = [
        "--data-dir",
        dir.as_str(),
        "--segment-bytes",
        "1024",
        "--max-buffer-bytes",
        "1048576",
        "--breaker-cooldown-ms",
        "100",
    ];
    let ingest = start_ingest(&[aggregator.addr], &args).await?;
    const BATCHES: usize = 40;
    for n in 0..BATCHES {
        record_numbered(&ingest, "/gap", n).await?;
    }
    query.until_count("/gap/all", BATCHES as u64).await?;
    // The aggregator's checkpoint covers the first segments, so ingest trims them.
    eventually(
        Duration::from_secs(20),
        "ingest to trim its log",
        || async { (first_kept_seq(&log_dir).ok()? > 1).then_some(()) },
    )
    .await?;

    // The aggregator loses its data directory and comes back empty at the same address.
    let addr = aggregator.addr;
    aggregator.stop().await.map_err(anyhow::Error::msg)?;
    let aggregator = start_aggregator_on(addr, &checkpoints).await?;

    // Ingest goes on: new batches are counted, and it trims what the new aggregator holds.
    let restart_seq = BATCHES as u64 + 1;
    for n in 0..BATCHES {
        record_numbered(&ingest, "/after", n).await?;
    }
    query.until_count("/after/all", BATCHES as u64).await?;
    eventually(
        Duration::from_secs(20),
        "ingest to trim records written after the aggregator lost its state",
        || async { (first_kept_seq(&log_dir).ok()? > restart_seq).then_some(()) },
    )
    .await?;

    // Of the batches before the loss, those ingest still held are counted again; the others
    // are lost, oldest first, and the aggregator counted them.
    let mut lost = 0;
    for n in 0..BATCHES {
        let counted = query.count(&format!("/gap/{n}")).await?;
        match counted {
            0 => {
                assert_eq!(lost, n, "/gap/{n} is lost but an older batch was not");
                lost += 1;
            }
            1 => {}
            other => panic!("/gap/{n} counted {other} times"),
        }
    }
    assert!(lost > 0, "the trimmed batches cannot have been recovered");
    assert_eq!(query.count("/gap/all").await?, (BATCHES - lost) as u64);
    let metrics = scrape(aggregator.metrics_addr).await?;
    assert_eq!(
        metric_value(&metrics, "hitcounter_aggregator_lost_batches_total", &[]),
        Some(lost as f64),
        "{metrics}"
    );
    for service in [ingest, query, aggregator] {
        service.stop().await.map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

/// Issue 11: after a clean stop, ingest resent every record its log still held (the log is
/// trimmed by whole segments), which the aggregator then discarded as duplicates. A forwarder
/// now asks the aggregator first what it holds durably and resends only the rest: after a clean
/// stop of both, nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_clean_restart_resends_nothing_the_aggregator_holds() -> anyhow::Result<()> {
    let aggregator_data = tempfile::tempdir()?;
    let ingest_data = tempfile::tempdir()?;
    let aggregator_dir = aggregator_data.path().display().to_string();
    let ingest_dir = ingest_data.path().display().to_string();
    let aggregator = start_aggregator(&["--data-dir", &aggregator_dir]).await?;
    let address = aggregator.addr;
    let ingest = start_ingest(&[address], &["--data-dir", &ingest_dir]).await?;
    let query = start_query(&[address], &[]).await?;
    for n in 0..10 {
        record(&ingest, "/clean", 1, &format!("clean-{n}")).await?;
    }
    query.until_count("/clean", 10).await?;
    // A clean stop, front to back: the aggregator's last checkpoint holds every record.
    ingest.stop().await.map_err(anyhow::Error::msg)?;
    aggregator.stop().await.map_err(anyhow::Error::msg)?;

    let aggregator = start_aggregator_on(address, &["--data-dir", &aggregator_dir]).await?;
    let duplicates = || async {
        let text = scrape(aggregator.metrics_addr).await?;
        anyhow::Ok(
            metric_value(
                &text,
                "hitcounter_aggregator_batches_total",
                &["outcome=\"duplicate\""],
            )
            .unwrap_or(0.0),
        )
    };
    let before = duplicates().await?;
    let ingest = start_ingest(&[address], &["--data-dir", &ingest_dir]).await?;
    // A new record after the restart, delivered in order after anything resent.
    record(&ingest, "/clean", 1, "clean-after").await?;
    query.until_count("/clean", 11).await?;
    assert_eq!(
        duplicates().await? - before,
        0.0,
        "records the aggregator's checkpoint held were sent again"
    );
    for service in [ingest, query, aggregator] {
        service.stop().await.map_err(anyhow::Error::msg)?;
    }
    Ok(())
}
