//! A structural check of request bodies before the `kafka-protocol` decoder sees them.
//!
//! That decoder sizes a vector from an array count read off the wire before it reads a single
//! element, so a few bytes declaring 2^31 elements would ask for hundreds of gigabytes and
//! abort the process (kafka-protocol-rs PRs #152, #161, #200, open at 0.18). This module walks
//! the body of every request the front serves, field by field as the Kafka protocol lays it
//! out for the request's version, and refuses it when any array count, string or bytes length
//! exceeds the bytes left, so the decoder only ever sees counts it can fill. Pure functions,
//! no I/O; `decode_body` in `handlers.rs` calls [`check`] first.

use kafka_protocol::messages::ApiKey;

/// A field's wire type.
#[derive(Debug, Clone, Copy)]
enum T {
    I8,
    I16,
    I32,
    I64,
    Bool,
    Uuid,
    /// A string or nullable string.
    Str,
    /// Bytes or nullable bytes.
    Bytes,
    /// An array of structs (possibly nullable).
    Arr(&'static [F]),
    ArrI32,
    ArrStr,
}

/// A field present in versions `from..=to`.
#[derive(Debug, Clone, Copy)]
struct F {
    t: T,
    from: i16,
    to: i16,
}

const fn f(t: T) -> F {
    F {
        t,
        from: 0,
        to: i16::MAX,
    }
}

const fn since(t: T, from: i16) -> F {
    F {
        t,
        from,
        to: i16::MAX,
    }
}

const fn until(t: T, to: i16) -> F {
    F { t, from: 0, to }
}

const fn between(t: T, from: i16, to: i16) -> F {
    F { t, from, to }
}

use T::*;

const API_VERSIONS: &[F] = &[since(Str, 3), since(Str, 3)];

const METADATA_TOPIC: &[F] = &[since(Uuid, 10), f(Str)];
const METADATA: &[F] = &[
    f(Arr(METADATA_TOPIC)),
    since(Bool, 4),
    between(Bool, 8, 10),
    since(Bool, 8),
];

const PRODUCE_PARTITION: &[F] = &[f(I32), f(Bytes)];
const PRODUCE_TOPIC: &[F] = &[until(Str, 12), since(Uuid, 13), f(Arr(PRODUCE_PARTITION))];
const PRODUCE: &[F] = &[f(Str), f(I16), f(I32), f(Arr(PRODUCE_TOPIC))];

const FETCH_PARTITION: &[F] = &[
    f(I32),
    since(I32, 9),
    f(I64),
    since(I32, 12),
    since(I64, 5),
    f(I32),
];
const FETCH_TOPIC: &[F] = &[until(Str, 12), since(Uuid, 13), f(Arr(FETCH_PARTITION))];
const FETCH_FORGOTTEN: &[F] = &[between(Str, 7, 12), since(Uuid, 13), since(ArrI32, 7)];
const FETCH: &[F] = &[
    until(I32, 14),
    f(I32),
    f(I32),
    since(I32, 3),
    since(I8, 4),
    since(I32, 7),
    since(I32, 7),
    f(Arr(FETCH_TOPIC)),
    since(Arr(FETCH_FORGOTTEN), 7),
    since(Str, 11),
];

const LIST_OFFSETS_PARTITION: &[F] = &[f(I32), since(I32, 4), f(I64), until(I32, 0)];
const LIST_OFFSETS_TOPIC: &[F] = &[f(Str), f(Arr(LIST_OFFSETS_PARTITION))];
const LIST_OFFSETS: &[F] = &[
    f(I32),
    since(I8, 2),
    f(Arr(LIST_OFFSETS_TOPIC)),
    since(I32, 10),
];

const CREATE_ASSIGNMENT: &[F] = &[f(I32), f(ArrI32)];
const CREATE_CONFIG: &[F] = &[f(Str), f(Str)];
const CREATE_TOPIC: &[F] = &[
    f(Str),
    f(I32),
    f(I16),
    f(Arr(CREATE_ASSIGNMENT)),
    f(Arr(CREATE_CONFIG)),
];
const CREATE_TOPICS: &[F] = &[f(Arr(CREATE_TOPIC)), f(I32), since(Bool, 1)];

const DELETE_STATE: &[F] = &[f(Str), f(Uuid)];
const DELETE_TOPICS: &[F] = &[since(Arr(DELETE_STATE), 6), until(ArrStr, 5), f(I32)];

const DESCRIBE_CONFIGS_RESOURCE: &[F] = &[f(I8), f(Str), f(ArrStr)];
const DESCRIBE_CONFIGS: &[F] = &[
    f(Arr(DESCRIBE_CONFIGS_RESOURCE)),
    since(Bool, 1),
    since(Bool, 3),
];

const ALTER_CONFIG: &[F] = &[f(Str), f(Str)];
const ALTER_RESOURCE: &[F] = &[f(I8), f(Str), f(Arr(ALTER_CONFIG))];
const ALTER_CONFIGS: &[F] = &[f(Arr(ALTER_RESOURCE)), f(Bool)];

const PARTITIONS_ASSIGNMENT: &[F] = &[f(ArrI32)];
const PARTITIONS_TOPIC: &[F] = &[f(Str), f(I32), f(Arr(PARTITIONS_ASSIGNMENT))];
const CREATE_PARTITIONS: &[F] = &[f(Arr(PARTITIONS_TOPIC)), f(I32), f(Bool)];

const INCREMENTAL_CONFIG: &[F] = &[f(Str), f(I8), f(Str)];
const INCREMENTAL_RESOURCE: &[F] = &[f(I8), f(Str), f(Arr(INCREMENTAL_CONFIG))];
const INCREMENTAL_ALTER_CONFIGS: &[F] = &[f(Arr(INCREMENTAL_RESOURCE)), f(Bool)];

const DESCRIBE_CLUSTER: &[F] = &[f(Bool), since(I8, 1), since(Bool, 2)];

const FIND_COORDINATOR: &[F] = &[between(Str, 0, 3), since(I8, 1), since(ArrStr, 4)];

const JOIN_PROTOCOL: &[F] = &[f(Str), f(Bytes)];
const JOIN_GROUP: &[F] = &[
    f(Str),
    f(I32),
    since(I32, 1),
    f(Str),
    since(Str, 5),
    f(Str),
    f(Arr(JOIN_PROTOCOL)),
    since(Str, 8),
];

const SYNC_ASSIGNMENT: &[F] = &[f(Str), f(Bytes)];
const SYNC_GROUP: &[F] = &[
    f(Str),
    f(I32),
    f(Str),
    since(Str, 3),
    since(Str, 5),
    since(Str, 5),
    f(Arr(SYNC_ASSIGNMENT)),
];

const HEARTBEAT: &[F] = &[f(Str), f(I32), f(Str), since(Str, 3)];

const LEAVE_MEMBER: &[F] = &[f(Str), f(Str), since(Str, 5)];
const LEAVE_GROUP: &[F] = &[f(Str), until(Str, 2), since(Arr(LEAVE_MEMBER), 3)];

const COMMIT_PARTITION: &[F] = &[f(I32), f(I64), since(I32, 6), f(Str)];
const COMMIT_TOPIC: &[F] = &[f(Str), f(Arr(COMMIT_PARTITION))];
const OFFSET_COMMIT: &[F] = &[
    f(Str),
    f(I32),
    f(Str),
    since(Str, 7),
    until(I64, 4),
    f(Arr(COMMIT_TOPIC)),
];

const FETCH_OFFSETS_TOPIC: &[F] = &[f(Str), f(ArrI32)];
const FETCH_OFFSETS_GROUP: &[F] = &[f(Str), f(Arr(FETCH_OFFSETS_TOPIC))];
const OFFSET_FETCH: &[F] = &[
    until(Str, 7),
    until(Arr(FETCH_OFFSETS_TOPIC), 7),
    since(Arr(FETCH_OFFSETS_GROUP), 8),
    since(Bool, 7),
];

const DESCRIBE_GROUPS: &[F] = &[f(ArrStr), since(Bool, 3)];
const LIST_GROUPS: &[F] = &[since(ArrStr, 4)];
const DELETE_GROUPS: &[F] = &[f(ArrStr)];

const OFFSET_DELETE_PARTITION: &[F] = &[f(I32)];
const OFFSET_DELETE_TOPIC: &[F] = &[f(Str), f(Arr(OFFSET_DELETE_PARTITION))];
const OFFSET_DELETE: &[F] = &[f(Str), f(Arr(OFFSET_DELETE_TOPIC))];

const INIT_PRODUCER_ID: &[F] = &[f(Str), f(I32), since(I64, 3), since(I16, 3)];

const DELETE_RECORDS_PARTITION: &[F] = &[f(I32), f(I64)];
const DELETE_RECORDS_TOPIC: &[F] = &[f(Str), f(Arr(DELETE_RECORDS_PARTITION))];
const DELETE_RECORDS: &[F] = &[f(Arr(DELETE_RECORDS_TOPIC)), f(I32)];

/// The body layout of an API and the first version that uses the flexible encoding
/// (compact lengths, tagged fields).
fn layout(key: ApiKey) -> Option<(&'static [F], i16)> {
    Some(match key {
        ApiKey::ApiVersions => (API_VERSIONS, 3),
        ApiKey::Metadata => (METADATA, 9),
        ApiKey::Produce => (PRODUCE, 9),
        ApiKey::Fetch => (FETCH, 12),
        ApiKey::ListOffsets => (LIST_OFFSETS, 6),
        ApiKey::CreateTopics => (CREATE_TOPICS, 5),
        ApiKey::DeleteTopics => (DELETE_TOPICS, 4),
        ApiKey::DescribeConfigs => (DESCRIBE_CONFIGS, 4),
        ApiKey::AlterConfigs => (ALTER_CONFIGS, 2),
        ApiKey::CreatePartitions => (CREATE_PARTITIONS, 2),
        ApiKey::IncrementalAlterConfigs => (INCREMENTAL_ALTER_CONFIGS, 1),
        ApiKey::DescribeCluster => (DESCRIBE_CLUSTER, 0),
        ApiKey::FindCoordinator => (FIND_COORDINATOR, 3),
        ApiKey::JoinGroup => (JOIN_GROUP, 6),
        ApiKey::SyncGroup => (SYNC_GROUP, 4),
        ApiKey::Heartbeat => (HEARTBEAT, 4),
        ApiKey::LeaveGroup => (LEAVE_GROUP, 4),
        ApiKey::OffsetCommit => (OFFSET_COMMIT, 8),
        ApiKey::OffsetFetch => (OFFSET_FETCH, 6),
        ApiKey::DescribeGroups => (DESCRIBE_GROUPS, 5),
        ApiKey::ListGroups => (LIST_GROUPS, 3),
        ApiKey::DeleteGroups => (DELETE_GROUPS, 2),
        ApiKey::OffsetDelete => (OFFSET_DELETE, i16::MAX),
        ApiKey::InitProducerId => (INIT_PRODUCER_ID, 2),
        ApiKey::DeleteRecords => (DELETE_RECORDS, 2),
        _ => return None,
    })
}

struct Walker<'a> {
    buf: &'a [u8],
    at: usize,
    version: i16,
    flexible: bool,
}

