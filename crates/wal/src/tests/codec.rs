//! Properties of the record codec.

use proptest::prelude::*;

use crate::{
    decode_record, encode_record, DecodeError, DecodedRecord, MAX_RECORD_BYTES,
    RECORD_HEADER_BYTES, RECORD_MAGIC,
};

fn encoded(seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_record(seq, payload, &mut out);
    out
}

/// Bytes that start like a record often enough to exercise the deeper checks.
fn arbitrary_record_like() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..512),
        proptest::collection::vec(any::<u8>(), 0..512).prop_map(|mut v| {
            let magic = RECORD_MAGIC.to_le_bytes();
            v.splice(0..0, magic);
            v
        }),
        // A valid record with random bytes overwritten somewhere.
        (
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..64),
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..8)
        )
            .prop_map(|(seq, payload, at, junk)| {
                let mut v = encoded(seq, &payload);
                let at = at % v.len();
                for (i, b) in junk.into_iter().enumerate() {
                    if let Some(slot) = v.get_mut(at + i) {
                        *slot = b;
                    }
                }
                v
            }),
    ]
}

proptest! {
    #[test]
    fn round_trips(seq in any::<u64>(), payload in proptest::collection::vec(any::<u8>(), 0..2048),
                   trailing in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut buf = encoded(seq, &payload);
        let len = buf.len();
        prop_assert_eq!(len, RECORD_HEADER_BYTES + payload.len());
        buf.extend_from_slice(&trailing);
        let record = decode_record(&buf).unwrap().unwrap();
        prop_assert_eq!(record, DecodedRecord { seq, payload: &payload, len });
    }

    #[test]
    fn arbitrary_bytes_never_yield_an_unchecked_record(bytes in arbitrary_record_like()) {
        if let Ok(Some(record)) = decode_record(&bytes) {
            // A record is only returned if both checksums match, i.e. if re-encoding what was
            // decoded gives exactly the bytes consumed.
            prop_assert_eq!(&encoded(record.seq, record.payload)[..], &bytes[..record.len]);
        }
    }

    #[test]
    fn strict_prefixes_are_incomplete(seq in any::<u64>(), payload in proptest::collection::vec(any::<u8>(), 0..300),
                                      cut in any::<usize>()) {
        let buf = encoded(seq, &payload);
        let cut = cut % buf.len();
        prop_assert_eq!(decode_record(&buf[..cut]), Ok(None));
    }

    #[test]
    fn any_changed_byte_is_an_error(seq in any::<u64>(), payload in proptest::collection::vec(any::<u8>(), 0..300),
                                    at in any::<usize>(), xor in 1..=255u8) {
        let mut buf = encoded(seq, &payload);
        let at = at % buf.len();
        buf[at] ^= xor;
        prop_assert!(decode_record(&buf).is_err());
    }

    #[test]
    fn zeros_after_a_record_are_not_a_record(seq in any::<u64>(), payload in proptest::collection::vec(any::<u8>(), 0..100),
                                             zeros in 0..100usize) {
        let mut buf = encoded(seq, &payload);
        let len = buf.len();
        buf.resize(len + zeros, 0);
        prop_assert_eq!(decode_record(&buf).unwrap().unwrap().len, len);
        let rest = decode_record(&buf[len..]);
        if zeros < 2 {
            prop_assert_eq!(rest, Ok(None));
        } else {
            prop_assert_eq!(rest, Err(DecodeError::BadMagic { found: 0 }));
        }
    }
}

#[test]
fn layout_is_as_documented() {
    let buf = encoded(0x0102_0304_0506_0708, b"xyz");
    assert_eq!(&buf[0..2], &[0xA1, 0x57]);
    assert_eq!(&buf[2..6], &3u32.to_le_bytes());
    assert_eq!(&buf[6..14], &0x0102_0304_0506_0708u64.to_le_bytes());
    let mut covered = Vec::new();
    covered.extend_from_slice(&0x0102_0304_0506_0708u64.to_le_bytes());
    covered.extend_from_slice(&3u32.to_le_bytes());
    covered.extend_from_slice(b"xyz");
    assert_eq!(&buf[14..18], &crc32fast::hash(&covered).to_le_bytes());
    assert_eq!(&buf[18..22], &crc32fast::hash(&buf[..18]).to_le_bytes());
    assert_eq!(&buf[22..], b"xyz");
}

#[test]
fn empty_payload_round_trips() {
    let buf = encoded(7, b"");
    assert_eq!(buf.len(), RECORD_HEADER_BYTES);
    let record = decode_record(&buf).unwrap().unwrap();
    assert_eq!(
        (record.seq, record.payload, record.len),
        (7, &b""[..], RECORD_HEADER_BYTES)
    );
    assert_eq!(decode_record(&[]), Ok(None));
}

#[test]
fn oversized_declared_length_is_rejected_even_with_a_valid_header_checksum() {
    let too_long = (MAX_RECORD_BYTES + 1) as u32;
    let mut header = [0u8; RECORD_HEADER_BYTES];
    header[0..2].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    header[2..6].copy_from_slice(&too_long.to_le_bytes());
    header[6..14].copy_from_slice(&1u64.to_le_bytes());
    let header_crc = crc32fast::hash(&header[..18]);
    header[18..22].copy_from_slice(&header_crc.to_le_bytes());
    assert_eq!(
        decode_record(&header),
        Err(DecodeError::TooLong { len: too_long })
    );
    // Already with only the length visible, so a reader never waits for 4 GiB.
    assert_eq!(
        decode_record(&header[..6]),
        Err(DecodeError::TooLong { len: too_long })
    );
    assert_eq!(
        decode_record(&[0xA1, 0x57, 0xFF, 0xFF, 0xFF, 0xFF]),
        Err(DecodeError::TooLong { len: u32::MAX })
    );
}

#[test]
fn a_record_of_the_maximum_size_round_trips() {
    let payload = vec![0xAB; MAX_RECORD_BYTES];
    let buf = encoded(3, &payload);
    let record = decode_record(&buf).unwrap().unwrap();
    assert_eq!(record.payload.len(), MAX_RECORD_BYTES);
}

#[test]
#[should_panic(expected = "exceeds MAX_RECORD_BYTES")]
fn encoding_an_oversized_payload_panics() {
    let payload = vec![0; MAX_RECORD_BYTES + 1];
    encoded(1, &payload);
}
