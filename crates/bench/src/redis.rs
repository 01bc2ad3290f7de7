//! The Redis peer: a private `redis-server` on a free loopback port and the same workloads
//! against it, with Redis used as a sliding-window counter in two layouts (a hash per key per
//! minute with field = second, or a string per key per second), each driven either one
//! command pair per hit or with the client combining the batch first.
//!
//! The server runs with `--save '' --appendonly no`: no RDB snapshots and no AOF, i.e. Redis at
//! its fastest and with no durability at all (an acknowledged hit is lost with the process).
//! hitcounter by default acknowledges only after an fsync; the comparison is deliberately
//! generous to Redis.

use std::{
    collections::HashMap,
    fmt::Write as _,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use hdrhistogram::Histogram;
use redis::aio::MultiplexedConnection;
use tokio_util::sync::CancellationToken;

use crate::{
    keys::Keys,
    stack::free_port,
    workloads::{histogram, ms, open_loop, print_query_latency},
};

/// Seconds a counter is kept after its second (or minute) ended: the last hour, like hitcounter.
const RETENTION_SECONDS: u64 = 3600;

/// A `redis-server` child process, killed by PID (SIGKILL) when dropped.
pub(crate) struct RedisServer {
    child: Child,
    _dir: tempfile::TempDir,
    client: redis::Client,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Makes sure `binary` runs; if it is the default `redis-server` and missing, installs it with
/// `apt-get install -y redis-server` (after `apt-get update` if the first attempt fails).
pub(crate) fn ensure_installed(binary: &str) -> anyhow::Result<String> {
    let version = || {
        Command::new(binary)
            .arg("--version")
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    if let Some(v) = version() {
        return Ok(v);
    }
    anyhow::ensure!(
        binary == "redis-server",
        "{binary} does not run (--redis-server)"
    );
    eprintln!("redis-server not found: apt-get install -y redis-server");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "redis-server"])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !install() {
        let _ = Command::new("apt-get")
            .arg("update")
            .stdout(Stdio::null())
            .status();
        install();
    }
    version().context("redis-server is missing and apt-get could not install it")
}

impl RedisServer {
    /// Starts `binary` on a free loopback port with persistence off and waits for `PING`.
    pub(crate) async fn start(binary: &str) -> anyhow::Result<Self> {
        let port = free_port()?.port();
        let dir = tempfile::tempdir()?;
        let child = Command::new(binary)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--logfile", ""])
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {binary}"))?;
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
        let server = Self {
            child,
            _dir: dir,
            client,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match server.connection().await {
                Ok(mut c) => {
                    let pong: String = redis::cmd("PING").query_async(&mut c).await?;
                    anyhow::ensure!(pong == "PONG", "redis answered {pong}");
                    return Ok(server);
                }
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => return Err(e.context("connecting to redis-server")),
            }
        }
    }

    /// The server's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A new TCP connection (requests on one connection are pipelined).
    pub(crate) async fn connection(&self) -> anyhow::Result<MultiplexedConnection> {
        Ok(self.client.get_multiplexed_async_connection().await?)
    }
}

/// How hits are written to Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// Hash `hh:{key}:{minute}`, field = second of the minute: `HINCRBY h s 1` + `EXPIREAT`
    /// for every hit.
    HashPerHit,
    /// The same hashes, the client combining the batch first: one `HINCRBY h s n` per distinct
    /// (key, second) and one `EXPIREAT` per distinct hash.
    HashCombined,
    /// String `sh:{key}:{second}`: `INCRBY k 1` + `EXPIRE` for every hit.
    StringPerHit,
    /// The same strings, combined: one `INCRBY k n` + `EXPIRE` per distinct (key, second).
    StringCombined,
}

impl Layout {
    /// Every layout, in table order.
    pub(crate) const ALL: [Layout; 4] = [
        Layout::HashPerHit,
        Layout::HashCombined,
        Layout::StringPerHit,
        Layout::StringCombined,
    ];

