//! [`RocksMetaStore`]: the durable metadata store, on RocksDB (cargo feature `rocksdb`).
//!
//! One RocksDB instance per store, one RocksDB column family per metadata column family. The
//! write-ahead log is always on; a write with `sync = true` sets `WriteOptions::set_sync`, so it
//! returns only after the WAL is fsynced. No compression: the data is small and the build stays
//! lean. Checkpoints are RocksDB checkpoints (hard links to the live SST files plus a copy of the
//! rest), opened again with [`RocksMetaStore::open`].

use std::collections::BTreeSet;
use std::fmt;
use std::ops::Bound;
use std::path::{Path, PathBuf};

use rocksdb::checkpoint::Checkpoint;
use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, DBWithThreadMode, Direction,
    IteratorMode, Options, ReadOptions, SingleThreaded, WriteBatch, WriteOptions,
};

use super::{KeyValue, MetaError, MetaStore, MetaWriteBatch, MetaWriteOp, range_is_empty};

/// Column family handles are only read after open, so the single-threaded mode (which guards
/// only creating and dropping families) is the right one; naming it keeps this code independent
/// of the `multi-threaded-cf` feature of `rocksdb`.
type Db = DBWithThreadMode<SingleThreaded>;

/// The RocksDB-backed [`MetaStore`].
pub struct RocksMetaStore {
    db: Db,
    /// The column families the caller opened, the only ones this store serves.
    cfs: BTreeSet<String>,
    path: PathBuf,
}

impl fmt::Debug for RocksMetaStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RocksMetaStore")
            .field("path", &self.path)
            .field("cfs", &self.cfs)
            .finish_non_exhaustive()
    }
}

fn backend(e: rocksdb::Error) -> MetaError {
    MetaError::Backend(e.into_string())
}

fn options() -> Options {
    let mut opts = Options::default();
    opts.set_compression_type(DBCompressionType::None);
    opts
}

impl RocksMetaStore {
    /// Opens (creating if missing) the store at `path` with the column families `cfs`,
    /// creating those that do not exist yet. Also opens a checkpoint directory written by
    /// [`MetaStore::checkpoint`].
    ///
    /// On return, every write that was durable when the store was last closed is readable.
    /// Column families found on disk but not in `cfs` are kept untouched and not served.
    /// Fails with [`MetaError::Backend`] if RocksDB cannot open the directory (for instance
    /// while another process holds it).
    pub fn open(path: &Path, cfs: &[&str]) -> Result<Self, MetaError> {
        let mut db_opts = options();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        let served: BTreeSet<String> = cfs.iter().map(|cf| (*cf).to_owned()).collect();
        // RocksDB refuses to open a database without naming every family it has; a missing
        // database simply has none.
        let existing = Db::list_cf(&db_opts, path).unwrap_or_default();
        let all: BTreeSet<String> = served.iter().cloned().chain(existing).collect();
        let descriptors = all
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(name, options()));
        let db = Db::open_cf_descriptors(&db_opts, path, descriptors).map_err(backend)?;
        Ok(Self {
            db,
            cfs: served,
            path: path.to_owned(),
        })
    }

    /// The directory this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn cf(&self, name: &str) -> Result<&ColumnFamily, MetaError> {
        if !self.cfs.contains(name) {
            return Err(MetaError::UnknownColumnFamily(name.to_owned()));
        }
        self.db
            .cf_handle(name)
            .ok_or_else(|| MetaError::UnknownColumnFamily(name.to_owned()))
    }
}

impl MetaStore for RocksMetaStore {
    fn column_families(&self) -> Vec<String> {
        self.cfs.iter().cloned().collect()
    }

