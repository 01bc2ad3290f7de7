//! Clustered mode, end to end: a real 3-node NATS JetStream cluster (`tests/src/nats.rs`), two
//! stateless ingest processes, three aggregators hosting 2 replicas of every partition, and one
//! query, all real binaries talking real gRPC and NATS.
//!
//! - `batch_ids_are_cluster_wide_and_reads_survive_an_aggregator`: a batch retried on the other
//!   ingest instance is a duplicate with the first call's `accepted`; counts are exact; with an
//!   aggregator `kill -9`ed, reads keep answering, exactly.
//! - `chaos_keeps_every_acknowledged_hit_exactly_once`: clients stream batches with batch ids
//!   and tally every acknowledged hit, resending an unacknowledged batch to the *other* ingest;
//!   meanwhile, one at a time, a NATS node, an ingest, an aggregator (restarted on its data
//!   directory) and an aggregator (restarted on an empty one) are `kill -9`ed, and a NATS node
//!   is cut off the network (iptables) for three seconds and healed. A reader asks
//!   for every key all along and must never fail. At the end every key's count equals the
//!   tally. Seeded (`HITCOUNTER_CLUSTER_SEED`); the seed is printed. A longer run by hand
//!   (`HITCOUNTER_CLUSTER_ROUNDS=10`, past nextest's 2-minute limit, so run the test binary
//!   directly: `target/debug/deps/cluster-* chaos --nocapture`).
//! - `a_full_log_refuses_writes_with_resource_exhausted`: a stream at `--nats-max-bytes`
//!   refuses new hits (`RESOURCE_EXHAUSTED`, saying why) instead of dropping old ones.
//!
//! Each service listens on a port of its own choosing; its peers reach it through a relay of the
//! test's (`LinkProxy`), pointed at the new port after a restart.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use hitcounter_integration_tests::{
    connect,
    nats::NatsCluster,
    now_ms,
    process::{serving, ClosedPort, Service},
    proxy::LinkProxy,
};
use hitcounter_proto::v1::{
    ingest_client::IngestClient, query_client::QueryClient, GetHitsManyRequest, Hit,
    RecordHitsRequest,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Partitions of the test clusters: enough to spread keys over every aggregator.
const PARTITIONS: &str = "16";
const AGGREGATORS: usize = 3;

/// Everything of one clustered deployment.
struct Deployment {
    nats: NatsCluster,
    _data: tempfile::TempDir,
    aggregators: Vec<(Service, LinkProxy)>,
    ingests: Vec<(Service, LinkProxy)>,
    query: (Service, LinkProxy),
    _placeholder: ClosedPort,
}

/// The stream's size limit in these tests: the default (8 GiB) is reserved on each of the
/// three NATS servers' disk, all on this machine's one disk, and a test machine with less free
/// space than that refuses to create the stream.
const STREAM_BYTES: &str = "1073741824";

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

impl Deployment {
    async fn start() -> anyhow::Result<Self> {
        let nats = NatsCluster::start(3).await?;
        let urls = nats.urls();
        let data = tempfile::tempdir()?;
        let placeholder = ClosedPort::bind()?;
        let mut aggregators = Vec::new();
        for node in 0..AGGREGATORS {
            let index = node.to_string();
            let mut service = Service::new(
                "hitcounter-aggregator",
                &data.path().join(format!("aggregator-{node}")),
                &strings(&[
                    "--data-dir",
                    ".",
                    "--checkpoint-interval-ms",
                    "300",
                    "--nats",
                    &urls,
                    "--nats-max-bytes",
                    STREAM_BYTES,
                    "--partitions",
                    PARTITIONS,
                    "--node-index",
                    &index,
                    "--nodes",
                    "3",
                    "--replicas",
                    "2",
                ]),
            );
            let link = LinkProxy::start(placeholder.addr).await?;
            link.retarget(service.start().await?);
            aggregators.push((service, link));
        }
        let aggregator_list = aggregators
            .iter()
            .map(|(_, link)| format!("http://{}", link.addr))
            .collect::<Vec<_>>()
            .join(",");
        let mut ingests = Vec::new();
        for instance in 0..2 {
            let mut service = Service::new(
                "hitcounter-ingest",
                &data.path().join(format!("ingest-{instance}")),
                &strings(&[
                    "--nats",
                    &urls,
                    "--nats-max-bytes",
                    STREAM_BYTES,
                    "--partitions",
                    PARTITIONS,
                ]),
            );
            let link = LinkProxy::start(placeholder.addr).await?;
            link.retarget(service.start().await?);
            ingests.push((service, link));
        }
        let mut query = Service::new(
            "hitcounter-query",
            &data.path().join("query"),
            &strings(&[
                "--nats",
                &urls,
                "--nats-max-bytes",
                STREAM_BYTES,
                "--aggregator",
                &aggregator_list,
                "--replicas",
                "2",
                "--breaker-cooldown-ms",
                "200",
                "--aggregator-timeout-ms",
                "1000",
            ]),
        );
        let query_link = LinkProxy::start(placeholder.addr).await?;
        query_link.retarget(query.start().await?);
        let deployment = Self {
            nats,
            _data: data,
            aggregators,
            ingests,
            query: (query, query_link),
            _placeholder: placeholder,
        };
        for addr in deployment.links() {
            serving(addr, Duration::from_secs(30)).await?;
        }
        Ok(deployment)
    }

    fn links(&self) -> Vec<SocketAddr> {
        let mut links: Vec<SocketAddr> = self.aggregators.iter().map(|(_, l)| l.addr).collect();
        links.extend(self.ingests.iter().map(|(_, l)| l.addr));
        links.push(self.query.1.addr);
        links
    }

    fn ingest_addrs(&self) -> Vec<SocketAddr> {
        self.ingests.iter().map(|(_, link)| link.addr).collect()
    }

    fn query_addr(&self) -> SocketAddr {
        self.query.1.addr
    }

    /// `kill -9` aggregator `node`, then (optionally on an empty data directory) restart it.
    async fn kill_aggregator(&mut self, node: usize, wipe: bool) -> anyhow::Result<()> {
        let (service, link) = &mut self.aggregators[node];
        service.kill9()?;
        if wipe {
            let dir = self._data.path().join(format!("aggregator-{node}"));
            for entry in std::fs::read_dir(&dir)? {
                let path = entry?.path();
                if path.extension().is_none_or(|e| e != "log") {
                    if path.is_dir() {
                        std::fs::remove_dir_all(&path)?;
                    } else {
                        std::fs::remove_file(&path)?;
                    }
                }
            }
        }
        // Down for a while: reads must be answered by the other replicas meanwhile.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        link.retarget(service.start().await?);
        Ok(())
    }

    async fn kill_ingest(&mut self, instance: usize) -> anyhow::Result<()> {
        let (service, link) = &mut self.ingests[instance];
        service.kill9()?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        link.retarget(service.start().await?);
        Ok(())
    }

    /// Cuts NATS node `node` off the network for a while, then heals it.
    async fn cut_nats(&mut self, node: usize) -> anyhow::Result<()> {
        self.nats.cut(node)?;
        tokio::time::sleep(Duration::from_millis(3000)).await;
        self.nats.heal(node)?;
        self.nats.wait_ready().await
    }

    async fn kill_nats(&mut self, node: usize) -> anyhow::Result<()> {
        self.nats.kill(node);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        self.nats.restart(node)?;
        self.nats.wait_ready().await
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for (name, (service, _)) in self
            .aggregators
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("aggregator-{i}"), s))
            .chain(
                self.ingests
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (format!("ingest-{i}"), s)),
            )
            .chain(std::iter::once(("query".to_owned(), &self.query)))
        {
            out.push_str(&format!("--- {name}\n{}\n", service.log_tail(15)));
        }
        out
    }
}

