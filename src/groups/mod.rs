//! Consumer groups (DESIGN.md §5a): the group coordinator and its gRPC service
//! (`aqueduct.group.v1.Groups`, see `protocol/proto/aqueduct/group.proto`).
//!
//! A group's coordinator is the leader of partition [`coordinator_partition`] of the internal
//! topic [`OFFSETS_TOPIC`] (created on first use through `Cluster.EnsureTopic`, like Kafka's,
//! with [`OFFSETS_PARTITIONS`] partitions and replication factor min(3, nodes)). Committed
//! offsets and each generation's membership and assignment are records in that partition,
//! keyed so that the latest record per key is the state:
//!
//! * key `["offset", group, topic, partition]`, value `{"offset", "metadata"}` (JSON);
//! * key `["group", group]`, value a [`state::GroupRecord`] (JSON).
//!
//! The coordinator answers a group's requests only after it has read its partition from the
//! start (once per leadership, after it applied an entry of its own term, so every committed
//! record is in its view). Membership itself ([`state::Group`]) lives in memory; a member
//! that has not heard back within its session timeout is removed by the ticker, which also
//! moves rebalances on. Requests for a group go to its coordinator only; other nodes answer
//! `NOT_COORDINATOR` with the leader's address.

pub mod state;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aqueduct_protocol::group as pb;
use aqueduct_protocol::group::groups_server::{Groups, GroupsServer};
use bytes::Bytes;
use tokio::time::Instant;
use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Response, Status};

use crate::broker::partitions::{Partitions, Replica};
use crate::broker::records::{ProducerRecord, batches_end, decode_batches, encode_batch};
use crate::broker::{Acks, Broker, BrokerError, ErrorCode, FetchRequest, ProduceRequest, Redirect};
use state::{Committed, Group, GroupRecord};

pub use crate::broker::{OFFSETS_PARTITIONS, OFFSETS_TOPIC};
/// Longest wait for a new coordinator to apply an entry of its own term before loading.
const LOAD_WAIT: Duration = Duration::from_secs(10);
/// How often the coordinator expires sessions and moves rebalances on.
const TICK: Duration = Duration::from_millis(100);

/// Java's `String.hashCode` (over UTF-16 code units), as Kafka hashes group ids.
pub fn java_string_hash(s: &str) -> i32 {
    s.encode_utf16()
        .fold(0i32, |h, c| h.wrapping_mul(31).wrapping_add(i32::from(c)))
}

/// The `__consumer_offsets` partition whose leader coordinates `group` (Kafka's
/// `Utils.abs(groupId.hashCode()) % partitions`).
pub fn coordinator_partition(group: &str, partitions: u32) -> u32 {
    ((java_string_hash(group) & 0x7fff_ffff) as u32) % partitions.max(1)
}

/// Stable error codes of the group service (`aq-error` trailer; numbers never reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum GroupErrorCode {
    /// This node does not coordinate the group; `aq-leader` names the node that does.
    NotCoordinator = 1,
    /// The coordinator is reading its partition, or no leader is known: retry shortly.
    CoordinatorLoadInProgress = 2,
    /// `__consumer_offsets` does not exist yet (create it with `Cluster.EnsureTopic`).
    CoordinatorNotAvailable = 3,
    UnknownMemberId = 4,
    IllegalGeneration = 5,
    /// The group is rebalancing: rejoin.
    RebalanceInProgress = 6,
    /// A member's protocol type or protocols do not match the group's.
    InconsistentGroupProtocol = 7,
    InvalidSessionTimeout = 8,
    /// Offsets set from outside a group that has members.
    NonEmptyGroup = 9,
    InvalidGroupId = 10,
    InvalidRequest = 11,
    Internal = 12,
}

impl GroupErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
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
            Self::InvalidRequest => "INVALID_REQUEST",
            Self::Internal => "INTERNAL",
        }
    }

    fn grpc(self) -> Code {
        match self {
            Self::NotCoordinator
            | Self::UnknownMemberId
            | Self::IllegalGeneration
            | Self::RebalanceInProgress
            | Self::NonEmptyGroup => Code::FailedPrecondition,
            Self::CoordinatorLoadInProgress | Self::CoordinatorNotAvailable => Code::Unavailable,
            Self::InconsistentGroupProtocol
            | Self::InvalidSessionTimeout
            | Self::InvalidGroupId
            | Self::InvalidRequest => Code::InvalidArgument,
            Self::Internal => Code::Internal,
        }
    }
}

