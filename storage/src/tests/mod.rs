//! Contract tests of the segmented log: a model test against a simple in-memory model, seeded
//! crash points over the fault file system, and SIGKILL of a real writer process.

mod crash;
mod model;
mod sigkill;

use bytes::Bytes;

use crate::batch;
use crate::entry::{Entry, EntryKind, StoredEntry};

/// What the log must hand back for an appended entry: data batches come back with their base
/// offset and leader epoch stamped, everything else byte for byte.
pub(crate) fn expected_payload(e: &Entry, base_offset: u64) -> Bytes {
    if e.kind != EntryKind::Data {
        return e.payload.clone();
    }
    let mut p = e.payload.to_vec();
    batch::stamp(&mut p, base_offset, e.term.min(i32::MAX as u64) as i32);
    Bytes::from(p)
}

/// Checks that a read returned a gap-free run with contiguous offsets.
pub(crate) fn assert_contiguous(entries: &[StoredEntry]) {
    for w in entries.windows(2) {
        assert_eq!(w[1].entry.index, w[0].entry.index + 1, "gap in indexes");
        assert_eq!(
            w[1].base_offset,
            w[0].next_offset(),
            "gap in offsets at index {}",
            w[1].entry.index
        );
    }
}
