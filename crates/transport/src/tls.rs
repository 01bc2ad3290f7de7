//! TLS on top of the coalescing connections, server and client side (rustls with ring, through
//! tonic's `tls-ring` on the client and `tokio-rustls` on the server).
//!
//! Server side, a connection is `TLS → CoalescingStream → TcpStream`: rustls turns each HTTP/2
//! write into TLS records and the flush that HTTP/2 asks for after a frame burst reaches the
//! [`CoalescingStream`] below, which still sends the burst as one `write` (records and all).
//!
//! - [`ServerTls`]: the certificate, key and (for mutual TLS) client CA files, loaded into a
//!   rustls `ServerConfig`. [`ServerTls::reload`] reads the files again and swaps the config in
//!   one step: handshakes after it get the new certificate, connections already open keep the
//!   session they negotiated (nothing is dropped). A reload that fails keeps the old config.
//! - [`incoming_tls`]: the accepted connections of a listener after their handshake. Handshakes
//!   run concurrently (at most [`MAX_HANDSHAKES`] at a time, each bounded by
//!   [`HANDSHAKE_TIMEOUT`]), so one slow or silent client cannot hold up the others; a failed
//!   handshake is logged and counted (`hitcounter_tls_handshake_failures_total{reason}`) and the
//!   server goes on. A client that speaks plain text to the TLS port gets a TLS alert record
//!   back (so clients can tell it "the server speaks TLS") and a log line names it.
//! - [`ClientTls`]: a CA file and, for mutual TLS, a client certificate and key, as tonic's
//!   `ClientTlsConfig` for [`crate::connect`] on `https://` endpoints.

use std::{
    io,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use futures::{Stream, StreamExt};
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
    RootCertStore, ServerConfig,
};
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tokio_rustls::{server::TlsStream, TlsAcceptor};

use crate::CoalescingStream;

/// Handshakes in progress at once per listener; past it, accepting waits (the backlog holds
/// further connections) so a flood of slow handshakes cannot take unbounded memory.
pub const MAX_HANDSHAKES: usize = 256;

/// Longest a handshake may take before the connection is closed: a client that connects and
/// says nothing must not keep a handshake slot.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The first byte of a TLS handshake record; anything else on a fresh connection is not TLS.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// A fatal `protocol_version` alert record: what a TLS server answers to bytes that are not TLS.
/// Sent to plain-text clients so they can tell that the port speaks TLS.
const NOT_TLS_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x46];

