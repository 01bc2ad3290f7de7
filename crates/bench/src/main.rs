//! `hitcounter-bench`: starts the three release binaries on loopback and measures
//!
//! 1. ingest throughput: `--streams` concurrent `StreamHits` streams sending batches of
//!    `--batch` hits over `--keys` keys for `--seconds`; a hit counts once it is acknowledged,
//!    and the run is only reported after every acknowledged hit is visible through Query (the
//!    totals are checked, so a fast wrong answer cannot pass); with the batch ack latency;
//! 2. visibility: `RecordHit` of a fresh key, then `GetHits` polled until it shows; the time from
//!    the ack to the first read that sees it, as p50/p99/max over `--samples` hits, measured
//!    while a background load of `--visibility-load` hits/s runs;
//! 3. drain: the aggregator is killed, `--drain-hits` hits are acknowledged into ingest's log,
//!    the aggregator is started again, and the time until all of them are visible gives the
//!    drain rate of a backlog.
//!
//! Run: `cargo build --release --bins && ./target/release/hitcounter-bench [--ingest-arg=--fsync=never]`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Parser;
use hdrhistogram::Histogram;
use hitcounter_proto::v1::{
    ingest_client::IngestClient, query_client::QueryClient, GetHitsManyRequest, GetHitsRequest,
    Hit, RecordHitRequest, RecordHitsRequest,
};
use rand::Rng;
use tonic::transport::Channel;

#[derive(Debug, Parser)]
#[command(about = "Measure hitcounter's ingest throughput, visibility latency and drain rate")]
struct Args {
    /// Directory of the release binaries.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Concurrent StreamHits streams.
    #[arg(long, default_value_t = 4)]
    streams: usize,
    /// Hits per batch.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Distinct keys, chosen uniformly.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Length of the throughput run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Visibility samples.
    #[arg(long, default_value_t = 1000)]
    samples: usize,
    /// Background ingest rate during the visibility run, hits/s (0 for none).
    #[arg(long, default_value_t = 100_000)]
    visibility_load: u64,
    /// Hits acknowledged into ingest's log while the aggregator is down, before timing the
    /// drain (0 skips the drain run).
    #[arg(long, default_value_t = 2_000_000)]
    drain_hits: u64,
    /// Extra ingest arguments, e.g. `--ingest-arg=--fsync=never`.
    #[arg(long = "ingest-arg", allow_hyphen_values = true)]
    ingest_args: Vec<String>,
}

/// A child process, stopped with SIGTERM when dropped.
struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

impl Service {
    /// `kill -9`.
    fn kill(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        std::mem::forget(self);
    }
}

fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn start(bin_dir: &Path, name: &str, args: &[String]) -> anyhow::Result<Service> {
    let path = bin_dir.join(name);
    let child = Command::new(&path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} (cargo build --release --bins)", path.display()))?;
    Ok(Service(child))
}

async fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?;
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn key(prefix: &str, i: u64) -> String {
    format!("/{prefix}/{i}")
}

