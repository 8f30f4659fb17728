//! One segment: a `<base>.log` file of frames plus its sparse offset index and time index.
//!
//! The indexes live in memory while the segment is open. When a segment is sealed (rolled)
//! they are written to `<base>.index` and `<base>.timeindex`, each with a CRC-32C trailer; on
//! open a sealed segment whose index files are missing, torn or disagree with the log file is
//! rebuilt by scanning it. The active (last) segment is always scanned on open.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::entry::{self, EntryKind, FrameError, FrameHeader, StoredEntry};
use crate::error::{LogError, Result};
use crate::fs::{FileHandle, FileSystem, read_exact_at};

const INDEX_MAGIC: &[u8; 8] = b"AQIDX\x00\x00\x01";
const TIME_INDEX_MAGIC: &[u8; 8] = b"AQTIX\x00\x00\x01";
/// Largest region read at once while scanning a segment.
const SCAN_CHUNK: usize = 1 << 20;

/// Sparse offset-index point: the entry at `index` starts at `position` with `base_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexPoint {
    pub index: u64,
    pub base_offset: u64,
    pub position: u64,
}

/// Time-index point: the largest timestamp up to and including the entry at `index` (which
/// starts at `position`) is `max_timestamp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimePoint {
    pub max_timestamp: i64,
    pub index: u64,
    pub position: u64,
}

pub(crate) fn log_name(base: u64) -> String {
    format!("{base:020}.log")
}

fn index_name(base: u64) -> String {
    format!("{base:020}.index")
}

fn time_index_name(base: u64) -> String {
    format!("{base:020}.timeindex")
}

/// Parses `<20 digits>.log`.
pub(crate) fn parse_log_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".log")?;
    (stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit())).then(|| stem.parse().ok())?
}

#[derive(Debug)]
pub(crate) struct Segment {
    pub base_index: u64,
    pub base_offset: u64,
    pub next_index: u64,
    pub next_offset: u64,
    /// Bytes of complete, valid frames.
    pub size: u64,
    /// Largest timestamp of any data entry (-1 if none).
    pub max_timestamp: i64,
    pub offset_index: Vec<IndexPoint>,
    pub time_index: Vec<TimePoint>,
    bytes_since_point: u64,
    pub file: Arc<dyn FileHandle>,
    pub dir: PathBuf,
    pub created: Instant,
    index_interval: u64,
}

/// Result of scanning a segment file.
#[derive(Debug)]
pub(crate) struct ScanOutcome {
    /// Bytes after the last valid frame that recovery cut off.
    pub truncated: u64,
    /// Why the scan stopped early, if it did.
    pub stop_reason: Option<&'static str>,
}

impl Segment {
    /// Creates a new empty segment file (the caller syncs the directory).
    pub fn create(
        fs: &dyn FileSystem,
        dir: &Path,
        base_index: u64,
        base_offset: u64,
        index_interval: u64,
    ) -> Result<Self> {
        let path = dir.join(log_name(base_index));
        let file = fs.create(&path).map_err(|e| LogError::io(&path, e))?;
        Ok(Self::empty(
            file,
            dir,
            base_index,
            base_offset,
            index_interval,
        ))
    }

