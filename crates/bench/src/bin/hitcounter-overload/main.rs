//! `hitcounter-overload`: starts a release `hitcounter all` on loopback and measures what issue
//! 14 asks of overload and abusive clients, without asserting any timing (it prints figures and
//! fails only when an acknowledged hit is not counted):
//!
//! 1. **capacity**: `--streams` `StreamHits` streams send batches of `--batch` hits as fast as
//!    they are acknowledged for `--capacity-seconds`: the acknowledged hits per second is the
//!    capacity `C`;
//! 2. **overload**: `--factor` × `C` offered for `--overload-seconds`, half over `--streams`
//!    paced streams and half as paced unary `RecordHits` calls (open loop: a call is started at
//!    its intended time whether or not earlier ones returned, up to `--max-unary-in-flight`):
//!    acknowledged throughput against `C`, the share of calls refused with
//!    `RESOURCE_EXHAUSTED` (and any other status), the process's resident set over time, and
//!    the **recovery**: from the end of the overload until a probe `RecordHit` is answered
//!    within twice its latency before the overload, and until everything acknowledged is
//!    visible through Query;
//! 3. **never-readers**: `--never-readers` `StreamHits` streams (sending batches of
//!    `--never-reader-batch` hits while the server reads them) and as many `WatchHits` that
//!    never read a response (1 KiB HTTP/2 stream windows), held `--hold-seconds` while a
//!    normal client keeps recording: resident set, and the normal client's latency;
//! 4. **idle connections**: `--idle-connections` HTTP/2 connections to ingest that send
//!    nothing, held `--hold-seconds`: resident set, a normal client still served, and the
//!    connections the server closed as idle (timed out, or evicted at `--max-connections`)
//!    or refused;
//! 5. **slow uploads**: `--slow-uploads` connections, each uploading one `RecordHits` of
//!    `--batch` hits in `--slow-upload-pieces` DATA frames spread over `--hold-seconds`:
//!    resident set, and a normal client still served.
//!
//! After each phase every acknowledged hit must be counted: the workload sums what it was
//! acknowledged per phase (each phase has its own keys) and compares it with the sum of
//! `GetHitsMany` over the phase's keys once ingest has drained. Fewer fails the run; so does
//! more than the acknowledged hits plus those of calls whose outcome the client cannot know
//! (a deadline that expired, a broken connection): a refused call (`RESOURCE_EXHAUSTED`) must
//! count nothing.
//!
//! Raise the open-file limit for phases 3 and 4 (the server inherits it):
//! `ulimit -n 65536 && ./target/release/hitcounter-overload`.

mod drive;
mod server;

use std::{path::PathBuf, sync::Arc, time::Duration};

use clap::Parser;

use crate::{
    drive::{Outcomes, Phase},
    server::Server,
};

