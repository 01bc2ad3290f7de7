//! The public contract, rule by rule, over real gRPC against the three services in-process.

use std::time::Duration;

use hitcounter_integration_tests::{eventually, now_ms, Stack, StackOptions};
use hitcounter_proto::v1::{
    ingest_client::IngestClient, query_client::QueryClient, GetHitsManyRequest, GetHitsRequest,
    GetSeriesRequest, Hit, RecordHitRequest, RecordHitsRequest, TopKeysRequest, WatchHitsRequest,
};
use tonic::{transport::Channel, Code};

type Query = QueryClient<Channel>;
type Ingest = IngestClient<Channel>;

async fn count(query: &mut Query, key: &str, window_seconds: u32, at_ms: i64) -> u64 {
    query
        .get_hits(GetHitsRequest {
            key: key.into(),
            window_seconds,
            at_ms,
        })
        .await
        .expect("GetHits")
        .into_inner()
        .count
}

/// How long a test waits for acknowledged hits to show up before it reports them missing. A
/// hang guard, not the visibility promise: the 1 s visibility goal is measured by the benchmark
/// (`hitcounter-bench`), not asserted here. Every service and the client share one
/// current-thread runtime in these tests, so on a loaded machine a second is no guarantee, and a
/// 1 s deadline made the tests fail on a slow run rather than on lost hits.
const VISIBLE_WITHIN: Duration = Duration::from_secs(30);

/// Waits until `key` has `expected` hits in the window.
async fn until_count(query: &mut Query, key: &str, window: u32, at_ms: i64, expected: u64) {
    let seen = eventually(
        VISIBLE_WITHIN,
        "acknowledged hits to become visible",
        || {
            let mut query = query.clone();
            let key = key.to_owned();
            async move {
                let n = count(&mut query, &key, window, at_ms).await;
                (n == expected).then_some(n)
            }
        },
    )
    .await;
    if seen.is_err() {
        let last = count(query, key, window, at_ms).await;
        panic!("{key}: expected {expected} hits, have {last}");
    }
}

fn hit(key: &str, timestamp_ms: i64, count: u64) -> Hit {
    Hit {
        key: key.into(),
        timestamp_ms,
        count,
    }
}

async fn record(ingest: &mut Ingest, hits: Vec<Hit>, batch_id: &str) -> tonic::Result<(u64, bool)> {
    let response = ingest
        .record_hits(RecordHitsRequest {
            hits,
            batch_id: batch_id.into(),
        })
        .await?
        .into_inner();
    assert_eq!(response.batch_id, batch_id);
    Ok((response.accepted, response.duplicate))
}

#[tokio::test]
async fn record_hit_defaults_and_get_hits_echo() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let (mut ingest, mut query) = (stack.ingest_client().await?, stack.query_client().await?);

    // count 0 counts as 1; timestamp 0 means now.
    let accepted = ingest
        .record_hit(RecordHitRequest {
            key: "/home".into(),
            timestamp_ms: 0,
            count: 0,
        })
        .await?
        .into_inner()
        .accepted;
    assert_eq!(accepted, 1);
    let accepted = ingest
        .record_hit(RecordHitRequest {
            key: "/home".into(),
            timestamp_ms: now_ms(),
            count: 4,
        })
        .await?
        .into_inner()
        .accepted;
    assert_eq!(accepted, 4);
    until_count(&mut query, "/home", 0, 0, 5).await;

    // W = 0 → 300 and A = 0 → now, echoed back with the key.
    let before = now_ms();
    let response = query
        .get_hits(GetHitsRequest {
            key: "/home".into(),
            window_seconds: 0,
            at_ms: 0,
        })
        .await?
        .into_inner();
    assert_eq!(response.key, "/home");
    assert_eq!(response.window_seconds, 300);
    assert!(response.at_ms >= before && response.at_ms <= now_ms() + 1);
    let past = now_ms() - 100_000;
    let explicit = query
        .get_hits(GetHitsRequest {
            key: "/home".into(),
            window_seconds: 7,
            at_ms: past,
        })
        .await?
        .into_inner();
    assert_eq!(
        (explicit.window_seconds, explicit.at_ms, explicit.count),
        (7, past, 0)
    );
    // A window reaching back before the retained history would be partial: rejected.
    let status = query
        .get_hits(GetHitsRequest {
            key: "/home".into(),
            window_seconds: 300,
            at_ms: 1_000_000,
        })
        .await
        .expect_err("window before retention");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("retained history"),
        "{}",
        status.message()
    );

    // Unknown keys count 0.
    assert_eq!(count(&mut query, "/never", 60, 0).await, 0);
    stack.stop().await.map_err(anyhow::Error::msg)
}

