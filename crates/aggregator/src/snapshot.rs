//! The `snapshot` stage: writes a checkpoint every interval, and a last one at shutdown.
//!
//! The copy is taken under the apply gate (applies wait a moment; reads do not), everything else
//! (encoding, writing, fsync) happens on a blocking thread from the copy. Only after the file is
//! durable are the producers told, through `durable_through` in their acks, that they may trim.

use std::{path::PathBuf, sync::Arc, time::Duration};

use hitcounter_telemetry::CancellationToken;

use crate::{checkpoint, error::AggregatorError, grpc::Applier};

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
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticks.tick() => {}
        }
        // A failed checkpoint is logged and retried at the next tick: nothing is trimmed in the
        // meantime, so nothing is lost, only more is replayed after a crash.
        if let Err(error) = take(&applier, &dir).await {
            metrics::counter!("hitcounter_aggregator_checkpoint_failures_total").increment(1);
            tracing::error!(%error, "checkpoint failed");
        }
    }
    take(&applier, &dir).await
}

async fn take(applier: &Applier, dir: &std::path::Path) -> Result<(), AggregatorError> {
    let started = std::time::Instant::now();
    let (producers, stores) = {
        let _exclusive = applier.gate.write().await;
        let producers = applier.applied.snapshot();
        let stores = applier.owners.snapshot().await?;
        (producers, stores)
    };
    let paused = started.elapsed();
    let throughs: Vec<(u64, u64)> = producers
        .iter()
        .map(|(p, progress)| (*p, progress.through))
        .collect();
    let state = checkpoint::State {
        taken_at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0),
        producers,
        stores,
    };
    let dir = dir.to_owned();
    let bytes = tokio::task::spawn_blocking(move || checkpoint::write(&dir, &state))
        .await
        .map_err(|e| AggregatorError::Checkpoint(e.to_string()))?
        .map_err(|e| AggregatorError::Checkpoint(e.to_string()))?;
    {
        let mut durable = applier.durable.lock().unwrap_or_else(|e| e.into_inner());
        for (producer, through) in throughs {
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
    Ok(())
}
