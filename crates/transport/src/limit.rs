//! The connection limit of a server (`--max-connections`) and its idle close
//! (`--idle-connection-timeout-seconds`): each accepted connection takes a permit for as long as
//! it is open. The open count is `hitcounter_grpc_connections_open{service}`.
//!
//! At the limit, a new connection first makes room by closing the longest-idle open connection
//! (no call open on it, idle for at least [`crate::idle::SETTLE`]), counted in
//! `hitcounter_grpc_connections_closed_idle_total{service,reason="evicted"}`. Only when every
//! open connection is busy is the newcomer closed at once, with a log line and
//! `hitcounter_grpc_connections_refused_total{service}`.
//!
//! Why evict rather than refuse: an idle connection costs its client nothing to lose (it
//! reconnects on its next call, one handshake), while a refused client cannot work at all. So
//! a flood of idle connections (10,000 of them filled the default limit in 3 s, measured in
//! docs/performance.md) cannot lock real clients out until the idle timeout runs, however long
//! it is; nginx does the same with idle keep-alive connections when it runs out of
//! `worker_connections`. Longest-idle first, so a flood displaces its own older connections
//! before a client that called recently. What eviction cannot do is make room among busy
//! connections: those are what the limit is for.
//!
//! Why close rather than leave a refused connection in the backlog: a client waiting in the
//! backlog cannot tell a full server from a slow one and holds its connect timeout; a closed
//! connection fails fast and its retry can go to another replica.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

use crate::idle::{Activity, IdleClose, SETTLE};

/// How long a newcomer at the limit waits for the connection it evicted to close (it closes
/// once its socket has been quiet for [`SETTLE`]); after that it is refused.
const EVICTION_WAIT: Duration = Duration::from_secs(3);

/// At most `max` connections open at once on one server; cheap to clone.
#[derive(Debug, Clone)]
pub struct ConnectionLimit {
    permits: Arc<Semaphore>,
    max: usize,
    /// Close a connection idle this long; `None` never (eviction at the limit still applies).
    idle_timeout: Option<Duration>,
    /// Every open connection's activity, to find the longest-idle one at the limit.
    open: Arc<Mutex<Open>>,
    /// The origin of the connections' idle stamps.
    base: Instant,
    /// The service name in metrics and logs.
    service: &'static str,
}

/// The open connections of a [`ConnectionLimit`].
#[derive(Debug, Default)]
struct Open {
    next_id: u64,
    connections: HashMap<u64, Arc<Activity>>,
}

/// One connection's place under a [`ConnectionLimit`] and its idle close, given back when
/// dropped.
#[derive(Debug)]
pub struct ConnectionPermit {
    _permit: OwnedSemaphorePermit,
    id: u64,
    open: Arc<Mutex<Open>>,
    pub(crate) idle: IdleClose,
    service: &'static str,
}

impl ConnectionLimit {
    /// A limit of `max` connections (at least 1) for `service`, without an idle timeout.
    pub fn new(max: usize, service: &'static str) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        metrics::gauge!("hitcounter_grpc_max_connections", "service" => service).set(max as f64);
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
            idle_timeout: None,
            open: Arc::new(Mutex::new(Open::default())),
            base: Instant::now(),
            service,
        }
    }

    /// This limit, closing connections that have had no open call for `timeout` (`None`:
    /// never).
    pub fn with_idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        metrics::gauge!(
            "hitcounter_grpc_idle_connection_timeout_seconds",
            "service" => self.service
        )
        .set(timeout.map_or(0.0, |t| t.as_secs_f64()));
        self.idle_timeout = timeout;
        self
    }

    /// The limit.
    pub fn max(&self) -> usize {
        self.max
    }

    /// A permit for `stream`; at the limit, after closing the longest-idle connection to make
    /// room, or `None` (logged and counted) when none is idle or it did not close in time: the
    /// caller then drops the stream, which closes it.
    pub async fn admit(&self, stream: &tokio::net::TcpStream) -> Option<ConnectionPermit> {
        if let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() {
            return Some(self.permit(permit));
        }
        if self.evict_longest_idle() {
            let freed =
                tokio::time::timeout(EVICTION_WAIT, Arc::clone(&self.permits).acquire_owned())
                    .await;
            if let Ok(Ok(permit)) = freed {
                return Some(self.permit(permit));
            }
        }
        metrics::counter!(
            "hitcounter_grpc_connections_refused_total",
            "service" => self.service
        )
        .increment(1);
        tracing::warn!(
            peer = ?stream.peer_addr().ok(),
            max_connections = self.max,
            service = self.service,
            "refused a connection: --max-connections are open and none is idle"
        );
        None
    }

    /// Asks the connection idle the longest (at least [`SETTLE`]) to close; false when none is.
    fn evict_longest_idle(&self) -> bool {
        let Ok(open) = self.open.lock() else {
            return false;
        };
        let settled = Instant::now().checked_sub(SETTLE);
        let longest = open
            .connections
            .values()
            .filter_map(|activity| activity.idle_since().map(|since| (since, activity)))
            .filter(|(since, _)| settled.is_some_and(|settled| *since <= settled))
            .min_by_key(|(since, _)| *since);
        match longest {
            Some((_, activity)) => {
                activity.evict();
                true
            }
            None => false,
        }
    }

    fn permit(&self, permit: OwnedSemaphorePermit) -> ConnectionPermit {
        let activity = Arc::new(Activity::new(self.base));
        let id = match self.open.lock() {
            Ok(mut open) => {
                let id = open.next_id;
                open.next_id += 1;
                open.connections.insert(id, Arc::clone(&activity));
                id
            }
            // A panic while the lock was held (there is no code that could) leaves eviction
            // without this connection; the limit itself is the semaphore.
            Err(_) => u64::MAX,
        };
        metrics::gauge!("hitcounter_grpc_connections_open", "service" => self.service)
            .increment(1.0);
        ConnectionPermit {
            _permit: permit,
            id,
            open: Arc::clone(&self.open),
            idle: IdleClose::new(activity, self.idle_timeout, self.service),
            service: self.service,
        }
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        if let Ok(mut open) = self.open.lock() {
            open.connections.remove(&self.id);
        }
        metrics::gauge!("hitcounter_grpc_connections_open", "service" => self.service)
            .decrement(1.0);
    }
}
