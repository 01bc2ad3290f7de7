//! Test harness: starts the real services in-process on `127.0.0.1:0` listeners and hands out
//! gRPC clients to them.
//!
//! Between ingest/query and each aggregator sits a [`LinkProxy`], a TCP relay the test controls:
//! it can pass traffic, *pause* it (connections stay open, bytes stop: a hung aggregator) or
//! *refuse* it (connections are cut and new ones closed at once: a dead aggregator). This lets
//! tests take an aggregator away and bring it back without losing its in-memory state.

pub mod nats;
pub mod process;
pub mod proxy;
pub mod tools;
pub mod workload;

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use hitcounter_proto::v1::{ingest_client::IngestClient, query_client::QueryClient};
use hitcounter_telemetry::{CancellationToken, Listeners};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub use proxy::{LinkMode, LinkProxy};

/// One running service.
pub struct Running {
    /// Its gRPC address.
    pub addr: SocketAddr,
    /// Its `/metrics` address.
    pub metrics_addr: SocketAddr,
    /// Cancel to shut it down gracefully.
    pub shutdown: CancellationToken,
    /// Resolves when `serve` returns.
    pub task: JoinHandle<Result<(), String>>,
    /// The service's data directory, when the harness made a temporary one (deleted on drop).
    pub data_dir: Option<tempfile::TempDir>,
}

impl Running {
    /// The count of `key` over the last hour, asked of this service (a query).
    ///
    /// # Errors
    /// When the call fails.
    pub async fn count(&self, key: &str) -> anyhow::Result<u64> {
        let mut client = QueryClient::new(connect(self.addr).await?);
        Ok(client
            .get_hits(hitcounter_proto::v1::GetHitsRequest {
                key: key.into(),
                window_seconds: 3600,
                at_ms: 0,
            })
            .await?
            .into_inner()
            .count)
    }

    /// Waits until `key` counts `expected` hits through this service (a query); 30 s is a hang
    /// guard, not a visibility goal. Fails naming the last count seen.
    ///
    /// # Errors
    /// When the count does not get there.
    pub async fn until_count(&self, key: &str, expected: u64) -> anyhow::Result<()> {
        let last = std::cell::Cell::new(None);
        let reached = eventually(
            Duration::from_secs(30),
            &format!("{key} to reach {expected}"),
            || async {
                let now = self.count(key).await.ok()?;
                last.set(Some(now));
                (now == expected).then_some(())
            },
        )
        .await;
        let last = last.get();
        reached.map_err(|e| anyhow::anyhow!("{e} (last count seen: {last:?})"))
    }

    /// Waits until the service answers SERVING, or reports why `serve` returned instead (a
    /// start-up failure such as a full disk shows as that error, not as "connection refused" in
    /// whatever the test does next).
    ///
    /// # Errors
    /// When `serve` returned, or nothing answered within a minute (a hang guard).
    pub async fn ready(&mut self, what: &str) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if self.task.is_finished() {
                let served = (&mut self.task).await?;
                anyhow::bail!("{what} stopped while starting: {served:?}");
            }
            if process::serving(self.addr, Duration::from_millis(100))
                .await
                .is_ok()
            {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{what} at {} is not SERVING after a minute",
                self.addr
            );
        }
    }

    /// Shuts the service down and waits for `serve` to return.
    pub async fn stop(self) -> Result<(), String> {
        self.shutdown.cancel();
        self.task.await.map_err(|e| e.to_string())?
    }
}

async fn listeners() -> anyhow::Result<Listeners> {
    Ok(Listeners::bind("127.0.0.1:0".parse()?, Some("127.0.0.1:0".parse()?)).await?)
}

fn addrs(listeners: &Listeners) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let metrics = listeners
        .metrics
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no metrics listener"))?
        .local_addr()?;
    Ok((listeners.grpc.local_addr()?, metrics))
}

