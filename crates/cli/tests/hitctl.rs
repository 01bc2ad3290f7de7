//! The real `hitctl` binary against the real services, started in-process on ephemeral ports by
//! the integration-test harness: every subcommand, `--json`, exit codes and error messages.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use hitcounter_integration_tests::{eventually, now_ms, process::ClosedPort, Stack};
use hitcounter_proto::v1::GetHitsManyRequest;
use serde_json::Value;

const HITCTL: &str = env!("CARGO_BIN_EXE_hitctl");
const VISIBLE: Duration = Duration::from_secs(10);

/// What a finished `hitctl` printed.
#[derive(Debug)]
struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Output {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {self:?}"))
    }

    fn success(self) -> Self {
        assert_eq!(self.code, Some(0), "{self:?}");
        self
    }
}

fn command(args: &[&str]) -> Command {
    let mut command = Command::new(HITCTL);
    command
        .args(args)
        .env_remove("HITCOUNTER_INGEST_ADDR")
        .env_remove("HITCOUNTER_QUERY_ADDR")
        .stdin(Stdio::null());
    command
}

/// Runs `hitctl args` to completion.
async fn run(args: &[&str]) -> Output {
    run_command(command(args)).await
}

async fn run_command(mut command: Command) -> Output {
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

/// Runs `hitctl --ingest … --query … args` against `stack`.
async fn against(stack: &Stack, args: &[&str]) -> Output {
    let (ingest, query) = (stack.ingest.addr.to_string(), stack.query.addr.to_string());
    let mut all = vec!["--ingest", &ingest, "--query", &query];
    all.extend_from_slice(args);
    run(&all).await
}

/// An address nobody listens on, held (bound, not listening) until the value is dropped, so no
/// other process can start listening there while the test expects "cannot reach".
fn closed_port() -> ClosedPort {
    ClosedPort::bind().expect("bind a closed port")
}

/// Polls `hitctl … get KEY --json` until the count is `expected`.
async fn wait_for_count(stack: &Stack, key: &str, expected: u64) -> Value {
    eventually(VISIBLE, &format!("{key} to count {expected}"), || async {
        let out = against(stack, &["--json", "get", key]).await;
        let json = out.json();
        (json["count"] == expected).then_some(json)
    })
    .await
    .expect("visible")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hit_then_get_returns_the_exact_count() {
    let stack = Stack::start().await.expect("stack");

    let out = against(&stack, &["hit", "/home", "--count", "3"])
        .await
        .success();
    assert_eq!(out.stdout.trim(), "accepted 3 hits of /home");
    let out = against(&stack, &["--json", "hit", "/home"]).await.success();
    let json = out.json();
    assert_eq!(json["key"], "/home");
    assert_eq!(json["accepted"], 1);
    assert!(json["timestamp_ms"].is_null(), "{json}");

    let json = wait_for_count(&stack, "/home", 4).await;
    assert_eq!(json["key"], "/home");
    assert_eq!(json["window_seconds"], 300);
    assert_eq!(json["window"], "5m");
    let at_ms = json["at_ms"].as_i64().expect("at_ms");
    assert!((now_ms() - at_ms).abs() < 60_000, "{json}");
    assert!(
        json["at"].as_str().is_some_and(|at| at.ends_with('Z')),
        "{json}"
    );

    let out = against(&stack, &["get", "/home"]).await.success();
    assert!(
        out.stdout.starts_with("/home: 4 hits in the 5m up to 20"),
        "{out:?}"
    );

    // An event time in the past, and a window ending at a given time.
    let at = now_ms() - 120_000;
    let at_arg = at.to_string();
    let out = against(
        &stack,
        &["--json", "hit", "/old", "-n", "2", "--at", &at_arg],
    )
    .await
    .success();
    assert_eq!(out.json()["timestamp_ms"], at);
    let until = (at + 1000).to_string();
    let json = eventually(VISIBLE, "/old at its time", || async {
        let json = against(
            &stack,
            &["--json", "get", "/old", "--window", "10s", "--at", &until],
        )
        .await
        .json();
        (json["count"] == 2).then_some(json)
    })
    .await
    .expect("visible");
    assert_eq!(json["window_seconds"], 10);
    // Two minutes ago is outside a 1-minute window ending now.
    let json = against(
        &stack,
        &["--json", "get", "/old", "-w", "1m", "--at", "now"],
    )
    .await
    .success()
    .json();
    assert_eq!(json["count"], 0);

    stack.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_from_the_environment_and_as_urls() {
    let stack = Stack::start().await.expect("stack");
    let mut hit = command(&["hit", "/env", "-n", "5"]);
    hit.env("HITCOUNTER_INGEST_ADDR", stack.ingest.addr.to_string());
    run_command(hit).await.success();
    let query = format!("http://{}", stack.query.addr);
    eventually(VISIBLE, "/env through http:// and env", || async {
        let mut get = command(&["--json", "get", "/env"]);
        get.env("HITCOUNTER_QUERY_ADDR", &query);
        let out = run_command(get).await;
        (out.json()["count"] == 5).then_some(())
    })
    .await
    .expect("visible");
    stack.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_prints_the_points_and_a_chart() {
    let stack = Stack::start().await.expect("stack");
    // Aligned to the step, so the points are [end - 60 s, end - 50 s, …, end - 10 s].
    let end = now_ms() / 10_000 * 10_000;
    for (ago_s, count) in [(35, "2"), (15, "5"), (14, "1")] {
        let at = (end - ago_s * 1000).to_string();
        against(&stack, &["hit", "/s", "-n", count, "--at", &at])
            .await
            .success();
    }
    let (from, to) = ((end - 60_000).to_string(), end.to_string());
    let args = [
        "series", "/s", "--from", &from, "--to", &to, "--step", "10s",
    ];
    let json = eventually(VISIBLE, "the series total", || async {
        let mut all = vec!["--json"];
        all.extend_from_slice(&args);
        let json = against(&stack, &all).await.json();
        (json["total"] == 8).then_some(json)
    })
    .await
    .expect("visible");
    assert_eq!(json["key"], "/s");
    assert_eq!(json["step_seconds"], 10);
    assert_eq!(json["max"], 6);
    let points = json["points"].as_array().expect("points");
    assert_eq!(points.len(), 6, "{json}");
    let counts: Vec<u64> = points.iter().filter_map(|p| p["count"].as_u64()).collect();
    assert_eq!(counts, [0, 0, 2, 0, 6, 0]);
    assert_eq!(points[0]["start_ms"], end - 60_000);

    let out = against(&stack, &args).await.success();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(lines[0].starts_with("/s: 6 points of 10s from "), "{out:?}");
    assert!(lines[0].ends_with("total 8, max 6"), "{out:?}");
    for (i, point) in points.iter().enumerate() {
        let start = point["start"].as_str().expect("start");
        assert_eq!(lines[1 + i], format!("{start}  {}", point["count"]));
    }
    let chart: Vec<&str> = lines[7..].to_vec();
    assert!(
        chart.contains(&"max 6 per column (1 column = 10s)"),
        "{chart:#?}"
    );
    // The tallest bar is full height; 2 of 6 is a third of 6 rows: two full rows.
    assert_eq!(
        chart.iter().filter(|l| l.contains('█')).count(),
        6,
        "{chart:#?}"
    );
    assert!(chart.contains(&"  █ █ "), "{chart:#?}");
    assert!(chart.contains(&"──────"), "{chart:#?}");
    assert!(chart.iter().all(|l| l.chars().count() <= 60), "{chart:#?}");

    // Without --step, a range gets a round step that fits the chart.
    let json = against(&stack, &["--json", "series", "/s", "--from", "now-1h"])
        .await
        .success()
        .json();
    assert_eq!(json["step_seconds"], 120);
    assert_eq!(json["total"], 8);
    stack.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_orders_by_count_then_key() {
    let stack = Stack::start().await.expect("stack");
    for (key, count) in [("/t/b", "5"), ("/t/a", "5"), ("/t/c", "8"), ("/u/x", "1")] {
        against(&stack, &["hit", key, "-n", count]).await.success();
    }
    let json = eventually(VISIBLE, "all four keys in top", || async {
        let json = against(&stack, &["--json", "top"]).await.json();
        (json["keys"].as_array().map(Vec::len) == Some(4)).then_some(json)
    })
    .await
    .expect("visible");
    let keys = |json: &Value| -> Vec<(String, u64)> {
        json["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .map(|k| {
                (
                    k["key"].as_str().expect("key").to_owned(),
                    k["count"].as_u64().expect("count"),
                )
            })
            .collect()
    };
    assert_eq!(
        keys(&json),
        [
            ("/t/c".to_owned(), 8),
            ("/t/a".to_owned(), 5),
            ("/t/b".to_owned(), 5),
            ("/u/x".to_owned(), 1)
        ]
    );
    assert_eq!(json["approximate"], false);
    assert_eq!(json["window_seconds"], 300);
    assert_eq!(json["keys"][0]["rank"], 1);

    let json = against(
        &stack,
        &["--json", "top", "--prefix", "/t/", "--limit", "2"],
    )
    .await
    .success()
    .json();
    assert_eq!(
        keys(&json),
        [("/t/c".to_owned(), 8), ("/t/a".to_owned(), 5)]
    );

    let out = against(&stack, &["top", "-w", "10m"]).await.success();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(
        lines[0].starts_with("top 4 keys in the 10m up to "),
        "{out:?}"
    );
    assert!(lines[0].ends_with("(exact)"), "{out:?}");
    assert_eq!(lines[1], "#  COUNT  KEY");
    assert_eq!(lines[2], "1      8  /t/c");
    assert_eq!(lines[3], "2      5  /t/a");
    assert_eq!(lines[4], "3      5  /t/b");
    assert_eq!(lines[5], "4      1  /u/x");

    let out = against(&stack, &["top", "--prefix", "/none/"])
        .await
        .success();
    assert!(
        out.stdout.starts_with("no keys starting with `/none/`"),
        "{out:?}"
    );
    stack.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_exit_codes() {
    let stack = Stack::start().await.expect("stack");
    // Default address: the query address (here from the environment).
    let mut health = command(&["health"]);
    health.env("HITCOUNTER_QUERY_ADDR", stack.query.addr.to_string());
    let out = run_command(health).await.success();
    assert_eq!(out.stdout.trim(), format!("{}: SERVING", stack.query.addr));
    assert!(out.stderr.is_empty(), "{out:?}");

    let aggregator = stack.aggregators[0].addr.to_string();
    against(&stack, &["health", "--addr", &aggregator])
        .await
        .success();
    let ingest = stack.ingest.addr.to_string();
    let json = against(
        &stack,
        &[
            "--json",
            "health",
            "--addr",
            &ingest,
            "--service",
            "hitcounter.v1.Ingest",
        ],
    )
    .await
    .success()
    .json();
    assert_eq!(json["status"], "SERVING");
    assert_eq!(json["service"], "hitcounter.v1.Ingest");
    assert_eq!(json["address"], ingest);

    let out = against(&stack, &["health", "--service", "no.such.Service"]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("NOT_FOUND"), "{out:?}");

    let closed_port = closed_port();
    let closed = closed_port.addr.to_string();
    let started = Instant::now();
    let out = run(&["health", "--addr", &closed]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert!(
        out.stderr
            .contains(&format!("cannot reach the service at {closed}")),
        "{out:?}"
    );
    stack.stop().await.expect("stop");
}

#[tokio::test]
async fn usage_errors_exit_2_and_say_what_is_accepted() {
    let out = run(&["get", "k", "--window", "5x"]).await;
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("invalid duration `5x`"), "{out:?}");
    assert!(
        out.stderr.contains("`5m`") && out.stderr.contains("`500ms`"),
        "{out:?}"
    );

    let out = run(&["series", "k", "--from", "yesterday"]).await;
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("invalid time `yesterday`"), "{out:?}");
    assert!(
        out.stderr.contains("RFC 3339") && out.stderr.contains("now-10m"),
        "{out:?}"
    );

    let out = run(&["series", "k", "--from", "now", "--to", "now-1m"]).await;
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("--to"), "{out:?}");

    let out = run(&["get", "k", "--query", "grpc://q:50053"]).await;
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("HOST:PORT"), "{out:?}");

    let out = run(&["get", "k", "--query", "https://q:50053"]).await;
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("--ca-cert"), "{out:?}");

    let out = run(&["--help"]).await.success();
    for subcommand in ["hit", "get", "series", "top", "watch", "health", "load"] {
        assert!(out.stdout.contains(subcommand), "{out:?}");
    }
    let out = run(&["load", "--help"]).await.success();
    assert!(out.stdout.contains("coordinated omission"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_exit_1_with_code_and_message() {
    let stack = Stack::start().await.expect("stack");
    let out = against(&stack, &["hit", ""]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.starts_with("error: INVALID_ARGUMENT: "),
        "{out:?}"
    );
    assert!(out.stderr.contains("key"), "{out:?}");

    let out = against(&stack, &["--json", "hit", ""]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    let json = out.json();
    assert_eq!(json["error"]["code"], "INVALID_ARGUMENT");
    assert!(json["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("key")));

    // A window over the retention.
    let out = against(&stack, &["get", "k", "--window", "2h"]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("INVALID_ARGUMENT"), "{out:?}");
    stack.stop().await.expect("stop");

    let closed_port = closed_port();
    let closed = closed_port.addr.to_string();
    let out = run(&["get", "k", "--query", &closed]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "cannot reach query at {closed}: is the stack running? try `docker compose up`"
        )),
        "{out:?}"
    );
    let out = run(&["hit", "k", "--ingest", &closed, "--json"]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("cannot reach ingest at"), "{out:?}");
    assert_eq!(out.json()["error"]["code"], "UNREACHABLE");
}

/// Starts `hitctl args` with piped stdout, reads `lines` lines, then sends SIGINT and returns
/// the lines and the exit code.
fn watch_then_interrupt(args: Vec<String>, lines: usize) -> (Vec<String>, Option<i32>) {
    let mut child = command(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let mut reader = BufReader::new(stdout);
    let mut read = Vec::new();
    while read.len() < lines {
        let mut line = String::new();
        if reader.read_line(&mut line).expect("read") == 0 {
            break;
        }
        read.push(line);
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("watch did not end 10 s after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (read, code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_updates_until_interrupted() {
    let stack = Stack::start().await.expect("stack");
    against(&stack, &["hit", "/w", "-n", "7"]).await.success();
    wait_for_count(&stack, "/w", 7).await;
    let base = vec![
        "--query".to_owned(),
        stack.query.addr.to_string(),
        "watch".to_owned(),
        "/w".to_owned(),
        "--interval".to_owned(),
        "100ms".to_owned(),
    ];

    let mut json_args = vec!["--json".to_owned()];
    json_args.extend(base.clone());
    let (lines, code) = tokio::task::spawn_blocking(move || watch_then_interrupt(json_args, 3))
        .await
        .expect("join");
    assert_eq!(lines.len(), 3, "{lines:?}");
    for line in &lines {
        let json: Value = serde_json::from_str(line).expect("one JSON object per line");
        assert_eq!(json["key"], "/w");
        assert_eq!(json["count"], 7);
        assert_eq!(json["window_seconds"], 300);
    }
    assert_eq!(code, Some(0), "Ctrl-C ends watch cleanly");

    // Not a terminal: one plain line per update, no carriage returns.
    let (lines, code) = tokio::task::spawn_blocking(move || watch_then_interrupt(base, 2))
        .await
        .expect("join");
    assert_eq!(lines.len(), 2, "{lines:?}");
    for line in &lines {
        assert!(line.starts_with("/w: 7 hits in the 5m up to "), "{line:?}");
        assert!(!line.contains('\r'), "{line:?}");
    }
    assert_eq!(code, Some(0));
    stack.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_ends_cleanly_when_the_server_stops() {
    let stack = Stack::start().await.expect("stack");
    let query = stack.query.addr.to_string();
    let mut child = command(&["--json", "--query", &query, "watch", "/w", "-i", "100ms"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let first = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    })
    .await
    .expect("join")
    .expect("read");
    assert!(first.contains("\"/w\""), "{first}");
    stack.stop().await.expect("stop");
    let status = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .expect("join")
    .expect("watch ends when the server stops");
    assert_eq!(status.code(), Some(0));
}

/// The sum of the 1-hour counts of `prefix0..prefix{keys-1}`.
async fn total(stack: &Stack, prefix: &str, keys: u64) -> u64 {
    let mut query = stack.query_client().await.expect("query client");
    let response = query
        .get_hits_many(GetHitsManyRequest {
            keys: (0..keys).map(|i| format!("{prefix}{i}")).collect(),
            window_seconds: 3600,
            at_ms: 0,
        })
        .await
        .expect("get_hits_many")
        .into_inner();
    response.results.iter().map(|r| r.count).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_reports_accepted_hits_that_are_all_visible() {
    let stack = Stack::start().await.expect("stack");
    let out = against(
        &stack,
        &[
            "--json",
            "load",
            "--duration",
            "1s",
            "--keys",
            "50",
            "--key-prefix",
            "max/",
            "--streams",
            "2",
            "--batch",
            "200",
            "--distribution",
            "zipf",
        ],
    )
    .await
    .success();
    let json = out.json();
    let accepted = json["hits_accepted"].as_u64().expect("hits_accepted");
    assert!(accepted > 0, "{json}");
    assert_eq!(json["hits_sent"], accepted, "{json}");
    assert!(json["error"].is_null(), "{json}");
    assert_eq!(json["batches_acked"], json["batches_sent"]);
    assert!(json["accepted_per_second"]
        .as_f64()
        .is_some_and(|r| r > 0.0));
    for q in ["p50", "p90", "p99", "p99_9", "max"] {
        assert!(
            json["latency_ms"][q].as_f64().is_some_and(|v| v > 0.0),
            "{q}: {json}"
        );
    }
    assert_eq!(json["config"]["distribution"], "zipf");
    eventually(VISIBLE, "every accepted load hit", || async {
        (total(&stack, "max/", 50).await == accepted).then_some(())
    })
    .await
    .expect("visible");

    // Paced: 2000 hits/s over 2 streams is 50-hit batches every 50 ms per stream.
    let out = against(
        &stack,
        &[
            "--json",
            "load",
            "--rate",
            "2000",
            "--duration",
            "1s",
            "--keys",
            "10",
            "--key-prefix",
            "paced/",
            "--streams",
            "2",
        ],
    )
    .await
    .success();
    let json = out.json();
    let accepted = json["hits_accepted"].as_u64().expect("hits_accepted");
    assert!((1900..=2100).contains(&accepted), "{json}");
    assert_eq!(json["config"]["effective_batch"], 50);
    assert_eq!(json["config"]["rate"], 2000);
    eventually(VISIBLE, "every accepted paced hit", || async {
        (total(&stack, "paced/", 10).await == accepted).then_some(())
    })
    .await
    .expect("visible");

    // Human report, not on a terminal: no progress bar.
    let out = against(
        &stack,
        &[
            "load",
            "--rate",
            "500",
            "--duration",
            "300ms",
            "--keys",
            "5",
        ],
    )
    .await
    .success();
    assert!(out.stdout.contains("hits accepted"), "{out:?}");
    assert!(out.stdout.contains("p99.9"), "{out:?}");
    assert!(
        !out.stdout.contains('\r') && !out.stderr.contains('\r'),
        "{out:?}"
    );
    stack.stop().await.expect("stop");
}
