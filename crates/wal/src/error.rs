//! The error type of the log.

use std::io;
use std::path::{Path, PathBuf};

/// Everything that can go wrong opening, writing or reading a [`crate::Log`].
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// An operating-system I/O call failed.
    #[error("I/O error ({op}) on {}: {source}", path.display())]
    Io {
        /// What was being done, with the offset where one applies.
        op: String,
        /// The file or directory it was done to.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The log's files hold something other than a clean sequence of records (a torn tail of
    /// the last segment is *not* reported this way: recovery cuts it off). Needs a human:
    /// nothing is deleted or skipped automatically.
    #[error("corrupt log file {} at offset {offset}: {reason}", file.display())]
    Corrupt {
        /// The segment file (or, for a name problem, the offending path).
        file: PathBuf,
        /// Byte offset in `file` where the problem starts.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A reader asked for a seq older than every retained record.
    #[error("seq {requested} was trimmed from the log; the oldest retained seq is {first}")]
    Trimmed {
        /// The seq asked for.
        requested: u64,
        /// The oldest seq still in the log.
        first: u64,
    },
    /// A reader asked to start after the end of the log.
    #[error(
        "seq {requested} is beyond the end of the log (the next seq to be appended is {next})"
    )]
    BeyondEnd {
        /// The seq asked for.
        requested: u64,
        /// [`crate::Log::next_seq`] at the time.
        next: u64,
    },
    /// The file system is full: nothing of the batch was written (a partly written prefix was
    /// cut off again) and the log stays usable. Try again once space is freed.
    #[error("no space left on the device holding {}: nothing of the batch was written", path.display())]
    NoSpace {
        /// The segment being appended to.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A payload is longer than [`crate::MAX_RECORD_BYTES`]; nothing of the batch was written.
    #[error("record payload of {len} bytes exceeds the maximum of {max} bytes")]
    RecordTooLarge {
        /// The payload's length.
        len: usize,
        /// [`crate::MAX_RECORD_BYTES`].
        max: usize,
    },
    /// Appending would overflow the u64 seq (never happens in practice).
    #[error("sequence numbers exhausted in log {}", dir.display())]
    SeqExhausted {
        /// The log directory.
        dir: PathBuf,
    },
    /// An earlier write or fsync failed, so what is on disk is unknown. The log (and every
    /// reader of it) refuses further work; drop them and [`crate::Log::open`] again, which
    /// recovers from what actually reached the disk.
    #[error("log {} is unusable after an earlier failure ({reason}); reopen it to recover", dir.display())]
    Poisoned {
        /// The log directory.
        dir: PathBuf,
        /// The failure that poisoned it.
        reason: String,
    },
}

impl LogError {
    /// A closure turning an `io::Error` into [`LogError::Io`], for `map_err`.
    pub(crate) fn io(op: impl Into<String>, path: &Path) -> impl FnOnce(io::Error) -> LogError {
        let op = op.into();
        let path = path.to_path_buf();
        move |source| LogError::Io { op, path, source }
    }
}
