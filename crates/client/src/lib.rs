//! Rust client for hitcounter.
//!
//! - [`proto`]: the generated gRPC stubs of the public API (`hitcounter.v1`), for full control.
//! - [`Client`]: a small wrapper to record hits and read counts.
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
    /// The background recorder task stopped.
    #[error("the recorder stopped: {0}")]
    RecorderStopped(String),
}

/// A connection to ingest (writes) and query (reads). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    ingest: IngestClient<Channel>,
    query: QueryClient<Channel>,
}

async fn channel(address: &str) -> Result<Channel, ClientError> {
    let uri = if address.contains("://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    };
    let endpoint = Endpoint::from_shared(uri).map_err(|e| ClientError::BadAddress {
        address: address.to_owned(),
        reason: e.to_string(),
    })?;
    let endpoint = endpoint.connect_timeout(Duration::from_secs(5));
    hitcounter_transport::connect(&endpoint)
        .await
        .map_err(|source| ClientError::Connect {
            address: address.to_owned(),
            source,
        })
}

impl Client {
    /// Connects to ingest and query (`host:port` or `http://host:port`).
    ///
    /// # Errors
    /// [`ClientError::BadAddress`] or [`ClientError::Connect`].
    pub async fn connect(ingest: &str, query: &str) -> Result<Self, ClientError> {
        Ok(Self {
            ingest: IngestClient::new(channel(ingest).await?),
            query: QueryClient::new(channel(query).await?),
        })
    }

    /// The raw generated ingest stub.
    pub fn ingest(&self) -> IngestClient<Channel> {
        self.ingest.clone()
    }

    /// The raw generated query stub.
    pub fn query(&self) -> QueryClient<Channel> {
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