    fn get(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>, MetaError> {
        self.db.get_cf(self.cf(cf)?, key).map_err(backend)
    }

    fn write(&self, batch: MetaWriteBatch, sync: bool) -> Result<(), MetaError> {
        if batch.is_empty() {
            // RocksDB may skip the WAL sync for an empty batch; the contract says earlier
            // writes are durable on return.
            if sync {
                self.db.flush_wal(true).map_err(backend)?;
            }
            return Ok(());
        }
        // Every handle is resolved before anything is written, so an unknown family fails the
        // whole batch with nothing applied.
        let mut rocks_batch = WriteBatch::default();
        for op in batch.ops() {
            match op {
                MetaWriteOp::Put { cf, key, value } => rocks_batch.put_cf(self.cf(cf)?, key, value),
                MetaWriteOp::Delete { cf, key } => rocks_batch.delete_cf(self.cf(cf)?, key),
            }
        }
        let mut write_opts = WriteOptions::default();
        write_opts.set_sync(sync);
        self.db.write_opt(rocks_batch, &write_opts).map_err(backend)
    }

    fn scan(
        &self,
        cf: &str,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, MetaError> {
        let handle = self.cf(cf)?;
        if limit == 0 || range_is_empty(start, end) {
            return Ok(Vec::new());
        }
        let mut read_opts = ReadOptions::default();
        if let Bound::Excluded(end) = end {
            // Lets RocksDB stop at the bound instead of stepping over tombstones past it.
            read_opts.set_iterate_upper_bound(end);
        }
        let mode = match start {
            Bound::Included(key) | Bound::Excluded(key) => {
                IteratorMode::From(key, Direction::Forward)
            }
            Bound::Unbounded => IteratorMode::Start,
        };
        // An iterator reads from an implicit snapshot taken when it is created.
        let mut out = Vec::new();
        for item in self.db.iterator_cf_opt(handle, read_opts, mode) {
            let (key, value) = item.map_err(backend)?;
            if matches!(start, Bound::Excluded(s) if *key == *s) {
                continue;
            }
            let past_end = match end {
                Bound::Included(e) => *key > *e,
                Bound::Excluded(e) => *key >= *e,
                Bound::Unbounded => false,
            };
            if past_end {
                break;
            }
            out.push((key.into_vec(), value.into_vec()));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    fn flush(&self) -> Result<(), MetaError> {
        self.db.flush_wal(true).map_err(backend)
    }

    fn checkpoint(&self, dir: &Path) -> Result<(), MetaError> {
        Checkpoint::new(&self.db)
            .and_then(|checkpoint| checkpoint.create_checkpoint(dir))
            .map_err(backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::contract::{Reopen, contract_suite};
    use crate::meta::{CF_STATE, WELL_KNOWN_CFS};

    fn open(dir: &Path) -> Box<dyn MetaStore> {
        Box::new(RocksMetaStore::open(dir, WELL_KNOWN_CFS).expect("open rocks store"))
    }

    #[test]
    fn rocks_store_meets_the_contract() {
        contract_suite(open, open, Reopen::KeepsDurableWrites);
    }

    /// Adding a column family to an existing store must keep the old data, and a family on
    /// disk that the caller did not ask for must neither block the open nor be served.
    #[test]
    fn reopen_with_different_column_families() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = RocksMetaStore::open(dir.path(), &["default", "old"]).expect("open");
            store.put("old", b"k", b"v", true).expect("put");
        }
        let store = RocksMetaStore::open(dir.path(), &["default", CF_STATE]).expect("reopen");
        assert!(matches!(
            store.get("old", b"k"),
            Err(MetaError::UnknownColumnFamily(cf)) if cf == "old"
        ));
        store
            .put(CF_STATE, b"k", b"v", true)
            .expect("put new family");
        drop(store);
        let store = RocksMetaStore::open(dir.path(), &["old"]).expect("reopen again");
        assert_eq!(store.get("old", b"k").expect("get"), Some(b"v".to_vec()));
    }

    /// Two opens of one directory would corrupt it; RocksDB's lock must turn the second into
    /// an error.
    #[test]
    fn second_open_of_same_dir_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = RocksMetaStore::open(dir.path(), WELL_KNOWN_CFS).expect("open");
        assert!(matches!(
            RocksMetaStore::open(dir.path(), WELL_KNOWN_CFS),
            Err(MetaError::Backend(_))
        ));
    }
}
