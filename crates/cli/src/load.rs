//! The load generator behind `hitctl load`, usable from other crates (a benchmark): [`run`] takes
//! a [`LoadConfig`] and returns a [`LoadReport`] without printing anything.
//!
//! `streams` concurrent `StreamHits` streams, each on its own connection, send batches of hits over
//! keys drawn from a precomputed key list (uniformly or Zipf-distributed), and record each batch's
//! ack latency in an HDR histogram.
//!
//! - Without a rate (max throughput), a stream sends as fast as the server takes batches (HTTP/2
//!   flow control and a small send queue bound what is outstanding); latency is measured from the
//!   moment a batch is handed to the stream.
//! - With a rate, stream `i` sends batch `k` at the *intended* time `start + k * pace` and the
//!   latency is measured from that intended time, not from when it was actually sent: when the
//!   server stalls, the batches that should have gone out meanwhile count the stall in their
//!   latency (no coordinated omission). To keep the pacing smooth at low rates, a batch holds at
//!   most 50 ms worth of a stream's rate (at least one hit).
//!
//! When the duration is over (or [`Progress::stop`] is called) every stream closes its request
//! side and waits for the acks of everything it sent, so `hits_accepted` is exact.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use hdrhistogram::Histogram;
use hitcounter_client::{AuthChannel, Bearer};
use hitcounter_proto::v1::{ingest_client::IngestClient, Hit, RecordHitsRequest};
use rand::{rngs::SmallRng, SeedableRng};
use rand_distr::Distribution as _;
use tokio::{sync::Notify, time::Instant};

use crate::address::{connect, Address, AddressError, ConnectError};

/// The largest batch the server accepts.
pub const MAX_BATCH: usize = 10_000;

/// How long a stream waits for its outstanding acks after it stopped sending.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest a paced batch collects a stream's rate for.
const PACED_BATCH_SPAN: Duration = Duration::from_millis(50);

/// Batches queued per stream ahead of gRPC.
const SEND_QUEUE: usize = 4;

/// Largest latency the histogram records exactly, in microseconds (1 hour).
const MAX_LATENCY_MICROS: u64 = 3_600_000_000;

/// How keys are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KeyDistribution {
    /// Every key equally likely.
    Uniform,
    /// Key `i` (0-based) with probability proportional to `1 / (i + 1)^exponent`: a few hot keys
    /// and a long tail.
    Zipf {
        /// The exponent `s`, above 0 (1.1 is typical of web traffic).
        exponent: f64,
    },
}

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Ingest's address, `host:port` or `http://host:port`.
    pub ingest: String,
    /// Total hits per second over all streams; `None` sends as fast as ingest accepts.
    pub rate: Option<u64>,
    /// How long to send for.
    pub duration: Duration,
    /// Distinct keys: `{key_prefix}0` to `{key_prefix}{keys - 1}`.
    pub keys: u64,
    /// Prefix of the generated keys.
    pub key_prefix: String,
    /// How keys are drawn.
    pub distribution: KeyDistribution,
    /// Hits per batch (1..=10,000); with a rate, batches may be smaller (see the module docs).
    pub batch: usize,
    /// Concurrent `StreamHits` streams.
    pub streams: usize,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Bearer token sent on every stream, for an ingest with `--tokens-file`.
    pub token: Option<String>,
    /// CA certificate (PEM) of an `https://` ingest.
    pub ca_cert: Option<std::path::PathBuf>,
}

impl Default for LoadConfig {
    fn default() -> Self {
        Self {
            ingest: "127.0.0.1:50051".to_owned(),
            rate: None,
            duration: Duration::from_secs(10),
            keys: 100_000,
            key_prefix: "load/".to_owned(),
            distribution: KeyDistribution::Uniform,
            batch: 1000,
            streams: 4,
            connect_timeout: Duration::from_secs(5),
            token: None,
            ca_cert: None,
        }
    }
}

impl LoadConfig {
    /// The key with index `i`.
    pub fn key(&self, i: u64) -> String {
        format!("{}{i}", self.key_prefix)
    }

    /// Hits per batch actually sent: `batch`, or less with a rate (at most 50 ms of a stream's
    /// rate, at least 1).
    pub fn effective_batch(&self) -> usize {
        match self.rate {
            None => self.batch,
            Some(rate) => {
                let per_stream = rate as f64 / self.streams.max(1) as f64;
                let span = (per_stream * PACED_BATCH_SPAN.as_secs_f64()).round();
                (span as usize).clamp(1, self.batch.max(1))
            }
        }
    }

