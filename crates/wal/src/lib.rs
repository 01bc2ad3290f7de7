//! A sequence-numbered, segmented, append-only log with a checksum per record: ingest's
//! durable buffer. Ingest keeps one [`Log`] per aggregator shard; each record is one encoded
//! batch of deltas (opaque bytes here). A batch is acknowledged only once [`Log::sync`] made it
//! durable; a forwarder reads records from a seq on with a [`LogReader`]; once the aggregator
//! reports a seq durably applied, [`Log::trim`] deletes the whole segments up to it.
//!
//! # On-disk format
//!
//! One directory per log, holding only *segment files* (other files are ignored, a `*.log` file
//! with any other name is corruption). A segment is named after the seq of its first record,
//! zero-padded to 20 digits so names sort numerically: `00000000000000000001.log`. A segment is
//! nothing but records back to back, no file header; a segment may be empty. Seqs start at 1
//! and are consecutive across the whole log: every record's seq is its predecessor's plus one,
//! and each segment's name equals the seq following the previous segment's last record.
//!
//! Each record is a 22-byte header and the payload; all integers little-endian:
//!
//! | offset | size | field                                                         |
//! |-------:|-----:|---------------------------------------------------------------|
//! | 0      | 2    | magic `0x57A1` ([`RECORD_MAGIC`], bytes `A1 57`)               |
//! | 2      | 4    | payload length, at most [`MAX_RECORD_BYTES`] (64 MiB)          |
//! | 6      | 8    | seq                                                           |
//! | 14     | 4    | `crc`: CRC-32 (`crc32fast`) over seq ‖ length ‖ payload         |
//! | 18     | 4    | `header_crc`: CRC-32 over header bytes 0..18                  |
//! | 22     | len  | payload                                                       |
//!
//! Why this shape:
//!
//! * The **magic is non-zero**, so zeros (a file extended or pre-allocated but never written)
//!   are never a header, and a CRC-32 of zeros is not zero either.
//! * The **header checksum** lets the length be trusted before the payload is read. Without it a
//!   flipped length bit in the middle of the last segment would look like a record running past
//!   the end of the file, i.e. like a torn write, and recovery would cut off good records. It
//!   also means a garbage length is rejected at once instead of making a reader wait for or
//!   buffer up to 4 GiB; lengths above 64 MiB are rejected even when the checksum matches.
//! * Every **strict prefix** of a record decodes as "incomplete" ([`decode_record`] returns
//!   `Ok(None)`), and any byte change inside a record is an error (CRC-32 detects every burst
//!   of up to 32 bits), so a torn write is always detected, whatever length was torn.
//!
//! # Recovery rules ([`Log::open`])
//!
//! Every record of every segment is read and checksummed in seq order.
//!
//! * The **tail of the last segment** may be torn: a crash can stop a write anywhere. If the
//!   last segment ends in an incomplete record, or in bad bytes after which *no valid record
//!   exists at any offset*, the file is truncated after the last good record, a
//!   `tracing::warn!` names the file, offset and bytes dropped, [`Recovery::truncated`] reports
//!   it, and open succeeds. These records were never reported durable by [`Log::sync`] (under
//!   [`FsyncPolicy::Always`]), so nothing acknowledged is lost.
//! * **Everything else is [`LogError::Corrupt`]** naming file, offset and reason, and nothing is
//!   changed on disk: a bad or incomplete record in any other segment, a bad record in the last
//!   segment that is followed by a valid record (cutting there would silently drop good data),
//!   a seq that does not follow its predecessor (inside a segment, or between segments: a
//!   missing or renamed segment), or an unparsable segment file name. An operator must look.
//! * Only the last segment can legitimately be torn, because rolling to a new segment first
//!   fsyncs the old one, under every policy (and the directory, if the old segment's own entry
//!   is not durable yet: records are never reported durable in a file that could vanish).
//!
//! After recovery the active segment and the directory are fsynced, so all recovered records
//! are durable ([`Log::durable_seq`]) even if the previous process never synced them.
//!
//! # Fsync policies and their risks ([`FsyncPolicy`])
//!
//! [`Log::append`] only writes (into the page cache); [`Log::sync`] applies the policy. A process
//! crash (`kill -9`, panic, OOM kill) loses nothing that `append` returned for, under any policy:
//! the page cache survives the process. The policies differ on an **OS crash or power loss**:
//!
//! * `Always`: `sync` runs `fdatasync` (plus a directory fsync after a segment was created), so
//!   whatever `sync` returned for survives. Acknowledge after `sync`. Cost: one fsync per sync
//!   call, shared by every batch appended before it (group commit: the writer appends many
//!   concurrent batches, then syncs once, then acknowledges all of them).
//! * `Interval(d)`: `sync` fsyncs only if `d` has passed since the last fsync, else returns at
//!   once. Batches acknowledged after such a `sync` can be lost: up to roughly `d` of records
//!   (more if `sync` is not called again). Call `sync` on a timer as well, and
//!   [`Log::sync_now`] on shutdown.
//! * `Never`: no fsync of appended records (sealed segments are still fsynced once). The OS
//!   decides when data reaches the disk (typically within ~30 s on Linux); all of that can be
//!   lost. For tests and benchmarks.
//!
//! A power loss can also leave the not-yet-synced tail with holes, because the filesystem may
//! write later blocks before earlier ones: under `Always` only within the batches appended since
//! the last `sync`, under `Interval` and `Never` within everything unsynced. Recovery then sees
//! bad bytes followed by valid records and reports [`LogError::Corrupt`] rather than silently
//! dropping the valid records; the operator decides (for instance truncating the named file at
//! the named offset, which loses only unsynced records).
//!
//! A failed write or fsync **poisons** the log: after a failed `fdatasync` Linux may have dropped
//! the dirty pages and a retry would falsely succeed. Every later call, including on readers,
//! returns [`LogError::Poisoned`]; drop the log and its readers and [`Log::open`] again.
//!
//! # Concurrency
//!
//! One writer per directory, not enforced across processes (no lock file): the caller must
//! ensure it. All I/O is blocking (`std::fs` through [`storage::OsStorage`]): run it on a
//! dedicated thread or in `spawn_blocking`. Readers have their own file handles and may run on other threads; they
//! read only up to the seq the caller says has been appended.
//!
//! Seqs are only stable once durable: after an OS crash, records that were appended but not
//! fsynced are gone and their seqs are handed out again to new records. A consumer that
//! deduplicates by seq must therefore only be sent records up to [`Log::durable_seq`].
//!
//! Unix semantics are assumed: a trimmed segment stays readable through an open handle, and
//! directories can be fsynced.
//!
//! # Storage, and the power-loss simulation
//!
//! Every file operation goes through a [`storage::Storage`]: [`Log::open`] uses the real file
//! system, [`Log::open_in`] any other. With the `test-util` feature, `sim::SimStorage` is an
//! in-memory file system that remembers what was fsynced and can lose power at a chosen
//! operation, dropping every file content and directory entry that was not; the power-loss
//! tests (`src/tests/power_loss.rs`, and those of the ingest data directory and the
//! aggregator's checkpoints) run thousands of seeded crash points against it, under every
//! policy. `kill -9` cannot test this: the page cache survives a process crash.

mod codec;
mod error;
mod log;
mod reader;
mod segment;
#[cfg(any(test, feature = "test-util"))]
pub mod sim;
pub mod storage;

#[cfg(test)]
mod tests;

pub use crate::codec::{
    decode_record, encode_record, DecodeError, DecodedRecord, MAX_RECORD_BYTES,
    RECORD_HEADER_BYTES, RECORD_MAGIC,
};
pub use crate::error::LogError;
pub use crate::log::{FsyncPolicy, Log, LogConfig, Recovery, Truncation, DEFAULT_SEGMENT_BYTES};
pub use crate::reader::LogReader;
