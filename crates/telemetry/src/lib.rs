//! Observability and process lifecycle shared by the three hitcounter services.
//!
//! - [`logging`]: `tracing` subscriber set-up (text or JSON, filtered by `RUST_LOG`).
//! - [`metrics`]: the process-wide Prometheus recorder and the HTTP `/metrics` endpoint.
//! - [`rpc`]: per-RPC request counters and latency histograms, recorded at the gRPC edge.
//! - [`shutdown`]: SIGINT/SIGTERM turned into a [`CancellationToken`] every task watches.
//! - [`server`]: the gRPC server every service runs (health, reflection, metrics, drain), and
//!   its tower stack: bearer-token authentication (`hitcounter-auth`) on the public ports.
//! - [`ServiceArgs`]: the command-line knobs every service has (log format, metrics address,
//!   drain deadline, message size limit, runtime worker threads, TLS files), and the tokio
//!   runtime built from them ([`ServiceArgs::runtime`]).

pub mod logging;
pub mod metrics;
pub mod rpc;
pub mod server;
pub mod shutdown;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

pub use hitcounter_transport::tls::{ServerTls, TlsError};
pub use tokio_util::sync::CancellationToken;

/// Command-line and environment settings every service shares; flattened into each service's
/// own `Config`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServiceArgs {
    /// Address of the Prometheus `/metrics` HTTP endpoint (default `0.0.0.0:9101` for ingest,
    /// `:9102` for the aggregator, `:9103` for query); `off` disables it.
    #[arg(long, env = "HITCOUNTER_METRICS_LISTEN", value_parser = parse_optional_addr)]
    pub metrics_listen: Option<OptionalAddr>,

    /// Log format: `text` for people, `json` for log pipelines. Verbosity comes from `RUST_LOG`
    /// (default `info`).
    #[arg(long, env = "HITCOUNTER_LOG_FORMAT", default_value = "text")]
    pub log_format: logging::LogFormat,

    /// On SIGTERM/SIGINT, how long to wait for in-flight work to drain before exiting anyway.
    #[arg(long, env = "HITCOUNTER_DRAIN_TIMEOUT_SECONDS", default_value_t = 30)]
    pub drain_timeout_seconds: u64,

    /// Largest gRPC message accepted, in bytes. A larger request fails with OUT_OF_RANGE ("decoded
    /// message length too large", from tonic) and the service goes on.
    #[arg(long, env = "HITCOUNTER_MAX_MESSAGE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// Tokio worker threads. Default: one per core for ingest and the aggregator, 1 for query
    /// (an I/O-bound router; see docs/performance.md for why one thread answers
    /// faster there). Scale query out with more replicas, or up with this flag.
    #[arg(long, env = "HITCOUNTER_WORKER_THREADS")]
    pub worker_threads: Option<std::num::NonZeroUsize>,

    /// Serve gRPC over TLS with this certificate chain (PEM, leaf first); needs `--tls-key`.
    /// Re-read, with the key and client CA, on SIGHUP: new connections get the new certificate,
    /// open ones (streams included) are left alone.
    #[arg(long, env = "HITCOUNTER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of `--tls-cert` (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "HITCOUNTER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Require client certificates signed by this CA (PEM): mutual TLS, for the internal
    /// aggregator port. Needs `--tls-cert`.
    #[arg(long, env = "HITCOUNTER_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Connections open at once on the gRPC port; one more is closed as soon as it is accepted,
    /// logged and counted (`hitcounter_grpc_connections_refused_total`).
    #[arg(long, env = "HITCOUNTER_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,

    /// HTTP/2 streams (calls in flight) per connection; the client is told the limit in the
    /// connection's settings and a stream beyond it is refused (REFUSED_STREAM).
    #[arg(
        long,
        env = "HITCOUNTER_MAX_CONCURRENT_STREAMS",
        default_value_t = 1024
    )]
    pub max_concurrent_streams: u32,

    /// How often the server pings an HTTP/2 connection to find dead peers, in seconds; 0 never.
    #[arg(
        long,
        env = "HITCOUNTER_HTTP2_KEEPALIVE_INTERVAL_SECONDS",
        default_value_t = 60
    )]
    pub http2_keepalive_interval_seconds: u64,

    /// How long a keepalive ping may go unanswered before the connection is closed, in seconds.
    #[arg(
        long,
        env = "HITCOUNTER_HTTP2_KEEPALIVE_TIMEOUT_SECONDS",
        default_value_t = 20
    )]
    pub http2_keepalive_timeout_seconds: u64,

    /// Close a connection on which no call has been open for this many seconds; 0 never.
    /// Counted in `hitcounter_grpc_connections_closed_idle_total{reason="timeout"}`. (At
    /// `--max-connections`, a new connection closes the longest-idle one whatever this is.)
    #[arg(
        long,
        env = "HITCOUNTER_IDLE_CONNECTION_TIMEOUT_SECONDS",
        default_value_t = 300
    )]
    pub idle_connection_timeout_seconds: u64,

    /// HTTP/2 flow-control window of each call's request body, in bytes: what a client may send
    /// on one call before the server has read it. Bounds the memory of a call whose handler
    /// stopped reading (a stream pushed back); larger windows help uploads over long round trips.
    #[arg(
        long,
        env = "HITCOUNTER_HTTP2_STREAM_WINDOW_BYTES",
        default_value_t = 64 * 1024,
        value_parser = clap::value_parser!(u32).range(1024..=i64::from(MAX_WINDOW))
    )]
    pub http2_stream_window_bytes: u32,

    /// HTTP/2 flow-control window of a whole connection, in bytes: what a client may send on
    /// all its calls together before the server has read it. With `--max-connections`, bounds
    /// the memory of request bytes received and not yet read.
    #[arg(
        long,
        env = "HITCOUNTER_HTTP2_CONNECTION_WINDOW_BYTES",
        default_value_t = 256 * 1024,
        value_parser = clap::value_parser!(u32).range(1024..=i64::from(MAX_WINDOW))
    )]
    pub http2_connection_window_bytes: u32,
}

