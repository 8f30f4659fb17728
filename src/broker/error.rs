//! [`BrokerError`]: the one error of the broker API, free of any transport.
//!
//! Each front maps an [`ErrorCode`] to its own codes (gRPC status + `aq-error` name, Kafka
//! error codes, MQTT reason codes, HTTP status) by matching on the enum; no front reads
//! another's error strings. The numbers are stable (a retired code is never reused), and
//! [`ErrorCode::as_str`] is the name the gRPC services send in their `aq-error` trailer.

/// Why a broker call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// This replica is not the partition leader; the redirect names the leader.
    NotLeader = 1,
    /// No leader is known yet (election under way, group starting): retry shortly.
    LeaderNotAvailable = 2,
    /// This node holds no replica; the redirect lists the replicas' addresses.
    NotReplica = 3,
    UnknownTopicOrPartition = 4,
    /// The batch is not a well-formed RecordBatch v2 or fails its CRC.
    CorruptMessage = 5,
    RecordBatchTooLarge = 6,
    /// The offset is below the log start or above the high watermark.
    OffsetOutOfRange = 7,
    /// Storage or Raft failure; the message says what.
    Internal = 8,
    /// An idempotent batch that is not its producer's next one (a gap in the sequence).
    OutOfOrderSequenceNumber = 9,
    /// An idempotent batch from an epoch older than its producer's current one.
    InvalidProducerEpoch = 10,
    TopicExists = 11,
    InvalidTopicName = 12,
    /// A partition count that is not possible (0, too many, fewer than today).
    InvalidPartitions = 13,
    InvalidReplicationFactor = 14,
    /// An unknown topic config key or a value it cannot take.
    InvalidConfig = 15,
    /// Partition replicas are being moved: retry once they are.
    ReassignmentInProgress = 16,
    /// The metadata leader is not known right now, or moved while the call was under way:
    /// retry shortly.
    NotController = 17,
    /// A malformed request.
    InvalidRequest = 18,
    /// The batch uses a format this broker does not store (magic 0 or 1, transactions).
    UnsupportedForMessageFormat = 19,
    UnknownNode = 20,
    /// A membership change is under way: retry when it completes.
    TryAgain = 21,
    /// This node does not coordinate the group; the redirect names the node that does.
    NotCoordinator = 22,
    /// The coordinator is reading its partition, or no leader is known: retry shortly.
    CoordinatorLoadInProgress = 23,
    /// `__consumer_offsets` does not exist yet, or has no leader for the group.
    CoordinatorNotAvailable = 24,
    UnknownMemberId = 25,
    IllegalGeneration = 26,
    /// The group is rebalancing: rejoin.
    RebalanceInProgress = 27,
    /// A member's protocol type or protocols do not match the group's.
    InconsistentGroupProtocol = 28,
    InvalidSessionTimeout = 29,
    /// The group has active members (offsets set from outside, group deleted).
    NonEmptyGroup = 30,
    InvalidGroupId = 31,
    GroupIdNotFound = 32,
    /// A static member (`group.instance.id`) replaced by a newer member with the same id.
    FencedInstanceId = 33,
    /// Offsets of a topic the group's members are subscribed to cannot be deleted.
    GroupSubscribedToTopic = 34,
    /// The topic's configuration forbids the call (records of a compacted-only topic).
    PolicyViolation = 35,
    /// A resource of a family (product, device, …) does not exist.
    NotFound = 36,
    /// A resource of a family with that name or id exists.
    AlreadyExists = 37,
    /// A resource is still used by others (a product with devices).
    InUse = 38,
    /// A device request found no session of the device (or none subscribed to it).
    DeviceOffline = 39,
    /// A device did not answer a request in time.
    TimedOut = 40,
}

