//! Consumer groups (DESIGN.md §5a): the group coordinator, protocol-neutral. The gRPC
//! `Groups` service (`crate::grpc::groups`) and the Kafka front's group APIs call it.
//!
//! A group's coordinator is the leader of partition [`coordinator_partition`] of the internal
//! topic [`OFFSETS_TOPIC`] (created on first use, like Kafka's, with [`OFFSETS_PARTITIONS`]
//! partitions and replication factor min(3, nodes)). Committed offsets and each generation's
//! membership and assignment are records in that partition, written with the broker's
//! produce and read back with its fetch, keyed so that the latest record per key is the
//! state (the topic is compacted):
//!
//! * key `["offset", group, topic, partition]`, value `{"offset", "metadata", "commit_ms"}`
//!   (JSON), a tombstone once deleted;
//! * key `["group", group]`, value a [`state::GroupRecord`] (JSON), a tombstone once the group
//!   is deleted.
//!
//! The coordinator answers a group's calls only after it has read its partition from the
//! start (once per leadership, after it applied an entry of its own term, so every committed
//! record is in its view). Membership itself ([`state::Group`]) lives in memory; a member
//! that has not heard back within its session timeout is removed by the ticker, which also
//! moves rebalances on. Calls for a group go to its coordinator only; other nodes refuse
//! with `NotCoordinator` and the leader's address.

pub mod state;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::time::Instant;

use super::partitions::{Partitions, Replica};
use super::records::{ProducerRecord, batches_end, decode_batches, encode_batch};
use super::{
    Acks, Broker, BrokerError, BrokerResult, ErrorCode, FetchRequest, OFFSETS_TOPIC, ProduceRequest,
};
use state::{Committed, Group, GroupRecord};
pub use state::{
    GroupState, JoinOutcome, JoinRequest, Joined, JoinedMember, MemberRef, Protocol, SyncRequest,
    Synced,
};

/// Longest wait for a new coordinator to apply an entry of its own term before loading.
const LOAD_WAIT: Duration = Duration::from_secs(10);
/// How often the coordinator expires sessions and moves rebalances on.
const TICK: Duration = Duration::from_millis(100);
/// Longest group id.
pub const MAX_GROUP_ID: usize = 255;

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

fn refuse(code: ErrorCode, message: impl Into<String>) -> BrokerError {
    BrokerError::new(code, message)
}

fn offset_key(group: &str, topic: &str, partition: u32) -> Bytes {
    Bytes::from(serde_json::json!(["offset", group, topic, partition]).to_string())
}

fn group_key(group: &str) -> Bytes {
    Bytes::from(serde_json::json!(["group", group]).to_string())
}

/// Records that delete these keys (compaction drops them and what they replace).
fn tombstones(keys: impl IntoIterator<Item = Bytes>) -> Vec<ProducerRecord> {
    keys.into_iter()
        .map(|k| ProducerRecord {
            key: Some(k),
            value: None,
            ..ProducerRecord::default()
        })
        .collect()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// One offset to commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitOffset {
    pub topic: String,
    pub partition: u32,
    pub offset: i64,
    pub metadata: String,
}

/// A committed offset as read back (`offset` -1: nothing committed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedOffset {
    pub topic: String,
    pub partition: u32,
    pub offset: i64,
    pub metadata: String,
}

/// One member of a described group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberDescription {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub host: String,
    /// Its metadata for the group's protocol (the subscription).
    pub metadata: Bytes,
    pub assignment: Bytes,
}

/// A group as `describe` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDescription {
    pub group: String,
    /// Empty, PreparingRebalance, CompletingRebalance, Stable or Dead (nothing known).
    pub state: &'static str,
    pub protocol_type: String,
    pub protocol: String,
    pub generation: i32,
    pub members: Vec<MemberDescription>,
    pub offsets: Vec<CommittedOffset>,
}

