//! Storage counters shared by every log of a node.
//!
//! Plain atomics so that the storage crate stays free of any metrics library; the node exports
//! them to Prometheus (`src/admin/`). One `StorageMetrics` is shared (`Arc`) by all logs opened
//! with it, so the figures are node-wide totals.

use std::sync::atomic::{AtomicU64, Ordering};

/// Node-wide storage counters. All fields only ever grow, except the gauges noted below.
#[derive(Debug, Default)]
pub struct StorageMetrics {
    /// Entries appended (data and control).
    pub appended_entries: AtomicU64,
    /// Bytes written to segment files for appended entries (frames, headers included).
    pub appended_bytes: AtomicU64,
    /// `fdatasync`/`fsync` calls on segment, index and directory files.
    pub fsyncs: AtomicU64,
    /// Total time spent in those syncs, in microseconds.
    pub fsync_micros: AtomicU64,
    /// Append callbacks completed by a group sync (each sync completes one or more).
    pub group_commit_waiters: AtomicU64,
    /// Bytes returned by reads.
    pub read_bytes: AtomicU64,
    /// Segments rolled (sealed and a new one started).
    pub segments_rolled: AtomicU64,
    /// Segments deleted by retention or purge.
    pub segments_deleted: AtomicU64,
    /// Bytes cut off a torn or corrupt tail during recovery.
    pub recovery_truncated_bytes: AtomicU64,
    /// Gauge: segments currently open across all logs.
    pub open_segments: AtomicU64,
}

impl StorageMetrics {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn sub(counter: &AtomicU64, n: u64) {
        counter.fetch_sub(n, Ordering::Relaxed);
    }

    /// Reads a counter (for exporters).
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
