//! Errors of a call through the client stack, and their one mapping to a gRPC status.

use std::time::Duration;

use tonic::{Code, Status};

/// Why a call to an aggregator failed.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    /// The circuit breaker is open: the aggregator failed repeatedly and is not being called.
    #[error("aggregator unavailable: circuit open")]
    CircuitOpen,
    /// The aggregator did not answer within the per-call deadline.
    #[error("aggregator did not answer within {0:?}")]
    Timeout(Duration),
    /// The aggregator (or the transport to it) answered with an error status.
    #[error("aggregator call failed: {0}")]
    Status(Status),
    /// A middleware failed in a way that has no better name.
    #[error("aggregator call failed: {0}")]
    Other(String),
    /// An aggregator address is not usable.
    #[error("bad aggregator address `{address}`: {reason}")]
    BadAddress {
        /// The address as configured.
        address: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl StackError {
    /// True for failures that say nothing about the request itself (the aggregator was down,
    /// slow or unreachable): these may be retried and count against the circuit breaker.
    pub fn is_transient(&self) -> bool {
        match self {
            StackError::CircuitOpen | StackError::Timeout(_) | StackError::Other(_) => true,
            StackError::Status(status) => is_transient_code(status.code()),
            StackError::BadAddress { .. } => false,
        }
    }
}

/// True for status codes that mean "the aggregator could not do it now", not "the request is bad".
pub(crate) fn is_transient_code(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Cancelled
            | Code::Aborted
    )
}

impl From<StackError> for Status {
    fn from(error: StackError) -> Self {
        match error {
            StackError::CircuitOpen => Status::unavailable("aggregator unavailable: circuit open"),
            StackError::Timeout(after) => Status::unavailable(format!(
                "aggregator unavailable: no answer within {} ms",
                after.as_millis()
            )),
            StackError::Status(status) if is_transient_code(status.code()) => {
                Status::unavailable(format!("aggregator unavailable: {}", status.message()))
            }
            StackError::Status(status) => status,
            StackError::Other(message) => {
                Status::unavailable(format!("aggregator unavailable: {message}"))
            }
            StackError::BadAddress { .. } => Status::internal(error.to_string()),
        }
    }
}
