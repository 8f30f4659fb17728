//! The broker API: the one seam every front (gRPC, Kafka, later MQTT and the gateway) and
//! every consumer inside the node calls (DESIGN.md §3).
//!
//! * [`Broker::produce`], [`Broker::fetch`], [`Broker::list_offsets`]: the data path of a
//!   partition leader (`data.rs`);
//! * [`Broker::metadata`]: every topic with each partition's leader from the leader
//!   directory (`directory.rs`) and each node's listeners;
//! * [`Broker::topics`]: topic administration from any node (`topics.rs`), with one typed
//!   topic config (`config.rs`);
//! * [`groups::Coordinator`]: consumer groups and committed offsets, stored in
//!   `__consumer_offsets` through the same produce and fetch;
//! * [`routed::RoutedProducer`]: idempotent writes from any node, forwarded to the leader;
//! * the partition replicas themselves (`partitions/`) and the idempotent producer gate
//!   (`idempotence.rs`); the record codec (`records.rs`).
//!
//! Errors are one transport-neutral [`BrokerError`] with a stable [`ErrorCode`]; each front
//! maps the code to its own protocol's. Dependencies point one way: fronts → `broker` →
//! `aqueduct_raft`, `aqueduct_storage`, the metadata state; nothing here knows gRPC services,
//! Kafka or MQTT.

pub mod config;
pub mod controller;
mod data;
pub mod directory;
pub mod error;
mod forward;
pub mod groups;
pub mod idempotence;
pub mod partitions;
pub mod records;
pub mod routed;
pub mod topics;

use std::sync::Arc;

use aqueduct_raft::network::Channels;

pub use data::{
    Acks, FetchRequest, Fetched, MAX_BATCH_BYTES, OffsetSpec, ProduceRequest, Produced,
    batch_problem,
};
pub use directory::{ClusterView, NodeView, PartitionView, TopicView};
pub use error::{BrokerError, BrokerResult, ErrorCode, Redirect};
pub use forward::from_status;

use controller::Controller;
use partitions::{Partitions, Replica};
use topics::{TopicAdmin, TopicSettings};

/// The internal topic of committed offsets and group state (DESIGN.md §5a).
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";
/// Its partition count (never changes once created).
pub const OFFSETS_PARTITIONS: u32 = 50;

/// The broker of one node (cheap to clone: clones share everything).
#[derive(Debug, Clone)]
pub struct Broker {
    partitions: Partitions,
    topics: TopicAdmin,
    directory: aqueduct_raft::directory::Directory,
    liveness: aqueduct_raft::liveness::Liveness,
    channels: Channels,
}

impl Broker {
    pub fn new(
        partitions: Partitions,
        controller: Controller,
        channels: Channels,
        liveness: aqueduct_raft::liveness::Liveness,
        settings: TopicSettings,
    ) -> Self {
        Self {
            directory: liveness.directory().clone(),
            topics: TopicAdmin::new(controller, channels.clone(), settings),
            partitions,
            liveness,
            channels,
        }
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.partitions.node_id()
    }

    /// Whether `node` answers this node (itself always does).
    pub fn node_alive(&self, node: u64) -> bool {
        self.liveness.alive(node)
    }

    /// Each peer and the start of its current run of answered pings (None while it does
    /// not answer): a new start means the peer answers again after a silence.
    pub fn peer_runs(&self) -> Vec<(u64, Option<std::time::Instant>)> {
        self.liveness
            .peers()
            .into_iter()
            .map(|n| (n, self.liveness.alive_since(n)))
            .collect()
    }

    /// This process's incarnation: new every time the node starts.
    pub fn incarnation(&self) -> u64 {
        self.directory.incarnation()
    }

    /// The incarnation `node` is running as, once it has answered a ping (this process's
    /// own for this node): a session bound to another incarnation is gone.
    pub fn node_incarnation(&self, node: u64) -> Option<u64> {
        self.directory.incarnation_of(self.node_id(), node)
    }

