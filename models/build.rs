//! Compiles the descriptor of Triton's `inference.ModelConfig` (from the `proto` crate's
//! `protos/inference/model_config.proto`, the one source of that schema) with protox, so that
//! `config.pbtxt` can be read by reflection without this crate depending on the gRPC stack.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest.join("../proto/protos");
    let file = "inference/model_config.proto";
    println!("cargo:rerun-if-changed={}", root.join(file).display());
    let descriptors = protox::compile([file], [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("model_config.bin");
    std::fs::write(out, prost::Message::encode_to_vec(&descriptors))?;
    Ok(())
}
