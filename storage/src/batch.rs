//! Kafka RecordBatch v2 header: the fields the log reads and the two it stamps.
//!
//! Layout (big-endian, as on the Kafka wire): baseOffset i64 @0, batchLength i32 @8,
//! partitionLeaderEpoch i32 @12, magic i8 @16, crc u32 @17 (CRC-32C of bytes 21..end),
//! attributes i16 @21, lastOffsetDelta i32 @23, baseTimestamp i64 @27, maxTimestamp i64 @35,
//! producerId i64 @43, producerEpoch i16 @51, baseSequence i32 @53, recordCount i32 @57,
//! records @61. The batch CRC does not cover baseOffset or partitionLeaderEpoch, so the log
//! stamps those two and stores everything else byte for byte. Pure functions, no I/O.

/// Size of the fixed RecordBatch v2 header.
pub const BATCH_HEADER_LEN: usize = 61;
const MAGIC_V2: u8 = 2;

/// The header fields of a validated batch that the log needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchInfo {
    /// Number of offsets the batch occupies (`lastOffsetDelta + 1`).
    pub offset_count: u32,
    /// Largest record timestamp in the batch (ms since the epoch).
    pub max_timestamp: i64,
}

fn be_i32(b: &[u8], at: usize) -> i32 {
    i32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be_i64(b: &[u8], at: usize) -> i64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    i64::from_be_bytes(x)
}

/// Checks the structure of a RecordBatch v2 header against the payload length (not the batch
/// CRC: that is the broker's job on produce) and returns what the log needs.
pub fn inspect(batch: &[u8]) -> Result<BatchInfo, &'static str> {
    if batch.len() < BATCH_HEADER_LEN {
        return Err("shorter than a RecordBatch v2 header");
    }
    if batch[16] != MAGIC_V2 {
        return Err("magic is not 2");
    }
    let batch_len = be_i32(batch, 8);
    if batch_len < 0 || batch_len as usize != batch.len() - 12 {
        return Err("batchLength does not match the payload size");
    }
    let last_delta = be_i32(batch, 23);
    if last_delta < 0 {
        return Err("negative lastOffsetDelta");
    }
    let record_count = be_i32(batch, 57);
    if record_count < 0 || record_count > last_delta.saturating_add(1) {
        return Err("recordCount exceeds lastOffsetDelta + 1");
    }
    Ok(BatchInfo {
        offset_count: last_delta as u32 + 1,
        max_timestamp: be_i64(batch, 35),
    })
}

/// Writes baseOffset and partitionLeaderEpoch into a batch header (neither is covered by the
/// batch CRC). `header` must be at least [`BATCH_HEADER_LEN`] bytes.
pub fn stamp(header: &mut [u8], base_offset: u64, leader_epoch: i32) {
    header[0..8].copy_from_slice(&base_offset.to_be_bytes());
    header[12..16].copy_from_slice(&leader_epoch.to_be_bytes());
}

/// Reads the stamped base offset of a batch.
pub fn base_offset(batch: &[u8]) -> Option<u64> {
    (batch.len() >= 8).then(|| be_i64(batch, 0) as u64)
}

/// The idempotent-producer fields of a batch header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerInfo {
    pub producer_id: i64,
    pub epoch: i16,
    /// Sequence number of the first record.
    pub first_seq: i32,
    /// Sequence number of the last record (`first_seq + lastOffsetDelta`, wrapping past
    /// `i32::MAX` to 0 as Kafka's producer does).
    pub last_seq: i32,
}

/// The producer id, epoch and sequence range of a batch (at least [`BATCH_HEADER_LEN`]
/// bytes), or `None` when it carries no producer id (producerId < 0: not idempotent).
pub fn producer(batch: &[u8]) -> Option<ProducerInfo> {
    if batch.len() < BATCH_HEADER_LEN {
        return None;
    }
    let producer_id = be_i64(batch, 43);
    if producer_id < 0 {
        return None;
    }
    let first_seq = be_i32(batch, 53);
    let delta = be_i32(batch, 23).max(0);
    Some(ProducerInfo {
        producer_id,
        epoch: i16::from_be_bytes([batch[51], batch[52]]),
        first_seq,
        last_seq: add_seq(first_seq, delta),
    })
}

