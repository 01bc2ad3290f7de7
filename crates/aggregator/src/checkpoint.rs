//! Checkpoints: the aggregator's window state and per-producer progress, on disk.
//!
//! A checkpoint is taken by the `snapshot` stage (see `crate::serve`): applies pause briefly while
//! every owner clones its store and the producers' progress is copied, so the two agree exactly
//! (every batch is either wholly in the checkpoint and marked applied, or wholly absent and not
//! marked). Encoding and writing happen on a blocking thread from the copies, so queries and
//! applies go on meanwhile.
//!
//! File: `checkpoint-<taken_at_ms, 20 digits>.ckpt` =
//! `b"HCCP"` | format version `u32` LE | payload length `u64` LE | CRC-32 of the payload `u32` LE |
//! payload (the `Checkpoint` protobuf message). It is written to a `.tmp` file, fsynced, renamed
//! into place and the directory fsynced, so a crash leaves either the old or the new checkpoint,
//! never a torn one; older checkpoints are then deleted.
//!
//! On start the newest checkpoint is loaded. If it fails its checksum the aggregator refuses to
//! start with an error naming the file: falling back to an older one would silently lose batches
//! ingest has already trimmed from its log.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use hitcounter_proto::aggregator::v1::{Checkpoint, KeyCounters, ProducerProgress};
use hitcounter_window::{StoreLimits, WindowStore};
use prost::Message;

use crate::dedup::Progress;

const MAGIC: &[u8; 4] = b"HCCP";
const FORMAT: u32 = 1;
const HEADER: usize = 4 + 4 + 8 + 4;

/// What can go wrong reading or writing checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A filesystem operation failed.
    #[error("checkpoint i/o on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint file is damaged or of an unknown format.
    #[error("checkpoint {path} is unusable: {reason}; refusing to start from older state (move the file away to start from the previous checkpoint, accepting the loss)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A checkpoint's content, in memory.
pub(crate) struct State {
    pub(crate) taken_at_ms: i64,
    pub(crate) producers: Vec<(u64, Progress)>,
    pub(crate) stores: Vec<WindowStore>,
}

/// What a loaded checkpoint held.
pub(crate) struct Loaded {
    pub(crate) path: PathBuf,
    pub(crate) producers: Vec<(u64, Progress)>,
    pub(crate) keys: usize,
    pub(crate) counters: usize,
}

fn encode(state: &State) -> Vec<u8> {
    let mut keys = Vec::new();
    for store in &state.stores {
        for (key, counters) in store.iter() {
            let mut previous = 0i64;
            let mut second_deltas = Vec::new();
            let mut counts = Vec::new();
            for (second, count) in counters {
                second_deltas.push((second - previous) as u64);
                previous = second;
                counts.push(count);
            }
            keys.push(KeyCounters {
                key: key.to_owned(),
                second_deltas,
                counts,
            });
        }
    }
    let producers = state
        .producers
        .iter()
        .map(|(producer_id, progress)| ProducerProgress {
            producer_id: *producer_id,
            applied_through: progress.through,
            applied_above: progress.above.iter().copied().collect(),
        })
        .collect();
    Checkpoint {
        version: FORMAT,
        taken_at_ms: state.taken_at_ms,
        producers,
        keys,
    }
    .encode_to_vec()
}

fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// Writes `state` as the newest checkpoint in `dir` and deletes older ones. Returns the bytes
/// written. Blocking: run it on a blocking thread.
pub(crate) fn write(dir: &Path, state: &State) -> Result<u64, CheckpointError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let payload = encode(state);
    let mut file_bytes = Vec::with_capacity(HEADER + payload.len());
    file_bytes.extend_from_slice(MAGIC);
    file_bytes.extend_from_slice(&FORMAT.to_le_bytes());
    file_bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    file_bytes.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    file_bytes.extend_from_slice(&payload);

    let name = format!("checkpoint-{:020}.ckpt", state.taken_at_ms.max(0));
    let path = dir.join(&name);
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut file = fs::File::create(&tmp).map_err(io(&tmp))?;
        file.write_all(&file_bytes).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
    }
    fs::rename(&tmp, &path).map_err(io(&path))?;
    sync_dir(dir)?;
    for old in list(dir)? {
        if old != path {
            fs::remove_file(&old).map_err(io(&old))?;
        }
    }
    Ok(file_bytes.len() as u64)
}

