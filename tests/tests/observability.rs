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
    // One more hit in a second /m/a already has: a hit, not a counter.
    ingest
        .record_hit(RecordHitRequest {
            key: "/m/a".into(),
            timestamp_ms: (base + 1) * 1000 + 500,
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

    // The aggregator publishes its counters once a second: exactly 6, whatever the count of
    // hits in them. (It used to accept 6 or 7, as the RecordHit's second was the server's
    // "now", which could not be one of the batch's seconds anyway.)
    let counters = |text: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with("hitcounter_aggregator_counters{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    let reported = eventually(
        Duration::from_secs(30),
        "the aggregator to report its counters",
        || async {
            let text = scrape(stack.aggregators[0].metrics_addr).await.ok()?;
            let total = counters(&text);
            // Published once a second: wait for the publication that includes all 301 hits.
            (total >= 6.0).then_some(total)
        },
    )
    .await?;
    assert_eq!(reported, 6.0, "counters for 2 keys x 3 seconds");
    stack.stop().await.map_err(anyhow::Error::msg)
}

#[tokio::test]
async fn health_is_serving_when_ready() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let all = [
        "hitcounter.v1.Ingest",
        "hitcounter.v1.Query",
        "hitcounter.aggregator.v1.Aggregator",
    ];
    for (addr, own) in [
        (stack.ingest.addr, all[0]),
        (stack.query.addr, all[1]),
        (stack.aggregators[0].addr, all[2]),
    ] {
        let mut health = HealthClient::new(hitcounter_integration_tests::connect(addr).await?);
        // Each server reports "" and its own service SERVING, and knows no other service.
        for service in std::iter::once("").chain(all) {
            let status = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await;
            if service.is_empty() || service == own {
                let status = status.map(|r| r.into_inner().status);
                assert_eq!(
                    status.ok(),
                    Some(ServingStatus::Serving as i32),
                    "{own} server, {service:?}"
                );
            } else {
                let code = status.err().map(|s| s.code());
                assert_eq!(code, Some(Code::NotFound), "{own} server, {service:?}");
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
    eventually(Duration::from_secs(30), "the watch slot to free", || {
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
