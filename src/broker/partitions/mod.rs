//! The partition replicas a node hosts: one Raft group per partition, on its own segmented log.
//!
//! [`Partitions::run`] follows the metadata state: whenever the metadata group applies
//! something, it rescans the replica assignments and starts a replica for every partition
//! assigned to this node that is not running yet (at start-up that reopens every local
//! replica). A replica's log lives in `<data_dir>/partitions/<topic>-<partition>-<id>/`, its
//! Raft group is `p/<topic>/<partition>/<id>` on the shared transport (one connection per node
//! pair), where `<id>` is the topic's id (the metadata-log index that created it), so a topic
//! deleted and created again under the same name never meets its predecessor's state. A
//! replica whose topic is deleted (or recreated) is stopped and its log and Raft state
//! removed; at start-up, leftovers of topics deleted while the node was down are removed too
//! (the metadata keeps a tombstone per deleted topic).
//! The preferred replica (the first of the assignment) initializes a new group with every
//! assigned replica as a voter and leads it; the others do the same only if nobody reached them
//! within a while (`supervisor.rs`), so the group forms even if the preferred replica never
//! starts. Partition groups never snapshot on their own: the log is the data, and retention
//! decides what leaves it.
//!
//! Partition groups run without openraft's timers; elections, heartbeats, moves and
//! preferred-leader handovers are driven for all of them by one supervisor per node
//! (`supervisor.rs`) from node-level liveness.
//!
//! Leadership: a leader that is not the partition's preferred replica hands leadership back to
//! it once it is alive and caught up, so leaders stay balanced across nodes after failovers.
//!
//! Invariant: at most one running replica per partition per node. A replica that a move
//! takes off this node keeps serving until the move is done (`move_replicas`).

mod supervisor;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use aqueduct_raft::log_store::{LocalAppend, LocalAppendWaiters, SegmentedLogStore};
use aqueduct_raft::network::{Channels, GrpcNetworkFactory, MetaRaft, RaftTransportService};
use aqueduct_raft::partition::PartitionStateMachine;
use aqueduct_raft::state_machine::MetaStateMachine;
use aqueduct_raft::types::{GroupCommand, GroupTypeConfig};
use aqueduct_storage::fs::StdFs;
use aqueduct_storage::meta::{CF_RAFT, CF_STATE, MetaStore, MetaWriteBatch};
use aqueduct_storage::metrics::StorageMetrics;
use aqueduct_storage::{PartitionLog, RetentionPolicy};
use openraft::async_runtime::WatchReceiver as _;

use super::config::TopicConfig;
use super::controller::matched_index;
use aqueduct_raft::liveness::Liveness;
use openraft::error::{InitializeError, RaftError};
use openraft::{BasicNode, Raft, SnapshotPolicy};

/// A partition group's Raft handle.
pub type PartitionRaft = Raft<GroupTypeConfig, PartitionStateMachine>;

/// One partition replica hosted by this node.
#[derive(Debug)]
pub struct Replica {
    pub topic: String,
    pub partition: u32,
    /// The topic's id (see the module doc).
    pub topic_id: u64,
    group: String,
    dir: PathBuf,
    pub raft: PartitionRaft,
    pub sm: PartitionStateMachine,
    pub log: Arc<PartitionLog>,
    waiters: LocalAppendWaiters,
    /// Sequence checks of idempotent batches (`src/idempotence.rs`).
    pub(crate) gate: super::idempotence::ProducerGate,
}

impl Replica {
    /// Resolves with the offsets of `batch` once this node's log has it durable (for
    /// `acks=leader`); register before handing the batch to Raft.
    pub fn log_store_appended(
        &self,
        batch: &bytes::Bytes,
    ) -> tokio::sync::oneshot::Receiver<LocalAppend> {
        self.waiters.wait_for(batch)
    }

    /// Forgets a [`Replica::log_store_appended`] registration.
    pub fn cancel_appended(&self, batch: &bytes::Bytes) {
        self.waiters.cancel(batch);
    }

