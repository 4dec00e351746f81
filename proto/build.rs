//! Compiles the `.proto` files with protox, a pure-Rust protobuf compiler, so a fresh
//! clone builds with `cargo` alone (no system `protoc`). The encoded descriptor set is
//! written next to the generated code for gRPC server reflection.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "pgquorum/v1/raft.proto",
    "pgquorum/v1/admin.proto",
    "pgquorum/v1/agent.proto",
    "pgquorum/v1/endpoint.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed=proto/{proto}");
    }
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("pgquorum_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
