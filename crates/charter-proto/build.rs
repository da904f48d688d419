//! Generates the cluster protocol code from `proto/` with a pure-Rust protobuf compiler
//! (protox), so a fresh machine needs no `protoc`.
//!
//! Two generations: `client` is the ordinary code (messages, client, server); `server`
//! maps `ControlPlaneMessage` to [`crate::EncodedControlPlaneMessage`], so the control
//! plane encodes each snapshot once and every stream sends the same bytes, and uses
//! [`crate::StreamCodec`], whose buffers are sized for the small messages of a stream
//! held open per data plane.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let file = root.join("charter/cluster/v1/cluster.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let fds = protox::compile([&file], [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);

    let plain = out.join("plain");
    std::fs::create_dir_all(&plain)?;
    tonic_prost_build::configure()
        .out_dir(&plain)
        .build_server(true)
        .build_client(true)
        .compile_fds(fds.clone())?;

    let shared = out.join("shared");
    std::fs::create_dir_all(&shared)?;
    tonic_prost_build::configure()
        .out_dir(&shared)
        .build_server(true)
        .build_client(false)
        .codec_path("crate::StreamCodec")
        .extern_path(
            ".charter.cluster.v1.ControlPlaneMessage",
            "crate::EncodedControlPlaneMessage",
        )
        .extern_path(".charter.cluster.v1", "crate::v1")
        .compile_fds(fds)?;
    Ok(())
}
