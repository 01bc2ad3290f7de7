//! How ingest and query call the aggregator shards.
//!
//! - [`shard`]: which shard owns a key (a stable hash, the same in every service).
//! - [`stack`]: the tower stack around every call to a shard, composed in one place: concurrency
//!   limit → retry with a budget → circuit breaker → per-attempt timeout.
//! - [`ClientArgs`]: the command-line knobs of that stack and the shard addresses.
//! - [`StackError`]: what a call through the stack can fail with, and its mapping to a gRPC
//!   status for the public edge.

pub mod shard;
pub mod stack;

mod error;

use std::time::Duration;

pub use error::StackError;
pub use stack::{build, BreakerHandle, ClientStack, StackConfig};

/// Addresses of the aggregator shards and the settings of the client stack used to call them.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// Aggregator shard addresses, comma-separated, in shard order. Every ingest and query
    /// instance must list the same shards in the same order: a key's shard is
    /// `hash(key) % shard_count`.
    #[arg(
        long = "aggregator",
        env = "HITCOUNTER_AGGREGATOR",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:50052"
    )]
    pub aggregators: Vec<String>,

    /// Deadline of one call (one attempt) to an aggregator, in milliseconds.
    #[arg(long, env = "HITCOUNTER_AGGREGATOR_TIMEOUT_MS", default_value_t = 2000)]
    pub aggregator_timeout_ms: u64,

    /// Most calls in flight to one aggregator shard; further calls wait.
    #[arg(long, env = "HITCOUNTER_AGGREGATOR_CONCURRENCY", default_value_t = 256)]
    pub aggregator_concurrency: usize,

    /// Retries of a failed call (timeouts and UNAVAILABLE only), within the retry budget.
    #[arg(long, env = "HITCOUNTER_RETRY_ATTEMPTS", default_value_t = 2)]
    pub retry_attempts: u32,

    /// Retries allowed as a percentage of recent successful calls, so that retries cannot
    /// multiply the load on a struggling aggregator.
    #[arg(long, env = "HITCOUNTER_RETRY_BUDGET_PERCENT", default_value_t = 20.0)]
    pub retry_budget_percent: f32,

    /// Consecutive failed calls that open the circuit breaker.
    #[arg(long, env = "HITCOUNTER_BREAKER_FAILURES", default_value_t = 5)]
    pub breaker_failures: usize,

    /// How long an open breaker fails calls at once before letting one probe call through
    /// (half-open), in milliseconds.
    #[arg(long, env = "HITCOUNTER_BREAKER_COOLDOWN_MS", default_value_t = 2000)]
    pub breaker_cooldown_ms: u64,

    /// CA certificate (PEM) that signs the aggregators' certificates; needed for `https://`
    /// aggregator addresses (and only for them).
    #[arg(long, env = "HITCOUNTER_AGGREGATOR_CA_CERT")]
    pub aggregator_ca_cert: Option<std::path::PathBuf>,

    /// Client certificate (PEM) presented to aggregators that require one (mutual TLS, their
    /// `--tls-client-ca`); needs `--aggregator-tls-key`.
    #[arg(
        long,
        env = "HITCOUNTER_AGGREGATOR_TLS_CERT",
        requires = "aggregator_tls_key"
    )]
    pub aggregator_tls_cert: Option<std::path::PathBuf>,

    /// Private key (PEM) of `--aggregator-tls-cert`.
    #[arg(
        long,
        env = "HITCOUNTER_AGGREGATOR_TLS_KEY",
        requires = "aggregator_tls_cert"
    )]
    pub aggregator_tls_key: Option<std::path::PathBuf>,
}

impl ClientArgs {
    /// The stack settings these arguments describe.
    pub fn stack_config(&self) -> StackConfig {
        StackConfig {
            timeout: Duration::from_millis(self.aggregator_timeout_ms.max(1)),
            concurrency: self.aggregator_concurrency.max(1),
            retry_attempts: self.retry_attempts,
            retry_budget_percent: self.retry_budget_percent.clamp(0.0, 1000.0),
            breaker_failures: self.breaker_failures.max(1),
            breaker_cooldown: Duration::from_millis(self.breaker_cooldown_ms),
        }
    }