/// The largest HTTP/2 flow-control window (RFC 9113 §6.9.1: 2^31 - 1).
const MAX_WINDOW: u32 = (1 << 31) - 1;

/// The HTTP/2 and connection limits of one gRPC server (see the `ServiceArgs` flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Streams per connection.
    pub max_concurrent_streams: u32,
    /// Keepalive ping period; `None` never pings.
    pub keepalive_interval: Option<Duration>,
    /// Keepalive ping deadline.
    pub keepalive_timeout: Duration,
    /// A connection with no open call this long is closed; `None` never.
    pub idle_timeout: Option<Duration>,
    /// HTTP/2 receive window per stream (call), bytes.
    pub stream_window: u32,
    /// HTTP/2 receive window per connection, bytes.
    pub connection_window: u32,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_concurrent_streams: 1024,
            keepalive_interval: Some(Duration::from_secs(60)),
            keepalive_timeout: Duration::from_secs(20),
            idle_timeout: Some(Duration::from_secs(300)),
            stream_window: 64 * 1024,
            connection_window: 256 * 1024,
        }
    }
}

/// How many worker threads a service runs when `--worker-threads` is not given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultWorkers {
    /// One per core (what `#[tokio::main]` does).
    PerCore,
    /// A fixed number.
    Fixed(std::num::NonZeroUsize),
}

impl ServiceArgs {
    /// The worker threads this service runs with, `default` applying when the flag is absent.
    pub fn worker_threads(&self, default: DefaultWorkers) -> usize {
        match (self.worker_threads, default) {
            (Some(n), _) | (None, DefaultWorkers::Fixed(n)) => n.get(),
            (None, DefaultWorkers::PerCore) => {
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
            }
        }
    }

    /// Builds the service's multi-threaded tokio runtime with [`Self::worker_threads`] workers.
    ///
    /// # Errors
    /// The operating system's error if the runtime's threads or I/O driver cannot be created.
    pub fn runtime(&self, default: DefaultWorkers) -> std::io::Result<tokio::runtime::Runtime> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(self.worker_threads(default))
            .enable_all()
            .build()
    }

    /// The server limits these flags set.
    pub fn server_limits(&self) -> ServerLimits {
        ServerLimits {
            max_connections: self.max_connections.max(1),
            max_concurrent_streams: self.max_concurrent_streams.max(1),
            keepalive_interval: (self.http2_keepalive_interval_seconds > 0)
                .then(|| Duration::from_secs(self.http2_keepalive_interval_seconds)),
            keepalive_timeout: Duration::from_secs(self.http2_keepalive_timeout_seconds.max(1)),
            idle_timeout: (self.idle_connection_timeout_seconds > 0)
                .then(|| Duration::from_secs(self.idle_connection_timeout_seconds)),
            stream_window: self.http2_stream_window_bytes.clamp(1024, MAX_WINDOW),
            connection_window: self.http2_connection_window_bytes.clamp(1024, MAX_WINDOW),
        }
    }

    /// The TLS configuration of `--tls-cert`/`--tls-key`/`--tls-client-ca`, loaded now, or
    /// `None` to serve plain text.
    ///
    /// # Errors
    /// [`TlsError`] naming the file that is missing or unusable (a key that does not fit the
    /// certificate, a file that is not PEM): a start-up failure.
    pub fn server_tls(&self) -> Result<Option<ServerTls>, TlsError> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        ServerTls::load(hitcounter_transport::tls::ServerTlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: self.tls_client_ca.clone(),
        })
        .map(Some)
    }

    /// The drain deadline as a [`Duration`].
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_seconds)
    }

    /// The metrics address to bind, if the endpoint is enabled, given the service's default.
    pub fn metrics_addr(&self, default: SocketAddr) -> Option<SocketAddr> {
        match self.metrics_listen {
            None => Some(default),
            Some(OptionalAddr::Off) => None,
            Some(OptionalAddr::At(addr)) => Some(addr),
        }
    }
}

