//! [`MemoryMetaStore`]: the in-memory metadata store, for fast tests of higher layers.
//!
//! All column families sit in one `BTreeMap` per family behind a single lock, so a batch across
//! families is applied under one write lock and a scan runs under one read lock: both are
//! atomic with respect to each other. Nothing is durable: `sync` and [`MetaStore::flush`] are
//! no-ops and the content is gone on drop.
//!
//! # Checkpoint file
//!
//! [`MetaStore::checkpoint`] creates the directory and writes one file, `meta.export`, which
//! [`MemoryMetaStore::open_checkpoint`] loads. Integers are little-endian:
//!
//! ```text
//! magic        8 bytes  b"AQMETA01"
//! cf_count     u64
//! per column family, in name order:
//!   name_len   u64, name (UTF-8)
//!   entries    u64
//!   per entry, in key order: key_len u64, key, value_len u64, value
//! crc          u32      CRC-32C of every byte before it
//! ```
//!
//! The file, the new directory and its parent are fsynced before `checkpoint` returns. On load
//! the CRC is checked first and every length is checked against the bytes that remain.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::ops::Bound;
use std::path::Path;

use parking_lot::RwLock;

use super::{KeyValue, MetaError, MetaStore, MetaWriteBatch, MetaWriteOp, range_is_empty};

/// Name of the file a memory checkpoint is written to, inside the checkpoint directory.
pub const EXPORT_FILE: &str = "meta.export";
const MAGIC: &[u8; 8] = b"AQMETA01";

type Family = BTreeMap<Vec<u8>, Vec<u8>>;

/// The in-memory [`MetaStore`].
#[derive(Debug, Default)]
pub struct MemoryMetaStore {
    families: RwLock<BTreeMap<String, Family>>,
}

impl MemoryMetaStore {
    /// An empty store with the given column families (duplicates are ignored).
    pub fn new(cfs: &[&str]) -> Self {
        let families = cfs
            .iter()
            .map(|cf| ((*cf).to_owned(), Family::new()))
            .collect();
        Self {
            families: RwLock::new(families),
        }
    }

    /// Loads a store from a checkpoint directory written by [`MetaStore::checkpoint`] on a
    /// `MemoryMetaStore`, with the column families and content it had then.
    ///
    /// Fails with [`MetaError::Io`] if the file cannot be read and [`MetaError::Corrupt`] if it
    /// fails its checksum or does not parse.
    pub fn open_checkpoint(dir: &Path) -> Result<Self, MetaError> {
        let mut bytes = Vec::new();
        File::open(dir.join(EXPORT_FILE))?.read_to_end(&mut bytes)?;
        let families = decode_export(&bytes)?;
        Ok(Self {
            families: RwLock::new(families),
        })
    }
}

fn unknown(cf: &str) -> MetaError {
    MetaError::UnknownColumnFamily(cf.to_owned())
}

impl MetaStore for MemoryMetaStore {
    fn column_families(&self) -> Vec<String> {
        self.families.read().keys().cloned().collect()
    }

