//! The power-loss simulation: a workload on a log in [`SimStorage`], a power cut at a seeded
//! random operation, recovery, and a check of what the log promises, thousands of times, under
//! every fsync policy.
//!
//! The loss bound enforced (the crate documentation's promise, what ingest relies on):
//!
//! * every record at or below the highest [`Log::durable_seq`] the log ever reported survives
//!   the crash, with the payload it was appended with. Under `Always` that is every record
//!   `sync` returned for (what ingest acknowledges); under `Interval` and `Never` it is what was
//!   covered by a completed fsync (what ingest forwards, so a seq known to an aggregator is
//!   never handed out again). Records above it may be lost, but only as a suffix;
//! * recovery always succeeds (the simulation writes in order, so a crash leaves no holes) and
//!   never holds a record with a payload other than the one appended at its seq;
//! * trimming loses nothing beyond what it was asked to trim.
//!
//! `HITCOUNTER_POWER_LOSS_SEEDS` sets the number of seeds per policy (default 100, what CI
//! runs: about 350 power cuts per policy); `HITCOUNTER_POWER_LOSS_SEED` the first one (default
//! 0). A failure names its seed.
//!
//! Reverting the fix of issue 12's finding 4 (`Log::roll` reporting the sealed segment durable
//! before its directory entry was fsynced) fails about two seeds in three under `Interval` and
//! `Never`: "lost records reported durable".

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::sim::{SimStorage, SplitMix};
use crate::{FsyncPolicy, Log, LogConfig};

/// Crash-and-recover cycles per seed.
const CYCLES: usize = 4;
/// Steps of the workload per cycle (the crash usually comes first).
const STEPS: usize = 60;

