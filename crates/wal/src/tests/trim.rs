//! What trimming deletes, and [`Log::can_trim`] telling it in advance.

use super::{append_each, config, segment_files};
use crate::Log;

#[test]
fn can_trim_says_whether_trim_would_delete_a_segment() {
    let tmp = tempfile::tempdir().unwrap();
    // Small segments: a few records each.
    let (mut log, _) = Log::open(config(tmp.path(), 100)).unwrap();
    append_each(&mut log, 1..20);
    let segments = segment_files(tmp.path());
    assert!(segments.len() >= 3);
    // The second segment's name is the first seq after the oldest segment.
    let second_first: u64 = segments[1]
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let oldest_last = second_first - 1;
    assert!(!log.can_trim(oldest_last - 1));
    assert_eq!(log.trim(oldest_last - 1).unwrap(), 0);
    assert!(log.can_trim(oldest_last));
    assert!(log.trim(oldest_last).unwrap() > 0);
    assert_eq!(log.first_seq(), second_first);
    // Never the active segment.
    assert!(!log.can_trim(u64::MAX) || log.segment_count() > 1);
    log.trim(u64::MAX).unwrap();
    assert_eq!(log.segment_count(), 1);
    assert!(!log.can_trim(u64::MAX));
}