/// `seq + n` in Kafka's sequence space (non-negative `i32`, wrapping to 0 after `i32::MAX`).
pub fn add_seq(seq: i32, n: i32) -> i32 {
    let sum = i64::from(seq) + i64::from(n);
    if sum > i64::from(i32::MAX) {
        (sum - i64::from(i32::MAX) - 1) as i32
    } else {
        sum as i32
    }
}

/// Builds a minimal valid RecordBatch v2 (`records` are opaque bytes after the header) for
/// tests and benchmarks: `count` offsets, the given max timestamp, CRC filled in.
pub fn build(count: u32, max_timestamp: i64, records: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; BATCH_HEADER_LEN];
    let batch_len = (BATCH_HEADER_LEN - 12 + records.len()) as i32;
    b[8..12].copy_from_slice(&batch_len.to_be_bytes());
    b[12..16].copy_from_slice(&(-1i32).to_be_bytes());
    b[16] = MAGIC_V2;
    b[23..27].copy_from_slice(&(count.max(1) as i32 - 1).to_be_bytes());
    b[27..35].copy_from_slice(&max_timestamp.to_be_bytes());
    b[35..43].copy_from_slice(&max_timestamp.to_be_bytes());
    b[43..51].copy_from_slice(&(-1i64).to_be_bytes());
    b[51..53].copy_from_slice(&(-1i16).to_be_bytes());
    b[53..57].copy_from_slice(&(-1i32).to_be_bytes());
    b[57..61].copy_from_slice(&(count.max(1) as i32).to_be_bytes());
    b.extend_from_slice(records);
    let crc = crc32c::crc32c(&b[21..]);
    b[17..21].copy_from_slice(&crc.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_batch_inspects_and_stamps() {
        let mut b = build(5, 1_700_000_000_000, b"abc");
        let info = inspect(&b).expect("valid");
        assert_eq!(
            info,
            BatchInfo {
                offset_count: 5,
                max_timestamp: 1_700_000_000_000
            }
        );
        stamp(&mut b, 42, 7);
        assert_eq!(base_offset(&b), Some(42));
        assert_eq!(be_i32(&b, 12), 7);
        // The CRC (over attributes onwards) is unaffected by stamping.
        assert_eq!(
            u32::from_be_bytes([b[17], b[18], b[19], b[20]]),
            crc32c::crc32c(&b[21..])
        );
    }

    #[test]
    fn producer_fields_are_read_and_sequences_wrap() {
        let mut b = build(3, 0, b"abc");
        assert_eq!(producer(&b), None);
        b[43..51].copy_from_slice(&7i64.to_be_bytes());
        b[51..53].copy_from_slice(&2i16.to_be_bytes());
        b[53..57].copy_from_slice(&(i32::MAX - 1).to_be_bytes());
        assert_eq!(
            producer(&b),
            Some(ProducerInfo {
                producer_id: 7,
                epoch: 2,
                first_seq: i32::MAX - 1,
                last_seq: 0,
            })
        );
        assert_eq!(add_seq(5, 1), 6);
        assert_eq!(add_seq(i32::MAX, 1), 0);
    }

    #[test]
    fn malformed_batches_are_rejected() {
        let good = build(1, 0, b"x");
        assert!(inspect(&good[..60]).is_err());
        let mut bad_magic = good.clone();
        bad_magic[16] = 1;
        assert!(inspect(&bad_magic).is_err());
        let mut bad_len = good.clone();
        bad_len.push(0);
        assert!(inspect(&bad_len).is_err());
        let mut bad_delta = good;
        bad_delta[23..27].copy_from_slice(&(-5i32).to_be_bytes());
        assert!(inspect(&bad_delta).is_err());
    }
}
