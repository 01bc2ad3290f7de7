//! The `validate` stage: checks every hit of a request against the contract before anything is
//! counted. A request is accepted whole or rejected whole.

use std::time::{SystemTime, UNIX_EPOCH};

/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 256;
/// Largest `count` of one hit.
pub const MAX_COUNT: u64 = 1_000_000_000;
/// Most hits in one batch.
pub const MAX_BATCH_HITS: usize = 10_000;
/// Longest batch id, in bytes.
pub const MAX_BATCH_ID_BYTES: usize = 128;

/// A hit that passed validation, with its second resolved and its count made effective.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ValidHit {
    pub(crate) key: String,
    pub(crate) second: i64,
    pub(crate) count: u64,
}

/// A broken rule, with where it was broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{place}{problem}")]
pub struct ValidationError {
    place: String,
    problem: Problem,
}

/// The rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum Problem {
    #[error("key is empty")]
    KeyEmpty,
    #[error("key is {0} bytes; the limit is {MAX_KEY_BYTES}")]
    KeyTooLong(usize),
    #[error("count {0} is above the limit of {MAX_COUNT}")]
    CountTooLarge(u64),
    #[error("timestamp_ms {0} is negative")]
    TimestampNegative(i64),
    #[error("timestamp_ms {ts} is {ahead_ms} ms in the future; at most {skew_s} s of clock skew is allowed (--max-future-skew-seconds)")]
    TimestampFuture { ts: i64, ahead_ms: i64, skew_s: u32 },
    #[error("timestamp_ms {ts} is older than the retention of {retention_s} s (now is {now_ms})")]
    TimestampTooOld {
        ts: i64,
        retention_s: u32,
        now_ms: i64,
    },
    #[error("a batch must hold 1 to {MAX_BATCH_HITS} hits, this one holds {0}")]
    BatchSize(usize),
    #[error("batch_id is {0} bytes; the limit is {MAX_BATCH_ID_BYTES}")]
    BatchIdTooLong(usize),
}

impl ValidationError {
    /// The label of `hitcounter_ingest_hits_rejected_total` for this error.
    pub(crate) fn reason(&self) -> &'static str {
        match self.problem {
            Problem::KeyEmpty => "key_empty",
            Problem::KeyTooLong(_) => "key_too_long",
            Problem::CountTooLarge(_) => "count_too_large",
            Problem::TimestampNegative(_) => "timestamp_negative",
            Problem::TimestampFuture { .. } => "timestamp_future",
            Problem::TimestampTooOld { .. } => "timestamp_too_old",
            Problem::BatchSize(_) => "batch_size",
            Problem::BatchIdTooLong(_) => "batch_id_too_long",
        }
    }

    fn whole(problem: Problem) -> Self {
        Self {
            place: String::new(),
            problem,
        }
    }
}

/// The time rules of validation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TimeRules {
    pub(crate) retention_seconds: u32,
    pub(crate) max_future_skew_seconds: u32,
}

/// The current Unix time in milliseconds.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Validates one hit; `index` names it in batch errors.
pub(crate) fn hit(
    index: Option<usize>,
    key: String,
    timestamp_ms: i64,
    count: u64,
    now_ms: i64,
    rules: TimeRules,
) -> Result<ValidHit, ValidationError> {
    let fail = |problem| ValidationError {
        place: index.map(|i| format!("hits[{i}]: ")).unwrap_or_default(),
        problem,
    };
    if key.is_empty() {
        return Err(fail(Problem::KeyEmpty));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(fail(Problem::KeyTooLong(key.len())));
    }
    if count > MAX_COUNT {
        return Err(fail(Problem::CountTooLarge(count)));
    }
    if timestamp_ms < 0 {
        return Err(fail(Problem::TimestampNegative(timestamp_ms)));
    }
    let ts = if timestamp_ms == 0 {
        now_ms
    } else {
        timestamp_ms
    };
    let skew_ms = i64::from(rules.max_future_skew_seconds) * 1000;
    if ts > now_ms + skew_ms {
        return Err(fail(Problem::TimestampFuture {
            ts,
            ahead_ms: ts - now_ms,
            skew_s: rules.max_future_skew_seconds,
        }));
    }
    if ts < now_ms - i64::from(rules.retention_seconds) * 1000 {
        return Err(fail(Problem::TimestampTooOld {
            ts,
            retention_s: rules.retention_seconds,
            now_ms,
        }));
    }
    Ok(ValidHit {
        key,
        second: ts.div_euclid(1000),
        count: count.max(1),
    })
}

