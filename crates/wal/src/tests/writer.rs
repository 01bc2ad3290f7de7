//! The writer and readers in normal operation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{append_each, config, payload, read_all, segment_files};
use crate::{FsyncPolicy, Log, LogConfig, LogError, MAX_RECORD_BYTES, RECORD_HEADER_BYTES};

#[test]
fn a_new_log_is_empty_and_starts_at_seq_1() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shard-0");
    let (log, recovery) = Log::open(config(&dir, 1024)).unwrap();
    assert_eq!(recovery.segments, 1);
    assert_eq!(recovery.records, 0);
    assert_eq!(recovery.next_seq, 1);
    assert_eq!(recovery.truncated, None);
    assert_eq!(
        (log.first_seq(), log.next_seq(), log.durable_seq()),
        (1, 1, 0)
    );
    assert_eq!(log.size_bytes(), 0);
    assert_eq!(
        segment_files(&dir),
        vec![dir.join("00000000000000000001.log")]
    );
    drop(log);
    // Reopening an empty log changes nothing.
    let (log, recovery) = Log::open(config(&dir, 1024)).unwrap();
    assert_eq!(
        (recovery.segments, recovery.records, recovery.next_seq),
        (1, 0, 1)
    );
    assert_eq!(log.next_seq(), 1);
}

#[test]
fn append_and_reopen_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(config(tmp.path(), 1 << 20)).unwrap();
    assert_eq!(log.append(&[]).unwrap(), 1..1);
    assert_eq!(log.append(&[b"one"]).unwrap(), 1..2);
    assert_eq!(log.append(&[b"two", b"", b"four"]).unwrap(), 2..5);
    let big = vec![7u8; 100_000];
    assert_eq!(log.append(&[&big]).unwrap(), 5..6);
    log.sync().unwrap();
    let expected: Vec<(u64, Vec<u8>)> = vec![
        (1, b"one".to_vec()),
        (2, b"two".to_vec()),
        (3, b"".to_vec()),
        (4, b"four".to_vec()),
        (5, big.clone()),
    ];
    assert_eq!(read_all(&log, 1), expected);
    let size = log.size_bytes();
    assert_eq!(
        size,
        (5 * RECORD_HEADER_BYTES + 3 + 3 + 4 + big.len()) as u64
    );
    drop(log);

    let (mut log, recovery) = Log::open(config(tmp.path(), 1 << 20)).unwrap();
    assert_eq!(
        (recovery.segments, recovery.records, recovery.next_seq),
        (1, 5, 6)
    );
    assert_eq!(recovery.truncated, None);
    assert_eq!(
        (log.first_seq(), log.next_seq(), log.durable_seq()),
        (1, 6, 5)
    );
    assert_eq!(log.size_bytes(), size);
    assert_eq!(read_all(&log, 1), expected);
    assert_eq!(log.append(&[b"six"]).unwrap(), 6..7);
    assert_eq!(read_all(&log, 6), vec![(6, b"six".to_vec())]);
}

#[test]
fn segments_roll_over_and_are_named_by_their_first_seq() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // 20-byte payloads make 42-byte records: two fit in 100 bytes, a third does not.
    let (mut log, _) = Log::open(config(dir, 100)).unwrap();
    let p = [0u8; 20];
    for seq in 1..=5 {
        assert_eq!(log.append(&[&p]).unwrap(), seq..seq + 1);
    }
    let names = |dir| -> Vec<String> {
        segment_files(dir)
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(
        names(dir),
        [
            "00000000000000000001.log",
            "00000000000000000003.log",
            "00000000000000000005.log"
        ]
    );
    assert_eq!(log.segment_count(), 3);
    // A batch larger than a segment is written whole into a segment of its own.
    assert_eq!(log.append(&[&p, &p, &p, &p]).unwrap(), 6..10);
    assert_eq!(log.append(&[&p]).unwrap(), 10..11);
    assert_eq!(
        names(dir)[3..],
        ["00000000000000000006.log", "00000000000000000010.log"]
    );
    let on_disk: u64 = segment_files(dir)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!(log.size_bytes(), on_disk);
    assert_eq!(
        std::fs::metadata(dir.join("00000000000000000006.log"))
            .unwrap()
            .len(),
        4 * 42
    );
    drop(log);

    let (log, recovery) = Log::open(config(dir, 100)).unwrap();
    assert_eq!(
        (recovery.segments, recovery.records, recovery.next_seq),
        (5, 10, 11)
    );
    assert_eq!(read_all(&log, 1).len(), 10);
}