    /// This replica's node id.
    pub fn raft_id(&self) -> u64 {
        self.raft.metrics().borrow_watched().id
    }

    /// The leader's id and gRPC address, if this replica knows them.
    pub fn leader(&self) -> Option<(u64, String)> {
        let m = self.raft.metrics().borrow_watched().clone();
        let id = m.current_leader?;
        let addr = m.membership_config.membership().get_node(&id)?.addr.clone();
        Some((id, addr))
    }
}

/// Why a partition replica could not be started, stopped or maintained.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    #[error("metadata: {0}")]
    Metadata(#[from] std::io::Error),
    #[error("metadata store: {0}")]
    MetaStore(#[from] aqueduct_storage::meta::MetaError),
    #[error("partition log: {0}")]
    Log(#[from] aqueduct_storage::LogError),
    #[error("raft configuration: {0}")]
    Config(#[from] openraft::ConfigError),
    #[error("raft: {0}")]
    Raft(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("partition {topic}/{partition} is assigned to node {node}, which is not a member")]
    NotAMember {
        topic: String,
        partition: u32,
        node: u64,
    },
    #[error("cannot remove {}: {source}", path.display())]
    RemoveDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} partition replica(s) could not start")]
    NotStarted(usize),
    #[error("moving replicas: {0}")]
    Moving(String),
}

type Result<T, E = PartitionError> = std::result::Result<T, E>;

fn raft_err(e: impl std::error::Error + Send + Sync + 'static) -> PartitionError {
    PartitionError::Raft(Box::new(e))
}

/// Running replicas by (topic, partition).
type ReplicaMap = HashMap<(String, u32), Arc<Replica>>;

/// The Raft group name of a partition of the topic with id `id`.
pub fn group_name(topic: &str, partition: u32, id: u64) -> String {
    format!("p/{topic}/{partition}/{id}")
}

/// Settings shared by every partition replica of a node.
#[derive(Debug, Clone)]
pub struct PartitionSettings {
    pub node_id: u64,
    pub data_dir: PathBuf,
    pub heartbeat_ms: u64,
    /// How often a partition leader checks its topic's retention policy.
    pub retention_check: Duration,
}

/// How long a partition leader's quorum acknowledgement lets it take writes (see `start`).
pub(crate) const LEADER_LEASE: Duration = Duration::from_secs(3600);

/// The replicas this node hosts, and what starts them.
#[derive(Debug, Clone)]
pub struct Partitions {
    settings: PartitionSettings,
    meta: Arc<dyn MetaStore>,
    metrics: Arc<StorageMetrics>,
    channels: Channels,
    transport: RaftTransportService,
    sm: MetaStateMachine,
    replicas: Arc<RwLock<ReplicaMap>>,
}

impl Partitions {
    pub fn new(
        settings: PartitionSettings,
        meta: Arc<dyn MetaStore>,
        metrics: Arc<StorageMetrics>,
        channels: Channels,
        transport: RaftTransportService,
        sm: MetaStateMachine,
    ) -> Self {
        Self {
            settings,
            meta,
            metrics,
            channels,
            transport,
            sm,
            replicas: Arc::default(),
        }
    }

    /// The local replica of `topic`/`partition`, if this node hosts one.
    pub fn get(&self, topic: &str, partition: u32) -> Option<Arc<Replica>> {
        self.replicas
            .read()
            .ok()?
            .get(&(topic.to_string(), partition))
            .cloned()
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.settings.node_id
    }

    /// The metadata state machine (topics, assignments, node addresses).
    pub fn metadata(&self) -> &MetaStateMachine {
        &self.sm
    }

    /// The node-to-node gRPC connections.
    pub fn channels(&self) -> &Channels {
        &self.channels
    }

    /// Every local replica.
    pub fn all(&self) -> Vec<Arc<Replica>> {
        self.replicas
            .read()
            .map(|r| r.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Starts missing replicas after every change of the metadata state, until `meta_raft`
    /// shuts down.
    pub async fn run(self, meta_raft: MetaRaft) {
        let mut metrics = meta_raft.metrics();
        let mut seen = None;
        loop {
            let applied = metrics.borrow_watched().last_applied;
            if applied != seen {
                seen = applied;
                if let Err(e) = self.rescan().await {
                    tracing::warn!(err = %e, "starting partition replicas failed; retrying");
                    seen = None;
                }
            }
            tokio::select! {
                changed = metrics.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Stops replicas whose topic is gone (or was recreated), removes leftovers of deleted
    /// topics, and starts a replica for every partition assigned to this node that is not
    /// running.
    async fn rescan(&self) -> Result<()> {
        let me = self.settings.node_id;
        for r in self.all() {
            let current = self.sm.topic(&r.topic)?.map(|t| t.id);
            let assigned = self
                .sm
                .replicas(&r.topic, r.partition)?
                .is_some_and(|rs| rs.contains(&me));
            // A replica the partition is moving away from serves until the move is done.
            let leaving = self
                .sm
                .moving_from(&r.topic, r.partition)?
                .is_some_and(|rs| rs.contains(&me));
            if current != Some(r.topic_id) || !(assigned || leaving) {
                self.remove(&r).await?;
            }
        }
        for gone in self.sm.deleted_topics()? {
            for p in 0..gone.partitions {
                let dir = self.dir(&gone.name, p, gone.id);
                if dir.exists() && self.get(&gone.name, p).is_none() {
                    self.delete_state(&group_name(&gone.name, p, gone.id), &dir)?;
                }
            }
        }
        // One partition that cannot start (a damaged log, say) must not keep the others down.
        let mut failed = 0;
        for topic in self.sm.topics()? {
            for p in 0..topic.partitions {
                let Some(replicas) = self.sm.replicas(&topic.name, p)? else {
                    continue;
                };
                let from = self.sm.moving_from(&topic.name, p)?;
                let leaving = from.as_ref().is_some_and(|f| f.contains(&me));
                if !replicas.contains(&me) && !leaving {
                    continue;
                }
                let started = match self.get(&topic.name, p) {
                    Some(r) => Ok(r),
                    None => self.start(&topic.name, p, topic.id).await,
                };
                // The preferred replica (the first) initializes a new group at once, and
                // leads it: openraft has the initializing node call an election. The other
                // replicas of the first assignment do the same, with the same membership
                // (openraft allows that), only if nobody has reached them after a while
                // (`supervisor.rs`): whichever replicas are up form the group even if the
                // preferred one never starts. A replica a move adds never does: it waits to
                // be added to the running group as a learner.
                let members = match &from {
                    None if replicas.first() == Some(&me) => Some(&replicas),
                    None => None,
                    Some(f) if leaving => Some(f),
                    Some(_) => None,
                };
                let r = match (started, members) {
                    (Ok(replica), Some(members)) => self.initialize(&replica, members).await,
                    (Ok(_), None) => Ok(()),
                    (Err(e), _) => Err(e),
                };
                if let Err(e) = r {
                    failed += 1;
                    tracing::error!(topic = %topic.name, partition = p, err = %e, "partition replica cannot start");
                }
            }
        }
        if failed > 0 {
            return Err(PartitionError::NotStarted(failed));
        }
        Ok(())
    }

    fn dir(&self, topic: &str, partition: u32, id: u64) -> PathBuf {
        self.settings
            .data_dir
            .join("partitions")
            .join(format!("{topic}-{partition}-{id}"))
    }

    /// Stops a replica and removes its log and Raft state.
    async fn remove(&self, r: &Replica) -> Result<()> {
        tracing::info!(topic = %r.topic, partition = r.partition, "removing partition replica");
        if let Ok(mut map) = self.replicas.write() {
            map.remove(&(r.topic.clone(), r.partition));
        }
        self.transport.remove_group(&r.group);
        if let Err(e) = r.raft.shutdown().await {
            tracing::warn!(topic = %r.topic, partition = r.partition, err = %e, "replica shutdown");
        }
        self.delete_state(&r.group, &r.dir)
    }

    /// Deletes a group's Raft and state-machine keys and its log directory.
    fn delete_state(&self, group: &str, dir: &std::path::Path) -> Result<()> {
        let prefix = format!("{group}/").into_bytes();
        let mut batch = MetaWriteBatch::new();
        for cf in [CF_RAFT, CF_STATE] {
            for (k, _) in self.meta.scan_prefix(cf, &prefix, usize::MAX)? {
                batch.delete(cf, k);
            }
        }
        self.meta.write(batch, true)?;
        match std::fs::remove_dir_all(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(PartitionError::RemoveDir {
                path: dir.to_path_buf(),
                source,
            }),
        }
    }

    async fn start(&self, topic: &str, partition: u32, id: u64) -> Result<Arc<Replica>> {
        let group = group_name(topic, partition, id);
        let dir = self.dir(topic, partition, id);
        let configs = self.sm.topic(topic)?.map(|t| t.configs).unwrap_or_default();
        let log = Arc::new(PartitionLog::open(
            Arc::new(StdFs),
            &dir,
            TopicConfig::from_stored(&configs).log_options(),
            Arc::clone(&self.metrics),
        )?);
        let waiters = LocalAppendWaiters::default();
        let store = SegmentedLogStore::new(Arc::clone(&log), Arc::clone(&self.meta), &group)
            .with_waiters(waiters.clone());
        let sm = PartitionStateMachine::new(Arc::clone(&log), Arc::clone(&self.meta), &group)?;
        // No timers: the supervisor (`supervisor.rs`) calls elections from node liveness and
        // sends heartbeats when needed. The election timeout is left with one role, the leader
        // lease: openraft's leader takes writes only while a quorum acknowledged it within the
        // lease, and a follower refuses ordinary votes for that long after hearing from its
        // leader. The lease is long ([`LEADER_LEASE`]; the supervisor renews it well before it
        // ends), and the supervisor's elections are leadership transfers, which followers
        // grant whatever the lease.
        let config = openraft::Config {
            cluster_name: "aqueduct".into(),
            heartbeat_interval: self.settings.heartbeat_ms,
            election_timeout_min: LEADER_LEASE.as_millis() as u64 / 2,
            election_timeout_max: LEADER_LEASE.as_millis() as u64,
            enable_tick: false,
            enable_heartbeat: false,
            enable_elect: false,
            snapshot_policy: SnapshotPolicy::Never,
            // Snapshots are taken only at retention points, and the log is purged exactly up
            // to them.
            max_in_snapshot_log_to_keep: 0,
            ..openraft::Config::default()
        }
        .validate()?;
        let raft = PartitionRaft::new(
            self.settings.node_id,
            Arc::new(config),
            GrpcNetworkFactory::new(&group, self.channels.clone()),
            store,
            sm.clone(),
        )
        .await
        .map_err(raft_err)?;
        self.transport.add_group(&group, Arc::new(raft.clone()));
        let replica = Arc::new(Replica {
            topic: topic.to_string(),
            partition,
            topic_id: id,
            group: group.clone(),
            dir: dir.clone(),
            raft,
            sm,
            log,
            waiters,
            gate: Default::default(),
        });
        tracing::info!(topic, partition, dir = %dir.display(), "partition replica started");
        tokio::spawn(retention_loop(
            Arc::clone(&replica),
            self.sm.clone(),
            self.settings.retention_check,
        ));
        if let Ok(mut r) = self.replicas.write() {
            r.insert((topic.to_string(), partition), Arc::clone(&replica));
        }
        Ok(replica)
    }

    /// Starts a new group with every assigned replica as a voter (a no-op once the group
    /// exists here). Every assigned replica calls it with the same membership, which openraft
    /// allows: the vote decides the leader.
    async fn initialize(&self, replica: &Replica, replicas: &[u64]) -> Result<()> {
        if replica.raft.is_initialized().await.map_err(raft_err)? {
            return Ok(());
        }
        let mut members = BTreeMap::new();
        for id in replicas {
            let Some(node) = self.sm.node(*id)? else {
                return Err(PartitionError::NotAMember {
                    topic: replica.topic.clone(),
                    partition: replica.partition,
                    node: *id,
                });
            };
            members.insert(*id, BasicNode { addr: node.addr });
        }
        match replica.raft.initialize(members).await {
            Ok(()) => {
                tracing::info!(
                    topic = %replica.topic,
                    partition = replica.partition,
                    ?replicas,
                    "partition group initialized"
                );
                Ok(())
            }
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(raft_err(e)),
        }
    }

    /// Shuts every replica's Raft down.
    pub async fn shutdown(&self) {
        for r in self.all() {
            if let Err(e) = r.raft.shutdown().await {
                tracing::warn!(topic = %r.topic, partition = r.partition, err = %e, "replica shutdown");
            }
        }
    }
}

/// Retention for one replica, until its Raft stops. As leader: every `check`, decide the
/// retention point from the topic's policy and replicate it. As any replica: once a retention
/// point is applied, have openraft snapshot there (which purges the log up to it).
async fn retention_loop(replica: Arc<Replica>, meta: MetaStateMachine, check: Duration) {
    let mut applied = replica.sm.watch();
    let mut tick = tokio::time::interval(check);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut compacted = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = propose_retention(&replica, &meta).await {
                    tracing::debug!(topic = %replica.topic, partition = replica.partition, err = %e, "retention check");
                }
                if let Err(e) = propose_compaction(&replica, &meta).await {
                    tracing::debug!(topic = %replica.topic, partition = replica.partition, err = %e, "compaction check");
                }
            }
            changed = applied.changed() => if changed.is_err() { return },
        }
        let m = replica.raft.metrics().borrow_watched().clone();
        if m.running_state.is_err() {
            return;
        }
        compacted = run_compaction(&replica, compacted).await;
        let want = replica.sm.applied().retain_upto;
        let have = m.snapshot.map(|l| l.index);
        if want.is_some()
            && want > have
            && let Err(e) = replica.raft.trigger().snapshot().await
        {
            tracing::warn!(topic = %replica.topic, partition = replica.partition, err = %e, "snapshot at retention point");
            return;
        }
    }
}

/// A replica added by a move becomes a voter once it is at most this many entries behind.
const REASSIGN_MAX_LAG: u64 = 100;

/// On the leader of a moving partition (see `MetaCommand::AssignReplicas`), one step towards
/// its assignment: add the new replicas as learners; once they have caught up, make the
/// voters the assignment (plus this leader while it is not part of it, which then hands
/// leadership to a new replica); once the voters are exactly the assignment, report the move
/// done to the metadata leader, after which the replicas left out delete their data.
pub(crate) async fn move_replicas(
    replica: &Replica,
    meta: &MetaStateMachine,
    channels: &Channels,
) -> Result<()> {
    let (topic, partition) = (&replica.topic, replica.partition);
    if meta.moving_from(topic, partition)?.is_none() {
        return Ok(());
    }
    let Some(target) = meta.replicas(topic, partition)? else {
        return Ok(());
    };
    let me = replica.raft_id();
    let m = replica.raft.metrics().borrow_watched().clone();
    if m.current_leader != Some(me) {
        return Ok(());
    }
    let membership = m.membership_config.membership().clone();
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    let target_set: BTreeSet<u64> = target.iter().copied().collect();
    let uniform = membership.get_joint_config().len() == 1;
    // Applied here means committed: only then may the replicas left out delete their data.
    let committed =
        m.last_applied.map(|l| l.index) >= m.membership_config.log_id().map(|l| l.index);
    if uniform && voters == target_set {
        if committed {
            return report_moved(meta, channels, topic, partition, &target).await;
        }
        return Ok(());
    }
    let last = m.last_log_index.unwrap_or(0);
    let mut ready = true;
    for id in &target_set {
        if membership.get_node(id).is_none() {
            let addr =
                meta.node(*id)?
                    .map(|n| n.addr)
                    .ok_or_else(|| PartitionError::NotAMember {
                        topic: topic.clone(),
                        partition,
                        node: *id,
                    })?;
            tracing::info!(topic, partition, node = id, "adding a replica as learner");
            replica
                .raft
                .add_learner(*id, BasicNode { addr }, false)
                .await
                .map_err(raft_err)?;
            ready = false;
        } else if !voters.contains(id)
            && matched_index(&m, *id).is_none_or(|i| i + REASSIGN_MAX_LAG < last)
        {
            ready = false;
        }
    }
    let mut next = target_set.clone();
    next.insert(me);
    // A joint config left behind (a leader change or a timeout between openraft's two steps)
    // is finished by asking for the uniform one again.
    if !ready && uniform {
        return Ok(());
    }
    if voters != next || !uniform {
        tracing::info!(topic, partition, voters = ?next, "replacing the partition's voters");
        tokio::time::timeout(
            Duration::from_secs(10),
            replica
                .raft
                .change_membership(openraft::ChangeMembers::ReplaceAllVoters(next), false),
        )
        .await
        .map_err(|_| PartitionError::Moving("membership change timed out".into()))?
        .map_err(raft_err)?;
        return Ok(());
    }
    // The voters are the assignment plus this leader, which is not part of it: hand over to
    // the most caught-up new voter, which finishes the move.
    let to = target_set
        .iter()
        .filter(|id| matched_index(&m, **id).is_some_and(|i| Some(i) >= m.last_log_index))
        .copied()
        .next();
    if let Some(to) = to {
        tracing::info!(
            topic,
            partition,
            to,
            "handing leadership to a replica of the new assignment"
        );
        replica
            .raft
            .trigger()
            .transfer_leader(to)
            .await
            .map_err(raft_err)?;
    }
    Ok(())
}

/// Tells the metadata leader that `topic`/`partition`'s voters are now `replicas`.
async fn report_moved(
    meta: &MetaStateMachine,
    channels: &Channels,
    topic: &str,
    partition: u32,
    replicas: &[u64],
) -> Result<()> {
    let servers: Vec<String> = meta.nodes()?.into_iter().map(|n| n.addr).collect();
    let request = aqueduct_protocol::cluster::CompleteReassignmentRequest {
        topic: topic.to_string(),
        partition,
        replicas: replicas.to_vec(),
    };
    super::forward::on_meta_leader(channels, &servers, Duration::from_secs(5), |mut c| {
        let request = request.clone();
        async move { c.complete_reassignment(request).await }
    })
    .await
    .map_err(|e| PartitionError::Moving(e.to_string()))?;
    tracing::info!(topic, partition, ?replicas, "partition moved");
    Ok(())
}

/// On a leader that is not the partition's preferred replica (the first of its assignment):
/// hand leadership to the preferred one once it is alive (answers node pings) and caught up,
/// so that leaders stay spread over the nodes as the assignment spreads them (Kafka's
/// preferred leader election).
pub(crate) async fn restore_preferred_leader(
    replica: &Replica,
    preferred: u64,
    liveness: &Liveness,
) -> Result<()> {
    let me = replica.raft_id();
    let m = replica.raft.metrics().borrow_watched().clone();
    if m.current_leader != Some(me) || preferred == me {
        return Ok(());
    }
    // Only to a voter (a replica a move is adding is a learner until the move is done).
    let voter = m
        .membership_config
        .membership()
        .voter_ids()
        .any(|v| v == preferred);
    let caught_up = matched_index(&m, preferred).is_some_and(|i| Some(i) >= m.last_log_index);
    if voter && caught_up && liveness.alive(preferred) {
        tracing::info!(
            topic = %replica.topic,
            partition = replica.partition,
            to = preferred,
            "handing partition leadership to the preferred replica"
        );
        replica
            .raft
            .trigger()
            .transfer_leader(preferred)
            .await
            .map_err(raft_err)?;
    }
    Ok(())
}

/// The replica's topic, when this replica leads its partition (leaders decide retention and
/// compaction points).
fn led_topic(
    replica: &Replica,
    meta: &MetaStateMachine,
) -> Result<Option<aqueduct_raft::state_machine::TopicRecord>> {
    if replica.leader().map(|l| l.0) != Some(replica.raft_id()) {
        return Ok(None);
    }
    Ok(meta.topic(&replica.topic)?)
}

/// On the leader of a compacted topic: replicate a compaction point once a newer segment has
/// been sealed (the active segment is never compacted, as in Kafka).
async fn propose_compaction(replica: &Replica, meta: &MetaStateMachine) -> Result<()> {
    let Some(topic) = led_topic(replica, meta)? else {
        return Ok(());
    };
    if !TopicConfig::from_stored(&topic.configs).cleanup().compact {
        return Ok(());
    }
    let applied = replica.sm.applied();
    let Some(point) = replica
        .log
        .sealed_last_index()
        .zip(applied.index)
        .map(|(sealed, applied)| sealed.min(applied))
    else {
        return Ok(());
    };
    if applied.compact_upto.is_some_and(|c| c >= point) {
        return Ok(());
    }
    replicate_point(replica, GroupCommand::Compact { upto: point }).await
}

/// On every replica: compact up to the latest applied compaction point (off the async
/// threads); returns the point reached. Entries up to the point that are still in this
/// replica's active segment (segment boundaries are local) are sealed first, so every replica
/// compacts exactly the entries up to the point and ends with the same entries, byte for byte.
async fn run_compaction(replica: &Arc<Replica>, done: Option<u64>) -> Option<u64> {
    let want = replica.sm.applied().compact_upto;
    if want <= done {
        return done;
    }
    let upto = want?;
    let log = Arc::clone(&replica.log);
    let compacted = tokio::task::spawn_blocking(move || {
        if log.sealed_last_index().is_none_or(|s| s < upto) {
            log.roll()?;
        }
        log.compact(upto)
    })
    .await;
    match compacted {
        Ok(Ok(stats)) => {
            tracing::info!(
                topic = %replica.topic,
                partition = replica.partition,
                upto,
                segments = stats.segments_rewritten,
                records_removed = stats.records_removed,
                bytes_before = stats.bytes_before,
                bytes_after = stats.bytes_after,
                "compacted"
            );
            want
        }
        Ok(Err(e)) => {
            tracing::warn!(topic = %replica.topic, partition = replica.partition, err = %e, "compaction failed");
            done
        }
        Err(e) => {
            tracing::warn!(topic = %replica.topic, partition = replica.partition, err = %e, "compaction task failed");
            done
        }
    }
}

/// On the leader: replicate the retention point the topic's policy gives, if it moved.
async fn propose_retention(replica: &Replica, meta: &MetaStateMachine) -> Result<()> {
    let Some(topic) = led_topic(replica, meta)? else {
        return Ok(());
    };
    if !TopicConfig::from_stored(&topic.configs).cleanup().delete {
        return Ok(());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let applied = replica.sm.applied();
    let policy = RetentionPolicy {
        below_offset: (applied.deleted_before > 0).then_some(applied.deleted_before),
        ..TopicConfig::from_stored(&topic.configs).retention_policy()
    };
    let Some(point) = replica.log.retention_point(&policy, now) else {
        return Ok(());
    };
    if applied.retain_upto.is_some_and(|r| r >= point) || applied.index.is_none_or(|a| a < point) {
        return Ok(());
    }
    replicate_point(replica, GroupCommand::Retain { upto: point }).await
}

/// On the leader: replicates a retention or compaction point.
async fn replicate_point(replica: &Replica, command: GroupCommand) -> Result<()> {
    tracing::info!(topic = %replica.topic, partition = replica.partition, ?command, "replicating a cleanup point");
    replica.raft.client_write(command).await.map_err(raft_err)?;
    Ok(())
}
