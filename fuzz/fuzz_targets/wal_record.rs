//! Fuzz target: the WAL's record decoder and its recovery. Part one decodes the raw input as a
//! record (`decode_record` must never panic, and what it accepts must re-encode to the same
//! bytes). Part two builds a log directory from valid records the input describes, damages it
//! as the input says (bit flips, truncation, inserted bytes, a second segment), opens it the way
//! ingest does at start, and checks what recovery promises: it never panics, every record it
//! keeps is one that was written (same seq, same payload), and the recovered log takes and
//! returns a new record.
#![no_main]

use std::{path::Path, sync::Arc};

use hitcounter_wal::{
    decode_record, encode_record,
    sim::SimStorage,
    storage::{OpenMode, Storage},
    FsyncPolicy, Log, LogConfig,
};
use libfuzzer_sys::{arbitrary, fuzz_target};

#[derive(Debug, arbitrary::Arbitrary)]
enum Edit {
    Flip { at: u16, bit: u8 },
    Truncate { at: u16 },
    Insert { at: u16, bytes: Vec<u8> },
}

#[derive(Debug, arbitrary::Arbitrary)]
struct Damaged {
    /// Any seq, up to the very top of the range.
    first_seq: u64,
    payloads: Vec<Vec<u8>>,
    /// Records (counted from the first) that go to the first segment; the rest to a second.
    split: Option<u8>,
    edits: Vec<Edit>,
    raw: Vec<u8>,
}

fn apply(bytes: &mut Vec<u8>, edit: &Edit) {
    match *edit {
        Edit::Flip { at, bit } => {
            if let Some(byte) = bytes.get_mut(usize::from(at)) {
                *byte ^= 1 << (bit % 8);
            }
        }
        Edit::Truncate { at } => bytes.truncate(usize::from(at)),
        Edit::Insert {
            at,
            bytes: ref inserted,
        } => {
            let at = usize::from(at).min(bytes.len());
            bytes.splice(at..at, inserted.iter().copied());
        }
    }
}

fn write(storage: &SimStorage, path: &Path, bytes: &[u8]) {
    use std::io::Write;
    let mut file = storage
        .open(path, OpenMode::CreateTruncate)
        .expect("the simulated file system creates files");
    file.write_all(bytes).expect("and writes them");
    file.sync_all().expect("and syncs them");
}

fuzz_target!(|input: Damaged| {
    if let Ok(Some(record)) = decode_record(&input.raw) {
        assert!(record.len <= input.raw.len());
        let mut again = Vec::new();
        encode_record(record.seq, record.payload, &mut again);
        assert_eq!(
            again,
            input.raw[..record.len],
            "a decoded record re-encodes as read"
        );
    }

    // Below u64::MAX: the log refuses to append at the very last seq (SeqExhausted, rightly;
    // the first -a run of this target stopped there), and this target appends one record.
    let first_seq = input.first_seq.clamp(1, u64::MAX - 1);
    // Records whose seq and successor exist and room for one more appended (a record at u64::MAX has no next seq: the log
    // refuses it as corrupt, which is right, and not what this target checks).
    let mut payloads = input.payloads;
    payloads
        .truncate(usize::try_from((u64::MAX - 1).saturating_sub(first_seq)).unwrap_or(usize::MAX));
    let input = Damaged { payloads, ..input };
    let split = input.split.map_or(input.payloads.len(), |s| {
        usize::from(s).min(input.payloads.len())
    });
    let mut segments = vec![(first_seq, Vec::new())];
    for (i, payload) in input.payloads.iter().enumerate() {
        if i == split && i > 0 {
            segments.push((first_seq + i as u64, Vec::new()));
        }
        let seq = first_seq + i as u64;
        encode_record(
            seq,
            payload,
            &mut segments.last_mut().expect("one segment").1,
        );
    }
    // Edits hit the last segment, where a torn tail is legitimate, and the first otherwise.
    let damaged = segments.len() - 1;
    for edit in &input.edits {
        apply(&mut segments[damaged].1, edit);
    }
    let storage = Arc::new(SimStorage::new());
    let dir = Path::new("/log");
    storage.create_dir_all_durably(dir).expect("a directory");
    for (seq, bytes) in &segments {
        write(&storage, &dir.join(format!("{seq:020}.log")), bytes);
    }
    let config = LogConfig {
        dir: dir.to_owned(),
        segment_bytes: 4096,
        fsync: FsyncPolicy::Always,
    };
    let Ok((mut log, recovery)) = Log::open_in(config.clone(), storage.clone()) else {
        assert!(!input.edits.is_empty(), "an undamaged log opens");
        return;
    };
    let next = recovery.next_seq;
    assert!(next >= first_seq);
    if input.edits.is_empty() {
        assert_eq!(
            next,
            first_seq + input.payloads.len() as u64,
            "nothing is lost"
        );
    }
    let mut reader = log
        .reader(log.first_seq())
        .expect("a reader from the first seq");
    let mut seen = 0;
    while let Some((seq, payload)) = reader.next(next - 1).expect("recovered records read back") {
        let index = usize::try_from(seq - first_seq).expect("a small index");
        assert_eq!(
            payload, input.payloads[index],
            "record {seq} is what was written"
        );
        seen += 1;
    }
    assert_eq!(seen, next - log.first_seq());
    let range = log
        .append(&[b"after recovery"])
        .expect("the recovered log appends");
    log.sync().expect("and syncs");
    assert_eq!(range.start, next);
    drop(reader);
    drop(log);
    let (log, again) = Log::open_in(config, storage).expect("and opens again");
    assert_eq!(again.next_seq, next + 1);
    assert!(
        again.truncated.is_none(),
        "nothing torn after a clean append"
    );
    let mut reader = log.reader(next).expect("a reader of the new record");
    let (seq, payload) = reader.next(next).expect("it reads").expect("it is there");
    assert_eq!((seq, payload.as_slice()), (next, &b"after recovery"[..]));
});
