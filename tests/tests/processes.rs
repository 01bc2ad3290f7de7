//! The three real binaries as child processes: `--help`, start-up from flags, SIGTERM drains and
//! exits 0. Needs the binaries built first (`cargo build --workspace --bins`, which the README's test
//! command does); they are looked up next to this test executable, or in `HITCOUNTER_BIN_DIR`.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use hitcounter_integration_tests::{
    connect,
    process::{binary, free_port, serving},
};
use hitcounter_proto::v1::{
    ingest_client::IngestClient, query_client::QueryClient, GetHitsRequest, RecordHitRequest,
};

/// Kills the child on drop, so a failed test leaves no process behind.
struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Service {
    fn start(name: &str, args: &[&str], data_dir: &std::path::Path) -> anyhow::Result<Self> {
        let child = Command::new(binary(name)?)
            .args(args)
            .current_dir(data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        Ok(Self(child))
    }

    /// Sends SIGTERM and returns the exit code.
    fn terminate(&mut self) -> anyhow::Result<Option<i32>> {
        let status = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill failed");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.0.try_wait()? {
                return Ok(status.code());
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "no exit 30 s after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

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
    let data = std::env::temp_dir().join(format!("hitcounter-processes-{}", std::process::id()));
    std::fs::create_dir_all(&data)?;
    let (aggregator_addr, ingest_addr, query_addr) = (free_port()?, free_port()?, free_port()?);
    let (a, i, q) = (
        aggregator_addr.to_string(),
        ingest_addr.to_string(),
        query_addr.to_string(),
    );
    let upstream = format!("http://{a}");
    let mut aggregator = Service::start(
        "hitcounter-aggregator",
        &["--listen", &a, "--metrics-listen", "off"],
        &data,
    )?;
    let mut ingest = Service::start(
        "hitcounter-ingest",
        &[
            "--listen",
            &i,
            "--metrics-listen",
            "off",
            "--aggregator",
            &upstream,
        ],
        &data,
    )?;
    let mut query = Service::start(
        "hitcounter-query",
        &[
            "--listen",
            &q,
            "--metrics-listen",
            "off",
            "--aggregator",
            &upstream,
        ],
        &data,
    )?;
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
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}
