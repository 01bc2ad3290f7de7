//! `hitcounter` in one process: ingest, aggregator and query together (`hitcounter all`, for
//! local use and small deployments, like Loki's or Mimir's `-target=all`), or one role of them
//! (`hitcounter ingest`, …, the same as the separate binaries, which compose and Kubernetes use).
//!
//! ```text
//!  clients ──▶ ingest :50051 ──gRPC Apply (log, then forward)──▶ aggregator 127.0.0.1:50052
//!  clients ──▶ query  :50053 ──gRPC Count/Series/Top──────────▶      (checkpoints in data/)
//! ```
//!
//! The roles are the services' own `serve` functions on one tokio runtime and still talk over
//! gRPC on loopback: a hit takes the same path as between separate processes (ingest's durable
//! log, the forwarder's acked Apply stream, the aggregator's dedup and checkpoints), so the one
//! process promises exactly what the split deployment promises. Nothing is short-circuited.
//!
//! Start-up: every listener is bound first (bind errors before anything runs; port 0 works, the
//! bound addresses are printed on stdout), then the aggregator starts and recovers its
//! checkpoint, and ingest and query start once it answers its health check (as compose's
//! `depends_on: service_healthy` orders the split deployment), so an aggregator that cannot
//! start stops the process at once instead of leaving ingest to drain into nothing.
//!
//! Shutdown, on one SIGINT/SIGTERM (or when a role stops on its own): ingest first (it stops
//! accepting and drains every acknowledged hit into the aggregator), then query, then the
//! aggregator, which writes its last checkpoint. Each role keeps its own drain deadline
//! (`--drain-timeout-seconds`).

mod cli;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hitcounter_telemetry::{BindError, CancellationToken, Listeners};
use tokio::{net::TcpListener, task::JoinHandle};
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
use tracing::Instrument;

pub use cli::{AllConfig, Cli, Role};

