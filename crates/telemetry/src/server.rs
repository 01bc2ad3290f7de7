//! The gRPC server every service runs, assembled in one place: its own service plus
//! `grpc.health.v1.Health` (SERVING once ready, NOT_SERVING for the service and for `""` as soon
//! as the drain starts), server reflection v1 and v1alpha for this port's services only, an
//! answer for calls to a service this port does not serve that names the port that does, the
//! `/metrics` endpoint, and `TCP_NODELAY` connections. Each service calls [`serve`] (the internal
//! aggregator) or [`serve_public`] (ingest and query) with its tonic service and selects on the
//! returned future next to its own stages.
//!
//! The server-side tower stack is composed here, in one place, outermost first:
//!
//! ```text
//!  connection (hitcounter-transport: TCP_NODELAY, one write per flush, --max-connections with
//!   │          the longest-idle connection closed to make room, --idle-connection-timeout-seconds)
//!   │          HTTP/2 (hyper): --max-concurrent-streams, keepalive, --http2-*-window-bytes
//!   └─ TLS                   when the listeners carry a ServerTls (--tls-cert/--tls-key, and
//!       │                    --tls-client-ca for mutual TLS); re-read on SIGHUP
//!       └─ TrackCallsLayer   counts each connection's open calls, for the idle close
//!           └─ AuthenticateLayer public ports only: bearer token → Principal, or UNAUTHENTICATED
//!               └─ routes    own service | health | reflection | "served elsewhere" fallback
//!                   └─ handler decodes, then role / key scope / quota checks of the
//!                              Principal, per-RPC metrics (rpc::observe) and its own work
//! ```

use std::sync::Arc;

use hitcounter_auth::{AuthenticateLayer, Authority};
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
    /// The SIGHUP handler (certificate reload) could not be installed.
    #[error("cannot listen for SIGHUP (TLS certificate reload)")]
    Signal(#[source] std::io::Error),
}

/// Serves the internal `service` (the aggregator's, reached only by ingest and query inside the
/// deployment) on `listeners` until `shutdown` is cancelled and in-flight calls finish. No token
/// authentication: the internal links are to be protected by mutual TLS.
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
    assemble(
        service,
        listeners,
        metrics,
        shutdown,
        tower::layer::util::Identity::new(),
    )
    .await
}

/// Serves the public `service` (ingest's or query's) like [`serve`], with every call
/// authenticated by `authority` first (see the module's stack). Warns at start-up when the port
/// listens beyond loopback without a tokens file.
///
/// # Errors
/// [`ServeError`] when reflection cannot be built or the transport fails.
pub async fn serve_public<S>(
    service: S,
    listeners: Listeners,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
    authority: Arc<Authority>,
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
    let exposed = listeners
        .grpc
        .local_addr()
        .is_ok_and(|addr| !addr.ip().is_loopback());
    if exposed && !authority.requires_tokens() {
        tracing::warn!(
            addr = ?listeners.grpc.local_addr().ok(),
            service = S::NAME,
            "this public port listens beyond loopback without authentication: anyone who can \
             reach it may write or read every key; give --tokens-file unless the network is trusted"
        );
    }
    // Reload the tokens file when it changes, for as long as the server runs.
    tokio::spawn(Arc::clone(&authority).watch(shutdown.clone()));
    assemble(
        service,
        listeners,
        metrics,
        shutdown,
        // Outermost: refuse calls without a valid token before anything decodes them, and hand
        // the principal to the handlers, which check roles, key scopes and quotas on the decoded
        // request (the layer cannot see keys).
        AuthenticateLayer::new(authority),
    )
    .await
}

