//! The metadata group's openraft type configuration and its commands.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A change to the cluster's metadata: one entry of the metadata log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// A node joined (or changed its address).
    RegisterNode { node_id: u64, addr: String },
    /// A node left the cluster.
    RemoveNode { node_id: u64 },
    /// A topic with its partition count, replication factor, configs and (when not empty) the
    /// replicas of each partition, chosen by the leader that proposed it: one list per
    /// partition, each `replication_factor` distinct node ids, the first the preferred leader.
    CreateTopic {
        name: String,
        partitions: u32,
        replication_factor: u16,
        configs: BTreeMap<String, String>,
        #[serde(default)]
        assignment: Vec<Vec<u64>>,
        /// The client's id for this request (0: none). Repeating a request with the same id
        /// after its topic was created answers `Ok`, so a retry after a lost reply is not an
        /// error.
        #[serde(default)]
        request_id: u64,
        /// The integration application that owns the topic.
        #[serde(default = "default_application")]
        application: String,
    },
    /// Grows a topic by `assignment.len()` partitions, numbered after the existing ones, each
    /// on the replicas listed (as in [`MetaCommand::CreateTopic`]). Partitions are never
    /// removed.
    AddPartitions {
        name: String,
        assignment: Vec<Vec<u64>>,
    },
    /// Deletes a topic and its assignments.
    DeleteTopic { name: String },
    /// Sets (`Some`) or removes (`None`) one topic config.
    SetTopicConfig {
        name: String,
        key: String,
        value: Option<String>,
    },
    /// Sets and removes several topic configs at once.
    AlterTopicConfigs {
        name: String,
        set: BTreeMap<String, String>,
        delete: Vec<String>,
    },
    /// Moves one partition to these replicas (the first is the preferred leader). Only an
    /// order change takes effect at once; a change of the set records the previous replicas
    /// as *moving* until [`MetaCommand::ReassignmentDone`]: the partition's leader adds the
    /// new replicas as learners, waits until they have caught up, and then replaces the
    /// voters; the previous replicas keep their data until then. Refused while the partition
    /// is already moving.
    AssignReplicas {
        topic: String,
        partition: u32,
        replicas: Vec<u64>,
    },
    /// The partition's Raft group now has exactly `replicas` as voters: ends its move (a no-op
    /// unless `replicas` is its current assignment and it is moving).
    ReassignmentDone {
        topic: String,
        partition: u32,
        replicas: Vec<u64>,
    },
    /// Reserves `count` idempotent-producer ids (at most [`MAX_PRODUCER_ID_BLOCK`]); the
    /// response is [`MetaResponse::ProducerIds`]. Ids are never handed out twice.
    AllocateProducerIds { count: u32 },
    /// Names the cluster (the id Kafka clients see, the same on every node). Applied only
    /// while the cluster has no id yet, so racing proposals leave the first one.
    InitCluster { id: String },
    /// A command of a resource family (see [`crate::family`]): its name and its own command,
    /// which only that family's apply reads.
    Family {
        family: String,
        command: serde_json::Value,
    },
}

/// The application of resources created before applications existed, and of system ones.
pub const DEFAULT_APPLICATION: &str = "default";

/// Serde default of the `application` of a record.
pub fn default_application() -> String {
    DEFAULT_APPLICATION.to_string()
}

/// Most producer ids one [`MetaCommand::AllocateProducerIds`] reserves.
pub const MAX_PRODUCER_ID_BLOCK: u32 = 1_000_000;

/// The outcome of applying a [`MetaCommand`]. Error codes are stable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaResponse {
    Ok,
    /// Producer ids `first..first + count` are reserved for the proposer.
    ProducerIds {
        first: i64,
        count: u32,
    },
    /// The command was valid Raft input but refused by the state machine.
    Rejected {
        code: MetaErrorCode,
        message: String,
    },
}

