//! Rust client for hitcounter.
//!
//! - [`proto`]: the generated gRPC stubs of the public API (`hitcounter.v1`), for full control.
//! - [`Client`]: a small wrapper to record hits and read counts.
//! - [`Bearer`]: the interceptor that sends a token (`authorization: Bearer …`) with every call,
//!   for services started with `--tokens-file`; [`Client::connect_with`] takes the token, and
//!   for `https://` addresses the CA that signs the servers' certificates
//!   ([`ClientOptions::ca_cert`]).
//! - [`Recorder`]: a batching recorder that collects hits in the background and sends them over
//!   one `StreamHits` stream, flushing when a batch is full or a time has passed. This is the
//!   high-throughput way to record.
//!
//! ```no_run
//! # async fn demo() -> Result<(), hitcounter_client::ClientError> {
//! use std::time::Duration;
//! use hitcounter_client::{Client, RecorderOptions};
//!
//! let client = Client::connect("http://127.0.0.1:50051", "http://127.0.0.1:50053").await?;
//! client.record_hit("/home", 1).await?;
//!
//! let recorder = client.recorder(RecorderOptions::default()).await?;
//! for _ in 0..10_000 {
//!     recorder.record("/checkout", 1).await?;
//! }
//! let summary = recorder.close().await?;
//! assert_eq!(summary.accepted, 10_000);
//!
//! let last_five_minutes = client.get_hits("/checkout", Duration::from_secs(300)).await?;
//! # let _ = last_five_minutes;
//! # Ok(()) }
//! ```

mod recorder;

use std::time::Duration;

use tonic::{
    metadata::{Ascii, MetadataValue},
    service::{interceptor::InterceptedService, Interceptor},
};

pub use hitcounter_proto::v1 as proto;
pub use recorder::{Recorder, RecorderOptions, RecorderSummary};

use proto::{ingest_client::IngestClient, query_client::QueryClient};
use tonic::transport::{Channel, Endpoint};

/// What a client call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// An address is not a valid URI.
    #[error("bad address `{address}`: {reason}")]
    BadAddress {
        /// The address given.
        address: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The server could not be reached.
    #[error("cannot reach {address}: {source}")]
    Connect {
        /// The address given.
        address: String,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The server answered with an error status.
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    /// The TLS files (`ca_cert`) are missing or unusable, or TLS is asked for in a way that
    /// cannot work (an `https://` address without a CA).
    #[error("TLS settings for {address}")]
    Tls {
        /// The address given.
        address: String,
        /// Why.
        #[source]
        source: Box<hitcounter_transport::tls::TlsError>,
    },
    /// An `https://` address was given without [`ClientOptions::ca_cert`].
    #[error(
        "{address} is https://: give the CA that signs its certificate (ClientOptions::ca_cert)"
    )]
    NoCa {
        /// The address given.
        address: String,
    },
    /// The token cannot be sent as gRPC metadata.
    #[error("the token is not valid in an `authorization` header (printable ASCII only)")]
    BadToken,
    /// The background recorder task stopped.
    #[error("the recorder stopped: {0}")]
    RecorderStopped(String),
}

/// Adds `authorization: Bearer <token>` to every call, or nothing without a token.
#[derive(Debug, Clone, Default)]
pub struct Bearer {
    value: Option<MetadataValue<Ascii>>,
}

impl Bearer {
    /// Sends `token` (none: sends nothing).
    ///
    /// # Errors
    /// [`ClientError::BadToken`] when it is not printable ASCII.
    pub fn new(token: Option<&str>) -> Result<Self, ClientError> {
        let value = token
            .map(|token| format!("Bearer {}", token.trim()).parse())
            .transpose()
            .map_err(|_| ClientError::BadToken)?;
        Ok(Self { value })
    }
}

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.value {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel whose calls carry the [`Bearer`] token.
pub type AuthChannel = InterceptedService<Channel, Bearer>;

/// Options of [`Client::connect_with`].
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// The bearer token to send (from `hitctl token new`), for services with `--tokens-file`.
    pub token: Option<String>,
    /// The CA certificate (PEM) that signs the servers' certificates, for `https://` addresses.
    pub ca_cert: Option<std::path::PathBuf>,
}

/// A connection to ingest (writes) and query (reads). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    ingest: IngestClient<AuthChannel>,
    query: QueryClient<AuthChannel>,
}

