//! Workload 4, memory: how many bytes of resident memory one (key, second) counter costs.
//!
//! The same plan is loaded into a fresh aggregator and into a fresh `redis-server` per Redis
//! layout: `keys` keys, each with `HITS_PER_KEY` hits at random seconds spread over the last
//! `SPAN_SECONDS` seconds. The figure is the growth of the server's resident set (`VmRSS`, read
//! from `/proc/<pid>/status` before and after loading) divided by the number of distinct
//! (key, second) pairs of the plan, so allocator overhead and fragmentation count, as they do
//! on a real machine. Both sides are checked before they are measured: hitcounter's every key
//! through Query; Redis by its key count and a sample of keys read back.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use hitcounter_proto::v1::{Hit, RecordHitsRequest};
use rand::{Rng, SeedableRng};

use crate::{
    keys::Keys,
    redis::{Layout, RedisServer},
    stack::{ExtraArgs, Stack},
    workloads,
};

/// Hits per key of the plan.
const HITS_PER_KEY: usize = 10;
/// The plan's hits fall in the last this many seconds.
const SPAN_SECONDS: u64 = 300;
/// Hits per `StreamHits` request while loading.
const LOAD_BATCH: usize = 1000;
/// Concurrent streams (and Redis connections) while loading.
const LOAD_STREAMS: usize = 4;
/// Time given to the server after loading (a checkpoint runs every 2 s; its copy is freed).
const SETTLE: Duration = Duration::from_secs(3);

/// What is loaded: every key's hits as (second, count), seconds distinct and sorted.
struct Plan {
    keys: Arc<Keys>,
    per_key: Vec<BTreeMap<u64, u64>>,
    counters: u64,
}

impl Plan {
    fn new(keys: u64) -> anyhow::Result<Self> {
        let names = Arc::new(Keys::new("mem", keys, 0.0)?);
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        // Seeded: the same plan (up to the current time) every run.
        let mut rng = rand::rngs::StdRng::seed_from_u64(keys);
        let mut counters = 0;
        let per_key = (0..names.len())
            .map(|_| {
                let mut seconds = BTreeMap::new();
                for _ in 0..HITS_PER_KEY {
                    *seconds
                        .entry(now - rng.random_range(0..SPAN_SECONDS))
                        .or_insert(0) += 1;
                }
                counters += seconds.len() as u64;
                seconds
            })
            .collect();
        Ok(Self {
            keys: names,
            per_key,
            counters,
        })
    }

    /// The plan as `StreamHits` requests of about `LOAD_BATCH` hits, one hit per
    /// (key, second) with its count.
    fn requests(&self) -> Vec<RecordHitsRequest> {
        let mut requests = Vec::new();
        let mut hits = Vec::with_capacity(LOAD_BATCH);
        let mut in_batch = 0;
        for (i, seconds) in self.per_key.iter().enumerate() {
            for (&second, &count) in seconds {
                hits.push(Hit {
                    key: self.keys.name(i as u32).to_string(),
                    timestamp_ms: (second * 1000) as i64,
                    count,
                });
                in_batch += count as usize;
            }
            if in_batch >= LOAD_BATCH {
                requests.push(RecordHitsRequest {
                    hits: std::mem::take(&mut hits),
                    batch_id: String::new(),
                });
                in_batch = 0;
            }
        }
        if !hits.is_empty() {
            requests.push(RecordHitsRequest {
                hits,
                batch_id: String::new(),
            });
        }
        requests
    }
}

