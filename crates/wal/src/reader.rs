//! The reader side: records from a seq on, following segment roll-over.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::LogError;
use crate::log::Poison;
use crate::segment::{list_segments, segment_file_name, SegmentCursor, Step};
use crate::storage::Storage;

/// Reads records in seq order from a given seq on, independently of the writer (its own file
/// handles), following segment roll-over. Created by [`crate::Log::reader`].
///
/// `Send`, so it can live on the forwarder's thread while the writer appends on another. It
/// never looks at records above the `up_to` the caller passes, so the caller decides what is
/// visible. Pass [`crate::Log::durable_seq`] to forward only durable records: a record that was
/// appended but not yet fsynced can vanish in an OS crash, and its seq is then given to a
/// different record after recovery, which a consumer deduplicating by seq would drop.
#[derive(Debug)]
pub struct LogReader {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    cursor: SegmentCursor,
    /// First seq of the segment the cursor reads.
    segment_first: u64,
    /// Seq of the record at the cursor.
    expected: u64,
    /// Records below this are skipped (they precede the requested start in its segment).
    from_seq: u64,
    poison: Poison,
}

impl LogReader {
    pub(crate) fn new(
        storage: Arc<dyn Storage>,
        dir: PathBuf,
        segment_first: u64,
        path: &Path,
        from_seq: u64,
        poison: Poison,
    ) -> Result<Self, LogError> {
        let cursor =
            SegmentCursor::open(&*storage, path).map_err(LogError::io("open for reading", path))?;
        Ok(Self {
            storage,
            dir,
            cursor,
            segment_first,
            expected: segment_first,
            from_seq,
            poison,
        })
    }

    /// The seq the next returned record will have.
    pub fn position(&self) -> u64 {
        self.expected.max(self.from_seq)
    }

    /// Returns the next record (seq and payload) if its seq is `<= up_to`, else `Ok(None)`.
    ///
    /// `up_to` must be a seq the writer has finished appending (for instance the end of the
    /// range [`crate::Log::append`] returned, minus one), so a record still being written is
    /// never read. Follows roll-over into the next segment. A record that fails its checksum
    /// or is missing is [`LogError::Corrupt`] naming file and offset; a next segment that was
    /// trimmed away meanwhile is [`LogError::Trimmed`]. After the writer is poisoned, this
    /// returns [`LogError::Poisoned`].
    pub fn next(&mut self, up_to: u64) -> Result<Option<(u64, Vec<u8>)>, LogError> {
        if let Some(reason) = self.poison.get() {
            return Err(LogError::Poisoned {
                dir: self.dir.clone(),
                reason: reason.clone(),
            });
        }
        // Whether the bytes at the current offset were already re-read from the file once.
        let mut reread = false;
        loop {
            // Records below `from_seq` existed when the reader was created, so they are complete
            // whatever `up_to` says; everything else must be at most `up_to`.
            if self.expected >= self.from_seq && self.expected > up_to {
                return Ok(None);
            }
            let offset = self.cursor.offset();
            let step = self.cursor.step().map_err(|e| self.io_error(e, offset))?;
            let problem = match step {
                Step::Record { offset, seq, payload } if seq == self.expected => {
                    self.expected = seq.checked_add(1).ok_or_else(|| LogError::Corrupt {
                        file: self.cursor.path().to_path_buf(),
                        offset,
                        reason: "record seq is u64::MAX; seqs cannot continue".to_owned(),
                    })?;
                    reread = false;
                    if seq >= self.from_seq {
                        return Ok(Some((seq, self.cursor.payload(payload).to_vec())));
                    }
                    continue;
                }
                Step::Record { offset, seq, .. } => (
                    offset,
                    format!("record has seq {seq}, but seq {} was expected here", self.expected),
                ),
                Step::End { offset } => {
                    if self.expected != self.segment_first {
                        // This segment is done; the record must start the next one.
                        if self.open_next()? {
                            continue;
                        }
                    }
                    (
                        offset,
                        format!(
                            "seq {} should follow here, but the file ends and no segment {} \
                             exists (was up_to {up_to} beyond the last appended seq?)",
                            self.expected,
                            segment_file_name(self.expected)
                        ),
                    )
                }
                Step::Incomplete { offset, available } => (
                    offset,
                    format!(
                        "incomplete record for seq {}: the file ends {available} bytes after its start",
                        self.expected
                    ),
                ),
                Step::Bad { offset, error } => (offset, format!("{error} (expected seq {})", self.expected)),
            };
            // The buffer may hold bytes read while a write was in progress: look at the file
            // once more before calling it corrupt.
            if !reread {
                reread = true;
                self.cursor
                    .reread()
                    .map_err(|e| self.io_error(e, problem.0))?;
                continue;
            }
            return Err(LogError::Corrupt {
                file: self.cursor.path().to_path_buf(),
                offset: problem.0,
                reason: problem.1,
            });
        }
    }

    /// Switches to the segment starting at `self.expected`. `Ok(false)` if it does not exist
    /// and no trimming explains that (the caller reports corruption); trimmed is an error.
    fn open_next(&mut self) -> Result<bool, LogError> {
        let path = self.dir.join(segment_file_name(self.expected));
        match SegmentCursor::open(&*self.storage, &path) {
            Ok(cursor) => {
                self.cursor = cursor;
                self.segment_first = self.expected;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Trimmed while we were reading? Then the oldest segment starts after us.
                if let Some((first, _)) = list_segments(&*self.storage, &self.dir)?.first() {
                    if *first > self.expected {
                        return Err(LogError::Trimmed {
                            requested: self.expected,
                            first: *first,
                        });
                    }
                }
                Ok(false)
            }
            Err(e) => Err(LogError::io("open for reading", &path)(e)),
        }
    }

    fn io_error(&self, source: io::Error, offset: u64) -> LogError {
        LogError::Io {
            op: format!("read at offset {offset}"),
            path: self.cursor.path().to_path_buf(),
            source,
        }
    }
}
