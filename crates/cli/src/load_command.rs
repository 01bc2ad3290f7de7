//! `hitctl load`: runs the [`crate::load`] engine with a progress bar and prints its report.

use std::{io::IsTerminal, sync::Arc, time::Duration};

use indicatif::{HumanCount, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

use crate::{
    address::Address,
    cli::{Distribution, LoadArgs},
    error::CliError,
    load::{self, KeyDistribution, LoadConfig, LoadReport, Progress},
    output::Printer,
    time::format_latency,
    Outcome,
};

/// How often the progress bar is refreshed.
const TICK: Duration = Duration::from_millis(200);

fn config(address: &Address, args: &LoadArgs, token: Option<&str>) -> LoadConfig {
    LoadConfig {
        ingest: address.to_string(),
        ca_cert: address.ca_cert().map(ToOwned::to_owned),
        rate: args.rate,
        duration: args.duration,
        keys: args.keys,
        key_prefix: args.key_prefix.clone(),
        distribution: match args.distribution {
            Distribution::Uniform => KeyDistribution::Uniform,
            Distribution::Zipf => KeyDistribution::Zipf {
                exponent: args.zipf_exponent,
            },
        },
        batch: usize::try_from(args.batch).unwrap_or(load::MAX_BATCH),
        streams: usize::try_from(args.streams).unwrap_or(1),
        connect_timeout: crate::commands::CONNECT_TIMEOUT,
        token: token.map(str::to_owned),
    }
}

fn progress_bar(out: Printer, duration: Duration) -> ProgressBar {
    if out.json() || !std::io::stdout().is_terminal() {
        return ProgressBar::hidden();
    }
    let millis = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    let bar = ProgressBar::with_draw_target(Some(millis), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// `hitctl load`.
pub(crate) async fn load(
    address: &Address,
    token: Option<&str>,
    args: LoadArgs,
    out: Printer,
) -> Result<Outcome, CliError> {
    let config = config(address, &args, token);
    let progress = Arc::new(Progress::default());
    let bar = progress_bar(out, config.duration);
    let stop_on_ctrl_c = tokio::spawn({
        let progress = Arc::clone(&progress);
        async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                progress.stop();
            }
        }
    });
    let run = tokio::spawn(load::run_with_progress(
        config.clone(),
        Arc::clone(&progress),
    ));
    tokio::pin!(run);
    let started = tokio::time::Instant::now();
    let mut ticker = tokio::time::interval(TICK);
    let report = loop {
        tokio::select! {
            result = &mut run => break result,
            _ = ticker.tick() => {
                let elapsed = started.elapsed();
                bar.set_position(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX));
                let accepted = progress.hits_accepted();
                let rate = accepted as f64 / elapsed.as_secs_f64().max(0.001);
                bar.set_message(format!(
                    "{} sent, {} accepted, {}/s",
                    HumanCount(progress.hits_sent()),
                    HumanCount(accepted),
                    HumanCount(rate as u64),
                ));
            }
        }
    };
    bar.finish_and_clear();
    stop_on_ctrl_c.abort();
    let report = report.map_err(|e| CliError::Load(load::LoadError::Task(e.to_string())))??;
    if out.json() {
        out.document(&report_json(&config, &report))?;
    } else {
        for line in report_lines(&config, &report) {
            out.line(&line)?;
        }
    }
    match &report.error {
        Some(error) => {
            eprintln!("error: the load stopped early: {error}");
            Ok(Outcome::Failure)
        }
        None => Ok(Outcome::Success),
    }
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn report_json(config: &LoadConfig, report: &LoadReport) -> serde_json::Value {
    let (distribution, exponent) = match config.distribution {
        KeyDistribution::Uniform => ("uniform", None),
        KeyDistribution::Zipf { exponent } => ("zipf", Some(exponent)),
    };
    json!({
        "hits_sent": report.hits_sent,
        "hits_accepted": report.hits_accepted,
        "batches_sent": report.batches_sent,
        "batches_acked": report.batches_acked,
        "elapsed_seconds": report.elapsed.as_secs_f64(),
        "accepted_per_second": report.accepted_per_second(),
        "latency_ms": {
            "samples": report.latency.samples,
            "p50": millis(report.latency.p50),
            "p90": millis(report.latency.p90),
            "p99": millis(report.latency.p99),
            "p99_9": millis(report.latency.p999),
            "max": millis(report.latency.max),
        },
        "config": {
            "ingest": config.ingest,
            "rate": config.rate,
            "duration_seconds": config.duration.as_secs_f64(),
            "keys": config.keys,
            "key_prefix": config.key_prefix,
            "distribution": distribution,
            "zipf_exponent": exponent,
            "batch": config.batch,
            "effective_batch": report.batch,
            "streams": config.streams,
        },
        "error": report.error,
    })
}

fn report_lines(config: &LoadConfig, report: &LoadReport) -> Vec<String> {
    let distribution = match config.distribution {
        KeyDistribution::Uniform => "uniform".to_owned(),
        KeyDistribution::Zipf { exponent } => format!("zipf {exponent}"),
    };
    let rate = match config.rate {
        Some(rate) => format!("{}/s", HumanCount(rate)),
        None => "max throughput".to_owned(),
    };
    let latency = &report.latency;
    vec![
        format!(
            "load: {} × {} hits/batch, {} keys ({distribution}), {rate}, {} against {}",
            config.streams,
            report.batch,
            HumanCount(config.keys),
            humantime::format_duration(config.duration),
            config.ingest
        ),
        format!("hits sent        {}", HumanCount(report.hits_sent)),
        format!("hits accepted    {}", HumanCount(report.hits_accepted)),
        format!(
            "accepted hits/s  {} (over {:.2} s)",
            HumanCount(report.accepted_per_second() as u64),
            report.elapsed.as_secs_f64()
        ),
        format!(
            "batch ack latency ({} batches): p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            HumanCount(latency.samples),
            format_latency(latency.p50),
            format_latency(latency.p90),
            format_latency(latency.p99),
            format_latency(latency.p999),
            format_latency(latency.max),
        ),
    ]
}
