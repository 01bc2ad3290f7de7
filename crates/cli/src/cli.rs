//! The command line of `hitctl`: global flags and subcommands (`clap` derive), with the help text
//! users see under `--help`.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    address::Address,
    time::{
        parse_interval_ms, parse_positive_duration, parse_step, parse_time, parse_window, TimeSpec,
    },
};

const TIME_HELP: &str = "Times: RFC 3339 (2026-11-24T10:00:00Z), now, now-10m, now+30s, or Unix \
milliseconds. Durations: 500ms, 90s, 5m, 1h, 1h30m.";

/// `hitctl`: record hits, read counts and generate load against a hitcounter stack.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "hitctl",
    version,
    about = "Record hits, read sliding-window counts and generate load against hitcounter",
    after_help = TIME_HELP,
    propagate_version = true
)]
pub struct Cli {
    /// Ingest address (HOST:PORT, http://HOST:PORT, or https://HOST:PORT with --ca-cert).
    #[arg(
        long,
        global = true,
        env = "HITCOUNTER_INGEST_ADDR",
        default_value = "127.0.0.1:50051",
        value_name = "ADDR"
    )]
    pub ingest: Address,
    /// Query address (HOST:PORT, http://HOST:PORT, or https://HOST:PORT with --ca-cert).
    #[arg(
        long,
        global = true,
        env = "HITCOUNTER_QUERY_ADDR",
        default_value = "127.0.0.1:50053",
        value_name = "ADDR"
    )]
    pub query: Address,
    /// Bearer token for services started with --tokens-file (make one with `hitctl token new`).
    /// Prefer the environment variable: a command line is visible to other users of the machine.
    #[arg(
        long,
        global = true,
        env = "HITCOUNTER_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// CA certificate (PEM) that signs the services' certificates, for https:// addresses.
    #[arg(long, global = true, env = "HITCOUNTER_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<std::path::PathBuf>,
    /// Machine-readable output: one JSON document on stdout per command (watch: one JSON object
    /// per line). Errors are also reported as {"error": {"code", "message"}}.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Record hits of a key (Ingest.RecordHit) and print how many were accepted.
    #[command(after_help = TIME_HELP)]
    Hit(HitArgs),
    /// Print the hits of a key in a sliding window (Query.GetHits).
    #[command(after_help = TIME_HELP)]
    Get(GetArgs),
    /// Print a key's hits per step over a time range, and a small bar chart (Query.GetSeries).
    #[command(after_help = TIME_HELP)]
    Series(SeriesArgs),
    /// Print the keys with the most hits in a window (Query.TopKeys).
    #[command(after_help = TIME_HELP)]
    Top(TopArgs),
    /// Follow the count of a key live until Ctrl-C (Query.WatchHits).
    #[command(
        after_help = "On a terminal the count updates in place on one line; otherwise (or with \
--json) each update is printed on its own line. Ends with exit code 0 on Ctrl-C or when the server \
ends the stream."
    )]
    Watch(WatchArgs),
    /// Check a service's health (grpc.health.v1): exit code 0 only when SERVING.
    #[command(
        after_help = "Exit codes: 0 SERVING; 1 NOT_SERVING, unknown service or unreachable. \
Connects with a 2 s timeout; suitable for a Docker healthcheck:\n  \
healthcheck: {test: [\"CMD\", \"hitctl\", \"health\", \"--addr\", \"127.0.0.1:50053\"]}"
    )]
    Health(HealthArgs),
    /// Generate load over StreamHits and report accepted hits/s and ack latency percentiles.
    #[command(
        after_help = "Keys are {key-prefix}0 .. {key-prefix}{keys-1}, precomputed. Without --rate \
each stream sends as fast as ingest accepts. With --rate, batches are sent on a fixed schedule \
(a batch holds at most 50 ms of a stream's rate) and latency is measured from each batch's \
intended send time, so a stalled server shows in the percentiles (no coordinated omission). \
Ctrl-C stops early and still prints the report."
    )]
    Load(LoadArgs),
    /// Make bearer tokens for services started with --tokens-file.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Look at a cluster (clustered mode, --nats): its aggregators and where partitions live.
    #[command(subcommand)]
    Cluster(ClusterCommand),
}

/// `hitctl cluster …`.
#[derive(Debug, Clone, Subcommand)]
pub enum ClusterCommand {
    /// Print the aggregators of a cluster (from its membership bucket) and the placement of
    /// every partition: its hosts with their readiness and lag, and any former host still
    /// serving it. Exit code 1 when a partition has no ready replica.
    #[command(
        after_help = "Reads the cluster's NATS JetStream stream and its membership bucket \
(<stream>_members) once; it creates nothing. A partition is ready on a member that has caught up \
with the log for it; its hosts are the --replicas members that rendezvous hashing picks among the \
members that are not leaving (the aggregators' own placement, so give the same --replicas). \
Exit codes: 0 every partition has a ready replica; 1 some partition has none (its keys cannot be \
read), or the cluster cannot be read, or with --settled a partition is still moving; 2 usage \
error. To wait until a cluster can serve every partition, or until a change has settled:\n  \
until hitctl cluster status >/dev/null; do sleep 1; done\n  \
until hitctl cluster status --settled >/dev/null; do sleep 1; done"
    )]
    Status(ClusterStatusArgs),
}