/// A socket address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionalAddr {
    /// The feature is disabled.
    Off,
    /// Listen here.
    At(SocketAddr),
}

fn parse_optional_addr(value: &str) -> Result<OptionalAddr, String> {
    if value.eq_ignore_ascii_case("off") {
        return Ok(OptionalAddr::Off);
    }
    value
        .parse()
        .map(OptionalAddr::At)
        .map_err(|e| format!("expected HOST:PORT or `off`: {e}"))
}

/// Takes the exclusive lock of a data directory (`<dir>/LOCK`, created if missing), held until
/// the returned file is dropped. Two processes writing one data directory would hand out the same
/// sequence numbers or delete each other's checkpoints, so the second one must not start.
///
/// # Errors
/// A message naming the directory when it cannot be created or is locked by another process.
pub fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let path = dir.join("LOCK");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(format!(
            "{} is in use by another process (its LOCK is held): one data directory per process",
            dir.display()
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(format!("cannot lock {}: {e}", path.display())),
    }
}

/// The sockets a service listens on, bound before the service starts so that tests can pass
/// `127.0.0.1:0` and read back the port, and so that bind errors surface before SERVING.
#[derive(Debug)]
pub struct Listeners {
    /// The gRPC listener.
    pub grpc: tokio::net::TcpListener,
    /// The `/metrics` listener, if the endpoint is enabled.
    pub metrics: Option<tokio::net::TcpListener>,
    /// When set, the gRPC listener serves TLS with it (see [`Listeners::configured`]).
    pub tls: Option<ServerTls>,
    /// The gRPC server's connection and HTTP/2 limits.
    pub limits: ServerLimits,
}

impl Listeners {
    /// Binds the gRPC address and, if given, the metrics address.
    ///
    /// # Errors
    /// Fails when either address cannot be bound; the message names the address.
    pub async fn bind(grpc: SocketAddr, metrics: Option<SocketAddr>) -> Result<Self, BindError> {
        let grpc = tokio::net::TcpListener::bind(grpc)
            .await
            .map_err(|source| BindError { addr: grpc, source })?;
        let metrics = match metrics {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| BindError { addr, source })?,
            ),
            None => None,
        };
        Ok(Self {
            grpc,
            metrics,
            tls: None,
            limits: ServerLimits::default(),
        })
    }

    /// These listeners serving TLS (plain text without `--tls-cert`) with the limits that
    /// `service`'s flags say.
    ///
    /// # Errors
    /// [`TlsError`] when the TLS files are missing or unusable.
    pub fn configured(mut self, service: &ServiceArgs) -> Result<Self, TlsError> {
        self.tls = service.server_tls()?;
        self.limits = service.server_limits();
        Ok(self)
    }
}

/// A listen address could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    /// The address asked for.
    pub addr: SocketAddr,
    /// Why binding failed.
    #[source]
    pub source: std::io::Error,
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroUsize;

    use clap::Parser;

    use super::{DefaultWorkers, ServiceArgs};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        service: ServiceArgs,
    }

    fn args(line: &[&str]) -> ServiceArgs {
        Cli::try_parse_from(std::iter::once("service").chain(line.iter().copied()))
            .map(|cli| cli.service)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn worker_threads_default_per_service_and_the_flag_wins() {
        let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        let one = DefaultWorkers::Fixed(NonZeroUsize::MIN);
        let none = args(&[]);
        assert_eq!(none.worker_threads(DefaultWorkers::PerCore), cores);
        assert_eq!(none.worker_threads(one), 1);
        let three = args(&["--worker-threads", "3"]);
        assert_eq!(three.worker_threads(DefaultWorkers::PerCore), 3);
        assert_eq!(three.worker_threads(one), 3);
        assert!(Cli::try_parse_from(["service", "--worker-threads", "0"]).is_err());
    }

    #[test]
    fn the_runtime_runs_the_configured_workers() -> std::io::Result<()> {
        let runtime = args(&["--worker-threads", "2"]).runtime(DefaultWorkers::PerCore)?;
        assert_eq!(runtime.metrics().num_workers(), 2);
        assert_eq!(runtime.block_on(async { 40 + 2 }), 42);
        Ok(())
    }
}
