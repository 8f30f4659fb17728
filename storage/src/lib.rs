//! Aqueduct storage: the segmented partition log and the metadata store.
//!
//! * [`log::PartitionLog`] stores *entries* at caller-given, gap-free indexes (the Raft log
//!   index). Data entries carry one Kafka RecordBatch v2 each; the log keeps an offset
//!   translator (entry index ↔ record offset), a sparse offset index and a time index per
//!   segment, and makes appends durable by group commit. Start reading at `log.rs`; the on-disk
//!   format and recovery rules are in `docs/storage-format.md`.
//! * [`fs::FileSystem`] is the file-system abstraction all segment and index I/O goes through;
//!   `fault::FaultFs` (feature `fault-fs`) simulates crashes that lose un-synced work.
//! * [`meta::MetaStore`] is the metadata store trait (RocksDB behind feature `rocksdb`, and an
//!   in-memory implementation).
//!
//! Invariants held everywhere: nothing that failed its CRC is ever returned; an entry whose
//! durability callback fired survives any crash; indexes are gap-free.

pub mod batch;
mod commit;
pub mod compact;
pub mod entry;
pub mod error;
#[cfg(any(test, feature = "fault-fs"))]
pub mod fault;
pub mod fs;
pub mod log;
pub mod meta;
pub mod metrics;
mod segment;

pub use commit::{DurableCallback, FlushPolicy};
pub use entry::{Entry, EntryKind, StoredEntry};
pub use error::LogError;
pub use log::{CompactionStats, LogOptions, PartitionLog, RetentionPolicy};

#[cfg(test)]
mod tests;
