//! Durability of ingest's log, in-process: batch ids across a restart, torn log tails, and a
//! clean stop with the aggregator unreachable.

use std::time::Duration;

use hitcounter_integration_tests::{
    eventually, metric_value, now_ms, scrape, start_aggregator, start_ingest, start_query,
    LinkMode, LinkProxy, Running,
};
use hitcounter_proto::v1::{ingest_client::IngestClient, Hit, RecordHitsRequest};
use rand::{Rng, SeedableRng};

async fn ingest_client(
    ingest: &Running,
) -> anyhow::Result<IngestClient<tonic::transport::Channel>> {
    Ok(IngestClient::new(
        hitcounter_integration_tests::connect(ingest.addr).await?,
    ))
}

fn batch(key: &str, count: u64, id: &str) -> RecordHitsRequest {
    RecordHitsRequest {
        hits: vec![Hit {
            key: key.into(),
            timestamp_ms: now_ms(),
            count,
        }],
        batch_id: id.into(),
    }
}

#[tokio::test]
async fn batch_ids_survive_an_ingest_restart() -> anyhow::Result<()> {
    let aggregator = start_aggregator(&[]).await?;
    let data = tempfile::tempdir()?;
    let dir = data.path().display().to_string();
    let ingest = start_ingest(&[aggregator.addr], &["--data-dir", &dir]).await?;
    let query = start_query(&[aggregator.addr], &[]).await?;
    let mut client = ingest_client(&ingest).await?;
    let first = client
        .record_hits(batch("/restart", 7, "id-1"))
        .await?
        .into_inner();
    assert_eq!((first.accepted, first.duplicate), (7, false));
    ingest.stop().await.map_err(anyhow::Error::msg)?;

    // The same batch id after the restart (a client retrying after a timeout): counted once.
    let ingest = start_ingest(&[aggregator.addr], &["--data-dir", &dir]).await?;
    let mut client = ingest_client(&ingest).await?;
    let retry = client
        .record_hits(batch("/restart", 7, "id-1"))
        .await?
        .into_inner();
    assert_eq!((retry.accepted, retry.duplicate), (7, true));
    let other = client
        .record_hits(batch("/restart", 1, "id-2"))
        .await?
        .into_inner();
    assert!(!other.duplicate);
    query.until_count("/restart", 8).await?;
    for service in [ingest, query, aggregator] {
        service.stop().await.map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

#[tokio::test]
async fn a_clean_stop_with_the_aggregator_down_keeps_everything_in_the_log() -> anyhow::Result<()> {
    let aggregator = start_aggregator(&[]).await?;
    let link = LinkProxy::start(aggregator.addr).await?;
    link.set(LinkMode::Refuse);
    let data = tempfile::tempdir()?;
    let dir = data.path().display().to_string();
    let args = [
        "--data-dir",
        dir.as_str(),
        "--drain-timeout-seconds",
        "1",
        "--breaker-cooldown-ms",
        "100",
    ];
    let ingest = start_ingest(&[link.addr], &args).await?;
    let mut client = ingest_client(&ingest).await?;
    let mut acked = 0;
    for n in 0..20 {
        acked += client
            .record_hits(batch("/kept", 3, &format!("k-{n}")))
            .await?
            .into_inner()
            .accepted;
    }
    // Stops after the drain deadline with nothing delivered: the hits stay on disk.
    ingest.stop().await.map_err(anyhow::Error::msg)?;
    link.set(LinkMode::Pass);
    let ingest = start_ingest(&[link.addr], &args).await?;
    let query = start_query(&[aggregator.addr], &[]).await?;
    query.until_count("/kept", acked).await?;
    for service in [ingest, query, aggregator] {
        service.stop().await.map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

#[tokio::test]
async fn a_torn_log_tail_is_cut_and_everything_before_it_counts() -> anyhow::Result<()> {
    let seed: u64 = rand::random();
    println!("torn-tail test seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for attempt in 0..3 {
        let aggregator = start_aggregator(&[]).await?;
        let link = LinkProxy::start(aggregator.addr).await?;
        link.set(LinkMode::Refuse);
        let data = tempfile::tempdir()?;
        let dir = data.path().display().to_string();
        let args = ["--data-dir", dir.as_str(), "--drain-timeout-seconds", "1"];
        let ingest = start_ingest(&[link.addr], &args).await?;
        let mut client = ingest_client(&ingest).await?;
        let key = format!("/torn/{attempt}");
        // One request per flush (each waits for its own ack), so the last log record is the
        // last request: 10 hits each, then one of 1000.
        for n in 0..5 {
            client
                .record_hits(batch(&key, 10, &format!("t-{n}")))
                .await?;
        }
        client.record_hits(batch(&key, 1000, "t-last")).await?;
        ingest.stop().await.map_err(anyhow::Error::msg)?;

        // Tear the last record at a random offset, as a crash in the middle of a write would.
        let log_dir = data.path().join("log");
        let mut segments: Vec<_> = std::fs::read_dir(&log_dir)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        segments.sort();
        let last = segments
            .last()
            .ok_or_else(|| anyhow::anyhow!("no segment"))?;
        let bytes = std::fs::read(last)?;
        // The last record starts where the previous five end: find it by re-reading the log.
        let record_start = {
            let mut offset = 0;
            let mut starts = Vec::new();
            while let Ok(Some(record)) = hitcounter_wal::decode_record(&bytes[offset..]) {
                starts.push(offset);
                offset += record.len;
            }
            *starts.last().ok_or_else(|| anyhow::anyhow!("no record"))?
        };
        let cut = rng.random_range(record_start..bytes.len());
        std::fs::OpenOptions::new()
            .write(true)
            .open(last)?
            .set_len(cut as u64)?;
        println!(
            "attempt {attempt}: cut {} at byte {cut} (last record starts at {record_start})",
            last.display()
        );

        link.set(LinkMode::Pass);
        let ingest = start_ingest(&[link.addr], &args).await?;
        let query = start_query(&[aggregator.addr], &[]).await?;
        query.until_count(&key, 50).await?;
        // Still 50 a moment later: the torn batch was not half counted.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(query.count(&key).await?, 50);
        // The service goes on after the repair.
        let mut client = ingest_client(&ingest).await?;
        client.record_hits(batch(&key, 1000, "t-after")).await?;
        query.until_count(&key, 1050).await?;
        for service in [ingest, query, aggregator] {
            service.stop().await.map_err(anyhow::Error::msg)?;
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_caller_that_gives_up_does_not_release_its_batch_id() -> anyhow::Result<()> {
    // Flushes every 1.5 s, so the caller can give up while its hits are queued.
    let aggregator = start_aggregator(&[]).await?;
    let ingest = start_ingest(&[aggregator.addr], &["--combine-interval-ms", "1500"]).await?;
    let query = start_query(&[aggregator.addr], &[]).await?;
    let mut client = ingest_client(&ingest).await?;
    let impatient = tokio::spawn({
        let mut client = client.clone();
        async move { client.record_hits(batch("/impatient", 5, "gave-up")).await }
    });
    // The caller gives up once its hits are in the pipeline (the combine stage took them).
    // (It used to give up after a 200 ms deadline, which on a slow machine could pass before
    // the hits were enqueued: the id was then rightly released and the retry was not a
    // duplicate.)
    let metrics = ingest.metrics_addr;
    eventually(
        Duration::from_secs(30),
        "the first attempt's hits to be in the pipeline",
        || async move {
            let text = scrape(metrics).await.ok()?;
            let combined = metric_value(&text, "hitcounter_ingest_combined_hits_total", &[])?;
            (combined >= 1.0).then_some(())
        },
    )
    .await?;
    anyhow::ensure!(!impatient.is_finished(), "the first attempt was answered");
    impatient.abort();
    // The retry learns that the first attempt's hits are in (after ABORTED "still being
    // recorded" answers while the first attempt's flush is pending, which a client retries).
    // Only ABORTED is retried: any other error fails the test.
    let retry = loop {
        match client.record_hits(batch("/impatient", 5, "gave-up")).await {
            Ok(answer) => break answer.into_inner(),
            Err(status) if status.code() == tonic::Code::Aborted => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(status) => anyhow::bail!("the retry failed: {status:?}"),
        }
    };
    assert_eq!((retry.accepted, retry.duplicate), (5, true));
    query.until_count("/impatient", 5).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(query.count("/impatient").await?, 5, "counted once");
    for service in [ingest, query, aggregator] {
        service.stop().await.map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

#[tokio::test]
async fn a_data_directory_serves_one_process_at_a_time() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let dir = data.path().display().to_string();
    // `start_*` returns before `serve` has taken the lock: wait until the first one serves, or
    // the second could take the directory first.
    let aggregator = start_aggregator(&["--data-dir", &dir]).await?;
    hitcounter_integration_tests::process::serving(aggregator.addr, Duration::from_secs(30))
        .await?;
    let second_aggregator = start_aggregator(&["--data-dir", &dir]).await?;
    let refused = tokio::time::timeout(Duration::from_secs(30), second_aggregator.task).await??;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("in use by another process")),
        "{refused:?}"
    );
    let ingest_dir = data.path().join("ingest").display().to_string();
    let ingest = start_ingest(&[aggregator.addr], &["--data-dir", &ingest_dir]).await?;
    hitcounter_integration_tests::process::serving(ingest.addr, Duration::from_secs(30)).await?;
    let second_ingest = start_ingest(&[aggregator.addr], &["--data-dir", &ingest_dir]).await?;
    let refused = tokio::time::timeout(Duration::from_secs(30), second_ingest.task).await??;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("in use by another process")),
        "{refused:?}"
    );
    for service in [ingest, aggregator] {
        service.stop().await.map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

/// An idle aggregator does not rewrite its checkpoint every interval; one applied hit makes it
/// write the next one.
#[tokio::test]
async fn an_idle_aggregator_skips_checkpoints_until_something_is_applied() -> anyhow::Result<()> {
    let aggregator = start_aggregator(&["--checkpoint-interval-ms", "50"]).await?;
    let ingest = start_ingest(&[aggregator.addr], &[]).await?;
    let query = start_query(&[aggregator.addr], &[]).await?;
    let metrics = aggregator.metrics_addr;
    // (checkpoints written, checkpoints skipped) so far.
    let tally = || async move {
        let text = scrape(metrics).await.ok()?;
        let written = metric_value(
            &text,
            "hitcounter_aggregator_checkpoint_duration_seconds_count",
            &[],
        )
        .unwrap_or(0.0);
        let skipped = metric_value(
            &text,
            "hitcounter_aggregator_checkpoints_skipped_total",
            &[],
        )
        .unwrap_or(0.0);
        Some((written, skipped))
    };
    let mut client = ingest_client(&ingest).await?;
    client.record_hits(batch("/idle", 1, "idle-1")).await?;
    query.until_count("/idle", 1).await?;

    // The hit is applied now. A tick after this point either writes a checkpoint holding it or
    // skips, and it skips only when the last checkpoint already holds it: so a skip counted
    // after this point means the hit is in a checkpoint. (The test used to take "written" at the
    // first moment it saw one write and one skip, which could be the start-up checkpoint and an
    // idle tick before the hit arrived; the hit's own checkpoint then came later and looked
    // like an idle rewrite.)
    let (_, skipped_before) = tally().await.ok_or_else(|| anyhow::anyhow!("no metrics"))?;
    eventually(
        Duration::from_secs(30),
        "a skipped checkpoint after the hit was applied",
        || async move { tally().await.filter(|&(_, s)| s > skipped_before) },
    )
    .await?;
    // A fresh scrape: the write that preceded that skip is counted in it.
    let (written, skipped) = tally().await.ok_or_else(|| anyhow::anyhow!("no metrics"))?;
    // ...so the ticks that follow are all skipped.
    eventually(
        Duration::from_secs(30),
        "more skipped checkpoints",
        || async move { tally().await.filter(|&(_, s)| s >= skipped + 5.0) },
    )
    .await?;
    let (idle_written, _) = tally().await.ok_or_else(|| anyhow::anyhow!("no metrics"))?;
    assert_eq!(
        idle_written, written,
        "an idle aggregator rewrote its checkpoint"
    );

    // ...and a new hit is checkpointed at the next tick.
    client.record_hits(batch("/idle", 1, "idle-2")).await?;
    query.until_count("/idle", 2).await?;
    eventually(
        Duration::from_secs(30),
        "a checkpoint of the new hit",
        || async move { tally().await.filter(|&(w, _)| w > written) },
    )
    .await?;
    for service in [ingest, query, aggregator] {
        service.stop().await.map_err(anyhow::Error::msg)?;
    }
    Ok(())
}
