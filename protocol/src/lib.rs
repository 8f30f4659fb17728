//! Aqueduct's wire protocols.
//!
//! * [`raft`]: the node-to-node Raft transport (gRPC, one service for every group of a node
//!   pair). Generated from `proto/aqueduct/raft.proto` at build time by protox + tonic
//!   (no system `protoc`).
//!
//! * [`cluster`]: the cluster admin API (status, join, remove-node, topics), served by every
//!   node on its gRPC port and used by the CLI.
//!
//! * [`data`]: produce, fetch and list offsets, served by partition leaders.
//!
//! * [`devices`]: products (thing models) and devices, the device registry's admin API.
//!
//! * [`group`]: consumer groups (join, sync, heartbeat, leave, offsets), served by each
//!   group's coordinator.
//!
//! Codecs here stay free of I/O; the services' implementations live with their owners
//! (`raft/src/network.rs` for the Raft transport).

/// The Raft transport service and its messages.
#[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod raft {
    tonic::include_proto!("aqueduct.raft.v1");
}

/// The cluster admin service and its messages.
#[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod cluster {
    tonic::include_proto!("aqueduct.cluster.v1");
}

/// The data service (produce, fetch, list offsets) and its messages.
#[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod data {
    tonic::include_proto!("aqueduct.data.v1");
}

/// The consumer-group service and its messages.
#[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod group {
    tonic::include_proto!("aqueduct.group.v1");
}

/// The device registry's admin service (products and devices) and its messages.
#[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod devices {
    tonic::include_proto!("aqueduct.devices.v1");
}