fn refuse(code: GroupErrorCode, message: impl Into<String>) -> Status {
    let mut status = Status::new(code.grpc(), message.into());
    status
        .metadata_mut()
        .insert("aq-error", MetadataValue::from_static(code.as_str()));
    status
}

fn refused((code, message): state::Refusal) -> Status {
    refuse(code, message)
}

fn offset_key(group: &str, topic: &str, partition: u32) -> Bytes {
    Bytes::from(serde_json::json!(["offset", group, topic, partition]).to_string())
}

fn group_key(group: &str) -> Bytes {
    Bytes::from(serde_json::json!(["group", group]).to_string())
}

/// The coordinator's view of one `__consumer_offsets` partition it leads.
#[derive(Debug)]
struct View {
    leader: openraft::impls::leader_id_adv::LeaderId<u64, u64>,
    groups: HashMap<String, Group>,
}

/// The group coordinator of one node (cheap to clone: clones share everything).
#[derive(Debug, Clone)]
pub struct Coordinator {
    partitions: Partitions,
    broker: Broker,
    views: Arc<Mutex<HashMap<u32, View>>>,
    loading: Arc<tokio::sync::Mutex<()>>,
}

impl Coordinator {
    pub fn new(broker: Broker) -> Self {
        Self {
            partitions: broker.partitions().clone(),
            broker,
            views: Arc::default(),
            loading: Arc::default(),
        }
    }

