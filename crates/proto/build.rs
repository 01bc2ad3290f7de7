//! Generates the Rust gRPC code from `proto/` with `protox`, a pure-Rust protobuf compiler, so that
//! building needs no system `protoc`. The encoded descriptor set is written next to the generated
//! code for server reflection.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "hitcounter/v1/hitcounter.proto",
    "hitcounter/aggregator/v1/aggregator.proto",
    "hitcounter/aggregator/v1/checkpoint.proto",
    "hitcounter/ingest/v1/log.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(proto).display());
    }

    let descriptors = protox::compile(PROTOS, [&root])?;
    std::fs::write(
        out_dir.join("hitcounter_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // prost's codec, but a request that does not decode is INVALID_ARGUMENT (src/codec.rs).
        .codec_path("crate::codec::ContractCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