/// Sends batches on one stream until `stop`; adds acknowledged hits to `acked` and returns the
/// batch ack latencies (send → ack). With `rate` > 0 the stream is paced to `rate` hits/s.
async fn drive(
    mut ingest: IngestClient<Channel>,
    prefix: &'static str,
    keys: u64,
    batch: usize,
    rate: u64,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
) -> anyhow::Result<Histogram<u64>> {
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let sent_at = Arc::new(Mutex::new(std::collections::VecDeque::new()));
    let (tx, rx) = tokio::sync::mpsc::channel::<RecordHitsRequest>(8);
    let mut responses = ingest
        .stream_hits(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let sent = Arc::clone(&sent_at);
    let producer = tokio::spawn(async move {
        let pace = (rate > 0).then(|| Duration::from_secs_f64(batch as f64 / rate as f64));
        let mut next = tokio::time::Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let hits = {
                let mut rng = rand::rng();
                (0..batch)
                    .map(|_| Hit {
                        key: key(prefix, rng.random_range(0..keys)),
                        timestamp_ms: 0,
                        count: 1,
                    })
                    .collect()
            };
            let Ok(permit) = tx.reserve().await else {
                break;
            };
            if let Ok(mut sent) = sent.lock() {
                sent.push_back(Instant::now());
            }
            permit.send(RecordHitsRequest {
                hits,
                batch_id: String::new(),
            });
            if let Some(pace) = pace {
                next += pace;
                tokio::time::sleep_until(next).await;
            }
        }
    });
    while let Some(response) = responses.message().await? {
        acked.fetch_add(response.accepted, Ordering::Relaxed);
        let started = sent_at.lock().ok().and_then(|mut s| s.pop_front());
        if let Some(started) = started {
            latency.record(started.elapsed().as_micros().max(1) as u64)?;
        }
    }
    producer.await?;
    Ok(latency)
}

async fn total(query: &mut QueryClient<Channel>, prefix: &str, keys: u64) -> anyhow::Result<u64> {
    let mut sum = 0;
    let mut start = 0;
    while start < keys {
        let end = (start + 1000).min(keys);
        let response = query
            .get_hits_many(GetHitsManyRequest {
                keys: (start..end).map(|i| key(prefix, i)).collect(),
                window_seconds: 3600,
                at_ms: 0,
            })
            .await?
            .into_inner();
        sum += response.results.iter().map(|r| r.count).sum::<u64>();
        start = end;
    }
    Ok(sum)
}