/// Resident set size and its peak (`VmRSS`, `VmHWM`) of process `pid`, in bytes.
pub(crate) fn resident_bytes(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .ok_or_else(|| anyhow::anyhow!("no {name} in /proc/{pid}/status"))?;
        let kib: u64 = line
            .trim_start_matches(name)
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()?;
        Ok(kib * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// One memory figure: bytes of resident-set growth per (key, second) counter.
pub(crate) struct Memory {
    pub(crate) bytes_per_counter: f64,
}

fn report(who: &str, plan: &Plan, before: u64, after: u64, peak: u64) -> Memory {
    let grown = after.saturating_sub(before);
    let bytes_per_counter = grown as f64 / plan.counters as f64;
    println!(
        "  {who} memory: {} keys, {} (key, second) counters: RSS {:.1} → {:.1} MiB (peak {:.1} MiB), {bytes_per_counter:.1} bytes per counter",
        plan.keys.len(),
        plan.counters,
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
        peak as f64 / 1048576.0,
    );
    Memory { bytes_per_counter }
}

/// Loads the plan of `keys` keys into a fresh stack and measures the aggregator.
pub(crate) async fn hitcounter(
    bin_dir: &Path,
    extra: &ExtraArgs,
    keys: u64,
) -> anyhow::Result<Memory> {
    let plan = Plan::new(keys)?;
    let mut stack = Stack::start(bin_dir, extra).await?;
    let pid = stack
        .aggregator_pid()
        .ok_or_else(|| anyhow::anyhow!("the aggregator is not running"))?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (before, _) = resident_bytes(pid)?;
    let requests = plan.requests();
    let per_stream = requests.len().div_ceil(LOAD_STREAMS).max(1);
    let mut senders = Vec::new();
    let mut requests = requests.into_iter();
    for _ in 0..LOAD_STREAMS {
        let part: Vec<RecordHitsRequest> = requests.by_ref().take(per_stream).collect();
        let mut ingest = stack.ingest.clone();
        senders.push(tokio::spawn(async move {
            let expected: u64 = part.iter().flat_map(|r| &r.hits).map(|h| h.count).sum();
            let mut answers = ingest
                .stream_hits(tokio_stream::iter(part))
                .await?
                .into_inner();
            let mut accepted = 0;
            while let Some(answer) = answers.message().await? {
                accepted += answer.accepted;
            }
            anyhow::ensure!(
                accepted == expected,
                "{accepted} of {expected} hits accepted"
            );
            anyhow::Ok(accepted)
        }));
    }
    let mut acked = 0;
    for sender in senders {
        acked += sender.await??;
    }
    let expected: Vec<u64> = plan.per_key.iter().map(|s| s.values().sum()).collect();
    workloads::until_visible(
        &mut stack.query,
        &plan.keys,
        acked,
        Some(&expected),
        Duration::from_secs(300),
    )
    .await?;
    tokio::time::sleep(SETTLE).await;
    let (after, peak) = resident_bytes(pid)?;
    let counters = stack
        .aggregator_metric("hitcounter_aggregator_counters")
        .await?;
    let store_bytes = stack
        .aggregator_metric("hitcounter_aggregator_store_bytes")
        .await?;
    anyhow::ensure!(
        counters as u64 == plan.counters,
        "the aggregator holds {counters} counters, the plan has {}",
        plan.counters
    );
    println!(
        "  hitcounter aggregator store's own estimate (hitcounter_aggregator_store_bytes): {:.1} MiB, {:.1} bytes per counter",
        store_bytes / 1048576.0,
        store_bytes / counters
    );
    Ok(report("hitcounter aggregator", &plan, before, after, peak))
}

/// Loads the plan of `keys` keys into a fresh `redis-server` in `layout` and measures it.
pub(crate) async fn redis(binary: &str, layout: Layout, keys: u64) -> anyhow::Result<Memory> {
    let plan = Plan::new(keys)?;
    let server = RedisServer::start(binary).await?;
    let pid = server.pid();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (before, _) = resident_bytes(pid)?;
    let plan = Arc::new(plan);
    let mut loaders = Vec::new();
    let per_connection = plan.per_key.len().div_ceil(LOAD_STREAMS);
    for part in 0..LOAD_STREAMS {
        let plan = Arc::clone(&plan);
        let mut connection = server.connection().await?;
        loaders.push(tokio::spawn(async move {
            let first = part * per_connection;
            let last = ((part + 1) * per_connection).min(plan.per_key.len());
            let mut pipe = redis::pipe();
            let mut queued = 0;
            for i in first..last {
                for (&second, &count) in &plan.per_key[i] {
                    layout.write(&mut pipe, &plan.keys, &[(i as u32, count)], second);
                    queued += count as usize;
                }
                if queued >= LOAD_BATCH || i + 1 == last {
                    pipe.query_async::<()>(&mut connection).await?;
                    pipe = redis::pipe();
                    queued = 0;
                }
            }
            anyhow::Ok(())
        }));
    }
    for loader in loaders {
        loader.await??;
    }
    // Check: the number of Redis keys, and a sample of keys read back exactly.
    let expected_keys: u64 = plan
        .per_key
        .iter()
        .map(|seconds| layout.redis_keys_for(seconds.keys().copied()))
        .sum();
    let mut connection = server.connection().await?;
    let size: u64 = redis::cmd("DBSIZE").query_async(&mut connection).await?;
    anyhow::ensure!(
        size == expected_keys,
        "redis [{}] holds {size} keys, expected {expected_keys}",
        layout.describe()
    );
    let mut rng = rand::rng();
    for _ in 0..1000 {
        let i = rng.random_range(0..plan.per_key.len());
        for (&second, &count) in &plan.per_key[i] {
            let got = layout
                .read(&mut connection, plan.keys.name(i as u32), second)
                .await?;
            anyhow::ensure!(
                got == count,
                "redis [{}]: key {} second {second} holds {got}, expected {count}",
                layout.describe(),
                plan.keys.name(i as u32)
            );
        }
    }
    tokio::time::sleep(SETTLE).await;
    let (after, peak) = resident_bytes(pid)?;
    Ok(report(
        &format!("redis [{}]", layout.structure()),
        &plan,
        before,
        after,
        peak,
    ))
}
