//! The command line of `hitcounter`: `all` (the default) and one subcommand per role.
//!
//! A role's subcommand takes exactly the flags of its separate binary: it *is* that binary's
//! clap `Config` (`hitcounter ingest --fsync never` = `hitcounter-ingest --fsync never`).
//!
//! `all` takes the union of the three roles' flags, built from the same `Config` types at start-up
//! (so a flag added to a role is a flag of `all` without an edit here), with four exceptions
//! where one process running three roles needs a different shape:
//! - `--listen` becomes `--ingest-listen`, `--aggregator-listen` and `--query-listen` (the roles
//!   cannot share an address), and `--listen`/`HITCOUNTER_LISTEN` is refused with a message
//!   saying so, rather than silently applied to one role;
//! - `--data-dir` is the root: ingest keeps its state in `<dir>/ingest`, the aggregator in
//!   `<dir>/aggregator`, the separate binaries' defaults under `data`, so either mode finds the
//!   other's data;
//! - `--aggregator` is refused: ingest and query use the aggregator of this process;
//! - `--metrics-listen` is one endpoint for all three roles (see [`AllConfig::metrics`]).
//!
//! Flags two roles share (`--retention-seconds`, the client stack's `--aggregator-timeout-ms`,
//! the shared service flags) take one value for both, which is what they must agree on anyway.

use std::{net::SocketAddr, path::PathBuf};

use clap::{
    builder::Command, parser::ValueSource, value_parser, Arg, ArgMatches, Args, CommandFactory,
    FromArgMatches, Parser, Subcommand,
};
use hitcounter_telemetry::{DefaultWorkers, ServiceArgs};

/// `hitcounter`: the command line.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "hitcounter",
    version,
    about = "Real-time hit counter: ingest, aggregator and query in one process (`all`, the \
default), or one of them",
    long_about = None
)]
pub struct Cli {
    /// What to run; `all` when left out.
    #[command(subcommand)]
    pub role: Option<Role>,
}

impl Cli {
    /// Parses the process's arguments (and `HITCOUNTER_*` variables). Without a subcommand it
    /// is `all`: `hitcounter` and `hitcounter --fsync never` are `hitcounter all …`. Prints the
    /// error or help and exits on bad or help arguments, like [`Parser::parse`].
    pub fn parse_role() -> Role {
        let args = with_default_role(std::env::args_os().collect());
        match Self::parse_from(args).role {
            Some(role) => role,
            // `with_default_role` leaves no subcommand out except for help and version, which
            // clap answers and exits on; a clap that did not would be a bug worth a message.
            None => Self::command()
                .error(
                    clap::error::ErrorKind::MissingSubcommand,
                    "no role given and `all` not applied",
                )
                .exit(),
        }
    }
}

/// `args` with `all` inserted when the first argument is neither a subcommand nor a request for
/// help or the version.
fn with_default_role(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    const EXPLICIT: [&str; 9] = [
        "all",
        "ingest",
        "aggregator",
        "query",
        "help",
        "-h",
        "--help",
        "-V",
        "--version",
    ];
    let explicit = args
        .get(1)
        .and_then(|first| first.to_str())
        .is_some_and(|first| EXPLICIT.contains(&first));
    if !explicit {
        args.insert(1.min(args.len()), "all".into());
    }
    args
}

/// The roles `hitcounter` can run.
#[derive(Debug, Clone, Subcommand)]
pub enum Role {
    /// Ingest, aggregator and query in one process, on their default ports (50051, 50052 on
    /// loopback only, 50053), data under ./data, one /metrics endpoint (9101). One Ctrl-C or
    /// SIGTERM stops them in order: ingest drains into the aggregator, then query stops, then
    /// the aggregator writes its last checkpoint.
    // Boxed: three whole configurations, where the other variants hold one.
    All(Box<AllConfig>),
    /// The ingest service alone: the flags of `hitcounter-ingest`.
    Ingest(hitcounter_ingest::Config),
    /// The aggregator alone: the flags of `hitcounter-aggregator`.
    Aggregator(hitcounter_aggregator::Config),
    /// The query service alone: the flags of `hitcounter-query`.
    Query(hitcounter_query::Config),
}

impl Role {
    /// The shared service settings (log format, worker threads, drain deadline) of this role.
    pub fn service(&self) -> &ServiceArgs {
        match self {
            Self::All(config) => &config.ingest.service,
            Self::Ingest(config) => &config.service,
            Self::Aggregator(config) => &config.service,
            Self::Query(config) => &config.service,
        }
    }

