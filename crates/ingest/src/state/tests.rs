//! The ingest half of the power-loss simulation: the log stage writes flushes carrying batch ids
//! (ingest log and batch-id ledger) on a [`SimStorage`], trims as aggregators report progress,
//! and the power goes off at a seeded random operation; the data directory is then recovered
//! by [`open_in`] and checked for exactly-once, several cuts per seed, under every `--fsync`
//! policy.
//!
//! The bound enforced: every batch acknowledged and covered by a `durable_seq` the log stage
//! reported (under `always`: every acknowledged batch) survives: a retry of its batch id is a
//! duplicate with the first call's count, and its record is in the log exactly once unless
//! trimmed; no record is ever in the log twice. An acknowledged batch above that (possible under
//! `interval`/`never`: the documented risk of an OS crash) may be lost. Found by this test: its
//! batch id may then still be remembered (the ledger is a separate file, and the OS can write
//! its pages first), so a retry of the lost batch is answered as a duplicate; the hits are
//! lost either way, and they were acknowledged, so this stays within the documented bound.
//!
//! `HITCOUNTER_POWER_LOSS_SEEDS` sets the seeds per policy (default 40, what CI runs; more take
//! longer than nextest's 2-minute limit per test above about 300: use `cargo test` for long
//! runs), `HITCOUNTER_POWER_LOSS_SEED` the first one (default 0).

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use hitcounter_proto::{aggregator::v1::Delta, ingest::v1::LoggedFlush};
use hitcounter_wal::{
    sim::{SimStorage, SplitMix},
    storage::Storage,
    FsyncPolicy,
};
use prost::Message;
use tokio::sync::{oneshot, watch};

use super::open_in;
use crate::{
    ledger::{BatchLedger, Claim},
    stages::{
        log::{lock, LogStage},
        Claimed, Flush,
    },
};

const HORIZON: Duration = Duration::from_secs(600);

/// Seeds that found bugs, replayed in every run: 204 and 266 (`never`) and 436 (`interval`)
/// trimmed log records whose batch ids were not yet on disk in the ledger, so after the power
/// cut a retry counted twice.
const REGRESSION_SEEDS: &[u64] = &[204, 266, 436];

/// What the clients were told.
#[derive(Default)]
struct Model {
    /// Acknowledged batch ids: their count and the seq of their log record.
    acked: BTreeMap<String, (u64, u64)>,
    /// The highest `durable_seq` the log stage reported (what forwarders may send).
    reported: u64,
}

