//! Ingest's data directory: what survives a restart.
//!
//! ```text
//! <data-dir>/producer-id    the log's id towards the aggregators (random, made with the log)
//! <data-dir>/shards         the shard count the log was written for
//! <data-dir>/log/           the ingest log: one record per flush (see hitcounter-wal)
//! <data-dir>/ledger/        the batch-id ledger log
//! ```
//!
//! The producer id names the log, not the data directory: the aggregators deduplicate by
//! (producer id, seq), and a fresh log numbers its records from 1 again. A log that has never held
//! a record therefore always gets a new random id, so moving `log/` away (the re-shard procedure)
//! can never make an aggregator take the new log's seqs for ones it applied from the old log.
//!
//! Start-up writes nothing unless something changed (the shard count, a new log's producer id,
//! batch ids the ledger lacks after a crash between a flush's two appends), so ingest starts on
//! a full disk and can then trim; leftover `*.tmp` files of an interrupted rewrite are removed.
//!
//! Opening it recovers both logs (checksums, torn tails cut), restores the batch ids still
//! inside the dedup horizon, and reports what will be replayed to the aggregators. Batch ids
//! are read from the ledger and from the ingest log's records (which carry them atomically with
//! the hits); ids found only in the ingest log (a crash came between the two appends) are
//! written to the ledger again, so they outlive the ingest log's trimming.

use std::{
    collections::VecDeque,
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use hitcounter_proto::ingest::v1::LoggedFlush;
use hitcounter_wal::{
    storage::{OpenMode, OsStorage, Storage},
    FsyncPolicy, Log, LogConfig,
};
use prost::Message;

use crate::{error::IngestError, ledger::BatchLedger, stages::log::Logs};

#[cfg(test)]
mod tests;

/// What opening the data directory produced.
pub(crate) struct Opened {
    /// The data directory's lock, held for the life of the process (none in the power-loss
    /// simulation, whose files are not on a real file system).
    pub(crate) lock: Option<std::fs::File>,
    pub(crate) producer_id: u64,
    pub(crate) logs: Logs,
    /// Ledger records inside the horizon: (seq, when recorded on the monotonic clock), oldest
    /// first.
    pub(crate) ledger_times: VecDeque<(u64, Instant)>,
}

fn failed(path: &Path) -> impl FnOnce(std::io::Error) -> IngestError + '_ {
    move |e| IngestError::Startup(format!("{}: {e}", path.display()))
}

/// Writes `content` to `path` atomically and durably: a temporary file, fsynced, renamed over
/// `path`, and the directory fsynced.
fn write_durably(storage: &dyn Storage, path: &Path, content: &str) -> Result<(), IngestError> {
    let tmp = path.with_extension("tmp");
    let mut file = storage
        .open(&tmp, OpenMode::CreateTruncate)
        .map_err(failed(&tmp))?;
    file.write_all(content.as_bytes()).map_err(failed(&tmp))?;
    file.sync_all().map_err(failed(&tmp))?;
    storage.rename(&tmp, path).map_err(failed(path))?;
    if let Some(dir) = path.parent() {
        storage.sync_dir(dir).map_err(failed(dir))?;
    }
    Ok(())
}

