//! A shard's batch, encoded once, straight from the log record's bytes.
//!
//! A log record is a `LoggedFlush` holding every shard's deltas; what the aggregator wants is an
//! `ApplyRequest` holding one shard's. Decoding the record into messages and encoding an
//! `ApplyRequest` again costs two allocations per delta (its key `String`), plus a deep copy
//! per delivery attempt (the retry layer keeps the request); profiling the ingest showed that
//! allocation work as its largest cost. A `Delta` is the same bytes in both messages, so the
//! forwarder copies each delta's bytes unchanged from the record into the request, retagged as
//! field 3 of `ApplyRequest`, and reads nothing but the tags, lengths and counts. The result is
//! a [`Bytes`] that every attempt shares and [`ApplyCodec`] writes out as is.
//!
//! The tests check the bytes against prost's own encoding of the same request.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use hitcounter_proto::aggregator::v1::ApplyResponse;
use prost::{
    encoding::{decode_key, decode_varint, encode_key, encode_varint, WireType},
    DecodeError, Message,
};
use tonic::{
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    Status,
};

/// `LoggedFlush.shards` and `ShardDeltas.deltas` (proto/hitcounter/ingest/v1/log.proto).
const LOGGED_SHARDS: u32 = 1;
const SHARD_DELTAS: u32 = 1;
/// `ApplyRequest` fields (proto/hitcounter/aggregator/v1/aggregator.proto).
const APPLY_PRODUCER_ID: u32 = 1;
const APPLY_SEQ: u32 = 2;
const APPLY_DELTAS: u32 = 3;
const APPLY_FIRST_KEPT_SEQ: u32 = 4;
/// `Delta.count`.
const DELTA_COUNT: u32 = 3;

/// Why a log record could not be read (the log's checksums make this a bug, not bad luck).
#[derive(Debug, thiserror::Error)]
pub(crate) enum RecordError {
    /// A tag or varint is damaged.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The fields do not fit together.
    #[error("{0}")]
    Malformed(&'static str),
}

/// One shard's `ApplyRequest`, encoded.
#[derive(Clone, Debug)]
pub(crate) struct EncodedBatch {
    pub(crate) seq: u64,
    /// Sum of the deltas' counts (for metrics).
    pub(crate) hits: u64,
    pub(crate) bytes: Bytes,
}

impl EncodedBatch {
    /// The `ApplyRequest` of shard `shard` from log record `seq` (a `LoggedFlush`); empty when
    /// the record has nothing for the shard. `first_kept` is the oldest seq the log holds.
    pub(crate) fn from_record(
        record: &[u8],
        shard: usize,
        producer_id: u64,
        seq: u64,
        first_kept: u64,
    ) -> Result<Self, RecordError> {
        let deltas = shard_deltas(record, shard)?;
        let mut out = BytesMut::with_capacity(deltas.len() + 36);
        header(&mut out, producer_id, seq);
        let mut hits = 0u64;
        let mut rest = deltas;
        while rest.has_remaining() {
            let (tag, wire_type) = decode_key(&mut rest)?;
            if tag != SHARD_DELTAS || wire_type != WireType::LengthDelimited {
                skip(wire_type, &mut rest)?;
                continue;
            }
            let delta = length_delimited(&mut rest)?;
            hits = hits.saturating_add(delta_count(delta)?);
            encode_key(APPLY_DELTAS, WireType::LengthDelimited, &mut out);
            encode_varint(delta.len() as u64, &mut out);
            out.put_slice(delta);
        }
        // After the deltas: prost writes fields in tag order.
        varint_field(&mut out, APPLY_FIRST_KEPT_SEQ, first_kept);
        Ok(Self {
            seq,
            hits,
            bytes: out.freeze(),
        })
    }

