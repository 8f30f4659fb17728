//! Aqueduct's Raft layer on openraft 0.10 (one exact alpha pinned).
//!
//! * [`log_store::SegmentedLogStore`] is openraft's `RaftLogStorage` over the segmented
//!   [`aqueduct_storage::PartitionLog`]: the Raft log *is* the partition log. Appends are
//!   acknowledged to openraft (`IOFlushed`) from the log's group commit, i.e. only after the
//!   `fdatasync` covering them; votes and the last purged id are written to the metadata
//!   store with `sync`, committed ids without (a stale one only re-applies less at start).
//! * [`state_machine::MetaStateMachine`] is the metadata group's state machine, its state in
//!   the metadata store (RocksDB): nodes, topics, partitions' replica assignment, topic configs.
//! * [`types`] holds the type configuration and the metadata commands.
//! * [`family`]: resource families (products and devices, …) own their records; the state
//!   machine dispatches their commands and announces their changes.
//!
//! Invariants: nothing is acknowledged before it is durable; the log never has holes; a vote
//! is on disk before `save_vote` returns. Start with `log_store.rs`.

pub mod directory;
pub mod family;
pub mod liveness;
pub mod log_store;
pub mod network;
pub mod partition;
pub mod producers;
pub mod state_machine;
pub mod types;

#[cfg(test)]
mod cluster_tests;
#[cfg(test)]
mod crash_tests;
#[cfg(test)]
mod tests;

/// openraft's storage traits speak `io::Error`; our errors travel inside one.
pub(crate) fn io_err(e: impl std::error::Error + Send + Sync + 'static) -> std::io::Error {
    std::io::Error::other(e)
}
