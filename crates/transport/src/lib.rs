//! The TCP connections under every gRPC call of hitcounter, client and server side, wrapped so
//! that what HTTP/2 sends in several flushes close together leaves as one write.
//!
//! Why this exists (measured with `strace` on query, 1000 `GetHits`/s): hyper's HTTP/2 client
//! writes a unary request as two writes, the `HEADERS` frame and then, one poll of its
//! connection task later, the `DATA` frame (a new stream only gets flow-control capacity for
//! its body once the connection task has opened it). The server side splits a response the same
//! way when its connection task runs on another thread than the handler (`HEADERS`+`DATA`, then
//! the trailers). Each write is a TCP segment that wakes the peer, and on a small VM a wake-up
//! is most of a loopback round trip, so every hop cost two wake-ups instead of one.
//!
//! [`CoalescingStream`] buffers writes and, the first time a flush is asked for, yields once to
//! the runtime before writing: the task that is about to add the next frame (the body, the
//! trailers) runs first, and the flush that follows sends everything as one `write`. The delay
//! is one scheduler turn (microseconds) and bounded: a second flush always writes. The buffer is
//! bounded too ([`MAX_BUFFERED_BYTES`]); past it, writes go through to the socket.
//!
//! Clients get their [`tonic::transport::Channel`] from [`connect`] or [`connect_lazy`] (with
//! [`tls::ClientTls`] applied to the endpoint for `https://`: tonic runs the TLS client on top of
//! our connection); servers wrap their listener with [`incoming`], or with [`tls::incoming_tls`]
//! to serve TLS (the handshake runs on top of the [`CoalescingStream`], so every TLS flush is
//! still one write).

pub mod idle;
pub mod tls;

mod limit;

pub use idle::{ConnectionInfo, TrackCalls, TrackCallsLayer};
pub use limit::{ConnectionLimit, ConnectionPermit};

use std::{
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};

