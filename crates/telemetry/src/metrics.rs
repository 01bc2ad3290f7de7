//! The Prometheus recorder and the `/metrics` endpoint.
//!
//! The `metrics` facade has one global recorder per process. Services call [`recorder`], which
//! installs it on first use and hands out the same handle afterwards, so integration tests can run
//! all three services in one process. Metric names carry the service (`hitcounter_ingest_…`), so
//! they do not collide there either.

use std::sync::OnceLock;

use axum::{routing::get, Router};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Latency buckets in seconds, from 50 µs to 10 s, for every `*_seconds` histogram.
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// Errors setting up metrics.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The recorder could not be built or installed.
    #[error("cannot install the prometheus recorder: {0}")]
    Install(String),
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Returns the process-wide Prometheus handle, installing the recorder on first call.
///
/// # Errors
/// Fails when another recorder was installed by someone else first.
pub fn recorder() -> Result<PrometheusHandle, MetricsError> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .map_err(|e| MetricsError::Install(e.to_string()))?
        .install_recorder()
        .map_err(|e| MetricsError::Install(e.to_string()));
    match handle {
        Ok(handle) => Ok(HANDLE.get_or_init(|| handle).clone()),
        // Lost a race with another thread of this process: use its handle.
        Err(e) => HANDLE.get().cloned().ok_or(e),
    }
}

/// Serves `GET /metrics` in the Prometheus text format until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, shutdown: CancellationToken) {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let handle = handle.clone();
            async move {
                // Upkeep drains histogram buffers so they do not grow between scrapes.
                handle.run_upkeep();
                handle.render()
            }
        }),
    );
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    if let Err(error) = result {
        tracing::error!(%error, "metrics endpoint failed");
    }
}
