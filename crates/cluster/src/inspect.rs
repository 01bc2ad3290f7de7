//! Looking at a cluster without changing it, for tools such as `hitctl cluster status`.
//!
//! The services create the stream and the membership bucket when they start; a tool must not.
//! A typo in `--nats-stream`, or a cluster where no aggregator has announced itself yet, is then
//! reported as such instead of leaving behind a stream or a bucket made with the tool's flags
//! (a bucket on one server, say, that every aggregator would then share).

use std::time::Duration;

use async_nats::jetstream::{context::GetStreamErrorKind, ErrorCode};

use crate::{error::ClusterError, log::HitStream, membership::Membership};

/// The membership bucket of `stream` if it exists (an aggregator with `--node-id` created it),
/// `None` if it does not; never creates it.
///
/// # Errors
/// Fails when the servers cannot tell whether the bucket exists, or it cannot be read.
pub async fn existing_membership(
    stream: &HitStream,
    ttl: Duration,
) -> Result<Option<Membership>, ClusterError> {
    // The bucket's name and its stream's, as `Membership::open` makes them.
    let bucket = format!("KV_{}_members", stream.name());
    match stream.jetstream().get_stream(&bucket).await {
        // It exists: opening it only reads it (the replica count is for creating it).
        Ok(_) => Membership::open(stream, ttl, 1).await.map(Some),
        Err(error)
            if matches!(error.kind(), GetStreamErrorKind::JetStream(e)
                if e.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
        {
            Ok(None)
        }
        Err(error) => Err(ClusterError::Stream {
            stream: bucket,
            message: format!("cannot tell whether it exists: {error}"),
        }),
    }
}
