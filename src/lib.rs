//! Aqueduct: an application and data integration platform built as a log-centric streaming
//! engine (see `docs/` and the README).
//!
//! This crate is the node and its binary. Where to start reading:
//!
//! * [`cli`]: the `aqueduct` command line;
//! * [`node`]: configuration ([`node::config`]) and the node's lifecycle ([`node::Node`]);
//! * [`admin`]: the HTTP admin server (`/health`, `/metrics`);
//! * [`cluster`]: the cluster admin API on the gRPC port (status, join, remove-node, topics);
//! * [`client`]: the client of that API, which finds the metadata leader (used by the CLI and
//!   by joining nodes).
//!
//! Storage (the segmented log and the metadata store) is the `aqueduct-storage` crate.

pub mod admin;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod data;
pub mod faults;
pub mod groups;
pub mod idempotence;
pub mod node;
pub mod partitions;
