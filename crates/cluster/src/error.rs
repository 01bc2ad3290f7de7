//! Errors of the clustered mode's log.

/// Why the cluster's log could not be reached or used.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The NATS servers could not be reached.
    #[error("cannot connect to NATS at {urls}")]
    Connect {
        /// The URLs tried.
        urls: String,
        /// The cause.
        #[source]
        source: async_nats::ConnectError,
    },
    /// TLS with the NATS servers failed in a way trying again cannot fix: a certificate not
    /// trusted, a client certificate missing or refused, a server without TLS.
    #[error("cannot connect to NATS at {urls} over TLS: {reason}")]
    Tls {
        /// The URLs tried.
        urls: String,
        /// What went wrong, naming the flag to look at.
        reason: String,
        /// The cause.
        #[source]
        source: async_nats::ConnectError,
    },
    /// The stream exists with a different partition count.
    #[error("the stream {stream} was created with {existing} partitions but this service was started with --partitions {configured}: start it with --partitions {existing} (the partition count is fixed when the stream is created)")]
    PartitionMismatch {
        /// The stream.
        stream: String,
        /// The stream's partitions.
        existing: u32,
        /// This service's `--partitions`.
        configured: u32,
    },
    /// The stream could not be created or read.
    #[error("JetStream stream {stream}: {message}")]
    Stream {
        /// The stream.
        stream: String,
        /// What failed.
        message: String,
    },
    /// A message in the stream could not be decoded.
    #[error("undecodable message at stream sequence {sequence}: {source}")]
    Decode {
        /// Its stream sequence.
        sequence: u64,
        /// The cause.
        #[source]
        source: prost::DecodeError,
    },
    /// The flags are inconsistent.
    #[error("{0}")]
    Config(String),
}