    /// The tokio runtime this role runs on: the same defaults as the separate binaries (query
    /// one worker thread, the others one per core); `all` one per core for the three roles.
    ///
    /// # Errors
    /// The operating system's error if the runtime cannot be created.
    pub fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        let default = match self {
            Self::Query(_) => hitcounter_query::Config::DEFAULT_WORKERS,
            Self::All(_) | Self::Ingest(_) | Self::Aggregator(_) => DefaultWorkers::PerCore,
        };
        self.service().runtime(default)
    }
}

/// The configuration of `hitcounter all`: one complete `Config` per role, as its separate
/// binary would have parsed it, with the addresses and directories of one process filled in.
#[derive(Debug, Clone)]
pub struct AllConfig {
    /// Ingest's configuration; its `listen` is `--ingest-listen`, its `data_dir`
    /// `<--data-dir>/ingest`. Its aggregator address is set when the aggregator's listener is
    /// bound (see [`crate::serve_all`]).
    pub ingest: hitcounter_ingest::Config,
    /// The aggregator's configuration; `listen` is `--aggregator-listen`, `data_dir`
    /// `<--data-dir>/aggregator`.
    pub aggregator: hitcounter_aggregator::Config,
    /// Query's configuration; `listen` is `--query-listen`.
    pub query: hitcounter_query::Config,
    /// The one `/metrics` endpoint of the process, if enabled. The `metrics` facade has one
    /// recorder per process, so every endpoint would render every role's metrics: three
    /// endpoints would make Prometheus store each series three times. One endpoint, on
    /// ingest's default port, serves them all (names say the role: `hitcounter_ingest_…`).
    pub metrics: Option<SocketAddr>,
}

impl AllConfig {
    /// Default address of the one `/metrics` endpoint of `all`.
    pub const DEFAULT_METRICS: SocketAddr = hitcounter_ingest::Config::DEFAULT_METRICS;
}

/// Argument ids of the flags only `all` has.
mod id {
    pub(super) const INGEST_LISTEN: &str = "ingest_listen";
    pub(super) const AGGREGATOR_LISTEN: &str = "aggregator_listen";
    pub(super) const QUERY_LISTEN: &str = "query_listen";
    /// Shared with the roles' `data_dir`, with `all`'s meaning (the root).
    pub(super) const DATA_DIR: &str = "data_dir";
    /// The roles' `--listen`: kept (hidden) so their `Config` parses, refused when given.
    pub(super) const LISTEN: &str = "listen";
    /// The client stack's `--aggregator` list: likewise.
    pub(super) const AGGREGATORS: &str = "aggregators";
    /// The shared `--metrics-listen`, with `all`'s help.
    pub(super) const METRICS_LISTEN: &str = "metrics_listen";
    /// The shared `--retention-seconds`, with `all`'s help.
    pub(super) const RETENTION: &str = "retention_seconds";
}