    fn validate(&self) -> Result<(), LoadError> {
        let invalid = |message: String| Err(LoadError::InvalidConfig(message));
        if self.keys == 0 {
            return invalid("--keys must be at least 1".to_owned());
        }
        if !(1..=MAX_BATCH).contains(&self.batch) {
            return invalid(format!("--batch must be 1..={MAX_BATCH}"));
        }
        if self.streams == 0 {
            return invalid("--streams must be at least 1".to_owned());
        }
        if self.rate == Some(0) {
            return invalid(
                "--rate must be at least 1 hit/s (leave it out for max throughput)".to_owned(),
            );
        }
        if self.duration.is_zero() {
            return invalid("--duration must be longer than 0".to_owned());
        }
        if let KeyDistribution::Zipf { exponent } = self.distribution {
            if !(exponent.is_finite() && exponent > 0.0) {
                return invalid(format!(
                    "--zipf-exponent must be a number above 0, not {exponent}"
                ));
            }
        }
        Ok(())
    }
}

/// What went wrong before any load was sent. Failures during the run are in
/// [`LoadReport::error`], next to what was delivered until then.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The configuration is not usable.
    #[error("{0}")]
    InvalidConfig(String),
    /// The ingest address is malformed.
    #[error(transparent)]
    BadAddress(#[from] AddressError),
    /// Ingest could not be reached.
    #[error(transparent)]
    Unreachable(#[from] ConnectError),
    /// A stream task panicked.
    #[error("a load stream failed: {0}")]
    Task(String),
}

/// Ack latency percentiles of batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LatencySummary {
    /// Batches measured.
    pub samples: u64,
    /// Median.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// 99.9th percentile.
    pub p999: Duration,
    /// Largest.
    pub max: Duration,
}

impl LatencySummary {
    fn from_histogram(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Self::default();
        }
        let at = |q: f64| Duration::from_micros(histogram.value_at_quantile(q));
        Self {
            samples: histogram.len(),
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            p999: at(0.999),
            max: Duration::from_micros(histogram.max()),
        }
    }
}

/// The result of a load run.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Hits handed to the streams.
    pub hits_sent: u64,
    /// Hits ingest acknowledged (the sum of the acks' `accepted`).
    pub hits_accepted: u64,
    /// Batches handed to the streams.
    pub batches_sent: u64,
    /// Batches acknowledged.
    pub batches_acked: u64,
    /// Hits per batch actually used.
    pub batch: usize,
    /// From the start to the last ack.
    pub elapsed: Duration,
    /// Batch ack latency.
    pub latency: LatencySummary,
    /// The first stream failure (`CODE: message`), if any; the counts above are still exact.
    pub error: Option<String>,
}

impl LoadReport {
    /// Accepted hits per second over [`LoadReport::elapsed`].
    pub fn accepted_per_second(&self) -> f64 {
        let seconds = self.elapsed.as_secs_f64();
        if seconds > 0.0 {
            self.hits_accepted as f64 / seconds
        } else {
            0.0
        }
    }
}

/// Live counters of a run, readable while it goes (for a progress bar), and a way to stop it
/// early (the run then waits for the acks of what it sent, as at the end of the duration).
#[derive(Debug, Default)]
pub struct Progress {
    sent: AtomicU64,
    accepted: AtomicU64,
    stopped: AtomicBool,
    stop: Notify,
}

impl Progress {
    /// Hits sent so far.
    pub fn hits_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Hits acknowledged so far.
    pub fn hits_accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Asks the run to stop sending.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        self.stop.notify_waiters();
    }

    /// True once [`Progress::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }
}

/// Runs the load described by `config` and reports what happened.
///
/// # Errors
/// [`LoadError`] when nothing could be sent (bad configuration, ingest unreachable).
pub async fn run(config: LoadConfig) -> Result<LoadReport, LoadError> {
    run_with_progress(config, Arc::new(Progress::default())).await
}