/// What the workload did, as far as the log has told it.
#[derive(Debug, Default)]
struct Model {
    /// The payload appended at each seq (index `seq - 1`), as far as the log may hold it.
    payloads: Vec<Vec<u8>>,
    /// The highest `durable_seq` the log reported.
    reported_durable: u64,
    /// The highest `through` passed to `trim`.
    trim_limit: u64,
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Checks a freshly recovered log against the model, then makes the model follow it.
fn check_recovered(log: &Log, model: &mut Model) -> Result<(), String> {
    let last = log.next_seq() - 1;
    if last < model.reported_durable {
        return Err(format!(
            "lost records reported durable: durable_seq {} was reported, recovery ends at seq {last}",
            model.reported_durable
        ));
    }
    if log.first_seq() > model.trim_limit + 1 {
        return Err(format!(
            "the log starts at seq {} but was never asked to trim beyond {}",
            log.first_seq(),
            model.trim_limit
        ));
    }
    if log.durable_seq() != last {
        return Err(format!(
            "recovered records are not all durable: durable_seq {} after recovering up to {last}",
            log.durable_seq()
        ));
    }
    let mut reader = log
        .reader(log.first_seq())
        .map_err(|e| format!("reader: {e}"))?;
    let mut expected = log.first_seq();
    while let Some((seq, payload)) = reader.next(last).map_err(|e| format!("read: {e}"))? {
        if seq != expected {
            return Err(format!("read seq {seq}, expected {expected}"));
        }
        let appended = usize::try_from(seq - 1)
            .ok()
            .and_then(|i| model.payloads.get(i));
        if appended != Some(&payload) {
            return Err(format!(
                "seq {seq} holds a payload that was not appended at that seq"
            ));
        }
        expected += 1;
    }
    if expected != last + 1 {
        return Err(format!(
            "read up to seq {}, the log ends at {last}",
            expected - 1
        ));
    }
    // What was not recovered is gone; its seqs will be given to new records.
    model.payloads.truncate(last as usize);
    model.reported_durable = last;
    Ok(())
}

/// Runs the workload until it ends or the power goes off. An error other than the power loss
/// is a failure.
fn workload(
    log: &mut Log,
    model: &mut Model,
    rng: &mut SplitMix,
    sim: &SimStorage,
) -> Result<(), String> {
    for _ in 0..STEPS {
        let step = match rng.below(10) {
            // Appends, each followed by the policy's sync, as ingest's log stage does.
            0..=5 => {
                let batch: Vec<Vec<u8>> = (0..=rng.below(3))
                    .map(|_| {
                        let len = 1 + rng.below(90) as usize;
                        let fill = rng.next() as u8;
                        (0..len).map(|i| fill.wrapping_add(i as u8)).collect()
                    })
                    .collect();
                let refs: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
                log.append(&refs)
                    .map(|seqs| {
                        debug_assert_eq!(seqs.start, model.payloads.len() as u64 + 1);
                        model.payloads.extend(batch);
                    })
                    .and_then(|()| log.sync())
            }
            // The timer: ingest fsyncs under `interval`/`never` in the background.
            6 | 7 => log.sync_now(),
            // Trimming up to what an aggregator could have reported durable.
            _ => {
                let through = rng.below(log.durable_seq() + 1);
                model.trim_limit = model.trim_limit.max(through);
                log.trim(through).map(drop)
            }
        };
        // Whatever the log reports durable is published (acknowledged or forwarded).
        model.reported_durable = model.reported_durable.max(log.durable_seq());
        if let Err(error) = step {
            if sim.crashed() {
                return Ok(());
            }
            return Err(format!("unexpected error before the crash: {error}"));
        }
    }
    Ok(())
}

/// One seed: several cycles of open (recover), check, work, crash. Returns the number of
/// power cuts.
fn run(policy: FsyncPolicy, seed: u64) -> Result<u64, String> {
    let mut rng = SplitMix::new(seed);
    let sim = SimStorage::new();
    let storage: Arc<dyn crate::storage::Storage> = Arc::new(sim.clone());
    let config = LogConfig {
        dir: Path::new("/data/log").to_path_buf(),
        // From a few records per segment to a few dozen: rolls and trims are frequent.
        segment_bytes: 64 + rng.below(512),
        fsync: policy,
    };
    let mut model = Model::default();
    let mut crashes = 0;
    for cycle in 0..=CYCLES {
        let last_cycle = cycle == CYCLES;
        // Sometimes the power goes off during recovery itself.
        let crash_in_recovery = !last_cycle && rng.below(5) == 0;
        if crash_in_recovery {
            sim.crash_after(1 + rng.below(6));
        }
        let (mut log, _) = match Log::open_in(config.clone(), Arc::clone(&storage)) {
            Ok(opened) => opened,
            Err(_) if sim.crashed() => {
                crashes += 1;
                sim.restart(torn(&mut rng));
                continue;
            }
            Err(error) => return Err(format!("cycle {cycle}: recovery failed: {error}")),
        };
        check_recovered(&log, &mut model).map_err(|e| format!("cycle {cycle}: {e}"))?;
        if last_cycle {
            break;
        }
        if !crash_in_recovery || !sim.crashed() {
            sim.crash_after(1 + rng.below(150));
        }
        workload(&mut log, &mut model, &mut rng, &sim)
            .map_err(|e| format!("cycle {cycle}: {e}"))?;
        drop(log);
        crashes += u64::from(sim.crashed());
        sim.restart(torn(&mut rng));
    }
    Ok(crashes)
}

/// Half the crashes keep a random prefix of unsynced appends (a write that partly reached the
/// disk), half keep exactly what was synced.
fn torn(rng: &mut SplitMix) -> Option<u64> {
    (rng.below(2) == 0).then(|| rng.next())
}

fn run_seeds(policy: FsyncPolicy) {
    let seeds = env_u64("HITCOUNTER_POWER_LOSS_SEEDS", 100);
    let first = env_u64("HITCOUNTER_POWER_LOSS_SEED", 0);
    let mut failures = Vec::new();
    let mut crashes = 0;
    for seed in first..first + seeds {
        match run(policy, seed) {
            Ok(cut) => crashes += cut,
            Err(failure) => failures.push(format!("seed {seed}: {failure}")),
        }
    }
    println!(
        "{policy:?}: seeds {first}..{}, {crashes} power cuts",
        first + seeds
    );
    assert!(
        failures.is_empty(),
        "{} of {seeds} seeds failed under {policy:?} (replay one with HITCOUNTER_POWER_LOSS_SEED=<seed> HITCOUNTER_POWER_LOSS_SEEDS=1):\n{}",
        failures.len(),
        failures.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn power_loss_under_fsync_always() {
    run_seeds(FsyncPolicy::Always);
}

#[test]
fn power_loss_under_fsync_interval() {
    // The interval never passes during a run: only the timer's `sync_now` fsyncs, as when the
    // machine dies within an interval.
    run_seeds(FsyncPolicy::Interval(Duration::from_secs(3600)));
}

#[test]
fn power_loss_under_fsync_never() {
    run_seeds(FsyncPolicy::Never);
}
