//! Crash recovery: torn tails are cut, everything else is reported as corruption.

use std::path::{Path, PathBuf};

use super::{append_each, config, payload, read_all, segment_files};
use crate::{decode_record, encode_record, Log, LogError, Recovery, RECORD_HEADER_BYTES};

const SEGMENT_BYTES: u64 = 200;

/// A closed log with records 1..=9 (one per batch) and a last batch of 10 and 11, spread over
/// several segments; the last segment holds at least 10 and 11.
fn template(segment_bytes: u64) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(config(tmp.path(), segment_bytes)).unwrap();
    append_each(&mut log, 1..10);
    let (ten, eleven) = (payload(10), payload(11));
    assert_eq!(log.append(&[&ten, &eleven]).unwrap(), 10..12);
    log.sync_now().unwrap();
    assert!(segment_files(tmp.path()).len() >= 3);
    tmp
}

fn copy_log(from: &Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().unwrap();
    for file in segment_files(from) {
        std::fs::copy(&file, to.path().join(file.file_name().unwrap())).unwrap();
    }
    to
}

/// Offsets of the records in a segment file.
fn record_offsets(file: &Path) -> Vec<(u64, usize)> {
    let bytes = std::fs::read(file).unwrap();
    let mut at = 0;
    let mut out = Vec::new();
    while at < bytes.len() {
        let record = decode_record(&bytes[at..]).unwrap().unwrap();
        out.push((at as u64, record.len));
        at += record.len;
    }
    out
}

fn expected_records(through: u64) -> Vec<(u64, Vec<u8>)> {
    (1..=through).map(|seq| (seq, payload(seq))).collect()
}

/// Checks that after a recovery which kept records 1..=`kept`, appending works and survives
/// another (clean) reopen.
fn append_after_recovery_survives_reopen(dir: &Path, kept: u64) {
    let (mut log, _) = Log::open(config(dir, SEGMENT_BYTES)).unwrap();
    assert_eq!(
        log.append(&[b"after the crash"]).unwrap(),
        kept + 1..kept + 2
    );
    log.sync_now().unwrap();
    drop(log);
    let (log, recovery) = Log::open(config(dir, SEGMENT_BYTES)).unwrap();
    assert_eq!(recovery.truncated, None);
    assert_eq!((recovery.records, recovery.next_seq), (kept + 1, kept + 2));
    let mut expected = expected_records(kept);
    expected.push((kept + 1, b"after the crash".to_vec()));
    assert_eq!(read_all(&log, 1), expected);
}

fn open_expecting_truncation(
    dir: &Path,
    file: &Path,
    offset: u64,
    dropped: u64,
    kept: u64,
) -> Recovery {
    let (log, recovery) = Log::open(config(dir, SEGMENT_BYTES))
        .unwrap_or_else(|e| panic!("open after a torn tail must succeed, got {e}"));
    let truncation = recovery.truncated.clone().expect("truncation reported");
    assert_eq!(truncation.file, file);
    assert_eq!(
        (truncation.offset, truncation.bytes_dropped),
        (offset, dropped),
        "{truncation:?}"
    );
    assert_eq!((recovery.records, recovery.next_seq), (kept, kept + 1));
    assert_eq!(std::fs::metadata(file).unwrap().len(), offset);
    assert_eq!(read_all(&log, 1), expected_records(kept));
    recovery
}

fn torn_last_record_at_every_offset(segment_bytes: u64) {
    let template = template(segment_bytes);
    let last_file = segment_files(template.path()).pop().unwrap();
    let &(start, len) = record_offsets(&last_file).last().unwrap();
    for cut in start + 1..start + len as u64 {
        let dir = copy_log(template.path());
        let file = dir.path().join(last_file.file_name().unwrap());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(cut)
            .unwrap();
        open_expecting_truncation(dir.path(), &file, start, cut - start, 10);
        append_after_recovery_survives_reopen(dir.path(), 10);
    }
    // Cut exactly at the record boundary: a clean log, nothing to report.
    let dir = copy_log(template.path());
    let file = dir.path().join(last_file.file_name().unwrap());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(start)
        .unwrap();
    let (_, recovery) = Log::open(config(dir.path(), SEGMENT_BYTES)).unwrap();
    assert_eq!((recovery.truncated, recovery.records), (None, 10));
}

