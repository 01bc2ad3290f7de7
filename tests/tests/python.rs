//! A second-language client: the Python example (stubs generated from `proto/` by grpcio-tools)
//! against the real services.
//!
//! A python3 without `grpcio`/`grpcio-tools` fails the test with the command that installs
//! them; set `HITCOUNTER_SKIP_PYTHON=1` to skip it knowingly (it then prints SKIPPED).

use std::process::Command;

use hitcounter_integration_tests::{tools, Stack};

#[tokio::test(flavor = "multi_thread")]
async fn python_example_records_and_reads_back() -> anyhow::Result<()> {
    if !tools::python_with_grpc()? {
        return Ok(());
    }
    let stack = Stack::start().await?;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/python/hitcounter_example.py"
    );
    // Generate into a fresh directory so the test exercises generation from proto/.
    let generated = std::env::temp_dir().join(format!("hitcounter-py-{}", std::process::id()));
    let (ingest, query) = (stack.ingest.addr.to_string(), stack.query.addr.to_string());
    let generator = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/python/generate.py"
    );
    let output = tokio::task::spawn_blocking({
        let generated = generated.clone();
        move || -> anyhow::Result<std::process::Output> {
            let generate = Command::new("python3")
                .arg(generator)
                .arg(&generated)
                .output()?;
            anyhow::ensure!(
                generate.status.success(),
                "generate.py failed: {}",
                String::from_utf8_lossy(&generate.stderr)
            );
            anyhow::ensure!(generated
                .join("hitcounter/v1/hitcounter_pb2_grpc.py")
                .is_file());
            Ok(Command::new("python3")
                .arg(script)
                .args(["--ingest", &ingest, "--query", &query])
                .output()?)
        }
    })
    .await??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "example failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(stdout.trim())?;
    assert_eq!(summary["accepted"], 58);
    assert_eq!(summary["get_hits"]["count"], 55);
    assert!(summary["rejected"]
        .as_str()
        .is_some_and(|m| m.contains("key is empty")));
    let _ = std::fs::remove_dir_all(&generated);
    stack.stop().await.map_err(anyhow::Error::msg)
}
