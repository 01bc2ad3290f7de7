//! Service addresses: `host:port`, `http://host:port` or `https://host:port` (TLS, with the CA of
//! `--ca-cert`), and opening a gRPC channel to one with a connect timeout and an error that tells
//! the user what to do when nobody answers, or when a plain-text address reaches a TLS port.

use std::{fmt, path::PathBuf, time::Duration};

use tonic::transport::{Channel, Endpoint};

/// A service address the user gave, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// `host:port`, as shown in messages.
    host_port: String,
    /// `https://`: connect with TLS.
    tls: bool,
    /// The CA that signs the server's certificate (`--ca-cert`), for TLS.
    ca_cert: Option<PathBuf>,
}

/// An address that is not `host:port` or `http://host:port`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid address `{input}`: {reason}; expected `HOST:PORT`, `http://HOST:PORT` or `https://HOST:PORT`, e.g. `127.0.0.1:50053`")]
pub struct AddressError {
    /// What the user typed.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

impl Address {
    /// Parses `host:port`, `http://host:port` or `https://host:port` (a trailing `/` is allowed).
    ///
    /// # Errors
    /// [`AddressError`] naming the accepted forms.
    pub fn parse(input: &str) -> Result<Self, AddressError> {
        let error = |reason: &str| AddressError {
            input: input.to_owned(),
            reason: reason.to_owned(),
        };
        let text = input.trim();
        let (rest, tls) = match text.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => (rest, false),
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") => (rest, true),
            Some((scheme, _)) => return Err(error(&format!("unknown scheme `{scheme}`"))),
            None => (text, false),
        };
        let host_port = rest.strip_suffix('/').unwrap_or(rest);
        if host_port.is_empty() {
            return Err(error("it is empty"));
        }
        if host_port.contains(['/', '?', '#', ' ', '@']) {
            return Err(error("only a host and a port are expected"));
        }
        let Some((host, port)) = host_port.rsplit_once(':') else {
            return Err(error("the port is missing"));
        };
        if host.is_empty() || host == "[" {
            return Err(error("the host is missing"));
        }
        if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
            return Err(error("write IPv6 hosts in brackets, e.g. `[::1]:50053`"));
        }
        match port.parse::<u16>() {
            Ok(0) | Err(_) => return Err(error(&format!("bad port `{port}`"))),
            Ok(_) => {}
        }
        Endpoint::from_shared(format!("http://{host_port}")).map_err(|e| error(&e.to_string()))?;
        Ok(Self {
            host_port: host_port.to_owned(),
            tls,
            ca_cert: None,
        })
    }

    /// The URI tonic connects to.
    pub fn uri(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.host_port)
    }

    /// Whether this is an `https://` address.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// This address, trusting `ca_cert` (`--ca-cert`) for TLS.
    pub fn with_ca_cert(mut self, ca_cert: Option<PathBuf>) -> Self {
        self.ca_cert = ca_cert;
        self
    }

    /// The CA given for this address (`--ca-cert`).
    pub fn ca_cert(&self) -> Option<&std::path::Path> {
        self.ca_cert.as_deref()
    }

    /// The host and port, for a raw probe.
    fn host_and_port(&self) -> Option<(&str, u16)> {
        let (host, port) = self.host_port.rsplit_once(':')?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        Some((host, port.parse().ok()?))
    }

    /// Whether the server at this plain-text address answers in TLS (then the user wants
    /// `https://`); asked only after a failure, to explain it.
    pub async fn speaks_tls(&self) -> bool {
        match self.host_and_port() {
            Some((host, port)) if !self.tls => {
                hitcounter_transport::tls::speaks_tls(host, port).await
            }
            _ => false,
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.tls {
            f.write_str("https://")?;
        }
        f.write_str(&self.host_port)
    }
}