    /// A probe (seq 0, no deltas): asks the aggregator for its progress. `first_kept` is the
    /// oldest seq the log holds.
    pub(crate) fn probe(producer_id: u64, first_kept: u64) -> Self {
        let mut out = BytesMut::with_capacity(24);
        header(&mut out, producer_id, 0);
        varint_field(&mut out, APPLY_FIRST_KEPT_SEQ, first_kept);
        Self {
            seq: 0,
            hits: 0,
            bytes: out.freeze(),
        }
    }
}

/// `producer_id` and `seq`, as prost writes them (proto3: zero values are left out).
fn header(out: &mut BytesMut, producer_id: u64, seq: u64) {
    varint_field(out, APPLY_PRODUCER_ID, producer_id);
    varint_field(out, APPLY_SEQ, seq);
}

/// One varint field, as prost writes it (proto3: a zero value is left out).
fn varint_field(out: &mut BytesMut, tag: u32, value: u64) {
    if value != 0 {
        encode_key(tag, WireType::Varint, out);
        encode_varint(value, out);
    }
}

/// The bytes of the `shard`-th `ShardDeltas` of a `LoggedFlush` (empty if there are fewer).
fn shard_deltas(mut record: &[u8], shard: usize) -> Result<&[u8], RecordError> {
    let mut index = 0;
    while record.has_remaining() {
        let (tag, wire_type) = decode_key(&mut record)?;
        if tag == LOGGED_SHARDS && wire_type == WireType::LengthDelimited {
            let part = length_delimited(&mut record)?;
            if index == shard {
                return Ok(part);
            }
            index += 1;
        } else {
            skip(wire_type, &mut record)?;
        }
    }
    Ok(&[])
}

/// `Delta.count` from a delta's bytes (0 when absent, as in proto3).
fn delta_count(mut delta: &[u8]) -> Result<u64, RecordError> {
    let mut count = 0;
    while delta.has_remaining() {
        let (tag, wire_type) = decode_key(&mut delta)?;
        if tag == DELTA_COUNT && wire_type == WireType::Varint {
            count = decode_varint(&mut delta)?;
        } else {
            skip(wire_type, &mut delta)?;
        }
    }
    Ok(count)
}

/// Takes a length-delimited field's bytes off the front of `buf`.
fn length_delimited<'a>(buf: &mut &'a [u8]) -> Result<&'a [u8], RecordError> {
    let len = usize::try_from(decode_varint(buf)?)
        .map_err(|_| RecordError::Malformed("length does not fit in memory"))?;
    if len > buf.len() {
        return Err(RecordError::Malformed(
            "field runs past the end of the record",
        ));
    }
    let (field, rest) = buf.split_at(len);
    *buf = rest;
    Ok(field)
}

/// Skips a field's value.
fn skip(wire_type: WireType, buf: &mut &[u8]) -> Result<(), RecordError> {
    let width = match wire_type {
        WireType::Varint => {
            decode_varint(buf)?;
            0
        }
        WireType::SixtyFourBit => 8,
        WireType::ThirtyTwoBit => 4,
        WireType::LengthDelimited => {
            length_delimited(buf)?;
            0
        }
        WireType::StartGroup | WireType::EndGroup => {
            return Err(RecordError::Malformed("groups are not used in log records"))
        }
    };
    if width > buf.len() {
        return Err(RecordError::Malformed(
            "field runs past the end of the record",
        ));
    }
    buf.advance(width);
    Ok(())
}

/// The `Apply` stream's codec: requests are already encoded, answers are decoded with prost.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ApplyCodec;

impl Codec for ApplyCodec {
    type Encode = Bytes;
    type Decode = ApplyResponse;
    type Encoder = Self;
    type Decoder = Self;

    fn encoder(&mut self) -> Self::Encoder {
        *self
    }

    fn decoder(&mut self) -> Self::Decoder {
        *self
    }
}

impl Encoder for ApplyCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for ApplyCodec {
    type Item = ApplyResponse;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<ApplyResponse>, Status> {
        ApplyResponse::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(format!("undecodable apply ack: {e}")))
    }
}

/// Bytes of a length-delimited field of `len` bytes, tag included (for sizing tests).
#[cfg(test)]
fn field_len(tag: u32, len: usize) -> usize {
    prost::encoding::key_len(tag) + prost::encoding::encoded_len_varint(len as u64) + len
}

#[cfg(test)]
mod tests {
    use hitcounter_proto::{
        aggregator::v1::{ApplyRequest, Delta},
        ingest::v1::{LoggedBatchId, LoggedFlush, ShardDeltas},
    };
    use proptest::prelude::*;

    use super::*;

