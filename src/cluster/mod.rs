//! The cluster admin API (`aqueduct.cluster.v1.Cluster`, see
//! `protocol/proto/aqueduct/cluster.proto`): status, joining, removing nodes, topics.
//!
//! Everything that reports or changes cluster-wide state runs on the metadata leader; another
//! node refuses with [`ErrorCode::NotLeader`] and the leader's address (trailer `aq-leader`),
//! and clients ([`crate::client`]) retry there. `NodeInfo` is answered by every node from its
//! own state, so a client can compare nodes.
//!
//! Membership rules (DESIGN.md §5): a joining node becomes a learner, then a voter while the
//! cluster has fewer voters than it wants (3; 5 from 5 nodes up); the others stay learners.
//! Removing a voter promotes a learner when that keeps the wanted number. Membership changes
//! are serialized on the leader. The node registry in the metadata state follows the
//! membership (see `aqueduct_raft::state_machine`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use aqueduct_protocol::cluster as pb;
use aqueduct_protocol::cluster::cluster_server::{Cluster, ClusterServer};
use aqueduct_raft::network::MetaRaft;
use aqueduct_raft::state_machine::MetaStateMachine;
use aqueduct_raft::types::{GroupTypeConfig, MetaCommand, SYSTEM_TOPIC_PREFIX};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, RaftMetrics};

pub use crate::broker::controller::LIVENESS_TIMEOUT;
use crate::broker::controller::{self, Controller, alive, matched_index, since_heard};
pub use crate::broker::topics::assign_replicas;
use crate::broker::topics::{NewTopic, TopicAdmin, TopicChange, topic_to_pb};
use crate::broker::{BrokerError, ErrorCode as B, Redirect};
use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Response, Status};

/// How long a join waits for the new learner to catch up before answering `NOT_CAUGHT_UP`
/// (the joining node asks again).
const JOIN_CATCH_UP: Duration = Duration::from_secs(10);

/// A learner at most this many entries behind the leader may be promoted to voter.
const MAX_PROMOTION_LAG: u64 = 100;

/// Stable error codes of the cluster API, sent by name in the `aq-error` trailer. The numbers
/// are stable too; a retired code is never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// This node is not the metadata leader; `aq-leader` names the leader.
    NotLeader = 1,
    /// No metadata leader is known right now (an election is under way, or Raft is shutting
    /// down): retry shortly.
    NoLeader = 2,
    TopicExists = 3,
    UnknownTopic = 4,
    UnknownNode = 5,
    InvalidPartition = 6,
    InvalidReplicationFactor = 7,
    InvalidTopicName = 8,
    /// A joining node's id (or address) is already used by another member.
    NodeIdInUse = 9,
    /// The last voter cannot be removed.
    LastVoter = 10,
    /// Anything else (storage failure); the message says what.
    Internal = 11,
    /// A joining node has not caught up with the metadata log yet: retry.
    NotCaughtUp = 12,
    /// A membership change is already under way: retry.
    TryAgain = 13,
    /// Node id 0 or an address that is not `HOST:PORT`.
    InvalidNode = 14,
    /// A voter asked to join again with an empty data directory: its vote and log are gone,
    /// so it must be removed (`cluster remove-node`) before it can rejoin.
    RejoinWithoutState = 15,
    /// An unknown topic config key or a value it cannot take.
    InvalidConfig = 16,
    /// A malformed request.
    InvalidRequest = 17,
    /// Partition replicas are being moved (a rebalance, or a node being drained before its
    /// removal): retry once they are.
    ReassignmentInProgress = 18,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotLeader => "NOT_LEADER",
            ErrorCode::NoLeader => "NO_LEADER",
            ErrorCode::TopicExists => "TOPIC_EXISTS",
            ErrorCode::UnknownTopic => "UNKNOWN_TOPIC",
            ErrorCode::UnknownNode => "UNKNOWN_NODE",
            ErrorCode::InvalidPartition => "INVALID_PARTITION",
            ErrorCode::InvalidReplicationFactor => "INVALID_REPLICATION_FACTOR",
            ErrorCode::InvalidTopicName => "INVALID_TOPIC_NAME",
            ErrorCode::NodeIdInUse => "NODE_ID_IN_USE",
            ErrorCode::LastVoter => "LAST_VOTER",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::NotCaughtUp => "NOT_CAUGHT_UP",
            ErrorCode::TryAgain => "TRY_AGAIN",
            ErrorCode::InvalidNode => "INVALID_NODE",
            ErrorCode::RejoinWithoutState => "REJOIN_WITHOUT_STATE",
            ErrorCode::InvalidConfig => "INVALID_CONFIG",
            ErrorCode::InvalidRequest => "INVALID_REQUEST",
            ErrorCode::ReassignmentInProgress => "REASSIGNMENT_IN_PROGRESS",
        }
    }

    /// The gRPC status code: `UNAVAILABLE` exactly for the codes a client retries.
    fn grpc(self) -> Code {
        match self {
            ErrorCode::NotLeader
            | ErrorCode::LastVoter
            | ErrorCode::RejoinWithoutState
            | ErrorCode::ReassignmentInProgress => Code::FailedPrecondition,
            ErrorCode::NoLeader | ErrorCode::NotCaughtUp | ErrorCode::TryAgain => Code::Unavailable,
            ErrorCode::TopicExists | ErrorCode::NodeIdInUse => Code::AlreadyExists,
            ErrorCode::UnknownTopic | ErrorCode::UnknownNode => Code::NotFound,
            ErrorCode::InvalidPartition
            | ErrorCode::InvalidReplicationFactor
            | ErrorCode::InvalidTopicName
            | ErrorCode::InvalidNode
            | ErrorCode::InvalidConfig
            | ErrorCode::InvalidRequest => Code::InvalidArgument,
            ErrorCode::Internal => Code::Internal,
        }
    }

    /// The cluster API's code for a broker error.
    fn from_broker(code: B) -> Self {
        match code {
            B::NotLeader => ErrorCode::NotLeader,
            B::NotController => ErrorCode::NoLeader,
            B::TopicExists => ErrorCode::TopicExists,
            B::UnknownTopicOrPartition => ErrorCode::UnknownTopic,
            B::UnknownNode => ErrorCode::UnknownNode,
            B::InvalidPartitions => ErrorCode::InvalidPartition,
            B::InvalidReplicationFactor => ErrorCode::InvalidReplicationFactor,
            B::InvalidTopicName => ErrorCode::InvalidTopicName,
            B::InvalidConfig => ErrorCode::InvalidConfig,
            B::InvalidRequest => ErrorCode::InvalidRequest,
            B::ReassignmentInProgress => ErrorCode::ReassignmentInProgress,
            B::TryAgain => ErrorCode::TryAgain,
            _ => ErrorCode::Internal,
        }
    }
}

