//! Generates the replica control-API bindings from `proto/replica_control.proto`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Edition 2021: set_var is safe; build scripts run single-threaded.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    println!("cargo:rerun-if-changed=proto/replica_control.proto");
    tonic_prost_build::configure().compile_protos(&["proto/replica_control.proto"], &["proto"])?;
    Ok(())
}
