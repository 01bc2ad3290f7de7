//! Human-friendly durations and times: parsing what users type (`5m`, `now-10m`, RFC 3339, Unix
//! milliseconds) and formatting what the server answers (`5m`, `2026-11-24T10:00:00Z`).
//!
//! Every parse error names the accepted forms, so a typo tells the user what to type instead.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The duration forms `hitctl` accepts, for error messages and `--help`.
pub const DURATION_FORMS: &str = "a number with a unit, e.g. `500ms`, `90s`, `5m`, `1h` or `1h30m`";

/// The time forms `hitctl` accepts, for error messages and `--help`.
pub const TIME_FORMS: &str = "RFC 3339 (`2026-11-24T10:00:00Z`, `2026-11-24T11:00:00+01:00`), \
`now`, `now-10m`, `now+30s`, or Unix milliseconds (`1795514400000`)";

/// A duration or time that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not a duration.
    #[error("invalid duration `{input}`: {reason}; expected {forms}", forms = DURATION_FORMS)]
    Duration {
        /// What the user typed.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A duration that parses but does not fit where it is used.
    #[error("invalid {what} `{input}`: {reason}")]
    OutOfRange {
        /// What the value is for (`window`, `step`, …).
        what: &'static str,
        /// What the user typed.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Not a time.
    #[error("invalid time `{input}`: {reason}; expected {forms}", forms = TIME_FORMS)]
    Time {
        /// What the user typed.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Parses a duration such as `500ms`, `90s`, `5m`, `1h` or `1h 30m` (humantime syntax).
///
/// # Errors
/// [`ParseError::Duration`] naming the accepted forms.
pub fn parse_duration(input: &str) -> Result<Duration, ParseError> {
    let text = input.trim();
    let error = |reason: &str| ParseError::Duration {
        input: input.to_owned(),
        reason: reason.to_owned(),
    };
    if text.is_empty() {
        return Err(error("it is empty"));
    }
    if text.starts_with('-') {
        return Err(error("durations cannot be negative"));
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(error("a unit is needed"));
    }
    humantime::parse_duration(text).map_err(|e| error(&e.to_string()))
}

/// Parses a duration that must be a whole number of seconds, at least one, fitting in `u32` (a
/// window or a series step). `what` names it in errors.
///
/// # Errors
/// [`ParseError::Duration`] or [`ParseError::OutOfRange`].
pub fn parse_whole_seconds(input: &str, what: &'static str) -> Result<u32, ParseError> {
    let duration = parse_duration(input)?;
    let out_of_range = |reason: &str| ParseError::OutOfRange {
        what,
        input: input.to_owned(),
        reason: reason.to_owned(),
    };
    if duration.subsec_nanos() != 0 {
        return Err(out_of_range("it must be a whole number of seconds"));
    }
    if duration.as_secs() == 0 {
        return Err(out_of_range("it must be at least 1s"));
    }
    u32::try_from(duration.as_secs()).map_err(|_| out_of_range("it is too long"))
}

/// `clap` parser for `--window`: whole seconds, at least 1 s.
///
/// # Errors
/// See [`parse_whole_seconds`].
pub fn parse_window(input: &str) -> Result<u32, ParseError> {
    parse_whole_seconds(input, "window")
}

/// `clap` parser for `--step`: whole seconds, at least 1 s.
///
/// # Errors
/// See [`parse_whole_seconds`].
pub fn parse_step(input: &str) -> Result<u32, ParseError> {
    parse_whole_seconds(input, "step")
}

/// `clap` parser for `--interval`: at least 1 ms, in milliseconds fitting `u32`.
///
/// # Errors
/// [`ParseError::Duration`] or [`ParseError::OutOfRange`].
pub fn parse_interval_ms(input: &str) -> Result<u32, ParseError> {
    let duration = parse_duration(input)?;
    let out_of_range = |reason: &str| ParseError::OutOfRange {
        what: "interval",
        input: input.to_owned(),
        reason: reason.to_owned(),
    };
    if duration < Duration::from_millis(1) {
        return Err(out_of_range("it must be at least 1ms"));
    }
    u32::try_from(duration.as_millis()).map_err(|_| out_of_range("it is too long"))
}

/// `clap` parser for a positive duration (`--duration` of `load`).
///
/// # Errors
/// [`ParseError::Duration`] or [`ParseError::OutOfRange`] for zero.
pub fn parse_positive_duration(input: &str) -> Result<Duration, ParseError> {
    let duration = parse_duration(input)?;
    if duration.is_zero() {
        return Err(ParseError::OutOfRange {
            what: "duration",
            input: input.to_owned(),
            reason: "it must be longer than 0".to_owned(),
        });
    }
    Ok(duration)
}

/// A point in time as the user wrote it: relative to now, or absolute. Relative times are
/// resolved when the request is made ([`TimeSpec::resolve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeSpec {
    /// `now`, `now-10m`, `now+30s`: now plus `offset_ms`.
    Now {
        /// Milliseconds added to the current time (negative for the past).
        offset_ms: i64,
    },
    /// An absolute time in Unix milliseconds.
    At {
        /// Unix milliseconds.
        unix_ms: i64,
    },
}

impl TimeSpec {
    /// Unix milliseconds of this time, with `now_ms` as the current time.
    pub fn resolve(self, now_ms: i64) -> i64 {
        match self {
            Self::Now { offset_ms } => now_ms.saturating_add(offset_ms),
            Self::At { unix_ms } => unix_ms,
        }
    }

    /// Unix milliseconds of this time, now.
    pub fn resolve_now(self) -> i64 {
        self.resolve(now_ms())
    }
}

/// Parses a time: RFC 3339 (`Z` or a `±HH:MM` offset, optional fraction, `T` or a space),
/// `now`, `now-DURATION`, `now+DURATION`, or Unix milliseconds.
///
/// # Errors
/// [`ParseError::Time`] naming the accepted forms.
pub fn parse_time(input: &str) -> Result<TimeSpec, ParseError> {
    let text = input.trim();
    let error = |reason: &str| ParseError::Time {
        input: input.to_owned(),
        reason: reason.to_owned(),
    };
    if text.is_empty() {
        return Err(error("it is empty"));
    }
    if let Some(rest) = strip_prefix_ignore_case(text, "now") {
        let rest = rest.trim_start();
        if rest.is_empty() {
            return Ok(TimeSpec::Now { offset_ms: 0 });
        }
        let (sign, amount) = match (rest.strip_prefix('-'), rest.strip_prefix('+')) {
            (Some(amount), _) => (-1, amount),
            (_, Some(amount)) => (1, amount),
            _ => return Err(error("after `now` comes `-DURATION` or `+DURATION`")),
        };
        let duration = parse_duration(amount).map_err(|e| match e {
            ParseError::Duration { reason, .. } => {
                error(&format!("bad duration after `now`: {reason}"))
            }
            other => other,
        })?;
        let ms = i64::try_from(duration.as_millis()).map_err(|_| error("offset too large"))?;
        return Ok(TimeSpec::Now {
            offset_ms: sign * ms,
        });
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        let unix_ms = text
            .parse::<i64>()
            .map_err(|_| error("too large for Unix milliseconds"))?;
        return Ok(TimeSpec::At { unix_ms });
    }
    if let Some(digits) = text.strip_prefix('-').filter(|d| !d.is_empty()) {
        if digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(error("times before 1970 are not supported"));
        }
    }
    parse_rfc3339(text)
        .map(|unix_ms| TimeSpec::At { unix_ms })
        .map_err(|reason| error(&reason))
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

/// RFC 3339 to Unix milliseconds; the error is the reason.
fn parse_rfc3339(text: &str) -> Result<i64, String> {
    let upper = text.to_ascii_uppercase();
    // The zone: `Z`, or a numeric offset `±HH:MM` at the end (after the time, so not the date's
    // dashes).
    let (base, offset_minutes) = match split_offset(&upper) {
        Some((base, minutes)) => (base, minutes),
        None if upper.ends_with('Z') => (upper.as_str(), 0),
        None => {
            return Err("an RFC 3339 time needs a zone: `Z` or an offset like `+01:00`".to_owned())
        }
    };
    let time_part = base.get(10..).unwrap_or("");
    if !time_part.starts_with(['T', ' ']) {
        return Err("not RFC 3339 (a date and a time are needed)".to_owned());
    }
    let system_time = humantime::parse_rfc3339_weak(base).map_err(|e| e.to_string())?;
    let ms = system_time
        .duration_since(UNIX_EPOCH)
        .map_err(|_| "times before 1970 are not supported".to_owned())?
        .as_millis();
    let ms = i64::try_from(ms).map_err(|_| "time too far in the future".to_owned())?;
    let unix_ms = ms - offset_minutes * 60_000;
    if unix_ms < 0 {
        return Err("times before 1970 are not supported".to_owned());
    }
    Ok(unix_ms)
}

/// Splits `…±HH:MM` into the base and the offset in minutes.
fn split_offset(text: &str) -> Option<(&str, i64)> {
    if text.len() < 6 + 19 {
        return None;
    }
    let (base, offset) = text.split_at(text.len() - 6);
    let bytes = offset.as_bytes();
    let sign = match bytes[0] {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    if bytes[3] != b':' {
        return None;
    }
    let hours: i64 = offset.get(1..3)?.parse().ok()?;
    let minutes: i64 = offset.get(4..6)?.parse().ok()?;
    if hours > 23 || minutes > 59 {
        return None;
    }
    Some((base, sign * (hours * 60 + minutes)))
}

/// The current Unix time in milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Formats Unix milliseconds as RFC 3339 UTC, with milliseconds only when they are not zero.
pub fn format_time(unix_ms: i64) -> String {
    let Ok(ms) = u64::try_from(unix_ms) else {
        return format!("{unix_ms} ms");
    };
    let time = UNIX_EPOCH + Duration::from_millis(ms);
    if ms % 1000 == 0 {
        humantime::format_rfc3339_seconds(time).to_string()
    } else {
        humantime::format_rfc3339_millis(time).to_string()
    }
}

/// Formats whole seconds as a humantime duration (`300` → `5m`).
pub fn format_seconds(seconds: u64) -> String {
    humantime::format_duration(Duration::from_secs(seconds)).to_string()
}

/// Formats a duration compactly for latency figures: `850µs`, `12.3ms`, `1.20s`.
pub fn format_latency(duration: Duration) -> String {
    let micros = duration.as_micros();
    if micros < 1000 {
        format!("{micros}µs")
    } else if micros < 1_000_000 {
        format!("{:.1}ms", micros as f64 / 1000.0)
    } else {
        format!("{:.2}s", duration.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_the_documented_forms() {
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration(" 1h 30m "), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
    }

    #[test]
    fn bad_durations_name_the_accepted_forms() {
        for bad in ["", "5", "5x", "-5m", "m", "five minutes", "5m-"] {
            let err = parse_duration(bad).expect_err(bad).to_string();
            assert!(err.contains("invalid duration"), "{bad}: {err}");
            assert!(
                err.contains("`5m`") && err.contains("`500ms`"),
                "{bad}: {err}"
            );
        }
        let err = parse_duration("5").expect_err("no unit").to_string();
        assert!(err.contains("unit"), "{err}");
    }

    #[test]
    fn windows_and_steps_are_whole_positive_seconds() {
        assert_eq!(parse_window("5m"), Ok(300));
        assert_eq!(parse_step("10s"), Ok(10));
        assert_eq!(parse_window("1s"), Ok(1));
        let half = parse_window("1500ms").expect_err("fraction").to_string();
        assert!(half.contains("whole number of seconds"), "{half}");
        let zero = parse_step("0s").expect_err("zero").to_string();
        assert!(zero.contains("at least 1s"), "{zero}");
        let huge = parse_window("200years").expect_err("huge").to_string();
        assert!(huge.contains("too long"), "{huge}");
    }

    #[test]
    fn intervals_and_load_durations() {
        assert_eq!(parse_interval_ms("1s"), Ok(1000));
        assert_eq!(parse_interval_ms("250ms"), Ok(250));
        assert!(parse_interval_ms("0s").is_err());
        assert!(parse_interval_ms("500us").is_err());
        assert_eq!(parse_positive_duration("10s"), Ok(Duration::from_secs(10)));
        assert!(parse_positive_duration("0s").is_err());
    }

    #[test]
    fn relative_times() {
        assert_eq!(parse_time("now"), Ok(TimeSpec::Now { offset_ms: 0 }));
        assert_eq!(parse_time("NOW"), Ok(TimeSpec::Now { offset_ms: 0 }));
        assert_eq!(
            parse_time("now-10m"),
            Ok(TimeSpec::Now {
                offset_ms: -600_000
            })
        );
        assert_eq!(
            parse_time("now+30s"),
            Ok(TimeSpec::Now { offset_ms: 30_000 })
        );
        assert_eq!(
            parse_time("now - 1h"),
            Ok(TimeSpec::Now {
                offset_ms: -3_600_000
            })
        );
        assert_eq!(
            TimeSpec::Now { offset_ms: -1000 }.resolve(10_000),
            9_000,
            "resolved against the given now"
        );
        assert_eq!(TimeSpec::At { unix_ms: 5 }.resolve(10_000), 5);
        let before = now_ms();
        let resolved = parse_time("now-1s").map(TimeSpec::resolve_now);
        let after = now_ms();
        let resolved = resolved.expect("parses");
        assert!(before - 1000 <= resolved && resolved <= after - 1000);
    }

    #[test]
    fn absolute_times() {
        let at = |s| parse_time(s).map(|t| t.resolve(0));
        assert_eq!(at("2026-11-24T10:00:00Z"), Ok(1_795_514_400_000));
        assert_eq!(at("2026-11-24t10:00:00z"), Ok(1_795_514_400_000));
        assert_eq!(at("2026-11-24 10:00:00Z"), Ok(1_795_514_400_000));
        assert_eq!(at("2026-11-24T10:00:00.250Z"), Ok(1_795_514_400_250));
        assert_eq!(at("2026-11-24T11:00:00+01:00"), Ok(1_795_514_400_000));
        assert_eq!(at("2026-11-24T05:30:00-04:30"), Ok(1_795_514_400_000));
        assert_eq!(at("2026-11-24T10:00:00+00:00"), Ok(1_795_514_400_000));
        assert_eq!(at("1795514400000"), Ok(1_795_514_400_000));
        assert_eq!(at("0"), Ok(0));
        assert_eq!(at("1970-01-01T00:00:00Z"), Ok(0));
    }

    #[test]
    fn bad_times_name_the_accepted_forms() {
        for bad in [
            "",
            "yesterday",
            "now-",
            "now-5",
            "now*2",
            "nowish",
            "2026-11-24",
            "2026-11-24T10:00:00",
            "2026-13-24T10:00:00Z",
            "2026-11-24T25:00:00Z",
            "-5",
            "99999999999999999999",
            "1969-12-31T23:59:59Z",
        ] {
            let err = parse_time(bad).expect_err(bad).to_string();
            assert!(err.contains("invalid time"), "{bad}: {err}");
            assert!(
                err.contains("RFC 3339") && err.contains("`now-10m`"),
                "{bad}: {err}"
            );
        }
        let zone = parse_time("2026-11-24T10:00:00").expect_err("no zone");
        assert!(zone.to_string().contains("zone"), "{zone}");
    }

    #[test]
    fn formatting() {
        assert_eq!(format_time(1_795_514_400_000), "2026-11-24T10:00:00Z");
        assert_eq!(format_time(1_795_514_400_250), "2026-11-24T10:00:00.250Z");
        assert_eq!(format_time(-5), "-5 ms");
        assert_eq!(format_seconds(300), "5m");
        assert_eq!(format_seconds(5400), "1h 30m");
        assert_eq!(format_latency(Duration::from_micros(850)), "850µs");
        assert_eq!(format_latency(Duration::from_micros(12_345)), "12.3ms");
        assert_eq!(format_latency(Duration::from_millis(1200)), "1.20s");
    }
}
