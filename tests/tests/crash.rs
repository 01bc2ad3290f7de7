//! Crash tests: nothing acknowledged is lost or counted twice, whatever single process is
//! `kill -9`ed and restarted on its data directory.
//!
//! The three real binaries run as child processes. Two client tasks drive a steady `StreamHits`
//! load; every batch has a `batch_id`, and a batch whose answer was lost (the stream broke) is
//! sent again with the same id until it is acknowledged, as a careful client would. The client
//! tallies every acknowledged hit per key. Each round `kill -9`s one service (aggregator, ingest
//! or query, in turn) at a random moment, restarts it on the same data directory after a random
//! pause, and lets the load go on. At the end every key's count through query must equal the
//! tally exactly: no loss, no double count.
//!
//! `HITCOUNTER_CRASH_ROUNDS` (default 2) rounds per service; `HITCOUNTER_CRASH_SEED` replays a
//! run (the seed is printed). A longer run by hand:
//! `HITCOUNTER_CRASH_ROUNDS=20 cargo nextest run -p hitcounter-integration-tests --test crash --no-capture`.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use hitcounter_integration_tests::{
    connect, eventually,
    process::{serving, ClosedPort, Service},
    LinkMode, LinkProxy,
};
use hitcounter_proto::v1::{
    ingest_client::IngestClient, query_client::QueryClient, GetHitsManyRequest, Hit,
    RecordHitsRequest,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

const KEYS: usize = 40;

fn key(i: usize) -> String {
    format!("/crash/{i}")
}

type Tally = Arc<Mutex<HashMap<String, u64>>>;

/// One client: batches of hits with ids, one at a time on a stream, resent until acknowledged.
async fn drive(
    ingest: SocketAddr,
    client: u64,
    seed: u64,
    stop: Arc<AtomicBool>,
    tally: Tally,
    acked_batches: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed ^ client);
    let mut number = 0u64;
    let mut current: Option<RecordHitsRequest> = None;
    while !stop.load(Ordering::Relaxed) {
        let Ok(channel) = connect(ingest).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let mut client_stub = IngestClient::new(channel);
        let Ok(response) = client_stub
            .stream_hits(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
        else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let mut responses = response.into_inner();
        loop {
            if stop.load(Ordering::Relaxed) && current.is_none() {
                return Ok(());
            }
            let batch = current.get_or_insert_with(|| {
                number += 1;
                let hits = (0..100)
                    .map(|_| Hit {
                        key: key(rng.random_range(0..KEYS)),
                        timestamp_ms: 0,
                        count: rng.random_range(1..4),
                    })
                    .collect();
                RecordHitsRequest {
                    hits,
                    batch_id: format!("crash-{seed}-{client}-{number}"),
                }
            });
            if tx.send(batch.clone()).await.is_err() {
                break;
            }
            match tokio::time::timeout(Duration::from_secs(10), responses.message()).await {
                Ok(Ok(Some(answer))) => {
                    anyhow::ensure!(answer.batch_id == batch.batch_id, "answers out of order");
                    // Acknowledged (the first time, or as a duplicate of an earlier attempt whose
                    // answer we lost): it counts exactly once.
                    let mut tally = tally.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                    for hit in &batch.hits {
                        *tally.entry(hit.key.clone()).or_default() += hit.count.max(1);
                    }
                    acked_batches.fetch_add(1, Ordering::Relaxed);
                    current = None;
                }
                // The stream broke (ingest killed) or stalled: resend the same batch on a new one.
                _ => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn counts(query: SocketAddr) -> anyhow::Result<HashMap<String, u64>> {
    let mut client = QueryClient::new(connect(query).await?);
    let response = client
        .get_hits_many(GetHitsManyRequest {
            keys: (0..KEYS).map(key).collect(),
            window_seconds: 3600,
            at_ms: 0,
        })
        .await?
        .into_inner();
    Ok(response
        .results
        .into_iter()
        .filter(|r| r.count > 0)
        .map(|r| (r.key, r.count))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_any_service_loses_nothing_and_counts_nothing_twice() -> anyhow::Result<()> {
    let seed = std::env::var("HITCOUNTER_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    let rounds: usize = std::env::var("HITCOUNTER_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    println!("crash test: seed {seed} ({rounds} rounds per service); replay with HITCOUNTER_CRASH_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);

    let data = tempfile::tempdir()?;
    // Each service listens on a port of its own choosing (read from its log), and its peers
    // reach it through a relay of this test's, bound before anything starts: a restarted
    // service gets a new port and the relay is pointed at it. Nothing here ever releases a
    // port and hopes to bind it again.
    let placeholder = ClosedPort::bind()?;
    let (a, i, q) = (
        LinkProxy::start(placeholder.addr).await?,
        LinkProxy::start(placeholder.addr).await?,
        LinkProxy::start(placeholder.addr).await?,
    );
    let upstream = format!("http://{}", a.addr);
    let common = |extra: &[&str]| -> Vec<String> { extra.iter().map(|s| s.to_string()).collect() };
    let mut aggregator = Service::new(
        "hitcounter-aggregator",
        &data.path().join("aggregator"),
        &common(&["--data-dir", ".", "--checkpoint-interval-ms", "300"]),
    );
    let mut ingest = Service::new(
        "hitcounter-ingest",
        &data.path().join("ingest"),
        &common(&[
            "--data-dir",
            ".",
            "--aggregator",
            &upstream,
            "--breaker-cooldown-ms",
            "200",
            "--aggregator-timeout-ms",
            "1000",
        ]),
    );
    let mut query = Service::new(
        "hitcounter-query",
        &data.path().join("query"),
        &common(&["--aggregator", &upstream, "--breaker-cooldown-ms", "200"]),
    );
    a.retarget(aggregator.start().await?);
    i.retarget(ingest.start().await?);
    q.retarget(query.start().await?);
    for link in [&a, &i, &q] {
        serving(link.addr, Duration::from_secs(30)).await?;
    }
    let (ingest_addr, query_addr) = (i.addr, q.addr);

    let stop = Arc::new(AtomicBool::new(false));
    let tally: Tally = Arc::default();
    let acked = Arc::new(AtomicU64::new(0));
    let drivers: Vec<_> = (0..2)
        .map(|client| {
            tokio::spawn(drive(
                ingest_addr,
                client,
                seed,
                Arc::clone(&stop),
                Arc::clone(&tally),
                Arc::clone(&acked),
            ))
        })
        .collect();

    // Each round kills every service once, in a random order; a last round kills only the
    // aggregator, so that no later ingest restart can paper over what its restart needs.
    let mut schedule: Vec<Vec<&str>> = (0..rounds)
        .map(|_| {
            let mut order = vec!["aggregator", "ingest", "query"];
            for i in (1..order.len()).rev() {
                order.swap(i, rng.random_range(0..=i));
            }
            order
        })
        .collect();
    schedule.push(vec!["aggregator"]);
    for (round, targets) in schedule.into_iter().enumerate() {
        for target in targets {
            tokio::time::sleep(Duration::from_millis(rng.random_range(200..1200))).await;
            let before = acked.load(Ordering::Relaxed);
            let (service, link) = match target {
                "aggregator" => (&mut aggregator, &a),
                "ingest" => (&mut ingest, &i),
                _ => (&mut query, &q),
            };
            // While it is down its peers find nothing behind the relay (as with a dead port),
            // and never an unrelated process that took its old port meanwhile.
            link.set(LinkMode::Refuse);
            service.kill9()?;
            let down = Duration::from_millis(rng.random_range(50..600));
            tokio::time::sleep(down).await;
            let started = service.start().await;
            let addr = match started {
                Ok(addr) => addr,
                Err(error) => panic!("{target} did not come back: {error}"),
            };
            link.retarget(addr);
            link.set(LinkMode::Pass);
            if let Err(error) = serving(link.addr, Duration::from_secs(30)).await {
                panic!(
                    "{target} did not come back: {error}\n{}",
                    service.log_tail(30)
                );
            }
            println!(
                "round {round}: killed {target} after {before} acked batches, down {down:?}, back"
            );
        }
    }
    // Let the load run a little after the last restart, then stop it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for driver in drivers {
        driver.await??;
    }
    let expected = tally
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let total: u64 = expected.values().sum();
    println!(
        "{} batches acked, {total} hits",
        acked.load(Ordering::Relaxed)
    );
    anyhow::ensure!(total > 0, "no hit was ever acknowledged");

    let converged = eventually(
        Duration::from_secs(60),
        "counts to equal the acked tally",
        || {
            let expected = expected.clone();
            async move { (counts(query_addr).await.ok()? == expected).then_some(()) }
        },
    )
    .await;
    if let Err(error) = converged {
        let got = counts(query_addr).await.unwrap_or_default();
        let mut diff: Vec<_> = (0..KEYS)
            .map(key)
            .filter_map(|k| {
                let (want, have) = (
                    expected.get(&k).copied().unwrap_or(0),
                    got.get(&k).copied().unwrap_or(0),
                );
                (want != have).then(|| format!("{k}: acked {want}, counted {have}"))
            })
            .collect();
        diff.truncate(10);
        panic!(
            "{error} (seed {seed})\n{}\n--- ingest log ---\n{}\n--- aggregator log ---\n{}",
            diff.join("\n"),
            ingest.log_tail(20),
            aggregator.log_tail(20)
        );
    }
    for service in [&mut ingest, &mut query, &mut aggregator] {
        assert_eq!(service.terminate()?, Some(0), "clean exit after the test");
    }
    Ok(())
}
