//! The metadata store: small, ordered key-value state that is not a log.
//!
//! It holds the cluster metadata state, Raft votes and committed log ids (always written with
//! `sync = true`), and checkpoints of state derived from a log (producer ids and sequences,
//! materialized views), each tagged by its writer with the log index it reflects. Message
//! bodies never go here: they live in the segmented log.
//!
//! Start at [`MetaStore`]: every method states what holds on return and what is durable when.
//! Two implementations sit behind it:
//!
//! * [`rocks::RocksMetaStore`] (cargo feature `rocksdb`, on by default): the real, durable one.
//! * [`memory::MemoryMetaStore`]: `BTreeMap`s behind one lock, for fast tests of higher layers.
//!   Nothing in it survives a drop; its checkpoints are files it can load again.
//!
//! Invariants held by every implementation (checked by the contract suite in `contract.rs`,
//! run against both):
//!
//! * Keys are ordered bytewise; scans return pairs in that order, from one point in time.
//! * The set of column families is fixed at open; naming any other one fails with
//!   [`MetaError::UnknownColumnFamily`] and changes nothing.
//! * A [`MetaWriteBatch`] is atomic: a reader sees all of it or none of it, and a batch that
//!   fails changes nothing.
//! * A write is readable as soon as the call returns. It is durable on return when written with
//!   `sync = true`; otherwise at the next synced write or [`MetaStore::flush`], whichever comes
//!   first (a synced write also makes every earlier write durable).
//! * A checkpoint is a consistent point-in-time copy that opens again as a store.

use std::ops::Bound;
use std::path::Path;

pub mod memory;
#[cfg(feature = "rocksdb")]
pub mod rocks;

#[cfg(test)]
mod contract;

/// The column family every store has unless told otherwise.
pub const CF_DEFAULT: &str = "default";
/// Raft votes and committed log ids. Written with `sync = true`.
pub const CF_RAFT: &str = "raft";
/// State derived from logs (metadata state machine, producer state, materialized views), each
/// value tagged by its writer with the log index it reflects.
pub const CF_STATE: &str = "state";
/// The column families a node opens its metadata store with.
pub const WELL_KNOWN_CFS: &[&str] = &[CF_DEFAULT, CF_RAFT, CF_STATE];

/// What a metadata store operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// The column family was not among those the store was opened with.
    #[error("unknown column family `{0}`")]
    UnknownColumnFamily(String),
    /// The storage engine reported an error; the message is the engine's.
    #[error("metadata store backend error: {0}")]
    Backend(String),
    /// A file operation of the store itself (not of its engine) failed.
    #[error("metadata store I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A checkpoint or export file failed its checksum or could not be parsed.
    #[error("corrupt metadata checkpoint: {0}")]
    Corrupt(String),
}

/// One operation of a [`MetaWriteBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaWriteOp {
    /// Set `key` to `value` in column family `cf`.
    Put {
        /// Column family name.
        cf: String,
        /// Key.
        key: Vec<u8>,
        /// Value (may be empty, which is distinct from absent).
        value: Vec<u8>,
    },
    /// Remove `key` from column family `cf`; removing an absent key is not an error.
    Delete {
        /// Column family name.
        cf: String,
        /// Key.
        key: Vec<u8>,
    },
}

impl MetaWriteOp {
    /// The column family this operation writes to.
    pub fn cf(&self) -> &str {
        match self {
            Self::Put { cf, .. } | Self::Delete { cf, .. } => cf,
        }
    }
}

/// An ordered list of puts and deletes, possibly across column families, that
/// [`MetaStore::write`] applies atomically. Operations apply in order: a later operation on the
/// same key wins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetaWriteBatch {
    ops: Vec<MetaWriteOp>,
}

