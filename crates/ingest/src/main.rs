//! `hitcounter-ingest`: parses the configuration and runs [`hitcounter_ingest::serve`].

use clap::Parser;
use hitcounter_ingest::Config;
use hitcounter_telemetry::{logging, shutdown, DefaultWorkers, Listeners};

fn main() -> anyhow::Result<()> {
    hitcounter_allocator::init();
    let config = Config::parse();
    logging::init(config.service.log_format);
    let runtime = config.service.runtime(DefaultWorkers::PerCore)?;
    runtime.block_on(run(config))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let listeners = Listeners::bind(
        config.listen,
        config.service.metrics_addr(Config::DEFAULT_METRICS),
    )
    .await?
    .configured(&config.service)?;
    hitcounter_ingest::serve(config, listeners, shutdown::on_signal()).await?;
    Ok(())
}
