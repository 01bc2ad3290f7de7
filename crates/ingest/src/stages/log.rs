//! The `log` stage: makes hits durable before they are acknowledged.
//!
//! Each flush from `combine` becomes ONE record in the ingest log, holding every shard's deltas
//! and the batch ids of the requests in it, so that a crash keeps all of a request or none of it
//! (with one record per shard, a crash between two appends would keep half a request that its
//! client, never acknowledged, then sends again). Then one sync under the `--fsync` policy, and
//! only then are the requests told their hits are durable: every request merged into a flush
//! shares its fsync, group commit without any extra waiting. The batch ids are also appended to
//! the ledger log, which outlives the trimming of the ingest log for the dedup horizon.
//!
//! Before writing, the stage checks the disk budget (`--max-buffer-bytes`, over all logs): a
//! flush that does not fit is refused whole, nothing of it is written, and its requests get
//! `RESOURCE_EXHAUSTED`. The budget fills when the aggregators do not take data (down, slow): the
//! forwarders keep the log until an aggregator reports a batch durable, and this stage trims
//! whole segments up to that point.
//!
//! A full disk is not fatal: a write the file system refuses for lack of space leaves nothing
//! of the flush in either log (the WAL cuts a partly written record off, and a flush whose
//! ledger append fails is taken back out of the main log), its requests get
//! `RESOURCE_EXHAUSTED` ("the disk holding the ingest log is full"), and the next flush tries
//! again: writing resumes by itself once trimming (as the aggregators checkpoint) or an operator
//! frees space. Counted in `hitcounter_ingest_log_disk_full_total`, logged at most once a
//! minute. Other I/O errors are fatal for the stage (the service then exits non-zero): after a
//! failed fsync the log cannot be trusted, and a restart re-reads it with checksums.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use hitcounter_pipeline::StageReceiver;
use hitcounter_proto::ingest::v1::{LoggedBatchId, LoggedFlush, ShardDeltas};
use hitcounter_wal::{Log, LogError, RECORD_HEADER_BYTES};
use prost::Message;
use tokio::sync::watch;

use super::{DurableError, Flush};
use crate::error::IngestError;

/// The logs of one ingest process: the ingest log (flushes), and the batch-id ledger.
pub(crate) struct Logs {
    pub(crate) main: Log,
    pub(crate) ledger: Log,
    /// Why shards' aggregators refuse batches at their key limit, shared with the forwarders
    /// (which take a handle at start): a full log then says so to the clients.
    pub(crate) key_limits: Arc<KeyLimits>,
}

/// Per shard: the aggregator's reason while it refuses this ingest's batches at its key limit.
#[derive(Debug, Default)]
pub(crate) struct KeyLimits {
    shards: Mutex<Vec<Option<String>>>,
    /// Per shard: when its refusal was last logged as an error (at most once a minute).
    logged: Mutex<Vec<Option<Instant>>>,
}

impl KeyLimits {
    /// Per-shard notes for `shards` shards, none set.
    pub(crate) fn new(shards: usize) -> Self {
        Self {
            shards: Mutex::new(vec![None; shards]),
            logged: Mutex::new(vec![None; shards]),
        }
    }

