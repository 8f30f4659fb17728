//! The metadata group as the broker sees it: who leads it, proposing commands on the leader,
//! and the leader's view of which members are reachable.
//!
//! Every metadata change is proposed on the metadata leader. [`Controller::propose_for`]
//! refuses on any other node with [`ErrorCode::NotLeader`] and the leader's address (or
//! [`ErrorCode::NotController`] when no leader is known); callers that accept a change on any
//! node forward it there (`topics.rs`).

use std::time::Duration;

use aqueduct_raft::network::MetaRaft;
use aqueduct_raft::state_machine::MetaStateMachine;
use aqueduct_raft::types::{
    GroupCommand, GroupResponse, GroupTypeConfig, MetaCommand, MetaErrorCode, MetaResponse,
};
use openraft::Instant as _;
use openraft::RaftMetrics;
use openraft::async_runtime::WatchReceiver as _;
use openraft::error::{ClientWriteError, RaftError};

use super::error::{BrokerError, BrokerResult, ErrorCode, Redirect};

/// A follower the metadata leader has not heard from for this long is not alive (no new
/// replicas are placed on it).
pub const LIVENESS_TIMEOUT: Duration = Duration::from_secs(3);

/// On a leader: how long ago it last heard from `id` (`None`: not since it became leader).
pub fn since_heard(m: &RaftMetrics<GroupTypeConfig>, id: u64) -> Option<Duration> {
    let at = m.heartbeat.as_ref()?.get(&id)?.as_ref()?;
    Some(at.elapsed())
}

/// On a leader: the last log index `id` is known to hold.
pub fn matched_index(m: &RaftMetrics<GroupTypeConfig>, id: u64) -> Option<u64> {
    Some(m.replication.as_ref()?.get(&id)?.as_ref()?.index)
}

/// On a leader: whether it heard from `id` within [`LIVENESS_TIMEOUT`].
pub fn alive(m: &RaftMetrics<GroupTypeConfig>, id: u64) -> bool {
    since_heard(m, id).is_some_and(|d| d < LIVENESS_TIMEOUT)
}

/// The leader (id, gRPC address) named by a group's metrics.
pub fn leader_of(m: &RaftMetrics<GroupTypeConfig>) -> Option<(u64, String)> {
    let id = m.current_leader?;
    let addr = m.membership_config.membership().get_node(&id)?.addr.clone();
    Some((id, addr))
}

/// The refusal of a node that does not lead the metadata group.
pub fn not_controller(leader: Option<(u64, String)>) -> BrokerError {
    match leader {
        Some((node, addr)) => BrokerError::new(
            ErrorCode::NotLeader,
            format!("not the metadata leader; the leader is node {node} at {addr}"),
        )
        .with_redirect(Redirect::Leader { node, addr }),
        None => BrokerError::new(
            ErrorCode::NotController,
            "no metadata leader is known right now (election under way); retry shortly",
        ),
    }
}

fn from_meta(code: MetaErrorCode) -> ErrorCode {
    match code {
        MetaErrorCode::TopicExists => ErrorCode::TopicExists,
        MetaErrorCode::UnknownTopic => ErrorCode::UnknownTopicOrPartition,
        MetaErrorCode::UnknownNode => ErrorCode::UnknownNode,
        MetaErrorCode::InvalidPartition => ErrorCode::InvalidPartitions,
        MetaErrorCode::InvalidReplicationFactor => ErrorCode::InvalidReplicationFactor,
        MetaErrorCode::InvalidTopicName => ErrorCode::InvalidTopicName,
        MetaErrorCode::InvalidRequest => ErrorCode::InvalidRequest,
        MetaErrorCode::ReassignmentInProgress => ErrorCode::ReassignmentInProgress,
        MetaErrorCode::NotFound => ErrorCode::NotFound,
        MetaErrorCode::AlreadyExists => ErrorCode::AlreadyExists,
        MetaErrorCode::InUse => ErrorCode::InUse,
        MetaErrorCode::InvalidDefinition => ErrorCode::InvalidConfig,
    }
}

/// This node's handle on the metadata group (cheap to clone).
#[derive(Debug, Clone)]
pub struct Controller {
    node_id: u64,
    raft: MetaRaft,
    sm: MetaStateMachine,
    /// Producer ids reserved by this node while it led, not handed out yet (`next..end`).
    producer_ids: std::sync::Arc<tokio::sync::Mutex<(i64, i64)>>,
}

/// How many producer ids a metadata leader reserves at a time.
const PRODUCER_ID_BLOCK: u32 = 1000;

impl Controller {
    pub fn new(node_id: u64, raft: MetaRaft, sm: MetaStateMachine) -> Self {
        Self {
            node_id,
            raft,
            sm,
            producer_ids: std::sync::Arc::default(),
        }
    }