    /// A short description for the table.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Layout::HashPerHit => "hash/min, HINCRBY+EXPIREAT per hit",
            Layout::HashCombined => "hash/min, client-combined batch",
            Layout::StringPerHit => "string/s, INCRBY+EXPIRE per hit",
            Layout::StringCombined => "string/s, client-combined batch",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Layout::HashPerHit => "hh:",
            Layout::HashCombined => "hc:",
            Layout::StringPerHit => "sh:",
            Layout::StringCombined => "sc:",
        }
    }

    fn is_hash(self) -> bool {
        matches!(self, Layout::HashPerHit | Layout::HashCombined)
    }

    fn combined(self) -> bool {
        matches!(self, Layout::HashCombined | Layout::StringCombined)
    }

    /// The Redis key holding `name`'s count of second `second` (its minute's hash, or its own).
    fn key(self, out: &mut String, name: &str, second: u64) {
        out.clear();
        let bucket = if self.is_hash() { second / 60 } else { second };
        let _ = write!(out, "{}{name}:{bucket}", self.prefix());
    }

    /// The data structure, for the memory table (both drives of a layout store the same).
    pub(crate) fn structure(self) -> &'static str {
        if self.is_hash() {
            "hash per key per minute"
        } else {
            "string per key per second"
        }
    }

    /// How many Redis keys hold a key's counters of `seconds`.
    pub(crate) fn redis_keys_for(self, seconds: impl Iterator<Item = u64>) -> u64 {
        let mut buckets: Vec<u64> = seconds
            .map(|s| if self.is_hash() { s / 60 } else { s })
            .collect();
        buckets.dedup();
        buckets.len() as u64
    }

    /// Reads `name`'s count of `second`.
    pub(crate) async fn read(
        self,
        connection: &mut MultiplexedConnection,
        name: &str,
        second: u64,
    ) -> anyhow::Result<u64> {
        let mut k = String::with_capacity(64);
        self.key(&mut k, name, second);
        let count: Option<u64> = if self.is_hash() {
            redis::cmd("HGET")
                .arg(&k)
                .arg(second % 60)
                .query_async(connection)
                .await?
        } else {
            redis::cmd("GET").arg(&k).query_async(connection).await?
        };
        Ok(count.unwrap_or(0))
    }

    /// Appends the commands recording `hits` (key index, count) at `second` to `pipe`.
    pub(crate) fn write(
        self,
        pipe: &mut redis::Pipeline,
        keys: &Keys,
        hits: &[(u32, u64)],
        second: u64,
    ) {
        let mut k = String::with_capacity(64);
        for &(i, n) in hits {
            self.key(&mut k, keys.name(i), second);
            if self.is_hash() {
                pipe.cmd("HINCRBY").arg(&k).arg(second % 60).arg(n).ignore();
                let expire_at = (second / 60 + 1) * 60 + RETENTION_SECONDS;
                pipe.cmd("EXPIREAT").arg(&k).arg(expire_at).ignore();
            } else {
                pipe.cmd("INCRBY").arg(&k).arg(n).ignore();
                pipe.cmd("EXPIRE").arg(&k).arg(RETENTION_SECONDS).ignore();
            }
        }
    }
}

fn now_second() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One batch of `batch` Zipf-chosen hits as a pipeline; adds the hits to `counts`.
fn batch_pipeline(
    layout: Layout,
    keys: &Keys,
    batch: usize,
    second: u64,
    counts: &mut [u64],
) -> redis::Pipeline {
    let mut rng = rand::rng();
    let chosen = keys.sample_batch(&mut rng, batch);
    for &i in &chosen {
        counts[i as usize] += 1;
    }
    let hits: Vec<(u32, u64)> = if layout.combined() {
        let mut combined: HashMap<u32, u64> = HashMap::with_capacity(batch);
        for i in chosen {
            *combined.entry(i).or_default() += 1;
        }
        combined.into_iter().collect()
    } else {
        chosen.into_iter().map(|i| (i, 1)).collect()
    };
    let mut pipe = redis::pipe();
    layout.write(&mut pipe, keys, &hits, second);
    pipe
}

/// Result of the Redis ingest workload for one layout.
pub(crate) struct Throughput {
    pub(crate) hits_per_second: f64,
}