#[tokio::test]
async fn second_boundaries_and_window_edges() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let (mut ingest, mut query) = (stack.ingest_client().await?, stack.query_client().await?);
    let k = now_ms() / 1000 - 100;
    let key = "/edge";
    // Distinct counts tell the three hits apart: 1 in second k-1, 10 + 100 in second k.
    record(
        &mut ingest,
        vec![
            hit(key, k * 1000 - 1, 1),
            hit(key, k * 1000, 10),
            hit(key, k * 1000 + 999, 100),
        ],
        "",
    )
    .await?;
    until_count(&mut query, key, 3, (k + 1) * 1000, 111).await;

    let cases = [
        // (window, at_ms, expected)
        (1, k * 1000, 110),
        (1, k * 1000 + 999, 110),
        (1, k * 1000 - 1, 1),
        (2, k * 1000, 111),
        (1, (k + 1) * 1000, 0),
        (2, (k + 1) * 1000, 110),
        (3, (k + 1) * 1000, 111),
        (1, (k - 1) * 1000 - 1, 0),
        (300, 0, 111),
    ];
    for (window, at, expected) in cases {
        assert_eq!(
            count(&mut query, key, window, at).await,
            expected,
            "W={window} A={at}"
        );
    }
    stack.stop().await.map_err(anyhow::Error::msg)
}

#[tokio::test]
async fn get_hits_many_answers_in_request_order() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let (mut ingest, mut query) = (stack.ingest_client().await?, stack.query_client().await?);
    let hits = (0..20).map(|i| hit(&format!("/m/{i}"), 0, i + 1)).collect();
    record(&mut ingest, hits, "").await?;
    until_count(&mut query, "/m/19", 60, 0, 20).await;

    let keys: Vec<String> = [5, 19, 0, 7, 99, 5]
        .iter()
        .map(|i| format!("/m/{i}"))
        .collect();
    let response = query
        .get_hits_many(GetHitsManyRequest {
            keys: keys.clone(),
            window_seconds: 60,
            at_ms: 0,
        })
        .await?
        .into_inner();
    let got: Vec<(String, u64)> = response
        .results
        .iter()
        .map(|r| (r.key.clone(), r.count))
        .collect();
    let want: Vec<(String, u64)> = keys
        .iter()
        .zip([6, 20, 1, 8, 0, 6])
        .map(|(k, c)| (k.clone(), c))
        .collect();
    assert_eq!(got, want);
    assert!(response
        .results
        .iter()
        .all(|r| r.window_seconds == 60 && r.at_ms > 0));

    let thousand: Vec<String> = (0..1000).map(|i| format!("/m/{i}")).collect();
    let response = query
        .get_hits_many(GetHitsManyRequest {
            keys: thousand,
            window_seconds: 60,
            at_ms: 0,
        })
        .await?
        .into_inner();
    assert_eq!(response.results.len(), 1000);
    assert_eq!(
        response.results.iter().map(|r| r.count).sum::<u64>(),
        (1..=20).sum::<u64>()
    );
    stack.stop().await.map_err(anyhow::Error::msg)
}

