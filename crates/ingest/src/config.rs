//! Command-line and environment configuration of the ingest service.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use hitcounter_wal::FsyncPolicy;

use hitcounter_auth::{AuthArgs, Rate};
use hitcounter_stack::ClientArgs;
use hitcounter_telemetry::ServiceArgs;

/// Ingest accepts hits over gRPC, validates them, combines hits of the same (key, second) and
/// forwards them to the aggregator shards.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "hitcounter-ingest", version, about, long_about = None)]
pub struct Config {
    /// gRPC listen address.
    #[arg(long, env = "HITCOUNTER_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,

    /// Directory of ingest's durable state: one log per aggregator shard, the batch-id ledger
    /// and this instance's producer id. Created if missing. Keep it across restarts: what is in
    /// it is acknowledged and not yet held durably by the aggregators.
    #[arg(long, env = "HITCOUNTER_DATA_DIR", default_value = "data/ingest")]
    pub data_dir: PathBuf,

    /// When a batch counts as durable before it is acknowledged. `always`: after an fsync
    /// (shared by every request in a flush; survives power loss). `interval`: after the write,
    /// with an fsync at most every --fsync-interval-ms (a power loss or OS crash can lose about
    /// that much acknowledged data; a process crash loses nothing). `never`: after the write,
    /// never waiting for an fsync; the log is fsynced in the background every 100 ms because
    /// forwarders send only what is on disk (an OS crash can lose about the last 100 ms; a
    /// process crash loses nothing). With `interval` and `never`, hits become visible once
    /// fsynced.
    #[arg(long, env = "HITCOUNTER_FSYNC", default_value = "always")]
    pub fsync: FsyncMode,

    /// The fsync period of `--fsync interval`, in milliseconds.
    #[arg(long, env = "HITCOUNTER_FSYNC_INTERVAL_MS", default_value_t = 100)]
    pub fsync_interval_ms: u64,

    /// Disk the logs may use, in bytes. It fills while the aggregators are down or slow; when
    /// full, writes get RESOURCE_EXHAUSTED until the backlog drains.
    #[arg(long, env = "HITCOUNTER_MAX_BUFFER_BYTES", default_value_t = 1 << 30)]
    pub max_buffer_bytes: u64,

    /// Size of one log segment file, in bytes; the log is trimmed in whole segments.
    #[arg(long, env = "HITCOUNTER_SEGMENT_BYTES", default_value_t = 16 << 20)]
    pub segment_bytes: u64,

    /// Seconds of history the aggregators keep; hits older than this are rejected. Must match
    /// the aggregators' and query's value.
    #[arg(long, env = "HITCOUNTER_RETENTION_SECONDS", default_value_t = 3600)]
    pub retention_seconds: u32,

    /// How far in the future a hit's timestamp may be (clock skew allowance), in seconds.
    #[arg(long, env = "HITCOUNTER_MAX_FUTURE_SKEW_SECONDS", default_value_t = 60)]
    pub max_future_skew_seconds: u32,

    /// Hits that may wait in memory between validation and the log. When full, StreamHits stops
    /// reading (HTTP/2 flow control slows the client) and unary calls wait up to the enqueue
    /// timeout.
    #[arg(long, env = "HITCOUNTER_BUFFER_HITS", default_value_t = 100_000)]
    pub buffer_hits: usize,

    /// How long a unary RecordHit/RecordHits waits for buffer room before RESOURCE_EXHAUSTED.
    #[arg(long, env = "HITCOUNTER_ENQUEUE_TIMEOUT_MS", default_value_t = 1000)]
    pub enqueue_timeout_ms: u64,

    /// Most distinct (key, second) deltas combined before a flush to the forwarders.
    #[arg(long, env = "HITCOUNTER_COMBINE_MAX_DELTAS", default_value_t = 16_384)]
    pub combine_max_deltas: usize,

    /// Longest time hits are held for combining before a flush, in milliseconds. Bounds the
    /// added visibility delay.
    #[arg(long, env = "HITCOUNTER_COMBINE_INTERVAL_MS", default_value_t = 5)]
    pub combine_interval_ms: u64,