    /// Whether a refusal of `shard` should be logged now (once a minute at most): every
    /// forwarder retries its refused batches every second.
    pub(crate) fn should_log(&self, shard: usize) -> bool {
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        let Some(slot) = logged.get_mut(shard) else {
            return false;
        };
        if slot.is_some_and(|at| at.elapsed() < Duration::from_secs(60)) {
            return false;
        }
        *slot = Some(Instant::now());
        true
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Option<String>>> {
        // Only whole slots are replaced under it: a poisoned vector is still right.
        self.shards.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets (`Some`) or clears (`None`) the note of `shard`.
    pub(crate) fn set(&self, shard: usize, why: Option<String>) {
        if let Some(slot) = self.lock().get_mut(shard) {
            *slot = why;
        }
    }

    /// "aggregator key limit reached on shard N: …" for the first shard refusing, if any.
    pub(crate) fn describe(&self) -> Option<String> {
        self.lock().iter().enumerate().find_map(|(shard, why)| {
            why.as_ref()
                .map(|why| format!("aggregator key limit reached on shard {shard}: {why}"))
        })
    }
}

/// The logs, shared by the log stage (the only writer) and the forwarders (which open readers).
pub(crate) type SharedLogs = Arc<Mutex<Logs>>;

/// Locks the logs. A panic while holding the lock poisons it; the logs are then still consistent
/// on disk (every write is checksummed), so carrying on is safe.
pub(crate) fn lock(logs: &SharedLogs) -> MutexGuard<'_, Logs> {
    logs.lock().unwrap_or_else(|e| e.into_inner())
}

/// Encodes one ledger record: when, how many hits, the id.
pub(crate) fn encode_ledger(at_ms: i64, accepted: u64, id: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + id.len());
    out.extend_from_slice(&at_ms.to_le_bytes());
    out.extend_from_slice(&accepted.to_le_bytes());
    out.extend_from_slice(id.as_bytes());
    out
}

/// Decodes a ledger record; `None` if it is malformed.
pub(crate) fn decode_ledger(payload: &[u8]) -> Option<(i64, u64, String)> {
    let at = i64::from_le_bytes(payload.get(0..8)?.try_into().ok()?);
    let accepted = u64::from_le_bytes(payload.get(8..16)?.try_into().ok()?);
    let id = std::str::from_utf8(payload.get(16..)?).ok()?.to_owned();
    Some((at, accepted, id))
}

/// The wall clock, in Unix milliseconds, stamped on ledger records: the only clock that survives
/// a restart, so it only serves to restore ids at start-up; expiry while running follows the
/// monotonic clock. Tests can step it.
fn wall_ms() -> i64 {
    #[cfg(test)]
    let offset = tests::WALL_OFFSET_MS.with(std::cell::Cell::get);
    #[cfg(not(test))]
    let offset = 0;
    crate::validate::now_ms() + offset
}

/// The log stage's state.
pub(crate) struct LogStage {
    pub(crate) logs: SharedLogs,
    /// Bytes all logs may hold.
    pub(crate) budget: u64,
    /// The last seq on disk (`Log::durable_seq`); forwarders send only up to it, so a seq can
    /// never be handed out twice, even after an OS crash that loses an unsynced tail.
    pub(crate) written: watch::Sender<u64>,
    /// With `--fsync never`, the background sync that lets forwarding proceed.
    pub(crate) background_sync: Option<Duration>,
    /// Per shard: the last seq that shard's aggregator holds durably; the log is trimmed up to
    /// the lowest of them.
    pub(crate) durable: Vec<watch::Receiver<u64>>,
    /// Ledger records still inside the dedup horizon: (seq, when recorded), oldest first. The
    /// monotonic clock, as in the in-memory ledger: the log must keep every id the ledger still
    /// honours, whatever the wall clock does meanwhile.
    pub(crate) ledger_times: VecDeque<(u64, Instant)>,
    /// How long batch ids are remembered.
    pub(crate) horizon: Duration,
    /// When the background sync last ran.
    pub(crate) last_background_sync: Mutex<Instant>,
    /// When a full disk was last logged (at most once a minute).
    pub(crate) disk_full_logged: Mutex<Option<Instant>>,
}

