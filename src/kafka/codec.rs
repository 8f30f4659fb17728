//! The Kafka wire format without I/O: request framing with the length checked before anything
//! is allocated, request headers, the versions this broker serves, response frames, and the
//! mapping of broker errors to Kafka error codes. Message bodies are the `kafka-protocol`
//! crate's.
//!
//! A frame is a big-endian `i32` length and that many bytes. [`FrameDecoder`] refuses a
//! length below the smallest request header or above the configured maximum as soon as the
//! four length bytes are in, and grows its buffer only as bytes arrive, so a peer that
//! declares a large frame and trickles it costs what it sent, not what it declared.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{self, ApiKey, ApiVersionsResponse, RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion};

use crate::broker::ErrorCode;

/// Kafka's error codes used here (the protocol's own numbers).
pub mod code {
    pub const NONE: i16 = 0;
    pub const UNKNOWN_SERVER_ERROR: i16 = -1;
    pub const OFFSET_OUT_OF_RANGE: i16 = 1;
    pub const CORRUPT_MESSAGE: i16 = 2;
    pub const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
    pub const LEADER_NOT_AVAILABLE: i16 = 5;
    pub const NOT_LEADER_OR_FOLLOWER: i16 = 6;
    pub const REQUEST_TIMED_OUT: i16 = 7;
    pub const MESSAGE_TOO_LARGE: i16 = 10;
    pub const COORDINATOR_LOAD_IN_PROGRESS: i16 = 14;
    pub const COORDINATOR_NOT_AVAILABLE: i16 = 15;
    pub const NOT_COORDINATOR: i16 = 16;
    pub const INVALID_TOPIC_EXCEPTION: i16 = 17;
    pub const INVALID_REQUIRED_ACKS: i16 = 21;
    pub const ILLEGAL_GENERATION: i16 = 22;
    pub const INCONSISTENT_GROUP_PROTOCOL: i16 = 23;
    pub const INVALID_GROUP_ID: i16 = 24;
    pub const UNKNOWN_MEMBER_ID: i16 = 25;
    pub const INVALID_SESSION_TIMEOUT: i16 = 26;
    pub const REBALANCE_IN_PROGRESS: i16 = 27;
    pub const UNSUPPORTED_VERSION: i16 = 35;
    pub const TOPIC_ALREADY_EXISTS: i16 = 36;
    pub const INVALID_PARTITIONS: i16 = 37;
    pub const INVALID_REPLICATION_FACTOR: i16 = 38;
    pub const INVALID_REPLICA_ASSIGNMENT: i16 = 39;
    pub const INVALID_CONFIG: i16 = 40;
    pub const NOT_CONTROLLER: i16 = 41;
    pub const INVALID_REQUEST: i16 = 42;
    pub const POLICY_VIOLATION: i16 = 44;
    pub const UNSUPPORTED_FOR_MESSAGE_FORMAT: i16 = 43;
    pub const OUT_OF_ORDER_SEQUENCE_NUMBER: i16 = 45;
    pub const DUPLICATE_SEQUENCE_NUMBER: i16 = 46;
    pub const INVALID_PRODUCER_EPOCH: i16 = 47;
    pub const TRANSACTIONAL_ID_AUTHORIZATION_FAILED: i16 = 53;
    pub const UNKNOWN_PRODUCER_ID: i16 = 59;
    pub const REASSIGNMENT_IN_PROGRESS: i16 = 60;
    pub const NON_EMPTY_GROUP: i16 = 68;
    pub const GROUP_ID_NOT_FOUND: i16 = 69;
    pub const MEMBER_ID_REQUIRED: i16 = 79;
    pub const FENCED_INSTANCE_ID: i16 = 82;
    pub const GROUP_SUBSCRIBED_TO_TOPIC: i16 = 86;
    pub const UNKNOWN_TOPIC_ID: i16 = 100;
}

