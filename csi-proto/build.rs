//! Generates the CSI bindings from `proto/csi.proto`, and those of the Kubernetes
//! SnapshotMetadata API from `proto/k8s_snapshot_metadata.proto`, at build time.
//!
//! protoc comes from the `protoc-bin-vendored` crate, so building needs no system
//! protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // Edition 2021: set_var is safe; build scripts run single-threaded.
    std::env::set_var("PROTOC", protoc);
    let include = protoc_bin_vendored::include_path()?;
    println!("cargo:rerun-if-changed=proto/csi.proto");
    println!("cargo:rerun-if-changed=proto/k8s_snapshot_metadata.proto");
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Kept so a test can prove the schema is wire-identical to CSI v1.12.0.
        .file_descriptor_set_path(out_dir.join("csi_descriptor.bin"))
        .build_server(true)
        .build_client(true)
        .compile_protos(
            &[std::path::PathBuf::from("proto/csi.proto")],
            &[std::path::PathBuf::from("proto"), include.clone()],
        )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(
            &[std::path::PathBuf::from(
                "proto/k8s_snapshot_metadata.proto",
            )],
            &[std::path::PathBuf::from("proto"), include],
        )?;
    Ok(())
}