#[test]
fn a_torn_last_record_is_cut_at_every_offset() {
    torn_last_record_at_every_offset(SEGMENT_BYTES);
}

#[test]
fn a_torn_record_alone_in_the_last_segment_leaves_it_empty() {
    // Segment size 0: every batch has its own segment, so tearing record 11 in the last segment
    // leaves record 10 before it, and with a single-record last batch the segment empties.
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(config(tmp.path(), 0)).unwrap();
    append_each(&mut log, 1..12);
    drop(log);
    let last_file = segment_files(tmp.path()).pop().unwrap();
    assert!(last_file.ends_with("00000000000000000011.log"));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&last_file)
        .unwrap()
        .set_len(5)
        .unwrap();
    let (mut log, recovery) = Log::open(config(tmp.path(), 0)).unwrap();
    assert_eq!(
        recovery
            .truncated
            .as_ref()
            .map(|t| (t.offset, t.bytes_dropped)),
        Some((0, 5))
    );
    assert_eq!(
        (recovery.segments, recovery.records, recovery.next_seq),
        (11, 10, 11)
    );
    assert_eq!(log.append(&[b"again"]).unwrap(), 11..12);
    drop(log);
    let (_, recovery) = Log::open(config(tmp.path(), 0)).unwrap();
    assert_eq!(
        (recovery.truncated, recovery.records, recovery.next_seq),
        (None, 11, 12)
    );
}

/// Deterministic pseudo-random bytes (xorshift), so failures replay.
fn noise(len: usize, mut state: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

#[test]
fn garbage_or_zeros_after_the_last_good_record_are_cut() {
    let template = template(SEGMENT_BYTES);
    let last_file = segment_files(template.path()).pop().unwrap();
    let good_len = std::fs::metadata(&last_file).unwrap().len();

    let mut tails: Vec<(String, Vec<u8>)> = Vec::new();
    for len in [1, 2, 21, 22, 23, 100, 4096] {
        tails.push((format!("{len} zeros"), vec![0; len]));
    }
    for (i, len) in [1, 5, 22, 50, 1000, 10_000].into_iter().enumerate() {
        tails.push((
            format!("{len} random bytes"),
            noise(len, 0x9E37_79B9_7F4A_7C15 + i as u64),
        ));
    }
    for len in [30, 5000] {
        let mut tail = vec![0xA1, 0x57];
        tail.extend(noise(len, 42 + len as u64));
        tails.push((format!("magic and {len} random bytes"), tail));
    }
    // A whole valid header for seq 12 claiming 1000 bytes, of which only 10 were written.
    let mut full = Vec::new();
    encode_record(12, &[5u8; 1000], &mut full);
    tails.push((
        "a header and a partial payload".to_owned(),
        full[..RECORD_HEADER_BYTES + 10].to_vec(),
    ));
    // The file was extended to the record's length but the payload never reached the disk.
    let mut zeroed = full.clone();
    zeroed[RECORD_HEADER_BYTES..].fill(0);
    tails.push(("a header and a zero payload".to_owned(), zeroed));
    // A record with the wrong seq is no valid continuation either... but it is a valid record,
    // so it is not a torn write: covered by `a_record_with_an_unexpected_seq_is_corrupt`.

    for (what, tail) in tails {
        let dir = copy_log(template.path());
        let file = dir.path().join(last_file.file_name().unwrap());
        let mut bytes = std::fs::read(&file).unwrap();
        bytes.extend_from_slice(&tail);
        std::fs::write(&file, &bytes).unwrap();
        let recovery =
            open_expecting_truncation(dir.path(), &file, good_len, tail.len() as u64, 11);
        assert!(!recovery.truncated.unwrap().reason.is_empty(), "{what}");
        append_after_recovery_survives_reopen(dir.path(), 11);
    }
}

#[test]
fn a_complete_record_followed_by_zeros_is_kept() {
    let template = template(SEGMENT_BYTES);
    let last_file = segment_files(template.path()).pop().unwrap();
    let file = last_file.clone();
    let mut bytes = std::fs::read(&file).unwrap();
    let twelve = payload(12);
    encode_record(12, &twelve, &mut bytes);
    let good_len = bytes.len() as u64;
    bytes.extend_from_slice(&[0; 4096]);
    std::fs::write(&file, &bytes).unwrap();
    open_expecting_truncation(template.path(), &file, good_len, 4096, 12);
    append_after_recovery_survives_reopen(template.path(), 12);
}

/// Snapshot of every segment file's bytes, to check a failed open changed nothing.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    segment_files(dir)
        .into_iter()
        .map(|f| {
            let b = std::fs::read(&f).unwrap();
            (f, b)
        })
        .collect()
}