    fn empty(
        file: Arc<dyn FileHandle>,
        dir: &Path,
        base_index: u64,
        base_offset: u64,
        index_interval: u64,
    ) -> Self {
        Self {
            base_index,
            base_offset,
            next_index: base_index,
            next_offset: base_offset,
            size: 0,
            max_timestamp: -1,
            offset_index: Vec::new(),
            time_index: Vec::new(),
            bytes_since_point: 0,
            file,
            dir: dir.to_path_buf(),
            created: Instant::now(),
            index_interval,
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(log_name(self.base_index))
    }

    pub fn is_empty(&self) -> bool {
        self.next_index == self.base_index
    }

    pub fn last_index(&self) -> Option<u64> {
        (!self.is_empty()).then(|| self.next_index - 1)
    }

    /// Opens an existing segment. With `trust_index`, valid index files are used instead of a
    /// scan; otherwise (or when they are unusable) the file is scanned, its torn or corrupt
    /// tail truncated (not synced: the caller syncs), and the indexes rebuilt.
    pub fn open(
        fs: &dyn FileSystem,
        dir: &Path,
        base_index: u64,
        index_interval: u64,
        max_frame: usize,
        trust_index: bool,
    ) -> Result<(Self, ScanOutcome)> {
        let path = dir.join(log_name(base_index));
        let file = fs.open(&path).map_err(|e| LogError::io(&path, e))?;
        let len = file.len().map_err(|e| LogError::io(&path, e))?;
        let mut seg = Self::empty(file, dir, base_index, 0, index_interval);
        if trust_index && seg.load_index_files(fs, len) {
            return Ok((
                seg,
                ScanOutcome {
                    truncated: 0,
                    stop_reason: None,
                },
            ));
        }
        let outcome = seg.scan(len, max_frame)?;
        if outcome.truncated > 0 {
            if trust_index {
                // A sealed segment was synced whole before its successor existed: damage
                // inside it is not a torn tail, and cutting it would drop every later segment.
                return Err(LogError::Corrupt {
                    path,
                    reason: format!(
                        "sealed segment fails its check {} bytes before its end ({})",
                        outcome.truncated,
                        outcome.stop_reason.unwrap_or("")
                    ),
                });
            }
            seg.file
                .set_len(seg.size)
                .map_err(|e| LogError::io(&path, e))?;
        }
        Ok((seg, outcome))
    }

    /// Rebuilds all in-memory state by reading every frame from the start of the file.
    fn scan(&mut self, file_len: u64, max_frame: usize) -> Result<ScanOutcome> {
        let path = self.path();
        let mut pos = 0u64;
        let mut first = true;
        let mut stop_reason = None;
        let mut want = SCAN_CHUNK;
        'outer: while pos < file_len {
            let left = (file_len - pos) as usize;
            let mut buf = vec![0u8; want.min(left)];
            want = SCAN_CHUNK;
            read_exact_at(self.file.as_ref(), &mut buf, pos).map_err(|e| LogError::io(&path, e))?;
            let mut at = 0usize;
            loop {
                match entry::decode_frame(&buf[at..], max_frame) {
                    Ok(h) => {
                        if first {
                            if h.index != self.base_index {
                                stop_reason = Some("first entry does not match the file name");
                                break 'outer;
                            }
                            self.base_offset = h.base_offset;
                            self.next_offset = h.base_offset;
                            first = false;
                        } else if h.index != self.next_index || h.base_offset != self.next_offset {
                            stop_reason = Some("entry out of sequence");
                            break 'outer;
                        }
                        self.note_appended(&h, pos + at as u64);
                        at += h.frame_size;
                    }
                    Err(FrameError::Incomplete) => {
                        let claimed = entry::claimed_frame_size(&buf[at..]);
                        if at == 0 && claimed.is_none_or(|size| size <= buf.len() || size > left) {
                            // A frame longer than what is left in the file: torn tail.
                            stop_reason = Some("torn frame at the tail");
                            break 'outer;
                        }
                        // Read the frame (bounded by the format limit) in one piece next.
                        if at == 0 {
                            want = claimed.unwrap_or(SCAN_CHUNK);
                        }
                        break;
                    }
                    Err(FrameError::Invalid(why)) => {
                        stop_reason = Some(why);
                        break 'outer;
                    }
                }
                if at == buf.len() {
                    break;
                }
            }
            pos += at as u64;
        }
        Ok(ScanOutcome {
            truncated: file_len - self.size,
            stop_reason,
        })
    }

    /// Records a frame just written at `position` in the in-memory state and indexes.
    pub fn note_appended(&mut self, h: &FrameHeader, position: u64) {
        let point_due =
            self.offset_index.is_empty() || self.bytes_since_point >= self.index_interval;
        if point_due {
            self.offset_index.push(IndexPoint {
                index: h.index,
                base_offset: h.base_offset,
                position,
            });
            self.bytes_since_point = 0;
        }
        if h.kind == EntryKind::Data && h.max_timestamp > self.max_timestamp {
            self.max_timestamp = h.max_timestamp;
        }
        let last_recorded = self.time_index.last().map_or(i64::MIN, |t| t.max_timestamp);
        if self.max_timestamp > last_recorded && (point_due || self.time_index.is_empty()) {
            self.time_index.push(TimePoint {
                max_timestamp: self.max_timestamp,
                index: h.index,
                position,
            });
        }
        self.bytes_since_point += h.frame_size as u64;
        self.size = position + h.frame_size as u64;
        self.next_index = h.index + 1;
        self.next_offset = h.base_offset + u64::from(h.offset_count);
    }