/// Workload 1 against Redis: `connections` connections, each with `inflight` pipelines of
/// `batch` hits outstanding, for `duration`. A hit counts when its pipeline is answered (a
/// Redis reply means visible); afterwards every key's count over the run's seconds is read
/// back with `HMGET` / `MGET` and must equal what was sent.
pub(crate) async fn throughput(
    server: &RedisServer,
    layout: Layout,
    keys: &Arc<Keys>,
    connections: usize,
    inflight: usize,
    batch: usize,
    duration: Duration,
) -> anyhow::Result<Throughput> {
    let stop = Arc::new(AtomicBool::new(false));
    let first_second = now_second();
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..connections {
        let connection = server.connection().await?;
        for _ in 0..inflight.max(1) {
            let mut connection = connection.clone();
            let keys = Arc::clone(keys);
            let stop = Arc::clone(&stop);
            workers.push(tokio::spawn(async move {
                let mut counts = vec![0u64; keys.len()];
                let mut latency = histogram()?;
                while !stop.load(Ordering::Relaxed) {
                    let pipe = batch_pipeline(layout, &keys, batch, now_second(), &mut counts);
                    let sent = Instant::now();
                    pipe.query_async::<()>(&mut connection).await?;
                    latency.record(sent.elapsed().as_micros().max(1) as u64)?;
                }
                anyhow::Ok((counts, latency))
            }));
        }
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut counts = vec![0u64; keys.len()];
    let mut latency = histogram()?;
    for worker in workers {
        let (c, l) = worker.await??;
        latency.add(l)?;
        for (sum, n) in counts.iter_mut().zip(c) {
            *sum += n;
        }
    }
    let elapsed = started.elapsed();
    let last_second = now_second();
    let sent: u64 = counts.iter().sum();
    verify(server, layout, keys, &counts, first_second, last_second).await?;
    let hits_per_second = sent as f64 / elapsed.as_secs_f64();
    println!(
        "  redis ingest [{}]: {sent} hits in {:.2} s: {hits_per_second:.0} hits/s; pipeline p50 {:.2} ms, p99 {:.2} ms; every key's count read back and verified",
        layout.describe(),
        elapsed.as_secs_f64(),
        ms(&latency, 0.5),
        ms(&latency, 0.99),
    );
    Ok(Throughput { hits_per_second })
}

/// Reads every key's count over seconds `first..=last` and compares with `expected`.
async fn verify(
    server: &RedisServer,
    layout: Layout,
    keys: &Keys,
    expected: &[u64],
    first: u64,
    last: u64,
) -> anyhow::Result<()> {
    let mut connection = server.connection().await?;
    let mut k = String::with_capacity(64);
    let mut wrong = 0usize;
    let mut total = 0u64;
    let indices: Vec<u32> = (0..keys.len() as u32).collect();
    for chunk in indices.chunks(500) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            if layout.is_hash() {
                // One HMGET per minute of the run, asking for the run's seconds in it.
                for minute in first / 60..=last / 60 {
                    layout.key(&mut k, keys.name(i), minute * 60);
                    let cmd = pipe.cmd("HMGET").arg(&k);
                    for second in (minute * 60).max(first)..=(minute * 60 + 59).min(last) {
                        cmd.arg(second % 60);
                    }
                }
            } else {
                let cmd = pipe.cmd("MGET");
                for second in first..=last {
                    layout.key(&mut k, keys.name(i), second);
                    cmd.arg(&k);
                }
            }
        }
        let replies: Vec<Vec<Option<u64>>> = pipe.query_async(&mut connection).await?;
        let per_key = if layout.is_hash() {
            (last / 60 - first / 60 + 1) as usize
        } else {
            1
        };
        for (&i, replies) in chunk.iter().zip(replies.chunks(per_key)) {
            let got: u64 = replies.iter().flatten().flatten().sum();
            total += got;
            if got != expected[i as usize] {
                wrong += 1;
            }
        }
    }
    let sent: u64 = expected.iter().sum();
    anyhow::ensure!(
        wrong == 0 && total == sent,
        "redis [{}]: read back {total} of {sent} hits, {wrong} keys differ",
        layout.describe()
    );
    Ok(())
}

/// Workload 2 against Redis: the `GetHits(300 s)` equivalent — one pipeline of `HMGET`s over
/// the 5–6 minute hashes covering the window, summing the fields inside it — of Zipf-chosen
/// keys at `qps` for `duration`, on one pipelined connection, while one connection ingests
/// `rate` hits/s into the same keys (hash layout, client-combined batches of 1000).
pub(crate) async fn query_latency(
    server: &RedisServer,
    keys: &Arc<Keys>,
    rate: u64,
    qps: u64,
    duration: Duration,
) -> anyhow::Result<Histogram<u64>> {
    let layout = Layout::HashCombined;
    let stop = CancellationToken::new();
    let mut writer = server.connection().await?;
    let background = (rate > 0).then(|| {
        let keys = Arc::clone(keys);
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut counts = vec![0u64; keys.len()];
            let pace = Duration::from_secs_f64(1000.0 / rate as f64);
            let mut next = tokio::time::Instant::now();
            while !stop.is_cancelled() {
                let pipe = batch_pipeline(layout, &keys, 1000, now_second(), &mut counts);
                pipe.query_async::<()>(&mut writer).await?;
                next += pace;
                tokio::select! {
                    () = tokio::time::sleep_until(next) => {}
                    () = stop.cancelled() => break,
                }
            }
            anyhow::Ok(())
        })
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reader = server.connection().await?;
    let chooser = Arc::clone(keys);
    let result = open_loop(qps, duration, move || {
        let mut connection = reader.clone();
        let name = chooser.name(chooser.sample(&mut rand::rng())).to_string();
        async move {
            let now = now_second();
            let from = now - 299;
            let mut pipe = redis::pipe();
            let mut k = String::with_capacity(64);
            for minute in from / 60..=now / 60 {
                layout.key(&mut k, &name, minute * 60);
                let cmd = pipe.cmd("HMGET").arg(&k);
                for second in (minute * 60).max(from)..=(minute * 60 + 59).min(now) {
                    cmd.arg(second % 60);
                }
            }
            let replies: Vec<Vec<Option<u64>>> = pipe.query_async(&mut connection).await?;
            let _count: u64 = replies.iter().flatten().flatten().sum();
            Ok(())
        }
    })
    .await;
    stop.cancel();
    if let Some(background) = background {
        background.await??;
    }
    let h = result?;
    print_query_latency("redis HMGET window(300 s)", qps, rate, &h);
    Ok(h)
}
