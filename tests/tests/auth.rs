//! Authentication, authorisation and quotas of the public services, over real gRPC: ingest and
//! query started in-process with a tokens file and a quota clock the test moves by hand, so the
//! quota checks are exact and take no time.

use std::{path::PathBuf, time::Duration};

use hitcounter_auth::{token, QuotaClock};
use hitcounter_client::{AuthChannel, Bearer};
use hitcounter_integration_tests::{
    connect, eventually, init_logging, metric_value, scrape, start_aggregator, tools, Running,
};
use hitcounter_proto::v1::{
    ingest_client::IngestClient, query_client::QueryClient, GetHitsManyRequest, GetHitsRequest,
    Hit, RecordHitRequest, RecordHitsRequest, TopKeysRequest, WatchHitsRequest,
};
use hitcounter_telemetry::{CancellationToken, Listeners};
use tonic::Code;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

const WRITER: &str = "tok-writer-3f9a";
const READER: &str = "tok-reader-77c1";
const ADMIN: &str = "tok-admin-0d2e";
const METERED: &str = "tok-metered-a4b8";
const VISIBLE: Duration = Duration::from_secs(10);

/// The tokens of these tests: a writer and a reader limited to prefixes, an admin, and a token
/// with quotas.
fn tokens_toml(extra: &str) -> String {
    let entry = |name: &str, token: &str, body: &str| {
        format!(
            "[[token]]\nname = \"{name}\"\nsha256 = \"{}\"\n{body}\n\n",
            token::to_hex(&token::hash(token))
        )
    };
    [
        entry(
            "writer",
            WRITER,
            "roles = [\"write\"]\nprefixes = [\"shop/\"]",
        ),
        entry(
            "reader",
            READER,
            "roles = [\"read\"]\nprefixes = [\"shop/\", \"blog/\"]\nmax_watches = 1",
        ),
        entry("admin", ADMIN, "roles = [\"admin\"]"),
        entry(
            "metered",
            METERED,
            "roles = [\"write\", \"read\"]\nhits_per_second = 10\nhits_burst = 20\n\
             requests_per_second = 2\nrequests_burst = 3",
        ),
        extra.to_owned(),
    ]
    .concat()
}

/// An aggregator, and ingest and query with `--tokens-file` on a manual quota clock.
struct Secured {
    aggregator: Running,
    ingest: Running,
    query: Running,
    clock: QuotaClock,
    tokens: PathBuf,
    _dir: tempfile::TempDir,
}

async fn spawn<F, Fut, E>(serve: F) -> anyhow::Result<Running>
where
    F: FnOnce(Listeners, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    let listeners = Listeners::bind("127.0.0.1:0".parse()?, Some("127.0.0.1:0".parse()?)).await?;
    let addr = listeners.grpc.local_addr()?;
    let metrics_addr = listeners
        .metrics
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no metrics listener"))?
        .local_addr()?;
    let shutdown = CancellationToken::new();
    let served = serve(listeners, shutdown.clone());
    let task = tokio::spawn(async move { served.await.map_err(|e| e.to_string()) });
    Ok(Running {
        addr,
        metrics_addr,
        shutdown,
        task,
        data_dir: None,
    })
}

impl Secured {
    async fn start(ingest_args: &[&str], query_args: &[&str]) -> anyhow::Result<Self> {
        init_logging();
        let dir = tempfile::tempdir()?;
        let tokens = dir.path().join("tokens.toml");
        std::fs::write(&tokens, tokens_toml(""))?;
        let clock = QuotaClock::manual();
        let aggregator = start_aggregator(&[]).await?;
        let upstream = format!("http://{}", aggregator.addr);
        let tokens_arg = tokens.display().to_string();
        let data = dir.path().join("ingest").display().to_string();

        let mut line = vec![
            "hitcounter-ingest",
            "--aggregator",
            &upstream,
            "--data-dir",
            &data,
            "--tokens-file",
            &tokens_arg,
            "--tokens-poll-ms",
            "20",
        ];
        line.extend_from_slice(ingest_args);
        let mut config = <hitcounter_ingest::Config as clap::Parser>::try_parse_from(line)?;
        config.auth.quota_clock = clock.clone();
        let ingest = spawn(move |l, s| hitcounter_ingest::serve(config, l, s)).await?;

        let mut line = vec![
            "hitcounter-query",
            "--aggregator",
            &upstream,
            "--tokens-file",
            &tokens_arg,
            "--tokens-poll-ms",
            "20",
        ];
        line.extend_from_slice(query_args);
        let mut config = <hitcounter_query::Config as clap::Parser>::try_parse_from(line)?;
        config.auth.quota_clock = clock.clone();
        let query = spawn(move |l, s| hitcounter_query::serve(config, l, s)).await?;
        Ok(Self {
            aggregator,
            ingest,
            query,
            clock,
            tokens,
            _dir: dir,
        })
    }

