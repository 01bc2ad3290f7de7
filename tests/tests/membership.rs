//! Elastic clustered mode, end to end: aggregators join and leave a running cluster (a real
//! 3-node NATS JetStream cluster, real binaries, real gRPC) while clients write, and counts stay
//! exact.
//!
//! `membership_changes_keep_counts_exact_and_reads_never_go_back`:
//! - Aggregators start with `--node-id` and announce themselves; query finds them with
//!   `--membership`. First, "closed" keys are written and read back exactly.
//! - Then clients stream batches with batch ids to other keys and tally every acknowledged hit,
//!   while, one at a time in a seeded order, an aggregator is **added** (fresh data dir: it
//!   builds its partitions from the log), **removed cleanly** (SIGTERM: it hands its partitions
//!   over, then leaves), or **lost for good** (`kill -9` and its data directory deleted; it
//!   leaves the membership one member TTL later). Between changes the test waits until every
//!   partition again has R ready replicas (the membership says so).
//! - All along, a reader reads the closed keys through query: every answer must equal what was
//!   written (a count lower than an earlier read would be a read that went back in time, e.g.
//!   from a half-built replica) and no read may fail. And a watcher of the membership checks
//!   that, except in the seconds after a loss, every partition is announced ready by R members
//!   at every moment (a move builds the new replica before the old one is dropped).
//! - At the end every key's count equals the tally.
//!
//! Seeded (`HITCOUNTER_MEMBERSHIP_SEED`, printed); `HITCOUNTER_MEMBERSHIP_CHANGES` changes
//! (default 4; more by hand: run the test binary directly, past nextest's 2-minute limit).
//! Prints the time each change took to make the cluster whole again.

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
use hitcounter_cluster::{ClusterArgs, HitStream, Membership, MembershipArgs, Roster};
use hitcounter_integration_tests::{
    connect,
    nats::NatsCluster,
    process::{serving, ClosedPort, Service},
    proxy::LinkProxy,
    workload::{batch, counts, strings, until_counts, STREAM_BYTES},
};
use hitcounter_proto::v1::{ingest_client::IngestClient, RecordHitsRequest};
use rand::{rngs::StdRng, Rng, SeedableRng};

const PARTITIONS: u32 = 16;
const REPLICAS: usize = 2;
/// Writers and batches of the closed keys written before the changes.
const CLOSED_WRITERS: u64 = 16;
const CLOSED_BATCHES_PER_WRITER: u64 = 150;
/// Short, so that a lost aggregator leaves the placement within seconds.
const MEMBER_TTL_MS: &str = "3000";

struct Aggregator {
    id: String,
    service: Service,
    /// The relay query reaches it through (its advertised address); kept open while it runs.
    _link: LinkProxy,
}

struct Deployment {
    nats: NatsCluster,
    data: tempfile::TempDir,
    placeholder: ClosedPort,
    aggregators: Vec<Aggregator>,
    next_id: usize,
    ingest: (Service, LinkProxy),
    query: (Service, LinkProxy),
    membership: Membership,
    /// The aggregators' `--handoff-timeout-seconds`.
    handoff_seconds: &'static str,
}

