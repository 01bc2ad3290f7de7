//! The aggregator's key limit pushes back instead of dropping (issue #14): a batch whose new keys
//! do not fit under `--max-keys` is refused whole, stays in ingest's log, fills it, and clients
//! then get `RESOURCE_EXHAUSTED` "aggregator key limit reached on shard N: …"; once keys age out
//! of the retention, or the aggregator restarts with a higher limit, every acknowledged hit is
//! counted exactly once and nothing of a refused request is counted. Real services over real
//! gRPC; one owner per aggregator so that `--max-keys` is exact (it is split over the owners).

use std::time::Duration;

use hitcounter_integration_tests::{
    eventually, metric_value, now_ms, scrape, start_aggregator_on, Running, Stack, StackOptions,
};
use hitcounter_proto::v1::{GetHitsRequest, Hit, RecordHitsRequest};
use tonic::Code;

/// The count of `key` over the last `window` seconds, through query.
async fn count(query: &Running, key: &str, window: u32) -> anyhow::Result<u64> {
    let mut client = hitcounter_proto::v1::query_client::QueryClient::new(
        hitcounter_integration_tests::connect(query.addr).await?,
    );
    Ok(client
        .get_hits(GetHitsRequest {
            key: key.into(),
            window_seconds: window,
            at_ms: 0,
        })
        .await?
        .into_inner()
        .count)
}

/// Waits until every `(key, count)` of `expected` is seen through query (30 s: a hang guard).
async fn until_counts(
    query: &Running,
    expected: &[(String, u64)],
    window: u32,
) -> anyhow::Result<()> {
    let last = std::cell::RefCell::new(Vec::new());
    let reached = eventually(
        Duration::from_secs(30),
        "every acknowledged hit to be counted",
        || async {
            let mut wrong = Vec::new();
            for (key, want) in expected {
                let got = count(query, key, window).await.ok()?;
                if got != *want {
                    wrong.push((key.clone(), *want, got));
                }
            }
            let done = wrong.is_empty();
            *last.borrow_mut() = wrong;
            done.then_some(())
        },
    )
    .await;
    reached.map_err(|e| {
        let wrong = last.borrow();
        anyhow::anyhow!(
            "{e}; {} keys still wrong (key, expected, seen), first: {:?}",
            wrong.len(),
            wrong.iter().take(5).collect::<Vec<_>>()
        )
    })
}

fn hits(key: &str, count: u64, at_ms: i64) -> RecordHitsRequest {
    RecordHitsRequest {
        hits: vec![Hit {
            key: key.into(),
            timestamp_ms: at_ms,
            count,
        }],
        batch_id: String::new(),
    }
}

async fn gauge(addr: std::net::SocketAddr, metric: &str) -> Option<f64> {
    metric_value(&scrape(addr).await.ok()?, metric, &[])
}

