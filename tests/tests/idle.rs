//! Idle connections (issue #14): a connection with no open call is closed after
//! `--idle-connection-timeout-seconds` and counted, one with an open call is not; at
//! `--max-connections` a new connection closes the longest-idle one to make room, and is refused
//! only when every open connection is busy. Real aggregators over real gRPC; every wait is on
//! the effect (a metric, a served call) with a generous hang guard, never on a duration.

use std::time::Duration;

use hitcounter_integration_tests::{
    connect, eventually, init_logging, metric_value, scrape, start_aggregator, Running,
};
use tonic::transport::Channel;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

const SERVICE: &str = "service=\"hitcounter.aggregator.v1.Aggregator\"";

/// A hang guard: the effects below take about a second (the timeout, the settle time).
const GUARD: Duration = Duration::from_secs(60);

/// A hang guard for one call: a connection the server neither serves nor closes must fail
/// the test, not stall it.
const CALL_GUARD: Duration = Duration::from_secs(20);

async fn health(channel: Channel) -> Result<i32, tonic::Status> {
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    request.set_timeout(CALL_GUARD);
    Ok(HealthClient::new(channel)
        .check(request)
        .await?
        .into_inner()
        .status)
}

/// The next message of a watch, within [`CALL_GUARD`].
async fn next(
    watch: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
) -> anyhow::Result<Option<tonic_health::pb::HealthCheckResponse>> {
    Ok(tokio::time::timeout(CALL_GUARD, watch.message()).await??)
}

/// A `grpc.health.v1.Health/Watch` call held open on a connection of its own: a busy
/// connection. Its first answer (SERVING) is read, so the call is known to be open.
async fn busy(
    running: &Running,
) -> anyhow::Result<tonic::Streaming<tonic_health::pb::HealthCheckResponse>> {
    let mut client = HealthClient::new(connect(running.addr).await?);
    let call = client.watch(HealthCheckRequest {
        service: String::new(),
    });
    let mut stream = tokio::time::timeout(CALL_GUARD, call).await??.into_inner();
    let first = next(&mut stream).await?;
    anyhow::ensure!(
        first.is_some_and(|r| r.status == ServingStatus::Serving as i32),
        "the watch did not start with SERVING"
    );
    Ok(stream)
}