impl LogStage {
    /// Runs until `combine` closes the flush channel, then syncs everything and returns.
    pub(crate) async fn run(self, flushes: StageReceiver<Flush>) -> Result<(), IngestError> {
        let stage = Arc::new(self);
        let mut housekeeping = tokio::time::interval(Duration::from_millis(100));
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let bytes_gauge = metrics::gauge!("hitcounter_ingest_log_bytes");
        let budget_gauge = metrics::gauge!("hitcounter_ingest_log_budget_bytes");
        budget_gauge.set(stage.budget as f64);
        let mut ledger_times = stage.ledger_times.clone();
        loop {
            tokio::select! {
                flush = flushes.recv() => {
                    let Some(flush) = flush else { break };
                    let this = Arc::clone(&stage);
                    let (written, times) = tokio::task::spawn_blocking(move || this.write(flush))
                        .await
                        .map_err(|e| IngestError::Log(e.to_string()))??;
                    if let Some(seq) = written {
                        stage.written.send_replace(seq);
                    }
                    ledger_times.extend(times);
                }
                _ = housekeeping.tick() => {
                    let this = Arc::clone(&stage);
                    let times = std::mem::take(&mut ledger_times);
                    let (used, times, on_disk) = tokio::task::spawn_blocking(move || this.housekeep(times))
                        .await
                        .map_err(|e| IngestError::Log(e.to_string()))??;
                    ledger_times = times;
                    bytes_gauge.set(used as f64);
                    stage.written.send_if_modified(|current| {
                        let newer = on_disk > *current;
                        if newer {
                            *current = on_disk;
                        }
                        newer
                    });
                }
            }
        }
        let this = Arc::clone(&stage);
        let on_disk = tokio::task::spawn_blocking(move || {
            let mut logs = lock(&this.logs);
            logs.main.sync_now()?;
            logs.ledger.sync_now()?;
            Ok::<_, LogError>(logs.main.durable_seq())
        })
        .await
        .map_err(|e| IngestError::Log(e.to_string()))?
        .map_err(|e| IngestError::Log(e.to_string()))?;
        // Under `--fsync interval/never` the last records became durable just now: let the
        // forwarders deliver them during the drain.
        stage.written.send_replace(on_disk);
        tracing::debug!("log stage drained");
        Ok(())
    }

