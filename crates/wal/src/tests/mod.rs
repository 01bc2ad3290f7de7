//! Tests of the whole crate: codec properties, the writer and readers, crash recovery, and the
//! power-loss simulation.

mod codec;
mod power_loss;
mod recovery;
mod trim;
mod writer;

use std::path::{Path, PathBuf};

use crate::{FsyncPolicy, Log, LogConfig};

/// A config with the given segment size and no fsync (tests need not pay for it).
fn config(dir: &Path, segment_bytes: u64) -> LogConfig {
    LogConfig {
        dir: dir.to_path_buf(),
        segment_bytes,
        fsync: FsyncPolicy::Never,
    }
}

/// A deterministic payload of varying length for seq `i`.
fn payload(i: u64) -> Vec<u8> {
    format!("batch-{i};")
        .repeat((i % 5 + 1) as usize)
        .into_bytes()
}

/// Every record from `from` to the last appended one.
fn read_all(log: &Log, from: u64) -> Vec<(u64, Vec<u8>)> {
    let mut reader = log.reader(from).unwrap();
    let mut out = Vec::new();
    while let Some(record) = reader.next(log.next_seq() - 1).unwrap() {
        out.push(record);
    }
    out
}

/// The segment files in `dir`, sorted by name.
fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files
}

/// Appends `payload(i)` for each seq in `seqs`, one record per batch.
fn append_each(log: &mut Log, seqs: std::ops::Range<u64>) {
    for i in seqs {
        let p = payload(i);
        let range = log.append(&[&p]).unwrap();
        assert_eq!(range, i..i + 1);
    }
}