/// A flood of new keys beyond the limit fills ingest's log and is refused with the key-limit
/// message; after the aggregator restarts with a higher limit, every acknowledged hit is counted
/// exactly and the refused requests count nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_beyond_the_key_limit_is_refused_then_counted_exactly_after_a_raise(
) -> anyhow::Result<()> {
    let mut stack = Stack::start_with(StackOptions {
        shards: 1,
        aggregator: vec![
            "--max-keys",
            "10",
            "--owners",
            "1",
            "--checkpoint-interval-ms",
            "200",
        ],
        // A small log budget, so that the refused backlog fills it quickly.
        ingest: vec!["--max-buffer-bytes", "65536", "--segment-bytes", "16384"],
        ..StackOptions::default()
    })
    .await?;
    let mut client = stack.ingest_client().await?;
    let mut acked: Vec<(String, u64)> = Vec::new();
    // Fill the limit.
    for i in 0..10u64 {
        let key = format!("first-{i}");
        client.record_hits(hits(&key, i + 1, now_ms())).await?;
        acked.push((key, i + 1));
    }
    until_counts(&stack.query, &acked, 3600).await?;

    // The flood: one new key per request, until ingest refuses with the key-limit message.
    let mut refused = Vec::new();
    let mut refusal = None;
    for i in 0..20_000u64 {
        let key = format!("flood-{i}");
        let count = i % 7 + 1;
        match client.record_hits(hits(&key, count, now_ms())).await {
            Ok(_) => acked.push((key, count)),
            Err(status) => {
                anyhow::ensure!(
                    status.code() == Code::ResourceExhausted,
                    "a refused write must be RESOURCE_EXHAUSTED, got {status:?}"
                );
                refused.push(key);
                if refusal.is_none() {
                    refusal = Some(status.message().to_owned());
                }
                if refused.len() >= 5 {
                    break;
                }
            }
        }
    }
    let refusal = refusal.ok_or_else(|| anyhow::anyhow!("20,000 new keys were all accepted"))?;
    anyhow::ensure!(
        refusal.contains("aggregator key limit reached on shard 0: key limit of 10 keys"),
        "the refusal should say why: {refusal}"
    );
    let flooded = acked.len() - 10;
    anyhow::ensure!(
        flooded > 10,
        "only {flooded} flood requests were acknowledged"
    );
    eprintln!(
        "key limit 10: {flooded} flood requests acknowledged (kept in a 64 KiB log) before the \
         first RESOURCE_EXHAUSTED: {refusal}"
    );
    // Nothing of the flood was applied, and the aggregator and ingest both show it.
    for (key, _) in acked.iter().skip(10).take(20) {
        anyhow::ensure!(count(&stack.query, key, 3600).await? == 0, "{key} counted");
    }
    let aggregator_metrics = stack.aggregators[0].metrics_addr;
    eventually(
        Duration::from_secs(10),
        "hitcounter_aggregator_key_limit_reached = 1",
        || async {
            (gauge(
                aggregator_metrics,
                "hitcounter_aggregator_key_limit_reached",
            )
            .await
                == Some(1.0))
            .then_some(())
        },
    )
    .await?;
    let ingest_metrics = scrape(stack.ingest.metrics_addr).await?;
    anyhow::ensure!(
        metric_value(
            &ingest_metrics,
            "hitcounter_ingest_aggregator_key_limit_reached",
            &["shard=\"0\""]
        ) == Some(1.0),
        "ingest's gauge should show the refusal"
    );

    // Restart the aggregator on its data directory with a higher limit.
    let old = stack.aggregators.remove(0);
    let addr = old.addr;
    let mut old = old;
    let data = old
        .data_dir
        .take()
        .ok_or_else(|| anyhow::anyhow!("the aggregator has no data directory"))?;
    old.stop().await.map_err(anyhow::Error::msg)?;
    let dir = data.path().display().to_string();
    let mut raised = start_aggregator_on(
        addr,
        &[
            "--data-dir",
            &dir,
            "--max-keys",
            "100000",
            "--owners",
            "1",
            "--checkpoint-interval-ms",
            "200",
        ],
    )
    .await?;
    raised.ready("aggregator with a higher limit").await?;
    stack.aggregators.push(raised);

    let draining = std::time::Instant::now();
    until_counts(&stack.query, &acked, 3600).await?;
    eprintln!(
        "after the restart with --max-keys 100000, all {} acknowledged requests counted in {:?}",
        acked.len(),
        draining.elapsed()
    );
    for key in &refused {
        anyhow::ensure!(
            count(&stack.query, key, 3600).await? == 0,
            "{key} was refused but counted"
        );
    }
    // Writes are taken again.
    client.record_hits(hits("after", 3, now_ms())).await?;
    stack.query.until_count("after", 3).await?;
    stack.stop().await.map_err(anyhow::Error::msg)?;
    drop(data);
    Ok(())
}

/// Batches refused at the key limit go through once the keys holding the limit age out of the
/// retention, and then count exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_batches_go_through_once_keys_age_out() -> anyhow::Result<()> {
    const RETENTION: u32 = 20;
    let stack = Stack::start_with(StackOptions {
        shards: 1,
        aggregator: vec![
            "--max-keys",
            "10",
            "--owners",
            "1",
            "--retention-seconds",
            "20",
            "--checkpoint-interval-ms",
            "200",
        ],
        ingest: vec!["--retention-seconds", "20"],
        query: vec!["--retention-seconds", "20"],
    })
    .await?;
    let mut client = stack.ingest_client().await?;
    // Ten keys with hits 12 s old: they fill the limit and age out of the 20 s retention
    // about 8 s from now.
    let old: Vec<(String, u64)> = (0..10u64).map(|i| (format!("old-{i}"), 2)).collect();
    for (key, n) in &old {
        client.record_hits(hits(key, *n, now_ms() - 12_000)).await?;
    }
    until_counts(&stack.query, &old, RETENTION).await?;
    // New keys now: acknowledged (ingest's log takes them), refused by the aggregator.
    let new: Vec<(String, u64)> = (0..5u64).map(|i| (format!("new-{i}"), i + 1)).collect();
    for (key, n) in &new {
        client.record_hits(hits(key, *n, now_ms())).await?;
    }
    let aggregator_metrics = stack.aggregators[0].metrics_addr;
    eventually(
        Duration::from_secs(10),
        "hitcounter_aggregator_key_limit_reached = 1",
        || async {
            (gauge(
                aggregator_metrics,
                "hitcounter_aggregator_key_limit_reached",
            )
            .await
                == Some(1.0))
            .then_some(())
        },
    )
    .await?;
    // Once the old keys age out, every new hit counts, exactly.
    until_counts(&stack.query, &new, RETENTION).await?;
    let refusals = metric_value(
        &scrape(aggregator_metrics).await?,
        "hitcounter_aggregator_batches_total",
        &["outcome=\"refused_key_limit\""],
    );
    anyhow::ensure!(
        refusals.is_some_and(|n| n >= 1.0),
        "refusals should be counted, got {refusals:?}"
    );
    stack.stop().await.map_err(anyhow::Error::msg)?;
    Ok(())
}