/// The Kafka error code of a broker error.
pub fn kafka_code(e: ErrorCode) -> i16 {
    match e {
        ErrorCode::NotLeader | ErrorCode::NotReplica => code::NOT_LEADER_OR_FOLLOWER,
        ErrorCode::LeaderNotAvailable => code::LEADER_NOT_AVAILABLE,
        ErrorCode::UnknownTopicOrPartition => code::UNKNOWN_TOPIC_OR_PARTITION,
        ErrorCode::CorruptMessage => code::CORRUPT_MESSAGE,
        ErrorCode::RecordBatchTooLarge => code::MESSAGE_TOO_LARGE,
        ErrorCode::OffsetOutOfRange => code::OFFSET_OUT_OF_RANGE,
        ErrorCode::OutOfOrderSequenceNumber => code::OUT_OF_ORDER_SEQUENCE_NUMBER,
        ErrorCode::InvalidProducerEpoch => code::INVALID_PRODUCER_EPOCH,
        ErrorCode::TopicExists => code::TOPIC_ALREADY_EXISTS,
        ErrorCode::InvalidTopicName => code::INVALID_TOPIC_EXCEPTION,
        ErrorCode::InvalidPartitions => code::INVALID_PARTITIONS,
        ErrorCode::InvalidReplicationFactor => code::INVALID_REPLICATION_FACTOR,
        ErrorCode::InvalidConfig => code::INVALID_CONFIG,
        ErrorCode::ReassignmentInProgress => code::REASSIGNMENT_IN_PROGRESS,
        ErrorCode::NotController | ErrorCode::TryAgain => code::NOT_CONTROLLER,
        ErrorCode::InvalidRequest => code::INVALID_REQUEST,
        ErrorCode::UnsupportedForMessageFormat => code::UNSUPPORTED_FOR_MESSAGE_FORMAT,
        // Not Kafka's: the device registry's and other families' refusals.
        ErrorCode::UnknownNode
        | ErrorCode::Internal
        | ErrorCode::NotFound
        | ErrorCode::AlreadyExists
        | ErrorCode::InUse
        | ErrorCode::DeviceOffline
        | ErrorCode::TimedOut => code::UNKNOWN_SERVER_ERROR,
        ErrorCode::NotCoordinator => code::NOT_COORDINATOR,
        ErrorCode::CoordinatorLoadInProgress => code::COORDINATOR_LOAD_IN_PROGRESS,
        ErrorCode::CoordinatorNotAvailable => code::COORDINATOR_NOT_AVAILABLE,
        ErrorCode::UnknownMemberId => code::UNKNOWN_MEMBER_ID,
        ErrorCode::IllegalGeneration => code::ILLEGAL_GENERATION,
        ErrorCode::RebalanceInProgress => code::REBALANCE_IN_PROGRESS,
        ErrorCode::InconsistentGroupProtocol => code::INCONSISTENT_GROUP_PROTOCOL,
        ErrorCode::InvalidSessionTimeout => code::INVALID_SESSION_TIMEOUT,
        ErrorCode::NonEmptyGroup => code::NON_EMPTY_GROUP,
        ErrorCode::InvalidGroupId => code::INVALID_GROUP_ID,
        ErrorCode::GroupIdNotFound => code::GROUP_ID_NOT_FOUND,
        ErrorCode::FencedInstanceId => code::FENCED_INSTANCE_ID,
        ErrorCode::GroupSubscribedToTopic => code::GROUP_SUBSCRIBED_TO_TOPIC,
        ErrorCode::PolicyViolation => code::POLICY_VIOLATION,
    }
}

/// The APIs this broker serves and the versions it advertises, `(key, min, max)`. Produce
/// is advertised from version 0 as Kafka 4 does (librdkafka derives features from it);
/// versions below what the codec decodes (Produce 0–2) are answered `UNSUPPORTED_VERSION`.
pub const SUPPORTED: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 0, 9),
    (ApiKey::Fetch, 4, 12),
    (ApiKey::ListOffsets, 1, 7),
    (ApiKey::Metadata, 0, 12),
    (ApiKey::ApiVersions, 0, 4),
    (ApiKey::CreateTopics, 2, 7),
    (ApiKey::DeleteTopics, 1, 6),
    (ApiKey::DescribeConfigs, 1, 4),
    (ApiKey::AlterConfigs, 0, 2),
    (ApiKey::CreatePartitions, 0, 3),
    (ApiKey::IncrementalAlterConfigs, 0, 1),
    (ApiKey::DescribeCluster, 0, 1),
    (ApiKey::FindCoordinator, 0, 4),
    (ApiKey::JoinGroup, 0, 9),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 5),
    (ApiKey::OffsetCommit, 2, 8),
    (ApiKey::OffsetFetch, 1, 8),
    (ApiKey::DescribeGroups, 0, 5),
    (ApiKey::ListGroups, 0, 4),
    (ApiKey::DeleteGroups, 0, 2),
    (ApiKey::OffsetDelete, 0, 0),
    (ApiKey::InitProducerId, 0, 4),
    (ApiKey::DeleteRecords, 0, 2),
];

