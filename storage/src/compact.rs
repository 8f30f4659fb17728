//! Key compaction of record batches (pure functions; the segment rewrite is
//! [`crate::PartitionLog::compact`]).
//!
//! A record survives compaction at a point `upto` if it has no key, or if no later record
//! (at or below `upto`) has the same key: the latest value per key is kept, offsets are kept
//! (a batch keeps its header, base offset and `lastOffsetDelta`; only the dropped records'
//! bytes go, `recordCount`, `batchLength` and the CRC are updated). A batch whose records are
//! all dropped stays as an empty batch, so every entry keeps the offsets it occupies.
//! Compressed and control batches are left alone (and their keys are not counted).
//! Compacting at `u1` and then at `u2 ≥ u1` gives the same bytes as compacting at `u2` only,
//! so replicas that compact at different moments converge.

use crate::batch::BATCH_HEADER_LEN;

/// One record of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordSpan {
    /// Absolute offset (base offset + offset delta).
    pub offset: u64,
    /// Byte range of the key within the batch (`None`: null key).
    pub key: Option<(usize, usize)>,
    /// Byte range of the whole record (length prefix included).
    pub start: usize,
    pub end: usize,
}

/// A zigzag varint (up to 10 bytes) at `*at`, advancing it.
fn varint(b: &[u8], at: &mut usize) -> Option<i64> {
    let mut value: u64 = 0;
    for i in 0..10 {
        let byte = *b.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(((value >> 1) as i64) ^ -((value & 1) as i64));
        }
    }
    None
}

