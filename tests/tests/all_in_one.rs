//! `hitcounter all` as a child process, the way a user runs it: the contract's smoke path
//! (record, get, series, top, health, metrics) against its one process; one SIGTERM stops the
//! roles in order (ingest drains into the aggregator, then query, then the aggregator's last
//! checkpoint), exits 0 and loses nothing, which the roles started separately
//! (`hitcounter aggregator`, `hitcounter query`) on the checkpoint alone confirm; a restart on
//! the same data directory counts everything once.
//!
//! Every process binds port 0 and prints the addresses it got (`hitcounter listening: …` on
//! stdout), so no port is picked by the test and released before the service binds it.
//! Needs the binaries built first (`cargo build --workspace --bins`).

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    time::Duration,
};

use hitcounter_integration_tests::{
    connect, eventually, metric_value, now_ms,
    process::{binary, serving},
    scrape,
};
use hitcounter_proto::v1::{
    ingest_client::IngestClient, query_client::QueryClient, GetHitsManyRequest, GetHitsRequest,
    GetSeriesRequest, Hit, RecordHitRequest, RecordHitsRequest, TopKeysRequest,
};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

/// Port 0 for every listener of `hitcounter all`.
const EPHEMERAL: [&str; 8] = [
    "--ingest-listen",
    "127.0.0.1:0",
    "--query-listen",
    "127.0.0.1:0",
    "--aggregator-listen",
    "127.0.0.1:0",
    "--metrics-listen",
    "127.0.0.1:0",
];

/// A `hitcounter` process started in a directory, with the addresses it printed.
struct Hitcounter {
    child: Child,
    /// Kept open: the process may write to stdout again.
    _stdout: BufReader<ChildStdout>,
    log: PathBuf,
    addrs: HashMap<String, String>,
}

impl Hitcounter {
    /// Starts `hitcounter ARGS` in `dir` (stderr appended to `<dir>/<log_name>.log`) and waits
    /// for its `hitcounter listening:` line.
    fn start(dir: &Path, log_name: &str, args: &[&str]) -> anyhow::Result<Self> {
        let log = dir.join(format!("{log_name}.log"));
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut child = Command::new(binary("hitcounter")?)
            .args(args)
            .current_dir(dir)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout pipe"))?;
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        // Blocks until the line is printed, or returns 0 bytes when the process exits first.
        stdout.read_line(&mut line)?;
        let mut started = Self {
            child,
            _stdout: stdout,
            log,
            addrs: HashMap::new(),
        };
        let Some(addrs) = line.trim().strip_prefix("hitcounter listening: ") else {
            anyhow::bail!(
                "hitcounter {args:?} printed {line:?} instead of its addresses; log:\n{}",
                started.log_text()
            );
        };
        started.addrs = addrs
            .split(' ')
            .filter_map(|pair| pair.split_once('='))
            .map(|(name, addr)| (name.to_owned(), addr.to_owned()))
            .collect();
        Ok(started)
    }

