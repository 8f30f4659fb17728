//! `MetaStateMachine`: the metadata group's state, kept in the metadata store (RocksDB).
//!
//! Keys in the `state` column family: `sm/applied` (last applied log id), `sm/membership`
//! (last applied membership), `sm/snapshot` (the current snapshot: meta and data), and the
//! records `rec/node/<id:020>` (the members, following the Raft membership),
//! `rec/removed/<id:020>` (removed members), `rec/topic/<name>`,
//! `rec/assign/<topic>/<partition:010>`, each a JSON value. Applying one entry is one atomic write batch (records + applied id), so the
//! state always corresponds to exactly one applied log id. Apply is not synced: after a crash
//! the state may be behind the log and openraft re-applies from the committed id.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Cursor};
use std::sync::Arc;

use aqueduct_storage::meta::{CF_STATE, MetaStore, MetaWriteBatch};
use futures_util::StreamExt;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, Snapshot, SnapshotMeta};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::family::{Changed, Family, Txn, View};
use crate::io_err;
use crate::types::{
    GroupCommand, GroupResponse, GroupTypeConfig, LogId, MAX_PRODUCER_ID_BLOCK, MetaCommand,
    MetaErrorCode, MetaResponse, StoredMembership, topic_name_problem, topic_shape_problem,
};

const APPLIED: &[u8] = b"sm/applied";
const MEMBERSHIP: &[u8] = b"sm/membership";
const SNAPSHOT: &[u8] = b"sm/snapshot";
const RECORDS: &[u8] = b"rec/";

type MetaSnapshotMeta = SnapshotMeta<
    openraft::impls::leader_id_adv::LeaderId<u64, u64>,
    u64,
    openraft::impls::BasicNode,
>;
type MetaSnapshot = Snapshot<
    openraft::impls::leader_id_adv::LeaderId<u64, u64>,
    u64,
    openraft::impls::BasicNode,
    Cursor<Vec<u8>>,
>;

/// A registered node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node_id: u64,
    pub addr: String,
}

/// A topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicRecord {
    pub name: String,
    pub partitions: u32,
    pub replication_factor: u16,
    pub configs: BTreeMap<String, String>,
    /// The id of the request that created it (0: none), so that its retry is recognised.
    #[serde(default)]
    pub request_id: u64,
    /// The metadata-log index that created it: tells a topic from an earlier one of the same
    /// name (a deleted and recreated topic is a new topic with new partition groups).
    #[serde(default)]
    pub id: u64,
    /// The integration application that owns the topic.
    #[serde(default = "crate::types::default_application")]
    pub application: String,
}

/// A deleted topic (`rec/deleted/<name>/<id:020>`), so that replicas of it left on a node that
/// was down during the deletion are recognised and removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeletedTopic {
    pub name: String,
    pub id: u64,
    pub partitions: u32,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: MetaSnapshotMeta,
    data: Vec<u8>,
}

fn node_key(id: u64) -> Vec<u8> {
    format!("rec/node/{id:020}").into_bytes()
}

fn removed_key(id: u64) -> Vec<u8> {
    format!("rec/removed/{id:020}").into_bytes()
}

fn topic_key(name: &str) -> Vec<u8> {
    format!("rec/topic/{name}").into_bytes()
}

fn assign_prefix(topic: &str) -> Vec<u8> {
    format!("rec/assign/{topic}/").into_bytes()
}

/// The cluster's id (see `MetaCommand::InitCluster`).
const CLUSTER_ID: &[u8] = b"rec/cluster/id";

/// The next producer id not yet handed out.
const NEXT_PRODUCER_ID: &[u8] = b"rec/producer-ids/next";

fn assign_key(topic: &str, partition: u32) -> Vec<u8> {
    format!("rec/assign/{topic}/{partition:010}").into_bytes()
}

fn moving_prefix(topic: &str) -> Vec<u8> {
    format!("rec/moving/{topic}/").into_bytes()
}

