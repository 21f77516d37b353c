//! Compiles the `.proto` files with protox (a pure-Rust protobuf compiler), so that a fresh
//! machine needs no system `protoc`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("protos");
    let files = [
        "inference/grpc_service.proto",
        "inference/model_config.proto",
        "veraltheim/v1/tensor.proto",
        "veraltheim/v1/inference.proto",
        "veraltheim/v1/models.proto",
        "veraltheim/v1/system.proto",
        "veraltheim/v1/jobs.proto",
        "veraltheim/v1/resources.proto",
        "veraltheim/v1/cluster.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let descriptors = protox::compile(files, [&root])?;
    // The same descriptors as bytes, for reflection over the API (the hostile probe in
    // coordinator/tests/hostile.rs enumerates every RPC from them).
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("descriptors.bin");
    std::fs::write(out, prost::Message::encode_to_vec(&descriptors))?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Tensor data travels as `Bytes`: moving it from the request into a batch copies nothing.
        .bytes(".")
        .compile_fds(descriptors)?;
    Ok(())
}
