//! Command-line and environment configuration of the query service.

use std::net::SocketAddr;

use hitcounter_auth::{AuthArgs, Rate};
use hitcounter_stack::ClientArgs;
use hitcounter_telemetry::{DefaultWorkers, ServiceArgs};

/// Query answers counts, series, top keys and live watches by fanning out to the aggregator
/// shards and merging their answers.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "hitcounter-query", version, about, long_about = None)]
pub struct Config {
    /// gRPC listen address.
    #[arg(long, env = "HITCOUNTER_LISTEN", default_value = "0.0.0.0:50053")]
    pub listen: SocketAddr,

    /// Seconds of history the aggregators keep; longer windows are rejected with
    /// INVALID_ARGUMENT. Must match the aggregators' and ingest's value.
    #[arg(long, env = "HITCOUNTER_RETENTION_SECONDS", default_value_t = 3600)]
    pub retention_seconds: u32,

    /// Most WatchHits streams open at once; further ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "HITCOUNTER_MAX_WATCHES", default_value_t = 10_000)]
    pub max_watches: usize,

    /// Updates queued per WatchHits stream; a client that reads slower skips updates rather than
    /// queueing them.
    #[arg(long, env = "HITCOUNTER_WATCH_CHANNEL_CAPACITY", default_value_t = 4)]
    pub watch_channel_capacity: usize,

    /// Global limit of this query instance in requests per second, shared by every caller (load
    /// shedding before the aggregators; per-token quotas come from --tokens-file). A request over
    /// it gets RESOURCE_EXHAUSTED with `retry-after-ms`. 0: no limit.
    #[arg(
        long,
        env = "HITCOUNTER_GLOBAL_REQUESTS_PER_SECOND",
        default_value_t = 0
    )]
    pub global_requests_per_second: u32,

    /// Burst of the global limit, in requests (default: one second's worth).
    #[arg(long, env = "HITCOUNTER_GLOBAL_REQUESTS_BURST")]
    pub global_requests_burst: Option<u32>,

    /// Bearer tokens, roles, key scopes and quotas.
    #[command(flatten)]
    pub auth: AuthArgs,

    /// Aggregator shards and the client stack used to reach them.
    #[command(flatten)]
    pub client: ClientArgs,

    /// Clustered mode: find the aggregators in the cluster's membership (aggregators started
    /// with --node-id) and follow them as they join and leave, instead of --aggregator.
    #[arg(long, env = "HITCOUNTER_MEMBERSHIP")]
    pub membership: bool,

    /// Clustered mode with --membership: the member TTL.
    #[command(flatten)]
    pub membership_args: hitcounter_cluster::MembershipArgs,

    /// Clustered mode: aggregators per partition.
    #[command(flatten)]
    pub placement: hitcounter_cluster::PlacementArgs,

    /// Clustered mode: the replicated log on NATS JetStream (query reads the partition count
    /// from it; --aggregator then lists the aggregators in node order).
    #[command(flatten)]
    pub cluster: hitcounter_cluster::ClusterArgs,

    /// Shared service settings.
    #[command(flatten)]
    pub service: ServiceArgs,
}

impl Config {
    /// Query runs one worker thread unless `--worker-threads` says otherwise. It only routes
    /// (decode, fan out, merge), so one thread keeps up with far more than its share of a
    /// machine, and every extra worker costs a wake-up of a parked thread on the request path:
    /// on the 2-core benchmark machine one worker cut `GetHits` p99 from 1.7 to 0.6–0.8 ms
    /// unloaded and from 1.4 to 1.2 ms under ingest (docs/performance.md).
    pub const DEFAULT_WORKERS: DefaultWorkers = DefaultWorkers::Fixed(std::num::NonZeroUsize::MIN);

    /// The global limit, if any.
    pub fn global_limit(&self) -> Option<Rate> {
        Rate::new(self.global_requests_per_second, self.global_requests_burst)
    }

    /// Default `/metrics` address of query.
    pub const DEFAULT_METRICS: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 9103);
}