#[test]
fn segment_bytes_zero_gives_each_batch_its_own_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(config(tmp.path(), 0)).unwrap();
    append_each(&mut log, 1..4);
    assert_eq!(log.segment_count(), 3);
    assert_eq!(read_all(&log, 1).len(), 3);
}

/// A log with segments [1,2] [3,4] [5,6] and the active [7].
fn four_segments(dir: &std::path::Path) -> Log {
    let (mut log, _) = Log::open(config(dir, 100)).unwrap();
    let p = [1u8; 20];
    for _ in 1..=7 {
        log.append(&[&p]).unwrap();
    }
    assert_eq!(log.segment_count(), 4);
    log
}

#[test]
fn trim_deletes_only_whole_old_segments_and_never_the_active_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut log = four_segments(dir);
    assert_eq!(log.trim(0).unwrap(), 0);
    // Seq 3 is in the second segment, which also holds 4: only the first segment goes.
    assert_eq!(log.trim(3).unwrap(), 84);
    assert_eq!(log.first_seq(), 3);
    assert_eq!(segment_files(dir).len(), 3);
    assert_eq!(log.trim(4).unwrap(), 84);
    assert_eq!(log.first_seq(), 5);
    // Even trimming past the end keeps the active segment and its record.
    assert_eq!(log.trim(u64::MAX).unwrap(), 84);
    assert_eq!((log.first_seq(), log.next_seq()), (7, 8));
    assert_eq!(
        segment_files(dir),
        vec![dir.join("00000000000000000007.log")]
    );
    assert_eq!(log.size_bytes(), 42);
    assert_eq!(log.trim(u64::MAX).unwrap(), 0);
    assert_eq!(read_all(&log, 7).len(), 1);
    drop(log);

    let (log, recovery) = Log::open(config(dir, 100)).unwrap();
    assert_eq!(
        (recovery.segments, recovery.records, recovery.next_seq),
        (1, 1, 8)
    );
    assert_eq!((log.first_seq(), log.next_seq()), (7, 8));
}

#[test]
fn reader_follows_roll_over_and_stops_at_up_to() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(config(tmp.path(), 100)).unwrap();
    append_each(&mut log, 1..8);
    let mut reader = log.reader(1).unwrap();
    for seq in 1..=4 {
        assert_eq!(reader.next(4).unwrap(), Some((seq, payload(seq))));
    }
    assert_eq!(reader.next(4).unwrap(), None);
    assert_eq!(reader.next(4).unwrap(), None);
    assert_eq!(reader.position(), 5);
    for seq in 5..=7 {
        assert_eq!(reader.next(7).unwrap(), Some((seq, payload(seq))));
    }
    assert_eq!(reader.next(7).unwrap(), None);

    // Starting in the middle of a segment skips the records before.
    let mut reader = log.reader(4).unwrap();
    assert_eq!(reader.next(7).unwrap(), Some((4, payload(4))));

    // A reader at the end waits for records, across a roll to a new segment.
    let mut tail = log.reader(8).unwrap();
    assert_eq!(tail.next(7).unwrap(), None);
    append_each(&mut log, 8..12);
    assert!(log.segment_count() > 4);
    for seq in 8..=11 {
        assert_eq!(tail.next(11).unwrap(), Some((seq, payload(seq))));
    }
    assert_eq!(tail.next(11).unwrap(), None);
}

#[test]
fn reader_of_a_trimmed_seq_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = four_segments(tmp.path());
    log.trim(4).unwrap();
    match log.reader(4) {
        Err(LogError::Trimmed {
            requested: 4,
            first: 5,
        }) => {}
        other => panic!("expected Trimmed, got {other:?}"),
    }
    assert!(matches!(
        log.reader(0),
        Err(LogError::Trimmed {
            requested: 0,
            first: 5
        })
    ));
    assert!(log.reader(5).is_ok());
    assert!(log.reader(8).is_ok());
    assert!(matches!(
        log.reader(9),
        Err(LogError::BeyondEnd {
            requested: 9,
            next: 8
        })
    ));
}

#[test]
fn reader_behind_a_trim_reads_its_open_segment_then_reports_trimmed() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = four_segments(tmp.path());
    let mut reader = log.reader(1).unwrap();
    assert_eq!(reader.next(7).unwrap().map(|r| r.0), Some(1));
    log.trim(4).unwrap();
    // Its open handle keeps segment 1 readable.
    assert_eq!(reader.next(7).unwrap().map(|r| r.0), Some(2));
    match reader.next(7) {
        Err(LogError::Trimmed {
            requested: 3,
            first: 5,
        }) => {}
        other => panic!("expected Trimmed, got {other:?}"),
    }
}

