//! Promises of the README that no other test checked, each with a test that fails when the
//! promise breaks: damaged files stop the service with the file (and offset) named, ingest refuses
//! a backlog written for another shard count, `StreamHits` ends at an invalid request with the
//! requests before it counted, `ABORTED` for a batch id in flight, `WatchHits` clamps its interval
//! and skips updates a slow reader has no room for, HTTP/2 flow control slows a stream whose
//! client never reads, a full in-memory hits buffer answers RESOURCE_EXHAUSTED, and a drain
//! reports NOT_SERVING, takes no new calls and ends open streams with UNAVAILABLE.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use hitcounter_integration_tests::{
    connect, eventually, metric_value, now_ms, process::Service, scrape, start_aggregator,
    start_ingest, start_query, LinkMode, LinkProxy, Running, Stack, StackOptions,
};
use hitcounter_proto::v1::{
    ingest_client::IngestClient, query_client::QueryClient, GetHitsRequest, Hit, RecordHitsRequest,
    WatchHitsRequest,
};
use tokio_stream::StreamExt;
use tonic::{transport::Channel, Code};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

/// How long a test waits for something that must happen before it reports it missing: a hang
/// guard, never a timing goal.
const PATIENCE: Duration = Duration::from_secs(30);

fn hit(key: &str, count: u64) -> Hit {
    Hit {
        key: key.into(),
        timestamp_ms: now_ms(),
        count,
    }
}

fn batch(key: &str, count: u64, batch_id: &str) -> RecordHitsRequest {
    RecordHitsRequest {
        hits: vec![hit(key, count)],
        batch_id: batch_id.into(),
    }
}

async fn ingest_client(ingest: &Running) -> anyhow::Result<IngestClient<Channel>> {
    Ok(IngestClient::new(connect(ingest.addr).await?))
}

/// Waits for `serve` to return by itself (a start-up failure) and returns its error.
async fn start_up_error(service: Running) -> anyhow::Result<String> {
    let served = tokio::time::timeout(PATIENCE, service.task)
        .await
        .map_err(|_| anyhow::anyhow!("the service kept running"))??;
    match served {
        Ok(()) => anyhow::bail!("serve returned Ok: the service started"),
        Err(error) => Ok(error),
    }
}

/// Runs binary `name` with `args` until it exits by itself; returns its exit code and its whole
/// log (with `RUST_BACKTRACE` set, the error line sits above a long backtrace).
async fn run_binary(
    name: &'static str,
    dir: &Path,
    args: &[&str],
) -> anyhow::Result<(i32, String)> {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let mut service = Service::new(name, dir, &args);
    match service.start().await {
        Ok(addr) => anyhow::bail!("{name} started serving on {addr}"),
        Err(error) => {
            let code = service
                .last_exit_code()
                .ok_or_else(|| anyhow::anyhow!("{name} did not exit: {error}"))?;
            Ok((code, service.log_tail(usize::MAX)))
        }
    }
}