fn seeds() -> u64 {
    std::env::var("HITCOUNTER_POWER_LOSS_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40)
}

/// Checks the recovered data directory against the model.
async fn check(
    ledger: &Arc<BatchLedger>,
    stage: &LogStage,
    model: &mut Model,
    policy: FsyncPolicy,
) -> Result<(), String> {
    let (first, last) = {
        let logs = lock(&stage.logs);
        (logs.main.first_seq(), logs.main.next_seq() - 1)
    };
    // Every id in the log's records, with how often it appears.
    let mut in_log: HashMap<String, usize> = HashMap::new();
    {
        let logs = lock(&stage.logs);
        let mut reader = logs.main.reader(first).map_err(|e| e.to_string())?;
        while let Some((seq, payload)) = reader.next(last).map_err(|e| e.to_string())? {
            let flush = LoggedFlush::decode(payload.as_slice())
                .map_err(|e| format!("record {seq}: {e}"))?;
            for id in flush.batch_ids {
                *in_log.entry(id.batch_id).or_default() += 1;
            }
        }
    }
    if let Some((id, n)) = in_log.iter().find(|(_, n)| **n > 1) {
        return Err(format!("batch {id} is in the log {n} times"));
    }
    let mut lost = Vec::new();
    for (id, &(accepted, seq)) in &model.acked {
        let required = policy == FsyncPolicy::Always || seq <= model.reported;
        if seq > last {
            if required {
                return Err(format!(
                    "batch {id} (seq {seq}, reported durable through {}) was acknowledged, but \
                     the log ends at seq {last}",
                    model.reported
                ));
            }
            // Lost within the documented bound (its id may still be remembered: the ledger is
            // a separate file that can reach the disk first).
            lost.push(id.clone());
            continue;
        }
        // The record survived: a retry must be a duplicate with the first call's count.
        match ledger.claim(id).await {
            Ok(Claim::Duplicate(known)) if known == accepted => {}
            Ok(Claim::Duplicate(known)) => {
                return Err(format!(
                    "batch {id}: count {known} restored, {accepted} acknowledged"
                ))
            }
            Ok(Claim::New(_)) => {
                return Err(format!(
                    "batch {id} (seq {seq}) was acknowledged and its record kept (the log \
                     holds seqs {first}..={last}; below that, trimmed), but a retry would count \
                     it again"
                ))
            }
            Err(_) => return Err("the ledger is full".into()),
        }
        if seq >= first && in_log.get(id).copied().unwrap_or(0) != 1 {
            return Err(format!(
                "batch {id} (seq {seq}) is not in the log (which holds seqs {first}..={last})"
            ));
        }
    }
    for id in lost {
        model.acked.remove(&id);
    }
    model.reported = last;
    Ok(())
}

/// Runs the workload until it ends or the power goes off.
async fn workload(
    ledger: &Arc<BatchLedger>,
    stage: &LogStage,
    aggregator: &watch::Sender<u64>,
    model: &mut Model,
    rng: &mut SplitMix,
    sim: &SimStorage,
    prefix: &str,
) -> Result<(), String> {
    let mut times = stage.ledger_times.clone();
    for n in 0..80 {
        match rng.below(10) {
            // A flush of 1 to 3 requests with batch ids.
            0..=5 => {
                let mut claims = Vec::new();
                let mut senders = Vec::new();
                let mut receivers = Vec::new();
                let mut deltas = Vec::new();
                for k in 0..=rng.below(3) {
                    let id = format!("{prefix}-{n}-{k}");
                    let accepted = 1 + rng.below(9);
                    let Ok(Claim::New(guard)) = ledger.claim(&id).await else {
                        return Err(format!("new batch {id} was not new"));
                    };
                    let (tx, rx) = oneshot::channel();
                    senders.push(tx);
                    receivers.push((id, accepted, rx));
                    claims.push(Claimed { guard, accepted });
                    deltas.push(Delta {
                        key: "k".into(),
                        second: 1_700_000_000,
                        count: accepted,
                    });
                }
                let seq = lock(&stage.logs).main.next_seq();
                let flush = Flush {
                    shards: vec![deltas],
                    waiters: senders,
                    batch_ids: claims,
                    apart: Vec::new(),
                };
                let written = stage.write(flush);
                for (id, accepted, mut rx) in receivers {
                    if let Ok(Ok(())) = rx.try_recv() {
                        model.acked.insert(id, (accepted, seq));
                    }
                }
                match written {
                    Ok((on_disk, recorded)) => {
                        model.reported = model.reported.max(on_disk.unwrap_or(0));
                        times.extend(recorded);
                    }
                    Err(_) if sim.crashed() => return Ok(()),
                    Err(e) => return Err(format!("write failed before the crash: {e}")),
                }
            }
            // A client retries an acknowledged batch.
            6 => {
                let Some((id, &(accepted, _))) = model
                    .acked
                    .iter()
                    .nth(rng.below(model.acked.len() as u64) as usize)
                else {
                    continue;
                };
                match ledger.claim(id).await {
                    Ok(Claim::Duplicate(known)) if known == accepted => {}
                    _ => return Err(format!("retry of {id} was not a duplicate")),
                }
            }
            // The aggregator reports progress (never beyond what was sent: the reported seq).
            7 => {
                aggregator.send_replace(rng.below(model.reported + 1));
            }
            // The log stage's timer: syncs, trims.
            _ => match stage.housekeep(std::mem::take(&mut times)) {
                Ok((_, kept, on_disk)) => {
                    times = kept;
                    model.reported = model.reported.max(on_disk);
                }
                Err(_) if sim.crashed() => return Ok(()),
                Err(e) => return Err(format!("housekeeping failed before the crash: {e}")),
            },
        }
    }
    Ok(())
}

async fn run(policy: FsyncPolicy, seed: u64) -> Result<u64, String> {
    let mut rng = SplitMix::new(seed);
    let sim = SimStorage::new();
    let storage: Arc<dyn Storage> = Arc::new(sim.clone());
    let dir = Path::new("/data/ingest");
    let segment_bytes = 128 + rng.below(1024);
    let mut model = Model::default();
    let mut cuts = 0;
    for cycle in 0..5 {
        let last_cycle = cycle == 4;
        let crash_in_recovery = !last_cycle && rng.below(5) == 0;
        if crash_in_recovery {
            sim.crash_after(1 + rng.below(12));
        }
        // A new process: its in-memory ledger is empty until recovery restores it.
        let ledger = BatchLedger::new(HORIZON, 1 << 20);
        let opened = match open_in(
            Arc::clone(&storage),
            dir,
            1,
            policy,
            segment_bytes,
            &ledger,
            HORIZON,
        ) {
            Ok(opened) => opened,
            Err(_) if sim.crashed() => {
                cuts += 1;
                sim.restart((rng.below(2) == 0).then(|| rng.next()));
                continue;
            }
            Err(e) => return Err(format!("cycle {cycle}: recovery failed: {e}")),
        };
        let (aggregator, durable) = watch::channel(0);
        let stage = LogStage {
            logs: Arc::new(Mutex::new(opened.logs)),
            budget: u64::MAX,
            written: watch::channel(0).0,
            // Under `never`, the background fsync runs at every timer tick here.
            background_sync: (policy == FsyncPolicy::Never).then_some(Duration::ZERO),
            durable: vec![durable],
            ledger_times: opened.ledger_times,
            horizon: HORIZON,
            last_background_sync: Mutex::new(std::time::Instant::now()),
            disk_full_logged: Mutex::new(None),
        };
        check(&ledger, &stage, &mut model, policy)
            .await
            .map_err(|e| format!("cycle {cycle}: {e}"))?;
        if last_cycle {
            break;
        }
        if !crash_in_recovery || !sim.crashed() {
            sim.crash_after(1 + rng.below(250));
        }
        let prefix = format!("c{cycle}");
        workload(
            &ledger,
            &stage,
            &aggregator,
            &mut model,
            &mut rng,
            &sim,
            &prefix,
        )
        .await
        .map_err(|e| format!("cycle {cycle}: {e}"))?;
        drop(stage);
        cuts += u64::from(sim.crashed());
        sim.restart((rng.below(2) == 0).then(|| rng.next()));
    }
    Ok(cuts)
}

async fn run_seeds(policy: FsyncPolicy) {
    let seeds = seeds();
    let first: u64 = std::env::var("HITCOUNTER_POWER_LOSS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut failures = Vec::new();
    let mut cuts = 0;
    for seed in (first..first + seeds).chain(REGRESSION_SEEDS.iter().copied()) {
        match run(policy, seed).await {
            Ok(n) => cuts += n,
            Err(failure) => failures.push(format!("seed {seed}: {failure}")),
        }
    }
    let runs = seeds + REGRESSION_SEEDS.len() as u64;
    println!("{policy:?}: {runs} seeds, {cuts} power cuts");
    assert!(
        failures.is_empty(),
        "{} of {runs} seeds failed under {policy:?}:\n{}",
        failures.len(),
        failures
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test]
async fn power_loss_keeps_acknowledged_batches_exactly_once_under_fsync_always() {
    run_seeds(FsyncPolicy::Always).await;
}

#[tokio::test]
async fn power_loss_keeps_reported_batches_exactly_once_under_fsync_interval() {
    run_seeds(FsyncPolicy::Interval(Duration::from_secs(3600))).await;
}

#[tokio::test]
async fn power_loss_keeps_reported_batches_exactly_once_under_fsync_never() {
    run_seeds(FsyncPolicy::Never).await;
}
