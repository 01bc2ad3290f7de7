//! Idle connections: a server connection on which no call has been open for
//! `--idle-connection-timeout-seconds` is closed, and so is the longest-idle one when a new
//! connection arrives at `--max-connections` (see [`crate::ConnectionLimit`]).
//!
//! How it is wired (tonic's server owns the HTTP/2 connection, so the pieces meet through the
//! stream it reads):
//!
//! ```text
//!  accept ── ConnectionLimit::admit ── ConnectionPermit (holds an Activity) ── CoalescingStream
//!                                                                                │
//!  tonic puts the stream's ConnectionInfo (with the Activity) in every request    │ poll_read:
//!  TrackCallsLayer ── a CallGuard per call, dropped with its response body        │ EOF once idle
//! ```
//!
//! A call counts as open from the moment the server starts handling it until its response body
//! is dropped (finished, or reset by the client). When the last one ends, the connection's idle
//! clock starts; bytes the client sends without a call (HTTP/2 pings, settings) do not reset
//! it, so a client that only answers keepalive pings is still idle.
//!
//! Why the close is an end-of-file on the read side and not an HTTP/2 `GOAWAY`: tonic's server
//! (0.14) keeps each connection's handle to itself, so the transport cannot ask hyper for a
//! graceful shutdown of one connection. A connection is only closed while it has no open call,
//! so nothing in flight is cut. The one race, a request that arrives just as the clock runs out,
//! is settled in favour of the request: the close waits until the socket has had nothing to read
//! for [`SETTLE`], by which time a request read from it is an open call; a request the server
//! never read is never handled, and the client's retry (UNAVAILABLE) goes to a new connection.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures::task::AtomicWaker;
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// How long the socket must have had nothing to read before an idle connection is closed: a
/// request read in that time has become an open call by then (its headers are handed to the
/// handler in the same turn of the connection's task), so the close does not race it.
pub const SETTLE: Duration = Duration::from_secs(1);

/// One connection's calls and idle clock, shared by its stream (which closes it) and the calls
/// made on it (which keep it open).
#[derive(Debug)]
pub(crate) struct Activity {
    /// The origin of the millisecond stamps below (the connection limit's creation).
    base: Instant,
    /// Calls started and not yet ended.
    open_calls: AtomicUsize,
    /// When the last call ended (or the connection opened), in ms since `base`.
    idle_since_ms: AtomicU64,
    /// Set by the accept path at `--max-connections`: close as soon as idle and settled.
    evict: AtomicBool,
    /// The connection task, woken when the last call ends (to start the idle clock) or when
    /// the connection is chosen for eviction.
    waker: AtomicWaker,
}

impl Activity {
    /// A connection opened now, idle until its first call.
    pub(crate) fn new(base: Instant) -> Self {
        Self {
            base,
            open_calls: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(millis_since(base)),
            evict: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        }
    }

    /// When the connection became idle, or `None` while a call is open.
    pub(crate) fn idle_since(&self) -> Option<Instant> {
        (self.open_calls.load(Ordering::Acquire) == 0)
            .then(|| self.base + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire)))
    }

    /// Asks the connection to close once it is idle and settled (eviction at the limit).
    pub(crate) fn evict(&self) {
        self.evict.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn call_started(self: &Arc<Self>) -> CallGuard {
        self.open_calls.fetch_add(1, Ordering::AcqRel);
        CallGuard(Arc::clone(self))
    }
}

/// Milliseconds from `base` to now.
fn millis_since(base: Instant) -> u64 {
    u64::try_from(Instant::now().saturating_duration_since(base).as_millis()).unwrap_or(u64::MAX)
}

/// One open call of a connection; dropping it ends the call.
#[derive(Debug)]
struct CallGuard(Arc<Activity>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        let activity = &self.0;
        // Stamp first, then publish zero open calls: whoever sees no open call sees the stamp.
        activity
            .idle_since_ms
            .store(millis_since(activity.base), Ordering::Release);
        if activity.open_calls.fetch_sub(1, Ordering::AcqRel) == 1 {
            activity.waker.wake();
        }
    }
}

/// The idle-close side of a connection, held by its stream.
#[derive(Debug)]
pub(crate) struct IdleClose {
    activity: Arc<Activity>,
    /// `None`: closed only by eviction.
    timeout: Option<Duration>,
    /// The service name in metrics and logs.
    service: &'static str,
    /// When the socket last had bytes to read.
    last_read: Instant,
    /// Armed at the next moment the connection may be closed.
    timer: Option<Pin<Box<Sleep>>>,
    /// Closed (every read from now on is an end-of-file).
    closed: bool,
}