#[tokio::test]
async fn get_series_is_dense_and_step_aligned() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let (mut ingest, mut query) = (stack.ingest_client().await?, stack.query_client().await?);
    let base = (now_ms() / 1000 - 200) / 10 * 10; // a multiple of 10 s
    let key = "/series";
    record(
        &mut ingest,
        vec![
            hit(key, base * 1000, 1),
            hit(key, (base + 3) * 1000 + 500, 2),
            hit(key, (base + 9) * 1000 + 999, 4),
            hit(key, (base + 10) * 1000, 8),
            hit(key, (base + 25) * 1000, 16),
        ],
        "",
    )
    .await?;
    until_count(&mut query, key, 60, (base + 30) * 1000, 31).await;

    // S = 0 → 1; dense, zeros included; F inside a second is aligned down.
    let series = query
        .get_series(GetSeriesRequest {
            key: key.into(),
            from_ms: base * 1000 + 700,
            to_ms: (base + 4) * 1000,
            step_seconds: 0,
        })
        .await?
        .into_inner();
    assert_eq!(series.key, key);
    assert_eq!(series.step_seconds, 1);
    let points: Vec<(i64, u64)> = series
        .points
        .iter()
        .map(|p| (p.start_ms, p.count))
        .collect();
    assert_eq!(
        points,
        vec![
            (base * 1000, 1),
            ((base + 1) * 1000, 0),
            ((base + 2) * 1000, 0),
            ((base + 3) * 1000, 2)
        ]
    );

    // S = 10: points at multiples of 10 s while start < T (T inside the last point).
    let series = query
        .get_series(GetSeriesRequest {
            key: key.into(),
            from_ms: (base + 5) * 1000,
            to_ms: (base + 20) * 1000 + 1,
            step_seconds: 10,
        })
        .await?
        .into_inner();
    let points: Vec<(i64, u64)> = series
        .points
        .iter()
        .map(|p| (p.start_ms, p.count))
        .collect();
    assert_eq!(
        points,
        vec![
            (base * 1000, 7),
            ((base + 10) * 1000, 8),
            ((base + 20) * 1000, 16)
        ]
    );

    // Exactly 10,000 points is allowed.
    let series = query
        .get_series(GetSeriesRequest {
            key: key.into(),
            from_ms: 0,
            to_ms: 10_000_000,
            step_seconds: 1,
        })
        .await?
        .into_inner();
    assert_eq!(series.points.len(), 10_000);
    stack.stop().await.map_err(anyhow::Error::msg)
}

#[tokio::test]
async fn top_keys_orders_filters_and_limits() -> anyhow::Result<()> {
    // Two shards, so the answer is merged from both.
    let stack = Stack::start_with(StackOptions {
        shards: 2,
        ..Default::default()
    })
    .await?;
    let (mut ingest, mut query) = (stack.ingest_client().await?, stack.query_client().await?);
    let mut hits = vec![
        hit("/a/x", 0, 5),
        hit("/a/y", 0, 9),
        hit("/a/z", 0, 5),
        hit("/b/w", 0, 7),
        hit("/b/v", 0, 1),
    ];
    // 15 more keys so that the default limit of 10 matters.
    hits.extend((0..15).map(|i| hit(&format!("/c/{i:02}"), 0, 2)));
    // An old hit outside the window.
    hits.push(hit("/a/old", now_ms() - 120_000, 100));
    record(&mut ingest, hits.clone(), "").await?;
    // 1005 keys with one hit each, so that the clamp of the limit to 1000 has more than 1000
    // keys to cut: 1025 keys in the window in all.
    let many: Vec<Hit> = (0..1005)
        .map(|i| hit(&format!("/many/{i:04}"), 0, 1))
        .collect();
    record(&mut ingest, many.clone(), "").await?;
    hits.extend(many);
    until_count(&mut query, "/c/14", 60, 0, 2).await;
    until_count(&mut query, "/many/1004", 60, 0, 1).await;
    until_count(&mut query, "/a/old", 300, 0, 100).await;

    let top = |limit, prefix: &str| TopKeysRequest {
        window_seconds: 60,
        limit,
        prefix: prefix.into(),
        at_ms: 0,
    };
    let response = query.top_keys(top(0, "")).await?.into_inner();
    assert!(!response.approximate);
    assert_eq!(response.window_seconds, 60);
    let got: Vec<(String, u64)> = response
        .keys
        .iter()
        .map(|k| (k.key.clone(), k.count))
        .collect();
    let mut want = vec![
        ("/a/y".to_owned(), 9),
        ("/b/w".to_owned(), 7),
        ("/a/x".to_owned(), 5),
        ("/a/z".to_owned(), 5),
    ];
    want.extend((0..6).map(|i| (format!("/c/{i:02}"), 2)));
    assert_eq!(got, want, "descending count, ties by key, default limit 10");

    let response = query.top_keys(top(2, "/a/")).await?.into_inner();
    let got: Vec<&str> = response.keys.iter().map(|k| k.key.as_str()).collect();
    assert_eq!(got, ["/a/y", "/a/x"]);

    // Limits above 1000 are lowered to 1000: of the 1025 keys in the window (/a/old is outside
    // 60 s), the first 1000 in order.
    let mut in_window: Vec<(String, u64)> = hits
        .iter()
        .filter(|h| h.key != "/a/old")
        .map(|h| (h.key.clone(), h.count))
        .collect();
    in_window.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    assert_eq!(in_window.len(), 1025);
    in_window.truncate(1000);
    for limit in [1000, 1001, 5000] {
        let response = query.top_keys(top(limit, "")).await?.into_inner();
        let got: Vec<(String, u64)> = response
            .keys
            .iter()
            .map(|k| (k.key.clone(), k.count))
            .collect();
        assert_eq!(got.len(), 1000, "limit {limit}");
        assert!(got == in_window, "limit {limit}: not the top 1000 in order");
    }
    stack.stop().await.map_err(anyhow::Error::msg)
}

