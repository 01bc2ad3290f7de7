//! The connection limit of a server (`--max-connections`): each accepted connection takes a
//! permit for as long as it is open; a connection accepted while none is left is closed at
//! once, with a log line and `hitcounter_grpc_connections_refused_total{service}`. The open
//! count is `hitcounter_grpc_connections_open{service}`.
//!
//! Why close rather than leave it in the backlog: a client waiting in the backlog cannot tell a
//! full server from a slow one and holds its connect timeout; a closed connection fails fast and
//! its retry can go to another replica.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// At most `max` connections open at once on one server; cheap to clone.
#[derive(Debug, Clone)]
pub struct ConnectionLimit {
    permits: Arc<Semaphore>,
    max: usize,
    /// The service name in metrics and logs.
    service: &'static str,
}

/// One connection's place under a [`ConnectionLimit`], given back when dropped.
#[derive(Debug)]
pub struct ConnectionPermit {
    _permit: OwnedSemaphorePermit,
    service: &'static str,
}

impl ConnectionLimit {
    /// A limit of `max` connections (at least 1) for `service`.
    pub fn new(max: usize, service: &'static str) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        metrics::gauge!("hitcounter_grpc_max_connections", "service" => service).set(max as f64);
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
            service,
        }
    }

    /// The limit.
    pub fn max(&self) -> usize {
        self.max
    }

    /// A permit for `stream`, or `None` (logged and counted) when the limit is reached; the
    /// caller then drops the stream, which closes it.
    pub fn admit(&self, stream: &tokio::net::TcpStream) -> Option<ConnectionPermit> {
        match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => {
                metrics::gauge!("hitcounter_grpc_connections_open", "service" => self.service)
                    .increment(1.0);
                Some(ConnectionPermit {
                    _permit: permit,
                    service: self.service,
                })
            }
            Err(_) => {
                metrics::counter!(
                    "hitcounter_grpc_connections_refused_total",
                    "service" => self.service
                )
                .increment(1);
                tracing::warn!(
                    peer = ?stream.peer_addr().ok(),
                    max_connections = self.max,
                    service = self.service,
                    "refused a connection: --max-connections are open"
                );
                None
            }
        }
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        metrics::gauge!("hitcounter_grpc_connections_open", "service" => self.service)
            .decrement(1.0);
    }
}