impl IdleClose {
    pub(crate) fn new(
        activity: Arc<Activity>,
        timeout: Option<Duration>,
        service: &'static str,
    ) -> Self {
        Self {
            activity,
            timeout,
            service,
            last_read: Instant::now(),
            timer: None,
            closed: false,
        }
    }

    pub(crate) fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }

    /// Closed: every read is an end-of-file from now on.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed
    }

    /// The socket had bytes to read.
    pub(crate) fn read(&mut self) {
        self.last_read = Instant::now();
    }

    /// Ready when the connection is to be closed now (its reads then end); otherwise arms a
    /// timer (or the activity's waker) for the next moment it may be. Called when the socket
    /// has nothing to read.
    pub(crate) fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.closed {
            return Poll::Ready(());
        }
        self.activity.waker.register(cx.waker());
        loop {
            let Some(idle_since) = self.activity.idle_since() else {
                // A call is open: not idle, not to be evicted (the accept path then refuses
                // its newcomer). The guard of the last call wakes this task.
                self.activity.evict.store(false, Ordering::Release);
                return Poll::Pending;
            };
            let settled = self.last_read + SETTLE;
            let evicted = self.activity.evict.load(Ordering::Acquire);
            let deadline = match (evicted, self.timeout) {
                (true, _) => settled,
                (false, Some(timeout)) => (idle_since + timeout).max(settled),
                (false, None) => return Poll::Pending,
            };
            if Instant::now() >= deadline {
                self.closed = true;
                let reason = if evicted { "evicted" } else { "timeout" };
                metrics::counter!(
                    "hitcounter_grpc_connections_closed_idle_total",
                    "service" => self.service,
                    "reason" => reason
                )
                .increment(1);
                tracing::debug!(
                    service = self.service,
                    reason,
                    idle_for = ?idle_since.elapsed(),
                    "closed an idle connection"
                );
                return Poll::Ready(());
            }
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            // Only ever brought forward: a timer that fires before the deadline loops back here
            // and is set again, which costs less than moving it at every call's end.
            if timer.deadline() > deadline || timer.is_elapsed() {
                timer.as_mut().reset(deadline);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

/// What tonic's server puts in the extensions of every request on one of our connections: the
/// TCP addresses (also inserted as tonic's own [`TcpConnectInfo`] by [`TrackCallsLayer`], so
/// that `Request::remote_addr` works) and the connection's activity.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    tcp: TcpConnectInfo,
    activity: Option<Arc<Activity>>,
}

impl ConnectionInfo {
    pub(crate) fn new(tcp: TcpConnectInfo, activity: Option<Arc<Activity>>) -> Self {
        Self { tcp, activity }
    }

    /// The connection's local and remote addresses.
    pub fn tcp(&self) -> &TcpConnectInfo {
        &self.tcp
    }
}

/// Counts the calls open on each connection (see the module docs), for the idle close. Goes
/// outermost in a server's stack, so that every call counts, refused ones too.
#[derive(Debug, Clone, Copy, Default)]
pub struct TrackCallsLayer;

impl<S> tower::Layer<S> for TrackCallsLayer {
    type Service = TrackCalls<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TrackCalls { inner }
    }
}

/// The service of [`TrackCallsLayer`].
#[derive(Debug, Clone)]
pub struct TrackCalls<S> {
    inner: S,
}

// === impl TrackCalls ===

impl<S, B> tower::Service<http::Request<B>> for TrackCalls<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let extensions = request.extensions();
        let info = extensions.get::<ConnectionInfo>().cloned().or_else(|| {
            extensions
                .get::<TlsConnectInfo<ConnectionInfo>>()
                .map(|tls| tls.get_ref().clone())
        });
        let guard = info
            .as_ref()
            .and_then(|info| info.activity.as_ref())
            .map(Activity::call_started);
        if let Some(info) = info {
            request.extensions_mut().insert(info.tcp);
        }
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(match guard {
                Some(guard) => response.map(|body| {
                    tonic::body::Body::new(Tracked {
                        body,
                        _guard: guard,
                    })
                }),
                None => response,
            })
        })
    }
}

/// A response body that keeps its call open until it is dropped.
struct Tracked {
    body: tonic::body::Body,
    _guard: CallGuard,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
