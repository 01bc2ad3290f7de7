//! Metrics, health and the limits that protect the services from their callers.

use std::time::Duration;

use hitcounter_integration_tests::{eventually, metric_value, now_ms, scrape, Stack, StackOptions};
use hitcounter_proto::v1::{Hit, RecordHitRequest, RecordHitsRequest, WatchHitsRequest};
use tonic::Code;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

#[tokio::test]
async fn metrics_count_requests_rejections_and_counters() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let mut ingest = stack.ingest_client().await?;
    let base = now_ms() / 1000 - 10;
    // Two keys with hits in three distinct seconds each: six (key, second) counters, however
    // many hits they hold. Memory follows the seconds that had hits.
    let hits = ["/m/a", "/m/b"]
        .iter()
        .flat_map(|key| {
            (0..3).flat_map(move |s| {
                (0..50).map(move |_| Hit {
                    key: (*key).into(),
                    timestamp_ms: (base + s) * 1000,
                    count: 1,
                })
            })
        })
        .collect();
    ingest
        .record_hits(RecordHitsRequest {
            hits,
            batch_id: String::new(),
        })
        .await?;
    ingest
        .record_hit(RecordHitRequest {
            key: "/m/a".into(),
            timestamp_ms: 0,
            count: 1,
        })
        .await?;
    let rejected = ingest
        .record_hit(RecordHitRequest {
            key: String::new(),
            timestamp_ms: 0,
            count: 1,
        })
        .await
        .expect_err("empty key");
    assert_eq!(rejected.code(), Code::InvalidArgument);

    let text = scrape(stack.ingest.metrics_addr).await?;
    let value = |name: &str, labels: &[&str]| metric_value(&text, name, labels);
    assert_eq!(
        value(
            "hitcounter_ingest_requests_total",
            &["method=\"RecordHit\"", "code=\"OK\""]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            "hitcounter_ingest_requests_total",
            &["method=\"RecordHit\"", "code=\"INVALID_ARGUMENT\""]
        ),
        Some(1.0)
    );
    assert_eq!(
        value("hitcounter_ingest_hits_accepted_total", &[]),
        Some(301.0)
    );
    assert_eq!(
        value(
            "hitcounter_ingest_hits_rejected_total",
            &["reason=\"key_empty\""]
        ),
        Some(1.0)
    );
    assert!(
        text.contains("hitcounter_ingest_request_duration_seconds_bucket"),
        "latency histogram"
    );
    assert!(text.contains("hitcounter_channel_capacity{channel=\"ingest_hits\"} 100000"));

    // The aggregator publishes its counters once a second.
    eventually(
        Duration::from_secs(5),
        "the aggregator to report 7 counters",
        || async {
            let text = scrape(stack.aggregators[0].metrics_addr).await.ok()?;
            let total: f64 = text
                .lines()
                .filter(|l| l.starts_with("hitcounter_aggregator_counters{"))
                .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                .sum();
            // 6 from the batch, plus the second of the RecordHit (unless it is one of those).
            (total == 7.0 || total == 6.0).then_some(())
        },
    )
    .await?;
    stack.stop().await.map_err(anyhow::Error::msg)
}

#[tokio::test]
async fn health_is_serving_when_ready() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    for addr in [
        stack.ingest.addr,
        stack.query.addr,
        stack.aggregators[0].addr,
    ] {
        let mut health = HealthClient::new(hitcounter_integration_tests::connect(addr).await?);
        for service in [
            "",
            "hitcounter.v1.Ingest",
            "hitcounter.v1.Query",
            "hitcounter.aggregator.v1.Aggregator",
        ] {
            let status = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await;
            match status {
                Ok(response) => {
                    assert_eq!(response.into_inner().status, ServingStatus::Serving as i32)
                }
                // Each server knows only its own service and "".
                Err(status) => assert_eq!(status.code(), Code::NotFound, "{service}"),
            }
        }
    }
    stack.stop().await.map_err(anyhow::Error::msg)
}

#[tokio::test]
async fn watch_and_ledger_limits_answer_resource_exhausted() -> anyhow::Result<()> {
    let stack = Stack::start_with(StackOptions {
        ingest: vec!["--dedup-capacity", "2"],
        query: vec!["--max-watches", "1"],
        ..Default::default()
    })
    .await?;
    let (mut ingest, mut query) = (stack.ingest_client().await?, stack.query_client().await?);
    let watch = || WatchHitsRequest {
        key: "/w".into(),
        window_seconds: 60,
        interval_ms: 100,
    };
    let first = query.watch_hits(watch()).await?.into_inner();
    let status = query.watch_hits(watch()).await.expect_err("second watch");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("--max-watches"),
        "{}",
        status.message()
    );
    drop(first);
    // The slot frees once the server notices the client left (at its next update).
    eventually(Duration::from_secs(5), "the watch slot to free", || {
        let mut query = query.clone();
        async move { query.watch_hits(watch()).await.ok().map(|_| ()) }
    })
    .await?;

    let batch = |id: &str| RecordHitsRequest {
        hits: vec![Hit {
            key: "/ledger".into(),
            timestamp_ms: 0,
            count: 1,
        }],
        batch_id: id.into(),
    };
    ingest.record_hits(batch("one")).await?;
    ingest.record_hits(batch("two")).await?;
    let status = ingest
        .record_hits(batch("three"))
        .await
        .expect_err("ledger full");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("batch ids"),
        "{}",
        status.message()
    );
    // Known ids and id-less batches still work.
    assert!(
        ingest
            .record_hits(batch("one"))
            .await?
            .into_inner()
            .duplicate
    );
    ingest.record_hits(batch("")).await?;
    stack.stop().await.map_err(anyhow::Error::msg)
}
