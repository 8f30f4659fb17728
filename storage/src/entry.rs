//! Log entries and their on-disk frame (see `docs/storage-format.md`).
//!
//! Frame = `frame_len u32 | crc32c u32 | index u64 | term u64 | leader u64 | kind u8 |
//! version u8 | reserved u16 | offset_count u32 | base_offset u64 | max_timestamp i64 |
//! payload`, little-endian header. `frame_len` counts the bytes after itself; the CRC-32C
//! covers everything after the CRC field. Pure encoding and decoding, no I/O.

use bytes::Bytes;

/// Largest frame the format allows (what recovery and reads accept, whatever the append
/// limit in the options is now: a limit lowered later must not cut entries already stored).
pub const FORMAT_MAX_FRAME: usize = 256 << 20;

/// Bytes of the frame header before the payload.
pub const FRAME_HEADER_LEN: usize = 56;
/// `frame_len` of a frame with an empty payload.
const MIN_FRAME_LEN: u32 = (FRAME_HEADER_LEN - 4) as u32;
const FRAME_VERSION: u8 = 1;

/// What an entry is. Only `Data` entries carry records and occupy offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EntryKind {
    /// One Kafka RecordBatch v2.
    Data = 1,
    /// A Raft blank entry (new leader's no-op).
    Blank = 2,
    /// A Raft membership change.
    Membership = 3,
    /// A replicated control command (retention point and the like), opaque to the log.
    Control = 4,
}

impl EntryKind {
    fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Data),
            2 => Some(Self::Blank),
            3 => Some(Self::Membership),
            4 => Some(Self::Control),
            _ => None,
        }
    }
}

/// An entry as given to `append`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Raft log index; appends are gap-free.
    pub index: u64,
    /// Raft term of the leader that created the entry.
    pub term: u64,
    /// Node id of that leader.
    pub leader: u64,
    pub kind: EntryKind,
    /// For `Data`, a RecordBatch v2 (its base offset and leader epoch are stamped on append).
    pub payload: Bytes,
}

impl Entry {
    /// A data entry holding one record batch.
    pub fn data(index: u64, term: u64, leader: u64, batch: impl Into<Bytes>) -> Self {
        Self {
            index,
            term,
            leader,
            kind: EntryKind::Data,
            payload: batch.into(),
        }
    }

    /// A non-data entry.
    pub fn control(index: u64, term: u64, leader: u64, kind: EntryKind, body: Bytes) -> Self {
        Self {
            index,
            term,
            leader,
            kind,
            payload: body,
        }
    }
}

/// An entry read back from the log, with its place in the offset space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEntry {
    pub entry: Entry,
    /// Offset of the first record (for non-data entries: the next offset at that point).
    pub base_offset: u64,
    /// Offsets occupied (0 for non-data entries).
    pub offset_count: u32,
    /// Largest record timestamp (-1 for non-data entries).
    pub max_timestamp: i64,
}

impl StoredEntry {
    /// One past the last offset of this entry.
    pub fn next_offset(&self) -> u64 {
        self.base_offset + u64::from(self.offset_count)
    }
}

