//! Clustered mode over a NATS cluster that takes only mutual TLS (`tests/src/nats.rs`,
//! `start_tls`: a real 3-node `nats-server` with `tls { verify: true }` and certificates made
//! with rcgen), with the real binaries:
//!
//! - `a_cluster_over_mutual_tls_counts_exactly`: ingest, an aggregator and query, each with
//!   `--nats-ca-cert`, `--nats-tls-cert` and `--nats-tls-key`, count every hit exactly.
//! - `a_service_without_the_right_tls_flags_fails_to_start_naming_the_flag`: without the client
//!   certificate the service exits at start-up naming `--nats-tls-cert` (not after the minute it
//!   waits for servers still starting); without the CA it names `--nats-ca-cert`; a client
//!   certificate of another CA is refused; an unreadable file is named with its flag.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use anyhow::Context;
use hitcounter_integration_tests::{
    connect,
    nats::{NatsCluster, NatsTls},
    now_ms,
    process::{serving, Service},
};
use hitcounter_proto::v1::{
    ingest_client::IngestClient, query_client::QueryClient, GetHitsManyRequest, Hit,
    RecordHitsRequest,
};

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
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

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_over_mutual_tls_counts_exactly() -> anyhow::Result<()> {
    let nats = NatsCluster::start_tls(3).await?;
    let tls = nats
        .tls()
        .context("a TLS cluster has certificates")?
        .flags();
    let urls = nats.urls();
    let data = tempfile::tempdir()?;
    let clustered = |extra: &[&str]| {
        let mut args = strings(&["--nats", &urls, "--partitions", "8"]);
        args.extend(tls.iter().cloned());
        args.extend(strings(extra));
        args
    };
    let mut aggregator = Service::new(
        "hitcounter-aggregator",
        &data.path().join("aggregator"),
        &clustered(&["--data-dir", ".", "--node-index", "0", "--nodes", "1"]),
    );
    let aggregator_addr = aggregator.start().await?;
    let mut ingest = Service::new(
        "hitcounter-ingest",
        &data.path().join("ingest"),
        &clustered(&[]),
    );
    let ingest_addr = ingest.start().await?;
    let mut query = Service::new(
        "hitcounter-query",
        &data.path().join("query"),
        &clustered(&[
            "--aggregator",
            &format!("http://{aggregator_addr}"),
            "--replicas",
            "1",
        ]),
    );
    let query_addr = query.start().await?;
    for addr in [aggregator_addr, ingest_addr, query_addr] {
        serving(addr, Duration::from_secs(30)).await?;
    }
    let logs = || {
        format!(
            "--- aggregator\n{}\n--- ingest\n{}\n--- query\n{}",
            aggregator.log_tail(15),
            ingest.log_tail(15),
            query.log_tail(15)
        )
    };

    let keys: Vec<String> = (0..12).map(|i| format!("/tls/{i}")).collect();
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    let mut client = IngestClient::new(connect(ingest_addr).await?);
    for n in 0..30u64 {
        let hits: Vec<Hit> = (0..5u64)
            .map(|i| Hit {
                key: keys[((n * 5 + i) % keys.len() as u64) as usize].clone(),
                timestamp_ms: now_ms(),
                count: 1 + (n + i) % 4,
            })
            .collect();
        for hit in &hits {
            *expected.entry(hit.key.clone()).or_default() += hit.count;
        }
        let answer = client
            .record_hits(RecordHitsRequest {
                hits,
                batch_id: format!("tls-{n}"),
            })
            .await
            .with_context(logs)?
            .into_inner();
        assert!(!answer.duplicate);
    }
    let want: Vec<u64> = keys
        .iter()
        .map(|k| expected.get(k).copied().unwrap_or(0))
        .collect();
    // A hang guard, not a timing goal: the aggregator may still be reading the log's tail.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let last = match counts(query_addr, &keys).await {
            Ok(got) if got == want => break,
            Ok(got) => format!("counts {got:?}, want {want:?}"),
            Err(error) => format!("read failed: {error:#}"),
        };
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "after 30 s: {last}\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Still exact a moment later: nothing applied twice.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(counts(query_addr, &keys).await?, want);
    Ok(())
}

/// Starts `hitcounter-ingest` against `nats` with `flags`; it must exit before serving, with an
/// error naming `want`. Returns the error.
async fn refused_start(nats: &NatsCluster, flags: &[String], want: &str) -> anyhow::Result<String> {
    let data = tempfile::tempdir()?;
    let mut args = strings(&["--nats", &nats.urls(), "--partitions", "8"]);
    args.extend(flags.iter().cloned());
    let mut ingest = Service::new("hitcounter-ingest", data.path(), &args);
    let error = match ingest.start().await {
        Ok(addr) => anyhow::bail!("ingest started ({addr}) with {flags:?}"),
        Err(error) => format!("{error:#}"),
    };
    assert!(
        error.contains("exited with") && error.contains(want),
        "with {flags:?}: want an exit naming {want}, got:\n{error}"
    );
    assert_ne!(ingest.last_exit_code(), Some(0));
    Ok(error)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_without_the_right_tls_flags_fails_to_start_naming_the_flag() -> anyhow::Result<()>
{
    let nats = NatsCluster::start_tls(3).await?;
    let tls = nats.tls().context("a TLS cluster has certificates")?;
    let ca = tls.ca.display().to_string();

    // The CA but no client certificate: the servers end the handshake.
    let error = refused_start(&nats, &strings(&["--nats-ca-cert", &ca]), "--nats-tls-cert").await?;
    assert!(error.contains("require a client certificate"), "{error}");

    // No TLS flag at all: the servers' certificate is not trusted.
    refused_start(&nats, &[], "--nats-ca-cert").await?;

    // A client certificate of another CA: refused by the servers.
    let other_dir = tempfile::tempdir()?;
    let other_tls = NatsTls::make(other_dir.path(), &[])?;
    let mut flags = strings(&["--nats-ca-cert", &ca]);
    flags.extend(strings(&[
        "--nats-tls-cert",
        &other_tls.client_cert.display().to_string(),
        "--nats-tls-key",
        &other_tls.client_key.display().to_string(),
    ]));
    let error = refused_start(&nats, &flags, "--nats-tls-cert").await?;
    assert!(
        error.contains("refused this service's client certificate"),
        "{error}"
    );

    // The servers' certificate checked against a CA that did not sign it.
    let error = refused_start(&nats, &other_tls.flags(), "--nats-ca-cert").await?;
    assert!(error.contains("not accepted"), "{error}");

    // A file that is not there, named with its flag.
    let mut flags = tls.flags();
    flags[3] = "/nonexistent/client.pem".into();
    refused_start(&nats, &flags, "--nats-tls-cert /nonexistent/client.pem").await?;
    Ok(())
}