/// `hitctl cluster status`. The flags mirror the services' (`hitcounter_cluster::ClusterArgs`)
/// and read the same environment variables, so a shell set up for the services works as is;
/// the services' flags about creating the stream do not apply to a tool that creates nothing.
#[derive(Debug, Clone, Args)]
pub struct ClusterStatusArgs {
    /// NATS servers of the cluster, comma-separated (nats://host:4222,…).
    #[arg(
        long = "nats",
        env = "HITCOUNTER_NATS",
        value_delimiter = ',',
        required = true,
        value_name = "URLS"
    )]
    pub nats: Vec<String>,
    /// Name of the cluster's JetStream stream (the services' --nats-stream).
    #[arg(
        long,
        env = "HITCOUNTER_NATS_STREAM",
        default_value = "hitcounter",
        value_name = "NAME"
    )]
    pub nats_stream: String,
    /// How long one request to NATS may take, in milliseconds.
    #[arg(
        long,
        env = "HITCOUNTER_NATS_TIMEOUT_MS",
        default_value_t = 5000,
        value_name = "MS"
    )]
    pub nats_timeout_ms: u64,
    /// CA certificate (PEM) that signs the NATS servers' certificates (TLS to NATS, as the
    /// services' --nats-ca-cert).
    #[arg(long, env = "HITCOUNTER_NATS_CA_CERT", value_name = "FILE")]
    pub nats_ca_cert: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for NATS servers that verify clients. Needs --nats-tls-key and
    /// --nats-ca-cert.
    #[arg(
        long,
        env = "HITCOUNTER_NATS_TLS_CERT",
        value_name = "FILE",
        requires_all = ["nats_tls_key", "nats_ca_cert"]
    )]
    pub nats_tls_cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of --nats-tls-cert.
    #[arg(
        long,
        env = "HITCOUNTER_NATS_TLS_KEY",
        value_name = "FILE",
        requires = "nats_tls_cert"
    )]
    pub nats_tls_key: Option<std::path::PathBuf>,
    /// Aggregators per partition, as the aggregators were started with.
    #[command(flatten)]
    pub placement: hitcounter_cluster::PlacementArgs,
    /// The member TTL, as the aggregators were started with.
    #[command(flatten)]
    pub membership: hitcounter_cluster::MembershipArgs,
    /// Also exit 1 unless the placement has settled: every partition ready on exactly its
    /// hosts, no move in progress (what to wait for between two membership changes).
    #[arg(long)]
    pub settled: bool,
}

/// `hitctl token …`.
#[derive(Debug, Clone, Subcommand)]
pub enum TokenCommand {
    /// Make a new random token: prints it once, and the tokens-file entry holding its SHA-256.
    #[command(
        after_help = "Give the token to the client (e.g. as HITCOUNTER_TOKEN) and append the entry \
to the services' tokens file; they reload it within --tokens-poll-ms. The token itself is stored \
nowhere: lose it and make a new one."
    )]
    New(TokenNewArgs),
    /// Print the SHA-256 (hex) of a token read from standard input, as the tokens file holds it.
    Hash,
}

/// `hitctl token new`.
#[derive(Debug, Clone, Args)]
pub struct TokenNewArgs {
    /// The entry's name, shown in logs and metric labels (letters, digits, `.`, `_`, `-`).
    #[arg(long)]
    pub name: String,
    /// A role: write (Ingest), read (Query) or admin (both). Repeat for several.
    #[arg(long = "role", required = true, value_parser = ["write", "read", "admin"])]
    pub roles: Vec<String>,
    /// A key prefix the token may write and read; repeat for several. None: every key.
    #[arg(long = "prefix", value_name = "PREFIX")]
    pub prefixes: Vec<String>,
    /// Ingest quota in hits per second.
    #[arg(long, value_name = "N")]
    pub hits_per_second: Option<u32>,
    /// Burst of the ingest quota, in hits (default: one second's worth).
    #[arg(long, value_name = "N", requires = "hits_per_second")]
    pub hits_burst: Option<u32>,
    /// Query quota in requests per second.
    #[arg(long, value_name = "N")]
    pub requests_per_second: Option<u32>,
    /// Burst of the query quota, in requests (default: one second's worth).
    #[arg(long, value_name = "N", requires = "requests_per_second")]
    pub requests_burst: Option<u32>,
    /// Most WatchHits streams open at once.
    #[arg(long, value_name = "N")]
    pub max_watches: Option<u32>,
}