/// Files in `dir` (recursively) whose name ends with `suffix`, sorted by path.
fn files_ending(dir: &Path, suffix: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.to_string_lossy().ends_with(suffix) {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Start offsets of the records of a log segment.
fn record_starts(bytes: &[u8]) -> Vec<usize> {
    let mut offset = 0;
    let mut starts = Vec::new();
    while let Ok(Some(record)) = hitcounter_wal::decode_record(&bytes[offset..]) {
        starts.push(offset);
        offset += record.len;
    }
    starts
}

/// Fills ingest's log in `dir` with batches no aggregator receives (the link refuses), so that
/// it holds several segments after a clean stop. Returns the link, the aggregator and the
/// arguments to restart ingest with.
async fn undelivered_log(
    dir: &str,
    extra: &[&'static str],
) -> anyhow::Result<(Running, LinkProxy)> {
    let aggregator = start_aggregator(&[]).await?;
    let link = LinkProxy::start(aggregator.addr).await?;
    link.set(LinkMode::Refuse);
    let mut args = vec!["--data-dir", dir, "--drain-timeout-seconds", "1"];
    args.extend_from_slice(extra);
    let ingest = start_ingest(&[link.addr], &args).await?;
    let mut client = ingest_client(&ingest).await?;
    for n in 0..40 {
        client
            .record_hits(RecordHitsRequest {
                hits: (0..20).map(|i| hit(&format!("/seg/{n}/{i}"), 1)).collect(),
                batch_id: String::new(),
            })
            .await?;
    }
    ingest.stop().await.map_err(anyhow::Error::msg)?;
    Ok((aggregator, link))
}

#[tokio::test]
async fn a_corrupt_middle_segment_stops_ingest_naming_the_file_and_offset() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let dir = data.path().display().to_string();
    let (aggregator, link) = undelivered_log(&dir, &["--segment-bytes", "4096"]).await?;

    let segments = files_ending(&data.path().join("log"), ".log")?;
    anyhow::ensure!(
        segments.len() >= 3,
        "expected several segments: {segments:?}"
    );
    // A bit flipped inside the second record of the first segment: not a torn tail (whole
    // segments follow it), so recovery must refuse, not cut.
    let victim = &segments[0];
    let mut bytes = std::fs::read(victim)?;
    let starts = record_starts(&bytes);
    anyhow::ensure!(starts.len() >= 3, "expected several records in {victim:?}");
    let record = starts[1];
    let flip = (record + starts[2]) / 2;
    bytes[flip] ^= 0x40;
    std::fs::write(victim, &bytes)?;

    link.set(LinkMode::Pass);
    let ingest = start_ingest(&[link.addr], &["--data-dir", &dir]).await?;
    let error = start_up_error(ingest).await?;
    let file = victim.display().to_string();
    assert!(error.contains(&file), "the file is not named: {error}");
    assert!(
        error.contains(&format!("offset {record}")),
        "the offset {record} is not named: {error}"
    );
    // Nothing was cut: the damaged segment and those after it are all still there.
    assert_eq!(files_ending(&data.path().join("log"), ".log")?, segments);

    // The binary says the same on stderr and exits non-zero.
    let (code, log) = run_binary(
        "hitcounter-ingest",
        data.path(),
        &[
            "--data-dir",
            &dir,
            "--aggregator",
            &format!("http://{}", link.addr),
        ],
    )
    .await?;
    assert_ne!(code, 0, "{log}");
    assert!(
        log.contains(&file) && log.contains(&format!("offset {record}")),
        "exit code {code}, log:\n{log}"
    );
    aggregator.stop().await.map_err(anyhow::Error::msg)
}

#[tokio::test]
async fn a_damaged_newest_checkpoint_stops_the_aggregator_naming_the_file() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let dir = data.path().display().to_string();
    let aggregator = start_aggregator(&["--data-dir", &dir]).await?;
    let ingest = start_ingest(&[aggregator.addr], &[]).await?;
    let query = start_query(&[aggregator.addr], &[]).await?;
    ingest_client(&ingest)
        .await?
        .record_hits(batch("/ckpt", 3, ""))
        .await?;
    query.until_count("/ckpt", 3).await?;
    for service in [ingest, query, aggregator] {
        service.stop().await.map_err(anyhow::Error::msg)?;
    }
    // A clean stop writes a last checkpoint: damage the newest one in its middle.
    let checkpoints = files_ending(data.path(), ".ckpt")?;
    let newest = checkpoints
        .last()
        .ok_or_else(|| anyhow::anyhow!("no checkpoint written"))?;
    let mut bytes = std::fs::read(newest)?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(newest, &bytes)?;

    let aggregator = start_aggregator(&["--data-dir", &dir]).await?;
    let error = start_up_error(aggregator).await?;
    let file = newest.display().to_string();
    assert!(error.contains(&file), "the file is not named: {error}");
    assert!(error.contains("checksum mismatch"), "{error}");

    let (code, log) =
        run_binary("hitcounter-aggregator", data.path(), &["--data-dir", &dir]).await?;
    assert_ne!(code, 0, "{log}");
    assert!(
        log.contains(&file) && log.contains("checksum mismatch"),
        "exit code {code}, log:\n{log}"
    );
    Ok(())
}

#[tokio::test]
async fn ingest_refuses_a_backlog_written_for_another_shard_count() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let dir = data.path().display().to_string();
    // Two shards, neither reachable: everything stays in the log.
    let aggregators = [start_aggregator(&[]).await?, start_aggregator(&[]).await?];
    let links = [
        LinkProxy::start(aggregators[0].addr).await?,
        LinkProxy::start(aggregators[1].addr).await?,
    ];
    for link in &links {
        link.set(LinkMode::Refuse);
    }
    let two = [links[0].addr, links[1].addr];
    let args = ["--data-dir", dir.as_str(), "--drain-timeout-seconds", "1"];
    let ingest = start_ingest(&two, &args).await?;
    ingest_client(&ingest)
        .await?
        .record_hits(batch("/reshard", 2, ""))
        .await?;
    ingest.stop().await.map_err(anyhow::Error::msg)?;

    // One shard now: the backlog's deltas were split for two, so ingest refuses to start.
    let ingest = start_ingest(&two[..1], &args).await?;
    let error = start_up_error(ingest).await?;
    assert!(
        error.contains("for 2 shards but 1 are configured"),
        "{error}"
    );
    assert!(error.contains(&dir), "the directory is not named: {error}");

    // With the old list it starts and delivers the backlog. (Re-sharding itself takes moving
    // `log/` away after a drain: the check cannot yet tell delivered records of the active
    // segment from undelivered ones, a limitation the README states.)
    for link in &links {
        link.set(LinkMode::Pass);
    }
    let ingest = start_ingest(&two, &args).await?;
    let query = start_query(&two, &[]).await?;
    query.until_count("/reshard", 2).await?;
    for service in [ingest, query] {
        service.stop().await.map_err(anyhow::Error::msg)?;
    }
    for aggregator in aggregators {
        aggregator.stop().await.map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

#[tokio::test]
async fn an_invalid_request_mid_stream_ends_it_naming_the_index_and_the_ones_before_count(
) -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let mut ingest = stack.ingest_client().await?;
    let mut requests: Vec<RecordHitsRequest> = (0..3).map(|n| batch("/mid", 1 + n, "")).collect();
    // Request #3 holds an empty key; #4 is valid but comes after it.
    requests.push(RecordHitsRequest {
        hits: vec![hit("/mid", 100), hit("", 1)],
        batch_id: String::new(),
    });
    requests.push(batch("/mid", 1000, ""));
    let mut responses = ingest
        .stream_hits(tokio_stream::iter(requests))
        .await?
        .into_inner();
    let mut accepted = Vec::new();
    let status = loop {
        match responses.message().await {
            Ok(Some(response)) => accepted.push(response.accepted),
            Ok(None) => anyhow::bail!("the stream ended without an error"),
            Err(status) => break status,
        }
    };
    assert_eq!(
        accepted,
        [1, 2, 3],
        "one answer per request before the bad one"
    );
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with("request #3 of this stream: ")
            && status.message().contains("hits[1]: key is empty"),
        "{}",
        status.message()
    );
    // Exactly what was answered is counted: 1 + 2 + 3, nothing of #3 or #4. A marker recorded
    // afterwards becomes visible after the stream's hits (one log, in order), so once it shows
    // the count of /mid is final.
    ingest.record_hits(batch("/mid-marker", 1, "")).await?;
    let query = QueryClient::new(connect(stack.query.addr).await?);
    for (key, expected) in [("/mid-marker", 1), ("/mid", 6)] {
        eventually(PATIENCE, key, || {
            let mut query = query.clone();
            async move {
                let n = query
                    .get_hits(GetHitsRequest {
                        key: key.into(),
                        window_seconds: 60,
                        at_ms: 0,
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .count;
                (n == expected).then_some(())
            }
        })
        .await?;
    }
    stack.stop().await.map_err(anyhow::Error::msg)
}

#[tokio::test]
async fn a_batch_id_still_in_flight_answers_aborted() -> anyhow::Result<()> {
    // The combine stage holds hits for an hour or until it has 2 distinct (key, second) deltas:
    // the first call (one delta) stays in flight until the test sends a second key.
    let aggregator = start_aggregator(&[]).await?;
    let ingest = start_ingest(
        &[aggregator.addr],
        &[
            "--combine-interval-ms",
            "3600000",
            "--combine-max-deltas",
            "2",
            "--enqueue-timeout-ms",
            "100",
        ],
    )
    .await?;
    let query = start_query(&[aggregator.addr], &[]).await?;
    let client = ingest_client(&ingest).await?;
    let first = tokio::spawn({
        let mut client = client.clone();
        async move { client.record_hits(batch("/inflight", 4, "same")).await }
    });
    // The first call's hits reached the combine stage: its id is claimed and pending.
    let metrics = ingest.metrics_addr;
    eventually(
        PATIENCE,
        "the first call to be in the pipeline",
        || async move {
            let text = scrape(metrics).await.ok()?;
            (metric_value(&text, "hitcounter_ingest_combined_hits_total", &[])? >= 1.0)
                .then_some(())
        },
    )
    .await?;
    let status = client
        .clone()
        .record_hits(batch("/inflight", 4, "same"))
        .await
        .expect_err("the first call is still in flight");
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(
        status.message().contains("still being recorded"),
        "{}",
        status.message()
    );
    assert!(!first.is_finished(), "the first call was answered early");

    // A second key completes the flush: the first call gets its answer, counted once, and a
    // retry of its id now learns the outcome.
    client
        .clone()
        .record_hits(batch("/inflight-other", 1, ""))
        .await?;
    let answer = first.await??.into_inner();
    assert_eq!((answer.accepted, answer.duplicate), (4, false));
    let retry = client
        .clone()
        .record_hits(batch("/inflight", 4, "same"))
        .await?
        .into_inner();
    assert_eq!((retry.accepted, retry.duplicate), (4, true));
    query.until_count("/inflight", 4).await?;
    for service in [ingest, query, aggregator] {
        service.stop().await.map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

#[tokio::test]
async fn a_drain_reports_not_serving_refuses_new_calls_and_ends_open_streams_unavailable(
) -> anyhow::Result<()> {
    // The aggregator's link is paused, so the drain waits (up to its hour) for the test.
    let stack = Stack::start_with(StackOptions {
        ingest: vec!["--drain-timeout-seconds", "3600"],
        ..Default::default()
    })
    .await?;
    let mut ingest = stack.ingest_client().await?;
    stack.links[0].set(LinkMode::Pause);
    let mut acked = ingest
        .record_hits(batch("/drain", 5, ""))
        .await?
        .into_inner()
        .accepted;
    let mut health = HealthClient::new(connect(stack.ingest.addr).await?);
    let mut status = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner();
    let serving = status.message().await?.map(|s| s.status);
    assert_eq!(serving, Some(ServingStatus::Serving as i32));
    // A stream open across the stop, with one answered request.
    let (requests, requests_rx) = tokio::sync::mpsc::channel(4);
    let mut responses = ingest
        .stream_hits(tokio_stream::wrappers::ReceiverStream::new(requests_rx))
        .await?
        .into_inner();
    requests.send(batch("/drain", 1, "")).await?;
    acked += responses
        .message()
        .await?
        .ok_or_else(|| anyhow::anyhow!("no answer"))?
        .accepted;

    stack.ingest.shutdown.cancel();
    // Health says NOT_SERVING as soon as the drain starts.
    let not_serving = status.message().await?.map(|s| s.status);
    assert_eq!(not_serving, Some(ServingStatus::NotServing as i32));
    // The open stream ends with UNAVAILABLE naming the first request it did not read.
    let ended = responses.message().await;
    match ended {
        Err(status) => {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert!(
                status.message().starts_with("request #1 of this stream: ")
                    && status.message().contains("shutting down"),
                "{}",
                status.message()
            );
        }
        other => panic!("the stream did not end with UNAVAILABLE: {other:?}"),
    }
    // New calls are refused (UNAVAILABLE) while the drain goes on.
    let addr = stack.ingest.addr;
    let refused = eventually(PATIENCE, "ingest to refuse new calls", || async move {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .ok()?
            .connect_lazy();
        IngestClient::new(channel)
            .record_hits(batch("/drain-refused", 1, ""))
            .await
            .err()
    })
    .await?;
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        !stack.ingest.task.is_finished(),
        "the drain ended with the aggregator paused"
    );

    // Resume: the drain delivers everything acknowledged, nothing refused, and ingest returns.
    drop((status, health));
    stack.links[0].set(LinkMode::Pass);
    let served = tokio::time::timeout(PATIENCE, stack.ingest.task).await??;
    assert_eq!(served, Ok(()));
    let query = QueryClient::new(connect(stack.query.addr).await?);
    for (key, expected) in [("/drain", acked), ("/drain-refused", 0)] {
        let n = query
            .clone()
            .get_hits(GetHitsRequest {
                key: key.into(),
                window_seconds: 60,
                at_ms: 0,
            })
            .await?
            .into_inner()
            .count;
        assert_eq!(n, expected, "{key}");
    }
    stack.query.stop().await.map_err(anyhow::Error::msg)?;
    for aggregator in stack.aggregators {
        aggregator.stop().await.map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

/// A channel to `addr` whose receive windows are tiny, so that a client that does not read
/// makes the server's sends wait almost at once (instead of after 64 KiB of buffered answers).
async fn small_window_channel(addr: std::net::SocketAddr) -> anyhow::Result<Channel> {
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .initial_stream_window_size(Some(1024))
            .initial_connection_window_size(Some(1024))
            .connect()
            .await?,
    )
}

#[tokio::test]
async fn watch_hits_raises_short_intervals_and_defaults_zero_to_a_second() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let mut query = stack.query_client().await?;
    // An interval never ends before it started: the n-th update after the first leaves the
    // server no earlier than n intervals after the watch was opened, so these are lower bounds
    // that no slow machine can break, and that an unclamped 1 ms interval misses by far.
    for (asked, effective, updates) in [(1, 100, 4), (0, 1000, 2)] {
        let opened = tokio::time::Instant::now();
        let mut watch = query
            .watch_hits(WatchHitsRequest {
                key: "/clamp".into(),
                window_seconds: 60,
                interval_ms: asked,
            })
            .await?
            .into_inner();
        for _ in 0..updates {
            watch
                .message()
                .await?
                .ok_or_else(|| anyhow::anyhow!("the watch ended"))?;
        }
        let took = opened.elapsed();
        let least = Duration::from_millis(effective * (updates as u64 - 1));
        assert!(
            took >= least,
            "interval_ms {asked}: {updates} updates in {took:?}, expected at least {least:?}"
        );
    }
    stack.stop().await.map_err(anyhow::Error::msg)
}

#[tokio::test]
async fn a_watch_skips_updates_a_slow_reader_has_no_room_for_and_goes_on() -> anyhow::Result<()> {
    let stack = Stack::start_with(StackOptions {
        query: vec!["--watch-channel-capacity", "1"],
        ..Default::default()
    })
    .await?;
    let mut ingest = stack.ingest_client().await?;
    let mut query = QueryClient::new(small_window_channel(stack.query.addr).await?);
    let mut watch = query
        .watch_hits(WatchHitsRequest {
            key: "/slow".into(),
            window_seconds: 60,
            interval_ms: 100,
        })
        .await?
        .into_inner();
    // The client reads nothing: the HTTP/2 window fills, then the watch's one-update queue,
    // and from then on the server skips updates instead of queueing them.
    let metrics = stack.query.metrics_addr;
    let skipped = || async move {
        let text = scrape(metrics).await.ok()?;
        metric_value(
            &text,
            "hitcounter_query_watch_skipped_updates_total",
            &["reason=\"slow_reader\""],
        )
    };
    eventually(
        PATIENCE,
        "skipped updates of the slow reader",
        || async move { skipped().await.filter(|&n| n >= 3.0) },
    )
    .await?;
    // The watch did not end: once the reader catches up it sees new hits.
    ingest.record_hits(batch("/slow", 7, "")).await?;
    loop {
        let update = watch
            .message()
            .await?
            .ok_or_else(|| anyhow::anyhow!("the watch ended"))?;
        if update.count == 7 {
            break;
        }
    }
    stack.stop().await.map_err(anyhow::Error::msg)
}

#[tokio::test]
async fn a_stream_whose_client_never_reads_is_slowed_by_flow_control_not_buffered(
) -> anyhow::Result<()> {
    let stack = Stack::start_with(StackOptions {
        ingest: vec!["--stream-window", "2", "--stream-response-capacity", "2"],
        ..Default::default()
    })
    .await?;
    let mut ingest = IngestClient::new(small_window_channel(stack.ingest.addr).await?);
    // The client offers `offered` requests of about 10 KB (40 hits with 250-byte keys: many
    // bytes, few hits) and counts how many the transport took from it. What can be in flight
    // is bounded in bytes (about 1 MiB of HTTP/2 windows, plus a few requests in ingest), so
    // a few hundred of them; 20 MB offered is far beyond that.
    let offered = 2000u64;
    let hits_per_request = 40u64;
    let taken = Arc::new(AtomicU64::new(0));
    let requests = {
        let taken = Arc::clone(&taken);
        tokio_stream::iter(0..offered).map(move |n| {
            taken.fetch_add(1, Ordering::SeqCst);
            RecordHitsRequest {
                hits: (0..hits_per_request)
                    .map(|i| hit(&format!("/flow/{}/{:>240}", (n + i) % 10, ""), 1))
                    .collect(),
                batch_id: String::new(),
            }
        })
    };
    let mut responses = ingest.stream_hits(requests).await?.into_inner();
    // Wait until the stream's response queue is full: from then on ingest reads no requests.
    let metrics = stack.ingest.metrics_addr;
    eventually(PATIENCE, "the stream's answers to back up", || async move {
        let text = scrape(metrics).await.ok()?;
        let depth = metric_value(
            &text,
            "hitcounter_channel_depth",
            &["channel=\"ingest_stream_responses\""],
        )?;
        (depth >= 2.0).then_some(())
    })
    .await?;
    // Then until the client stops being able to send: what it sent so far sits in bounded
    // buffers (the windows of HTTP/2, the stream window, the response queue).
    let mut last = taken.load(Ordering::SeqCst);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = taken.load(Ordering::SeqCst);
        if now == last || now == offered {
            break;
        }
        last = now;
    }
    let stalled_at = taken.load(Ordering::SeqCst);
    println!("the client could send {stalled_at} of {offered} requests without reading");
    assert!(
        stalled_at < offered / 2,
        "ingest took {stalled_at} of {offered} requests from a client that reads nothing"
    );
    // Reading again lets everything through: one answer per request, every hit counted.
    let mut answers = 0u64;
    let mut accepted = 0u64;
    while let Some(response) = responses.message().await? {
        answers += 1;
        accepted += response.accepted;
    }
    assert_eq!((answers, accepted), (offered, offered * hits_per_request));
    stack.stop().await.map_err(anyhow::Error::msg)
}

/// Backpressure through ingest's in-memory hits buffer (`--buffer-hits`), not the disk budget:
/// when the log writer cannot keep up, the buffer fills and a unary call that finds no room
/// within the enqueue timeout gets RESOURCE_EXHAUSTED, with nothing of it counted.
///
/// The log writer runs on tokio's blocking pool. This test's runtime has a pool of one thread,
/// and the test occupies it: the writer then waits, deterministically, for as long as the test
/// wants, as a disk that stopped answering would make it wait.
#[test]
fn a_full_hits_buffer_answers_resource_exhausted_and_counts_nothing_of_it() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(1)
        .build()?
        .block_on(full_hits_buffer())
}

async fn full_hits_buffer() -> anyhow::Result<()> {
    let stack = Stack::start_with(StackOptions {
        ingest: vec![
            "--buffer-hits",
            "100",
            "--enqueue-timeout-ms",
            "200",
            "--flush-channel-capacity",
            "1",
            // One 50-hit call per flush, so that the stages between the buffer and the log
            // writer hold only a few calls.
            "--combine-max-deltas",
            "50",
        ],
        ..Default::default()
    })
    .await?;
    // Everything that starts up on the blocking pool (opening ingest's log) is done once ingest
    // answers SERVING; the clients connect now, while the pool is free.
    hitcounter_integration_tests::process::serving(stack.ingest.addr, PATIENCE).await?;
    let ingest = stack.ingest_client().await?;
    let mut query = stack.query_client().await?;
    let metrics = stack.ingest.metrics_addr;
    scrape(metrics).await?;

    // Take the pool's only thread.
    let (release, released) = std::sync::mpsc::sync_channel::<()>(1);
    let (holding, held) = tokio::sync::oneshot::channel::<()>();
    let blocker = tokio::task::spawn_blocking(move || {
        let _ = holding.send(());
        let _ = released.recv();
    });
    held.await?;

    // 20 calls of 50 hits at once: a few fit in the buffer and the stages before the log, the
    // rest find no room within 200 ms.
    let calls: Vec<_> = (0..20u64)
        .map(|n| {
            let mut ingest = ingest.clone();
            tokio::spawn(async move {
                ingest
                    .record_hits(RecordHitsRequest {
                        hits: (0..50).map(|i| hit(&format!("/full/{n}/{i}"), 1)).collect(),
                        batch_id: String::new(),
                    })
                    .await
            })
        })
        .collect();
    // Wait for the refusals: every call that is not in the pipeline by now gets one.
    eventually(PATIENCE, "buffer_full refusals", || async move {
        let text = scrape(metrics).await.ok()?;
        metric_value(
            &text,
            "hitcounter_ingest_hits_rejected_total",
            &["reason=\"buffer_full\""],
        )
        .filter(|&n| n > 0.0)
    })
    .await?;
    let _ = release.send(());
    blocker.await?;

    let mut accepted = 0u64;
    let mut refused = 0u64;
    for call in calls {
        match call.await? {
            Ok(response) => accepted += response.into_inner().accepted,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(
                    status.message().contains("ingest buffer is full"),
                    "{}",
                    status.message()
                );
                refused += 50;
            }
        }
    }
    println!("{accepted} hits accepted, {refused} refused with buffer_full");
    assert!(
        refused > 0 && accepted > 0,
        "{accepted} accepted, {refused} refused"
    );
    let text = scrape(metrics).await?;
    assert_eq!(
        metric_value(
            &text,
            "hitcounter_ingest_hits_rejected_total",
            &["reason=\"buffer_full\""],
        ),
        Some(refused as f64)
    );
    // Exactly the accepted hits are counted.
    let keys: Vec<String> = (0..20)
        .flat_map(|n| (0..50).map(move |i| format!("/full/{n}/{i}")))
        .collect();
    let total = |response: hitcounter_proto::v1::GetHitsManyResponse| -> u64 {
        response.results.iter().map(|r| r.count).sum()
    };
    eventually(PATIENCE, "the accepted hits to be counted", || {
        let mut query = query.clone();
        let keys = keys.clone();
        async move {
            let response = query
                .get_hits_many(hitcounter_proto::v1::GetHitsManyRequest {
                    keys,
                    window_seconds: 60,
                    at_ms: 0,
                })
                .await
                .ok()?;
            (total(response.into_inner()) == accepted).then_some(())
        }
    })
    .await?;
    // A marker recorded after them is visible only after them (one log, in order): once it is,
    // nothing of the refused calls can still arrive.
    ingest
        .clone()
        .record_hits(batch("/full-marker", 1, ""))
        .await?;
    until_visible(&mut query, "/full-marker").await?;
    let response = query
        .get_hits_many(hitcounter_proto::v1::GetHitsManyRequest {
            keys,
            window_seconds: 60,
            at_ms: 0,
        })
        .await?;
    assert_eq!(
        total(response.into_inner()),
        accepted,
        "refused hits were counted"
    );
    stack.stop().await.map_err(anyhow::Error::msg)
}

async fn until_visible(query: &mut QueryClient<Channel>, key: &str) -> anyhow::Result<()> {
    eventually(PATIENCE, key, || {
        let mut query = query.clone();
        async move {
            let n = query
                .get_hits(GetHitsRequest {
                    key: key.into(),
                    window_seconds: 60,
                    at_ms: 0,
                })
                .await
                .ok()?
                .into_inner()
                .count;
            (n > 0).then_some(())
        }
    })
    .await
}