#[tokio::test]
async fn watch_hits_sends_at_once_then_every_interval() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let (mut ingest, mut query) = (stack.ingest_client().await?, stack.query_client().await?);
    record(&mut ingest, vec![hit("/live", 0, 3)], "").await?;
    until_count(&mut query, "/live", 60, 0, 3).await;

    let started = tokio::time::Instant::now();
    let mut watch = query
        .watch_hits(WatchHitsRequest {
            key: "/live".into(),
            window_seconds: 60,
            interval_ms: 100,
        })
        .await?
        .into_inner();
    let first = watch.message().await?.expect("first update");
    assert_eq!(
        (first.key.as_str(), first.count, first.window_seconds),
        ("/live", 3, 60)
    );
    record(&mut ingest, vec![hit("/live", 0, 4)], "").await?;
    let mut updates = 1;
    loop {
        let update = watch.message().await?.expect("update");
        updates += 1;
        if update.count == 7 {
            break;
        }
        assert!(updates < 50, "the new hits never showed up in the watch");
    }
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "updates are paced by the interval"
    );
    drop(watch);

    // Shutting the server down ends an open watch cleanly.
    let mut watch = query
        .watch_hits(WatchHitsRequest {
            key: "/live".into(),
            window_seconds: 0,
            interval_ms: 0,
        })
        .await?
        .into_inner();
    assert_eq!(watch.message().await?.expect("first").window_seconds, 300);
    stack.query.shutdown.cancel();
    let ended = tokio::time::timeout(VISIBLE_WITHIN, async {
        loop {
            match watch.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await?;
    assert!(
        matches!(ended, Ok(None)),
        "expected a clean end of stream, got {ended:?}"
    );
    Ok(())
}

#[tokio::test]
async fn every_validation_rule_rejects_the_whole_request() -> anyhow::Result<()> {
    let stack = Stack::start_with(StackOptions {
        ingest: vec![
            "--retention-seconds",
            "3600",
            "--max-future-skew-seconds",
            "60",
        ],
        ..Default::default()
    })
    .await?;
    let (mut ingest, mut query) = (stack.ingest_client().await?, stack.query_client().await?);
    let now = now_ms();
    let probe = || hit("/probe", 0, 1);
    let long_id = "b".repeat(129);
    let cases: Vec<(Vec<Hit>, &str, &str)> = vec![
        (vec![probe(), hit("", 0, 1)], "", "hits[1]: key is empty"),
        (vec![probe(), hit(&"k".repeat(257), 0, 1)], "", "257 bytes"),
        (
            vec![probe(), hit("k", 0, 1_000_000_001)],
            "",
            "above the limit",
        ),
        (vec![probe(), hit("k", -1, 1)], "", "negative"),
        (
            vec![probe(), hit("k", now + 120_000, 1)],
            "",
            "in the future",
        ),
        (
            vec![probe(), hit("k", now - 3_700_000, 1)],
            "",
            "older than the retention",
        ),
        (vec![], "", "1 to 10000 hits"),
        ((0..10_001).map(|_| probe()).collect(), "", "holds 10001"),
        (vec![probe()], &long_id, "batch_id is 129 bytes"),
    ];
    for (hits, batch_id, message) in cases {
        let status = record(&mut ingest, hits, batch_id)
            .await
            .expect_err(message);
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{message}: {status:?}"
        );
        assert!(
            status.message().contains(message),
            "{message}: {}",
            status.message()
        );
    }
    let unary = [
        RecordHitRequest {
            key: String::new(),
            timestamp_ms: 0,
            count: 1,
        },
        RecordHitRequest {
            key: "/probe".into(),
            timestamp_ms: -5,
            count: 1,
        },
        RecordHitRequest {
            key: "/probe".into(),
            timestamp_ms: 0,
            count: 2_000_000_000,
        },
    ];
    for request in unary {
        let status = ingest.record_hit(request).await.expect_err("invalid");
        assert_eq!(status.code(), Code::InvalidArgument);
    }
    // The limits themselves are accepted.
    record(
        &mut ingest,
        vec![hit(&"k".repeat(256), now + 59_000, 1_000_000_000)],
        &"b".repeat(128),
    )
    .await?;

    // Nothing of a rejected request was counted: a marker sent afterwards becomes visible while
    // the probe key stays at zero.
    record(&mut ingest, vec![hit("/marker", 0, 1)], "").await?;
    until_count(&mut query, "/marker", 60, 0, 1).await;
    assert_eq!(count(&mut query, "/probe", 3600, 0).await, 0);

    // Query-side rules.
    let bad_gets = [
        (
            GetHitsRequest {
                key: "/probe".into(),
                window_seconds: 3601,
                at_ms: 0,
            },
            "retention",
        ),
        (
            GetHitsRequest {
                key: "/probe".into(),
                window_seconds: 60,
                at_ms: -1,
            },
            "negative",
        ),
        (
            GetHitsRequest {
                key: String::new(),
                window_seconds: 60,
                at_ms: 0,
            },
            "key is empty",
        ),
    ];
    for (request, message) in bad_gets {
        let status = query.get_hits(request).await.expect_err(message);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains(message), "{}", status.message());
    }
    assert_eq!(
        count(&mut query, "/probe", 3600, 0).await,
        0,
        "a window of retention is fine"
    );
    for keys in [vec![], (0..1001).map(|i| i.to_string()).collect()] {
        let status = query
            .get_hits_many(GetHitsManyRequest {
                keys,
                window_seconds: 60,
                at_ms: 0,
            })
            .await
            .expect_err("key count");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("1 to 1000 keys"));
    }
    let bad_series = [
        (
            GetSeriesRequest {
                key: "/p".into(),
                from_ms: 5000,
                to_ms: 5000,
                step_seconds: 1,
            },
            "after",
        ),
        (
            GetSeriesRequest {
                key: "/p".into(),
                from_ms: 0,
                to_ms: 10_000_001,
                step_seconds: 1,
            },
            "10001 points",
        ),
        (
            // Must not overflow the point arithmetic.
            GetSeriesRequest {
                key: "/p".into(),
                from_ms: 0,
                to_ms: i64::MAX,
                step_seconds: 1,
            },
            "points",
        ),
    ];
    for (request, message) in bad_series {
        let status = query.get_series(request).await.expect_err(message);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains(message), "{}", status.message());
    }
    let status = query
        .top_keys(TopKeysRequest {
            window_seconds: 4000,
            limit: 1,
            prefix: String::new(),
            at_ms: 0,
        })
        .await
        .expect_err("window");
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = query
        .watch_hits(WatchHitsRequest {
            key: "/p".into(),
            window_seconds: 3601,
            interval_ms: 0,
        })
        .await
        .expect_err("window");
    assert_eq!(status.code(), Code::InvalidArgument);

    // After all of that both services go on serving.
    record(&mut ingest, vec![hit("/marker", 0, 1)], "").await?;
    until_count(&mut query, "/marker", 60, 0, 2).await;
    stack.stop().await.map_err(anyhow::Error::msg)
}

