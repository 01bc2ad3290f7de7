//! Backpressure, the circuit breaker and graceful drain, with the aggregator paused or cut off by
//! the harness's link proxy (its state survives, so exact totals can be checked afterwards).

use std::time::Duration;

use hitcounter_integration_tests::{
    eventually, metric_value, now_ms, scrape, LinkMode, Stack, StackOptions,
};
use hitcounter_proto::v1::{
    query_client::QueryClient, GetHitsManyRequest, GetHitsRequest, Hit, RecordHitsRequest,
};
use tonic::{transport::Channel, Code};

const KEYS: u64 = 100;

/// Hit `i` of a run: 100 keys, timestamps spread over 3000 seconds, so that combining cannot
/// shrink the backlog and every hit is a delta of its own.
fn spread_hit(prefix: &str, i: u64, now: i64) -> Hit {
    Hit {
        key: format!("{prefix}/{}", i % KEYS),
        timestamp_ms: now - ((i / KEYS) % 3000) as i64 * 1000,
        count: 1,
    }
}

async fn total(query: &mut QueryClient<Channel>, prefix: &str) -> Result<u64, tonic::Status> {
    let keys = (0..KEYS).map(|i| format!("{prefix}/{i}")).collect();
    let response = query
        .get_hits_many(GetHitsManyRequest {
            keys,
            window_seconds: 3600,
            at_ms: 0,
        })
        .await?
        .into_inner();
    Ok(response.results.iter().map(|r| r.count).sum())
}

async fn until_total(query: &QueryClient<Channel>, prefix: &str, expected: u64, within: Duration) {
    let result = eventually(within, "every acknowledged hit to be counted", || {
        let mut query = query.clone();
        async move { (total(&mut query, prefix).await.ok()? == expected).then_some(()) }
    })
    .await;
    if let Err(error) = result {
        let mut query = query.clone();
        panic!(
            "{error}: expected {expected}, have {:?}",
            total(&mut query, prefix).await
        );
    }
}