    async fn ingest(&self, token: Option<&str>) -> anyhow::Result<IngestClient<AuthChannel>> {
        Ok(IngestClient::with_interceptor(
            connect(self.ingest.addr).await?,
            Bearer::new(token)?,
        ))
    }

    async fn query(&self, token: Option<&str>) -> anyhow::Result<QueryClient<AuthChannel>> {
        Ok(QueryClient::with_interceptor(
            connect(self.query.addr).await?,
            Bearer::new(token)?,
        ))
    }

    /// Window counts of `keys` read with the admin token.
    async fn counts(&self, keys: &[&str]) -> anyhow::Result<Vec<u64>> {
        let many = self
            .query(Some(ADMIN))
            .await?
            .get_hits_many(GetHitsManyRequest {
                keys: keys.iter().map(|k| (*k).to_owned()).collect(),
                window_seconds: 60,
                at_ms: 0,
            })
            .await?
            .into_inner();
        Ok(many.results.iter().map(|r| r.count).collect())
    }

    /// Waits until `keys` read `expected`.
    async fn wait_for(&self, keys: &[&str], expected: &[u64]) -> anyhow::Result<()> {
        eventually(
            VISIBLE,
            &format!("{keys:?} to read {expected:?}"),
            || async { (self.counts(keys).await.ok()? == expected).then_some(()) },
        )
        .await
    }

    async fn stop(self) -> Result<(), String> {
        let ingest = self.ingest.stop().await;
        let query = self.query.stop().await;
        let aggregator = self.aggregator.stop().await;
        ingest.and(query).and(aggregator)
    }
}

fn hits(keys: &[&str]) -> Vec<Hit> {
    keys.iter()
        .map(|key| Hit {
            key: (*key).to_owned(),
            timestamp_ms: 0,
            count: 1,
        })
        .collect()
}

fn record(key: &str, count: u64) -> RecordHitRequest {
    RecordHitRequest {
        key: key.to_owned(),
        timestamp_ms: 0,
        count,
    }
}

fn get(key: &str) -> GetHitsRequest {
    GetHitsRequest {
        key: key.to_owned(),
        window_seconds: 60,
        at_ms: 0,
    }
}

