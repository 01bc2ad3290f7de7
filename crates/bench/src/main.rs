//! `hitcounter-bench`: starts the three release binaries on loopback and measures
//!
//! 1. ingest throughput: `--streams` concurrent `StreamHits` streams sending batches of
//!    `--batch` hits over `--keys` keys for `--seconds`; a hit counts once it is acknowledged,
//!    and the run is only reported after every acknowledged hit is visible through Query (the
//!    totals are checked, so a fast wrong answer cannot pass);
//! 2. visibility: `RecordHit` of a fresh key, then `GetHits` polled until it shows; the time from
//!    the ack to the first read that sees it, as p50/p99/max over `--samples` hits, measured
//!    while the ingest load of step 1 runs at `--visibility-load` hits/s.
//!
//! Run: `cargo build --release --bins && cargo run --release -p hitcounter-bench`.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
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
#[command(about = "Measure hitcounter's ingest throughput and visibility latency")]
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
}

struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn start(bin_dir: &std::path::Path, name: &str, args: &[&str]) -> anyhow::Result<Service> {
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

fn key(i: u64) -> String {
    format!("/bench/{i}")
}

/// Sends batches on one stream until `stop`; returns hits acknowledged. With `rate` > 0 the
/// stream is paced to `rate` hits/s.
async fn drive(
    mut ingest: IngestClient<Channel>,
    keys: u64,
    batch: usize,
    rate: u64,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let (tx, rx) = tokio::sync::mpsc::channel::<RecordHitsRequest>(8);
    let mut responses = ingest
        .stream_hits(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let producer = tokio::spawn(async move {
        let pace = (rate > 0).then(|| Duration::from_secs_f64(batch as f64 / rate as f64));
        let mut next = tokio::time::Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let hits = {
                let mut rng = rand::rng();
                (0..batch)
                    .map(|_| Hit {
                        key: key(rng.random_range(0..keys)),
                        timestamp_ms: 0,
                        count: 1,
                    })
                    .collect()
            };
            if tx
                .send(RecordHitsRequest {
                    hits,
                    batch_id: String::new(),
                })
                .await
                .is_err()
            {
                break;
            }
            if let Some(pace) = pace {
                next += pace;
                tokio::time::sleep_until(next).await;
            }
        }
    });
    while let Some(response) = responses.message().await? {
        acked.fetch_add(response.accepted, Ordering::Relaxed);
    }
    producer.await?;
    Ok(())
}

async fn total(query: &mut QueryClient<Channel>, keys: u64) -> anyhow::Result<u64> {
    let mut sum = 0;
    let mut start = 0;
    while start < keys {
        let end = (start + 1000).min(keys);
        let response = query
            .get_hits_many(GetHitsManyRequest {
                keys: (start..end).map(key).collect(),
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

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (a, i, q) = (free_port()?, free_port()?, free_port()?);
    let upstream = format!("http://{a}");
    let (a_s, i_s, q_s) = (a.to_string(), i.to_string(), q.to_string());
    let _aggregator = start(
        &args.bin_dir,
        "hitcounter-aggregator",
        &["--listen", &a_s, "--metrics-listen", "off"],
    )?;
    let _ingest = start(
        &args.bin_dir,
        "hitcounter-ingest",
        &[
            "--listen",
            &i_s,
            "--metrics-listen",
            "off",
            "--aggregator",
            &upstream,
        ],
    )?;
    let _query = start(
        &args.bin_dir,
        "hitcounter-query",
        &[
            "--listen",
            &q_s,
            "--metrics-listen",
            "off",
            "--aggregator",
            &upstream,
        ],
    )?;
    let ingest = IngestClient::new(channel(i).await?);
    let mut query = QueryClient::new(channel(q).await?);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!(
        "hitcounter-bench: {cores} cores; {} streams x {} hits/batch, {} keys, {} s",
        args.streams, args.batch, args.keys, args.seconds
    );

    // 1. Throughput.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let drivers: Vec<_> = (0..args.streams)
        .map(|_| {
            tokio::spawn(drive(
                ingest.clone(),
                args.keys,
                args.batch,
                0,
                Arc::clone(&stop),
                Arc::clone(&acked),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for driver in drivers {
        driver.await??;
    }
    let elapsed_ack = started.elapsed();
    let acked_hits = acked.load(Ordering::Relaxed);
    let visible_deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = 0;
    while Instant::now() < visible_deadline {
        seen = total(&mut query, args.keys).await?;
        if seen >= acked_hits {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed_visible = started.elapsed();
    anyhow::ensure!(
        seen == acked_hits,
        "counted {seen} hits but {acked_hits} were acknowledged"
    );
    println!(
        "ingest: {acked_hits} hits acked in {:.2} s, all visible after {:.2} s: {:.0} hits/s (acked and visible), counts verified",
        elapsed_ack.as_secs_f64(),
        elapsed_visible.as_secs_f64(),
        acked_hits as f64 / elapsed_visible.as_secs_f64()
    );

    // 2. Visibility under a background load.
    let stop = Arc::new(AtomicBool::new(false));
    let background = (args.visibility_load > 0).then(|| {
        tokio::spawn(drive(
            ingest.clone(),
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
        background.await??;
    }
    println!(
        "visibility (ack → first GetHits that sees it) at {} hits/s background: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} hits",
        args.visibility_load,
        ms(&histogram, 0.5),
        ms(&histogram, 0.99),
        histogram.max() as f64 / 1000.0,
        histogram.len()
    );
    Ok(())
}