/// Why `hitcounter` could not run or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listen address could not be bound.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The TLS files (`--tls-cert`, `--tls-key`, `--tls-client-ca`) are missing or unusable.
    #[error("TLS configuration")]
    Tls(#[from] hitcounter_telemetry::TlsError),
    /// The ingest role failed.
    #[error("ingest failed")]
    Ingest(#[source] hitcounter_ingest::IngestError),
    /// The aggregator role failed.
    #[error("aggregator failed")]
    Aggregator(#[source] hitcounter_aggregator::AggregatorError),
    /// The query role failed.
    #[error("query failed")]
    Query(#[source] hitcounter_query::QueryError),
    /// A role's task panicked or was cancelled.
    #[error("the {role} task ended abnormally")]
    Task {
        /// The role.
        role: &'static str,
        /// The panic or cancellation.
        #[source]
        source: tokio::task::JoinError,
    },
    /// A role returned before it was asked to stop (it logged why); the others were stopped.
    #[error("{0} stopped on its own; the other roles were stopped too")]
    StoppedEarly(&'static str),
    /// The aggregator's health check, which ingest and query wait for, could not be made.
    #[error("cannot reach the aggregator of this process at {addr}")]
    AggregatorUnreachable {
        /// The address dialled.
        addr: SocketAddr,
        /// The transport or gRPC failure.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Runs `role` until `shutdown` is cancelled: binds its listeners, prints their addresses on
/// stdout (one line, `hitcounter listening: ROLE=ADDR … metrics=ADDR|off`, so that scripts and
/// tests can pass port 0), then serves.
///
/// # Errors
/// [`Error`] when a listener cannot be bound or a role fails.
pub async fn serve(role: Role, shutdown: CancellationToken) -> Result<(), Error> {
    match role {
        Role::All(config) => {
            let listeners = AllListeners::bind(&config).await?;
            announce(&[
                ("ingest", Some(&listeners.ingest)),
                ("query", Some(&listeners.query)),
                ("aggregator", Some(&listeners.aggregator)),
                ("metrics", listeners.metrics.as_ref()),
            ]);
            serve_all(*config, listeners, shutdown).await
        }
        Role::Ingest(config) => {
            let metrics = config
                .service
                .metrics_addr(hitcounter_ingest::Config::DEFAULT_METRICS);
            let listeners = Listeners::bind(config.listen, metrics)
                .await?
                .configured(&config.service)?;
            announce_one("ingest", &listeners);
            hitcounter_ingest::serve(config, listeners, shutdown)
                .await
                .map_err(Error::Ingest)
        }
        Role::Aggregator(config) => {
            let metrics = config
                .service
                .metrics_addr(hitcounter_aggregator::Config::DEFAULT_METRICS);
            let listeners = Listeners::bind(config.listen, metrics)
                .await?
                .configured(&config.service)?;
            announce_one("aggregator", &listeners);
            hitcounter_aggregator::serve(config, listeners, shutdown)
                .await
                .map_err(Error::Aggregator)
        }
        Role::Query(config) => {
            let metrics = config
                .service
                .metrics_addr(hitcounter_query::Config::DEFAULT_METRICS);
            let listeners = Listeners::bind(config.listen, metrics)
                .await?
                .configured(&config.service)?;
            announce_one("query", &listeners);
            hitcounter_query::serve(config, listeners, shutdown)
                .await
                .map_err(Error::Query)
        }
    }
}

/// The sockets of `hitcounter all`, bound before anything starts.
#[derive(Debug)]
pub struct AllListeners {
    /// Ingest's gRPC listener.
    pub ingest: TcpListener,
    /// The aggregator's gRPC listener.
    pub aggregator: TcpListener,
    /// Query's gRPC listener.
    pub query: TcpListener,
    /// The one `/metrics` listener, if enabled.
    pub metrics: Option<TcpListener>,
}

impl AllListeners {
    /// Binds every address of `config`.
    ///
    /// # Errors
    /// [`BindError`] naming the address that could not be bound.
    pub async fn bind(config: &AllConfig) -> Result<Self, BindError> {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| BindError { addr, source })
        };
        Ok(Self {
            ingest: bind(config.ingest.listen).await?,
            aggregator: bind(config.aggregator.listen).await?,
            query: bind(config.query.listen).await?,
            metrics: match config.metrics {
                Some(addr) => Some(bind(addr).await?),
                None => None,
            },
        })
    }
}

/// Runs ingest, aggregator and query in this process on `listeners` until `shutdown` is
/// cancelled or a role stops, then stops them in order (see the module docs).
///
/// # Errors
/// The first role's failure, in stop order; [`Error::StoppedEarly`] when a role returned
/// without being asked to.
pub async fn serve_all(
    mut config: AllConfig,
    listeners: AllListeners,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    // Ingest and query reach the aggregator at the address it is bound to, which is the only
    // way to know it when --aggregator-listen has port 0.
    let aggregator_addr =
        dialable(
            listeners
                .aggregator
                .local_addr()
                .map_err(|source| BindError {
                    addr: config.aggregator.listen,
                    source,
                })?,
        );
    let aggregator_uri = format!("http://{aggregator_addr}");
    // Loaded before anything starts, so that a bad certificate fails at start-up.
    let ingest_tls = config.ingest.service.server_tls()?;
    let query_tls = config.query.service.server_tls()?;
    config.ingest.client.aggregators = vec![aggregator_uri.clone()];
    config.query.client.aggregators = vec![aggregator_uri];

    // The metrics endpoint goes with the aggregator, the role that stops last, so it answers
    // during the whole drain.
    let aggregator_listeners = Listeners {
        grpc: listeners.aggregator,
        metrics: listeners.metrics,
        // In-process, ingest and query reach the aggregator over loopback in plain text (see
        // the module docs): its port is internal; TLS is for the public ports.
        tls: None,
        limits: config.aggregator.service.server_limits(),
    };
    let mut aggregator = RoleTask::spawn("aggregator", |stop| async move {
        hitcounter_aggregator::serve(config.aggregator, aggregator_listeners, stop)
            .await
            .map_err(Error::Aggregator)
    });
    tokio::select! {
        ready = aggregator_serving(aggregator_addr) => {
            if let Err(unreachable) = ready {
                // Usually the aggregator stopped at start-up, closing its listener under the
                // health check: its own error says why.
                return Err(aggregator.stop().await.err().unwrap_or(unreachable));
            }
        }
        _ = aggregator.finished() => {
            // Its outcome (kept by `finished`): the error that stopped it at start-up.
            return aggregator.stop().await.and(Err(Error::StoppedEarly("aggregator")));
        }
        () = shutdown.cancelled() => return aggregator.stop().await,
    }

    let ingest_listeners = Listeners {
        grpc: listeners.ingest,
        metrics: None,
        tls: ingest_tls,
        limits: config.ingest.service.server_limits(),
    };
    let mut ingest = RoleTask::spawn("ingest", |stop| async move {
        hitcounter_ingest::serve(config.ingest, ingest_listeners, stop)
            .await
            .map_err(Error::Ingest)
    });
    let query_listeners = Listeners {
        grpc: listeners.query,
        metrics: None,
        tls: query_tls,
        limits: config.query.service.server_limits(),
    };
    let mut query = RoleTask::spawn("query", |stop| async move {
        hitcounter_query::serve(config.query, query_listeners, stop)
            .await
            .map_err(Error::Query)
    });
    tracing::info!("hitcounter serving: ingest, query and aggregator in one process");

    let early = tokio::select! {
        () = shutdown.cancelled() => None,
        ended = ingest.finished() => Some(("ingest", ended)),
        ended = query.finished() => Some(("query", ended)),
        ended = aggregator.finished() => Some(("aggregator", ended)),
    };
    if let Some((role, ended)) = &early {
        match ended {
            Ok(()) => tracing::error!(role, "a role stopped on its own; stopping the others"),
            Err(error) => {
                tracing::error!(role, error = %error, "a role failed; stopping the others")
            }
        }
    } else {
        tracing::info!(
            "stopping: ingest drains into the aggregator, then query, then the aggregator"
        );
    }
    let stopped = [
        ingest.stop().await,
        query.stop().await,
        aggregator.stop().await,
    ];
    tracing::info!("hitcounter stopped");
    let first_failure = stopped.into_iter().find_map(Result::err);
    match (first_failure, early) {
        (Some(error), _) => Err(error),
        (None, Some((role, _))) => Err(Error::StoppedEarly(role)),
        (None, None) => Ok(()),
    }
}

/// One role's task and the token that stops it.
struct RoleTask {
    role: &'static str,
    stop: CancellationToken,
    task: JoinHandle<Result<(), Error>>,
    /// The outcome, once the task was seen to end (a `JoinHandle` cannot be awaited twice).
    outcome: Option<Result<(), Error>>,
}

impl RoleTask {
    fn spawn<F, Fut>(role: &'static str, serve: F) -> Self
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: std::future::Future<Output = Result<(), Error>> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(stop.clone()).instrument(tracing::info_span!("role", role)));
        Self {
            role,
            stop,
            task,
            outcome: None,
        }
    }

    /// Waits until the role's task ends on its own, and remembers how; pending forever once it
    /// has ended (so it can sit in a `select!` next to the others).
    async fn finished(&mut self) -> Result<(), String> {
        if self.outcome.is_some() {
            return std::future::pending().await;
        }
        let outcome = match (&mut self.task).await {
            Ok(result) => result,
            Err(source) => Err(Error::Task {
                role: self.role,
                source,
            }),
        };
        let report = outcome.as_ref().map(|_| ()).map_err(|e| error_chain(e));
        self.outcome = Some(outcome);
        report
    }

    /// Asks the role to stop and waits until it has.
    async fn stop(mut self) -> Result<(), Error> {
        self.stop.cancel();
        match self.outcome.take() {
            Some(outcome) => outcome,
            None => match self.task.await {
                Ok(result) => result,
                Err(source) => Err(Error::Task {
                    role: self.role,
                    source,
                }),
            },
        }
    }
}

/// An error with its causes, for one log line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Waits until the aggregator at `addr` answers its health check. Its listener is bound, so the
/// connection is accepted by the kernel at once and the answer comes when the aggregator has
/// recovered its checkpoint and serves: one call, no polling.
async fn aggregator_serving(addr: SocketAddr) -> Result<(), Error> {
    let unreachable = |source: Box<dyn std::error::Error + Send + Sync>| {
        Error::AggregatorUnreachable { addr, source }
    };
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| unreachable(e.into()))?
        .connect()
        .await
        .map_err(|e| unreachable(e.into()))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|e| unreachable(e.into()))?;
    Ok(())
}

/// The address to dial for a listener bound to `addr`: loopback when it is bound to every
/// interface.
fn dialable(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

/// Prints the bound addresses on stdout, one line: `hitcounter listening: NAME=ADDR …`
/// (`off` for a disabled endpoint).
fn announce(listeners: &[(&str, Option<&TcpListener>)]) {
    use std::io::Write;
    let mut line = String::from("hitcounter listening:");
    for (name, listener) in listeners {
        let addr = listener
            .and_then(|l| l.local_addr().ok())
            .map_or_else(|| "off".to_owned(), |a| a.to_string());
        line.push_str(&format!(" {name}={addr}"));
    }
    let mut stdout = std::io::stdout().lock();
    // A closed stdout must not stop a server; the log has the addresses too.
    if let Err(error) = writeln!(stdout, "{line}").and_then(|()| stdout.flush()) {
        tracing::debug!(%error, "cannot print the listening addresses on stdout");
    }
}

fn announce_one(role: &str, listeners: &Listeners) {
    announce(&[
        (role, Some(&listeners.grpc)),
        ("metrics", listeners.metrics.as_ref()),
    ]);
}

#[cfg(test)]
mod tests {
    use super::dialable;

    #[test]
    fn an_unspecified_address_is_dialled_on_loopback() {
        let cases = [
            ("0.0.0.0:50052", "127.0.0.1:50052"),
            ("[::]:7", "[::1]:7"),
            ("10.1.2.3:9", "10.1.2.3:9"),
        ];
        for (bound, dialled) in cases {
            let bound = bound.parse().expect("address");
            assert_eq!(dialable(bound).to_string(), dialled);
        }
    }
}
