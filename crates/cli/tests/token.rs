//! `hitctl` against services started with `--tokens-file`: `hitctl token new` makes a token and its
//! entry, the services accept it from `--token` or `HITCOUNTER_TOKEN`, and refuse calls without
//! it with a message naming what is missing.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use hitcounter_integration_tests::{eventually, Stack, StackOptions};
use serde_json::Value;

const HITCTL: &str = env!("CARGO_BIN_EXE_hitctl");

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn run(args: &[&str], token_env: Option<&str>) -> Output {
    let mut command = Command::new(HITCTL);
    command
        .args(args)
        .env_remove("HITCOUNTER_TOKEN")
        .env_remove("HITCOUNTER_INGEST_ADDR")
        .env_remove("HITCOUNTER_QUERY_ADDR")
        .stdin(Stdio::null());
    if let Some(token) = token_env {
        command.env("HITCOUNTER_TOKEN", token);
    }
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .expect("hitctl runs");
    Output {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hitctl_makes_a_token_and_calls_with_it() -> anyhow::Result<()> {
    let made = run(
        &[
            "--json", "token", "new", "--name", "ci", "--role", "write", "--role", "read",
            "--prefix", "ci/",
        ],
        None,
    )
    .await;
    assert_eq!(made.code, Some(0), "{}", made.stderr);
    let made: Value = serde_json::from_str(&made.stdout)?;
    let token = made["token"].as_str().expect("a token").to_owned();
    let entry = made["entry"].as_str().expect("an entry");
    assert!(
        !entry.contains(&token),
        "the entry must not hold the token: {entry}"
    );

    let dir = tempfile::tempdir()?;
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(&tokens, entry)?;
    // The harness takes 'static arguments; this test's process ends soon after.
    let tokens: &'static str = Box::leak(tokens.display().to_string().into_boxed_str());
    let stack = Stack::start_with(StackOptions {
        ingest: vec!["--tokens-file", tokens],
        query: vec!["--tokens-file", tokens],
        ..StackOptions::default()
    })
    .await?;
    let (ingest, query) = (stack.ingest.addr.to_string(), stack.query.addr.to_string());
    let at = |args: &[&'static str]| {
        let mut all = vec![
            "--ingest".to_owned(),
            ingest.clone(),
            "--query".to_owned(),
            query.clone(),
        ];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        all
    };

    let refused = run(&refs(&at(&["hit", "ci/a"])), None).await;
    assert_eq!(refused.code, Some(1));
    assert!(
        refused.stderr.contains("UNAUTHENTICATED") && refused.stderr.contains("Bearer"),
        "{}",
        refused.stderr
    );
    let mut with_flag = at(&["hit", "ci/a", "--count", "2"]);
    with_flag.extend(["--token".to_owned(), token.clone()]);
    let hit = run(&refs(&with_flag), None).await;
    assert_eq!(hit.code, Some(0), "{}", hit.stderr);
    let outside = run(&refs(&at(&["hit", "other/a"])), Some(&token)).await;
    assert_eq!(outside.code, Some(1));
    assert!(
        outside.stderr.contains("PERMISSION_DENIED"),
        "{}",
        outside.stderr
    );

    let get = at(&["--json", "get", "ci/a"]);
    eventually(Duration::from_secs(10), "ci/a to count 2", || async {
        let out = run(&refs(&get), Some(&token)).await;
        let json: Value = serde_json::from_str(&out.stdout).ok()?;
        (json["count"] == 2).then_some(())
    })
    .await?;

    let load = run(
        &refs(&at(&[
            "--json",
            "load",
            "--duration",
            "1s",
            "--rate",
            "2000",
            "--keys",
            "10",
            "--key-prefix",
            "ci/load/",
            "--streams",
            "1",
        ])),
        Some(&token),
    )
    .await;
    assert_eq!(load.code, Some(0), "{}", load.stderr);
    let report: Value = serde_json::from_str(&load.stdout)?;
    assert!(report["hits_accepted"].as_u64() > Some(0), "{report}");
    assert!(report["error"].is_null(), "{report}");
    stack.stop().await.map_err(anyhow::Error::msg)
}

fn refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}
