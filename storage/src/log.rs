//! `PartitionLog`: the segmented log of one partition (and of one Raft group: the Raft log
//! *is* this log).
//!
//! Entries sit at caller-given, gap-free indexes. Each data entry is one RecordBatch v2 whose
//! base offset and leader epoch the log stamps, so record offsets stay contiguous while
//! non-data entries (blank, membership, control) occupy none: that is the offset translator.
//! Start with [`PartitionLog::open`] (recovery rules) and [`PartitionLog::append`] (durability
//! contract). The byte layout is in `docs/storage-format.md`.
//!
//! Locking: one mutex guards the segment list; appends write under it (page-cache writes),
//! while syncs run outside it in the group commit (`commit.rs`). Bulk reads copy out of the
//! file outside the lock.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;

use crate::batch;
use crate::commit::{DurableCallback, FlushPolicy, GroupCommit};
use crate::entry::{self, Entry, EntryKind, FrameHeader, StoredEntry};
use crate::error::{LogError, Result};
use crate::fs::{FileSystem, read_exact_at};
use crate::metrics::StorageMetrics;
use crate::segment::{self, Segment, read_frames};

const START_MARKER: &str = "log-start";
const START_MAGIC: &[u8; 8] = b"AQSTART\x01";

/// Tunables of one log.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// Roll the active segment once it would grow past this many bytes.
    pub segment_bytes: u64,
    /// Roll the active segment once it is older than this (`None`: never by age).
    pub segment_age: Option<Duration>,
    /// Bytes between two sparse offset-index points.
    pub index_interval_bytes: u64,
    /// Largest frame (entry header + payload) accepted on append or trusted on read.
    pub max_entry_bytes: usize,
    pub flush: FlushPolicy,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 1 << 30,
            segment_age: Some(Duration::from_secs(7 * 24 * 3600)),
            index_interval_bytes: 4096,
            max_entry_bytes: 16 << 20,
            flush: FlushPolicy::Always,
        }
    }
}

/// Which sealed segments retention deletes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Delete sealed segments whose newest record is older than this.
    pub max_age: Option<Duration>,
    /// Delete the oldest sealed segments while the log is larger than this.
    pub max_bytes: Option<u64>,
    /// Delete sealed segments whose records all lie below this offset (the log start offset
    /// set by deleting records).
    pub below_offset: Option<u64>,
}

#[derive(Debug)]
struct Inner {
    segments: Vec<Segment>,
    /// First visible index (entries below it were purged, even if their segment remains).
    start_index: u64,
    next_index: u64,
    next_offset: u64,
}

impl Inner {
    fn active(&mut self) -> Option<&mut Segment> {
        self.segments.last_mut()
    }

    /// The segment holding `index` (which must be visible).
    fn segment_for(&self, index: u64) -> Option<&Segment> {
        let k = self.segments.partition_point(|s| s.base_index <= index);
        self.segments
            .get(k.checked_sub(1)?)
            .filter(|s| index < s.next_index)
    }

    fn start_offset(&self, max_frame: usize) -> Result<u64> {
        match self.segment_for(self.start_index) {
            Some(seg) => {
                let (pos, size) = seg.locate(self.start_index, max_frame)?;
                let mut buf = vec![0u8; entry::FRAME_HEADER_LEN];
                read_exact_at(seg.file.as_ref(), &mut buf, pos)
                    .map_err(|e| LogError::io(seg.path(), e))?;
                let h =
                    entry::decode_header_unchecked(&buf, max_frame.max(size)).ok_or_else(|| {
                        LogError::Corrupt {
                            path: seg.path(),
                            reason: "bad header at log start".into(),
                        }
                    })?;
                Ok(h.base_offset)
            }
            None => Ok(self.next_offset),
        }
    }
}

/// The segmented log of one partition. Cheap to share behind an `Arc`; all methods take
/// `&self`.
pub struct PartitionLog {
    fs: Arc<dyn FileSystem>,
    dir: PathBuf,
    opts: LogOptions,
    inner: Mutex<Inner>,
    commit: Arc<GroupCommit>,
    sync_thread: Mutex<Option<JoinHandle<()>>>,
    metrics: Arc<StorageMetrics>,
    /// One compaction at a time.
    compaction: Mutex<()>,
}

/// What one [`PartitionLog::compact`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactionStats {
    pub segments_rewritten: usize,
    pub records_removed: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
}

