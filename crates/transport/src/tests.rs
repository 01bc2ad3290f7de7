//! The coalescing rules against a recording stream, and a real gRPC round trip over
//! [`super::connect`] and [`super::incoming`].

use std::{
    io,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use futures::task::noop_waker_ref;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::{CoalescingStream, MAX_BUFFERED_BYTES};

/// Records every write it is given, each as one entry; accepts at most `accept` bytes per write.
#[derive(Clone, Default)]
struct Recorder {
    writes: Arc<Mutex<Vec<Vec<u8>>>>,
    accept: Option<usize>,
}

impl Recorder {
    fn writes(&self) -> Vec<Vec<u8>> {
        self.writes.lock().unwrap().clone()
    }
}

impl AsyncWrite for Recorder {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = self.accept.map_or(buf.len(), |most| most.min(buf.len()));
        self.writes.lock().unwrap().push(buf[..n].to_vec());
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn write(stream: &mut CoalescingStream<Recorder>, bytes: &[u8]) {
    let mut cx = Context::from_waker(noop_waker_ref());
    match Pin::new(stream).poll_write(&mut cx, bytes) {
        Poll::Ready(Ok(n)) => assert_eq!(n, bytes.len()),
        other => panic!("write: {other:?}"),
    }
}

fn flush(stream: &mut CoalescingStream<Recorder>) -> Poll<io::Result<()>> {
    let mut cx = Context::from_waker(noop_waker_ref());
    Pin::new(stream).poll_flush(&mut cx)
}

#[test]
fn frames_written_before_the_deferred_flush_leave_as_one_write() {
    let recorder = Recorder::default();
    let mut stream = CoalescingStream::new(recorder.clone());
    write(&mut stream, b"HEADERS");
    assert!(
        flush(&mut stream).is_pending(),
        "the first flush yields once"
    );
    assert!(
        recorder.writes().is_empty(),
        "nothing written while yielding"
    );
    write(&mut stream, b"DATA");
    assert!(matches!(flush(&mut stream), Poll::Ready(Ok(()))));
    assert_eq!(recorder.writes(), vec![b"HEADERSDATA".to_vec()]);
    // The next flush yields again, once.
    write(&mut stream, b"TRAILERS");
    assert!(flush(&mut stream).is_pending());
    assert!(matches!(flush(&mut stream), Poll::Ready(Ok(()))));
    assert_eq!(recorder.writes().len(), 2);
}

#[test]
fn a_flush_with_nothing_pending_does_not_yield() {
    let mut stream = CoalescingStream::new(Recorder::default());
    assert!(matches!(flush(&mut stream), Poll::Ready(Ok(()))));
}

#[test]
fn the_buffer_never_holds_more_than_its_bound() {
    let recorder = Recorder::default();
    let mut stream = CoalescingStream::new(recorder.clone());
    let chunk = vec![7u8; MAX_BUFFERED_BYTES / 4 + 1];
    for _ in 0..4 {
        write(&mut stream, &chunk);
    }
    // The fourth chunk did not fit: the first three went out first.
    assert_eq!(recorder.writes().concat().len(), 3 * chunk.len());
    assert!(stream.pending.len() <= MAX_BUFFERED_BYTES);
    // One write bigger than the bound bypasses the buffer (after what was pending).
    let big = vec![9u8; MAX_BUFFERED_BYTES + 1];
    write(&mut stream, &big);
    let written = recorder.writes().concat();
    assert_eq!(written.len(), 4 * chunk.len() + big.len());
    assert_eq!(&written[4 * chunk.len()..], &big[..]);
    assert!(stream.pending.is_empty());
}

#[test]
fn partial_writes_of_the_socket_are_resumed_in_order() {
    let recorder = Recorder {
        accept: Some(3),
        ..Recorder::default()
    };
    let mut stream = CoalescingStream::new(recorder.clone());
    write(&mut stream, b"abcdefgh");
    assert!(flush(&mut stream).is_pending());
    assert!(matches!(flush(&mut stream), Poll::Ready(Ok(()))));
    assert_eq!(recorder.writes().concat(), b"abcdefgh".to_vec());
}

#[tokio::test]
async fn shutdown_writes_what_is_pending() {
    let recorder = Recorder::default();
    let mut stream = CoalescingStream::new(recorder.clone());
    stream.write_all(b"GOAWAY").await.unwrap();
    stream.shutdown().await.unwrap();
    assert_eq!(recorder.writes(), vec![b"GOAWAY".to_vec()]);
}

#[tokio::test]
async fn a_grpc_call_round_trips_over_a_coalescing_client_and_server() {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("probe", tonic_health::ServingStatus::Serving)
        .await;
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(super::incoming(listener)),
    );
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
    let mut client = HealthClient::new(super::connect(&endpoint).await.unwrap());
    for _ in 0..100 {
        let answer = client
            .check(HealthCheckRequest {
                service: "probe".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.status, 1, "SERVING");
    }
    let lazy = super::connect_lazy(&endpoint);
    let status = HealthClient::new(lazy)
        .check(HealthCheckRequest {
            service: "unknown".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    server.abort();
}