impl Deployment {
    async fn start(aggregators: usize, handoff_seconds: &'static str) -> anyhow::Result<Self> {
        let nats = NatsCluster::start(3).await?;
        let urls = nats.urls();
        let data = tempfile::tempdir()?;
        let placeholder = ClosedPort::bind()?;
        let mut ingest = Service::new(
            "hitcounter-ingest",
            &data.path().join("ingest"),
            &strings(&[
                "--nats",
                &urls,
                "--nats-max-bytes",
                STREAM_BYTES,
                "--partitions",
                &PARTITIONS.to_string(),
            ]),
        );
        let ingest_link = LinkProxy::start(placeholder.addr).await?;
        ingest_link.retarget(ingest.start().await?);
        let args = ClusterArgs {
            nats: urls.split(',').map(str::to_owned).collect(),
            nats_stream: "hitcounter".into(),
            partitions: None,
            nats_replicas: 3,
            nats_max_bytes: 1 << 30,
            nats_timeout_ms: 5000,
            nats_ca_cert: None,
            nats_tls_cert: None,
            nats_tls_key: None,
        };
        let stream = HitStream::open_existing(&args).await?;
        let ttl = MembershipArgs {
            member_ttl_ms: MEMBER_TTL_MS.parse()?,
        }
        .ttl();
        let membership = Membership::open(&stream, ttl, 3).await?;
        let mut query = Service::new(
            "hitcounter-query",
            &data.path().join("query"),
            &strings(&[
                "--nats",
                &urls,
                "--nats-max-bytes",
                STREAM_BYTES,
                "--membership",
                "--member-ttl-ms",
                MEMBER_TTL_MS,
                "--replicas",
                &REPLICAS.to_string(),
                "--breaker-cooldown-ms",
                "200",
                "--aggregator-timeout-ms",
                "1000",
            ]),
        );
        let query_link = LinkProxy::start(placeholder.addr).await?;
        query_link.retarget(query.start().await?);
        let mut deployment = Self {
            nats,
            data,
            placeholder,
            aggregators: Vec::new(),
            next_id: 0,
            ingest: (ingest, ingest_link),
            query: (query, query_link),
            membership,
            handoff_seconds,
        };
        for _ in 0..aggregators {
            deployment.add().await?;
        }
        serving(deployment.ingest.1.addr, Duration::from_secs(30)).await?;
        serving(deployment.query.1.addr, Duration::from_secs(30)).await?;
        Ok(deployment)
    }

    /// Starts a new aggregator on a fresh data directory.
    async fn add(&mut self) -> anyhow::Result<()> {
        let id = format!("aggregator-{}", self.next_id);
        self.next_id += 1;
        let link = LinkProxy::start(self.placeholder.addr).await?;
        let mut service = Service::new(
            "hitcounter-aggregator",
            &self.data.path().join(&id),
            &strings(&[
                "--data-dir",
                ".",
                "--checkpoint-interval-ms",
                "300",
                "--nats",
                &self.nats.urls(),
                "--nats-max-bytes",
                STREAM_BYTES,
                "--node-id",
                &id,
                "--advertise",
                &format!("http://{}", link.addr),
                "--member-ttl-ms",
                MEMBER_TTL_MS,
                "--replicas",
                &REPLICAS.to_string(),
                "--handoff-timeout-seconds",
                self.handoff_seconds,
            ]),
        );
        link.retarget(service.start().await?);
        self.aggregators.push(Aggregator {
            id,
            service,
            _link: link,
        });
        Ok(())
    }

    /// SIGTERM: the aggregator hands its partitions over, then leaves and exits.
    fn remove(&mut self, index: usize) -> anyhow::Result<String> {
        let mut aggregator = self.aggregators.remove(index);
        let code = tokio::task::block_in_place(|| aggregator.service.terminate())?;
        anyhow::ensure!(
            code == Some(0),
            "{} exited with {code:?} after SIGTERM\n{}",
            aggregator.id,
            aggregator.service.log_tail(30)
        );
        Ok(aggregator.id)
    }

    /// `kill -9`, and its data directory deleted: gone for good.
    fn lose(&mut self, index: usize) -> anyhow::Result<String> {
        let mut aggregator = self.aggregators.remove(index);
        aggregator.service.kill9()?;
        std::fs::remove_dir_all(self.data.path().join(&aggregator.id))?;
        Ok(aggregator.id)
    }