    /// Writes one flush. Returns the new last seq on disk (if anything was written) and the
    /// ledger records written. Blocking.
    #[allow(clippy::type_complexity)]
    pub(crate) fn write(
        &self,
        flush: Flush,
    ) -> Result<(Option<u64>, Vec<(u64, Instant)>), IngestError> {
        let Flush {
            shards,
            waiters,
            batch_ids,
            apart,
        } = flush;
        // Only clustered mode keeps requests apart (combine is told so); here the ledger alone
        // judges batch ids.
        debug_assert!(apart.is_empty(), "the local log got requests kept apart");
        let now_ms = wall_ms();
        let record = LoggedFlush {
            shards: shards
                .into_iter()
                .map(|deltas| ShardDeltas { deltas })
                .collect(),
            batch_ids: batch_ids
                .iter()
                .map(|claimed| LoggedBatchId {
                    batch_id: claimed.guard.id().to_owned(),
                    accepted: claimed.accepted,
                })
                .collect(),
            at_ms: now_ms,
        }
        .encode_to_vec();
        let ledger: Vec<Vec<u8>> = batch_ids
            .iter()
            .map(|claimed| encode_ledger(now_ms, claimed.accepted, claimed.guard.id()))
            .collect();
        let adding: u64 = std::iter::once(record.len())
            .chain(ledger.iter().map(Vec::len))
            .map(|n| (n + RECORD_HEADER_BYTES) as u64)
            .sum();

        let mut logs = lock(&self.logs);
        let used = logs.main.size_bytes() + logs.ledger.size_bytes();
        if used + adding > self.budget {
            let error = match logs.key_limits.describe() {
                Some(why) => DurableError::KeyLimit(why),
                None => DurableError::Full {
                    used,
                    budget: self.budget,
                },
            };
            metrics::counter!("hitcounter_ingest_log_full_total").increment(1);
            for waiter in waiters {
                let _ = waiter.send(Err(error.clone()));
            }
            return Ok((None, Vec::new()));
        }
        let result = (|| -> Result<_, LogError> {
            // Both appends before either sync: if the ledger's fails for lack of space, the
            // flush's record is taken back out of the main log (not synced yet, so nothing has
            // read it), and the flush is refused whole, in neither log.
            let appended = logs.main.append(&[record.as_slice()])?;
            let mut seqs = None;
            if !ledger.is_empty() {
                let records: Vec<&[u8]> = ledger.iter().map(Vec::as_slice).collect();
                match logs.ledger.append(&records) {
                    Ok(appended) => seqs = Some(appended),
                    Err(full @ LogError::NoSpace { .. }) => {
                        logs.main.undo_append(appended)?;
                        return Err(full);
                    }
                    Err(error) => return Err(error),
                }
            }
            logs.main.sync()?;
            let mut times = Vec::with_capacity(ledger.len());
            if let Some(seqs) = seqs {
                logs.ledger.sync()?;
                let recorded = Instant::now();
                times.extend(seqs.map(|seq| (seq, recorded)));
            }
            Ok((Some(logs.main.durable_seq()), times))
        })();
        match result {
            Ok(done) => {
                metrics::counter!("hitcounter_ingest_log_bytes_written_total").increment(adding);
                // The ids are durable with the hits: a retry is a duplicate from now on, whether
                // or not the original caller is still there to hear its answer.
                for claimed in batch_ids {
                    claimed.guard.complete(claimed.accepted);
                }
                for waiter in waiters {
                    let _ = waiter.send(Ok(()));
                }
                Ok(done)
            }
            Err(error @ LogError::NoSpace { .. }) => {
                // Nothing of the flush is in either log, and the logs stay usable: refuse these
                // requests and go on; writes succeed again once the forwarders' progress lets
                // the log trim, or an operator frees space.
                metrics::counter!("hitcounter_ingest_log_disk_full_total").increment(1);
                let first = {
                    let mut at = self
                        .disk_full_logged
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    let due = at.is_none_or(|at: Instant| at.elapsed() >= Duration::from_secs(60));
                    if due {
                        *at = Some(Instant::now());
                    }
                    due
                };
                if first {
                    tracing::error!(
                        %error,
                        "the disk holding the ingest log is full: refusing writes with \
                         RESOURCE_EXHAUSTED until space is freed (the log trims as the \
                         aggregators checkpoint; logged at most once a minute)"
                    );
                }
                let failure = DurableError::DiskFull(error.to_string());
                for waiter in waiters {
                    let _ = waiter.send(Err(failure.clone()));
                }
                Ok((None, Vec::new()))
            }
            Err(error) => {
                let failure = DurableError::Io(error.to_string());
                for waiter in waiters {
                    let _ = waiter.send(Err(failure.clone()));
                }
                Err(IngestError::Log(error.to_string()))
            }
        }
    }

    /// Periodic work: sync (for `--fsync interval`), trim what the aggregators hold durably and
    /// ledger records past the horizon. Returns the bytes held. Blocking.
    #[allow(clippy::type_complexity)]
    pub(crate) fn housekeep(
        &self,
        mut ledger_times: VecDeque<(u64, Instant)>,
    ) -> Result<(u64, VecDeque<(u64, Instant)>, u64), IngestError> {
        let mut logs = lock(&self.logs);
        let fail = |e: LogError| IngestError::Log(e.to_string());
        let background = self.background_sync.is_some_and(|every| {
            let mut last = self
                .last_background_sync
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let due = last.elapsed() >= every;
            if due {
                *last = std::time::Instant::now();
            }
            due
        });
        if background {
            logs.main.sync_now().map_err(fail)?;
        } else {
            logs.main.sync().map_err(fail)?;
        }
        let on_disk = logs.main.durable_seq();
        // Every shard's aggregator must hold a flush before it can go.
        let durable = self.durable.iter().map(|d| *d.borrow()).min().unwrap_or(0);
        if durable >= logs.main.first_seq() {
            if logs.main.can_trim(durable) {
                // Once trimmed, a record's batch ids live only in the ledger, which under
                // `--fsync interval/never` may not be on disk yet: an OS crash would then forget
                // them and count a retry twice (found by the power-loss simulation).
                logs.ledger.sync_now().map_err(fail)?;
            }
            let freed = logs.main.trim(durable).map_err(fail)?;
            if freed > 0 {
                tracing::debug!(durable, freed, "log trimmed");
            }
        }
        logs.ledger.sync().map_err(fail)?;
        let mut expired = None;
        while let Some(&(seq, recorded)) = ledger_times.front() {
            if recorded.elapsed() < self.horizon {
                break;
            }
            expired = Some(seq);
            ledger_times.pop_front();
        }
        if let Some(seq) = expired {
            logs.ledger.trim(seq).map_err(fail)?;
        }
        let used = logs.main.size_bytes() + logs.ledger.size_bytes();
        Ok((used, ledger_times, on_disk))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        ledger::{BatchLedger, Claim},
        stages::Claimed,
    };
    use hitcounter_wal::LogConfig;