/// Window counts of `keys` through query.
async fn counts(query: SocketAddr, keys: &[String]) -> anyhow::Result<Vec<u64>> {
    let mut client = QueryClient::new(connect(query).await?);
    let response = client
        .get_hits_many(GetHitsManyRequest {
            keys: keys.to_vec(),
            window_seconds: 3600,
            at_ms: 0,
        })
        .await?
        .into_inner();
    Ok(response.results.into_iter().map(|r| r.count).collect())
}

/// Waits until query answers exactly `want` for `keys` (a hang guard, not a timing goal: the
/// aggregators may still be reading the log's tail); fails naming the last answer.
async fn until_counts(
    query: SocketAddr,
    keys: &[String],
    want: &[u64],
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let last = match counts(query, keys).await {
            Ok(got) if got == want => return Ok(()),
            Ok(got) => format!("counts {got:?}, want {want:?}"),
            Err(error) => format!("read failed: {error:#}"),
        };
        anyhow::ensure!(Instant::now() < deadline, "after {within:?}: {last}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn batch(keys: &[String], rng: &mut StdRng, id: String) -> RecordHitsRequest {
    let now = now_ms();
    let hits = (0..rng.random_range(1..20))
        .map(|_| Hit {
            key: keys[rng.random_range(0..keys.len())].clone(),
            timestamp_ms: now - rng.random_range(0..5_000),
            count: rng.random_range(1..5),
        })
        .collect();
    RecordHitsRequest { hits, batch_id: id }
}

#[tokio::test(flavor = "multi_thread")]
async fn batch_ids_are_cluster_wide_and_reads_survive_an_aggregator() -> anyhow::Result<()> {
    let mut deployment = Deployment::start().await?;
    let ingests = deployment.ingest_addrs();
    let keys: Vec<String> = (0..24).map(|i| format!("/cluster/{i}")).collect();
    let mut rng = StdRng::seed_from_u64(7);
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    let mut first = IngestClient::new(connect(ingests[0]).await?);
    let mut second = IngestClient::new(connect(ingests[1]).await?);
    for n in 0..40 {
        let request = batch(&keys, &mut rng, format!("b-{n}"));
        let answer = first.record_hits(request.clone()).await?.into_inner();
        assert!(!answer.duplicate);
        for hit in &request.hits {
            *expected.entry(hit.key.clone()).or_default() += hit.count;
        }
        // The same batch through the other instance: counted once, the first call's answer.
        let again = second.record_hits(request.clone()).await?.into_inner();
        assert!(
            again.duplicate,
            "batch b-{n} counted twice across ingest instances"
        );
        assert_eq!(again.accepted, answer.accepted);
    }
    let want: Vec<u64> = keys
        .iter()
        .map(|k| expected.get(k).copied().unwrap_or(0))
        .collect();
    let query = deployment.query_addr();
    until_counts(query, &keys, &want, Duration::from_secs(30))
        .await
        .with_context(|| deployment.logs())?;

    // One aggregator gone: every partition still has a replica, and reads answer exactly.
    let (service, _) = &mut deployment.aggregators[1];
    service.kill9()?;
    for _ in 0..20 {
        let got = counts(query, &keys).await.with_context(|| {
            format!(
                "a read failed with aggregator 1 down\n{}",
                deployment.logs()
            )
        })?;
        assert_eq!(got, want, "counts changed with aggregator 1 down");
    }
    Ok(())
}

/// What the clients had acknowledged, per key.
type Tally = Arc<Mutex<BTreeMap<String, u64>>>;

/// One client: batches with ids, each resent (same id) to the other ingest until acknowledged.
async fn drive(
    ingests: Vec<SocketAddr>,
    keys: Vec<String>,
    client: usize,
    seed: u64,
    stop: Arc<AtomicBool>,
    tally: Tally,
    acked: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed ^ (client as u64).wrapping_mul(0x9e37_79b9));
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let request = batch(&keys, &mut rng, format!("c{client}-{n}"));
        let mut target = rng.random_range(0..ingests.len());
        let started = Instant::now();
        loop {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(90),
                "batch c{client}-{n} not acknowledged within 90 s"
            );
            let attempt = async {
                let mut ingest = IngestClient::new(connect(ingests[target]).await?);
                let mut call = tonic::Request::new(request.clone());
                call.set_timeout(Duration::from_secs(10));
                anyhow::Ok(ingest.record_hits(call).await?.into_inner())
            }
            .await;
            match attempt {
                Ok(_answer) => {
                    // Acknowledged (first time or duplicate of an earlier attempt that did
                    // store it): the batch counts once.
                    let mut tally = tally.lock().unwrap_or_else(|e| e.into_inner());
                    for hit in &request.hits {
                        *tally.entry(hit.key.clone()).or_default() += hit.count;
                    }
                    acked.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(_) => {
                    // Not acknowledged: the same batch, to the other instance.
                    target = (target + 1) % ingests.len();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    Ok(())
}

/// Reads every key all along; returns (reads, failures, longest outage).
async fn read_all_along(
    query: SocketAddr,
    keys: Vec<String>,
    stop: Arc<AtomicBool>,
) -> (u64, Vec<String>, Duration) {
    let (mut reads, mut failures) = (0u64, Vec::new());
    let mut longest = Duration::ZERO;
    let mut failing_since: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        match counts(query, &keys).await {
            Ok(_) => {
                if let Some(since) = failing_since.take() {
                    longest = longest.max(since.elapsed());
                }
            }
            Err(error) => {
                failing_since.get_or_insert_with(Instant::now);
                failures.push(format!("{error:#}"));
            }
        }
        reads += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (reads, failures, longest)
}

#[tokio::test(flavor = "multi_thread")]
async fn chaos_keeps_every_acknowledged_hit_exactly_once() -> anyhow::Result<()> {
    let seed: u64 = std::env::var("HITCOUNTER_CLUSTER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("cluster chaos: seed {seed}; replay with HITCOUNTER_CLUSTER_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut deployment = Deployment::start().await?;
    let keys: Vec<String> = (0..32).map(|i| format!("/chaos/{i}")).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let tally: Tally = Arc::default();
    let acked = Arc::new(AtomicU64::new(0));
    let drivers: Vec<_> = (0..2)
        .map(|client| {
            tokio::spawn(drive(
                deployment.ingest_addrs(),
                keys.clone(),
                client,
                seed,
                Arc::clone(&stop),
                Arc::clone(&tally),
                Arc::clone(&acked),
            ))
        })
        .collect();
    let reader_stop = Arc::new(AtomicBool::new(false));
    let reader = tokio::spawn(read_all_along(
        deployment.query_addr(),
        keys.clone(),
        Arc::clone(&reader_stop),
    ));

    // One fault at a time, in a seeded order; `HITCOUNTER_CLUSTER_ROUNDS` rounds of all of
    // them (1 in CI; more by hand for a longer run).
    let rounds: usize = std::env::var("HITCOUNTER_CLUSTER_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let mut schedule = Vec::new();
    for _ in 0..rounds {
        let mut faults = vec![
            "nats",
            "nats-cut",
            "ingest",
            "aggregator",
            "aggregator-empty",
        ];
        for i in (1..faults.len()).rev() {
            faults.swap(i, rng.random_range(0..=i));
        }
        schedule.extend(faults);
    }
    for fault in schedule {
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..1500))).await;
        let before = acked.load(Ordering::Relaxed);
        match fault {
            "nats" => deployment.kill_nats(rng.random_range(0..3)).await?,
            "nats-cut" => deployment.cut_nats(rng.random_range(0..3)).await?,
            "ingest" => deployment.kill_ingest(rng.random_range(0..2)).await?,
            "aggregator" => {
                deployment
                    .kill_aggregator(rng.random_range(0..AGGREGATORS), false)
                    .await?
            }
            _ => {
                deployment
                    .kill_aggregator(rng.random_range(0..AGGREGATORS), true)
                    .await?
            }
        }
        println!(
            "fault {fault}: {} batches acknowledged during it",
            acked.load(Ordering::Relaxed) - before
        );
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    for driver in drivers {
        driver.await??;
    }
    let tally: BTreeMap<String, u64> = tally.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let want: Vec<u64> = keys
        .iter()
        .map(|k| tally.get(k).copied().unwrap_or(0))
        .collect();
    println!(
        "acknowledged {} batches, {} hits",
        acked.load(Ordering::Relaxed),
        want.iter().sum::<u64>()
    );
    let query = deployment.query_addr();
    let result = until_counts(query, &keys, &want, Duration::from_secs(60)).await;
    reader_stop.store(true, Ordering::Relaxed);
    let (reads, failures, longest) = reader.await?;
    println!(
        "reads: {reads}, failed: {}, longest read outage: {longest:?}",
        failures.len()
    );
    result.with_context(|| deployment.logs())?;
    assert!(
        failures.is_empty(),
        "reads failed while at most one aggregator was down: {:?}\n{}",
        &failures[..failures.len().min(5)],
        deployment.logs()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_log_refuses_writes_with_resource_exhausted() -> anyhow::Result<()> {
    let nats = NatsCluster::start(3).await?;
    let data = tempfile::tempdir()?;
    let mut ingest = Service::new(
        "hitcounter-ingest",
        data.path(),
        &strings(&[
            "--nats",
            &nats.urls(),
            "--nats-max-bytes",
            "65536",
            "--partitions",
            "4",
        ]),
    );
    let addr = ingest.start().await?;
    serving(addr, Duration::from_secs(60)).await?;
    let mut client = IngestClient::new(connect(addr).await?);
    let keys: Vec<String> = (0..64).map(|i| format!("/full/{i}")).collect();
    let mut rng = StdRng::seed_from_u64(3);
    let mut acknowledged = 0;
    let refusal = loop {
        anyhow::ensure!(
            acknowledged < 10_000,
            "a 64 KiB stream took 10000 batches without refusing one"
        );
        match client
            .record_hits(batch(&keys, &mut rng, String::new()))
            .await
        {
            Ok(_) => acknowledged += 1,
            Err(status) => break status,
        }
    };
    assert_eq!(
        refusal.code(),
        tonic::Code::ResourceExhausted,
        "{refusal:?} after {acknowledged} batches"
    );
    assert!(
        refusal.message().contains("cluster's log is full"),
        "{}",
        refusal.message()
    );
    println!("a 64 KiB stream refused a batch after {acknowledged} were acknowledged");
    Ok(())
}