type Check = Result<(), String>;

impl Walker<'_> {
    fn left(&self) -> usize {
        self.buf.len() - self.at
    }

    fn skip(&mut self, n: usize, what: &str) -> Check {
        if n > self.left() {
            return Err(format!(
                "{what} of {n} bytes at byte {} exceeds the {} left",
                self.at,
                self.left()
            ));
        }
        self.at += n;
        Ok(())
    }

    fn fixed<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let Some(b) = self.buf.get(self.at..self.at + N) else {
            return Err(format!("truncated at byte {}", self.at));
        };
        self.at += N;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn uvarint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for i in 0..5 {
            let [b] = self.fixed::<1>()?;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(format!("varint longer than 5 bytes at byte {}", self.at))
    }

    /// A length or count: `None` for null.
    fn length(&mut self, wide: bool) -> Result<Option<usize>, String> {
        if self.flexible {
            let n = self.uvarint()?;
            return Ok(n.checked_sub(1).map(|n| n as usize));
        }
        let n = if wide {
            i64::from(i32::from_be_bytes(self.fixed::<4>()?))
        } else {
            i64::from(i16::from_be_bytes(self.fixed::<2>()?))
        };
        match n {
            -1 => Ok(None),
            n if n < 0 => Err(format!("negative length {n} at byte {}", self.at)),
            n => Ok(Some(n as usize)),
        }
    }

    /// An array count, no larger than the bytes left (every element takes at least one).
    fn count(&mut self) -> Result<usize, String> {
        let Some(n) = self.length(true)? else {
            return Ok(0);
        };
        if n > self.left() {
            return Err(format!(
                "array of {n} elements at byte {} cannot fit the {} bytes left",
                self.at,
                self.left()
            ));
        }
        Ok(n)
    }

    fn tagged(&mut self) -> Check {
        if !self.flexible {
            return Ok(());
        }
        let n = self.uvarint()? as usize;
        if n > self.left() {
            return Err(format!("{n} tagged fields cannot fit the bytes left"));
        }
        for _ in 0..n {
            self.uvarint()?;
            let size = self.uvarint()? as usize;
            self.skip(size, "tagged field")?;
        }
        Ok(())
    }

    fn structure(&mut self, fields: &[F]) -> Check {
        for field in fields {
            if self.version < field.from || self.version > field.to {
                continue;
            }
            match field.t {
                I8 | Bool => self.skip(1, "field")?,
                I16 => self.skip(2, "field")?,
                I32 => self.skip(4, "field")?,
                I64 => self.skip(8, "field")?,
                Uuid => self.skip(16, "field")?,
                Str => {
                    if let Some(n) = self.length(false)? {
                        self.skip(n, "string")?;
                    }
                }
                Bytes => {
                    if let Some(n) = self.length(true)? {
                        self.skip(n, "bytes")?;
                    }
                }
                ArrI32 => {
                    let n = self.count()?;
                    self.skip(n.saturating_mul(4), "int32 array")?;
                }
                ArrStr => {
                    for _ in 0..self.count()? {
                        if let Some(n) = self.length(false)? {
                            self.skip(n, "string")?;
                        }
                    }
                }
                Arr(inner) => {
                    for _ in 0..self.count()? {
                        self.structure(inner)?;
                    }
                }
            }
        }
        self.tagged()
    }
}

