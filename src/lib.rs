//! Aqueduct: an application and data integration platform built as a log-centric streaming
//! engine (see `docs/` and the README).
//!
//! This crate is the node and its binary. Where to start reading:
//!
//! * [`cli`]: the `aqueduct` command line;
//! * [`node`]: configuration ([`node::config`]) and the node's lifecycle ([`node::Node`]);
//! * [`admin`]: the HTTP admin server (`/health`, `/metrics`);
//! * [`broker`]: the broker API every front calls (produce, fetch, offsets, metadata, topic
//!   admin) over the partition replicas;
//! * [`grpc`]: the native data service, a thin adapter over the broker;
//! * [`kafka`]: the Kafka wire protocol front on port 9092, over the broker;
//! * [`cluster`]: the cluster admin API on the gRPC port (status, join, remove-node, topics);
//! * [`client`]: the client of that API, which finds the metadata leader (used by the CLI and
//!   by joining nodes).
//!
//! Storage (the segmented log and the metadata store) is the `aqueduct-storage` crate.

pub mod admin;
pub mod broker;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod devices;
pub mod faults;
pub mod grpc;
pub mod kafka;
pub mod mqtt;
pub mod node;
