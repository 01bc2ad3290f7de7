//! What a `hitctl` command can fail with, the exit code of each failure, and gRPC status codes
//! spelled the way the gRPC spec and grpcurl spell them (`INVALID_ARGUMENT`).

use hitcounter_cluster::ClusterError;

use crate::{address::ConnectError, load::LoadError};

/// Exit code of a server error, an unreachable server or an unhealthy service.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code of a usage error (the same as `clap`'s).
pub const EXIT_USAGE: u8 = 2;

/// A failed `hitctl` command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The service could not be reached.
    #[error(transparent)]
    Unreachable(#[from] ConnectError),
    /// The server answered with an error status.
    #[error("{}", status_line(.0))]
    Status(tonic::Status),
    /// The arguments do not make sense together (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// The load generator failed.
    #[error(transparent)]
    Load(LoadError),
    /// The cluster's NATS servers, stream or membership could not be reached or read.
    #[error(transparent)]
    Cluster(ClusterError),
    /// Writing the output failed.
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

impl From<tonic::Status> for CliError {
    fn from(status: tonic::Status) -> Self {
        Self::Status(status)
    }
}

impl From<LoadError> for CliError {
    fn from(error: LoadError) -> Self {
        match error {
            LoadError::Unreachable(e) => Self::Unreachable(e),
            LoadError::InvalidConfig(message) => Self::Usage(message),
            other => Self::Load(other),
        }
    }
}

impl From<ClusterError> for CliError {
    fn from(error: ClusterError) -> Self {
        match error {
            // A malformed --nats URL is a usage error, like any other bad flag.
            ClusterError::Config(message) => Self::Usage(message),
            other => Self::Cluster(other),
        }
    }
}

impl CliError {
    /// The process exit code for this error: 2 for usage errors, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => EXIT_USAGE,
            _ => EXIT_FAILURE,
        }
    }

    /// True when stdout was closed by its reader (`hitctl watch | head -3`): not worth a message.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, Self::Output(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }

    /// The message without the code: the server's message for a status, else the whole text.
    pub fn message(&self) -> String {
        match self {
            Self::Status(status) if !status.message().is_empty() => status.message().to_owned(),
            other => other.to_string(),
        }
    }

    /// A short machine-readable kind: the gRPC code name for a status, else `UNREACHABLE`,
    /// `USAGE`, `LOAD`, `CLUSTER` or `OUTPUT`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unreachable(_) | Self::Cluster(ClusterError::Connect { .. }) => "UNREACHABLE",
            Self::Cluster(_) => "CLUSTER",
            Self::Status(status) => hitcounter_proto::code_name(status.code()),
            Self::Usage(_) => "USAGE",
            Self::Load(_) => "LOAD",
            Self::Output(_) => "OUTPUT",
        }
    }
}

/// `CODE: message`, e.g. `INVALID_ARGUMENT: key is empty`.
pub fn status_line(status: &tonic::Status) -> String {
    let message = status.message();
    if message.is_empty() {
        format!(
            "{}: {}",
            hitcounter_proto::code_name(status.code()),
            status.code().description()
        )
    } else {
        format!("{}: {message}", hitcounter_proto::code_name(status.code()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_print_as_code_and_message() {
        let status = tonic::Status::invalid_argument("key is empty");
        assert_eq!(status_line(&status), "INVALID_ARGUMENT: key is empty");
        let error = CliError::from(status);
        assert_eq!(error.to_string(), "INVALID_ARGUMENT: key is empty");
        assert_eq!(error.exit_code(), EXIT_FAILURE);
        assert_eq!(error.code(), "INVALID_ARGUMENT");
        assert_eq!(error.message(), "key is empty");
        assert!(std::error::Error::source(&error).is_none());
        let bare = tonic::Status::new(tonic::Code::Unavailable, "");
        assert!(status_line(&bare).starts_with("UNAVAILABLE: "));
        assert_eq!(CliError::Usage("x".into()).exit_code(), EXIT_USAGE);
    }
}