    fn delta(key: &str, second: i64, count: u64) -> Delta {
        Delta {
            key: key.to_owned(),
            second,
            count,
        }
    }

    fn record(shards: Vec<Vec<Delta>>) -> Vec<u8> {
        LoggedFlush {
            shards: shards
                .into_iter()
                .map(|deltas| ShardDeltas { deltas })
                .collect(),
            batch_ids: vec![LoggedBatchId {
                batch_id: "b-1".into(),
                accepted: 3,
            }],
            at_ms: 1_700_000_000_000,
        }
        .encode_to_vec()
    }

    #[test]
    fn each_shard_gets_prost_s_own_encoding_of_its_request() {
        let shards = vec![
            vec![delta("/a", 1_700_000_000, 2), delta("/b", 1_700_000_001, 1)],
            vec![],
            vec![delta("/c", 0, 0), delta("", -5, u64::MAX)],
        ];
        let bytes = record(shards.clone());
        for (shard, deltas) in shards.into_iter().enumerate() {
            let hits = deltas.iter().fold(0u64, |a, d| a.saturating_add(d.count));
            let expected = ApplyRequest {
                producer_id: 77,
                seq: 9,
                deltas,
                first_kept_seq: 4,
            }
            .encode_to_vec();
            let batch = EncodedBatch::from_record(&bytes, shard, 77, 9, 4).unwrap();
            assert_eq!(batch.bytes.as_ref(), expected.as_slice(), "shard {shard}");
            assert_eq!((batch.seq, batch.hits), (9, hits));
        }
    }

    #[test]
    fn a_shard_beyond_the_record_gets_an_empty_batch_and_a_probe_is_empty() {
        let bytes = record(vec![vec![delta("/a", 1, 1)]]);
        let batch = EncodedBatch::from_record(&bytes, 3, 5, 2, 1).unwrap();
        let decoded = ApplyRequest::decode(batch.bytes).unwrap();
        assert_eq!(
            (decoded.producer_id, decoded.seq, decoded.first_kept_seq),
            (5, 2, 1)
        );
        assert!(decoded.deltas.is_empty());
        let probe = ApplyRequest::decode(EncodedBatch::probe(5, 3).bytes).unwrap();
        assert_eq!(
            (
                probe.producer_id,
                probe.seq,
                probe.deltas.len(),
                probe.first_kept_seq
            ),
            (5, 0, 0, 3)
        );
    }

    #[test]
    fn a_damaged_record_is_an_error_not_a_panic() {
        let bytes = record(vec![vec![delta("/a", 1, 1), delta("/b", 2, 2)]]);
        for cut in 1..bytes.len() {
            // A record cut short fails or yields a prefix; it never panics. (The log's CRC
            // rejects such records before they get here.)
            let _ = EncodedBatch::from_record(&bytes[..cut], 0, 1, 1, 1);
        }
        assert!(EncodedBatch::from_record(&[0x0a, 0x7f], 0, 1, 1, 1).is_err());
    }

    proptest! {
        #[test]
        fn matches_prost_for_any_record(
            shards in prop::collection::vec(
                prop::collection::vec(("[a-z/]{0,12}", any::<i64>(), any::<u64>()), 0..6),
                0..4,
            ),
            shard in 0usize..5,
            producer_id in any::<u64>(),
            seq in any::<u64>(),
            first_kept_seq in any::<u64>(),
        ) {
            let shards: Vec<Vec<Delta>> = shards
                .into_iter()
                .map(|d| d.into_iter().map(|(k, s, c)| delta(&k, s, c)).collect())
                .collect();
            let bytes = record(shards.clone());
            let deltas = shards.get(shard).cloned().unwrap_or_default();
            let expected = ApplyRequest { producer_id, seq, deltas, first_kept_seq }.encode_to_vec();
            let batch =
                EncodedBatch::from_record(&bytes, shard, producer_id, seq, first_kept_seq).unwrap();
            prop_assert_eq!(batch.bytes.as_ref(), expected.as_slice());
            let len: usize = shards.get(shard).map_or(0, |d| {
                d.iter().map(|d| field_len(APPLY_DELTAS, d.encoded_len())).sum()
            });
            prop_assert!(batch.bytes.len() >= len);
        }
    }
}