impl std::str::FromStr for Address {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// The connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Nothing answered (or the connection failed).
    #[error("cannot reach {service} at {address}: is the stack running? try `docker compose up`")]
    Unreachable {
        /// What was being reached (`ingest`, `query`, …).
        service: String,
        /// Where.
        address: Address,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// A plain-text address reached a port that speaks TLS.
    #[error(
        "cannot talk to {service} at {address}: the server speaks TLS: use https:// and --ca-cert"
    )]
    ServerSpeaksTls {
        /// What was being reached.
        service: String,
        /// Where.
        address: Address,
    },
    /// An `https://` address without `--ca-cert`.
    #[error(
        "{service} at {address} is https://: give --ca-cert (the CA that signs its certificate)"
    )]
    NoCaCert {
        /// What was being reached.
        service: String,
        /// Where.
        address: Address,
    },
    /// The `--ca-cert` file cannot be used.
    #[error("--ca-cert for {service} at {address}")]
    Tls {
        /// What was being reached.
        service: String,
        /// Where.
        address: Address,
        /// Why.
        #[source]
        source: Box<hitcounter_transport::tls::TlsError>,
    },
}

impl ConnectError {
    /// The error of a call that failed at the transport: when the address is plain text and
    /// the server turns out to speak TLS, [`ConnectError::ServerSpeaksTls`]; `None` otherwise
    /// (the status says enough).
    pub async fn explain_call_failure(
        status: &tonic::Status,
        address: &Address,
        service: &str,
    ) -> Option<Self> {
        let transport = matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal
        );
        (transport && address.speaks_tls().await).then(|| Self::ServerSpeaksTls {
            service: service.to_owned(),
            address: address.clone(),
        })
    }
}

/// Connects to `address` (named `service` in errors), giving up after `timeout`.
///
/// # Errors
/// [`ConnectError`] when nothing answers in time.
pub async fn connect(
    address: &Address,
    service: &str,
    timeout: Duration,
) -> Result<Channel, ConnectError> {
    let error = |source| ConnectError::Unreachable {
        service: service.to_owned(),
        address: address.clone(),
        source,
    };
    let mut endpoint = Endpoint::from_shared(address.uri())
        .map_err(error)?
        .connect_timeout(timeout);
    if address.tls {
        let Some(ca_cert) = &address.ca_cert else {
            return Err(ConnectError::NoCaCert {
                service: service.to_owned(),
                address: address.clone(),
            });
        };
        let tls = hitcounter_transport::tls::ClientTls {
            ca_cert: Some(ca_cert.clone()),
            ..Default::default()
        };
        endpoint = tls.apply(endpoint).map_err(|source| ConnectError::Tls {
            service: service.to_owned(),
            address: address.clone(),
            source: Box::new(source),
        })?;
    }
    match hitcounter_transport::connect(&endpoint).await {
        Ok(channel) => Ok(channel),
        Err(_) if address.speaks_tls().await => Err(ConnectError::ServerSpeaksTls {
            service: service.to_owned(),
            address: address.clone(),
        }),
        Err(source) => Err(error(source)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_forms() {
        for (input, shown) in [
            ("127.0.0.1:50053", "127.0.0.1:50053"),
            ("http://127.0.0.1:50053", "127.0.0.1:50053"),
            ("HTTP://localhost:50051/", "localhost:50051"),
            ("query:50053", "query:50053"),
            ("[::1]:50053", "[::1]:50053"),
        ] {
            let address = Address::parse(input).expect(input);
            assert_eq!(address.to_string(), shown);
            assert_eq!(address.uri(), format!("http://{shown}"));
        }
        let tls = Address::parse("https://query:50053/").expect("https");
        assert!(tls.is_tls());
        assert_eq!(tls.uri(), "https://query:50053");
        assert_eq!(tls.to_string(), "https://query:50053");
    }

    #[test]
    fn rejected_forms_say_what_is_expected() {
        for input in [
            "",
            "127.0.0.1",
            ":50053",
            "localhost:0",
            "localhost:http",
            "localhost:99999",
            "grpc://localhost:50053",
            "http://localhost:50053/path",
            "::1:50053",
        ] {
            let err = Address::parse(input).expect_err(input).to_string();
            assert!(err.contains("`HOST:PORT`"), "{input}: {err}");
        }
    }
}