/// The previous replicas of a partition that is moving (see `MetaCommand::AssignReplicas`).
fn moving_key(topic: &str, partition: u32) -> Vec<u8> {
    format!("rec/moving/{topic}/{partition:010}").into_bytes()
}

/// The metadata state machine (cheap to clone: clones share the store, the registered
/// families and the change feed).
#[derive(Clone)]
pub struct MetaStateMachine {
    meta: Arc<dyn MetaStore>,
    families: Arc<BTreeMap<&'static str, Arc<dyn Family>>>,
    changes: tokio::sync::broadcast::Sender<Changed>,
}

impl std::fmt::Debug for MetaStateMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaStateMachine")
            .field("families", &self.families.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Changes the feed holds for a receiver that has not caught up; one that falls further
/// behind gets `Lagged` and must re-read the families it follows.
const CHANGE_FEED: usize = 4096;

impl MetaStateMachine {
    pub fn new(meta: Arc<dyn MetaStore>) -> Self {
        Self {
            meta,
            families: Arc::default(),
            changes: tokio::sync::broadcast::channel(CHANGE_FEED).0,
        }
    }

    /// Registers a resource family (before the state machine is handed to Raft). Every node
    /// registers the same families: a command of an unknown family is refused everywhere.
    pub fn with_family(mut self, family: Arc<dyn Family>) -> Self {
        Arc::make_mut(&mut self.families).insert(family.name(), family);
        self
    }

    /// Read access to `family`'s applied records on this node.
    pub fn family<'a>(&'a self, family: &'a str) -> View<'a> {
        View::new(family, &*self.meta)
    }

    /// Announcements of the families' records changed by entries applied from now on.
    pub fn changes(&self) -> tokio::sync::broadcast::Receiver<Changed> {
        self.changes.subscribe()
    }

    fn get_json<T: DeserializeOwned>(&self, key: &[u8]) -> io::Result<Option<T>> {
        match self.meta.get(CF_STATE, key).map_err(io_err)? {
            Some(v) => serde_json::from_slice(&v).map(Some).map_err(io_err),
            None => Ok(None),
        }
    }

    /// A topic, if it exists.
    pub fn topic(&self, name: &str) -> io::Result<Option<TopicRecord>> {
        self.get_json(&topic_key(name))
    }

    /// A node, if it is registered.
    /// The cluster's id, once the metadata leader has named it.
    pub fn cluster_id(&self) -> io::Result<Option<String>> {
        self.get_json(CLUSTER_ID)
    }

    pub fn node(&self, id: u64) -> io::Result<Option<NodeRecord>> {
        self.get_json(&node_key(id))
    }

    /// A node that was a member and was removed (and has not rejoined), if any.
    pub fn removed_node(&self, id: u64) -> io::Result<Option<NodeRecord>> {
        self.get_json(&removed_key(id))
    }

    /// All registered nodes, by id.
    pub fn nodes(&self) -> io::Result<Vec<NodeRecord>> {
        self.meta
            .scan_prefix(CF_STATE, b"rec/node/", usize::MAX)
            .map_err(io_err)?
            .into_iter()
            .map(|(_, v)| serde_json::from_slice(&v).map_err(io_err))
            .collect()
    }

    /// The replicas of a partition, if assigned.
    pub fn replicas(&self, topic: &str, partition: u32) -> io::Result<Option<Vec<u64>>> {
        self.get_json(&assign_key(topic, partition))
    }

    /// The replicas a moving partition had before its current assignment (`None`: it is not
    /// moving).
    pub fn moving_from(&self, topic: &str, partition: u32) -> io::Result<Option<Vec<u64>>> {
        self.get_json(&moving_key(topic, partition))
    }

    /// Every record, for comparing replicas' states.
    pub fn records(&self) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.meta
            .scan_prefix(CF_STATE, RECORDS, usize::MAX)
            .map_err(io_err)
    }

    /// Topics deleted so far (tombstones), oldest first per name.
    pub fn deleted_topics(&self) -> io::Result<Vec<DeletedTopic>> {
        self.meta
            .scan_prefix(CF_STATE, b"rec/deleted/", usize::MAX)
            .map_err(io_err)?
            .into_iter()
            .map(|(_, v)| serde_json::from_slice(&v).map_err(io_err))
            .collect()
    }

    /// All topics, by name.
    pub fn topics(&self) -> io::Result<Vec<TopicRecord>> {
        self.meta
            .scan_prefix(CF_STATE, b"rec/topic/", usize::MAX)
            .map_err(io_err)?
            .into_iter()
            .map(|(_, v)| serde_json::from_slice(&v).map_err(io_err))
            .collect()
    }

    /// The number of records and a CRC-32C over all of them (each key and value preceded by
    /// its length, in key order): equal on replicas that applied the same log prefix.
    pub fn checksum(&self) -> io::Result<(u64, u32)> {
        let records = self.records()?;
        let mut crc = 0u32;
        for (k, v) in &records {
            for part in [k, v] {
                crc = crc32c::crc32c_append(crc, &(part.len() as u64).to_le_bytes());
                crc = crc32c::crc32c_append(crc, part);
            }
        }
        Ok((records.len() as u64, crc))
    }

    /// The last applied log id, as stored.
    pub fn applied(&self) -> io::Result<Option<LogId>> {
        self.get_json(APPLIED)
    }

    fn put<T: Serialize>(batch: &mut MetaWriteBatch, key: &[u8], value: &T) -> io::Result<()> {
        batch.put(
            CF_STATE,
            key.to_vec(),
            serde_json::to_vec(value).map_err(io_err)?,
        );
        Ok(())
    }

    /// Applies one command into `batch`, reading the state as of the previous entry.
    fn apply_command(
        &self,
        index: u64,
        cmd: &MetaCommand,
        batch: &mut MetaWriteBatch,
        changed: &mut Vec<Changed>,
    ) -> io::Result<MetaResponse> {
        let reject = |code, message: String| Ok(MetaResponse::Rejected { code, message });
        match cmd {
            MetaCommand::RegisterNode { node_id, addr } => {
                Self::put(
                    batch,
                    &node_key(*node_id),
                    &NodeRecord {
                        node_id: *node_id,
                        addr: addr.clone(),
                    },
                )?;
            }
            MetaCommand::RemoveNode { node_id } => {
                if self.node(*node_id)?.is_none() {
                    return reject(
                        MetaErrorCode::UnknownNode,
                        format!("node {node_id} is not registered"),
                    );
                }
                batch.delete(CF_STATE, node_key(*node_id));
            }
            MetaCommand::CreateTopic {
                name,
                partitions,
                replication_factor,
                configs,
                assignment,
                request_id,
                application,
            } => {
                if let Some(problem) = topic_name_problem(name, true) {
                    return reject(MetaErrorCode::InvalidTopicName, problem);
                }
                if let Some(existing) = self.topic(name)? {
                    if *request_id != 0 && existing.request_id == *request_id {
                        // The retry of a request that already created it.
                        return Ok(MetaResponse::Ok);
                    }
                    return reject(
                        MetaErrorCode::TopicExists,
                        format!("topic {name} already exists"),
                    );
                }
                if let Some(problem) =
                    topic_shape_problem(*partitions, u64::from(*replication_factor))
                {
                    return reject(MetaErrorCode::InvalidPartition, problem);
                }
                if !assignment.is_empty() {
                    if assignment.len() != *partitions as usize {
                        return reject(
                            MetaErrorCode::InvalidPartition,
                            format!(
                                "assignment names {} partitions, the topic has {partitions}",
                                assignment.len()
                            ),
                        );
                    }
                    for replicas in assignment {
                        let distinct: std::collections::BTreeSet<_> = replicas.iter().collect();
                        if replicas.len() != usize::from(*replication_factor)
                            || distinct.len() != replicas.len()
                        {
                            return reject(
                                MetaErrorCode::InvalidReplicationFactor,
                                format!(
                                    "replicas {replicas:?} are not {replication_factor} distinct nodes"
                                ),
                            );
                        }
                    }
                }
                let rec = TopicRecord {
                    name: name.clone(),
                    partitions: *partitions,
                    replication_factor: *replication_factor,
                    configs: configs.clone(),
                    request_id: *request_id,
                    id: index,
                    application: application.clone(),
                };
                Self::put(batch, &topic_key(name), &rec)?;
                for (p, replicas) in assignment.iter().enumerate() {
                    Self::put(batch, &assign_key(name, p as u32), replicas)?;
                }
            }
            MetaCommand::AddPartitions { name, assignment } => {
                let Some(mut rec) = self.topic(name)? else {
                    return reject(
                        MetaErrorCode::UnknownTopic,
                        format!("topic {name} does not exist"),
                    );
                };
                let total = rec.partitions as usize + assignment.len();
                if assignment.is_empty() {
                    return reject(
                        MetaErrorCode::InvalidPartition,
                        format!("topic {name} already has {} partitions", rec.partitions),
                    );
                }
                if let Some(problem) =
                    topic_shape_problem(total as u32, u64::from(rec.replication_factor))
                {
                    return reject(MetaErrorCode::InvalidPartition, problem);
                }
                for replicas in assignment {
                    let distinct: std::collections::BTreeSet<_> = replicas.iter().collect();
                    if replicas.is_empty() || distinct.len() != replicas.len() {
                        return reject(
                            MetaErrorCode::InvalidReplicationFactor,
                            format!("replicas {replicas:?} are not distinct nodes"),
                        );
                    }
                }
                for (i, replicas) in assignment.iter().enumerate() {
                    let p = rec.partitions + i as u32;
                    Self::put(batch, &assign_key(name, p), replicas)?;
                }
                rec.partitions = total as u32;
                Self::put(batch, &topic_key(name), &rec)?;
            }
            MetaCommand::DeleteTopic { name } => {
                let Some(rec) = self.topic(name)? else {
                    return reject(
                        MetaErrorCode::UnknownTopic,
                        format!("topic {name} does not exist"),
                    );
                };
                batch.delete(CF_STATE, topic_key(name));
                Self::put(
                    batch,
                    format!("rec/deleted/{name}/{:020}", rec.id).as_bytes(),
                    &DeletedTopic {
                        name: name.clone(),
                        id: rec.id,
                        partitions: rec.partitions,
                    },
                )?;
                for prefix in [assign_prefix(name), moving_prefix(name)] {
                    for (k, _) in self
                        .meta
                        .scan_prefix(CF_STATE, &prefix, usize::MAX)
                        .map_err(io_err)?
                    {
                        batch.delete(CF_STATE, k);
                    }
                }
            }
            MetaCommand::AlterTopicConfigs { name, set, delete } => {
                let Some(mut rec) = self.topic(name)? else {
                    return reject(
                        MetaErrorCode::UnknownTopic,
                        format!("topic {name} does not exist"),
                    );
                };
                for k in delete {
                    rec.configs.remove(k);
                }
                rec.configs
                    .extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
                Self::put(batch, &topic_key(name), &rec)?;
            }
            MetaCommand::SetTopicConfig { name, key, value } => {
                let Some(mut rec) = self.topic(name)? else {
                    return reject(
                        MetaErrorCode::UnknownTopic,
                        format!("topic {name} does not exist"),
                    );
                };
                match value {
                    Some(v) => rec.configs.insert(key.clone(), v.clone()),
                    None => rec.configs.remove(key),
                };
                Self::put(batch, &topic_key(name), &rec)?;
            }
            MetaCommand::AssignReplicas {
                topic,
                partition,
                replicas,
            } => {
                let Some(rec) = self.topic(topic)? else {
                    return reject(
                        MetaErrorCode::UnknownTopic,
                        format!("topic {topic} does not exist"),
                    );
                };
                if *partition >= rec.partitions {
                    return reject(
                        MetaErrorCode::InvalidPartition,
                        format!(
                            "topic {topic} has {} partitions, not {}",
                            rec.partitions,
                            partition + 1
                        ),
                    );
                }
                let distinct: BTreeSet<u64> = replicas.iter().copied().collect();
                if replicas.is_empty() || distinct.len() != replicas.len() {
                    return reject(
                        MetaErrorCode::InvalidRequest,
                        format!("replicas {replicas:?} must be distinct and not empty"),
                    );
                }
                for id in replicas {
                    if self.node(*id)?.is_none() {
                        return reject(
                            MetaErrorCode::UnknownNode,
                            format!("node {id} is not a member of the cluster"),
                        );
                    }
                }
                let current: Vec<u64> = self.replicas(topic, *partition)?.unwrap_or_default();
                if self.moving_from(topic, *partition)?.is_some() {
                    if current == *replicas {
                        return Ok(MetaResponse::Ok);
                    }
                    return reject(
                        MetaErrorCode::ReassignmentInProgress,
                        format!(
                            "{topic}/{partition} is moving to {current:?}; retry when it is done"
                        ),
                    );
                }
                let before: BTreeSet<u64> = current.iter().copied().collect();
                if before != distinct {
                    Self::put(batch, &moving_key(topic, *partition), &current)?;
                }
                Self::put(batch, &assign_key(topic, *partition), replicas)?;
            }
            MetaCommand::ReassignmentDone {
                topic,
                partition,
                replicas,
            } => {
                if self.replicas(topic, *partition)?.as_ref() == Some(replicas) {
                    batch.delete(CF_STATE, moving_key(topic, *partition));
                }
            }
            MetaCommand::AllocateProducerIds { count } => {
                if *count == 0 || *count > MAX_PRODUCER_ID_BLOCK {
                    return reject(
                        MetaErrorCode::InvalidRequest,
                        format!("allocate 1 to {MAX_PRODUCER_ID_BLOCK} producer ids, not {count}"),
                    );
                }
                let first: i64 = self.get_json(NEXT_PRODUCER_ID)?.unwrap_or(0);
                Self::put(batch, NEXT_PRODUCER_ID, &(first + i64::from(*count)))?;
                return Ok(MetaResponse::ProducerIds {
                    first,
                    count: *count,
                });
            }
            MetaCommand::InitCluster { id } => {
                if self.cluster_id()?.is_none() {
                    Self::put(batch, CLUSTER_ID, id)?;
                }
            }
            MetaCommand::Family { family, command } => {
                let Some(handler) = self.families.get(family.as_str()) else {
                    return reject(
                        MetaErrorCode::InvalidRequest,
                        format!("no resource family {family:?} on this node"),
                    );
                };
                // A refusal writes nothing: the family writes into a batch of its own.
                let mut own = MetaWriteBatch::new();
                let mut txn = Txn::new(index, handler.name(), &*self.meta, &mut own);
                let response = handler.apply(&mut txn, command)?;
                let keys = txn.into_changed();
                if !matches!(response, MetaResponse::Rejected { .. }) {
                    batch.extend(own);
                    if !keys.is_empty() {
                        changed.push(Changed {
                            family: family.clone(),
                            keys: Some(keys),
                        });
                    }
                }
                return Ok(response);
            }
        }
        Ok(MetaResponse::Ok)
    }

    /// Writes one applied entry's batch, then announces what families it changed.
    fn commit(&self, batch: MetaWriteBatch, changed: Vec<Changed>) -> io::Result<()> {
        self.meta.write(batch, false).map_err(io_err)?;
        for c in changed {
            // Nobody listening is fine.
            let _ = self.changes.send(c);
        }
        Ok(())
    }

    fn current_snapshot(&self) -> io::Result<Option<StoredSnapshot>> {
        self.get_json(SNAPSHOT)
    }
}

