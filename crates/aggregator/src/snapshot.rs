//! The `snapshot` stage: writes a checkpoint every interval, and a last one at shutdown.
//!
//! The copy is taken under the apply gate (applies wait a moment; reads do not: the copy reads
//! each owner's store under its read lock, on a thread of its own), and that thread then goes on
//! with the rest (encoding, writing, fsync). Only after the file is durable are the producers
//! told, through `durable_through` in their acks, that they may trim.
//!
//! That thread runs at a low CPU priority (nice 10): encoding rewrites the whole state, tens of
//! milliseconds of CPU per million counters, and at normal priority it took the CPU from the
//! threads answering queries (measured: `GetHits` p99 1.2 ms without checkpoints, 1.95 ms with
//! one every 10 s, on 2 cores under ingest load). Niced, it uses idle CPU first and still gets
//! a share (about a tenth) when the machine is busy, so checkpoints keep completing.

use std::{path::PathBuf, sync::Arc, time::Duration};

use hitcounter_telemetry::CancellationToken;

use crate::{applier::Applier, checkpoint, dedup::Progress, error::AggregatorError};

/// Runs until `stop` is cancelled, then takes a last checkpoint and returns.
pub(crate) async fn run(
    applier: Arc<Applier>,
    dir: PathBuf,
    interval: Duration,
    stop: CancellationToken,
) -> Result<(), AggregatorError> {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    let skipped = metrics::counter!("hitcounter_aggregator_checkpoints_skipped_total");
    let mut written: Option<Marks> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticks.tick() => {}
        }
        // Nothing applied since the last checkpoint: the file on disk already holds this state
        // (up to evictions, which replay redoes), so an idle aggregator writes nothing.
        if written
            .as_ref()
            .is_some_and(|marks| *marks == current_marks(&applier))
        {
            skipped.increment(1);
            continue;
        }
        // A failed checkpoint is logged and retried at the next tick: nothing is trimmed in the
        // meantime, so nothing is lost, only more is replayed after a crash.
        match take(&applier, &dir).await {
            Ok(marks) => written = Some(marks),
            Err(error) => {
                metrics::counter!("hitcounter_aggregator_checkpoint_failures_total").increment(1);
                tracing::error!(%error, "checkpoint failed");
            }
        }
    }
    take(&applier, &dir).await.map(drop)
}

/// What a checkpoint holds of the progress: every producer's applied-through mark, and
/// (clustered mode) every partition's position. Equal marks mean nothing was applied between.
type Marks = (Vec<(u64, u64)>, Vec<(u32, u64)>);

fn current_marks(applier: &Applier) -> Marks {
    (
        progress_marks(&applier.applied.snapshot()),
        positions_of(applier),
    )
}

fn positions_of(applier: &Applier) -> Vec<(u32, u64)> {
    applier
        .lock_positions()
        .iter()
        .map(|(p, position)| (*p, *position))
        .collect()
}

/// Every producer's applied-through mark, sorted: equal marks mean nothing was applied between.
fn progress_marks(producers: &[(u64, Progress)]) -> Vec<(u64, u64)> {
    let mut marks: Vec<(u64, u64)> = producers
        .iter()
        .map(|(producer, progress)| (*producer, progress.through))
        .collect();
    marks.sort_unstable();
    marks
}

/// Writes one checkpoint; returns the progress marks it holds.
async fn take(applier: &Applier, dir: &std::path::Path) -> Result<Marks, AggregatorError> {
    let started = std::time::Instant::now();
    let exclusive = applier.gate.write().await;
    let producers = applier.applied.snapshot();
    let throughs = progress_marks(&producers);
    let positions = positions_of(applier);
    let marks = (throughs.clone(), positions.clone());
    let owners = applier.owners.clone();
    let dir = dir.to_owned();
    let (copied, copy_done) = tokio::sync::oneshot::channel();
    let (done, written) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("checkpoint".into())
        .spawn(move || {
            // The copy, at normal priority: applies wait for it (reads do not).
            let stores = owners.snapshot();
            let _ = copied.send(());
            lower_priority();
            let state = checkpoint::State {
                taken_at_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or(0),
                producers,
                positions,
                stores,
            };
            let _ = done.send(checkpoint::write(&dir, &state));
        })
        .map_err(|e| AggregatorError::Checkpoint(format!("cannot start a thread: {e}")))?;
    let copied = copy_done.await;
    drop(exclusive);
    copied.map_err(|_| AggregatorError::Checkpoint("the checkpoint copy panicked".into()))?;
    let paused = started.elapsed();
    let bytes = written
        .await
        .map_err(|_| AggregatorError::Checkpoint("the checkpoint thread panicked".into()))?
        .map_err(|e| AggregatorError::Checkpoint(e.to_string()))?;
    {
        let mut durable = applier.durable.lock().unwrap_or_else(|e| e.into_inner());
        for &(producer, through) in &throughs {
            durable.insert(producer, through);
        }
    }
    let took = started.elapsed();
    metrics::histogram!("hitcounter_aggregator_checkpoint_duration_seconds")
        .record(took.as_secs_f64());
    metrics::histogram!("hitcounter_aggregator_checkpoint_pause_seconds")
        .record(paused.as_secs_f64());
    metrics::gauge!("hitcounter_aggregator_checkpoint_bytes").set(bytes as f64);
    tracing::debug!(
        bytes,
        seconds = took.as_secs_f64(),
        pause = paused.as_secs_f64(),
        "checkpoint written"
    );
    Ok(marks)
}

/// The checkpoint thread's priority on thread-priority's 0..=99 scale, which it maps to nice
/// values 39 × (1 - p / 99) - 20, truncated, for normal threads: 22 is nice 10 (tested).
const CHECKPOINT_PRIORITY: u8 = 22;
/// The nice value [`CHECKPOINT_PRIORITY`] stands for.
const CHECKPOINT_NICE: i64 = 10;

/// Lowers the calling thread's CPU priority to nice 10; best effort (a system that refuses
/// leaves it at normal priority, which is only harder on queries). Only ever lowers: a thread
/// already at nice 10 or lower priority (a process started under `nice`) keeps its niceness,
/// since setting 10 would raise its priority above the rest of the process (or fail without
/// the privilege to).
fn lower_priority() {
    use thread_priority::{set_current_thread_priority, ThreadPriority, ThreadPriorityValue};
    if current_nice().is_some_and(|nice| nice >= CHECKPOINT_NICE) {
        return;
    }
    let Ok(value) = ThreadPriorityValue::try_from(CHECKPOINT_PRIORITY) else {
        return;
    };
    if let Err(error) = set_current_thread_priority(ThreadPriority::Crossplatform(value)) {
        tracing::debug!(?error, "could not lower the checkpoint thread's priority");
    }
}

/// The nice value of the calling thread, from `/proc/thread-self/stat` (field 19); `None` where
/// that file cannot be read or parsed.
fn current_nice() -> Option<i64> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let after_name = stat.get(stat.rfind(')')? + 2..)?;
    after_name.split(' ').nth(16)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::{current_nice, CHECKPOINT_NICE};

    /// Holds whatever niceness the test runner has (issue 11: a runner started under `nice`).
    #[test]
    fn the_checkpoint_thread_runs_at_nice_10_or_lower_priority() {
        let before = current_nice().unwrap();
        let nice = std::thread::spawn(|| {
            super::lower_priority();
            current_nice().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(nice, before.max(CHECKPOINT_NICE), "runner at nice {before}");
        // Only that thread: the test's own thread is untouched.
        assert_eq!(current_nice().unwrap(), before);
    }
}
