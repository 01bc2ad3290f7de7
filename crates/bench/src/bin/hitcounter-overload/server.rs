//! The measured process: a release `hitcounter all` on loopback ports with its own data
//! directory, stopped with SIGTERM when dropped, and a sampler of its resident set.

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use tonic::transport::{Channel, Endpoint};

use crate::Args;

/// `hitcounter all`, running.
pub(crate) struct Server {
    child: Mutex<Child>,
    pid: u32,
    pub(crate) ingest: SocketAddr,
    pub(crate) query: SocketAddr,
    /// The `/metrics` endpoint (every role's metrics in one).
    metrics: SocketAddr,
    _data: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        if let Ok(mut child) = self.child.lock() {
            let _ = child.wait();
        }
    }
}

fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// The soft open-file limit of this process (which the server inherits).
pub(crate) fn open_file_limit() -> anyhow::Result<String> {
    let limits = std::fs::read_to_string("/proc/self/limits")?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .ok_or_else(|| anyhow::anyhow!("no open-file line in /proc/self/limits"))?;
    Ok(line
        .split_whitespace()
        .nth(3)
        .unwrap_or("unknown")
        .to_owned())
}

/// A plain connection to `addr`, retried while the server starts.
pub(crate) async fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))?;
        match hitcounter_transport::connect(&endpoint).await {
            Ok(channel) => return Ok(channel),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => return Err(e.into()),
        }
    }
}

impl Server {
    /// Starts `hitcounter all` and waits until ingest and query answer SERVING.
    pub(crate) async fn start(args: &Args) -> anyhow::Result<Self> {
        let data = tempfile::tempdir()?;
        let (ingest, aggregator, query, metrics) =
            (free_port()?, free_port()?, free_port()?, free_port()?);
        let path = args.bin_dir.join("hitcounter");
        let child = Command::new(&path)
            .arg("all")
            .arg(format!("--ingest-listen={ingest}"))
            .arg(format!("--aggregator-listen={aggregator}"))
            .arg(format!("--query-listen={query}"))
            .arg(format!("--metrics-listen={metrics}"))
            .arg(format!("--data-dir={}", data.path().display()))
            .args(&args.server_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {} (cargo build --release)", path.display()))?;
        let server = Self {
            pid: child.id(),
            child: Mutex::new(child),
            ingest,
            query,
            metrics,
            _data: data,
        };
        for addr in [ingest, query] {
            let mut health =
                tonic_health::pb::health_client::HealthClient::new(channel(addr).await?);
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let serving = health
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await
                    .map(|r| r.into_inner().status)
                    .unwrap_or_default();
                if serving == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
                {
                    break;
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "{addr} is not SERVING after 30 s"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(server)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// The sum of every sample of `metric` whose labels contain each of `labels` (e.g.
    /// `service="hitcounter.v1.Ingest"`), from `/metrics` now; 0 when there is none.
    pub(crate) async fn metric(&self, metric: &str, labels: &[&str]) -> anyhow::Result<f64> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.metrics).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: overload\r\nConnection: close\r\n\r\n")
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok(response
            .lines()
            .filter(|line| {
                line.strip_prefix(metric)
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
                    && labels.iter().all(|l| line.contains(l))
            })
            .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
            // Not `sum()`: an empty f64 sum is -0.
            .fold(0.0, |sum, value| sum + value))
    }

    /// Starts sampling the resident set every 100 ms.
    pub(crate) fn sample_rss(&self) -> Arc<Rss> {
        let rss = Arc::new(Rss {
            pid: self.pid,
            max: AtomicU64::new(0),
            first: AtomicU64::new(0),
            samples: Mutex::new(Vec::new()),
        });
        let sampler = Arc::clone(&rss);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_millis(100));
            loop {
                ticks.tick().await;
                let now = sampler.now();
                if now == 0 {
                    break;
                }
                sampler.max.fetch_max(now, Ordering::Relaxed);
                let _ =
                    sampler
                        .first
                        .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
                if let Ok(mut samples) = sampler.samples.lock() {
                    samples.push(now);
                }
            }
        });
        rss
    }
}

/// The resident set of the server, sampled every 100 ms since the last [`Rss::reset`].
pub(crate) struct Rss {
    pid: u32,
    max: AtomicU64,
    first: AtomicU64,
    samples: Mutex<Vec<u64>>,
}

impl Rss {
    fn field(&self, name: &str) -> u64 {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", self.pid)) else {
            return 0;
        };
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    }

    /// Resident now (`VmRSS`); 0 once the process is gone.
    pub(crate) fn now(&self) -> u64 {
        self.field("VmRSS:")
    }

    /// The kernel's peak resident set of the process (`VmHWM`).
    pub(crate) fn peak(&self) -> u64 {
        self.field("VmHWM:")
    }

    /// Starts a new phase.
    pub(crate) fn reset(&self) {
        let now = self.now();
        self.max.store(now, Ordering::Relaxed);
        self.first.store(now, Ordering::Relaxed);
        if let Ok(mut samples) = self.samples.lock() {
            samples.clear();
        }
    }

    /// Largest sample of the phase.
    pub(crate) fn max(&self) -> u64 {
        self.max.load(Ordering::Relaxed)
    }

    /// The phase's first sample.
    pub(crate) fn first(&self) -> u64 {
        self.first.load(Ordering::Relaxed)
    }

    /// The phase's samples, the largest of each `seconds`, in MiB.
    pub(crate) fn timeline_mib(&self, seconds: usize) -> String {
        let samples = self.samples.lock().map(|s| s.clone()).unwrap_or_default();
        samples
            .chunks(seconds * 10)
            .map(|c| {
                format!(
                    "{:.0}",
                    c.iter().copied().max().unwrap_or(0) as f64 / (1024.0 * 1024.0)
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}