    /// Drops every entry at `from` and after from memory and the file (not synced: the caller
    /// syncs).
    pub fn truncate_from(&mut self, from: u64, max_frame: usize) -> Result<()> {
        let path = self.path();
        if from <= self.base_index {
            self.file.set_len(0).map_err(|e| LogError::io(&path, e))?;
            let file = self.file.clone();
            *self = Self::empty(
                file,
                &self.dir.clone(),
                self.base_index,
                self.base_offset,
                self.index_interval,
            );
            return Ok(());
        }
        if from >= self.next_index {
            return Ok(());
        }
        let (cut, _) = self.locate(from, max_frame)?;
        self.file.set_len(cut).map_err(|e| LogError::io(&path, e))?;
        // Rebuild the in-memory state from the kept prefix (bounded by the segment size).
        let file = self.file.clone();
        let mut fresh = Self::empty(
            file,
            &self.dir.clone(),
            self.base_index,
            self.base_offset,
            self.index_interval,
        );
        fresh.created = self.created;
        let outcome = fresh.scan(cut, max_frame)?;
        if outcome.truncated > 0 {
            return Err(LogError::Corrupt {
                path,
                reason: format!(
                    "entries before the truncation point failed their check ({:?})",
                    outcome.stop_reason
                ),
            });
        }
        *self = fresh;
        Ok(())
    }

    /// Position and frame size of the entry with `index` (which must be in this segment).
    pub fn locate(&self, index: u64, max_frame: usize) -> Result<(u64, usize)> {
        let k = self.offset_index.partition_point(|p| p.index <= index);
        let start = self
            .offset_index
            .get(k.wrapping_sub(1))
            .map_or(0, |p| p.position);
        let end = self.offset_index.get(k).map_or(self.size, |p| p.position);
        self.walk(start, end, max_frame, |h| h.index >= index)?
            .ok_or_else(|| self.not_found(format!("index {index}")))
    }

    fn not_found(&self, what: String) -> LogError {
        LogError::Corrupt {
            path: self.path(),
            reason: format!("{what} not found where the index points"),
        }
    }

    /// Position and frame size of the data entry holding `offset` (or the first entry at or
    /// after it).
    pub fn locate_offset(&self, offset: u64, max_frame: usize) -> Result<(u64, usize)> {
        let k = self
            .offset_index
            .partition_point(|p| p.base_offset <= offset);
        let start = self
            .offset_index
            .get(k.wrapping_sub(1))
            .map_or(0, |p| p.position);
        let end = self.offset_index.get(k).map_or(self.size, |p| p.position);
        self.walk(start, end, max_frame, |h| {
            h.kind == EntryKind::Data && h.base_offset + u64::from(h.offset_count) > offset
        })?
        .ok_or_else(|| self.not_found(format!("offset {offset}")))
    }

    /// Position and size of the first data entry whose max timestamp is ≥ `ts`, if any.
    pub fn locate_time(&self, ts: i64, max_frame: usize) -> Result<Option<(u64, usize)>> {
        if self.max_timestamp < ts {
            return Ok(None);
        }
        let k = self.time_index.partition_point(|p| p.max_timestamp < ts);
        let start = self
            .time_index
            .get(k.wrapping_sub(1))
            .map_or(0, |p| p.position);
        self.walk(start, self.size, max_frame, |h| {
            h.kind == EntryKind::Data && h.max_timestamp >= ts
        })
    }

    /// Walks frame headers from `start` (reading up to `end` first, then onwards to the
    /// segment size, in windows of at most `SCAN_CHUNK`) until `found` accepts one. The region
    /// holds only frames validated on write or open. `None` if no frame matches.
    fn walk(
        &self,
        start: u64,
        end: u64,
        max_frame: usize,
        mut found: impl FnMut(&FrameHeader) -> bool,
    ) -> Result<Option<(u64, usize)>> {
        let path = self.path();
        let mut pos = start;
        let mut end = end.max(start);
        while pos < self.size {
            let hi = if end > pos { end } else { self.size };
            let hi = hi.min(pos + SCAN_CHUNK as u64).min(self.size);
            let mut buf = vec![0u8; (hi - pos) as usize];
            read_exact_at(self.file.as_ref(), &mut buf, pos).map_err(|e| LogError::io(&path, e))?;
            let mut at = 0usize;
            while at + entry::FRAME_HEADER_LEN <= buf.len() {
                let h = match entry::decode_header_unchecked(&buf[at..], max_frame) {
                    Some(h) => h,
                    None => {
                        return Err(LogError::Corrupt {
                            path,
                            reason: format!("bad frame header at {}", pos + at as u64),
                        });
                    }
                };
                if found(&h) {
                    return Ok(Some((pos + at as u64, h.frame_size)));
                }
                at += h.frame_size;
            }
            if at == 0 {
                return Err(LogError::Corrupt {
                    path,
                    reason: format!("frame header cut at {pos}"),
                });
            }
            pos += at as u64;
            end = 0;
        }
        Ok(None)
    }

