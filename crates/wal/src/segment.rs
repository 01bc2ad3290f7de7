//! Segment files: naming, listing, and a buffered cursor that reads records in file order.

use std::ffi::OsStr;
use std::io::{self, Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::codec::{decode_record, needed_len, DecodeError};
use crate::error::LogError;
use crate::storage::{OpenMode, Storage, StorageFile};

/// Extension of segment files. Other files in the directory are ignored.
const SEGMENT_EXTENSION: &str = "log";

/// Digits of the zero-padded first seq in a segment's file name (`u64::MAX` has 20 digits, so
/// lexical order equals numeric order).
const NAME_DIGITS: usize = 20;

/// Bytes requested from the OS per read when no larger record is pending.
const READ_CHUNK: usize = 64 * 1024;

/// File name of the segment whose first record has seq `first_seq`.
pub(crate) fn segment_file_name(first_seq: u64) -> String {
    format!(
        "{first_seq:0width$}.{SEGMENT_EXTENSION}",
        width = NAME_DIGITS
    )
}

/// Parses a directory entry's name: `None` if it is not a segment file at all (no `.log`
/// extension), `Some(Err(reason))` if it claims to be one but its name is not a valid seq.
fn parse_segment_name(name: &OsStr) -> Option<Result<u64, String>> {
    let name = name.to_string_lossy();
    let stem = name.strip_suffix(&format!(".{SEGMENT_EXTENSION}"))?;
    if stem.len() != NAME_DIGITS || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Err(format!(
            "segment file name must be {NAME_DIGITS} decimal digits followed by .{SEGMENT_EXTENSION}"
        )));
    }
    Some(match stem.parse::<u64>() {
        Ok(0) => Err("segment file name is seq 0, but seqs start at 1".to_owned()),
        Ok(seq) => Ok(seq),
        Err(e) => Err(format!("segment file name is not a u64 seq: {e}")),
    })
}

/// Lists the segment files of `dir`, sorted by first seq.
///
/// A `.log` file whose name does not parse is corruption: silently ignoring it could hide
/// records (for instance a segment renamed by hand).
pub(crate) fn list_segments(
    storage: &dyn Storage,
    dir: &Path,
) -> Result<Vec<(u64, PathBuf)>, LogError> {
    let names = storage
        .list_dir(dir)
        .map_err(LogError::io("list directory", dir))?;
    let mut segments = Vec::new();
    for name in names {
        let path = dir.join(&name);
        match parse_segment_name(&name) {
            None => {
                tracing::debug!(path = %path.display(), "ignoring non-segment file in log directory")
            }
            Some(Ok(seq)) => segments.push((seq, path)),
            Some(Err(reason)) => {
                return Err(LogError::Corrupt {
                    file: path,
                    offset: 0,
                    reason,
                })
            }
        }
    }
    segments.sort_unstable_by_key(|(seq, _)| *seq);
    Ok(segments)
}

/// One step of a [`SegmentCursor`].
#[derive(Debug)]
pub(crate) enum Step {
    /// A valid record at `offset`; its payload is `cursor.payload(payload)` until the next step.
    Record {
        offset: u64,
        seq: u64,
        payload: Range<usize>,
    },
    /// No bytes at all after `offset` (right now: the file may still grow).
    End { offset: u64 },
    /// A valid beginning of a record at `offset`, but the file ends after `available` bytes.
    Incomplete { offset: u64, available: usize },
    /// Bytes at `offset` that are not a valid record.
    Bad { offset: u64, error: DecodeError },
}

/// Reads the records of one segment file in order through a buffer.
///
/// Works on a file that another handle is appending to: hitting the end is not sticky, the
/// next step reads again.
#[derive(Debug)]
pub(crate) struct SegmentCursor {
    file: Box<dyn StorageFile>,
    path: PathBuf,
    buf: Vec<u8>,
    /// File offset of `buf[0]`. The OS file position is always `buf_start + buf.len()`.
    buf_start: u64,
    /// Index in `buf` of the first byte not yet returned.
    pos: usize,
}

impl SegmentCursor {
    /// Opens `path` for reading from its start.
    pub(crate) fn open(storage: &dyn Storage, path: &Path) -> io::Result<Self> {
        Ok(Self {
            file: storage.open(path, OpenMode::Read)?,
            path: path.to_path_buf(),
            buf: Vec::new(),
            buf_start: 0,
            pos: 0,
        })
    }

