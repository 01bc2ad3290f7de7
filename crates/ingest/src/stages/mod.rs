//! The stages of the ingest pipeline, in data-flow order:
//!
//! 1. [`combine`]: merges hits of the same (key, second) into deltas and splits them by shard;
//! 2. [`forward`]: sends each shard's delta batches to its aggregator over a long-lived `Apply`
//!    stream ([`link`]) through the client stack, until acknowledged.
//!
//! Validation happens before stage 1, in the gRPC handlers (see `crate::validate`).

pub(crate) mod combine;
pub(crate) mod forward;
pub(crate) mod link;