    /// Writes the index files of a sealed segment (each through a temporary file and a
    /// rename; the caller syncs the directory).
    pub fn write_index_files(&self, fs: &dyn FileSystem) -> Result<()> {
        let mut idx = Vec::with_capacity(16 + self.offset_index.len() * 24 + 36);
        idx.extend_from_slice(INDEX_MAGIC);
        idx.extend_from_slice(&(self.offset_index.len() as u64).to_le_bytes());
        for p in &self.offset_index {
            idx.extend_from_slice(&p.index.to_le_bytes());
            idx.extend_from_slice(&p.base_offset.to_le_bytes());
            idx.extend_from_slice(&p.position.to_le_bytes());
        }
        for v in [
            self.size,
            self.next_index,
            self.base_offset,
            self.next_offset,
        ] {
            idx.extend_from_slice(&v.to_le_bytes());
        }
        idx.extend_from_slice(&self.max_timestamp.to_le_bytes());
        let crc = crc32c::crc32c(&idx);
        idx.extend_from_slice(&crc.to_le_bytes());

        let mut tix = Vec::with_capacity(16 + self.time_index.len() * 24 + 4);
        tix.extend_from_slice(TIME_INDEX_MAGIC);
        tix.extend_from_slice(&(self.time_index.len() as u64).to_le_bytes());
        for p in &self.time_index {
            tix.extend_from_slice(&p.max_timestamp.to_le_bytes());
            tix.extend_from_slice(&p.index.to_le_bytes());
            tix.extend_from_slice(&p.position.to_le_bytes());
        }
        let crc = crc32c::crc32c(&tix);
        tix.extend_from_slice(&crc.to_le_bytes());

        write_file_replace(fs, &self.dir, &index_name(self.base_index), &idx)?;
        write_file_replace(fs, &self.dir, &time_index_name(self.base_index), &tix)
    }

    /// Removes the index files (the segment becomes active again). Missing files are fine.
    pub fn remove_index_files(&self, fs: &dyn FileSystem) -> Result<()> {
        remove_index_files(fs, &self.dir, self.base_index)
    }

    /// Deletes the segment's files (the caller syncs the directory).
    pub fn delete_files(&self, fs: &dyn FileSystem) -> Result<()> {
        delete_files(fs, &self.dir, self.base_index)
    }

    fn load_index_files(&mut self, fs: &dyn FileSystem, file_len: u64) -> bool {
        let Some(idx) = read_whole(fs, &self.dir.join(index_name(self.base_index))) else {
            return false;
        };
        let Some(tix) = read_whole(fs, &self.dir.join(time_index_name(self.base_index))) else {
            return false;
        };
        let Some(idx) = check_trailer(&idx, INDEX_MAGIC) else {
            return false;
        };
        let Some(tix) = check_trailer(&tix, TIME_INDEX_MAGIC) else {
            return false;
        };
        let u64_at = |b: &[u8], at: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(x)
        };
        let n = u64_at(idx, 8) as usize;
        if idx.len() != 16 + n.saturating_mul(24) + 40 || n == 0 {
            return false;
        }
        let points: Vec<IndexPoint> = (0..n)
            .map(|i| {
                let at = 16 + i * 24;
                IndexPoint {
                    index: u64_at(idx, at),
                    base_offset: u64_at(idx, at + 8),
                    position: u64_at(idx, at + 16),
                }
            })
            .collect();
        let t = 16 + n * 24;
        let (size, next_index, base_offset, next_offset) = (
            u64_at(idx, t),
            u64_at(idx, t + 8),
            u64_at(idx, t + 16),
            u64_at(idx, t + 24),
        );
        let max_timestamp = u64_at(idx, t + 32) as i64;
        let m = u64_at(tix, 8) as usize;
        if tix.len() != 16 + m.saturating_mul(24) {
            return false;
        }
        let times: Vec<TimePoint> = (0..m)
            .map(|i| {
                let at = 16 + i * 24;
                TimePoint {
                    max_timestamp: u64_at(tix, at) as i64,
                    index: u64_at(tix, at + 8),
                    position: u64_at(tix, at + 16),
                }
            })
            .collect();
        if size != file_len || points[0].index != self.base_index || points[0].position != 0 {
            return false;
        }
        self.offset_index = points;
        self.time_index = times;
        self.size = size;
        self.next_index = next_index;
        self.base_offset = base_offset;
        self.next_offset = next_offset;
        self.max_timestamp = max_timestamp;
        true
    }
}

