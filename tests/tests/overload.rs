//! Abusive clients over real gRPC: clients that open `StreamHits` and `WatchHits` and then never
//! read what the server sends them. Each such connection is opened with a tiny HTTP/2 receive
//! window (1 KiB per stream), so the server's writes to it stall after a few dozen messages:
//! the server must then hold at most its bounded per-stream queue for it (ingest stops reading
//! that stream's requests; a watch skips updates), and go on serving everybody else. What a
//! stalled `StreamHits` client was acknowledged must be counted, exactly.
//!
//! No timing is asserted: the figures (memory under such clients, 10,000 idle connections) are
//! measured by `hitcounter-overload` and reported in docs/performance.md.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use futures::StreamExt;
use hitcounter_integration_tests::{eventually, Stack};
use hitcounter_proto::v1::{
    ingest_client::IngestClient, query_client::QueryClient, Hit, RecordHitRequest,
    RecordHitsRequest, WatchHitsRequest,
};
use tonic::transport::{Channel, Endpoint};

/// Clients of each kind that never read.
const NEVER_READING: usize = 8;
/// Batches each never-reading `StreamHits` client sends (one hit each): far more answers than
/// its 1 KiB window holds.
const BATCHES: u64 = 2_000;

/// A connection whose streams accept only 1 KiB before the server must wait for a reader.
async fn stingy(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .initial_stream_window_size(Some(1024))
        .connect()
        .await?)
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_that_never_read_do_not_stop_the_service_and_what_they_were_acknowledged_counts(
) -> anyhow::Result<()> {
    let stack = Stack::start().await?;

    // StreamHits clients that send and never read the answers (until the end of the test).
    let mut unread = Vec::new();
    let pulled: Vec<Arc<AtomicU64>> = (0..NEVER_READING)
        .map(|_| Arc::new(AtomicU64::new(0)))
        .collect();
    for (i, pulled) in pulled.iter().enumerate() {
        let mut client = IngestClient::new(stingy(stack.ingest.addr).await?);
        let pulled = Arc::clone(pulled);
        let key = format!("/unread-{i}");
        let requests = tokio_stream::iter(0..BATCHES).map(move |_| {
            pulled.fetch_add(1, Ordering::Relaxed);
            RecordHitsRequest {
                hits: vec![Hit {
                    key: key.clone(),
                    count: 1,
                    ..Default::default()
                }],
                ..Default::default()
            }
        });
        unread.push(client.stream_hits(requests).await?.into_inner());
    }
    // WatchHits clients at the shortest interval that never read an update.
    let mut unread_watches = Vec::new();
    for _ in 0..NEVER_READING {
        let mut client = QueryClient::new(stingy(stack.query.addr).await?);
        unread_watches.push(
            client
                .watch_hits(WatchHitsRequest {
                    key: "/watched".into(),
                    window_seconds: 3600,
                    interval_ms: 100,
                })
                .await?
                .into_inner(),
        );
    }
    // Every never-reader got its requests going (a hang guard, not a goal).
    eventually(Duration::from_secs(30), "the never-readers sending", || {
        let pulled = pulled.clone();
        async move {
            pulled
                .iter()
                .all(|p| p.load(Ordering::Relaxed) >= 100)
                .then_some(())
        }
    })
    .await?;

    // Meanwhile everybody else is served: writes over a new connection, reads of them.
    let mut ingest = stack.ingest_client().await?;
    for _ in 0..20 {
        ingest
            .record_hit(RecordHitRequest {
                key: "/watched".into(),
                count: 1,
                ..Default::default()
            })
            .await?;
        ingest
            .record_hits(RecordHitsRequest {
                hits: vec![Hit {
                    key: "/served".into(),
                    count: 3,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await?;
    }
    stack.query.until_count("/served", 60).await?;
    stack.query.until_count("/watched", 20).await?;

    // Now read every answer the never-readers were sent: everything acknowledged is counted.
    for (i, mut answers) in unread.into_iter().enumerate() {
        let mut acknowledged = 0;
        while let Some(answer) = answers.message().await? {
            acknowledged += answer.accepted;
        }
        assert_eq!(
            acknowledged, BATCHES,
            "client {i} was answered for every batch"
        );
        stack
            .query
            .until_count(&format!("/unread-{i}"), acknowledged)
            .await?;
    }
    // The stalled watches are still alive and report the count once read.
    for mut watch in unread_watches {
        let mut latest = None;
        while latest != Some(20) {
            let update = watch
                .message()
                .await?
                .ok_or_else(|| anyhow::anyhow!("a watch ended"))?;
            latest = Some(update.count);
        }
    }
    stack.stop().await.map_err(anyhow::Error::msg)
}