use futures::{Stream, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tonic::transport::{
    server::{Connected, TcpIncoming},
    Channel, Endpoint, Uri,
};

/// Bytes held back while a flush is deferred. An HTTP/2 connection writes frames of at most
/// 16 KiB at a time, so a few frames fit; anything beyond goes to the socket at once.
pub const MAX_BUFFERED_BYTES: usize = 64 * 1024;

/// A byte stream whose writes are gathered until a flush, and whose first flush yields once so
/// that frames queued by other tasks in the same scheduler turn leave in the same write.
#[derive(Debug)]
pub struct CoalescingStream<S> {
    inner: S,
    /// Bytes accepted from the caller and not yet written to `inner`.
    pending: Vec<u8>,
    /// How much of `pending` is already written (a socket may take part of it).
    written: usize,
    /// The current flush has already yielded once.
    yielded: bool,
    /// This connection's place under `--max-connections`, given back when it is dropped, and
    /// its idle close (see [`idle`]).
    permit: Option<ConnectionPermit>,
}

impl<S> CoalescingStream<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            pending: Vec::new(),
            written: 0,
            yielded: false,
            permit: None,
        }
    }

    /// Wraps `inner`, holding `permit` (a place under a connection limit) while it lives.
    pub fn with_permit(inner: S, permit: ConnectionPermit) -> Self {
        Self {
            permit: Some(permit),
            ..Self::new(inner)
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncWrite + Unpin> CoalescingStream<S> {
    /// Writes out every pending byte.
    fn poll_write_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.pending.len() {
            let n =
                ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.pending.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// Makes room for `len` more bytes: writes out what is pending when the buffer would grow
    /// past [`MAX_BUFFERED_BYTES`]. Returns false when the bytes should bypass the buffer.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<bool>> {
        if self.pending.len() + len > MAX_BUFFERED_BYTES {
            ready!(self.poll_write_pending(cx))?;
        }
        Poll::Ready(Ok(len <= MAX_BUFFERED_BYTES))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CoalescingStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // An idle connection ends here: its reads see end-of-file, and hyper closes it.
        if let Some(permit) = &mut self.permit {
            if permit.idle.is_closed() {
                return Poll::Ready(Ok(()));
            }
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Some(permit) = &mut self.permit {
            match read {
                Poll::Ready(_) if buf.filled().len() > before => permit.idle.read(),
                Poll::Pending if permit.idle.poll_close(cx).is_ready() => {
                    return Poll::Ready(Ok(()));
                }
                _ => {}
            }
        }
        read
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CoalescingStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if !ready!(self.poll_room(cx, buf.len()))? {
            return Pin::new(&mut self.inner).poll_write(cx, buf);
        }
        self.pending.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        if !ready!(self.poll_room(cx, len))? {
            return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        }
        for buf in bufs {
            self.pending.extend_from_slice(buf);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.written < self.pending.len() {
            if !self.yielded {
                // Once per flush: let the tasks woken in this turn (the body, the trailers)
                // queue their frames; the caller polls this flush again right after them.
                // (tokio's deferred `yield_now` instead of this self-wake was measured: fewer
                // context switches in the two-worker aggregator, but more CPU per query there
                // and in the one-worker query, as each deferred yield adds a driver poll.)
                self.yielded = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            ready!(self.poll_write_pending(cx))?;
        }
        self.yielded = false;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_write_pending(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Connected for CoalescingStream<TcpStream> {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        ConnectionInfo::new(
            self.inner.connect_info(),
            self.permit
                .as_ref()
                .map(|permit| std::sync::Arc::clone(permit.idle.activity())),
        )
    }
}

/// Opens a TCP connection to `uri`'s host and port with `TCP_NODELAY` (small messages must not
/// wait for the peer's delayed ACK), wrapped for hyper.
async fn dial(uri: Uri) -> io::Result<TokioIo<CoalescingStream<TcpStream>>> {
    let host = uri
        .host()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("no host in {uri}")))?;
    // `[::1]` in a URI is `::1` to the resolver.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let default_port = if uri.scheme_str() == Some("https") {
        443
    } else {
        80
    };
    let port = uri.port_u16().unwrap_or(default_port);
    let stream = TcpStream::connect((host, port)).await?;
    stream.set_nodelay(true)?;
    Ok(TokioIo::new(CoalescingStream::new(stream)))
}

/// A channel over coalescing connections that connects on first use (and reconnects after a
/// failure), with `endpoint`'s timeouts and HTTP/2 settings.
pub fn connect_lazy(endpoint: &Endpoint) -> Channel {
    endpoint.connect_with_connector_lazy(tower::service_fn(dial))
}

/// A channel over coalescing connections, connected now.
///
/// # Errors
/// The transport error when the connection cannot be made.
pub async fn connect(endpoint: &Endpoint) -> Result<Channel, tonic::transport::Error> {
    endpoint
        .connect_with_connector(tower::service_fn(dial))
        .await
}

/// The connections accepted on `listener`, with `TCP_NODELAY` and TCP keepalive set, each
/// wrapped in a [`CoalescingStream`]; for `serve_with_incoming*`. Without `TCP_NODELAY`, small
/// responses (acks, counts) wait for Nagle's algorithm and the peer's delayed ACK: about 40 ms
/// each, measured as the p50 of ack-to-visible latency before it was set.
pub fn incoming(
    listener: tokio::net::TcpListener,
) -> impl Stream<Item = io::Result<CoalescingStream<TcpStream>>> + Send + 'static {
    incoming_limited(listener, None)
}

/// [`incoming`], with at most `limit` connections open at once: a connection over the limit is
/// closed as soon as it is accepted, logged and counted (see [`ConnectionLimit`]).
pub fn incoming_limited(
    listener: tokio::net::TcpListener,
    limit: Option<ConnectionLimit>,
) -> impl Stream<Item = io::Result<CoalescingStream<TcpStream>>> + Send + 'static {
    accepted(listener, limit).map(|accepted| {
        accepted.map(|(stream, permit)| match permit {
            Some(permit) => CoalescingStream::with_permit(stream, permit),
            None => CoalescingStream::new(stream),
        })
    })
}

/// The TCP connections accepted on `listener` (`TCP_NODELAY`, keepalive) that fit under
/// `limit`, each with its permit; the others are refused here.
fn accepted(
    listener: tokio::net::TcpListener,
    limit: Option<ConnectionLimit>,
) -> impl Stream<Item = io::Result<(TcpStream, Option<ConnectionPermit>)>> + Send + 'static {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(std::time::Duration::from_secs(60)))
        .filter_map(move |accepted| {
            let limit = limit.clone();
            async move {
                match (accepted, limit) {
                    (Err(error), _) => Some(Err(error)),
                    (Ok(stream), None) => Some(Ok((stream, None))),
                    (Ok(stream), Some(limit)) => limit
                        .admit(&stream)
                        .await
                        .map(|permit| Ok((stream, Some(permit)))),
                }
            }
        })
}

#[cfg(test)]
mod tests;