#[tokio::test]
async fn oversized_messages_get_a_size_error_and_the_service_goes_on() -> anyhow::Result<()> {
    let stack = Stack::start_with(StackOptions {
        ingest: vec!["--max-message-bytes", "65536"],
        ..Default::default()
    })
    .await?;
    let (mut ingest, mut query) = (stack.ingest_client().await?, stack.query_client().await?);
    let big = (0..1000)
        .map(|i| hit(&format!("/big/{i:0>200}"), 0, 1))
        .collect();
    let status = record(&mut ingest, big, "").await.expect_err("too large");
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
    record(&mut ingest, vec![hit("/after-big", 0, 1)], "").await?;
    until_count(&mut query, "/after-big", 60, 0, 1).await;
    stack.stop().await.map_err(anyhow::Error::msg)
}

#[tokio::test]
async fn batch_ids_are_idempotent() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let (mut ingest, mut query) = (stack.ingest_client().await?, stack.query_client().await?);
    let batch = || vec![hit("/idem", 0, 2), hit("/idem", 0, 3)];
    assert_eq!(record(&mut ingest, batch(), "batch-1").await?, (5, false));
    // The repeat is not counted and returns the first call's accepted, even if its hits differ.
    assert_eq!(
        record(&mut ingest, vec![hit("/idem", 0, 50)], "batch-1").await?,
        (5, true)
    );
    // Empty batch ids are never deduplicated.
    assert_eq!(record(&mut ingest, batch(), "").await?, (5, false));
    assert_eq!(record(&mut ingest, batch(), "").await?, (5, false));
    // A rejected batch does not burn its id.
    let bad = vec![hit("", 0, 1)];
    assert!(record(&mut ingest, bad, "batch-2").await.is_err());
    assert_eq!(record(&mut ingest, batch(), "batch-2").await?, (5, false));

    // Concurrent repeats of one id: exactly one is counted. A repeat that arrives while the
    // first is still being recorded waits for it up to the enqueue timeout and then answers
    // ABORTED ("retry to learn its outcome"): a careful client retries, and so does this test.
    // (Expecting every repeat to be answered within that one second made the test depend on
    // how fast a loaded machine records the first.)
    let mut calls = Vec::new();
    for _ in 0..8 {
        let mut ingest = ingest.clone();
        calls.push(tokio::spawn(async move {
            loop {
                match record(&mut ingest, batch(), "batch-3").await {
                    Err(status) if status.code() == Code::Aborted => continue,
                    answer => return answer,
                }
            }
        }));
    }
    let mut fresh = 0;
    for call in calls {
        let (accepted, duplicate) = call.await??;
        assert_eq!(accepted, 5);
        fresh += u32::from(!duplicate);
    }
    assert_eq!(fresh, 1);

    // Over StreamHits too.
    let requests = tokio_stream::iter(vec![
        RecordHitsRequest {
            hits: batch(),
            batch_id: "batch-4".into(),
        },
        RecordHitsRequest {
            hits: batch(),
            batch_id: "batch-4".into(),
        },
        RecordHitsRequest {
            hits: batch(),
            batch_id: "batch-1".into(),
        },
    ]);
    let mut responses = ingest.stream_hits(requests).await?.into_inner();
    let mut seen = Vec::new();
    while let Some(r) = responses.message().await? {
        seen.push((r.accepted, r.duplicate, r.batch_id));
    }
    assert_eq!(
        seen,
        vec![
            (5, false, "batch-4".into()),
            (5, true, "batch-4".into()),
            (5, true, "batch-1".into())
        ]
    );
    // batch-1, two empty-id batches, batch-2, batch-3 once, batch-4 once.
    until_count(&mut query, "/idem", 60, 0, 30).await;
    stack.stop().await.map_err(anyhow::Error::msg)
}

