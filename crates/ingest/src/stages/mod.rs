//! The stages of the ingest pipeline, in data-flow order:
//!
//! 1. [`combine`]: merges hits of the same (key, second) into deltas and splits them by shard;
//! 2. [`log`]: appends each flush to the shards' durable logs (one fsync for all the requests in
//!    it: group commit), then acknowledges those requests;
//! 3. [`forward`]: one per shard, reads its log and sends the batches to the aggregator over a
//!    long-lived `Apply` stream ([`link`]) through the client stack, until the aggregator reports
//!    them durable; the log stage then trims them.
//!
//! Validation and the batch-id ledger run before stage 1, in the gRPC handlers.

pub(crate) mod combine;
pub(crate) mod encoded;
pub(crate) mod forward;
pub(crate) mod link;
pub(crate) mod log;

use hitcounter_proto::aggregator::v1::Delta;
use tokio::sync::oneshot;

use crate::{ledger::ClaimGuard, validate::ValidHit};

/// Why a request's hits could not be made durable.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum DurableError {
    /// Writing would exceed `--max-buffer-bytes` (the aggregator is not taking data fast enough).
    #[error("the ingest log holds {used} bytes and this would exceed its budget of {budget} bytes (--max-buffer-bytes): the aggregator is down or slow")]
    Full {
        /// Bytes held.
        used: u64,
        /// The budget.
        budget: u64,
    },
    /// The log is at its budget while an aggregator refuses this ingest's batches at its key
    /// limit (the backlog is held back there, not by a slow aggregator): the message names the
    /// shard and the aggregator's reason.
    #[error("{0}")]
    KeyLimit(String),
    /// The file system holding the log is full: nothing of the flush was written.
    #[error("the disk holding the ingest log is full: {0}")]
    DiskFull(String),
    /// The disk failed.
    #[error("cannot write the ingest log: {0}")]
    Io(String),
}

/// Tells a waiting request whether its hits are durable.
pub(crate) type Durable = oneshot::Sender<Result<(), DurableError>>;

/// One request's hits on their way to the log.
#[derive(Debug)]
pub(crate) struct Pending {
    /// The validated hits.
    pub(crate) hits: Vec<ValidHit>,
    /// Resolved once the hits are durable (or failed).
    pub(crate) done: Durable,
    /// The request's claim on its batch id, recorded with the hits (so that deduplication
    /// survives a restart) and completed by the log stage once they are durable: from here on
    /// the claim lives with the hits, not with the request handler, so a caller that goes away
    /// (deadline, broken stream) cannot release an id whose hits are already on their way.
    pub(crate) batch_id: Option<Claimed>,
}

/// What `combine` hands to `log`: the merged deltas of many requests.
#[derive(Debug)]
pub(crate) struct Flush {
    /// Deltas per shard (index = shard).
    pub(crate) shards: Vec<Vec<Delta>>,
    /// The requests whose hits these are.
    pub(crate) waiters: Vec<Durable>,
    /// Their batch-id claims.
    pub(crate) batch_ids: Vec<Claimed>,
}

/// A claimed batch id and the hits its batch holds.
#[derive(Debug)]
pub(crate) struct Claimed {
    pub(crate) guard: ClaimGuard,
    pub(crate) accepted: u64,
}
