//! The clustered-mode figures (`--cluster`): the same ingest-throughput and visibility
//! workloads against a cluster on NATS JetStream (three `nats-server`s on this machine, three
//! aggregators in the membership hosting two replicas of every partition, one ingest, one
//! query: see `Stack::start_clustered`), the read outage when an aggregator is `kill -9`ed, and
//! a membership change: a fourth aggregator joins (it builds its partitions from the log) and
//! leaves again cleanly (it hands them back), with reads all along.
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
    stack::{self, ExtraArgs, Stack},
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
    /// A fourth aggregator joining and leaving.
    pub(crate) movement: Movement,
}

/// What a membership change cost.
pub(crate) struct Movement {
    /// Partitions the joining aggregator built, and the keys it then held.
    pub(crate) partitions: f64,
    pub(crate) keys: f64,
    /// From its start to every partition ready, in seconds (process start included).
    pub(crate) join_seconds: f64,
    /// Its own building time (the longest build), in seconds.
    pub(crate) build_seconds: f64,
    /// From SIGTERM to exit (handing over), in seconds; whether it exited with 0.
    pub(crate) leave_seconds: f64,
    pub(crate) left_cleanly: bool,
    /// Reads all along.
    pub(crate) reads: ReadOutage,
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
    let movement = move_partitions(&stack, &settings.extra, bench).await?;
    println!(
        "  a 4th aggregator joined: built {:.0} partitions ({:.0} keys) in {:.2} s ({:.2} s from its start); left cleanly: {} in {:.2} s; reads: {} of {} failed, longest outage {:.1} ms, slowest {:.1} ms",
        movement.partitions,
        movement.keys,
        movement.build_seconds,
        movement.join_seconds,
        movement.left_cleanly,
        movement.leave_seconds,
        movement.reads.failed,
        movement.reads.reads,
        movement.reads.longest_outage_ms,
        movement.reads.slowest_read_ms
    );
    Ok(ClusterFigures {
        ingest: t.hits_per_second,
        ack_p50: ms(&t.ack_latency, 0.5),
        ack_p99: ms(&t.ack_latency, 0.99),
        visibility,
        outage,
        movement,
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

/// Reads 16 keys 200 times a second until `stop`, counting failures and the longest outage.
fn read_all_along(
    stack: &Stack,
    keys: &Arc<Keys>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<ReadOutage> {
    let names: Vec<String> = (0..16).map(|i| keys.name(i).to_owned()).collect();
    let mut query = stack.query.clone();
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
}

/// Reads all along while the first aggregator is `kill -9`ed, left down for 5 s and restarted
/// (then 5 s more, while it catches up).
async fn read_outage(stack: &mut Stack, keys: &Arc<Keys>) -> anyhow::Result<ReadOutage> {
    let stop = Arc::new(AtomicBool::new(false));
    let reader = read_all_along(stack, keys, Arc::clone(&stop));
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack.kill_aggregator();
    tokio::time::sleep(Duration::from_secs(5)).await;
    stack.restart_aggregator()?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    Ok(reader.await?)
}

/// A fourth aggregator joins (building its partitions from the log, which holds everything the
/// throughput workload wrote), then leaves cleanly; reads all along.
async fn move_partitions(
    stack: &Stack,
    extra: &ExtraArgs,
    keys: &Arc<Keys>,
) -> anyhow::Result<Movement> {
    let stop = Arc::new(AtomicBool::new(false));
    let reader = read_all_along(stack, keys, Arc::clone(&stop));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let (joining, metrics) = stack.add_aggregator("aggregator-3", extra)?;
    let deadline = started + Duration::from_secs(600);
    let (partitions, keys_held) = loop {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the 4th aggregator did not build its partitions within 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let Ok(ready) = stack::metric_with(
            metrics,
            "hitcounter_aggregator_partitions",
            "{state=\"ready\"",
        )
        .await
        else {
            continue;
        };
        let building = stack::metric_with(
            metrics,
            "hitcounter_aggregator_partitions",
            "{state=\"building\"",
        )
        .await?;
        if ready > 0.0 && building == 0.0 {
            break (
                ready,
                stack::metric(metrics, "hitcounter_aggregator_keys").await?,
            );
        }
    };
    let join_seconds = started.elapsed().as_secs_f64();
    let build_seconds = stack::metric(metrics, "hitcounter_aggregator_partition_build_seconds_sum")
        .await
        .unwrap_or(f64::NAN);
    // Let the others drop what moved, then leave.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let leaving = Instant::now();
    let left_cleanly = tokio::task::spawn_blocking(move || joining.terminate()).await?;
    let leave_seconds = leaving.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    Ok(Movement {
        partitions,
        keys: keys_held,
        join_seconds,
        build_seconds,
        leave_seconds,
        left_cleanly,
        reads: reader.await?,
    })
}