/// The lowest version of each API the codec can decode.
fn decodable_min(key: ApiKey) -> i16 {
    key.valid_versions().min
}

/// Whether `(key, version)` is served.
pub fn served(key: ApiKey, version: i16) -> bool {
    SUPPORTED
        .iter()
        .any(|(k, lo, hi)| *k == key && version >= (*lo).max(decodable_min(key)) && version <= *hi)
}

/// The ApiVersions answer (its error code is the caller's).
pub fn api_versions(error_code: i16) -> ApiVersionsResponse {
    ApiVersionsResponse::default()
        .with_error_code(error_code)
        .with_api_keys(
            SUPPORTED
                .iter()
                .map(|(k, lo, hi)| {
                    kafka_protocol::messages::api_versions_response::ApiVersion::default()
                        .with_api_key(*k as i16)
                        .with_min_version(*lo)
                        .with_max_version(*hi)
                })
                .collect(),
        )
}

/// Why a frame cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is below the smallest request")]
    TooSmall(i64),
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: i64, max: usize },
}

/// Smallest request: api key, version, correlation id, client id length.
const MIN_FRAME: usize = 10;

/// Cuts frames out of a byte stream (see the module doc).
#[derive(Debug)]
pub struct FrameDecoder {
    max: usize,
    buf: BytesMut,
    /// The length of the frame being read, once its prefix is in.
    want: Option<usize>,
}

/// How much the buffer grows at a time while a frame arrives.
const GROW: usize = 64 << 10;

impl FrameDecoder {
    pub fn new(max_frame_bytes: usize) -> Self {
        Self {
            max: max_frame_bytes,
            buf: BytesMut::with_capacity(4096),
            want: None,
        }
    }

    /// Whether part of a frame has been received.
    pub fn in_frame(&self) -> bool {
        !self.buf.is_empty()
    }

    /// The buffer to read more bytes into; it has room for at least one more byte, and never
    /// reserves more than [`GROW`] beyond what the current frame still needs.
    pub fn buffer(&mut self) -> &mut BytesMut {
        let need = match self.want {
            Some(n) => (n + 4).saturating_sub(self.buf.len()).clamp(1, GROW),
            None => 4096,
        };
        if self.buf.capacity() - self.buf.len() < need.min(4096) {
            self.buf.reserve(need);
        }
        &mut self.buf
    }

    /// The next whole frame (without its length prefix), if one is in.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        if self.want.is_none() {
            if self.buf.len() < 4 {
                return Ok(None);
            }
            let len = i64::from(i32::from_be_bytes([
                self.buf[0],
                self.buf[1],
                self.buf[2],
                self.buf[3],
            ]));
            if len < MIN_FRAME as i64 {
                return Err(FrameError::TooSmall(len));
            }
            if len as u64 > self.max as u64 {
                return Err(FrameError::TooLarge { len, max: self.max });
            }
            self.want = Some(len as usize);
        }
        let Some(want) = self.want else {
            return Ok(None);
        };
        if self.buf.len() < 4 + want {
            return Ok(None);
        }
        self.buf.advance(4);
        let frame = self.buf.split_to(want).freeze();
        self.want = None;
        Ok(Some(frame))
    }
}

/// The fixed start of every request: api key, version, correlation id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    pub api_key: i16,
    pub api_version: i16,
    pub correlation_id: i32,
}