    /// Opens a lazy gRPC channel to every shard, in shard order. Nothing is dialled until the
    /// first call, so a service starts even while its aggregators are still coming up.
    /// `https://` addresses are dialled with TLS: the server verified against
    /// `--aggregator-ca-cert`, and `--aggregator-tls-cert`/`-key` presented when given.
    ///
    /// # Errors
    /// [`StackError::BadAddress`] when an address is not a valid URI, is `https://` without a CA
    /// (or `http://` next to TLS flags, which would silently send clear text);
    /// or when a TLS file is missing or unusable (checked now, at start-up).
    pub fn channels(&self) -> Result<Vec<tonic::transport::Channel>, StackError> {
        if self.aggregators.is_empty() {
            return Err(StackError::BadAddress {
                address: String::new(),
                reason: "no aggregator address given".into(),
            });
        }
        let mut seen = std::collections::HashSet::new();
        let normal = |a: &str| {
            a.trim_start_matches("http://")
                .trim_start_matches("https://")
                .trim_end_matches('/')
                .to_owned()
        };
        if let Some(twice) = self.aggregators.iter().find(|a| !seen.insert(normal(a))) {
            return Err(StackError::BadAddress {
                address: twice.clone(),
                reason: "listed twice: every shard needs its own aggregator".into(),
            });
        }
        let tls = hitcounter_transport::tls::ClientTls {
            ca_cert: self.aggregator_ca_cert.clone(),
            cert: self.aggregator_tls_cert.clone(),
            key: self.aggregator_tls_key.clone(),
        };
        let wants_tls = tls != hitcounter_transport::tls::ClientTls::default();
        // Parsed once, so that a bad file fails at start-up and not at the first call.
        let tls_config = if wants_tls {
            Some(tls.config().map_err(|e| tls_error(&self.aggregators, &e))?)
        } else {
            None
        };
        self.aggregators
            .iter()
            .map(|address| self.channel_with(address, tls_config.as_ref()))
            .collect()
    }

    /// Opens a lazy gRPC channel to one aggregator at `address` (clustered mode with
    /// membership: query learns the addresses as aggregators join). The TLS files are read
    /// now, so a renewed client certificate is used from the next new aggregator on.
    ///
    /// # Errors
    /// As [`channels`](Self::channels).
    pub fn channel(&self, address: &str) -> Result<tonic::transport::Channel, StackError> {
        let tls = hitcounter_transport::tls::ClientTls {
            ca_cert: self.aggregator_ca_cert.clone(),
            cert: self.aggregator_tls_cert.clone(),
            key: self.aggregator_tls_key.clone(),
        };
        let tls_config = if tls != hitcounter_transport::tls::ClientTls::default() {
            Some(
                tls.config()
                    .map_err(|e| tls_error(&[address.to_owned()], &e))?,
            )
        } else {
            None
        };
        self.channel_with(address, tls_config.as_ref())
    }

    fn channel_with(
        &self,
        address: &str,
        tls_config: Option<&tonic::transport::ClientTlsConfig>,
    ) -> Result<tonic::transport::Channel, StackError> {
        let uri = if address.contains("://") {
            address.to_owned()
        } else {
            format!("http://{address}")
        };
        let endpoint =
            tonic::transport::Endpoint::from_shared(uri).map_err(|e| StackError::BadAddress {
                address: address.to_owned(),
                reason: e.to_string(),
            })?;
        let endpoint = endpoint
            .connect_timeout(Duration::from_millis(self.aggregator_timeout_ms.max(1)))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let https = endpoint.uri().scheme_str() == Some("https");
        let endpoint = match (tls_config, https) {
            (Some(config), true) if self.aggregator_ca_cert.is_some() => endpoint
                .tls_config(config.clone())
                .map_err(|e| StackError::BadAddress {
                    address: address.to_owned(),
                    reason: format!("TLS settings: {e}"),
                })?,
            (_, true) => {
                return Err(StackError::BadAddress {
                    address: address.to_owned(),
                    reason: "an https:// aggregator needs --aggregator-ca-cert (the CA \
                             that signs its certificate)"
                        .into(),
                })
            }
            (Some(_), false) => {
                return Err(StackError::BadAddress {
                    address: address.to_owned(),
                    reason: "aggregator TLS flags are set but this address is not \
                             https://: write https:// to use TLS"
                        .into(),
                })
            }
            (None, false) => endpoint,
        };
        Ok(hitcounter_transport::connect_lazy(&endpoint))
    }
}

/// A TLS file error as a [`StackError`]. `BadAddress` (with the whole error chain in its
/// reason) rather than a variant of its own: callers match on `StackError` exhaustively.
fn tls_error(addresses: &[String], error: &hitcounter_transport::tls::TlsError) -> StackError {
    let mut reason = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        reason = format!("{reason}: {cause}");
        source = cause.source();
    }
    StackError::BadAddress {
        address: addresses.join(","),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        client: ClientArgs,
    }

    #[tokio::test]
    async fn each_shard_needs_its_own_address() {
        let cli = Cli::parse_from(["t", "--aggregator", "http://a:1,http://b:1/,c:1"]);
        assert!(cli.client.channels().is_ok());
        let cli = Cli::parse_from(["t", "--aggregator", "http://a:1,a:1/"]);
        let error = cli.client.channels().expect_err("duplicate");
        assert!(error.to_string().contains("listed twice"), "{error}");
        let cli = Cli::parse_from(["t", "--aggregator", "not a uri"]);
        assert!(cli.client.channels().is_err());
    }
}