/// [`run`], updating `progress` as it goes and stopping early when it is told to.
///
/// # Errors
/// See [`run`].
pub async fn run_with_progress(
    config: LoadConfig,
    progress: Arc<Progress>,
) -> Result<LoadReport, LoadError> {
    config.validate()?;
    let address = Address::parse(&config.ingest)?.with_ca_cert(config.ca_cert.clone());
    // One connection per stream: a single HTTP/2 connection is driven by one task, which would
    // cap the throughput at what one core can frame.
    let mut channels = Vec::with_capacity(config.streams);
    for _ in 0..config.streams {
        channels.push(connect(&address, "ingest", config.connect_timeout).await?);
    }
    let bearer = Bearer::new(config.token.as_deref())
        .map_err(|e| LoadError::InvalidConfig(e.to_string()))?;
    let keys: Arc<[String]> = (0..config.keys).map(|i| config.key(i)).collect();
    let sampler = KeySampler::new(config.distribution, config.keys)?;
    let batch = config.effective_batch();
    let pace = config.rate.map(|rate| {
        let per_stream = rate as f64 / config.streams as f64;
        Duration::from_secs_f64(batch as f64 / per_stream)
    });

    let start = Instant::now();
    let deadline = start + config.duration;
    let tasks: Vec<_> = channels
        .into_iter()
        .map(|channel| {
            let stream = StreamPlan {
                ingest: IngestClient::with_interceptor(channel, bearer.clone()),
                keys: Arc::clone(&keys),
                sampler: sampler.clone(),
                batch,
                pace,
                start,
                deadline,
                progress: Arc::clone(&progress),
            };
            tokio::spawn(stream.drive())
        })
        .collect();

    let mut histogram = new_histogram();
    let mut report = LoadReport {
        hits_sent: 0,
        hits_accepted: 0,
        batches_sent: 0,
        batches_acked: 0,
        batch,
        elapsed: Duration::ZERO,
        latency: LatencySummary::default(),
        error: None,
    };
    let mut panicked = None;
    for task in tasks {
        match task.await {
            Ok(outcome) => {
                report.hits_sent += outcome.hits_sent;
                report.hits_accepted += outcome.hits_accepted;
                report.batches_sent += outcome.batches_sent;
                report.batches_acked += outcome.batches_acked;
                // Same bounds on both sides: adding cannot fail.
                let _ = histogram.add(&outcome.histogram);
                if report.error.is_none() {
                    report.error = outcome.error;
                }
            }
            Err(e) => panicked = Some(e.to_string()),
        }
    }
    if let Some(message) = panicked {
        return Err(LoadError::Task(message));
    }
    report.elapsed = start.elapsed();
    report.latency = LatencySummary::from_histogram(&histogram);
    Ok(report)
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs to 1 h at 3 significant digits: constant, valid bounds.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, MAX_LATENCY_MICROS, 3).expect("constant histogram bounds")
}

/// Draws key indexes.
#[derive(Debug, Clone)]
enum KeySampler {
    Uniform(rand::distr::Uniform<u64>),
    Zipf(rand_distr::Zipf<f64>, u64),
}

impl KeySampler {
    fn new(distribution: KeyDistribution, keys: u64) -> Result<Self, LoadError> {
        match distribution {
            KeyDistribution::Uniform => rand::distr::Uniform::new(0, keys)
                .map(Self::Uniform)
                .map_err(|e| LoadError::InvalidConfig(format!("--keys: {e}"))),
            KeyDistribution::Zipf { exponent } => rand_distr::Zipf::new(keys as f64, exponent)
                .map(|zipf| Self::Zipf(zipf, keys))
                .map_err(|e| LoadError::InvalidConfig(format!("--zipf-exponent: {e}"))),
        }
    }

    fn sample(&self, rng: &mut SmallRng) -> usize {
        let index = match self {
            Self::Uniform(uniform) => uniform.sample(rng),
            // Zipf draws 1..=n; key 0 is the hottest.
            Self::Zipf(zipf, keys) => (zipf.sample(rng) as u64)
                .saturating_sub(1)
                .min(keys.saturating_sub(1)),
        };
        usize::try_from(index).unwrap_or(0)
    }
}

/// One stream's share of the run.
struct StreamPlan {
    ingest: IngestClient<AuthChannel>,
    keys: Arc<[String]>,
    sampler: KeySampler,
    batch: usize,
    pace: Option<Duration>,
    start: Instant,
    deadline: Instant,
    progress: Arc<Progress>,
}

/// What one stream did.
struct StreamOutcome {
    hits_sent: u64,
    hits_accepted: u64,
    batches_sent: u64,
    batches_acked: u64,
    histogram: Histogram<u64>,
    error: Option<String>,
}