/// The flags of `all`: its own, then every role's flag once (the first role's definition of a
/// shared id), under a heading naming the role when only one role has it.
fn all_arguments(command: Command) -> Command {
    let own = [
        Arg::new(id::INGEST_LISTEN)
            .long("ingest-listen")
            .env("HITCOUNTER_INGEST_LISTEN")
            .value_name("ADDR")
            .default_value("0.0.0.0:50051")
            .value_parser(value_parser!(SocketAddr))
            .help("Ingest's gRPC address (public: clients record hits here)"),
        Arg::new(id::AGGREGATOR_LISTEN)
            .long("aggregator-listen")
            .env("HITCOUNTER_AGGREGATOR_LISTEN")
            .value_name("ADDR")
            .default_value("127.0.0.1:50052")
            .value_parser(value_parser!(SocketAddr))
            .help(
                "The aggregator's gRPC address (internal: ingest and query of this process \
                 call it; loopback only by default)",
            ),
        Arg::new(id::QUERY_LISTEN)
            .long("query-listen")
            .env("HITCOUNTER_QUERY_LISTEN")
            .value_name("ADDR")
            .default_value("0.0.0.0:50053")
            .value_parser(value_parser!(SocketAddr))
            .help("Query's gRPC address (public: clients read counts here)"),
        Arg::new(id::DATA_DIR)
            .long("data-dir")
            .env("HITCOUNTER_DATA_DIR")
            .value_name("DIR")
            .default_value("data")
            .value_parser(value_parser!(PathBuf))
            .help(
                "Root of the durable state: ingest's log in <DIR>/ingest, the aggregator's \
                 checkpoints in <DIR>/aggregator (the separate binaries' defaults under `data`, \
                 so either mode finds the other's data). Keep it across restarts",
            ),
    ];
    let roles = [
        ("Ingest", hitcounter_ingest::Config::command()),
        ("Aggregator", hitcounter_aggregator::Config::command()),
        ("Query", hitcounter_query::Config::command()),
    ];
    // Every role argument once, in first-seen order, with the roles that have it.
    let mut merged: Vec<(Arg, Vec<&'static str>)> = Vec::new();
    for (role, role_command) in &roles {
        for arg in role_command.get_arguments() {
            let arg_id = arg.get_id().as_str();
            if matches!(arg_id, "help" | "version") {
                continue;
            }
            match merged
                .iter_mut()
                .find(|(seen, _)| seen.get_id() == arg.get_id())
            {
                Some((_, owners)) => owners.push(role),
                None => merged.push((arg.clone(), vec![role])),
            }
        }
    }
    let mut command = command.args(own);
    for (arg, owners) in merged {
        let arg = match arg.get_id().as_str() {
            id::DATA_DIR => continue,
            id::LISTEN | id::AGGREGATORS => arg.hide(true),
            id::METRICS_LISTEN => arg.help(
                "Address of the one Prometheus /metrics endpoint, serving the metrics of all \
                 three roles (default 0.0.0.0:9101); `off` disables it",
            ),
            id::RETENTION => arg.help(
                "Seconds of history kept per key at 1-second resolution; older hits and longer \
                 windows are rejected",
            ),
            _ if owners.len() == 1 => arg.help_heading(owners[0]),
            _ => arg,
        };
        command = command.arg(arg);
    }
    command
}

/// An error for a flag `all` refuses, if it was given on the command line or in the environment.
fn refuse_if_given(matches: &ArgMatches, arg_id: &str, why: &str) -> Result<(), clap::Error> {
    match matches.value_source(arg_id) {
        Some(ValueSource::CommandLine | ValueSource::EnvVariable) => Err(clap::Error::raw(
            clap::error::ErrorKind::ArgumentConflict,
            format!("{why}\n"),
        )),
        _ => Ok(()),
    }
}

/// A value `all` defines itself, present whenever parsing succeeded (it has a default).
fn required<T: Clone + Send + Sync + 'static>(
    matches: &ArgMatches,
    arg_id: &str,
) -> Result<T, clap::Error> {
    matches.get_one::<T>(arg_id).cloned().ok_or_else(|| {
        clap::Error::raw(
            clap::error::ErrorKind::MissingRequiredArgument,
            format!("missing --{}\n", arg_id.replace('_', "-")),
        )
    })
}