    /// Waits until the membership lists exactly the running aggregators and every partition
    /// has `REPLICAS` ready replicas on its hosts; returns how long that took.
    async fn until_whole(&self, within: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let mut want: Vec<&str> = self.aggregators.iter().map(|a| a.id.as_str()).collect();
        want.sort_unstable();
        loop {
            let members = self.membership.members().await?;
            let listed: Vec<&str> = members.keys().map(String::as_str).collect();
            let roster = Roster::from_members(PARTITIONS, REPLICAS, &members);
            let short: Vec<u32> = (0..PARTITIONS)
                .filter(|&p| {
                    roster
                        .hosts(p)
                        .iter()
                        .filter(|&&n| roster.nodes[n].serves(p))
                        .count()
                        < REPLICAS.min(want.len())
                })
                .collect();
            if listed == want && short.is_empty() {
                return Ok(started.elapsed());
            }
            anyhow::ensure!(
                started.elapsed() < within,
                "after {within:?}: members {listed:?} (want {want:?}), partitions short of ready replicas: {short:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for aggregator in &self.aggregators {
            out.push_str(&format!(
                "--- {}\n{}\n",
                aggregator.id,
                aggregator.service.log_tail(15)
            ));
        }
        out.push_str(&format!("--- ingest\n{}\n", self.ingest.0.log_tail(10)));
        out.push_str(&format!("--- query\n{}\n", self.query.0.log_tail(15)));
        out
    }
}

type Tally = Arc<Mutex<BTreeMap<String, u64>>>;

/// Sends `request` until acknowledged (the same batch id: counted once), then tallies it.
async fn send(ingest: SocketAddr, request: RecordHitsRequest, tally: &Tally) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(90),
            "batch {} not acknowledged within 90 s",
            request.batch_id
        );
        let attempt = async {
            let mut client = IngestClient::new(connect(ingest).await?);
            let mut call = tonic::Request::new(request.clone());
            call.set_timeout(Duration::from_secs(10));
            anyhow::Ok(client.record_hits(call).await?.into_inner())
        }
        .await;
        if attempt.is_ok() {
            let mut tally = tally.lock().unwrap_or_else(|e| e.into_inner());
            for hit in &request.hits {
                *tally.entry(hit.key.clone()).or_default() += hit.count;
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn wanted(tally: &Tally, keys: &[String]) -> Vec<u64> {
    let tally = tally.lock().unwrap_or_else(|e| e.into_inner());
    keys.iter()
        .map(|k| tally.get(k).copied().unwrap_or(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn membership_changes_keep_counts_exact_and_reads_never_go_back() -> anyhow::Result<()> {
    let seed: u64 = std::env::var("HITCOUNTER_MEMBERSHIP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("membership chaos: seed {seed}; replay with HITCOUNTER_MEMBERSHIP_SEED={seed}");
    let changes: usize = std::env::var("HITCOUNTER_MEMBERSHIP_CHANGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut deployment = Deployment::start(3, "45").await?;
    let took = deployment.until_whole(Duration::from_secs(60)).await?;
    println!("3 aggregators whole after {:.2} s", took.as_secs_f64());
    let (ingest, query) = (deployment.ingest.1.addr, deployment.query.1.addr);

    // Closed keys: written once, then only read.
    let closed: Vec<String> = (0..48).map(|i| format!("/closed/{i}")).collect();
    // Enough of them that building a partition from the log takes a while (tens of thousands
    // of messages): a replica that answered before it had caught up would be caught.
    let closed_tally: Tally = Arc::default();
    let writers: Vec<_> = (0..CLOSED_WRITERS)
        .map(|writer| {
            let (closed, tally) = (closed.clone(), Arc::clone(&closed_tally));
            let mut rng = StdRng::seed_from_u64(seed ^ writer);
            tokio::spawn(async move {
                for n in 0..CLOSED_BATCHES_PER_WRITER {
                    let request = batch(&closed, &mut rng, format!("closed-{writer}-{n}"));
                    send(ingest, request, &tally).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    let filling = Instant::now();
    for writer in writers {
        writer.await??;
    }
    println!(
        "{} closed batches written in {:.2} s",
        CLOSED_WRITERS * CLOSED_BATCHES_PER_WRITER,
        filling.elapsed().as_secs_f64()
    );
    let closed_want = wanted(&closed_tally, &closed);
    until_counts(query, &closed, &closed_want, Duration::from_secs(30))
        .await
        .with_context(|| deployment.logs())?;

    // Live load on other keys, and a reader of the closed keys all along.
    let live: Vec<String> = (0..32).map(|i| format!("/live/{i}")).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let live_tally: Tally = Arc::default();
    let driver = {
        let (stop, tally, live) = (Arc::clone(&stop), Arc::clone(&live_tally), live.clone());
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                send(ingest, batch(&live, &mut rng, format!("live-{n}")), &tally).await?;
            }
            anyhow::Ok(n)
        })
    };
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (stop, closed, want, reads) = (
            Arc::clone(&stop),
            closed.clone(),
            closed_want.clone(),
            Arc::clone(&reads),
        );
        tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut wrong = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match counts(query, &closed).await {
                    Ok(got) if got == want => {}
                    Ok(got) => wrong.push(got),
                    Err(error) => failures.push(format!("{error:#}")),
                }
                reads.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (failures, wrong)
        })
    };

    // A watcher of the membership: outside the seconds after a loss, every partition must be
    // announced ready by at least R members at every moment: a move builds the new replica
    // before the old one is dropped, and a clean leave hands over before it goes.
    let lossy = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, lossy, membership) = (
            Arc::clone(&stop),
            Arc::clone(&lossy),
            deployment.membership.clone(),
        );
        tokio::spawn(async move {
            let mut short = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let exempt = lossy.load(Ordering::Acquire);
                if let Ok(members) = membership.members().await {
                    for p in 0..PARTITIONS {
                        let ready = members.values().filter(|m| m.ready.contains(&p)).count();
                        if ready < REPLICAS && !exempt && !lossy.load(Ordering::Acquire) {
                            short.push(format!(
                                "partition {p}: {ready} ready replicas among {:?}",
                                members.keys().collect::<Vec<_>>()
                            ));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            short
        })
    };

    // The changes: keep 2 to 4 aggregators running (R 2 needs 2).
    for change in 0..changes {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1200))).await;
        let running = deployment.aggregators.len();
        let kind = match running {
            0..=2 => "add",
            4.. => ["remove", "lose"][rng.random_range(0..2)],
            _ => ["add", "remove", "lose"][rng.random_range(0..3)],
        };
        let what = match kind {
            "add" => {
                deployment.add().await?;
                format!(
                    "added {}",
                    deployment.aggregators.last().map_or("", |a| &a.id)
                )
            }
            "remove" => {
                let index = rng.random_range(0..running);
                let started = Instant::now();
                let id = deployment.remove(index)?;
                format!(
                    "removed {id} cleanly (handed over and exited in {:.2} s)",
                    started.elapsed().as_secs_f64()
                )
            }
            _ => {
                let index = rng.random_range(0..running);
                lossy.store(true, Ordering::Release);
                format!("lost {} for good", deployment.lose(index)?)
            }
        };
        let took = deployment
            .until_whole(Duration::from_secs(90))
            .await
            .with_context(|| format!("change {change}: {what}"))?;
        lossy.store(false, Ordering::Release);
        println!(
            "change {change}: {what}; whole again after {:.2} s ({} aggregators, {} reads so far)",
            took.as_secs_f64(),
            deployment.aggregators.len(),
            reads.load(Ordering::Relaxed)
        );
    }

    stop.store(true, Ordering::Relaxed);
    let batches = driver.await??;
    let (failures, wrong) = reader.await?;
    let short = watcher.await?;
    assert!(
        short.is_empty(),
        "partitions had fewer than {REPLICAS} ready replicas outside a loss ({} times): {:?}\n{}",
        short.len(),
        &short[..short.len().min(5)],
        deployment.logs()
    );
    println!(
        "{batches} live batches acknowledged; {} reads of the closed keys, {} failed, {} wrong",
        reads.load(Ordering::Relaxed),
        failures.len(),
        wrong.len()
    );
    assert!(
        wrong.is_empty(),
        "reads of closed keys answered other counts than written (want {closed_want:?}): {:?}\n{}",
        &wrong[..wrong.len().min(3)],
        deployment.logs()
    );
    assert!(
        failures.is_empty(),
        "reads failed during membership changes: {:?}\n{}",
        &failures[..failures.len().min(5)],
        deployment.logs()
    );
    let live_want = wanted(&live_tally, &live);
    until_counts(query, &live, &live_want, Duration::from_secs(60))
        .await
        .with_context(|| deployment.logs())?;
    until_counts(query, &closed, &closed_want, Duration::from_secs(10)).await?;
    Ok(())
}

/// The last aggregator of a cluster (the whole cluster going down) does not wait for a handoff
/// nobody can take: with a 10-minute handoff timeout it still exits at once on SIGTERM (the
/// 60 s guard of `terminate` fails the test otherwise).
#[tokio::test(flavor = "multi_thread")]
async fn the_last_aggregator_stops_without_waiting_for_a_handoff() -> anyhow::Result<()> {
    let mut deployment = Deployment::start(1, "600").await?;
    deployment.until_whole(Duration::from_secs(60)).await?;
    let id = deployment.remove(0)?;
    anyhow::ensure!(
        !deployment.membership.members().await?.contains_key(&id),
        "{id} left the membership"
    );
    Ok(())
}