    /// Flushes queued between combining and the log writer.
    #[arg(long, env = "HITCOUNTER_FLUSH_CHANNEL_CAPACITY", default_value_t = 4)]
    pub flush_channel_capacity: usize,

    /// Delta batches in flight (sent, not yet acknowledged) per aggregator shard.
    #[arg(long, env = "HITCOUNTER_FORWARD_CONCURRENCY", default_value_t = 4)]
    pub forward_concurrency: usize,

    /// How long a non-empty batch_id is remembered for deduplication, in seconds (at least 600).
    #[arg(
        long,
        env = "HITCOUNTER_DEDUP_HORIZON_SECONDS",
        default_value_t = 600,
        value_parser = clap::value_parser!(u64).range(600..)
    )]
    pub dedup_horizon_seconds: u64,

    /// Most batch ids remembered at once. When full, batches with a new batch_id get
    /// RESOURCE_EXHAUSTED until old ids expire; batches without an id are unaffected.
    #[arg(long, env = "HITCOUNTER_DEDUP_CAPACITY", default_value_t = 1_000_000)]
    pub dedup_capacity: usize,

    /// Requests of one StreamHits stream that may wait for the disk at once.
    #[arg(long, env = "HITCOUNTER_STREAM_WINDOW", default_value_t = 16)]
    pub stream_window: usize,

    /// Responses queued per StreamHits stream before the stream stops reading requests.
    #[arg(
        long,
        env = "HITCOUNTER_STREAM_RESPONSE_CAPACITY",
        default_value_t = 64
    )]
    pub stream_response_capacity: usize,

    /// Global limit of this ingest instance in hits per second, shared by every caller (load
    /// shedding before the pipeline; per-token quotas come from --tokens-file). A unary call
    /// over it gets RESOURCE_EXHAUSTED with `retry-after-ms`, a stream waits. 0: no limit.
    #[arg(long, env = "HITCOUNTER_GLOBAL_HITS_PER_SECOND", default_value_t = 0)]
    pub global_hits_per_second: u32,

    /// Burst of the global limit, in hits (default: one second's worth).
    #[arg(long, env = "HITCOUNTER_GLOBAL_HITS_BURST")]
    pub global_hits_burst: Option<u32>,

    /// Publishers storing flushes in the cluster's log at once (clustered mode): each waits
    /// for its batch to be replicated, so more of them overlap those waits.
    #[arg(long, env = "HITCOUNTER_PUBLISH_LANES", default_value_t = 4)]
    pub publish_lanes: usize,

    /// Clustered mode: the replicated log on NATS JetStream.
    #[command(flatten)]
    pub cluster: hitcounter_cluster::ClusterArgs,

    /// Bearer tokens, roles, key scopes and quotas.
    #[command(flatten)]
    pub auth: AuthArgs,

    /// Aggregator shards and the client stack used to reach them.
    #[command(flatten)]
    pub client: ClientArgs,

    /// Shared service settings.
    #[command(flatten)]
    pub service: ServiceArgs,
}

/// The `--fsync` policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FsyncMode {
    /// fsync before acknowledging.
    Always,
    /// fsync at most every `--fsync-interval-ms`.
    Interval,
    /// Acknowledge after the write; fsync in the background.
    Never,
}

impl Config {
    /// Default `/metrics` address of ingest.
    pub const DEFAULT_METRICS: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 9101);

    pub(crate) fn enqueue_timeout(&self) -> Duration {
        Duration::from_millis(self.enqueue_timeout_ms)
    }

    pub(crate) fn fsync_policy(&self) -> FsyncPolicy {
        match self.fsync {
            FsyncMode::Always => FsyncPolicy::Always,
            FsyncMode::Interval => {
                FsyncPolicy::Interval(Duration::from_millis(self.fsync_interval_ms))
            }
            FsyncMode::Never => FsyncPolicy::Never,
        }
    }

    /// The global limit, if any.
    pub(crate) fn global_limit(&self) -> Option<Rate> {
        Rate::new(self.global_hits_per_second, self.global_hits_burst)
    }

    pub(crate) fn dedup_horizon(&self) -> Duration {
        Duration::from_secs(self.dedup_horizon_seconds)
    }
}