/// A group as `list` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupListing {
    pub group: String,
    pub state: &'static str,
    pub protocol_type: String,
    pub members: u32,
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

    pub fn broker(&self) -> &Broker {
        &self.broker
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
            let changed = self.tick_views(Instant::now());
            for (p, group) in changed {
                let Some(replica) = self.partitions.get(OFFSETS_TOPIC, p) else {
                    continue;
                };
                if let Err(e) = self.persist_generation(&replica, p, &group).await {
                    tracing::warn!(group, err = %e, "cannot record the group's membership");
                }
            }
        }
    }

    /// One tick: drops the views of partitions no longer led, expires sessions, moves
    /// rebalances on; returns the groups whose record is to be written.
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
                        ErrorCode::NotCoordinator,
                        "this node no longer coordinates the group; find the new coordinator",
                    );
                }
            }
            leads
        });
        let mut changed = Vec::new();
        for (p, view) in views.iter_mut() {
            for g in view.groups.values_mut() {
                g.tick(now);
                if g.needs_record {
                    g.needs_record = false;
                    changed.push((*p, g.name.clone()));
                }
            }
            // A group whose record is still to be written stays until the next tick.
            view.groups.retain(|_, g| {
                !g.is_forgettable() || changed.iter().any(|e| e.0 == *p && e.1 == g.name)
            });
        }
        changed
    }

    /// The `__consumer_offsets` partition of `group`, checking the id.
    pub fn partition_of(&self, group: &str) -> BrokerResult<u32> {
        if group.is_empty() || group.len() > MAX_GROUP_ID {
            return Err(refuse(
                ErrorCode::InvalidGroupId,
                format!("a group id is 1 to {MAX_GROUP_ID} bytes"),
            ));
        }
        let topic = self
            .partitions
            .metadata()
            .topic(OFFSETS_TOPIC)
            .map_err(|e| BrokerError::internal("read metadata", e))?
            .ok_or_else(|| {
                refuse(
                    ErrorCode::CoordinatorNotAvailable,
                    format!("{OFFSETS_TOPIC} does not exist yet; create it first"),
                )
            })?;
        Ok(coordinator_partition(group, topic.partitions))
    }

    /// The node coordinating `group` (Kafka's FindCoordinator): the leader of its partition,
    /// from the leader directory; `__consumer_offsets` is created on first use.
    pub async fn find(&self, group: &str) -> BrokerResult<u64> {
        if self
            .partitions
            .metadata()
            .topic(OFFSETS_TOPIC)
            .ok()
            .flatten()
            .is_none()
        {
            self.broker.topics().ensure(OFFSETS_TOPIC).await?;
        }
        let p = self.partition_of(group)?;
        let view = self.broker.metadata(Some(&[OFFSETS_TOPIC.to_string()]))?;
        view.topics
            .first()
            .and_then(|t| t.partitions.iter().find(|x| x.partition == p))
            .and_then(|x| x.leader)
            .ok_or_else(|| {
                refuse(
                    ErrorCode::CoordinatorNotAvailable,
                    format!("{OFFSETS_TOPIC}/{p} has no leader right now; retry shortly"),
                )
            })
    }

    /// The replica of the group's coordinator partition, when this node leads it, with the
    /// view loaded; otherwise the refusal that sends the client on.
    async fn coordinate(&self, group: &str) -> BrokerResult<(Arc<Replica>, u32)> {
        let p = self.partition_of(group)?;
        let replica = self
            .broker
            .leader_replica(OFFSETS_TOPIC, p)
            .map_err(as_coordinator_refusal)?;
        let leader = replica
            .raft
            .as_leader()
            .map_err(|_| refuse(ErrorCode::NotCoordinator, "leadership moved; retry"))?
            .to_committed_leader_id();
        self.ensure_view(&replica, p, leader).await?;
        Ok((replica, p))
    }

    async fn ensure_view(
        &self,
        replica: &Replica,
        p: u32,
        leader: openraft::impls::leader_id_adv::LeaderId<u64, u64>,
    ) -> BrokerResult<()> {
        if self.lock().get(&p).is_some_and(|v| v.leader == leader) {
            return Ok(());
        }
        let _loading = self.loading.lock().await;
        if self.lock().get(&p).is_some_and(|v| v.leader == leader) {
            return Ok(());
        }
        let groups = self.load(replica, leader.term).await?;
        tracing::info!(
            partition = p,
            groups = groups.len(),
            "group coordinator loaded"
        );
        self.lock().insert(p, View { leader, groups });
        Ok(())
    }

    /// Reads a coordinator partition from its start: groups with their committed offsets
    /// and last recorded generation.
    async fn load(&self, replica: &Replica, term: u64) -> BrokerResult<HashMap<String, Group>> {
        let ready = replica.sm.wait_applied_term(term, LOAD_WAIT).await;
        if !ready {
            return Err(refuse(
                ErrorCode::CoordinatorLoadInProgress,
                "the coordinator is catching up; retry",
            ));
        }
        let hw = replica.sm.applied().high_watermark;
        let mut offset = replica
            .log
            .start_offset()
            .map_err(|e| BrokerError::internal("read log", e))?;
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
            let records = decode_batches(fetched.batches, OFFSETS_TOPIC, 0, offset)
                .map_err(|e| BrokerError::internal(&format!("decode {OFFSETS_TOPIC}"), e))?;
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
    async fn write(&self, replica: &Replica, records: Vec<ProducerRecord>) -> BrokerResult<()> {
        let batch = encode_batch(&records, None)
            .map_err(|e| BrokerError::internal("encode group records", e))?;
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
                ErrorCode::Internal | ErrorCode::CorruptMessage => e,
                _ => refuse(
                    ErrorCode::NotCoordinator,
                    format!(
                        "the write did not commit ({}); find the coordinator again",
                        e.message
                    ),
                ),
            })
    }

    /// Runs `f` on the loaded view of partition `p`.
    fn with_view<T>(&self, p: u32, f: impl FnOnce(&mut View) -> T) -> BrokerResult<T> {
        let mut views = self.lock();
        let view = views.get_mut(&p).ok_or_else(|| {
            refuse(
                ErrorCode::NotCoordinator,
                "this node no longer coordinates the group; retry",
            )
        })?;
        Ok(f(view))
    }

    /// Runs `f` on the group (created if missing) of a loaded view.
    fn with_group<T>(
        &self,
        p: u32,
        group: &str,
        f: impl FnOnce(&mut Group) -> T,
    ) -> BrokerResult<T> {
        self.with_view(p, |view| {
            f(view
                .groups
                .entry(group.to_string())
                .or_insert_with(|| Group::new(group, Instant::now())))
        })
    }

    /// Runs `f` on the group if the view knows it (and it is not forgettable).
    fn with_known_group<T>(
        &self,
        p: u32,
        group: &str,
        f: impl FnOnce(&mut Group) -> T,
    ) -> BrokerResult<Option<T>> {
        self.with_view(p, |view| {
            view.groups
                .get_mut(group)
                .filter(|g| !g.is_forgettable())
                .map(f)
        })
    }

    /// The group's record for the generation just synced, written and then announced.
    async fn persist_generation(&self, replica: &Replica, p: u32, group: &str) -> BrokerResult<()> {
        let rec = self.with_group(p, group, |g| g.record())?;
        let value =
            serde_json::to_vec(&rec).map_err(|e| BrokerError::internal("encode group", e))?;
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

    /// A member joins; answers when the rebalance completes (or at once, see
    /// [`JoinOutcome`]).
    pub async fn join(&self, req: JoinRequest) -> BrokerResult<JoinOutcome> {
        let (_, p) = self.coordinate(&req.group).await?;
        let now = Instant::now();
        match self.with_group(p, &req.group, |g| g.join(&req, now))?? {
            Ok(outcome) => Ok(outcome),
            Err(rx) => wait(rx).await.map(JoinOutcome::Joined),
        }
    }

    /// A member syncs: the leader hands in everyone's assignment; every member gets its own
    /// once the generation is recorded.
    pub async fn sync(&self, req: SyncRequest) -> BrokerResult<Synced> {
        let (replica, p) = self.coordinate(&req.group).await?;
        let mut wake = Vec::new();
        let outcome =
            self.with_group(p, &req.group, |g| g.sync(&req, Instant::now(), &mut wake))??;
        if !wake.is_empty() {
            // The leader's assignment: recorded before anyone is told.
            let written = self.persist_generation(&replica, p, &req.group).await;
            for (w, assignment) in wake {
                let _ = w.send(match &written {
                    Ok(()) => Ok(assignment),
                    Err(e) => Err(refuse(ErrorCode::RebalanceInProgress, e.message.clone())),
                });
            }
        }
        let assignment = match outcome {
            Ok(a) => a,
            Err(rx) => wait(rx).await?,
        };
        let (protocol_type, protocol) = self.with_group(p, &req.group, |g| {
            (g.protocol_type.clone(), g.protocol.clone())
        })?;
        Ok(Synced {
            protocol_type,
            protocol,
            assignment,
        })
    }

    pub async fn heartbeat(&self, group: &str, who: &MemberRef) -> BrokerResult<()> {
        let (_, p) = self.coordinate(group).await?;
        self.with_group(p, group, |g| g.heartbeat(who, Instant::now()))?
    }

    /// Members leave, each by member id or (static members) instance id; one answer per
    /// member. The outer error is the coordinator's (not here, loading).
    pub async fn leave(
        &self,
        group: &str,
        members: &[(String, Option<String>)],
    ) -> BrokerResult<Vec<BrokerResult<()>>> {
        let (_, p) = self.coordinate(group).await?;
        let now = Instant::now();
        self.with_group(p, group, |g| {
            members
                .iter()
                .map(|(id, instance)| g.leave(id, instance.as_deref(), now))
                .collect()
        })
    }

    /// Commits offsets for a member of the current generation, or from outside the group
    /// (generation -1, no member id) while it has no members.
    pub async fn commit(
        &self,
        group: &str,
        who: &MemberRef,
        offsets: &[CommitOffset],
    ) -> BrokerResult<()> {
        if let Some(bad) = offsets.iter().find(|o| o.offset < 0 || o.topic.is_empty()) {
            return Err(refuse(
                ErrorCode::InvalidRequest,
                format!(
                    "cannot commit offset {} for {:?}/{}",
                    bad.offset, bad.topic, bad.partition
                ),
            ));
        }
        let (replica, p) = self.coordinate(group).await?;
        self.with_group(p, group, |g| g.may_commit(who, Instant::now()))??;
        let commit_ms = now_ms();
        let committed = |o: &CommitOffset| Committed {
            offset: o.offset,
            metadata: o.metadata.clone(),
            commit_ms,
        };
        let mut records = Vec::with_capacity(offsets.len());
        for o in offsets {
            let value = serde_json::to_vec(&committed(o))
                .map_err(|e| BrokerError::internal("encode offset", e))?;
            records.push(ProducerRecord {
                key: Some(offset_key(group, &o.topic, o.partition)),
                value: Some(Bytes::from(value)),
                ..ProducerRecord::default()
            });
        }
        self.write(&replica, records).await?;
        self.with_group(p, group, |g| {
            for o in offsets {
                g.offsets
                    .insert((o.topic.clone(), o.partition), committed(o));
            }
        })
    }

    /// The group's committed offsets: all (`None`) or those asked for (-1 where none).
    pub async fn offsets(
        &self,
        group: &str,
        partitions: Option<&[(String, u32)]>,
    ) -> BrokerResult<Vec<CommittedOffset>> {
        let (_, p) = self.coordinate(group).await?;
        Ok(self
            .with_known_group(p, group, |g| committed_offsets(g, partitions))?
            .unwrap_or_else(|| committed_offsets(&Group::new(group, Instant::now()), partitions)))
    }

    pub async fn describe(&self, group: &str) -> BrokerResult<GroupDescription> {
        let (_, p) = self.coordinate(group).await?;
        let described = self.with_known_group(p, group, |g| GroupDescription {
            group: g.name.clone(),
            state: g.state_name(),
            protocol_type: g.protocol_type.clone(),
            protocol: g.protocol.clone(),
            generation: g.generation,
            members: g
                .members
                .values()
                .map(|m| MemberDescription {
                    member_id: m.id.clone(),
                    instance_id: m.instance_id.clone(),
                    client_id: m.client_id.clone(),
                    host: m.host.clone(),
                    metadata: m.metadata(&g.protocol),
                    assignment: m.assignment.clone(),
                })
                .collect(),
            offsets: committed_offsets(g, None),
        })?;
        Ok(described.unwrap_or_else(|| GroupDescription {
            group: group.to_string(),
            state: "Dead",
            protocol_type: String::new(),
            protocol: String::new(),
            generation: 0,
            members: Vec::new(),
            offsets: Vec::new(),
        }))
    }

    /// The groups this node coordinates (every coordinator partition it leads is loaded
    /// first), sorted by name.
    pub async fn list(&self) -> BrokerResult<Vec<GroupListing>> {
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
            self.ensure_view(&replica, p, leader).await?;
        }
        let views = self.lock();
        let mut groups: Vec<GroupListing> = views
            .values()
            .flat_map(|v| v.groups.values())
            .filter(|g| !g.is_forgettable())
            .map(|g| GroupListing {
                group: g.name.clone(),
                state: g.state.as_str(),
                protocol_type: g.protocol_type.clone(),
                members: g.members.len() as u32,
            })
            .collect();
        groups.sort_by(|a, b| a.group.cmp(&b.group));
        Ok(groups)
    }

    /// Deletes a group without members: its offsets and its record (tombstones).
    pub async fn delete(&self, group: &str) -> BrokerResult<()> {
        let (replica, p) = self.coordinate(group).await?;
        let keys = self
            .with_known_group(p, group, |g| {
                if !g.members.is_empty() {
                    return Err(refuse(
                        ErrorCode::NonEmptyGroup,
                        format!("group {group} has active members"),
                    ));
                }
                let mut keys: Vec<Bytes> = g
                    .offsets
                    .keys()
                    .map(|(t, part)| offset_key(group, t, *part))
                    .collect();
                keys.push(group_key(group));
                Ok(keys)
            })?
            .ok_or_else(|| {
                refuse(
                    ErrorCode::GroupIdNotFound,
                    format!("group {group} does not exist"),
                )
            })??;
        self.write(&replica, tombstones(keys)).await?;
        let mut views = self.lock();
        if let Some(view) = views.get_mut(&p)
            && view.groups.get(group).is_some_and(|g| g.members.is_empty())
        {
            view.groups.remove(group);
        }
        Ok(())
    }

    /// Deletes committed offsets of some partitions; refused per partition whose topic the
    /// group's members are subscribed to. The outer error is for the whole group.
    pub async fn delete_offsets(
        &self,
        group: &str,
        partitions: &[(String, u32)],
    ) -> BrokerResult<Vec<BrokerResult<()>>> {
        let (replica, p) = self.coordinate(group).await?;
        let (answers, keys) = self
            .with_known_group(p, group, |g| {
                let subscribed = subscribed_topics(g);
                let mut keys = Vec::new();
                let answers: Vec<BrokerResult<()>> = partitions
                    .iter()
                    .map(|(t, part)| {
                        if subscribed.iter().any(|s| s == t) {
                            return Err(refuse(
                                ErrorCode::GroupSubscribedToTopic,
                                format!("members of {group} are subscribed to {t}"),
                            ));
                        }
                        if g.offsets.contains_key(&(t.clone(), *part)) {
                            keys.push((t.clone(), *part));
                        }
                        Ok(())
                    })
                    .collect();
                (answers, keys)
            })?
            .ok_or_else(|| {
                refuse(
                    ErrorCode::GroupIdNotFound,
                    format!("group {group} does not exist"),
                )
            })?;
        if !keys.is_empty() {
            let deleted = keys.iter().map(|(t, part)| offset_key(group, t, *part));
            self.write(&replica, tombstones(deleted)).await?;
            self.with_group(p, group, |g| {
                for k in &keys {
                    g.offsets.remove(k);
                }
            })?;
        }
        Ok(answers)
    }
}