    thread_local! {
        /// Added to the wall clock of [`wall_ms`] on this thread: a clock step.
        pub(super) static WALL_OFFSET_MS: std::cell::Cell<i64> = const { std::cell::Cell::new(0) };
    }

    fn stage(dir: &std::path::Path, horizon: Duration) -> LogStage {
        let open = |name: &str| {
            Log::open(LogConfig {
                // One record per segment, so that trimming can drop single records.
                segment_bytes: 1,
                ..LogConfig::new(dir.join(name))
            })
            .unwrap()
            .0
        };
        LogStage {
            logs: Arc::new(Mutex::new(Logs {
                main: open("log"),
                ledger: open("ledger"),
                key_limits: Arc::new(KeyLimits::new(1)),
            })),
            budget: 1 << 30,
            written: watch::channel(0).0,
            background_sync: None,
            durable: Vec::new(),
            ledger_times: VecDeque::new(),
            horizon,
            last_background_sync: Mutex::new(std::time::Instant::now()),
            disk_full_logged: Mutex::new(None),
        }
    }

    async fn flush_with_id(ledger: &Arc<BatchLedger>, id: &str) -> Flush {
        let Ok(Claim::New(guard)) = ledger.claim(id).await else {
            panic!("{id} is not new")
        };
        Flush {
            shards: vec![Vec::new()],
            waiters: Vec::new(),
            batch_ids: vec![Claimed { guard, accepted: 1 }],
            apart: Vec::new(),
        }
    }

    /// Issue 12, finding 5: the in-memory ledger expires ids by the monotonic clock; the ledger
    /// log was trimmed by the wall clock, so a wall clock stepped forward deleted from disk ids
    /// the process still honoured, and a restart then forgot them.
    #[tokio::test]
    async fn a_wall_clock_step_forward_keeps_the_batch_ids_the_ledger_honours() {
        let dir = tempfile::tempdir().unwrap();
        let horizon = Duration::from_secs(600);
        let ledger = BatchLedger::new(horizon, 10);
        let stage = stage(dir.path(), horizon);
        let mut times = VecDeque::new();
        for id in ["first", "second"] {
            let (_, written) = stage.write(flush_with_id(&ledger, id).await).unwrap();
            times.extend(written);
        }
        WALL_OFFSET_MS.with(|offset| offset.set(3_600_000));
        let (_, times, _) = stage.housekeep(times).unwrap();
        WALL_OFFSET_MS.with(|offset| offset.set(0));
        assert!(matches!(
            ledger.claim("first").await,
            Ok(Claim::Duplicate(1))
        ));
        assert_eq!(times.len(), 2, "both ids are still inside the horizon");
        assert_eq!(
            lock(&stage.logs).ledger.first_seq(),
            1,
            "the ledger log still holds the first id"
        );
    }

    #[test]
    fn ledger_records_round_trip() {
        let record = encode_ledger(1_700_000_000_123, 42, "batch-é");
        assert_eq!(
            decode_ledger(&record),
            Some((1_700_000_000_123, 42, "batch-é".to_owned()))
        );
        assert_eq!(decode_ledger(&record[..10]), None);
    }
}