fn retry_after_ms(status: &tonic::Status) -> Option<String> {
    status
        .metadata()
        .get(hitcounter_auth::RETRY_AFTER_MS)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_without_a_valid_token_are_unauthenticated() -> anyhow::Result<()> {
    let stack = Secured::start(&[], &[]).await?;
    let missing = stack
        .ingest(None)
        .await?
        .record_hit(record("shop/a", 1))
        .await
        .expect_err("no token");
    assert_eq!(missing.code(), Code::Unauthenticated, "{missing:?}");
    assert!(
        missing.message().contains("authorization: Bearer"),
        "{missing:?}"
    );
    let wrong = stack
        .ingest(Some("tok-not-in-the-file"))
        .await?
        .record_hit(record("shop/a", 1))
        .await
        .expect_err("wrong token");
    assert_eq!(wrong.code(), Code::Unauthenticated, "{wrong:?}");
    assert!(wrong.message().contains("unknown token"), "{wrong:?}");
    let read = stack
        .query(Some("tok-not-in-the-file"))
        .await?
        .get_hits(get("shop/a"))
        .await
        .expect_err("wrong token");
    assert_eq!(read.code(), Code::Unauthenticated, "{read:?}");

    // Rejections are counted by reason and token name; no token ever reaches the metrics.
    let ingest_metrics = scrape(stack.ingest.metrics_addr).await?;
    let rejected = "hitcounter_ingest_auth_rejected_requests_total";
    for token in ["(missing)", "(unknown)"] {
        let labels = ["reason=\"unauthenticated\"", &format!("token=\"{token}\"")];
        assert_eq!(
            metric_value(&ingest_metrics, rejected, &labels),
            Some(1.0),
            "{token}: {ingest_metrics}"
        );
    }
    let query_metrics = scrape(stack.query.metrics_addr).await?;
    for text in [&ingest_metrics, &query_metrics] {
        assert!(!text.contains("tok-"), "a token in the metrics: {text}");
    }
    stack.stop().await.map_err(anyhow::Error::msg)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_without_the_role_is_denied() -> anyhow::Result<()> {
    let stack = Secured::start(&[], &[]).await?;
    let denied = stack
        .ingest(Some(READER))
        .await?
        .record_hit(record("shop/a", 1))
        .await
        .expect_err("a reader cannot write");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("`write` role"), "{denied:?}");
    let denied = stack
        .query(Some(WRITER))
        .await?
        .get_hits(get("shop/a"))
        .await
        .expect_err("a writer cannot read");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("`read` role"), "{denied:?}");
    let metrics = scrape(stack.ingest.metrics_addr).await?;
    assert_eq!(
        metric_value(
            &metrics,
            "hitcounter_ingest_auth_rejected_hits_total",
            &["reason=\"permission_denied\"", "token=\"reader\""]
        ),
        Some(1.0),
        "{metrics}"
    );
    stack.stop().await.map_err(anyhow::Error::msg)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_outside_the_prefixes_in_a_batch_counts_nothing_of_it() -> anyhow::Result<()> {
    let stack = Secured::start(&[], &[]).await?;
    let mut writer = stack.ingest(Some(WRITER)).await?;
    let denied = writer
        .record_hits(RecordHitsRequest {
            hits: hits(&["shop/a", "shop/b", "blog/x", "shop/c"]),
            batch_id: "mixed-1".into(),
        })
        .await
        .expect_err("blog/x is outside shop/");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().starts_with("hits[2]:"), "{denied:?}");
    assert!(denied.message().contains("\"shop/\""), "{denied:?}");

    // A stream ends at the request with the key outside, after answering the ones before it.
    let requests = [
        RecordHitsRequest {
            hits: hits(&["shop/s"]),
            batch_id: String::new(),
        },
        RecordHitsRequest {
            hits: hits(&["shop/s", "other/s"]),
            batch_id: String::new(),
        },
    ];
    let mut responses = writer
        .stream_hits(tokio_stream::iter(requests))
        .await?
        .into_inner();
    assert_eq!(responses.message().await?.map(|r| r.accepted), Some(1));
    let ended = responses.message().await.expect_err("request #1 is denied");
    assert_eq!(ended.code(), Code::PermissionDenied, "{ended:?}");
    assert!(
        ended.message().contains("request #1") && ended.message().contains("hits[1]"),
        "{ended:?}"
    );

    // After a write that succeeds, nothing of the refused ones shows.
    writer
        .record_hits(RecordHitsRequest {
            hits: hits(&["shop/a"]),
            batch_id: "mixed-2".into(),
        })
        .await?;
    stack
        .wait_for(
            &["shop/a", "shop/b", "blog/x", "shop/c", "shop/s"],
            &[1, 0, 0, 0, 1],
        )
        .await?;
    let metrics = scrape(stack.ingest.metrics_addr).await?;
    assert_eq!(
        metric_value(
            &metrics,
            "hitcounter_ingest_auth_rejected_hits_total",
            &["reason=\"permission_denied\"", "token=\"writer\""]
        ),
        Some(6.0),
        "{metrics}"
    );
    stack.stop().await.map_err(anyhow::Error::msg)
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_top_keys_and_watches_stay_within_the_token_prefixes() -> anyhow::Result<()> {
    let stack = Secured::start(&[], &[]).await?;
    let mut admin = stack.ingest(Some(ADMIN)).await?;
    for (key, count) in [("shop/a", 5), ("blog/b", 3), ("other/c", 10), ("shop/d", 1)] {
        admin.record_hit(record(key, count)).await?;
    }
    stack
        .wait_for(&["shop/a", "blog/b", "other/c", "shop/d"], &[5, 3, 10, 1])
        .await?;
    let mut reader = stack.query(Some(READER)).await?;
    let top = |prefix: &str| TopKeysRequest {
        window_seconds: 60,
        limit: 10,
        prefix: prefix.to_owned(),
        at_ms: 0,
    };
    // No prefix: the top of the token's prefixes only (other/c has the most hits).
    let keys: Vec<(String, u64)> = reader
        .top_keys(top(""))
        .await?
        .into_inner()
        .keys
        .into_iter()
        .map(|k| (k.key, k.count))
        .collect();
    assert_eq!(
        keys,
        [
            ("shop/a".to_owned(), 5),
            ("blog/b".to_owned(), 3),
            ("shop/d".to_owned(), 1)
        ]
    );
    let within = reader.top_keys(top("shop/a")).await?.into_inner().keys;
    assert_eq!(within.len(), 1);
    for outside in ["other/", "sh"] {
        let denied = reader.top_keys(top(outside)).await.expect_err(outside);
        assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    }
    let denied = reader.get_hits(get("other/c")).await.expect_err("outside");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().starts_with("key:"), "{denied:?}");
    let denied = reader
        .get_hits_many(GetHitsManyRequest {
            keys: vec!["shop/a".into(), "other/c".into()],
            window_seconds: 60,
            at_ms: 0,
        })
        .await
        .expect_err("keys[1] is outside");
    assert!(denied.message().starts_with("keys[1]:"), "{denied:?}");

    // Watches: within the prefixes only, and at most max_watches (1) at once.
    let watch = |key: &str| WatchHitsRequest {
        key: key.to_owned(),
        window_seconds: 60,
        interval_ms: 100,
    };
    let denied = reader
        .watch_hits(watch("other/c"))
        .await
        .expect_err("outside");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let mut first = reader.watch_hits(watch("shop/a")).await?.into_inner();
    assert_eq!(first.message().await?.map(|u| u.count), Some(5));
    let full = reader
        .watch_hits(watch("shop/a"))
        .await
        .expect_err("one watch at most");
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    assert!(full.message().contains("WatchHits"), "{full:?}");
    drop(first);
    // The slot is freed once the server sees the watch gone (at its next update).
    eventually(VISIBLE, "the watch slot to be freed", || {
        let mut reader = reader.clone();
        async move { reader.watch_hits(watch("blog/b")).await.ok() }
    })
    .await?;
    stack.stop().await.map_err(anyhow::Error::msg)
}