/// Stable codes of refused metadata commands (never reused once retired).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u16)]
pub enum MetaErrorCode {
    TopicExists = 1,
    UnknownTopic = 2,
    UnknownNode = 3,
    InvalidPartition = 4,
    InvalidReplicationFactor = 5,
    InvalidTopicName = 6,
    /// A malformed command (a bug in the proposer).
    InvalidRequest = 7,
    /// The partition is being moved to other replicas; retry when the move is done.
    ReassignmentInProgress = 8,
    /// A family's resource does not exist.
    NotFound = 9,
    /// A family's resource with that name exists.
    AlreadyExists = 10,
    /// A family's resource is still used by others (a product with devices).
    InUse = 11,
    /// A family's resource definition is not valid; the message names the field.
    InvalidDefinition = 12,
}

/// Most partitions one topic may have.
pub const MAX_PARTITIONS: u32 = 10_000;
/// Most replicas (partitions × replication factor) one topic may have.
pub const MAX_TOPIC_REPLICAS: u64 = 30_000;

/// Why `partitions` × `replication_factor` is not a valid topic shape, or `None`.
pub fn topic_shape_problem(partitions: u32, replication_factor: u64) -> Option<String> {
    if partitions == 0 || partitions > MAX_PARTITIONS {
        return Some(format!(
            "a topic has 1 to {MAX_PARTITIONS} partitions, not {partitions}"
        ));
    }
    if u64::from(partitions) * replication_factor > MAX_TOPIC_REPLICAS {
        return Some(format!(
            "{partitions} partitions × replication factor {replication_factor} exceeds \
             {MAX_TOPIC_REPLICAS} replicas per topic"
        ));
    }
    None
}

/// Why `name` cannot name a topic (`[A-Za-z0-9._-]{1,249}`), or `None` when it can. Names
/// starting with `__` or `aq.` are reserved for the system; `system` allows them.
/// Topics whose names start with this belong to the system (telemetry, device events); they
/// are created by the platform, never by a user.
pub const SYSTEM_TOPIC_PREFIX: &str = "aq.";

pub fn topic_name_problem(name: &str, system: bool) -> Option<String> {
    if name.is_empty() || name.len() > 249 {
        return Some(format!(
            "topic name must be 1 to 249 characters, not {}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Some(format!(
            "topic name {name:?} contains {c:?}; allowed are A-Z a-z 0-9 . _ -"
        ));
    }
    if name == "." || name == ".." {
        return Some(format!("topic name {name:?} is not allowed"));
    }
    if !system && (name.starts_with("__") || name.starts_with(SYSTEM_TOPIC_PREFIX)) {
        return Some(format!(
            "topic name {name:?} is reserved: names starting with `__` or `aq.` belong to the system"
        ));
    }
    None
}

/// The application data of every Raft group: metadata commands in the metadata group, record
/// batches in partition groups. One type configuration for all groups lets them share the log
/// store, the transport and one connection per node pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupCommand {
    /// A metadata change (metadata group only).
    Meta(MetaCommand),
    /// A Kafka RecordBatch v2 (partition groups only), stored byte for byte as a data entry;
    /// read back from the log it carries the base offset and leader epoch the log stamped.
    Records(bytes::Bytes),
    /// A retention point decided by the partition leader: every replica snapshots at exactly
    /// this index and purges its log up to it (partition groups only).
    Retain { upto: u64 },
    /// A compaction point decided by the partition leader of a compacted topic: every replica
    /// compacts its sealed segments up to this index (partition groups only).
    Compact { upto: u64 },
    /// Records below this offset are deleted (Kafka's DeleteRecords): the partition's log
    /// start offset moves up to it (never past the high watermark, never back), and the
    /// segments wholly below it are purged by the next retention point (partition groups
    /// only).
    DeleteRecords { before: u64 },
}

/// The outcome of applying a [`GroupCommand`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupResponse {
    Meta(MetaResponse),
    /// Records appended at `base_offset..=last_offset`.
    Appended {
        base_offset: u64,
        last_offset: u64,
    },
    /// A command sent to the wrong kind of group (a bug in the caller).
    WrongGroup,
    /// The partition's log start offset after a `DeleteRecords`.
    LogStart(u64),
}