/// Reads the fixed prefix of a frame (it is at least [`MIN_FRAME`] bytes long).
pub fn prefix(frame: &[u8]) -> Option<Prefix> {
    if frame.len() < 8 {
        return None;
    }
    Some(Prefix {
        api_key: i16::from_be_bytes([frame[0], frame[1]]),
        api_version: i16::from_be_bytes([frame[2], frame[3]]),
        correlation_id: i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]),
    })
}

/// A request body, decoded.
#[derive(Debug)]
pub enum Body {
    ApiVersions(messages::ApiVersionsRequest),
    Metadata(messages::MetadataRequest),
    Produce(messages::ProduceRequest),
    Fetch(messages::FetchRequest),
    ListOffsets(messages::ListOffsetsRequest),
    CreateTopics(messages::CreateTopicsRequest),
    DeleteTopics(messages::DeleteTopicsRequest),
    CreatePartitions(messages::CreatePartitionsRequest),
    DescribeConfigs(messages::DescribeConfigsRequest),
    AlterConfigs(messages::AlterConfigsRequest),
    IncrementalAlterConfigs(messages::IncrementalAlterConfigsRequest),
    DescribeCluster(messages::DescribeClusterRequest),
    FindCoordinator(messages::FindCoordinatorRequest),
    JoinGroup(messages::JoinGroupRequest),
    SyncGroup(messages::SyncGroupRequest),
    Heartbeat(messages::HeartbeatRequest),
    LeaveGroup(messages::LeaveGroupRequest),
    OffsetCommit(messages::OffsetCommitRequest),
    OffsetFetch(messages::OffsetFetchRequest),
    DescribeGroups(messages::DescribeGroupsRequest),
    ListGroups(messages::ListGroupsRequest),
    DeleteGroups(messages::DeleteGroupsRequest),
    OffsetDelete(messages::OffsetDeleteRequest),
    InitProducerId(messages::InitProducerIdRequest),
    DeleteRecords(messages::DeleteRecordsRequest),
}

/// A decoded request.
#[derive(Debug)]
pub struct Request {
    pub header: RequestHeader,
    pub body: Body,
}

/// What became of a frame.
#[derive(Debug)]
pub enum Decoded {
    /// A served API at a served version.
    Request(Box<Request>),
    /// A known API at a version not served, or an unknown API: answer
    /// [`unsupported_version`].
    Unsupported(Prefix),
}

/// Decodes a body once its counts and lengths are known to fit (`schema.rs`).
fn body<T: Decodable>(key: ApiKey, version: i16, bytes: &mut Bytes) -> Result<T, String> {
    super::schema::check(key, version, bytes)?;
    T::decode(bytes, version).map_err(|e| format!("{key:?} v{version}: {e}"))
}