#[derive(Debug, Parser)]
#[command(
    about = "Overload and abusive clients against a release `hitcounter all`: capacity, 2x capacity, never-reading clients, idle connections; resident set, refusals, recovery, and every acknowledged hit counted"
)]
pub(crate) struct Args {
    /// Directory of the release binaries (`hitcounter` is started from there).
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// StreamHits streams of the capacity run, and paced streams of the overload run.
    #[arg(long, default_value_t = 16)]
    streams: usize,
    /// Hits per batch (large, so that the client, sharing the machine, spends little CPU
    /// per hit).
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Distinct keys per phase.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Length of the capacity run.
    #[arg(long, default_value_t = 20)]
    capacity_seconds: u64,
    /// Offered load of the overload run, as a multiple of the measured capacity.
    #[arg(long, default_value_t = 2.0)]
    factor: f64,
    /// Length of the overload run.
    #[arg(long, default_value_t = 60)]
    overload_seconds: u64,
    /// Unary calls outstanding at most in the overload run (a call due while this many are
    /// outstanding is counted as "not sent", not started).
    #[arg(long, default_value_t = 4096)]
    max_unary_in_flight: usize,
    /// Deadline of each unary call (the client gives up and counts DEADLINE_EXCEEDED).
    #[arg(long, default_value_t = 10_000)]
    unary_timeout_ms: u64,
    /// StreamHits streams, and WatchHits streams, that never read a response.
    #[arg(long, default_value_t = 1000)]
    never_readers: usize,
    /// Hits per batch of a never-reading StreamHits client (larger batches fill the server's
    /// HTTP/2 windows with less of the load generator's CPU).
    #[arg(long, default_value_t = 10)]
    never_reader_batch: usize,
    /// Idle HTTP/2 connections to ingest.
    #[arg(long, default_value_t = 10_000)]
    idle_connections: usize,
    /// How long never-readers and idle connections are held.
    #[arg(long, default_value_t = 30)]
    hold_seconds: u64,
    /// Longest wait for everything acknowledged to become visible after a phase.
    #[arg(long, default_value_t = 600)]
    drain_timeout_seconds: u64,
    /// Extra arguments of `hitcounter all`, e.g. `--server-arg=--fsync=never`.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// Connections of the slow-upload phase, each with one slowly sent `RecordHits`.
    #[arg(long, default_value_t = 1000)]
    slow_uploads: usize,
    /// DATA frames each slow upload is cut into, sent evenly over `--hold-seconds`.
    #[arg(long, default_value_t = 16)]
    slow_upload_pieces: usize,
    /// Skip phases 3, 4 and 5 (never-readers, idle connections, slow uploads).
    #[arg(long, conflicts_with = "only_abusive")]
    no_abusive: bool,
    /// Run only phases 3, 4 and 5.
    #[arg(long)]
    only_abusive: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "command: {}",
        std::env::args().collect::<Vec<_>>().join(" ")
    );
    println!(
        "machine: {} CPUs; open-file limit: {}",
        std::thread::available_parallelism().map_or(0, usize::from),
        server::open_file_limit().unwrap_or_else(|e| format!("unknown ({e})"))
    );
    let server = Arc::new(Server::start(&args).await?);
    let rss = server.sample_rss();
    println!("started hitcounter all (pid {})", server.pid());
    println!("resident set at start: {}", mib(rss.now()));

    if !args.only_abusive {
        // 1. Capacity.
        let capacity_phase = Phase::new("cap", args.keys);
        rss.reset();
        let cpu = Cpu::start(&server);
        let capacity = drive::closed_loop(&server, &capacity_phase, &args).await?;
        let capacity_cpu = cpu.report();
        let capacity_rate = capacity.acknowledged_hits as f64 / args.capacity_seconds as f64;
        println!(
            "\n[1] capacity: {} streams x {}-hit batches for {} s: {:.0} hits/s acknowledged; max RSS {}",
            args.streams,
            args.batch,
            args.capacity_seconds,
            capacity_rate,
            mib(rss.max())
        );
        print_outcomes(&capacity);
        println!("    {capacity_cpu}");
        check_counted(&server, &capacity_phase, &capacity, &args).await?;

        // 2. Overload.
        let baseline = drive::probe_latency(&server, 20).await?;
        println!("\nprobe RecordHit latency before the overload: {baseline:?} (median of 20)");
        let overload_phase = Phase::new("ovl", args.keys);
        let offered = (capacity_rate * args.factor).max(1.0) as u64;
        rss.reset();
        let cpu = Cpu::start(&server);
        let overload = drive::open_loop(&server, &overload_phase, &args, offered, &rss).await?;
        let overload_cpu = cpu.report();
        let overload_rate = overload.acknowledged_hits as f64 / args.overload_seconds as f64;
        println!(
            "\n[2] overload: {offered} hits/s offered ({}x capacity) for {} s: {:.0} hits/s acknowledged ({:.0}% of capacity); max RSS {}",
            args.factor,
            args.overload_seconds,
            overload_rate,
            100.0 * overload_rate / capacity_rate.max(1.0),
            mib(rss.max())
        );
        print_outcomes(&overload);
        println!("    {overload_cpu}");
        println!("    RSS per 5 s (max of each): {}", rss.timeline_mib(5));
        println!(
            "    acknowledged hits per 5 s: {}",
            overload
                .per_second
                .chunks(5)
                .map(|c| c.iter().sum::<u64>().to_string())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let ended = std::time::Instant::now();
        let served = drive::until_probe_fast(&server, baseline * 2).await?;
        println!(
            "    recovery: a probe RecordHit answered within 2x its earlier latency {:.2} s after the overload ended",
            (served - ended).as_secs_f64()
        );
        let visible = check_counted(&server, &overload_phase, &overload, &args).await?;
        println!(
            "    recovery: everything acknowledged visible through Query {:.2} s after the overload ended",
            (visible - ended).as_secs_f64()
        );
    }

    if !args.no_abusive {
        // 3. Never-readers.
        let phase = Phase::new("unread", args.keys);
        rss.reset();
        let never = drive::never_readers(&server, &phase, &args, &rss).await?;
        println!(
            "\n[3] {} StreamHits and {} WatchHits that never read (connected in {:.1} s), held {} s: max RSS {} (at start of the phase {})",
            args.never_readers,
            never.watches,
            never.opened_in.as_secs_f64(),
            args.hold_seconds,
            mib(rss.max()),
            mib(rss.first())
        );
        println!("    RSS per 5 s (max of each): {}", rss.timeline_mib(5));
        println!(
            "    a normal client meanwhile: {} RecordHit calls, median {:?}, max {:?}, {} failed",
            never.normal.calls, never.normal.median, never.normal.max, never.normal.failed
        );
        print_outcomes(&never.outcomes);
        check_counted(&server, &phase, &never.outcomes, &args).await?;
        println!(
            "    resident set once they read everything and went away: {}",
            mib(rss.now())
        );

        // 4. Idle connections.
        let phase = Phase::new("idle", args.keys);
        rss.reset();
        let idle = drive::idle_connections(&server, &phase, &args, &rss).await?;
        println!(
            "\n[4] {} idle connections ({} opened in {:.1} s), held {} s: max RSS {} (at start of the phase {})",
            args.idle_connections,
            idle.opened,
            idle.opened_in.as_secs_f64(),
            args.hold_seconds,
            mib(rss.max()),
            mib(rss.first())
        );
        println!("    RSS per 5 s (max of each): {}", rss.timeline_mib(5));
        println!(
            "    a normal client meanwhile: {} RecordHit calls, median {:?}, max {:?}, {} failed",
            idle.normal.calls, idle.normal.median, idle.normal.max, idle.normal.failed
        );
        if let Some(error) = idle.first_error {
            println!("    first connection error: {error}");
        }
        let ingest = "service=\"hitcounter.v1.Ingest\"";
        let closed = "hitcounter_grpc_connections_closed_idle_total";
        println!(
            "    ingest's connections, whole run so far: closed idle by timeout {:.0}, evicted at --max-connections {:.0}, refused {:.0}; open now {:.0}",
            server.metric(closed, &[ingest, "reason=\"timeout\""]).await?,
            server.metric(closed, &[ingest, "reason=\"evicted\""]).await?,
            server.metric("hitcounter_grpc_connections_refused_total", &[ingest]).await?,
            server.metric("hitcounter_grpc_connections_open", &[ingest]).await?,
        );
        print_outcomes(&idle.outcomes);
        check_counted(&server, &phase, &idle.outcomes, &args).await?;

        // 5. Slow uploads.
        let phase = Phase::new("slow", args.keys);
        rss.reset();
        let slow = drive::slow_uploads(&server, &phase, &args).await?;
        println!(
            "\n[5] {} slow uploads ({} started in {:.1} s), each one {}-hit RecordHits in {} pieces over {} s: max RSS {} (at start of the phase {})",
            args.slow_uploads,
            slow.started,
            slow.opened_in.as_secs_f64(),
            args.batch,
            args.slow_upload_pieces,
            args.hold_seconds,
            mib(rss.max()),
            mib(rss.first())
        );
        println!("    RSS per 5 s (max of each): {}", rss.timeline_mib(5));
        println!(
            "    a normal client meanwhile: {} RecordHit calls, median {:?}, max {:?}, {} failed",
            slow.normal.calls, slow.normal.median, slow.normal.max, slow.normal.failed
        );
        if let Some(error) = slow.first_error {
            println!("    first connection error: {error}");
        }
        print_outcomes(&slow.outcomes);
        check_counted(&server, &phase, &slow.outcomes, &args).await?;
        println!(
            "    resident set once they were answered and went away: {}",
            mib(rss.now())
        );
    }
    println!(
        "\npeak resident set of the process over the whole run (VmHWM): {}",
        mib(rss.peak())
    );
    Ok(())
}

