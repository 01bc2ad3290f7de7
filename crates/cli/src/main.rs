//! `hitctl`: parses the command line and runs [`hitcounter_cli::run`]. Exit codes: 0 success, 1
//! server error, unreachable service, unhealthy service or a cluster partition with no ready
//! replica (`hitctl cluster status`), 2 usage error.

use std::process::ExitCode;

use clap::Parser;
use hitcounter_cli::{cli::Cli, error::EXIT_FAILURE, report_error};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let code = match runtime.block_on(hitcounter_cli::run(cli)) {
        Ok(outcome) => outcome.exit_code(),
        Err(error) if error.is_broken_pipe() => 0,
        Err(error) => {
            report_error(&error, json);
            error.exit_code()
        }
    };
    // Do not wait for blocking tasks (stdin readers and the like) on the way out.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    ExitCode::from(code)
}