/// A refusal with its stable code in the `aq-error` trailer.
pub fn refuse(code: ErrorCode, message: impl Into<String>) -> Status {
    let mut status = Status::new(code.grpc(), message.into());
    status
        .metadata_mut()
        .insert("aq-error", MetadataValue::from_static(code.as_str()));
    status
}

/// A broker error in the cluster API's terms (its code names, `aq-leader`).
fn cluster_status(e: BrokerError) -> Status {
    let mut status = refuse(ErrorCode::from_broker(e.code), e.message);
    if let Redirect::Leader { addr, .. } = &e.redirect
        && let Ok(v) = addr.parse()
    {
        status.metadata_mut().insert("aq-leader", v);
    }
    status
}

fn not_leader(leader: Option<(u64, String)>) -> Status {
    cluster_status(controller::not_controller(leader))
}

fn internal(what: &str, e: impl std::fmt::Display) -> Status {
    refuse(ErrorCode::Internal, format!("{what}: {e}"))
}

/// How many voters a cluster of `nodes` members wants.
pub fn desired_voters(nodes: usize) -> usize {
    if nodes >= 5 { 5 } else { nodes.min(3) }
}

/// The cluster service of one node.
#[derive(Debug, Clone)]
pub struct ClusterService {
    node_id: u64,
    addr: String,
    raft: MetaRaft,
    sm: MetaStateMachine,
    controller: Controller,
    topics: TopicAdmin,
    membership_lock: Arc<tokio::sync::Mutex<()>>,
}

