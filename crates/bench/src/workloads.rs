//! The hitcounter side of the workloads (ingest throughput, query latency under load,
//! visibility, drain) and the open-loop scheduler shared with the Redis side.

use std::{
    collections::VecDeque,
    future::Future,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use hitcounter_proto::v1::{
    ingest_client::IngestClient, query_client::QueryClient, GetHitsManyRequest, GetHitsRequest,
    Hit, RecordHitRequest, RecordHitsRequest,
};
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::{keys::Keys, stack::Stack};

/// A latency histogram in microseconds (1 µs to 60 s).
pub(crate) fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?)
}

/// Quantile `q` of a microsecond histogram, in milliseconds.
pub(crate) fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// What one stream delivered: ack latencies and, per key index, the acknowledged hits.
pub(crate) struct Driven {
    pub(crate) latency: Histogram<u64>,
    pub(crate) counts: Vec<u64>,
}

/// Sends batches on one `StreamHits` stream until `stop`; adds acknowledged hits to `acked`.
/// With `rate` > 0 the stream is paced to `rate` hits/s (a pause between batches ends early
/// when `stop` is cancelled); with `rate` = 0 it sends as fast as acknowledgements allow.
pub(crate) async fn drive(
    mut ingest: IngestClient<Channel>,
    keys: Arc<Keys>,
    batch: usize,
    rate: u64,
    stop: CancellationToken,
    acked: Arc<AtomicU64>,
) -> anyhow::Result<Driven> {
    let mut latency = histogram()?;
    let mut counts = vec![0u64; keys.len()];
    let sent_at = Arc::new(Mutex::new(VecDeque::<(Instant, Vec<u32>)>::new()));
    let (tx, rx) = tokio::sync::mpsc::channel::<RecordHitsRequest>(8);
    let mut responses = ingest
        .stream_hits(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let sent = Arc::clone(&sent_at);
    let producer_keys = Arc::clone(&keys);
    let producer = tokio::spawn(async move {
        let pace = (rate > 0).then(|| Duration::from_secs_f64(batch as f64 / rate as f64));
        let mut next = tokio::time::Instant::now();
        while !stop.is_cancelled() {
            let chosen = producer_keys.sample_batch(&mut rand::rng(), batch);
            let hits = chosen
                .iter()
                .map(|&i| Hit {
                    key: producer_keys.name(i).to_string(),
                    timestamp_ms: 0,
                    count: 1,
                })
                .collect();
            let Ok(permit) = tx.reserve().await else {
                break;
            };
            if let Ok(mut sent) = sent.lock() {
                sent.push_back((Instant::now(), chosen));
            }
            permit.send(RecordHitsRequest {
                hits,
                batch_id: String::new(),
            });
            if let Some(pace) = pace {
                next += pace;
                tokio::select! {
                    () = tokio::time::sleep_until(next) => {}
                    () = stop.cancelled() => break,
                }
            }
        }
    });
    while let Some(response) = responses.message().await? {
        acked.fetch_add(response.accepted, Ordering::Relaxed);
        let sent = sent_at.lock().ok().and_then(|mut s| s.pop_front());
        if let Some((started, chosen)) = sent {
            latency.record(started.elapsed().as_micros().max(1) as u64)?;
            anyhow::ensure!(
                response.accepted == chosen.len() as u64,
                "a batch of {} hits acknowledged {}",
                chosen.len(),
                response.accepted
            );
            for i in chosen {
                counts[i as usize] += 1;
            }
        }
    }
    producer.await?;
    Ok(Driven { latency, counts })
}

/// Every key's count over the last hour, read with `GetHitsMany` 1000 keys at a time.
async fn counts(query: &mut QueryClient<Channel>, keys: &Keys) -> anyhow::Result<Vec<u64>> {
    let mut counts = Vec::with_capacity(keys.len());
    for chunk in keys.names().chunks(1000) {
        let response = query
            .get_hits_many(GetHitsManyRequest {
                keys: chunk.to_vec(),
                window_seconds: 3600,
                at_ms: 0,
            })
            .await?
            .into_inner();
        anyhow::ensure!(
            response.results.len() == chunk.len(),
            "short GetHitsMany answer"
        );
        counts.extend(response.results.iter().map(|r| r.count));
    }
    Ok(counts)
}

/// Polls until the keys hold `expected` hits in all; fails if they hold more, or if it takes
/// longer than `within`. With `per_key`, then also checks every key's count.
pub(crate) async fn until_visible(
    query: &mut QueryClient<Channel>,
    keys: &Keys,
    expected: u64,
    per_key: Option<&[u64]>,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let seen = counts(query, keys).await.unwrap_or_default();
        let total: u64 = seen.iter().sum();
        anyhow::ensure!(
            total <= expected,
            "counted {total} hits but only {expected} were acknowledged"
        );
        if total == expected {
            if let Some(per_key) = per_key {
                let wrong = seen.iter().zip(per_key).filter(|(a, b)| a != b).count();
                anyhow::ensure!(
                    wrong == 0,
                    "{wrong} keys differ from the acknowledged counts"
                );
            }
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "counted {total} of {expected} acknowledged hits"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `streams` unpaced streams until `until` resolves; the merged ack latencies and per-key counts.
async fn load(
    ingest: &IngestClient<Channel>,
    keys: &Arc<Keys>,
    streams: usize,
    batch: usize,
    until: impl Future<Output = ()>,
    acked: &Arc<AtomicU64>,
) -> anyhow::Result<Driven> {
    let stop = CancellationToken::new();
    let drivers: Vec<_> = (0..streams)
        .map(|_| {
            tokio::spawn(drive(
                ingest.clone(),
                Arc::clone(keys),
                batch,
                0,
                stop.clone(),
                Arc::clone(acked),
            ))
        })
        .collect();
    until.await;
    stop.cancel();
    let mut merged = Driven {
        latency: histogram()?,
        counts: vec![0; keys.len()],
    };
    for driver in drivers {
        let driven = driver.await??;
        merged.latency.add(driven.latency)?;
        for (sum, n) in merged.counts.iter_mut().zip(driven.counts) {
            *sum += n;
        }
    }
    Ok(merged)
}

/// Result of the ingest throughput workload.
pub(crate) struct Throughput {
    /// Hits acknowledged and verified visible, per second of (send start → all visible).
    pub(crate) hits_per_second: f64,
    pub(crate) ack_latency: Histogram<u64>,
}

/// Workload 1: `streams` streams of `batch`-hit batches for `duration`; counted when acked and
/// visible through Query, every key's count checked against what was acknowledged.
pub(crate) async fn throughput(
    stack: &mut Stack,
    keys: &Arc<Keys>,
    streams: usize,
    batch: usize,
    duration: Duration,
) -> anyhow::Result<Throughput> {
    let acked = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let driven = load(
        &stack.ingest,
        keys,
        streams,
        batch,
        tokio::time::sleep(duration),
        &acked,
    )
    .await?;
    let elapsed_ack = started.elapsed();
    let acked_hits = acked.load(Ordering::Relaxed);
    until_visible(
        &mut stack.query,
        keys,
        acked_hits,
        Some(&driven.counts),
        Duration::from_secs(120),
    )
    .await?;
    let elapsed_visible = started.elapsed();
    let hits_per_second = acked_hits as f64 / elapsed_visible.as_secs_f64();
    println!(
        "  hitcounter ingest: {acked_hits} hits acked in {:.2} s, all visible after {:.2} s: {hits_per_second:.0} hits/s (acked and visible), every key's count verified",
        elapsed_ack.as_secs_f64(),
        elapsed_visible.as_secs_f64(),
    );
    println!(
        "  hitcounter ack latency of a {batch}-hit batch ({streams} streams, up to 8 batches in flight each): p50 {:.2} ms, p99 {:.2} ms",
        ms(&driven.latency, 0.5),
        ms(&driven.latency, 0.99)
    );
    Ok(Throughput {
        hits_per_second,
        ack_latency: driven.latency,
    })
}

/// Requests sent one after another before [`open_loop`] starts measuring.
const WARM_UP_REQUESTS: usize = 200;

/// Sends one request per `1/qps` for `duration`, each from its own task so a slow answer does
/// not delay the next send, and records each latency from its *intended* send time (so stalls
/// are not hidden: corrected for coordinated omission). Fails if any request failed.
///
/// The pacing runs on its own thread with `std::thread::sleep` (which wakes within about
/// 0.1 ms here) rather than on a tokio timer, whose millisecond granularity would add up to
/// 1 ms to every latency, on both peers, and hide the difference between them.
pub(crate) async fn open_loop<F, Fut>(
    qps: u64,
    duration: Duration,
    mut request: F,
) -> anyhow::Result<Histogram<u64>>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    anyhow::ensure!(qps > 0, "the query rate must be positive");
    // Warm up, unmeasured: the first requests open connections (hitcounter's query connects
    // to the aggregator lazily) and fault in code and buffers; a steady-state figure should
    // not count that once-per-process cost, for either peer.
    for _ in 0..WARM_UP_REQUESTS {
        request().await?;
    }
    let latency = Arc::new(Mutex::new(histogram()?));
    let failures = Arc::new(AtomicU64::new(0));
    let interval = Duration::from_secs_f64(1.0 / qps as f64);
    let count = (duration.as_secs_f64() * qps as f64) as u32;
    let runtime = tokio::runtime::Handle::current();
    let (recorded, failed) = (Arc::clone(&latency), Arc::clone(&failures));
    // Each finished request adds a permit; the loop is over when all `count` are back. The
    // tasks are detached rather than kept as `JoinHandle`s: a handle keeps its finished task's
    // memory alive, and thousands of those made the driver's allocator map fresh memory every
    // few hundred requests, a stall that showed up as latency of the peer under test.
    let finished = Arc::new(tokio::sync::Semaphore::new(0));
    let done = Arc::clone(&finished);
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        for n in 0..count {
            let intended = start + interval * n;
            if let Some(wait) = intended.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let future = request();
            let latency = Arc::clone(&recorded);
            let failures = Arc::clone(&failed);
            let done = Arc::clone(&done);
            runtime.spawn(async move {
                if future.await.is_err() {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                let took = intended.elapsed().as_micros().max(1) as u64;
                if let Ok(mut h) = latency.lock() {
                    let _ = h.record(took);
                }
                done.add_permits(1);
            });
        }
    })
    .await?;
    let _all = finished.acquire_many(count).await?;
    let failed = failures.load(Ordering::Relaxed);
    anyhow::ensure!(failed == 0, "{failed} of {count} queries failed");
    let h = latency
        .lock()
        .map_err(|_| anyhow::anyhow!("latency histogram poisoned"))?
        .clone();
    Ok(h)
}

/// A paced background load of 1000-hit batches on one `StreamHits` stream, under the query
/// and visibility workloads.
struct Background {
    stop: CancellationToken,
    driver: Option<tokio::task::JoinHandle<anyhow::Result<Driven>>>,
}

impl Background {
    /// Starts `rate` hits/s into `keys` (nothing when `rate` is 0) and lets it settle for
    /// half a second.
    async fn start(stack: &Stack, keys: &Arc<Keys>, rate: u64) -> Self {
        let stop = CancellationToken::new();
        let driver = (rate > 0).then(|| {
            tokio::spawn(drive(
                stack.ingest.clone(),
                Arc::clone(keys),
                1000,
                rate,
                stop.clone(),
                Arc::new(AtomicU64::new(0)),
            ))
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        Self { stop, driver }
    }

    /// Stops the load; what the stream drove, if there was one.
    async fn stop(self) -> anyhow::Result<Option<Driven>> {
        self.stop.cancel();
        match self.driver {
            Some(driver) => Ok(Some(driver.await??)),
            None => Ok(None),
        }
    }
}

/// Workload 2: `GetHits(300 s)` of Zipf-chosen keys at `qps` for `duration` while one stream
/// ingests `rate` hits/s into the same keys (none when `rate` is 0).
pub(crate) async fn query_latency(
    stack: &Stack,
    keys: &Arc<Keys>,
    rate: u64,
    qps: u64,
    duration: Duration,
) -> anyhow::Result<Histogram<u64>> {
    let background = Background::start(stack, keys, rate).await;
    let query = stack.query.clone();
    let chooser = Arc::clone(keys);
    let result = open_loop(qps, duration, move || {
        let mut query = query.clone();
        let key = chooser.name(chooser.sample(&mut rand::rng())).to_string();
        async move {
            query
                .get_hits(GetHitsRequest {
                    key,
                    window_seconds: 300,
                    at_ms: 0,
                })
                .await?;
            Ok(())
        }
    })
    .await;
    background.stop().await?;
    let h = result?;
    print_query_latency("hitcounter GetHits(300 s)", qps, rate, &h);
    Ok(h)
}

/// Prints one query-latency result (both peers use it, so their lines read alike).
pub(crate) fn print_query_latency(what: &str, qps: u64, rate: u64, h: &Histogram<u64>) {
    println!(
        "  {what} at {qps} q/s while ingesting {rate} hits/s: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms ({} queries, from intended send time)",
        ms(h, 0.5),
        ms(h, 0.99),
        ms(h, 0.999),
        h.max() as f64 / 1000.0,
        h.len()
    );
}

/// Result of the visibility workload.
pub(crate) struct Visibility {
    pub(crate) latency: Histogram<u64>,
}

/// Workload 3: `RecordHit` of a fresh key, then `GetHits` polled until it shows, `samples`
/// times, while one stream ingests `rate` hits/s.
pub(crate) async fn visibility(
    stack: &mut Stack,
    keys: &Arc<Keys>,
    rate: u64,
    samples: usize,
) -> anyhow::Result<Visibility> {
    let background = Background::start(stack, keys, rate).await;
    let mut latency = histogram()?;
    let mut writer = stack.ingest.clone();
    let run = rand::rng().random::<u32>();
    for n in 0..samples {
        let probe = format!("/visibility/{run}/{n}");
        writer
            .record_hit(RecordHitRequest {
                key: probe.clone(),
                timestamp_ms: 0,
                count: 1,
            })
            .await?;
        let acked_at = Instant::now();
        loop {
            let count = stack
                .query
                .get_hits(GetHitsRequest {
                    key: probe.clone(),
                    window_seconds: 60,
                    at_ms: 0,
                })
                .await?
                .into_inner()
                .count;
            if count == 1 {
                break;
            }
            anyhow::ensure!(
                acked_at.elapsed() < Duration::from_secs(10),
                "{probe} not visible after 10 s"
            );
        }
        latency.record(acked_at.elapsed().as_micros().max(1) as u64)?;
    }
    if let Some(paced) = background.stop().await? {
        let paced = paced.latency;
        println!(
            "  hitcounter ack latency of a 1000-hit batch at a steady {rate} hits/s: p50 {:.2} ms, p99 {:.2} ms",
            ms(&paced, 0.5),
            ms(&paced, 0.99)
        );
    }
    println!(
        "  hitcounter visibility (ack → first GetHits that sees it) at {rate} hits/s background: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} hits",
        ms(&latency, 0.5),
        ms(&latency, 0.99),
        latency.max() as f64 / 1000.0,
        latency.len()
    );
    Ok(Visibility { latency })
}

/// Workload: the aggregator is killed, `hits` hits are acknowledged into ingest's log, the
/// aggregator is started again; returns the drain rate (hits/s) until all are visible.
pub(crate) async fn drain(
    stack: &mut Stack,
    keys: &Arc<Keys>,
    streams: usize,
    batch: usize,
    hits: u64,
) -> anyhow::Result<f64> {
    stack.kill_aggregator();
    let buffered = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&buffered);
    let driven = load(
        &stack.ingest,
        keys,
        streams,
        batch,
        async move {
            while counter.load(Ordering::Relaxed) < hits {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        },
        &buffered,
    )
    .await?;
    let buffered = buffered.load(Ordering::Relaxed);
    stack.restart_aggregator()?;
    let back = Instant::now();
    until_visible(
        &mut stack.query,
        keys,
        buffered,
        Some(&driven.counts),
        Duration::from_secs(300),
    )
    .await?;
    let took = back.elapsed();
    let rate = buffered as f64 / took.as_secs_f64();
    println!(
        "  hitcounter drain: {buffered} hits acked into ingest's log with the aggregator down (kill -9); all visible {:.2} s after it restarted: {rate:.0} hits/s",
        took.as_secs_f64(),
    );
    Ok(rate)
}