#[tokio::test(flavor = "multi_thread")]
async fn quotas_are_exact_on_the_test_clock_and_refusals_count_nothing() -> anyhow::Result<()> {
    let stack = Secured::start(&[], &[]).await?;
    let mut ingest = stack.ingest(Some(METERED)).await?;
    // Hits: 10/s, burst 20. A batch of the whole burst fits.
    ingest
        .record_hits(RecordHitsRequest {
            hits: hits(&["m/a"; 20]),
            batch_id: "burst".into(),
        })
        .await?;
    let over = ingest
        .record_hit(record("m/a", 1))
        .await
        .expect_err("burst used up");
    assert_eq!(over.code(), Code::ResourceExhausted, "{over:?}");
    assert_eq!(retry_after_ms(&over).as_deref(), Some("100"), "{over:?}");
    // A hit's count is what counts: 3 hits need 300 ms.
    let over = ingest
        .record_hit(record("m/a", 3))
        .await
        .expect_err("3 hits");
    assert_eq!(retry_after_ms(&over).as_deref(), Some("300"), "{over:?}");
    stack.clock.advance(Duration::from_millis(99));
    let over = ingest
        .record_hit(record("m/a", 1))
        .await
        .expect_err("1 ms short");
    assert_eq!(retry_after_ms(&over).as_deref(), Some("1"), "{over:?}");
    stack.clock.advance(Duration::from_millis(1));
    ingest.record_hit(record("m/a", 1)).await?;
    // More than a whole burst never fits: no retry-after, a message to split it.
    stack.clock.advance(Duration::from_secs(10));
    let never = ingest
        .record_hits(RecordHitsRequest {
            hits: hits(&["m/a"; 21]),
            batch_id: String::new(),
        })
        .await
        .expect_err("more than the burst");
    assert_eq!(never.code(), Code::ResourceExhausted, "{never:?}");
    assert_eq!(retry_after_ms(&never), None);
    assert!(never.message().contains("split"), "{never:?}");

    // Requests: 2/s, burst 3.
    let mut query = stack.query(Some(METERED)).await?;
    for _ in 0..3 {
        query.get_hits(get("m/a")).await?;
    }
    let over = query.get_hits(get("m/a")).await.expect_err("burst used up");
    assert_eq!(over.code(), Code::ResourceExhausted, "{over:?}");
    assert_eq!(retry_after_ms(&over).as_deref(), Some("500"), "{over:?}");
    stack.clock.advance(Duration::from_millis(500));
    query.get_hits(get("m/a")).await?;

    // Only the 21 accepted hits count.
    stack.wait_for(&["m/a"], &[21]).await?;
    let metrics = scrape(stack.ingest.metrics_addr).await?;
    assert_eq!(
        metric_value(
            &metrics,
            "hitcounter_ingest_auth_rejected_requests_total",
            &["reason=\"quota\"", "token=\"metered\""]
        ),
        Some(4.0),
        "{metrics}"
    );
    stack.stop().await.map_err(anyhow::Error::msg)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_over_its_quota_waits_until_it_fits() -> anyhow::Result<()> {
    let stack = Secured::start(&[], &[]).await?;
    let mut ingest = stack.ingest(Some(METERED)).await?;
    let (requests_tx, requests_rx) = tokio::sync::mpsc::channel(4);
    let mut responses = ingest
        .stream_hits(tokio_stream::wrappers::ReceiverStream::new(requests_rx))
        .await?
        .into_inner();
    for _ in 0..2 {
        requests_tx
            .send(RecordHitsRequest {
                hits: hits(&["s/a"; 20]),
                batch_id: String::new(),
            })
            .await?;
    }
    assert_eq!(responses.message().await?.map(|r| r.accepted), Some(20));
    // The second batch waits for its quota (the wait is counted), then goes through once the
    // clock has moved the 2 s that 20 hits at 10/s need.
    eventually(VISIBLE, "the stream to wait for its quota", || async {
        let metrics = scrape(stack.ingest.metrics_addr).await.ok()?;
        metric_value(
            &metrics,
            "hitcounter_ingest_auth_throttled_total",
            &["token=\"metered\""],
        )
    })
    .await?;
    stack.clock.advance(Duration::from_secs(2));
    assert_eq!(responses.message().await?.map(|r| r.accepted), Some(20));
    drop(requests_tx);
    assert!(responses.message().await?.is_none());
    stack.wait_for(&["s/a"], &[40]).await?;
    stack.stop().await.map_err(anyhow::Error::msg)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_global_limit_sheds_load_without_charging_refused_callers() -> anyhow::Result<()> {
    let stack = Secured::start(
        &[],
        &[
            "--global-requests-per-second",
            "1",
            "--global-requests-burst",
            "5",
        ],
    )
    .await?;
    // A flood without a valid token is refused before it reaches the global limit.
    let mut anonymous = stack.query(None).await?;
    for _ in 0..50 {
        let refused = anonymous.get_hits(get("k")).await.expect_err("no token");
        assert_eq!(refused.code(), Code::Unauthenticated);
    }
    // A client over its own quota (3) takes no more of the global limit than its quota.
    let mut metered = stack.query(Some(METERED)).await?;
    for _ in 0..3 {
        metered.get_hits(get("k")).await?;
    }
    for _ in 0..20 {
        let refused = metered
            .get_hits(get("k"))
            .await
            .expect_err("over its quota");
        assert!(
            refused.message().contains("quota of token \"metered\""),
            "{refused:?}"
        );
    }
    // So the others still have the 2 left of the global burst of 5, and then wait 1 s.
    let mut admin = stack.query(Some(ADMIN)).await?;
    for _ in 0..2 {
        admin.get_hits(get("k")).await?;
    }
    let shed = admin.get_hits(get("k")).await.expect_err("global limit");
    assert_eq!(shed.code(), Code::ResourceExhausted, "{shed:?}");
    assert!(shed.message().contains("global limit"), "{shed:?}");
    assert_eq!(retry_after_ms(&shed).as_deref(), Some("1000"), "{shed:?}");
    stack.clock.advance(Duration::from_secs(1));
    admin.get_hits(get("k")).await?;
    stack.stop().await.map_err(anyhow::Error::msg)
}

#[tokio::test(flavor = "multi_thread")]
async fn health_and_reflection_are_open_unless_auth_health() -> anyhow::Result<()> {
    let check = |addr, token: Option<&'static str>| async move {
        let mut health = HealthClient::with_interceptor(connect(addr).await?, Bearer::new(token)?);
        let answer = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|r| r.into_inner().status);
        anyhow::Ok(answer)
    };
    let open = Secured::start(&[], &[]).await?;
    for addr in [open.ingest.addr, open.query.addr] {
        assert_eq!(
            check(addr, None).await?.ok(),
            Some(ServingStatus::Serving as i32)
        );
    }
    open.stop().await.map_err(anyhow::Error::msg)?;

    let closed = Secured::start(&["--auth-health"], &["--auth-health"]).await?;
    for addr in [closed.ingest.addr, closed.query.addr] {
        let refused = check(addr, None).await?.expect_err("health needs a token");
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
        // Any known token will do, whatever its roles.
        assert_eq!(
            check(addr, Some(WRITER)).await?.ok(),
            Some(ServingStatus::Serving as i32)
        );
    }
    closed.stop().await.map_err(anyhow::Error::msg)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_tokens_file_is_reloaded_and_a_broken_one_keeps_the_old_tokens() -> anyhow::Result<()> {
    let stack = Secured::start(&[], &[]).await?;
    let late = "tok-late-9911";
    let entry = format!(
        "[[token]]\nname = \"late\"\nsha256 = \"{}\"\nroles = [\"write\"]\n",
        token::to_hex(&token::hash(late))
    );
    let mut ingest = stack.ingest(Some(late)).await?;
    let refused = ingest
        .record_hit(record("k", 1))
        .await
        .expect_err("not yet");
    assert_eq!(refused.code(), Code::Unauthenticated);
    std::fs::write(&stack.tokens, tokens_toml(&entry))?;
    eventually(VISIBLE, "the new token to be accepted", || {
        let mut ingest = ingest.clone();
        async move { ingest.record_hit(record("k", 1)).await.ok() }
    })
    .await?;

    std::fs::write(&stack.tokens, "[[token]]\nname = \"broken\"\n")?;
    eventually(VISIBLE, "the broken file to be reported", || async {
        let metrics = scrape(stack.ingest.metrics_addr).await.ok()?;
        metric_value(
            &metrics,
            "hitcounter_ingest_tokens_reloads_total",
            &["result=\"error\""],
        )
    })
    .await?;
    ingest.record_hit(record("k", 1)).await?;
    stack.stop().await.map_err(anyhow::Error::msg)
}

/// Without a tokens file everything works as before, for anyone: the services behave as they
/// did before authentication existed.
#[tokio::test(flavor = "multi_thread")]
async fn without_a_tokens_file_every_caller_may_do_everything() -> anyhow::Result<()> {
    let stack = hitcounter_integration_tests::Stack::start().await?;
    let mut ingest = stack.ingest_client().await?;
    ingest.record_hit(record("open/a", 2)).await?;
    let mut query = stack.query_client().await?;
    eventually(VISIBLE, "the hits to be visible", || {
        let mut query = query.clone();
        async move {
            let count = query.get_hits(get("open/a")).await.ok()?.into_inner().count;
            (count == 2).then_some(())
        }
    })
    .await?;
    let top = query
        .top_keys(TopKeysRequest {
            window_seconds: 60,
            limit: 10,
            prefix: String::new(),
            at_ms: 0,
        })
        .await?
        .into_inner();
    assert_eq!(top.keys.len(), 1);
    stack.stop().await.map_err(anyhow::Error::msg)
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_writes_and_reads_with_a_bearer_token() -> anyhow::Result<()> {
    let Some(grpcurl) = tools::grpcurl()? else {
        return Ok(());
    };
    let stack = Secured::start(&[], &[]).await?;
    let (ingest, query) = (stack.ingest.addr.to_string(), stack.query.addr.to_string());
    let call = move |args: Vec<String>| {
        let grpcurl = grpcurl.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                std::process::Command::new(grpcurl).args(args).output()
            })
            .await?
            .map_err(anyhow::Error::from)
        }
    };
    let args = |token: Option<&str>, data: &str, addr: &str, method: &str| {
        let mut args = vec!["-plaintext".to_owned()];
        if let Some(token) = token {
            args.extend(["-H".to_owned(), format!("authorization: Bearer {token}")]);
        }
        args.extend([
            "-d".to_owned(),
            data.to_owned(),
            addr.to_owned(),
            method.to_owned(),
        ]);
        args
    };
    let write = r#"{"key": "shop/grpcurl", "count": 3}"#;
    let refused = call(args(None, write, &ingest, "hitcounter.v1.Ingest/RecordHit")).await?;
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Unauthenticated"),
        "{refused:?}"
    );
    let written = call(args(
        Some(WRITER),
        write,
        &ingest,
        "hitcounter.v1.Ingest/RecordHit",
    ))
    .await?;
    assert!(written.status.success(), "{written:?}");
    assert!(
        String::from_utf8_lossy(&written.stdout).contains("\"accepted\": \"3\""),
        "{written:?}"
    );
    let read = r#"{"key": "shop/grpcurl", "window_seconds": 60}"#;
    eventually(VISIBLE, "grpcurl to read the 3 hits", || {
        let call = call.clone();
        let args = args(Some(READER), read, &query, "hitcounter.v1.Query/GetHits");
        async move {
            let output = call(args).await.ok()?;
            String::from_utf8_lossy(&output.stdout)
                .contains("\"count\": \"3\"")
                .then_some(())
        }
    })
    .await?;
    // Reflection stays open: grpcurl lists the service without a token.
    let listed = call(vec!["-plaintext".into(), query.clone(), "list".into()]).await?;
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains("hitcounter.v1.Query"),
        "{listed:?}"
    );
    stack.stop().await.map_err(anyhow::Error::msg)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_python_example_sends_its_token() -> anyhow::Result<()> {
    if !tools::python_with_grpc()? {
        return Ok(());
    }
    let stack = Secured::start(&[], &[]).await?;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/python/hitcounter_example.py"
    );
    let (ingest, query) = (stack.ingest.addr.to_string(), stack.query.addr.to_string());
    let run = |token: Option<&'static str>| {
        let (ingest, query) = (ingest.clone(), query.clone());
        tokio::task::spawn_blocking(move || {
            let mut command = std::process::Command::new("python3");
            command
                .arg(script)
                .args(["--ingest", &ingest, "--query", &query])
                .env_remove("HITCOUNTER_TOKEN");
            if let Some(token) = token {
                command.env("HITCOUNTER_TOKEN", token);
            }
            command.output()
        })
    };
    let refused = run(None).await??;
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("UNAUTHENTICATED"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let output = run(Some(ADMIN)).await??;
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(summary["accepted"], 58);
    stack.stop().await.map_err(anyhow::Error::msg)
}
