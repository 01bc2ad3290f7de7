//! The gRPC server every service runs, assembled in one place: its own service plus
//! `grpc.health.v1.Health` (SERVING once ready, NOT_SERVING for the service and for `""` as soon
//! as the drain starts), server reflection v1 and v1alpha, the `/metrics` endpoint, and
//! `TCP_NODELAY` connections. Each service calls [`serve`] with its tonic service and selects on
//! the returned future next to its own stages.

use hitcounter_proto::reflection_services;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tracing::Instrument;

use crate::Listeners;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The reflection descriptors could not be loaded.
    #[error("cannot build server reflection: {0}")]
    Reflection(String),
    /// The gRPC transport failed.
    #[error("grpc server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves `service` on `listeners` until `shutdown` is cancelled and in-flight calls finish.
///
/// # Errors
/// [`ServeError`] when reflection cannot be built or the transport fails.
pub async fn serve<S>(
    service: S,
    listeners: Listeners,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
) -> Result<(), ServeError>
where
    S: tower::Service<http::Request<tonic::body::Body>, Error = std::convert::Infallible>
        + NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Response: axum::response::IntoResponse,
    S::Future: Send + 'static,
{
    if let Some(listener) = listeners.metrics {
        tokio::spawn(crate::metrics::serve(listener, metrics, shutdown.clone()));
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    let (reflection_v1, reflection_v1alpha) =
        reflection_services().map_err(|e| ServeError::Reflection(e.to_string()))?;
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .serve_with_incoming_shutdown(
            hitcounter_transport::incoming(listeners.grpc),
            shutdown.clone().cancelled_owned(),
        );
    health.set_serving::<S>().await;
    let not_serving = async {
        shutdown.cancelled().await;
        health.set_not_serving::<S>().await;
        // The overall status ("") is what orchestrators probe.
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
    };
    let (served, ()) = tokio::join!(server.instrument(tracing::info_span!("grpc")), not_serving);
    Ok(served?)
}
