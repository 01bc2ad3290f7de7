//! `hitcounter`: parses the command line and runs [`hitcounter::serve`]: every role in one
//! process (`hitcounter all`, also with no subcommand) or one of them (`hitcounter ingest`, …).

use hitcounter_telemetry::{logging, shutdown};

fn main() -> anyhow::Result<()> {
    hitcounter_allocator::init();
    let role = hitcounter::Cli::parse_role();
    logging::init(role.service().log_format);
    let runtime = role.runtime()?;
    runtime.block_on(async { hitcounter::serve(role, shutdown::on_signal()).await })?;
    Ok(())
}