impl ClusterService {
    /// The cluster service over this node's metadata group; topic requests go to `topics`.
    pub fn new(addr: String, topics: TopicAdmin) -> Self {
        let controller = topics.controller().clone();
        Self {
            node_id: controller.node_id(),
            addr,
            raft: controller.raft().clone(),
            sm: controller.state().clone(),
            controller,
            topics,
            membership_lock: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// The tonic service to mount on the node's gRPC server.
    pub fn into_server(self) -> ClusterServer<Self> {
        ClusterServer::new(self)
    }

    fn metrics(&self) -> RaftMetrics<GroupTypeConfig> {
        self.controller.metrics()
    }

    fn leader_of(m: &RaftMetrics<GroupTypeConfig>) -> Option<(u64, String)> {
        controller::leader_of(m)
    }

    /// Ok with the current metrics when this node leads the metadata group.
    fn require_leader(&self) -> Result<RaftMetrics<GroupTypeConfig>, Status> {
        self.controller.require_leader().map_err(cluster_status)
    }

    /// Maps an openraft write error to a refusal: a lost leadership becomes `NOT_LEADER` (or
    /// `NO_LEADER`), a membership change in progress `TRY_AGAIN`, a stopping Raft `NO_LEADER`.
    fn write_error(
        &self,
        what: &str,
        e: RaftError<GroupTypeConfig, ClientWriteError<GroupTypeConfig>>,
    ) -> Status {
        cluster_status(self.controller.write_error(what, e))
    }

    /// Proposes a metadata command and waits until it is committed and applied here.
    async fn propose(&self, cmd: MetaCommand) -> Result<(), Status> {
        self.controller.propose(cmd).await.map_err(cluster_status)
    }

    /// Learners the leader hears from and that are at most `MAX_PROMOTION_LAG` entries behind,
    /// lowest id first.
    fn promotable_learners(&self, m: &RaftMetrics<GroupTypeConfig>) -> Vec<u64> {
        let last = m.last_log_index.unwrap_or(0);
        m.membership_config
            .membership()
            .learner_ids()
            .filter(|id| {
                alive(m, *id)
                    && matched_index(m, *id).is_some_and(|i| i + MAX_PROMOTION_LAG >= last)
            })
            .collect()
    }

    async fn join_locked(
        &self,
        node_id: u64,
        addr: String,
        has_state: bool,
        dry_run: bool,
    ) -> Result<String, Status> {
        let m = self.require_leader()?;
        let membership = m.membership_config.membership().clone();
        let target = if let Some(existing) = membership.get_node(&node_id) {
            if existing.addr != addr {
                return Err(refuse(
                    ErrorCode::NodeIdInUse,
                    format!(
                        "node id {node_id} already belongs to the cluster at {}; remove it first \
                         (aqueduct cluster remove-node {node_id}) or start with another --node-id",
                        existing.addr
                    ),
                ));
            }
            if !has_state && membership.voter_ids().any(|v| v == node_id) {
                return Err(refuse(
                    ErrorCode::RejoinWithoutState,
                    format!(
                        "node {node_id} is a voter but its data directory is empty (its vote and \
                         log are lost); remove it first (aqueduct cluster remove-node {node_id}), \
                         then join again"
                    ),
                ));
            }
            if dry_run {
                return Ok(String::new());
            }
            m.last_log_index.unwrap_or(0)
        } else {
            if let Some((other, _)) = membership.nodes().find(|(_, n)| n.addr == addr) {
                return Err(refuse(
                    ErrorCode::NodeIdInUse,
                    format!("address {addr} is already used by node {other}"),
                ));
            }
            if dry_run {
                return Ok(String::new());
            }
            tracing::info!(node_id, %addr, "adding node as learner");
            let r = self
                .raft
                .add_learner(node_id, BasicNode { addr: addr.clone() }, false)
                .await
                .map_err(|e| self.write_error("add learner", e))?;
            r.log_id().index
        };
        // Only a learner that holds the log is made a voter.
        let caught_up = self
            .raft
            .wait(Some(JOIN_CATCH_UP))
            .metrics(
                |m| matched_index(m, node_id).is_some_and(|i| i >= target),
                "learner caught up",
            )
            .await;
        if caught_up.is_err() {
            return Err(refuse(
                ErrorCode::NotCaughtUp,
                format!(
                    "node {node_id} was added as a learner but has not caught up with the \
                     metadata log within {} s (is {addr} reachable from the leader?)",
                    JOIN_CATCH_UP.as_secs()
                ),
            ));
        }
        let m = self.metrics();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let want = desired_voters(membership.nodes().count());
        let promote: BTreeSet<u64> = self
            .promotable_learners(&m)
            .into_iter()
            .take(want.saturating_sub(voters.len()))
            .collect();
        if !promote.is_empty() {
            tracing::info!(?promote, "promoting learners to voters");
            self.raft
                .change_membership(ChangeMembers::AddVoterIds(promote.clone()), false)
                .await
                .map_err(|e| self.write_error("promote to voter", e))?;
        }
        Ok(if voters.contains(&node_id) || promote.contains(&node_id) {
            "voter"
        } else {
            "learner"
        }
        .into())
    }

    async fn remove_locked(&self, node_id: u64) -> Result<(), Status> {
        let m = self.require_leader()?;
        let membership = m.membership_config.membership().clone();
        if membership.get_node(&node_id).is_none() {
            if self
                .sm
                .removed_node(node_id)
                .map_err(|e| internal("read metadata state", e))?
                .is_some()
            {
                // Already removed (a retry after a lost reply): done.
                return Ok(());
            }
            return Err(refuse(
                ErrorCode::UnknownNode,
                format!("node {node_id} is not a member of the cluster"),
            ));
        }
        // Its partition replicas (and so their leaderships) move to other members first.
        self.drain(&m, node_id).await?;
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        if node_id == self.node_id && voters.len() > 1 {
            return Err(self.hand_over_leadership(&m, &voters).await);
        }
        if voters.contains(&node_id) {
            let mut next: BTreeSet<u64> =
                voters.iter().copied().filter(|v| *v != node_id).collect();
            if next.is_empty() {
                return Err(refuse(
                    ErrorCode::LastVoter,
                    format!("node {node_id} is the cluster's last voter and cannot be removed"),
                ));
            }
            let want = desired_voters(membership.nodes().count() - 1);
            // Promote caught-up learners, lowest id first; or demote surplus voters (highest
            // id first, never this leader) so that the count stays 3 or 5, never even.
            for learner in self.promotable_learners(&m) {
                if next.len() >= want {
                    break;
                }
                next.insert(learner);
            }
            while next.len() > want {
                let Some(&surplus) = next.iter().rev().find(|v| **v != self.node_id) else {
                    break;
                };
                next.remove(&surplus);
            }
            // First demote it to a learner, which still receives the log: it learns that it
            // no longer votes, so it never campaigns against the remaining voters.
            tracing::info!(node_id, voters = ?next, "demoting node to learner");
            let r = self
                .raft
                .change_membership(ChangeMembers::ReplaceAllVoters(next), true)
                .await
                .map_err(|e| self.write_error("demote voter", e))?;
            let index = r.log_id().index;
            let caught_up = self
                .raft
                .wait(Some(LIVENESS_TIMEOUT))
                .metrics(
                    |m| matched_index(m, node_id).is_some_and(|i| i >= index),
                    "demotion replicated",
                )
                .await;
            if caught_up.is_err() {
                tracing::warn!(
                    node_id,
                    "node did not confirm its demotion; removing it anyway"
                );
            }
        }
        tracing::info!(node_id, "removing node");
        self.raft
            .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([node_id])), false)
            .await
            .map_err(|e| self.write_error("remove node", e))?;
        Ok(())
    }

