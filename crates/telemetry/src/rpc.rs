//! Request counters and latency histograms recorded at the gRPC edge of each service.
//!
//! Handlers wrap their work in [`observe`], which records
//! `hitcounter_<service>_requests_total{method, code}` and
//! `hitcounter_<service>_request_duration_seconds{method}`.

use std::{future::Future, time::Instant};

use tonic::{Code, Status};

/// Runs `work` and records its outcome and latency under `service` and `method`.
pub async fn observe<T, F>(
    service: &'static str,
    method: &'static str,
    work: F,
) -> Result<T, Status>
where
    F: Future<Output = Result<T, Status>>,
{
    let started = Instant::now();
    let result = work.await;
    record(service, method, &result, started);
    result
}

/// Records one finished RPC; for handlers that cannot wrap their work in [`observe`].
pub fn record<T>(
    service: &'static str,
    method: &'static str,
    result: &Result<T, Status>,
    started: Instant,
) {
    let code = match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    };
    metrics::counter!(
        format!("hitcounter_{service}_requests_total"),
        "method" => method,
        "code" => hitcounter_proto::code_name(code)
    )
    .increment(1);
    metrics::histogram!(
        format!("hitcounter_{service}_request_duration_seconds"),
        "method" => method
    )
    .record(started.elapsed().as_secs_f64());
}