impl RaftSnapshotBuilder<GroupTypeConfig> for MetaStateMachine {
    type SnapshotData = Cursor<Vec<u8>>;

    /// A point-in-time export of every record with the applied id and membership it reflects;
    /// it also becomes the current snapshot.
    async fn build_snapshot(&mut self) -> Result<MetaSnapshot, io::Error> {
        let (last_log_id, last_membership) = self.applied_state().await?;
        let data = serde_json::to_vec(&self.records()?).map_err(io_err)?;
        let meta = MetaSnapshotMeta {
            last_log_id,
            last_membership,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        let v = serde_json::to_vec(&stored).map_err(io_err)?;
        self.meta
            .put(CF_STATE, SNAPSHOT, &v, true)
            .map_err(io_err)?;
        Ok(Snapshot {
            meta,
            snapshot: Cursor::new(data),
        })
    }
}

impl RaftStateMachine<GroupTypeConfig> for MetaStateMachine {
    type SnapshotData = Cursor<Vec<u8>>;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let applied: Option<LogId> = self.get_json(APPLIED)?;
        let membership: StoredMembership = self.get_json(MEMBERSHIP)?.unwrap_or_default();
        Ok((applied, membership))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: futures_util::Stream<Item = Result<EntryResponder<GroupTypeConfig>, io::Error>>
            + Unpin
            + OptionalSend,
    {
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let mut batch = MetaWriteBatch::new();
            let mut changed = Vec::new();
            Self::put(&mut batch, APPLIED, &entry.log_id)?;
            let response = match &entry.payload {
                EntryPayload::Blank => GroupResponse::Meta(MetaResponse::Ok),
                EntryPayload::Normal(GroupCommand::Meta(cmd)) => GroupResponse::Meta(
                    self.apply_command(entry.log_id.index, cmd, &mut batch, &mut changed)?,
                ),
                EntryPayload::Normal(
                    GroupCommand::Records(_)
                    | GroupCommand::Retain { .. }
                    | GroupCommand::Compact { .. }
                    | GroupCommand::DeleteRecords { .. },
                ) => GroupResponse::WrongGroup,
                EntryPayload::Membership(m) => {
                    let stored = StoredMembership::new(Some(entry.log_id), m.clone());
                    Self::put(&mut batch, MEMBERSHIP, &stored)?;
                    // The node registry follows the membership: members are registered with
                    // their addresses, nodes no longer in it are gone.
                    // A removed node leaves a tombstone, so that removing it again (a retry)
                    // is recognised; rejoining clears it.
                    for old in self.nodes()? {
                        if m.get_node(&old.node_id).is_none() {
                            batch.delete(CF_STATE, node_key(old.node_id));
                            Self::put(&mut batch, &removed_key(old.node_id), &old)?;
                        }
                    }
                    for (id, node) in m.nodes() {
                        let rec = NodeRecord {
                            node_id: *id,
                            addr: node.addr.clone(),
                        };
                        if self.node(*id)?.as_ref() != Some(&rec) {
                            Self::put(&mut batch, &node_key(*id), &rec)?;
                            batch.delete(CF_STATE, removed_key(*id));
                        }
                    }
                    GroupResponse::Meta(MetaResponse::Ok)
                }
            };
            self.commit(batch, changed)?;
            if let Some(r) = responder {
                r.send(response);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    /// Replaces the whole state with the snapshot's, atomically and durably.
    async fn install_snapshot(
        &mut self,
        meta: &MetaSnapshotMeta,
        snapshot: Cursor<Vec<u8>>,
    ) -> Result<(), io::Error> {
        let data = snapshot.into_inner();
        let records: Vec<(Vec<u8>, Vec<u8>)> = serde_json::from_slice(&data).map_err(io_err)?;
        let mut batch = MetaWriteBatch::new();
        for (k, _) in self.records()? {
            batch.delete(CF_STATE, k);
        }
        for (k, v) in records {
            if !k.starts_with(RECORDS) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "snapshot holds a key outside the records",
                ));
            }
            batch.put(CF_STATE, k, v);
        }
        Self::put(&mut batch, APPLIED, &meta.last_log_id)?;
        Self::put(&mut batch, MEMBERSHIP, &meta.last_membership)?;
        Self::put(
            &mut batch,
            SNAPSHOT,
            &StoredSnapshot {
                meta: meta.clone(),
                data,
            },
        )?;
        self.meta.write(batch, true).map_err(io_err)?;
        for family in self.families.keys() {
            let _ = self.changes.send(Changed {
                family: family.to_string(),
                keys: None,
            });
        }
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<MetaSnapshot>, io::Error> {
        Ok(self.current_snapshot()?.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Cursor::new(s.data),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use aqueduct_storage::meta::WELL_KNOWN_CFS;
    use aqueduct_storage::meta::memory::MemoryMetaStore;

    use super::*;

    fn apply(sm: &MetaStateMachine, index: u64, cmd: MetaCommand) -> MetaResponse {
        let mut batch = MetaWriteBatch::new();
        let mut changed = Vec::new();
        let r = sm
            .apply_command(index, &cmd, &mut batch, &mut changed)
            .expect("apply");
        sm.commit(batch, changed).expect("write");
        r
    }

    /// A family for the tests: `{"add": {"key": k, "n": n}}` adds n to a counter record and
    /// refuses a result below zero, after writing it (so a refusal must discard the write).
    struct Counters;

    impl Family for Counters {
        fn name(&self) -> &'static str {
            "counters"
        }

        fn apply(
            &self,
            txn: &mut Txn<'_>,
            command: &serde_json::Value,
        ) -> io::Result<MetaResponse> {
            let key = command["add"]["key"].as_str().unwrap_or("").to_string();
            let n = command["add"]["n"].as_i64().unwrap_or(0);
            let now: i64 = txn.get(&key)?.unwrap_or(0);
            txn.put(&key, &(now + n))?;
            if now + n < 0 {
                return Ok(MetaResponse::Rejected {
                    code: MetaErrorCode::InvalidDefinition,
                    message: format!("{key} would be {}", now + n),
                });
            }
            Ok(MetaResponse::Ok)
        }
    }

    fn add(key: &str, n: i64) -> MetaCommand {
        MetaCommand::Family {
            family: "counters".into(),
            command: serde_json::json!({"add": {"key": key, "n": n}}),
        }
    }

    #[test]
    fn family_commands_are_dispatched_and_announced() {
        let sm = MetaStateMachine::new(Arc::new(MemoryMetaStore::new(WELL_KNOWN_CFS)))
            .with_family(Arc::new(Counters));
        let mut feed = sm.changes();
        assert_eq!(apply(&sm, 1, add("a", 2)), MetaResponse::Ok);
        assert_eq!(apply(&sm, 2, add("a", 3)), MetaResponse::Ok);
        assert_eq!(
            sm.family("counters").get::<i64>("a").expect("read"),
            Some(5)
        );
        let announced = feed.try_recv().expect("a change");
        assert_eq!(announced.family, "counters");
        assert_eq!(announced.keys, Some(vec!["a".to_string()]));
        assert!(feed.try_recv().is_ok(), "the second entry is announced too");
        // A refusal writes nothing and announces nothing.
        assert!(matches!(
            apply(&sm, 3, add("a", -9)),
            MetaResponse::Rejected {
                code: MetaErrorCode::InvalidDefinition,
                ..
            }
        ));
        assert_eq!(
            sm.family("counters").get::<i64>("a").expect("read"),
            Some(5)
        );
        assert!(feed.try_recv().is_err());
        // A family this node does not know is refused, not guessed at.
        let unknown = MetaCommand::Family {
            family: "rules".into(),
            command: serde_json::json!({}),
        };
        assert!(matches!(
            apply(&sm, 4, unknown),
            MetaResponse::Rejected {
                code: MetaErrorCode::InvalidRequest,
                ..
            }
        ));
        // Family records are records: snapshots and checksums carry them.
        let records = sm.records().expect("records");
        assert!(records.iter().any(|(k, _)| k == b"rec/counters/a"));
        assert_eq!(
            sm.family("counters")
                .scan::<i64>("")
                .expect("scan")
                .into_iter()
                .map(|(k, _)| k)
                .collect::<Vec<_>>(),
            vec!["a".to_string()]
        );
    }

    fn assign(replicas: &[u64]) -> MetaCommand {
        MetaCommand::AssignReplicas {
            topic: "t".into(),
            partition: 0,
            replicas: replicas.to_vec(),
        }
    }

    #[test]
    fn the_first_cluster_id_stays() {
        let sm = MetaStateMachine::new(Arc::new(MemoryMetaStore::new(WELL_KNOWN_CFS)));
        assert_eq!(sm.cluster_id().expect("read"), None);
        let name = |id: &str| MetaCommand::InitCluster { id: id.into() };
        assert_eq!(apply(&sm, 1, name("first")), MetaResponse::Ok);
        assert_eq!(apply(&sm, 2, name("second")), MetaResponse::Ok);
        assert_eq!(sm.cluster_id().expect("read").as_deref(), Some("first"));
    }

    #[test]
    fn a_move_is_recorded_until_it_is_done() {
        let sm = MetaStateMachine::new(Arc::new(MemoryMetaStore::new(WELL_KNOWN_CFS)));
        for id in 1..=4 {
            let addr = format!("127.0.0.{id}:7070");
            apply(&sm, id, MetaCommand::RegisterNode { node_id: id, addr });
        }
        let create = MetaCommand::CreateTopic {
            name: "t".into(),
            partitions: 1,
            replication_factor: 2,
            configs: BTreeMap::new(),
            assignment: vec![vec![1, 2]],
            request_id: 0,
            application: crate::types::default_application(),
        };
        assert_eq!(apply(&sm, 5, create), MetaResponse::Ok);
        // An order change is not a move.
        assert_eq!(apply(&sm, 6, assign(&[2, 1])), MetaResponse::Ok);
        assert_eq!(sm.moving_from("t", 0).expect("read"), None);
        // A set change is, and a second one waits for it.
        assert_eq!(apply(&sm, 7, assign(&[4, 1])), MetaResponse::Ok);
        assert_eq!(sm.replicas("t", 0).expect("read"), Some(vec![4, 1]));
        assert_eq!(sm.moving_from("t", 0).expect("read"), Some(vec![2, 1]));
        assert!(matches!(
            apply(&sm, 8, assign(&[3, 1])),
            MetaResponse::Rejected {
                code: MetaErrorCode::ReassignmentInProgress,
                ..
            }
        ));
        // Repeating the same move is fine; a stale completion changes nothing.
        assert_eq!(apply(&sm, 9, assign(&[4, 1])), MetaResponse::Ok);
        let done = |replicas: &[u64]| MetaCommand::ReassignmentDone {
            topic: "t".into(),
            partition: 0,
            replicas: replicas.to_vec(),
        };
        assert_eq!(apply(&sm, 10, done(&[2, 1])), MetaResponse::Ok);
        assert!(sm.moving_from("t", 0).expect("read").is_some());
        assert_eq!(apply(&sm, 11, done(&[4, 1])), MetaResponse::Ok);
        assert_eq!(sm.moving_from("t", 0).expect("read"), None);
        // Bad moves.
        for bad in [&[][..], &[1, 1], &[1, 9]] {
            assert!(matches!(
                apply(&sm, 12, assign(bad)),
                MetaResponse::Rejected { .. }
            ));
        }
        assert_eq!(sm.replicas("t", 0).expect("read"), Some(vec![4, 1]));
        // Deleting the topic forgets a move under way.
        apply(&sm, 13, assign(&[3, 4]));
        apply(&sm, 14, MetaCommand::DeleteTopic { name: "t".into() });
        assert_eq!(sm.moving_from("t", 0).expect("read"), None);
    }
}