#[tokio::test]
async fn concurrent_streams_give_exact_totals() -> anyhow::Result<()> {
    let stack = Stack::start_with(StackOptions {
        shards: 2,
        ..Default::default()
    })
    .await?;
    let mut query = stack.query_client().await?;
    let streams = 4;
    let batches_per_stream = 50;
    let mut tasks = Vec::new();
    for s in 0..streams {
        let mut ingest = stack.ingest_client().await?;
        tasks.push(tokio::spawn(async move {
            let requests = tokio_stream::iter((0..batches_per_stream).map(move |b| {
                RecordHitsRequest {
                    hits: (0..200u64)
                        .map(|i| hit(&format!("/conc/{}", (i + b + s) % 37), 0, 1 + i % 3))
                        .collect(),
                    batch_id: String::new(),
                }
            }));
            let mut responses = ingest.stream_hits(requests).await?.into_inner();
            let mut acked = 0u64;
            let mut n = 0;
            while let Some(response) = responses.message().await? {
                acked += response.accepted;
                n += 1;
            }
            assert_eq!(n, batches_per_stream, "one response per request");
            anyhow::Ok(acked)
        }));
    }
    let mut acked = 0;
    for task in tasks {
        acked += task.await??;
    }
    let expected: u64 = (0..streams * batches_per_stream)
        .map(|_| (0..200u64).map(|i| 1 + i % 3).sum::<u64>())
        .sum();
    assert_eq!(acked, expected);
    let keys: Vec<String> = (0..37).map(|i| format!("/conc/{i}")).collect();
    eventually(VISIBLE_WITHIN, "every acked hit to be counted", || {
        let mut query = query.clone();
        let keys = keys.clone();
        async move {
            let response = query
                .get_hits_many(GetHitsManyRequest {
                    keys,
                    window_seconds: 60,
                    at_ms: 0,
                })
                .await
                .ok()?
                .into_inner();
            let total: u64 = response.results.iter().map(|r| r.count).sum();
            (total == expected).then_some(())
        }
    })
    .await?;
    let response = query
        .get_hits_many(GetHitsManyRequest {
            keys,
            window_seconds: 60,
            at_ms: 0,
        })
        .await?
        .into_inner();
    assert_eq!(
        response.results.iter().map(|r| r.count).sum::<u64>(),
        expected,
        "and not more"
    );
    stack.stop().await.map_err(anyhow::Error::msg)
}

