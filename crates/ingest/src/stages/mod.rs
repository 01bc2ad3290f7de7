//! The stages of the ingest pipeline, in data-flow order:
//!
//! 1. [`combine`]: merges hits of the same (key, second) into deltas and splits them by shard;
//! 2. [`log`]: appends each flush to the shards' durable logs (one fsync for all the requests in
//!    it: group commit), then acknowledges those requests;
//! 3. [`forward`]: one per shard, reads its log and sends the batches to the aggregator over a
//!    long-lived `Apply` stream ([`link`]) through the client stack, until the aggregator reports
//!    them durable; the log stage then trims them.
//!
//! In clustered mode (`--nats`) stages 2 and 3 are one: [`publish`] stores each flush in the
//! cluster's replicated log (JetStream), from which the aggregators read. Either way the stage
//! after `combine` is a [`DurableLog`]: where a flush becomes durable before its requests are
//! acknowledged.
//!
//! Validation and the batch-id ledger run before stage 1, in the gRPC handlers.

pub(crate) mod combine;
pub(crate) mod encoded;
pub(crate) mod forward;
pub(crate) mod link;
pub(crate) mod log;
pub(crate) mod publish;

use std::future::Future;

use hitcounter_pipeline::StageReceiver;
use hitcounter_proto::aggregator::v1::Delta;
use tokio::sync::oneshot;

use crate::{error::IngestError, ledger::ClaimGuard, validate::ValidHit};

/// Where flushes become durable before their requests are acknowledged: the local write-ahead
/// log ([`log::LogStage`], whose forwarders then deliver to the aggregators) or the cluster's
/// replicated log ([`publish::Publisher`], which the aggregators read themselves). A Kafka
/// backend would be a third implementation.
pub(crate) trait DurableLog: Send + 'static {
    /// Makes every flush of `flushes` durable and answers its requests, until the channel is
    /// closed and drained.
    fn run(
        self,
        flushes: StageReceiver<Flush>,
    ) -> impl Future<Output = Result<(), IngestError>> + Send;
}

impl DurableLog for log::LogStage {
    fn run(
        self,
        flushes: StageReceiver<Flush>,
    ) -> impl Future<Output = Result<(), IngestError>> + Send {
        log::LogStage::run(self, flushes)
    }
}

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
    /// Clustered mode: the replicated log is at `--nats-max-bytes`. Nothing was stored.
    #[error("the cluster's log is full (--nats-max-bytes): the aggregators are not keeping up or the limit is too low")]
    ClusterFull,
    /// Clustered mode: the replicated log refused the flush, or did not answer in time (then it
    /// may or may not be stored).
    #[error("the cluster's log did not take the hits: {0}")]
    Cluster(String),
    /// Clustered mode: this request's batch id was stored before (through any ingest
    /// instance); nothing of this request was stored again. Not a failure for the caller: it
    /// is answered `duplicate = true` with the first call's `accepted`.
    #[error("batch id stored before, with {accepted} hits")]
    Duplicate {
        /// What the first call accepted.
        accepted: u64,
    },
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
    /// Clustered mode: requests with a batch id, kept out of the merged deltas, so that one
    /// found to be a duplicate of a batch stored through another ingest instance can be taken
    /// out of the flush (see `publish`). Empty on one machine, where the ledger is the only
    /// judge of batch ids.
    pub(crate) apart: Vec<Apart>,
}

/// A request with a batch id, kept apart from the merged deltas (clustered mode).
#[derive(Debug)]
pub(crate) struct Apart {
    /// Its hits, summed per (key, second).
    pub(crate) deltas: Vec<Delta>,
    /// Its waiting caller.
    pub(crate) done: Durable,
    /// Its batch-id claim.
    pub(crate) claimed: Claimed,
}

/// A claimed batch id and the hits its batch holds.
#[derive(Debug)]
pub(crate) struct Claimed {
    pub(crate) guard: ClaimGuard,
    pub(crate) accepted: u64,
}