/// Decodes a whole request frame, header and body; an error means the frame is malformed.
pub fn decode(frame: Bytes) -> Result<Decoded, String> {
    let p = prefix(&frame).ok_or("frame shorter than a request header")?;
    let Ok(key) = ApiKey::try_from(p.api_key) else {
        return Ok(Decoded::Unsupported(p));
    };
    if !served(key, p.api_version) {
        return Ok(Decoded::Unsupported(p));
    }
    let mut b = frame;
    let v = p.api_version;
    let header = RequestHeader::decode(&mut b, key.request_header_version(v))
        .map_err(|e| format!("request header: {e}"))?;
    let body = match key {
        ApiKey::ApiVersions => Body::ApiVersions(body(key, v, &mut b)?),
        ApiKey::Metadata => Body::Metadata(body(key, v, &mut b)?),
        ApiKey::Produce => Body::Produce(body(key, v, &mut b)?),
        ApiKey::Fetch => Body::Fetch(body(key, v, &mut b)?),
        ApiKey::ListOffsets => Body::ListOffsets(body(key, v, &mut b)?),
        ApiKey::CreateTopics => Body::CreateTopics(body(key, v, &mut b)?),
        ApiKey::DeleteTopics => Body::DeleteTopics(body(key, v, &mut b)?),
        ApiKey::CreatePartitions => Body::CreatePartitions(body(key, v, &mut b)?),
        ApiKey::DescribeConfigs => Body::DescribeConfigs(body(key, v, &mut b)?),
        ApiKey::AlterConfigs => Body::AlterConfigs(body(key, v, &mut b)?),
        ApiKey::IncrementalAlterConfigs => Body::IncrementalAlterConfigs(body(key, v, &mut b)?),
        ApiKey::DescribeCluster => Body::DescribeCluster(body(key, v, &mut b)?),
        ApiKey::FindCoordinator => Body::FindCoordinator(body(key, v, &mut b)?),
        ApiKey::JoinGroup => Body::JoinGroup(body(key, v, &mut b)?),
        ApiKey::SyncGroup => Body::SyncGroup(body(key, v, &mut b)?),
        ApiKey::Heartbeat => Body::Heartbeat(body(key, v, &mut b)?),
        ApiKey::LeaveGroup => Body::LeaveGroup(body(key, v, &mut b)?),
        ApiKey::OffsetCommit => Body::OffsetCommit(body(key, v, &mut b)?),
        ApiKey::OffsetFetch => Body::OffsetFetch(body(key, v, &mut b)?),
        ApiKey::DescribeGroups => Body::DescribeGroups(body(key, v, &mut b)?),
        ApiKey::ListGroups => Body::ListGroups(body(key, v, &mut b)?),
        ApiKey::DeleteGroups => Body::DeleteGroups(body(key, v, &mut b)?),
        ApiKey::OffsetDelete => Body::OffsetDelete(body(key, v, &mut b)?),
        ApiKey::InitProducerId => Body::InitProducerId(body(key, v, &mut b)?),
        ApiKey::DeleteRecords => Body::DeleteRecords(body(key, v, &mut b)?),
        _ => return Ok(Decoded::Unsupported(p)),
    };
    Ok(Decoded::Request(Box::new(Request { header, body })))
}