/// `metric{service, labels...}` of `running`, 0 when absent.
async fn metric(running: &Running, name: &str, labels: &[&str]) -> anyhow::Result<f64> {
    let text = scrape(running.metrics_addr).await?;
    let labels: Vec<&str> = std::iter::once(SERVICE)
        .chain(labels.iter().copied())
        .collect();
    Ok(metric_value(&text, name, &labels).unwrap_or(0.0))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_connection_is_closed_and_counted_a_busy_one_is_not() -> anyhow::Result<()> {
    init_logging();
    let mut aggregator = start_aggregator(&["--idle-connection-timeout-seconds", "1"]).await?;
    aggregator.ready("aggregator").await?;
    // Opened first, so that were it idle, its time would run out first.
    let mut watch = busy(&aggregator).await?;
    // A second connection makes one call and then sits idle.
    let idle = connect(aggregator.addr).await?;
    assert_eq!(health(idle.clone()).await?, ServingStatus::Serving as i32);
    // The server closes the idle one: counted, and only the busy one is left open.
    eventually(GUARD, "the idle connection to be closed", || async {
        let closed = metric(
            &aggregator,
            "hitcounter_grpc_connections_closed_idle_total",
            &["reason=\"timeout\""],
        )
        .await
        .ok()?;
        let open = metric(&aggregator, "hitcounter_grpc_connections_open", &[])
            .await
            .ok()?;
        (closed >= 1.0 && open <= 1.0).then_some(())
    })
    .await?;
    let open = metric(&aggregator, "hitcounter_grpc_connections_open", &[]).await?;
    assert_eq!(open, 1.0, "the connection with an open call was closed too");
    let gauge = metric(
        &aggregator,
        "hitcounter_grpc_idle_connection_timeout_seconds",
        &[],
    )
    .await?;
    assert_eq!(gauge, 1.0);
    // The client of the closed connection is served again on a new one (tonic reconnects).
    eventually(GUARD, "the idle client to be served again", || async {
        health(idle.clone()).await.ok()
    })
    .await?;
    // The watch is still open: the server ends it when it drains (NOT_SERVING, or its end).
    aggregator.shutdown.cancel();
    let last = next(&mut watch).await;
    assert!(
        !matches!(&last, Ok(Some(r)) if r.status == ServingStatus::Serving as i32),
        "{last:?}"
    );
    drop(watch);
    stopped(aggregator).await
}

#[tokio::test(flavor = "multi_thread")]
async fn at_max_connections_the_longest_idle_makes_room_and_busy_ones_do_not() -> anyhow::Result<()>
{
    init_logging();
    // No idle timeout: room is made only by eviction.
    let mut aggregator = start_aggregator(&[
        "--max-connections",
        "2",
        "--idle-connection-timeout-seconds",
        "0",
    ])
    .await?;
    aggregator.ready("aggregator").await?;
    // One idle connection and one busy one fill the limit. (`ready`'s connections may take a
    // moment to be given back: wait for the idle one to be served.)
    let idle = eventually(GUARD, "a first connection", || async {
        let channel = connect(aggregator.addr).await.ok()?;
        health(channel.clone()).await.ok().map(|_| channel)
    })
    .await?;
    let mut watch = busy(&aggregator).await?;
    // A newcomer is served once the idle one has been idle long enough to be evicted.
    let newcomer = eventually(GUARD, "a newcomer served at the limit", || async {
        let channel = connect(aggregator.addr).await.ok()?;
        health(channel.clone()).await.ok().map(|_| channel)
    })
    .await?;
    let evicted = metric(
        &aggregator,
        "hitcounter_grpc_connections_closed_idle_total",
        &["reason=\"evicted\""],
    )
    .await?;
    assert!(evicted >= 1.0, "served at the limit without an eviction");
    assert_eq!(
        metric(&aggregator, "hitcounter_grpc_connections_open", &[]).await?,
        2.0
    );
    drop(idle);
    // Both open connections busy now: a newcomer is refused, counted, and nothing is evicted.
    let mut client = HealthClient::new(newcomer);
    let call = client.watch(HealthCheckRequest {
        service: String::new(),
    });
    let mut second_watch = tokio::time::timeout(CALL_GUARD, call).await??.into_inner();
    assert!(next(&mut second_watch).await?.is_some());
    let refused_before = metric(
        &aggregator,
        "hitcounter_grpc_connections_refused_total",
        &[],
    )
    .await?;
    let refused = match connect(aggregator.addr).await {
        Ok(channel) => health(channel).await.err(),
        Err(error) => Some(tonic::Status::unavailable(error.to_string())),
    };
    assert!(
        refused.is_some(),
        "served over the limit with every connection busy"
    );
    eventually(GUARD, "the refusal to be counted", || async {
        let refused = metric(
            &aggregator,
            "hitcounter_grpc_connections_refused_total",
            &[],
        )
        .await
        .ok()?;
        (refused > refused_before).then_some(())
    })
    .await?;
    assert_eq!(
        metric(
            &aggregator,
            "hitcounter_grpc_connections_closed_idle_total",
            &["reason=\"evicted\""],
        )
        .await?,
        evicted,
        "a busy connection was evicted"
    );
    aggregator.shutdown.cancel();
    let _ = next(&mut watch).await;
    let _ = next(&mut second_watch).await;
    drop((watch, second_watch));
    stopped(aggregator).await
}

/// Waits for `running` to finish its drain (cancelled before), within [`GUARD`].
async fn stopped(running: Running) -> anyhow::Result<()> {
    tokio::time::timeout(GUARD, running.task)
        .await??
        .map_err(anyhow::Error::msg)
}
