//! Errors of the query service, and their one mapping to a gRPC status.

use hitcounter_stack::StackError;
use tonic::Status;

/// What can go wrong in query.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The request breaks a rule of the contract.
    #[error("{0}")]
    Invalid(String),
    /// An aggregator shard could not answer.
    #[error(transparent)]
    Aggregator(#[from] StackError),
    /// The caller's token may not do this, or is over its quota.
    #[error("{0}")]
    Refused(#[from] hitcounter_auth::Refusal),
    /// Too many watches are open.
    #[error("too many open WatchHits streams (limit {0}); close one or raise --max-watches")]
    TooManyWatches(usize),
    /// The server could not be set up.
    #[error("cannot start query: {0}")]
    Startup(String),
}

impl From<QueryError> for Status {
    fn from(error: QueryError) -> Self {
        match error {
            QueryError::Invalid(message) => Status::invalid_argument(message),
            QueryError::Aggregator(error) => Status::from(error),
            QueryError::Refused(refusal) => Status::from(refusal),
            QueryError::TooManyWatches(_) => Status::resource_exhausted(error.to_string()),
            QueryError::Startup(_) => Status::internal(error.to_string()),
        }
    }
}
