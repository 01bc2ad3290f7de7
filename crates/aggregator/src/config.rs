//! Command-line and environment configuration of the aggregator.

use std::{net::SocketAddr, path::PathBuf};

use hitcounter_telemetry::ServiceArgs;

/// The aggregator owns the sliding-window state of its shard of keys; ingest streams deltas in and
/// query reads counts out. It is internal: expose it only to ingest and query.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "hitcounter-aggregator", version, about, long_about = None)]
pub struct Config {
    /// gRPC listen address.
    #[arg(long, env = "HITCOUNTER_LISTEN", default_value = "0.0.0.0:50052")]
    pub listen: SocketAddr,

    /// Directory for the aggregator's checkpoints (created if missing).
    #[arg(long, env = "HITCOUNTER_DATA_DIR", default_value = "data/aggregator")]
    pub data_dir: PathBuf,

    /// Seconds of history kept per key at 1-second resolution. Queries with a longer window
    /// are rejected; ingest and query must use the same value.
    #[arg(long, env = "HITCOUNTER_RETENTION_SECONDS", default_value_t = 3600)]
    pub retention_seconds: u32,

    /// Owner tasks the key space is split over; 0 means one per CPU core. Each owner is the only
    /// writer of its keys' store; reads read the stores in place under a read lock, which a
    /// writer holds only for short steps (1024 deltas), so more owners mean more parallel writes
    /// and shorter waits for a read.
    #[arg(long, env = "HITCOUNTER_OWNERS", default_value_t = 0)]
    pub owners: usize,

    /// Write batches queued per owner before the apply stream waits (backpressure towards
    /// ingest). Reads do not queue here: they read the owner's store in place.
    #[arg(long, env = "HITCOUNTER_OWNER_MAILBOX", default_value_t = 1024)]
    pub owner_mailbox: usize,

    /// Most distinct keys held by this aggregator (split evenly over the owners). A batch whose
    /// new keys do not fit is refused whole, never dropped: ingest keeps it in its log and
    /// retries, and once its log is full refuses writes with RESOURCE_EXHAUSTED ("aggregator key
    /// limit reached on shard N"), until keys age out of the retention or the limit is raised
    /// (`hitcounter_aggregator_key_limit_reached`).
    #[arg(long, env = "HITCOUNTER_MAX_KEYS", default_value_t = 10_000_000)]
    pub max_keys: usize,

    /// Batches of one ingest forwarder applied out of order (above a gap) that are remembered;
    /// with the "applied through N" watermark this makes a resent batch apply once.
    #[arg(long, env = "HITCOUNTER_DEDUP_WINDOW", default_value_t = 65_536)]
    pub dedup_window: usize,

    /// How often the window state is written to a checkpoint in the data directory, in
    /// milliseconds. Ingest keeps its log until a checkpoint covers it, so this bounds how much
    /// is replayed after a crash of the aggregator; each checkpoint rewrites the whole state, so a
    /// short period costs CPU and query tail latency. 0 disables checkpoints: state is then lost on
    /// restart, and ingest, which trims its log only up to a checkpoint, fills its disk budget
    /// (for tests and throwaway setups only).
    #[arg(
        long,
        env = "HITCOUNTER_CHECKPOINT_INTERVAL_MS",
        default_value_t = 10_000
    )]
    pub checkpoint_interval_ms: u64,

    /// Most ingest forwarders tracked for deduplication; the least recently seen is forgotten.
    #[arg(long, env = "HITCOUNTER_MAX_PRODUCERS", default_value_t = 4096)]
    pub max_producers: usize,

    /// Acks queued per apply stream before the stream stops reading.
    #[arg(long, env = "HITCOUNTER_ACK_CHANNEL_CAPACITY", default_value_t = 256)]
    pub ack_channel_capacity: usize,

    /// Batches of one apply stream applied at once (decoding the next batch overlaps with
    /// applying the previous ones). Acks still go out in order.
    #[arg(long, env = "HITCOUNTER_APPLY_WINDOW", default_value_t = 4)]
    pub apply_window: usize,

    /// Clustered mode: this aggregator's number among `--nodes` (0-based; e.g. the ordinal of
    /// a StatefulSet pod). It hosts the partitions the placement gives that number.
    #[arg(long, env = "HITCOUNTER_NODE_INDEX", default_value_t = 0)]
    pub node_index: usize,

    /// Clustered mode: how many aggregators the cluster has (query lists them, in node order,
    /// in its --aggregator).
    #[arg(long, env = "HITCOUNTER_NODES", default_value_t = 1)]
    pub nodes: usize,

    /// Clustered mode with membership: this aggregator's stable id (e.g. the pod name; the
    /// characters a-z A-Z 0-9 - _ =). It announces itself in the cluster's membership and hosts
    /// the partitions the placement (rendezvous hashing over the live members) gives it; query
    /// finds it there. Replaces --node-index/--nodes.
    #[arg(long, env = "HITCOUNTER_NODE_ID", conflicts_with_all = ["node_index", "nodes"])]
    pub node_id: Option<String>,

    /// Clustered mode with membership: the gRPC address query reaches this aggregator at
    /// (default: http:// or, with --tls-cert, https:// + this host's name + the --listen port).
    #[arg(long, env = "HITCOUNTER_ADVERTISE", requires = "node_id")]
    pub advertise: Option<String>,

    /// Clustered mode with membership: most partitions built (read from the log's start) at
    /// once; more wait for the next round. Bounds the memory and log reads a membership
    /// change costs at once.
    #[arg(long, env = "HITCOUNTER_MAX_BUILDING_PARTITIONS", default_value_t = 64)]
    pub max_building_partitions: usize,

    /// Clustered mode with membership: on SIGTERM, how long the aggregator goes on serving
    /// while the partitions it holds are built on their new hosts, before it stops anyway
    /// (their other replicas then serve them). Give the orchestrator a longer grace period.
    #[arg(long, env = "HITCOUNTER_HANDOFF_TIMEOUT_SECONDS", default_value_t = 60)]
    pub handoff_timeout_seconds: u64,

    /// Clustered mode with membership: the member TTL.
    #[command(flatten)]
    pub membership: hitcounter_cluster::MembershipArgs,

    /// Clustered mode: aggregators per partition.
    #[command(flatten)]
    pub placement: hitcounter_cluster::PlacementArgs,

    /// Clustered mode: the replicated log on NATS JetStream.
    #[command(flatten)]
    pub cluster: hitcounter_cluster::ClusterArgs,

    /// Shared service settings.
    #[command(flatten)]
    pub service: ServiceArgs,
}

impl Config {
    /// Default `/metrics` address of the aggregator.
    pub const DEFAULT_METRICS: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 9102);

    /// The address this aggregator announces (see `--advertise`).
    pub fn advertised_address(&self) -> String {
        if let Some(address) = &self.advertise {
            return address.clone();
        }
        let scheme = if self.service.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        if !self.listen.ip().is_unspecified() {
            return format!("{scheme}://{}", self.listen);
        }
        // The kernel's host name: the pod name on Kubernetes, the container id in compose
        // (which resolves on the compose network).
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_owned())
            .ok()
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "localhost".to_owned());
        format!("{scheme}://{host}:{}", self.listen.port())
    }

    /// Owner count after resolving 0 to the number of cores.
    pub fn owner_count(&self) -> usize {
        if self.owners > 0 {
            return self.owners;
        }
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    }
}
