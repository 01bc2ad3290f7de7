//! The metrics of authentication and quotas. Labels carry the token's *name* from the tokens file
//! (bounded by the file: at most [`crate::file::MAX_ENTRIES`]), or `(missing)`/`(unknown)` for
//! calls without a valid token, and never the token itself.
//!
//! - `hitcounter_<service>_auth_rejected_requests_total{reason, token}`: requests refused, by
//!   `reason` = `unauthenticated`, `permission_denied` or `quota`.
//! - `hitcounter_ingest_auth_rejected_hits_total{reason, token}`: the hits those requests carried.
//! - `hitcounter_<service>_auth_throttled_total{token}`: waits of a stream for its quota.
//! - `hitcounter_<service>_tokens_reloads_total{result}`: reloads of the tokens file, `ok` or
//!   `error` (an error keeps the previous tokens).
//! - `hitcounter_<service>_tokens`: the tokens in force.

/// Label of a call that sent no `authorization` metadata.
pub const MISSING: &str = "(missing)";
/// Label of a call whose token is not in the tokens file (or is malformed).
pub const UNKNOWN: &str = "(unknown)";

/// Counts one refused request.
pub fn rejected_request(service: &'static str, reason: &'static str, token: &str) {
    metrics::counter!(
        format!("hitcounter_{service}_auth_rejected_requests_total"),
        "reason" => reason,
        "token" => token.to_owned()
    )
    .increment(1);
}

/// Counts the hits of a refused ingest request.
pub fn rejected_hits(reason: &'static str, token: &str, hits: u64) {
    metrics::counter!(
        "hitcounter_ingest_auth_rejected_hits_total",
        "reason" => reason,
        "token" => token.to_owned()
    )
    .increment(hits);
}

pub(crate) fn throttled(service: &'static str, token: &str) {
    metrics::counter!(
        format!("hitcounter_{service}_auth_throttled_total"),
        "token" => token.to_owned()
    )
    .increment(1);
}

pub(crate) fn reloaded(service: &'static str, ok: bool, tokens: Option<usize>) {
    metrics::counter!(
        format!("hitcounter_{service}_tokens_reloads_total"),
        "result" => if ok { "ok" } else { "error" }
    )
    .increment(1);
    if let Some(tokens) = tokens {
        metrics::gauge!(format!("hitcounter_{service}_tokens")).set(tokens as f64);
    }
}