fn expect_corrupt(dir: &Path, file: &Path, offset: u64) -> String {
    match Log::open(config(dir, SEGMENT_BYTES)) {
        Err(LogError::Corrupt {
            file: f,
            offset: o,
            reason,
        }) => {
            assert_eq!((f.as_path(), o), (file, offset), "{reason}");
            reason
        }
        Err(other) => panic!(
            "expected Corrupt in {} at {offset}, got {other}",
            file.display()
        ),
        Ok((_, recovery)) => panic!(
            "expected Corrupt in {} at {offset}, got {recovery:?}",
            file.display()
        ),
    }
}

/// Flips every byte of the given records of `file` in turn and expects `Corrupt` at the
/// record's offset each time, with nothing on disk changed.
fn flip_each_byte_expecting_corrupt(dir: &Path, file: &Path, records: &[(u64, usize)]) {
    let original = snapshot(dir);
    let clean = std::fs::read(file).unwrap();
    for &(start, len) in records {
        for at in start..start + len as u64 {
            let mut bytes = clean.clone();
            bytes[at as usize] ^= 0x5A;
            std::fs::write(file, &bytes).unwrap();
            let reason = expect_corrupt(dir, file, start);
            assert!(!reason.is_empty());
            let mut after = snapshot(dir);
            // Restore, then compare: a failed open must not have truncated or deleted anything.
            std::fs::write(file, &clean).unwrap();
            for (path, b) in &mut after {
                if path == file {
                    assert_eq!(
                        b,
                        &bytes,
                        "open modified {} after flipping offset {at}",
                        path.display()
                    );
                    *b = clean.clone();
                }
            }
            assert_eq!(after, original);
        }
    }
    // Restored: opens cleanly.
    let (_, recovery) = Log::open(config(dir, SEGMENT_BYTES)).unwrap();
    assert_eq!(recovery.truncated, None);
}

#[test]
fn a_bad_byte_in_a_middle_segment_is_corruption_naming_the_file() {
    let template = template(SEGMENT_BYTES);
    let files = segment_files(template.path());
    for file in &files[..files.len() - 1] {
        flip_each_byte_expecting_corrupt(template.path(), file, &record_offsets(file));
    }
}

#[test]
fn a_bad_record_in_the_last_segment_followed_by_good_ones_is_corruption() {
    let template = template(SEGMENT_BYTES);
    let last_file = segment_files(template.path()).pop().unwrap();
    let records = record_offsets(&last_file);
    assert!(records.len() >= 2);
    // Every record but the last is followed by a good one.
    flip_each_byte_expecting_corrupt(template.path(), &last_file, &records[..records.len() - 1]);
}

