//! Records and Kafka RecordBatch v2, built and read with the `kafka-protocol` crate, and
//! Kafka's key partitioning: pure functions shared by the broker's own writers (the group
//! coordinator, the routed producer) and the Rust client.

use bytes::{Bytes, BytesMut};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};

/// A batch that cannot be encoded or fetched batches that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RecordsError(pub String);

/// A record to produce.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerRecord {
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(String, Option<Bytes>)>,
    /// Milliseconds since the epoch (`None`: now).
    pub timestamp: Option<i64>,
}

impl ProducerRecord {
    /// A record with this value and no key.
    pub fn value(value: impl Into<Bytes>) -> Self {
        Self {
            value: Some(value.into()),
            ..Self::default()
        }
    }

    /// With this key.
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Bytes it adds to a batch, roughly (for batch sizing).
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Bytes::len)
            + self.value.as_ref().map_or(0, Bytes::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, Bytes::len))
                .sum::<usize>()
            + 16
    }
}

/// A fetched record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerRecord {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    pub timestamp: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(String, Option<Bytes>)>,
}

/// The idempotence fields of a batch: producer id, epoch and the first record's sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sequence {
    pub producer_id: i64,
    pub epoch: i16,
    pub first_seq: i32,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Encodes records as one uncompressed RecordBatch v2, idempotent when `seq` is given.
pub fn encode_batch(
    records: &[ProducerRecord],
    seq: Option<Sequence>,
) -> Result<Bytes, RecordsError> {
    let now = now_ms();
    let records: Vec<Record> = records
        .iter()
        .enumerate()
        .map(|(i, r)| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: -1,
            producer_id: seq.map_or(-1, |s| s.producer_id),
            producer_epoch: seq.map_or(-1, |s| s.epoch),
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            // Without a producer id the batch's base sequence is -1 (NO_SEQUENCE); each
            // record's sequence is base + delta, which is how the encoder keeps them in one
            // batch.
            sequence: seq.map_or(-1, |s| s.first_seq).wrapping_add(i as i32),
            timestamp: r.timestamp.unwrap_or(now),
            key: r.key.clone(),
            value: r.value.clone(),
            headers: r
                .headers
                .iter()
                .map(|(k, v)| (StrBytes::from_string(k.clone()), v.clone()))
                .collect(),
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &records,
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .map_err(|e| RecordsError(format!("cannot encode: {e}")))?;
    Ok(buf.freeze())
}

/// Decodes fetched batches into the records of `partition` at or after `from`.
pub fn decode_batches(
    batches: Bytes,
    topic: &str,
    partition: u32,
    from: u64,
) -> Result<Vec<ConsumerRecord>, RecordsError> {
    let mut buf = batches;
    let sets = RecordBatchDecoder::decode_all(&mut buf)
        .map_err(|e| RecordsError(format!("cannot decode fetched batches: {e}")))?;
    Ok(sets
        .into_iter()
        .flat_map(|s| s.records)
        .filter(|r| r.offset >= 0 && r.offset as u64 >= from && !r.control)
        .map(|r| ConsumerRecord {
            topic: topic.to_string(),
            partition,
            offset: r.offset as u64,
            timestamp: r.timestamp,
            key: r.key,
            value: r.value,
            headers: r
                .headers
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        })
        .collect())
}

/// One past the last offset the concatenated batches `raw` span (a batch whose records were
/// all compacted away still spans its offsets), or `None` without a whole batch.
pub fn batches_end(raw: &[u8]) -> Option<u64> {
    let mut at = 0usize;
    let mut end = None;
    while raw.len() >= at + 27 {
        let base = u64::from_be_bytes(raw[at..at + 8].try_into().ok()?);
        let len = i32::from_be_bytes(raw[at + 8..at + 12].try_into().ok()?);
        let delta = i32::from_be_bytes(raw[at + 23..at + 27].try_into().ok()?);
        let (Ok(len), Ok(delta)) = (usize::try_from(len), u64::try_from(delta)) else {
            break;
        };
        if raw.len() < at + 12 + len {
            break;
        }
        end = Some(base + delta + 1);
        at += 12 + len;
    }
    end
}

/// Kafka's murmur2 (as the Java client's `Utils.murmur2`), for key-hash partitioning.
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// The partition of a keyed record, as the Java client computes it.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    (murmur2(key) & 0x7fff_ffff) % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values from the Java client's `Utils.murmur2` (its unit tests and known partitions).
    #[test]
    fn murmur2_matches_kafka() {
        assert_eq!(murmur2(b"21") as i32, -973932308);
        assert_eq!(murmur2(b"foobar") as i32, -790332482);
        assert_eq!(murmur2(b"a-little-bit-long-string") as i32, -985981536);
        assert_eq!(murmur2(b"a-little-bit-longer-string") as i32, -1486304829);
        assert_eq!(
            murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8") as i32,
            -58897971
        );
        assert_eq!(murmur2(b"abc") as i32, 479470107);
    }

    #[test]
    fn batches_round_trip_with_their_sequence() {
        let records = vec![
            ProducerRecord::value("v1").with_key("k"),
            ProducerRecord::value("v2"),
        ];
        let seq = Sequence {
            producer_id: 42,
            epoch: 3,
            first_seq: 10,
        };
        let b = encode_batch(&records, Some(seq)).unwrap_or_default();
        assert!(crate::broker::batch_problem(&b).is_none());
        let info = aqueduct_storage::batch::producer(&b);
        assert_eq!(
            info.map(|i| (i.producer_id, i.epoch, i.first_seq, i.last_seq)),
            Some((42, 3, 10, 11))
        );
        assert_eq!(batches_end(&b), Some(2));
        let decoded = decode_batches(b, "t", 0, 0).unwrap_or_default();
        let values: Vec<_> = decoded.iter().map(|r| r.value.clone()).collect();
        assert_eq!(
            values,
            vec![
                Some(Bytes::from_static(b"v1")),
                Some(Bytes::from_static(b"v2"))
            ]
        );
        let plain = encode_batch(&records, None).unwrap_or_default();
        assert_eq!(aqueduct_storage::batch::producer(&plain), None);
    }
}
