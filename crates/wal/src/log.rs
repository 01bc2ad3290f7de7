//! The writer side: opening with recovery, appending, syncing, rolling and trimming segments.

use std::collections::VecDeque;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::codec::{encode_record, DecodeError, MAX_RECORD_BYTES, RECORD_HEADER_BYTES};
use crate::error::LogError;
use crate::reader::LogReader;
use crate::segment::{
    find_valid_record_after, list_segments, segment_file_name, SegmentCursor, Step,
};
use crate::storage::{OpenMode, OsStorage, Storage, StorageFile};

/// Default [`LogConfig::segment_bytes`]: 64 MiB.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// Above this capacity the append scratch buffer is released after use, so one huge batch does
/// not pin its memory for the life of the log.
const SCRATCH_KEEP_BYTES: usize = 4 * 1024 * 1024;

/// When [`Log::sync`] makes appended records durable. See the crate documentation for the risk
/// each one takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsyncPolicy {
    /// `fdatasync` on every [`Log::sync`] call that follows an append: a record is durable when
    /// `sync` returns.
    #[default]
    Always,
    /// `fdatasync` only when at least this long has passed since the last one: records appended
    /// since then can be lost if the machine (not just the process) crashes.
    Interval(Duration),
    /// Never `fdatasync` appended records (segments are still synced once when sealed): an OS
    /// crash or power loss can lose any record still in the page cache.
    Never,
}

/// Where and how a [`Log`] keeps its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// The directory holding the segment files; created if missing. One log per directory,
    /// and one writer per log.
    pub dir: PathBuf,
    /// A batch is appended to a new segment if it would make the current one larger than this
    /// (an empty segment always takes the batch, so one batch bigger than this gets a segment
    /// of its own). Trimming frees disk space in whole segments, so this is also its unit.
    pub segment_bytes: u64,
    /// When appended records are made durable.
    pub fsync: FsyncPolicy,
}

impl LogConfig {
    /// A config for `dir` with [`DEFAULT_SEGMENT_BYTES`] and [`FsyncPolicy::Always`].
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            fsync: FsyncPolicy::Always,
        }
    }
}

/// What [`Log::open`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Segment files in the log after recovery (including a freshly created first one).
    pub segments: usize,
    /// Records found (and checksummed) in them.
    pub records: u64,
    /// The seq the next appended record gets.
    pub next_seq: u64,
    /// The torn tail cut off the last segment, if there was one.
    pub truncated: Option<Truncation>,
}

/// A torn tail that recovery cut off the last segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncation {
    /// The segment file.
    pub file: PathBuf,
    /// The offset it was truncated at (the end of the last good record).
    pub offset: u64,
    /// Bytes removed.
    pub bytes_dropped: u64,
    /// Why the bytes after `offset` were not a record.
    pub reason: String,
}

/// Metadata of one segment file.
#[derive(Debug, Clone)]
pub(crate) struct Segment {
    pub(crate) first_seq: u64,
    pub(crate) path: PathBuf,
    pub(crate) bytes: u64,
}

/// Set once when the log becomes unusable; shared with readers so they stop too.
pub(crate) type Poison = Arc<OnceLock<String>>;

/// A segmented append-only log of sequence-numbered records in one directory, with one writer.
///
/// All methods do blocking file I/O: call them from a dedicated thread or `spawn_blocking`.
/// `Log` is `Send` and `Sync`, but mutation takes `&mut self`: share it behind a mutex or, better,
/// own it in one writer task that gathers concurrent batches, appends them and calls
/// [`Log::sync`] once for all of them (group commit).
#[derive(Debug)]
pub struct Log {
    /// Where the files live: the real file system, or a simulation in tests.
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    segment_bytes: u64,
    fsync: FsyncPolicy,
    /// Sealed segments, oldest first; never written again.
    sealed: VecDeque<Segment>,
    /// The segment being appended to (always exists, possibly empty).
    active: Segment,
    active_file: Box<dyn StorageFile>,
    next_seq: u64,
    /// Highest seq covered by a completed fsync (0 if none).
    durable_seq: u64,
    /// Appended bytes of the active segment not yet fsynced.
    data_dirty: bool,
    /// A segment was created since the directory was last fsynced.
    dir_dirty: bool,
    last_sync: Instant,
    /// The seqs of the last append and the active segment's length before it, while it can
    /// still be undone ([`Log::undo_append`]): cleared by a sync or a roll.
    last_append: Option<(Range<u64>, u64)>,
    poison: Poison,
    scratch: Vec<u8>,
}