/// The command line of a service: `program`, then `fixed`, then `--data-dir <temp>` when the
/// service keeps state and `args` name no directory, then `args`. Returns the temporary
/// directory too (deleted when dropped).
fn command_line(
    program: &str,
    fixed: &[&str],
    args: &[&str],
    keeps_state: bool,
) -> anyhow::Result<(Vec<String>, Option<tempfile::TempDir>)> {
    let temp = if keeps_state && !args.contains(&"--data-dir") {
        Some(tempfile::tempdir()?)
    } else {
        None
    };
    let mut all: Vec<String> = std::iter::once(program)
        .chain(fixed.iter().copied())
        .map(str::to_owned)
        .collect();
    if let Some(temp) = &temp {
        all.extend(["--data-dir".to_owned(), temp.path().display().to_string()]);
    }
    all.extend(args.iter().map(|a| (*a).to_owned()));
    Ok((all, temp))
}

/// Binds ephemeral listeners (serving TLS as `service`'s `--tls-*` flags say) and spawns
/// `serve` on them.
async fn spawn<F, Fut, E>(
    data_dir: Option<tempfile::TempDir>,
    service: &hitcounter_telemetry::ServiceArgs,
    serve: F,
) -> anyhow::Result<Running>
where
    F: FnOnce(Listeners, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    let listeners = listeners().await?.configured(service)?;
    let (addr, metrics_addr) = addrs(&listeners)?;
    let shutdown = CancellationToken::new();
    let served = serve(listeners, shutdown.clone());
    let task = tokio::spawn(async move { served.await.map_err(|e| e.to_string()) });
    Ok(Running {
        addr,
        metrics_addr,
        shutdown,
        task,
        data_dir,
    })
}

/// Starts an aggregator with extra command-line `args`, in a fresh temporary data directory
/// unless `args` name one.
pub async fn start_aggregator(args: &[&str]) -> anyhow::Result<Running> {
    let (line, temp) = command_line("hitcounter-aggregator", &[], args, true)?;
    let config = hitcounter_aggregator::Config::try_parse_from(line)?;
    let service = config.service.clone();
    spawn(temp, &service, move |l, s| {
        hitcounter_aggregator::serve(config, l, s)
    })
    .await
}

/// Starts ingest pointed at `aggregators`, with extra `args`, in a fresh temporary data
/// directory unless `args` name one.
pub async fn start_ingest(aggregators: &[SocketAddr], args: &[&str]) -> anyhow::Result<Running> {
    start_ingest_at(&join(aggregators), args).await
}

/// Starts ingest pointed at the aggregator address `list` (e.g. `https://localhost:PORT`), with
/// extra `args`, in a fresh temporary data directory unless `args` name one.
pub async fn start_ingest_at(list: &str, args: &[&str]) -> anyhow::Result<Running> {
    let (line, temp) = command_line("hitcounter-ingest", &["--aggregator", list], args, true)?;
    let config = hitcounter_ingest::Config::try_parse_from(line)?;
    let service = config.service.clone();
    spawn(temp, &service, move |l, s| {
        hitcounter_ingest::serve(config, l, s)
    })
    .await
}

/// Starts query pointed at `aggregators`, with extra `args`.
pub async fn start_query(aggregators: &[SocketAddr], args: &[&str]) -> anyhow::Result<Running> {
    start_query_at(&join(aggregators), args).await
}

/// Starts query pointed at the aggregator address `list`, with extra `args`.
pub async fn start_query_at(list: &str, args: &[&str]) -> anyhow::Result<Running> {
    let (line, _) = command_line("hitcounter-query", &["--aggregator", list], args, false)?;
    let config = hitcounter_query::Config::try_parse_from(line)?;
    let service = config.service.clone();
    spawn(None, &service, move |l, s| {
        hitcounter_query::serve(config, l, s)
    })
    .await
}