#[test]
fn a_bad_byte_in_the_very_last_record_is_a_torn_tail() {
    // Indistinguishable from a torn write (nothing valid follows), so it is cut.
    let template = template(SEGMENT_BYTES);
    let last_file = segment_files(template.path()).pop().unwrap();
    let &(start, len) = record_offsets(&last_file).last().unwrap();
    let mut bytes = std::fs::read(&last_file).unwrap();
    bytes[start as usize + len - 1] ^= 1;
    std::fs::write(&last_file, &bytes).unwrap();
    open_expecting_truncation(template.path(), &last_file, start, len as u64, 10);
}

#[test]
fn an_incomplete_record_in_a_middle_segment_is_corruption() {
    let template = template(SEGMENT_BYTES);
    let first = segment_files(template.path()).remove(0);
    let len = std::fs::metadata(&first).unwrap().len();
    let &(last_start, _) = record_offsets(&first).last().unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&first)
        .unwrap()
        .set_len(len - 1)
        .unwrap();
    let reason = expect_corrupt(template.path(), &first, last_start);
    assert!(reason.contains("incomplete"), "{reason}");
}

#[test]
fn a_missing_middle_segment_is_a_seq_gap() {
    let template = template(SEGMENT_BYTES);
    let files = segment_files(template.path());
    std::fs::remove_file(&files[1]).unwrap();
    let reason = expect_corrupt(template.path(), &files[2], 0);
    assert!(reason.contains("seq gap"), "{reason}");
}

#[test]
fn a_renamed_segment_is_corruption() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(config(tmp.path(), SEGMENT_BYTES)).unwrap();
    append_each(&mut log, 1..3);
    drop(log);
    let renamed = tmp.path().join("00000000000000000005.log");
    std::fs::rename(tmp.path().join("00000000000000000001.log"), &renamed).unwrap();
    let reason = expect_corrupt(tmp.path(), &renamed, 0);
    assert!(
        reason.contains("seq 1") && reason.contains("seq 5"),
        "{reason}"
    );
}

#[test]
fn a_record_with_an_unexpected_seq_is_corrupt() {
    let template = template(SEGMENT_BYTES);
    let last_file = segment_files(template.path()).pop().unwrap();
    let offset = std::fs::metadata(&last_file).unwrap().len();
    let mut bytes = std::fs::read(&last_file).unwrap();
    encode_record(13, b"skips 12", &mut bytes);
    std::fs::write(&last_file, &bytes).unwrap();
    let reason = expect_corrupt(template.path(), &last_file, offset);
    assert!(reason.contains("seq 13"), "{reason}");
}

#[test]
fn unparsable_segment_names_are_corruption() {
    for name in [
        "123.log",
        "0000000000000000000x.log",
        "99999999999999999999.log",
        "00000000000000000000.log",
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(config(tmp.path(), SEGMENT_BYTES)).unwrap();
        append_each(&mut log, 1..3);
        drop(log);
        let bad = tmp.path().join(name);
        std::fs::write(&bad, b"").unwrap();
        expect_corrupt(tmp.path(), &bad, 0);
    }
}

#[test]
fn records_survive_a_reopen_of_a_log_with_trimmed_segments_and_a_torn_tail() {
    let template = template(SEGMENT_BYTES);
    let second: u64 = segment_files(template.path())[1]
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let (mut log, _) = Log::open(config(template.path(), SEGMENT_BYTES)).unwrap();
    let freed = log.trim(second - 1).unwrap();
    assert!(freed > 0);
    let first = log.first_seq();
    assert_eq!(first, second);
    drop(log);
    let last_file = segment_files(template.path()).pop().unwrap();
    let len = std::fs::metadata(&last_file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&last_file)
        .unwrap()
        .set_len(len - 3)
        .unwrap();
    let (log, recovery) = Log::open(config(template.path(), SEGMENT_BYTES)).unwrap();
    assert!(recovery.truncated.is_some());
    assert_eq!((log.first_seq(), log.next_seq()), (first, 11));
    let records = read_all(&log, first);
    assert_eq!(records, expected_records(10)[first as usize - 1..].to_vec());
}
