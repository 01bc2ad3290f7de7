//! The clustered mode's flags, flattened into each service's configuration.
//!
//! Without `--nats` a service runs as on one machine and ignores the rest. With it, every
//! service must agree on the stream (`--nats-stream`) and, when the stream is first created, on
//! `--partitions`; a later mismatch refuses to start (the partitions live in the stream's
//! metadata, so a key can never be counted under two partition numbers).
//!
//! `--nats-ca-cert` makes every connection to NATS TLS (plain text refused), and
//! `--nats-tls-cert`/`--nats-tls-key` add the client certificate that servers with
//! `tls { verify: true }` require: mutual TLS. The files are read once, at start-up.

use std::{path::PathBuf, time::Duration};

/// The flags every clustered service takes.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    /// NATS servers of the cluster's JetStream log, comma-separated (nats://host:4222,…):
    /// switches the service to clustered mode. Without it the service runs on one machine.
    #[arg(long = "nats", env = "HITCOUNTER_NATS", value_delimiter = ',')]
    pub nats: Vec<String>,

    /// Name of the JetStream stream holding the deltas (and the first token of its subjects).
    #[arg(long, env = "HITCOUNTER_NATS_STREAM", default_value = "hitcounter")]
    pub nats_stream: String,

    /// Virtual partitions of the key space, fixed when the stream is first created (64 when
    /// left out). A service started later takes the stream's count when left out, and refuses
    /// to start when given another.
    #[arg(long, env = "HITCOUNTER_PARTITIONS")]
    pub partitions: Option<u32>,

    /// Replicas of the stream on the NATS servers (JetStream R). 3 keeps every acknowledged
    /// hit through the loss of any one server; 1 is for a single test server.
    #[arg(long, env = "HITCOUNTER_NATS_REPLICAS", default_value_t = 3)]
    pub nats_replicas: usize,

    /// Most bytes the stream may hold. When it is full, new hits are refused with
    /// RESOURCE_EXHAUSTED (discard-new) rather than old ones dropped.
    #[arg(long, env = "HITCOUNTER_NATS_MAX_BYTES", default_value_t = 8 << 30)]
    pub nats_max_bytes: i64,

    /// How long one request to NATS (a publish, a read) may take before it counts as failed.
    #[arg(long, env = "HITCOUNTER_NATS_TIMEOUT_MS", default_value_t = 5000)]
    pub nats_timeout_ms: u64,

    /// CA certificate (PEM) that signs the NATS servers' certificates: every connection to NATS
    /// is then TLS, trusting only servers it signed (a server offering plain text is refused).
    #[arg(long, env = "HITCOUNTER_NATS_CA_CERT", value_name = "FILE")]
    pub nats_ca_cert: Option<PathBuf>,

    /// Client certificate (PEM, leaf first) presented to NATS servers that verify clients
    /// (`tls { verify: true }`): mutual TLS. Needs --nats-tls-key and --nats-ca-cert.
    #[arg(
        long,
        env = "HITCOUNTER_NATS_TLS_CERT",
        value_name = "FILE",
        requires_all = ["nats_tls_key", "nats_ca_cert"]
    )]
    pub nats_tls_cert: Option<PathBuf>,

    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1) of --nats-tls-cert.
    #[arg(
        long,
        env = "HITCOUNTER_NATS_TLS_KEY",
        value_name = "FILE",
        requires = "nats_tls_cert"
    )]
    pub nats_tls_key: Option<PathBuf>,
}

/// Partitions of a stream created without `--partitions`.
pub const DEFAULT_PARTITIONS: u32 = 64;

impl ClusterArgs {
    /// Whether clustered mode is on.
    pub fn enabled(&self) -> bool {
        !self.nats.is_empty()
    }

    /// The NATS request timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.nats_timeout_ms.max(1))
    }
}

/// How many aggregators host each partition: query and the aggregators must agree.
#[derive(Debug, Clone, clap::Args)]
pub struct PlacementArgs {
    /// Aggregators hosting each partition in clustered mode (R_agg). With 2, reads survive
    /// the loss of any one aggregator.
    #[arg(long, env = "HITCOUNTER_REPLICAS", default_value_t = 2)]
    pub replicas: usize,
}