async fn channel(address: &str, options: &ClientOptions) -> Result<Channel, ClientError> {
    let uri = if address.contains("://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    };
    let endpoint = Endpoint::from_shared(uri).map_err(|e| ClientError::BadAddress {
        address: address.to_owned(),
        reason: e.to_string(),
    })?;
    let mut endpoint = endpoint.connect_timeout(Duration::from_secs(5));
    if endpoint.uri().scheme_str() == Some("https") {
        if options.ca_cert.is_none() {
            return Err(ClientError::NoCa {
                address: address.to_owned(),
            });
        }
        let tls = hitcounter_transport::tls::ClientTls {
            ca_cert: options.ca_cert.clone(),
            ..Default::default()
        };
        endpoint = tls.apply(endpoint).map_err(|source| ClientError::Tls {
            address: address.to_owned(),
            source: Box::new(source),
        })?;
    }
    hitcounter_transport::connect(&endpoint)
        .await
        .map_err(|source| ClientError::Connect {
            address: address.to_owned(),
            source,
        })
}

impl Client {
    /// Connects to ingest and query (`host:port` or `http://host:port`; `https://host:port`
    /// needs [`Client::connect_with`] and a CA).
    ///
    /// # Errors
    /// [`ClientError::BadAddress`] or [`ClientError::Connect`].
    pub async fn connect(ingest: &str, query: &str) -> Result<Self, ClientError> {
        Self::connect_with(ingest, query, ClientOptions::default()).await
    }

    /// Connects like [`Client::connect`], sending `options.token` with every call.
    ///
    /// # Errors
    /// [`ClientError::BadAddress`], [`ClientError::Connect`] or [`ClientError::BadToken`].
    pub async fn connect_with(
        ingest: &str,
        query: &str,
        options: ClientOptions,
    ) -> Result<Self, ClientError> {
        let bearer = Bearer::new(options.token.as_deref())?;
        Ok(Self {
            ingest: IngestClient::with_interceptor(
                channel(ingest, &options).await?,
                bearer.clone(),
            ),
            query: QueryClient::with_interceptor(channel(query, &options).await?, bearer),
        })
    }

    /// The raw generated ingest stub (carrying the token, if any).
    pub fn ingest(&self) -> IngestClient<AuthChannel> {
        self.ingest.clone()
    }

    /// The raw generated query stub (carrying the token, if any).
    pub fn query(&self) -> QueryClient<AuthChannel> {
        self.query.clone()
    }

    /// Records `count` hits of `key` now. Returns the accepted count.
    ///
    /// # Errors
    /// The server's status (e.g. `INVALID_ARGUMENT` for an empty key).
    pub async fn record_hit(&self, key: &str, count: u64) -> Result<u64, ClientError> {
        self.record_hit_at(key, 0, count).await
    }

    /// Records `count` hits of `key` at `timestamp_ms` (Unix milliseconds; 0 = now).
    ///
    /// # Errors
    /// The server's status.
    pub async fn record_hit_at(
        &self,
        key: &str,
        timestamp_ms: i64,
        count: u64,
    ) -> Result<u64, ClientError> {
        let response = self
            .ingest
            .clone()
            .record_hit(proto::RecordHitRequest {
                key: key.to_owned(),
                timestamp_ms,
                count,
            })
            .await?;
        Ok(response.into_inner().accepted)
    }

    /// Hits of `key` in the last `window` (whole seconds), now.
    ///
    /// # Errors
    /// The server's status.
    pub async fn get_hits(&self, key: &str, window: Duration) -> Result<u64, ClientError> {
        let window_seconds = u32::try_from(window.as_secs()).unwrap_or(u32::MAX);
        let response = self
            .query
            .clone()
            .get_hits(proto::GetHitsRequest {
                key: key.to_owned(),
                window_seconds,
                at_ms: 0,
            })
            .await?;
        Ok(response.into_inner().count)
    }

    /// Starts a batching [`Recorder`] over one `StreamHits` stream.
    ///
    /// # Errors
    /// The server's status if the stream cannot be opened.
    pub async fn recorder(&self, options: RecorderOptions) -> Result<Recorder, ClientError> {
        Recorder::start(self.ingest.clone(), options).await
    }
}