fn be_i32(b: &[u8], at: usize) -> i32 {
    i32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The records of an uncompressed, non-control batch (as stored: base offset stamped), or
/// `None` for compressed, control or malformed batches.
pub fn records(batch: &[u8]) -> Option<Vec<RecordSpan>> {
    if batch.len() < BATCH_HEADER_LEN {
        return None;
    }
    let attributes = i16::from_be_bytes([batch[21], batch[22]]);
    if attributes & 0x07 != 0 || attributes & 0x20 != 0 {
        return None;
    }
    let mut base = [0u8; 8];
    base.copy_from_slice(&batch[..8]);
    let base = u64::from_be_bytes(base);
    let count = be_i32(batch, 57);
    let last_delta = u64::try_from(be_i32(batch, 23)).ok()?;
    let mut out = Vec::with_capacity(count.max(0) as usize);
    let mut at = BATCH_HEADER_LEN;
    for _ in 0..count.max(0) {
        let start = at;
        let len = usize::try_from(varint(batch, &mut at)?).ok()?;
        let body_start = at;
        let end = body_start.checked_add(len)?;
        if end > batch.len() {
            return None;
        }
        at += 1; // attributes
        varint(batch, &mut at)?; // timestamp delta
        let delta = u64::try_from(varint(batch, &mut at)?).ok()?;
        if delta > last_delta {
            // A record outside its batch's offsets: not something to compact on.
            return None;
        }
        let key_len = varint(batch, &mut at)?;
        let key = if key_len < 0 {
            None
        } else {
            let k_end = at.checked_add(key_len as usize)?;
            if k_end > end {
                return None;
            }
            let k = (at, k_end);
            at = k_end;
            Some(k)
        };
        if at > end {
            return None;
        }
        out.push(RecordSpan {
            // The base offset is the sender's on produce: never trusted not to overflow.
            offset: base.checked_add(delta)?,
            key,
            start,
            end,
        });
        at = end;
    }
    (at == batch.len()).then_some(out)
}

/// The batch without the records `keep` rejects (`keep(offset, key)`), or `None` when it
/// keeps every record (or the batch cannot be read: it is left as it is).
pub fn filter_batch(batch: &[u8], keep: impl Fn(u64, Option<&[u8]>) -> bool) -> Option<Vec<u8>> {
    let recs = records(batch)?;
    let kept: Vec<&RecordSpan> = recs
        .iter()
        .filter(|r| keep(r.offset, r.key.map(|(s, e)| &batch[s..e])))
        .collect();
    if kept.len() == recs.len() {
        return None;
    }
    let mut out = Vec::with_capacity(batch.len());
    out.extend_from_slice(&batch[..BATCH_HEADER_LEN]);
    for r in &kept {
        out.extend_from_slice(&batch[r.start..r.end]);
    }
    let batch_len = (out.len() - 12) as i32;
    out[8..12].copy_from_slice(&batch_len.to_be_bytes());
    out[57..61].copy_from_slice(&(kept.len() as i32).to_be_bytes());
    let crc = crc32c::crc32c(&out[21..]);
    out[17..21].copy_from_slice(&crc.to_be_bytes());
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zigzag(v: i64, out: &mut Vec<u8>) {
        let mut z = ((v << 1) ^ (v >> 63)) as u64;
        loop {
            let b = (z & 0x7f) as u8;
            z >>= 7;
            if z == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    /// A batch of (key, value) records at base offset `base`, built by hand.
    pub(crate) fn batch(base: u64, recs: &[(Option<&[u8]>, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for (i, (k, v)) in recs.iter().enumerate() {
            let mut r = vec![0u8];
            zigzag(0, &mut r);
            zigzag(i as i64, &mut r);
            match k {
                Some(k) => {
                    zigzag(k.len() as i64, &mut r);
                    r.extend_from_slice(k);
                }
                None => zigzag(-1, &mut r),
            }
            zigzag(v.len() as i64, &mut r);
            r.extend_from_slice(v);
            zigzag(0, &mut r);
            zigzag(r.len() as i64, &mut body);
            body.extend_from_slice(&r);
        }
        let mut b = crate::batch::build(recs.len() as u32, 0, &body);
        crate::batch::stamp(&mut b, base, 0);
        b
    }

    #[test]
    fn records_are_read_and_filtered_keeping_offsets() {
        let b = batch(
            10,
            &[
                (Some(b"a"), b"1"),
                (None, b"x"),
                (Some(b"b"), b"2"),
                (Some(b"a"), b"3"),
            ],
        );
        let recs = records(&b).unwrap_or_default();
        assert_eq!(recs.len(), 4);
        assert_eq!(recs[3].offset, 13);
        let key = |r: &RecordSpan| r.key.map(|(s, e)| b[s..e].to_vec());
        assert_eq!(key(&recs[1]), None);
        assert_eq!(key(&recs[3]), Some(b"a".to_vec()));
        // Drop the first "a" (a later one exists).
        let out = filter_batch(&b, |o, k| !(k == Some(b"a") && o < 13)).unwrap_or_default();
        let after = records(&out).unwrap_or_default();
        assert_eq!(
            after.iter().map(|r| r.offset).collect::<Vec<_>>(),
            vec![11, 12, 13]
        );
        let info = crate::batch::inspect(&out).unwrap_or(crate::batch::BatchInfo {
            offset_count: 0,
            max_timestamp: 0,
        });
        assert_eq!(info.offset_count, 4, "the batch still spans its offsets");
        assert_eq!(
            u32::from_be_bytes([out[17], out[18], out[19], out[20]]),
            crc32c::crc32c(&out[21..])
        );
        // Keeping everything changes nothing; dropping everything leaves an empty batch.
        assert!(filter_batch(&b, |_, _| true).is_none());
        let empty = filter_batch(&b, |_, _| false).unwrap_or_default();
        assert_eq!(records(&empty).map(|r| r.len()), Some(0));
        assert!(crate::batch::inspect(&empty).is_ok());
    }

    /// Keyed updates over several segments: compaction keeps the latest value per key (and
    /// keyless records), keeps offsets and the active segment, survives a reopen, and
    /// compacting twice gives the bytes compacting once at the later point gives.
    #[test]
    fn log_compaction_keeps_the_latest_value_per_key() {
        use std::sync::Arc;

        use crate::fs::StdFs;
        use crate::metrics::StorageMetrics;
        use crate::{Entry, EntryKind, LogOptions, PartitionLog};

        let open = |dir: &std::path::Path| {
            PartitionLog::open(
                Arc::new(StdFs),
                dir,
                LogOptions::default(),
                Arc::new(StorageMetrics::default()),
            )
            .unwrap_or_else(|e| panic!("{e}"))
        };
        // Entry i: key k{i % 4} at offset 2i and a keyless record; a roll after every 4
        // entries; entry 12 (active segment) updates k0 again.
        let fill = |log: &PartitionLog| {
            for i in 0..12u64 {
                let k = format!("k{}", i % 4);
                let v = format!("v{i}");
                let b = batch(
                    2 * i,
                    &[(Some(k.as_bytes()), v.as_bytes()), (None, b"nokey")],
                );
                log.append_durable(&[Entry::data(i, 1, 1, b)])
                    .unwrap_or_else(|e| panic!("{e}"));
                if i % 4 == 3 {
                    log.roll().unwrap_or_else(|e| panic!("{e}"));
                }
            }
            let last = batch(24, &[(Some(b"k0"), b"last")]);
            log.append_durable(&[Entry::data(12, 1, 1, last)])
                .unwrap_or_else(|e| panic!("{e}"));
        };
        // (offset, key) of every record, and the raw entries.
        type View = (Vec<(u64, Option<Vec<u8>>)>, Vec<Vec<u8>>);
        let view = |log: &PartitionLog| -> View {
            let entries = log.read(0, u64::MAX, usize::MAX).unwrap_or_default();
            let mut recs = Vec::new();
            for e in &entries {
                if e.entry.kind == EntryKind::Data {
                    let b = &e.entry.payload;
                    for r in records(b).unwrap_or_default() {
                        recs.push((r.offset, r.key.map(|(s, e)| b[s..e].to_vec())));
                    }
                }
            }
            (
                recs,
                entries.iter().map(|e| e.entry.payload.to_vec()).collect(),
            )
        };
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let log = open(dir.path());
        fill(&log);
        assert_eq!(view(&log).0.len(), 25);
        // Up to entry 7: round 0 of k0..k3 (entries 0..3) is superseded by entries 4..7.
        let stats = log.compact(7).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((stats.segments_rewritten, stats.records_removed), (1, 4));
        assert!(stats.bytes_after < stats.bytes_before);
        assert_eq!(view(&log).0.len(), 21);
        assert_eq!(log.next_offset(), 25, "offsets are kept");
        // Up to 12: entries 4..8 go too (k0's latest is in the active segment, which stays).
        log.compact(12).unwrap_or_else(|e| panic!("{e}"));
        let (recs, twice) = view(&log);
        let keyed: Vec<u64> = recs.iter().filter(|r| r.1.is_some()).map(|r| r.0).collect();
        assert_eq!(keyed, vec![18, 20, 22, 24]);
        assert_eq!(recs.len(), 16, "keyless records stay");
        drop(log);
        assert_eq!(view(&open(dir.path())).1, twice, "the same after a reopen");
        // One compaction at 12 gives the same bytes.
        let dir2 = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let once = open(dir2.path());
        fill(&once);
        once.compact(12).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(view(&once).1, twice);
    }

    #[test]
    fn unreadable_batches_are_left_alone() {
        let mut b = batch(0, &[(Some(b"a"), b"1")]);
        b[22] |= 0x01; // gzip
        assert!(records(&b).is_none());
        assert!(filter_batch(&b, |_, _| false).is_none());
        assert!(records(&crate::batch::build(1, 0, b"zz")).is_none());
    }
}
