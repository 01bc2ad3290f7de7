//! The record codec: one self-delimiting, doubly checksummed record.
//!
//! See the crate documentation for the layout and why it has two checksums.

/// The two bytes every record starts with (stored little-endian, so the file holds `A1 57`).
///
/// Non-zero on purpose: a region of zeros (a file extended or pre-allocated but never written)
/// can never look like a record header. A future incompatible format changes the magic.
pub const RECORD_MAGIC: u16 = 0x57A1;

/// Size of the fixed record header that precedes every payload.
pub const RECORD_HEADER_BYTES: usize = 22;

/// Largest payload a record may declare (64 MiB).
///
/// The decoder rejects anything larger as corrupt, so a garbage length field can never make a
/// reader wait for, or allocate, gigabytes.
pub const MAX_RECORD_BYTES: usize = 64 * 1024 * 1024;

/// Bytes of the header covered by the header checksum (everything before it).
const HEADER_CRC_COVERS: usize = 18;

/// One record decoded by [`decode_record`], borrowing its payload from the input buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodedRecord<'a> {
    /// The record's sequence number.
    pub seq: u64,
    /// The payload, exactly as given to [`encode_record`].
    pub payload: &'a [u8],
    /// Bytes the whole record occupies (header plus payload): where the next record starts.
    pub len: usize,
}

/// Why bytes are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The first two bytes are not [`RECORD_MAGIC`].
    #[error("bad record magic {found:#06x} (expected {expected:#06x})", expected = RECORD_MAGIC)]
    BadMagic {
        /// The two bytes found, read little-endian.
        found: u16,
    },
    /// The header declares a payload longer than [`MAX_RECORD_BYTES`].
    #[error("record declares a {len}-byte payload, above the maximum of {max} bytes", max = MAX_RECORD_BYTES)]
    TooLong {
        /// The declared payload length.
        len: u32,
    },
    /// The header checksum does not match, so its length and seq cannot be trusted.
    #[error("record header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    HeaderChecksum {
        /// Checksum stored in the header.
        stored: u32,
        /// Checksum computed over the header bytes.
        computed: u32,
    },
    /// The header is intact but the checksum over seq, length and payload does not match.
    #[error(
        "record checksum mismatch for seq {seq} ({record_len} bytes; stored {stored:#010x}, computed {computed:#010x})"
    )]
    Checksum {
        /// The seq from the (intact) header.
        seq: u64,
        /// Checksum stored in the header.
        stored: u32,
        /// Checksum computed over seq, length and payload.
        computed: u32,
        /// Bytes the record occupies according to its (intact) header.
        record_len: usize,
    },
}

/// The checksum over seq, length and payload that the header's `crc` field stores.
fn record_crc(seq: u64, len: u32, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&seq.to_le_bytes());
    hasher.update(&len.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// Appends the encoding of one record (`seq`, `payload`) to `out`.
///
/// The encoding is [`RECORD_HEADER_BYTES`] `+ payload.len()` bytes; see the crate documentation
/// for the layout.
///
/// # Panics
///
/// If `payload` is longer than [`MAX_RECORD_BYTES`]: such a record could never be decoded again.
/// [`crate::Log::append`] checks the length first and returns
/// [`crate::LogError::RecordTooLarge`] instead, so it never reaches this panic.
pub fn encode_record(seq: u64, payload: &[u8], out: &mut Vec<u8>) {
    assert!(
        payload.len() <= MAX_RECORD_BYTES,
        "record payload of {} bytes exceeds MAX_RECORD_BYTES ({MAX_RECORD_BYTES})",
        payload.len()
    );
    // Cannot truncate: MAX_RECORD_BYTES < u32::MAX, checked above.
    let len = payload.len() as u32;
    let mut header = [0u8; RECORD_HEADER_BYTES];
    header[0..2].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    header[2..6].copy_from_slice(&len.to_le_bytes());
    header[6..14].copy_from_slice(&seq.to_le_bytes());
    header[14..18].copy_from_slice(&record_crc(seq, len, payload).to_le_bytes());
    let header_crc = crc32fast::hash(&header[..HEADER_CRC_COVERS]);
    header[18..22].copy_from_slice(&header_crc.to_le_bytes());
    out.reserve(RECORD_HEADER_BYTES + payload.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
}

/// Decodes the record at the start of `buf`; bytes after it are ignored.
///
/// * `Ok(Some(record))`: a whole, valid record; `record.len` bytes were consumed.
/// * `Ok(None)`: the bytes present are a valid beginning of a record but too few for a whole
///   one (including an empty `buf`). Every strict prefix of a valid record decodes this way.
/// * `Err(_)`: the bytes cannot be (the start of) a valid record: wrong magic, a declared
///   length above [`MAX_RECORD_BYTES`], or a checksum mismatch. Decided as early as possible,
///   so two bytes of zeros are already an error.
///
/// Never panics and never allocates: the payload is borrowed from `buf`.
pub fn decode_record(buf: &[u8]) -> Result<Option<DecodedRecord<'_>>, DecodeError> {
    // Check what a partial header already allows, so garbage is reported as garbage and not as
    // "incomplete" (recovery treats the two differently).
    if let Some(magic) = buf.first_chunk::<2>() {
        let found = u16::from_le_bytes(*magic);
        if found != RECORD_MAGIC {
            return Err(DecodeError::BadMagic { found });
        }
    }
    if let Some(start) = buf.first_chunk::<6>() {
        let len = u32::from_le_bytes([start[2], start[3], start[4], start[5]]);
        if len as usize > MAX_RECORD_BYTES {
            return Err(DecodeError::TooLong { len });
        }
    }
    let Some(header) = buf.first_chunk::<RECORD_HEADER_BYTES>() else {
        return Ok(None);
    };
    let stored_header_crc = u32::from_le_bytes([header[18], header[19], header[20], header[21]]);
    let computed_header_crc = crc32fast::hash(&header[..HEADER_CRC_COVERS]);
    if stored_header_crc != computed_header_crc {
        return Err(DecodeError::HeaderChecksum {
            stored: stored_header_crc,
            computed: computed_header_crc,
        });
    }
    // From here on the length and seq are trustworthy (the header checksum matched).
    let len = u32::from_le_bytes([header[2], header[3], header[4], header[5]]);
    let seq = u64::from_le_bytes([
        header[6], header[7], header[8], header[9], header[10], header[11], header[12], header[13],
    ]);
    let stored = u32::from_le_bytes([header[14], header[15], header[16], header[17]]);
    let record_len = RECORD_HEADER_BYTES + len as usize;
    let Some(payload) = buf.get(RECORD_HEADER_BYTES..record_len) else {
        return Ok(None);
    };
    let computed = record_crc(seq, len, payload);
    if stored != computed {
        return Err(DecodeError::Checksum {
            seq,
            stored,
            computed,
            record_len,
        });
    }
    Ok(Some(DecodedRecord {
        seq,
        payload,
        len: record_len,
    }))
}

/// How many bytes, counted from the start of `buf`, the record starting there needs in total,
/// if a plausible length is already visible. Used to size reads for large records.
pub(crate) fn needed_len(buf: &[u8]) -> Option<usize> {
    let start = buf.first_chunk::<6>()?;
    let len = u32::from_le_bytes([start[2], start[3], start[4], start[5]]) as usize;
    (len <= MAX_RECORD_BYTES).then_some(RECORD_HEADER_BYTES + len)
}
