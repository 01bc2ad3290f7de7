//! The clients of each phase, and what they were answered.
//!
//! Every phase records into its own keys (`/<phase>-<i>`) and sums the `accepted` of every
//! answer it got, so that the phase's keys can be checked against it afterwards.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use futures::StreamExt;
use hitcounter_proto::v1::{
    ingest_client::IngestClient, query_client::QueryClient, GetHitsManyRequest, Hit,
    RecordHitRequest, RecordHitsRequest, WatchHitsRequest,
};
use rand::{rngs::SmallRng, Rng, SeedableRng};
use tokio::{
    sync::{mpsc, Semaphore},
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::{
    server::{channel, Rss, Server},
    Args,
};

/// Keys read back per `GetHitsMany` call.
const READ_CHUNK: usize = 500;

/// One phase's keys.
pub(crate) struct Phase {
    pub(crate) name: &'static str,
    keys: Arc<Vec<String>>,
}

impl Phase {
    pub(crate) fn new(name: &'static str, keys: u64) -> Self {
        Self {
            name,
            keys: Arc::new((0..keys.max(1)).map(|i| format!("/{name}-{i}")).collect()),
        }
    }

    fn batch(&self, rng: &mut SmallRng, hits: usize) -> RecordHitsRequest {
        RecordHitsRequest {
            hits: (0..hits.max(1))
                .map(|_| Hit {
                    key: self.keys[rng.random_range(0..self.keys.len())].clone(),
                    count: 1,
                    timestamp_ms: 0,
                })
                .collect(),
            batch_id: String::new(),
        }
    }
}

/// What the clients of a phase were answered.
#[derive(Debug, Default)]
pub(crate) struct Outcomes {
    /// Sum of `accepted` over every answer.
    pub(crate) acknowledged_hits: u64,
    /// Calls (a unary call, or one request of a stream) by status code name.
    pub(crate) calls: BTreeMap<String, u64>,
    /// Paced stream batches not sent because the stream's queue was full: the server was not
    /// reading that stream (HTTP/2 flow control, i.e. backpressure).
    pub(crate) held_back: u64,
    /// Unary calls due while `--max-unary-in-flight` were outstanding, not started.
    pub(crate) not_started: u64,
    /// Acknowledged hits per second of the phase (by arrival of the answer).
    pub(crate) per_second: Vec<u64>,
    /// Hits of unary calls whose outcome the client cannot know: the call failed after it may
    /// have been taken (its deadline expired, the connection broke). They may or may not be
    /// counted; a client that must know retries with a `batch_id`. Refusals
    /// (`RESOURCE_EXHAUSTED`, `INVALID_ARGUMENT`) are not among them: those count nothing.
    pub(crate) ambiguous_hits: u64,
}

/// Outcomes shared by a phase's tasks.
struct Tally {
    started: Instant,
    acknowledged: AtomicU64,
    held_back: AtomicU64,
    not_started: AtomicU64,
    ambiguous: AtomicU64,
    per_second: Vec<AtomicU64>,
    calls: Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    fn new(seconds: u64) -> Arc<Self> {
        Arc::new(Self {
            started: Instant::now(),
            acknowledged: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
            not_started: AtomicU64::new(0),
            ambiguous: AtomicU64::new(0),
            per_second: (0..seconds.max(1)).map(|_| AtomicU64::new(0)).collect(),
            calls: Mutex::new(BTreeMap::new()),
        })
    }

    fn call(&self, code: &str, n: u64) {
        if let Ok(mut calls) = self.calls.lock() {
            *calls.entry(code.to_owned()).or_default() += n;
        }
    }

    fn acknowledged(&self, hits: u64) {
        self.acknowledged.fetch_add(hits, Ordering::Relaxed);
        let second = self.started.elapsed().as_secs() as usize;
        if let Some(slot) = self.per_second.get(second) {
            slot.fetch_add(hits, Ordering::Relaxed);
        }
        self.call("OK", 1);
    }

    fn failed(&self, status: &tonic::Status) {
        self.call(&format!("{:?}", status.code()), 1);
    }

    /// A unary call of `hits` hits failed with `status`.
    fn unary_failed(&self, status: &tonic::Status, hits: u64) {
        self.failed(status);
        if !matches!(
            status.code(),
            tonic::Code::ResourceExhausted | tonic::Code::InvalidArgument
        ) {
            self.ambiguous.fetch_add(hits, Ordering::Relaxed);
        }
    }

    fn outcomes(&self) -> Outcomes {
        Outcomes {
            acknowledged_hits: self.acknowledged.load(Ordering::Relaxed),
            calls: self.calls.lock().map(|c| c.clone()).unwrap_or_default(),
            held_back: self.held_back.load(Ordering::Relaxed),
            not_started: self.not_started.load(Ordering::Relaxed),
            ambiguous_hits: self.ambiguous.load(Ordering::Relaxed),
            per_second: self
                .per_second
                .iter()
                .map(|s| s.load(Ordering::Relaxed))
                .collect(),
        }
    }
}

/// Opens a `StreamHits` on `channel` fed from the returned sender; a task reads its answers
/// into `tally` unless `read` is false, in which case the answers are only read once the
/// sender is dropped (a client that never reads, until it goes away). The task ends when the
/// stream does.
async fn open_stream(
    channel: Channel,
    tally: Arc<Tally>,
    queue: usize,
    read: bool,
    release: CancellationToken,
) -> anyhow::Result<(mpsc::Sender<RecordHitsRequest>, tokio::task::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel(queue);
    let mut client = IngestClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let reader = tokio::spawn(async move {
        let mut answers = match client.stream_hits(ReceiverStream::new(rx)).await {
            Ok(answers) => answers.into_inner(),
            Err(status) => return tally.failed(&status),
        };
        if !read {
            release.cancelled().await;
        }
        loop {
            match answers.message().await {
                Ok(Some(answer)) => tally.acknowledged(answer.accepted),
                Ok(None) => break,
                Err(status) => {
                    tally.failed(&status);
                    break;
                }
            }
        }
    });
    Ok((tx, reader))
}

/// Phase 1: `--streams` streams, each sending as fast as it is answered, for
/// `--capacity-seconds`. `acknowledged_hits` counts everything; `per_second` the window.
pub(crate) async fn closed_loop(
    server: &Server,
    phase: &Phase,
    args: &Args,
) -> anyhow::Result<Outcomes> {
    let tally = Tally::new(args.capacity_seconds);
    let deadline = Instant::now() + Duration::from_secs(args.capacity_seconds);
    let release = CancellationToken::new();
    let mut tasks = Vec::new();
    for i in 0..args.streams {
        let (tx, reader) = open_stream(
            channel(server.ingest).await?,
            Arc::clone(&tally),
            4,
            true,
            release.clone(),
        )
        .await?;
        let keys = Phase {
            name: phase.name,
            keys: Arc::clone(&phase.keys),
        };
        let batch = args.batch;
        let sender = tokio::spawn(async move {
            let mut rng = SmallRng::seed_from_u64(i as u64);
            while Instant::now() < deadline {
                if tx.send(keys.batch(&mut rng, batch)).await.is_err() {
                    break;
                }
            }
        });
        tasks.push((sender, reader));
    }
    for (sender, reader) in tasks {
        sender.await?;
        reader.await?;
    }
    let mut outcomes = tally.outcomes();
    outcomes.per_second.truncate(args.capacity_seconds as usize);
    Ok(outcomes)
}

/// Phase 2: `offered` hits/s for `--overload-seconds`, half over paced streams, half as paced
/// unary calls (open loop).
pub(crate) async fn open_loop(
    server: &Server,
    phase: &Phase,
    args: &Args,
    offered: u64,
    _rss: &Rss,
) -> anyhow::Result<Outcomes> {
    let tally = Tally::new(args.overload_seconds);
    let deadline = Instant::now() + Duration::from_secs(args.overload_seconds);
    let release = CancellationToken::new();
    let streams = args.streams.max(1);
    // Batches per second of each stream, and of the unary side as a whole.
    let batches_per_second = (offered as f64 / args.batch.max(1) as f64).max(1.0);
    let stream_pace = Duration::from_secs_f64(2.0 * streams as f64 / batches_per_second);
    let unary_pace = Duration::from_secs_f64(2.0 / batches_per_second);
    let mut tasks = Vec::new();
    for i in 0..streams {
        let (tx, reader) = open_stream(
            channel(server.ingest).await?,
            Arc::clone(&tally),
            4,
            true,
            release.clone(),
        )
        .await?;
        let keys = Phase {
            name: phase.name,
            keys: Arc::clone(&phase.keys),
        };
        let (batch, tally) = (args.batch, Arc::clone(&tally));
        tasks.push(tokio::spawn(async move {
            let mut rng = SmallRng::seed_from_u64(1000 + i as u64);
            let mut ticks = tokio::time::interval(stream_pace);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            while Instant::now() < deadline {
                ticks.tick().await;
                match tx.try_send(keys.batch(&mut rng, batch)) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        tally.held_back.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => break,
                }
            }
            drop(tx);
            let _ = reader.await;
        }));
    }
    // The unary side: calls over 16 connections, at most `--max-unary-in-flight` outstanding.
    let mut channels = Vec::new();
    for _ in 0..16 {
        channels.push(channel(server.ingest).await?);
    }
    let in_flight = Arc::new(Semaphore::new(args.max_unary_in_flight));
    let timeout = Duration::from_millis(args.unary_timeout_ms);
    let mut rng = SmallRng::seed_from_u64(7);
    let mut ticks = tokio::time::interval(unary_pace);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut n = 0usize;
    while Instant::now() < deadline {
        ticks.tick().await;
        let Ok(permit) = Arc::clone(&in_flight).try_acquire_owned() else {
            tally.not_started.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let mut client = IngestClient::new(channels[n % channels.len()].clone());
        n += 1;
        let request = phase.batch(&mut rng, args.batch);
        let hits = request.hits.len() as u64;
        let tally = Arc::clone(&tally);
        tokio::spawn(async move {
            let mut request = tonic::Request::new(request);
            request.set_timeout(timeout);
            match client.record_hits(request).await {
                Ok(answer) => tally.acknowledged(answer.into_inner().accepted),
                Err(status) => tally.unary_failed(&status, hits),
            }
            drop(permit);
        });
    }
    // Every call started is answered (or times out) before the phase ends.
    let _all = in_flight
        .acquire_many(args.max_unary_in_flight as u32)
        .await?;
    for task in tasks {
        task.await?;
    }
    Ok(tally.outcomes())
}

/// CPU time (user + system) of process `pid` so far; `None` if it cannot be read.
pub(crate) fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on Linux.
    Some(ticks / 100.0)
}