impl MetaWriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a put of `key` = `value` in `cf`.
    pub fn put(
        &mut self,
        cf: &str,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> &mut Self {
        self.ops.push(MetaWriteOp::Put {
            cf: cf.to_owned(),
            key: key.into(),
            value: value.into(),
        });
        self
    }

    /// Appends a delete of `key` in `cf`.
    pub fn delete(&mut self, cf: &str, key: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(MetaWriteOp::Delete {
            cf: cf.to_owned(),
            key: key.into(),
        });
        self
    }

    /// Appends every operation of `other`, after this batch's own.
    pub fn extend(&mut self, other: MetaWriteBatch) -> &mut Self {
        self.ops.extend(other.ops);
        self
    }

    /// The operations, in the order they apply.
    pub fn ops(&self) -> &[MetaWriteOp] {
        &self.ops
    }

    /// Consumes the batch, returning its operations in order.
    pub fn into_ops(self) -> Vec<MetaWriteOp> {
        self.ops
    }

    /// Number of operations.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether the batch has no operations.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// A key-value pair returned by a scan.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// The metadata store. Object safe; shared as `Arc<dyn MetaStore>`. All methods take `&self`
/// and may be called from many threads at once.
pub trait MetaStore: Send + Sync + std::fmt::Debug + 'static {
    /// The column families this store was opened with, in no particular order.
    fn column_families(&self) -> Vec<String>;

    /// The value of `key` in `cf`, or `None` if absent.
    ///
    /// Sees every write whose call has returned (read-your-writes), durable or not.
    /// Fails with [`MetaError::UnknownColumnFamily`] if `cf` was not opened.
    fn get(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>, MetaError>;

    /// Applies `batch` atomically: on `Ok`, all of its operations are visible to every later
    /// read; on `Err`, none of them is, and no reader ever sees a part of it.
    ///
    /// With `sync = true` the batch, and every write before it, is durable on return (it
    /// survives a process or machine crash). With `sync = false` it is durable at the next
    /// synced write or [`flush`](Self::flush); a crash before that may lose it, but never a
    /// part of it.
    ///
    /// Any operation naming an unknown column family fails the whole batch with
    /// [`MetaError::UnknownColumnFamily`]. An empty batch is valid (with `sync = true` it
    /// makes earlier writes durable).
    fn write(&self, batch: MetaWriteBatch, sync: bool) -> Result<(), MetaError>;

    /// Sets `key` to `value` in `cf`: a one-operation [`write`](Self::write), same contract.
    fn put(&self, cf: &str, key: &[u8], value: &[u8], sync: bool) -> Result<(), MetaError> {
        let mut batch = MetaWriteBatch::new();
        batch.put(cf, key, value);
        self.write(batch, sync)
    }

    /// Removes `key` from `cf` (absent keys are fine): a one-operation
    /// [`write`](Self::write), same contract.
    fn delete(&self, cf: &str, key: &[u8], sync: bool) -> Result<(), MetaError> {
        let mut batch = MetaWriteBatch::new();
        batch.delete(cf, key);
        self.write(batch, sync)
    }

    /// Up to `limit` pairs of `cf` whose keys lie within (`start`, `end`), in ascending key
    /// order, all read from one point in time (a concurrent batch is wholly in or out).
    ///
    /// An empty range (start after end, or equal with either bound excluded) or `limit = 0`
    /// yields no pairs; `usize::MAX` means no limit. Fails with
    /// [`MetaError::UnknownColumnFamily`] if `cf` was not opened.
    fn scan(
        &self,
        cf: &str,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, MetaError>;

    /// Up to `limit` pairs of `cf` whose keys start with `prefix`, in ascending key order:
    /// a [`scan`](Self::scan) over the prefix's range, same contract. An empty prefix matches
    /// every key.
    fn scan_prefix(
        &self,
        cf: &str,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<KeyValue>, MetaError> {
        let end = prefix_successor(prefix);
        let end = match &end {
            Some(end) => Bound::Excluded(end.as_slice()),
            None => Bound::Unbounded,
        };
        self.scan(cf, Bound::Included(prefix), end, limit)
    }

    /// Makes every write that returned before this call durable.
    fn flush(&self) -> Result<(), MetaError>;

    /// Writes a consistent point-in-time copy of every column family to `dir`, which must not
    /// exist yet (its parent must). On return the copy is durable and opens as a store with
    /// the same column families and content as this one had at some instant during the call;
    /// later writes to this store do not reach it. How it is opened depends on the
    /// implementation (see [`rocks::RocksMetaStore::open`] and
    /// [`memory::MemoryMetaStore::open_checkpoint`]).
    fn checkpoint(&self, dir: &Path) -> Result<(), MetaError>;
}

/// The smallest key greater than every key starting with `prefix`, or `None` if there is none
/// (the prefix is empty or all `0xFF`).
pub fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let last = prefix.iter().rposition(|&b| b != 0xFF)?;
    let mut end = prefix[..=last].to_vec();
    end[last] += 1;
    Some(end)
}

/// Whether no key can lie within (`start`, `end`).
pub(crate) fn range_is_empty(start: Bound<&[u8]>, end: Bound<&[u8]>) -> bool {
    match (start, end) {
        (Bound::Included(s), Bound::Included(e)) => s > e,
        (Bound::Included(s) | Bound::Excluded(s), Bound::Included(e) | Bound::Excluded(e)) => {
            s >= e
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `scan_prefix` relies on this to bound prefixes ending in 0xFF correctly.
    #[test]
    fn prefix_successor_skips_trailing_ff() {
        assert_eq!(prefix_successor(b""), None);
        assert_eq!(prefix_successor(&[0xFF, 0xFF]), None);
        assert_eq!(prefix_successor(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_successor(&[1, 0xFF]), Some(vec![2]));
        assert_eq!(prefix_successor(&[1, 0xFE, 0xFF]), Some(vec![1, 0xFF]));
    }

    /// `BTreeMap::range` panics on these ranges, so the memory store must catch them first.
    #[test]
    fn empty_ranges_are_recognised() {
        use Bound::*;
        let (a, b): (&[u8], &[u8]) = (b"a", b"b");
        assert!(!range_is_empty(Included(a), Included(a)));
        assert!(range_is_empty(Included(a), Excluded(a)));
        assert!(range_is_empty(Excluded(a), Included(a)));
        assert!(range_is_empty(Excluded(a), Excluded(a)));
        assert!(range_is_empty(Included(b), Included(a)));
        assert!(!range_is_empty(Excluded(a), Excluded(b)));
        assert!(!range_is_empty(Unbounded, Excluded(a)));
        assert!(!range_is_empty(Included(b), Unbounded));
    }
}
