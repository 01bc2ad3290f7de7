//! Service addresses: `host:port` or `http://host:port`, and opening a gRPC channel to one with a
//! connect timeout and an error that tells the user what to do when nobody answers.

use std::{fmt, time::Duration};

use tonic::transport::{Channel, Endpoint};

/// A service address the user gave, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// `host:port`, as shown in messages.
    host_port: String,
}

/// An address that is not `host:port` or `http://host:port`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid address `{input}`: {reason}; expected `HOST:PORT` or `http://HOST:PORT`, e.g. `127.0.0.1:50053`")]
pub struct AddressError {
    /// What the user typed.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

impl Address {
    /// Parses `host:port` or `http://host:port` (a trailing `/` is allowed).
    ///
    /// # Errors
    /// [`AddressError`] naming the accepted forms.
    pub fn parse(input: &str) -> Result<Self, AddressError> {
        let error = |reason: &str| AddressError {
            input: input.to_owned(),
            reason: reason.to_owned(),
        };
        let text = input.trim();
        let rest = match text.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => {
                return Err(error("TLS (https) is not supported"))
            }
            Some((scheme, _)) => return Err(error(&format!("unknown scheme `{scheme}`"))),
            None => text,
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
        })
    }

    /// The URI tonic connects to.
    pub fn uri(&self) -> String {
        format!("http://{}", self.host_port)
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
#[error("cannot reach {service} at {address}: is the stack running? try `docker compose up`")]
pub struct ConnectError {
    /// What was being reached (`ingest`, `query`, …).
    pub service: String,
    /// Where.
    pub address: Address,
    /// The transport error.
    #[source]
    pub source: tonic::transport::Error,
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
    let error = |source| ConnectError {
        service: service.to_owned(),
        address: address.clone(),
        source,
    };
    let endpoint = Endpoint::from_shared(address.uri())
        .map_err(error)?
        .connect_timeout(timeout);
    hitcounter_transport::connect(&endpoint)
        .await
        .map_err(error)
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
            "https://localhost:50053",
            "grpc://localhost:50053",
            "http://localhost:50053/path",
            "::1:50053",
        ] {
            let err = Address::parse(input).expect_err(input).to_string();
            assert!(err.contains("`HOST:PORT`"), "{input}: {err}");
        }
    }
}