impl FromArgMatches for AllConfig {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        refuse_if_given(
            matches,
            id::LISTEN,
            "--listen (HITCOUNTER_LISTEN) names one service's address; `hitcounter all` runs \
             three: use --ingest-listen, --aggregator-listen and --query-listen",
        )?;
        refuse_if_given(
            matches,
            id::AGGREGATORS,
            "--aggregator (HITCOUNTER_AGGREGATOR) does not apply to `hitcounter all`: its ingest \
             and query call the aggregator of the same process (--aggregator-listen); run the \
             roles separately for more shards",
        )?;
        let data_dir: PathBuf = required(matches, id::DATA_DIR)?;
        let mut ingest = hitcounter_ingest::Config::from_arg_matches(matches)?;
        ingest.listen = required(matches, id::INGEST_LISTEN)?;
        ingest.data_dir = data_dir.join("ingest");
        let mut aggregator = hitcounter_aggregator::Config::from_arg_matches(matches)?;
        aggregator.listen = required(matches, id::AGGREGATOR_LISTEN)?;
        aggregator.data_dir = data_dir.join("aggregator");
        let mut query = hitcounter_query::Config::from_arg_matches(matches)?;
        query.listen = required(matches, id::QUERY_LISTEN)?;
        let metrics = ingest.service.metrics_addr(Self::DEFAULT_METRICS);
        // The roles serve no endpoint of their own (see `metrics`).
        for service in [
            &mut ingest.service,
            &mut aggregator.service,
            &mut query.service,
        ] {
            service.metrics_listen = Some(hitcounter_telemetry::OptionalAddr::Off);
        }
        Ok(Self {
            ingest,
            aggregator,
            query,
            metrics,
        })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl Args for AllConfig {
    fn augment_args(command: Command) -> Command {
        all_arguments(command)
    }

    fn augment_args_for_update(command: Command) -> Command {
        all_arguments(command)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use clap::{CommandFactory, Parser};

    use super::{AllConfig, Cli, Role};

    fn parse(line: &[&str]) -> Result<Role, clap::Error> {
        let cli = Cli::try_parse_from(std::iter::once("hitcounter").chain(line.iter().copied()))?;
        cli.role
            .ok_or_else(|| clap::Error::raw(clap::error::ErrorKind::MissingSubcommand, "no role\n"))
    }

    fn all(line: &[&str]) -> AllConfig {
        let line: Vec<&str> = std::iter::once("all").chain(line.iter().copied()).collect();
        match parse(&line) {
            Ok(Role::All(config)) => *config,
            Ok(other) => panic!("not all: {other:?}"),
            Err(error) => panic!("{error}"),
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn all_defaults_are_the_default_ports_and_data_under_data() {
        let config = all(&[]);
        assert_eq!(config.ingest.listen.to_string(), "0.0.0.0:50051");
        assert_eq!(config.aggregator.listen.to_string(), "127.0.0.1:50052");
        assert_eq!(config.query.listen.to_string(), "0.0.0.0:50053");
        assert_eq!(config.ingest.data_dir, Path::new("data/ingest"));
        assert_eq!(config.aggregator.data_dir, Path::new("data/aggregator"));
        assert_eq!(config.metrics, Some(AllConfig::DEFAULT_METRICS));
        assert_eq!(config.metrics.map(|m| m.port()), Some(9101));
    }

    #[test]
    fn all_takes_every_roles_flags_and_shares_the_common_ones() {
        let config = all(&[
            "--fsync",
            "never",
            "--checkpoint-interval-ms",
            "2000",
            "--max-watches",
            "7",
            "--retention-seconds",
            "7200",
            "--data-dir",
            "/tmp/hc",
            "--metrics-listen",
            "off",
            "--drain-timeout-seconds",
            "5",
        ]);
        assert_eq!(
            config.ingest.fsync,
            hitcounter_ingest::config::FsyncMode::Never
        );
        assert_eq!(config.aggregator.checkpoint_interval_ms, 2000);
        assert_eq!(config.query.max_watches, 7);
        for retention in [
            config.ingest.retention_seconds,
            config.aggregator.retention_seconds,
            config.query.retention_seconds,
        ] {
            assert_eq!(retention, 7200);
        }
        assert_eq!(config.ingest.data_dir, Path::new("/tmp/hc/ingest"));
        assert_eq!(config.aggregator.data_dir, Path::new("/tmp/hc/aggregator"));
        assert_eq!(config.metrics, None);
        assert_eq!(config.query.service.drain_timeout_seconds, 5);
    }

    #[test]
    fn all_refuses_a_single_listen_address_and_foreign_aggregators() {
        for line in [
            &["all", "--listen", "0.0.0.0:1"][..],
            &["all", "--aggregator", "http://elsewhere:50052"][..],
            &["all", "--no-such-flag"][..],
        ] {
            let error = parse(line).expect_err(&line.join(" "));
            assert_eq!(error.exit_code(), 2, "{line:?}");
        }
        let error = parse(&["all", "--listen", "0.0.0.0:1"]).expect_err("refused");
        assert!(error.to_string().contains("--ingest-listen"), "{error}");
    }

    #[test]
    fn no_subcommand_is_all_and_flags_alone_go_to_all() {
        let role = |line: &[&str]| {
            let args = line.iter().map(std::ffi::OsString::from).collect();
            let args = super::with_default_role(args);
            Cli::try_parse_from(args).map(|cli| cli.role)
        };
        assert!(matches!(role(&["hitcounter"]), Ok(Some(Role::All(_)))));
        match role(&["hitcounter", "--fsync", "never"]) {
            Ok(Some(Role::All(config))) => {
                assert_eq!(
                    config.ingest.fsync,
                    hitcounter_ingest::config::FsyncMode::Never
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            role(&["hitcounter", "query"]),
            Ok(Some(Role::Query(_)))
        ));
        // Help stays the top-level help, listing the roles.
        let help = role(&["hitcounter", "--help"]).expect_err("help exits");
        assert!(help.to_string().contains("aggregator"), "{help}");
    }

    #[test]
    fn a_role_takes_the_flags_of_its_separate_binary() {
        match parse(&["ingest", "--listen", "127.0.0.1:1", "--fsync", "interval"]) {
            Ok(Role::Ingest(config)) => {
                assert_eq!(config.listen.to_string(), "127.0.0.1:1");
                assert_eq!(config.data_dir, Path::new("data/ingest"));
            }
            other => panic!("{other:?}"),
        }
        match parse(&["query"]) {
            Ok(Role::Query(config)) => assert_eq!(config.listen.port(), 50053),
            other => panic!("{other:?}"),
        }
        match parse(&["aggregator", "--owners", "3"]) {
            Ok(Role::Aggregator(config)) => assert_eq!(config.owners, 3),
            other => panic!("{other:?}"),
        }
        // Role-only flags stay with their role.
        assert!(parse(&["query", "--fsync", "never"]).is_err());
    }
}
