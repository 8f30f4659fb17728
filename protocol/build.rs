//! Compiles the `.proto` files with protox (pure Rust): no system `protoc` needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/aqueduct/raft.proto",
        "proto/aqueduct/cluster.proto",
        "proto/aqueduct/data.proto",
        "proto/aqueduct/group.proto",
        "proto/aqueduct/devices.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
