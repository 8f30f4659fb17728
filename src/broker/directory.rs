//! The cluster as a front describes it to clients: nodes with their listeners, topics with
//! each partition's current leader, replicas and in-sync replicas (Kafka's Metadata,
//! FindCoordinator).
//!
//! A partition's leader comes from the local replica when this node hosts one, and otherwise
//! from the leader directory that node pings keep current (`aqueduct_raft::directory`): no
//! request per partition. Where both know a leader, the higher Raft term wins.

use std::collections::HashMap;

use super::Broker;
use super::error::BrokerResult;
use super::topics::TopicInfo;
use openraft::async_runtime::WatchReceiver as _;

/// One node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub id: u64,
    /// Its gRPC address (native clients, Raft).
    pub grpc: String,
    /// Its client listeners by protocol (`"kafka"` → advertised `HOST:PORT`), as far as this
    /// node has heard.
    pub listeners: HashMap<String, String>,
    /// It answers node pings.
    pub alive: bool,
}

/// One partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionView {
    pub partition: u32,
    /// The current leader, if one is known.
    pub leader: Option<u64>,
    /// The leader's Raft term (Kafka's leader epoch).
    pub leader_epoch: u64,
    pub replicas: Vec<u64>,
    /// Replicas that answer node pings (and so follow the leader).
    pub in_sync: Vec<u64>,
}

/// One topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicView {
    pub info: TopicInfo,
    pub partitions: Vec<PartitionView>,
    /// A system topic (`__…`, `aq.…`).
    pub internal: bool,
}

/// What [`Broker::metadata`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterView {
    /// The cluster's id, the same on every node (`None` in the first moments of a new
    /// cluster, before the metadata leader has named it).
    pub cluster_id: Option<String>,
    pub nodes: Vec<NodeView>,
    /// The metadata leader.
    pub controller: Option<u64>,
    pub topics: Vec<TopicView>,
}

impl Broker {
    /// The nodes and the named topics (all topics for `None`); names that are not topics are
    /// left out (the caller decides whether to create them).
    pub fn metadata(&self, topics: Option<&[String]>) -> BrokerResult<ClusterView> {
        let me = self.node_id();
        let alive = |n: u64| self.liveness.alive(n);
        let claimed = self.directory.leaders(me, alive);
        let sm = self.partitions.metadata();
        let nodes = sm
            .nodes()
            .map_err(|e| super::BrokerError::internal("read nodes", e))?
            .into_iter()
            .map(|n| NodeView {
                id: n.node_id,
                listeners: if n.node_id == me {
                    self.directory.own_listeners()
                } else {
                    ["kafka"]
                        .iter()
                        .filter_map(|p| {
                            self.directory
                                .listener(me, n.node_id, p)
                                .map(|a| (p.to_string(), a))
                        })
                        .collect()
                },
                grpc: n.addr,
                alive: alive(n.node_id),
            })
            .collect();
        let infos = match topics {
            None => self.topics.topics()?,
            Some(names) => {
                let mut out = Vec::new();
                for n in names {
                    if let Some(t) = self.topics.topic(n)? {
                        out.push(t);
                    }
                }
                out
            }
        };
        let topics = infos
            .into_iter()
            .map(|info| {
                let partitions = info
                    .assignment
                    .iter()
                    .map(|(p, replicas)| {
                        let (leader, leader_epoch) =
                            self.leader_of(&info.record.name, *p, &claimed);
                        PartitionView {
                            partition: *p,
                            leader,
                            leader_epoch,
                            replicas: replicas.clone(),
                            in_sync: replicas.iter().copied().filter(|r| alive(*r)).collect(),
                        }
                    })
                    .collect();
                TopicView {
                    internal: info.record.name.starts_with("__")
                        || info.record.name.starts_with("aq."),
                    info,
                    partitions,
                }
            })
            .collect();
        Ok(ClusterView {
            cluster_id: sm
                .cluster_id()
                .map_err(|e| super::BrokerError::internal("read the cluster id", e))?,
            nodes,
            controller: self.controller().leader().map(|l| l.0),
            topics,
        })
    }

    /// The gRPC address of the partition's current leader, if one is known.
    pub fn leader_address(&self, topic: &str, partition: u32) -> Option<String> {
        let claimed = self
            .directory
            .leaders(self.node_id(), |n| self.liveness.alive(n));
        let (leader, _) = self.leader_of(topic, partition, &claimed);
        let node = self.partitions.metadata().node(leader?).ok().flatten()?;
        Some(node.addr)
    }

    /// The partition's leader and term: the local replica's view or the directory's claim,
    /// the higher term winning.
    fn leader_of(
        &self,
        topic: &str,
        partition: u32,
        claimed: &HashMap<(String, u32), (u64, u64)>,
    ) -> (Option<u64>, u64) {
        let local = self.partitions.get(topic, partition).and_then(|r| {
            let m = r.raft.metrics();
            let m = m.borrow_watched();
            m.current_leader
                .filter(|l| self.liveness.alive(*l))
                .map(|l| (l, m.current_term))
        });
        let remote = claimed.get(&(topic.to_string(), partition)).copied();
        match (local, remote) {
            (Some(l), Some(r)) if r.1 > l.1 => (Some(r.0), r.1),
            (Some(l), _) => (Some(l.0), l.1),
            (None, Some(r)) => (Some(r.0), r.1),
            (None, None) => (None, 0),
        }
    }
}