/// CPU seconds of the server and of this load generator over a phase: on a small machine both
/// share the cores, and the split says how much of the machine the server had.
struct Cpu {
    started: std::time::Instant,
    server_pid: String,
    server: f64,
    client: f64,
}

impl Cpu {
    fn start(server: &Server) -> Self {
        let server_pid = server.pid().to_string();
        Self {
            started: std::time::Instant::now(),
            server: drive::cpu_seconds(&server_pid).unwrap_or(0.0),
            client: drive::cpu_seconds("self").unwrap_or(0.0),
            server_pid,
        }
    }

    fn report(&self) -> String {
        let wall = self.started.elapsed().as_secs_f64();
        let server = drive::cpu_seconds(&self.server_pid).unwrap_or(0.0) - self.server;
        let client = drive::cpu_seconds("self").unwrap_or(0.0) - self.client;
        format!(
            "CPU over {wall:.1} s: server {server:.1} s ({:.2} cores), load generator {client:.1} s ({:.2} cores)",
            server / wall,
            client / wall
        )
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn print_outcomes(outcomes: &Outcomes) {
    let total = outcomes.calls.values().sum::<u64>().max(1);
    let mut line = String::from("    calls:");
    for (code, n) in &outcomes.calls {
        line.push_str(&format!(
            " {code} {n} ({:.1}%)",
            100.0 * *n as f64 / total as f64
        ));
    }
    if outcomes.held_back > 0 {
        line.push_str(&format!(
            "; stream batches held back by backpressure: {}",
            outcomes.held_back
        ));
    }
    if outcomes.not_started > 0 {
        line.push_str(&format!(
            "; unary calls not started (client in-flight cap): {}",
            outcomes.not_started
        ));
    }
    println!("{line}");
}

/// Waits until the phase's keys sum to at least what was acknowledged, and fails if they sum to
/// more than that plus the hits of calls with an unknown outcome (a refused call must count
/// nothing), or do not get there within the drain timeout. Returns when they got there.
async fn check_counted(
    server: &Server,
    phase: &Phase,
    outcomes: &Outcomes,
    args: &Args,
) -> anyhow::Result<std::time::Instant> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.drain_timeout_seconds);
    let (acknowledged, ambiguous) = (outcomes.acknowledged_hits, outcomes.ambiguous_hits);
    loop {
        let visible = drive::visible_sum(server, phase).await?;
        anyhow::ensure!(
            visible <= acknowledged + ambiguous,
            "{}: {visible} hits visible, more than the {acknowledged} acknowledged plus the \
             {ambiguous} of calls with an unknown outcome",
            phase.name,
        );
        if visible >= acknowledged {
            println!(
                "    counted: {acknowledged} hits acknowledged, {visible} visible through \
                 GetHitsMany ({} of the {ambiguous} hits of calls with an unknown outcome)",
                visible - acknowledged
            );
            return Ok(std::time::Instant::now());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{}: only {visible} of {acknowledged} acknowledged hits visible after {} s",
            phase.name,
            args.drain_timeout_seconds
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