/// Polls until the keys under `prefix` hold `expected` hits; fails if they hold more, or if it
/// takes longer than `within`.
async fn until_visible(
    query: &mut QueryClient<Channel>,
    prefix: &str,
    keys: u64,
    expected: u64,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let seen = total(query, prefix, keys).await.unwrap_or(0);
        anyhow::ensure!(
            seen <= expected,
            "counted {seen} hits but only {expected} were acknowledged"
        );
        if seen == expected {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "counted {seen} of {expected} acknowledged hits"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn load(
    ingest: &IngestClient<Channel>,
    prefix: &'static str,
    args: &Args,
    until: impl std::future::Future<Output = ()>,
    acked: &Arc<AtomicU64>,
) -> anyhow::Result<Histogram<u64>> {
    let stop = Arc::new(AtomicBool::new(false));
    let drivers: Vec<_> = (0..args.streams)
        .map(|_| {
            tokio::spawn(drive(
                ingest.clone(),
                prefix,
                args.keys,
                args.batch,
                0,
                Arc::clone(&stop),
                Arc::clone(acked),
            ))
        })
        .collect();
    until.await;
    stop.store(true, Ordering::Relaxed);
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for driver in drivers {
        latency.add(driver.await??)?;
    }
    Ok(latency)
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let data = tempfile::tempdir()?;
    let (a, i, q) = (free_port()?, free_port()?, free_port()?);
    let upstream = format!("http://{a}");
    let dir = |name: &str| data.path().join(name).display().to_string();
    let aggregator_args: Vec<String> = [
        "--listen",
        &a.to_string(),
        "--metrics-listen",
        "off",
        "--data-dir",
        &dir("aggregator"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut ingest_args: Vec<String> = [
        "--listen",
        &i.to_string(),
        "--metrics-listen",
        "off",
        "--data-dir",
        &dir("ingest"),
        "--aggregator",
        &upstream,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    ingest_args.extend(args.ingest_args.iter().cloned());
    let query_args: Vec<String> = [
        "--listen",
        &q.to_string(),
        "--metrics-listen",
        "off",
        "--aggregator",
        &upstream,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let aggregator = start(&args.bin_dir, "hitcounter-aggregator", &aggregator_args)?;
    let _ingest = start(&args.bin_dir, "hitcounter-ingest", &ingest_args)?;
    let _query = start(&args.bin_dir, "hitcounter-query", &query_args)?;
    let ingest = IngestClient::new(channel(i).await?);
    let mut query = QueryClient::new(channel(q).await?);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!(
        "hitcounter-bench: {cores} cores; {} streams x {} hits/batch, {} keys, {} s; ingest args {:?}",
        args.streams, args.batch, args.keys, args.seconds, args.ingest_args
    );

    // 1. Throughput.
    let acked = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let latency = load(
        &ingest,
        "bench",
        &args,
        tokio::time::sleep(Duration::from_secs(args.seconds)),
        &acked,
    )
    .await?;
    let elapsed_ack = started.elapsed();
    let acked_hits = acked.load(Ordering::Relaxed);
    until_visible(
        &mut query,
        "bench",
        args.keys,
        acked_hits,
        Duration::from_secs(120),
    )
    .await?;
    let elapsed_visible = started.elapsed();
    println!(
        "ingest: {acked_hits} hits acked in {:.2} s, all visible after {:.2} s: {:.0} hits/s (acked and visible), counts verified",
        elapsed_ack.as_secs_f64(),
        elapsed_visible.as_secs_f64(),
        acked_hits as f64 / elapsed_visible.as_secs_f64()
    );
    println!(
        "ack latency of a {}-hit batch (send → ack; {} streams, up to 8 batches in flight each): p50 {:.2} ms, p99 {:.2} ms",
        args.batch,
        args.streams,
        ms(&latency, 0.5),
        ms(&latency, 0.99)
    );

    // 2. Visibility under a background load.
    let stop = Arc::new(AtomicBool::new(false));
    let background = (args.visibility_load > 0).then(|| {
        tokio::spawn(drive(
            ingest.clone(),
            "background",
            args.keys,
            1000,
            args.visibility_load,
            Arc::clone(&stop),
            Arc::new(AtomicU64::new(0)),
        ))
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut writer = ingest.clone();
    let run = rand::rng().random::<u32>();
    for n in 0..args.samples {
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
            let count = query
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
        histogram.record(acked_at.elapsed().as_micros().max(1) as u64)?;
    }
    stop.store(true, Ordering::Relaxed);
    if let Some(background) = background {
        let paced = background.await??;
        println!(
            "ack latency of a 1000-hit batch at a steady {} hits/s: p50 {:.2} ms, p99 {:.2} ms",
            args.visibility_load,
            ms(&paced, 0.5),
            ms(&paced, 0.99)
        );
    }
    println!(
        "visibility (ack → first GetHits that sees it) at {} hits/s background: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} hits",
        args.visibility_load,
        ms(&histogram, 0.5),
        ms(&histogram, 0.99),
        histogram.max() as f64 / 1000.0,
        histogram.len()
    );

    // 3. Drain: the aggregator goes away, ingest keeps acknowledging into its log, it comes back.
    if args.drain_hits > 0 {
        aggregator.kill();
        let buffered = Arc::new(AtomicU64::new(0));
        let target = args.drain_hits;
        let counter = Arc::clone(&buffered);
        load(
            &ingest,
            "drain",
            &args,
            async move {
                while counter.load(Ordering::Relaxed) < target {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            &buffered,
        )
        .await?;
        let buffered = buffered.load(Ordering::Relaxed);
        let _aggregator = start(&args.bin_dir, "hitcounter-aggregator", &aggregator_args)?;
        let back = Instant::now();
        until_visible(
            &mut query,
            "drain",
            args.keys,
            buffered,
            Duration::from_secs(300),
        )
        .await?;
        let took = back.elapsed();
        println!(
            "drain: {buffered} hits acked into ingest's log with the aggregator down (kill -9); all visible {:.2} s after it restarted: {:.0} hits/s",
            took.as_secs_f64(),
            buffered as f64 / took.as_secs_f64()
        );
    }
    Ok(())
}
