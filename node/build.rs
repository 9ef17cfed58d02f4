//! Generates the engine-host API bindings from `proto/engine_host.proto` and the kubelet
//! plugin-registration bindings from `proto/pluginregistration.proto`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Edition 2021: set_var is safe; build scripts run single-threaded.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    println!("cargo:rerun-if-changed=proto/engine_host.proto");
    tonic_prost_build::configure().compile_protos(&["proto/engine_host.proto"], &["proto"])?;
    // Kubelet plugin registration (pluginregistration.v1), served by the node plugin.
    println!("cargo:rerun-if-changed=proto/pluginregistration.proto");
    tonic_prost_build::configure()
        .compile_protos(&["proto/pluginregistration.proto"], &["proto"])?;
    Ok(())
}