    fn placeable_nodes(&self, m: &RaftMetrics<GroupTypeConfig>) -> Vec<u64> {
        self.controller.placeable_nodes(m)
    }

    /// The leader is about to be removed: hand leadership to the most caught-up other voter
    /// it hears from, wait for the change, and answer `NOT_LEADER` naming the new leader so
    /// that the client repeats the request there (a removed node must not stay leader).
    async fn hand_over_leadership(
        &self,
        m: &RaftMetrics<GroupTypeConfig>,
        voters: &BTreeSet<u64>,
    ) -> Status {
        let target = voters
            .iter()
            .filter(|v| **v != self.node_id && alive(m, **v))
            .max_by_key(|v| matched_index(m, **v));
        let Some(&target) = target else {
            return refuse(
                ErrorCode::NoLeader,
                "no other voter is reachable to take over leadership; retry when one is",
            );
        };
        tracing::info!(
            target,
            "transferring metadata leadership before removing this node"
        );
        if let Err(e) = self.raft.trigger().transfer_leader(target).await {
            return internal("transfer leadership", e);
        }
        let me = self.node_id;
        let changed = self
            .raft
            .wait(Some(Duration::from_secs(5)))
            .metrics(
                |m| m.current_leader.is_some_and(|l| l != me),
                "leadership moved",
            )
            .await;
        match changed {
            Ok(m) => not_leader(Self::leader_of(&m)),
            Err(_) => refuse(
                ErrorCode::NoLeader,
                "leadership did not move within 5 s; retry",
            ),
        }
    }

    /// Waits until this leader's state machine has applied everything committed before the
    /// call (a read index), so reads of it are current.
    async fn linearizable(&self) -> Result<(), Status> {
        self.controller.linearizable().await.map_err(cluster_status)
    }

    /// Every partition's replicas, and how many partitions are moving (a move not finished).
    fn placements(&self) -> Result<(Vec<Placement>, Vec<Placement>), Status> {
        let read = |e: std::io::Error| internal("read metadata state", e);
        let mut settled = Vec::new();
        let mut moving = Vec::new();
        for t in self.sm.topics().map_err(read)? {
            for p in 0..t.partitions {
                let Some(rs) = self.sm.replicas(&t.name, p).map_err(read)? else {
                    continue;
                };
                match self.sm.moving_from(&t.name, p).map_err(read)? {
                    Some(from) => {
                        let mut all = from;
                        all.extend(
                            rs.iter()
                                .filter(|r| !all.contains(r))
                                .copied()
                                .collect::<Vec<_>>(),
                        );
                        moving.push((t.name.clone(), p, all));
                    }
                    None => settled.push((t.name.clone(), p, rs)),
                }
            }
        }
        Ok((settled, moving))
    }

    /// Proposes each move (`AssignReplicas`); the partitions' leaders carry them out.
    async fn start_moves(&self, moves: &[Placement]) -> Result<(), Status> {
        for (topic, partition, replicas) in moves {
            tracing::info!(topic, partition, ?replicas, "moving partition replicas");
            self.propose(MetaCommand::AssignReplicas {
                topic: topic.clone(),
                partition: *partition,
                replicas: replicas.clone(),
            })
            .await?;
        }
        Ok(())
    }