/// Median latency of `n` probe `RecordHit`s, one after the other.
pub(crate) async fn probe_latency(server: &Server, n: usize) -> anyhow::Result<Duration> {
    let mut client = IngestClient::new(channel(server.ingest).await?);
    let mut latencies = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let started = Instant::now();
        client.record_hit(probe()).await?;
        latencies.push(started.elapsed());
    }
    latencies.sort_unstable();
    Ok(latencies[latencies.len() / 2])
}

fn probe() -> RecordHitRequest {
    RecordHitRequest {
        key: "/probe".into(),
        count: 1,
        timestamp_ms: 0,
    }
}

/// When a probe `RecordHit` was first answered OK within `limit` (probes every 50 ms, each
/// over a new connection, as a new client would).
pub(crate) async fn until_probe_fast(
    server: &Server,
    limit: Duration,
) -> anyhow::Result<std::time::Instant> {
    let give_up = Instant::now() + Duration::from_secs(600);
    loop {
        let mut client = IngestClient::new(channel(server.ingest).await?);
        let started = Instant::now();
        let mut request = tonic::Request::new(probe());
        request.set_timeout(Duration::from_secs(10));
        if client.record_hit(request).await.is_ok() && started.elapsed() <= limit {
            return Ok(std::time::Instant::now());
        }
        anyhow::ensure!(Instant::now() < give_up, "no fast probe within 600 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sum of the counts of every key of `phase` over the last hour.
pub(crate) async fn visible_sum(server: &Server, phase: &Phase) -> anyhow::Result<u64> {
    let mut query = QueryClient::new(channel(server.query).await?);
    let mut sum = 0;
    for keys in phase.keys.chunks(READ_CHUNK) {
        let answer = query
            .get_hits_many(GetHitsManyRequest {
                keys: keys.to_vec(),
                window_seconds: 3600,
                at_ms: 0,
            })
            .await?
            .into_inner();
        sum += answer.results.iter().map(|r| r.count).sum::<u64>();
    }
    Ok(sum)
}

/// Latencies of a normal client recording while a phase's abusers are at work.
#[derive(Debug, Default)]
pub(crate) struct Normal {
    pub(crate) calls: usize,
    pub(crate) failed: usize,
    pub(crate) median: Duration,
    pub(crate) max: Duration,
}

/// A normal client: one `RecordHits` of 10 hits of the phase every 100 ms until `until`.
async fn normal_client(
    server: &Server,
    phase: &Phase,
    tally: &Tally,
    until: Instant,
) -> anyhow::Result<Normal> {
    let mut client = IngestClient::new(channel(server.ingest).await?);
    let mut rng = SmallRng::seed_from_u64(99);
    let mut latencies = Vec::new();
    let mut failed = 0;
    while Instant::now() < until {
        let started = Instant::now();
        let mut request = tonic::Request::new(phase.batch(&mut rng, 10));
        request.set_timeout(Duration::from_secs(10));
        match client.record_hits(request).await {
            Ok(answer) => {
                tally.acknowledged(answer.into_inner().accepted);
                latencies.push(started.elapsed());
            }
            Err(status) => {
                tally.unary_failed(&status, 10);
                failed += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    latencies.sort_unstable();
    Ok(Normal {
        calls: latencies.len() + failed,
        failed,
        median: latencies
            .get(latencies.len() / 2)
            .copied()
            .unwrap_or_default(),
        max: latencies.last().copied().unwrap_or_default(),
    })
}

/// A connection whose streams take 1 KiB before the server has to wait for the reader.
async fn stingy(addr: std::net::SocketAddr) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .initial_stream_window_size(Some(1024))
        .connect_timeout(Duration::from_secs(30));
    Ok(hitcounter_transport::connect(&endpoint).await?)
}

/// What phase 3 saw.
pub(crate) struct NeverReaders {
    pub(crate) outcomes: Outcomes,
    pub(crate) normal: Normal,
    /// How long connecting every abuser took (the hold starts after).
    pub(crate) opened_in: Duration,
    /// WatchHits streams that opened.
    pub(crate) watches: usize,
}

/// Phase 3: `--never-readers` StreamHits that send batches of `--never-reader-batch` hits (10)
/// for as long as the server
/// reads them and never read an answer, as many WatchHits (100 ms) never read, held for
/// `--hold-seconds` while a normal client records; then the StreamHits clients stop sending,
/// read everything they were answered, and go.
pub(crate) async fn never_readers(
    server: &Server,
    phase: &Phase,
    args: &Args,
    _rss: &Rss,
) -> anyhow::Result<NeverReaders> {
    let tally = Tally::new(args.hold_seconds + 600);
    let release = CancellationToken::new();
    // The hold starts once every abuser is connected.
    let (start_tx, start_rx) = tokio::sync::watch::channel(None::<Instant>);
    let opening = Instant::now();
    let mut feeders = Vec::new();
    let mut readers = Vec::new();
    for i in 0..args.never_readers {
        let (tx, reader) = open_stream(
            stingy(server.ingest).await?,
            Arc::clone(&tally),
            1,
            false,
            release.clone(),
        )
        .await?;
        readers.push(reader);
        let keys = Phase {
            name: phase.name,
            keys: Arc::clone(&phase.keys),
        };
        let mut start_rx = start_rx.clone();
        let batch = args.never_reader_batch;
        feeders.push(tokio::spawn(async move {
            let mut rng = SmallRng::seed_from_u64(5000 + i as u64);
            let Ok(stop) = start_rx
                .wait_for(Option::is_some)
                .await
                .map(|s| s.unwrap_or_else(Instant::now))
            else {
                return;
            };
            loop {
                let batch = keys.batch(&mut rng, batch);
                tokio::select! {
                    sent = tx.send(batch) => if sent.is_err() { break },
                    _ = tokio::time::sleep_until(stop) => break,
                }
            }
        }));
    }
    let mut watches = Vec::new();
    for i in 0..args.never_readers {
        let mut client = QueryClient::new(stingy(server.query).await?);
        match client
            .watch_hits(WatchHitsRequest {
                key: phase.keys[i % phase.keys.len()].clone(),
                window_seconds: 60,
                interval_ms: 100,
            })
            .await
        {
            Ok(watch) => watches.push(watch.into_inner()),
            Err(status) => tally.call(&format!("WatchHits {:?}", status.code()), 1),
        }
    }
    let opened_in = opening.elapsed();
    let stop = Instant::now() + Duration::from_secs(args.hold_seconds);
    let _ = start_tx.send(Some(stop));
    let normal = normal_client(server, phase, &tally, stop).await?;
    for feeder in feeders {
        feeder.await?;
    }
    // The never-readers read at last: everything they were acknowledged is tallied.
    release.cancel();
    for reader in readers {
        reader.await?;
    }
    let watches_open = watches.len();
    drop(watches);
    Ok(NeverReaders {
        outcomes: tally.outcomes(),
        normal,
        opened_in,
        watches: watches_open,
    })
}

/// What phase 4 saw.
pub(crate) struct Idle {
    pub(crate) opened: usize,
    /// How long opening them took (the hold starts after).
    pub(crate) opened_in: Duration,
    pub(crate) first_error: Option<String>,
    pub(crate) outcomes: Outcomes,
    pub(crate) normal: Normal,
}

/// Phase 4: `--idle-connections` HTTP/2 connections to ingest that send nothing, held for
/// `--hold-seconds` while a normal client records.
pub(crate) async fn idle_connections(
    server: &Server,
    phase: &Phase,
    args: &Args,
    _rss: &Rss,
) -> anyhow::Result<Idle> {
    let tally = Tally::new(args.hold_seconds + 60);
    let addr = server.ingest;
    let opening = Instant::now();
    let results: Vec<Result<Channel, String>> = futures::stream::iter(0..args.idle_connections)
        .map(|_| async move {
            let endpoint = Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| e.to_string())?
                .connect_timeout(Duration::from_secs(30));
            hitcounter_transport::connect(&endpoint)
                .await
                .map_err(|e| format!("{e:?}"))
        })
        .buffer_unordered(256)
        .collect()
        .await;
    let opened_in = opening.elapsed();
    let first_error = results.iter().find_map(|r| r.as_ref().err().cloned());
    let idle: Vec<Channel> = results.into_iter().filter_map(Result::ok).collect();
    let stop = Instant::now() + Duration::from_secs(args.hold_seconds);
    let normal = normal_client(server, phase, &tally, stop).await?;
    let opened = idle.len();
    drop(idle);
    Ok(Idle {
        opened,
        opened_in,
        first_error,
        outcomes: tally.outcomes(),
        normal,
    })
}

/// What phase 5 saw.
pub(crate) struct SlowUploads {
    /// Connections whose upload started (HTTP/2 handshake and request headers sent).
    pub(crate) started: usize,
    pub(crate) opened_in: Duration,
    pub(crate) first_error: Option<String>,
    pub(crate) outcomes: Outcomes,
    pub(crate) normal: Normal,
}

/// Phase 5: `--slow-uploads` connections, each sending one `RecordHits` of `--batch` hits as
/// `--slow-upload-pieces` DATA frames spread evenly over `--hold-seconds` (a raw HTTP/2 client:
/// tonic sends a message whole), while a normal client records; then every upload's answer is
/// read.
pub(crate) async fn slow_uploads(
    server: &Server,
    phase: &Phase,
    args: &Args,
) -> anyhow::Result<SlowUploads> {
    let tally = Tally::new(args.hold_seconds + 600);
    let addr = server.ingest;
    let pieces = args.slow_upload_pieces.max(1);
    let interval = Duration::from_secs_f64(args.hold_seconds as f64 / pieces as f64);
    let opening = Instant::now();
    // Each upload is opened (handshake, headers) first, then trickles from a common start.
    let (start_tx, start_rx) = tokio::sync::watch::channel(false);
    let opened: Vec<anyhow::Result<tokio::task::JoinHandle<()>>> =
        futures::stream::iter(0..args.slow_uploads)
            .map(|i| {
                let mut rng = SmallRng::seed_from_u64(9000 + i as u64);
                let request = phase.batch(&mut rng, args.batch);
                let tally = Arc::clone(&tally);
                let mut start_rx = start_rx.clone();
                async move {
                    let (send, response) = open_raw_record_hits(addr).await?;
                    Ok(tokio::spawn(async move {
                        let _ = start_rx.wait_for(|started| *started).await;
                        let hits = request.hits.len() as u64;
                        match trickle(send, response, request, pieces, interval).await {
                            Ok(accepted) => tally.acknowledged(accepted),
                            Err(status) => tally.unary_failed(&status, hits),
                        }
                    }))
                }
            })
            .buffer_unordered(256)
            .collect()
            .await;
    let opened_in = opening.elapsed();
    let first_error = opened
        .iter()
        .find_map(|r| r.as_ref().err().map(|e| format!("{e:#}")));
    let uploads: Vec<_> = opened.into_iter().filter_map(Result::ok).collect();
    let started = uploads.len();
    let _ = start_tx.send(true);
    let stop = Instant::now() + Duration::from_secs(args.hold_seconds);
    let normal = normal_client(server, phase, &tally, stop).await?;
    for upload in uploads {
        upload.await?;
    }
    Ok(SlowUploads {
        started,
        opened_in,
        first_error,
        outcomes: tally.outcomes(),
        normal,
    })
}

type RawResponse = h2::client::ResponseFuture;

/// A new HTTP/2 connection to ingest with one `RecordHits` call opened on it (headers sent,
/// no body yet).
async fn open_raw_record_hits(
    addr: std::net::SocketAddr,
) -> anyhow::Result<(h2::SendStream<bytes::Bytes>, RawResponse)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (client, connection) = h2::client::handshake(tcp).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await?;
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/hitcounter.v1.Ingest/RecordHits"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())?;
    let (response, send) = client.send_request(request, false)?;
    Ok((send, response))
}

/// Sends `request` as `pieces` DATA frames `interval` apart, then reads the answer: the hits
/// accepted, or the call's status.
async fn trickle(
    mut send: h2::SendStream<bytes::Bytes>,
    response: RawResponse,
    request: RecordHitsRequest,
    pieces: usize,
    interval: Duration,
) -> Result<u64, tonic::Status> {
    use prost::Message;
    let broken = |e: h2::Error| tonic::Status::unavailable(format!("connection: {e}"));
    let message = request.encode_to_vec();
    let len = u32::try_from(message.len())
        .map_err(|_| tonic::Status::internal("request too large for a gRPC frame"))?;
    let mut body = Vec::with_capacity(5 + message.len());
    body.push(0);
    body.extend_from_slice(&len.to_be_bytes());
    body.extend_from_slice(&message);
    let piece = body.len().div_ceil(pieces);
    for chunk in body.chunks(piece) {
        tokio::time::sleep(interval).await;
        send.send_data(bytes::Bytes::copy_from_slice(chunk), false)
            .map_err(broken)?;
    }
    send.send_data(bytes::Bytes::new(), true).map_err(broken)?;
    let (head, mut answer) = response.await.map_err(broken)?.into_parts();
    let mut data = Vec::new();
    while let Some(chunk) = answer.data().await {
        let chunk = chunk.map_err(broken)?;
        let _ = answer.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = answer.trailers().await.map_err(broken)?;
    let status = trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| head.headers.get("grpc-status"))
        .and_then(|v| v.to_str().ok()?.parse::<i32>().ok())
        .unwrap_or(2);
    if status != 0 {
        let message = trailers
            .as_ref()
            .and_then(|t| t.get("grpc-message"))
            .or_else(|| head.headers.get("grpc-message"))
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        return Err(tonic::Status::new(tonic::Code::from(status), message));
    }
    let answer = data
        .get(5..)
        .and_then(|m| hitcounter_proto::v1::RecordHitsResponse::decode(m).ok())
        .ok_or_else(|| tonic::Status::internal("an OK answer without a RecordHitsResponse"))?;
    Ok(answer.accepted)
}
