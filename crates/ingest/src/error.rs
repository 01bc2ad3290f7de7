//! Errors of the ingest service, and their one mapping to a gRPC status.

use tonic::Status;

/// What can go wrong in ingest.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The request breaks a validation rule; nothing of it was counted.
    #[error("{0}")]
    Invalid(#[from] crate::validate::ValidationError),
    /// The caller's token may not do this, or is over its quota; nothing of it was counted.
    #[error("{0}")]
    Refused(#[from] hitcounter_auth::Refusal),
    /// The buffer stayed full for the whole enqueue timeout.
    #[error("ingest buffer is full (the aggregator is slow or unavailable); nothing of this request was counted, retry with backoff")]
    BufferFull,
    /// The batch-id ledger is full of ids younger than the dedup horizon.
    #[error("too many distinct batch ids in the dedup horizon; nothing of this request was counted, retry later or send without batch_id")]
    LedgerFull,
    /// The durable log is at its disk budget.
    #[error("ingest's durable buffer is full (the aggregator is down or slow); nothing of this request was counted, retry with backoff")]
    LogFull,
    /// The durable log is at its disk budget because an aggregator refuses batches at its key
    /// limit ("aggregator key limit reached on shard N: …").
    #[error("{0}; nothing of this request was counted, retry with backoff")]
    AggregatorKeyLimit(String),
    /// The file system holding the durable log is full (the message says which file).
    #[error("{0}; nothing of this request was counted, retry with backoff")]
    DiskFull(String),
    /// The durable log cannot be written or read.
    #[error("ingest log failure: {0}")]
    Log(String),
    /// Clustered mode: the cluster's log is at `--nats-max-bytes`.
    #[error("the cluster's log is full (the aggregators are not keeping up, or --nats-max-bytes is too low); nothing of this request was counted, retry with backoff")]
    ClusterLogFull,
    /// Clustered mode: the cluster's log did not take the hits.
    #[error("{0}")]
    ClusterLog(String),
    /// Another call with the same batch id is still being recorded.
    #[error("another call with this batch_id is still being recorded; retry to learn its outcome")]
    BatchInFlight,
    /// The pipeline is shutting down.
    #[error("ingest is shutting down; retry on another instance")]
    ShuttingDown,
    /// A pipeline stage stopped unexpectedly.
    #[error("ingest stage `{0}` stopped")]
    StageStopped(&'static str),
    /// The server could not be set up.
    #[error("cannot start ingest: {0}")]
    Startup(String),
}

impl IngestError {
    /// The label of `hitcounter_ingest_hits_rejected_total` for this error.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            IngestError::Invalid(error) => error.reason(),
            IngestError::Refused(refusal) => refusal.reason(),
            IngestError::BufferFull => "buffer_full",
            IngestError::LedgerFull => "ledger_full",
            IngestError::LogFull => "log_full",
            IngestError::AggregatorKeyLimit(_) => "aggregator_key_limit",
            IngestError::DiskFull(_) => "disk_full",
            IngestError::Log(_) => "log_failure",
            IngestError::ClusterLogFull => "cluster_log_full",
            IngestError::ClusterLog(_) => "cluster_log_failure",
            IngestError::BatchInFlight => "batch_in_flight",
            IngestError::ShuttingDown => "shutting_down",
            IngestError::StageStopped(_) | IngestError::Startup(_) => "internal",
        }
    }
}

impl From<IngestError> for Status {
    fn from(error: IngestError) -> Self {
        if let IngestError::Refused(refusal) = error {
            return Status::from(refusal);
        }
        match &error {
            IngestError::Invalid(_) => Status::invalid_argument(error.to_string()),
            IngestError::BufferFull
            | IngestError::LedgerFull
            | IngestError::LogFull
            | IngestError::ClusterLogFull
            | IngestError::AggregatorKeyLimit(_)
            | IngestError::DiskFull(_) => Status::resource_exhausted(error.to_string()),
            IngestError::BatchInFlight => Status::aborted(error.to_string()),
            IngestError::ShuttingDown
            | IngestError::StageStopped(_)
            | IngestError::Log(_)
            | IngestError::ClusterLog(_) => Status::unavailable(error.to_string()),
            IngestError::Startup(_) => Status::internal(error.to_string()),
            // Answered above, with its retry-after-ms metadata.
            IngestError::Refused(_) => Status::internal(error.to_string()),
        }
    }
}