impl ErrorCode {
    /// The stable name (`aq-error` trailer of the gRPC services).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotLeader => "NOT_LEADER",
            Self::LeaderNotAvailable => "LEADER_NOT_AVAILABLE",
            Self::NotReplica => "NOT_REPLICA",
            Self::UnknownTopicOrPartition => "UNKNOWN_TOPIC_OR_PARTITION",
            Self::CorruptMessage => "CORRUPT_MESSAGE",
            Self::RecordBatchTooLarge => "RECORD_BATCH_TOO_LARGE",
            Self::OffsetOutOfRange => "OFFSET_OUT_OF_RANGE",
            Self::Internal => "INTERNAL",
            Self::OutOfOrderSequenceNumber => "OUT_OF_ORDER_SEQUENCE_NUMBER",
            Self::InvalidProducerEpoch => "INVALID_PRODUCER_EPOCH",
            Self::TopicExists => "TOPIC_EXISTS",
            Self::InvalidTopicName => "INVALID_TOPIC_NAME",
            Self::InvalidPartitions => "INVALID_PARTITION",
            Self::InvalidReplicationFactor => "INVALID_REPLICATION_FACTOR",
            Self::InvalidConfig => "INVALID_CONFIG",
            Self::ReassignmentInProgress => "REASSIGNMENT_IN_PROGRESS",
            Self::NotController => "NO_LEADER",
            Self::InvalidRequest => "INVALID_REQUEST",
            Self::UnsupportedForMessageFormat => "UNSUPPORTED_FOR_MESSAGE_FORMAT",
            Self::UnknownNode => "UNKNOWN_NODE",
            Self::TryAgain => "TRY_AGAIN",
            Self::NotCoordinator => "NOT_COORDINATOR",
            Self::CoordinatorLoadInProgress => "COORDINATOR_LOAD_IN_PROGRESS",
            Self::CoordinatorNotAvailable => "COORDINATOR_NOT_AVAILABLE",
            Self::UnknownMemberId => "UNKNOWN_MEMBER_ID",
            Self::IllegalGeneration => "ILLEGAL_GENERATION",
            Self::RebalanceInProgress => "REBALANCE_IN_PROGRESS",
            Self::InconsistentGroupProtocol => "INCONSISTENT_GROUP_PROTOCOL",
            Self::InvalidSessionTimeout => "INVALID_SESSION_TIMEOUT",
            Self::NonEmptyGroup => "NON_EMPTY_GROUP",
            Self::InvalidGroupId => "INVALID_GROUP_ID",
            Self::GroupIdNotFound => "GROUP_ID_NOT_FOUND",
            Self::FencedInstanceId => "FENCED_INSTANCE_ID",
            Self::GroupSubscribedToTopic => "GROUP_SUBSCRIBED_TO_TOPIC",
            Self::PolicyViolation => "POLICY_VIOLATION",
            Self::NotFound => "NOT_FOUND",
            Self::AlreadyExists => "ALREADY_EXISTS",
            Self::InUse => "IN_USE",
            Self::DeviceOffline => "DEVICE_OFFLINE",
            Self::TimedOut => "TIMED_OUT",
        }
    }

    /// Whether the same call may succeed if repeated shortly (after following a redirect).
    pub fn retriable(self) -> bool {
        matches!(
            self,
            Self::NotLeader
                | Self::LeaderNotAvailable
                | Self::NotReplica
                | Self::NotController
                | Self::ReassignmentInProgress
                | Self::TryAgain
                | Self::NotCoordinator
                | Self::CoordinatorLoadInProgress
                | Self::CoordinatorNotAvailable
        )
    }
}

/// Where the caller should go instead.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Redirect {
    #[default]
    None,
    /// The partition (or metadata) leader: node id and gRPC address.
    Leader { node: u64, addr: String },
    /// The gRPC addresses of the partition's replicas.
    Replicas(Vec<String>),
}

/// A refused or failed broker call: a stable code, a message for people, and where to go.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BrokerError {
    pub code: ErrorCode,
    pub message: String,
    pub redirect: Redirect,
}

impl BrokerError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            redirect: Redirect::None,
        }
    }

    pub fn with_redirect(mut self, redirect: Redirect) -> Self {
        self.redirect = redirect;
        self
    }

    pub fn internal(what: &str, e: impl std::fmt::Display) -> Self {
        Self::new(ErrorCode::Internal, format!("{what}: {e}"))
    }

    pub fn unknown_topic(topic: &str) -> Self {
        Self::new(
            ErrorCode::UnknownTopicOrPartition,
            format!("topic {topic:?} does not exist"),
        )
    }
}

/// The result of a broker call.
pub type BrokerResult<T> = Result<T, BrokerError>;
