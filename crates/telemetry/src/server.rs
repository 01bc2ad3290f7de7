//! The gRPC server every service runs, assembled in one place: its own service plus
//! `grpc.health.v1.Health` (SERVING once ready, NOT_SERVING for the service and for `""` as soon
//! as the drain starts), server reflection v1 and v1alpha for this port's services only, an
//! answer for calls to a service this port does not serve that names the port that does, the
//! `/metrics` endpoint, and `TCP_NODELAY` connections. Each service calls [`serve`] with its
//! tonic service and selects on the returned future next to its own stages.

use hitcounter_proto::{reflection_services, service_home, ReflectionError};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tracing::Instrument;

use crate::Listeners;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The reflection descriptors could not be loaded.
    #[error("cannot build server reflection")]
    Reflection(#[from] ReflectionError),
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
    let (reflection_v1, reflection_v1alpha) = reflection_services(S::NAME)?;
    let routes = tonic::service::Routes::new(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .into_axum_router()
        .fallback_service(tower::service_fn(
            |request: http::Request<axum::body::Body>| {
                let status =
                    tonic::Status::unimplemented(wrong_service(request.uri().path(), S::NAME));
                std::future::ready(Ok::<_, std::convert::Infallible>(
                    status.into_http::<axum::body::Body>(),
                ))
            },
        ));
    let server = tonic::transport::Server::builder()
        .add_routes(routes.into())
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

/// The message of a call to `path` (`/package.Service/Method`) that this port, serving
/// `served`, does not serve: where the service is served instead, or that it does not exist.
/// (A wrong method of the served service is answered by the service's own generated code.)
fn wrong_service(path: &str, served: &str) -> String {
    let here = match service_home(served) {
        Some(home) => format!("this is {} ({served})", home.role),
        None => format!("this port serves {served}"),
    };
    let asked = path
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or_default();
    match service_home(asked) {
        Some(home) => format!(
            "{asked} is served by {} (default port {}), not on this port; {here}",
            home.role, home.default_port
        ),
        None => format!("unknown service {asked:?}; {here}"),
    }
}

#[cfg(test)]
mod tests {
    use super::wrong_service;

    #[test]
    fn a_wrong_service_call_names_the_port_that_serves_it() {
        assert_eq!(
            wrong_service("/hitcounter.v1.Query/GetHits", "hitcounter.v1.Ingest"),
            "hitcounter.v1.Query is served by query (default port 50053), not on this port; \
             this is ingest (hitcounter.v1.Ingest)"
        );
        assert_eq!(
            wrong_service(
                "/hitcounter.aggregator.v1.Aggregator/Count",
                "hitcounter.v1.Query"
            ),
            "hitcounter.aggregator.v1.Aggregator is served by aggregator (default port 50052), \
             not on this port; this is query (hitcounter.v1.Query)"
        );
        assert_eq!(
            wrong_service("/foo.Bar/Baz", "hitcounter.v1.Query"),
            "unknown service \"foo.Bar\"; this is query (hitcounter.v1.Query)"
        );
    }
}