    /// The address printed for `name` (`ingest`, `query`, `aggregator`, `metrics`).
    fn addr(&self, name: &str) -> anyhow::Result<SocketAddr> {
        let addr = self
            .addrs
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("no {name} address in {:?}", self.addrs))?;
        Ok(addr.parse()?)
    }

    /// Sends SIGTERM and waits for the exit code.
    async fn terminate(mut self) -> anyhow::Result<(Option<i32>, String)> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM failed");
        let log = self.log.clone();
        let code = tokio::task::spawn_blocking(move || self.child.wait()).await??;
        Ok((code.code(), std::fs::read_to_string(log)?))
    }

    /// `kill -9`: no drain, no last checkpoint.
    async fn kill9(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        tokio::task::spawn_blocking(move || self.child.wait()).await??;
        Ok(())
    }

    /// Waits for the exit code of a process expected to stop on its own.
    async fn exit_code(mut self) -> anyhow::Result<(Option<i32>, String)> {
        let log = self.log.clone();
        let code = tokio::task::spawn_blocking(move || self.child.wait()).await??;
        Ok((code.code(), std::fs::read_to_string(log)?))
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Hitcounter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `hitcounter all` on port 0 in `dir` and waits until ingest and query serve.
async fn start_all(dir: &Path) -> anyhow::Result<Hitcounter> {
    let mut args = vec!["all"];
    args.extend(EPHEMERAL);
    let started = Hitcounter::start(dir, "all", &args)?;
    for role in ["ingest", "query"] {
        serving(started.addr(role)?, Duration::from_secs(30)).await?;
    }
    Ok(started)
}

async fn health(addr: SocketAddr) -> anyhow::Result<i32> {
    let response = HealthClient::new(connect(addr).await?)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(response.into_inner().status)
}

async fn count(query: &mut QueryClient<tonic::transport::Channel>, key: &str) -> Option<u64> {
    let response = query
        .get_hits(GetHitsRequest {
            key: key.to_owned(),
            window_seconds: 300,
            at_ms: 0,
        })
        .await
        .ok()?;
    Some(response.into_inner().count)
}

#[tokio::test]
async fn the_smoke_path_runs_against_one_process() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hitcounter = start_all(dir.path()).await?;
    let mut ingest = IngestClient::new(connect(hitcounter.addr("ingest")?).await?);
    let mut query = QueryClient::new(connect(hitcounter.addr("query")?).await?);

    // Record: one hit of 3, and a batch with an id sent twice (counted once).
    let accepted = ingest
        .record_hit(RecordHitRequest {
            key: "/home".into(),
            count: 3,
            timestamp_ms: 0,
        })
        .await?
        .into_inner()
        .accepted;
    assert_eq!(accepted, 3);
    let batch = RecordHitsRequest {
        hits: vec![
            Hit {
                key: "/home".into(),
                count: 1,
                timestamp_ms: 0,
            },
            Hit {
                key: "/cart".into(),
                count: 2,
                timestamp_ms: 0,
            },
        ],
        batch_id: "all-in-one-1".into(),
    };
    let first = ingest.record_hits(batch.clone()).await?.into_inner();
    let again = ingest.record_hits(batch).await?.into_inner();
    assert_eq!((first.accepted, first.duplicate), (3, false));
    assert_eq!((again.accepted, again.duplicate), (3, true));

    // Get: through ingest's log, the aggregator and query, all in the one process.
    eventually(Duration::from_secs(10), "/home to count 4", || {
        let mut query = query.clone();
        async move { (count(&mut query, "/home").await? == 4).then_some(()) }
    })
    .await?;
    let many = query
        .get_hits_many(GetHitsManyRequest {
            keys: vec!["/home".into(), "/cart".into(), "/nothing".into()],
            window_seconds: 300,
            at_ms: 0,
        })
        .await?
        .into_inner();
    let counts: Vec<u64> = many.results.iter().map(|c| c.count).collect();
    assert_eq!(counts, [4, 2, 0]);

    // Series: every hit of the last minute in its points.
    let now = now_ms();
    let series = query
        .get_series(GetSeriesRequest {
            key: "/home".into(),
            from_ms: now - 60_000,
            to_ms: now + 1_000,
            step_seconds: 10,
        })
        .await?
        .into_inner();
    assert_eq!(series.points.iter().map(|p| p.count).sum::<u64>(), 4);

    // Top: both keys, most hits first.
    let top = query
        .top_keys(TopKeysRequest {
            window_seconds: 300,
            limit: 10,
            prefix: String::new(),
            at_ms: 0,
        })
        .await?
        .into_inner();
    let ranked: Vec<(&str, u64)> = top.keys.iter().map(|k| (k.key.as_str(), k.count)).collect();
    assert_eq!(ranked, [("/home", 4), ("/cart", 2)]);

    // Health on both public ports.
    for role in ["ingest", "query"] {
        assert_eq!(
            health(hitcounter.addr(role)?).await?,
            ServingStatus::Serving as i32,
            "{role}"
        );
    }

    // One /metrics endpoint with the metrics of all three roles.
    let metrics = scrape(hitcounter.addr("metrics")?).await?;
    assert_eq!(
        metric_value(&metrics, "hitcounter_ingest_hits_accepted_total", &[]),
        Some(6.0),
        "{metrics}"
    );
    assert!(
        metric_value(&metrics, "hitcounter_aggregator_deltas_applied_total", &[]).is_some(),
        "no aggregator metrics on the one endpoint"
    );
    assert!(
        metric_value(
            &metrics,
            "hitcounter_query_requests_total",
            &["method=\"GetHitsMany\""]
        )
        .is_some(),
        "no query metrics on the one endpoint"
    );

    // Data under ./data of the working directory.
    for role in ["ingest", "aggregator"] {
        let data = dir.path().join("data").join(role);
        assert!(data.is_dir(), "{} missing", data.display());
    }
    let (code, log) = hitcounter.terminate().await?;
    assert_eq!(code, Some(0), "log:\n{log}");
    Ok(())
}