/// The header fields of a frame, without the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub index: u64,
    pub term: u64,
    pub leader: u64,
    pub kind: EntryKind,
    pub offset_count: u32,
    pub base_offset: u64,
    pub max_timestamp: i64,
    /// Total frame size on disk, header included.
    pub frame_size: usize,
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// Fewer bytes than the frame claims (possibly a torn tail).
    Incomplete,
    /// Length, CRC, kind or version is wrong.
    Invalid(&'static str),
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Encodes a frame header for `payload` into `out` (which receives header then payload).
/// `payload` must already be stamped.
pub fn encode_frame(out: &mut Vec<u8>, h: &FrameHeader, payload: &[u8]) {
    encode_frame_parts(out, h, &[payload]);
}

/// [`encode_frame`] with the payload given in pieces (e.g. a stamped batch header and the rest
/// of the batch), so that it is copied once, straight into `out`.
pub fn encode_frame_parts(out: &mut Vec<u8>, h: &FrameHeader, parts: &[&[u8]]) {
    let start = out.len();
    let payload_len: usize = parts.iter().map(|p| p.len()).sum();
    let frame_len = MIN_FRAME_LEN as usize + payload_len;
    out.extend_from_slice(&(frame_len as u32).to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&h.index.to_le_bytes());
    out.extend_from_slice(&h.term.to_le_bytes());
    out.extend_from_slice(&h.leader.to_le_bytes());
    out.push(h.kind as u8);
    out.push(FRAME_VERSION);
    out.extend_from_slice(&[0u8; 2]);
    out.extend_from_slice(&h.offset_count.to_le_bytes());
    out.extend_from_slice(&h.base_offset.to_le_bytes());
    out.extend_from_slice(&h.max_timestamp.to_le_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
    let crc = crc32c::crc32c(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// The frame size a buffer's length field claims, if it is within the format's bounds (for
/// reading a large frame in one piece).
pub fn claimed_frame_size(buf: &[u8]) -> Option<usize> {
    let len = le_u32(buf.get(..4)?, 0);
    let size = len as usize + 4;
    (len >= MIN_FRAME_LEN && size <= FORMAT_MAX_FRAME).then_some(size)
}

/// Size on disk of a frame with a payload of `payload_len` bytes.
pub fn frame_size(payload_len: usize) -> usize {
    FRAME_HEADER_LEN + payload_len
}

/// Decodes the frame at the start of `buf`, checking length bounds (before anything is
/// trusted), CRC, kind and version. `max_frame` bounds the length field.
pub fn decode_frame(buf: &[u8], max_frame: usize) -> Result<FrameHeader, FrameError> {
    if buf.len() < 4 {
        return Err(FrameError::Incomplete);
    }
    let frame_len = le_u32(buf, 0);
    if frame_len < MIN_FRAME_LEN {
        return Err(FrameError::Invalid("frame length below the header size"));
    }
    let frame_size = frame_len as usize + 4;
    if frame_size > max_frame {
        return Err(FrameError::Invalid("frame length above the limit"));
    }
    if buf.len() < frame_size {
        return Err(FrameError::Incomplete);
    }
    let crc = le_u32(buf, 4);
    if crc32c::crc32c(&buf[8..frame_size]) != crc {
        return Err(FrameError::Invalid("CRC mismatch"));
    }
    let kind = EntryKind::from_u8(buf[32]).ok_or(FrameError::Invalid("unknown entry kind"))?;
    if buf[33] != FRAME_VERSION {
        return Err(FrameError::Invalid("unknown frame version"));
    }
    Ok(FrameHeader {
        index: le_u64(buf, 8),
        term: le_u64(buf, 16),
        leader: le_u64(buf, 24),
        kind,
        offset_count: le_u32(buf, 36),
        base_offset: le_u64(buf, 40),
        max_timestamp: le_u64(buf, 48) as i64,
        frame_size,
    })
}

/// Decodes only the header of a frame that was already validated (on write or on open), for
/// walking a segment without reading payloads. Checks the length bounds and kind, not the CRC.
pub fn decode_header_unchecked(buf: &[u8], max_frame: usize) -> Option<FrameHeader> {
    if buf.len() < FRAME_HEADER_LEN {
        return None;
    }
    let frame_len = le_u32(buf, 0);
    let frame_size = frame_len as usize + 4;
    if frame_len < MIN_FRAME_LEN || frame_size > max_frame {
        return None;
    }
    Some(FrameHeader {
        index: le_u64(buf, 8),
        term: le_u64(buf, 16),
        leader: le_u64(buf, 24),
        kind: EntryKind::from_u8(buf[32])?,
        offset_count: le_u32(buf, 36),
        base_offset: le_u64(buf, 40),
        max_timestamp: le_u64(buf, 48) as i64,
        frame_size,
    })
}

/// Turns a decoded frame plus the buffer it came from into a [`StoredEntry`], slicing the
/// payload without copying.
pub fn stored_entry(h: &FrameHeader, frame: Bytes) -> StoredEntry {
    StoredEntry {
        entry: Entry {
            index: h.index,
            term: h.term,
            leader: h.leader,
            kind: h.kind,
            payload: frame.slice(FRAME_HEADER_LEN..h.frame_size),
        },
        base_offset: h.base_offset,
        offset_count: h.offset_count,
        max_timestamp: h.max_timestamp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(payload_len: usize) -> FrameHeader {
        FrameHeader {
            index: 7,
            term: 3,
            leader: 2,
            kind: EntryKind::Data,
            offset_count: 4,
            base_offset: 100,
            max_timestamp: 1234,
            frame_size: frame_size(payload_len),
        }
    }

    #[test]
    fn frame_round_trips() {
        let mut out = Vec::new();
        encode_frame(&mut out, &header(5), b"hello");
        assert_eq!(out.len(), frame_size(5));
        let h = decode_frame(&out, 1 << 20).expect("valid frame");
        assert_eq!(h, header(5));
        let e = stored_entry(&h, Bytes::from(out));
        assert_eq!(&e.entry.payload[..], b"hello");
        assert_eq!(e.next_offset(), 104);
    }

    #[test]
    fn every_single_byte_corruption_is_detected() {
        let mut out = Vec::new();
        encode_frame(&mut out, &header(3), b"abc");
        for i in 0..out.len() {
            let mut bad = out.clone();
            bad[i] ^= 0x40;
            assert!(
                decode_frame(&bad, 1 << 20).is_err(),
                "flip at byte {i} went unnoticed"
            );
        }
    }

    #[test]
    fn zeros_and_truncation_are_not_frames() {
        assert_eq!(
            decode_frame(&[0u8; 64], 1 << 20),
            Err(FrameError::Invalid("frame length below the header size"))
        );
        let mut out = Vec::new();
        encode_frame(&mut out, &header(3), b"abc");
        for cut in 0..out.len() {
            assert_eq!(
                decode_frame(&out[..cut], 1 << 20),
                Err(FrameError::Incomplete)
            );
        }
        assert!(decode_frame(&out, 16).is_err(), "length limit not enforced");
    }

    proptest::proptest! {
        /// Decoders see bytes from disk: arbitrary input must give an error, never a panic or
        /// an allocation driven by a length field.
        #[test]
        fn decoders_never_panic_on_arbitrary_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = decode_frame(&bytes, 1 << 16);
            let _ = decode_header_unchecked(&bytes, 1 << 16);
            let _ = crate::batch::inspect(&bytes);
        }

        #[test]
        fn damaged_valid_frames_never_decode_to_something_else(flips in proptest::collection::vec((0usize..80, 1u8..=255), 1..4)) {
            let mut out = Vec::new();
            encode_frame(&mut out, &header(20), &[9u8; 20]);
            let original = out.clone();
            for (at, x) in flips {
                let at = at % out.len();
                out[at] ^= x;
            }
            if out != original {
                proptest::prop_assert!(decode_frame(&out, 1 << 16).is_err());
            }
        }
    }
}