/// Reads frames in `[position, end)`: the first (of `first_size` bytes) always, more while the
/// total stays within `max_bytes`. Every frame's CRC is verified.
#[allow(clippy::too_many_arguments)]
pub(crate) fn read_frames(
    file: &dyn FileHandle,
    path: &Path,
    position: u64,
    end: u64,
    first_size: usize,
    max_bytes: usize,
    max_frame: usize,
    out: &mut Vec<StoredEntry>,
) -> Result<usize> {
    if position >= end {
        return Ok(0);
    }
    let len = ((end - position) as usize).min(max_bytes.max(first_size));
    let mut buf = vec![0u8; len];
    read_exact_at(file, &mut buf, position).map_err(|e| LogError::io(path, e))?;
    let buf = Bytes::from(buf);
    let mut at = 0usize;
    let before = out.len();
    while at < buf.len() {
        match entry::decode_frame(&buf[at..], max_frame) {
            Ok(h) => {
                out.push(entry::stored_entry(&h, buf.slice(at..at + h.frame_size)));
                at += h.frame_size;
            }
            Err(FrameError::Incomplete) if at > 0 => break,
            Err(e) => {
                return Err(LogError::Corrupt {
                    path: path.to_path_buf(),
                    reason: format!("frame at {} failed its check: {e:?}", position + at as u64),
                });
            }
        }
    }
    Ok(out.len() - before)
}

fn check_trailer<'a>(buf: &'a [u8], magic: &[u8; 8]) -> Option<&'a [u8]> {
    if buf.len() < 20 || &buf[..8] != magic {
        return None;
    }
    let (body, crc) = buf.split_at(buf.len() - 4);
    (crc32c::crc32c(body) == u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]])).then_some(body)
}

fn read_whole(fs: &dyn FileSystem, path: &Path) -> Option<Vec<u8>> {
    let f = fs.open(path).ok()?;
    let len = f.len().ok()?;
    if len > (1 << 30) {
        return None;
    }
    let mut buf = vec![0u8; len as usize];
    read_exact_at(f.as_ref(), &mut buf, 0).ok()?;
    Some(buf)
}

/// Removes the index files of segment `base` in `dir` (missing files are fine).
fn remove_index_files(fs: &dyn FileSystem, dir: &Path, base: u64) -> Result<()> {
    for name in [index_name(base), time_index_name(base)] {
        remove_if_exists(fs, &dir.join(name))?;
    }
    Ok(())
}

/// Deletes every file of segment `base` in `dir`, opened or not (the caller syncs `dir`).
pub(crate) fn delete_files(fs: &dyn FileSystem, dir: &Path, base: u64) -> Result<()> {
    remove_index_files(fs, dir, base)?;
    remove_if_exists(fs, &dir.join(log_name(base)))
}

pub(crate) fn remove_if_exists(fs: &dyn FileSystem, path: &Path) -> Result<()> {
    match fs.remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LogError::io(path, e)),
    }
}

/// Writes `bytes` to `dir/name` through `name.tmp`: write, sync, rename. The caller syncs the
/// directory to make the rename durable.
pub(crate) fn write_file_replace(
    fs: &dyn FileSystem,
    dir: &Path,
    name: &str,
    bytes: &[u8],
) -> Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    remove_if_exists(fs, &tmp)?;
    let f = fs.create(&tmp).map_err(|e| LogError::io(&tmp, e))?;
    f.write_all_at(bytes, 0)
        .map_err(|e| LogError::io(&tmp, e))?;
    f.sync_data().map_err(|e| LogError::io(&tmp, e))?;
    let to = dir.join(name);
    fs.rename(&tmp, &to).map_err(|e| LogError::io(&to, e))
}