/// Validates a batch: its size, its id, and every hit. Returns the hits and their total count.
pub(crate) fn batch(
    hits: Vec<hitcounter_proto::v1::Hit>,
    now_ms: i64,
    rules: TimeRules,
) -> Result<(Vec<ValidHit>, u64), ValidationError> {
    if hits.is_empty() || hits.len() > MAX_BATCH_HITS {
        return Err(ValidationError::whole(Problem::BatchSize(hits.len())));
    }
    let mut total = 0u64;
    let valid = hits
        .into_iter()
        .enumerate()
        .map(|(i, h)| {
            let valid = hit(Some(i), h.key, h.timestamp_ms, h.count, now_ms, rules)?;
            total += valid.count;
            Ok(valid)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((valid, total))
}

/// Checks a batch id's length.
pub(crate) fn batch_id(id: &str) -> Result<(), ValidationError> {
    if id.len() > MAX_BATCH_ID_BYTES {
        return Err(ValidationError::whole(Problem::BatchIdTooLong(id.len())));
    }
    Ok(())
}

/// Entry points for the fuzz target `ingest_request` in `fuzz/` (feature `fuzzing`; never part of
/// a normal build): request bytes through the decoding and validation the gRPC edge applies.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    use hitcounter_proto::v1::{RecordHitRequest, RecordHitsRequest};
    use prost::Message;

    use super::{TimeRules, ValidationError};

    /// Why a request was refused: it did not decode, or it broke a rule.
    #[derive(Debug, thiserror::Error)]
    pub enum Refused {
        /// Not a valid message (a key that is not UTF-8, for instance).
        #[error("does not decode: {0}")]
        Decode(#[from] prost::DecodeError),
        /// A rule of the contract.
        #[error("invalid: {0}")]
        Invalid(#[from] ValidationError),
    }

    /// One hit that passed validation: `(key, second, count)`.
    pub type Accepted = (String, i64, u64);

    /// The accepted hits of a request and the total count the response acknowledges.
    pub type Outcome = (Vec<Accepted>, u64);

    const RULES: TimeRules = TimeRules {
        retention_seconds: 3600,
        max_future_skew_seconds: 60,
    };

    /// Decodes `bytes` as a `RecordHitsRequest` and validates it at `now_ms`, as `RecordHits`
    /// and each request of `StreamHits` are (with the default time rules).
    ///
    /// # Errors
    /// [`Refused`] for a request the edge refuses.
    pub fn record_hits(bytes: &[u8], now_ms: i64) -> Result<Outcome, Refused> {
        let request = RecordHitsRequest::decode(bytes)?;
        super::batch_id(&request.batch_id)?;
        let (hits, total) = super::batch(request.hits, now_ms, RULES)?;
        Ok((
            hits.into_iter()
                .map(|hit| (hit.key, hit.second, hit.count))
                .collect(),
            total,
        ))
    }

    /// Decodes `bytes` as a `RecordHitRequest` and validates it at `now_ms`, as `RecordHit` is.
    ///
    /// # Errors
    /// [`Refused`] for a request the edge refuses.
    pub fn record_hit(bytes: &[u8], now_ms: i64) -> Result<Outcome, Refused> {
        let request = RecordHitRequest::decode(bytes)?;
        let hit = super::hit(
            None,
            request.key,
            request.timestamp_ms,
            request.count,
            now_ms,
            RULES,
        )?;
        let total = hit.count;
        Ok((vec![(hit.key, hit.second, hit.count)], total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: TimeRules = TimeRules {
        retention_seconds: 3600,
        max_future_skew_seconds: 60,
    };
    const NOW: i64 = 1_700_000_000_123;

    fn one(key: &str, ts: i64, count: u64) -> Result<ValidHit, ValidationError> {
        hit(None, key.into(), ts, count, NOW, RULES)
    }

    #[test]
    fn defaults_and_seconds() {
        let h = one("k", 0, 0).unwrap();
        assert_eq!((h.second, h.count), (NOW / 1000, 1));
        assert_eq!(
            one("k", 5_999, 3).unwrap_err().reason(),
            "timestamp_too_old"
        );
        let edge = NOW / 1000 * 1000;
        assert_eq!(one("k", edge - 1, 1).unwrap().second, NOW / 1000 - 1);
        assert_eq!(one("k", edge, 1).unwrap().second, NOW / 1000);
        assert_eq!(one("k", edge + 999, 1).unwrap().second, NOW / 1000);
    }

    #[test]
    fn each_rule_has_a_reason_and_a_message() {
        let cases = [
            (one("", 0, 1), "key_empty", "key is empty"),
            (one(&"x".repeat(257), 0, 1), "key_too_long", "257 bytes"),
            (one("k", 0, MAX_COUNT + 1), "count_too_large", "1000000001"),
            (one("k", -1, 1), "timestamp_negative", "negative"),
            (one("k", NOW + 60_001, 1), "timestamp_future", "future"),
            (
                one("k", NOW - 3_600_001, 1),
                "timestamp_too_old",
                "retention",
            ),
        ];
        for (result, reason, text) in cases {
            let error = result.unwrap_err();
            assert_eq!(error.reason(), reason);
            assert!(error.to_string().contains(text), "{error}");
        }
        assert!(one(&"x".repeat(256), 0, MAX_COUNT).is_ok());
        assert!(one("k", NOW + 60_000, 1).is_ok());
        assert!(one("k", NOW - 3_600_000, 1).is_ok());
    }

    #[test]
    fn batch_errors_name_the_hit() {
        let hits = vec![
            hitcounter_proto::v1::Hit {
                key: "a".into(),
                timestamp_ms: 0,
                count: 2,
            },
            hitcounter_proto::v1::Hit {
                key: String::new(),
                timestamp_ms: 0,
                count: 1,
            },
        ];
        let error = batch(hits, NOW, RULES).unwrap_err();
        assert_eq!(error.to_string(), "hits[1]: key is empty");
        assert_eq!(
            batch(vec![], NOW, RULES).unwrap_err().reason(),
            "batch_size"
        );
        assert!(batch_id(&"b".repeat(129)).is_err());
        assert!(batch_id(&"b".repeat(128)).is_ok());
    }
}
