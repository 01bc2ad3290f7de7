//! Starting and stopping the hitcounter release binaries (aggregator, ingest, query) on
//! loopback, each a child process killed by PID when its guard is dropped.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;
use hitcounter_proto::v1::{ingest_client::IngestClient, query_client::QueryClient};
use tonic::transport::Channel;

/// A child process, stopped with SIGTERM (by PID) when dropped.
pub(crate) struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

impl Service {
    /// `kill -9`.
    pub(crate) fn kill(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        std::mem::forget(self);
    }

    /// SIGTERM, and waits for the exit (a clustered aggregator hands its partitions over
    /// first); returns whether it exited with 0.
    pub(crate) fn terminate(mut self) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let exited = self.0.wait().is_ok_and(|status| status.success());
        std::mem::forget(self);
        exited
    }
}

/// A free loopback port (bound and released; fine for a benchmark on a quiet machine).
pub(crate) fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn start(bin_dir: &Path, name: &str, args: &[String]) -> anyhow::Result<Service> {
    let path = bin_dir.join(name);
    let child = Command::new(&path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| {
            format!(
                "starting {} (cargo build --workspace --release --bins)",
                path.display()
            )
        })?;
    Ok(Service(child))
}

async fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?;
        match hitcounter_transport::connect(&endpoint).await {
            Ok(channel) => return Ok(channel),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Extra command-line arguments for each service (after the ones the bench sets).
#[derive(Clone, Debug, Default)]
pub(crate) struct ExtraArgs {
    pub(crate) ingest: Vec<String>,
    pub(crate) aggregator: Vec<String>,
    pub(crate) query: Vec<String>,
}

/// The three services with fresh data directories, and clients of ingest and query.
pub(crate) struct Stack {
    bin_dir: PathBuf,
    aggregator_args: Vec<String>,
    // Dropped in declaration order: query and ingest before the aggregator, the data last.
    _query: Service,
    _ingest: Service,
    aggregator: Option<Service>,
    /// Clustered mode: the other aggregators, then the NATS servers (dropped after the
    /// services, before the data).
    _cluster: Vec<Service>,
    _data: tempfile::TempDir,
    /// Clustered mode: the NATS URLs (to add aggregators).
    nats_urls: String,
    /// The aggregator's `/metrics` address.
    pub(crate) aggregator_metrics: SocketAddr,
    /// A client of ingest.
    pub(crate) ingest: IngestClient<Channel>,
    /// A client of query.
    pub(crate) query: QueryClient<Channel>,
}

impl Stack {
    /// Starts the release binaries in `bin_dir` with `extra` arguments.
    pub(crate) async fn start(bin_dir: &Path, extra: &ExtraArgs) -> anyhow::Result<Self> {
        let data = tempfile::tempdir()?;
        let (a, i, q) = (free_port()?, free_port()?, free_port()?);
        let upstream = format!("http://{a}");
        let dir = |name: &str| data.path().join(name).display().to_string();
        let aggregator_metrics = free_port()?;
        let mut aggregator_args = strings(&[
            "--listen",
            &a.to_string(),
            "--metrics-listen",
            &aggregator_metrics.to_string(),
            "--data-dir",
            &dir("aggregator"),
        ]);
        aggregator_args.extend(extra.aggregator.iter().cloned());
        let mut ingest_args = strings(&[
            "--listen",
            &i.to_string(),
            "--metrics-listen",
            "off",
            "--data-dir",
            &dir("ingest"),
            "--aggregator",
            &upstream,
        ]);
        ingest_args.extend(extra.ingest.iter().cloned());
        let mut query_args = strings(&[
            "--listen",
            &q.to_string(),
            "--metrics-listen",
            "off",
            "--aggregator",
            &upstream,
        ]);
        query_args.extend(extra.query.iter().cloned());
        let aggregator = start(bin_dir, "hitcounter-aggregator", &aggregator_args)?;
        let ingest_service = start(bin_dir, "hitcounter-ingest", &ingest_args)?;
        let query_service = start(bin_dir, "hitcounter-query", &query_args)?;
        Ok(Self {
            bin_dir: bin_dir.to_path_buf(),
            aggregator_args,
            _query: query_service,
            _ingest: ingest_service,
            aggregator: Some(aggregator),
            _cluster: Vec::new(),
            _data: data,
            nats_urls: String::new(),
            aggregator_metrics,
            ingest: IngestClient::new(channel(i).await?),
            query: QueryClient::new(channel(q).await?),
        })
    }

    /// Clustered mode (see `cluster.rs`): three `nats-server`s from `nats_config` (the shipped
    /// `deploy/nats/nats-server.conf`), three aggregators hosting two replicas of every
    /// partition, one ingest and one query, all with `--nats`. The first aggregator is the one
    /// [`kill_aggregator`](Self::kill_aggregator) kills.
    pub(crate) async fn start_clustered(
        bin_dir: &Path,
        extra: &ExtraArgs,
        nats_server: &Path,
        nats_config: &Path,
    ) -> anyhow::Result<Self> {
        let data = tempfile::tempdir()?;
        let dir = |name: &str| data.path().join(name).display().to_string();
        let mut nats = Vec::new();
        let mut urls = Vec::new();
        for n in 1..=3 {
            let port = free_port()?.port();
            urls.push(format!("nats://127.0.0.1:{port}"));
            let child = Command::new(nats_server)
                .args(["-c", &nats_config.display().to_string()])
                .env("NATS_NAME", format!("bench-{n}"))
                .env("NATS_PORT", port.to_string())
                .env("NATS_CLUSTER_PORT", (6221 + n).to_string())
                .env("NATS_STORE", dir(&format!("nats-{n}")))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {}", nats_server.display()))?;
            nats.push(Service(child));
        }
        let urls = urls.join(",");
        let addrs = [free_port()?, free_port()?, free_port()?];
        let aggregator_metrics = free_port()?;
        let mut aggregators = Vec::new();
        let mut first_args = Vec::new();
        for (node, addr) in addrs.iter().enumerate() {
            let metrics = if node == 0 {
                aggregator_metrics.to_string()
            } else {
                "off".to_owned()
            };
            let id = format!("aggregator-{node}");
            let mut args = strings(&[
                "--listen",
                &addr.to_string(),
                "--metrics-listen",
                &metrics,
                "--data-dir",
                &dir(&id),
                "--nats",
                &urls,
                "--node-id",
                &id,
                "--replicas",
                "2",
            ]);
            args.extend(extra.aggregator.iter().cloned());
            aggregators.push(start(bin_dir, "hitcounter-aggregator", &args)?);
            if node == 0 {
                first_args = args;
            }
        }
        let (i, q) = (free_port()?, free_port()?);
        let mut ingest_args = strings(&[
            "--listen",
            &i.to_string(),
            "--metrics-listen",
            "off",
            "--nats",
            &urls,
        ]);
        ingest_args.extend(extra.ingest.iter().cloned());
        let mut query_args = strings(&[
            "--listen",
            &q.to_string(),
            "--metrics-listen",
            "off",
            "--nats",
            &urls,
            "--membership",
            "--replicas",
            "2",
        ]);
        query_args.extend(extra.query.iter().cloned());
        let ingest_service = start(bin_dir, "hitcounter-ingest", &ingest_args)?;
        let query_service = start(bin_dir, "hitcounter-query", &query_args)?;
        let mut rest: Vec<Service> = aggregators.split_off(1);
        rest.extend(nats);
        let first = aggregators.pop();
        Ok(Self {
            bin_dir: bin_dir.to_path_buf(),
            aggregator_args: first_args,
            _query: query_service,
            _ingest: ingest_service,
            aggregator: first,
            _cluster: rest,
            _data: data,
            nats_urls: urls,
            aggregator_metrics,
            ingest: IngestClient::new(channel(i).await?),
            query: QueryClient::new(channel(q).await?),
        })
    }

    /// The aggregator's process id, while it runs.
    pub(crate) fn aggregator_pid(&self) -> Option<u32> {
        self.aggregator.as_ref().map(|a| a.0.id())
    }

    /// The sum of the aggregator's samples of metric `name` (all label sets).
    pub(crate) async fn aggregator_metric(&self, name: &str) -> anyhow::Result<f64> {
        metric(self.aggregator_metrics, name).await
    }
}

/// The sum of the samples of metric `name` (label sets starting with `labels`, e.g.
/// `{state="ready"`; empty for all) at the `/metrics` endpoint `at`.
pub(crate) async fn metric_with(at: SocketAddr, name: &str, labels: &str) -> anyhow::Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut connection = tokio::net::TcpStream::connect(at).await?;
    connection
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        .await?;
    let mut text = String::new();
    connection.read_to_string(&mut text).await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter(|l| l[name.len()..].starts_with(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// The sum of the samples of metric `name` (all label sets) at `at`.
pub(crate) async fn metric(at: SocketAddr, name: &str) -> anyhow::Result<f64> {
    metric_with(at, name, "").await
}

impl Stack {
    /// `kill -9` of the aggregator.
    pub(crate) fn kill_aggregator(&mut self) {
        if let Some(aggregator) = self.aggregator.take() {
            aggregator.kill();
        }
    }

    /// Clustered mode: starts one more aggregator (`id`, a fresh data directory) and returns
    /// it with its `/metrics` address.
    pub(crate) fn add_aggregator(
        &self,
        id: &str,
        extra: &ExtraArgs,
    ) -> anyhow::Result<(Service, SocketAddr)> {
        let (addr, metrics) = (free_port()?, free_port()?);
        let mut args = strings(&[
            "--listen",
            &addr.to_string(),
            "--metrics-listen",
            &metrics.to_string(),
            "--data-dir",
            &self._data.path().join(id).display().to_string(),
            "--nats",
            &self.nats_urls,
            "--node-id",
            id,
            "--replicas",
            "2",
        ]);
        args.extend(extra.aggregator.iter().cloned());
        Ok((
            start(&self.bin_dir, "hitcounter-aggregator", &args)?,
            metrics,
        ))
    }

    /// Starts the aggregator again on its data directory.
    pub(crate) fn restart_aggregator(&mut self) -> anyhow::Result<()> {
        self.aggregator = Some(start(
            &self.bin_dir,
            "hitcounter-aggregator",
            &self.aggregator_args,
        )?);
        Ok(())
    }
}