impl std::fmt::Debug for PartitionLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionLog")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl PartitionLog {
    /// Opens (creating if needed) the log in `dir`, recovering from any crash:
    ///
    /// * temporary files are removed; the start marker (written by `purge_upto`) hides purged
    ///   entries and deletes segments a purge did not finish deleting;
    /// * sealed segments load their index files, or are scanned when those are missing, torn
    ///   or disagree with the log file;
    /// * the last segment is scanned frame by frame; the first frame that is torn, fails its
    ///   CRC or is out of sequence ends the log: it and everything after it is cut off and the
    ///   cut is synced before `open` returns;
    /// * a segment that does not continue its predecessor (index and offset) is deleted with
    ///   every segment after it.
    ///
    /// On return every entry that was durable before the crash is readable, and nothing that
    /// fails its check is.
    pub fn open(
        fs: Arc<dyn FileSystem>,
        dir: &Path,
        opts: LogOptions,
        metrics: Arc<StorageMetrics>,
    ) -> Result<Self> {
        fs.create_dir_all(dir).map_err(|e| LogError::io(dir, e))?;
        let names = fs.list(dir).map_err(|e| LogError::io(dir, e))?;
        let mut bases = Vec::new();
        for name in &names {
            if name.ends_with(".tmp") {
                segment::remove_if_exists(fs.as_ref(), &dir.join(name))?;
            } else if let Some(base) = segment::parse_log_name(name) {
                bases.push(base);
            }
        }
        bases.sort_unstable();
        let marker = read_start_marker(fs.as_ref(), dir)?;
        if marker.is_some() {
            // The marker may exist only in the page cache of a killed process (its rename not
            // yet synced): make it durable before deleting anything on its word, or a power
            // loss could keep the deletions and lose the marker.
            let path = dir.join(START_MARKER);
            let f = fs.open(&path).map_err(|e| LogError::io(&path, e))?;
            f.sync_data().map_err(|e| LogError::io(&path, e))?;
            fs.sync_dir(dir).map_err(|e| LogError::io(dir, e))?;
        }
        if let Some((start, _)) = marker {
            // Finish a purge that was interrupted: a segment whose successor starts at or
            // below the start holds only purged entries. Done before the chain check, since
            // a purge's unsynced deletions may have left any subset of those segments.
            let below = bases.windows(2).take_while(|w| w[1] <= start).count();
            for base in bases.drain(..below) {
                segment::delete_files(fs.as_ref(), dir, base)?;
            }
        }

        if opts.max_entry_bytes > entry::FORMAT_MAX_FRAME
            || opts.max_entry_bytes < entry::FRAME_HEADER_LEN
        {
            return Err(LogError::InvalidOptions(format!(
                "max_entry_bytes must be between {} and {}",
                entry::FRAME_HEADER_LEN,
                entry::FORMAT_MAX_FRAME
            )));
        }
        let max_frame = entry::FORMAT_MAX_FRAME;
        let mut segments: Vec<Segment> = Vec::new();
        let mut chain_broken = false;
        for (i, &base) in bases.iter().enumerate() {
            if chain_broken {
                segment::delete_files(fs.as_ref(), dir, base)?;
                continue;
            }
            let is_last = i + 1 == bases.len();
            let (seg, outcome) = Segment::open(
                fs.as_ref(),
                dir,
                base,
                opts.index_interval_bytes,
                max_frame,
                !is_last,
            )?;
            if let Some(prev) = segments.last()
                && (seg.base_index != prev.next_index
                    || (!seg.is_empty() && seg.base_offset != prev.next_offset))
            {
                tracing::warn!(dir = %dir.display(), base, "segment does not continue its predecessor; dropping it and all later ones");
                segment::delete_files(fs.as_ref(), dir, base)?;
                chain_broken = true;
                continue;
            }
            if outcome.truncated > 0 {
                tracing::warn!(
                    dir = %dir.display(), base, bytes = outcome.truncated, reason = outcome.stop_reason.unwrap_or(""),
                    "recovery cut a torn or corrupt tail"
                );
                StorageMetrics::add(&metrics.recovery_truncated_bytes, outcome.truncated);
                seg.file
                    .sync_data()
                    .map_err(|e| LogError::io(seg.path(), e))?;
                seg.remove_index_files(fs.as_ref())?;
            }
            let mut seg = seg;
            if seg.is_empty() {
                // An empty file carries no offset; it continues its predecessor or the marker.
                seg.base_offset = segments
                    .last()
                    .map_or(marker.map_or(0, |m| m.1), |p| p.next_offset);
                seg.next_offset = seg.base_offset;
            }
            segments.push(seg);
        }

        // The last segment below the start marker (a purge past the end) goes too.
        let start_index = match marker {
            Some((start, _)) => {
                while segments
                    .first()
                    .is_some_and(|s| s.base_index < start && s.next_index <= start)
                {
                    let seg = segments.remove(0);
                    seg.delete_files(fs.as_ref())?;
                }
                start
            }
            None => segments.first().map_or(0, |s| s.base_index),
        };
        if let Some(first) = segments.first()
            && first.base_index > start_index
        {
            return Err(LogError::Corrupt {
                path: dir.to_path_buf(),
                reason: format!(
                    "log starts at {start_index} but its first segment at {}",
                    first.base_index
                ),
            });
        }
        let (next_index, next_offset) = match segments.last() {
            Some(s) => (s.next_index, s.next_offset),
            None => marker.unwrap_or((0, 0)),
        };
        // Whatever open found may exist only in the page cache of a process that was killed
        // before syncing it (frames, or the name of a just-created segment): make all of it
        // durable before anything new is acknowledged on top of it.
        if let Some(last) = segments.last() {
            last.file
                .sync_data()
                .map_err(|e| LogError::io(last.path(), e))?;
        }
        fs.sync_dir(dir).map_err(|e| LogError::io(dir, e))?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs.sync_dir(parent).map_err(|e| LogError::io(parent, e))?;
        }
        StorageMetrics::add(&metrics.open_segments, segments.len() as u64);
        let commit = GroupCommit::new(Arc::clone(&metrics), opts.flush);
        let sync_thread = commit.spawn();
        Ok(Self {
            fs,
            dir: dir.to_path_buf(),
            opts,
            inner: Mutex::new(Inner {
                segments,
                start_index,
                next_index,
                next_offset,
            }),
            commit,
            sync_thread: Mutex::new(sync_thread),
            metrics,
            compaction: Mutex::new(()),
        })
    }

    /// Key compaction up to entry `upto` (see [`crate::compact`]): the latest record per key
    /// among entries ≤ `upto` is kept, older records with the same key are removed from the
    /// entries ≤ `upto` of the sealed segments (the active segment is left alone: roll first
    /// to include it).
    /// Entry indexes, offsets and timestamps are kept, so reads by index, offset and time see
    /// the same entries, with fewer records.
    ///
    /// Each rewritten segment is written to `<base>.log.compact.tmp`, synced, and renamed over
    /// the segment (its index files removed first and rebuilt after), then the directory is
    /// synced: a crash leaves either the old or the new segment, both valid, and a leftover
    /// `.tmp` is removed on open.
    pub fn compact(&self, upto: u64) -> Result<CompactionStats> {
        let _one = self.compaction.lock();
        let mut stats = CompactionStats::default();
        let Some(first) = self.first_index() else {
            return Ok(stats);
        };
        // The latest offset of every key up to `upto`.
        let mut latest: std::collections::HashMap<Vec<u8>, u64> = std::collections::HashMap::new();
        let mut from = first;
        while from <= upto {
            let entries = match self.read(from, upto + 1, 8 << 20) {
                Ok(e) => e,
                // Retention moved the start meanwhile: begin again from there.
                Err(LogError::Purged { first, .. }) => {
                    from = first;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let Some(last) = entries.last() else { break };
            from = last.entry.index + 1;
            for e in &entries {
                if e.entry.kind != EntryKind::Data {
                    continue;
                }
                let b = &e.entry.payload;
                for r in crate::compact::records(b).unwrap_or_default() {
                    if let Some((s, end)) = r.key {
                        latest.insert(b[s..end].to_vec(), r.offset);
                    }
                }
            }
        }
        let keep = |offset: u64, key: Option<&[u8]>| {
            key.is_none_or(|k| latest.get(k).is_none_or(|l| offset >= *l))
        };
        // Sealed segments holding entries at or below `upto` (entries after it in a segment
        // are copied as they are).
        let candidates: Vec<u64> = {
            let inner = self.inner.lock();
            let n = inner.segments.len();
            inner.segments[..n.saturating_sub(1)]
                .iter()
                .filter(|s| !s.is_empty() && s.base_index <= upto)
                .map(|s| s.base_index)
                .collect()
        };
        let max_frame = entry::FORMAT_MAX_FRAME;
        for base in candidates {
            let (file, path, size, span) = {
                let inner = self.inner.lock();
                let Some(seg) = inner.segments.iter().find(|s| s.base_index == base) else {
                    continue;
                };
                (
                    Arc::clone(&seg.file),
                    seg.path(),
                    seg.size,
                    (seg.next_index, seg.next_offset),
                )
            };
            let mut bytes = vec![0u8; size as usize];
            crate::fs::read_exact_at(file.as_ref(), &mut bytes, 0)
                .map_err(|e| LogError::io(&path, e))?;
            let mut out = Vec::with_capacity(bytes.len());
            let mut changed = false;
            let mut removed = 0u64;
            let mut at = 0usize;
            while at < bytes.len() {
                let h = entry::decode_frame(&bytes[at..], max_frame).map_err(|e| {
                    LogError::Corrupt {
                        path: path.clone(),
                        reason: format!("compaction read a bad frame at {at}: {e:?}"),
                    }
                })?;
                let frame = &bytes[at..at + h.frame_size];
                let payload = &frame[entry::FRAME_HEADER_LEN..];
                let rewritten = (h.kind == EntryKind::Data && h.index <= upto)
                    .then(|| crate::compact::filter_batch(payload, keep))
                    .flatten();
                match rewritten {
                    Some(new) => {
                        changed = true;
                        let before = crate::compact::records(payload).map_or(0, |r| r.len());
                        let after = crate::compact::records(&new).map_or(0, |r| r.len());
                        removed += (before - after) as u64;
                        entry::encode_frame(&mut out, &h, &new);
                    }
                    None => out.extend_from_slice(frame),
                }
                at += h.frame_size;
            }
            if !changed {
                continue;
            }
            let tmp = self.dir.join(format!("{base:020}.log.compact.tmp"));
            let f = self.fs.create(&tmp).map_err(|e| LogError::io(&tmp, e))?;
            f.write_all_at(&out, 0).map_err(|e| LogError::io(&tmp, e))?;
            f.sync_data().map_err(|e| LogError::io(&tmp, e))?;
            drop(f);
            let mut inner = self.inner.lock();
            let n = inner.segments.len();
            let Some(pos) = inner.segments[..n.saturating_sub(1)]
                .iter()
                .position(|s| s.base_index == base)
            else {
                // Purged meanwhile.
                segment::remove_if_exists(self.fs.as_ref(), &tmp)?;
                continue;
            };
            let old = &inner.segments[pos];
            let (next_index, next_offset) = (old.next_index, old.next_offset);
            if old.size != size || (next_index, next_offset) != span {
                // Changed since it was read (truncated and refilled): leave it.
                segment::remove_if_exists(self.fs.as_ref(), &tmp)?;
                continue;
            }
            old.remove_index_files(self.fs.as_ref())?;
            self.fs
                .rename(&tmp, &path)
                .map_err(|e| LogError::io(&path, e))?;
            self.fs
                .sync_dir(&self.dir)
                .map_err(|e| LogError::io(&self.dir, e))?;
            let (seg, _) = Segment::open(
                self.fs.as_ref(),
                &self.dir,
                base,
                self.opts.index_interval_bytes,
                max_frame,
                false,
            )?;
            if seg.next_index != next_index || seg.next_offset != next_offset {
                return Err(LogError::Corrupt {
                    path,
                    reason: "the compacted segment does not span the same entries".into(),
                });
            }
            seg.write_index_files(self.fs.as_ref())?;
            stats.segments_rewritten += 1;
            stats.records_removed += removed;
            stats.bytes_before += size;
            stats.bytes_after += seg.size;
            inner.segments[pos] = seg;
        }
        Ok(stats)
    }

    /// The last index of the newest sealed segment (what compaction can reach), if any.
    pub fn sealed_last_index(&self) -> Option<u64> {
        let inner = self.inner.lock();
        let n = inner.segments.len();
        (n >= 2)
            .then(|| inner.segments[n - 2].last_index())
            .flatten()
    }

    /// The directory holding this log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends `entries`, which must start at [`PartitionLog::next_index`] and be gap-free.
    ///
    /// Contract: on `Ok` the entries are readable (by index, offset and time) and `on_durable`
    /// will be called exactly once — with `Ok` after an `fdatasync` covering them (policy
    /// `Always`), right after the write (`Interval`), or at the next `flush` (`Manual`); with
    /// `Err` if the log fails first. On `Err` nothing was appended, or (I/O error) the log is
    /// failed and acknowledges nothing more; `on_durable` is dropped uncalled. Data entries
    /// must hold a RecordBatch v2; the log stamps its base offset (the next offset) and leader
    /// epoch (the term) and stores the rest byte for byte.
    pub fn append(&self, entries: &[Entry], on_durable: Option<DurableCallback>) -> Result<()> {
        if let Some(why) = self.commit.failure() {
            return Err(LogError::Failed(why));
        }
        let mut inner = self.inner.lock();
        let Some(first) = entries.first() else {
            drop(inner);
            if let Some(cb) = self.commit.register_nothing(on_durable) {
                cb(Ok(()));
            }
            return Ok(());
        };
        if first.index.checked_add(entries.len() as u64).is_none() {
            return Err(LogError::IndexOverflow { index: first.index });
        }
        if first.index != inner.next_index {
            return Err(LogError::NonContiguous {
                expected: inner.next_index,
                got: first.index,
            });
        }
        // Validate everything before writing anything.
        let mut infos = Vec::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            if e.index != first.index + i as u64 {
                return Err(LogError::NonContiguous {
                    expected: first.index + i as u64,
                    got: e.index,
                });
            }
            let size = entry::frame_size(e.payload.len());
            if size > self.opts.max_entry_bytes {
                return Err(LogError::EntryTooLarge {
                    index: e.index,
                    size,
                    limit: self.opts.max_entry_bytes,
                });
            }
            infos.push(match e.kind {
                EntryKind::Data => {
                    Some(
                        batch::inspect(&e.payload).map_err(|reason| LogError::InvalidBatch {
                            index: e.index,
                            reason,
                        })?,
                    )
                }
                _ => None,
            });
        }
        let result = self.write_entries(&mut inner, entries, &infos);
        match result {
            Ok(()) => {
                let file = match inner.active() {
                    Some(seg) => Arc::clone(&seg.file),
                    None => return Err(LogError::Closed),
                };
                // Register under the lock so that write order and sequence order agree; run an
                // immediate callback only after releasing it.
                let now = self.commit.register(&file, on_durable);
                drop(inner);
                if let Some(cb) = now {
                    cb(Ok(()));
                }
                Ok(())
            }
            Err(e) => {
                self.commit.fail(e.to_string());
                Err(e)
            }
        }
    }

    /// Appends and blocks until the entries are durable per the policy (a convenience over
    /// [`PartitionLog::append`]). With `FlushPolicy::Manual` this runs the flush itself.
    pub fn append_durable(&self, entries: &[Entry]) -> Result<()> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.append(
            entries,
            Some(Box::new(move |r| {
                let _ = tx.send(r);
            })),
        )?;
        if self.opts.flush == FlushPolicy::Manual {
            self.flush()?;
        }
        rx.recv().map_err(|_| LogError::Closed)?
    }

    fn write_entries(
        &self,
        inner: &mut Inner,
        entries: &[Entry],
        infos: &[Option<batch::BatchInfo>],
    ) -> Result<()> {
        let total: usize = entries
            .iter()
            .map(|e| entry::frame_size(e.payload.len()))
            .sum();
        let mut buf: Vec<u8> = Vec::with_capacity(total.min(self.opts.segment_bytes as usize));
        let mut headers: Vec<(FrameHeader, u64)> = Vec::new();
        let mut next_offset = inner.next_offset;
        for (e, info) in entries.iter().zip(infos) {
            let size = entry::frame_size(e.payload.len()) as u64;
            let needs_segment = match inner.segments.last() {
                None => true,
                Some(seg) => {
                    let pending = buf.len() as u64;
                    !seg.is_empty()
                        && (seg.size + pending + size > self.opts.segment_bytes
                            || self
                                .opts
                                .segment_age
                                .is_some_and(|age| seg.created.elapsed() >= age))
                }
            };
            if needs_segment {
                self.write_buffer(inner, &mut buf, &mut headers)?;
                self.roll_locked(inner)?;
            }
            let (offset_count, max_timestamp) = match info {
                Some(i) => (i.offset_count, i.max_timestamp),
                None => (0, -1),
            };
            let h = FrameHeader {
                index: e.index,
                term: e.term,
                leader: e.leader,
                kind: e.kind,
                offset_count,
                base_offset: next_offset,
                max_timestamp,
                frame_size: size as usize,
            };
            let position = buf.len() as u64;
            if e.kind == EntryKind::Data {
                let mut stamped = [0u8; batch::BATCH_HEADER_LEN];
                stamped.copy_from_slice(&e.payload[..batch::BATCH_HEADER_LEN]);
                batch::stamp(
                    &mut stamped,
                    next_offset,
                    e.term.min(i32::MAX as u64) as i32,
                );
                entry::encode_frame_parts(
                    &mut buf,
                    &h,
                    &[&stamped, &e.payload[batch::BATCH_HEADER_LEN..]],
                );
            } else {
                entry::encode_frame(&mut buf, &h, &e.payload);
            }
            headers.push((h, position));
            next_offset += u64::from(offset_count);
        }
        self.write_buffer(inner, &mut buf, &mut headers)
    }

    /// Writes buffered frames to the active segment and records them in its indexes.
    fn write_buffer(
        &self,
        inner: &mut Inner,
        buf: &mut Vec<u8>,
        headers: &mut Vec<(FrameHeader, u64)>,
    ) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let seg = inner.segments.last_mut().ok_or(LogError::Closed)?;
        let at = seg.size;
        seg.file
            .write_all_at(buf, at)
            .map_err(|e| LogError::io(seg.path(), e))?;
        for (h, rel) in headers.iter() {
            seg.note_appended(h, at + rel);
        }
        StorageMetrics::add(&self.metrics.appended_entries, headers.len() as u64);
        StorageMetrics::add(&self.metrics.appended_bytes, buf.len() as u64);
        inner.next_index = seg.next_index;
        inner.next_offset = seg.next_offset;
        buf.clear();
        headers.clear();
        Ok(())
    }

    /// Seals the active segment (synced, index files written) and starts a new one.
    fn roll_locked(&self, inner: &mut Inner) -> Result<()> {
        if let Some(seg) = inner.segments.last() {
            if seg.is_empty() {
                return Ok(());
            }
            seg.file
                .sync_data()
                .map_err(|e| LogError::io(seg.path(), e))?;
            StorageMetrics::add(&self.metrics.fsyncs, 1);
            seg.write_index_files(self.fs.as_ref())?;
            StorageMetrics::add(&self.metrics.segments_rolled, 1);
        }
        let seg = Segment::create(
            self.fs.as_ref(),
            &self.dir,
            inner.next_index,
            inner.next_offset,
            self.opts.index_interval_bytes,
        )?;
        self.fs
            .sync_dir(&self.dir)
            .map_err(|e| LogError::io(&self.dir, e))?;
        StorageMetrics::add(&self.metrics.open_segments, 1);
        inner.segments.push(seg);
        Ok(())
    }

    /// Seals the active segment and starts a new one (no-op if it is empty). Durable on
    /// return.
    pub fn roll(&self) -> Result<()> {
        let mut inner = self.inner.lock();
        if inner.segments.is_empty() {
            return Ok(());
        }
        self.roll_locked(&mut inner)
            .inspect_err(|e| self.commit.fail(e.to_string()))
    }

    /// Makes every append so far durable and fires its callbacks, on the caller's thread.
    pub fn flush(&self) -> Result<()> {
        self.commit.sync_round()
    }

    /// Removes every entry after `index` (a follower dropping a conflicting suffix); the same
    /// as `truncate_from(index + 1)`.
    pub fn truncate_after(&self, index: u64) -> Result<()> {
        self.truncate_from(index.saturating_add(1))
    }

    /// Removes every entry at `from` and after. Durable on return: a crash afterwards never
    /// brings the removed entries back. Callbacks of removed appends still fire (at the next
    /// sync). `from` may be at or below the first entry (the log becomes empty, continuing at
    /// `from`) but not below the purge point (`Purged`).
    pub fn truncate_from(&self, from: u64) -> Result<()> {
        let mut inner = self.inner.lock();
        if from >= inner.next_index {
            return Ok(());
        }
        if from < inner.start_index {
            return Err(LogError::Purged {
                index: from,
                first: inner.start_index,
            });
        }
        let r = self.truncate_locked(&mut inner, from);
        r.inspect_err(|e| self.commit.fail(e.to_string()))
    }

    fn truncate_locked(&self, inner: &mut Inner, from: u64) -> Result<()> {
        let mut dir_changed = false;
        let mut new_next_offset = None;
        while inner.segments.last().is_some_and(|s| s.base_index >= from) {
            if let Some(seg) = inner.segments.pop() {
                new_next_offset = Some(seg.base_offset);
                seg.delete_files(self.fs.as_ref())?;
                StorageMetrics::add(&self.metrics.segments_deleted, 1);
                StorageMetrics::sub(&self.metrics.open_segments, 1);
                dir_changed = true;
            }
        }
        if dir_changed {
            self.fs
                .sync_dir(&self.dir)
                .map_err(|e| LogError::io(&self.dir, e))?;
        }
        let max_frame = entry::FORMAT_MAX_FRAME;
        match inner.segments.last_mut() {
            Some(seg) => {
                seg.remove_index_files(self.fs.as_ref())?;
                seg.truncate_from(from, max_frame)?;
                seg.file
                    .sync_data()
                    .map_err(|e| LogError::io(seg.path(), e))?;
                self.fs
                    .sync_dir(&self.dir)
                    .map_err(|e| LogError::io(&self.dir, e))?;
                inner.next_index = seg.next_index;
                inner.next_offset = seg.next_offset;
            }
            None => {
                inner.next_index = from;
                if let Some(off) = new_next_offset {
                    inner.next_offset = off;
                }
            }
        }
        Ok(())
    }

    /// Drops every entry up to and including `index` (retention, or after a snapshot). The new
    /// start is recorded durably (the `log-start` marker) before any segment is deleted, so a
    /// crash never resurrects purged entries. Whole segments below the start are deleted; a
    /// segment straddling it stays with its purged entries hidden. `index` may lie beyond the
    /// last entry: the log is then empty, the next append is at `index + 1`, and offsets
    /// continue from the current next offset. A no-op if `index` is already purged.
    pub fn purge_upto(&self, index: u64) -> Result<()> {
        if index == u64::MAX {
            return Err(LogError::IndexOverflow { index });
        }
        let mut inner = self.inner.lock();
        if index < inner.start_index {
            return Ok(());
        }
        let r = self.purge_locked(&mut inner, index);
        r.inspect_err(|e| self.commit.fail(e.to_string()))
    }

    /// Empties the log so that it continues at index `index + 1` with record offset
    /// `next_offset`: a replica that installs a snapshot past its own end (what came before it
    /// was purged everywhere else) continues exactly where the others do.
    ///
    /// Contract: `index` is at or past the last entry (else `ResetInsideLog`, nothing
    /// changes); on `Ok` the new start is durable (the `log-start` marker carries the offset)
    /// and every segment is deleted.
    pub fn reset_after(&self, index: u64, next_offset: u64) -> Result<()> {
        if index == u64::MAX {
            return Err(LogError::IndexOverflow { index });
        }
        let mut inner = self.inner.lock();
        if index + 1 < inner.next_index {
            return Err(LogError::ResetInsideLog {
                index,
                last: inner.next_index - 1,
            });
        }
        inner.next_offset = next_offset;
        let r = self.purge_locked(&mut inner, index);
        r.inspect_err(|e| self.commit.fail(e.to_string()))
    }

    fn purge_locked(&self, inner: &mut Inner, index: u64) -> Result<()> {
        let start = index + 1;
        inner.start_index = start;
        if start > inner.next_index {
            inner.next_index = start;
        }
        let start_offset = inner.start_offset(entry::FORMAT_MAX_FRAME)?;
        let mut marker = Vec::with_capacity(28);
        marker.extend_from_slice(START_MAGIC);
        marker.extend_from_slice(&start.to_le_bytes());
        marker.extend_from_slice(&start_offset.to_le_bytes());
        let crc = crc32c::crc32c(&marker);
        marker.extend_from_slice(&crc.to_le_bytes());
        segment::write_file_replace(self.fs.as_ref(), &self.dir, START_MARKER, &marker)?;
        self.fs
            .sync_dir(&self.dir)
            .map_err(|e| LogError::io(&self.dir, e))?;
        let before = inner.segments.len();
        while inner
            .segments
            .first()
            .is_some_and(|s| s.base_index < start && s.next_index <= start)
        {
            let seg = inner.segments.remove(0);
            seg.delete_files(self.fs.as_ref())?;
        }
        let deleted = (before - inner.segments.len()) as u64;
        if deleted > 0 {
            StorageMetrics::add(&self.metrics.segments_deleted, deleted);
            StorageMetrics::sub(&self.metrics.open_segments, deleted);
            self.fs
                .sync_dir(&self.dir)
                .map_err(|e| LogError::io(&self.dir, e))?;
        }
        Ok(())
    }

    /// The sealed-segment boundary up to which `policy` says to delete (the last index of the
    /// newest sealed segment it would remove), or `None`. A pure decision: the partition leader
    /// replicates it as an entry and every replica then calls `purge_upto` with it.
    pub fn retention_point(&self, policy: &RetentionPolicy, now_ms: i64) -> Option<u64> {
        let inner = self.inner.lock();
        let sealed = inner.segments.len().saturating_sub(1);
        let mut total: u64 = inner.segments.iter().map(|s| s.size).sum();
        let mut point = None;
        for seg in &inner.segments[..sealed] {
            let too_old = policy.max_age.is_some_and(|age| {
                seg.max_timestamp
                    < now_ms.saturating_sub(age.as_millis().min(i64::MAX as u128) as i64)
            });
            let too_big = policy.max_bytes.is_some_and(|max| total > max);
            let deleted = policy.below_offset.is_some_and(|o| seg.next_offset <= o);
            if !(too_old || too_big || deleted) {
                break;
            }
            total -= seg.size;
            point = seg
                .last_index()
                .filter(|&last| last >= inner.start_index)
                .or(point);
        }
        point
    }

    /// Applies [`PartitionLog::retention_point`] locally; returns the purge point if any.
    pub fn enforce_retention(&self, policy: &RetentionPolicy, now_ms: i64) -> Result<Option<u64>> {
        let point = self.retention_point(policy, now_ms);
        if let Some(p) = point {
            self.purge_upto(p)?;
        }
        Ok(point)
    }

    /// First visible index, or `None` if the log is empty.
    pub fn first_index(&self) -> Option<u64> {
        let inner = self.inner.lock();
        (inner.start_index < inner.next_index).then_some(inner.start_index)
    }

    /// Last index, or `None` if the log is empty.
    pub fn last_index(&self) -> Option<u64> {
        let inner = self.inner.lock();
        (inner.start_index < inner.next_index).then(|| inner.next_index - 1)
    }

    /// The index the next append must use.
    pub fn next_index(&self) -> u64 {
        self.inner.lock().next_index
    }

    /// Offset the next record will get (the log-end offset).
    pub fn next_offset(&self) -> u64 {
        self.inner.lock().next_offset
    }

    /// Offset of the first visible record (the log-start offset; equals `next_offset` when
    /// the log holds no records).
    pub fn start_offset(&self) -> Result<u64> {
        self.inner.lock().start_offset(entry::FORMAT_MAX_FRAME)
    }

    /// Bytes in all segment files.
    pub fn size_bytes(&self) -> u64 {
        self.inner.lock().segments.iter().map(|s| s.size).sum()
    }

    /// Number of segments.
    pub fn segment_count(&self) -> usize {
        self.inner.lock().segments.len()
    }

    /// Reads entries with indexes in `[from, to)`, stopping before `max_bytes` of frames are
    /// exceeded but always returning the first entry (if `from < to` and it exists). Entries
    /// come back exactly as appended (data batches stamped). Errors: `Purged` if `from` is
    /// below the first index. Every returned entry passed its CRC check.
    pub fn read(&self, from: u64, to: u64, max_bytes: usize) -> Result<Vec<StoredEntry>> {
        let mut out = Vec::new();
        let mut from = from;
        let max_frame = entry::FORMAT_MAX_FRAME;
        loop {
            let (file, path, pos, end, first_size) = {
                let inner = self.inner.lock();
                if from < inner.start_index {
                    return Err(LogError::Purged {
                        index: from,
                        first: inner.start_index,
                    });
                }
                let to = to.min(inner.next_index);
                if from >= to {
                    break;
                }
                let Some(seg) = inner.segment_for(from) else {
                    break;
                };
                let (pos, size) = seg.locate(from, max_frame)?;
                (Arc::clone(&seg.file), seg.path(), pos, seg.size, size)
            };
            let used: usize = out
                .iter()
                .map(|e: &StoredEntry| entry::frame_size(e.entry.payload.len()))
                .sum();
            if !out.is_empty() && used + first_size > max_bytes {
                break;
            }
            let budget = if out.is_empty() {
                max_bytes
            } else {
                max_bytes - used
            };
            let before = out.len();
            let copied = read_frames(
                file.as_ref(),
                &path,
                pos,
                end,
                first_size,
                budget,
                max_frame,
                &mut out,
            );
            let n = match copied {
                Ok(n) if n == 0 || out[before].entry.index == from => n,
                _ => {
                    // A truncation raced the copy (made outside the lock): redo it under the
                    // lock, where the segment cannot change.
                    out.truncate(before);
                    let inner = self.inner.lock();
                    if from < inner.start_index {
                        return Err(LogError::Purged {
                            index: from,
                            first: inner.start_index,
                        });
                    }
                    let Some(seg) = inner.segment_for(from) else {
                        break;
                    };
                    let (pos, size) = seg.locate(from, max_frame)?;
                    read_frames(
                        seg.file.as_ref(),
                        &seg.path(),
                        pos,
                        seg.size,
                        size,
                        budget,
                        max_frame,
                        &mut out,
                    )?
                }
            };
            if n == 0 {
                break;
            }
            out.retain(|e| e.entry.index < to);
            match out.last() {
                Some(e) if e.entry.index + 1 < to => from = e.entry.index + 1,
                _ => break,
            }
        }
        let bytes: usize = out.iter().map(|e| e.entry.payload.len()).sum();
        StorageMetrics::add(&self.metrics.read_bytes, bytes as u64);
        Ok(out)
    }

    /// Reads data entries starting with the one holding `offset` (Kafka fetch semantics: the
    /// first batch may start before `offset`), at most `max_bytes` but always one batch.
    /// Errors: `OffsetOutOfRange` below the log-start offset or above the log-end offset; at
    /// exactly the log-end offset the result is empty.
    pub fn read_offsets(&self, offset: u64, max_bytes: usize) -> Result<Vec<StoredEntry>> {
        let from = {
            let inner = self.inner.lock();
            let start = inner.start_offset(entry::FORMAT_MAX_FRAME)?;
            if offset < start || offset > inner.next_offset {
                return Err(LogError::OffsetOutOfRange {
                    offset,
                    start,
                    end: inner.next_offset,
                });
            }
            if offset == inner.next_offset {
                return Ok(Vec::new());
            }
            let k = inner
                .segments
                .partition_point(|s| s.base_offset <= offset && !s.is_empty());
            let Some(seg) = inner.segments.get(k.saturating_sub(1)) else {
                return Ok(Vec::new());
            };
            let (pos, _) = seg.locate_offset(offset, entry::FORMAT_MAX_FRAME)?;
            let mut buf = vec![0u8; entry::FRAME_HEADER_LEN];
            read_exact_at(seg.file.as_ref(), &mut buf, pos)
                .map_err(|e| LogError::io(seg.path(), e))?;
            entry::decode_header_unchecked(&buf, entry::FORMAT_MAX_FRAME)
                .ok_or_else(|| LogError::Corrupt {
                    path: seg.path(),
                    reason: "bad header".into(),
                })?
                .index
                .max(inner.start_index)
        };
        let mut out = self.read(from, u64::MAX, max_bytes)?;
        out.retain(|e| e.entry.kind == EntryKind::Data && e.next_offset() > offset);
        Ok(out)
    }

    /// The first visible data entry whose largest timestamp is ≥ `ts` (ListOffsets by time;
    /// the caller finds the exact record inside the batch), or `None` if every record is older.
    pub fn entry_for_timestamp(&self, ts: i64) -> Result<Option<StoredEntry>> {
        let max_frame = entry::FORMAT_MAX_FRAME;
        let start_at = {
            let inner = self.inner.lock();
            let mut found = None;
            for seg in &inner.segments {
                if seg.next_index <= inner.start_index {
                    continue;
                }
                if let Some((pos, _)) = seg.locate_time(ts, max_frame)? {
                    let mut buf = vec![0u8; entry::FRAME_HEADER_LEN];
                    read_exact_at(seg.file.as_ref(), &mut buf, pos)
                        .map_err(|e| LogError::io(seg.path(), e))?;
                    let h = entry::decode_header_unchecked(&buf, max_frame).ok_or_else(|| {
                        LogError::Corrupt {
                            path: seg.path(),
                            reason: "bad header".into(),
                        }
                    })?;
                    found = Some(h.index.max(inner.start_index));
                    break;
                }
            }
            match found {
                Some(i) => i,
                None => return Ok(None),
            }
        };
        // Walk forward from the located entry (only needed when it lies in the purged part).
        let mut from = start_at;
        loop {
            let chunk = self.read(from, u64::MAX, 1 << 20)?;
            let Some(last) = chunk.last() else {
                return Ok(None);
            };
            from = last.entry.index + 1;
            if let Some(e) = chunk
                .into_iter()
                .find(|e| e.entry.kind == EntryKind::Data && e.max_timestamp >= ts)
            {
                return Ok(Some(e));
            }
        }
    }

    /// Offset of the first batch holding a record with timestamp ≥ `ts` (see
    /// [`PartitionLog::entry_for_timestamp`]).
    pub fn offset_for_timestamp(&self, ts: i64) -> Result<Option<u64>> {
        Ok(self.entry_for_timestamp(ts)?.map(|e| e.base_offset))
    }

    /// Flushes, stops the sync thread and closes the log. Callbacks still pending fire first.
    pub fn close(self) -> Result<()> {
        let r = self.commit.sync_round();
        self.stop_sync_thread();
        r
    }

    fn stop_sync_thread(&self) {
        self.commit.shutdown();
        if let Some(t) = self.sync_thread.lock().take() {
            let _ = t.join();
        }
    }
}