#[tokio::test]
async fn client_crate_recorder_round_trip() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let client = hitcounter_client::Client::connect(
        &stack.ingest.addr.to_string(),
        &format!("http://{}", stack.query.addr),
    )
    .await?;
    assert_eq!(client.record_hit("/client", 2).await?, 2);
    let recorder = client
        .recorder(hitcounter_client::RecorderOptions {
            max_batch: 100,
            // Batches are cut by size, `flush` and `close` only, so their number is exact. With
            // a 5 ms delay a pause of the (shared, current-thread) runtime between two records
            // sent a partial batch, and the count of 14 below depended on the machine's speed.
            max_delay: Duration::from_secs(3600),
            ..Default::default()
        })
        .await?;
    for _ in 0..1234 {
        recorder.record("/client", 1).await?;
    }
    recorder.flush().await?;
    for _ in 0..66 {
        recorder.record("/client", 1).await?;
    }
    let summary = recorder.close().await?;
    assert_eq!(summary.accepted, 1300);
    assert_eq!(
        summary.batches, 14,
        "13 full batches of 100 (the flush split one)"
    );
    let mut query = stack.query_client().await?;
    until_count(&mut query, "/client", 60, 0, 1302).await;
    assert_eq!(
        client.get_hits("/client", Duration::from_secs(60)).await?,
        1302
    );
    let error = client.record_hit("", 1).await.expect_err("empty key");
    assert!(error.to_string().contains("key is empty"), "{error}");
    stack.stop().await.map_err(anyhow::Error::msg)
}
