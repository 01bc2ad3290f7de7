//! Generated protobuf and gRPC code for hitcounter.
//!
//! - [`v1`] is the public contract (`hitcounter.v1`): the `Ingest` and `Query` services that users,
//!   grpcurl and stubs in other languages call.
//! - [`aggregator::v1`] is the internal API between ingest/query and the aggregator shards, and
//!   the aggregator's checkpoint format.
//! - [`ingest::v1`] is ingest's log record format.
//! - [`FILE_DESCRIPTOR_SET`] feeds server reflection, so grpcurl works without proto files.
//!
//! The code is generated at build time from `proto/` by `build.rs` (pure-Rust `protox`, no system
//! `protoc`).

#![allow(missing_docs, unreachable_pub, clippy::all)]

/// The public API, package `hitcounter.v1`.
pub mod v1 {
    tonic::include_proto!("hitcounter.v1");
}

/// The internal aggregator API.
pub mod aggregator {
    /// Package `hitcounter.aggregator.v1`.
    pub mod v1 {
        tonic::include_proto!("hitcounter.aggregator.v1");
    }
}

/// Ingest's storage formats.
pub mod ingest {
    /// Package `hitcounter.ingest.v1`.
    pub mod v1 {
        tonic::include_proto!("hitcounter.ingest.v1");
    }
}

/// The encoded `FileDescriptorSet` of every proto file, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/hitcounter_descriptor.bin"));

/// Builds the gRPC server reflection services, `v1` and `v1alpha` (grpcurl 1.8 asks for
/// `v1alpha`), describing hitcounter's APIs and the health API.
///
/// # Errors
/// Fails only if the embedded descriptor sets are corrupt, which a build would have caught.
pub fn reflection_services() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    Ok((v1, v1alpha))
}

/// The canonical upper-case name of a gRPC status code (`INVALID_ARGUMENT`), as metrics labels
/// and command-line errors print it.
pub fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