    pub fn into_server(self) -> GroupsServer<Self> {
        GroupsServer::new(self)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, View>> {
        self.views.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Expires sessions and moves rebalances on, forever; drops the views of partitions this
    /// node no longer leads.
    pub async fn run(self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let emptied = self.tick_views(Instant::now());
            for (p, group) in emptied {
                let Some(replica) = self.partitions.get(OFFSETS_TOPIC, p) else {
                    continue;
                };
                if let Err(e) = self.persist_generation(&replica, p, &group).await {
                    tracing::warn!(group, err = %e.message(), "cannot record the empty group");
                }
            }
        }
    }

    /// One tick: drops the views of partitions no longer led, expires sessions, moves
    /// rebalances on; returns the groups that became empty (their record is to be written).
    fn tick_views(&self, now: Instant) -> Vec<(u32, String)> {
        let mut views = self.lock();
        views.retain(|p, view| {
            let leads = self
                .partitions
                .get(OFFSETS_TOPIC, *p)
                .and_then(|r| r.raft.as_leader().ok())
                .is_some_and(|l| l.to_committed_leader_id() == view.leader);
            if !leads {
                for g in view.groups.values_mut() {
                    g.abandon(
                        GroupErrorCode::NotCoordinator,
                        "this node no longer coordinates the group; find the new coordinator",
                    );
                }
            }
            leads
        });
        let mut emptied = Vec::new();
        for (p, view) in views.iter_mut() {
            for g in view.groups.values_mut() {
                g.tick(now);
                if g.needs_record {
                    g.needs_record = false;
                    emptied.push((*p, g.name.clone()));
                }
            }
            // A group whose empty record is still to be written stays until the next tick.
            view.groups.retain(|_, g| {
                !g.is_forgettable() || emptied.iter().any(|e| e.0 == *p && e.1 == g.name)
            });
        }
        emptied
    }

    /// The replica of the group's coordinator partition, when this node leads it, with the
    /// view loaded; otherwise the refusal that sends the client on.
    async fn coordinate(&self, group: &str) -> Result<(Arc<Replica>, u32), Status> {
        if group.is_empty() || group.len() > 255 {
            return Err(refuse(
                GroupErrorCode::InvalidGroupId,
                "a group id is 1 to 255 bytes",
            ));
        }
        let topic = self
            .partitions
            .metadata()
            .topic(OFFSETS_TOPIC)
            .map_err(|e| refuse(GroupErrorCode::Internal, format!("read metadata: {e}")))?
            .ok_or_else(|| {
                refuse(
                    GroupErrorCode::CoordinatorNotAvailable,
                    format!("{OFFSETS_TOPIC} does not exist yet; create it with EnsureTopic"),
                )
            })?;
        let p = coordinator_partition(group, topic.partitions);
        let replica = self
            .broker
            .leader_replica(OFFSETS_TOPIC, p)
            .map_err(as_coordinator_refusal)?;
        let leader = replica
            .raft
            .as_leader()
            .map_err(|_| refuse(GroupErrorCode::NotCoordinator, "leadership moved; retry"))?
            .to_committed_leader_id();
        if self.lock().get(&p).is_some_and(|v| v.leader == leader) {
            return Ok((replica, p));
        }
        let _loading = self.loading.lock().await;
        if self.lock().get(&p).is_some_and(|v| v.leader == leader) {
            return Ok((replica, p));
        }
        let groups = self.load(&replica, leader.term).await?;
        tracing::info!(
            partition = p,
            groups = groups.len(),
            "group coordinator loaded"
        );
        self.lock().insert(p, View { leader, groups });
        Ok((replica, p))
    }

    /// Reads a coordinator partition from its start: groups with their committed offsets
    /// and last recorded generation.
    async fn load(&self, replica: &Replica, term: u64) -> Result<HashMap<String, Group>, Status> {
        let ready = replica.sm.wait_applied_term(term, LOAD_WAIT).await;
        if !ready {
            return Err(refuse(
                GroupErrorCode::CoordinatorLoadInProgress,
                "the coordinator is catching up; retry",
            ));
        }
        let hw = replica.sm.applied().high_watermark;
        let mut offset = replica
            .log
            .start_offset()
            .map_err(|e| refuse(GroupErrorCode::Internal, format!("read log: {e}")))?;
        let now = Instant::now();
        let mut groups: HashMap<String, Group> = HashMap::new();
        while offset < hw {
            let fetched = self
                .broker
                .fetch(FetchRequest {
                    topic: OFFSETS_TOPIC.to_string(),
                    partition: replica.partition,
                    offset,
                    max_bytes: 4 << 20,
                    max_wait: Duration::ZERO,
                })
                .await
                .map_err(as_coordinator_refusal)?;
            let Some(next) = batches_end(&fetched.batches) else {
                break;
            };
            let records =
                decode_batches(fetched.batches, OFFSETS_TOPIC, 0, offset).map_err(|e| {
                    refuse(
                        GroupErrorCode::Internal,
                        format!("decode {OFFSETS_TOPIC}: {e}"),
                    )
                })?;
            for r in records.into_iter().filter(|r| r.offset < hw) {
                apply_record(&mut groups, &r.key, r.value.as_deref(), now);
            }
            if next <= offset {
                break;
            }
            offset = next;
        }
        Ok(groups)
    }

    /// Writes records to the coordinator partition and waits until they are committed.
    async fn write(&self, replica: &Replica, records: Vec<ProducerRecord>) -> Result<(), Status> {
        let batch = encode_batch(&records, None)
            .map_err(|e| refuse(GroupErrorCode::Internal, e.to_string()))?;
        self.broker
            .produce(ProduceRequest {
                topic: OFFSETS_TOPIC.to_string(),
                partition: replica.partition,
                batch,
                acks: Acks::All,
            })
            .await
            .map(|_| ())
            .map_err(|e| match e.code {
                ErrorCode::Internal | ErrorCode::CorruptMessage => {
                    refuse(GroupErrorCode::Internal, e.message)
                }
                _ => refuse(
                    GroupErrorCode::NotCoordinator,
                    format!(
                        "the write did not commit ({}); find the coordinator again",
                        e.message
                    ),
                ),
            })
    }

    /// Runs `f` on the group (created if missing) of a loaded view.
    fn with_group<T>(
        &self,
        p: u32,
        group: &str,
        f: impl FnOnce(&mut Group) -> T,
    ) -> Result<T, Status> {
        let mut views = self.lock();
        let view = views.get_mut(&p).ok_or_else(|| {
            refuse(
                GroupErrorCode::NotCoordinator,
                "this node no longer coordinates the group; retry",
            )
        })?;
        let g = view
            .groups
            .entry(group.to_string())
            .or_insert_with(|| Group::new(group, Instant::now()));
        Ok(f(g))
    }

    /// The group's record for the generation just synced, written and then announced.
    async fn persist_generation(
        &self,
        replica: &Replica,
        p: u32,
        group: &str,
    ) -> Result<(), Status> {
        let rec = self.with_group(p, group, |g| g.record())?;
        let value = serde_json::to_vec(&rec)
            .map_err(|e| refuse(GroupErrorCode::Internal, e.to_string()))?;
        self.write(
            replica,
            vec![ProducerRecord {
                key: Some(group_key(group)),
                value: Some(Bytes::from(value)),
                ..ProducerRecord::default()
            }],
        )
        .await
    }
}

/// Applies one `__consumer_offsets` record to a view being loaded.
fn apply_record(
    groups: &mut HashMap<String, Group>,
    key: &Option<Bytes>,
    value: Option<&[u8]>,
    now: Instant,
) {
    let Some(key) = key else { return };
    let Ok(key) = serde_json::from_slice::<serde_json::Value>(key) else {
        return;
    };
    let Some(parts) = key.as_array() else { return };
    let Some(group) = parts.get(1).and_then(|g| g.as_str()) else {
        return;
    };
    let g = groups
        .entry(group.to_string())
        .or_insert_with(|| Group::new(group, now));
    match parts.first().and_then(|k| k.as_str()) {
        Some("offset") => {
            let (Some(topic), Some(partition)) = (
                parts.get(2).and_then(|t| t.as_str()),
                parts.get(3).and_then(serde_json::Value::as_u64),
            ) else {
                return;
            };
            let key = (topic.to_string(), partition as u32);
            match value.and_then(|v| serde_json::from_slice::<Committed>(v).ok()) {
                Some(c) => {
                    g.offsets.insert(key, c);
                }
                None => {
                    g.offsets.remove(&key);
                }
            }
        }
        Some("group") => {
            if let Some(rec) = value.and_then(|v| serde_json::from_slice::<GroupRecord>(v).ok()) {
                g.restore(rec, now);
            }
        }
        _ => {}
    }
}

/// A broker refusal for the coordinator partition, in the group service's terms.
fn as_coordinator_refusal(e: BrokerError) -> Status {
    let mapped = match e.code {
        ErrorCode::NotLeader | ErrorCode::NotReplica => GroupErrorCode::NotCoordinator,
        ErrorCode::LeaderNotAvailable => GroupErrorCode::CoordinatorLoadInProgress,
        ErrorCode::UnknownTopicOrPartition => GroupErrorCode::CoordinatorNotAvailable,
        _ => GroupErrorCode::Internal,
    };
    let mut out = refuse(mapped, e.message);
    match &e.redirect {
        Redirect::Leader { addr, .. } => {
            if let Ok(v) = addr.parse() {
                out.metadata_mut().insert("aq-leader", v);
            }
        }
        Redirect::Replicas(addrs) => {
            if let Ok(v) = addrs.join(",").parse() {
                out.metadata_mut().insert("aq-replicas", v);
            }
        }
        Redirect::None => {}
    }
    out
}

fn peer_host<T>(request: &Request<T>) -> String {
    request
        .remote_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_default()
}

async fn wait<T>(
    rx: tokio::sync::oneshot::Receiver<Result<T, state::Refusal>>,
) -> Result<T, Status> {
    match rx.await {
        Ok(r) => r.map_err(refused),
        Err(_) => Err(refuse(
            GroupErrorCode::RebalanceInProgress,
            "superseded by a newer request of the same member; rejoin",
        )),
    }
}

#[tonic::async_trait]
impl Groups for Coordinator {
    async fn join_group(
        &self,
        request: Request<pb::JoinGroupRequest>,
    ) -> Result<Response<pb::JoinGroupReply>, Status> {
        let host = peer_host(&request);
        let req = request.into_inner();
        let (_, p) = self.coordinate(&req.group).await?;
        let rx = self
            .with_group(p, &req.group, |g| g.join(&req, &host, Instant::now()))?
            .map_err(refused)?;
        Ok(Response::new(wait(rx).await?))
    }

