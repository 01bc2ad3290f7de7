//! A TCP relay whose traffic a test can pass, pause or refuse.

use std::net::SocketAddr;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// What the relay does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkMode {
    /// Relay bytes both ways.
    Pass,
    /// Keep connections open but relay nothing (a hung peer).
    Pause,
    /// Cut every connection and close new ones at once (a dead peer).
    Refuse,
}

/// A running relay in front of `upstream`.
pub struct LinkProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    mode: watch::Sender<LinkMode>,
    /// Where new connections are relayed to; existing ones keep their upstream.
    upstream: watch::Sender<SocketAddr>,
}

impl LinkProxy {
    /// Starts relaying from a new ephemeral port to `upstream`.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (mode, mode_rx) = watch::channel(LinkMode::Pass);
        let (upstream, upstream_rx) = watch::channel(upstream);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *mode_rx.borrow() == LinkMode::Refuse {
                    drop(client);
                    continue;
                }
                let upstream = *upstream_rx.borrow();
                tokio::spawn(relay(client, upstream, mode_rx.clone()));
            }
        });
        Ok(Self {
            addr,
            mode,
            upstream,
        })
    }

    /// Relays new connections to `upstream` from now on (a restarted service on its new
    /// address), so that its peers keep one stable address: this relay's.
    pub fn retarget(&self, upstream: SocketAddr) {
        self.upstream.send_replace(upstream);
    }

    /// Switches the relay's behaviour.
    pub fn set(&self, mode: LinkMode) {
        self.mode.send_replace(mode);
    }
}

async fn relay(client: TcpStream, upstream: SocketAddr, mode: watch::Receiver<LinkMode>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::select! {
        _ = pump(client_read, server_write, mode.clone()) => {}
        _ = pump(server_read, client_write, mode) => {}
    }
}

/// Waits until traffic may pass; false when the link is refused.
async fn may_pass(mode: &mut watch::Receiver<LinkMode>) -> bool {
    loop {
        let current = *mode.borrow_and_update();
        match current {
            LinkMode::Pass => return true,
            LinkMode::Refuse => return false,
            LinkMode::Pause => {
                if mode.changed().await.is_err() {
                    return false;
                }
            }
        }
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<LinkMode>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if !may_pass(&mut mode).await {
            return;
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            // Re-check the mode when it changes while we wait for bytes.
            changed = mode.changed() => {
                if changed.is_err() { return; }
                continue;
            }
        };
        // Bytes read while the link went down are held (pause) or dropped with the link.
        if !may_pass(&mut mode).await || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