/// Result of scanning one segment during recovery.
struct Scanned {
    records: u64,
    next_seq: u64,
    bytes: u64,
    truncated: Option<Truncation>,
}

impl Log {
    /// Opens the log in `config.dir`, creating the directory and a first empty segment if
    /// needed, and recovers it.
    ///
    /// Recovery reads and checksums every record of every segment in seq order. A bad or
    /// incomplete record at the very tail of the last segment (nothing valid after it) is a torn
    /// write from a crash: the file is truncated at the end of the last good record (logged
    /// with `tracing::warn!`, reported in [`Recovery::truncated`]) and opening succeeds. Any
    /// other bad record, a seq that does not follow its predecessor (within a segment or across
    /// segments, including a segment whose name does not match its first record), or an
    /// unparsable `*.log` file name is [`LogError::Corrupt`], naming the file and offset: data is
    /// never skipped silently.
    ///
    /// Once recovered, the active segment and the directory are fsynced, so every recovered
    /// record is durable whatever the policy ([`Log::durable_seq`] starts at
    /// `next_seq - 1`).
    pub fn open(config: LogConfig) -> Result<(Log, Recovery), LogError> {
        Self::open_in(config, Arc::new(OsStorage))
    }

    /// [`Log::open`] with the files in `storage` (the simulated storage of the power-loss
    /// tests, for instance) instead of the real file system.
    pub fn open_in(
        config: LogConfig,
        storage: Arc<dyn Storage>,
    ) -> Result<(Log, Recovery), LogError> {
        let LogConfig {
            dir,
            segment_bytes,
            fsync,
        } = config;
        // Every new directory's own entry is made durable, up to the first that existed.
        storage
            .create_dir_all_durably(&dir)
            .map_err(LogError::io("create directory", &dir))?;

        let files = list_segments(&*storage, &dir)?;
        let mut segments = Vec::with_capacity(files.len());
        let mut records = 0u64;
        let mut truncated = None;
        let mut expected_first: Option<(u64, &Path)> = None;
        for (i, (first_seq, path)) in files.iter().enumerate() {
            if let Some((next, previous)) = expected_first {
                if *first_seq != next {
                    return Err(LogError::Corrupt {
                        file: path.clone(),
                        offset: 0,
                        reason: format!(
                            "seq gap: the previous segment {} ends before seq {next}, but this \
                             segment starts at seq {first_seq}",
                            previous.display()
                        ),
                    });
                }
            }
            let is_last = i + 1 == files.len();
            let scanned = scan_segment(&*storage, path, *first_seq, is_last)?;
            records += scanned.records;
            if scanned.truncated.is_some() {
                truncated = scanned.truncated;
            }
            expected_first = Some((scanned.next_seq, path));
            segments.push(Segment {
                first_seq: *first_seq,
                path: path.clone(),
                bytes: scanned.bytes,
            });
        }

        let (next_seq, created) = match expected_first {
            Some((next, _)) => (next, false),
            None => (1, true),
        };
        let (active, active_file) = match segments.pop() {
            Some(active) => {
                let file = storage
                    .open(&active.path, OpenMode::Append)
                    .map_err(LogError::io("open for append", &active.path))?;
                (active, file)
            }
            None => create_segment(&*storage, &dir, next_seq)?,
        };
        // Whatever a previous process left in the page cache becomes durable now, so every
        // recovered record is durable and later syncs only cover new appends.
        active_file
            .sync_data()
            .map_err(LogError::io("fdatasync", &active.path))?;
        storage
            .sync_dir(&dir)
            .map_err(LogError::io("fsync directory", &dir))?;

        let recovery = Recovery {
            segments: segments.len() + 1,
            records,
            next_seq,
            truncated,
        };
        tracing::debug!(
            dir = %dir.display(),
            segments = recovery.segments,
            records,
            next_seq,
            created,
            "opened log"
        );
        let log = Log {
            storage,
            dir,
            segment_bytes,
            fsync,
            sealed: segments.into(),
            active,
            active_file,
            next_seq,
            durable_seq: next_seq - 1,
            data_dirty: false,
            dir_dirty: false,
            last_sync: Instant::now(),
            last_append: None,
            poison: Arc::new(OnceLock::new()),
            scratch: Vec::new(),
        };
        Ok((log, recovery))
    }