/// The topics a `consumer` group's members subscribe to, from their subscriptions (Kafka's
/// `ConsumerProtocolSubscription`: version, then the topics array; read defensively, a
/// malformed one counts as none).
fn subscribed_topics(g: &Group) -> Vec<String> {
    if g.protocol_type != "consumer" {
        return Vec::new();
    }
    let mut topics = Vec::new();
    for m in g.members.values() {
        let mut b = m.metadata(&g.protocol);
        if b.remaining() < 6 {
            continue;
        }
        let _version = b.get_i16();
        let count = b.get_i32();
        for _ in 0..count.max(0) {
            if b.remaining() < 2 {
                break;
            }
            let len = b.get_i16();
            if len < 0 || b.remaining() < len as usize {
                break;
            }
            let name = b.split_to(len as usize);
            topics.push(String::from_utf8_lossy(&name).to_string());
        }
    }
    topics.sort();
    topics.dedup();
    topics
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
        Some("group") => match value {
            Some(v) => {
                if let Ok(rec) = serde_json::from_slice::<GroupRecord>(v) {
                    g.restore(rec, now);
                }
            }
            // Deleted: nothing of it remains (its offsets have tombstones too).
            None => *g = Group::new(group, now),
        },
        _ => {}
    }
}

/// A broker refusal for the coordinator partition, in the coordinator's terms (the redirect
/// is kept: it names the node that coordinates).
fn as_coordinator_refusal(e: BrokerError) -> BrokerError {
    let code = match e.code {
        ErrorCode::NotLeader | ErrorCode::NotReplica => ErrorCode::NotCoordinator,
        ErrorCode::LeaderNotAvailable => ErrorCode::CoordinatorLoadInProgress,
        ErrorCode::UnknownTopicOrPartition => ErrorCode::CoordinatorNotAvailable,
        _ => ErrorCode::Internal,
    };
    BrokerError {
        code,
        message: e.message,
        redirect: e.redirect,
    }
}