    fn get(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>, MetaError> {
        let families = self.families.read();
        let family = families.get(cf).ok_or_else(|| unknown(cf))?;
        Ok(family.get(key).cloned())
    }

    fn write(&self, batch: MetaWriteBatch, _sync: bool) -> Result<(), MetaError> {
        let mut families = self.families.write();
        // Validate before applying anything, so a failed batch changes nothing.
        if let Some(op) = batch
            .ops()
            .iter()
            .find(|op| !families.contains_key(op.cf()))
        {
            return Err(unknown(op.cf()));
        }
        for op in batch.into_ops() {
            match op {
                MetaWriteOp::Put { cf, key, value } => {
                    families
                        .get_mut(&cf)
                        .ok_or_else(|| unknown(&cf))?
                        .insert(key, value);
                }
                MetaWriteOp::Delete { cf, key } => {
                    families
                        .get_mut(&cf)
                        .ok_or_else(|| unknown(&cf))?
                        .remove(&key);
                }
            }
        }
        Ok(())
    }

    fn scan(
        &self,
        cf: &str,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, MetaError> {
        let families = self.families.read();
        let family = families.get(cf).ok_or_else(|| unknown(cf))?;
        if limit == 0 || range_is_empty(start, end) {
            return Ok(Vec::new());
        }
        Ok(family
            .range::<[u8], _>((start, end))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn flush(&self) -> Result<(), MetaError> {
        Ok(())
    }

    fn checkpoint(&self, dir: &Path) -> Result<(), MetaError> {
        let bytes = encode_export(&self.families.read());
        fs::create_dir(dir)?;
        let mut file = File::create(dir.join(EXPORT_FILE))?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        File::open(dir)?.sync_all()?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(parent)?.sync_all()?;
        }
        Ok(())
    }
}

fn put_len(out: &mut Vec<u8>, len: usize) {
    out.extend_from_slice(&(len as u64).to_le_bytes());
}

fn encode_export(families: &BTreeMap<String, Family>) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    put_len(&mut out, families.len());
    for (name, family) in families {
        put_len(&mut out, name.len());
        out.extend_from_slice(name.as_bytes());
        put_len(&mut out, family.len());
        for (key, value) in family {
            put_len(&mut out, key.len());
            out.extend_from_slice(key);
            put_len(&mut out, value.len());
            out.extend_from_slice(value);
        }
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// A cursor over export bytes that checks every length before using it.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], MetaError> {
        if n > self.rest.len() {
            return Err(MetaError::Corrupt(format!(
                "needs {n} more bytes, {} left",
                self.rest.len()
            )));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], MetaError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u64(&mut self) -> Result<u64, MetaError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn bytes(&mut self) -> Result<&'a [u8], MetaError> {
        let len = self.u64()?;
        let len = usize::try_from(len)
            .map_err(|_| MetaError::Corrupt(format!("length {len} does not fit in memory")))?;
        self.take(len)
    }
}

fn decode_export(bytes: &[u8]) -> Result<BTreeMap<String, Family>, MetaError> {
    if bytes.len() < MAGIC.len() + 8 + 4 {
        return Err(MetaError::Corrupt(format!(
            "file of {} bytes is too short",
            bytes.len()
        )));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    let mut stored = [0; 4];
    stored.copy_from_slice(crc);
    if crc32c::crc32c(body) != u32::from_le_bytes(stored) {
        return Err(MetaError::Corrupt("checksum mismatch".to_owned()));
    }
    let mut reader = Reader { rest: body };
    if &reader.array::<8>()? != MAGIC {
        return Err(MetaError::Corrupt("bad magic".to_owned()));
    }
    let cf_count = reader.u64()?;
    let mut families = BTreeMap::new();
    for _ in 0..cf_count {
        let name = std::str::from_utf8(reader.bytes()?)
            .map_err(|e| MetaError::Corrupt(format!("column family name: {e}")))?
            .to_owned();
        let entries = reader.u64()?;
        let mut family = Family::new();
        for _ in 0..entries {
            let key = reader.bytes()?.to_vec();
            let value = reader.bytes()?.to_vec();
            family.insert(key, value);
        }
        families.insert(name, family);
    }
    if !reader.rest.is_empty() {
        return Err(MetaError::Corrupt(format!(
            "{} trailing bytes",
            reader.rest.len()
        )));
    }
    Ok(families)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::WELL_KNOWN_CFS;
    use crate::meta::contract::{Reopen, contract_suite};

    #[test]
    fn memory_store_meets_the_contract() {
        contract_suite(
            |_dir| Box::new(MemoryMetaStore::new(WELL_KNOWN_CFS)),
            |dir| Box::new(MemoryMetaStore::open_checkpoint(dir).expect("open checkpoint")),
            Reopen::LosesEverything,
        );
    }

    /// A damaged export must be refused, never loaded with partial or wrong content.
    #[test]
    fn corrupt_export_is_refused() {
        let store = MemoryMetaStore::new(WELL_KNOWN_CFS);
        store.put("state", b"k", b"v", false).expect("put");
        let bytes = encode_export(&store.families.read());
        assert!(decode_export(&bytes).is_ok());
        for cut in 0..bytes.len() {
            assert!(
                matches!(decode_export(&bytes[..cut]), Err(MetaError::Corrupt(_))),
                "truncated to {cut} bytes was accepted"
            );
        }
        for i in 0..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[i] ^= 0x01;
            assert!(
                matches!(decode_export(&flipped), Err(MetaError::Corrupt(_))),
                "bit flip at byte {i} was accepted"
            );
        }
    }
}