    /// Moves every replica off `node_id`; `Ok` once none is left there (moves finished).
    async fn drain(&self, m: &RaftMetrics<GroupTypeConfig>, node_id: u64) -> Result<(), Status> {
        self.linearizable().await?;
        let (mut settled, moving) = self.placements()?;
        let nodes: Vec<u64> = self
            .placeable_nodes(m)
            .into_iter()
            .filter(|n| *n != node_id)
            .collect();
        if !alive(m, node_id) {
            // A dead node's only replicas cannot move (no leader is left to copy them from):
            // they are left as they are, as before moves existed.
            settled.retain(|(_, _, rs)| rs != &vec![node_id]);
        }
        let moves = plan_drain(node_id, &nodes, &settled);
        self.start_moves(&moves).await?;
        let waiting = moving
            .iter()
            .filter(|(_, _, rs)| rs.contains(&node_id))
            .count()
            + moves.len();
        let stuck = settled
            .iter()
            .filter(|(t, p, rs)| {
                rs == &vec![node_id] && !moves.iter().any(|(mt, mp, _)| mt == t && mp == p)
            })
            .count();
        if stuck > 0 {
            return Err(refuse(
                ErrorCode::InvalidRequest,
                format!(
                    "node {node_id} holds the only replica of {stuck} partition(s) and no other \
                     member can take them; add a node, then retry"
                ),
            ));
        }
        if waiting > 0 {
            return Err(refuse(
                ErrorCode::ReassignmentInProgress,
                format!(
                    "moving {waiting} partition replica(s) off node {node_id}; retry until they are moved"
                ),
            ));
        }
        Ok(())
    }
}

/// Why `addr` is not a `HOST:PORT` other nodes could dial (and put in a header), or `None`.
pub fn address_problem(addr: &str) -> Option<String> {
    let ok = addr.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty()
            && port.parse::<u16>().is_ok_and(|p| p != 0)
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':'))
    });
    (!ok).then(|| format!("node address {addr:?} is not HOST:PORT"))
}

/// One partition's replicas: (topic, partition, replicas with the preferred leader first).
pub type Placement = (String, u32, Vec<u64>);

/// A rebalance plan: replicas move from the most to the least loaded members (and off
/// non-members), only ever onto `live` members, until no move makes the spread better, keeping each partition's replicas
/// distinct; then each partition's preferred leader is the replica that leads the fewest
/// partitions so far. Returns the partitions whose replicas or order change.
pub fn plan_rebalance(members: &[u64], live: &[u64], current: &[Placement]) -> Vec<Placement> {
    if live.is_empty() {
        return Vec::new();
    }
    // Every member's load counts; only live members receive replicas.
    let mut load: BTreeMap<u64, usize> = members.iter().map(|n| (*n, 0)).collect();
    for (_, _, rs) in current {
        for r in rs {
            if let Some(l) = load.get_mut(r) {
                *l += 1;
            }
        }
    }
    let mut next: Vec<Vec<u64>> = current.iter().map(|(_, _, rs)| rs.clone()).collect();
    // Off non-members first, then one move at a time while a move narrows the spread.
    loop {
        let mut moved = false;
        for rs in next.iter_mut() {
            for i in 0..rs.len() {
                let from = rs[i];
                let Some(to) = load
                    .iter()
                    .filter(|(n, _)| live.contains(n) && !rs.contains(n))
                    .min_by_key(|(n, l)| (**l, **n))
                    .map(|(n, _)| *n)
                else {
                    continue;
                };
                let better = match load.get(&from) {
                    None => true,
                    Some(lf) => *lf > load[&to] + 1,
                };
                if better {
                    if let Some(lf) = load.get_mut(&from) {
                        *lf -= 1;
                    }
                    *load.entry(to).or_default() += 1;
                    rs[i] = to;
                    moved = true;
                }
            }
        }
        if !moved {
            break;
        }
    }
    let mut leads: BTreeMap<u64, usize> = BTreeMap::new();
    for rs in next.iter_mut() {
        let Some(best) = rs
            .iter()
            .enumerate()
            .min_by_key(|(i, n)| (leads.get(*n).copied().unwrap_or(0), *i))
            .map(|(i, _)| i)
        else {
            continue;
        };
        let leader = rs.remove(best);
        rs.insert(0, leader);
        *leads.entry(leader).or_default() += 1;
    }
    current
        .iter()
        .zip(next)
        .filter(|((_, _, before), after)| before != after)
        .map(|((t, p, _), after)| (t.clone(), *p, after))
        .collect()
}

