//! The three real binaries as child processes: `--help`, start-up from flags, SIGTERM drains and
//! exits 0. Needs the binaries built first (`cargo build --workspace --bins`, which the README's test
//! command does); they are looked up next to this test executable, or in `HITCOUNTER_BIN_DIR`.

use std::{process::Command, time::Duration};

use hitcounter_integration_tests::{
    connect,
    process::{binary, serving, Service},
};
use hitcounter_proto::v1::{
    ingest_client::IngestClient, query_client::QueryClient, GetHitsRequest, RecordHitRequest,
};

#[test]
fn help_explains_every_knob() -> anyhow::Result<()> {
    for name in [
        "hitcounter-ingest",
        "hitcounter-aggregator",
        "hitcounter-query",
    ] {
        let output = Command::new(binary(name)?).arg("--help").output()?;
        assert!(output.status.success());
        let help = String::from_utf8(output.stdout)?;
        for expected in [
            "--listen",
            "HITCOUNTER_LISTEN",
            "--metrics-listen",
            "--retention-seconds",
            "--log-format",
        ] {
            assert!(
                help.contains(expected),
                "{name} --help lacks {expected}:\n{help}"
            );
        }
        let bad = Command::new(binary(name)?)
            .arg("--retention-seconds=soon")
            .output()?;
        assert_eq!(
            bad.status.code(),
            Some(2),
            "clap rejects bad values with usage exit code"
        );
        assert!(String::from_utf8_lossy(&bad.stderr).contains("retention-seconds"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn binaries_serve_and_drain_on_sigterm() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    // Every process binds 127.0.0.1:0 and the harness reads the address from its start-up log
    // line: the aggregator first, since the others need its address.
    let args = |extra: &[&str]| extra.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut aggregator = Service::new(
        "hitcounter-aggregator",
        data.path(),
        &args(&["--data-dir", "aggregator"]),
    );
    let aggregator_addr = aggregator.start().await?;
    let upstream = format!("http://{aggregator_addr}");
    let mut ingest = Service::new(
        "hitcounter-ingest",
        data.path(),
        &args(&["--data-dir", "ingest", "--aggregator", &upstream]),
    );
    let ingest_addr = ingest.start().await?;
    let mut query = Service::new(
        "hitcounter-query",
        data.path(),
        &args(&["--aggregator", &upstream]),
    );
    let query_addr = query.start().await?;
    for addr in [aggregator_addr, ingest_addr, query_addr] {
        serving(addr, Duration::from_secs(20)).await?;
    }

    let mut ingest_client = IngestClient::new(connect(ingest_addr).await?);
    let mut accepted = 0;
    for _ in 0..50 {
        accepted += ingest_client
            .record_hit(RecordHitRequest {
                key: "/proc".into(),
                timestamp_ms: 0,
                count: 2,
            })
            .await?
            .into_inner()
            .accepted;
    }
    // SIGTERM right after the acks: ingest drains its pipeline, then exits 0.
    assert_eq!(ingest.terminate()?, Some(0), "ingest exit code");
    let mut query_client = QueryClient::new(connect(query_addr).await?);
    let count = query_client
        .get_hits(GetHitsRequest {
            key: "/proc".into(),
            window_seconds: 60,
            at_ms: 0,
        })
        .await?
        .into_inner()
        .count;
    assert_eq!(
        count, accepted,
        "every acknowledged hit was delivered before ingest exited"
    );
    assert_eq!(query.terminate()?, Some(0), "query exit code");
    assert_eq!(aggregator.terminate()?, Some(0), "aggregator exit code");
    Ok(())
}