/// The position of the first log line containing `message`, for checking the stop order.
fn line_of(log: &str, message: &str) -> anyhow::Result<usize> {
    log.lines()
        .position(|line| line.contains(message))
        .ok_or_else(|| anyhow::anyhow!("no {message:?} in the log:\n{log}"))
}

#[tokio::test]
async fn one_sigterm_stops_the_roles_in_order_and_nothing_is_lost() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hitcounter = start_all(dir.path()).await?;
    let mut ingest = IngestClient::new(connect(hitcounter.addr("ingest")?).await?);

    // Acknowledged hits, and SIGTERM at once: most are still between ingest's log and the
    // aggregator when the stop begins.
    let keys: Vec<String> = (0..50).map(|i| format!("/stop/{i}")).collect();
    let mut acked: HashMap<String, u64> = HashMap::new();
    for round in 0..40u64 {
        let hits: Vec<Hit> = keys
            .iter()
            .enumerate()
            .map(|(i, key)| Hit {
                key: key.clone(),
                count: 1 + (round + i as u64) % 3,
                timestamp_ms: 0,
            })
            .collect();
        let response = ingest
            .record_hits(RecordHitsRequest {
                hits: hits.clone(),
                batch_id: format!("stop-{round}"),
            })
            .await?
            .into_inner();
        assert!(!response.duplicate);
        for hit in hits {
            *acked.entry(hit.key).or_default() += hit.count;
        }
    }
    let (code, log) = hitcounter.terminate().await?;
    assert_eq!(code, Some(0), "log:\n{log}");
    // Ingest drained (not abandoned at the deadline) before query stopped, and the aggregator
    // stopped last.
    assert!(!log.contains("drain deadline passed"), "log:\n{log}");
    let drained = line_of(&log, "pipeline drained")?;
    let ingest_stopped = line_of(&log, "ingest stopped")?;
    let query_stopped = line_of(&log, "query stopped")?;
    let aggregator_stopped = line_of(&log, "aggregator stopped")?;
    assert!(
        drained < ingest_stopped && ingest_stopped < query_stopped,
        "log:\n{log}"
    );
    assert!(query_stopped < aggregator_stopped, "log:\n{log}");

    // The aggregator's last checkpoint alone holds every acknowledged hit: started without
    // ingest (which could otherwise resend from its log), as the separate roles.
    let aggregator = Hitcounter::start(
        dir.path(),
        "roles",
        &[
            "aggregator",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "off",
            "--data-dir",
            "data/aggregator",
        ],
    )?;
    let aggregator_uri = format!("http://{}", aggregator.addr("aggregator")?);
    let query = Hitcounter::start(
        dir.path(),
        "roles",
        &[
            "query",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "off",
            "--aggregator",
            &aggregator_uri,
        ],
    )?;
    serving(query.addr("query")?, Duration::from_secs(30)).await?;
    let want: Vec<u64> = keys.iter().map(|k| acked[k]).collect();
    let counts = |addr: SocketAddr| {
        let keys = keys.clone();
        async move {
            let mut query = QueryClient::new(connect(addr).await?);
            let many = query
                .get_hits_many(GetHitsManyRequest {
                    keys,
                    window_seconds: 300,
                    at_ms: 0,
                })
                .await?
                .into_inner();
            anyhow::Ok(many.results.iter().map(|c| c.count).collect::<Vec<u64>>())
        }
    };
    assert_eq!(counts(query.addr("query")?).await?, want);
    for role in [query, aggregator] {
        let (code, log) = role.terminate().await?;
        assert_eq!(code, Some(0), "log:\n{log}");
    }

    // A restart of the one process on the same data counts everything, once.
    let again = start_all(dir.path()).await?;
    let query_addr = again.addr("query")?;
    assert_eq!(counts(query_addr).await?, want);
    // Ingest's start-up resend (if any) is deduplicated: still exact once it has been through.
    let mut ingest = IngestClient::new(connect(again.addr("ingest")?).await?);
    ingest
        .record_hit(RecordHitRequest {
            key: "/stop/marker".into(),
            count: 1,
            timestamp_ms: 0,
        })
        .await?;
    eventually(Duration::from_secs(10), "the marker hit", || async move {
        {
            let mut query = QueryClient::new(connect(query_addr).await.ok()?);
            (count(&mut query, "/stop/marker").await? == 1).then_some(())
        }
    })
    .await?;
    assert_eq!(counts(query_addr).await?, want);
    let (code, log) = again.terminate().await?;
    assert_eq!(code, Some(0), "log:\n{log}");
    Ok(())
}