/// The replicas of `current` without `node`: each replaced by the least loaded other member
/// not already a replica, or dropped when there is none (never the last replica).
pub fn plan_drain(node: u64, nodes: &[u64], current: &[Placement]) -> Vec<Placement> {
    let mut load: BTreeMap<u64, usize> = nodes
        .iter()
        .filter(|n| **n != node)
        .map(|n| (*n, 0))
        .collect();
    for (_, _, rs) in current {
        for r in rs {
            if let Some(l) = load.get_mut(r) {
                *l += 1;
            }
        }
    }
    let mut moves = Vec::new();
    for (t, p, rs) in current {
        let Some(i) = rs.iter().position(|r| *r == node) else {
            continue;
        };
        let mut after = rs.clone();
        let to = load
            .iter()
            .filter(|(n, _)| !rs.contains(n))
            .min_by_key(|(n, l)| (**l, **n))
            .map(|(n, _)| *n);
        match to {
            Some(to) => {
                after[i] = to;
                *load.entry(to).or_default() += 1;
            }
            None if rs.len() > 1 => {
                after.remove(i);
            }
            None => continue,
        }
        moves.push((t.clone(), *p, after));
    }
    moves
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        let m = self.require_leader()?;
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let last = m.last_log_index;
        let mut nodes = Vec::new();
        for (id, node) in membership.nodes() {
            let (alive, last_heard_ms, matched_index) = if *id == self.node_id {
                (true, 0, last.map_or(-1, |i| i as i64))
            } else {
                let since = since_heard(&m, *id);
                (
                    since.is_some_and(|d| d < LIVENESS_TIMEOUT),
                    since.map_or(-1, |d| d.as_millis() as i64),
                    matched_index(&m, *id).map_or(-1, |i| i as i64),
                )
            };
            let lag = last.map_or(0, |l| (l as i64 - matched_index).max(0) as u64);
            nodes.push(pb::NodeStatus {
                node_id: *id,
                addr: node.addr.clone(),
                role: if voters.contains(id) {
                    "voter"
                } else {
                    "learner"
                }
                .into(),
                alive,
                last_heard_ms,
                matched_index,
                lag,
            });
        }
        Ok(Response::new(pb::StatusReply {
            leader_id: self.node_id,
            leader_addr: self.addr.clone(),
            term: m.current_term,
            last_log_index: last.map_or(-1, |i| i as i64),
            committed_index: m.local_committed.map_or(-1, |l| l.index as i64),
            nodes,
        }))
    }

    async fn node_info(
        &self,
        _request: Request<pb::NodeInfoRequest>,
    ) -> Result<Response<pb::NodeInfoReply>, Status> {
        let m = self.metrics();
        let (records, state_checksum) = self
            .sm
            .checksum()
            .map_err(|e| internal("read metadata state", e))?;
        let applied = self
            .sm
            .applied()
            .map_err(|e| internal("read metadata state", e))?;
        Ok(Response::new(pb::NodeInfoReply {
            node_id: self.node_id,
            addr: self.addr.clone(),
            state: format!("{:?}", m.state),
            leader_id: m.current_leader.unwrap_or(0),
            term: m.current_term,
            last_log_index: m.last_log_index.map_or(-1, |i| i as i64),
            applied_index: applied.map_or(-1, |l| l.index as i64),
            records,
            state_checksum,
        }))
    }

    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinReply>, Status> {
        let req = request.into_inner();
        if req.node_id == 0 {
            return Err(refuse(ErrorCode::InvalidNode, "node id 0 is not allowed"));
        }
        if let Some(problem) = address_problem(&req.addr) {
            return Err(refuse(ErrorCode::InvalidNode, problem));
        }
        let _guard = self.membership_lock.lock().await;
        let role = self
            .join_locked(req.node_id, req.addr, req.has_state, req.dry_run)
            .await?;
        Ok(Response::new(pb::JoinReply { role }))
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeReply>, Status> {
        let req = request.into_inner();
        let _guard = self.membership_lock.lock().await;
        self.remove_locked(req.node_id).await?;
        Ok(Response::new(pb::RemoveNodeReply {}))
    }

    async fn rebalance(
        &self,
        request: Request<pb::RebalanceRequest>,
    ) -> Result<Response<pb::RebalanceReply>, Status> {
        let req = request.into_inner();
        let _guard = self.membership_lock.lock().await;
        let m = self.require_leader()?;
        self.linearizable().await?;
        let (settled, moving) = self.placements()?;
        let members: Vec<u64> = m
            .membership_config
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .collect();
        let moves = plan_rebalance(&members, &self.placeable_nodes(&m), &settled);
        if !req.dry_run {
            self.start_moves(&moves).await?;
        }
        let before: BTreeMap<(String, u32), Vec<u64>> =
            settled.into_iter().map(|(t, p, rs)| ((t, p), rs)).collect();
        let started = moves
            .iter()
            .filter(|(t, p, after)| {
                let from: BTreeSet<u64> = before[&(t.clone(), *p)].iter().copied().collect();
                from != after.iter().copied().collect()
            })
            .count();
        Ok(Response::new(pb::RebalanceReply {
            moving: (moving.len() + if req.dry_run { 0 } else { started }) as u32,
            moves: moves
                .into_iter()
                .map(|(topic, partition, to)| pb::PartitionMove {
                    from: before[&(topic.clone(), partition)].clone(),
                    topic,
                    partition,
                    to,
                })
                .collect(),
        }))
    }

    async fn complete_reassignment(
        &self,
        request: Request<pb::CompleteReassignmentRequest>,
    ) -> Result<Response<pb::CompleteReassignmentReply>, Status> {
        let req = request.into_inner();
        self.require_leader()?;
        self.propose(MetaCommand::ReassignmentDone {
            topic: req.topic,
            partition: req.partition,
            replicas: req.replicas,
        })
        .await?;
        Ok(Response::new(pb::CompleteReassignmentReply {}))
    }

    async fn create_topic(
        &self,
        request: Request<pb::CreateTopicRequest>,
    ) -> Result<Response<pb::CreateTopicReply>, Status> {
        let req = request.into_inner();
        let replication_factor = match req.replication_factor {
            0 => None,
            rf => Some(u16::try_from(rf).map_err(|_| {
                refuse(
                    ErrorCode::InvalidReplicationFactor,
                    format!("replication factor {rf} is not possible"),
                )
            })?),
        };
        // Only the `aq.` system topics may be asked for by a peer; `__` ones stay internal.
        let system = req.system && req.name.starts_with(SYSTEM_TOPIC_PREFIX);
        let new = NewTopic {
            name: req.name,
            partitions: req.partitions,
            replication_factor,
            configs: req.configs.into_iter().collect::<BTreeMap<_, _>>(),
            request_id: req.request_id,
            application: req.application,
        };
        let topic = self
            .topics
            .create_on_leader(new, system, req.validate_only)
            .await
            .map_err(cluster_status)?;
        Ok(Response::new(pb::CreateTopicReply {
            topic: Some(topic_to_pb(topic)),
        }))
    }

    async fn delete_topic(
        &self,
        request: Request<pb::DeleteTopicRequest>,
    ) -> Result<Response<pb::DeleteTopicReply>, Status> {
        let req = request.into_inner();
        self.topics
            .delete_on_leader(&req.name)
            .await
            .map_err(cluster_status)?;
        Ok(Response::new(pb::DeleteTopicReply {}))
    }

    async fn alter_topic(
        &self,
        request: Request<pb::AlterTopicRequest>,
    ) -> Result<Response<pb::AlterTopicReply>, Status> {
        let req = request.into_inner();
        let change = TopicChange {
            set: req.set.into_iter().collect(),
            delete: req.delete,
            partitions: (req.partitions > 0).then_some(req.partitions),
        };
        let topic = self
            .topics
            .alter_on_leader(&req.name, change, req.validate_only)
            .await
            .map_err(cluster_status)?;
        Ok(Response::new(pb::AlterTopicReply {
            topic: Some(topic_to_pb(topic)),
        }))
    }

    async fn ensure_topic(
        &self,
        request: Request<pb::EnsureTopicRequest>,
    ) -> Result<Response<pb::EnsureTopicReply>, Status> {
        let req = request.into_inner();
        let (topic, created) = self
            .topics
            .ensure_on_leader(&req.name)
            .await
            .map_err(cluster_status)?;
        Ok(Response::new(pb::EnsureTopicReply {
            topic: Some(topic_to_pb(topic)),
            created,
        }))
    }

    /// A new idempotent-producer id (epoch 0), from a block this leader reserved through the
    /// metadata log, so no id is ever handed out twice (ids of a block a former leader did
    /// not hand out are skipped).
    async fn init_producer_id(
        &self,
        _request: Request<pb::InitProducerIdRequest>,
    ) -> Result<Response<pb::InitProducerIdReply>, Status> {
        let id = self
            .controller
            .next_producer_id()
            .await
            .map_err(cluster_status)?;
        Ok(Response::new(pb::InitProducerIdReply {
            producer_id: id,
            producer_epoch: 0,
        }))
    }

    async fn list_topics(
        &self,
        _request: Request<pb::ListTopicsRequest>,
    ) -> Result<Response<pb::ListTopicsReply>, Status> {
        self.require_leader()?;
        self.linearizable().await?;
        let topics = self
            .topics
            .topics()
            .map_err(cluster_status)?
            .into_iter()
            .map(topic_to_pb)
            .collect();
        Ok(Response::new(pb::ListTopicsReply { topics }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn voters_grow_to_three_then_five() {
        let got: Vec<usize> = (1..=7).map(desired_voters).collect();
        assert_eq!(got, vec![1, 2, 3, 3, 5, 5, 5]);
    }

    #[test]
    fn replicas_are_spread_and_leaders_balanced() {
        let a = assign_replicas(&[1, 2, 3], 6, 2);
        assert_eq!(
            a,
            vec![
                vec![1, 2],
                vec![2, 3],
                vec![3, 1],
                vec![1, 2],
                vec![2, 3],
                vec![3, 1]
            ]
        );
        for replicas in &a {
            let distinct: BTreeSet<_> = replicas.iter().collect();
            assert_eq!(distinct.len(), replicas.len());
        }
    }

    #[test]
    fn addresses_are_checked() {
        assert!(address_problem("127.0.0.2:7070").is_none());
        assert!(address_problem("node-1.example:7070").is_none());
        for bad in [
            "",
            "127.0.0.2",
            ":7070",
            "h:0",
            "h:99999",
            "a b:1",
            "h:70\n70",
        ] {
            assert!(address_problem(bad).is_some(), "{bad:?} accepted");
        }
    }

    fn loads(placements: &[Placement]) -> BTreeMap<u64, (usize, usize)> {
        let mut l: BTreeMap<u64, (usize, usize)> = BTreeMap::new();
        for (_, _, rs) in placements {
            let distinct: BTreeSet<u64> = rs.iter().copied().collect();
            assert_eq!(distinct.len(), rs.len(), "replicas repeat: {rs:?}");
            for (i, r) in rs.iter().enumerate() {
                let e = l.entry(*r).or_default();
                e.0 += 1;
                e.1 += usize::from(i == 0);
            }
        }
        l
    }

    fn applied(current: &[Placement], moves: &[Placement]) -> Vec<Placement> {
        let mut after = current.to_vec();
        for (t, p, rs) in moves {
            let slot = after
                .iter_mut()
                .find(|(at, ap, _)| at == t && ap == p)
                .expect("moved partition exists");
            slot.2 = rs.clone();
        }
        after
    }

    #[test]
    fn rebalance_spreads_replicas_and_leaders_onto_new_nodes() {
        let current: Vec<Placement> = assign_replicas(&[1, 2, 3], 6, 2)
            .into_iter()
            .enumerate()
            .map(|(p, rs)| ("t".to_string(), p as u32, rs))
            .collect();
        let moves = plan_rebalance(&[1, 2, 3, 4], &[1, 2, 3, 4], &current);
        let after = applied(&current, &moves);
        let l = loads(&after);
        // 12 replicas over 4 nodes: 3 each; 6 leaderships: 1 or 2 each.
        for n in 1..=4 {
            assert_eq!(l[&n].0, 3, "{l:?}");
            assert!((1..=2).contains(&l[&n].1), "{l:?}");
        }
        // Balanced already: nothing more to do.
        assert!(plan_rebalance(&[1, 2, 3, 4], &[1, 2, 3, 4], &after).is_empty());
        // A replica on a node that is no longer a member moves.
        let gone = vec![("u".to_string(), 0, vec![9, 1])];
        let m = plan_rebalance(&[1, 2], &[1, 2], &gone);
        assert_eq!(m.len(), 1);
        assert!(!m[0].2.contains(&9));
        // A member that is silent for now keeps its replicas and gets no new ones.
        assert!(plan_rebalance(&[1, 2, 3, 4], &[1, 2, 3], &after).is_empty());
        let fresh = plan_rebalance(&[1, 2, 3, 4], &[1, 2, 3], &current);
        assert!(fresh.iter().all(|(_, _, rs)| !rs.contains(&4)));
    }

    #[test]
    fn drain_moves_every_replica_off_the_node() {
        let current: Vec<Placement> = assign_replicas(&[1, 2, 3, 4], 8, 3)
            .into_iter()
            .enumerate()
            .map(|(p, rs)| ("t".to_string(), p as u32, rs))
            .collect();
        let after = applied(&current, &plan_drain(1, &[2, 3, 4], &current));
        assert!(
            after
                .iter()
                .all(|(_, _, rs)| rs.len() == 3 && !rs.contains(&1))
        );
        assert!(!loads(&after).contains_key(&1));
        // With no other node to take it, a replica is dropped, never the last one.
        let tight = vec![("t".to_string(), 0, vec![1, 2, 3])];
        let moves = plan_drain(1, &[2, 3], &tight);
        assert_eq!(moves, vec![("t".to_string(), 0, vec![2, 3])]);
        let alone = vec![("t".to_string(), 0, vec![1])];
        assert!(plan_drain(1, &[], &alone).is_empty());
        assert_eq!(
            plan_drain(1, &[2], &alone),
            vec![("t".to_string(), 0, vec![2])]
        );
    }

    #[test]
    fn refusals_carry_their_code() {
        let s = refuse(ErrorCode::TopicExists, "x");
        assert_eq!(s.code(), Code::AlreadyExists);
        assert_eq!(
            s.metadata().get("aq-error").and_then(|v| v.to_str().ok()),
            Some("TOPIC_EXISTS")
        );
        let s = not_leader(Some((2, "127.0.0.2:7070".into())));
        assert_eq!(
            s.metadata().get("aq-leader").and_then(|v| v.to_str().ok()),
            Some("127.0.0.2:7070")
        );
    }
}