#[tokio::test]
async fn a_paused_aggregator_fills_bounded_buffers_then_everything_drains() -> anyhow::Result<()> {
    let budget = 200_000u64;
    let stack = Stack::start_with(StackOptions {
        ingest: vec![
            "--max-buffer-bytes",
            "200000",
            "--segment-bytes",
            "16384",
            "--buffer-hits",
            "2000",
            "--enqueue-timeout-ms",
            "200",
            "--combine-max-deltas",
            "100",
            "--forward-concurrency",
            "1",
            "--aggregator-timeout-ms",
            "500",
            "--breaker-cooldown-ms",
            "200",
        ],
        ..Default::default()
    })
    .await?;
    let (mut ingest, mut query) = (stack.ingest_client().await?, stack.query_client().await?);
    let now = now_ms();
    stack.links[0].set(LinkMode::Pause);

    // Ingest keeps accepting into its durable log while the aggregator does not answer, up to
    // the disk budget; then RESOURCE_EXHAUSTED, with nothing of the refused request counted.
    let mut acked = 0u64;
    let mut next = 0u64;
    let mut exhausted = None;
    for _ in 0..2000 {
        let hits = (next..next + 50)
            .map(|i| spread_hit("/bp", i, now))
            .collect();
        match ingest
            .record_hits(RecordHitsRequest {
                hits,
                batch_id: String::new(),
            })
            .await
        {
            Ok(response) => {
                acked += response.into_inner().accepted;
                next += 50;
            }
            Err(status) => {
                exhausted = Some(status);
                break;
            }
        }
    }
    let status = exhausted.expect("the log never filled: ingest is not bounded");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("buffer is full"),
        "{}",
        status.message()
    );
    println!("accepted {acked} hits into the log before RESOURCE_EXHAUSTED");
    assert!(acked > 0);

    // Bounded: the log stays within its budget and the hits channel within its capacity.
    eventually(Duration::from_secs(30), "the log size metric", || async {
        let metrics = scrape(stack.ingest.metrics_addr).await.ok()?;
        metric_value(&metrics, "hitcounter_ingest_log_bytes", &[])
    })
    .await?;
    let metrics = scrape(stack.ingest.metrics_addr).await?;
    let log_bytes = metric_value(&metrics, "hitcounter_ingest_log_bytes", &[]).unwrap_or(0.0);
    assert!(
        log_bytes > 0.0 && log_bytes <= budget as f64,
        "log holds {log_bytes} bytes"
    );
    let depth = metric_value(
        &metrics,
        "hitcounter_channel_depth",
        &["channel=\"ingest_hits\""],
    );
    assert!(depth.is_some_and(|d| d <= 2000.0), "depth {depth:?}");
    // No pile-up of calls to the hung aggregator: at most --forward-concurrency in flight.
    let in_flight = metric_value(
        &metrics,
        "hitcounter_ingest_forward_in_flight",
        &["shard=\"0\""],
    );
    assert!(
        in_flight.is_some_and(|n| n <= 1.0),
        "in flight {in_flight:?}"
    );

    // A stream gets the same answer while the log is full.
    let requests = tokio_stream::iter(vec![RecordHitsRequest {
        hits: (next..next + 50)
            .map(|i| spread_hit("/bp", i, now))
            .collect(),
        batch_id: String::new(),
    }]);
    let mut responses = ingest.stream_hits(requests).await?.into_inner();
    let status = responses.message().await.expect_err("log full");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().starts_with("request #0 of this stream"),
        "{}",
        status.message()
    );

    // Resume: the backlog drains from the log and every acknowledged hit is counted, once.
    stack.links[0].set(LinkMode::Pass);
    until_total(&query, "/bp", acked, Duration::from_secs(30)).await;
    assert_eq!(total(&mut query, "/bp").await?, acked);
    // And there is room again.
    let hits: Vec<Hit> = (next..next + 50)
        .map(|i| spread_hit("/bp", i, now))
        .collect();
    eventually(
        Duration::from_secs(30),
        "the log to accept writes again",
        || {
            let mut ingest = ingest.clone();
            let request = RecordHitsRequest {
                hits: hits.clone(),
                batch_id: "after".into(),
            };
            async move { ingest.record_hits(request).await.ok().map(|_| ()) }
        },
    )
    .await?;
    until_total(&query, "/bp", acked + 50, Duration::from_secs(30)).await;
    stack.stop().await.map_err(anyhow::Error::msg)
}