    /// Appends `payloads` as consecutive records starting at [`Log::next_seq`] and returns the
    /// seqs they got (an empty range for no payloads).
    ///
    /// The whole batch goes into one segment with one `write_all` call. Before it, the log rolls
    /// to a new segment (named after its first seq, e.g. `00000000000000000001.log`) if the
    /// batch would make the current non-empty segment exceed [`LogConfig::segment_bytes`];
    /// rolling fsyncs the old segment first, whatever the policy, so that only the last segment
    /// can ever have a torn tail.
    ///
    /// Does not make the records durable: call [`Log::sync`] before acknowledging them.
    /// A payload above [`MAX_RECORD_BYTES`] fails the whole batch with
    /// [`LogError::RecordTooLarge`] before anything is written. A failed write poisons the log
    /// (see [`LogError::Poisoned`]).
    pub fn append(&mut self, payloads: &[&[u8]]) -> Result<Range<u64>, LogError> {
        self.check_poison()?;
        let start = self.next_seq;
        if payloads.is_empty() {
            return Ok(start..start);
        }
        let mut batch_bytes = 0u64;
        for payload in payloads {
            if payload.len() > MAX_RECORD_BYTES {
                return Err(LogError::RecordTooLarge {
                    len: payload.len(),
                    max: MAX_RECORD_BYTES,
                });
            }
            batch_bytes += (RECORD_HEADER_BYTES + payload.len()) as u64;
        }
        let end =
            start
                .checked_add(payloads.len() as u64)
                .ok_or_else(|| LogError::SeqExhausted {
                    dir: self.dir.clone(),
                })?;

        if self.active.bytes > 0 && self.active.bytes + batch_bytes > self.segment_bytes {
            self.roll()?;
        }

        self.scratch.clear();
        for (seq, payload) in (start..end).zip(payloads) {
            encode_record(seq, payload, &mut self.scratch);
        }
        let offset = self.active.bytes;
        if let Err(source) = self.active_file.write_all(&self.scratch) {
            // A full file system refused the write: the kernel wrote nothing or a prefix, and
            // nothing it had before is in doubt (unlike a failed fsync). Cutting the prefix off
            // puts the file back on the record boundary it had, so the log goes on: the caller
            // refuses this batch and may try again once space is freed. Readers never read past
            // a seq the writer reported appended, and re-read before calling a record bad, so
            // bytes they may have buffered from the cut prefix do not matter.
            if source.kind() == std::io::ErrorKind::StorageFull
                && self.active_file.set_len(offset).is_ok()
            {
                return Err(LogError::NoSpace {
                    path: self.active.path.clone(),
                    source,
                });
            }
            // Part of the batch may be in the file. Cut it off so the file ends on a record
            // boundary again; but readers may already have buffered those bytes, and the
            // kernel's view of the file is uncertain, so the log is poisoned either way and
            // the caller reopens it (recovery would also cut a leftover partial batch).
            if let Err(e) = self.active_file.set_len(offset) {
                tracing::warn!(
                    file = %self.active.path.display(), offset, error = %e,
                    "cannot truncate a partially written batch; recovery will cut it at the next open"
                );
            }
            let op = format!("write {} bytes at offset {offset}", self.scratch.len());
            self.set_poison(format!(
                "{op} of {} failed: {source}",
                self.active.path.display()
            ));
            return Err(LogError::Io {
                op,
                path: self.active.path.clone(),
                source,
            });
        }
        self.last_append = Some((start..end, offset));
        self.active.bytes += batch_bytes;
        self.next_seq = end;
        self.data_dirty = true;
        if self.scratch.capacity() > SCRATCH_KEEP_BYTES {
            self.scratch = Vec::new();
        }
        Ok(start..end)
    }