openraft::declare_raft_types!(
    /// Every Raft group's type configuration: openraft's defaults (u64 node ids and terms,
    /// advanced leader ids, `BasicNode` addresses) with [`GroupCommand`] as the application
    /// data.
    pub GroupTypeConfig:
        D = GroupCommand,
        R = GroupResponse,
);

/// Shorthands for the metadata group's openraft types.
pub type LogId = openraft::LogId<openraft::impls::leader_id_adv::LeaderId<u64, u64>>;
pub type Entry = <GroupTypeConfig as openraft::RaftTypeConfig>::Entry;
pub type Vote = <GroupTypeConfig as openraft::RaftTypeConfig>::Vote;
pub type StoredMembership = openraft::StoredMembership<
    openraft::impls::leader_id_adv::LeaderId<u64, u64>,
    u64,
    openraft::impls::BasicNode,
>;

impl std::fmt::Display for MetaCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetaCommand::RegisterNode { node_id, addr } => {
                write!(f, "register node {node_id} at {addr}")
            }
            MetaCommand::RemoveNode { node_id } => write!(f, "remove node {node_id}"),
            MetaCommand::CreateTopic {
                name,
                partitions,
                replication_factor,
                ..
            } => {
                write!(
                    f,
                    "create topic {name} ({partitions} partitions, rf {replication_factor})"
                )
            }
            MetaCommand::AddPartitions { name, assignment } => {
                write!(f, "add {} partitions to topic {name}", assignment.len())
            }
            MetaCommand::DeleteTopic { name } => write!(f, "delete topic {name}"),
            MetaCommand::AlterTopicConfigs { name, set, delete } => {
                write!(f, "alter topic {name}: set {set:?}, delete {delete:?}")
            }
            MetaCommand::SetTopicConfig { name, key, value } => {
                write!(f, "set {key}={value:?} on topic {name}")
            }
            MetaCommand::AssignReplicas {
                topic,
                partition,
                replicas,
            } => {
                write!(f, "assign {topic}/{partition} to {replicas:?}")
            }
            MetaCommand::ReassignmentDone {
                topic,
                partition,
                replicas,
            } => {
                write!(f, "{topic}/{partition} moved to {replicas:?}")
            }
            MetaCommand::AllocateProducerIds { count } => {
                write!(f, "allocate {count} producer ids")
            }
            MetaCommand::InitCluster { id } => write!(f, "name the cluster {id}"),
            MetaCommand::Family { family, command } => {
                let what = command
                    .as_object()
                    .and_then(|o| o.keys().next())
                    .map_or("command", String::as_str);
                write!(f, "{family}: {what}")
            }
        }
    }
}

impl std::fmt::Display for MetaResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetaResponse::Ok => f.write_str("ok"),
            MetaResponse::ProducerIds { first, count } => {
                write!(f, "producer ids {first}..{}", first + i64::from(*count))
            }
            MetaResponse::Rejected { code, message } => write!(f, "rejected ({code:?}): {message}"),
        }
    }
}

impl std::fmt::Display for GroupCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GroupCommand::Meta(m) => m.fmt(f),
            GroupCommand::Records(b) => write!(f, "record batch of {} bytes", b.len()),
            GroupCommand::Retain { upto } => write!(f, "retain from index {}", upto + 1),
            GroupCommand::Compact { upto } => write!(f, "compact up to index {upto}"),
            GroupCommand::DeleteRecords { before } => {
                write!(f, "delete records before offset {before}")
            }
        }
    }
}

impl std::fmt::Display for GroupResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GroupResponse::Meta(m) => m.fmt(f),
            GroupResponse::Appended {
                base_offset,
                last_offset,
            } => write!(f, "appended at {base_offset}..={last_offset}"),
            GroupResponse::WrongGroup => f.write_str("command sent to the wrong kind of group"),
            GroupResponse::LogStart(o) => write!(f, "log start offset {o}"),
        }
    }
}