    /// A new idempotent-producer id, never handed out before (ids are reserved in blocks
    /// through the metadata log, so a new leader never repeats one). Leader only.
    pub async fn next_producer_id(&self) -> BrokerResult<i64> {
        self.require_leader()?;
        let mut ids = self.producer_ids.lock().await;
        if ids.0 >= ids.1 {
            match self
                .propose_for(MetaCommand::AllocateProducerIds {
                    count: PRODUCER_ID_BLOCK,
                })
                .await?
            {
                MetaResponse::ProducerIds { first, count } => {
                    *ids = (first, first + i64::from(count));
                }
                other => return Err(BrokerError::internal("allocate producer ids", other)),
            }
        }
        let id = ids.0;
        ids.0 += 1;
        Ok(id)
    }

    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    pub fn raft(&self) -> &MetaRaft {
        &self.raft
    }

    /// The metadata state as applied on this node.
    pub fn state(&self) -> &MetaStateMachine {
        &self.sm
    }

    pub fn metrics(&self) -> RaftMetrics<GroupTypeConfig> {
        self.raft.metrics().borrow_watched().clone()
    }

    /// The metadata leader, if known.
    pub fn leader(&self) -> Option<(u64, String)> {
        leader_of(&self.metrics())
    }

    /// Whether this node leads the metadata group (by its own metrics).
    pub fn leads(&self) -> bool {
        self.metrics().current_leader == Some(self.node_id)
    }

    /// Ok with the current metrics when this node leads the metadata group.
    pub fn require_leader(&self) -> BrokerResult<RaftMetrics<GroupTypeConfig>> {
        let m = self.metrics();
        if m.current_leader == Some(self.node_id) {
            Ok(m)
        } else {
            Err(not_controller(leader_of(&m)))
        }
    }

    /// Maps an openraft write error: a lost leadership becomes `NotLeader` (or
    /// `NotController`), a membership change in progress `TryAgain`, a stopping Raft
    /// `NotController`.
    pub fn write_error(
        &self,
        what: &str,
        e: RaftError<GroupTypeConfig, ClientWriteError<GroupTypeConfig>>,
    ) -> BrokerError {
        match e {
            RaftError::APIError(
                ClientWriteError::ForwardToLeader(f) | ClientWriteError::LogEntryDiscarded(f),
            ) => not_controller(
                f.leader_id
                    .zip(f.leader_node.map(|n| n.addr))
                    .filter(|(id, _)| *id != self.node_id),
            ),
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => BrokerError::new(
                ErrorCode::TryAgain,
                format!("{what}: {e}; retry when it completes"),
            ),
            RaftError::Fatal(e) => BrokerError::new(
                ErrorCode::NotController,
                format!("{what}: this node's metadata Raft stopped ({e})"),
            ),
            other => BrokerError::internal(what, other),
        }
    }

    /// Proposes a metadata command and waits until it is committed and applied here.
    pub async fn propose(&self, cmd: MetaCommand) -> BrokerResult<()> {
        self.propose_for(cmd).await.map(|_| ())
    }

    /// [`Self::propose`], returning what the state machine answered.
    pub async fn propose_for(&self, cmd: MetaCommand) -> BrokerResult<MetaResponse> {
        let what = cmd.to_string();
        // A new leader refuses writes (naming no leader, or itself) until its lease is
        // confirmed: retry briefly while it still leads.
        let mut tries = 0;
        loop {
            match self
                .raft
                .client_write(GroupCommand::Meta(cmd.clone()))
                .await
            {
                Ok(r) => {
                    return match r.response() {
                        GroupResponse::Meta(MetaResponse::Rejected { code, message }) => {
                            Err(BrokerError::new(from_meta(*code), message.clone()))
                        }
                        GroupResponse::Meta(ok) => Ok(ok.clone()),
                        other => Err(BrokerError::internal(&what, other)),
                    };
                }
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))
                    if f.leader_id.is_none_or(|l| l == self.node_id)
                        && tries < 50
                        && self.leads() =>
                {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(self.write_error(&what, e)),
            }
        }
    }

    /// Waits until this leader's state machine has applied everything committed before the
    /// call (a read index), so reads of it are current.
    pub async fn linearizable(&self) -> BrokerResult<()> {
        let read = self
            .raft
            .ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex)
            .await;
        if let Err(e) = read {
            return Err(match self.leader() {
                Some(l) if l.0 != self.node_id => not_controller(Some(l)),
                _ => BrokerError::new(
                    ErrorCode::NotController,
                    format!("leadership could not be confirmed ({e}); retry"),
                ),
            });
        }
        Ok(())
    }

    /// Members that can take new replicas: every member except those the leader has not
    /// heard from for [`LIVENESS_TIMEOUT`] (a member not heard from *yet*, right after an
    /// election, counts), sorted by id.
    pub fn placeable_nodes(&self, m: &RaftMetrics<GroupTypeConfig>) -> Vec<u64> {
        m.membership_config
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .filter(|id| {
                *id == self.node_id || since_heard(m, *id).is_none_or(|d| d < LIVENESS_TIMEOUT)
            })
            .collect()
    }
}