    /// Takes back the records of the last [`Log::append`], `appended` being the range it
    /// returned, as long as nothing was synced, rolled or trimmed since: the active segment is
    /// cut back to where they began and fsynced, so that they cannot reappear after an OS
    /// crash. For a caller whose batch is half-written across two logs (the second one's
    /// append failed, e.g. a full disk) and must leave both as they were. Needs no free space.
    ///
    /// # Errors
    /// [`LogError::Io`] (`op` "undo append") when `appended` is not the last append or some of
    /// it was synced since, or when the truncation fails (the log is then poisoned).
    pub fn undo_append(&mut self, appended: Range<u64>) -> Result<(), LogError> {
        self.check_poison()?;
        let Some((last, offset)) = self.last_append.take() else {
            return Err(LogError::io("undo append", &self.active.path)(
                std::io::Error::other("nothing to undo"),
            ));
        };
        if last != appended || self.durable_seq >= last.start || last.end != self.next_seq {
            return Err(LogError::io("undo append", &self.active.path)(
                std::io::Error::other(format!(
                    "seqs {appended:?} are not the last unsynced append ({last:?})"
                )),
            ));
        }
        let truncated = self
            .active_file
            .set_len(offset)
            .and_then(|()| self.active_file.sync_data());
        if let Err(source) = truncated {
            self.set_poison(format!(
                "undoing an append to {} failed: {source}",
                self.active.path.display()
            ));
            return Err(LogError::io("undo append", &self.active.path)(source));
        }
        self.active.bytes = offset;
        self.next_seq = last.start;
        Ok(())
    }

    /// Makes appended records durable according to the policy:
    ///
    /// * With [`FsyncPolicy::Always`], `fdatasync` the active segment now (skipped if nothing was
    ///   appended since the last sync).
    /// * With [`FsyncPolicy::Interval`], the same, but only if the interval has passed since the last
    ///   sync; otherwise returns at once and the records stay unsynced until a later call finds
    ///   the interval passed. The caller must therefore also call `sync` periodically (or
    ///   [`Log::sync_now`] at shutdown), not only after appends. Opening the log counts as a
    ///   sync, so the first interval starts at open.
    /// * With [`FsyncPolicy::Never`], nothing.
    ///
    /// When it syncs, it also fsyncs the directory if a segment was created since, so the new
    /// file's existence is durable too. [`Log::durable_seq`] tells what is durable. A failed
    /// fsync poisons the log: after one, Linux may have dropped the dirty pages, so retrying
    /// could falsely report success.
    pub fn sync(&mut self) -> Result<(), LogError> {
        self.check_poison()?;
        match self.fsync {
            FsyncPolicy::Always => self.sync_inner(),
            FsyncPolicy::Interval(interval) if self.last_sync.elapsed() >= interval => {
                self.sync_inner()
            }
            FsyncPolicy::Interval(_) | FsyncPolicy::Never => Ok(()),
        }
    }

