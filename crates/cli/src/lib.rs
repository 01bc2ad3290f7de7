//! `hitctl`, the command-line client of hitcounter, as a library: the binary in `main.rs` only
//! parses the arguments and calls [`run`].
//!
//! - [`cli`]: the command line (`clap`).
//! - [`time`]: human-friendly durations and times (`5m`, `now-10m`, RFC 3339).
//! - [`address`]: service addresses and connecting to them.
//! - [`chart`]: the terminal bar chart of `hitctl series`.
//! - [`load`]: the load generator engine, reusable without the CLI (it does not print).
//! - `token`: `hitctl token new|hash`, tokens and tokens-file entries for `--tokens-file`.
//! - [`error`]: what can fail and the exit codes.

pub mod address;
pub mod chart;
pub mod cli;
mod commands;
pub mod error;
pub mod load;
mod load_command;
mod output;
pub mod time;
mod token;

pub use error::CliError;
pub use output::report_error;

use cli::{Cli, Command};

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
pub async fn run(cli: Cli) -> Result<Outcome, CliError> {
    let out = output::Printer::new(cli.json);
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
    }
}