fn join(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(|a| format!("http://{a}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Extra arguments per service.
#[derive(Debug, Clone, Default)]
pub struct StackOptions {
    /// Aggregator shards to start (0 means 1).
    pub shards: usize,
    /// Extra aggregator arguments.
    pub aggregator: Vec<&'static str>,
    /// Extra ingest arguments.
    pub ingest: Vec<&'static str>,
    /// Extra query arguments.
    pub query: Vec<&'static str>,
}

// Metrics live in one process-wide recorder, so two stacks in one process would overwrite each
// other's gauges. nextest runs every test in its own process; under plain `cargo test` the tests
// of one binary share a process, and this lock makes their stacks take turns.
static ONE_STACK_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The three services wired together, with a [`LinkProxy`] in front of each aggregator.
pub struct Stack {
    /// The aggregator shards.
    pub aggregators: Vec<Running>,
    /// The relays in front of them, in shard order.
    pub links: Vec<LinkProxy>,
    /// Ingest.
    pub ingest: Running,
    /// Query.
    pub query: Running,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

impl Stack {
    /// Starts one aggregator, ingest and query with test-friendly defaults.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(StackOptions::default()).await
    }

    /// Starts the stack with `options`.
    pub async fn start_with(options: StackOptions) -> anyhow::Result<Self> {
        init_logging();
        let turn = ONE_STACK_AT_A_TIME.lock().await;
        let mut aggregators = Vec::new();
        let mut links = Vec::new();
        for _ in 0..options.shards.max(1) {
            let aggregator = start_aggregator(&options.aggregator).await?;
            links.push(LinkProxy::start(aggregator.addr).await?);
            aggregators.push(aggregator);
        }
        let link_addrs: Vec<_> = links.iter().map(|l| l.addr).collect();
        let mut ingest = start_ingest(&link_addrs, &options.ingest).await?;
        let mut query = start_query(&link_addrs, &options.query).await?;
        for (n, aggregator) in aggregators.iter_mut().enumerate() {
            aggregator.ready(&format!("aggregator {n}")).await?;
        }
        ingest.ready("ingest").await?;
        query.ready("query").await?;
        Ok(Self {
            aggregators,
            links,
            ingest,
            query,
            _turn: turn,
        })
    }

    /// A client of ingest.
    pub async fn ingest_client(&self) -> anyhow::Result<IngestClient<Channel>> {
        Ok(IngestClient::new(connect(self.ingest.addr).await?))
    }

    /// A client of query.
    pub async fn query_client(&self) -> anyhow::Result<QueryClient<Channel>> {
        Ok(QueryClient::new(connect(self.query.addr).await?))
    }

    /// Stops everything, front to back, and reports the first error.
    pub async fn stop(self) -> Result<(), String> {
        let ingest = self.ingest.stop().await;
        let query = self.query.stop().await;
        let mut aggregators = Ok(());
        for aggregator in self.aggregators {
            let stopped = aggregator.stop().await;
            if aggregators.is_ok() {
                aggregators = stopped;
            }
        }
        ingest.and(query).and(aggregators)
    }
}

/// Opens a gRPC channel to `addr`.
pub async fn connect(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?,
    )
}

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        hitcounter_telemetry::logging::init(hitcounter_telemetry::logging::LogFormat::Text);
    }
}

/// Fetches `/metrics` from `addr` over plain HTTP/1.1 and returns the body.
pub async fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .ok_or_else(|| anyhow::anyhow!("malformed HTTP response"))?;
    Ok(body)
}

/// The value of the first sample of `metric` whose line contains every `labels` fragment.
pub fn metric_value(text: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.starts_with(metric)
                && line[metric.len()..].starts_with(['{', ' '])
                && labels.iter().all(|l| line.contains(l))
        })
        .find_map(|line| line.rsplit_once(' ')?.1.parse().ok())
}

/// Polls `check` every 10 ms until it returns `Some`, or fails after `timeout`. For conditions
/// that become true eventually (visibility, breaker transitions), instead of sleeping a guess.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The current Unix time in milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Starts an aggregator listening on `addr`, e.g. where a stopped one listened, so that ingest
/// and query reach the new process at the old address; extra `args` as for
/// [`start_aggregator`].
pub async fn start_aggregator_on(addr: SocketAddr, args: &[&str]) -> anyhow::Result<Running> {
    let (line, data_dir) = command_line("hitcounter-aggregator", &[], args, true)?;
    let config = hitcounter_aggregator::Config::try_parse_from(line)?;
    let listeners = Listeners::bind(addr, Some("127.0.0.1:0".parse()?))
        .await?
        .configured(&config.service)?;
    let (addr, metrics_addr) = addrs(&listeners)?;
    let shutdown = CancellationToken::new();
    let served = hitcounter_aggregator::serve(config, listeners, shutdown.clone());
    let task = tokio::spawn(async move { served.await.map_err(|e| e.to_string()) });
    Ok(Running {
        addr,
        metrics_addr,
        shutdown,
        task,
        data_dir,
    })
}