    /// Makes every appended record durable now, whatever the policy (for a graceful shutdown,
    /// or a caller that wants one batch durable under a laxer policy).
    pub fn sync_now(&mut self) -> Result<(), LogError> {
        self.check_poison()?;
        self.sync_inner()
    }

    /// The seq the next appended record gets. A new log starts at 1, so 0 means "nothing".
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The oldest retained seq (equal to [`Log::next_seq`] when the log holds no records).
    pub fn first_seq(&self) -> u64 {
        self.sealed
            .front()
            .map_or(self.active.first_seq, |s| s.first_seq)
    }

    /// The highest seq known durable: covered by a completed fsync of this log (or recovered at
    /// open). 0 if none. Under [`FsyncPolicy::Always`] it reaches `next_seq - 1` after each
    /// [`Log::sync`].
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }

    /// Deletes every sealed segment all of whose records have seq `<= through`, oldest first;
    /// never the active segment, so the newest records always stay (and `first_seq` never
    /// passes `next_seq`). Returns the bytes freed.
    ///
    /// The directory is fsynced after each deletion so that a crash can only leave a
    /// contiguous suffix of segments, never a gap that the next open would call corrupt.
    /// Readers positioned in a deleted segment keep reading it (their open handle keeps the
    /// data until dropped; Unix semantics).
    pub fn trim(&mut self, through: u64) -> Result<u64, LogError> {
        self.check_poison()?;
        let mut freed = 0;
        while let Some(oldest) = self.sealed.front() {
            let next_first = self
                .sealed
                .get(1)
                .map_or(self.active.first_seq, |s| s.first_seq);
            // `next_first - 1` is the last seq of `oldest`; it has at least one record, since
            // only non-empty segments are ever sealed.
            if next_first - 1 > through {
                break;
            }
            match self.storage.remove_file(&oldest.path) {
                Ok(()) => {}
                // Already gone (e.g. a previous attempt failed after the unlink): same outcome.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(LogError::io("delete segment", &oldest.path)(e)),
            }
            freed += oldest.bytes;
            self.sealed.pop_front();
            self.storage
                .sync_dir(&self.dir)
                .map_err(LogError::io("fsync directory", &self.dir))?;
        }
        if freed > 0 {
            tracing::debug!(dir = %self.dir.display(), through, freed, first_seq = self.first_seq(), "trimmed log");
        }
        Ok(freed)
    }

    /// Whether [`Log::trim`] with `through` would delete at least one segment (for a caller that
    /// must make something else durable first).
    pub fn can_trim(&self, through: u64) -> bool {
        self.sealed.front().is_some() && {
            let next_first = self
                .sealed
                .get(1)
                .map_or(self.active.first_seq, |s| s.first_seq);
            next_first - 1 <= through
        }
    }

    /// Bytes of all segment files.
    pub fn size_bytes(&self) -> u64 {
        self.sealed.iter().map(|s| s.bytes).sum::<u64>() + self.active.bytes
    }

    /// Number of segment files (sealed plus the active one).
    pub fn segment_count(&self) -> usize {
        self.sealed.len() + 1
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A reader of the records with seq `>= from_seq`, independent of the writer: it opens its
    /// own file handles and can live on another thread.
    ///
    /// `from_seq` may equal [`Log::next_seq`] (the reader then waits for new records). Older
    /// than [`Log::first_seq`] is [`LogError::Trimmed`]; newer than `next_seq` is
    /// [`LogError::BeyondEnd`]. The reader skips from the start of the segment holding
    /// `from_seq`, checksumming as it goes.
    pub fn reader(&self, from_seq: u64) -> Result<LogReader, LogError> {
        self.check_poison()?;
        let first = self.first_seq();
        if from_seq < first {
            return Err(LogError::Trimmed {
                requested: from_seq,
                first,
            });
        }
        if from_seq > self.next_seq {
            return Err(LogError::BeyondEnd {
                requested: from_seq,
                next: self.next_seq,
            });
        }
        let segment = self
            .sealed
            .iter()
            .rev()
            .find(|s| s.first_seq <= from_seq)
            .filter(|_| from_seq < self.active.first_seq)
            .unwrap_or(&self.active);
        LogReader::new(
            Arc::clone(&self.storage),
            self.dir.clone(),
            segment.first_seq,
            &segment.path,
            from_seq,
            Arc::clone(&self.poison),
        )
    }

    fn sync_inner(&mut self) -> Result<(), LogError> {
        if self.data_dirty {
            if let Err(source) = self.active_file.sync_data() {
                self.set_poison(format!(
                    "fdatasync of {} failed: {source}",
                    self.active.path.display()
                ));
                return Err(LogError::io("fdatasync", &self.active.path)(source));
            }
            self.data_dirty = false;
        }
        if self.dir_dirty {
            if let Err(source) = self.storage.sync_dir(&self.dir) {
                self.set_poison(format!(
                    "fsync of directory {} failed: {source}",
                    self.dir.display()
                ));
                return Err(LogError::io("fsync directory", &self.dir)(source));
            }
            self.dir_dirty = false;
        }
        self.durable_seq = self.next_seq - 1;
        self.last_sync = Instant::now();
        self.last_append = None;
        Ok(())
    }

    /// Seals the active segment (fsyncing it) and starts a new one at `next_seq`.
    fn roll(&mut self) -> Result<(), LogError> {
        // Sealed segments must be complete on disk before a newer segment exists: recovery only
        // forgives a torn tail in the last segment. So this fsync runs under every policy; it
        // costs one fsync per segment.
        if self.data_dirty {
            if let Err(source) = self.active_file.sync_data() {
                self.set_poison(format!(
                    "fdatasync of {} failed: {source}",
                    self.active.path.display()
                ));
                return Err(LogError::io("fdatasync", &self.active.path)(source));
            }
            self.data_dirty = false;
        }
        // The segment being sealed may itself be new since the last directory fsync (under
        // `interval` and `never`, a sync may not have run since the previous roll): its records
        // are durable only once its directory entry is, so sync the directory before reporting
        // them durable. Otherwise an OS crash could drop the file and with it seqs already
        // forwarded (a gap at open, or seqs handed out again).
        if self.dir_dirty {
            if let Err(source) = self.storage.sync_dir(&self.dir) {
                self.set_poison(format!(
                    "fsync of directory {} failed: {source}",
                    self.dir.display()
                ));
                return Err(LogError::io("fsync directory", &self.dir)(source));
            }
            self.dir_dirty = false;
        }
        self.durable_seq = self.next_seq - 1;
        self.last_append = None;
        let (segment, file) = create_segment(&*self.storage, &self.dir, self.next_seq)?;
        tracing::debug!(file = %segment.path.display(), "rolled to a new segment");
        let sealed = std::mem::replace(&mut self.active, segment);
        self.sealed.push_back(sealed);
        self.active_file = file;
        self.dir_dirty = true;
        Ok(())
    }

    fn check_poison(&self) -> Result<(), LogError> {
        match self.poison.get() {
            Some(reason) => Err(LogError::Poisoned {
                dir: self.dir.clone(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    pub(crate) fn set_poison(&self, reason: String) {
        tracing::error!(dir = %self.dir.display(), %reason, "log poisoned; reopen it to recover");
        // Only the first failure is kept: it is the root cause.
        let _ = self.poison.set(reason);
    }
}

/// Creates the empty segment file for `first_seq` (failing if it exists).
fn create_segment(
    storage: &dyn Storage,
    dir: &Path,
    first_seq: u64,
) -> Result<(Segment, Box<dyn StorageFile>), LogError> {
    let path = dir.join(segment_file_name(first_seq));
    let file = storage
        .open(&path, OpenMode::CreateNew)
        .map_err(LogError::io("create segment", &path))?;
    Ok((
        Segment {
            first_seq,
            path,
            bytes: 0,
        },
        file,
    ))
}

/// Reads and checksums every record of one segment. For the last segment, cuts a torn tail.
fn scan_segment(
    storage: &dyn Storage,
    path: &Path,
    first_seq: u64,
    is_last: bool,
) -> Result<Scanned, LogError> {
    let corrupt = |offset: u64, reason: String| LogError::Corrupt {
        file: path.to_path_buf(),
        offset,
        reason,
    };
    let read_err = |offset: u64| LogError::io(format!("read at offset {offset}"), path);
    let mut cursor =
        SegmentCursor::open(storage, path).map_err(LogError::io("open for reading", path))?;
    let mut expected = first_seq;
    let mut records = 0u64;
    // Where the good records end and why the rest is not a record, if it is not.
    let (good_len, tear) = loop {
        let step = cursor.step().map_err(read_err(cursor.offset()))?;
        match step {
            Step::Record { offset, seq, .. } => {
                if seq != expected {
                    return Err(corrupt(
                        offset,
                        format!("record has seq {seq}, but seq {expected} was expected here"),
                    ));
                }
                expected = seq.checked_add(1).ok_or_else(|| {
                    corrupt(
                        offset,
                        "record seq is u64::MAX; seqs cannot continue".to_owned(),
                    )
                })?;
                records += 1;
            }
            Step::End { offset } => break (offset, None),
            Step::Incomplete { offset, available } => {
                let reason =
                    format!("incomplete record: the file ends {available} bytes after its start");
                if !is_last {
                    return Err(corrupt(
                        offset,
                        reason + " (in a segment that is not the last)",
                    ));
                }
                // Nothing valid can follow: either the header is intact and everything after
                // it is this record's payload, or fewer bytes than a header remain.
                break (offset, Some(reason));
            }
            Step::Bad { offset, error } => {
                if !is_last {
                    return Err(corrupt(
                        offset,
                        format!("{error} (in a segment that is not the last)"),
                    ));
                }
                // A torn write leaves nothing valid after the bad bytes; anything valid after
                // them means data in the middle went bad, and cutting would lose good records.
                let search_from = match error {
                    // The header is intact, so the next record would start after this one.
                    DecodeError::Checksum { record_len, .. } => offset + record_len as u64,
                    _ => offset + 1,
                };
                let mut file = storage
                    .open(path, OpenMode::Read)
                    .map_err(LogError::io("open for reading", path))?;
                let found = find_valid_record_after(&mut *file, search_from, expected)
                    .map_err(read_err(search_from))?;
                if let Some((at, seq)) = found {
                    return Err(corrupt(
                        offset,
                        format!(
                            "{error}, but a valid record (seq {seq}) follows at offset {at}, so \
                             this is not a torn write at the tail"
                        ),
                    ));
                }
                break (offset, Some(error.to_string()));
            }
        }
    };
    drop(cursor);

    let mut bytes = good_len;
    let mut truncated = None;
    if let Some(reason) = tear {
        let file = storage
            .open(path, OpenMode::Write)
            .map_err(LogError::io("open for truncation", path))?;
        let file_len = file.len().map_err(LogError::io("stat", path))?;
        let bytes_dropped = file_len.saturating_sub(good_len);
        tracing::warn!(
            file = %path.display(),
            offset = good_len,
            bytes_dropped,
            reason = %reason,
            "torn write at the tail of the log: truncating after the last good record"
        );
        file.set_len(good_len)
            .map_err(LogError::io(format!("truncate to {good_len} bytes"), path))?;
        // The cut must be durable before new records are appended after it.
        file.sync_all().map_err(LogError::io("fsync", path))?;
        bytes = good_len;
        truncated = Some(Truncation {
            file: path.to_path_buf(),
            offset: good_len,
            bytes_dropped,
            reason,
        });
    }
    Ok(Scanned {
        records,
        next_seq: expected,
        bytes,
        truncated,
    })
}