    /// The file this cursor reads.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// File offset of the next record.
    pub(crate) fn offset(&self) -> u64 {
        self.buf_start + self.pos as u64
    }

    /// The payload bytes of the record returned by the last step.
    pub(crate) fn payload(&self, range: Range<usize>) -> &[u8] {
        self.buf.get(range).unwrap_or_default()
    }

    /// Decodes the next record, reading more of the file as needed.
    pub(crate) fn step(&mut self) -> io::Result<Step> {
        loop {
            let rest = self.buf.get(self.pos..).unwrap_or_default();
            let offset = self.offset();
            match decode_record(rest) {
                Ok(Some(record)) => {
                    let start = self.pos + crate::codec::RECORD_HEADER_BYTES;
                    let end = self.pos + record.len;
                    let seq = record.seq;
                    self.pos = end;
                    return Ok(Step::Record {
                        offset,
                        seq,
                        payload: start..end,
                    });
                }
                Ok(None) => {
                    let want = needed_len(rest).map_or(0, |n| n.saturating_sub(rest.len()));
                    if self.fill(want)? == 0 {
                        let available = self.buf.len() - self.pos;
                        return Ok(if available == 0 {
                            Step::End { offset }
                        } else {
                            Step::Incomplete { offset, available }
                        });
                    }
                }
                Err(error) => return Ok(Step::Bad { offset, error }),
            }
        }
    }

    /// Forgets everything buffered from the current position on and reads it again from the
    /// file on the next step. A reader uses this before declaring corruption, in case its
    /// buffer holds bytes read while a write was still in progress.
    pub(crate) fn reread(&mut self) -> io::Result<()> {
        let offset = self.offset();
        self.file.seek(SeekFrom::Start(offset))?;
        self.buf.clear();
        self.buf_start = offset;
        self.pos = 0;
        Ok(())
    }

    /// Reads at least one more byte if the file has any (up to `want` or [`READ_CHUNK`],
    /// whichever is larger); returns how many were read (0 at end of file).
    fn fill(&mut self, want: usize) -> io::Result<usize> {
        // Drop consumed bytes so the buffer holds at most one record plus a chunk.
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.buf_start += self.pos as u64;
            self.pos = 0;
        }
        let old_len = self.buf.len();
        let mut total = 0;
        let target = want.max(READ_CHUNK);
        self.buf.resize(old_len + target, 0);
        // Loop so that one large record is read in few steps, but stop at end of file.
        while total < target {
            match self.file.read(&mut self.buf[old_len + total..]) {
                Ok(0) => break,
                Ok(n) => {
                    total += n;
                    if total >= want {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.buf.truncate(old_len + total);
                    return Err(e);
                }
            }
        }
        self.buf.truncate(old_len + total);
        // A huge record once read must not pin its buffer forever.
        if self.buf.capacity() > 4 * READ_CHUNK && self.buf.len() < READ_CHUNK {
            self.buf.shrink_to(READ_CHUNK);
        }
        Ok(total)
    }
}

/// Looks in `file` from `start` to its end for any byte offset at which a valid record with a
/// seq of at least `min_seq` starts; returns that offset and seq.
///
/// Recovery uses this to tell a torn tail (nothing valid after the bad bytes) from corruption
/// followed by good data. Reads the rest of the file into memory: it only runs on the tail of
/// the last segment, which is bounded by the segment size plus one batch.
pub(crate) fn find_valid_record_after(
    file: &mut (impl Read + Seek + ?Sized),
    start: u64,
    min_seq: u64,
) -> io::Result<Option<(u64, u64)>> {
    file.seek(SeekFrom::Start(start))?;
    let mut rest = Vec::new();
    file.read_to_end(&mut rest)?;
    let magic = crate::codec::RECORD_MAGIC.to_le_bytes();
    for (at, window) in rest.windows(magic.len()).enumerate() {
        if window != magic {
            continue;
        }
        if let Some(Ok(Some(record))) = rest.get(at..).map(decode_record) {
            if record.seq >= min_seq {
                return Ok(Some((start + at as u64, record.seq)));
            }
        }
    }
    Ok(None)
}