fn read_number(storage: &dyn Storage, path: &Path) -> Result<Option<u64>, IngestError> {
    match storage.read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes)
            .trim()
            .parse()
            .map(Some)
            .map_err(|e| IngestError::Startup(format!("{} is not a number: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(failed(path)(e)),
    }
}

/// The producer id for the log `main`: the recorded one if the log ever held a record, else a
/// new random one (written durably before any record can be sent under it).
fn producer_identity(storage: &dyn Storage, dir: &Path, main: &Log) -> Result<u64, IngestError> {
    let id_path = dir.join("producer-id");
    // A log that never held a record (new, or the old one moved away) must not inherit the
    // recorded id: an aggregator may hold "applied through N" for it and would swallow this
    // log's seqs 1..=N as resends.
    let recorded = if main.next_seq() > 1 {
        read_number(storage, &id_path)?
    } else {
        None
    };
    if let Some(id) = recorded {
        return Ok(id);
    }
    let id: u64 = rand::random();
    if main.next_seq() > 1 {
        // Records but no id: they go out under a new one, and each batch tells the aggregators
        // which seqs the log no longer holds.
        tracing::warn!(
            file = %id_path.display(),
            producer_id = id,
            "the ingest log has records but no producer id was recorded: using a new one"
        );
    }
    write_durably(storage, &id_path, &format!("{id}\n"))?;
    Ok(id)
}

/// Opens (creating) the data directory. Blocking: run it on a blocking thread.
pub(crate) fn open(
    dir: &Path,
    shards: usize,
    fsync: FsyncPolicy,
    segment_bytes: u64,
    ledger: &BatchLedger,
    horizon: Duration,
) -> Result<Opened, IngestError> {
    let storage: Arc<dyn Storage> = Arc::new(OsStorage);
    // Each new directory's own entry is made durable (an OS crash soon after the first start
    // must not lose the data directory), before the lock file goes into it.
    storage.create_dir_all_durably(dir).map_err(failed(dir))?;
    let lock = hitcounter_telemetry::lock_data_dir(dir).map_err(IngestError::Startup)?;
    let mut opened = open_in(storage, dir, shards, fsync, segment_bytes, ledger, horizon)?;
    opened.lock = Some(lock);
    Ok(opened)
}

/// [`open`] with the files in `storage`, and no lock file (the power-loss simulation's files
/// are not on a real file system).
pub(crate) fn open_in(
    storage: Arc<dyn Storage>,
    dir: &Path,
    shards: usize,
    fsync: FsyncPolicy,
    segment_bytes: u64,
    ledger: &BatchLedger,
    horizon: Duration,
) -> Result<Opened, IngestError> {
    let started = std::time::Instant::now();
    storage.create_dir_all_durably(dir).map_err(failed(dir))?;

    let shards_path = dir.join("shards");
    let open_log = |path: PathBuf| {
        let config = LogConfig {
            dir: path.clone(),
            segment_bytes,
            fsync,
        };
        Log::open_in(config, Arc::clone(&storage))
            .map_err(|e| IngestError::Startup(format!("{}: {e}", path.display())))
    };
    let (mut main, recovery) = open_log(dir.join("log"))?;
    if let Some(cut) = &recovery.truncated {
        tracing::warn!(
            file = %cut.file.display(),
            offset = cut.offset,
            bytes = cut.bytes_dropped,
            reason = %cut.reason,
            "cut a torn write at the end of the ingest log"
        );
    }
    // A write of `producer-id` or `shards` cut short (a crash, a full disk) leaves its
    // temporary file; the real file is whole (it is replaced by a rename), so the leftover only
    // pins disk space: remove it.
    for name in ["producer-id", "shards"] {
        let tmp = dir.join(name).with_extension("tmp");
        match storage.remove_file(&tmp) {
            Ok(()) => tracing::info!(file = %tmp.display(), "removed a leftover temporary file"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(failed(&tmp)(e)),
        }
    }
    let producer_id = producer_identity(&*storage, dir, &main)?;
    let replay = main.next_seq() - main.first_seq();
    let recorded_shards = read_number(&*storage, &shards_path)?;
    if let Some(before) = recorded_shards {
        if before != shards as u64 && replay > 0 {
            // The records hold deltas already split for `before` shards; re-sharding them is not
            // supported, so refuse rather than send them to the wrong place.
            return Err(IngestError::Startup(format!(
                "{} holds undelivered batches for {before} shards but {shards} are configured: start with the old --aggregator list until the backlog drains, or move the directory away (losing it)",
                dir.display()
            )));
        }
    }
    // Written only when it changes: a start on a full disk must not need space (every start
    // used to rewrite it, so ingest could not start on a full disk, and so could not trim).
    if recorded_shards != Some(shards as u64) {
        write_durably(&*storage, &shards_path, &format!("{shards}\n"))?;
    }

    let (mut ledger_log, ledger_recovery) = open_log(dir.join("ledger"))?;
    if let Some(cut) = &ledger_recovery.truncated {
        tracing::warn!(file = %cut.file.display(), offset = cut.offset, "cut a torn write at the end of the ledger");
    }
    let startup = |e: hitcounter_wal::LogError| IngestError::Startup(e.to_string());
    let now_ms = crate::validate::now_ms();
    let mut ledger_times = VecDeque::new();
    let mut known = std::collections::HashSet::new();
    let mut restored = 0u64;
    let mut reader = ledger_log.reader(ledger_log.first_seq()).map_err(startup)?;
    let last = ledger_log.next_seq().saturating_sub(1);
    while let Some((seq, payload)) = reader.next(last).map_err(startup)? {
        let Some((at_ms, accepted, id)) = crate::stages::log::decode_ledger(&payload) else {
            return Err(IngestError::Startup(format!(
                "ledger record {seq} in {} is malformed",
                ledger_log.dir().display()
            )));
        };
        let age = Duration::from_millis(now_ms.saturating_sub(at_ms).max(0) as u64);
        if age < horizon {
            ledger.restore(&id, accepted, age);
            // Across a restart only the wall clock tells the age; from here on the monotonic
            // clock does, for the ledger and for trimming alike.
            let recorded = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
            ledger_times.push_back((seq, recorded));
            known.insert(id);
            restored += 1;
        }
    }
    // Ids in the ingest log that the ledger lacks.
    let mut missing = Vec::new();
    let mut reader = main.reader(main.first_seq()).map_err(startup)?;
    let last = main.next_seq().saturating_sub(1);
    while let Some((seq, payload)) = reader.next(last).map_err(startup)? {
        let flush = LoggedFlush::decode(payload.as_slice()).map_err(|e| {
            IngestError::Startup(format!("record {seq} in {}: {e}", main.dir().display()))
        })?;
        for id in flush.batch_ids {
            if !known.contains(&id.batch_id) {
                missing.push(crate::stages::log::encode_ledger(
                    flush.at_ms,
                    id.accepted,
                    &id.batch_id,
                ));
                let age = Duration::from_millis(now_ms.saturating_sub(flush.at_ms).max(0) as u64);
                ledger.restore(&id.batch_id, id.accepted, age);
                known.insert(id.batch_id);
                restored += 1;
            }
        }
    }
    if !missing.is_empty() {
        // Only after a crash between a flush's two appends. This one write at start-up needs
        // space: on a full disk it fails, naming the disk as the cause (starting without it
        // would let trimming lose these ids, and a retry of their batches would count twice).
        let records: Vec<&[u8]> = missing.iter().map(Vec::as_slice).collect();
        let seqs = ledger_log.append(&records).map_err(startup)?;
        ledger_log.sync_now().map_err(startup)?;
        let recorded = Instant::now();
        ledger_times.extend(seqs.map(|seq| (seq, recorded)));
        tracing::info!(ids = missing.len(), "batch ids re-recorded in the ledger");
    }
    main.sync_now().map_err(startup)?;

    let took = started.elapsed();
    metrics::gauge!("hitcounter_ingest_recovery_seconds").set(took.as_secs_f64());
    metrics::gauge!("hitcounter_ingest_recovered_batches").set(replay as f64);
    metrics::gauge!("hitcounter_ingest_recovered_batch_ids").set(restored as f64);
    tracing::info!(
        dir = %dir.display(),
        producer_id,
        batches_to_replay = replay,
        batch_ids = restored,
        seconds = took.as_secs_f64(),
        "ingest state recovered"
    );
    Ok(Opened {
        lock: None,
        producer_id,
        logs: Logs {
            main,
            ledger: ledger_log,
            key_limits: Arc::new(crate::stages::log::KeyLimits::new(shards)),
        },
        ledger_times,
    })
}