#[tokio::test]
async fn the_breaker_opens_fails_fast_and_recovers_with_exact_counts() -> anyhow::Result<()> {
    let stack_args = vec![
        "--breaker-failures",
        "3",
        "--breaker-cooldown-ms",
        "300",
        "--aggregator-timeout-ms",
        "500",
    ];
    let stack = Stack::start_with(StackOptions {
        ingest: stack_args.clone(),
        query: stack_args,
        ..Default::default()
    })
    .await?;
    let (mut ingest, mut query) = (stack.ingest_client().await?, stack.query_client().await?);
    let now = now_ms();
    let batch = |from: u64| RecordHitsRequest {
        hits: (from..from + 100)
            .map(|i| spread_hit("/cb", i, now))
            .collect(),
        batch_id: String::new(),
    };
    ingest.record_hits(batch(0)).await?;
    until_total(&query, "/cb", 100, Duration::from_secs(30)).await;

    // A watch opened before the outage lives through it.
    let mut watch = query
        .watch_hits(hitcounter_proto::v1::WatchHitsRequest {
            key: "/cb/7".into(),
            window_seconds: 3600,
            interval_ms: 100,
        })
        .await?
        .into_inner();
    assert_eq!(watch.message().await?.map(|u| u.count), Some(1));

    // The aggregator goes away.
    stack.links[0].set(LinkMode::Refuse);
    let get = GetHitsRequest {
        key: "/cb/1".into(),
        window_seconds: 60,
        at_ms: 0,
    };
    // Until the breaker opens every call fails UNAVAILABLE with the transport's reason; then
    // with "circuit open", which only the breaker answers: that call was not sent to the
    // aggregator at all (fails fast). How fast is not asserted here (a timing goal); the stack's
    // tests check on a paused clock that an open circuit costs no time and reaches no shard.
    let codes = std::sync::Mutex::new(Vec::new());
    let open = eventually(Duration::from_secs(30), "query's breaker to open", || {
        let mut query = query.clone();
        let get = get.clone();
        let codes = &codes;
        async move {
            let status = query
                .get_hits(get)
                .await
                .expect_err("the aggregator is cut off");
            codes.lock().ok()?.push(status.code());
            status.message().contains("circuit open").then_some(status)
        }
    })
    .await?;
    let codes = codes
        .into_inner()
        .map_err(|_| anyhow::anyhow!("poisoned"))?;
    assert!(codes.iter().all(|c| *c == Code::Unavailable), "{codes:?}");
    assert_eq!(open.code(), Code::Unavailable);
    assert_eq!(open.message(), "aggregator unavailable: circuit open");
    // The state metric says open. The watch below keeps probing once the cool-down has passed,
    // so the breaker may be half-open for the length of a probe: wait for "open" rather than
    // expecting it at one instant.
    eventually(
        Duration::from_secs(30),
        "the breaker state metric to say open",
        || async {
            let metrics = scrape(stack.query.metrics_addr).await.ok()?;
            let state = metric_value(&metrics, "hitcounter_query_breaker_state", &["shard=\"0\""])?;
            (state == 2.0).then_some(())
        },
    )
    .await?;

    // Ingest keeps accepting into its buffer meanwhile, and its own breaker opens.
    for b in 1..=5 {
        ingest.record_hits(batch(b * 100)).await?;
    }
    eventually(
        Duration::from_secs(30),
        "ingest's breaker to open",
        || async {
            let metrics = scrape(stack.ingest.metrics_addr).await.ok()?;
            let state = metric_value(
                &metrics,
                "hitcounter_ingest_breaker_state",
                &["shard=\"0\""],
            )?;
            (state == 2.0).then_some(())
        },
    )
    .await?;

    // It comes back: breakers close, the backlog drains, counts are exact.
    stack.links[0].set(LinkMode::Pass);
    until_total(&query, "/cb", 600, Duration::from_secs(30)).await;
    eventually(
        Duration::from_secs(30),
        "both breakers to close",
        || async {
            let q = scrape(stack.query.metrics_addr).await.ok()?;
            let i = scrape(stack.ingest.metrics_addr).await.ok()?;
            let q = metric_value(&q, "hitcounter_query_breaker_state", &["shard=\"0\""])?;
            let i = metric_value(&i, "hitcounter_ingest_breaker_state", &["shard=\"0\""])?;
            (q == 0.0 && i == 0.0).then_some(())
        },
    )
    .await?;
    assert_eq!(total(&mut query, "/cb").await?, 600);
    // /cb/7 got one hit per 100-hit batch: the watch sees all six, without having ended.
    loop {
        let update = watch
            .message()
            .await?
            .expect("the watch ended during the outage");
        if update.count == 6 {
            break;
        }
    }
    stack.stop().await.map_err(anyhow::Error::msg)
}

#[tokio::test]
async fn a_clean_stop_drains_every_acknowledged_hit() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let (mut ingest, mut query) = (stack.ingest_client().await?, stack.query_client().await?);
    let now = now_ms();
    // Hold the hits inside ingest's pipeline, then ask it to stop.
    stack.links[0].set(LinkMode::Pause);
    let mut acked = 0;
    for b in 0..10u64 {
        let hits = (b * 100..b * 100 + 100)
            .map(|i| spread_hit("/drain", i, now))
            .collect();
        acked += ingest
            .record_hits(RecordHitsRequest {
                hits,
                batch_id: String::new(),
            })
            .await?
            .into_inner()
            .accepted;
    }
    stack.ingest.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !stack.ingest.task.is_finished(),
        "ingest stopped before delivering its backlog"
    );
    stack.links[0].set(LinkMode::Pass);
    let served = tokio::time::timeout(Duration::from_secs(30), stack.ingest.task).await??;
    assert_eq!(served, Ok(()));
    assert_eq!(
        total(&mut query, "/drain").await?,
        acked,
        "counted right after ingest returned"
    );
    stack.query.stop().await.map_err(anyhow::Error::msg)?;
    for aggregator in stack.aggregators {
        aggregator.stop().await.map_err(anyhow::Error::msg)?;
    }
    Ok(())
}