/// `hitctl hit`.
#[derive(Debug, Clone, Args)]
pub struct HitArgs {
    /// The key (a page, a route, a user id), 1 to 256 bytes.
    pub key: String,
    /// How many hits (0 counts as 1, at most 1e9).
    #[arg(long, short = 'n', default_value_t = 1)]
    pub count: u64,
    /// When the hits happened (default: the server's receive time).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub at: Option<TimeSpec>,
}

/// `hitctl get`.
#[derive(Debug, Clone, Args)]
pub struct GetArgs {
    /// The key.
    pub key: String,
    /// Window length (whole seconds, at most the retention: 1h by default).
    #[arg(long, short = 'w', value_name = "DURATION", default_value = "5m", value_parser = parse_window)]
    pub window: u32,
    /// End of the window (default: now).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub at: Option<TimeSpec>,
}

/// `hitctl series`.
#[derive(Debug, Clone, Args)]
pub struct SeriesArgs {
    /// The key.
    pub key: String,
    /// Start of the range (inclusive).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub from: TimeSpec,
    /// End of the range (exclusive).
    #[arg(long, value_name = "TIME", default_value = "now", value_parser = parse_time)]
    pub to: TimeSpec,
    /// Step between points (default: a round step giving at most 60 points).
    #[arg(long, value_name = "DURATION", value_parser = parse_step)]
    pub step: Option<u32>,
}

/// `hitctl top`.
#[derive(Debug, Clone, Args)]
pub struct TopArgs {
    /// Window length.
    #[arg(long, short = 'w', value_name = "DURATION", default_value = "5m", value_parser = parse_window)]
    pub window: u32,
    /// How many keys (at most 1000).
    #[arg(long, short = 'l', default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: u32,
    /// Only keys starting with this prefix.
    #[arg(long, short = 'p', value_name = "PREFIX", default_value = "")]
    pub prefix: String,
    /// End of the window (default: now).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub at: Option<TimeSpec>,
}

/// `hitctl watch`.
#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    /// The key.
    pub key: String,
    /// Window length.
    #[arg(long, short = 'w', value_name = "DURATION", default_value = "5m", value_parser = parse_window)]
    pub window: u32,
    /// Time between updates (the server raises anything below 100ms to 100ms).
    #[arg(long, short = 'i', value_name = "DURATION", default_value = "1s", value_parser = parse_interval_ms)]
    pub interval: u32,
}

/// `hitctl health`.
#[derive(Debug, Clone, Args)]
pub struct HealthArgs {
    /// Address to check (default: the query address, --query).
    #[arg(long, value_name = "HOST:PORT")]
    pub addr: Option<Address>,
    /// Service name to check; empty for the whole server (e.g. hitcounter.v1.Query).
    #[arg(long, value_name = "NAME", default_value = "")]
    pub service: String,
    /// Connect and answer timeout.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_positive_duration)]
    pub timeout: Duration,
}

/// Key distributions of `hitctl load`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Distribution {
    /// Every key equally likely.
    Uniform,
    /// A few hot keys and a long tail (see --zipf-exponent).
    Zipf,
}

/// `hitctl load`.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Total hits per second; leave out for max throughput.
    #[arg(long, value_name = "HITS_PER_S", value_parser = clap::value_parser!(u64).range(1..))]
    pub rate: Option<u64>,
    /// How long to send for.
    #[arg(long, short = 'd', value_name = "DURATION", default_value = "10s", value_parser = parse_positive_duration)]
    pub duration: Duration,
    /// Distinct keys.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub keys: u64,
    /// Prefix of the generated keys.
    #[arg(long, value_name = "PREFIX", default_value = "load/")]
    pub key_prefix: String,
    /// How keys are drawn.
    #[arg(long, value_enum, default_value_t = Distribution::Uniform)]
    pub distribution: Distribution,
    /// Exponent of the Zipf distribution (above 0; larger is more skewed).
    #[arg(long, value_name = "S", default_value_t = 1.1)]
    pub zipf_exponent: f64,
    /// Hits per batch.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub batch: u64,
    /// Concurrent StreamHits streams.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub streams: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_and_defaults() {
        let cli =
            Cli::try_parse_from(["hitctl", "get", "/home", "--query", "http://q:1", "--json"])
                .expect("parses");
        assert_eq!(cli.query.to_string(), "q:1");
        assert!(cli.json);
        let Command::Get(get) = cli.command else {
            panic!("not get")
        };
        assert_eq!(get.window, 300);
        assert_eq!(get.at, None);
    }

    #[test]
    fn usage_errors() {
        for args in [
            vec!["hitctl", "get", "k", "--window", "5x"],
            vec!["hitctl", "get", "k", "--at", "yesterday"],
            vec!["hitctl", "series", "k"],
            vec!["hitctl", "top", "--limit", "0"],
            vec!["hitctl", "load", "--batch", "20000"],
            vec!["hitctl", "get", "k", "--query", "grpc://q:1"],
        ] {
            let err = Cli::try_parse_from(&args).expect_err(&args.join(" "));
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }
}
