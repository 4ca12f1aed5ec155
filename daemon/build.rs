//! Builds the Kubernetes KMS v2 plugin API's server stubs from
//! `proto/kms_v2.proto` with protoc (Debian protobuf-compiler).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/kms_v2.proto");
    tonic_prost_build::configure()
        .build_client(false)
        .compile_protos(&["proto/kms_v2.proto"], &["proto"])?;
    Ok(())
}
