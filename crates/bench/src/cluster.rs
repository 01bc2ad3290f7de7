//! The clustered-mode figures (`--cluster`): the same ingest-throughput and visibility
//! workloads against a cluster on NATS JetStream (three `nats-server`s on this machine, three
//! aggregators hosting two replicas of every partition, one ingest, one query: see
//! `Stack::start_clustered`), and the read outage when an aggregator is `kill -9`ed.
//!
//! All of it on one 2-core machine: the three NATS servers replicate and fsync every batch
//! (`sync_interval: always`) on the same disk and cores as the services, so the figures show
//! what the replicated log costs against the local log, not what a cluster of machines does.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use hitcounter_proto::v1::{GetHitsManyRequest, RecordHitRequest};

use crate::{
    keys::Keys,
    stack::{ExtraArgs, Stack},
    workloads::{self, ms},
};

/// The clustered figures of one run.
pub(crate) struct ClusterFigures {
    pub(crate) ingest: f64,
    pub(crate) ack_p50: f64,
    pub(crate) ack_p99: f64,
    pub(crate) visibility: Option<[f64; 2]>,
    /// Reads, failed reads, longest outage (ms) and slowest read (ms) around an aggregator's
    /// `kill -9`.
    pub(crate) outage: ReadOutage,
}

/// What reads saw while an aggregator was killed and restarted.
pub(crate) struct ReadOutage {
    pub(crate) reads: u64,
    pub(crate) failed: u64,
    pub(crate) longest_outage_ms: f64,
    pub(crate) slowest_read_ms: f64,
}

/// The workload's knobs (the local run's, so the two compare).
pub(crate) struct Settings<'a> {
    pub(crate) bin_dir: &'a Path,
    pub(crate) extra: ExtraArgs,
    pub(crate) nats_server: &'a Path,
    pub(crate) nats_config: &'a Path,
    pub(crate) streams: usize,
    pub(crate) batch: usize,
    pub(crate) duration: Duration,
    pub(crate) samples: usize,
    pub(crate) visibility_load: u64,
}

/// Starts a cluster and measures it.
pub(crate) async fn measure(
    settings: &Settings<'_>,
    bench: &Arc<Keys>,
    background: &Arc<Keys>,
) -> anyhow::Result<ClusterFigures> {
    let mut stack = Stack::start_clustered(
        settings.bin_dir,
        &settings.extra,
        settings.nats_server,
        settings.nats_config,
    )
    .await?;
    wait_ready(&mut stack).await?;
    println!("  clustered (3 NATS servers R=3, 3 aggregators R_agg=2, 1 ingest, 1 query):");
    let t = workloads::throughput(
        &mut stack,
        bench,
        settings.streams,
        settings.batch,
        settings.duration,
    )
    .await?;
    let visibility = if settings.samples > 0 {
        let v = workloads::visibility(
            &mut stack,
            background,
            settings.visibility_load,
            settings.samples,
        )
        .await?;
        Some([ms(&v.latency, 0.5), ms(&v.latency, 0.99)])
    } else {
        None
    };
    let outage = read_outage(&mut stack, bench).await?;
    println!(
        "  clustered reads around an aggregator's kill -9 and restart: {} reads, {} failed, longest outage {:.1} ms, slowest read {:.1} ms",
        outage.reads, outage.failed, outage.longest_outage_ms, outage.slowest_read_ms
    );
    Ok(ClusterFigures {
        ingest: t.hits_per_second,
        ack_p50: ms(&t.ack_latency, 0.5),
        ack_p99: ms(&t.ack_latency, 0.99),
        visibility,
        outage,
    })
}

/// Waits until a hit goes through the whole cluster (the services wait for NATS at start).
async fn wait_ready(stack: &mut Stack) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let written = stack
            .ingest
            .record_hit(RecordHitRequest {
                key: "/bench/ready".into(),
                timestamp_ms: 0,
                count: 1,
            })
            .await;
        let read = stack
            .query
            .get_hits_many(GetHitsManyRequest {
                keys: vec!["/bench/ready".into()],
                window_seconds: 60,
                at_ms: 0,
            })
            .await;
        if written.is_ok() && read.is_ok_and(|r| r.get_ref().results.iter().any(|r| r.count > 0)) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the cluster did not come up within 90 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads 16 keys 200 times a second while the first aggregator is `kill -9`ed, left down for
/// 5 s and restarted (then 5 s more, while it catches up).
async fn read_outage(stack: &mut Stack, keys: &Arc<Keys>) -> anyhow::Result<ReadOutage> {
    let names: Vec<String> = (0..16).map(|i| keys.name(i).to_owned()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let mut query = stack.query.clone();
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut outage = ReadOutage {
                reads: 0,
                failed: 0,
                longest_outage_ms: 0.0,
                slowest_read_ms: 0.0,
            };
            let mut failing_since: Option<Instant> = None;
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let mut call = tonic::Request::new(GetHitsManyRequest {
                    keys: names.clone(),
                    window_seconds: 300,
                    at_ms: 0,
                });
                call.set_timeout(Duration::from_secs(10));
                let answer = query.get_hits_many(call).await;
                let took = started.elapsed().as_secs_f64() * 1000.0;
                outage.reads += 1;
                outage.slowest_read_ms = outage.slowest_read_ms.max(took);
                match answer {
                    Ok(_) => {
                        if let Some(since) = failing_since.take() {
                            outage.longest_outage_ms = outage
                                .longest_outage_ms
                                .max(since.elapsed().as_secs_f64() * 1000.0);
                        }
                    }
                    Err(_) => {
                        outage.failed += 1;
                        failing_since.get_or_insert(started);
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if let Some(since) = failing_since {
                outage.longest_outage_ms = outage
                    .longest_outage_ms
                    .max(since.elapsed().as_secs_f64() * 1000.0);
            }
            outage
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack.kill_aggregator();
    tokio::time::sleep(Duration::from_secs(5)).await;
    stack.restart_aggregator()?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    Ok(reader.await?)
}
