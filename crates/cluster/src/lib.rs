//! Clustered mode: hitcounter on a replicated log, NATS JetStream.
//!
//! On one machine, ingest keeps acknowledged hits in its own write-ahead log and forwards them
//! to the aggregators over gRPC. In clustered mode (`--nats`) the log is a JetStream stream,
//! replicated (R=3) and fsynced by the NATS servers before they acknowledge, so:
//!
//! ```text
//!  ingest (stateless, any number) ── atomic batch publish ──▶ JetStream stream "hitcounter"
//!     one message per partition touched by a flush,           subjects hitcounter.p.<partition>
//!     plus one marker per batch id (create-if-absent)                  hitcounter.ids.<hash>
//!                                                                          │ ordered consumers
//!                                                        aggregators (each hosts R_agg-replicated
//!                                                        partitions, applies by stream position)
//!                                                                          ▲ Count / Series / Top
//!  query ── per partition: a caught-up replica, failing over to the next ──┘
//! ```
//!
//! This crate holds what every clustered service shares: the partition of a key and the
//! placement of partitions on aggregators ([`topology`]), the flags ([`args`]), and the stream
//! itself: how it is created and checked, what its messages look like, how a flush is published
//! whole or not at all, and how an aggregator reads its partitions ([`log`]).

pub mod args;
pub mod error;
pub mod inspect;
pub mod log;
pub mod membership;
pub mod topology;

pub use args::{ClusterArgs, PlacementArgs};
pub use error::ClusterError;
pub use log::{HitStream, LoggedBatch, Marker, PublishError};
pub use membership::{MemberInfo, Members, Membership, MembershipArgs};
pub use topology::{partition_of, Placement, Roster, RosterNode};