impl StreamPlan {
    async fn drive(self) -> StreamOutcome {
        let Self {
            mut ingest,
            keys,
            sampler,
            batch,
            pace,
            start,
            deadline,
            progress,
        } = self;
        // Intended send times of the batches sent and not yet acknowledged, in order (the server
        // answers in order).
        let pending: Arc<Mutex<VecDeque<Instant>>> = Arc::default();
        let (requests, receiver) = tokio::sync::mpsc::channel::<RecordHitsRequest>(SEND_QUEUE);
        // Set when the consumer gives up, so the producer stops even if it is waiting.
        let (halt, halted) = tokio::sync::watch::channel(false);
        let producer = tokio::spawn(produce(
            requests,
            Batches {
                keys,
                sampler,
                batch,
                pace,
                start,
                deadline,
            },
            Arc::clone(&pending),
            Arc::clone(&progress),
            halted,
        ));
        let mut outcome = StreamOutcome {
            hits_sent: 0,
            hits_accepted: 0,
            batches_sent: 0,
            batches_acked: 0,
            histogram: new_histogram(),
            error: None,
        };
        let drain_deadline = deadline + DRAIN_TIMEOUT;
        let consumed = tokio::select! {
            result = consume(&mut ingest, receiver, &pending, &progress, &mut outcome) => result,
            () = tokio::time::sleep_until(drain_deadline) => Err(format!(
                "DEADLINE_EXCEEDED: acks still missing {} s after the end of the run",
                DRAIN_TIMEOUT.as_secs()
            )),
        };
        if let Err(message) = consumed {
            outcome.error = Some(message);
            let _ = halt.send(true);
        }
        match producer.await {
            Ok((hits, batches)) => {
                outcome.hits_sent = hits;
                outcome.batches_sent = batches;
            }
            Err(e) => {
                outcome
                    .error
                    .get_or_insert_with(|| format!("INTERNAL: load producer failed: {e}"));
            }
        }
        outcome
    }
}

fn lock(pending: &Mutex<VecDeque<Instant>>) -> std::sync::MutexGuard<'_, VecDeque<Instant>> {
    pending
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Reads the acks of one stream until the server ends it.
async fn consume(
    ingest: &mut IngestClient<AuthChannel>,
    receiver: tokio::sync::mpsc::Receiver<RecordHitsRequest>,
    pending: &Mutex<VecDeque<Instant>>,
    progress: &Progress,
    outcome: &mut StreamOutcome,
) -> Result<(), String> {
    let requests = tokio_stream::wrappers::ReceiverStream::new(receiver);
    let mut responses = ingest
        .stream_hits(requests)
        .await
        .map_err(|status| crate::error::status_line(&status))?
        .into_inner();
    loop {
        match responses.message().await {
            Ok(Some(ack)) => {
                let now = Instant::now();
                let intended = lock(pending).pop_front();
                if let Some(intended) = intended {
                    let micros = now.saturating_duration_since(intended).as_micros();
                    outcome
                        .histogram
                        .saturating_record(u64::try_from(micros).unwrap_or(u64::MAX).max(1));
                }
                outcome.batches_acked += 1;
                outcome.hits_accepted += ack.accepted;
                progress.accepted.fetch_add(ack.accepted, Ordering::Relaxed);
            }
            Ok(None) => return Ok(()),
            Err(status) => return Err(crate::error::status_line(&status)),
        }
    }
}

/// How one stream's batches are made and paced.
struct Batches {
    keys: Arc<[String]>,
    sampler: KeySampler,
    batch: usize,
    pace: Option<Duration>,
    start: Instant,
    deadline: Instant,
}

/// Resolves once the run is stopped ([`Progress::stop`]) or this stream is halted.
async fn stopped(progress: &Progress, halted: &mut tokio::sync::watch::Receiver<bool>) {
    let notified = progress.stop.notified();
    if progress.is_stopped() || *halted.borrow() {
        return;
    }
    tokio::select! {
        () = notified => {}
        _ = halted.wait_for(|halted| *halted) => {}
    }
}