    async fn sync_group(
        &self,
        request: Request<pb::SyncGroupRequest>,
    ) -> Result<Response<pb::SyncGroupReply>, Status> {
        let req = request.into_inner();
        let (replica, p) = self.coordinate(&req.group).await?;
        let mut wake = Vec::new();
        let outcome = self
            .with_group(p, &req.group, |g| g.sync(&req, Instant::now(), &mut wake))?
            .map_err(refused)?;
        if !wake.is_empty() {
            // The leader's assignment: recorded before anyone is told.
            let written = self.persist_generation(&replica, p, &req.group).await;
            for (w, assignment) in wake {
                let _ = w.send(match &written {
                    Ok(()) => Ok(assignment),
                    Err(s) => Err((GroupErrorCode::RebalanceInProgress, s.message().to_string())),
                });
            }
        }
        let assignment = match outcome {
            Ok(a) => a,
            Err(rx) => wait(rx).await?,
        };
        Ok(Response::new(pb::SyncGroupReply {
            assignment: assignment.to_vec(),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        let req = request.into_inner();
        let (_, p) = self.coordinate(&req.group).await?;
        self.with_group(p, &req.group, |g| g.heartbeat(&req, Instant::now()))?
            .map_err(refused)?;
        Ok(Response::new(pb::HeartbeatReply {}))
    }

    async fn leave_group(
        &self,
        request: Request<pb::LeaveGroupRequest>,
    ) -> Result<Response<pb::LeaveGroupReply>, Status> {
        let req = request.into_inner();
        let (_, p) = self.coordinate(&req.group).await?;
        self.with_group(p, &req.group, |g| g.leave(&req.member_id, Instant::now()))?
            .map_err(refused)?;
        Ok(Response::new(pb::LeaveGroupReply {}))
    }

    async fn offset_commit(
        &self,
        request: Request<pb::OffsetCommitRequest>,
    ) -> Result<Response<pb::OffsetCommitReply>, Status> {
        let req = request.into_inner();
        if let Some(bad) = req
            .offsets
            .iter()
            .find(|o| o.offset < 0 || o.topic.is_empty())
        {
            return Err(refuse(
                GroupErrorCode::InvalidRequest,
                format!(
                    "cannot commit offset {} for {:?}/{}",
                    bad.offset, bad.topic, bad.partition
                ),
            ));
        }
        let (replica, p) = self.coordinate(&req.group).await?;
        self.with_group(p, &req.group, |g| {
            g.may_commit(&req.member_id, req.generation, Instant::now())
        })?
        .map_err(refused)?;
        let records = req
            .offsets
            .iter()
            .map(|o| {
                let value = serde_json::to_vec(&Committed {
                    offset: o.offset,
                    metadata: o.metadata.clone(),
                })
                .unwrap_or_default();
                ProducerRecord {
                    key: Some(offset_key(&req.group, &o.topic, o.partition)),
                    value: Some(Bytes::from(value)),
                    ..ProducerRecord::default()
                }
            })
            .collect();
        self.write(&replica, records).await?;
        self.with_group(p, &req.group, |g| {
            for o in &req.offsets {
                g.offsets.insert(
                    (o.topic.clone(), o.partition),
                    Committed {
                        offset: o.offset,
                        metadata: o.metadata.clone(),
                    },
                );
            }
        })?;
        Ok(Response::new(pb::OffsetCommitReply {}))
    }

    async fn offset_fetch(
        &self,
        request: Request<pb::OffsetFetchRequest>,
    ) -> Result<Response<pb::OffsetFetchReply>, Status> {
        let req = request.into_inner();
        let (_, p) = self.coordinate(&req.group).await?;
        let offsets = self.with_group(p, &req.group, |g| committed_offsets(g, &req.partitions))?;
        Ok(Response::new(pb::OffsetFetchReply { offsets }))
    }

    async fn describe_group(
        &self,
        request: Request<pb::DescribeGroupRequest>,
    ) -> Result<Response<pb::DescribeGroupReply>, Status> {
        let req = request.into_inner();
        let (_, p) = self.coordinate(&req.group).await?;
        let reply = self.with_group(p, &req.group, |g| pb::DescribeGroupReply {
            group: g.name.clone(),
            state: if g.is_forgettable() {
                "Dead".to_string()
            } else {
                g.state.as_str().to_string()
            },
            protocol_type: g.protocol_type.clone(),
            protocol: g.protocol.clone(),
            generation: g.generation,
            members: g
                .members
                .values()
                .map(|m| pb::GroupMember {
                    member_id: m.id.clone(),
                    client_id: m.client_id.clone(),
                    host: m.host.clone(),
                    assignment: m.assignment.to_vec(),
                })
                .collect(),
            offsets: committed_offsets(g, &[]),
        })?;
        Ok(Response::new(reply))
    }

    async fn list_groups(
        &self,
        _request: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsReply>, Status> {
        // Load every coordinator partition this node leads, then list their groups.
        let count = self
            .partitions
            .metadata()
            .topic(OFFSETS_TOPIC)
            .ok()
            .flatten()
            .map_or(0, |t| t.partitions);
        for p in 0..count {
            let Some(replica) = self.partitions.get(OFFSETS_TOPIC, p) else {
                continue;
            };
            let Ok(leader) = replica.raft.as_leader() else {
                continue;
            };
            let leader = leader.to_committed_leader_id();
            if self.lock().get(&p).is_some_and(|v| v.leader == leader) {
                continue;
            }
            let _loading = self.loading.lock().await;
            if self.lock().get(&p).is_some_and(|v| v.leader == leader) {
                continue;
            }
            let groups = self.load(&replica, leader.term).await?;
            self.lock().insert(p, View { leader, groups });
        }
        let views = self.lock();
        let mut groups: Vec<pb::GroupListing> = views
            .values()
            .flat_map(|v| v.groups.values())
            .filter(|g| !g.is_forgettable())
            .map(|g| pb::GroupListing {
                group: g.name.clone(),
                state: g.state.as_str().to_string(),
                protocol_type: g.protocol_type.clone(),
                members: g.members.len() as u32,
            })
            .collect();
        groups.sort_by(|a, b| a.group.cmp(&b.group));
        Ok(Response::new(pb::ListGroupsReply { groups }))
    }
}

/// The group's committed offsets (all, or those of `wanted`; -1 where none).
fn committed_offsets(g: &Group, wanted: &[pb::TopicPartition]) -> Vec<pb::TopicPartitionOffset> {
    let mut out: Vec<pb::TopicPartitionOffset> = if wanted.is_empty() {
        g.offsets
            .iter()
            .map(|((t, p), c)| pb::TopicPartitionOffset {
                topic: t.clone(),
                partition: *p,
                offset: c.offset,
                metadata: c.metadata.clone(),
            })
            .collect()
    } else {
        wanted
            .iter()
            .map(|tp| {
                let c = g.offsets.get(&(tp.topic.clone(), tp.partition));
                pb::TopicPartitionOffset {
                    topic: tp.topic.clone(),
                    partition: tp.partition,
                    offset: c.map_or(-1, |c| c.offset),
                    metadata: c.map(|c| c.metadata.clone()).unwrap_or_default(),
                }
            })
            .collect()
    };
    out.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Partitions Kafka's coordinator lookup gives for these ids with 50 partitions
    /// (`Utils.abs("my-group".hashCode()) % 50`).
    #[test]
    fn coordinator_partition_matches_kafka() {
        assert_eq!(java_string_hash(""), 0);
        assert_eq!(java_string_hash("a"), 97);
        assert_eq!(java_string_hash("hello"), 99_162_322);
        assert_eq!(java_string_hash("my-group"), -1_906_497_762);
        assert_eq!(coordinator_partition("hello", 50), 99_162_322 % 50);
        assert_eq!(coordinator_partition("my-group", 50), 36);
    }
}
