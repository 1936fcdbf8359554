//! Compiles proto/ with protox (a protobuf compiler in Rust), so no system `protoc` is
//! needed, then generates the prost messages and tonic client and server.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/tern/control/v1/control.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