/// Sends batches until the deadline, a stop or a halt; returns (hits, batches) handed to the
/// stream.
async fn produce(
    requests: tokio::sync::mpsc::Sender<RecordHitsRequest>,
    plan: Batches,
    pending: Arc<Mutex<VecDeque<Instant>>>,
    progress: Arc<Progress>,
    mut halted: tokio::sync::watch::Receiver<bool>,
) -> (u64, u64) {
    let mut rng = SmallRng::from_rng(&mut rand::rng());
    let (mut hits_sent, mut batches_sent) = (0u64, 0u64);
    for k in 0u64.. {
        if let Some(pace) = plan.pace {
            let intended = plan.start + pace.mul_f64(k as f64);
            if intended >= plan.deadline {
                break;
            }
            tokio::select! {
                biased;
                () = stopped(&progress, &mut halted) => break,
                () = tokio::time::sleep_until(intended) => {}
            }
        } else if Instant::now() >= plan.deadline {
            break;
        }
        if progress.is_stopped() || *halted.borrow() {
            break;
        }
        let hits = (0..plan.batch)
            .map(|_| Hit {
                key: plan.keys[plan.sampler.sample(&mut rng)].clone(),
                timestamp_ms: 0,
                count: 1,
            })
            .collect();
        // Paced: the latency clock starts at the intended send time, however late we are.
        // Max throughput: when the batch is ready to go.
        let intended = match plan.pace {
            Some(pace) => plan.start + pace.mul_f64(k as f64),
            None => Instant::now(),
        };
        lock(&pending).push_back(intended);
        let request = RecordHitsRequest {
            hits,
            batch_id: String::new(),
        };
        let sent = tokio::select! {
            biased;
            sent = requests.send(request) => sent.is_ok(),
            () = stopped(&progress, &mut halted) => false,
        };
        if !sent {
            // Stopped while waiting for room, or the stream ended (the consumer reports why).
            lock(&pending).pop_back();
            break;
        }
        hits_sent += plan.batch as u64;
        batches_sent += 1;
        progress
            .sent
            .fetch_add(plan.batch as u64, Ordering::Relaxed);
    }
    (hits_sent, batches_sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paced_batches_hold_at_most_50ms_of_a_stream() {
        let config = |rate, batch, streams| LoadConfig {
            rate,
            batch,
            streams,
            ..LoadConfig::default()
        };
        assert_eq!(config(None, 1000, 4).effective_batch(), 1000);
        assert_eq!(config(Some(100_000), 1000, 4).effective_batch(), 1000);
        assert_eq!(config(Some(2000), 1000, 2).effective_batch(), 50);
        assert_eq!(config(Some(10), 1000, 4).effective_batch(), 1);
        assert_eq!(config(Some(1_000_000), 500, 1).effective_batch(), 500);
    }

    #[test]
    fn invalid_configurations_are_refused() {
        for config in [
            LoadConfig {
                keys: 0,
                ..LoadConfig::default()
            },
            LoadConfig {
                batch: 10_001,
                ..LoadConfig::default()
            },
            LoadConfig {
                streams: 0,
                ..LoadConfig::default()
            },
            LoadConfig {
                rate: Some(0),
                ..LoadConfig::default()
            },
            LoadConfig {
                distribution: KeyDistribution::Zipf { exponent: 0.0 },
                ..LoadConfig::default()
            },
        ] {
            assert!(matches!(
                config.validate(),
                Err(LoadError::InvalidConfig(_))
            ));
        }
        assert!(LoadConfig::default().validate().is_ok());
    }

    #[test]
    fn zipf_favours_the_first_keys_and_stays_in_range() {
        let sampler = KeySampler::new(KeyDistribution::Zipf { exponent: 1.1 }, 1000).expect("zipf");
        let uniform = KeySampler::new(KeyDistribution::Uniform, 1000).expect("uniform");
        let mut rng = SmallRng::seed_from_u64(7);
        let mut zipf_hot = 0;
        let mut uniform_hot = 0;
        for _ in 0..10_000 {
            let z = sampler.sample(&mut rng);
            let u = uniform.sample(&mut rng);
            assert!(z < 1000 && u < 1000);
            zipf_hot += usize::from(z < 10);
            uniform_hot += usize::from(u < 10);
        }
        assert!(
            zipf_hot > 3000,
            "zipf: {zipf_hot} of 10000 in the 10 hottest keys"
        );
        assert!(
            uniform_hot < 300,
            "uniform: {uniform_hot} of 10000 in the first 10 keys"
        );
    }

    #[test]
    fn latency_summary_of_an_empty_run_is_zero() {
        assert_eq!(
            LatencySummary::from_histogram(&new_histogram()),
            LatencySummary::default()
        );
    }
}
