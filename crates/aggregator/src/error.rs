//! Errors of the aggregator, and their one mapping to a gRPC status.

use tonic::Status;

/// What can go wrong inside the aggregator.
#[derive(Debug, thiserror::Error)]
pub enum AggregatorError {
    /// An owner task is gone (the service is shutting down or an owner failed).
    #[error("aggregator is shutting down")]
    OwnerStopped,
    /// A request is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// A checkpoint could not be taken or written.
    #[error("checkpoint failed: {0}")]
    Checkpoint(String),
    /// The server could not be set up.
    #[error("cannot start the aggregator: {0}")]
    Startup(String),
}

impl From<AggregatorError> for Status {
    fn from(error: AggregatorError) -> Self {
        match error {
            AggregatorError::OwnerStopped => Status::unavailable(error.to_string()),
            AggregatorError::InvalidArgument(message) => Status::invalid_argument(message),
            AggregatorError::Startup(_) | AggregatorError::Checkpoint(_) => {
                Status::internal(error.to_string())
            }
        }
    }
}