#[tokio::test]
async fn kill_9_of_the_one_process_loses_nothing_and_counts_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hitcounter = start_all(dir.path()).await?;
    let mut ingest = IngestClient::new(connect(hitcounter.addr("ingest")?).await?);
    let keys: Vec<String> = (0..20).map(|i| format!("/kill/{i}")).collect();
    let mut want = vec![0u64; keys.len()];
    for round in 0..20u64 {
        let hits: Vec<Hit> = keys
            .iter()
            .map(|key| Hit {
                key: key.clone(),
                count: 1 + round % 4,
                timestamp_ms: 0,
            })
            .collect();
        ingest
            .record_hits(RecordHitsRequest {
                hits,
                batch_id: format!("kill-{round}"),
            })
            .await?;
        for count in &mut want {
            *count += 1 + round % 4;
        }
    }
    // Every one of those was acknowledged: on disk in ingest's log. Kill all three roles at once.
    hitcounter.kill9().await?;

    let again = start_all(dir.path()).await?;
    let query_addr = again.addr("query")?;
    let counts = || {
        let keys = keys.clone();
        async move {
            let mut query = QueryClient::new(connect(query_addr).await.ok()?);
            let many = query
                .get_hits_many(GetHitsManyRequest {
                    keys,
                    window_seconds: 300,
                    at_ms: 0,
                })
                .await
                .ok()?
                .into_inner();
            Some(many.results.iter().map(|c| c.count).collect::<Vec<u64>>())
        }
    };
    // Ingest resends its log after the restart: the counts converge to exactly what was acked.
    eventually(
        Duration::from_secs(30),
        "every acknowledged hit",
        || async { (counts().await? == want).then_some(()) },
    )
    .await?;
    // Resending the batches (a client retrying after the crash) counts nothing twice.
    let mut ingest = IngestClient::new(connect(again.addr("ingest")?).await?);
    let resent = ingest
        .record_hits(RecordHitsRequest {
            hits: vec![Hit {
                key: keys[0].clone(),
                count: 1,
                timestamp_ms: 0,
            }],
            batch_id: "kill-0".into(),
        })
        .await?
        .into_inner();
    assert!(
        resent.duplicate,
        "a batch id from before the kill was forgotten"
    );
    // Once a hit written after the restart is visible, everything logged before it has been
    // through too: still exact, nothing applied twice.
    ingest
        .record_hit(RecordHitRequest {
            key: "/kill/marker".into(),
            count: 1,
            timestamp_ms: 0,
        })
        .await?;
    eventually(Duration::from_secs(10), "the marker hit", || async move {
        let mut query = QueryClient::new(connect(query_addr).await.ok()?);
        (count(&mut query, "/kill/marker").await? == 1).then_some(())
    })
    .await?;
    assert_eq!(counts().await, Some(want));
    let (code, log) = again.terminate().await?;
    assert_eq!(code, Some(0), "log:\n{log}");
    Ok(())
}

#[tokio::test]
async fn a_second_process_on_the_same_data_exits_non_zero_naming_the_lock() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let first = start_all(dir.path()).await?;
    let mut args = vec!["all"];
    args.extend(EPHEMERAL);
    let second = Hitcounter::start(dir.path(), "second", &args)?;
    let (code, log) = second.exit_code().await?;
    assert_ne!(code, Some(0), "log:\n{log}");
    assert!(log.contains("LOCK"), "log:\n{log}");
    // The first one is unaffected.
    assert_eq!(
        health(first.addr("query")?).await?,
        ServingStatus::Serving as i32
    );
    let (code, log) = first.terminate().await?;
    assert_eq!(code, Some(0), "log:\n{log}");
    Ok(())
}
