//! Generated protobuf and gRPC code for hitcounter.
//!
//! - [`v1`] is the public contract (`hitcounter.v1`): the `Ingest` and `Query` services that users,
//!   grpcurl and stubs in other languages call.
//! - [`aggregator::v1`] is the internal API between ingest/query and the aggregator shards, and
//!   the aggregator's checkpoint format.
//! - [`ingest::v1`] is ingest's log record format.
//! - [`reflection_services`] serves reflection for one port (its own service, health and
//!   reflection), so grpcurl works without proto files; [`SERVICE_HOMES`] says which role and
//!   default port serve each service, for a call that reached the wrong port.
//!
//! The code is generated at build time from `proto/` by `build.rs` (pure-Rust `protox`, no system
//! `protoc`).

pub mod codec;

/// The public API, package `hitcounter.v1`.
#[allow(missing_docs, unreachable_pub, clippy::all)] // generated code
pub mod v1 {
    tonic::include_proto!("hitcounter.v1");
}

/// The internal aggregator API.
#[allow(missing_docs, unreachable_pub, clippy::all)] // generated code
pub mod aggregator {
    /// Package `hitcounter.aggregator.v1`.
    pub mod v1 {
        tonic::include_proto!("hitcounter.aggregator.v1");
    }
}

/// Ingest's storage formats.
#[allow(missing_docs, unreachable_pub, clippy::all)] // generated code
pub mod ingest {
    /// Package `hitcounter.ingest.v1`.
    pub mod v1 {
        tonic::include_proto!("hitcounter.ingest.v1");
    }
}

/// The encoded `FileDescriptorSet` of every proto file, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/hitcounter_descriptor.bin"));

/// Where a hitcounter gRPC service is served: which process role and which default port. Each
/// port serves exactly one of these (plus health and reflection), so a call that reaches the
/// wrong port can say where it belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceHome {
    /// The fully qualified gRPC service name, e.g. `hitcounter.v1.Query`.
    pub service: &'static str,
    /// The role that serves it: `ingest`, `aggregator` or `query`.
    pub role: &'static str,
    /// The role's default gRPC port.
    pub default_port: u16,
    /// Whether clients outside the deployment call it (the aggregator's API is internal).
    pub public: bool,
}

/// Every gRPC service hitcounter serves, one per role.
pub const SERVICE_HOMES: &[ServiceHome] = &[
    ServiceHome {
        service: "hitcounter.v1.Ingest",
        role: "ingest",
        default_port: 50051,
        public: true,
    },
    ServiceHome {
        service: "hitcounter.aggregator.v1.Aggregator",
        role: "aggregator",
        default_port: 50052,
        public: false,
    },
    ServiceHome {
        service: "hitcounter.v1.Query",
        role: "query",
        default_port: 50053,
        public: true,
    },
];

/// The home of the gRPC service named `service`, if it is one of hitcounter's.
pub fn service_home(service: &str) -> Option<&'static ServiceHome> {
    SERVICE_HOMES.iter().find(|home| home.service == service)
}

/// The standard services every port serves next to its own.
const STANDARD_SERVICES: &[&str] = &[
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// The descriptor set reflection serves on a port of `service`: the proto file that defines the
/// service and the files it imports, nothing else, so that a public port neither lists nor
/// describes the internal API.
fn descriptors_of(service: &str) -> Result<prost_types::FileDescriptorSet, ReflectionError> {
    use prost::Message;

    let all = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET)?;
    let defines = |file: &prost_types::FileDescriptorProto| {
        file.service
            .iter()
            .any(|s| format!("{}.{}", file.package(), s.name()) == service)
    };
    let mut wanted: Vec<String> = all
        .file
        .iter()
        .filter(|file| defines(file))
        .map(|file| file.name().to_owned())
        .collect();
    if wanted.is_empty() {
        return Err(ReflectionError::UnknownService(service.to_owned()));
    }
    // Close over imports (the set is small: a handful of files).
    let mut next = 0;
    while next < wanted.len() {
        let name = wanted[next].clone();
        next += 1;
        if let Some(file) = all.file.iter().find(|file| file.name() == name) {
            for dependency in &file.dependency {
                if !wanted.contains(dependency) {
                    wanted.push(dependency.clone());
                }
            }
        }
    }
    Ok(prost_types::FileDescriptorSet {
        file: all
            .file
            .into_iter()
            .filter(|file| wanted.iter().any(|name| name == file.name()))
            .collect(),
    })
}

/// Why reflection for a port could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ReflectionError {
    /// The embedded descriptor set does not decode (a build would have caught it).
    #[error("embedded descriptor set is corrupt: {0}")]
    Decode(#[from] prost::DecodeError),
    /// No proto file defines the service.
    #[error("no proto file defines service {0}")]
    UnknownService(String),
    /// tonic-reflection refused the descriptors.
    #[error(transparent)]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Builds the gRPC server reflection services, `v1` and `v1alpha` (grpcurl 1.8 asks for
/// `v1alpha`), for a port that serves `service`: they list and describe that service, health and
/// reflection, and nothing else (an internal API is never listed on a public port).
///
/// # Errors
/// [`ReflectionError`] when `service` is not one of hitcounter's, or the embedded descriptor sets
/// are corrupt (which a build would have caught).
pub fn reflection_services(
    service: &str,
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    ReflectionError,
> {
    let builder = || -> Result<tonic_reflection::server::Builder<'static>, ReflectionError> {
        let mut builder = tonic_reflection::server::Builder::configure()
            .register_file_descriptor_set(descriptors_of(service)?)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(service);
        for standard in STANDARD_SERVICES {
            builder = builder.with_service_name(*standard);
        }
        Ok(builder)
    };
    Ok((builder()?.build_v1()?, builder()?.build_v1alpha()?))
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
