//! `hitctl`, the command-line client of hitcounter, as a library: the binary in `main.rs` only
//! parses the arguments and calls [`run`].
//!
//! - [`cli`]: the command line (`clap`).
//! - [`time`]: human-friendly durations and times (`5m`, `now-10m`, RFC 3339).
//! - [`address`]: service addresses and connecting to them.
//! - [`chart`]: the terminal bar chart of `hitctl series`.
//! - [`load`]: the load generator engine, reusable without the CLI (it does not print).
//! - `token`: `hitctl token new|hash`, tokens and tokens-file entries for `--tokens-file`.
//! - `cluster`: `hitctl cluster status`, the aggregators and placement of a clustered deployment
//!   (read from NATS, not from a service's gRPC port).
//! - [`error`]: what can fail and the exit codes.

pub mod address;
pub mod chart;
pub mod cli;
mod cluster;
mod commands;
pub mod error;
pub mod load;
mod load_command;
mod output;
pub mod time;
mod token;

pub use error::CliError;
pub use output::report_error;

use cli::{Cli, ClusterCommand, Command};

/// How a command that did not fail ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Exit code 0.
    Success,
    /// Exit code 1, already reported (e.g. a service that is not SERVING).
    Failure,
}

impl Outcome {
    /// The process exit code.
    pub fn exit_code(self) -> u8 {
        match self {
            Self::Success => 0,
            Self::Failure => error::EXIT_FAILURE,
        }
    }
}

/// Runs the command `cli` describes, printing its result to stdout.
///
/// # Errors
/// [`CliError`]; report it with [`report_error`] and exit with [`CliError::exit_code`].
pub async fn run(mut cli: Cli) -> Result<Outcome, CliError> {
    let out = output::Printer::new(cli.json);
    if let Command::Cluster(ClusterCommand::Status(args)) = &cli.command {
        // It reads NATS, not a service's gRPC port: none of the address checks below apply.
        return cluster::status(args.clone(), out).await;
    }
    cli.ingest = cli.ingest.with_ca_cert(cli.ca_cert.clone());
    cli.query = cli.query.with_ca_cert(cli.ca_cert.clone());
    if let Command::Health(args) = &mut cli.command {
        args.addr = args
            .addr
            .take()
            .map(|a| a.with_ca_cert(cli.ca_cert.clone()));
    }
    // The address a failed call went to, to explain a transport failure (a plain-text address
    // on a TLS port fails with an obscure HTTP/2 error otherwise).
    let (called, service) = match &cli.command {
        Command::Hit(_) | Command::Load(_) => (cli.ingest.clone(), "ingest"),
        Command::Health(args) => (
            args.addr.clone().unwrap_or_else(|| cli.query.clone()),
            "the service",
        ),
        _ => (cli.query.clone(), "query"),
    };
    if called.is_tls() && called.ca_cert().is_none() {
        return Err(CliError::Usage(format!(
            "{service} at {called} is https://: give --ca-cert (the CA that signs its \
             certificate), or use a plain-text address"
        )));
    }
    match run_command(cli, out).await {
        Err(CliError::Status(status)) => {
            match address::ConnectError::explain_call_failure(&status, &called, service).await {
                Some(explained) => Err(CliError::Unreachable(explained)),
                None => Err(CliError::Status(status)),
            }
        }
        other => other,
    }
}

async fn run_command(cli: Cli, out: output::Printer) -> Result<Outcome, CliError> {
    let token = cli.token.as_deref();
    match cli.command {
        Command::Hit(args) => commands::hit(&cli.ingest, token, args, out).await,
        Command::Get(args) => commands::get(&cli.query, token, args, out).await,
        Command::Series(args) => commands::series(&cli.query, token, args, out).await,
        Command::Top(args) => commands::top(&cli.query, token, args, out).await,
        Command::Watch(args) => commands::watch(&cli.query, token, args, out).await,
        Command::Health(args) => {
            let (address, name) = match &args.addr {
                Some(address) => (address.clone(), "the service"),
                None => (cli.query.clone(), "query"),
            };
            commands::health(&address, token, name, args, out).await
        }
        Command::Load(args) => load_command::load(&cli.ingest, token, args, out).await,
        Command::Token(command) => token::run(command, out),
        Command::Cluster(ClusterCommand::Status(args)) => cluster::status(args, out).await,
    }
}
