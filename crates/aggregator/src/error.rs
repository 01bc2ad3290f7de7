//! Errors of the aggregator, and their one mapping to a gRPC status.

use tonic::Status;

/// What can go wrong inside the aggregator.
#[derive(Debug, thiserror::Error)]
pub enum AggregatorError {
    /// An owner task is gone (the service is shutting down or an owner failed).
    #[error("aggregator is shutting down")]
    OwnerStopped,
    /// A batch was refused whole because its new keys do not fit under `--max-keys`: nothing
    /// of it was applied and it is not recorded as applied. Not a failure of the batch: send
    /// the same batch again later (keys age out of the retention, or the limit is raised).
    #[error(transparent)]
    KeyLimit(#[from] KeyLimitRefusal),
    /// A request is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// A checkpoint could not be taken or written.
    #[error("checkpoint failed: {0}")]
    Checkpoint(String),
    /// The server could not be set up.
    #[error("cannot start the aggregator: {0}")]
    Startup(String),
    /// Clustered mode: the cluster's log could not be read.
    #[error("cannot read the cluster's log: {0}")]
    Log(#[from] hitcounter_cluster::ClusterError),
    /// Clustered mode: this replica does not serve the key's partition now: it is still
    /// reading it from the log (its counts may be behind), or the partition is not placed
    /// here; query asks another replica.
    #[error("this aggregator does not serve partition {partition} now (catching up with the cluster's log, or not placed here; applied through position {applied}); ask another replica")]
    CatchingUp {
        /// The partition asked for.
        partition: u32,
        /// The highest stream position applied so far.
        applied: u64,
    },
}

/// Why a batch was refused at the key limit: the owner (a share of the key space) that has no
/// room for the batch's new keys, and its figures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "key limit of {limit} keys reached in owner {owner} (--max-keys split over the owners): it \
     holds {held} keys and {reserved} more are promised to batches being applied, and this batch \
     brings {new} new ones; the batch was not applied"
)]
pub struct KeyLimitRefusal {
    /// The owner without room.
    pub owner: usize,
    /// Its share of `--max-keys`.
    pub limit: usize,
    /// Keys it holds.
    pub held: usize,
    /// Room reserved by batches being applied.
    pub reserved: usize,
    /// Distinct new keys of this batch in that owner.
    pub new: usize,
}

impl From<AggregatorError> for Status {
    fn from(error: AggregatorError) -> Self {
        match error {
            AggregatorError::OwnerStopped
            | AggregatorError::CatchingUp { .. }
            | AggregatorError::Log(_) => Status::unavailable(error.to_string()),
            AggregatorError::KeyLimit(_) => Status::resource_exhausted(error.to_string()),
            AggregatorError::InvalidArgument(message) => Status::invalid_argument(message),
            AggregatorError::Startup(_) | AggregatorError::Checkpoint(_) => {
                Status::internal(error.to_string())
            }
        }
    }
}