impl Drop for PartitionLog {
    fn drop(&mut self) {
        self.stop_sync_thread();
        StorageMetrics::sub(
            &self.metrics.open_segments,
            self.inner.get_mut().segments.len() as u64,
        );
    }
}

/// Reads the `log-start` marker: (first visible index, offset at that point).
fn read_start_marker(fs: &dyn FileSystem, dir: &Path) -> Result<Option<(u64, u64)>> {
    let path = dir.join(START_MARKER);
    let f = match fs.open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LogError::io(&path, e)),
    };
    let mut buf = [0u8; 28];
    let len = f.len().map_err(|e| LogError::io(&path, e))?;
    if len != 28 {
        return Err(LogError::Corrupt {
            path,
            reason: format!("start marker is {len} bytes, not 28"),
        });
    }
    read_exact_at(f.as_ref(), &mut buf, 0).map_err(|e| LogError::io(&path, e))?;
    let crc = u32::from_le_bytes([buf[24], buf[25], buf[26], buf[27]]);
    if &buf[..8] != START_MAGIC || crc32c::crc32c(&buf[..24]) != crc {
        return Err(LogError::Corrupt {
            path,
            reason: "start marker failed its check".into(),
        });
    }
    let u = |at: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&buf[at..at + 8]);
        u64::from_le_bytes(x)
    };
    Ok(Some((u(8), u(16))))
}