/// [`decode`] on a frame with its length prefix, as it arrives on the socket (the fuzz
/// target's entry point): the prefix is checked as [`FrameDecoder`] checks it.
pub fn decode_frame_bytes(data: &[u8]) -> Result<Decoded, String> {
    let mut frames = FrameDecoder::new(1 << 20);
    frames.buffer().extend_from_slice(data);
    match frames.next_frame() {
        Ok(Some(frame)) => decode(frame),
        Ok(None) => Err("incomplete frame".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// A response frame: length, header (at the version the API asks for), body.
pub fn response<R: Encodable + HeaderVersion>(
    correlation_id: i32,
    version: i16,
    body: &R,
) -> Result<Bytes, String> {
    let header = ResponseHeader::default().with_correlation_id(correlation_id);
    let header_version = R::header_version(version);
    let size = header
        .compute_size(header_version)
        .and_then(|h| body.compute_size(version).map(|b| h + b))
        .map_err(|e| format!("size response: {e}"))?;
    let mut out = BytesMut::with_capacity(4 + size);
    out.put_i32(size as i32);
    header
        .encode(&mut out, header_version)
        .and_then(|()| body.encode(&mut out, version))
        .map_err(|e| format!("encode response: {e}"))?;
    Ok(out.freeze())
}

/// The answer to a request for an API or version this broker does not serve: an ApiVersions
/// v0 body with `UNSUPPORTED_VERSION` and the versions served (what Kafka answers an
/// ApiVersions request it cannot read; clients of other APIs see the error code where
/// every response starts and the connection is then closed).
pub fn unsupported_version(p: Prefix) -> Bytes {
    response(
        p.correlation_id,
        0,
        &api_versions(code::UNSUPPORTED_VERSION),
    )
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut f = (body.len() as i32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn frames_are_cut_from_a_trickle_and_lengths_checked_first() {
        let mut d = FrameDecoder::new(1024);
        let f = frame(b"0123456789abc");
        for b in &f[..f.len() - 1] {
            d.buffer().put_u8(*b);
            assert_eq!(d.next_frame(), Ok(None));
        }
        d.buffer().put_u8(f[f.len() - 1]);
        assert_eq!(
            d.next_frame(),
            Ok(Some(Bytes::from_static(b"0123456789abc")))
        );

        // A 2 GiB declaration is refused from its four bytes, before anything is allocated.
        let mut d = FrameDecoder::new(1024);
        d.buffer().put_slice(&i32::MAX.to_be_bytes());
        assert!(matches!(d.next_frame(), Err(FrameError::TooLarge { .. })));
        assert!(d.buf.capacity() < 8192);
        let mut d = FrameDecoder::new(1024);
        d.buffer().put_slice(&(-5i32).to_be_bytes());
        assert_eq!(d.next_frame(), Err(FrameError::TooSmall(-5)));

        // A large legal frame arriving slowly grows the buffer only as bytes come.
        let mut d = FrameDecoder::new(64 << 20);
        d.buffer().put_slice(&(60i32 << 20).to_be_bytes());
        assert_eq!(d.next_frame(), Ok(None));
        d.buffer().put_u8(1);
        assert!(d.buffer().capacity() <= 2 * GROW + 4096);
    }

    #[test]
    fn unknown_apis_and_versions_are_answered_unsupported() {
        // ApiKey 1000 does not exist; Produce v2 is advertised but not decodable; Fetch v99
        // is beyond what is served.
        for (key, version) in [(1000i16, 0i16), (0, 2), (1, 99)] {
            let mut f = key.to_be_bytes().to_vec();
            f.extend_from_slice(&version.to_be_bytes());
            f.extend_from_slice(&7i32.to_be_bytes());
            f.extend_from_slice(&(-1i16).to_be_bytes());
            match decode(Bytes::from(f)) {
                Ok(Decoded::Unsupported(p)) => assert_eq!(p.correlation_id, 7),
                other => panic!("{key} v{version}: {other:?}"),
            }
        }
        let reply = unsupported_version(Prefix {
            api_key: 1000,
            api_version: 0,
            correlation_id: 7,
        });
        assert_eq!(&reply[4..8], &7i32.to_be_bytes());
        assert_eq!(&reply[8..10], &code::UNSUPPORTED_VERSION.to_be_bytes());
        assert!(served(ApiKey::Produce, 3) && !served(ApiKey::Produce, 2));
        assert!(served(ApiKey::Metadata, 0) && served(ApiKey::Metadata, 12));
    }

    /// The seed corpus (frames recorded from kcat and confluent-kafka, `fuzz/capture.py`)
    /// decodes as the requests they are, and a seeded run of mutations of it (bit flips,
    /// truncations, overwritten lengths) never panics.
    #[test]
    fn fuzz_corpus_replays_and_mutations_do_not_panic() {
        use rand::{Rng, SeedableRng};
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/kafka_request");
        let mut corpus: Vec<Vec<u8>> = std::fs::read_dir(dir)
            .expect("fuzz corpus")
            .map(|e| std::fs::read(e.expect("entry").path()).expect("read"))
            .collect();
        corpus.sort();
        assert!(corpus.len() >= 20, "corpus too small: {}", corpus.len());
        for frame in &corpus {
            match decode_frame_bytes(frame) {
                Ok(Decoded::Request(_)) => {}
                other => panic!("a recorded client request did not decode: {other:?}"),
            }
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x006b_6166_6b61);
        for _ in 0..20_000 {
            let mut f = corpus[rng.random_range(0..corpus.len())].clone();
            match rng.random_range(0..4) {
                0 => {
                    let i = rng.random_range(4..f.len());
                    f[i] ^= 1 << rng.random_range(0..8);
                }
                1 => f.truncate(rng.random_range(0..f.len())),
                2 => {
                    // Overwrite four bytes with a large count somewhere in the body.
                    let i = rng.random_range(8..f.len().saturating_sub(4).max(9));
                    if i + 4 <= f.len() {
                        f[i..i + 4].copy_from_slice(
                            &rng.random_range(0x0100_0000..i32::MAX).to_be_bytes(),
                        );
                    }
                }
                _ => {
                    let i = rng.random_range(8..f.len());
                    f[i] = 0xff;
                }
            }
            let n = (f.len().saturating_sub(4)) as i32;
            if f.len() >= 4 {
                f[0..4].copy_from_slice(&n.to_be_bytes());
            }
            let _ = decode_frame_bytes(&f);
        }
    }
}