/// Checks a request body (after its header) against the layout of `key` at `version`:
/// every count and length fits the bytes that follow it. APIs without a layout here are not
/// served and fail the check.
pub fn check(key: ApiKey, version: i16, body: &[u8]) -> Result<(), String> {
    let (fields, flexible_from) =
        layout(key).ok_or_else(|| format!("{key:?} has no request layout"))?;
    let mut w = Walker {
        buf: body,
        at: 0,
        version,
        flexible: version >= flexible_from,
    };
    w.structure(fields)
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use kafka_protocol::messages::{
        CreateTopicsRequest, FetchRequest, MetadataRequest, ProduceRequest, TopicName,
        create_topics_request, fetch_request, metadata_request, produce_request,
    };
    use kafka_protocol::protocol::{Encodable, StrBytes};

    use super::*;

    fn encoded(m: &impl Encodable, version: i16) -> Vec<u8> {
        let mut b = BytesMut::new();
        m.encode(&mut b, version).expect("encode");
        b.to_vec()
    }

    fn name(s: &str) -> TopicName {
        TopicName(StrBytes::from_string(s.to_string()))
    }

    /// Requests as the codec encodes them pass at every version served, and so do the
    /// layouts clients send; truncations do not.
    #[test]
    fn well_formed_requests_pass_at_every_version() {
        let metadata = MetadataRequest::default().with_topics(Some(vec![
            metadata_request::MetadataRequestTopic::default().with_name(Some(name("a"))),
        ]));
        for v in 0..=12 {
            let b = encoded(&metadata, v);
            assert_eq!(check(ApiKey::Metadata, v, &b), Ok(()), "metadata v{v}");
            if !b.is_empty() {
                assert!(check(ApiKey::Metadata, v, &b[..b.len() - 1]).is_err());
            }
        }
        let produce = ProduceRequest::default()
            .with_acks(-1)
            .with_topic_data(vec![
                produce_request::TopicProduceData::default()
                    .with_name(name("t"))
                    .with_partition_data(vec![
                        produce_request::PartitionProduceData::default()
                            .with_records(Some(bytes::Bytes::from_static(b"0123456789"))),
                    ]),
            ]);
        for v in 3..=9 {
            assert_eq!(
                check(ApiKey::Produce, v, &encoded(&produce, v)),
                Ok(()),
                "produce v{v}"
            );
        }
        let fetch = FetchRequest::default().with_topics(vec![
            fetch_request::FetchTopic::default()
                .with_topic(name("t"))
                .with_partitions(vec![fetch_request::FetchPartition::default()]),
        ]);
        for v in 4..=12 {
            assert_eq!(
                check(ApiKey::Fetch, v, &encoded(&fetch, v)),
                Ok(()),
                "fetch v{v}"
            );
        }
        let create = CreateTopicsRequest::default().with_topics(vec![
            create_topics_request::CreatableTopic::default()
                .with_name(name("t"))
                .with_configs(vec![
                    create_topics_request::CreatableTopicConfig::default()
                        .with_name(StrBytes::from_static_str("retention.ms"))
                        .with_value(Some(StrBytes::from_static_str("1"))),
                ]),
        ]);
        for v in 2..=7 {
            assert_eq!(
                check(ApiKey::CreateTopics, v, &encoded(&create, v)),
                Ok(()),
                "create topics v{v}"
            );
        }
    }

    /// The 8-byte input that aborts an unchecked decoder is refused here.
    #[test]
    fn impossible_counts_are_refused() {
        assert!(check(ApiKey::Metadata, 0, &[0x03, 0x3c, 0x0c, 0x00, 0xb6]).is_err());
        assert!(check(ApiKey::Metadata, 1, &[0x7f, 0xff, 0xff, 0xff]).is_err());
        // Flexible: a compact count of 2^28.
        assert!(check(ApiKey::Metadata, 9, &[0x80, 0x80, 0x80, 0x80, 0x01, 0, 0]).is_err());
        assert!(
            check(
                ApiKey::Produce,
                3,
                &[0xff, 0xff, 0, 1, 0, 0, 0, 0, 0x7f, 0, 0, 0]
            )
            .is_err()
        );
    }
}