/// Checkpoint files in `dir`, oldest first; leftover `.tmp` files of an interrupted write are
/// deleted.
fn list(dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.starts_with("checkpoint-") && name.ends_with(".ckpt.tmp") {
            fs::remove_file(&path).map_err(io(&path))?;
        } else if name.starts_with("checkpoint-") && name.ends_with(".ckpt") {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

/// Loads the newest checkpoint of `dir` into one store per owner (keys placed with `owner_of`).
/// `Ok(None)` when there is none.
pub(crate) fn load(
    dir: &Path,
    owners: usize,
    limits: StoreLimits,
) -> Result<Option<(Loaded, Vec<WindowStore>)>, CheckpointError> {
    if !dir.exists() {
        return Ok(None);
    }
    let Some(path) = list(dir)?.pop() else {
        return Ok(None);
    };
    let corrupt = |reason: String| CheckpointError::Corrupt {
        path: path.clone(),
        reason,
    };
    let bytes = fs::read(&path).map_err(io(&path))?;
    if bytes.len() < HEADER || &bytes[..4] != MAGIC {
        return Err(corrupt(
            "not a checkpoint file (bad magic or too short)".into(),
        ));
    }
    let word =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let format = word(4);
    if format != FORMAT {
        return Err(corrupt(format!(
            "format version {format}, this build reads {FORMAT}"
        )));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[8..16]);
    let len = u64::from_le_bytes(len) as usize;
    let payload = &bytes[HEADER..];
    if payload.len() != len {
        return Err(corrupt(format!(
            "payload is {} bytes, header says {len}",
            payload.len()
        )));
    }
    if crc32fast::hash(payload) != word(16) {
        return Err(corrupt("checksum mismatch".into()));
    }
    let checkpoint = Checkpoint::decode(payload).map_err(|e| corrupt(e.to_string()))?;

    let owners = owners.max(1);
    let mut stores: Vec<WindowStore> = (0..owners).map(|_| WindowStore::new(limits)).collect();
    let (mut keys, mut counters) = (0, 0);
    for key in checkpoint.keys {
        if key.second_deltas.len() != key.counts.len() {
            return Err(corrupt(format!(
                "key {:?} has mismatched counter arrays",
                key.key
            )));
        }
        let store = &mut stores[hitcounter_stack::shard::owner_of(&key.key, owners)];
        let mut second = 0i64;
        for (delta, count) in key.second_deltas.iter().zip(&key.counts) {
            second = second.saturating_add(i64::try_from(*delta).unwrap_or(i64::MAX));
            store
                .add(&key.key, second, *count)
                .map_err(|e| corrupt(format!("key {:?}: {e}", key.key)))?;
            counters += 1;
        }
        keys += 1;
    }
    let producers = checkpoint
        .producers
        .into_iter()
        .map(|p| {
            (
                p.producer_id,
                Progress {
                    through: p.applied_through,
                    above: p.applied_above.into_iter().collect(),
                },
            )
        })
        .collect();
    Ok(Some((
        Loaded {
            path,
            producers,
            keys,
            counters,
        },
        stores,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(taken_at_ms: i64) -> State {
        let mut a = WindowStore::default();
        a.add("/a", 1_700_000_000, 3).unwrap();
        a.add("/a", 1_700_000_005, 4).unwrap();
        let mut b = WindowStore::default();
        b.add("/b", 1_700_000_001, 1).unwrap();
        State {
            taken_at_ms,
            producers: vec![(
                7,
                Progress {
                    through: 41,
                    above: [43].into(),
                },
            )],
            stores: vec![a, b],
        }
    }

    #[test]
    fn round_trip_keeps_counts_and_progress_and_only_the_newest_file() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &state(1)).unwrap();
        write(dir.path(), &state(2)).unwrap();
        assert_eq!(list(dir.path()).unwrap().len(), 1);
        let (loaded, stores) = load(dir.path(), 3, StoreLimits::default())
            .unwrap()
            .unwrap();
        assert_eq!((loaded.keys, loaded.counters), (2, 3));
        assert_eq!(
            loaded.producers,
            vec![(
                7,
                Progress {
                    through: 41,
                    above: [43].into()
                }
            )]
        );
        let total = |key: &str| {
            stores
                .iter()
                .map(|s| s.count(key, 1_700_000_010, 60))
                .sum::<u64>()
        };
        assert_eq!((total("/a"), total("/b")), (7, 1));
        // Each key sits in exactly the store of its owner.
        for (i, store) in stores.iter().enumerate() {
            for (key, _) in store.iter() {
                assert_eq!(hitcounter_stack::shard::owner_of(key, 3), i);
            }
        }
    }

    #[test]
    fn a_damaged_newest_checkpoint_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &state(5)).unwrap();
        let path = list(dir.path()).unwrap().pop().unwrap();
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        fs::write(&path, bytes).unwrap();
        let error = load(dir.path(), 1, StoreLimits::default()).err().unwrap();
        let message = error.to_string();
        assert!(
            message.contains("checksum") && message.contains(&path.display().to_string()),
            "{message}"
        );
    }

    #[test]
    fn interrupted_writes_are_ignored_and_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("checkpoint-00000000000000000009.ckpt.tmp"),
            b"half",
        )
        .unwrap();
        assert!(load(dir.path(), 1, StoreLimits::default())
            .unwrap()
            .is_none());
        assert!(list(dir.path()).unwrap().is_empty());
        assert!(load(&dir.path().join("missing"), 1, StoreLimits::default())
            .unwrap()
            .is_none());
    }
}