/// The one server assembly behind [`serve`] and [`serve_public`]: `layer` wraps every route.
async fn assemble<S, L>(
    service: S,
    listeners: Listeners,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
    layer: L,
) -> Result<(), ServeError>
where
    L: tower::Layer<tonic::service::Routes> + Clone + Send + Sync + 'static,
    L::Service: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
        > + Clone
        + Send
        + 'static,
    <L::Service as tower::Service<http::Request<tonic::body::Body>>>::Future: Send,
    <L::Service as tower::Service<http::Request<tonic::body::Body>>>::Error:
        Into<Box<dyn std::error::Error + Send + Sync>> + Send,
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
    let limits = listeners.limits;
    // The limits are flags; their values are published so that a dashboard can show the
    // headroom next to `hitcounter_grpc_connections_open`.
    metrics::gauge!("hitcounter_grpc_max_concurrent_streams", "service" => S::NAME)
        .set(f64::from(limits.max_concurrent_streams));
    metrics::gauge!("hitcounter_grpc_keepalive_interval_seconds", "service" => S::NAME)
        .set(limits.keepalive_interval.map_or(0.0, |i| i.as_secs_f64()));
    metrics::gauge!("hitcounter_grpc_keepalive_timeout_seconds", "service" => S::NAME)
        .set(limits.keepalive_timeout.as_secs_f64());
    metrics::gauge!("hitcounter_grpc_http2_stream_window_bytes", "service" => S::NAME)
        .set(f64::from(limits.stream_window));
    metrics::gauge!("hitcounter_grpc_http2_connection_window_bytes", "service" => S::NAME)
        .set(f64::from(limits.connection_window));
    let connections = hitcounter_transport::ConnectionLimit::new(limits.max_connections, S::NAME)
        .with_idle_timeout(limits.idle_timeout);
    let router = tonic::transport::Server::builder()
        // A client cannot open more calls on one connection than this (REFUSED_STREAM beyond).
        .max_concurrent_streams(Some(limits.max_concurrent_streams))
        // What a client may send before the server reads it: the request bytes a call whose
        // handler stopped reading (a stream pushed back, a client that never reads its
        // answers and so is not answered) holds in memory. hyper's default is 1 MiB for both,
        // which let 1000 never-reading StreamHits clients pin 1.9 GiB (docs/performance.md).
        // What the server sends a client that does not read is bounded by the client's own
        // window: hyper asks h2 for send capacity before each chunk of a response.
        .initial_stream_window_size(Some(limits.stream_window))
        .initial_connection_window_size(Some(limits.connection_window))
        // Pings find peers that vanished without a FIN (a dead host, a dropped NAT entry), so
        // their connections and streams do not hold a place under --max-connections forever.
        .http2_keepalive_interval(limits.keepalive_interval)
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        // Outermost: every call counts as open on its connection until its response ends, so
        // that only connections without one are closed as idle (--idle-connection-timeout-
        // seconds, and eviction at --max-connections; hitcounter-transport's `idle`).
        .layer(hitcounter_transport::TrackCallsLayer)
        .layer(layer)
        .add_routes(routes.into());
    let stopped = shutdown.clone().cancelled_owned();
    let server: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> = match listeners.tls
    {
        Some(tls) => {
            // Installed before SERVING, so that a SIGHUP sent once the port answers cannot
            // find the default action (which ends the process).
            let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .map_err(ServeError::Signal)?;
            tracing::info!(
                cert = %tls.files().cert.display(),
                client_certs = if tls.requires_client_certs() { "required" } else { "not asked for" },
                service = S::NAME,
                "serving TLS"
            );
            tokio::spawn(reload_on_hangup(tls.clone(), hangups, shutdown.clone()));
            Box::pin(router.serve_with_incoming_shutdown(
                hitcounter_transport::tls::incoming_tls(listeners.grpc, tls, Some(connections)),
                stopped,
            ))
        }
        None => Box::pin(router.serve_with_incoming_shutdown(
            hitcounter_transport::incoming_limited(listeners.grpc, Some(connections)),
            stopped,
        )),
    };
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

/// Re-reads the TLS files on every SIGHUP until `shutdown`. New handshakes get the new
/// certificate; open connections keep theirs. A reload that fails (a half-written file, a key
/// that does not fit) keeps the certificate in force and says why.
async fn reload_on_hangup(
    tls: hitcounter_transport::tls::ServerTls,
    mut hangups: tokio::signal::unix::Signal,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            received = hangups.recv() => if received.is_none() { return },
        }
        match tls.reload() {
            Ok(()) => {
                metrics::counter!("hitcounter_tls_reloads_total", "outcome" => "ok").increment(1);
                tracing::info!(cert = %tls.files().cert.display(), "SIGHUP: reloaded the TLS certificate");
            }
            Err(error) => {
                metrics::counter!("hitcounter_tls_reloads_total", "outcome" => "failed")
                    .increment(1);
                tracing::error!(
                    error = %error,
                    "SIGHUP: cannot reload the TLS certificate; the previous one stays in force"
                );
            }
        }
    }
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
