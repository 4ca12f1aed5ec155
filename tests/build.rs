//! Builds the client stubs of the Kubernetes KMS v2 plugin API from kmsd's
//! own `.proto` (`daemon/proto/kms_v2.proto`) for kms-bench.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../daemon/proto/kms_v2.proto");
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&["../daemon/proto/kms_v2.proto"], &["../daemon/proto"])?;
    Ok(())
}