#[test]
fn reader_reports_up_to_beyond_the_appended_records() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(config(tmp.path(), 1 << 20)).unwrap();
    append_each(&mut log, 1..3);
    let mut reader = log.reader(1).unwrap();
    assert!(reader.next(5).unwrap().is_some());
    assert!(reader.next(5).unwrap().is_some());
    match reader.next(5) {
        Err(LogError::Corrupt { offset, reason, .. }) => {
            assert_eq!(offset, log.size_bytes());
            assert!(reason.contains("seq 3"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn reader_on_another_thread_sees_every_record_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(config(tmp.path(), 4096)).unwrap();
    let mut reader = log.reader(1).unwrap();
    let appended = Arc::new(AtomicU64::new(0));
    const TOTAL: u64 = 2000;
    let writer = {
        let appended = Arc::clone(&appended);
        std::thread::spawn(move || {
            let mut seq = 1;
            while seq <= TOTAL {
                let batch: Vec<Vec<u8>> = (seq..(seq + seq % 7 + 1).min(TOTAL + 1))
                    .map(payload)
                    .collect();
                let refs: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
                let range = log.append(&refs).unwrap();
                assert_eq!(range.start, seq);
                seq = range.end;
                log.sync().unwrap();
                appended.store(seq - 1, Ordering::Release);
            }
            log
        })
    };
    let mut next = 1;
    while next <= TOTAL {
        match reader.next(appended.load(Ordering::Acquire)).unwrap() {
            Some((seq, bytes)) => {
                assert_eq!((seq, &bytes), (next, &payload(next)));
                next += 1;
            }
            None => std::thread::yield_now(),
        }
    }
    let log = writer.join().unwrap();
    assert!(log.segment_count() > 10);
}

#[test]
fn sync_runs_under_each_policy() {
    for policy in [
        FsyncPolicy::Always,
        FsyncPolicy::Never,
        FsyncPolicy::Interval(Duration::ZERO),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let mut log = Log::open(LogConfig {
            fsync: policy,
            ..config(tmp.path(), 100)
        })
        .unwrap()
        .0;
        // Includes a roll, so the directory needs syncing as well.
        append_each(&mut log, 1..5);
        log.sync().unwrap();
        match policy {
            // Rolling synced the sealed segments, nothing synced the active one.
            FsyncPolicy::Never => assert_eq!(log.durable_seq(), 3, "{policy:?}"),
            _ => assert_eq!(log.durable_seq(), 4, "{policy:?}"),
        }
        log.sync_now().unwrap();
        assert_eq!(log.durable_seq(), 4);
        // Nothing new: a no-op.
        log.sync().unwrap();
    }
}

// `Interval` is judged by the wall clock (`Instant`), which a test cannot pause. Each of the
// two tests below therefore picks an interval for which its expectation holds whatever the
// machine's speed: one that cannot pass during the test (an hour) to check the skips, and one
// the test waits out for certain (a sleep is never shorter than asked) to check the fsync. A
// single 300 ms interval made both depend on timing: on a loaded machine more than 300 ms could
// pass between open and the first `sync`, which then synced and broke the "skips" assertion.

#[test]
fn interval_sync_skips_within_the_interval() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = Log::open(LogConfig {
        fsync: FsyncPolicy::Interval(Duration::from_secs(3600)),
        ..config(tmp.path(), 1 << 20)
    })
    .unwrap()
    .0;
    append_each(&mut log, 1..2);
    // Open counts as a sync, so calls within the interval skip.
    log.sync().unwrap();
    assert_eq!(log.durable_seq(), 0);
    append_each(&mut log, 2..3);
    log.sync().unwrap();
    assert_eq!(log.durable_seq(), 0);
    // `sync_now` does not wait for the interval.
    log.sync_now().unwrap();
    assert_eq!(log.durable_seq(), 2);
}

#[test]
fn interval_sync_syncs_once_the_interval_has_passed() {
    let tmp = tempfile::tempdir().unwrap();
    let interval = Duration::from_millis(20);
    let mut log = Log::open(LogConfig {
        fsync: FsyncPolicy::Interval(interval),
        ..config(tmp.path(), 1 << 20)
    })
    .unwrap()
    .0;
    append_each(&mut log, 1..2);
    std::thread::sleep(interval);
    log.sync().unwrap();
    assert_eq!(log.durable_seq(), 1);
    append_each(&mut log, 2..3);
    std::thread::sleep(interval);
    log.sync().unwrap();
    assert_eq!(log.durable_seq(), 2);
}

#[test]
fn an_oversized_payload_fails_the_batch_without_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(config(tmp.path(), 1 << 20)).unwrap();
    let huge = vec![0u8; MAX_RECORD_BYTES + 1];
    match log.append(&[b"ok", &huge]) {
        Err(LogError::RecordTooLarge { len, max }) => {
            assert_eq!((len, max), (MAX_RECORD_BYTES + 1, MAX_RECORD_BYTES))
        }
        other => panic!("expected RecordTooLarge, got {other:?}"),
    }
    assert_eq!((log.next_seq(), log.size_bytes()), (1, 0));
    assert_eq!(log.append(&[b"ok"]).unwrap(), 1..2);
}

#[test]
fn a_poisoned_log_and_its_readers_refuse_work() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(config(tmp.path(), 1 << 20)).unwrap();
    append_each(&mut log, 1..3);
    let mut reader = log.reader(1).unwrap();
    log.set_poison("simulated fsync failure".to_owned());
    assert!(matches!(
        log.append(&[b"x"]),
        Err(LogError::Poisoned { .. })
    ));
    assert!(matches!(log.sync(), Err(LogError::Poisoned { .. })));
    assert!(matches!(log.trim(10), Err(LogError::Poisoned { .. })));
    match reader.next(2) {
        Err(e @ LogError::Poisoned { .. }) => {
            assert!(e.to_string().contains("simulated fsync failure"))
        }
        other => panic!("expected Poisoned, got {other:?}"),
    }
    drop((log, reader));
    // Reopening recovers.
    let (log, recovery) = Log::open(config(tmp.path(), 1 << 20)).unwrap();
    assert_eq!(recovery.records, 2);
    assert_eq!(read_all(&log, 1).len(), 2);
}