#[cfg(test)]
mod reset_tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::batch;
    use crate::fs::StdFs;

    fn open(dir: &Path) -> PartitionLog {
        PartitionLog::open(
            Arc::new(StdFs),
            dir,
            LogOptions::default(),
            Arc::new(StorageMetrics::default()),
        )
        .unwrap()
    }

    /// A replica behind a purge continues exactly where the others do, also after a reopen;
    /// a reset inside the log is refused and changes nothing.
    #[test]
    fn reset_continues_at_the_given_index_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        for i in 0..3 {
            log.append_durable(&[Entry::data(i, 1, 1, batch::build(2, 0, b"x"))])
                .unwrap();
        }
        assert!(matches!(
            log.reset_after(1, 100),
            Err(LogError::ResetInsideLog { index: 1, last: 2 })
        ));
        assert_eq!(log.next_offset(), 6);
        log.reset_after(9, 40).unwrap();
        assert_eq!((log.first_index(), log.next_index()), (None, 10));
        assert_eq!((log.start_offset().unwrap(), log.next_offset()), (40, 40));
        drop(log);
        let log = open(dir.path());
        assert_eq!((log.next_index(), log.next_offset()), (10, 40));
        log.append_durable(&[Entry::data(10, 2, 1, batch::build(3, 0, b"y"))])
            .unwrap();
        let got = log.read(10, 11, 1 << 20).unwrap();
        assert_eq!((got[0].base_offset, got[0].next_offset()), (40, 43));
    }
}
