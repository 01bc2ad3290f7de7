//! The README's shell blocks are all accounted for: each carries a `readme-test` marker (run as
//! part of the tour, run by CI from a named file, or skipped with a reason), and every command of
//! a block marked as run by CI appears verbatim in that file. The tour itself needs the default
//! ports and a release build, so `.ci/run` runs it (`bash tests/readme/run.sh`); this check is
//! fast and runs with every test run.

use std::process::Command;

#[test]
fn every_readme_shell_block_is_marked_and_the_ci_blocks_are_in_ci() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow::anyhow!("tests/ has no parent"))?;
    let output = Command::new("bash")
        .args(["tests/readme/run.sh", "--check"])
        .current_dir(root)
        .output()?;
    assert!(
        output.status.success(),
        "tests/readme/run.sh --check failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}