#[test]
fn other_files_in_the_directory_are_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("LOCK"), b"").unwrap();
    std::fs::write(tmp.path().join("notes.txt"), b"hello").unwrap();
    let (mut log, _) = Log::open(config(tmp.path(), 1 << 20)).unwrap();
    append_each(&mut log, 1..3);
    drop(log);
    let (_, recovery) = Log::open(config(tmp.path(), 1 << 20)).unwrap();
    assert_eq!(recovery.records, 2);
}

#[test]
fn log_and_reader_can_move_between_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Log>();
    send::<crate::LogReader>();
    send_sync::<LogError>();
}

/// A flush half-written across two logs (the second append failed for lack of space) is taken
/// back out of the first: the seqs are handed out again, nothing of it is read or recovered, and
/// only the last unsynced append can be undone.
#[test]
fn the_last_unsynced_append_can_be_undone() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(config(tmp.path(), 1 << 20)).unwrap();
    log.append(&[b"one"]).unwrap();
    log.sync_now().unwrap();
    let size = log.size_bytes();
    let undone = log.append(&[b"two", b"three"]).unwrap();
    assert_eq!(undone, 2..4);
    log.undo_append(undone.clone()).unwrap();
    assert_eq!((log.next_seq(), log.size_bytes()), (2, size));
    // Undoing twice, or a synced append, is refused.
    assert!(log.undo_append(undone).is_err());
    assert_eq!(log.append(&[b"two again"]).unwrap(), 2..3);
    log.sync_now().unwrap();
    assert!(log.undo_append(2..3).is_err());
    assert_eq!(
        read_all(&log, 1),
        vec![(1, b"one".to_vec()), (2, b"two again".to_vec())]
    );
    drop(log);
    let (log, recovery) = Log::open(config(tmp.path(), 1 << 20)).unwrap();
    assert_eq!((recovery.records, recovery.truncated), (2, None));
    assert_eq!(log.next_seq(), 3);
}

/// An append into a freshly rolled segment can be undone too: the segment is left empty, which
/// the log allows.
#[test]
fn an_undone_append_after_a_roll_leaves_an_empty_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(config(tmp.path(), 64)).unwrap();
    log.append(&[&[1u8; 40]]).unwrap();
    let undone = log.append(&[&[2u8; 40]]).unwrap();
    assert_eq!(log.segment_count(), 2);
    log.undo_append(undone).unwrap();
    assert_eq!(log.next_seq(), 2);
    assert_eq!(log.append(&[b"later"]).unwrap(), 2..3);
    log.sync_now().unwrap();
    drop(log);
    let (log, recovery) = Log::open(config(tmp.path(), 64)).unwrap();
    assert_eq!((recovery.records, recovery.truncated), (2, None));
    assert_eq!(read_all(&log, 2), vec![(2, b"later".to_vec())]);
}