    /// The partition replicas this node hosts.
    pub fn partitions(&self) -> &Partitions {
        &self.partitions
    }

    /// The node-to-node gRPC connections (one per peer, shared with Raft).
    pub fn channels(&self) -> &Channels {
        &self.channels
    }

    /// A new idempotent-producer id (epoch 0), from the metadata leader: locally when this
    /// node leads the metadata group, else asked of it, retrying until `within`.
    pub async fn init_producer_id(&self, within: std::time::Duration) -> BrokerResult<i64> {
        if self.controller().leads() {
            match self.controller().next_producer_id().await {
                Err(e) if e.code.retriable() => {}
                done => return done,
            }
        }
        let servers: Vec<String> = self
            .controller()
            .leader()
            .map(|l| l.1)
            .into_iter()
            .chain(
                self.partitions
                    .metadata()
                    .nodes()
                    .map_err(|e| BrokerError::internal("read nodes", e))?
                    .into_iter()
                    .map(|n| n.addr),
            )
            .collect();
        let r = forward::on_meta_leader(&self.channels, &servers, within, |mut c| async move {
            c.init_producer_id(aqueduct_protocol::cluster::InitProducerIdRequest {})
                .await
        })
        .await?;
        Ok(r.producer_id)
    }

    /// Whether the local replica leads the partition.
    pub fn leads(&self, topic: &str, partition: u32) -> bool {
        self.partitions
            .get(topic, partition)
            .is_some_and(|r| r.leader().is_some_and(|(id, _)| id == r.raft_id()))
    }

    /// Topic administration.
    pub fn topics(&self) -> &TopicAdmin {
        &self.topics
    }

    /// The metadata group as seen from here.
    pub fn controller(&self) -> &Controller {
        self.topics.controller()
    }

    /// Records this node's client listeners (protocol → advertised `HOST:PORT`), which node
    /// pings spread to the other nodes.
    pub fn set_listeners(&self, listeners: std::collections::HashMap<String, String>) {
        self.directory.set_listeners(listeners);
    }

    /// The local replica when it leads the partition; otherwise the refusal that sends the
    /// caller to the leader (or to the replicas).
    pub fn leader_replica(&self, topic: &str, partition: u32) -> BrokerResult<Arc<Replica>> {
        let Some(replica) = self.partitions.get(topic, partition) else {
            return Err(self.not_here(topic, partition));
        };
        match replica.leader() {
            Some((id, _)) if id == replica.raft_id() => Ok(replica),
            Some((node, addr)) => Err(BrokerError::new(
                ErrorCode::NotLeader,
                format!("not the leader of {topic}/{partition}; node {node} at {addr} is"),
            )
            .with_redirect(Redirect::Leader { node, addr })),
            None => Err(BrokerError::new(
                ErrorCode::LeaderNotAvailable,
                format!("{topic}/{partition} has no leader right now; retry shortly"),
            )),
        }
    }

    /// The refusal of a node without a replica: the replicas' addresses, or unknown.
    fn not_here(&self, topic: &str, partition: u32) -> BrokerError {
        let meta = self.partitions.metadata();
        let replicas = meta.replicas(topic, partition).ok().flatten();
        let Some(replicas) = replicas else {
            return BrokerError::new(
                ErrorCode::UnknownTopicOrPartition,
                format!("no partition {partition} of topic {topic:?}"),
            );
        };
        if replicas.contains(&self.partitions.node_id()) {
            // Assigned here but not started yet (the topic was just created).
            return BrokerError::new(
                ErrorCode::LeaderNotAvailable,
                format!("the replica of {topic}/{partition} on this node is starting; retry"),
            );
        }
        let addrs: Vec<String> = replicas
            .iter()
            .filter_map(|id| meta.node(*id).ok().flatten().map(|n| n.addr))
            .collect();
        BrokerError::new(
            ErrorCode::NotReplica,
            format!(
                "this node holds no replica of {topic}/{partition}; its replicas are at {}",
                addrs.join(",")
            ),
        )
        .with_redirect(Redirect::Replicas(addrs))
    }
}