/// A TLS file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read the {what} file {path}")]
    Read {
        /// Which file (`certificate`, `private key`, `CA`).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file holds no usable PEM of the kind expected.
    #[error("the {what} file {path} holds no PEM {what}: {reason}")]
    Pem {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// rustls refused the certificate, key or CA (e.g. the key does not match the certificate).
    #[error("{what} ({path}): {source}")]
    Rustls {
        /// What was being set up.
        what: &'static str,
        /// The file at fault.
        path: PathBuf,
        /// rustls' reason.
        #[source]
        source: rustls::Error,
    },
    /// The client CA could not make a client-certificate verifier.
    #[error("cannot require client certificates signed by {path}: {source}")]
    ClientVerifier {
        /// The CA file.
        path: PathBuf,
        /// rustls' reason.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// tonic refused the client TLS settings.
    #[error("client TLS settings: {0}")]
    Client(#[source] tonic::transport::Error),
}

/// Where a server's TLS material lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// The certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// The private key of the leaf (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by one of these CAs (PEM).
    pub client_ca: Option<PathBuf>,
}

/// A server's TLS configuration, shared by its accept loop and whoever reloads it.
#[derive(Debug, Clone)]
pub struct ServerTls {
    files: Arc<ServerTlsFiles>,
    /// The config new handshakes use. A std lock: it is held only to clone or swap an `Arc`,
    /// never across an `.await`.
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl ServerTls {
    /// Loads `files`.
    ///
    /// # Errors
    /// [`TlsError`] naming the file that is missing, unreadable, not PEM, or refused (a key that
    /// does not match the certificate).
    pub fn load(files: ServerTlsFiles) -> Result<Self, TlsError> {
        let config = server_config(&files)?;
        Ok(Self {
            files: Arc::new(files),
            current: Arc::new(RwLock::new(Arc::new(config))),
        })
    }

    /// The files this configuration comes from.
    pub fn files(&self) -> &ServerTlsFiles {
        &self.files
    }

    /// Whether clients must present a certificate.
    pub fn requires_client_certs(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// Reads the files again; new handshakes use them, open connections are left alone.
    ///
    /// # Errors
    /// [`TlsError`] as for [`Self::load`]; the configuration in force is then kept.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = Arc::new(server_config(&self.files)?);
        match self.current.write() {
            Ok(mut current) => *current = config,
            // A panic elsewhere while swapping an Arc leaves nothing half-done: take it over.
            Err(poisoned) => *poisoned.into_inner() = config,
        }
        Ok(())
    }

    fn acceptor(&self) -> TlsAcceptor {
        let config = match self.current.read() {
            Ok(current) => Arc::clone(&current),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        };
        TlsAcceptor::from(config)
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// The certificates of the PEM file at `path` (at least one).
fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(what, path)?;
    let pem_error = |reason: String| TlsError::Pem {
        what,
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_error("no `BEGIN CERTIFICATE` section".into()));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read("private key", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        what: "private key",
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates("CA", path)? {
        roots.add(cert).map_err(|source| TlsError::Rustls {
            what: "a CA certificate is unusable",
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_config(files: &ServerTlsFiles) -> Result<ServerConfig, TlsError> {
    let chain = certificates("certificate", &files.cert)?;
    let key = private_key(&files.key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            what: "protocol versions",
            path: files.cert.clone(),
            source,
        })?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                    .build()
                    .map_err(|source| TlsError::ClientVerifier {
                        path: ca.clone(),
                        source,
                    })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    // `with_single_cert` checks that the key matches the leaf certificate.
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::Rustls {
            what: "the private key does not fit the certificate",
            path: files.key.clone(),
            source,
        })?;
    // gRPC is HTTP/2 only; clients (tonic's among them) insist on ALPN `h2`.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The connections accepted on `listener` (with `TCP_NODELAY`, keepalive, coalescing and the
/// connection `limit`, as [`crate::incoming_limited`]) after a successful TLS handshake with
/// `tls`'s current configuration. Failed handshakes are logged and dropped; accept errors are
/// passed on.
pub fn incoming_tls(
    listener: tokio::net::TcpListener,
    tls: ServerTls,
    limit: Option<crate::ConnectionLimit>,
) -> impl Stream<Item = io::Result<TlsStream<CoalescingStream<TcpStream>>>> + Send + 'static {
    crate::accepted(listener, limit)
        .map(move |accepted| {
            let acceptor = tls.acceptor();
            async move {
                match accepted {
                    Ok((stream, permit)) => handshake(acceptor, stream, permit).await,
                    Err(error) => Err(error),
                }
            }
        })
        .buffer_unordered(MAX_HANDSHAKES)
        .filter_map(|handshaken| std::future::ready(handshaken.transpose()))
}

/// One handshake: `Ok(None)` when it failed (logged and counted), so the server goes on.
async fn handshake(
    acceptor: TlsAcceptor,
    mut stream: TcpStream,
    permit: Option<crate::ConnectionPermit>,
) -> io::Result<Option<TlsStream<CoalescingStream<TcpStream>>>> {
    let peer = stream.peer_addr().ok();
    let done = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let mut first = [0u8; 1];
        // Peek, not read: the handshake below must see the byte again.
        let seen = stream.peek(&mut first).await?;
        if seen == 1 && first[0] != TLS_HANDSHAKE_RECORD {
            // Best effort (the client may be gone already): an alert record lets the client
            // tell "this port speaks TLS" from a crash.
            let _ = stream.write_all(&NOT_TLS_ALERT).await;
            let _ = stream.shutdown().await;
            return Ok(None);
        }
        let stream = match permit {
            Some(permit) => CoalescingStream::with_permit(stream, permit),
            None => CoalescingStream::new(stream),
        };
        acceptor.accept(stream).await.map(Some)
    })
    .await;
    let reason = match done {
        Ok(Ok(Some(tls))) => return Ok(Some(tls)),
        Ok(Ok(None)) => {
            tracing::info!(
                peer = ?peer,
                "refused a plain-text connection on a TLS port: the client must use https:// \
                 and trust this server's CA"
            );
            "not_tls"
        }
        Ok(Err(error)) => {
            tracing::info!(peer = ?peer, error = %error, "tls handshake failed");
            "handshake"
        }
        Err(_) => {
            tracing::info!(peer = ?peer, timeout = ?HANDSHAKE_TIMEOUT, "tls handshake timed out");
            "timeout"
        }
    };
    metrics::counter!("hitcounter_tls_handshake_failures_total", "reason" => reason).increment(1);
    Ok(None)
}

/// What a client trusts and, for mutual TLS, presents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// CA certificates (PEM) that sign the server's certificate; `None` trusts nothing extra
    /// (the connection then fails unless the server's CA is given).
    pub ca_cert: Option<PathBuf>,
    /// The client certificate (PEM) for servers that require one.
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
}

impl ClientTls {
    /// tonic's client TLS settings for these files.
    ///
    /// # Errors
    /// [`TlsError`] naming a file that cannot be read or is not PEM.
    pub fn config(&self) -> Result<tonic::transport::ClientTlsConfig, TlsError> {
        let mut config = tonic::transport::ClientTlsConfig::new();
        if let Some(ca) = &self.ca_cert {
            // Parse here too, so a bad file is named now rather than at the first handshake.
            certificates("CA", ca)?;
            config =
                config.ca_certificate(tonic::transport::Certificate::from_pem(read("CA", ca)?));
        }
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                certificates("certificate", cert)?;
                private_key(key)?;
                config = config.identity(tonic::transport::Identity::from_pem(
                    read("certificate", cert)?,
                    read("private key", key)?,
                ));
            }
            (None, None) => {}
            (Some(cert), None) => {
                return Err(TlsError::Pem {
                    what: "private key",
                    path: cert.clone(),
                    reason: "a client certificate needs its key file too".into(),
                })
            }
            (None, Some(key)) => {
                return Err(TlsError::Pem {
                    what: "certificate",
                    path: key.clone(),
                    reason: "a client key needs its certificate file too".into(),
                })
            }
        }
        Ok(config)
    }

    /// `endpoint` with these TLS settings (for an `https://` endpoint).
    ///
    /// # Errors
    /// [`TlsError`] as for [`Self::config`], or when tonic refuses the settings.
    pub fn apply(
        &self,
        endpoint: tonic::transport::Endpoint,
    ) -> Result<tonic::transport::Endpoint, TlsError> {
        endpoint
            .tls_config(self.config()?)
            .map_err(TlsError::Client)
    }
}

/// Whether the server at `addr` answers a plain-text HTTP/2 preface with a TLS record: used by
/// clients to turn an obscure connection error into "the server speaks TLS". `false` when the
/// server cannot be reached or answers anything else.
pub async fn speaks_tls(host: &str, port: u16) -> bool {
    use tokio::io::AsyncReadExt;
    let probe = async {
        let mut stream = TcpStream::connect((host, port)).await.ok()?;
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .ok()?;
        let mut first = [0u8; 1];
        let n = stream.read(&mut first).await.ok()?;
        // 0x15: an alert record; 0x16: a handshake record.
        Some(n == 1 && (first[0] == 0x15 || first[0] == 0x16))
    };
    tokio::time::timeout(Duration::from_secs(2), probe)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{ServerTls, ServerTlsFiles, TlsError};

    /// A self-signed certificate and its key, written to `dir` as `{name}.pem`/`{name}.key`.
    fn write_cert(dir: &Path, name: &str) -> ServerTlsFiles {
        let certified =
            rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("rcgen");
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, certified.cert.pem()).expect("write cert");
        std::fs::write(&key, certified.signing_key.serialize_pem()).expect("write key");
        ServerTlsFiles {
            cert,
            key,
            client_ca: None,
        }
    }

    #[test]
    fn a_key_of_another_certificate_is_refused_naming_the_key_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let one = write_cert(dir.path(), "one");
        let two = write_cert(dir.path(), "two");
        let mixed = ServerTlsFiles {
            key: two.key.clone(),
            ..one
        };
        let error = ServerTls::load(mixed).expect_err("a key of another certificate");
        assert!(matches!(error, TlsError::Rustls { .. }), "{error:?}");
        let message = error.to_string();
        assert!(message.contains("does not fit"), "{message}");
        assert!(
            message.contains(&two.key.display().to_string()),
            "{message}"
        );
    }

    #[test]
    fn a_failed_reload_keeps_the_configuration_in_force() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = write_cert(dir.path(), "server");
        let tls = ServerTls::load(files.clone()).expect("load");
        let before = tls.acceptor().config().clone();
        std::fs::write(&files.cert, "not a certificate").expect("overwrite");
        let error = tls.reload().expect_err("reload of a broken file");
        assert!(error.to_string().contains("holds no PEM"), "{error}");
        assert!(std::sync::Arc::ptr_eq(&before, tls.acceptor().config()));
        // A good file again: the next reload takes it.
        write_cert(dir.path(), "server");
        tls.reload().expect("reload");
        assert!(!std::sync::Arc::ptr_eq(&before, tls.acceptor().config()));
    }

    #[test]
    fn a_missing_file_is_named() {
        let error = ServerTls::load(ServerTlsFiles {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
            client_ca: None,
        })
        .expect_err("missing");
        assert_eq!(
            error.to_string(),
            "cannot read the certificate file /nonexistent/cert.pem"
        );
    }
}