async fn wait<T>(rx: tokio::sync::oneshot::Receiver<BrokerResult<T>>) -> BrokerResult<T> {
    match rx.await {
        Ok(r) => r,
        Err(_) => Err(refuse(
            ErrorCode::RebalanceInProgress,
            "superseded by a newer request of the same member; rejoin",
        )),
    }
}

/// The group's committed offsets (all, or those of `wanted`; -1 where none), sorted.
fn committed_offsets(g: &Group, wanted: Option<&[(String, u32)]>) -> Vec<CommittedOffset> {
    let mut out: Vec<CommittedOffset> = match wanted {
        None => g
            .offsets
            .iter()
            .map(|((t, p), c)| CommittedOffset {
                topic: t.clone(),
                partition: *p,
                offset: c.offset,
                metadata: c.metadata.clone(),
            })
            .collect(),
        Some(wanted) => wanted
            .iter()
            .map(|(t, p)| {
                let c = g.offsets.get(&(t.clone(), *p));
                CommittedOffset {
                    topic: t.clone(),
                    partition: *p,
                    offset: c.map_or(-1, |c| c.offset),
                    metadata: c.map(|c| c.metadata.clone()).unwrap_or_default(),
                }
            })
            .collect(),
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

    #[test]
    fn subscriptions_are_read_defensively() {
        let now = Instant::now();
        let mut g = Group::new("g", now);
        g.protocol_type = "consumer".into();
        g.protocol = "range".into();
        let mut sub = vec![0u8, 1, 0, 0, 0, 2, 0, 1, b'a', 0, 2, b'b', b'c'];
        sub.extend_from_slice(&[0, 0, 0, 0]);
        let bogus = vec![0u8, 1, 0x7f, 0xff, 0xff, 0xff, 0x7f, 0xff];
        for (i, metadata) in [sub, bogus].into_iter().enumerate() {
            let req = JoinRequest {
                group: "g".into(),
                member_id: String::new(),
                instance_id: None,
                protocol_type: "consumer".into(),
                protocols: vec![Protocol {
                    name: "range".into(),
                    metadata: Bytes::from(metadata),
                }],
                session_timeout: Duration::from_secs(10),
                rebalance_timeout: Duration::from_secs(10),
                client_id: format!("c{i}"),
                host: String::new(),
                require_member_id: false,
            };
            let _ = g.join(&req, now).expect("join");
        }
        assert_eq!(
            subscribed_topics(&g),
            vec!["a".to_string(), "bc".to_string()]
        );
    }
}
